//! The status API: HTTP/1.1 + JSON on a Unix socket, read by `encctl`.
//!
//! The socket is created with mode 0660 so that only root (and the socket's group) can read
//! peer state. Answers carry public values only: names, addresses, certificate metadata,
//! public keys, key ids, SPIs and counters; never key material.
//!
//! `POST /v1/rotate` is the only call that changes anything: it starts a key rotation.

use crate::Error;
use crate::app::Shared;
use crate::backend::Crypto;
use crate::peers::{Auth, PeerEntry, RotationView};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use enc_api::{
    ApiError, AuthState, CertSummary, ControlInfo, DatapathCounters, DatapathInfo, EncryptionInfo,
    IpsecInboundInfo, IpsecInfo, IpsecPeerInfo, KeyInfo, KeysSummary, NodeInfo, PeerCounts,
    PeerInfo, Peers, RotateRequest, RotateResponse, RotationInfo, Status, WgPeerInfo,
};
use enc_certs::CertInfo;
use enc_ipsec::IpsecPeerSnapshot;
use enc_key_manager::rotation::{Phase, Side};
use enc_tunnel_ebpf::{AttachMode, PeerCounters};
use enc_wireguard::{DeviceSnapshot, PublicKey};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::net::UnixListener;
use tracing::warn;

/// Binds the status socket, replacing a stale socket file but refusing to take over one that
/// another agent still serves.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(Error::io(format!("create directory {}", dir.display())))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Io {
                context: format!(
                    "status socket {} is served by another agent",
                    path.display()
                ),
                source: std::io::ErrorKind::AddrInUse.into(),
            });
        }
        std::fs::remove_file(path)
            .map_err(Error::io(format!("remove stale socket {}", path.display())))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(Error::io(format!("bind status socket {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(Error::io(format!("chmod status socket {}", path.display())))?;
    Ok(listener)
}

/// Serves the API until the task is cancelled.
pub async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    if let Err(e) = axum::serve(listener, router(shared)).await {
        warn!(error = %e, "status API stopped");
    }
}

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(enc_api::STATUS_PATH, get(status))
        .route(enc_api::PEERS_PATH, get(peers))
        .route(enc_api::ROTATE_PATH, post(rotate))
        .route(enc_api::EVENTS_PATH, get(events))
        .route(enc_api::CRL_PATH, post(crl))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

fn api_error(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError { error })).into_response()
}

async fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "no such endpoint".into())
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let allowed = if uri.path() == enc_api::ROTATE_PATH {
        "POST"
    } else {
        "GET"
    };
    api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}; use {allowed}", uri.path()),
    )
}

fn summary(c: &CertInfo) -> CertSummary {
    CertSummary {
        subject: c.subject.clone(),
        serial: c.serial.clone(),
        issuer: c.issuer.clone(),
        not_after: c
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| c.not_after.to_string()),
        sha256_fingerprint: c.sha256_fingerprint.clone(),
    }
}

/// What the encryption backend reports, read once per API call.
enum Snapshot {
    Wireguard(DeviceSnapshot),
    Ipsec(Vec<IpsecPeerSnapshot>),
    Unavailable,
}

fn snapshot(shared: &Shared) -> Snapshot {
    match &shared.crypto {
        Crypto::Wireguard(wg) => match wg.dump() {
            Ok(s) => Snapshot::Wireguard(s),
            Err(e) => {
                warn!(error = %e, "cannot read WireGuard state for status");
                Snapshot::Unavailable
            }
        },
        Crypto::Ipsec(ipsec) => match ipsec.peers() {
            Ok(s) => Snapshot::Ipsec(s),
            Err(e) => {
                warn!(error = %e, "cannot read IPsec state for status");
                Snapshot::Unavailable
            }
        },
        Crypto::None => Snapshot::Unavailable,
    }
}

fn hex(spi: u32) -> String {
    format!("{spi:#010x}")
}

/// The peer's WireGuard public key as the datapath holds it: the one bound to the outbound
/// epoch, or the one the session's hello announced (`None`: not a WireGuard peer).
fn wg_peer_key(e: &PeerEntry) -> Option<PublicKey> {
    let (hello, _) = e.keys.as_ref()?.wg?;
    Some(
        e.outbound
            .and_then(|o| e.wg_keys.get(&o))
            .map_or(hello, |(_, remote)| *remote),
    )
}

/// IPsec state of a peer that has an outbound epoch in an IPsec session.
fn ipsec_peer(e: &PeerEntry, snaps: &[IpsecPeerSnapshot]) -> Option<IpsecPeerInfo> {
    let out = e.outbound_keys()?;
    if e.keys.as_ref().is_some_and(|k| k.wg.is_some()) {
        return None;
    }
    let snap = snaps.iter().find(|s| s.peer_id == e.id);
    Some(IpsecPeerInfo {
        out_spi: snap.map(|s| hex(s.out_spi)).unwrap_or_default(),
        expected_out_spi: hex(out.esp_out.spi),
        out_seq: snap.map_or(0, |s| s.out_seq),
        seq_headroom: u64::MAX - snap.map_or(0, |s| s.out_seq),
        tx_packets: snap.map_or(0, |s| s.tx_packets),
        tx_bytes: snap.map_or(0, |s| s.tx_bytes),
        rx_packets: snap.map_or(0, |s| s.rx_packets),
        rx_bytes: snap.map_or(0, |s| s.rx_bytes),
        inbound: snap
            .map(|s| {
                s.inbound
                    .iter()
                    .map(|i| IpsecInboundInfo {
                        spi: hex(i.spi),
                        highest_seq: i.highest_seq,
                        packets: i.packets,
                        bytes: i.bytes,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        expected_in_spis: e.epochs.values().map(|k| hex(k.esp_in.spi)).collect(),
        drops: snap
            .map(|s| {
                s.drops
                    .iter()
                    .map(|(r, n)| (r.label().to_owned(), *n))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Keys installed for one peer against keys expected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct KeyUse {
    in_use: usize,
    expected: usize,
}

/// The keys a peer calls for and those the datapath holds; `None` for a peer that calls for
/// none (no outbound epoch yet, or authentication failed).
///
/// IPsec: the outbound SA plus one inbound SA per installed epoch. WireGuard: one peer with
/// its preshared key (the device keeps a single one per peer).
fn key_use(e: &PeerEntry, snap: &Snapshot) -> Option<KeyUse> {
    if matches!(e.auth, Auth::Failed(_)) {
        return None;
    }
    e.outbound_keys()?;
    if let Some(key) = wg_peer_key(e) {
        let present = match snap {
            Snapshot::Wireguard(dev) => dev
                .peers
                .iter()
                .any(|p| p.public_key == key && p.has_preshared_key),
            _ => false,
        };
        return Some(KeyUse {
            in_use: usize::from(present),
            expected: 1,
        });
    }
    let snaps = match snap {
        Snapshot::Ipsec(s) => s.as_slice(),
        _ => &[],
    };
    let p = ipsec_peer(e, snaps)?;
    Some(KeyUse {
        in_use: usize::from(p.out_spi == p.expected_out_spi)
            + p.inbound
                .iter()
                .filter(|i| p.expected_in_spis.contains(&i.spi))
                .count(),
        expected: 1 + p.expected_in_spis.len(),
    })
}

/// The `keys` part of the status: keys in use against expected, and rotations.
fn keys_summary<'a>(
    entries: impl IntoIterator<Item = &'a PeerEntry>,
    snap: &Snapshot,
    interval: Option<Duration>,
) -> KeysSummary {
    let mut k = KeysSummary {
        in_use: 0,
        expected: 0,
        rotations_in_progress: 0,
        stuck_peers: Vec::new(),
        rotation_interval_seconds: interval.map(|d| d.as_secs()),
    };
    for e in entries {
        if let Some(u) = key_use(e, snap) {
            k.in_use += u.in_use;
            k.expected += u.expected;
        }
        if let Some(r) = &e.rotation {
            if r.progress.phase != Phase::Idle {
                k.rotations_in_progress += 1;
            }
            if r.progress.stuck_since.is_some() {
                k.stuck_peers.push(e.config.name.clone());
            }
        }
    }
    k
}

fn ipsec_info<'a>(
    shared: &Shared,
    entries: impl IntoIterator<Item = &'a PeerEntry>,
    snap: &Snapshot,
) -> Option<IpsecInfo> {
    let Crypto::Ipsec(_) = &shared.crypto else {
        return None;
    };
    let mut info = IpsecInfo::default();
    for u in entries.into_iter().filter_map(|e| key_use(e, snap)) {
        info.keys_in_use += u.in_use;
        info.keys_expected += u.expected;
    }
    match enc_ipsec::xfrm::xfrm_stat() {
        Ok(stats) => info.xfrm_stat = stats.into_iter().collect(),
        Err(e) => tracing::debug!(error = %e, "no /proc/net/xfrm_stat"),
    }
    Some(info)
}

/// The `deviceDrops` part of the status: [`Crypto::device_drops`].
pub(crate) fn device_drops(crypto: &Crypto) -> BTreeMap<String, u64> {
    crypto
        .device_drops()
        .into_iter()
        .map(|(reason, n)| (reason.to_owned(), n))
        .collect()
}

fn counters(shared: &Shared) -> BTreeMap<u16, PeerCounters> {
    shared.dp.counters().unwrap_or_else(|e| {
        warn!(error = %e, "cannot read datapath counters for status");
        BTreeMap::new()
    })
}

fn api_counters(c: &PeerCounters) -> DatapathCounters {
    DatapathCounters {
        steered_packets: c.steered_packets,
        steered_bytes: c.steered_bytes,
        drops: c
            .drops
            .iter()
            .map(|(r, n)| (r.label().to_owned(), *n))
            .collect(),
        leak_packets: c.leak_packets,
        leak_bytes: c.leak_bytes,
    }
}

fn add(total: &mut DatapathCounters, c: &DatapathCounters) {
    total.steered_packets += c.steered_packets;
    total.steered_bytes += c.steered_bytes;
    total.leak_packets += c.leak_packets;
    total.leak_bytes += c.leak_bytes;
    for (k, v) in &c.drops {
        *total.drops.entry(k.clone()).or_default() += v;
    }
}

/// The renewal part of the status.
pub fn renewal_info(r: &crate::app::RenewalState) -> enc_api::RenewalInfo {
    let rfc = |t: std::time::SystemTime| {
        let t = time::OffsetDateTime::from(t);
        t.replace_nanosecond(0)
            .unwrap_or(t)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    enc_api::RenewalInfo {
        issuer: r.issuer.clone(),
        next_attempt: rfc(r.schedule.next()),
        next_attempt_seconds: r.schedule.until_due(std::time::SystemTime::now()).as_secs(),
        renewals: r.renewals,
        last_renewal: r.last_renewal.map(rfc),
        failures: r.schedule.failures(),
        last_error: r.schedule.last_error().map(str::to_owned),
    }
}

/// Builds the status answer.
pub fn build_status(shared: &Shared) -> Status {
    let mut totals = DatapathCounters::default();
    for c in counters(shared).values() {
        add(&mut totals, &api_counters(c));
    }
    let snap = snapshot(shared);
    let mut counts = PeerCounts::default();
    let (keys, ipsec) = {
        let table = shared.table();
        for e in table.iter() {
            counts.total += 1;
            match e.auth {
                Auth::Pending(_) => counts.pending += 1,
                Auth::Authenticated => counts.authenticated += 1,
                Auth::Failed(_) => counts.failed += 1,
            }
        }
        (
            keys_summary(table.iter(), &snap, shared.config.rotation.interval),
            ipsec_info(shared, table.iter(), &snap),
        )
    };
    let (listen_port, public_key) = match &shared.crypto {
        Crypto::Wireguard(wg) => (Some(wg.listen_port()), Some(wg.public_key().to_string())),
        Crypto::Ipsec(_) | Crypto::None => (None, None),
    };
    let overlay = shared.config.tunnel.overlay();
    let inner = match overlay {
        Some((kind, _)) => format!("{kind}(pod)"),
        None => "pod".to_owned(),
    };
    let network = enc_api::NetworkInfo {
        tunnel: shared.config.tunnel.name().into(),
        overlay_device: overlay.map(|(_, o)| o.interface.clone()),
        overlay_port: overlay.map(|(_, o)| o.port),
        vni: overlay.map(|(_, o)| o.vni),
        stack: match &shared.crypto {
            Crypto::None => inner,
            c => format!("{}({inner})", c.type_name()),
        },
        underlay_mtu: shared.mtu_plan.underlay,
        encryption_mtu: shared.mtu_plan.encryption,
        overlay_mtu: shared.mtu_plan.overlay,
        pod_mtu: shared.mtu_plan.pod,
    };
    Status {
        node: NodeInfo {
            name: shared.config.node.name.clone(),
            underlay_address: shared.config.node.underlay_address,
            pod_cidr: shared.config.node.pod_cidr.to_string(),
        },
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: shared.started.elapsed().as_secs(),
        encryption: EncryptionInfo {
            kind: shared.crypto.type_name().into(),
            backend: shared.crypto.implementation().into(),
            backend_reason: shared.backend_reason.clone(),
            interface: shared.route_device.clone(),
            listen_port,
            public_key,
            mtu: shared.mtu,
            ipsec,
            device_drops: device_drops(&shared.crypto),
        },
        control: ControlInfo {
            listen: shared.config.control.listen.to_string(),
            dial_rule: "the node whose name sorts first dials".into(),
        },
        certificate: summary(shared.identity().info()),
        peers: counts,
        datapath: DatapathInfo {
            attach_mode: match (&shared.crypto, shared.dp.attach_mode()) {
                (Crypto::None, _) => "off".into(),
                (_, AttachMode::Tcx) => "tcx".into(),
                (_, AttachMode::Clsact) => "clsact".into(),
            },
            strict_mode: shared.config.strict_mode,
            underlay_interface: shared.config.underlay_interface.clone(),
            pod_interfaces: shared
                .pod_interfaces
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            pin_dir: shared.config.datapath.bpf_pin_dir.display().to_string(),
            totals,
        },
        keys,
        network,
        expiry: expiry_info(shared),
        renewal: shared.renewal_state().map(|r| renewal_info(&r)),
        issuer: shared.config.issuer.as_ref().map(|c| {
            use std::sync::atomic::Ordering::Relaxed;
            let st = shared.issuer_stats();
            enc_api::IssuerInfo {
                listen: c.listen.to_string(),
                cert_lifetime_seconds: c.cert_lifetime.as_secs(),
                enrolled: st.enrolled.load(Relaxed),
                renewed: st.renewed.load(Relaxed),
                refused: st.refused.load(Relaxed),
            }
        }),
    }
}

/// Whether a certificate valid from `not_before` to `not_after` has 20% or less of its
/// lifetime left at `now`.
pub fn near_expiry(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    let lifetime = not_after - not_before;
    now >= not_after - lifetime * 0.2
}

fn expiry_info(shared: &Shared) -> enc_api::ExpiryInfo {
    let now = OffsetDateTime::now_utc();
    let id = shared.identity();
    let own = id.info();
    let mut certs: Vec<(String, OffsetDateTime, OffsetDateTime)> = vec![(
        shared.config.node.name.clone(),
        own.not_before,
        own.not_after,
    )];
    certs.extend(shared.table().iter().filter_map(|e| {
        e.cert
            .as_ref()
            .map(|c| (e.config.name.clone(), c.not_before, c.not_after))
    }));
    let rfc = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    let expiring = certs
        .iter()
        .filter(|(_, nb, na)| near_expiry(*nb, *na, now))
        .map(|(n, _, _)| n.clone())
        .collect();
    let soonest = certs
        .iter()
        .min_by_key(|(_, _, na)| *na)
        .cloned()
        .unwrap_or((
            shared.config.node.name.clone(),
            own.not_before,
            own.not_after,
        ));
    enc_api::ExpiryInfo {
        node_not_after: rfc(own.not_after),
        soonest_node: soonest.0,
        soonest_not_after: rfc(soonest.2),
        soonest_seconds_left: (soonest.2 - now).whole_seconds(),
        expiring,
    }
}

/// What the peer is waiting for in a stuck phase.
fn stuck_wait(side: Side, phase: Phase) -> &'static str {
    match (side, phase) {
        (Side::Leader, Phase::Prepared) => "no ack",
        (Side::Follower, Phase::Prepared) => "no commit",
        (Side::Leader, Phase::Acked) => "no confirmation",
        (_, Phase::Requested) => "leader has not started it",
        _ => "no progress",
    }
}

/// The rotation state of a peer for the API. `now` and `wall_now` are the same moment on the
/// monotonic and the wall clock; instants are shown as wall-clock times (UTC, RFC 3339).
fn rotation_info(v: &RotationView, now: Instant, wall_now: OffsetDateTime) -> RotationInfo {
    let p = &v.progress;
    let age = |since: Instant| now.saturating_duration_since(since).as_secs();
    let stuck = p.stuck_since.map(|since| {
        let ago = now.saturating_duration_since(since);
        let at = (wall_now - ago)
            .to_offset(time::UtcOffset::UTC)
            .replace_nanosecond(0)
            .unwrap_or(wall_now);
        let at = at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| at.to_string());
        format!(
            "rotation stuck: {} since {at} ({}s)",
            stuck_wait(v.side, p.phase),
            ago.as_secs()
        )
    });
    RotationInfo {
        side: match v.side {
            Side::Leader => "leader",
            Side::Follower => "follower",
        }
        .to_owned(),
        outbound_epoch: p.outbound.map(|e| e.0),
        inbound_epochs: p.inbound.iter().map(|e| e.0).collect(),
        phase: p.phase.as_str().to_owned(),
        target_epoch: p.target.map(|e| e.0),
        phase_age_seconds: p.phase_since.map(age),
        stuck,
        completed: p.completed,
        last_completed_epoch: p.last_completed.map(|(e, _)| e.0),
        last_completed_seconds_ago: p.last_completed.map(|(_, at)| age(at)),
    }
}

fn peer_info(
    e: &PeerEntry,
    snap: &Snapshot,
    counters: &BTreeMap<u16, PeerCounters>,
    now: Instant,
    wall_now: OffsetDateTime,
) -> PeerInfo {
    let wireguard = wg_peer_key(e).and_then(|key| {
        let Snapshot::Wireguard(dev) = snap else {
            return None;
        };
        let p = dev.peers.iter().find(|p| p.public_key == key)?;
        Some(WgPeerInfo {
            public_key: p.public_key.to_string(),
            endpoint: p.endpoint.map(|e| e.to_string()),
            last_handshake_seconds: p.last_handshake.map(|d| d.as_secs()),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        })
    });
    PeerInfo {
        name: e.config.name.clone(),
        address: e.config.underlay_address,
        pod_cidr: e.config.pod_cidr.to_string(),
        role: e.role.as_str().to_owned(),
        auth: match &e.auth {
            Auth::Pending(d) => AuthState::Pending { detail: d.clone() },
            Auth::Authenticated => AuthState::Authenticated,
            Auth::Failed(r) => AuthState::Failed { reason: r.clone() },
        },
        state_age_seconds: now.saturating_duration_since(e.since).as_secs(),
        failures: e.failures,
        last_success_seconds: e
            .last_success
            .map(|t| now.saturating_duration_since(t).as_secs()),
        last_failure: e
            .last_failure
            .as_ref()
            .map(|(t, reason)| enc_api::FailureInfo {
                reason: reason.clone(),
                age_seconds: now.saturating_duration_since(*t).as_secs(),
            }),
        certificate: e.cert.as_ref().map(summary),
        key: e.outbound_keys().map(|k| KeyInfo {
            epoch: k.epoch.0,
            key_id: k.key_id.clone(),
        }),
        wireguard,
        ipsec: match snap {
            Snapshot::Ipsec(s) => ipsec_peer(e, s),
            _ => None,
        },
        rotation: e.rotation.as_ref().map(|v| rotation_info(v, now, wall_now)),
        datapath_id: e.id,
        counters: counters.get(&e.id).map(api_counters).unwrap_or_default(),
    }
}

/// Builds the peers answer.
pub fn build_peers(shared: &Shared) -> Peers {
    let snap = snapshot(shared);
    let counters = counters(shared);
    let now = Instant::now();
    let wall_now = OffsetDateTime::now_utc();
    Peers {
        peers: shared
            .table()
            .iter()
            .map(|e| peer_info(e, &snap, &counters, now, wall_now))
            .collect(),
    }
}

/// `?after=N&limit=M` of the events endpoint.
#[derive(Debug, PartialEq, Eq)]
struct EventsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(shared): State<Arc<Shared>>, uri: axum::http::Uri) -> Response {
    let query = uri.query().unwrap_or("");
    match parse_events_query(query) {
        Ok(q) => Json(
            shared
                .events
                .since(q.after.unwrap_or(0), q.limit.unwrap_or(1000).min(10_000)),
        )
        .into_response(),
        Err(reason) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": format!("query {query:?}: {reason}") })),
        )
            .into_response(),
    }
}

/// Parses `after=N&limit=M` (the only query the API takes), naming a bad key or value.
fn parse_events_query(query: &str) -> Result<EventsQuery, String> {
    let mut q = EventsQuery {
        after: None,
        limit: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n = || {
            v.parse::<u64>()
                .map_err(|_| format!("{k} must be a non-negative integer, got {v:?}"))
        };
        match k {
            "after" => q.after = Some(n()?),
            "limit" => q.limit = Some(n()? as usize),
            other => return Err(format!("unknown parameter {other:?} (after, limit)")),
        }
    }
    Ok(q)
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Status> {
    Json(build_status(&shared))
}

async fn peers(State(shared): State<Arc<Shared>>) -> Json<Peers> {
    Json(build_peers(&shared))
}

/// Parses the body of `POST /v1/rotate`; an empty body asks for every authenticated peer,
/// like `{}`.
fn rotate_request(body: &[u8]) -> Result<RotateRequest, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RotateRequest::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        format!("invalid rotate request (expected {{\"peer\": \"NAME\"}} or {{}}): {e}")
    })
}

/// `POST /v1/crl`: an operator offers a revocation list.
async fn crl(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: enc_api::CrlPush = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid revocation-list push (expected {{\"pem\": \"-----BEGIN X509 CRL-----...\"}}): {e}"
                ),
            );
        }
    };
    match shared.offer_crl(&req.pem, "an operator (encctl crl push)") {
        Ok((offer, number)) => {
            let held = shared.revocations_message().map_or(0, |r| r.number);
            let revoked_peers = shared
                .table()
                .iter()
                .filter(|e| {
                    e.cert
                        .as_ref()
                        .is_some_and(|c| shared.is_revoked(&c.serial))
                })
                .map(|e| e.config.name.clone())
                .collect();
            Json(enc_api::CrlPushed {
                outcome: match offer {
                    crate::app::Offer::Adopted => "adopted",
                    crate::app::Offer::Same => "same",
                    crate::app::Offer::Older => "older",
                }
                .into(),
                number,
                held,
                revoked_peers,
            })
            .into_response()
        }
        Err(reason) => api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("revocation list refused: {reason}"),
        ),
    }
}

/// `POST /v1/rotate`: starts a rotation with one peer or every authenticated one.
async fn rotate(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req = match rotate_request(&body) {
        Ok(r) => r,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, e),
    };
    match shared.request_rotation(req.peer.as_deref()).await {
        Ok(mut rotations) => {
            rotations.sort_by(|a, b| a.peer.cmp(&b.peer));
            Json(RotateResponse { rotations }).into_response()
        }
        Err(refusal) => api_error(
            StatusCode::from_u16(refusal.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            refusal.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::peers::{PeerTable, SessionKeys};
    use enc_ipsec::InboundSaSnapshot;
    use enc_key_manager::rotation::Progress;
    use enc_key_manager::{Epoch, Pair, PairKeys, SessionSecret};

    #[test]
    fn near_expiry_is_the_last_fifth_of_the_lifetime() {
        use time::macros::datetime;
        let nb = datetime!(2026-01-01 00:00 UTC);
        let na = datetime!(2026-01-11 00:00 UTC);
        assert!(!near_expiry(nb, na, datetime!(2026-01-08 23:59 UTC)));
        assert!(near_expiry(nb, na, datetime!(2026-01-09 00:00 UTC)));
        assert!(near_expiry(nb, na, datetime!(2026-01-12 00:00 UTC)));
    }

    #[test]
    fn events_query_names_bad_input() {
        assert_eq!(
            parse_events_query("after=5&limit=2"),
            Ok(EventsQuery {
                after: Some(5),
                limit: Some(2)
            })
        );
        assert_eq!(
            parse_events_query(""),
            Ok(EventsQuery {
                after: None,
                limit: None
            })
        );
        let e = parse_events_query("after=-1").unwrap_err();
        assert!(e.contains("after") && e.contains("-1"), "{e}");
        let e = parse_events_query("since=3").unwrap_err();
        assert!(e.contains("since"), "{e}");
    }

    fn table(now: Instant) -> PeerTable {
        let d = tempfile::tempdir().unwrap();
        for f in ["c", "k", "ca"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let text = r#"
node: { name: node-2, underlayAddress: 10.0.0.2, podCidr: 10.244.2.0/24 }
tls: { cert: c, key: k, ca: ca }
encryption: { type: ipsec }
peers:
  - { name: node-1, underlayAddress: 10.0.0.1, podCidr: 10.244.1.0/24 }
  - { name: node-3, underlayAddress: 10.0.0.3, podCidr: 10.244.3.0/24 }
"#;
        let config = Config::parse(text, &d.path().join("a.yaml")).unwrap();
        PeerTable::new(&config, now)
    }

    fn pair_keys(peer: &str, epoch: u32) -> PairKeys {
        PairKeys::derive(
            &SessionSecret::from_bytes([7; 32]),
            Epoch(epoch),
            &Pair::new(peer, "node-2").unwrap(),
            "node-2",
        )
        .unwrap()
    }

    /// Authenticates `peer` (IPsec unless `wg`) and switches it to epoch 1, with epoch 2
    /// prepared.
    fn establish(t: &mut PeerTable, peer: &str, now: Instant, wg: Option<PublicKey>) {
        t.authenticated(
            peer,
            now,
            None,
            SessionKeys {
                session_id: 1,
                wg: wg.map(|k| (k, 51820)),
            },
        );
        assert!(t.install_inbound(peer, 1, pair_keys(peer, 1)));
        assert!(t.switch_outbound(peer, 1, Epoch(1), now, Duration::from_secs(10)));
        assert!(t.install_inbound(peer, 1, pair_keys(peer, 2)));
    }

    fn progress(phase: Phase, stuck_since: Option<Instant>) -> Progress {
        Progress {
            outbound: Some(Epoch(1)),
            inbound: vec![Epoch(1), Epoch(2)],
            target: (phase != Phase::Idle).then_some(Epoch(2)),
            phase,
            phase_since: stuck_since,
            stuck_since,
            completed: 0,
            last_completed: None,
        }
    }

    #[test]
    fn stuck_text_names_what_is_awaited_and_since_when() {
        let now = Instant::now();
        let wall = time::macros::datetime!(2026-11-22 08:40:13.5 UTC);
        let since = now.checked_sub(Duration::from_secs(12)).unwrap();
        for (side, phase, want) in [
            (Side::Leader, Phase::Prepared, "no ack"),
            (Side::Follower, Phase::Prepared, "no commit"),
            (Side::Leader, Phase::Acked, "no confirmation"),
            (
                Side::Follower,
                Phase::Requested,
                "leader has not started it",
            ),
        ] {
            let v = RotationView {
                side,
                progress: progress(phase, Some(since)),
            };
            let r = rotation_info(&v, now, wall);
            assert_eq!(
                r.stuck.as_deref(),
                Some(format!("rotation stuck: {want} since 2026-11-22T08:40:01Z (12s)").as_str())
            );
            // The metrics read the time back from this text.
            assert_eq!(
                crate::metrics::stuck_since(r.stuck.as_deref().unwrap_or_default()),
                Some(1_795_336_801)
            );
            assert_eq!(r.phase, phase.as_str());
            assert_eq!(r.phase_age_seconds, Some(12));
        }
        let v = RotationView {
            side: Side::Leader,
            progress: Progress {
                completed: 3,
                last_completed: Some((Epoch(1), since)),
                ..progress(Phase::Idle, None)
            },
        };
        let r = rotation_info(&v, now, wall);
        assert_eq!(r.side, "leader");
        assert_eq!(r.stuck, None);
        assert_eq!(r.target_epoch, None);
        assert_eq!(r.outbound_epoch, Some(1));
        assert_eq!(r.inbound_epochs, [1, 2]);
        assert_eq!(r.last_completed_epoch, Some(1));
        assert_eq!(r.last_completed_seconds_ago, Some(12));
    }

    #[test]
    fn ipsec_keys_count_outbound_and_every_inbound_epoch() {
        let now = Instant::now();
        let mut t = table(now);
        establish(&mut t, "node-1", now, None);
        let e = t.get("node-1").unwrap();
        let (k1, k2) = (pair_keys("node-1", 1), pair_keys("node-1", 2));
        let inbound = |spi| InboundSaSnapshot {
            spi,
            highest_seq: 0,
            packets: 0,
            bytes: 0,
        };
        let snap = Snapshot::Ipsec(vec![IpsecPeerSnapshot {
            peer_id: e.id,
            out_spi: k1.esp_out.spi,
            out_seq: 5,
            tx_packets: 5,
            tx_bytes: 500,
            rx_packets: 0,
            rx_bytes: 0,
            inbound: vec![inbound(k1.esp_in.spi), inbound(0xdead_beef)],
            drops: Vec::new(),
        }]);
        let Snapshot::Ipsec(snaps) = &snap else {
            unreachable!()
        };
        let p = ipsec_peer(e, snaps).unwrap();
        assert_eq!(p.expected_out_spi, hex(k1.esp_out.spi));
        assert_eq!(p.expected_in_spis, [hex(k1.esp_in.spi), hex(k2.esp_in.spi)]);
        // Outbound plus epoch 1's inbound; epoch 2's is missing, the stray SPI does not count.
        assert_eq!(
            key_use(e, &snap),
            Some(KeyUse {
                in_use: 2,
                expected: 3
            })
        );
        let info = peer_info(e, &snap, &BTreeMap::new(), now, OffsetDateTime::now_utc());
        let key = info.key.unwrap();
        assert_eq!((key.epoch, key.key_id), (1, k1.key_id.clone()));
        // Unreadable backend: the same keys are expected, none seen.
        let k = keys_summary(
            t.iter(),
            &Snapshot::Unavailable,
            Some(Duration::from_secs(3600)),
        );
        assert_eq!((k.in_use, k.expected), (0, 3));
        assert_eq!(k.rotation_interval_seconds, Some(3600));
        // A failed peer expects nothing.
        t.auth_failed("node-1", now, "certificate expired".into());
        assert_eq!(key_use(t.get("node-1").unwrap(), &snap), None);
    }

    #[test]
    fn summary_counts_rotations_and_stuck_peers() {
        let now = Instant::now();
        let mut t = table(now);
        establish(&mut t, "node-1", now, None);
        establish(&mut t, "node-3", now, None);
        let since = now.checked_sub(Duration::from_secs(30)).unwrap();
        t.set_rotation(
            "node-1",
            1,
            RotationView {
                side: Side::Follower,
                progress: progress(Phase::Idle, None),
            },
        );
        t.set_rotation(
            "node-3",
            1,
            RotationView {
                side: Side::Leader,
                progress: progress(Phase::Prepared, Some(since)),
            },
        );
        let k = keys_summary(t.iter(), &Snapshot::Unavailable, None);
        assert_eq!(k.rotations_in_progress, 1);
        assert_eq!(k.stuck_peers, ["node-3"]);
        assert_eq!(k.expected, 6);
        assert_eq!(k.rotation_interval_seconds, None);
    }

    #[test]
    fn wireguard_expects_one_keyed_peer() {
        let now = Instant::now();
        let mut t = table(now);
        let key = PublicKey::from([9; 32]);
        establish(&mut t, "node-1", now, Some(key));
        let e = t.get("node-1").unwrap();
        assert!(ipsec_peer(e, &[]).is_none());
        let dev = |has_preshared_key| {
            Snapshot::Wireguard(DeviceSnapshot {
                ifname: "enc0".into(),
                public_key: PublicKey::from([1; 32]),
                listen_port: 51820,
                peers: vec![enc_wireguard::PeerSnapshot {
                    public_key: key,
                    local_key: PublicKey::from([1; 32]),
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    has_preshared_key,
                    generations: 1,
                    current_has_session: false,
                }],
            })
        };
        assert_eq!(
            key_use(e, &dev(true)),
            Some(KeyUse {
                in_use: 1,
                expected: 1
            })
        );
        assert_eq!(
            key_use(e, &dev(false)),
            Some(KeyUse {
                in_use: 0,
                expected: 1
            })
        );
        let info = peer_info(
            e,
            &dev(true),
            &BTreeMap::new(),
            now,
            OffsetDateTime::now_utc(),
        );
        assert!(info.wireguard.is_some() && info.ipsec.is_none());
    }

    #[test]
    fn rotate_request_bodies() {
        assert_eq!(rotate_request(b""), Ok(RotateRequest::default()));
        assert_eq!(rotate_request(b" {} "), Ok(RotateRequest::default()));
        assert_eq!(
            rotate_request(br#"{"peer":"node-1"}"#)
                .unwrap()
                .peer
                .as_deref(),
            Some("node-1")
        );
        let e = rotate_request(br#"{"peers":"node-1"}"#).unwrap_err();
        assert!(e.contains("unknown field `peers`"), "{e}");
        let e = rotate_request(b"node-1").unwrap_err();
        assert!(e.contains("invalid rotate request"), "{e}");
        let e = rotate_request(br#"{"peer":3}"#).unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
    }
}
