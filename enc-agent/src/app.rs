//! Wiring: everything the agent runs, started and stopped in one place.

use crate::Error;
use crate::backend::Crypto;
use crate::config::{Config, EncryptionConfig, EspEncapsulation, Implementation};
use crate::control::proto::{Hello, PROTOCOL_VERSION, WireguardAnnounce};
use crate::control::session::Timing;
use crate::peers::{Auth, CryptoLayout, Desired, ENC_TABLE, Layout, PeerTable, Role};
use crate::reconcile::{attach_pods, reconcile};
use enc_certs::NodeIdentity;
use enc_geneve_vxlan::{LinkBackend, OverlaySpec, RT_TABLE_MAIN, RtnetlinkLinks, mtu};
use enc_ipsec::IpsecBackend;
use enc_ipsec::userspace::{ESP_IN_UDP_PORT, Encapsulation, UserspaceConfig, UserspaceEsp};
use enc_ipsec::xfrm::{KernelIpsec, NetlinkXfrm, probe_esp_gcm};
use enc_key_manager::Epoch;
use enc_key_manager::rotation::{RetireHold, Rotation, RotationTiming};
use enc_tunnel_ebpf::{AyaDatapath, Datapath, DatapathConfig as DpConfig};
use enc_wireguard::{
    BoringtunConfig, BoringtunWg, KernelConfig, KernelWg, PrivateKey, PublicKey, WgBackend,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{info, warn};

/// Where bpffs is mounted on a node; mounted by the agent when missing.
const BPFFS: &str = "/sys/fs/bpf";

/// How often the reconciler runs even when nothing asked it to.
const RECONCILE_PERIOD: Duration = Duration::from_secs(5);
/// Old keys past their grace period (a rotation's old epochs and an earlier session's keys)
/// are removed only after no packet arrived under them for 2 s: a userspace datapath on a
/// starved CPU can open packets seconds after they reached its socket, and those sealed just
/// before the peer switched must still open. At most 60 s past the grace period, so a peer
/// that keeps sending under a superseded key cannot hold them forever.
pub const RETIRE_HOLD: RetireHold = RetireHold::DEFAULT;

/// State shared by the agent's tasks.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// This node's TLS identity; replaced when renewed files are loaded (see
    /// [`Shared::identity`]).
    identity: std::sync::RwLock<Arc<NodeIdentity>>,
    /// The encryption backend.
    pub crypto: Crypto,
    /// The device routes into table 229 point at.
    pub route_device: String,
    /// Links and routes.
    pub links: Arc<dyn LinkBackend>,
    /// The eBPF datapath.
    pub dp: Arc<dyn Datapath>,
    /// Pod-facing interfaces with the pod programs attached, as of the last reconcile.
    pub pod_interfaces: Mutex<Vec<String>>,
    leaks_seen: Mutex<HashMap<u16, (u64, Instant)>>,
    /// Why this encryption implementation was chosen.
    pub backend_reason: String,
    /// MTU of the encryption device and of the routes into it (the underlay MTU without
    /// encryption).
    pub mtu: u32,
    /// The MTUs of this node's stack (underlay, encryption, overlay, pod routes).
    pub mtu_plan: mtu::MtuPlan,
    /// How pod traffic is carried: what the routes are built for.
    pub layout: Layout,
    /// When the agent started.
    pub started: Instant,
    /// Control session timers.
    pub timing: Timing,
    /// The audit event log.
    pub events: crate::events::EventLog,
    table: Mutex<PeerTable>,
    reconcile: Notify,
    /// Serialises reconcile passes (the periodic reconciler and the sessions' key steps).
    reconcile_lock: Mutex<()>,
    next_session: AtomicU64,
    /// Per peer: the session that currently runs its rotation, and how to reach it.
    rotators: Mutex<HashMap<String, (u64, tokio::sync::mpsc::Sender<RotateCmd>)>>,
    /// When the WireGuard static key pair was last rolled (or created).
    wg_key_rolled: Mutex<Instant>,
    /// Serials of certificates already warned about (20% of their lifetime left).
    expiry_warned: Mutex<std::collections::HashSet<String>>,
    /// The newest revocation list this node verified (persisted in `stateDir/crl.pem`), and
    /// its number for the sessions to watch.
    crl: Mutex<Option<enc_certs::RevocationList>>,
    crl_watch: tokio::sync::watch::Sender<u64>,
    /// Bumped when a reloaded identity needs every control session to re-authenticate.
    reauth_watch: tokio::sync::watch::Sender<(u64, String)>,
    /// Held while `tls.cert` / `tls.key` are replaced and reloaded, so that the file poller
    /// never loads a half-replaced pair.
    identity_files: Mutex<()>,
    /// Automatic renewal state (`tls.renewal`), for the renewer and status.
    renewal: Mutex<Option<RenewalState>>,
    /// What the issuer role did (`issuer`).
    issuer_stats: crate::issuer::IssuerStats,
    /// Bumped whenever discovery changes the expected peer set.
    peers_watch: tokio::sync::watch::Sender<u64>,
}

/// What [`Shared::new`] takes: the state `run` works out at start-up (or a test makes up). The
/// rest of [`Shared`] starts empty.
pub(crate) struct SharedParts {
    pub(crate) config: Config,
    pub(crate) identity: NodeIdentity,
    pub(crate) crypto: Crypto,
    pub(crate) route_device: String,
    pub(crate) links: Arc<dyn LinkBackend>,
    pub(crate) dp: Arc<dyn Datapath>,
    pub(crate) pod_interfaces: Vec<String>,
    pub(crate) backend_reason: String,
    pub(crate) mtu: u32,
    pub(crate) mtu_plan: mtu::MtuPlan,
    pub(crate) layout: Layout,
    pub(crate) events: crate::events::EventLog,
    pub(crate) crl: Option<enc_certs::RevocationList>,
}

impl Shared {
    /// The agent's shared state, built in one place for `run` and the tests, so that a new
    /// field is initialised once.
    pub(crate) fn new(p: SharedParts) -> Arc<Self> {
        Arc::new(Shared {
            table: Mutex::new(PeerTable::new(&p.config, Instant::now())),
            identity: std::sync::RwLock::new(Arc::new(p.identity)),
            crypto: p.crypto,
            route_device: p.route_device,
            links: p.links,
            dp: p.dp,
            pod_interfaces: Mutex::new(p.pod_interfaces),
            leaks_seen: Mutex::new(HashMap::new()),
            backend_reason: p.backend_reason,
            mtu: p.mtu,
            mtu_plan: p.mtu_plan,
            layout: p.layout,
            started: Instant::now(),
            timing: Timing::default(),
            events: p.events,
            reconcile: Notify::new(),
            reconcile_lock: Mutex::new(()),
            next_session: AtomicU64::new(1),
            rotators: Mutex::new(HashMap::new()),
            wg_key_rolled: Mutex::new(Instant::now()),
            expiry_warned: Mutex::new(std::collections::HashSet::new()),
            crl: Mutex::new(p.crl),
            crl_watch: tokio::sync::watch::channel(0).0,
            reauth_watch: tokio::sync::watch::channel((0, String::new())).0,
            peers_watch: tokio::sync::watch::channel(0).0,
            identity_files: Mutex::new(()),
            renewal: Mutex::new(None),
            issuer_stats: Default::default(),
            config: p.config,
        })
    }
}

/// The automatic renewal of this node's certificate, as status shows it.
#[derive(Clone, Debug)]
pub struct RenewalState {
    /// The issuer, `HOST:PORT`.
    pub issuer: String,
    /// The schedule of the certificate in use.
    pub schedule: crate::renewal::Schedule,
    /// Serial of the certificate the schedule is for.
    pub serial: String,
    /// Renewals completed since start.
    pub renewals: u64,
    /// When the last one completed.
    pub last_renewal: Option<std::time::SystemTime>,
}

/// What became of a revocation list offered to [`Shared::offer_crl`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// It was newer: verified, persisted, applied and passed on.
    Adopted,
    /// This node holds the same number already.
    Same,
    /// This node holds a newer one.
    Older,
}

/// File name of the accepted revocation list in `stateDir`.
pub const CRL_STATE_FILE: &str = "crl.pem";

/// An operator's rotation request, sent to the session task of one peer.
#[derive(Debug)]
pub struct RotateCmd {
    /// Gets the epoch in use and the target epoch, or why the session cannot rotate.
    pub reply: tokio::sync::oneshot::Sender<Result<(Option<Epoch>, Epoch), String>>,
}

/// Why a rotation request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RotateRefusal {
    /// No expected peer has this name.
    #[error("no peer named {0:?} is expected by this node")]
    UnknownPeer(String),
    /// The peer has no control session to rotate over.
    #[error("peer {peer:?} is not authenticated ({state}); nothing to rotate")]
    NotConnected {
        /// The peer.
        peer: String,
        /// Its authentication state.
        state: String,
    },
    /// No peer is authenticated.
    #[error("no peer is authenticated; nothing to rotate")]
    NoPeers,
    /// Encryption is off on this node.
    #[error("encryption.type is none on this node: there are no keys to rotate")]
    NoEncryption,
}

impl RotateRefusal {
    /// The HTTP status of the refusal in the status API.
    pub fn http_status(&self) -> u16 {
        match self {
            RotateRefusal::UnknownPeer(_) => 404,
            RotateRefusal::NotConnected { .. }
            | RotateRefusal::NoPeers
            | RotateRefusal::NoEncryption => 409,
        }
    }
}

/// Bytes and ESP sequence number sent to one peer, as the backend reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerTx {
    /// Bytes sent to the peer (all epochs).
    pub bytes: u64,
    /// Sequence number of the outbound ESP SA in use (IPsec only).
    pub esp_seq: Option<u64>,
}

impl Shared {
    /// This node's current identity (certificate, key, CA bundle).
    pub fn identity(&self) -> Arc<NodeIdentity> {
        self.identity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notified with a reason whenever the sessions must re-authenticate.
    pub fn subscribe_reauth(&self) -> tokio::sync::watch::Receiver<(u64, String)> {
        self.reauth_watch.subscribe()
    }

    /// Loads the identity files again and, if they changed and are valid for this node,
    /// switches to them: a renewed certificate or a changed CA bundle takes effect for new
    /// handshakes at once, and every session re-authenticates (keys stay through
    /// `control.keyGracePeriod`, so traffic does not stop). Invalid files (half-written, a
    /// key that does not match, a certificate for another node) leave the current identity
    /// in use, with a warning and an event. Returns whether the identity changed.
    pub fn reload_identity(&self) -> bool {
        self.reload_identity_from(None)
    }

    /// [`Shared::reload_identity`], naming where a renewed certificate came from in the
    /// `renewal` event (`None`: files changed on disk).
    pub fn reload_identity_from(&self, source: Option<&str>) -> bool {
        let c = &self.config.tls;
        let loaded = match NodeIdentity::load(&c.cert, &c.key, &c.ca)
            .map_err(|e| format_chain(&e))
            .and_then(|id| {
                check_identity(&self.config, &id)
                    .map(|()| id)
                    .map_err(|e| format_chain(&e))
            }) {
            Ok(id) => id,
            Err(reason) => {
                warn!(%reason, "reloading tls.cert / tls.key / tls.ca failed; the current identity stays in use");
                self.events.record(
                    enc_api::EventKind::IdentityReloadFailed,
                    crate::events::Detail {
                        detail: format!("{reason}; the current identity stays in use"),
                        ..Default::default()
                    },
                );
                return false;
            }
        };
        let old = self.identity();
        let cert_changed = old.info().sha256_fingerprint != loaded.info().sha256_fingerprint;
        let ca_changed = old.ca_certs() != loaded.ca_certs();
        if !cert_changed && !ca_changed {
            return false;
        }
        let new = loaded.info().clone();
        // A revocation list whose CA is no longer trusted cannot revoke anything any more.
        {
            let mut crl = self.crl.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = crl.as_ref()
                && list.check_issued_by(loaded.ca_certs()).is_err()
            {
                info!(number = list.number(), issuer = %list.issuer(), "dropping the revocation list: its CA is no longer in tls.ca");
                *crl = None;
            }
        }
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        let mut what = Vec::new();
        if cert_changed {
            what.push(format!(
                "certificate renewed{}: serial {} -> {}, issued by {}, valid until {}",
                source.map(|s| format!(" ({s})")).unwrap_or_default(),
                old.info().serial,
                new.serial,
                new.issuer,
                new.not_after
            ));
            self.events.record(
                enc_api::EventKind::Renewal,
                crate::events::Detail {
                    serial: Some(new.serial.clone()),
                    detail: what[0].clone(),
                    ..Default::default()
                },
            );
        }
        if ca_changed {
            let d = format!(
                "CA bundle {} now holds {} certificate(s)",
                c.ca.display(),
                self.identity().ca_certs().len()
            );
            self.events.record(
                enc_api::EventKind::TrustChanged,
                crate::events::Detail {
                    detail: d.clone(),
                    ..Default::default()
                },
            );
            what.push(d);
        }
        let reason = what.join("; ");
        info!(%reason, "identity reloaded; control sessions re-authenticate");
        self.reauth_watch.send_modify(|(n, r)| {
            *n += 1;
            *r = reason.clone();
        });
        true
    }

    /// What the issuer role did since start.
    pub fn issuer_stats(&self) -> &crate::issuer::IssuerStats {
        &self.issuer_stats
    }

    /// The automatic renewal state, if `tls.renewal` is configured and the renewer started.
    pub fn renewal_state(&self) -> Option<RenewalState> {
        self.renewal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notified whenever discovery changes the expected peer set.
    pub fn subscribe_peers(&self) -> tokio::sync::watch::Receiver<u64> {
        self.peers_watch.subscribe()
    }

    /// The expected peer at this underlay address, and its incarnation.
    pub fn peer_by_addr(&self, addr: std::net::IpAddr) -> Option<(crate::config::PeerConfig, u64)> {
        self.table()
            .by_addr(addr)
            .map(|e| (e.config.clone(), e.incarnation))
    }

    /// Whether peer `name` is still the incarnation a session or dial loop started for.
    pub fn is_current(&self, name: &str, incarnation: u64) -> bool {
        self.table().is_current(name, incarnation)
    }

    /// Makes `peers` the expected peer set: new peers are pending, removed peers' keys,
    /// routes and datapath state go at the next reconcile (requested here), moved peers lose
    /// their keys at once and must authenticate at the new address. Sessions and dial loops
    /// of removed or moved peers end by themselves (they watch [`Shared::subscribe_peers`]).
    pub fn set_peers(&self, peers: &[crate::config::PeerConfig]) -> crate::peers::PeerSetChange {
        let change = self.table().set_peers(peers, Instant::now());
        if change.is_empty() {
            return change;
        }
        info!(
            added = ?change.added,
            removed = ?change.removed,
            readdressed = ?change.readdressed,
            updated = ?change.updated,
            "expected peer set changed"
        );
        for (names, what) in [
            (&change.added, "peer added by discovery"),
            (
                &change.removed,
                "peer removed by discovery; keys and routes removed",
            ),
            (
                &change.readdressed,
                "peer address changed in discovery; keys removed until it authenticates at the new address",
            ),
        ] {
            for name in names {
                let addr = self
                    .table()
                    .get(name)
                    .map(|e| format!(" ({})", e.config.underlay_address))
                    .unwrap_or_default();
                self.events.record(
                    enc_api::EventKind::PeerSetChanged,
                    crate::events::Detail::peer(name, format!("{what}{addr}")),
                );
            }
        }
        self.peers_watch.send_modify(|n| *n += 1);
        self.request_reconcile();
        change
    }

    /// Locks the peer table; a poisoned lock (a panicked task) is recovered, since the table
    /// is plain data that every transition leaves consistent.
    pub fn table(&self) -> MutexGuard<'_, PeerTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the reconciler to run.
    pub fn request_reconcile(&self) {
        self.reconcile.notify_one();
    }

    /// A fresh control-session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Timers of the rotation protocol, from the configuration.
    pub fn rotation_timing(&self) -> RotationTiming {
        RotationTiming {
            grace: self.config.rotation.grace_period,
            hold: RETIRE_HOLD,
            stuck_after: self.config.rotation.stuck_after,
            resend: Duration::from_secs(2),
        }
    }

    /// Makes `tx` the way to reach the rotation of `peer`'s session `session_id`.
    pub fn register_rotator(
        &self,
        peer: &str,
        session_id: u64,
        tx: tokio::sync::mpsc::Sender<RotateCmd>,
    ) {
        self.rotators
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.to_owned(), (session_id, tx));
    }

    /// Forgets the rotation of a session that ended (a newer session's stays).
    pub fn unregister_rotator(&self, peer: &str, session_id: u64) {
        let mut r = self.rotators.lock().unwrap_or_else(|p| p.into_inner());
        if r.get(peer).is_some_and(|(id, _)| *id == session_id) {
            r.remove(peer);
        }
    }

    /// Starts a rotation with `peer`, or with every authenticated peer.
    pub async fn request_rotation(
        &self,
        peer: Option<&str>,
    ) -> Result<Vec<enc_api::RotationStarted>, RotateRefusal> {
        if matches!(self.crypto, Crypto::None) {
            return Err(RotateRefusal::NoEncryption);
        }
        let targets: Vec<(String, tokio::sync::mpsc::Sender<RotateCmd>)> = {
            let table = self.table();
            let rotators = self.rotators.lock().unwrap_or_else(|p| p.into_inner());
            match peer {
                Some(name) => {
                    let entry = table
                        .get(name)
                        .ok_or_else(|| RotateRefusal::UnknownPeer(name.to_owned()))?;
                    let tx = rotators
                        .get(name)
                        .filter(|_| entry.auth == Auth::Authenticated)
                        .ok_or_else(|| RotateRefusal::NotConnected {
                            peer: name.to_owned(),
                            state: match &entry.auth {
                                Auth::Pending(d) => format!("pending: {d}"),
                                Auth::Failed(r) => format!("failed: {r}"),
                                Auth::Authenticated => "authenticated, session starting".into(),
                            },
                        })?;
                    vec![(name.to_owned(), tx.1.clone())]
                }
                None => table
                    .iter()
                    .filter(|e| e.auth == Auth::Authenticated)
                    .filter_map(|e| {
                        rotators
                            .get(&e.config.name)
                            .map(|(_, tx)| (e.config.name.clone(), tx.clone()))
                    })
                    .collect(),
            }
        };
        if targets.is_empty() {
            return Err(RotateRefusal::NoPeers);
        }
        if peer.is_none()
            && let Err(e) = self.roll_wg_key()
        {
            warn!(error = %format_chain(&e), "cannot roll the WireGuard static key; rotating preshared keys only");
        }
        let mut started = Vec::new();
        for (name, tx) in targets {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let answer = match tx.send(RotateCmd { reply }).await {
                Ok(()) => rx.await.unwrap_or_else(|_| Err("the session ended".into())),
                Err(_) => Err("the session ended".into()),
            };
            match answer {
                Ok((from, target)) => started.push(enc_api::RotationStarted {
                    peer: name,
                    from_epoch: from.map(|e| e.0),
                    target_epoch: target.0,
                }),
                Err(state) if peer.is_some() => {
                    return Err(RotateRefusal::NotConnected { peer: name, state });
                }
                Err(state) => warn!(peer = %name, %state, "cannot rotate with this peer now"),
            }
        }
        if started.is_empty() {
            return Err(RotateRefusal::NoPeers);
        }
        Ok(started)
    }

    /// What the backend reports sent to `peer`.
    pub fn peer_tx(&self, peer: &str) -> Option<PeerTx> {
        let (id, wg_key, out_spi) = {
            let t = self.table();
            let e = t.get(peer)?;
            // The WireGuard peer is known by the key bound to the outbound epoch.
            let wg_key = e
                .outbound
                .and_then(|o| e.wg_keys.get(&o))
                .map(|(_, r)| *r)
                .or_else(|| e.keys.as_ref().and_then(|k| k.wg).map(|(k, _)| k));
            (e.id, wg_key, e.outbound_keys().map(|k| k.esp_out.spi))
        };
        match &self.crypto {
            Crypto::Wireguard(wg) => {
                let key = wg_key?;
                let dump = wg.dump().ok()?;
                let p = dump.peers.iter().find(|p| p.public_key == key)?;
                Some(PeerTx {
                    bytes: p.tx_bytes,
                    esp_seq: None,
                })
            }
            Crypto::Ipsec(ipsec) => {
                let peers = ipsec.peers().ok()?;
                let p = peers.iter().find(|p| p.peer_id == id)?;
                Some(PeerTx {
                    bytes: p.tx_bytes,
                    esp_seq: (Some(p.out_spi) == out_spi).then_some(p.out_seq),
                })
            }
            Crypto::None => None,
        }
    }

    /// Packets the datapath has authenticated so far under `peer`'s inbound keys of each of
    /// `epochs`, so that old epochs (a rotation's, or an earlier session's) are retired only
    /// once they go quiet. Only the IPsec backends count per epoch (per inbound SA);
    /// WireGuard and no encryption give none.
    pub fn inbound_packets(&self, peer: &str, epochs: &[Epoch]) -> Vec<(Epoch, u64)> {
        let Crypto::Ipsec(ipsec) = &self.crypto else {
            return Vec::new();
        };
        let (id, spis): (u16, Vec<(Epoch, u32)>) = {
            let t = self.table();
            let Some(e) = t.get(peer) else {
                return Vec::new();
            };
            let spis = epochs
                .iter()
                .filter_map(|ep| e.epochs.get(ep).map(|k| (*ep, k.esp_in.spi)))
                .collect();
            (e.id, spis)
        };
        if spis.is_empty() {
            return Vec::new();
        }
        let Ok(peers) = ipsec.peers() else {
            return Vec::new();
        };
        let Some(p) = peers.iter().find(|p| p.peer_id == id) else {
            return Vec::new();
        };
        spis.into_iter()
            .filter_map(|(ep, spi)| {
                p.inbound
                    .iter()
                    .find(|sa| sa.spi == spi)
                    .map(|sa| (ep, sa.packets))
            })
            .collect()
    }

    /// Whether an automatic trigger asks for a rotation with `peer` now, and which.
    pub fn rotation_due(
        &self,
        peer: &str,
        rotation: &Rotation,
        tx_base: u64,
        now: Instant,
    ) -> Option<String> {
        if rotation.in_progress() || rotation.outbound().is_none() {
            return None;
        }
        let cfg = &self.config.rotation;
        let switched = self.table().get(peer).and_then(|e| e.switched_at)?;
        let why = rotation_trigger(
            cfg,
            now.saturating_duration_since(switched),
            self.peer_tx(peer),
            tx_base,
        )?;
        if let (Trigger::Schedule, Some(interval)) = (&why, cfg.interval) {
            self.roll_wg_key_if_older(interval / 2);
        }
        Some(why.to_string())
    }

    /// This node's current WireGuard static public key (WireGuard only).
    pub fn wg_public_key(&self) -> Option<PublicKey> {
        match &self.crypto {
            Crypto::Wireguard(wg) => Some(wg.public_key()),
            Crypto::Ipsec(_) | Crypto::None => None,
        }
    }

    /// Rolls this node's WireGuard static key pair: the new key becomes the device's primary
    /// and is bound to every epoch prepared from now on; the old one stays for the peers
    /// whose installed epochs still use it and goes when none does.
    ///
    /// Kernel WireGuard is skipped: a kernel device holds one static key and knows a peer by
    /// one public key, so a roll would break every session until both ends re-handshake (seen
    /// in the VM tier: outages of 1.5 to 5 s per roll). Its preshared key still rotates per
    /// epoch, hitlessly; its static key is new at every agent start.
    pub fn roll_wg_key(&self) -> Result<(), Error> {
        let Crypto::Wireguard(wg) = &self.crypto else {
            return Ok(());
        };
        if wg.kind() == enc_wireguard::BackendKind::Kernel {
            tracing::debug!(
                "kernel WireGuard keeps its static key; only the preshared key rotates"
            );
            return Ok(());
        }
        let old = wg.public_key();
        let new = wg
            .add_private_key(PrivateKey::generate().map_err(Error::Wireguard)?)
            .map_err(Error::Wireguard)?;
        *self.wg_key_rolled.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        info!(old = %old, new = %new, "rolled the WireGuard static key pair; peers adopt it at their next epoch");
        Ok(())
    }

    /// Rolls the static key if it is older than `age` (the schedule rolls it once per round).
    fn roll_wg_key_if_older(&self, age: Duration) {
        let rolled = *self.wg_key_rolled.lock().unwrap_or_else(|p| p.into_inner());
        if rolled.elapsed() >= age
            && let Err(e) = self.roll_wg_key()
        {
            warn!(error = %format_chain(&e), "cannot roll the WireGuard static key");
        }
    }

    /// Brings the datapath to the table's state now, serialised with the reconciler.
    pub fn apply_now(&self) -> Result<(), Error> {
        let _guard = self
            .reconcile_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let desired = self.desired();
        reconcile(
            &desired,
            &self.crypto,
            self.links.as_ref(),
            self.dp.as_ref(),
        )
        .map(|_| ())
    }

    /// The hello this node sends to `peer`.
    pub fn hello(&self, peer: &str) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            node: self.config.node.name.clone(),
            encryption: self.crypto.type_name().to_owned(),
            epoch: self.table().get(peer).map_or(0, |e| e.max_epoch()),
            wireguard: match &self.crypto {
                Crypto::Wireguard(wg) => Some(WireguardAnnounce {
                    public_key: wg.public_key().to_string(),
                    listen_port: wg.listen_port(),
                }),
                Crypto::Ipsec(_) | Crypto::None => None,
            },
        }
    }

    fn desired(&self) -> Desired {
        let mut t = self.table();
        t.expire(
            Instant::now(),
            self.config.control.key_grace_period,
            RETIRE_HOLD,
        );
        t.desired(&self.layout)
    }

    /// The revocation lists the TLS verifiers apply (the newest accepted one).
    pub fn crls(&self) -> Vec<enc_certs::RevocationList> {
        self.crl
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Whether the certificate with `serial` is on the accepted revocation list.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.crl
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|l| l.is_revoked(serial))
    }

    /// The accepted revocation list as a control message, if there is one.
    pub fn revocations_message(&self) -> Option<crate::control::proto::Revocations> {
        self.crl
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|l| crate::control::proto::Revocations {
                number: l.number(),
                pem: l.pem().to_owned(),
            })
    }

    /// Notified with the list's number whenever a newer list is adopted.
    pub fn subscribe_crl(&self) -> tokio::sync::watch::Receiver<u64> {
        self.crl_watch.subscribe()
    }

    /// Verifies a revocation list offered by an operator or a peer (`source` says which)
    /// against the cluster CA bundle and adopts it if its number is higher than the one
    /// held: persisted to `stateDir/crl.pem` first, then applied to every session (a revoked
    /// peer's session closes and its keys go at once), then passed on to every peer. The
    /// error says why a list was refused; the answer carries the offered list's number.
    pub fn offer_crl(&self, pem: &str, source: &str) -> Result<(Offer, u64), String> {
        let refused = |reason: String| {
            self.events.record(
                enc_api::EventKind::RevocationRefused,
                crate::events::Detail {
                    detail: format!("from {source}: {reason}"),
                    ..Default::default()
                },
            );
            reason
        };
        let list = enc_certs::RevocationList::from_pem(pem, self.identity().ca_certs())
            .map_err(|e| refused(format_chain(&e)))?;
        let mut held = self.crl.lock().unwrap_or_else(|p| p.into_inner());
        let have = held.as_ref().map_or(0, |l| l.number());
        if list.number() == have {
            return Ok((Offer::Same, have));
        }
        if list.number() < have {
            return Ok((Offer::Older, list.number()));
        }
        let path = self.config.state_dir.join(CRL_STATE_FILE);
        write_atomically(&path, list.pem().as_bytes())
            .map_err(|e| refused(format!("cannot persist it to {}: {e}", path.display())))?;
        let number = list.number();
        let entries = list.entries().len();
        let own = self.identity().info().serial.clone();
        let own = &own;
        if list.is_revoked(own) {
            tracing::error!(serial = %own, number, "this node's own certificate is revoked: peers will refuse it");
        }
        *held = Some(list);
        drop(held);
        info!(number, entries, %source, path = %path.display(), "revocation list adopted");
        self.events.record(
            enc_api::EventKind::Revocation,
            crate::events::Detail {
                detail: format!(
                    "revocation list number {number} with {entries} revoked certificate(s) from {source}, persisted to {}",
                    path.display()
                ),
                ..Default::default()
            },
        );
        // Peers whose current certificate is now revoked lose their keys at once; their
        // sessions see the change and close.
        let revoked: Vec<(String, String)> = self
            .table()
            .iter()
            .filter_map(|e| {
                e.cert
                    .as_ref()
                    .filter(|c| self.is_revoked(&c.serial))
                    .filter(|_| !matches!(e.auth, Auth::Failed(_)))
                    .map(|c| (e.config.name.clone(), c.serial.clone()))
            })
            .collect();
        for (peer, serial) in &revoked {
            let reason = enc_certs::AuthFailure::Revoked {
                serial: serial.clone(),
            }
            .to_string();
            warn!(%peer, %serial, "peer certificate revoked; removing its keys");
            self.table().auth_failed(peer, Instant::now(), reason);
        }
        if !revoked.is_empty() {
            let _ = self.apply_now();
        }
        self.crl_watch.send_replace(number);
        Ok((Offer::Adopted, number))
    }

    /// Warns (log and event), once per certificate, when this node's certificate or one a
    /// peer presented has 20% or less of its lifetime left.
    fn check_expiry(&self) {
        let now = time::OffsetDateTime::now_utc();
        let id = self.identity();
        let own = id.info();
        let mut certs = vec![(self.config.node.name.clone(), own.clone())];
        certs.extend(
            self.table()
                .iter()
                .filter_map(|e| e.cert.clone().map(|c| (e.config.name.clone(), c))),
        );
        let mut warned = self.expiry_warned.lock().unwrap_or_else(|p| p.into_inner());
        for (node, c) in certs {
            if !crate::status::near_expiry(c.not_before, c.not_after, now)
                || !warned.insert(c.serial.clone())
            {
                continue;
            }
            let left = c.not_after - now;
            let whose = if node == self.config.node.name {
                "this node's certificate".to_owned()
            } else {
                format!("the certificate of peer {node}")
            };
            let detail = format!(
                "{whose} expires at {} ({} left, 20% or less of its lifetime)",
                c.not_after,
                humantime::format_duration(Duration::from_secs(left.whole_seconds().max(0) as u64))
            );
            warn!(node = %node, serial = %c.serial, not_after = %c.not_after, "{detail}");
            self.events.record(
                enc_api::EventKind::ExpiryWarning,
                crate::events::Detail {
                    peer: (node != self.config.node.name).then_some(node),
                    serial: Some(c.serial.clone()),
                    detail,
                    ..Default::default()
                },
            );
        }
    }

    /// Logs new unencrypted-egress (leak) counts, at most once per peer every 10 s.
    fn report_leaks(&self) {
        let counters = match self.dp.counters() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %format_chain(&e), "cannot read datapath counters");
                return;
            }
        };
        let names: HashMap<u16, String> = self
            .table()
            .iter()
            .map(|e| (e.id, e.config.name.clone()))
            .collect();
        let now = Instant::now();
        let mut seen = self.leaks_seen.lock().unwrap_or_else(|p| p.into_inner());
        for (id, c) in counters {
            let entry = seen.entry(id).or_insert((0, now - LEAK_LOG_INTERVAL));
            if c.leak_packets > entry.0
                && now.saturating_duration_since(entry.1) >= LEAK_LOG_INTERVAL
            {
                warn!(
                    peer = names.get(&id).map_or("?", String::as_str),
                    new = c.leak_packets - entry.0,
                    total = c.leak_packets,
                    strict = self.config.strict_mode,
                    "leak sentinel: packets towards a remote pod CIDR left the underlay unencrypted{}",
                    if self.config.strict_mode {
                        " (dropped)"
                    } else {
                        ""
                    }
                );
                *entry = (c.leak_packets, now);
            }
        }
    }
}

/// Why an automatic rotation is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The configured interval passed since the last switch.
    Schedule,
    /// The outbound ESP sequence number reached the threshold.
    EspSeq(u64),
    /// This many bytes were sent under the epoch.
    Bytes(u64),
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Schedule => f.write_str("scheduled rotation interval reached"),
            Trigger::EspSeq(s) => write!(f, "ESP sequence number {s} reached the threshold"),
            Trigger::Bytes(b) => write!(f, "{b} bytes sent under this epoch reached the threshold"),
        }
    }
}

/// Which automatic trigger, if any, asks for a rotation: `since_switch` is the time since the
/// outbound epoch last changed, `tx` what the backend reports sent, `tx_base` the bytes sent
/// when the epoch started.
pub fn rotation_trigger(
    cfg: &crate::config::RotationConfig,
    since_switch: Duration,
    tx: Option<PeerTx>,
    tx_base: u64,
) -> Option<Trigger> {
    if cfg.interval.is_some_and(|i| since_switch >= i) {
        return Some(Trigger::Schedule);
    }
    let tx = tx?;
    if let Some(seq) = tx.esp_seq.filter(|s| *s >= cfg.esp_seq_threshold) {
        return Some(Trigger::EspSeq(seq));
    }
    let sent = tx.bytes.saturating_sub(tx_base);
    (sent >= cfg.bytes_threshold).then_some(Trigger::Bytes(sent))
}

/// Shortest interval between two leak log events for one peer.
const LEAK_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Starts the configured WireGuard implementation: the kernel's when asked for or when
/// `auto` finds the kernel able (creating the device is the probe), else boringtun; says why.
fn start_wireguard(
    config: &Config,
    wg_cfg: &crate::config::WireguardConfig,
) -> Result<(Arc<dyn WgBackend>, String), Error> {
    let why_userspace = match wg_cfg.implementation {
        Implementation::Userspace => "encryption.wireguard.implementation is userspace".to_owned(),
        Implementation::Auto | Implementation::Kernel => {
            let started = KernelWg::start(KernelConfig {
                ifname: wg_cfg.interface.clone(),
                private_key: PrivateKey::generate().map_err(Error::Wireguard)?,
                listen_port: wg_cfg.listen_port,
            });
            match started {
                Ok(wg) => {
                    return Ok((
                        Arc::new(wg),
                        "the kernel has WireGuard; configured over generic netlink".into(),
                    ));
                }
                Err(e) if wg_cfg.implementation == Implementation::Kernel => {
                    return Err(Error::Config(crate::config::ConfigError::Invalid {
                        field: "encryption.wireguard.implementation".into(),
                        value: "kernel".into(),
                        reason: format!(
                            "the kernel cannot run WireGuard: {}; use auto or userspace to run boringtun",
                            format_chain(&e)
                        ),
                    }));
                }
                Err(e) if e.is_unsupported() => {
                    "the kernel has no WireGuard (the wireguard link type is unknown)".to_owned()
                }
                Err(e) => format!("kernel WireGuard failed: {}", format_chain(&e)),
            }
        }
    };
    let wg = BoringtunWg::start(BoringtunConfig {
        ifname: wg_cfg.interface.clone(),
        private_key: PrivateKey::generate().map_err(Error::Wireguard)?,
        listen: SocketAddr::new(config.node.underlay_address, wg_cfg.listen_port),
    })
    .map_err(Error::Wireguard)?;
    Ok((
        Arc::new(wg),
        format!("{why_userspace}; using boringtun in userspace"),
    ))
}

/// Options from the command line (not part of the node configuration).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Debug only: write every ESP SA, keys included, to this file in Wireshark's `esp_sa`
    /// format so that captures can be decrypted. Off unless given.
    pub esp_sa_log: Option<PathBuf>,
}

/// The encryption backend, started.
struct StartedCrypto {
    crypto: Crypto,
    reason: String,
    mtu: u32,
    route_device: String,
    decrypt_ifindex: u32,
}

fn underlay_family(config: &Config) -> mtu::Underlay {
    if config.node.underlay_address.is_ipv4() {
        mtu::Underlay::V4
    } else {
        mtu::Underlay::V6
    }
}

/// Brings a freshly created device up with `mtu` and returns its index.
fn device_up(links: &dyn LinkBackend, ifname: &str, mtu: u32) -> Result<u32, Error> {
    links.set_link(ifname, mtu, true).map_err(Error::Links)?;
    links
        .link(ifname)
        .map_err(Error::Links)?
        .map(|l| l.index)
        .ok_or_else(|| Error::Io {
            context: format!("device {ifname} vanished after creation"),
            source: std::io::ErrorKind::NotFound.into(),
        })
}

/// Starts the configured encryption backend, choosing the implementation by probing the
/// kernel, and says why.
fn start_crypto(
    config: &Config,
    opts: &RunOptions,
    links: &dyn LinkBackend,
    plan: &mtu::MtuPlan,
) -> Result<StartedCrypto, Error> {
    let device_mtu = plan.encryption.unwrap_or(plan.underlay);
    match &config.encryption {
        EncryptionConfig::None => Ok(StartedCrypto {
            crypto: Crypto::None,
            reason: "encryption.type is none: pod traffic is not encrypted".into(),
            mtu: plan.underlay,
            route_device: String::new(),
            decrypt_ifindex: 0,
        }),
        EncryptionConfig::Wireguard(wg_cfg) => {
            let (wg, reason) = start_wireguard(config, wg_cfg)?;
            let mtu = device_mtu;
            let index = device_up(links, &wg_cfg.interface, mtu)?;
            Ok(StartedCrypto {
                crypto: Crypto::Wireguard(wg),
                reason,
                mtu,
                route_device: wg_cfg.interface.clone(),
                decrypt_ifindex: index,
            })
        }
        EncryptionConfig::Ipsec(ipsec_cfg) => {
            let mtu = device_mtu;
            // The same for both implementations; the MTU plan already took its 8 bytes.
            let encapsulation = match ipsec_cfg.encapsulation {
                EspEncapsulation::None => Encapsulation::None,
                EspEncapsulation::Udp => Encapsulation::Udp {
                    port: ESP_IN_UDP_PORT,
                },
            };
            let probe = || {
                NetlinkXfrm::new()
                    .map_err(|e| format!("cannot open NETLINK_XFRM: {}", format_chain(&e)))
                    .and_then(|x| probe_esp_gcm(&x).map(|()| x))
            };
            let why_userspace = match ipsec_cfg.implementation {
                Implementation::Userspace => {
                    "encryption.ipsec.implementation is userspace".to_owned()
                }
                Implementation::Auto | Implementation::Kernel => match probe() {
                    Ok(xfrm) => {
                        // With ESP in UDP this opens the UDP_ENCAP socket on the underlay
                        // address first; a taken port fails here, with nothing installed.
                        let kernel = KernelIpsec::with_encapsulation(
                            Arc::new(xfrm),
                            encapsulation,
                            config.node.underlay_address,
                        )
                        .map_err(Error::Ipsec)?;
                        let encap = match kernel.encap_socket() {
                            Some(at) => format!(", ESP in UDP on {at}"),
                            None => String::new(),
                        };
                        return Ok(StartedCrypto {
                            crypto: Crypto::Ipsec(Arc::new(kernel)),
                            reason: format!(
                                "the kernel can do ESP with rfc4106(gcm(aes)); using XFRM{encap}"
                            ),
                            mtu,
                            route_device: config.underlay_interface.clone(),
                            decrypt_ifindex: 0,
                        });
                    }
                    Err(why) if ipsec_cfg.implementation == Implementation::Kernel => {
                        return Err(Error::Config(crate::config::ConfigError::Invalid {
                            field: "encryption.ipsec.implementation".into(),
                            value: "kernel".into(),
                            reason: format!(
                                "{why}; use auto or userspace to run the userspace ESP engine"
                            ),
                        }));
                    }
                    Err(why) => why,
                },
            };
            let engine = UserspaceEsp::start(UserspaceConfig {
                ifname: ipsec_cfg.interface.clone(),
                local: config.node.underlay_address,
                replay_window: ipsec_cfg.replay_window,
                sa_log: opts.esp_sa_log.clone(),
                encapsulation,
            })
            .map_err(Error::Ipsec)?;
            let index = device_up(links, &ipsec_cfg.interface, mtu)?;
            if opts.esp_sa_log.is_some() {
                warn!("ESP SA log enabled: key material is written to a file (debug only)");
            }
            Ok(StartedCrypto {
                crypto: Crypto::Ipsec(Arc::new(engine) as Arc<dyn IpsecBackend>),
                reason: format!("{why_userspace}; using the userspace ESP engine"),
                mtu,
                route_device: ipsec_cfg.interface.clone(),
                decrypt_ifindex: index,
            })
        }
    }
}

/// The MTUs of the configured stack.
fn mtu_plan(config: &Config) -> Result<mtu::MtuPlan, Error> {
    let inner = if config.node.pod_cidr.addr().is_ipv4()
        && config.peers.iter().all(|p| p.pod_cidr.addr().is_ipv4())
    {
        mtu::Inner::V4
    } else {
        mtu::Inner::V6
    };
    let encryption = match config.encryption {
        EncryptionConfig::None => mtu::Encryption::None,
        EncryptionConfig::Wireguard(_) => mtu::Encryption::Wireguard,
        EncryptionConfig::Ipsec(ref c) if c.encapsulation == EspEncapsulation::Udp => {
            mtu::Encryption::EspInUdp
        }
        EncryptionConfig::Ipsec(_) => mtu::Encryption::Esp,
    };
    mtu::plan(
        config.underlay_mtu,
        underlay_family(config),
        inner,
        encryption,
        config.tunnel.overlay().map(|(kind, _)| kind),
    )
    .map_err(|e| {
        Error::Config(crate::config::ConfigError::Invalid {
            field: "underlay.mtu".into(),
            value: config.underlay_mtu.to_string(),
            reason: format!(
                "too small for encryption {} over tunnel {}: {e}",
                config.encryption_name(),
                config.tunnel.name()
            ),
        })
    })
}

/// The overlay device of the configured tunnel, if any.
fn overlay_spec(config: &Config, plan: &mtu::MtuPlan) -> Option<OverlaySpec> {
    let (kind, o) = config.tunnel.overlay()?;
    Some(OverlaySpec {
        ifname: o.interface.clone(),
        kind,
        port: o.port,
        mtu: plan.pod,
        mac: enc_geneve_vxlan::overlay_mac(config.node.underlay_address),
    })
}

/// Creates (or adopts) the overlay device and returns its index; a kernel without the device
/// type gets an error that says so.
fn start_overlay(links: &dyn LinkBackend, spec: &OverlaySpec) -> Result<u32, Error> {
    match links.upsert_overlay(spec) {
        Ok(()) => {}
        Err(e) if e.is_unsupported() => {
            let hint = match spec.kind {
                enc_geneve_vxlan::OverlayKind::Geneve => {
                    "; use tunnel.protocol: vxlan (or disabled) on this kernel"
                }
                enc_geneve_vxlan::OverlayKind::Vxlan => {
                    "; use tunnel.protocol: geneve (or disabled) on this kernel"
                }
            };
            return Err(Error::Config(crate::config::ConfigError::Invalid {
                field: "tunnel.protocol".into(),
                value: spec.kind.to_string(),
                reason: format!(
                    "this kernel has no {kind} device support (creating {ifname} failed: {err}; the {kind} module is missing or cannot be loaded){hint}",
                    kind = spec.kind,
                    ifname = spec.ifname,
                    err = format_chain(&e),
                ),
            }));
        }
        Err(e) => return Err(Error::Links(e)),
    }
    links
        .overlay(&spec.ifname)
        .map_err(Error::Links)?
        .map(|o| o.index)
        .ok_or_else(|| Error::Io {
            context: format!("overlay device {} vanished after creation", spec.ifname),
            source: std::io::ErrorKind::NotFound.into(),
        })
}

/// Checks that the certificate names this node as configured.
pub(crate) fn check_identity(config: &Config, identity: &NodeIdentity) -> Result<(), Error> {
    let info = identity.info();
    if !info.dns_names.contains(&config.node.name) {
        return Err(Error::IdentityMismatch(format!(
            "tls.cert {} names {:?}, but node.name is {:?}",
            config.tls.cert.display(),
            info.dns_names,
            config.node.name
        )));
    }
    if !info.ips.contains(&config.node.underlay_address) {
        return Err(Error::IdentityMismatch(format!(
            "tls.cert {} carries addresses {:?}, but node.underlayAddress is {}",
            config.tls.cert.display(),
            info.ips,
            config.node.underlay_address
        )));
    }
    Ok(())
}

/// Runs the agent until `shutdown` completes, then removes what it configured.
pub async fn run(
    config: Config,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    enc_certs::install_crypto_provider();
    let mut shutdown = std::pin::pin!(shutdown);
    if let Some(enrolment) = &config.tls.enrolment
        && let Some(why) = crate::enrolment::needs_enrolment(&config)
    {
        // No usable certificate: enrol with the ServiceAccount token, retrying until it
        // works (the issuer may start after the agents) or the agent is stopped.
        info!(reason = %why, issuer = %enrolment.issuer, "enrolling with the ServiceAccount token");
        tokio::select! {
            _ = crate::enrolment::enrol_until_done(&config, enrolment) => {}
            () = &mut shutdown => return Ok(()),
        }
    }
    let identity = NodeIdentity::load(&config.tls.cert, &config.tls.key, &config.tls.ca)
        .map_err(Error::Certs)?;
    check_identity(&config, &identity)?;
    let events =
        crate::events::EventLog::open(&config.state_dir.join("events.jsonl"), &config.node.name)?;
    // The revocation list accepted before a restart still holds.
    let crl_path = config.state_dir.join(CRL_STATE_FILE);
    let crl = if crl_path.exists() {
        let list = enc_certs::RevocationList::load(&crl_path, identity.ca_certs()).map_err(|e| {
            Error::Io {
                context: format!(
                    "revocation list {} does not verify against tls.ca ({}); remove it only if the CA that signed it is no longer trusted",
                    crl_path.display(),
                    format_chain(&e)
                ),
                source: std::io::ErrorKind::InvalidData.into(),
            }
        })?;
        info!(number = list.number(), entries = list.entries().len(), path = %crl_path.display(), "revocation list loaded");
        Some(list)
    } else {
        None
    };
    // Bound before anything touches the kernel: a taken address fails start-up cleanly.
    let metrics = match config.metrics.listen {
        Some(addr) => Some((addr, crate::metrics::bind(addr).await?)),
        None => None,
    };
    let issuer = match &config.issuer {
        Some(cfg) => {
            // The CA must load (certificate and key match) before the role is offered.
            enc_certs::CertificateAuthority::load(&cfg.ca_dir).map_err(Error::Certs)?;
            let reviewer: Option<Arc<dyn crate::attest::TokenReviewer>> = match &cfg.kubernetes {
                None => None,
                Some(_) => Some(Arc::new(crate::attest::KubeTokenReviewer::new(
                    kube::Client::try_default()
                        .await
                        .map_err(|source| Error::Kube {
                            context: "connecting to the Kubernetes API for TokenReviews (issuer.kubernetes)".to_owned(),
                            source,
                        })?,
                ))),
            };
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .map_err(Error::io(format!("bind issuer listener {}", cfg.listen)))?;
            Some((cfg.clone(), reviewer, listener))
        }
        None => None,
    };

    let links: Arc<dyn LinkBackend> = Arc::new(RtnetlinkLinks::new().map_err(Error::Links)?);
    let plan = mtu_plan(&config)?;
    // The overlay device first: a kernel without it (Geneve on the host tier) fails start-up
    // before anything else is configured.
    let overlay = overlay_spec(&config, &plan);
    let overlay_index = match &overlay {
        Some(spec) => Some(start_overlay(links.as_ref(), spec)?),
        None => None,
    };
    let started = match start_crypto(&config, &opts, links.as_ref(), &plan) {
        Ok(s) => s,
        Err(e) => {
            if let Some(spec) = &overlay
                && let Err(d) = links.delete_link(&spec.ifname)
            {
                warn!(error = %format_chain(&d), ifname = %spec.ifname, "cannot remove the overlay device");
            }
            return Err(e);
        }
    };
    let StartedCrypto {
        crypto,
        reason: backend_reason,
        mtu,
        route_device,
        decrypt_ifindex,
    } = started;
    if links
        .link(&config.underlay_interface)
        .map_err(Error::Links)?
        .is_none()
    {
        return Err(Error::Config(crate::config::ConfigError::Invalid {
            field: "underlay.interface".into(),
            value: config.underlay_interface.clone(),
            reason: "no such interface in this network namespace".into(),
        }));
    }

    // Pinned maps from a previous run are reused: their peers were left unauthenticated at
    // shutdown, so strict mode held while the agent was away.
    let pin_dir = &config.datapath.bpf_pin_dir;
    if pin_dir.starts_with(BPFFS) {
        enc_tunnel_ebpf::mount_bpffs(Path::new(BPFFS)).map_err(Error::Datapath)?;
    }
    let (dp, pods): (Arc<dyn Datapath>, Vec<String>) = if matches!(crypto, Crypto::None) {
        // Nothing to mark, steer or guard. Programs pinned by an earlier encrypted run would
        // drop all remote-pod traffic, so they go.
        AyaDatapath::remove_all(pin_dir).map_err(Error::Datapath)?;
        info!(pin_dir = %pin_dir.display(), "encryption is off: no eBPF program attached");
        (
            Arc::new(enc_tunnel_ebpf::FakeDatapath::new(
                enc_tunnel_ebpf::AttachMode::Tcx,
            )),
            Vec::new(),
        )
    } else {
        let dp: Arc<dyn Datapath> = Arc::new(AyaDatapath::load(pin_dir).map_err(Error::Datapath)?);
        dp.set_config(DpConfig {
            strict: config.strict_mode,
            // Under an overlay, decrypted pod packets reach local pods from the overlay device
            // (the overlay's UDP came out of the decrypt device, or was decrypted by XFRM);
            // plaintext overlay packets from the wire are refused by the underlay guard.
            decrypt_ifindex: overlay_index.unwrap_or(decrypt_ifindex),
            overlay: overlay.as_ref().map(|o| enc_tunnel_ebpf::Overlay {
                kind: match o.kind {
                    enc_geneve_vxlan::OverlayKind::Vxlan => enc_tunnel_ebpf::OverlayKind::Vxlan,
                    enc_geneve_vxlan::OverlayKind::Geneve => enc_tunnel_ebpf::OverlayKind::Geneve,
                },
                port: o.port,
            }),
        })
        .map_err(Error::Datapath)?;
        dp.attach_underlay(&config.underlay_interface)
            .map_err(Error::Datapath)?;
        let pods = attach_pods(
            links.as_ref(),
            dp.as_ref(),
            &config.datapath.pod_interface_prefixes,
        )?;
        info!(
            mode = ?dp.attach_mode(),
            strict = config.strict_mode,
            underlay = %config.underlay_interface,
            pods = ?pods,
            pin_dir = %pin_dir.display(),
            "eBPF datapath attached"
        );
        (dp, pods)
    };
    let layout = Layout {
        crypto: (!matches!(crypto, Crypto::None)).then(|| CryptoLayout {
            device: route_device.clone(),
            mtu,
        }),
        overlay: overlay.clone(),
        vni: config.tunnel.overlay().map_or(0, |(_, o)| o.vni),
        underlay_interface: config.underlay_interface.clone(),
        pod_mtu: plan.pod,
    };
    info!(
        tunnel = config.tunnel.name(),
        overlay = ?overlay.as_ref().map(|o| &o.ifname),
        underlay_mtu = plan.underlay,
        encryption_mtu = ?plan.encryption,
        pod_mtu = plan.pod,
        "overlay and MTUs"
    );
    info!(
        node = %config.node.name,
        encryption = crypto.type_name(),
        implementation = crypto.implementation(),
        device = %route_device,
        mtu,
        reason = %backend_reason,
        "encryption datapath up"
    );

    let shared = Shared::new(SharedParts {
        config,
        identity,
        crypto,
        route_device,
        links,
        dp,
        pod_interfaces: pods,
        backend_reason,
        mtu,
        mtu_plan: plan,
        layout,
        events,
        crl,
    });

    {
        let id = shared.identity();
        let c = id.info();
        shared.events.record(
            enc_api::EventKind::AgentStart,
            crate::events::Detail {
                serial: Some(c.serial.clone()),
                detail: format!(
                    "encryption {} ({}) over tunnel {}; certificate {} issued by {} valid until {}; {} expected peers",
                    shared.crypto.type_name(),
                    shared.crypto.implementation(),
                    shared.config.tunnel.name(),
                    c.subject,
                    c.issuer,
                    c.not_after,
                    shared.config.peers.len()
                ),
                ..Default::default()
            },
        );
    }

    // First reconcile before any peer is reachable: routes for every peer go into the
    // device, so nothing reaches a peer's pods except through WireGuard.
    reconcile_once(&shared);

    let listener = tokio::net::TcpListener::bind(shared.config.control.listen)
        .await
        .map_err(Error::io(format!(
            "bind control listener {}",
            shared.config.control.listen
        )))?;
    let status = crate::status::bind(&shared.config.status_socket)?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(reconciler(shared.clone()));
    if let Some(every) = shared.config.tls.reload_interval {
        tasks.spawn(identity_reloader(shared.clone(), every));
    }
    if let Some(renewal) = shared.config.tls.renewal.clone() {
        tasks.spawn(renewer(shared.clone(), renewal));
    }
    if let Some((cfg, reviewer, listener)) = issuer {
        info!(listen = %cfg.listen, ca_dir = %cfg.ca_dir.display(), lifetime = %humantime::format_duration(cfg.cert_lifetime), kubernetes = cfg.kubernetes.is_some(), "issuer role up: online enrolment and renewal");
        tasks.spawn(crate::issuer::serve(
            shared.clone(),
            cfg,
            reviewer,
            listener,
        ));
    }
    tasks.spawn(crate::control::net::listen(shared.clone(), listener));
    let peer_set = crate::discovery::start(&shared, &mut tasks).await?;
    tasks.spawn(peer_supervisor(shared.clone(), peer_set));
    tasks.spawn(crate::status::serve(shared.clone(), status));
    if let Some((addr, listener)) = metrics {
        info!(listen = %addr, path = crate::metrics::PATH, "metrics endpoint up");
        tasks.spawn(crate::metrics::serve(shared.clone(), listener));
    } else {
        info!("metrics endpoint off (metrics.listen: off)");
    }
    info!(
        listen = %shared.config.control.listen,
        socket = %shared.config.status_socket.display(),
        peers = shared.config.peers.len(),
        "agent running"
    );

    shutdown.await;
    info!("shutting down");
    tasks.shutdown().await;

    // Remove keys, routes and rules, but keep the eBPF programs and maps pinned with every
    // peer unauthenticated: strict mode keeps dropping remote-pod traffic until the agent is
    // back (`enc-agent --cleanup` removes everything).
    let mut down = shared.desired();
    down.wg_peers.clear();
    down.ipsec_peers.clear();
    down.routes.clear();
    down.neighs.clear();
    down.rules.clear();
    for (_, state) in &mut down.peer_states {
        state.authenticated = false;
        state.has_key = false;
    }
    if let Err(e) = reconcile(
        &down,
        &shared.crypto,
        shared.links.as_ref(),
        shared.dp.as_ref(),
    ) {
        warn!(error = %format_chain(&e), "cleanup of routes, rules and peers failed");
    }
    if let Some(spec) = &shared.layout.overlay
        && let Err(e) = shared.links.delete_link(&spec.ifname)
    {
        warn!(error = %format_chain(&e), ifname = %spec.ifname, "cannot remove the overlay device");
    }
    if let Err(e) = std::fs::remove_file(&shared.config.status_socket) {
        warn!(error = %e, socket = %shared.config.status_socket.display(), "cannot remove status socket");
    }
    shared.events.record(
        enc_api::EventKind::AgentStop,
        crate::events::Detail {
            detail: "clean stop: keys, routes and rules removed; eBPF strict mode left in place"
                .into(),
            ..Default::default()
        },
    );
    info!("stopped; routes, rules and WireGuard peers removed, eBPF strict mode left in place");
    Ok(())
}

/// Removes everything enc configured on this node: routes and rules it owns, and the pinned
/// eBPF programs and maps. For uninstalling; a normal stop leaves strict mode in place.
pub fn cleanup(config: &Config) -> Result<(), Error> {
    let links = RtnetlinkLinks::new().map_err(Error::Links)?;
    let mut routes = links.dump_routes(ENC_TABLE).map_err(Error::Links)?;
    routes.extend(links.dump_routes(RT_TABLE_MAIN).map_err(Error::Links)?);
    for r in &routes {
        links.delete_route(r).map_err(Error::Links)?;
    }
    let rules = links.dump_rules().map_err(Error::Links)?;
    for r in &rules {
        links.delete_rule(r).map_err(Error::Links)?;
    }
    if let Some((_, o)) = config.tunnel.overlay() {
        links.delete_link(&o.interface).map_err(Error::Links)?;
    }
    AyaDatapath::remove_all(&config.datapath.bpf_pin_dir).map_err(Error::Datapath)?;
    // enc's XFRM states and policies (recognised by their marks), the block policies included.
    let xfrm = NetlinkXfrm::new().map_err(Error::Ipsec)?;
    let sas = enc_ipsec::xfrm::XfrmBackend::dump_sas(&xfrm)
        .map_err(Error::Ipsec)?
        .len();
    let policies = enc_ipsec::xfrm::XfrmBackend::dump_policies(&xfrm)
        .map_err(Error::Ipsec)?
        .len();
    let xfrm: Arc<dyn enc_ipsec::xfrm::XfrmBackend> = Arc::new(xfrm);
    KernelIpsec::adopt(xfrm)
        .remove_all()
        .map_err(Error::Ipsec)?;
    info!(
        xfrm_states = sas,
        xfrm_policies = policies,
        routes = routes.len(),
        rules = rules.len(),
        pin_dir = %config.datapath.bpf_pin_dir.display(),
        "removed enc's routes, rules and eBPF datapath"
    );
    Ok(())
}

pub(crate) fn reconcile_once(shared: &Shared) {
    match attach_pods(
        shared.links.as_ref(),
        shared.dp.as_ref(),
        &shared.config.datapath.pod_interface_prefixes,
    ) {
        Ok(pods) => {
            *shared
                .pod_interfaces
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = pods
        }
        Err(e) => warn!(error = %format_chain(&e), "attaching pod programs failed; will retry"),
    }
    let _guard = shared
        .reconcile_lock
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // Ids of removed peers, taken before the desired state that leaves them out: once it is
    // applied, nothing of them is installed and the ids may be handed out again.
    let retired = shared.table().retired_ids();
    let desired = shared.desired();
    match reconcile(
        &desired,
        &shared.crypto,
        shared.links.as_ref(),
        shared.dp.as_ref(),
    ) {
        Ok(out) => {
            shared.table().release_ids(&retired);
            if out != Default::default() {
                info!(?out, "reconciled datapath");
            }
        }
        Err(e) => warn!(error = %format_chain(&e), "reconcile failed; will retry"),
    }
}

/// Applies the peer sets discovery produces and runs a dial loop for every peer this node
/// dials: for the peers present at start, for peers added later, and anew for peers that
/// moved (the old loop ends by itself). Dial loops end with this task.
pub(crate) async fn peer_supervisor(
    shared: Arc<Shared>,
    mut peer_set: tokio::sync::watch::Receiver<Vec<crate::config::PeerConfig>>,
) {
    let mut loops = tokio::task::JoinSet::new();
    let spawn = |loops: &mut tokio::task::JoinSet<()>, names: &[String]| {
        let t = shared.table();
        for name in names {
            if let Some(e) = t.get(name)
                && e.role == Role::Dial
            {
                loops.spawn(crate::control::net::dial_loop(
                    shared.clone(),
                    e.config.clone(),
                    e.incarnation,
                ));
            }
        }
    };
    let initial: Vec<String> = shared
        .table()
        .iter()
        .map(|e| e.config.name.clone())
        .collect();
    spawn(&mut loops, &initial);
    loop {
        let peers = peer_set.borrow_and_update().clone();
        let change = shared.set_peers(&peers);
        spawn(&mut loops, &change.added);
        spawn(&mut loops, &change.readdressed);
        while loops.try_join_next().is_some() {}
        if peer_set.changed().await.is_err() {
            // Discovery ended (static discovery never changes): keep the dial loops.
            std::future::pending::<()>().await;
        }
    }
}

/// What identifies a file's content cheaply: modification time and length.
fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Polls `tls.cert`, `tls.key` and `tls.ca` and reloads the identity when one changes
/// (renewal by an external issuer such as cert-manager or `encctl cert issue`, and CA
/// rollover, without a restart). A change seen while files are still being written is
/// retried at the next poll.
async fn identity_reloader(shared: Arc<Shared>, every: Duration) {
    let c = shared.config.tls.clone();
    let stamps = || [file_stamp(&c.cert), file_stamp(&c.key), file_stamp(&c.ca)];
    let mut seen = stamps();
    loop {
        tokio::time::sleep(every).await;
        let now = stamps();
        if now != seen {
            // Give a writer replacing several files a moment to finish.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _files = shared
                .identity_files
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let settled = stamps();
            shared.reload_identity();
            seen = settled;
        }
    }
}

/// Timeout of each step (connect, handshake, request, answer) of a renewal attempt.
const ISSUER_TIMEOUT: Duration = Duration::from_secs(5);

/// Renews this node's certificate with the issuer of `tls.renewal` on the schedule of
/// [`crate::renewal`]: at the configured share of its lifetime, retried with capped,
/// jittered backoff. A certificate replaced from outside restarts the schedule.
async fn renewer(shared: Arc<Shared>, cfg: crate::config::RenewalConfig) {
    let policy = crate::renewal::Policy::new(cfg.at_percent);
    loop {
        let id = shared.identity();
        let info = id.info();
        let wait = {
            let mut st = shared.renewal.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = || {
                crate::renewal::Schedule::new(policy, info.not_before.into(), info.not_after.into())
            };
            let st = st.get_or_insert_with(|| RenewalState {
                issuer: cfg.issuer.clone(),
                schedule: fresh(),
                serial: info.serial.clone(),
                renewals: 0,
                last_renewal: None,
            });
            if st.serial != info.serial {
                st.serial = info.serial.clone();
                st.schedule = fresh();
            }
            st.schedule.until_due(std::time::SystemTime::now())
        };
        drop(id);
        if !wait.is_zero() {
            tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
            continue;
        }
        let s = shared.clone();
        let issuer = cfg.issuer.clone();
        let result = tokio::task::spawn_blocking(move || {
            // An expired certificate cannot be renewed (the issuer refuses it); with
            // tls.enrolment the node enrols again with its ServiceAccount token.
            let expired = time::OffsetDateTime::now_utc() >= s.identity().info().not_after;
            match &s.config.tls.enrolment {
                Some(e) if expired => re_enrol(&s, e),
                _ => renew_once(&s, &issuer),
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("renewal task failed: {e}")));
        let now = std::time::SystemTime::now();
        let mut guard = shared.renewal.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = guard.as_mut() else { continue };
        match result {
            Ok(new) => {
                st.renewals += 1;
                st.last_renewal = Some(now);
                st.serial = new.serial.clone();
                st.schedule
                    .succeeded(new.not_before.into(), new.not_after.into());
                info!(issuer = %cfg.issuer, serial = %new.serial, not_after = %new.not_after, "certificate renewed online");
            }
            Err(reason) => {
                let delay = st.schedule.failed(now, reason.clone(), jitter());
                let attempt = st.schedule.failures();
                let (serial, expiry) = {
                    let id = shared.identity();
                    (id.info().serial.clone(), id.info().not_after)
                };
                let detail = format!(
                    "renewal with issuer {} failed (attempt {attempt}): {reason}; retrying in {}; the current certificate {serial} (valid until {expiry}) stays in use",
                    cfg.issuer,
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                );
                warn!(issuer = %cfg.issuer, attempt, %reason, retry_in_ms = delay.as_millis() as u64, "certificate renewal failed; the current certificate stays in use");
                shared.events.record(
                    enc_api::EventKind::RenewalFailed,
                    crate::events::Detail {
                        serial: Some(serial),
                        detail,
                        ..Default::default()
                    },
                );
            }
        }
    }
}

/// A number in `[0, 1)` for retry jitter (not for cryptography).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// One renewal attempt: a new key and request with the current certificate's names, sent
/// over mutual TLS with the current identity; the answer is checked as a node identity for
/// this node against `tls.ca`, written over `tls.key` and `tls.cert` (each through a
/// temporary file and a rename, under the identity-files lock) and loaded at once, so that
/// every session re-authenticates with it. The error says what failed.
fn renew_once(shared: &Shared, issuer: &str) -> Result<enc_certs::CertInfo, String> {
    use enc_api::issuer::IssuerRequest;
    let id = shared.identity();
    let tls = &shared.config.tls;
    let csr = enc_certs::generate_csr(&shared.config.node.name, &id.info().ips)
        .map_err(|e| format_chain(&e))?;
    let ca_pem =
        std::fs::read_to_string(&tls.ca).map_err(|e| format!("read {}: {e}", tls.ca.display()))?;
    let client = enc_certs::issuer_client_config(ca_pem.as_bytes(), Some(&id))
        .map_err(|e| format_chain(&e))?;
    let issued = ask_issuer(
        issuer,
        client,
        ISSUER_TIMEOUT,
        &IssuerRequest::Renew {
            csr: csr.csr_pem.clone(),
        },
    )?;
    let new = NodeIdentity::from_pem(&issued.cert, &csr.key_pem, &ca_pem).map_err(|e| {
        format!(
            "the certificate from {issuer} is not usable: {}",
            format_chain(&e)
        )
    })?;
    check_identity(&shared.config, &new).map_err(|e| {
        format!(
            "the certificate from {issuer} is not usable: {}",
            format_chain(&e)
        )
    })?;
    let _files = shared
        .identity_files
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    install_key_pair(&tls.key, &tls.cert, &csr.key_pem, &issued.cert)?;
    if !shared.reload_identity_from(Some(&format!("online from issuer {issuer}"))) {
        return Err(format!(
            "{} and {} were written but not loaded (see the identity-reload-failed event)",
            tls.cert.display(),
            tls.key.display()
        ));
    }
    Ok(new.info().clone())
}

/// Enrols again with the ServiceAccount token (`tls.enrolment`) after the certificate
/// expired, writing under the identity-files lock, and loads the new identity at once.
fn re_enrol(
    shared: &Shared,
    enrolment: &crate::config::EnrolmentConfig,
) -> Result<enc_certs::CertInfo, String> {
    let _files = shared
        .identity_files
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let info = crate::enrolment::enrol_once(&shared.config, enrolment)
        .map_err(|e| format!("the certificate expired; enrolling again failed: {e}"))?;
    let from = format!(
        "enrolled again with the ServiceAccount token at issuer {}",
        enrolment.issuer
    );
    if !shared.reload_identity_from(Some(&from)) {
        return Err(format!(
            "{} and {} were written but not loaded (see the identity-reload-failed event)",
            shared.config.tls.cert.display(),
            shared.config.tls.key.display()
        ));
    }
    Ok(info)
}

/// Sends one request to the issuer at `issuer` and returns what it issued; a transport error
/// or a refusal is an error naming the issuer.
pub(crate) fn ask_issuer(
    issuer: &str,
    client: std::sync::Arc<rustls::ClientConfig>,
    timeout: Duration,
    request: &enc_api::issuer::IssuerRequest,
) -> Result<enc_api::issuer::Issued, String> {
    let mut stream =
        enc_certs::connect_issuer(issuer, client, timeout).map_err(|e| format_chain(&e))?;
    let answer = enc_api::issuer::call(&mut stream, request)
        .map_err(|e| format!("issuer {issuer}: {}", format_chain(&e)))?;
    match answer {
        enc_api::issuer::IssuerResponse::Issued(i) => Ok(i),
        enc_api::issuer::IssuerResponse::Refused { reason } => {
            Err(format!("issuer {issuer} refused: {reason}"))
        }
    }
}

/// Replaces the key file (mode 0600) and the certificate file (0644) with new contents: both
/// written beside their targets and synced, then renamed over them; on an error the temporary
/// files are removed and the error names both paths.
pub(crate) fn install_key_pair(
    key_path: &Path,
    cert_path: &Path,
    key_pem: &str,
    cert_pem: &str,
) -> Result<(), String> {
    let key_tmp = temp_beside(key_path);
    let cert_tmp = temp_beside(cert_path);
    let written = write_new_file(&key_tmp, key_pem.as_bytes(), 0o600)
        .and_then(|()| write_new_file(&cert_tmp, cert_pem.as_bytes(), 0o644))
        .and_then(|()| std::fs::rename(&key_tmp, key_path))
        .and_then(|()| std::fs::rename(&cert_tmp, cert_path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&key_tmp);
        let _ = std::fs::remove_file(&cert_tmp);
        return Err(format!(
            "writing {} / {}: {e}",
            key_path.display(),
            cert_path.display()
        ));
    }
    Ok(())
}

/// `<path>.renew.tmp`, in the same directory (so that the rename is atomic).
pub(crate) fn temp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".renew.tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to a new file with exactly `mode` (replacing a stale temporary file) and
/// syncs it.
pub(crate) fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()
}

async fn reconciler(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.reconcile.notified() => {}
            _ = tokio::time::sleep(RECONCILE_PERIOD) => {}
        }
        reconcile_once(&shared);
        shared.report_leaks();
        shared.check_expiry();
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a crash never
/// leaves a half-written file; creates the directory if needed.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Formats an error and its sources on one line.
pub fn format_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A [`Shared`] over in-memory fakes (links, eBPF datapath) and the given encryption backend,
/// for tests that run the real control channel in-process.
#[cfg(test)]
pub(crate) fn test_shared(
    config: Config,
    identity: NodeIdentity,
    crypto: Crypto,
    links: Arc<dyn LinkBackend>,
    dp: Arc<dyn Datapath>,
) -> Arc<Shared> {
    let route_device = crypto.device().unwrap_or_default().to_owned();
    let events = crate::events::EventLog::in_memory(&config.node.name);
    Shared::new(SharedParts {
        layout: Layout::direct(&route_device, 1420),
        route_device,
        identity,
        crypto,
        links,
        dp,
        pod_interfaces: Vec::new(),
        backend_reason: "test".into(),
        mtu: 1420,
        mtu_plan: mtu_plan(&config).expect("an MTU plan"),
        events,
        crl: None,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ESP in UDP costs the same 8 bytes whichever implementation carries it: the kernel XFRM
    /// path (routes on the underlay interface) gets the userspace engine's MTU.
    #[test]
    fn esp_in_udp_mtu_is_the_same_for_kernel_and_userspace() {
        let d = tempfile::tempdir().unwrap();
        for f in ["c", "k", "ca"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let plan = |implementation: &str, encapsulation: &str| {
            let text = format!(
                "node: {{ name: node-2, underlayAddress: 10.0.0.2, podCidr: 10.244.2.0/24 }}\n\
                 tls: {{ cert: c, key: k, ca: ca }}\n\
                 encryption: {{ type: ipsec, ipsec: {{ implementation: {implementation}, encapsulation: {encapsulation} }} }}\n\
                 peers:\n  - {{ name: node-1, underlayAddress: 10.0.0.1, podCidr: 10.244.1.0/24 }}\n"
            );
            let config = Config::parse(&text, &d.path().join("a.yaml")).unwrap();
            let plan = mtu_plan(&config).unwrap();
            (plan.encryption, plan.pod)
        };
        for implementation in ["kernel", "auto", "userspace"] {
            assert_eq!(
                plan(implementation, "udp"),
                (Some(1438), 1438),
                "{implementation}"
            );
            assert_eq!(
                plan(implementation, "none"),
                (Some(1446), 1446),
                "{implementation}"
            );
        }
    }
    use crate::config::RotationConfig;

    fn cfg() -> RotationConfig {
        RotationConfig {
            interval: Some(Duration::from_secs(3600)),
            grace_period: Duration::from_secs(10),
            stuck_after: Duration::from_secs(10),
            esp_seq_threshold: 1_000_000,
            bytes_threshold: 1 << 30,
        }
    }

    #[test]
    fn triggers() {
        let c = cfg();
        let tx = |bytes, esp_seq| Some(PeerTx { bytes, esp_seq });
        let min = Duration::from_secs(60);
        assert_eq!(rotation_trigger(&c, min, tx(0, Some(5)), 0), None);
        assert_eq!(rotation_trigger(&c, min, None, 0), None);
        assert_eq!(
            rotation_trigger(&c, Duration::from_secs(3600), None, 0),
            Some(Trigger::Schedule)
        );
        assert_eq!(
            rotation_trigger(&c, min, tx(0, Some(1_000_000)), 0),
            Some(Trigger::EspSeq(1_000_000))
        );
        // Bytes count from the epoch's start, not from the agent's.
        assert_eq!(rotation_trigger(&c, min, tx(5 << 30, None), 5 << 30), None);
        assert_eq!(
            rotation_trigger(&c, min, tx(6 << 30, None), 5 << 30),
            Some(Trigger::Bytes(1 << 30))
        );
        let off = RotationConfig {
            interval: None,
            ..cfg()
        };
        assert_eq!(rotation_trigger(&off, Duration::MAX, None, 0), None);
        assert!(Trigger::EspSeq(7).to_string().contains("7"));
    }
}

#[cfg(test)]
mod reenrol_tests {
    use super::*;
    use crate::attest::{FakeTokenReviewer, TokenReviewer};
    use crate::config::StandaloneIssuerConfig;
    use crate::issuer::StandaloneIssuer;

    /// The renewer of a node whose certificate expired (the issuer was away too long) enrols
    /// again with its ServiceAccount token, and the new identity is loaded at once.
    #[tokio::test]
    async fn renewer_enrols_again_with_the_token_once_the_certificate_expired() {
        enc_certs::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        enc_certs::init_ca(&ca_dir, &enc_certs::CaOptions::default()).unwrap();
        let ca = enc_certs::CertificateAuthority::load(&ca_dir).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let short = enc_certs::issue_node_cert_pem(
            &ca,
            &enc_certs::NodeCertRequest {
                node: "node-1".into(),
                ips: vec!["10.0.0.1".parse().unwrap()],
                days: 1,
            },
            now - time::Duration::seconds(1),
            now + time::Duration::seconds(3),
        )
        .unwrap();
        std::fs::write(dir.path().join("c"), &short.cert_pem).unwrap();
        std::fs::write(dir.path().join("k"), &short.key_pem).unwrap();
        // Renewal goes to an issuer that is down, so the certificate expires.
        let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let down_addr = format!("127.0.0.1:{}", down.local_addr().unwrap().port());
        drop(down);
        std::fs::copy(ca_dir.join("ca.crt"), dir.path().join("ca.crt")).unwrap();
        std::fs::write(dir.path().join("token"), "tok-node-1\n").unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let scfg = StandaloneIssuerConfig::parse_with_env(
            "issuer:\n  listen: 127.0.0.1:7946\n  caDir: ca\n  kubernetes:\n    serviceAccount: kube-system/enc-agent\nserverName: enc-issuer.test\nserverAddress: 127.0.0.1\n",
            &dir.path().join("issuer.yaml"),
            |_| None,
        )
        .unwrap();
        let host = Arc::new(StandaloneIssuer::new(scfg.clone()).unwrap());
        let reviewer: Arc<dyn TokenReviewer> = Arc::new(
            FakeTokenReviewer::new()
                .with_bound_token(
                    "tok-node-1",
                    "enc-issuer",
                    "system:serviceaccount:kube-system:enc-agent",
                    "node-1",
                    "enc-agent-a1",
                )
                .with_node("node-1", &["10.0.0.1".parse().unwrap()]),
        );
        tokio::spawn(crate::issuer::serve(
            host,
            scfg.issuer,
            Some(reviewer),
            listener,
        ));

        let text = format!(
            "node: {{ name: node-1, underlayAddress: 10.0.0.1, podCidr: 10.244.1.0/24 }}\n\
             tls:\n  cert: c\n  key: k\n  ca: ca.crt\n  reloadInterval: 'off'\n  \
             enrolment: {{ issuer: '{issuer}', serviceAccountTokenFile: token }}\n  \
             renewal: {{ issuer: '{down_addr}' }}\n\
             encryption: {{ type: none }}\n\
             metrics: {{ listen: 'off' }}\n\
             statusSocket: /nonexistent/enc-node-1.sock\n"
        );
        let config = Config::parse(&text, &dir.path().join("agent.yaml")).unwrap();
        let renewal = config.tls.renewal.clone().unwrap();
        let identity =
            NodeIdentity::load(&config.tls.cert, &config.tls.key, &config.tls.ca).unwrap();
        let old = identity.info().serial.clone();
        let shared = test_shared(
            config,
            identity,
            Crypto::None,
            Arc::new(enc_geneve_vxlan::FakeLinks::new()),
            Arc::new(enc_tunnel_ebpf::FakeDatapath::new(
                enc_tunnel_ebpf::AttachMode::Tcx,
            )),
        );
        tokio::spawn(renewer(shared.clone(), renewal));
        let deadline = Instant::now() + Duration::from_secs(15);
        while shared.identity().info().serial == old {
            assert!(Instant::now() < deadline, "not enrolled again within 15 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let info = shared.identity().info().clone();
        assert!(info.not_after > time::OffsetDateTime::now_utc());
        assert_eq!(info.dns_names, ["node-1"]);
        let events = shared.events.since(0, 100);
        // First the renewals failed, while the certificate was valid.
        assert!(
            events
                .iter()
                .any(|e| e.kind == enc_api::EventKind::RenewalFailed),
            "{events:?}"
        );
        assert!(
            events.iter().any(|e| e.kind == enc_api::EventKind::Renewal
                && e.detail
                    .contains("enrolled again with the ServiceAccount token")),
            "{events:?}"
        );
    }
}
