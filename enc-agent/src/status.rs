//! The status API: HTTP/1.1 + JSON on a Unix socket, read by `encctl`.
//!
//! The socket is created with mode 0660 so that only root (and the socket's group) can read
//! peer state. Answers carry public values only: names, addresses, certificate metadata,
//! public keys, key ids and counters; never key material.

use crate::Error;
use crate::app::Shared;
use crate::backend::Crypto;
use crate::peers::{Auth, PeerEntry};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use enc_api::{
    ApiError, AuthState, CertSummary, ControlInfo, DatapathCounters, DatapathInfo, EncryptionInfo,
    IpsecInboundInfo, IpsecInfo, IpsecPeerInfo, KeyInfo, NodeInfo, PeerCounts, PeerInfo, Peers,
    Status, WgPeerInfo,
};
use enc_certs::CertInfo;
use enc_ipsec::IpsecPeerSnapshot;
use enc_tunnel_ebpf::{AttachMode, PeerCounters};
use enc_wireguard::DeviceSnapshot;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
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
        .fallback(not_found)
        .with_state(shared)
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ApiError {
            error: "no such endpoint".into(),
        }),
    )
        .into_response()
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
    }
}

fn hex(spi: u32) -> String {
    format!("{spi:#010x}")
}

fn ipsec_peer(e: &PeerEntry, snaps: &[IpsecPeerSnapshot]) -> Option<IpsecPeerInfo> {
    let k = e.keys.as_ref()?;
    if k.wg.is_some() {
        return None;
    }
    let snap = snaps.iter().find(|s| s.peer_id == e.id);
    Some(IpsecPeerInfo {
        out_spi: snap.map(|s| hex(s.out_spi)).unwrap_or_default(),
        expected_out_spi: hex(k.keys.esp_out.spi),
        out_seq: snap.map_or(0, |s| s.out_seq),
        seq_headroom: u64::MAX - snap.map_or(0, |s| s.out_seq),
        tx_packets: snap.map_or(0, |s| s.tx_packets),
        tx_bytes: snap.map_or(0, |s| s.tx_bytes),
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
        expected_in_spis: vec![hex(k.keys.esp_in.spi)],
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

fn ipsec_info(shared: &Shared, snap: &Snapshot) -> Option<IpsecInfo> {
    let Crypto::Ipsec(_) = &shared.crypto else {
        return None;
    };
    let snaps = match snap {
        Snapshot::Ipsec(s) => s.as_slice(),
        _ => &[],
    };
    let mut info = IpsecInfo::default();
    for e in shared.table().iter() {
        if let Some(p) = ipsec_peer(e, snaps) {
            info.keys_expected += 1 + p.expected_in_spis.len();
            info.keys_in_use += usize::from(p.out_spi == p.expected_out_spi)
                + p.inbound
                    .iter()
                    .filter(|i| p.expected_in_spis.contains(&i.spi))
                    .count();
        }
    }
    match enc_ipsec::xfrm::xfrm_stat() {
        Ok(stats) => info.xfrm_stat = stats.into_iter().collect(),
        Err(e) => tracing::debug!(error = %e, "no /proc/net/xfrm_stat"),
    }
    Some(info)
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

/// Builds the status answer.
pub fn build_status(shared: &Shared) -> Status {
    let mut totals = DatapathCounters::default();
    for c in counters(shared).values() {
        add(&mut totals, &api_counters(c));
    }
    let mut counts = PeerCounts::default();
    for e in shared.table().iter() {
        counts.total += 1;
        match e.auth {
            Auth::Pending(_) => counts.pending += 1,
            Auth::Authenticated => counts.authenticated += 1,
            Auth::Failed(_) => counts.failed += 1,
        }
    }
    let snap = snapshot(shared);
    let (listen_port, public_key) = match &shared.crypto {
        Crypto::Wireguard(wg) => (Some(wg.listen_port()), Some(wg.public_key().to_string())),
        Crypto::Ipsec(_) => (None, None),
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
            ipsec: ipsec_info(shared, &snap),
        },
        control: ControlInfo {
            listen: shared.config.control.listen.to_string(),
            dial_rule: "the node whose name sorts first dials".into(),
        },
        certificate: summary(shared.identity.info()),
        peers: counts,
        datapath: DatapathInfo {
            attach_mode: match shared.dp.attach_mode() {
                AttachMode::Tcx => "tcx".into(),
                AttachMode::Clsact => "clsact".into(),
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
    }
}

fn peer_info(
    e: &PeerEntry,
    snap: &Snapshot,
    counters: &BTreeMap<u16, PeerCounters>,
    now: Instant,
) -> PeerInfo {
    let wireguard = e.keys.as_ref().and_then(|k| {
        let (key, _) = k.wg?;
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
        certificate: e.cert.as_ref().map(summary),
        key: e.keys.as_ref().map(|k| KeyInfo {
            epoch: k.keys.epoch.0,
            key_id: k.keys.key_id.clone(),
        }),
        wireguard,
        ipsec: match snap {
            Snapshot::Ipsec(s) => ipsec_peer(e, s),
            _ => None,
        },
        datapath_id: e.id,
        counters: counters.get(&e.id).map(api_counters).unwrap_or_default(),
    }
}

/// Builds the peers answer.
pub fn build_peers(shared: &Shared) -> Peers {
    let snap = snapshot(shared);
    let counters = counters(shared);
    let now = Instant::now();
    Peers {
        peers: shared
            .table()
            .iter()
            .map(|e| peer_info(e, &snap, &counters, now))
            .collect(),
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Status> {
    Json(build_status(&shared))
}

async fn peers(State(shared): State<Arc<Shared>>) -> Json<Peers> {
    Json(build_peers(&shared))
}
