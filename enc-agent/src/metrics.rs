//! Prometheus metrics: `GET /metrics` on a TCP address (`metrics.listen`), in the text
//! exposition format 0.0.4.
//!
//! The exposition is rendered from the same [`Status`] and [`Peers`] answers the status API
//! serves ([`build_status`], [`build_peers`]), so the numbers agree with `encctl status` and
//! `encctl peers`. It is written by hand: a few dozen gauges and counters with fixed label
//! sets do not call for a client library. Every family is declared once in [`FAMILIES`], with
//! its type, help text and label names; `docs/metrics.md` documents each of them (a unit test
//! checks that none is missing there).
//!
//! Nothing here carries key material: names, states, epochs, counters and timestamps only.

use crate::Error;
use crate::app::Shared;
use crate::status::{build_peers, build_status};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use enc_api::{AuthState, Peers, Status};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;
use tracing::warn;

/// Path of the exposition.
pub const PATH: &str = "/metrics";
/// Content type of the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the metrics endpoint; the error names the config field and the address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(Error::io(format!(
        "bind metrics endpoint {addr} (metrics.listen)"
    )))
}

/// Serves the metrics until the task is cancelled.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    if let Err(e) = axum::serve(listener, router(shared)).await {
        warn!(error = %e, "metrics endpoint stopped");
    }
}

/// The endpoint's routes: [`PATH`] renders the agent's current state.
pub fn router(shared: Arc<Shared>) -> Router {
    routes(Arc::new(move || {
        render(&build_status(&shared), &build_peers(&shared))
    }))
}

/// What produces the exposition on each scrape.
type Source = Arc<dyn Fn() -> String + Send + Sync>;

fn routes(source: Source) -> Router {
    Router::new()
        .route(PATH, get(scrape))
        .fallback(not_found)
        .with_state(source)
}

async fn scrape(State(source): State<Source>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], source()).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found; metrics are at /metrics\n",
    )
        .into_response()
}

/// Type of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the agent, or the thing counted, restarts).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// A metric family: name, type, help text and the names of its labels, in order.
#[derive(Debug)]
pub struct Family {
    /// Metric name (prefix `enc_`; counters end in `_total`).
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Label names; every sample gives one value per name, in this order.
    pub labels: &'static [&'static str],
}

macro_rules! families {
    ($($id:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal;)*) => {
        $(
            static $id: Family = Family {
                name: $name,
                kind: Kind::$kind,
                help: $help,
                labels: &[$($label),*],
            };
        )*
        /// Every family the agent exposes (those without a sample in a scrape are left out of it).
        pub static FAMILIES: &[&Family] = &[$(&$id),*];
    };
}

families! {
    BUILD_INFO = "enc_build_info", Gauge, ["version", "encryption", "implementation"],
        "Agent version, encryption type and the implementation in use; always 1.";
    UPTIME = "enc_uptime_seconds", Gauge, [],
        "Seconds since the agent started.";
    TUNNEL_INFO = "enc_tunnel_info", Gauge, ["tunnel", "device", "stack"],
        "The overlay (vxlan, geneve, disabled), its device and the layers on the wire, outermost first; always 1.";
    MTU = "enc_mtu_bytes", Gauge, ["layer"],
        "MTU of each layer: underlay, encryption device, overlay device, and the pod routes (the largest pod packet that crosses unfragmented).";
    STRICT_MODE = "enc_strict_mode", Gauge, [],
        "1 if unauthenticated or unencrypted pod traffic is dropped, 0 if it is only counted.";
    PEERS = "enc_peers", Gauge, ["state"],
        "Expected peers by authentication state (pending, authenticated, failed).";
    KEYS_IN_USE = "enc_keys_in_use", Gauge, [],
        "Keys the datapath reports installed (IPsec: SAs; WireGuard: keyed peers).";
    KEYS_EXPECTED = "enc_keys_expected", Gauge, [],
        "Keys the authenticated sessions call for.";
    ROTATIONS_IN_PROGRESS = "enc_rotations_in_progress", Gauge, [],
        "Peers with a key rotation in progress.";
    ROTATION_STUCK_PEERS = "enc_rotation_stuck_peers", Gauge, [],
        "Peers whose key rotation waits on the peer longer than rotation.stuckAfter.";
    ROTATION_INTERVAL = "enc_rotation_interval_seconds", Gauge, [],
        "Scheduled key rotation interval (absent when the schedule is off).";
    CERT_SOONEST_EXPIRY = "enc_certificate_soonest_expiry_timestamp_seconds", Gauge, ["node"],
        "Expiry (Unix time) of the certificate that expires first, this node's or a peer's; the label names whose.";
    CERT_EXPIRING = "enc_certificates_expiring", Gauge, [],
        "Certificates (this node's and its peers') with 20% or less of their lifetime left.";
    CERT_EXPIRY = "enc_certificate_expiry_timestamp_seconds", Gauge, ["node"],
        "End of validity (Unix time) of this node's certificate and of the certificate each peer last presented.";
    RENEWAL_NEXT = "enc_certificate_renewal_next_timestamp_seconds", Gauge, [],
        "When (Unix time) the next automatic renewal attempt of this node's certificate is due (absent without tls.renewal).";
    RENEWALS = "enc_certificate_renewals_total", Counter, [],
        "Automatic renewals of this node's certificate completed since start.";
    RENEWAL_FAILURES = "enc_certificate_renewal_failures", Gauge, [],
        "Failed renewal attempts since the last success (0 when the last attempt succeeded).";
    ISSUED = "enc_issuer_certificates_issued_total", Counter, ["operation"],
        "Certificates the issuer role signed since start, by operation (enrol, renew).";
    ISSUE_REFUSED = "enc_issuer_requests_refused_total", Counter, [],
        "Requests the issuer role refused since start.";
    DEVICE_DROPS = "enc_device_drops_total", Counter, ["device", "implementation", "reason"],
        "Packets the userspace datapath (boringtun, userspace-esp) dropped or failed to handle that belong to no peer, by reason.";
    XFRM_ERRORS = "enc_xfrm_errors_total", Counter, ["counter"],
        "The kernel's XFRM error counters (/proc/net/xfrm_stat) of the node's network namespace.";
    PEER_AUTHENTICATED = "enc_peer_authenticated", Gauge, ["peer"],
        "1 if the peer is authenticated (mutual certificate check passed, keys derived), else 0.";
    PEER_AUTH_STATE = "enc_peer_auth_state", Gauge, ["peer", "state"],
        "1 for the peer's current authentication state (pending, authenticated, failed), 0 for the others.";
    PEER_AUTH_FAILURES = "enc_peer_auth_failures_total", Counter, ["peer"],
        "Failed authentication attempts with the peer since the agent started.";
    PEER_LAST_HANDSHAKE = "enc_peer_last_handshake_seconds", Gauge, ["peer"],
        "Seconds since the last WireGuard handshake with the peer (absent before the first).";
    PEER_TX_BYTES = "enc_peer_tx_bytes_total", Counter, ["peer"],
        "Bytes sent to the peer by the encryption backend (WireGuard datagrams; IPsec inner packets).";
    PEER_RX_BYTES = "enc_peer_rx_bytes_total", Counter, ["peer"],
        "Bytes received from the peer by the encryption backend (WireGuard datagrams; IPsec inner packets).";
    PEER_TX_PACKETS = "enc_peer_tx_packets_total", Counter, ["peer"],
        "Packets sent to the peer over ESP (IPsec only).";
    PEER_RX_PACKETS = "enc_peer_rx_packets_total", Counter, ["peer"],
        "Packets accepted from the peer over ESP (IPsec only).";
    PEER_ESP_OUT_SEQ = "enc_peer_esp_out_sequence", Gauge, ["peer"],
        "Highest ESP sequence number sent on the current outbound SA (IPsec only; restarts at each rotation).";
    PEER_STEERED_PACKETS = "enc_peer_steered_packets_total", Counter, ["peer"],
        "Pod packets the eBPF datapath marked and steered into encryption towards the peer.";
    PEER_STEERED_BYTES = "enc_peer_steered_bytes_total", Counter, ["peer"],
        "Bytes of the packets counted by enc_peer_steered_packets_total.";
    PEER_LEAK_PACKETS = "enc_peer_leak_packets_total", Counter, ["peer"],
        "Packets towards the peer's pod CIDR seen leaving the underlay unencrypted (leak sentinel).";
    PEER_LEAK_BYTES = "enc_peer_leak_bytes_total", Counter, ["peer"],
        "Bytes of the packets counted by enc_peer_leak_packets_total.";
    DROPS = "enc_drops_total", Counter, ["peer", "reason"],
        "Packets dropped by reason: eBPF datapath (in non-strict mode: would-be drops) and ESP input.";
    PEER_KEY_EPOCH = "enc_peer_key_epoch", Gauge, ["peer"],
        "Key epoch this node sends with to the peer.";
    ROTATIONS_COMPLETED = "enc_rotations_completed_total", Counter, ["peer"],
        "Key rotations completed with the peer in the current control session.";
    ROTATION_IN_PROGRESS = "enc_rotation_in_progress", Gauge, ["peer"],
        "1 while a key rotation with the peer is in progress.";
    ROTATION_STUCK = "enc_rotation_stuck", Gauge, ["peer"],
        "1 while a key rotation waits on the peer longer than rotation.stuckAfter.";
    ROTATION_STUCK_SINCE = "enc_rotation_stuck_since_seconds", Gauge, ["peer"],
        "Unix time since which a stuck rotation has waited on the peer (present only while stuck).";
}

/// Samples collected per family, rendered sorted by family name.
#[derive(Default)]
struct Exposition {
    families: BTreeMap<&'static str, (&'static Family, String)>,
}

impl Exposition {
    /// Adds one sample; `labels` gives the values of `family.labels`, in order.
    fn add(&mut self, family: &'static Family, labels: &[&str], value: impl Into<i128>) {
        debug_assert_eq!(labels.len(), family.labels.len(), "{}", family.name);
        let (_, lines) = self
            .families
            .entry(family.name)
            .or_insert_with(|| (family, String::new()));
        lines.push_str(family.name);
        if !labels.is_empty() {
            lines.push('{');
            for (i, (name, value)) in family.labels.iter().zip(labels).enumerate() {
                if i > 0 {
                    lines.push(',');
                }
                let _ = write!(lines, "{name}=\"{}\"", escape_label(value));
            }
            lines.push('}');
        }
        let _ = writeln!(lines, " {}", value.into());
    }

    fn finish(self) -> String {
        let mut out = String::new();
        for (name, (family, lines)) in self.families {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(family.help));
            let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
            out.push_str(&lines);
        }
        out
    }
}

/// A label value as the exposition format wants it: backslash, double quote and line feed
/// escaped.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A HELP text as the exposition format wants it: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Unix time of an RFC 3339 timestamp.
fn unix_time(rfc3339: &str) -> Option<i64> {
    OffsetDateTime::parse(rfc3339, &Rfc3339)
        .ok()
        .map(OffsetDateTime::unix_timestamp)
}

/// Unix time in a stuck text, `rotation stuck: <what> since <RFC 3339> (<n>s)` (as
/// `status::rotation_info` writes it; its test checks that this reads it back).
pub(crate) fn stuck_since(text: &str) -> Option<i64> {
    let (_, rest) = text.split_once(" since ")?;
    unix_time(rest.split_whitespace().next()?)
}

const AUTH_STATES: [&str; 3] = ["pending", "authenticated", "failed"];

/// Renders the exposition of a node's status and peers (format 0.0.4).
pub fn render(status: &Status, peers: &Peers) -> String {
    let mut x = Exposition::default();
    let enc = &status.encryption;
    x.add(&BUILD_INFO, &[&status.version, &enc.kind, &enc.backend], 1);
    x.add(&UPTIME, &[], status.uptime_seconds);
    let net = &status.network;
    if !net.tunnel.is_empty() {
        x.add(
            &TUNNEL_INFO,
            &[
                &net.tunnel,
                net.overlay_device.as_deref().unwrap_or(""),
                &net.stack,
            ],
            1,
        );
        x.add(&MTU, &["underlay"], u64::from(net.underlay_mtu));
        if let Some(m) = net.encryption_mtu {
            x.add(&MTU, &["encryption"], u64::from(m));
        }
        if let Some(m) = net.overlay_mtu {
            x.add(&MTU, &["overlay"], u64::from(m));
        }
        x.add(&MTU, &["pod"], u64::from(net.pod_mtu));
    }
    x.add(&STRICT_MODE, &[], u8::from(status.datapath.strict_mode));
    let counts = &status.peers;
    for (state, n) in
        AUTH_STATES
            .into_iter()
            .zip([counts.pending, counts.authenticated, counts.failed])
    {
        x.add(&PEERS, &[state], n as u64);
    }
    let keys = &status.keys;
    x.add(&KEYS_IN_USE, &[], keys.in_use as u64);
    x.add(&KEYS_EXPECTED, &[], keys.expected as u64);
    x.add(
        &ROTATIONS_IN_PROGRESS,
        &[],
        keys.rotations_in_progress as u64,
    );
    x.add(&ROTATION_STUCK_PEERS, &[], keys.stuck_peers.len() as u64);
    if let Some(s) = keys.rotation_interval_seconds {
        x.add(&ROTATION_INTERVAL, &[], s);
    }
    if let Some(t) = unix_time(&status.certificate.not_after) {
        x.add(&CERT_EXPIRY, &[&status.node.name], t);
    }
    if let Some(t) = unix_time(&status.expiry.soonest_not_after) {
        x.add(&CERT_SOONEST_EXPIRY, &[&status.expiry.soonest_node], t);
    }
    if !status.expiry.node_not_after.is_empty() {
        x.add(&CERT_EXPIRING, &[], status.expiry.expiring.len() as u64);
    }
    if let Some(r) = &status.renewal {
        if let Some(t) = unix_time(&r.next_attempt) {
            x.add(&RENEWAL_NEXT, &[], t);
        }
        x.add(&RENEWALS, &[], r.renewals);
        x.add(&RENEWAL_FAILURES, &[], u64::from(r.failures));
    }
    if let Some(i) = &status.issuer {
        x.add(&ISSUED, &["enrol"], i.enrolled);
        x.add(&ISSUED, &["renew"], i.renewed);
        x.add(&ISSUE_REFUSED, &[], i.refused);
    }
    // Every reason the implementation counts is in the status, 0 included; kernel
    // implementations report none, so the family is absent with them.
    for (reason, n) in &enc.device_drops {
        x.add(&DEVICE_DROPS, &[&enc.interface, &enc.backend, reason], *n);
    }
    if let Some(ipsec) = &enc.ipsec {
        for (counter, n) in &ipsec.xfrm_stat {
            x.add(&XFRM_ERRORS, &[counter], *n);
        }
    }

    for p in &peers.peers {
        let peer = p.name.as_str();
        let auth = p.auth.name();
        x.add(
            &PEER_AUTHENTICATED,
            &[peer],
            u8::from(p.auth == AuthState::Authenticated),
        );
        for state in AUTH_STATES {
            x.add(&PEER_AUTH_STATE, &[peer, state], u8::from(auth == state));
        }
        x.add(&PEER_AUTH_FAILURES, &[peer], p.failures);
        if let Some(t) = p.certificate.as_ref().and_then(|c| unix_time(&c.not_after)) {
            x.add(&CERT_EXPIRY, &[peer], t);
        }

        if let Some(wg) = &p.wireguard {
            if let Some(s) = wg.last_handshake_seconds {
                x.add(&PEER_LAST_HANDSHAKE, &[peer], s);
            }
            x.add(&PEER_TX_BYTES, &[peer], wg.tx_bytes);
            x.add(&PEER_RX_BYTES, &[peer], wg.rx_bytes);
        }
        if let Some(esp) = &p.ipsec {
            x.add(&PEER_TX_BYTES, &[peer], esp.tx_bytes);
            x.add(&PEER_RX_BYTES, &[peer], esp.rx_bytes);
            x.add(&PEER_TX_PACKETS, &[peer], esp.tx_packets);
            x.add(&PEER_RX_PACKETS, &[peer], esp.rx_packets);
            x.add(&PEER_ESP_OUT_SEQ, &[peer], esp.out_seq);
        }

        let c = &p.counters;
        x.add(&PEER_STEERED_PACKETS, &[peer], c.steered_packets);
        x.add(&PEER_STEERED_BYTES, &[peer], c.steered_bytes);
        x.add(&PEER_LEAK_PACKETS, &[peer], c.leak_packets);
        x.add(&PEER_LEAK_BYTES, &[peer], c.leak_bytes);
        // Every eBPF reason is shown, at 0 until its first drop (the status API leaves zeros
        // out). ESP reasons are shown as the IPsec backend reports them. The two sets
        // are distinct names; should one ever appear in both, its counts add up rather than
        // making two samples of one series.
        let mut drops: BTreeMap<&str, u64> = enc_tunnel_ebpf::DropReason::ALL
            .iter()
            .map(|r| (r.label(), 0))
            .collect();
        let esp_drops = p.ipsec.iter().flat_map(|i| &i.drops);
        for (reason, n) in c.drops.iter().chain(esp_drops) {
            let d = drops.entry(reason).or_default();
            *d = d.saturating_add(*n);
        }
        for (reason, n) in drops {
            x.add(&DROPS, &[peer, reason], n);
        }

        let rotation = p.rotation.as_ref();
        if let Some(epoch) = p
            .key
            .as_ref()
            .map(|k| k.epoch)
            .or_else(|| rotation.and_then(|r| r.outbound_epoch))
        {
            x.add(&PEER_KEY_EPOCH, &[peer], epoch);
        }
        let stuck = rotation.and_then(|r| r.stuck.as_deref());
        x.add(
            &ROTATION_IN_PROGRESS,
            &[peer],
            u8::from(rotation.is_some_and(|r| r.phase != "idle")),
        );
        x.add(&ROTATION_STUCK, &[peer], u8::from(stuck.is_some()));
        if let Some(t) = stuck.and_then(stuck_since) {
            x.add(&ROTATION_STUCK_SINCE, &[peer], t);
        }
        if let Some(r) = rotation {
            x.add(&ROTATIONS_COMPLETED, &[peer], r.completed);
        }
    }
    x.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Crypto;
    use enc_api::{
        CertSummary, ControlInfo, DatapathCounters, DatapathInfo, EncryptionInfo, IpsecInfo,
        IpsecPeerInfo, KeyInfo, KeysSummary, NodeInfo, PeerCounts, PeerInfo, RotationInfo,
        WgPeerInfo,
    };
    use enc_wireguard::{DropCounters, FakeWg, PublicKey};
    use std::collections::HashSet;

    fn cert(name: &str, not_after: &str) -> CertSummary {
        CertSummary {
            subject: format!("CN={name}"),
            serial: "01".into(),
            issuer: "CN=enc cluster CA".into(),
            not_after: not_after.into(),
            sha256_fingerprint: "00".into(),
        }
    }

    fn status() -> Status {
        Status {
            node: NodeInfo {
                name: "node-1".into(),
                underlay_address: "10.0.0.1".parse().unwrap(),
                pod_cidr: "10.244.1.0/24".into(),
            },
            version: "0.1.0".into(),
            uptime_seconds: 42,
            encryption: EncryptionInfo {
                kind: "ipsec".into(),
                backend: "userspace-esp".into(),
                backend_reason: "test".into(),
                interface: "enc-esp0".into(),
                listen_port: None,
                public_key: None,
                mtu: 1400,
                ipsec: Some(IpsecInfo {
                    keys_in_use: 3,
                    keys_expected: 4,
                    xfrm_stat: [("XfrmInNoStates".to_owned(), 7)].into(),
                }),
                device_drops: [("no-route".to_owned(), 2), ("bad-spi".to_owned(), 0)].into(),
            },
            control: ControlInfo {
                listen: "10.0.0.1:51871".into(),
                dial_rule: "x".into(),
            },
            // 2026-11-24T05:36:49Z
            certificate: cert("node-1", "2026-11-24T05:36:49Z"),
            peers: PeerCounts {
                total: 3,
                pending: 1,
                authenticated: 2,
                failed: 0,
            },
            datapath: DatapathInfo {
                strict_mode: true,
                ..DatapathInfo::default()
            },
            keys: KeysSummary {
                in_use: 3,
                expected: 4,
                rotations_in_progress: 1,
                stuck_peers: vec!["node-3".into()],
                rotation_interval_seconds: Some(86400),
            },
            network: enc_api::NetworkInfo {
                tunnel: "vxlan".into(),
                overlay_device: Some("enc-vxlan0".into()),
                overlay_port: Some(8472),
                vni: Some(1),
                stack: "ipsec(vxlan(pod))".into(),
                underlay_mtu: 1500,
                encryption_mtu: Some(1446),
                overlay_mtu: Some(1396),
                pod_mtu: 1396,
            },
            expiry: enc_api::ExpiryInfo {
                node_not_after: "2026-12-01T00:00:00Z".into(),
                soonest_node: "node-3".into(),
                soonest_not_after: "2026-11-30T00:00:00Z".into(),
                soonest_seconds_left: 3600,
                expiring: vec!["node-3".into()],
            },
            renewal: Some(enc_api::RenewalInfo {
                issuer: "10.0.0.1:7946".into(),
                next_attempt: "2026-11-30T12:00:00Z".into(),
                next_attempt_seconds: 60,
                renewals: 3,
                last_renewal: None,
                failures: 2,
                last_error: Some("issuer 10.0.0.1:7946: connecting: refused".into()),
            }),
            issuer: Some(enc_api::IssuerInfo {
                listen: "10.0.0.1:7946".into(),
                cert_lifetime_seconds: 86_400,
                enrolled: 1,
                renewed: 5,
                refused: 2,
            }),
        }
    }

    fn rotation(phase: &str, stuck: Option<&str>, completed: u64) -> RotationInfo {
        RotationInfo {
            side: "leader".into(),
            outbound_epoch: Some(4),
            inbound_epochs: vec![4],
            phase: phase.into(),
            target_epoch: None,
            phase_age_seconds: None,
            stuck: stuck.map(str::to_owned),
            completed,
            last_completed_epoch: None,
            last_completed_seconds_ago: None,
        }
    }

    fn peer(name: &str, auth: AuthState) -> PeerInfo {
        PeerInfo {
            name: name.into(),
            address: "10.0.0.9".parse().unwrap(),
            pod_cidr: "10.244.9.0/24".into(),
            role: "dial".into(),
            auth,
            state_age_seconds: 1,
            failures: 0,
            last_success_seconds: None,
            last_failure: None,
            certificate: None,
            key: None,
            wireguard: None,
            ipsec: None,
            rotation: None,
            datapath_id: 1,
            counters: DatapathCounters::default(),
        }
    }

    /// node-2: WireGuard, authenticated; node-3: IPsec, authenticated, rotation stuck;
    /// node-4: failed twice, no keys.
    fn peers() -> Peers {
        let mut n2 = peer("node-2", AuthState::Authenticated);
        n2.certificate = Some(cert("node-2", "2026-11-25T00:00:00Z"));
        n2.key = Some(KeyInfo {
            epoch: 5,
            key_id: "f3aa9596".into(),
        });
        n2.wireguard = Some(WgPeerInfo {
            public_key: "pk".into(),
            endpoint: None,
            last_handshake_seconds: Some(3),
            rx_bytes: 440,
            tx_bytes: 528,
        });
        n2.rotation = Some(rotation("idle", None, 2));
        n2.counters = DatapathCounters {
            steered_packets: 10,
            steered_bytes: 1000,
            drops: [("peer-no-key".to_owned(), 1)].into(),
            leak_packets: 0,
            leak_bytes: 0,
        };
        let mut n3 = peer("node-3", AuthState::Authenticated);
        n3.ipsec = Some(IpsecPeerInfo {
            out_seq: 17,
            tx_packets: 17,
            tx_bytes: 1700,
            rx_packets: 20,
            rx_bytes: 2000,
            drops: [("replay".to_owned(), 2), ("icv-failure".to_owned(), 1)].into(),
            ..IpsecPeerInfo::default()
        });
        n3.rotation = Some(rotation(
            "prepared",
            Some("rotation stuck: no ack since 2026-11-22T08:40:01Z (12s)"),
            0,
        ));
        n3.counters.leak_packets = 1;
        n3.counters.leak_bytes = 84;
        let mut n4 = peer(
            "node-4",
            AuthState::Failed {
                reason: "certificate expired".into(),
            },
        );
        n4.failures = 2;
        Peers {
            peers: vec![n2, n3, n4],
        }
    }

    /// The value of one sample line, `series` written exactly as rendered.
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn values_come_from_status_and_peers() {
        let text = render(&status(), &peers());
        let v = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
        assert_eq!(
            v(
                r#"enc_build_info{version="0.1.0",encryption="ipsec",implementation="userspace-esp"}"#
            ),
            "1"
        );
        assert_eq!(v("enc_uptime_seconds"), "42");
        assert_eq!(
            v(r#"enc_tunnel_info{tunnel="vxlan",device="enc-vxlan0",stack="ipsec(vxlan(pod))"}"#),
            "1"
        );
        assert_eq!(v(r#"enc_mtu_bytes{layer="pod"}"#), "1396");
        assert_eq!(
            v(r#"enc_certificate_soonest_expiry_timestamp_seconds{node="node-3"}"#),
            "1795996800"
        );
        assert_eq!(v("enc_certificates_expiring"), "1");
        assert_eq!(v(r#"enc_mtu_bytes{layer="overlay"}"#), "1396");
        assert_eq!(v(r#"enc_mtu_bytes{layer="encryption"}"#), "1446");
        assert_eq!(v(r#"enc_mtu_bytes{layer="underlay"}"#), "1500");
        assert_eq!(v("enc_strict_mode"), "1");
        assert_eq!(v(r#"enc_peers{state="authenticated"}"#), "2");
        assert_eq!(v(r#"enc_peers{state="pending"}"#), "1");
        assert_eq!(v("enc_keys_in_use"), "3");
        assert_eq!(v("enc_keys_expected"), "4");
        assert_eq!(v("enc_rotations_in_progress"), "1");
        assert_eq!(v("enc_rotation_stuck_peers"), "1");
        assert_eq!(v("enc_rotation_interval_seconds"), "86400");
        assert_eq!(
            v(r#"enc_certificate_expiry_timestamp_seconds{node="node-1"}"#),
            "1795498609"
        );
        assert_eq!(
            v(r#"enc_certificate_expiry_timestamp_seconds{node="node-2"}"#),
            "1795564800"
        );
        assert_eq!(v(r#"enc_xfrm_errors_total{counter="XfrmInNoStates"}"#), "7");
        assert_eq!(
            v(
                r#"enc_device_drops_total{device="enc-esp0",implementation="userspace-esp",reason="no-route"}"#
            ),
            "2"
        );
        assert_eq!(
            v(
                r#"enc_device_drops_total{device="enc-esp0",implementation="userspace-esp",reason="bad-spi"}"#
            ),
            "0"
        );

        assert_eq!(v(r#"enc_peer_authenticated{peer="node-2"}"#), "1");
        assert_eq!(v(r#"enc_peer_authenticated{peer="node-4"}"#), "0");
        assert_eq!(
            v(r#"enc_peer_auth_state{peer="node-4",state="failed"}"#),
            "1"
        );
        assert_eq!(
            v(r#"enc_peer_auth_state{peer="node-4",state="authenticated"}"#),
            "0"
        );
        assert_eq!(v(r#"enc_peer_auth_failures_total{peer="node-4"}"#), "2");
        assert_eq!(v(r#"enc_peer_last_handshake_seconds{peer="node-2"}"#), "3");
        assert_eq!(v(r#"enc_peer_tx_bytes_total{peer="node-2"}"#), "528");
        assert_eq!(v(r#"enc_peer_rx_bytes_total{peer="node-2"}"#), "440");
        assert_eq!(v(r#"enc_peer_tx_bytes_total{peer="node-3"}"#), "1700");
        assert_eq!(v(r#"enc_peer_rx_bytes_total{peer="node-3"}"#), "2000");
        assert_eq!(v(r#"enc_peer_rx_packets_total{peer="node-3"}"#), "20");
        assert_eq!(v(r#"enc_peer_esp_out_sequence{peer="node-3"}"#), "17");
        assert_eq!(v(r#"enc_peer_steered_bytes_total{peer="node-2"}"#), "1000");
        assert_eq!(v(r#"enc_peer_leak_packets_total{peer="node-3"}"#), "1");
        assert_eq!(
            v(r#"enc_drops_total{peer="node-2",reason="peer-no-key"}"#),
            "1"
        );
        assert_eq!(v(r#"enc_drops_total{peer="node-3",reason="replay"}"#), "2");
        assert_eq!(
            v(r#"enc_drops_total{peer="node-3",reason="icv-failure"}"#),
            "1"
        );
        // The key's epoch, else the rotation's outbound epoch.
        assert_eq!(v(r#"enc_peer_key_epoch{peer="node-2"}"#), "5");
        assert_eq!(v(r#"enc_peer_key_epoch{peer="node-3"}"#), "4");
        assert_eq!(v(r#"enc_rotations_completed_total{peer="node-2"}"#), "2");
        assert_eq!(v(r#"enc_rotation_in_progress{peer="node-2"}"#), "0");
        assert_eq!(v(r#"enc_rotation_in_progress{peer="node-3"}"#), "1");
        assert_eq!(v(r#"enc_rotation_stuck{peer="node-2"}"#), "0");
        assert_eq!(v(r#"enc_rotation_stuck{peer="node-3"}"#), "1");
        assert_eq!(v(r#"enc_rotation_stuck{peer="node-4"}"#), "0");
        // 2026-11-22T08:40:01Z
        assert_eq!(
            v(r#"enc_rotation_stuck_since_seconds{peer="node-3"}"#),
            "1795336801"
        );
        // eBPF drop reasons are all there, at 0 until the first drop.
        for reason in [
            "peer-not-authenticated",
            "peer-no-key",
            "plaintext-from-underlay",
            "unencrypted-egress",
            "not-decrypted",
        ] {
            assert_eq!(
                v(&format!(
                    r#"enc_drops_total{{peer="node-4",reason="{reason}"}}"#
                )),
                "0"
            );
        }
        assert_eq!(
            value(&text, r#"enc_drops_total{peer="node-2",reason="replay"}"#),
            None
        );
        // Nothing is made up for what a peer does not have.
        for absent in [
            r#"enc_rotation_stuck_since_seconds{peer="node-2"}"#,
            r#"enc_peer_key_epoch{peer="node-4"}"#,
            r#"enc_peer_tx_bytes_total{peer="node-4"}"#,
            r#"enc_peer_tx_packets_total{peer="node-2"}"#,
            r#"enc_rotations_completed_total{peer="node-4"}"#,
            r#"enc_certificate_expiry_timestamp_seconds{node="node-4"}"#,
        ] {
            assert_eq!(value(&text, absent), None, "{absent}");
        }
    }

    /// A kernel XFRM backend: no device counters of its own.
    struct KernelIpsec;

    impl enc_ipsec::IpsecBackend for KernelIpsec {
        fn kind(&self) -> enc_ipsec::IpsecKind {
            enc_ipsec::IpsecKind::Kernel
        }
        fn ifname(&self) -> Option<&str> {
            None
        }
        fn upsert_peer(&self, _: &enc_ipsec::IpsecPeerSpec) -> enc_ipsec::Result<()> {
            Ok(())
        }
        fn delete_peer(&self, _: u16) -> enc_ipsec::Result<()> {
            Ok(())
        }
        fn peers(&self) -> enc_ipsec::Result<Vec<enc_ipsec::IpsecPeerSnapshot>> {
            Ok(Vec::new())
        }
    }

    /// The status of a node whose encryption backend is `crypto`, as `build_status` fills
    /// the encryption part in.
    fn status_with(crypto: &Crypto, interface: &str) -> Status {
        let mut st = status();
        st.encryption.kind = crypto.type_name().into();
        st.encryption.backend = crypto.implementation().into();
        st.encryption.interface = interface.into();
        st.encryption.ipsec = None;
        st.encryption.device_drops = crate::status::device_drops(crypto);
        st
    }

    /// The lines of one family: its HELP and TYPE lines and its samples.
    fn family_lines(text: &str, name: &str) -> String {
        text.lines()
            .filter(|l| {
                l.strip_prefix("# HELP ")
                    .or_else(|| l.strip_prefix("# TYPE "))
                    .unwrap_or(l)
                    .split([' ', '{'])
                    .next()
                    == Some(name)
            })
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn device_drops_of_the_userspace_datapath_are_exported() {
        let wg = FakeWg::new("enc0", PublicKey::from([9; 32]), 51820);
        wg.set_drop_counters(DropCounters {
            no_route: 5,
            invalid: 2,
            tun_errors: 1,
            ..DropCounters::default()
        });
        let crypto = Crypto::Wireguard(Arc::new(wg));
        let text = render(&status_with(&crypto, "enc0"), &Peers { peers: vec![] });
        assert_eq!(
            family_lines(&text, "enc_device_drops_total"),
            concat!(
                "# HELP enc_device_drops_total Packets the userspace datapath (boringtun, userspace-esp) dropped or failed to handle that belong to no peer, by reason.\n",
                "# TYPE enc_device_drops_total counter\n",
                "enc_device_drops_total{device=\"enc0\",implementation=\"boringtun\",reason=\"bad-inner-source\"} 0\n",
                "enc_device_drops_total{device=\"enc0\",implementation=\"boringtun\",reason=\"invalid\"} 2\n",
                "enc_device_drops_total{device=\"enc0\",implementation=\"boringtun\",reason=\"no-endpoint\"} 0\n",
                "enc_device_drops_total{device=\"enc0\",implementation=\"boringtun\",reason=\"no-route\"} 5\n",
                "enc_device_drops_total{device=\"enc0\",implementation=\"boringtun\",reason=\"noise-error\"} 0\n",
                "enc_device_drops_total{device=\"enc0\",implementation=\"boringtun\",reason=\"send-error\"} 0\n",
                "enc_device_drops_total{device=\"enc0\",implementation=\"boringtun\",reason=\"tun-error\"} 1\n",
                "enc_device_drops_total{device=\"enc0\",implementation=\"boringtun\",reason=\"unknown-peer\"} 0\n",
            )
        );
    }

    #[test]
    fn kernel_backends_have_no_device_drops() {
        let crypto = Crypto::Ipsec(Arc::new(KernelIpsec));
        let st = status_with(&crypto, "eth0");
        assert!(st.encryption.device_drops.is_empty());
        let text = render(&st, &Peers { peers: vec![] });
        assert_eq!(family_lines(&text, "enc_device_drops_total"), "");
        assert!(crate::status::device_drops(&Crypto::None).is_empty());
    }

    #[test]
    fn format_help_and_type_once_per_family_sorted_and_contiguous() {
        let text = render(&status(), &peers());
        assert!(text.ends_with('\n'));
        let mut order: Vec<&str> = Vec::new();
        let mut current = "";
        let mut closed: HashSet<&str> = HashSet::new();
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let l = lines[i];
            if let Some(rest) = l.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!order.contains(&name), "second HELP for {name}");
                let ty = lines[i + 1];
                let family = FAMILIES.iter().find(|f| f.name == name).unwrap();
                assert_eq!(ty, format!("# TYPE {name} {}", family.kind.as_str()));
                closed.insert(current);
                order.push(name);
                current = name;
                i += 2;
                continue;
            }
            assert!(!l.starts_with('#'), "stray comment {l}");
            let series = l.split([' ', '{']).next().unwrap();
            assert_eq!(series, current, "sample outside its family: {l}");
            assert!(!closed.contains(series));
            let family = FAMILIES.iter().find(|f| f.name == series).unwrap();
            // One label per declared name, in order.
            if family.labels.is_empty() {
                assert!(!l.contains('{'), "{l}");
            } else {
                let labels = l.split_once('{').unwrap().1.rsplit_once('}').unwrap().0;
                let names: Vec<&str> = labels
                    .split("\",")
                    .map(|kv| kv.split_once('=').unwrap().0)
                    .collect();
                assert_eq!(names, family.labels, "{l}");
            }
            assert!(l.rsplit(' ').next().unwrap().parse::<i64>().is_ok(), "{l}");
            i += 1;
        }
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted);
        // The fixture exercises every declared family.
        for f in FAMILIES {
            assert!(order.contains(&f.name), "{} not rendered", f.name);
        }
        assert_eq!(text, render(&status(), &peers()), "rendering is stable");
    }

    #[test]
    fn families_are_well_formed_and_unique() {
        let mut names = HashSet::new();
        for f in FAMILIES {
            assert!(names.insert(f.name), "duplicate {}", f.name);
            assert!(f.name.starts_with("enc_"), "{}", f.name);
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
            assert!(
                f.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                f.name
            );
            assert!(!f.help.is_empty() && !f.help.contains('\n'), "{}", f.name);
        }
    }

    #[test]
    fn every_family_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        for f in FAMILIES {
            assert!(
                doc.contains(&format!("`{}`", f.name)),
                "docs/metrics.md does not list {}",
                f.name
            );
        }
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label("line\nbreak"), r"line\nbreak");
        assert_eq!(escape_label("plain-1.2"), "plain-1.2");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
        let mut st = status();
        st.version = "1.0\"rc\\1\n".into();
        st.encryption.ipsec = None;
        let text = render(&st, &Peers { peers: vec![] });
        assert!(
            text.contains(
                r#"enc_build_info{version="1.0\"rc\\1\n",encryption="ipsec",implementation="userspace-esp"} 1"#
            ),
            "{text}"
        );
        // Every line is one line: the newline in the value did not split the sample.
        assert!(
            text.lines()
                .all(|l| l.starts_with("# ") || l.starts_with("enc_"))
        );
    }

    #[test]
    fn stuck_since_reads_the_status_text() {
        assert_eq!(
            stuck_since("rotation stuck: no ack since 2026-11-22T08:40:01Z (12s)"),
            Some(1_795_336_801)
        );
        assert_eq!(
            stuck_since(
                "rotation stuck: leader has not started it since 1970-01-01T00:01:00Z (3s)"
            ),
            Some(60)
        );
        assert_eq!(stuck_since("rotation stuck"), None);
        assert_eq!(stuck_since("rotation stuck: no ack since yesterday"), None);
        assert_eq!(unix_time("not a time"), None);
    }

    /// Sends a raw HTTP/1.1 request and returns the response head and body.
    async fn get(addr: SocketAddr, request: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_and_nothing_else() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, routes(Arc::new(|| "enc_up 1\n".to_owned()))).await
        });
        let req = |method: &str, path: &str| {
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        };
        let (head, body) = get(addr, &req("GET", "/metrics")).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert_eq!(body, "enc_up 1\n");
        for path in ["/", "/metrics/", "/v1/status", "/metricsx"] {
            let (head, _) = get(addr, &req("GET", path)).await;
            assert!(head.starts_with("http/1.1 404"), "{path}: {head}");
        }
        let (head, _) = get(addr, &req("POST", "/metrics")).await;
        assert!(head.starts_with("http/1.1 405"), "{head}");
        server.abort();
    }

    #[tokio::test]
    async fn bind_error_names_the_field_and_address() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err();
        let msg = crate::app::format_chain(&err);
        assert!(
            msg.contains("metrics.listen") && msg.contains(&addr.to_string()),
            "{msg}"
        );
    }
}
