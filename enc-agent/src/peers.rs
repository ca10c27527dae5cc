//! The peer table: what the agent knows about every expected peer, as plain data.
//!
//! Transitions take `now` from the caller, and [`PeerTable::desired`] turns the table into the
//! datapath state it implies. Keys exist in the table only for peers that passed the mutual
//! certificate check in a control session; an authentication failure removes them at once.

use crate::config::{Config, PeerConfig};
use enc_certs::CertInfo;
use enc_geneve_vxlan::{
    NeighSpec, OverlaySpec, RT_TABLE_MAIN, RouteSpec, RuleFamily, RuleSpec, TunnelEncap,
    overlay_mac,
};
use enc_ipsec::{IpsecPeerSpec, SaKeys};
use enc_key_manager::rotation::{Progress, RetireHold, Side};
use enc_key_manager::{Epoch, PairKeys};
use enc_tunnel_ebpf::{Backend, PeerState};
use enc_wireguard::{PeerSpec, PresharedKey, PublicKey};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Which side of a pair opens the control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// This node dials the peer (our name sorts first).
    Dial,
    /// The peer dials this node.
    Accept,
}

impl Role {
    /// The role of `local` towards `peer`: the node whose name sorts first dials. One rule on
    /// both sides means the two never connect at once, so no tie-break is needed.
    pub fn of(local: &str, peer: &str) -> Self {
        if local < peer {
            Role::Dial
        } else {
            Role::Accept
        }
    }

    /// `dial` or `accept`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Dial => "dial",
            Role::Accept => "accept",
        }
    }
}

/// Authentication state of a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Not authenticated; the text says what the agent is doing.
    Pending(String),
    /// Authenticated in the current control session.
    Authenticated,
    /// The last attempt failed for this reason.
    Failed(String),
}

/// The control session that authenticated a peer, and what the peer announced in it.
#[derive(Clone, Debug)]
pub struct SessionKeys {
    /// Id of the control session.
    pub session_id: u64,
    /// The peer's WireGuard public key and UDP port (WireGuard sessions only; an IPsec
    /// session has none and uses the ESP keys of the epochs).
    pub wg: Option<(PublicKey, u16)>,
}

/// Key rotation state of a peer, as the session's state machine last reported it.
#[derive(Clone, Debug)]
pub struct RotationView {
    /// Whether this node leads rotations with the peer.
    pub side: Side,
    /// Where the rotation stands.
    pub progress: Progress,
}

/// An earlier session's installed epoch, waiting to be retired.
///
/// It is due a grace period after the current session switched its outbound, and it goes
/// once it is also quiet under a [`RetireHold`], as a rotation's old epochs do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stale {
    /// When the grace period ends (`None` until the current session switches, so that the
    /// old keys keep carrying traffic).
    pub due: Option<Instant>,
    /// When the datapath last reported a packet under this epoch.
    pub last_seen: Option<Instant>,
}

/// Everything known about one peer.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    /// Datapath id of the peer (1-based; in name order at start, then the smallest free id
    /// for a peer discovered later); it forms bits 31..16 of the skb mark and keys the eBPF
    /// maps. Stable while the peer exists. Local to this node: peers need not agree on ids.
    pub id: u16,
    /// Changes whenever the peer is added or its address or control port changes: a control
    /// session or dial loop started for an earlier incarnation can no longer touch the entry.
    pub incarnation: u64,
    /// What discovery says about the peer.
    pub config: PeerConfig,
    /// Which side dials.
    pub role: Role,
    /// Authentication state.
    pub auth: Auth,
    /// When `auth` last changed.
    pub since: Instant,
    /// Failed authentication attempts since start.
    pub failures: u64,
    /// When the peer last passed authentication.
    pub last_success: Option<Instant>,
    /// When and why authentication last failed.
    pub last_failure: Option<(Instant, String)>,
    /// The certificate seen at the last successful authentication.
    pub cert: Option<CertInfo>,
    /// The session that authenticated the peer (kept through the grace period of a loss).
    pub keys: Option<SessionKeys>,
    /// Installed keys by epoch: the current session's, and an earlier session's until they
    /// are retired.
    pub epochs: BTreeMap<Epoch, PairKeys>,
    /// The epoch this node sends with.
    pub outbound: Option<Epoch>,
    /// Epochs of an earlier session, removed once due and quiet (see [`Stale`]).
    pub stale: BTreeMap<Epoch, Stale>,
    /// When the outbound epoch last changed.
    pub switched_at: Option<Instant>,
    /// WireGuard static keys bound to each installed epoch: (this node's, the peer's).
    pub wg_keys: BTreeMap<Epoch, (PublicKey, PublicKey)>,
    /// Rotation progress of the current session.
    pub rotation: Option<RotationView>,
    /// When the session that delivered `keys` was lost, if it was.
    pub lost_at: Option<Instant>,
}

impl PeerEntry {
    fn set_auth(&mut self, auth: Auth, now: Instant) {
        if self.auth != auth {
            self.auth = auth;
            self.since = now;
        }
    }

    fn session_is(&self, session_id: u64) -> bool {
        self.keys
            .as_ref()
            .is_some_and(|k| k.session_id == session_id)
    }

    fn drop_keys(&mut self) {
        self.keys = None;
        self.epochs.clear();
        self.wg_keys.clear();
        self.outbound = None;
        self.stale.clear();
        self.rotation = None;
        self.lost_at = None;
    }

    /// The keys this node sends with.
    pub fn outbound_keys(&self) -> Option<&PairKeys> {
        self.outbound.and_then(|e| self.epochs.get(&e))
    }

    /// The highest epoch installed (0: none); announced in the hello of a new session.
    pub fn max_epoch(&self) -> u32 {
        self.epochs.keys().next_back().map_or(0, |e| e.0)
    }
}

fn sa_keys(k: &enc_key_manager::EspSaKeys) -> SaKeys {
    SaKeys {
        spi: k.spi,
        key: *k.key.expose(),
        salt: k.salt,
    }
}

/// Routing table holding the routes into the encryption device; marked packets look it up.
pub const ENC_TABLE: u32 = 229;
/// Priority of the `ip rule` that sends marked packets to [`ENC_TABLE`].
pub const ENC_RULE_PRIORITY: u32 = 1000;

/// The rules that steer packets carrying the encrypt mark into [`ENC_TABLE`].
pub fn steering_rules() -> Vec<RuleSpec> {
    let magic = enc_tunnel_ebpf::common::MARK_MAGIC_ENCRYPT << 8;
    [RuleFamily::V4, RuleFamily::V6]
        .into_iter()
        .map(|family| RuleSpec {
            family,
            priority: ENC_RULE_PRIORITY,
            fwmark: magic,
            fwmask: enc_tunnel_ebpf::common::MARK_MAGIC_MASK,
            table: ENC_TABLE,
        })
        .collect()
}

/// The datapath state implied by the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// WireGuard peers to configure.
    pub wg_peers: Vec<PeerSpec>,
    /// WireGuard static keys of this node still bound to an installed epoch; the device keeps
    /// these (and its primary key) and drops the others.
    pub wg_local_keys: Vec<PublicKey>,
    /// IPsec peers to configure.
    pub ipsec_peers: Vec<IpsecPeerSpec>,
    /// The overlay device, if there is an overlay.
    pub overlay: Option<OverlaySpec>,
    /// Permanent neighbours on the overlay device (one per peer).
    pub neighs: Vec<NeighSpec>,
    /// Routes to the peers' pod CIDRs (and, under an encrypted overlay, to their underlay
    /// addresses): in [`ENC_TABLE`] when encrypting, in the main table otherwise.
    pub routes: Vec<RouteSpec>,
    /// Rules steering marked packets into [`ENC_TABLE`].
    pub rules: Vec<RuleSpec>,
    /// eBPF: remote pod CIDR to peer id.
    pub cidrs: Vec<(IpNet, u16)>,
    /// eBPF: peer id to state.
    pub peer_states: Vec<(u16, PeerState)>,
}

/// How this node's stack carries pod traffic: what [`PeerTable::desired`] builds routes for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The encryption layer, if any.
    pub crypto: Option<CryptoLayout>,
    /// The overlay, if any (`None`: direct routing).
    pub overlay: Option<OverlaySpec>,
    /// VNI of the overlay.
    pub vni: u32,
    /// The underlay interface (direct routing without encryption routes through it).
    pub underlay_interface: String,
    /// MTU of the routes to remote pod CIDRs.
    pub pod_mtu: u32,
}

/// The encryption layer of a [`Layout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CryptoLayout {
    /// The device routes into the encryption point at (the WireGuard or userspace ESP device,
    /// or the underlay interface for kernel XFRM, whose policies match the mark).
    pub device: String,
    /// MTU of the routes into it.
    pub mtu: u32,
}

impl Layout {
    /// Direct routing into an encryption device, as before overlays existed (tests).
    pub fn direct(device: &str, mtu: u32) -> Self {
        Self {
            crypto: Some(CryptoLayout {
                device: device.to_owned(),
                mtu,
            }),
            overlay: None,
            vni: 0,
            underlay_interface: "eth0".into(),
            pod_mtu: mtu,
        }
    }
}

fn host_net(addr: std::net::IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// All expected peers, by name.
#[derive(Debug)]
pub struct PeerTable {
    local: String,
    local_addr: std::net::IpAddr,
    local_cidr: IpNet,
    entries: BTreeMap<String, PeerEntry>,
    /// Ids of removed peers that may still be installed in the datapath: not handed out again
    /// until a reconcile without them succeeded ([`PeerTable::release_ids`]).
    retired_ids: std::collections::BTreeSet<u16>,
    next_incarnation: u64,
}

/// What [`PeerTable::set_peers`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSetChange {
    /// New peers.
    pub added: Vec<String>,
    /// Peers no longer expected: their keys, routes and datapath state go.
    pub removed: Vec<String>,
    /// Peers whose underlay address or control port changed: their keys were dropped at once
    /// and they must authenticate again at the new address.
    pub readdressed: Vec<String>,
    /// Peers with another change (pod CIDR, advertised fingerprint): keys stay.
    pub updated: Vec<String>,
}

impl PeerSetChange {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.readdressed.is_empty()
            && self.updated.is_empty()
    }
}

fn pending_detail(role: Role) -> &'static str {
    match role {
        Role::Dial => "connecting",
        Role::Accept => "waiting for the peer to connect",
    }
}

fn new_entry(local: &str, p: &PeerConfig, id: u16, incarnation: u64, now: Instant) -> PeerEntry {
    let role = Role::of(local, &p.name);
    PeerEntry {
        id,
        incarnation,
        config: p.clone(),
        role,
        auth: Auth::Pending(pending_detail(role).into()),
        since: now,
        failures: 0,
        last_success: None,
        last_failure: None,
        cert: None,
        keys: None,
        epochs: BTreeMap::new(),
        outbound: None,
        stale: BTreeMap::new(),
        wg_keys: BTreeMap::new(),
        switched_at: None,
        rotation: None,
        lost_at: None,
    }
}

impl PeerTable {
    /// A table with every configured peer pending.
    pub fn new(config: &Config, now: Instant) -> Self {
        let mut sorted: Vec<&PeerConfig> = config.peers.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let entries: BTreeMap<String, PeerEntry> = sorted
            .into_iter()
            .zip(1u16..)
            .map(|(p, id)| {
                (
                    p.name.clone(),
                    new_entry(&config.node.name, p, id, u64::from(id), now),
                )
            })
            .collect();
        Self {
            local: config.node.name.clone(),
            local_addr: config.node.underlay_address,
            local_cidr: config.node.pod_cidr,
            next_incarnation: entries.len() as u64 + 1,
            entries,
            retired_ids: Default::default(),
        }
    }

    /// Makes `peers` the expected peer set (discovery changed its mind). Existing peers keep
    /// their ids; new peers get the smallest id neither in use nor retired; removed peers'
    /// ids are retired until [`PeerTable::release_ids`]. A changed address or control port
    /// drops the peer's keys at once: traffic to it stops (strict mode drops it) until it
    /// authenticates at the new address, whose certificate must carry that address. Peers
    /// beyond the id space are left out (and reported in `removed` if they were present).
    pub fn set_peers(&mut self, peers: &[PeerConfig], now: Instant) -> PeerSetChange {
        let mut change = PeerSetChange::default();
        let wanted: BTreeMap<&str, &PeerConfig> =
            peers.iter().map(|p| (p.name.as_str(), p)).collect();
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|n| !wanted.contains_key(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(e) = self.entries.remove(&name) {
                self.retired_ids.insert(e.id);
                change.removed.push(name);
            }
        }
        for (name, p) in wanted {
            if name == self.local {
                continue;
            }
            match self.entries.get_mut(name) {
                Some(e) if e.config == *p => {}
                Some(e) => {
                    let moved = e.config.underlay_address != p.underlay_address
                        || e.config.control_port != p.control_port;
                    e.config = p.clone();
                    if moved {
                        e.drop_keys();
                        e.cert = None;
                        e.incarnation = self.next_incarnation;
                        self.next_incarnation += 1;
                        e.set_auth(
                            Auth::Pending(format!(
                                "address changed to {}: authenticating again",
                                p.underlay_address
                            )),
                            now,
                        );
                        change.readdressed.push(name.to_owned());
                    } else {
                        change.updated.push(name.to_owned());
                    }
                }
                None => {
                    let used: std::collections::BTreeSet<u16> =
                        self.entries.values().map(|e| e.id).collect();
                    let Some(id) = (1..=u16::MAX)
                        .find(|id| !used.contains(id) && !self.retired_ids.contains(id))
                    else {
                        tracing::warn!(peer = %name, "no free datapath peer id (16 bits); peer left out");
                        continue;
                    };
                    let incarnation = self.next_incarnation;
                    self.next_incarnation += 1;
                    self.entries.insert(
                        name.to_owned(),
                        new_entry(&self.local, p, id, incarnation, now),
                    );
                    change.added.push(name.to_owned());
                }
            }
        }
        change
    }

    /// Ids retired by [`PeerTable::set_peers`] that are not yet free again.
    pub fn retired_ids(&self) -> Vec<u16> {
        self.retired_ids.iter().copied().collect()
    }

    /// Frees retired ids once a reconcile computed after their removal succeeded.
    pub fn release_ids(&mut self, ids: &[u16]) {
        for id in ids {
            self.retired_ids.remove(id);
        }
    }

    /// The peer at this underlay address.
    pub fn by_addr(&self, addr: std::net::IpAddr) -> Option<&PeerEntry> {
        self.entries
            .values()
            .find(|e| e.config.underlay_address == addr)
    }

    /// Whether `name` is still the incarnation a session or dial loop was started for.
    pub fn is_current(&self, name: &str, incarnation: u64) -> bool {
        self.entries
            .get(name)
            .is_some_and(|e| e.incarnation == incarnation)
    }

    /// [`PeerTable::authenticated`], if the peer is still `incarnation` (the address the
    /// session verified is still the peer's). Returns whether it was applied.
    pub fn authenticated_if(
        &mut self,
        name: &str,
        incarnation: u64,
        now: Instant,
        cert: Option<CertInfo>,
        keys: SessionKeys,
    ) -> bool {
        if !self.is_current(name, incarnation) {
            return false;
        }
        self.authenticated(name, now, cert, keys);
        true
    }

    /// This node's name.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// One peer.
    pub fn get(&self, name: &str) -> Option<&PeerEntry> {
        self.entries.get(name)
    }

    /// All peers, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &PeerEntry> {
        self.entries.values()
    }

    /// A session authenticated the peer. Keys installed by an earlier session become stale:
    /// they keep carrying traffic until this session switches to its own first epoch.
    pub fn authenticated(
        &mut self,
        name: &str,
        now: Instant,
        cert: Option<CertInfo>,
        keys: SessionKeys,
    ) {
        if let Some(e) = self.entries.get_mut(name) {
            e.set_auth(Auth::Authenticated, now);
            e.last_success = Some(now);
            e.cert = cert;
            e.keys = Some(keys);
            e.lost_at = None;
            e.rotation = None;
            for epoch in e.epochs.keys() {
                e.stale.entry(*epoch).or_default();
            }
        }
    }

    /// Installs the keys of one epoch for receiving. Ignored for a session that is not the
    /// peer's current one; returns whether they were installed.
    pub fn install_inbound(&mut self, name: &str, session_id: u64, keys: PairKeys) -> bool {
        match self.entries.get_mut(name) {
            Some(e) if e.session_is(session_id) && !matches!(e.auth, Auth::Failed(_)) => {
                e.stale.remove(&keys.epoch);
                e.epochs.insert(keys.epoch, keys);
                true
            }
            _ => false,
        }
    }

    /// Binds WireGuard static keys to an epoch: this node's and the peer's. Either may be
    /// left out to keep what is bound (the peer's key of a prepared epoch arrives with its ack).
    pub fn bind_wg_keys(
        &mut self,
        name: &str,
        session_id: u64,
        epoch: Epoch,
        local: Option<PublicKey>,
        remote: Option<PublicKey>,
    ) -> bool {
        match self.entries.get_mut(name) {
            Some(e) if e.session_is(session_id) => {
                let fallback = e.keys.as_ref().and_then(|k| k.wg).map(|(k, _)| k);
                let cur = e.wg_keys.get(&epoch).copied();
                let (Some(l), Some(r)) = (
                    local.or(cur.map(|c| c.0)),
                    remote.or(cur.map(|c| c.1)).or(fallback),
                ) else {
                    return false;
                };
                e.wg_keys.insert(epoch, (l, r));
                true
            }
            _ => false,
        }
    }

    /// Sends with `epoch` from now on; an earlier session's keys are retired `grace` later.
    pub fn switch_outbound(
        &mut self,
        name: &str,
        session_id: u64,
        epoch: Epoch,
        now: Instant,
        grace: Duration,
    ) -> bool {
        match self.entries.get_mut(name) {
            Some(e) if e.session_is(session_id) && e.epochs.contains_key(&epoch) => {
                e.outbound = Some(epoch);
                e.switched_at = Some(now);
                for st in e.stale.values_mut() {
                    st.due.get_or_insert(now + grace);
                }
                true
            }
            _ => false,
        }
    }

    /// Removes the keys of `epoch` (never the outbound epoch's).
    pub fn retire(&mut self, name: &str, session_id: u64, epoch: Epoch) -> bool {
        match self.entries.get_mut(name) {
            Some(e) if e.session_is(session_id) && e.outbound != Some(epoch) => {
                e.wg_keys.remove(&epoch);
                e.epochs.remove(&epoch).is_some()
            }
            _ => false,
        }
    }

    /// Records the rotation progress the session's state machine reports.
    pub fn set_rotation(&mut self, name: &str, session_id: u64, view: RotationView) {
        if let Some(e) = self.entries.get_mut(name)
            && e.session_is(session_id)
        {
            e.rotation = Some(view);
        }
    }

    /// Authentication failed: the peer's keys are torn down at once.
    pub fn auth_failed(&mut self, name: &str, now: Instant, reason: String) {
        if let Some(e) = self.entries.get_mut(name) {
            e.failures += 1;
            e.last_failure = Some((now, reason.clone()));
            e.set_auth(Auth::Failed(reason), now);
            e.drop_keys();
        }
    }

    /// The session `session_id` ended for a reason that is not an authentication failure.
    /// Keys stay for the grace period while the agents reconnect; a stale session id (a newer
    /// session has replaced it) is ignored.
    pub fn session_lost(&mut self, name: &str, now: Instant, session_id: u64, reason: &str) {
        if let Some(e) = self.entries.get_mut(name)
            && e.keys.as_ref().is_some_and(|k| k.session_id == session_id)
        {
            e.lost_at = Some(now);
            e.rotation = None;
            e.set_auth(Auth::Pending(format!("reconnecting: {reason}")), now);
        }
    }

    /// A connection attempt did not reach authentication for a non-identity reason.
    /// Leaves an authenticated or failed state alone: they carry better information.
    pub fn not_connected(&mut self, name: &str, now: Instant, detail: String) {
        if let Some(e) = self.entries.get_mut(name)
            && matches!(e.auth, Auth::Pending(_))
        {
            e.set_auth(Auth::Pending(detail), now);
        }
    }

    /// The datapath opened packets under `peer`'s earlier-session `epoch` lately (its count
    /// grew): the epoch is kept until it has been quiet. Ignored for an epoch that is not stale.
    pub fn note_stale_inbound(&mut self, peer: &str, epoch: Epoch, now: Instant) {
        if let Some(st) = self
            .entries
            .get_mut(peer)
            .and_then(|e| e.stale.get_mut(&epoch))
        {
            st.last_seen = Some(st.last_seen.map_or(now, |s| s.max(now)));
        }
    }

    /// Drops keys whose session has been lost for longer than `grace`, and an earlier
    /// session's keys that are due and quiet under `hold`. Returns whether anything changed.
    pub fn expire(&mut self, now: Instant, grace: Duration, hold: RetireHold) -> bool {
        let mut changed = false;
        for e in self.entries.values_mut() {
            let due: Vec<Epoch> = e
                .stale
                .iter()
                .filter(|(_, st)| {
                    st.due
                        .is_some_and(|due| hold.retire_now(due, st.last_seen, now))
                })
                .map(|(ep, _)| *ep)
                .collect();
            for ep in due {
                e.stale.remove(&ep);
                if e.outbound != Some(ep) {
                    e.epochs.remove(&ep);
                    e.wg_keys.remove(&ep);
                    changed = true;
                }
            }
            if e.lost_at
                .is_some_and(|t| now.saturating_duration_since(t) >= grace)
            {
                e.drop_keys();
                e.set_auth(
                    Auth::Pending("session lost; keys removed after the grace period".into()),
                    now,
                );
                changed = true;
            }
        }
        changed
    }

    /// The datapath state the table implies under `layout`.
    ///
    /// Routes to every expected peer's pod CIDR exist whether or not the peer is authenticated.
    /// With encryption they live in [`ENC_TABLE`], which only marked packets reach, and lead
    /// into the encryption device (directly, or through the overlay device, whose outer
    /// packets keep the mark and are routed into the encryption device by a host route to the
    /// peer's underlay address): traffic to a peer without keys finds no encryption peer and
    /// is dropped, never sent in clear. Without encryption they are plain main-table routes
    /// (through the overlay, or via the peer's underlay address).
    pub fn desired(&self, layout: &Layout) -> Desired {
        let mut wg_peers = Vec::new();
        let mut ipsec_peers = Vec::new();
        let mut routes = Vec::new();
        let mut neighs = Vec::new();
        let mut cidrs = Vec::new();
        let mut peer_states = Vec::new();
        let mut wg_local_keys = Vec::new();
        let table = if layout.crypto.is_some() {
            ENC_TABLE
        } else {
            RT_TABLE_MAIN
        };
        for e in self.entries.values() {
            let peer_addr = e.config.underlay_address;
            // What the encryption layer carries towards this peer: pod packets (direct) or the
            // overlay's packets between the two underlay addresses.
            let (local_sel, remote_sel) = match &layout.overlay {
                Some(_) => (host_net(self.local_addr), host_net(peer_addr)),
                None => (self.local_cidr, e.config.pod_cidr),
            };
            match (&layout.overlay, &layout.crypto) {
                (Some(ov), crypto) => {
                    routes.push(RouteSpec {
                        dst: e.config.pod_cidr,
                        dev: ov.ifname.clone(),
                        mtu: Some(layout.pod_mtu),
                        table,
                        via: Some(peer_addr),
                        encap: Some(TunnelEncap {
                            id: layout.vni,
                            src: self.local_addr,
                            dst: peer_addr,
                        }),
                    });
                    neighs.push(NeighSpec {
                        ifname: ov.ifname.clone(),
                        ip: peer_addr,
                        mac: overlay_mac(peer_addr),
                    });
                    if let Some(c) = crypto {
                        routes.push(
                            RouteSpec::new(host_net(peer_addr), c.device.clone())
                                .with_mtu(c.mtu)
                                .with_table(ENC_TABLE),
                        );
                    }
                }
                (None, Some(c)) => routes.push(
                    RouteSpec::new(e.config.pod_cidr, c.device.clone())
                        .with_mtu(c.mtu)
                        .with_table(ENC_TABLE),
                ),
                (None, None) => routes.push(
                    RouteSpec::new(e.config.pod_cidr, layout.underlay_interface.clone())
                        .with_mtu(layout.pod_mtu)
                        .with_via(peer_addr),
                ),
            }
            if layout.crypto.is_none() {
                continue;
            }
            cidrs.push((e.config.pod_cidr, e.id));
            // Keys kept through the grace period of a lost session still count as usable:
            // WireGuard keeps the peer, so the datapath keeps steering to it.
            let out = e
                .outbound_keys()
                .filter(|_| e.keys.is_some() && !matches!(e.auth, Auth::Failed(_)));
            let keyed = out.is_some();
            let wg = e.keys.as_ref().and_then(|k| k.wg);
            peer_states.push((
                e.id,
                PeerState {
                    authenticated: keyed,
                    has_key: keyed,
                    epoch: out.map_or(0, |k| (k.epoch.0 & 0xf) as u8),
                    backend: match (e.keys.is_some(), wg.is_some()) {
                        (true, false) => Backend::Ipsec,
                        _ => Backend::Wireguard,
                    },
                },
            ));
            match (out, wg) {
                (Some(k), Some((hello_key, port))) => {
                    // The static keys bound to the outbound epoch; an epoch installed before
                    // keys were bound (none in practice) falls back to the hello's.
                    let (local, public_key) = match e.wg_keys.get(&k.epoch) {
                        Some((l, r)) => (Some(*l), *r),
                        None => (None, hello_key),
                    };
                    // The peer's key at the newest older epoch of this session: if it
                    // differs (the peer rolled its key), the device re-keys the peer
                    // make-before-break instead of replacing it. A key from an earlier
                    // session is not carried over: a new key in a new session means the
                    // peer's device restarted, and its old sessions are dead.
                    let previous_public_key = e
                        .wg_keys
                        .range(..k.epoch)
                        .rfind(|(ep, _)| !e.stale.contains_key(ep))
                        .map(|(_, (_, r))| *r)
                        .filter(|r| *r != public_key);
                    wg_local_keys.extend(e.wg_keys.values().map(|(l, _)| *l));
                    wg_peers.push(PeerSpec {
                        public_key,
                        preshared_key: Some(PresharedKey::from_bytes(*k.wireguard_psk.expose())),
                        endpoint: Some(SocketAddr::new(peer_addr, port)),
                        allowed_ips: vec![remote_sel],
                        persistent_keepalive: None,
                        local_key: local,
                        previous_public_key,
                    })
                }
                (Some(k), None) => ipsec_peers.push(IpsecPeerSpec {
                    peer_id: e.id,
                    name: e.config.name.clone(),
                    local: self.local_addr,
                    remote: peer_addr,
                    local_cidrs: vec![local_sel],
                    remote_cidrs: vec![remote_sel],
                    epoch: (k.epoch.0 & 0xf) as u8,
                    outbound: sa_keys(&k.esp_out),
                    inbound: e.epochs.values().map(|k| sa_keys(&k.esp_in)).collect(),
                    older_outbound: e
                        .epochs
                        .values()
                        .filter(|o| o.epoch < k.epoch)
                        .map(|o| ((o.epoch.0 & 0xf) as u8, sa_keys(&o.esp_out)))
                        .collect(),
                    bypass: match layout.overlay {
                        Some(_) => vec![(self.local_cidr, e.config.pod_cidr)],
                        None => Vec::new(),
                    },
                }),
                (None, _) => {}
            }
        }
        wg_local_keys.sort();
        wg_local_keys.dedup();
        Desired {
            wg_local_keys,
            wg_peers,
            ipsec_peers,
            overlay: layout.overlay.clone(),
            neighs,
            routes,
            rules: if layout.crypto.is_some() {
                steering_rules()
            } else {
                Vec::new()
            },
            cidrs,
            peer_states,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use enc_key_manager::{Epoch, Pair, SessionSecret};

    pub(crate) fn config() -> Config {
        let d = tempfile::tempdir().unwrap();
        for f in ["c", "k", "ca"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let text = r#"
node: { name: node-2, underlayAddress: 10.0.0.2, podCidr: 10.244.2.0/24 }
tls: { cert: c, key: k, ca: ca }
encryption: { type: wireguard }
peers:
  - { name: node-1, underlayAddress: 10.0.0.1, podCidr: 10.244.1.0/24 }
  - { name: node-3, underlayAddress: 10.0.0.3, podCidr: 10.244.3.0/24 }
"#;
        Config::parse(text, &d.path().join("a.yaml")).unwrap()
    }

    fn session(session_id: u64) -> SessionKeys {
        SessionKeys {
            session_id,
            wg: Some((PublicKey::from([session_id as u8; 32]), 51820)),
        }
    }

    fn pair_keys(session_id: u64, epoch: u32) -> PairKeys {
        let secret = SessionSecret::from_bytes([session_id as u8; 32]);
        PairKeys::derive(
            &secret,
            Epoch(epoch),
            &Pair::new("node-1", "node-2").unwrap(),
            "node-2",
        )
        .unwrap()
    }

    const GRACE: Duration = Duration::from_secs(10);
    const HOLD: RetireHold = RetireHold {
        quiet: Duration::from_secs(2),
        max_hold: Duration::from_secs(20),
    };
    /// How long a lost session's keys stay: long enough not to matter in these tests.
    const LOST: Duration = Duration::from_secs(600);

    /// Authenticates node-1 in session `id` and installs and switches to `epoch`.
    fn establish(t: &mut PeerTable, now: Instant, id: u64, epoch: u32) {
        t.authenticated("node-1", now, None, session(id));
        assert!(t.install_inbound("node-1", id, pair_keys(id, epoch)));
        assert!(t.switch_outbound("node-1", id, Epoch(epoch), now, GRACE));
    }

    #[test]
    fn roles_follow_name_order() {
        let t = PeerTable::new(&config(), Instant::now());
        assert_eq!(t.get("node-1").unwrap().role, Role::Accept);
        assert_eq!(t.get("node-3").unwrap().role, Role::Dial);
    }

    #[test]
    fn routes_cover_every_peer_but_keys_only_authenticated_ones() {
        let now = Instant::now();
        let mut t = PeerTable::new(&config(), now);
        let d = t.desired(&Layout::direct("wg0", 1440));
        assert_eq!(d.routes.len(), 2);
        assert!(d.wg_peers.is_empty());
        assert!(d.routes.iter().all(|r| r.table == ENC_TABLE));
        assert_eq!(
            d.cidrs,
            vec![
                ("10.244.1.0/24".parse().unwrap(), 1),
                ("10.244.3.0/24".parse().unwrap(), 2)
            ]
        );
        assert!(
            d.peer_states
                .iter()
                .all(|(_, s)| !s.authenticated && !s.has_key)
        );
        assert_eq!(d.rules.len(), 2);
        // Authenticated but no epoch switched yet: nothing is keyed.
        t.authenticated("node-1", now, None, session(1));
        assert!(t.desired(&Layout::direct("wg0", 1440)).wg_peers.is_empty());
        assert!(t.install_inbound("node-1", 1, pair_keys(1, 1)));
        assert!(t.desired(&Layout::direct("wg0", 1440)).wg_peers.is_empty());
        assert!(t.switch_outbound("node-1", 1, Epoch(1), now, GRACE));
        let d = t.desired(&Layout::direct("wg0", 1440));
        assert_eq!(d.wg_peers.len(), 1);
        let p = &d.wg_peers[0];
        assert!(d.peer_states[0].1.authenticated);
        assert_eq!(d.peer_states[0].1.epoch, 1);
        assert!(!d.peer_states[1].1.authenticated);
        assert_eq!(p.endpoint, Some("10.0.0.1:51820".parse().unwrap()));
        assert_eq!(p.allowed_ips, vec!["10.244.1.0/24".parse().unwrap()]);
        assert!(p.preshared_key.is_some());
    }

    #[test]
    fn auth_failure_tears_keys_down_at_once() {
        let now = Instant::now();
        let mut t = PeerTable::new(&config(), now);
        establish(&mut t, now, 1, 1);
        t.auth_failed("node-1", now, "certificate expired".into());
        let e = t.get("node-1").unwrap();
        assert_eq!(e.auth, Auth::Failed("certificate expired".into()));
        assert_eq!(e.failures, 1);
        assert!(t.desired(&Layout::direct("wg0", 1440)).wg_peers.is_empty());
        assert!(
            !t.desired(&Layout::direct("wg0", 1440)).peer_states[0]
                .1
                .authenticated
        );
        // A later connection error does not hide the failure reason.
        t.not_connected("node-1", now, "connection refused".into());
        assert!(matches!(t.get("node-1").unwrap().auth, Auth::Failed(_)));
    }

    #[test]
    fn lost_session_keeps_keys_for_the_grace_period_only() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(60);
        let mut t = PeerTable::new(&config(), t0);
        establish(&mut t, t0, 1, 1);
        // A stale session's end is ignored.
        t.session_lost("node-1", t0, 99, "eof");
        assert_eq!(t.get("node-1").unwrap().auth, Auth::Authenticated);
        t.session_lost("node-1", t0, 1, "eof");
        assert!(matches!(t.get("node-1").unwrap().auth, Auth::Pending(_)));
        assert!(!t.expire(t0 + Duration::from_secs(59), grace, HOLD));
        assert_eq!(t.desired(&Layout::direct("wg0", 1440)).wg_peers.len(), 1);
        assert!(t.expire(t0 + grace, grace, HOLD));
        assert!(t.desired(&Layout::direct("wg0", 1440)).wg_peers.is_empty());
        // Reconnecting within the grace period replaces keys and clears the loss.
        establish(&mut t, t0, 2, 1);
        assert!(!t.expire(t0 + grace * 3, grace, HOLD));
        assert_eq!(
            t.get("node-1").unwrap().keys.as_ref().unwrap().session_id,
            2
        );
    }

    fn ipsec_spec(t: &PeerTable) -> IpsecPeerSpec {
        let d = t.desired(&Layout::direct("enc-esp0", 1446));
        assert!(d.wg_peers.is_empty());
        d.ipsec_peers.into_iter().next().expect("an IPsec peer")
    }

    #[test]
    fn ipsec_spec_follows_each_rotation_step() {
        let now = Instant::now();
        let mut t = PeerTable::new(&config(), now);
        let ipsec = |id| SessionKeys {
            session_id: id,
            wg: None,
        };
        t.authenticated("node-1", now, None, ipsec(1));
        t.install_inbound("node-1", 1, pair_keys(1, 1));
        t.switch_outbound("node-1", 1, Epoch(1), now, GRACE);
        let (k1, k2) = (pair_keys(1, 1), pair_keys(1, 2));
        let spec = ipsec_spec(&t);
        assert_eq!((spec.epoch, spec.outbound.spi), (1, k1.esp_out.spi));
        assert_eq!(spec.inbound.len(), 1);
        assert!(spec.older_outbound.is_empty());
        // Prepare: inbound of 2 beside 1; still sending with 1.
        t.install_inbound("node-1", 1, pair_keys(1, 2));
        let spec = ipsec_spec(&t);
        assert_eq!(spec.epoch, 1);
        let spis: Vec<u32> = spec.inbound.iter().map(|k| k.spi).collect();
        assert_eq!(spis, vec![k1.esp_in.spi, k2.esp_in.spi]);
        assert_eq!(t.desired(&Layout::direct("x", 1)).peer_states[0].1.epoch, 1);
        // Commit: outbound 2; 1's outbound SA stays until retirement.
        t.switch_outbound("node-1", 1, Epoch(2), now, GRACE);
        let spec = ipsec_spec(&t);
        assert_eq!((spec.epoch, spec.outbound.spi), (2, k2.esp_out.spi));
        assert_eq!(spec.older_outbound.len(), 1);
        assert_eq!(spec.older_outbound[0].0, 1);
        assert_eq!(t.desired(&Layout::direct("x", 1)).peer_states[0].1.epoch, 2);
        // The outbound epoch can never be retired; the old one can.
        assert!(!t.retire("node-1", 1, Epoch(2)));
        assert!(t.retire("node-1", 1, Epoch(1)));
        let spec = ipsec_spec(&t);
        assert_eq!(spec.inbound.len(), 1);
        assert!(spec.older_outbound.is_empty());
        // A stale session cannot touch the keys.
        assert!(!t.install_inbound("node-1", 7, pair_keys(7, 3)));
    }

    #[test]
    fn a_new_session_keeps_the_old_keys_until_it_switches() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(&config(), t0);
        establish(&mut t, t0, 1, 1);
        t.session_lost("node-1", t0, 1, "eof");
        let e = t.get("node-1").unwrap();
        assert_eq!(e.max_epoch(), 1);
        // Session 2 starts above epoch 1; until it switches, epoch 1 of session 1 carries
        // traffic.
        t.authenticated("node-1", t0, None, session(2));
        t.install_inbound("node-1", 2, pair_keys(2, 2));
        let psk_old = pair_keys(1, 1).wireguard_psk;
        let d = t.desired(&Layout::direct("wg0", 1440));
        assert_eq!(
            d.wg_peers[0].preshared_key,
            Some(PresharedKey::from_bytes(*psk_old.expose()))
        );
        assert!(!t.expire(t0 + GRACE * 5, Duration::from_secs(600), HOLD));
        assert!(t.get("node-1").unwrap().epochs.contains_key(&Epoch(1)));
        // Switched: epoch 1 goes one grace period later.
        let t1 = t0 + GRACE * 5;
        t.switch_outbound("node-1", 2, Epoch(2), t1, GRACE);
        assert!(!t.expire(t1, Duration::from_secs(600), HOLD));
        assert!(t.expire(t1 + GRACE, Duration::from_secs(600), HOLD));
        let e = t.get("node-1").unwrap();
        assert_eq!(e.epochs.keys().copied().collect::<Vec<_>>(), vec![Epoch(2)]);
        assert!(e.stale.is_empty());
    }

    fn overlay_layout(crypto: Option<&str>) -> Layout {
        Layout {
            crypto: crypto.map(|d| CryptoLayout {
                device: d.into(),
                mtu: 1440,
            }),
            overlay: Some(OverlaySpec {
                ifname: "enc-vxlan0".into(),
                kind: enc_geneve_vxlan::OverlayKind::Vxlan,
                port: 8472,
                mtu: 1390,
                mac: overlay_mac("10.0.0.2".parse().unwrap()),
            }),
            vni: 1,
            underlay_interface: "eth0".into(),
            pod_mtu: 1390,
        }
    }

    #[test]
    fn encrypted_overlay_routes_pods_through_the_overlay_and_the_overlay_into_the_device() {
        let now = Instant::now();
        let mut t = PeerTable::new(&config(), now);
        establish(&mut t, now, 1, 1);
        let d = t.desired(&overlay_layout(Some("wg0")));
        let pod = d
            .routes
            .iter()
            .find(|r| r.dst.to_string() == "10.244.1.0/24")
            .unwrap();
        assert_eq!(
            (pod.dev.as_str(), pod.table, pod.mtu, pod.via),
            (
                "enc-vxlan0",
                ENC_TABLE,
                Some(1390),
                Some("10.0.0.1".parse().unwrap())
            )
        );
        let encap = pod.encap.unwrap();
        assert_eq!(
            (encap.id, encap.src.to_string(), encap.dst.to_string()),
            (1, "10.0.0.2".into(), "10.0.0.1".into())
        );
        let host = d
            .routes
            .iter()
            .find(|r| r.dst.to_string() == "10.0.0.1/32")
            .unwrap();
        assert_eq!((host.dev.as_str(), host.table), ("wg0", ENC_TABLE));
        // WireGuard carries the overlay's packets between the two nodes, not pod packets.
        assert_eq!(
            d.wg_peers[0].allowed_ips,
            vec!["10.0.0.1/32".parse().unwrap()]
        );
        assert_eq!(d.neighs.len(), 2);
        assert_eq!(d.neighs[0].mac, overlay_mac("10.0.0.1".parse().unwrap()));
        assert_eq!(d.rules, steering_rules());
        assert_eq!(d.cidrs.len(), 2);
    }

    #[test]
    fn no_encryption_means_main_table_routes_and_nothing_else() {
        let now = Instant::now();
        let mut t = PeerTable::new(&config(), now);
        establish(&mut t, now, 1, 1);
        let d = t.desired(&overlay_layout(None));
        assert!(d.routes.iter().all(|r| r.table == RT_TABLE_MAIN));
        assert_eq!(d.routes.len(), 2, "one route per peer, no host routes");
        assert!(d.wg_peers.is_empty() && d.ipsec_peers.is_empty());
        assert!(d.rules.is_empty() && d.cidrs.is_empty() && d.peer_states.is_empty());
        let mut direct = overlay_layout(None);
        direct.overlay = None;
        direct.pod_mtu = 1500;
        let d = t.desired(&direct);
        let r = &d.routes[0];
        assert_eq!(
            (r.dev.as_str(), r.table, r.via, r.encap),
            (
                "eth0",
                RT_TABLE_MAIN,
                Some("10.0.0.1".parse().unwrap()),
                None
            )
        );
        assert!(d.neighs.is_empty() && d.overlay.is_none());
    }

    fn peer(name: &str, addr: &str, cidr: &str) -> PeerConfig {
        PeerConfig {
            name: name.into(),
            underlay_address: addr.parse().unwrap(),
            pod_cidr: cidr.parse().unwrap(),
            control_port: 51871,
            fingerprint: None,
        }
    }

    fn ids(t: &PeerTable) -> Vec<(String, u16)> {
        t.iter().map(|e| (e.config.name.clone(), e.id)).collect()
    }

    #[test]
    fn peer_ids_stay_stable_and_retired_ids_wait_for_a_reconcile() {
        let now = Instant::now();
        let mut t = PeerTable::new(&config(), now);
        let n1 = t.get("node-1").unwrap().config.clone();
        let n3 = t.get("node-3").unwrap().config.clone();
        // node-0 sorts first but must not renumber anyone: it gets the smallest free id.
        let n0 = peer("node-0", "10.0.0.10", "10.244.10.0/24");
        let c = t.set_peers(&[n0.clone(), n1.clone(), n3.clone()], now);
        assert_eq!(c.added, ["node-0"]);
        assert_eq!(
            ids(&t),
            [
                ("node-0".into(), 3),
                ("node-1".into(), 1),
                ("node-3".into(), 2)
            ]
        );
        // Removing node-1 retires id 1: a newcomer does not get it while it may be installed.
        let n4 = peer("node-4", "10.0.0.4", "10.244.4.0/24");
        let c = t.set_peers(&[n0.clone(), n3.clone(), n4.clone()], now);
        assert_eq!(
            (c.removed.as_slice(), c.added.as_slice()),
            (&["node-1".to_owned()][..], &["node-4".to_owned()][..])
        );
        assert_eq!(t.get("node-4").unwrap().id, 4);
        assert_eq!(t.retired_ids(), [1]);
        let d = t.desired(&Layout::direct("wg0", 1440));
        assert!(d.cidrs.iter().all(|(_, id)| *id != 1), "{:?}", d.cidrs);
        assert!(
            d.routes
                .iter()
                .all(|r| r.dst.to_string() != "10.244.1.0/24")
        );
        // Once a reconcile without it succeeded, id 1 is free again.
        t.release_ids(&[1]);
        let n5 = peer("node-5", "10.0.0.5", "10.244.5.0/24");
        t.set_peers(&[n0, n3, n4, n5], now);
        assert_eq!(t.get("node-5").unwrap().id, 1);
        assert!(t.retired_ids().is_empty());
        // The same set again changes nothing.
        let same: Vec<PeerConfig> = t.iter().map(|e| e.config.clone()).collect();
        assert!(t.set_peers(&same, now).is_empty());
    }

    #[test]
    fn a_moved_peer_loses_its_keys_at_once_and_old_sessions_cannot_touch_it() {
        let now = Instant::now();
        let mut t = PeerTable::new(&config(), now);
        establish(&mut t, now, 1, 1);
        let before = t.get("node-1").unwrap().incarnation;
        assert_eq!(t.desired(&Layout::direct("wg0", 1440)).wg_peers.len(), 1);
        let n3 = t.get("node-3").unwrap().config.clone();
        // Discovery (perhaps a forged entry) now puts node-1 at another address.
        let moved = peer("node-1", "10.0.0.66", "10.244.1.0/24");
        let c = t.set_peers(&[moved, n3.clone()], now);
        assert_eq!(c.readdressed, ["node-1"]);
        let e = t.get("node-1").unwrap();
        assert_ne!(e.incarnation, before);
        assert_eq!(e.id, 1, "the id stays");
        assert!(e.keys.is_none() && e.epochs.is_empty() && e.cert.is_none());
        assert!(matches!(&e.auth, Auth::Pending(d) if d.contains("10.0.0.66")));
        let d = t.desired(&Layout::direct("wg0", 1440));
        assert!(
            d.wg_peers.is_empty(),
            "no key, no endpoint at the new address"
        );
        assert!(!d.peer_states[0].1.authenticated && !d.peer_states[0].1.has_key);
        // The session that authenticated the old address cannot install anything now...
        assert!(!t.install_inbound("node-1", 1, pair_keys(1, 2)));
        // ...nor can a session begun for the old incarnation authenticate the new one.
        assert!(!t.authenticated_if("node-1", before, now, None, session(2)));
        assert!(t.get("node-1").unwrap().keys.is_none());
        let current = t.get("node-1").unwrap().incarnation;
        assert!(t.authenticated_if("node-1", current, now, None, session(3)));
        // A pod CIDR change keeps keys and incarnation.
        let c = t.set_peers(&[peer("node-1", "10.0.0.66", "10.244.11.0/24"), n3], now);
        assert_eq!(c.updated, ["node-1"]);
        assert_eq!(t.get("node-1").unwrap().incarnation, current);
        assert!(t.get("node-1").unwrap().keys.is_some());
    }

    /// Session 1 had epoch 1; session 2 installed epoch 2 and switched to it at `t0`.
    fn reconnected(t0: Instant) -> PeerTable {
        let mut t = PeerTable::new(&config(), t0);
        establish(&mut t, t0, 1, 1);
        t.session_lost("node-1", t0, 1, "eof");
        t.authenticated("node-1", t0, None, session(2));
        assert!(t.install_inbound("node-1", 2, pair_keys(2, 2)));
        assert!(t.switch_outbound("node-1", 2, Epoch(2), t0, GRACE));
        t
    }

    fn epochs(t: &PeerTable) -> Vec<Epoch> {
        t.get("node-1").unwrap().epochs.keys().copied().collect()
    }

    #[test]
    fn an_earlier_sessions_epoch_still_receiving_is_kept_until_quiet() {
        let t0 = Instant::now();
        let mut t = reconnected(t0);
        let step = Duration::from_millis(250);
        // A lagging datapath still opens packets under epoch 1 well past the grace period.
        let mut now = t0;
        while now < t0 + GRACE + Duration::from_secs(5) {
            t.note_stale_inbound("node-1", Epoch(1), now);
            assert!(
                !t.expire(now, LOST, HOLD),
                "retired while receiving at {now:?}"
            );
            now += step;
        }
        let last = now - step;
        // Reports for an epoch that is not stale, or for an unknown peer, change nothing.
        t.note_stale_inbound("node-1", Epoch(2), now);
        t.note_stale_inbound("node-9", Epoch(1), now);
        assert!(!t.expire(last + HOLD.quiet - Duration::from_millis(1), LOST, HOLD));
        assert_eq!(epochs(&t), [Epoch(1), Epoch(2)]);
        assert!(t.expire(last + HOLD.quiet, LOST, HOLD));
        assert_eq!(epochs(&t), [Epoch(2)]);
        assert!(t.get("node-1").unwrap().stale.is_empty());
    }

    #[test]
    fn an_earlier_sessions_epoch_that_never_goes_quiet_goes_after_max_hold() {
        let t0 = Instant::now();
        let mut t = reconnected(t0);
        let due = t0 + GRACE;
        let mut now = t0;
        while now < due + HOLD.max_hold {
            t.note_stale_inbound("node-1", Epoch(1), now);
            assert!(!t.expire(now, LOST, HOLD), "retired early at {now:?}");
            now += Duration::from_millis(500);
        }
        t.note_stale_inbound("node-1", Epoch(1), now);
        assert!(t.expire(due + HOLD.max_hold, LOST, HOLD));
        assert_eq!(epochs(&t), [Epoch(2)]);
    }

    #[test]
    fn an_earlier_sessions_epoch_without_reports_goes_at_the_end_of_the_grace_period() {
        let t0 = Instant::now();
        let mut t = reconnected(t0);
        assert!(!t.expire(t0 + GRACE - Duration::from_millis(1), LOST, HOLD));
        assert!(t.expire(t0 + GRACE, LOST, HOLD));
        assert_eq!(epochs(&t), [Epoch(2)]);
    }
}
