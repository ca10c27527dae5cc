//! Runs control sessions over TCP and TLS 1.3 with tokio.
//!
//! Who connects: the node whose name sorts first dials, the other accepts (see
//! [`crate::peers::Role`]). The acceptor learns which peer to expect from the TCP source
//! address, before the handshake, and verifies the client certificate against exactly that
//! peer; the dialer verifies the server certificate the same way. Inbound connections from
//! unknown addresses, or from a peer this node is supposed to dial, are closed unanswered.

use super::proto::{self, Message, Rotate, RotationMsg};
use super::session::{Action, Session, SessionError};
use crate::app::{Offer, RotateCmd, Shared, format_chain};
use crate::config::PeerConfig;
use crate::events::Detail;
use crate::peers::{Role, RotationView, SessionKeys};
use enc_api::EventKind;
use enc_certs::{AuthFailure, CertInfo, ExpectedPeer};
use enc_key_manager::rotation::{Effect, Rotation, Side};
use enc_key_manager::{EXPORTER_LABEL, EXPORTER_LEN, Epoch, Pair, PairKeys, SessionSecret};
use enc_wireguard::PublicKey;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn expected(peer: &PeerConfig) -> ExpectedPeer {
    ExpectedPeer {
        name: peer.name.clone(),
        addr: peer.underlay_address,
    }
}

/// Accepts control connections forever.
pub async fn listen(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, src)) => {
                tokio::spawn(handle_inbound(shared.clone(), stream, src));
            }
            Err(e) => {
                warn!(error = %e, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle_inbound(shared: Arc<Shared>, stream: TcpStream, src: SocketAddr) {
    let Some((peer, incarnation)) = shared.peer_by_addr(src.ip()) else {
        warn!(%src, "control connection from an address no expected peer has; closed");
        return;
    };
    if Role::of(&shared.config.node.name, &peer.name) == Role::Dial {
        debug!(peer = %peer.name, %src, "peer dialled although this node dials it; closed");
        return;
    }
    let config = match enc_certs::server_config_with_crls(
        &shared.identity(),
        &expected(&peer),
        &shared.crls(),
    ) {
        Ok(c) => c,
        Err(e) => {
            warn!(peer = %peer.name, error = %format_chain(&e), "cannot build TLS server config");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let accept = TlsAcceptor::from(config).accept(stream);
    match tokio::time::timeout(shared.config.control.connect_timeout, accept).await {
        Err(_) => not_connected(&shared, &peer, "TLS handshake timed out".into()),
        Ok(Err(e)) => handshake_failed(&shared, &peer, &e),
        Ok(Ok(tls)) => {
            let (_, conn) = tls.get_ref();
            let cert = conn.peer_certificates().and_then(enc_certs::peer_info);
            match export(conn.export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)) {
                Ok(secret) => {
                    let _ = run_session(&shared, &peer, incarnation, tls, secret, cert).await;
                }
                Err(e) => not_connected(&shared, &peer, e),
            }
        }
    }
}

fn export(r: Result<[u8; EXPORTER_LEN], rustls::Error>) -> Result<SessionSecret, String> {
    r.map(SessionSecret::from_bytes)
        .map_err(|e| format!("TLS exporter failed: {e}"))
}

/// Dials one peer, keeps a session up, and redials with capped backoff when it ends. Returns
/// when discovery removes the peer or moves it to another address (`incarnation` is the
/// peer-table incarnation the loop dials for; a new loop dials the new address).
pub async fn dial_loop(shared: Arc<Shared>, peer: PeerConfig, incarnation: u64) {
    let mut backoff = BACKOFF_MIN;
    let mut peers_rx = shared.subscribe_peers();
    loop {
        if !shared.is_current(&peer.name, incarnation) {
            debug!(peer = %peer.name, addr = %peer.underlay_address, "peer removed or moved; dial loop ends");
            return;
        }
        let established = dial_once(&shared, &peer, incarnation).await;
        if established {
            backoff = BACKOFF_MIN;
        } else {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = peers_rx.changed() => {}
        }
    }
}

/// One connection attempt and, if it authenticates, the whole session. Returns whether the
/// session got established.
async fn dial_once(shared: &Arc<Shared>, peer: &PeerConfig, incarnation: u64) -> bool {
    let target = SocketAddr::new(peer.underlay_address, peer.control_port);
    let timeout = shared.config.control.connect_timeout;
    let connect = async {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        // The acceptor identifies us by source address, so dial from the underlay address.
        socket.bind(SocketAddr::new(shared.config.node.underlay_address, 0))?;
        socket.connect(target).await
    };
    let stream = match tokio::time::timeout(timeout, connect).await {
        Err(_) => {
            not_connected(shared, peer, format!("connecting to {target}: timed out"));
            return false;
        }
        Ok(Err(e)) => {
            not_connected(shared, peer, format!("connecting to {target}: {e}"));
            return false;
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let exp = expected(peer);
    let (config, name) = match (
        enc_certs::client_config_with_crls(&shared.identity(), &exp, &shared.crls()),
        enc_certs::server_name(&exp),
    ) {
        (Ok(c), Ok(n)) => (c, n),
        (Err(e), _) | (_, Err(e)) => {
            not_connected(
                shared,
                peer,
                format!("TLS client config: {}", format_chain(&e)),
            );
            return false;
        }
    };
    let tls = match tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, stream))
        .await
    {
        Err(_) => {
            not_connected(shared, peer, "TLS handshake timed out".into());
            return false;
        }
        Ok(Err(e)) => {
            handshake_failed(shared, peer, &e);
            return false;
        }
        Ok(Ok(tls)) => tls,
    };
    let (_, conn) = tls.get_ref();
    let cert = conn.peer_certificates().and_then(enc_certs::peer_info);
    match export(conn.export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)) {
        Ok(secret) => run_session(shared, peer, incarnation, tls, secret, cert).await,
        Err(e) => {
            not_connected(shared, peer, e);
            false
        }
    }
}

fn not_connected(shared: &Shared, peer: &PeerConfig, detail: String) {
    debug!(peer = %peer.name, %detail, "control connection not established");
    shared
        .table()
        .not_connected(&peer.name, Instant::now(), detail);
}

fn auth_failed(shared: &Shared, peer: &PeerConfig, reason: String) {
    warn!(peer = %peer.name, addr = %peer.underlay_address, %reason, "peer authentication failed");
    shared.events.record(
        EventKind::AuthFailure,
        Detail::peer(
            &peer.name,
            format!("{reason} (address {})", peer.underlay_address),
        ),
    );
    shared
        .table()
        .auth_failed(&peer.name, Instant::now(), reason);
    shared.request_reconcile();
}

fn handshake_failed(shared: &Shared, peer: &PeerConfig, e: &std::io::Error) {
    match AuthFailure::from_io_error(e) {
        Some(f) => auth_failed(shared, peer, f.to_string()),
        None => not_connected(shared, peer, format!("TLS handshake: {e}")),
    }
}

enum ReadError {
    Io(std::io::Error),
    Proto(proto::ProtoError),
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut rd: R,
    tx: tokio::sync::mpsc::Sender<Result<Message, ReadError>>,
) {
    loop {
        let mut prefix = [0u8; 4];
        if let Err(e) = rd.read_exact(&mut prefix).await {
            let _ = tx.send(Err(ReadError::Io(e))).await;
            return;
        }
        let len = match proto::frame_len(prefix) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(ReadError::Proto(e))).await;
                return;
            }
        };
        let mut body = vec![0u8; len];
        if let Err(e) = rd.read_exact(&mut body).await {
            let _ = tx.send(Err(ReadError::Io(e))).await;
            return;
        }
        let msg = proto::decode_body(&body).map_err(ReadError::Proto);
        let stop = msg.is_err();
        if tx.send(msg).await.is_err() || stop {
            return;
        }
    }
}

/// How a session ended.
enum End {
    Session(SessionError),
    Read(ReadError),
    Write(std::io::Error),
    Keys(String),
    Rotation(String),
    /// The peer's certificate is on a revocation list this node accepted.
    Revoked(String),
    /// This node's identity was reloaded: re-authenticate with it.
    Reauth(String),
    /// Discovery removed the peer or moved it to another address.
    PeerChanged,
}

/// Key-rotation bookkeeping of one session: the state machine and the trigger baselines.
struct KeyState {
    rotation: Rotation,
    pair: Pair,
    /// WireGuard: this node's static key bound to each epoch it installed (announced in its
    /// prepare or ack), and the peer's as it announced them.
    local_wg: BTreeMap<Epoch, PublicKey>,
    remote_wg: BTreeMap<Epoch, PublicKey>,
    /// Bytes sent to the peer when the outbound epoch last switched.
    tx_base: u64,
    last_check: Instant,
    /// Packets last counted under the inbound keys of each retiring epoch and each earlier
    /// session's epoch.
    retiring_seen: BTreeMap<Epoch, u64>,
}

/// How often the automatic triggers (ESP sequence number, bytes) are evaluated.
const TRIGGER_CHECK: Duration = Duration::from_secs(1);

/// Tells the rotation which of its retiring epochs still receive packets (their count in the
/// datapath grew since the last tick), and the peer table the same of an earlier session's
/// epochs, so that an epoch whose packets still wait in a lagging datapath's queues is not
/// removed under them.
fn note_retiring_traffic(shared: &Shared, peer: &str, k: &mut KeyState, now: Instant) {
    let retiring: Vec<Epoch> = k.rotation.retiring().collect();
    let stale: Vec<Epoch> = shared
        .table()
        .get(peer)
        .map(|e| e.stale.keys().copied().collect())
        .unwrap_or_default();
    k.retiring_seen
        .retain(|e, _| retiring.contains(e) || stale.contains(e));
    if retiring.is_empty() && stale.is_empty() {
        return;
    }
    let watched: Vec<Epoch> = retiring.iter().chain(&stale).copied().collect();
    for (epoch, packets) in shared.inbound_packets(peer, &watched) {
        if k.retiring_seen
            .insert(epoch, packets)
            .is_some_and(|before| packets > before)
        {
            if retiring.contains(&epoch) {
                k.rotation.note_inbound(epoch, now);
            } else {
                shared.table().note_stale_inbound(peer, epoch, now);
            }
        }
    }
}

/// Runs the control protocol over an authenticated stream until it ends, or until discovery
/// removes the peer or moves it away from the address this session verified (`incarnation`).
/// Returns whether the peer's hello was accepted (keys were installed).
async fn run_session<S>(
    shared: &Arc<Shared>,
    peer: &PeerConfig,
    incarnation: u64,
    stream: S,
    secret: SessionSecret,
    cert: Option<CertInfo>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let session_id = shared.next_session_id();
    let local = shared.config.node.name.clone();
    let (rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(read_frames(rd, tx));
    let hello = shared.hello(&peer.name);
    let announced = hello.epoch;
    let (mut session, first) = Session::new(&peer.name, hello, shared.timing, Instant::now());
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel::<RotateCmd>(8);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut pending = first;
    let mut effects: Vec<Effect> = Vec::new();
    let mut keys: Option<KeyState> = None;
    let mut crl_rx = shared.subscribe_crl();
    let mut reauth_rx = shared.subscribe_reauth();
    let mut peers_rx = shared.subscribe_peers();
    let serial = cert.as_ref().map(|c| c.serial.clone());

    let end = 'outer: loop {
        for action in pending.drain(..) {
            match action {
                Action::Send(msg) => {
                    if let Err(e) = wr.write_all(&proto::encode(&msg)).await {
                        break 'outer End::Write(e);
                    }
                    session.on_sent(Instant::now());
                }
                Action::Established(hello) => {
                    let pair = match Pair::new(&local, &peer.name) {
                        Ok(p) => p,
                        Err(e) => break 'outer End::Keys(e.to_string()),
                    };
                    let first_epoch = Epoch(announced.max(hello.epoch).wrapping_add(1).max(1));
                    info!(
                        peer = %peer.name,
                        addr = %peer.underlay_address,
                        session = session_id,
                        first_epoch = %first_epoch,
                        wg_public_key = %hello.wireguard.map(|(k, _)| k.to_string()).unwrap_or_default(),
                        "peer authenticated; installing keys derived from the control session"
                    );
                    let mut d = Detail::peer(
                        &peer.name,
                        format!(
                            "mutual TLS 1.3 at {}; certificate {} issued by {}, valid until {}",
                            peer.underlay_address,
                            cert.as_ref().map_or("?", |c| c.subject.as_str()),
                            cert.as_ref().map_or("?", |c| c.issuer.as_str()),
                            cert.as_ref()
                                .map_or_else(|| "?".to_owned(), |c| c.not_after.to_string()),
                        ),
                    );
                    if let Some(c) = &cert {
                        d = d.serial(c.serial.clone());
                    }
                    // Only if discovery still puts the peer at the address this session
                    // verified; a moved or removed peer gets nothing from it.
                    if !shared.table().authenticated_if(
                        &peer.name,
                        incarnation,
                        Instant::now(),
                        cert.clone(),
                        SessionKeys {
                            session_id,
                            wg: hello.wireguard,
                        },
                    ) {
                        break 'outer End::PeerChanged;
                    }
                    shared.events.record(EventKind::AuthSuccess, d);
                    check_fingerprint(peer, cert.as_ref());
                    shared.register_rotator(&peer.name, session_id, cmd_tx.clone());
                    // Our newest revocation list, so that lists spread to every node.
                    if let Some(r) = shared.revocations_message()
                        && let Err(e) = wr.write_all(&proto::encode(&Message::Revocations(r))).await
                    {
                        break 'outer End::Write(e);
                    }
                    shared.request_reconcile();
                    let side = match Role::of(&local, &peer.name) {
                        Role::Dial => Side::Leader,
                        Role::Accept => Side::Follower,
                    };
                    let (rotation, fx) =
                        Rotation::new(side, first_epoch, shared.rotation_timing(), Instant::now());
                    effects.extend(fx);
                    keys = Some(KeyState {
                        rotation,
                        pair,
                        local_wg: BTreeMap::new(),
                        remote_wg: BTreeMap::new(),
                        tx_base: 0,
                        last_check: Instant::now(),
                        retiring_seen: BTreeMap::new(),
                    });
                }
                Action::Rotation(Rotate {
                    step: msg,
                    wireguard_key,
                }) => {
                    let Some(k) = keys.as_mut() else {
                        break 'outer End::Rotation("rotation message before hello".into());
                    };
                    if let Some(text) = wireguard_key {
                        let key: PublicKey = match text.parse() {
                            Ok(key) => key,
                            Err(_) => {
                                break 'outer End::Rotation(format!(
                                    "invalid wireguardKey {text:?} in {msg:?}"
                                ));
                            }
                        };
                        let epoch = match msg {
                            RotationMsg::Prepare { epoch } | RotationMsg::Ack { epoch } => epoch,
                            other => {
                                break 'outer End::Rotation(format!(
                                    "wireguardKey on a {other:?} message"
                                ));
                            }
                        };
                        k.remote_wg.insert(epoch, key);
                        shared
                            .table()
                            .bind_wg_keys(&peer.name, session_id, epoch, None, Some(key));
                    }
                    match k.rotation.on_message(msg, Instant::now()) {
                        Ok(fx) => effects.extend(fx),
                        Err(e) => break 'outer End::Rotation(e.to_string()),
                    }
                }
                Action::Revocations(r) => {
                    let number = r.number;
                    match shared.offer_crl(&r.pem, &format!("peer {}", peer.name)) {
                        Ok((Offer::Adopted | Offer::Same, _)) => {}
                        // The peer is behind: send it ours.
                        Ok((Offer::Older, _)) => {
                            if let Some(ours) = shared.revocations_message()
                                && let Err(e) = wr
                                    .write_all(&proto::encode(&Message::Revocations(ours)))
                                    .await
                            {
                                break 'outer End::Write(e);
                            }
                        }
                        Err(reason) => {
                            warn!(peer = %peer.name, number, %reason, "revocation list from a peer refused");
                        }
                    }
                }
            }
        }
        if let Some(k) = keys.as_mut() {
            for fx in effects.drain(..) {
                if let Err(end) = carry_out(shared, peer, session_id, &secret, k, fx, &mut wr).await
                {
                    break 'outer end;
                }
                session.on_sent(Instant::now());
            }
            shared.table().set_rotation(
                &peer.name,
                session_id,
                RotationView {
                    side: k.rotation.side(),
                    progress: k.rotation.progress(Instant::now()),
                },
            );
        }
        let step = tokio::select! {
            msg = rx.recv() => match msg {
                Some(Ok(m)) => session.on_message(m, Instant::now()),
                Some(Err(e)) => break 'outer End::Read(e),
                None => break 'outer End::Read(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            },
            changed = reauth_rx.changed() => {
                if changed.is_ok() {
                    let reason = reauth_rx.borrow_and_update().1.clone();
                    let bye = Message::Goodbye(proto::Goodbye {
                        reason: format!("re-authenticating: {reason}"),
                    });
                    let _ = wr.write_all(&proto::encode(&bye)).await;
                    break 'outer End::Reauth(reason);
                }
                Ok(vec![])
            },
            changed = peers_rx.changed() => {
                if changed.is_ok() && !shared.is_current(&peer.name, incarnation) {
                    let bye = Message::Goodbye(proto::Goodbye {
                        reason: "discovery no longer expects this node at this address".into(),
                    });
                    let _ = wr.write_all(&proto::encode(&bye)).await;
                    break 'outer End::PeerChanged;
                }
                Ok(vec![])
            },
            changed = crl_rx.changed() => {
                if changed.is_ok() {
                    if let Some(r) = shared.revocations_message()
                        && session.is_established()
                        && let Err(e) = wr.write_all(&proto::encode(&Message::Revocations(r))).await
                    {
                        break 'outer End::Write(e);
                    }
                    if let Some(s) = &serial
                        && shared.is_revoked(s)
                    {
                        break 'outer End::Revoked(s.clone());
                    }
                }
                Ok(vec![])
            },
            _ = tick.tick() => {
                let now = Instant::now();
                if let Some(k) = keys.as_mut() {
                    note_retiring_traffic(shared, &peer.name, k, now);
                    effects.extend(k.rotation.on_tick(now));
                    if now.saturating_duration_since(k.last_check) >= TRIGGER_CHECK {
                        k.last_check = now;
                        if let Some(why) = shared.rotation_due(&peer.name, &k.rotation, k.tx_base, now) {
                            let (target, fx) = k.rotation.start(now);
                            if !fx.is_empty() {
                                info!(peer = %peer.name, target = %target, reason = %why, "starting key rotation");
                                shared.events.record(
                                    EventKind::RotationStart,
                                    Detail::peer(&peer.name, why.clone()).epoch(target.0),
                                );
                            }
                            effects.extend(fx);
                        }
                    }
                }
                session.on_tick(now)
            },
            Some(cmd) = cmd_rx.recv() => {
                let answer = match keys.as_mut() {
                    Some(k) => {
                        let from = k.rotation.outbound();
                        let (target, fx) = k.rotation.start(Instant::now());
                        info!(peer = %peer.name, target = %target, "key rotation requested by an operator");
                        shared.events.record(
                            EventKind::RotationStart,
                            Detail::peer(&peer.name, "requested by an operator (encctl rotate)")
                                .epoch(target.0),
                        );
                        effects.extend(fx);
                        Ok((from, target))
                    }
                    None => Err("the control session has not completed its hello yet".to_owned()),
                };
                let _ = cmd.reply.send(answer);
                Ok(vec![])
            }
        };
        match step {
            Ok(actions) => pending = actions,
            Err(e) => break End::Session(e),
        }
    };
    reader.abort();
    let _ = wr.shutdown().await;
    shared.unregister_rotator(&peer.name, session_id);

    let established = session.is_established();
    let now = Instant::now();
    let reason = match &end {
        End::Revoked(serial) => {
            let reason = enc_certs::AuthFailure::Revoked {
                serial: serial.clone(),
            }
            .to_string();
            shared.events.record(
                EventKind::PeerRevoked,
                Detail::peer(
                    &peer.name,
                    format!("{reason}; session closed, keys removed"),
                )
                .serial(serial.clone()),
            );
            auth_failed(shared, peer, reason);
            return established;
        }
        End::Session(e) if e.is_auth_failure() => {
            auth_failed(shared, peer, e.to_string());
            return established;
        }
        End::Read(ReadError::Io(e)) => {
            if let Some(f) = AuthFailure::from_io_error(e) {
                auth_failed(shared, peer, f.to_string());
                return established;
            }
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "control connection closed by peer".to_owned()
            } else {
                format!("control connection: {e}")
            }
        }
        End::Read(ReadError::Proto(e)) => e.to_string(),
        End::Session(e) => e.to_string(),
        End::Write(e) => format!("writing to peer: {e}"),
        End::Keys(e) => format!("key installation: {e}"),
        End::Rotation(e) => format!("key rotation out of step: {e}"),
        End::Reauth(why) => format!("re-authenticating with the reloaded identity ({why})"),
        End::PeerChanged => {
            info!(peer = %peer.name, addr = %peer.underlay_address, session = session_id, "discovery removed the peer or moved it to another address; session closed");
            return established;
        }
    };
    if established {
        info!(peer = %peer.name, session = session_id, %reason, "control session ended");
        shared.events.record(
            EventKind::SessionEnd,
            Detail::peer(
                &peer.name,
                format!(
                    "{reason}; keys kept for {} while reconnecting",
                    humantime::format_duration(shared.config.control.key_grace_period)
                ),
            ),
        );
        shared
            .table()
            .session_lost(&peer.name, now, session_id, &reason);
        shared.request_reconcile();
    } else {
        not_connected(shared, peer, reason);
    }
    established
}

/// Compares the certificate fingerprint discovery advertised for `peer` with the certificate
/// the peer presented. The handshake's CA and SAN checks already decided; a mismatch (a stale
/// entry after a renewal, or a forged one) changes nothing and is only logged.
fn check_fingerprint(peer: &PeerConfig, cert: Option<&CertInfo>) {
    if let (Some(claimed), Some(cert)) = (&peer.fingerprint, cert)
        && !claimed.eq_ignore_ascii_case(&cert.sha256_fingerprint)
    {
        warn!(
            peer = %peer.name,
            advertised = %claimed,
            presented = %cert.sha256_fingerprint,
            "the certificate fingerprint in the peer's discovery entry differs from the certificate it presented (stale entry after a renewal, or a forged one); the CA and SAN checks are authoritative"
        );
    }
}

/// Carries out one rotation effect. Keys are in the datapath before the message that
/// announces them is written, so the peer never acts on a key this node does not hold.
async fn carry_out<W: AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    peer: &PeerConfig,
    session_id: u64,
    secret: &SessionSecret,
    k: &mut KeyState,
    fx: Effect,
    wr: &mut W,
) -> Result<(), End> {
    let local = &shared.config.node.name;
    match fx {
        Effect::Send(msg) => {
            let wireguard_key = match msg {
                RotationMsg::Prepare { epoch } | RotationMsg::Ack { epoch } => {
                    k.local_wg.get(&epoch).map(|key| key.to_string())
                }
                _ => None,
            };
            let frame = Message::Rotate(Rotate {
                step: msg,
                wireguard_key,
            });
            wr.write_all(&proto::encode(&frame))
                .await
                .map_err(End::Write)
        }
        Effect::InstallInbound(epoch) => {
            let keys = PairKeys::derive(secret, epoch, &k.pair, local)
                .map_err(|e| End::Keys(e.to_string()))?;
            let (key_id, spi_in) = (keys.key_id.clone(), keys.esp_in.spi);
            let wg_local = shared.wg_public_key();
            {
                let mut table = shared.table();
                if !table.install_inbound(&peer.name, session_id, keys) {
                    return Err(End::Keys(
                        "the session no longer owns the peer's keys".into(),
                    ));
                }
                if let Some(l) = wg_local {
                    // This node's current static key goes with the epoch (and is announced
                    // in the prepare or ack that follows); the peer's is what it announced
                    // for the epoch, else the last one it announced.
                    // (In this session; before any announcement, the hello's key.)
                    let remote = k
                        .remote_wg
                        .get(&epoch)
                        .or_else(|| k.remote_wg.values().next_back())
                        .copied();
                    table.bind_wg_keys(&peer.name, session_id, epoch, Some(l), remote);
                    k.local_wg.insert(epoch, l);
                }
            }
            shared.apply_now().map_err(|e| {
                End::Keys(format!("installing epoch {epoch}: {}", format_chain(&e)))
            })?;
            info!(peer = %peer.name, session = session_id, %epoch, %key_id, esp_spi_in = %format_args!("{spi_in:#010x}"), "inbound keys installed");
            shared.events.record(
                EventKind::KeyInstall,
                Detail::peer(&peer.name, format!("inbound keys, key id {key_id}")).epoch(epoch.0),
            );
            Ok(())
        }
        Effect::SwitchOutbound(epoch) => {
            let now = Instant::now();
            let grace = shared.config.rotation.grace_period;
            if !shared
                .table()
                .switch_outbound(&peer.name, session_id, epoch, now, grace)
            {
                return Err(End::Keys(format!("epoch {epoch} is not installed")));
            }
            shared.apply_now().map_err(|e| {
                End::Keys(format!("switching to epoch {epoch}: {}", format_chain(&e)))
            })?;
            k.tx_base = shared.peer_tx(&peer.name).map_or(0, |t| t.bytes);
            info!(peer = %peer.name, session = session_id, %epoch, "outbound switched to the new epoch");
            shared.events.record(
                EventKind::KeySwitch,
                Detail::peer(&peer.name, "outbound traffic now uses this epoch").epoch(epoch.0),
            );
            Ok(())
        }
        Effect::Retire(epoch) => {
            k.local_wg.remove(&epoch);
            k.remote_wg.remove(&epoch);
            if shared.table().retire(&peer.name, session_id, epoch) {
                // A failure here leaves an extra inbound key that the periodic reconcile
                // removes; it never breaks traffic.
                if let Err(e) = shared.apply_now() {
                    warn!(peer = %peer.name, %epoch, error = %format_chain(&e), "retiring keys failed; will retry");
                }
                info!(peer = %peer.name, session = session_id, %epoch, "old epoch retired");
                shared.events.record(
                    EventKind::KeyRetire,
                    Detail::peer(
                        &peer.name,
                        format!(
                            "old epoch's keys removed after the grace period, once no packet had arrived under them for {}",
                            humantime::format_duration(crate::app::RETIRE_HOLD.quiet)
                        ),
                    )
                    .epoch(epoch.0),
                );
            }
            Ok(())
        }
    }
}
