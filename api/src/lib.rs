//! The enc agent's status API: paths and JSON types.
//!
//! The agent serves these over HTTP/1.1 on a Unix socket; `encctl` reads them. This crate holds
//! only data so that the CLI never links the agent. Nothing here carries key material: public
//! keys and key ids are public by construction.

pub mod issuer;

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Default path of the agent's status socket.
pub const DEFAULT_SOCKET: &str = "/run/enc/agent.sock";
/// `GET`: [`Status`] of this node.
pub const STATUS_PATH: &str = "/v1/status";
/// `GET`: [`Peers`], one entry per expected peer.
pub const PEERS_PATH: &str = "/v1/peers";

/// `POST` a [`RotateRequest`]: start a key rotation; answers [`RotateResponse`].
pub const ROTATE_PATH: &str = "/v1/rotate";

/// `POST` a [`CrlPush`]: offer a certificate revocation list; answers [`CrlPushed`].
pub const CRL_PATH: &str = "/v1/crl";

/// Body of a revocation-list push.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CrlPush {
    /// The X.509 CRL, PEM, signed by a CA of the agent's `tls.ca` bundle.
    pub pem: String,
}

/// Answer to a revocation-list push.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CrlPushed {
    /// `adopted` (newer: persisted, applied and passed on to every peer), `same` (already
    /// held) or `older` (the agent holds a newer list).
    pub outcome: String,
    /// The number of the list pushed.
    pub number: u64,
    /// The number of the list the agent now holds.
    pub held: u64,
    /// Peers whose certificate the list held now revokes.
    pub revoked_peers: Vec<String>,
}

/// Body of a rotation request.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateRequest {
    /// Rotate only with this peer; every authenticated peer when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// Answer to a rotation request: one entry per peer whose rotation was started or joined.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotateResponse {
    /// The rotations, sorted by peer name.
    pub rotations: Vec<RotationStarted>,
}

/// A rotation started (or an in-flight one joined) with one peer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotationStarted {
    /// Peer node name.
    pub peer: String,
    /// Epoch in use when the request arrived.
    pub from_epoch: Option<u32>,
    /// Epoch the rotation reaches; it is complete when `lastCompletedEpoch` reaches it.
    pub target_epoch: u32,
}

/// Key rotation state with one peer (from this node's side).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotationInfo {
    /// `leader` (this node drives rotations with the peer) or `follower`.
    pub side: String,
    /// Epoch this node sends with.
    pub outbound_epoch: Option<u32>,
    /// Epochs this node accepts.
    pub inbound_epochs: Vec<u32>,
    /// `idle`, `requested`, `prepared`, `acked` or `committed`.
    pub phase: String,
    /// Epoch being rotated to.
    pub target_epoch: Option<u32>,
    /// Seconds in the current phase.
    pub phase_age_seconds: Option<u64>,
    /// Set when the rotation waits on the peer too long: `rotation stuck: no ack since ...`.
    pub stuck: Option<String>,
    /// Rotations completed in the current control session.
    pub completed: u64,
    /// Last epoch whose rotation completed (old keys retired).
    pub last_completed_epoch: Option<u32>,
    /// Seconds since that completion.
    pub last_completed_seconds_ago: Option<u64>,
}

/// Key state of the node: keys installed against keys expected, and rotations.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeysSummary {
    /// Keys the datapath reports installed (per peer: outbound plus each inbound epoch).
    pub in_use: usize,
    /// Keys the agent expects installed.
    pub expected: usize,
    /// Peers with a rotation in progress.
    pub rotations_in_progress: usize,
    /// Peers whose rotation is stuck.
    pub stuck_peers: Vec<String>,
    /// Scheduled rotation interval in seconds (`None`: no schedule).
    pub rotation_interval_seconds: Option<u64>,
}

/// Body of every non-2xx answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

/// This node's status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The node itself.
    pub node: NodeInfo,
    /// Agent version.
    pub version: String,
    /// Seconds since the agent started.
    pub uptime_seconds: u64,
    /// The encryption datapath in use.
    pub encryption: EncryptionInfo,
    /// The control channel.
    pub control: ControlInfo,
    /// This node's own certificate.
    pub certificate: CertSummary,
    /// Peers by authentication state.
    pub peers: PeerCounts,
    /// The eBPF datapath: attachment, strict mode, counters summed over peers.
    pub datapath: DatapathInfo,
    /// Keys in use against keys expected, and rotations.
    pub keys: KeysSummary,
    /// The overlay and the MTU of every layer.
    #[serde(default)]
    pub network: NetworkInfo,
    /// The soonest certificate expiry on this node and across its peers.
    #[serde(default)]
    pub expiry: ExpiryInfo,
    /// Automatic renewal of this node's certificate (`None`: not configured).
    #[serde(default)]
    pub renewal: Option<RenewalInfo>,
    /// The issuer role of this node (`None`: not an issuer).
    #[serde(default)]
    pub issuer: Option<IssuerInfo>,
}

/// Automatic renewal of this node's certificate with an issuer.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RenewalInfo {
    /// The issuer (`HOST:PORT`).
    pub issuer: String,
    /// When the next attempt is due (RFC 3339).
    pub next_attempt: String,
    /// Seconds until then (0 when due).
    pub next_attempt_seconds: u64,
    /// Renewals completed since the agent started.
    pub renewals: u64,
    /// When the last renewal completed (RFC 3339), if any since start.
    #[serde(default)]
    pub last_renewal: Option<String>,
    /// Failed attempts since the last success.
    pub failures: u32,
    /// The reason of the last failed attempt since the last success, if any.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The issuer role of a node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerInfo {
    /// Where it listens.
    pub listen: String,
    /// Lifetime of the certificates it issues, in seconds.
    pub cert_lifetime_seconds: u64,
    /// Enrolments signed since start.
    pub enrolled: u64,
    /// Renewals signed since start.
    pub renewed: u64,
    /// Requests refused since start.
    pub refused: u64,
}

/// Which certificate expires first: this node's own, or one a peer presented.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExpiryInfo {
    /// This node's certificate expiry (RFC 3339).
    pub node_not_after: String,
    /// The node whose certificate expires first (this node or a peer).
    pub soonest_node: String,
    /// Its expiry (RFC 3339).
    pub soonest_not_after: String,
    /// Seconds until then (negative once expired).
    pub soonest_seconds_left: i64,
    /// Certificates with 20% or less of their lifetime left, by node name.
    #[serde(default)]
    pub expiring: Vec<String>,
}

/// How pod traffic crosses between nodes: the overlay mode, its device, and the MTUs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkInfo {
    /// `vxlan`, `geneve` or `disabled` (direct routing).
    pub tunnel: String,
    /// The overlay device, if any.
    pub overlay_device: Option<String>,
    /// Its UDP port.
    pub overlay_port: Option<u16>,
    /// Its VNI.
    pub vni: Option<u32>,
    /// Which layer is outermost on the wire, e.g. `wireguard(vxlan(pod))`.
    pub stack: String,
    /// The underlay MTU.
    pub underlay_mtu: u32,
    /// MTU of the encryption device, if any.
    pub encryption_mtu: Option<u32>,
    /// MTU of the overlay device, if any.
    pub overlay_mtu: Option<u32>,
    /// MTU of the routes to remote pod CIDRs: the largest pod packet that crosses unfragmented.
    pub pod_mtu: u32,
}

/// The eBPF datapath that marks, steers and polices inter-node pod traffic.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DatapathInfo {
    /// How tc programs attach: `tcx` or `clsact`.
    pub attach_mode: String,
    /// Whether unauthenticated or unencrypted pod traffic is dropped (always counted).
    pub strict_mode: bool,
    /// The underlay interface (underlay programs and leak sentinel).
    pub underlay_interface: String,
    /// Pod-facing interfaces with the pod programs attached.
    pub pod_interfaces: Vec<String>,
    /// Where maps and links are pinned.
    pub pin_dir: String,
    /// Counters summed over all peers.
    pub totals: DatapathCounters,
}

/// Datapath counters (per peer, or summed).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DatapathCounters {
    /// Packets marked and steered into the encryption device.
    pub steered_packets: u64,
    /// Bytes marked and steered into the encryption device.
    pub steered_bytes: u64,
    /// Dropped packets by reason (in non-strict mode: would-be drops, counted, not dropped).
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Packets towards a remote pod CIDR seen leaving the underlay unencrypted.
    pub leak_packets: u64,
    /// Bytes of those packets.
    pub leak_bytes: u64,
}

impl DatapathCounters {
    /// All drops, whatever the reason.
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }
}

/// Identity and addresses of a node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Node name (the DNS SAN of its certificate).
    pub name: String,
    /// Underlay address.
    pub underlay_address: IpAddr,
    /// Pod CIDR served by the node.
    pub pod_cidr: String,
}

/// The encryption datapath.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionInfo {
    /// Encryption type from the configuration (`wireguard` or `ipsec`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Implementation in use (`boringtun`, `kernel-wireguard`, `userspace-esp`, `kernel-xfrm`).
    pub backend: String,
    /// Why that implementation was chosen.
    pub backend_reason: String,
    /// Device the routes of marked traffic point at.
    pub interface: String,
    /// WireGuard UDP listen port.
    pub listen_port: Option<u16>,
    /// This node's WireGuard public key (base64).
    pub public_key: Option<String>,
    /// MTU of the datapath interface and of the routes into it.
    pub mtu: u32,
    /// IPsec details, with `type: ipsec`.
    pub ipsec: Option<IpsecInfo>,
    /// Packets the userspace datapath (`boringtun`, `userspace-esp`) dropped, or failed to
    /// handle, that belong to no peer, by reason, every reason listed (0 included). Empty for
    /// the kernel implementations, which keep no such counters, and for agents older than
    /// this field.
    #[serde(default)]
    pub device_drops: std::collections::BTreeMap<String, u64>,
}

/// IPsec state of this node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IpsecInfo {
    /// SAs installed that match what the authenticated sessions call for.
    pub keys_in_use: usize,
    /// SAs the authenticated sessions call for (one outbound and one inbound per peer).
    pub keys_expected: usize,
    /// The kernel's XFRM error counters (`/proc/net/xfrm_stat`) by name, where available.
    pub xfrm_stat: std::collections::BTreeMap<String, u64>,
}

/// IPsec state towards one peer.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IpsecPeerInfo {
    /// Outbound SPI installed (hex).
    pub out_spi: String,
    /// Outbound SPI the session calls for (hex).
    pub expected_out_spi: String,
    /// Highest sequence number sent (64-bit, ESN).
    pub out_seq: u64,
    /// Sequence numbers left before the ESN space is exhausted.
    pub seq_headroom: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent (inner packets).
    pub tx_bytes: u64,
    /// Packets accepted from the peer, over every inbound SA since the peer was added
    /// (monotonic across rotations, unlike the per-SA counts in `inbound`).
    #[serde(default)]
    pub rx_packets: u64,
    /// Bytes accepted (inner packets), like `rx_packets`.
    #[serde(default)]
    pub rx_bytes: u64,
    /// Inbound SAs installed.
    pub inbound: Vec<IpsecInboundInfo>,
    /// Inbound SPIs the session calls for (hex).
    pub expected_in_spis: Vec<String>,
    /// ESP input drops by reason (userspace engine).
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// One inbound SA.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IpsecInboundInfo {
    /// SPI (hex).
    pub spi: String,
    /// Highest authenticated sequence number.
    pub highest_seq: u64,
    /// Packets accepted.
    pub packets: u64,
    /// Bytes accepted (inner packets).
    pub bytes: u64,
}

/// The control channel.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ControlInfo {
    /// Listen address (`ip:port`).
    pub listen: String,
    /// Rule that decides which side of a pair dials.
    pub dial_rule: String,
}

/// The parts of a certificate that matter for audit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertSummary {
    /// Subject distinguished name.
    pub subject: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// SHA-256 fingerprint of the DER certificate, lowercase hex.
    pub sha256_fingerprint: String,
}

/// Peer counts by authentication state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerCounts {
    /// All expected peers.
    pub total: usize,
    /// Not yet authenticated.
    pub pending: usize,
    /// Authenticated, with keys installed.
    pub authenticated: usize,
    /// Authentication failed.
    pub failed: usize,
}

/// Answer of [`PEERS_PATH`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Peers {
    /// One entry per expected peer, sorted by name.
    pub peers: Vec<PeerInfo>,
}

/// Authentication state of a peer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum AuthState {
    /// No authenticated session yet (or it was lost); `detail` says what is happening.
    Pending {
        /// What the agent is waiting for.
        detail: String,
    },
    /// Mutual certificate check passed; keys derived from the session are installed.
    Authenticated,
    /// The last attempt failed; `reason` says why. No keys are installed for the peer.
    Failed {
        /// Why authentication failed.
        reason: String,
    },
}

impl AuthState {
    /// Short name of the state: `pending`, `authenticated` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            AuthState::Pending { .. } => "pending",
            AuthState::Authenticated => "authenticated",
            AuthState::Failed { .. } => "failed",
        }
    }
}

/// One expected peer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerInfo {
    /// Peer node name.
    pub name: String,
    /// Underlay address discovery expects.
    pub address: IpAddr,
    /// Pod CIDR behind the peer.
    pub pod_cidr: String,
    /// `dial` if this node opens the control connection, `accept` if the peer does.
    pub role: String,
    /// Authentication state.
    pub auth: AuthState,
    /// Seconds since the state last changed.
    pub state_age_seconds: u64,
    /// Number of failed authentication attempts since start.
    pub failures: u64,
    /// Seconds since the peer last passed authentication (`None`: never since start).
    #[serde(default)]
    pub last_success_seconds: Option<u64>,
    /// The last authentication failure, if any.
    #[serde(default)]
    pub last_failure: Option<FailureInfo>,
    /// The certificate the peer presented in its last successful authentication.
    pub certificate: Option<CertSummary>,
    /// Key epoch and public key id in use with the peer.
    pub key: Option<KeyInfo>,
    /// WireGuard state of the peer, when configured in the datapath.
    pub wireguard: Option<WgPeerInfo>,
    /// IPsec state of the peer, when configured in the datapath.
    pub ipsec: Option<IpsecPeerInfo>,
    /// Key rotation state (present while a control session is up).
    #[serde(default)]
    pub rotation: Option<RotationInfo>,
    /// Datapath id of the peer (bits 31..16 of the skb mark).
    pub datapath_id: u16,
    /// eBPF counters of traffic to and from the peer's pod CIDR.
    pub counters: DatapathCounters,
}

/// An authentication failure: why, and how long ago.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FailureInfo {
    /// The reason, as the verifier or the session gave it.
    pub reason: String,
    /// Seconds since it happened.
    pub age_seconds: u64,
}

/// GET: audit events after a sequence number (`?after=N&limit=M`), oldest first.
pub const EVENTS_PATH: &str = "/v1/events";

/// What an audit event records.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The agent started (its configuration and identity loaded).
    AgentStart,
    /// The agent stopped cleanly.
    AgentStop,
    /// A peer passed the mutual-certificate check.
    AuthSuccess,
    /// A peer failed authentication (or refused ours), with the reason.
    AuthFailure,
    /// A control session ended (keys stay for the grace period).
    SessionEnd,
    /// Inbound keys of an epoch were installed for a peer.
    KeyInstall,
    /// Outbound traffic to a peer switched to an epoch.
    KeySwitch,
    /// An epoch's keys were retired.
    KeyRetire,
    /// A key rotation with a peer started (the detail says which trigger).
    RotationStart,
    /// A revocation list was accepted (the detail names its number and source).
    Revocation,
    /// A revocation list was refused (the detail says why).
    RevocationRefused,
    /// A peer's certificate was found revoked and its keys torn down.
    PeerRevoked,
    /// This node's certificate was renewed (new files loaded without a restart).
    Renewal,
    /// The trusted CA bundle changed (CA rollover).
    TrustChanged,
    /// Changed identity files could not be used; the current identity stays.
    IdentityReloadFailed,
    /// A certificate is close to expiry (20% of its lifetime left).
    ExpiryWarning,
    /// Automatic renewal with the issuer failed (the detail says why and when it retries);
    /// the current certificate stays in use.
    RenewalFailed,
    /// The issuer role signed a certificate (enrolment or renewal) for a node.
    Issued,
    /// The issuer role refused a request (the detail says why).
    IssueRefused,
    /// Discovery added, removed or moved a peer (the detail says which).
    PeerSetChanged,
}

/// One line of the append-only audit log (JSON lines); never carries key material.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Sequence number, increasing across restarts of one agent.
    pub seq: u64,
    /// When (UTC, RFC 3339).
    pub time: String,
    /// The node that logged it.
    pub node: String,
    /// What happened.
    pub kind: EventKind,
    /// The peer concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Key epoch concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    /// Certificate serial concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Reason or detail, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Identifies the key a pair uses without revealing it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    /// Key epoch.
    pub epoch: u32,
    /// Public id of the key (both ends show the same id when they agree).
    pub key_id: String,
}

/// WireGuard state of one peer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WgPeerInfo {
    /// The peer's WireGuard public key (base64).
    pub public_key: String,
    /// Current endpoint.
    pub endpoint: Option<String>,
    /// Seconds since the last handshake, if any.
    pub last_handshake_seconds: Option<u64>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_state_json_is_tagged() {
        let s = serde_json::to_string(&AuthState::Failed {
            reason: "certificate expired".into(),
        })
        .unwrap();
        assert_eq!(s, r#"{"state":"failed","reason":"certificate expired"}"#);
        let back: AuthState = serde_json::from_str(&s).unwrap();
        assert_eq!(back.name(), "failed");
    }

    #[test]
    fn encryption_info_without_device_drops_parses() {
        // As an agent older than `deviceDrops` answers.
        let old = r#"{"type":"wireguard","backend":"kernel-wireguard","backendReason":"x",
            "interface":"enc0","listenPort":51820,"publicKey":"pk","mtu":1420,"ipsec":null}"#;
        let e: EncryptionInfo = serde_json::from_str(old).unwrap();
        assert!(e.device_drops.is_empty());
        let mut e = e;
        e.device_drops.insert("no-route".into(), 3);
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""deviceDrops":{"no-route":3}"#), "{json}");
        assert_eq!(serde_json::from_str::<EncryptionInfo>(&json).unwrap(), e);
    }
}
