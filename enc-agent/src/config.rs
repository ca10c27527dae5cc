//! The agent's configuration: YAML, parsed once at start-up and validated into typed values.
//!
//! Every refusal names the field (as a path such as `peers[1].podCidr`) and the bad value.
//! The configuration holds paths to key files but never key material, so the whole of it can
//! be printed (`enc-agent --print-config`).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default control-channel TCP port.
pub const DEFAULT_CONTROL_PORT: u16 = 51871;
/// Default WireGuard UDP port.
pub const DEFAULT_WG_PORT: u16 = 51820;
/// Most peers a node can have: peer ids are 16-bit and 0 means "no peer".
pub const MAX_PEERS: usize = 65535;
/// Default WireGuard interface name.
pub const DEFAULT_WG_INTERFACE: &str = "enc-wg0";

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown field, or a value of the wrong type.
    #[error("config file {path} is not valid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde_yaml's error, with the field and its line and column.
        source: serde_yaml::Error,
    },
    /// A value parsed but is not acceptable.
    #[error("config field `{field}`: {reason} (value: {value:?})")]
    Invalid {
        /// Path of the field, e.g. `peers[1].podCidr`.
        field: String,
        /// The value as written.
        value: String,
        /// Why it was refused.
        reason: String,
    },
}

fn invalid(
    field: impl Into<String>,
    value: impl ToString,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    tls: RawTls,
    #[serde(default)]
    control: RawControl,
    encryption: RawEncryption,
    #[serde(default)]
    underlay: RawUnderlay,
    /// `tunnel: vxlan` or `tunnel: {protocol: vxlan, ...}`: parsed by hand, see
    /// [`validate_tunnel`].
    tunnel: Option<serde_yaml::Value>,
    #[serde(default)]
    datapath: RawDatapath,
    #[serde(default)]
    rotation: RawRotation,
    status_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    metrics: RawMetrics,
    issuer: Option<RawIssuer>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    discovery: RawDiscovery,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawIssuer {
    listen: Option<String>,
    ca_dir: PathBuf,
    cert_lifetime: Option<String>,
    kubernetes: Option<RawKubernetesAttestation>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawKubernetesAttestation {
    audience: Option<String>,
    service_account: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEnrolment {
    issuer: String,
    service_account_token_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRenewal {
    issuer: String,
    at: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawNode {
    name: String,
    underlay_address: String,
    pod_cidr: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    reload_interval: Option<String>,
    renewal: Option<RawRenewal>,
    enrolment: Option<RawEnrolment>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawControl {
    listen_port: Option<u16>,
    key_grace_period: Option<String>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEncryption {
    #[serde(rename = "type")]
    kind: String,
    strict_mode: Option<bool>,
    #[serde(default)]
    wireguard: RawWireguard,
    #[serde(default)]
    ipsec: RawIpsec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawIpsec {
    interface: Option<String>,
    replay_window: Option<u32>,
    implementation: Option<String>,
    encapsulation: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWireguard {
    interface: Option<String>,
    listen_port: Option<u16>,
    implementation: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawUnderlay {
    mtu: Option<u32>,
    interface: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTunnel {
    protocol: Option<String>,
    port: Option<u16>,
    vni: Option<u32>,
    interface: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDatapath {
    pod_interface_prefixes: Option<Vec<String>>,
    bpf_pin_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRotation {
    interval: Option<String>,
    grace_period: Option<String>,
    stuck_after: Option<String>,
    esp_seq_threshold: Option<u64>,
    bytes_threshold: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDiscovery {
    kind: Option<String>,
    node_name_env: Option<String>,
    underlay_address_env: Option<String>,
    publish_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPeer {
    name: String,
    underlay_address: String,
    pod_cidr: String,
    control_port: Option<u16>,
}

/// The validated configuration.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// This node.
    pub node: NodeConfig,
    /// Certificate, key and CA bundle files.
    pub tls: TlsConfig,
    /// Control channel.
    pub control: ControlConfig,
    /// Encryption datapath.
    pub encryption: EncryptionConfig,
    /// Strict mode: traffic to or from a remote pod CIDR without an authenticated, keyed peer
    /// is dropped (otherwise only counted).
    pub strict_mode: bool,
    /// MTU of the underlay network.
    pub underlay_mtu: u32,
    /// The overlay: VXLAN, Geneve, or none (direct routing).
    pub tunnel: TunnelConfig,
    /// The underlay interface (the eBPF underlay programs and the leak sentinel attach here).
    pub underlay_interface: String,
    /// eBPF datapath settings.
    pub datapath: DatapathConfig,
    /// Key rotation.
    pub rotation: RotationConfig,
    /// Unix socket of the status API.
    pub status_socket: PathBuf,
    /// Where the agent keeps what must survive a restart: the audit event log
    /// (`events.jsonl`) and the newest revocation list it accepted (`crl.pem`).
    pub state_dir: PathBuf,
    /// Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// The issuer role: online enrolment and renewal for other nodes (`None`: not an issuer).
    pub issuer: Option<IssuerConfig>,
    /// The peers discovery expects (standalone mode: listed here).
    pub peers: Vec<PeerConfig>,
    /// Where the expected peers come from: `peers` above, or the Kubernetes API.
    pub discovery: DiscoveryConfig,
}

/// Where the agent learns which peers should exist (never their keys: those come only over
/// the mutual-TLS control channel).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum DiscoveryConfig {
    /// The `peers` list of this file.
    #[default]
    Static,
    /// `EncNode` objects in the Kubernetes API (see `docs/kubernetes.md`).
    Kubernetes(KubernetesDiscovery),
}

/// Settings of Kubernetes discovery.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesDiscovery {
    /// Environment variable holding this node's name when `node.name` is not set (the
    /// downward API's `spec.nodeName`).
    pub node_name_env: String,
    /// Environment variable holding this node's underlay address when
    /// `node.underlayAddress` is not set (the downward API's `status.hostIP`).
    pub underlay_address_env: String,
    /// How often this node's own `EncNode` is checked and, if it changed, published.
    #[serde(with = "humantime_secs")]
    pub publish_interval: Duration,
}

/// Default of `discovery.nodeNameEnv`.
pub const DEFAULT_NODE_NAME_ENV: &str = "NODE_NAME";
/// Default of `discovery.underlayAddressEnv`.
pub const DEFAULT_UNDERLAY_ADDRESS_ENV: &str = "NODE_IP";

fn validate_discovery(raw: &RawDiscovery, peers: usize) -> Result<DiscoveryConfig, ConfigError> {
    let kube_only = [
        ("discovery.nodeNameEnv", raw.node_name_env.as_deref()),
        (
            "discovery.underlayAddressEnv",
            raw.underlay_address_env.as_deref(),
        ),
        ("discovery.publishInterval", raw.publish_interval.as_deref()),
    ];
    match raw.kind.as_deref() {
        None | Some("static") => {
            if let Some((field, Some(v))) = kube_only.iter().find(|(_, v)| v.is_some()) {
                return Err(invalid(
                    *field,
                    v,
                    "applies to discovery.kind kubernetes only",
                ));
            }
            Ok(DiscoveryConfig::Static)
        }
        Some("kubernetes") => {
            if peers > 0 {
                return Err(invalid(
                    "peers",
                    format!("{peers} entries"),
                    "with discovery.kind kubernetes the peers come from EncNode objects; remove the list",
                ));
            }
            let env = |field: &str, v: Option<&str>, default: &str| {
                let v = v.unwrap_or(default);
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(invalid(
                        field,
                        v,
                        "must be an environment variable name (letters, digits, '_')",
                    ));
                }
                Ok(v.to_owned())
            };
            let publish_interval = parse_duration(
                "discovery.publishInterval",
                raw.publish_interval.as_deref(),
                Duration::from_secs(30),
            )?;
            if publish_interval < Duration::from_secs(1) {
                return Err(invalid(
                    "discovery.publishInterval",
                    raw.publish_interval.as_deref().unwrap_or_default(),
                    "must be at least 1s",
                ));
            }
            Ok(DiscoveryConfig::Kubernetes(KubernetesDiscovery {
                node_name_env: env(
                    "discovery.nodeNameEnv",
                    raw.node_name_env.as_deref(),
                    DEFAULT_NODE_NAME_ENV,
                )?,
                underlay_address_env: env(
                    "discovery.underlayAddressEnv",
                    raw.underlay_address_env.as_deref(),
                    DEFAULT_UNDERLAY_ADDRESS_ENV,
                )?,
                publish_interval,
            }))
        }
        Some(other) => Err(invalid(
            "discovery.kind",
            other,
            "unknown kind (supported: static, kubernetes)",
        )),
    }
}

/// Prometheus metrics (`GET /metrics`, text exposition format 0.0.4).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MetricsConfig {
    /// TCP address of the metrics endpoint (`None`: disabled; `off` in the file).
    #[serde(serialize_with = "addr_or_off")]
    pub listen: Option<SocketAddr>,
}

/// Default address of the metrics endpoint: loopback only, so that scraping from elsewhere
/// is an explicit choice.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9890);

fn addr_or_off<S: serde::Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.collect_str(a),
        None => s.serialize_str("off"),
    }
}

/// This node's identity and addresses.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfig {
    /// Node name; must equal the DNS SAN of the node certificate.
    pub name: String,
    /// Underlay address; must be an IP SAN of the node certificate.
    pub underlay_address: IpAddr,
    /// Pod CIDR of this node.
    pub pod_cidr: IpNet,
}

/// TLS material, by path.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TlsConfig {
    /// Node certificate (PEM).
    pub cert: PathBuf,
    /// Node private key (PEM); its contents are never printed.
    pub key: PathBuf,
    /// Cluster CA bundle (PEM).
    pub ca: PathBuf,
    /// How often the three files are checked for changes: a renewed certificate or a changed
    /// CA bundle is loaded without a restart (`None`: never; `off` in the file).
    #[serde(with = "humantime_opt")]
    pub reload_interval: Option<Duration>,
    /// Automatic renewal of `cert` and `key` with an issuer (`None`: renewed externally).
    pub renewal: Option<RenewalConfig>,
    /// Enrolment at start-up when `cert` or `key` does not exist yet (`None`: they must).
    pub enrolment: Option<EnrolmentConfig>,
}

/// Kubernetes-attested enrolment at start-up (`tls.enrolment`): a node without a
/// certificate sends its projected ServiceAccount token to the issuer, which verifies it
/// with the TokenReview API and issues a certificate for the token's node.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnrolmentConfig {
    /// The issuer, `HOST:PORT` (HOST must be an IP SAN or DNS SAN of the issuer's certificate).
    pub issuer: String,
    /// The projected ServiceAccount token file (audience of the issuer). Only the path is
    /// held and printed; the token is read when it is sent and never logged.
    pub service_account_token_file: PathBuf,
}

/// The issuer's Kubernetes attestation (`issuer.kubernetes`): which ServiceAccount tokens
/// enrol a node. Printed as it is written (`serviceAccount: NAMESPACE/NAME`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesAttestation {
    /// The audience the tokens must be for (the TokenReview's `spec.audiences`).
    pub audience: String,
    /// The agents' namespace.
    pub namespace: String,
    /// The agents' ServiceAccount.
    pub service_account: String,
}

impl Serialize for KubernetesAttestation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("KubernetesAttestation", 2)?;
        st.serialize_field("audience", &self.audience)?;
        st.serialize_field(
            "serviceAccount",
            &format!("{}/{}", self.namespace, self.service_account),
        )?;
        st.end()
    }
}

impl KubernetesAttestation {
    /// The username of the agents' tokens: `system:serviceaccount:<namespace>:<name>`.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// Default `issuer.kubernetes.audience`.
pub const DEFAULT_ISSUER_AUDIENCE: &str = "enc-issuer";

/// Automatic certificate renewal (`tls.renewal`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RenewalConfig {
    /// The issuer, `HOST:PORT` (HOST must be an IP SAN or DNS SAN of the issuer's certificate).
    pub issuer: String,
    /// Renew when this percentage of the certificate's lifetime has passed.
    pub at_percent: u8,
}

/// Default `tls.renewal.at`: half the lifetime.
pub const DEFAULT_RENEW_AT_PERCENT: u8 = 50;
/// Default `issuer.certLifetime`.
pub const DEFAULT_ISSUED_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The issuer role (`issuer`): holds the CA directory and signs enrolments and renewals.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerConfig {
    /// TCP address the issuer listens on (default: the underlay address, port 7946).
    pub listen: SocketAddr,
    /// The CA directory as `encctl ca init` makes it (`ca.crt`, `ca.key`; `tokens.jsonl`,
    /// `issued.jsonl`, `crl.pem` as `encctl` uses them). The key is read, never printed.
    pub ca_dir: PathBuf,
    /// Lifetime of the certificates it issues.
    #[serde(with = "humantime_secs")]
    pub cert_lifetime: Duration,
    /// Kubernetes-attested enrolment with ServiceAccount tokens (`None`: join tokens only).
    pub kubernetes: Option<KubernetesAttestation>,
}

/// Control channel settings.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ControlConfig {
    /// Where the agent listens (underlay address and control port).
    pub listen: SocketAddr,
    /// How long a peer's keys stay installed after its control session is lost, while the
    /// agent reconnects. Authentication failures tear keys down at once.
    #[serde(with = "humantime_secs")]
    pub key_grace_period: Duration,
    /// Timeout of the TCP connect and, separately, of the TLS handshake of one attempt.
    #[serde(with = "humantime_secs")]
    pub connect_timeout: Duration,
}

/// Key rotation: schedule, thresholds and timers of the two-phase protocol.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotationConfig {
    /// Rotate every pair's keys this often (`None`: no schedule; `off` in the file).
    #[serde(with = "humantime_opt")]
    pub interval: Option<Duration>,
    /// How long the old epoch's keys keep decrypting after both sides switched.
    #[serde(with = "humantime_secs")]
    pub grace_period: Duration,
    /// A rotation waiting on its peer longer than this is reported stuck.
    #[serde(with = "humantime_secs")]
    pub stuck_after: Duration,
    /// Rotate when the outbound ESP sequence number reaches this value.
    pub esp_seq_threshold: u64,
    /// Rotate when this many bytes were sent to a peer under one epoch.
    pub bytes_threshold: u64,
}

mod humantime_opt {
    use serde::Serializer;
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str("off"),
        }
    }
}

mod humantime_secs {
    use serde::Serializer;
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// The overlay between nodes.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "protocol", rename_all = "camelCase")]
pub enum TunnelConfig {
    /// Direct routing: pod CIDRs are routed to the peers' underlay addresses (through the
    /// encryption device when encryption is on).
    Disabled,
    /// VXLAN.
    Vxlan(OverlayConfig),
    /// Geneve.
    Geneve(OverlayConfig),
}

impl TunnelConfig {
    /// The overlay kind and settings, if there is an overlay.
    pub fn overlay(&self) -> Option<(enc_geneve_vxlan::OverlayKind, &OverlayConfig)> {
        match self {
            TunnelConfig::Disabled => None,
            TunnelConfig::Vxlan(o) => Some((enc_geneve_vxlan::OverlayKind::Vxlan, o)),
            TunnelConfig::Geneve(o) => Some((enc_geneve_vxlan::OverlayKind::Geneve, o)),
        }
    }

    /// `vxlan`, `geneve` or `disabled`.
    pub fn name(&self) -> &'static str {
        match self {
            TunnelConfig::Disabled => "disabled",
            TunnelConfig::Vxlan(_) => "vxlan",
            TunnelConfig::Geneve(_) => "geneve",
        }
    }
}

/// Settings of a VXLAN or Geneve overlay.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OverlayConfig {
    /// UDP port (default 8472 for VXLAN, 6081 for Geneve); the same on every node.
    pub port: u16,
    /// VNI of the cluster's overlay traffic (24 bits).
    pub vni: u32,
    /// The overlay device's name.
    pub interface: String,
}

/// Default VNI.
pub const DEFAULT_VNI: u32 = 1;

/// The encryption datapath.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum EncryptionConfig {
    /// No encryption: the overlay (or direct routing) carries pod traffic in plaintext. Nodes
    /// still authenticate each other over the control channel; no keys are installed and no
    /// eBPF program is attached.
    None,
    /// WireGuard.
    Wireguard(WireguardConfig),
    /// IPsec (ESP tunnel mode, RFC 4106 AES-256-GCM).
    Ipsec(IpsecConfig),
}

/// IPsec settings.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IpsecConfig {
    /// TUN interface of the userspace ESP engine (used when the kernel cannot do ESP-GCM).
    pub interface: String,
    /// Anti-replay window of inbound SAs, in packets.
    pub replay_window: u32,
    /// Kernel XFRM or the userspace ESP engine.
    pub implementation: Implementation,
    /// Raw ESP or ESP in UDP on the underlay.
    pub encapsulation: EspEncapsulation,
}

/// How ESP travels between nodes (`encryption.ipsec.encapsulation`). Every node of a cluster
/// must use the same.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum EspEncapsulation {
    /// Raw ESP, IP protocol 50 (the default), with either implementation.
    #[default]
    None,
    /// ESP in UDP port 4500 (RFC 3948), with either implementation: the userspace engine
    /// (where it lets the engine use UDP GSO and GRO) and kernel XFRM (`XFRMA_ENCAP` on every
    /// SA and a `UDP_ENCAP_ESPINUDP` socket on the underlay address), so they mix.
    Udp,
}

/// Default userspace ESP interface name.
pub const DEFAULT_ESP_INTERFACE: &str = "enc-esp0";
/// Default anti-replay window.
pub const DEFAULT_REPLAY_WINDOW: u32 = 2048;

/// WireGuard settings.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WireguardConfig {
    /// Interface name.
    pub interface: String,
    /// UDP listen port, on the underlay address.
    pub listen_port: u16,
    /// Kernel WireGuard or boringtun.
    pub implementation: Implementation,
}

/// Which implementation of an encryption type to run.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Implementation {
    /// The kernel's when the kernel can do it (probed at start-up), else userspace.
    #[default]
    Auto,
    /// The kernel's only; start-up fails if the kernel cannot.
    Kernel,
    /// Userspace only (boringtun, or the userspace ESP engine), even where the kernel could.
    Userspace,
}

fn parse_implementation(field: &str, value: Option<&str>) -> Result<Implementation, ConfigError> {
    match value {
        None | Some("auto") => Ok(Implementation::Auto),
        Some("kernel") => Ok(Implementation::Kernel),
        Some("userspace") => Ok(Implementation::Userspace),
        Some(other) => Err(invalid(
            field,
            other,
            "unknown implementation (supported: auto, kernel, userspace)",
        )),
    }
}

/// eBPF datapath settings.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DatapathConfig {
    /// Interfaces whose name starts with one of these are pod-facing (veth host sides); the
    /// pod programs attach to each as it appears.
    pub pod_interface_prefixes: Vec<String>,
    /// bpffs directory where maps and program links are pinned, so that strict mode outlives
    /// an agent restart.
    pub bpf_pin_dir: PathBuf,
}

/// Default prefixes of pod-facing interfaces (common CNI veth names).
pub const DEFAULT_POD_PREFIXES: &[&str] = &["veth", "lxc", "cali"];

/// A peer node as discovery describes it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PeerConfig {
    /// Node name; its certificate must carry it as DNS SAN.
    pub name: String,
    /// Underlay address; its certificate must carry it as IP SAN.
    pub underlay_address: IpAddr,
    /// Pod CIDR behind the peer.
    pub pod_cidr: IpNet,
    /// The peer's control port.
    pub control_port: u16,
    /// SHA-256 of the certificate the peer says it holds (Kubernetes discovery only). Never
    /// trusted: the CA and SAN checks of the handshake decide; a mismatch is only logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl Config {
    /// `none`, `wireguard` or `ipsec`.
    pub fn encryption_name(&self) -> &'static str {
        match self.encryption {
            EncryptionConfig::None => "none",
            EncryptionConfig::Wireguard(_) => "wireguard",
            EncryptionConfig::Ipsec(_) => "ipsec",
        }
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is used in messages and to resolve
    /// relative TLS paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        validate(raw, base)
    }

    /// The configuration as YAML; safe to print (paths only, no key material).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("<unprintable config: {e}>"))
    }

    /// The peer with this underlay address.
    pub fn peer_by_addr(&self, addr: IpAddr) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.underlay_address == addr)
    }
}

/// Checks a node name with the same rule certificates are issued under (a lowercase
/// RFC 1123 DNS name), since it is matched against the certificate's DNS SAN.
pub fn check_node_name(name: &str) -> Result<(), String> {
    match enc_certs::validate_node_name(name) {
        Ok(()) => Ok(()),
        Err(enc_certs::Error::InvalidField { reason, .. }) => Err(reason),
        Err(other) => Err(other.to_string()),
    }
}

pub(crate) fn parse_ip(field: &str, value: &str) -> Result<IpAddr, ConfigError> {
    let ip: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| invalid(field, value, "not an IP address"))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(invalid(
            field,
            value,
            "must be a unicast, non-loopback, specified address",
        ));
    }
    Ok(ip)
}

pub(crate) fn parse_cidr(field: &str, value: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = value
        .trim()
        .parse()
        .map_err(|_| invalid(field, value, "not a CIDR (expected e.g. 10.244.1.0/24)"))?;
    if net.trunc() != net {
        return Err(invalid(
            field,
            value,
            format!("host bits are set; did you mean {}?", net.trunc()),
        ));
    }
    if net.prefix_len() == 0 {
        return Err(invalid(
            field,
            value,
            "a default route cannot be a pod CIDR",
        ));
    }
    Ok(net)
}

fn parse_duration(
    field: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => {
            let d = humantime::parse_duration(v).map_err(|e| {
                invalid(
                    field,
                    v,
                    format!("not a duration like \"30s\" or \"2m\": {e}"),
                )
            })?;
            if d.is_zero() {
                return Err(invalid(field, v, "must be greater than zero"));
            }
            Ok(d)
        }
    }
}

/// Default scheduled rotation interval.
const DEFAULT_ROTATION_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Default ESP sequence-number threshold: far below the 64-bit ESN limit, and below 2^32 so
/// that a peer without ESN would also be safe.
const DEFAULT_ESP_SEQ_THRESHOLD: u64 = 1 << 31;
/// Default bytes threshold (256 GiB under one epoch).
const DEFAULT_BYTES_THRESHOLD: u64 = 256 << 30;

fn validate_rotation(raw: &RawRotation) -> Result<RotationConfig, ConfigError> {
    let interval = match raw.interval.as_deref() {
        Some("off") => None,
        v => Some(parse_duration(
            "rotation.interval",
            v,
            DEFAULT_ROTATION_INTERVAL,
        )?),
    };
    let grace_period = parse_duration(
        "rotation.gracePeriod",
        raw.grace_period.as_deref(),
        Duration::from_secs(10),
    )?;
    let stuck_after = parse_duration(
        "rotation.stuckAfter",
        raw.stuck_after.as_deref(),
        Duration::from_secs(10),
    )?;
    if let (Some(i), Some(v)) = (interval, raw.interval.as_deref())
        && i <= grace_period
    {
        return Err(invalid(
            "rotation.interval",
            v,
            format!(
                "must be longer than rotation.gracePeriod ({})",
                humantime::format_duration(grace_period)
            ),
        ));
    }
    let esp_seq_threshold = raw.esp_seq_threshold.unwrap_or(DEFAULT_ESP_SEQ_THRESHOLD);
    if !(1000..=1 << 62).contains(&esp_seq_threshold) {
        return Err(invalid(
            "rotation.espSeqThreshold",
            esp_seq_threshold,
            "must be 1000 to 2^62",
        ));
    }
    let bytes_threshold = raw.bytes_threshold.unwrap_or(DEFAULT_BYTES_THRESHOLD);
    if bytes_threshold < 1 << 20 {
        return Err(invalid(
            "rotation.bytesThreshold",
            bytes_threshold,
            "must be at least 1 MiB (1048576)",
        ));
    }
    Ok(RotationConfig {
        interval,
        grace_period,
        stuck_after,
        esp_seq_threshold,
        bytes_threshold,
    })
}

fn check_file(field: &str, base: &Path, path: &Path) -> Result<PathBuf, ConfigError> {
    let full = if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    };
    match std::fs::metadata(&full) {
        Ok(m) if m.is_file() => Ok(full),
        Ok(_) => Err(invalid(field, path.display(), "not a regular file")),
        Err(e) => Err(invalid(field, path.display(), format!("cannot open: {e}"))),
    }
}

fn check_ifname(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(invalid(
            field,
            name,
            "interface names are 1 to 15 characters of letters, digits, '-', '_', '.'",
        ));
    }
    Ok(())
}

fn check_port(field: &str, port: Option<u16>, default: u16) -> Result<u16, ConfigError> {
    match port {
        Some(0) => Err(invalid(field, 0, "port must be 1 to 65535")),
        Some(p) => Ok(p),
        None => Ok(default),
    }
}

fn validate_metrics(raw: &RawMetrics, control: SocketAddr) -> Result<MetricsConfig, ConfigError> {
    const FIELD: &str = "metrics.listen";
    let listen = match raw.listen.as_deref().map(str::trim) {
        None => Some(DEFAULT_METRICS_LISTEN),
        Some("off") => None,
        Some(v) => {
            let addr: SocketAddr = v.parse().map_err(|_| {
                invalid(
                    FIELD,
                    v,
                    "not an address:port like 127.0.0.1:9890 or [::1]:9890 (or \"off\")",
                )
            })?;
            if addr.port() == 0 {
                return Err(invalid(FIELD, v, "port must be 1 to 65535"));
            }
            if addr.ip().is_multicast() {
                return Err(invalid(FIELD, v, "must not be a multicast address"));
            }
            if addr.port() == control.port()
                && (addr.ip().is_unspecified() || addr.ip() == control.ip())
            {
                return Err(invalid(
                    FIELD,
                    v,
                    format!("collides with the control listener {control}"),
                ));
            }
            Some(addr)
        }
    };
    Ok(MetricsConfig { listen })
}

/// Default overlay device names.
pub const DEFAULT_VXLAN_INTERFACE: &str = "enc-vxlan0";
/// See [`DEFAULT_VXLAN_INTERFACE`].
pub const DEFAULT_GENEVE_INTERFACE: &str = "enc-geneve0";

/// `tunnel:` is either a protocol name or a mapping with `protocol` and optional settings.
fn validate_tunnel(
    value: Option<&serde_yaml::Value>,
    underlay: IpAddr,
    pod_cidr: IpNet,
) -> Result<TunnelConfig, ConfigError> {
    let raw = match value {
        None | Some(serde_yaml::Value::Null) => RawTunnel::default(),
        Some(serde_yaml::Value::String(s)) => RawTunnel {
            protocol: Some(s.clone()),
            ..RawTunnel::default()
        },
        Some(v @ serde_yaml::Value::Mapping(_)) => {
            serde_yaml::from_value(v.clone()).map_err(|e| {
                invalid(
                    "tunnel",
                    serde_yaml::to_string(v).unwrap_or_default().trim(),
                    e.to_string(),
                )
            })?
        }
        Some(other) => {
            return Err(invalid(
                "tunnel",
                serde_yaml::to_string(other).unwrap_or_default().trim(),
                "must be vxlan, geneve, disabled, or a mapping with protocol, port, vni, interface",
            ));
        }
    };
    let kind = match raw.protocol.as_deref() {
        None | Some("disabled") => {
            if raw.port.is_some() || raw.vni.is_some() || raw.interface.is_some() {
                return Err(invalid(
                    "tunnel.protocol",
                    "disabled",
                    "port, vni and interface apply to vxlan and geneve only",
                ));
            }
            return Ok(TunnelConfig::Disabled);
        }
        Some("vxlan") => enc_geneve_vxlan::OverlayKind::Vxlan,
        Some("geneve") => enc_geneve_vxlan::OverlayKind::Geneve,
        Some(other) => {
            return Err(invalid(
                "tunnel.protocol",
                other,
                "unknown protocol (supported: vxlan, geneve, disabled)",
            ));
        }
    };
    let port = check_port("tunnel.port", raw.port, kind.default_port())?;
    let vni = raw.vni.unwrap_or(DEFAULT_VNI);
    if vni == 0 || vni > 0x00ff_ffff {
        return Err(invalid(
            "tunnel.vni",
            vni,
            "must be 1 to 16777215 (24 bits)",
        ));
    }
    let interface = raw.interface.unwrap_or_else(|| {
        match kind {
            enc_geneve_vxlan::OverlayKind::Vxlan => DEFAULT_VXLAN_INTERFACE,
            enc_geneve_vxlan::OverlayKind::Geneve => DEFAULT_GENEVE_INTERFACE,
        }
        .to_owned()
    });
    check_ifname("tunnel.interface", &interface)?;
    if pod_cidr.addr().is_ipv4() != underlay.is_ipv4() {
        return Err(invalid(
            "node.podCidr",
            pod_cidr,
            format!(
                "tunnel.protocol {kind} routes pod CIDRs through the peers' underlay addresses as gateways, so pod CIDRs must have the underlay's address family ({underlay})"
            ),
        ));
    }
    let o = OverlayConfig {
        port,
        vni,
        interface,
    };
    Ok(match kind {
        enc_geneve_vxlan::OverlayKind::Vxlan => TunnelConfig::Vxlan(o),
        enc_geneve_vxlan::OverlayKind::Geneve => TunnelConfig::Geneve(o),
    })
}

fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
    check_node_name(&raw.node.name).map_err(|r| invalid("node.name", &raw.node.name, r))?;
    let underlay = parse_ip("node.underlayAddress", &raw.node.underlay_address)?;
    let pod_cidr = parse_cidr("node.podCidr", &raw.node.pod_cidr)?;

    let enrolment = raw
        .tls
        .enrolment
        .as_ref()
        .map(|e| validate_enrolment(e, base))
        .transpose()?;
    // With enrolment, the certificate and key are made at start-up if they do not exist.
    let id_file = |field: &str, path: &Path| match &enrolment {
        Some(_) => check_file_or_creatable(field, base, path),
        None => check_file(field, base, path),
    };
    let tls = TlsConfig {
        cert: id_file("tls.cert", &raw.tls.cert)?,
        key: id_file("tls.key", &raw.tls.key)?,
        ca: check_file("tls.ca", base, &raw.tls.ca)?,
        reload_interval: match raw.tls.reload_interval.as_deref().map(str::trim) {
            Some("off") => None,
            other => {
                let d = parse_duration("tls.reloadInterval", other, Duration::from_secs(10))?;
                if d < Duration::from_millis(100) {
                    return Err(invalid(
                        "tls.reloadInterval",
                        other.unwrap_or_default(),
                        "must be at least 100ms, or off",
                    ));
                }
                Some(d)
            }
        },
        renewal: raw.tls.renewal.as_ref().map(validate_renewal).transpose()?,
        enrolment,
    };

    let control_port = check_port(
        "control.listenPort",
        raw.control.listen_port,
        DEFAULT_CONTROL_PORT,
    )?;
    let control = ControlConfig {
        listen: SocketAddr::new(underlay, control_port),
        key_grace_period: parse_duration(
            "control.keyGracePeriod",
            raw.control.key_grace_period.as_deref(),
            Duration::from_secs(60),
        )?,
        connect_timeout: parse_duration(
            "control.connectTimeout",
            raw.control.connect_timeout.as_deref(),
            Duration::from_secs(5),
        )?,
    };

    let encryption = match raw.encryption.kind.as_str() {
        "none" => EncryptionConfig::None,
        "wireguard" => {
            let interface = raw
                .encryption
                .wireguard
                .interface
                .unwrap_or_else(|| DEFAULT_WG_INTERFACE.to_owned());
            check_ifname("encryption.wireguard.interface", &interface)?;
            let listen_port = check_port(
                "encryption.wireguard.listenPort",
                raw.encryption.wireguard.listen_port,
                DEFAULT_WG_PORT,
            )?;
            if listen_port == control_port {
                return Err(invalid(
                    "encryption.wireguard.listenPort",
                    listen_port,
                    "must differ from control.listenPort",
                ));
            }
            let implementation = parse_implementation(
                "encryption.wireguard.implementation",
                raw.encryption.wireguard.implementation.as_deref(),
            )?;
            EncryptionConfig::Wireguard(WireguardConfig {
                interface,
                listen_port,
                implementation,
            })
        }
        "ipsec" => {
            let interface = raw
                .encryption
                .ipsec
                .interface
                .unwrap_or_else(|| DEFAULT_ESP_INTERFACE.to_owned());
            check_ifname("encryption.ipsec.interface", &interface)?;
            let replay_window = raw
                .encryption
                .ipsec
                .replay_window
                .unwrap_or(DEFAULT_REPLAY_WINDOW);
            if !(32..=65536).contains(&replay_window) {
                return Err(invalid(
                    "encryption.ipsec.replayWindow",
                    replay_window,
                    "must be 32 to 65536 packets",
                ));
            }
            let implementation = parse_implementation(
                "encryption.ipsec.implementation",
                raw.encryption.ipsec.implementation.as_deref(),
            )?;
            let encapsulation = match raw.encryption.ipsec.encapsulation.as_deref() {
                None | Some("none") => EspEncapsulation::None,
                Some("udp") => EspEncapsulation::Udp,
                Some(other) => {
                    return Err(invalid(
                        "encryption.ipsec.encapsulation",
                        other,
                        "unknown encapsulation (supported: none, udp)",
                    ));
                }
            };
            EncryptionConfig::Ipsec(IpsecConfig {
                interface,
                replay_window,
                implementation,
                encapsulation,
            })
        }
        other => {
            return Err(invalid(
                "encryption.type",
                other,
                "unknown type (supported: none, wireguard, ipsec)",
            ));
        }
    };

    let rotation = validate_rotation(&raw.rotation)?;
    let strict_mode = match (&encryption, raw.encryption.strict_mode) {
        (EncryptionConfig::None, Some(true)) => {
            return Err(invalid(
                "encryption.strictMode",
                true,
                "strict mode drops unencrypted pod traffic, which is all traffic with encryption.type none; set it false or choose wireguard or ipsec",
            ));
        }
        (EncryptionConfig::None, _) => false,
        (_, strict) => strict.unwrap_or(true),
    };
    let tunnel = validate_tunnel(raw.tunnel.as_ref(), underlay, pod_cidr)?;
    if let (Some((_, o)), EncryptionConfig::Wireguard(wg)) = (tunnel.overlay(), &encryption)
        && o.port == wg.listen_port
    {
        return Err(invalid(
            "tunnel.port",
            o.port,
            "must differ from encryption.wireguard.listenPort",
        ));
    }
    if let Some((_, o)) = tunnel.overlay()
        && o.port == control_port
    {
        return Err(invalid(
            "tunnel.port",
            o.port,
            "must differ from control.listenPort",
        ));
    }
    let underlay_interface = raw.underlay.interface.unwrap_or_else(|| "eth0".to_owned());
    check_ifname("underlay.interface", &underlay_interface)?;
    let pod_interface_prefixes = raw.datapath.pod_interface_prefixes.unwrap_or_else(|| {
        DEFAULT_POD_PREFIXES
            .iter()
            .map(|p| (*p).to_owned())
            .collect()
    });
    if pod_interface_prefixes.is_empty() {
        return Err(invalid(
            "datapath.podInterfacePrefixes",
            "[]",
            "at least one prefix is needed",
        ));
    }
    for (i, p) in pod_interface_prefixes.iter().enumerate() {
        check_ifname(&format!("datapath.podInterfacePrefixes[{i}]"), p)?;
        if *p == underlay_interface || underlay_interface.starts_with(p.as_str()) {
            return Err(invalid(
                format!("datapath.podInterfacePrefixes[{i}]"),
                p,
                format!("would match the underlay interface {underlay_interface:?}"),
            ));
        }
    }
    let bpf_pin_dir = raw
        .datapath
        .bpf_pin_dir
        .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/enc").join(&raw.node.name));
    if !bpf_pin_dir.is_absolute() {
        return Err(invalid(
            "datapath.bpfPinDir",
            bpf_pin_dir.display(),
            "must be an absolute path",
        ));
    }
    let underlay_mtu = raw.underlay.mtu.unwrap_or(1500);
    if !(1280..=65535).contains(&underlay_mtu) {
        return Err(invalid(
            "underlay.mtu",
            underlay_mtu,
            "must be 1280 to 65535",
        ));
    }

    let status_socket = raw
        .status_socket
        .unwrap_or_else(|| PathBuf::from(enc_api::DEFAULT_SOCKET));
    if status_socket.as_os_str().is_empty() {
        return Err(invalid("statusSocket", "", "must not be empty"));
    }
    let metrics = validate_metrics(&raw.metrics, control.listen)?;
    let issuer = raw
        .issuer
        .as_ref()
        .map(|i| validate_issuer(i, base, underlay, &control, metrics.listen))
        .transpose()?;
    let state_dir = match raw.state_dir {
        Some(d) if d.as_os_str().is_empty() => {
            return Err(invalid("stateDir", "", "must not be empty"));
        }
        Some(d) if d.is_relative() => base.join(d),
        Some(d) => d,
        None => PathBuf::from("/var/lib/enc").join(&raw.node.name),
    };

    if raw.peers.len() > MAX_PEERS {
        return Err(invalid(
            "peers",
            format!("{} entries", raw.peers.len()),
            format!("at most {MAX_PEERS} peers (datapath peer ids are 16 bits)"),
        ));
    }
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    let mut cidrs: Vec<(String, IpNet)> = vec![("node.podCidr".into(), pod_cidr)];
    let mut peers = Vec::with_capacity(raw.peers.len());
    for (i, p) in raw.peers.iter().enumerate() {
        let f = |name: &str| format!("peers[{i}].{name}");
        check_node_name(&p.name).map_err(|r| invalid(f("name"), &p.name, r))?;
        if p.name == raw.node.name {
            return Err(invalid(
                f("name"),
                &p.name,
                "a peer cannot carry this node's own name",
            ));
        }
        if !names.insert(p.name.clone()) {
            return Err(invalid(f("name"), &p.name, "duplicate peer name"));
        }
        let addr = parse_ip(&f("underlayAddress"), &p.underlay_address)?;
        if addr == underlay {
            return Err(invalid(
                f("underlayAddress"),
                &p.underlay_address,
                "equals this node's underlay address",
            ));
        }
        if addr.is_ipv4() != underlay.is_ipv4() {
            return Err(invalid(
                f("underlayAddress"),
                &p.underlay_address,
                "address family differs from node.underlayAddress",
            ));
        }
        if !addrs.insert(addr) {
            return Err(invalid(
                f("underlayAddress"),
                &p.underlay_address,
                "duplicate peer address",
            ));
        }
        let cidr = parse_cidr(&f("podCidr"), &p.pod_cidr)?;
        for (other_field, other) in &cidrs {
            if other.contains(&cidr.network()) || cidr.contains(&other.network()) {
                return Err(invalid(
                    f("podCidr"),
                    &p.pod_cidr,
                    format!("overlaps {other_field} ({other})"),
                ));
            }
        }
        cidrs.push((f("podCidr"), cidr));
        peers.push(PeerConfig {
            name: p.name.clone(),
            underlay_address: addr,
            pod_cidr: cidr,
            control_port: check_port(&f("controlPort"), p.control_port, DEFAULT_CONTROL_PORT)?,
            fingerprint: None,
        });
    }

    Ok(Config {
        node: NodeConfig {
            name: raw.node.name,
            underlay_address: underlay,
            pod_cidr,
        },
        tls,
        control,
        encryption,
        strict_mode,
        underlay_mtu,
        tunnel,
        underlay_interface,
        datapath: DatapathConfig {
            pod_interface_prefixes,
            bpf_pin_dir,
        },
        rotation,
        status_socket,
        state_dir,
        metrics,
        issuer,
        discovery: validate_discovery(&raw.discovery, peers.len())?,
        peers,
    })
}

fn validate_enrolment(raw: &RawEnrolment, base: &Path) -> Result<EnrolmentConfig, ConfigError> {
    let issuer = raw.issuer.trim();
    check_host_port("tls.enrolment.issuer", issuer)?;
    Ok(EnrolmentConfig {
        issuer: issuer.to_owned(),
        service_account_token_file: check_file(
            "tls.enrolment.serviceAccountTokenFile",
            base,
            &raw.service_account_token_file,
        )?,
    })
}

/// A file that exists, or that can be created: its directory exists.
fn check_file_or_creatable(field: &str, base: &Path, path: &Path) -> Result<PathBuf, ConfigError> {
    let full = if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    };
    match std::fs::metadata(&full) {
        Ok(m) if m.is_file() => Ok(full),
        Ok(_) => Err(invalid(field, path.display(), "not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = full.parent().filter(|d| !d.as_os_str().is_empty());
            match dir.map(std::fs::metadata) {
                Some(Ok(m)) if m.is_dir() => Ok(full),
                _ => Err(invalid(
                    field,
                    path.display(),
                    "does not exist, and its directory does not exist either (enrolment writes it there)",
                )),
            }
        }
        Err(e) => Err(invalid(field, path.display(), format!("cannot open: {e}"))),
    }
}

fn validate_kubernetes_attestation(
    raw: &RawKubernetesAttestation,
) -> Result<KubernetesAttestation, ConfigError> {
    let audience = raw
        .audience
        .as_deref()
        .map(str::trim)
        .unwrap_or(DEFAULT_ISSUER_AUDIENCE);
    if audience.is_empty() || audience.len() > 253 || audience.chars().any(char::is_whitespace) {
        return Err(invalid(
            "issuer.kubernetes.audience",
            audience,
            "must be 1 to 253 characters without spaces, like enc-issuer",
        ));
    }
    let sa = raw.service_account.trim();
    let bad = |why: &str| invalid("issuer.kubernetes.serviceAccount", sa, why);
    let (namespace, name) = sa
        .split_once('/')
        .ok_or_else(|| bad("expected NAMESPACE/NAME, like kube-system/enc-agent"))?;
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if !label(namespace) {
        return Err(bad(
            "the namespace must be a lowercase RFC 1123 label (a-z, 0-9, '-')",
        ));
    }
    if name.len() > 253 || name.split('.').any(|l| !label(l)) {
        return Err(bad(
            "the ServiceAccount name must be a lowercase RFC 1123 subdomain",
        ));
    }
    Ok(KubernetesAttestation {
        audience: audience.to_owned(),
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
    })
}

fn validate_renewal(raw: &RawRenewal) -> Result<RenewalConfig, ConfigError> {
    let issuer = raw.issuer.trim();
    check_host_port("tls.renewal.issuer", issuer)?;
    let at_percent = match raw.at.as_deref().map(str::trim) {
        None => DEFAULT_RENEW_AT_PERCENT,
        Some(v) => v
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<u8>().ok())
            .filter(|n| (10..=90).contains(n))
            .ok_or_else(|| {
                invalid(
                    "tls.renewal.at",
                    v,
                    "must be a percentage of the certificate lifetime from 10% to 90%, like 50%",
                )
            })?,
    };
    Ok(RenewalConfig {
        issuer: issuer.to_owned(),
        at_percent,
    })
}

/// Checks `HOST:PORT` / `[V6]:PORT` with a non-zero port and a host that is an IP address
/// or a DNS name.
fn check_host_port(field: &str, value: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| invalid(field, value, why);
    if value.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT, like 10.0.0.1:7946 or issuer.example:7946"))?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(bad("the port must be 1 to 65535")),
    }
    let dns_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !dns_ok {
        return Err(bad(
            "the host must be an IP address ([..] for IPv6) or a DNS name",
        ));
    }
    Ok(())
}

/// Shortest `issuer.certLifetime` (as `encctl cert sign --lifetime`).
pub const MIN_ISSUED_LIFETIME: Duration = enc_certs::MIN_CERT_LIFETIME;

fn validate_issuer(
    raw: &RawIssuer,
    base: &Path,
    underlay: IpAddr,
    control: &ControlConfig,
    metrics: Option<SocketAddr>,
) -> Result<IssuerConfig, ConfigError> {
    let default = SocketAddr::new(underlay, enc_api::issuer::DEFAULT_ISSUER_PORT);
    validate_issuer_at(raw, base, Some(default), Some(control), metrics)
}

fn validate_issuer_at(
    raw: &RawIssuer,
    base: &Path,
    default_listen: Option<SocketAddr>,
    control: Option<&ControlConfig>,
    metrics: Option<SocketAddr>,
) -> Result<IssuerConfig, ConfigError> {
    let listen = match raw.listen.as_deref().map(str::trim) {
        None => default_listen
            .ok_or_else(|| invalid("issuer.listen", "", "must be given, like 0.0.0.0:7946"))?,
        Some(v) => {
            let a: SocketAddr = v.parse().map_err(|_| {
                invalid(
                    "issuer.listen",
                    v,
                    "not an address:port like 10.0.0.1:7946 or [fd00::1]:7946",
                )
            })?;
            if a.port() == 0 {
                return Err(invalid("issuer.listen", v, "the port must be 1 to 65535"));
            }
            a
        }
    };
    let clash = |other: SocketAddr| {
        other.port() == listen.port()
            && (other.ip() == listen.ip()
                || other.ip().is_unspecified()
                || listen.ip().is_unspecified())
    };
    if let Some(control) = control
        && clash(control.listen)
    {
        return Err(invalid(
            "issuer.listen",
            listen,
            format!("clashes with the control channel's {}", control.listen),
        ));
    }
    if metrics.is_some_and(clash) {
        return Err(invalid(
            "issuer.listen",
            listen,
            "clashes with metrics.listen",
        ));
    }
    if raw.ca_dir.as_os_str().is_empty() {
        return Err(invalid("issuer.caDir", "", "must not be empty"));
    }
    let ca_dir = if raw.ca_dir.is_absolute() {
        raw.ca_dir.clone()
    } else {
        base.join(&raw.ca_dir)
    };
    for file in [enc_certs::CA_CERT_FILE, enc_certs::CA_KEY_FILE] {
        match std::fs::metadata(ca_dir.join(file)) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(invalid(
                    "issuer.caDir",
                    raw.ca_dir.display(),
                    format!("{file} in it is not a regular file"),
                ));
            }
            Err(e) => {
                return Err(invalid(
                    "issuer.caDir",
                    raw.ca_dir.display(),
                    format!("cannot open {file} in it ({e}); create the CA with encctl ca init"),
                ));
            }
        }
    }
    let cert_lifetime = parse_duration(
        "issuer.certLifetime",
        raw.cert_lifetime.as_deref(),
        DEFAULT_ISSUED_LIFETIME,
    )?;
    let max = Duration::from_secs(u64::from(enc_certs::MAX_DAYS) * 86_400);
    if !(MIN_ISSUED_LIFETIME..=max).contains(&cert_lifetime) {
        return Err(invalid(
            "issuer.certLifetime",
            raw.cert_lifetime.as_deref().unwrap_or_default(),
            format!(
                "must be between {} and {} days",
                humantime::format_duration(MIN_ISSUED_LIFETIME),
                enc_certs::MAX_DAYS
            ),
        ));
    }
    Ok(IssuerConfig {
        listen,
        ca_dir,
        cert_lifetime,
        kubernetes: raw
            .kubernetes
            .as_ref()
            .map(validate_kubernetes_attestation)
            .transpose()?,
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawStandaloneIssuer {
    issuer: RawIssuer,
    server_name: String,
    server_address: Option<String>,
    server_address_env: Option<String>,
}

/// An address for the serving certificate: any unicast, specified address (loopback too,
/// for an issuer reached on the same host).
fn parse_server_ip(field: &str, value: &str) -> Result<IpAddr, ConfigError> {
    let ip: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| invalid(field, value, "not an IP address"))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(
            field,
            value,
            "must be a unicast, specified address",
        ));
    }
    Ok(ip)
}

/// Default `serverAddressEnv` of a standalone issuer (the pod IP from the downward API).
pub const DEFAULT_SERVER_ADDRESS_ENV: &str = "POD_IP";

/// The configuration of a standalone issuer (`enc-agent --issuer-only`): the issuer role
/// without a datapath, as the chart's issuer Deployment runs it. It holds the CA and signs
/// its own serving certificate for `serverName` (the name agents dial) and `serverAddress`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StandaloneIssuerConfig {
    /// The issuer role; `listen` has no default here.
    pub issuer: IssuerConfig,
    /// DNS SAN of the serving certificate, e.g. `enc-issuer.kube-system.svc`.
    pub server_name: String,
    /// IP SAN of the serving certificate.
    pub server_address: IpAddr,
}

impl StandaloneIssuerConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with_env(&text, path, |k| std::env::var(k).ok())
    }

    /// Validates `text` (read from `path`; relative paths are relative to its directory),
    /// taking environment variables from `env`.
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawStandaloneIssuer =
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let issuer = validate_issuer_at(&raw.issuer, base, None, None, None)?;
        check_node_name(raw.server_name.trim())
            .map_err(|r| invalid("serverName", &raw.server_name, r))?;
        let server_address = match (&raw.server_address, &raw.server_address_env) {
            (Some(a), None) => parse_server_ip("serverAddress", a)?,
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "serverAddressEnv",
                    raw.server_address_env.as_deref().unwrap_or_default(),
                    "give serverAddress or serverAddressEnv, not both",
                ));
            }
            (None, var) => {
                let var = var.as_deref().unwrap_or(DEFAULT_SERVER_ADDRESS_ENV);
                let value = env(var).ok_or_else(|| {
                    invalid(
                        "serverAddressEnv",
                        var,
                        "the environment variable is not set (the chart sets it from status.podIP)",
                    )
                })?;
                parse_server_ip(&format!("serverAddressEnv ({var})"), &value)?
            }
        };
        Ok(Self {
            issuer,
            server_name: raw.server_name.trim().to_owned(),
            server_address,
        })
    }

    /// The configuration as YAML; safe to print (paths only, no key material).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("<unprintable config: {e}>"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(tempfile::TempDir);

    fn dir() -> Dir {
        let d = tempfile::tempdir().unwrap();
        for f in ["n1.crt", "n1.key", "ca.crt"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        Dir(d)
    }

    const GOOD: &str = r#"
node:
  name: node-1
  underlayAddress: 10.0.0.1
  podCidr: 10.244.1.0/24
tls:
  cert: n1.crt
  key: n1.key
  ca: ca.crt
encryption:
  type: wireguard
statusSocket: /tmp/enc-1.sock
peers:
  - name: node-2
    underlayAddress: 10.0.0.2
    podCidr: 10.244.2.0/24
  - name: node-3
    underlayAddress: 10.0.0.3
    podCidr: 10.244.3.0/24
    controlPort: 6000
"#;

    fn parse(d: &Dir, text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &d.0.path().join("agent.yaml"))
    }

    fn invalid_field(d: &Dir, text: &str) -> (String, String, String) {
        match parse(d, text) {
            Err(ConfigError::Invalid {
                field,
                value,
                reason,
            }) => (field, value, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let d = dir();
        let c = parse(&d, GOOD).unwrap();
        assert_eq!(c.node.name, "node-1");
        assert_eq!(c.control.listen, "10.0.0.1:51871".parse().unwrap());
        assert_eq!(c.control.key_grace_period, Duration::from_secs(60));
        assert_eq!(
            c.encryption,
            EncryptionConfig::Wireguard(WireguardConfig {
                interface: "enc-wg0".into(),
                listen_port: 51820,
                implementation: Implementation::Auto,
            })
        );
        assert_eq!(c.underlay_mtu, 1500);
        assert!(c.strict_mode);
        assert_eq!(c.underlay_interface, "eth0");
        assert_eq!(
            c.datapath.bpf_pin_dir,
            PathBuf::from("/sys/fs/bpf/enc/node-1")
        );
        assert_eq!(
            c.datapath.pod_interface_prefixes,
            vec!["veth", "lxc", "cali"]
        );
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[1].control_port, 6000);
        assert_eq!(c.tls.cert, d.0.path().join("n1.crt"));
        assert!(c.to_yaml().contains("node-3"));
    }

    #[test]
    fn each_bad_value_names_field_and_value() {
        let d = dir();
        let cases: &[(&str, &str, &str, &str)] = &[
            ("name: node-1", "name: Node_1", "node.name", "Node_1"),
            (
                "underlayAddress: 10.0.0.1",
                "underlayAddress: 10.0.0.300",
                "node.underlayAddress",
                "10.0.0.300",
            ),
            (
                "underlayAddress: 10.0.0.1",
                "underlayAddress: 127.0.0.1",
                "node.underlayAddress",
                "127.0.0.1",
            ),
            (
                "podCidr: 10.244.1.0/24",
                "podCidr: 10.244.1.5/24",
                "node.podCidr",
                "10.244.1.5/24",
            ),
            (
                "podCidr: 10.244.2.0/24",
                "podCidr: 10.244.0.0/16",
                "peers[0].podCidr",
                "10.244.0.0/16",
            ),
            (
                "type: wireguard",
                "type: wiregaurd",
                "encryption.type",
                "wiregaurd",
            ),
            (
                "cert: n1.crt",
                "cert: missing.crt",
                "tls.cert",
                "missing.crt",
            ),
            ("name: node-3", "name: node-2", "peers[1].name", "node-2"),
            ("name: node-3", "name: node-1", "peers[1].name", "node-1"),
            (
                "underlayAddress: 10.0.0.3",
                "underlayAddress: 10.0.0.2",
                "peers[1].underlayAddress",
                "10.0.0.2",
            ),
            (
                "underlayAddress: 10.0.0.3",
                "underlayAddress: fd00::3",
                "peers[1].underlayAddress",
                "fd00::3",
            ),
            (
                "controlPort: 6000",
                "controlPort: 0",
                "peers[1].controlPort",
                "0",
            ),
        ];
        for (from, to, field, value) in cases {
            let text = GOOD.replacen(from, to, 1);
            let (f, v, reason) = invalid_field(&d, &text);
            assert_eq!(
                (f.as_str(), v.as_str()),
                (*field, *value),
                "{from} -> {to}: {reason}"
            );
            let msg = parse(&d, &text).unwrap_err().to_string();
            assert!(msg.contains(field) && msg.contains(value), "{msg}");
        }
    }

    #[test]
    fn kubernetes_attestation_and_enrolment_settings() {
        let d = dir();
        let ca = d.0.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        std::fs::write(ca.join("ca.crt"), "x").unwrap();
        std::fs::write(ca.join("ca.key"), "x").unwrap();
        std::fs::write(d.0.path().join("token"), "secret-jwt").unwrap();
        std::fs::create_dir(d.0.path().join("new")).unwrap();
        let with = |tls: &str, issuer: &str| {
            GOOD.replacen("  ca: ca.crt\n", &format!("  ca: ca.crt\n{tls}"), 1)
                .replacen("peers:\n", &format!("{issuer}peers:\n"), 1)
        };
        let c = parse(
            &d,
            &with(
                "",
                "issuer:\n  caDir: ca\n  kubernetes:\n    serviceAccount: kube-system/enc-agent\n",
            ),
        )
        .unwrap();
        let k = c.issuer.unwrap().kubernetes.unwrap();
        assert_eq!(k.audience, DEFAULT_ISSUER_AUDIENCE);
        assert_eq!(k.username(), "system:serviceaccount:kube-system:enc-agent");

        let enrol = "  enrolment:\n    issuer: enc-issuer.kube-system.svc:7946\n    serviceAccountTokenFile: token\n";
        // With enrolment, the certificate and key may be missing if their directory exists.
        let text = with(enrol, "")
            .replace("cert: n1.crt", "cert: new/tls.crt")
            .replace("key: n1.key", "key: new/tls.key");
        let c = parse(&d, &text).unwrap();
        let e = c.tls.enrolment.clone().unwrap();
        assert_eq!(e.issuer, "enc-issuer.kube-system.svc:7946");
        assert_eq!(e.service_account_token_file, d.0.path().join("token"));
        assert_eq!(c.tls.cert, d.0.path().join("new/tls.crt"));
        // Printable: the token file's path, never the token.
        let y = c.to_yaml();
        assert!(
            y.contains("serviceAccountTokenFile") && !y.contains("secret-jwt"),
            "{y}"
        );
        // Without enrolment they must exist.
        let (f, _, _) = invalid_field(
            &d,
            &with("", "")
                .replace("cert: n1.crt", "cert: new/tls.crt")
                .replace("key: n1.key", "key: new/tls.key"),
        );
        assert_eq!(f, "tls.cert");

        let cases = [
            (
                with(enrol, "").replace("cert: n1.crt", "cert: nodir/tls.crt"),
                "tls.cert",
                "nodir/tls.crt",
            ),
            (
                with(
                    "  enrolment:\n    issuer: 10.0.0.9\n    serviceAccountTokenFile: token\n",
                    "",
                ),
                "tls.enrolment.issuer",
                "10.0.0.9",
            ),
            (
                with(
                    "  enrolment:\n    issuer: h:1\n    serviceAccountTokenFile: nope\n",
                    "",
                ),
                "tls.enrolment.serviceAccountTokenFile",
                "nope",
            ),
            (
                with(
                    "",
                    "issuer:\n  caDir: ca\n  kubernetes:\n    serviceAccount: enc-agent\n",
                ),
                "issuer.kubernetes.serviceAccount",
                "enc-agent",
            ),
            (
                with(
                    "",
                    "issuer:\n  caDir: ca\n  kubernetes:\n    serviceAccount: Kube_System/enc-agent\n",
                ),
                "issuer.kubernetes.serviceAccount",
                "Kube_System/enc-agent",
            ),
            (
                with(
                    "",
                    "issuer:\n  caDir: ca\n  kubernetes:\n    serviceAccount: kube-system/\n",
                ),
                "issuer.kubernetes.serviceAccount",
                "kube-system/",
            ),
            (
                with(
                    "",
                    "issuer:\n  caDir: ca\n  kubernetes:\n    audience: \"a b\"\n    serviceAccount: ns/sa\n",
                ),
                "issuer.kubernetes.audience",
                "a b",
            ),
        ];
        for (text, field, value) in cases {
            let (f, v, r) = invalid_field(&d, &text);
            assert_eq!((f.as_str(), v.as_str()), (field, value), "{r}");
        }
        let e = parse(
            &d,
            &with(
                "",
                "issuer:\n  caDir: ca\n  kubernetes:\n    serviceAccount: a/b\n    audiance: x\n",
            ),
        )
        .unwrap_err();
        assert!(format!("{:?}", e).contains("audiance"), "{e:?}");
    }

    #[test]
    fn standalone_issuer_settings() {
        let d = dir();
        let ca = d.0.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        std::fs::write(ca.join("ca.crt"), "x").unwrap();
        std::fs::write(ca.join("ca.key"), "x").unwrap();
        let path = d.0.path().join("issuer.yaml");
        let env = |k: &str| (k == "POD_IP").then(|| "10.96.3.4".to_owned());
        let text = "issuer:\n  listen: 0.0.0.0:7946\n  caDir: ca\n  kubernetes:\n    serviceAccount: kube-system/enc-agent\nserverName: enc-issuer.kube-system.svc\n";
        let c = StandaloneIssuerConfig::parse_with_env(text, &path, env).unwrap();
        assert_eq!(c.server_address, "10.96.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(c.server_name, "enc-issuer.kube-system.svc");
        assert_eq!(
            c.issuer.listen,
            "0.0.0.0:7946".parse::<SocketAddr>().unwrap()
        );
        assert!(c.issuer.kubernetes.is_some());
        assert!(c.to_yaml().contains("caDir"));
        // What --print-config shows parses back to the same configuration.
        let again = StandaloneIssuerConfig::parse_with_env(&c.to_yaml(), &path, env).unwrap();
        assert_eq!(again, c);
        let bad = |text: &str| match StandaloneIssuerConfig::parse_with_env(text, &path, env) {
            Err(ConfigError::Invalid { field, value, .. }) => (field, value),
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(
            bad("issuer:\n  caDir: ca\nserverName: x\n"),
            ("issuer.listen".into(), "".into())
        );
        assert_eq!(
            bad("issuer:\n  listen: 0.0.0.0:7946\n  caDir: ca\nserverName: Bad_Name\n"),
            ("serverName".into(), "Bad_Name".into())
        );
        assert_eq!(
            bad(
                "issuer:\n  listen: 0.0.0.0:7946\n  caDir: ca\nserverName: x\nserverAddressEnv: NOPE\n"
            ),
            ("serverAddressEnv".into(), "NOPE".into())
        );
        assert_eq!(
            bad(
                "issuer:\n  listen: 0.0.0.0:7946\n  caDir: ca\nserverName: x\nserverAddress: 0.0.0.0\n"
            ),
            ("serverAddress".into(), "0.0.0.0".into())
        );
        assert!(matches!(
            StandaloneIssuerConfig::parse_with_env(
                "issuer:\n  listen: 0.0.0.0:1\n  caDir: ca\nserverName: x\nport: 1\n",
                &path,
                env
            ),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn issuer_and_renewal_settings() {
        let d = dir();
        let ca = d.0.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        std::fs::write(ca.join("ca.crt"), "x").unwrap();
        let with = |tls: &str, issuer: &str| {
            GOOD.replacen("  ca: ca.crt\n", &format!("  ca: ca.crt\n{tls}"), 1)
                .replacen("peers:\n", &format!("{issuer}peers:\n"), 1)
        };
        // Without ca.key the CA directory is refused, naming it.
        let (f, v, r) = invalid_field(&d, &with("", "issuer:\n  caDir: ca\n"));
        assert_eq!((f.as_str(), v.as_str()), ("issuer.caDir", "ca"), "{r}");
        assert!(r.contains("ca.key"), "{r}");
        std::fs::write(ca.join("ca.key"), "x").unwrap();

        let c = parse(&d, &with("", "issuer:\n  caDir: ca\n")).unwrap();
        let i = c.issuer.unwrap();
        assert_eq!(i.listen, "10.0.0.1:7946".parse().unwrap());
        assert_eq!(i.ca_dir, ca);
        assert_eq!(i.cert_lifetime, DEFAULT_ISSUED_LIFETIME);
        assert!(c.tls.renewal.is_none());

        let c = parse(
            &d,
            &with(
                "  renewal:\n    issuer: 10.0.0.2:7946\n",
                "issuer:\n  listen: 0.0.0.0:8000\n  caDir: ca\n  certLifetime: 20s\n",
            ),
        )
        .unwrap();
        assert_eq!(
            c.tls.renewal,
            Some(RenewalConfig {
                issuer: "10.0.0.2:7946".into(),
                at_percent: 50
            })
        );
        assert_eq!(c.issuer.unwrap().cert_lifetime, Duration::from_secs(20));
        let c = parse(
            &d,
            &with("  renewal:\n    issuer: issuer.enc:7946\n    at: 75%\n", ""),
        )
        .unwrap();
        assert_eq!(c.tls.renewal.unwrap().at_percent, 75);

        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "  renewal:\n    issuer: 10.0.0.2\n",
                "",
                "tls.renewal.issuer",
                "10.0.0.2",
            ),
            (
                "  renewal:\n    issuer: 10.0.0.2:0\n",
                "",
                "tls.renewal.issuer",
                "10.0.0.2:0",
            ),
            (
                "  renewal:\n    issuer: bad_host:1\n",
                "",
                "tls.renewal.issuer",
                "bad_host:1",
            ),
            (
                "  renewal:\n    issuer: h:1\n    at: 95%\n",
                "",
                "tls.renewal.at",
                "95%",
            ),
            (
                "  renewal:\n    issuer: h:1\n    at: half\n",
                "",
                "tls.renewal.at",
                "half",
            ),
            (
                "",
                "issuer:\n  caDir: ca\n  certLifetime: 5s\n",
                "issuer.certLifetime",
                "5s",
            ),
            (
                "",
                "issuer:\n  caDir: ca\n  certLifetime: 3651days\n",
                "issuer.certLifetime",
                "3651days",
            ),
            (
                "",
                "issuer:\n  caDir: ca\n  listen: nowhere\n",
                "issuer.listen",
                "nowhere",
            ),
            (
                "",
                "issuer:\n  caDir: ca\n  listen: 10.0.0.1:51871\n",
                "issuer.listen",
                "10.0.0.1:51871",
            ),
            ("", "issuer:\n  caDir: nope\n", "issuer.caDir", "nope"),
        ];
        for (tls, issuer, field, value) in cases {
            let (f, v, reason) = invalid_field(&d, &with(tls, issuer));
            assert_eq!(
                (f.as_str(), v.as_str()),
                (*field, *value),
                "{tls}{issuer}: {reason}"
            );
        }
        let e = parse(&d, &with("", "issuer:\n  caDir: ca\n  cadir: x\n")).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn durations_ports_mtu_and_interface_are_checked() {
        let d = dir();
        let extra = |s: &str| GOOD.replacen("encryption:\n  type: wireguard\n", s, 1);
        let cases: &[(&str, &str, &str)] = &[
            (
                "control:\n  keyGracePeriod: soon\nencryption:\n  type: wireguard\n",
                "control.keyGracePeriod",
                "soon",
            ),
            (
                "control:\n  connectTimeout: 0s\nencryption:\n  type: wireguard\n",
                "control.connectTimeout",
                "0s",
            ),
            (
                "control:\n  listenPort: 0\nencryption:\n  type: wireguard\n",
                "control.listenPort",
                "0",
            ),
            (
                "encryption:\n  type: wireguard\n  wireguard:\n    interface: a-very-long-interface\n",
                "encryption.wireguard.interface",
                "a-very-long-interface",
            ),
            (
                "encryption:\n  type: wireguard\n  wireguard:\n    listenPort: 51871\n",
                "encryption.wireguard.listenPort",
                "51871",
            ),
            (
                "underlay:\n  mtu: 500\nencryption:\n  type: wireguard\n",
                "underlay.mtu",
                "500",
            ),
            (
                "rotation:\n  interval: hourly\nencryption:\n  type: wireguard\n",
                "rotation.interval",
                "hourly",
            ),
            (
                "rotation:\n  interval: 5s\n  gracePeriod: 10s\nencryption:\n  type: wireguard\n",
                "rotation.interval",
                "5s",
            ),
            (
                "rotation:\n  espSeqThreshold: 10\nencryption:\n  type: wireguard\n",
                "rotation.espSeqThreshold",
                "10",
            ),
            (
                "rotation:\n  bytesThreshold: 1000\nencryption:\n  type: wireguard\n",
                "rotation.bytesThreshold",
                "1000",
            ),
            (
                "rotation:\n  stuckAfter: 0s\nencryption:\n  type: wireguard\n",
                "rotation.stuckAfter",
                "0s",
            ),
        ];
        for (snippet, field, value) in cases {
            let (f, v, _) = invalid_field(&d, &extra(snippet));
            assert_eq!((f.as_str(), v.as_str()), (*field, *value));
        }
    }

    #[test]
    fn rotation_settings() {
        let d = dir();
        let c = parse(&d, GOOD).unwrap();
        assert_eq!(c.rotation.interval, Some(Duration::from_secs(86400)));
        assert_eq!(c.rotation.grace_period, Duration::from_secs(10));
        let text = GOOD.replacen(
            "encryption:\n",
            "rotation:\n  interval: \"off\"\n  gracePeriod: 2s\n  espSeqThreshold: 5000\nencryption:\n",
            1,
        );
        let c = parse(&d, &text).unwrap();
        assert_eq!(c.rotation.interval, None);
        assert_eq!(c.rotation.esp_seq_threshold, 5000);
        assert!(c.to_yaml().contains("interval: off"), "{}", c.to_yaml());
        let text = GOOD.replacen(
            "encryption:\n",
            "rotation:\n  intervall: 1h\nencryption:\n",
            1,
        );
        let err = crate::app::format_chain(&parse(&d, &text).unwrap_err());
        assert!(err.contains("intervall"), "{err}");
    }

    #[test]
    fn ipsec_settings() {
        let d = dir();
        let c = parse(&d, &GOOD.replacen("type: wireguard", "type: ipsec", 1)).unwrap();
        assert_eq!(
            c.encryption,
            EncryptionConfig::Ipsec(IpsecConfig {
                interface: "enc-esp0".into(),
                replay_window: 2048,
                implementation: Implementation::Auto,
                encapsulation: EspEncapsulation::None,
            })
        );
        let text = GOOD.replacen(
            "type: wireguard",
            "type: ipsec\n  ipsec:\n    implementation: userspace\n    encapsulation: udp",
            1,
        );
        let c = parse(&d, &text).unwrap();
        assert!(matches!(
            c.encryption,
            EncryptionConfig::Ipsec(IpsecConfig {
                implementation: Implementation::Userspace,
                encapsulation: EspEncapsulation::Udp,
                ..
            })
        ));
        assert!(
            c.to_yaml().contains("encapsulation: udp"),
            "{}",
            c.to_yaml()
        );
        // The kernel XFRM backend does it too (chosen, or chosen by auto).
        for (text, implementation) in [
            ("kernel", Implementation::Kernel),
            ("auto", Implementation::Auto),
        ] {
            let yaml = GOOD.replacen(
                "type: wireguard",
                &format!(
                    "type: ipsec\n  ipsec:\n    implementation: {text}\n    encapsulation: udp"
                ),
                1,
            );
            let c = parse(&d, &yaml).unwrap();
            assert_eq!(
                c.encryption,
                EncryptionConfig::Ipsec(IpsecConfig {
                    interface: "enc-esp0".into(),
                    replay_window: 2048,
                    implementation,
                    encapsulation: EspEncapsulation::Udp,
                }),
                "{text}"
            );
        }
        let text = GOOD.replacen(
            "type: wireguard",
            "type: ipsec\n  ipsec:\n    encapsulation: tcp",
            1,
        );
        let (f, v, _) = invalid_field(&d, &text);
        assert_eq!(
            (f.as_str(), v.as_str()),
            ("encryption.ipsec.encapsulation", "tcp")
        );
        let text = GOOD.replacen(
            "type: wireguard",
            "type: ipsec\n  ipsec:\n    replayWindow: 8",
            1,
        );
        let (f, v, _) = invalid_field(&d, &text);
        assert_eq!(
            (f.as_str(), v.as_str()),
            ("encryption.ipsec.replayWindow", "8")
        );
        let text = GOOD.replacen(
            "type: wireguard",
            "type: ipsec\n  ipsec:\n    implementation: userspace",
            1,
        );
        let c = parse(&d, &text).unwrap();
        assert!(matches!(
            c.encryption,
            EncryptionConfig::Ipsec(IpsecConfig {
                implementation: Implementation::Userspace,
                ..
            })
        ));
        let text = GOOD.replacen(
            "type: wireguard",
            "type: wireguard\n  wireguard:\n    implementation: kernal",
            1,
        );
        let (f, v, r) = invalid_field(&d, &text);
        assert_eq!(
            (f.as_str(), v.as_str()),
            ("encryption.wireguard.implementation", "kernal")
        );
        assert!(r.contains("auto, kernel, userspace"), "{r}");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused_with_location() {
        let d = dir();
        let err = parse(&d, &GOOD.replacen("statusSocket", "statusSockett", 1)).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        let msg = crate::app::format_chain(&err);
        assert!(msg.contains("statusSockett"), "{msg}");
        let err = parse(
            &d,
            &GOOD.replacen("controlPort: 6000", "controlPort: 70000", 1),
        )
        .unwrap_err();
        let msg = crate::app::format_chain(&err);
        assert!(
            msg.contains("70000") && msg.contains("peers[1].controlPort"),
            "{msg}"
        );
        assert!(msg.contains("line"), "{msg}");
    }

    #[test]
    fn metrics_settings() {
        let d = dir();
        let with = |listen: &str| {
            GOOD.replacen(
                "statusSocket:",
                &format!("metrics:\n  listen: {listen}\nstatusSocket:"),
                1,
            )
        };
        // Default: loopback, port 9890.
        let c = parse(&d, GOOD).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9890".parse().unwrap()));
        assert!(
            c.to_yaml().contains("metrics:\n  listen: 127.0.0.1:9890"),
            "{}",
            c.to_yaml()
        );
        let c = parse(&d, &with("\"[::]:9100\"")).unwrap();
        assert_eq!(c.metrics.listen, Some("[::]:9100".parse().unwrap()));
        for off in ["off", "\"off\""] {
            let c = parse(&d, &with(off)).unwrap();
            assert_eq!(c.metrics.listen, None, "{off}");
            assert!(c.to_yaml().contains("listen: off"), "{}", c.to_yaml());
        }
        for (bad, why) in [
            ("localhost:9890", "not an address"),
            ("127.0.0.1", "not an address"),
            ("127.0.0.1:0", "port"),
            ("127.0.0.1:99999", "not an address"),
            ("0.0.0.0:51871", "control listener"),
            ("10.0.0.1:51871", "control listener"),
        ] {
            let (f, v, reason) = invalid_field(&d, &with(bad));
            assert_eq!((f.as_str(), v.as_str()), ("metrics.listen", bad));
            assert!(reason.contains(why), "{bad}: {reason}");
            let msg = parse(&d, &with(bad)).unwrap_err().to_string();
            assert!(msg.contains("metrics.listen") && msg.contains(bad), "{msg}");
        }
        // The control port on another address is fine.
        let c = parse(&d, &with("127.0.0.1:51871")).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:51871".parse().unwrap()));
        let err = parse(&d, &with("{ port: 9890 }")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let text = GOOD.replacen(
            "statusSocket:",
            "metrics:\n  listne: 127.0.0.1:9890\nstatusSocket:",
            1,
        );
        let msg = crate::app::format_chain(&parse(&d, &text).unwrap_err());
        assert!(msg.contains("listne"), "{msg}");
    }

    #[test]
    fn node_names_follow_dns_rules() {
        assert!(check_node_name("node-1.zone-a").is_ok());
        for bad in ["", "-a", "a-", "a..b", "UPPER", "a_b", &"x".repeat(64)] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tunnel_forms_defaults_and_errors() {
        let d = dir();
        let c = parse(&d, GOOD).unwrap();
        assert_eq!(c.tunnel, TunnelConfig::Disabled);
        let with = |t: &str| GOOD.replace("statusSocket:", &format!("{t}\nstatusSocket:"));
        let c = parse(&d, &with("tunnel: vxlan")).unwrap();
        assert_eq!(
            c.tunnel,
            TunnelConfig::Vxlan(OverlayConfig {
                port: 8472,
                vni: 1,
                interface: "enc-vxlan0".into()
            })
        );
        let c = parse(&d, &with("tunnel: { protocol: geneve, vni: 7 }")).unwrap();
        assert_eq!(
            c.tunnel,
            TunnelConfig::Geneve(OverlayConfig {
                port: 6081,
                vni: 7,
                interface: "enc-geneve0".into()
            })
        );
        assert_eq!(c.tunnel.name(), "geneve");
        let (f, v, r) = invalid_field(&d, &with("tunnel: gre"));
        assert_eq!((f.as_str(), v.as_str()), ("tunnel.protocol", "gre"));
        assert!(r.contains("vxlan, geneve, disabled"), "{r}");
        let (f, v, _) = invalid_field(&d, &with("tunnel: { protocol: vxlan, vni: 16777216 }"));
        assert_eq!((f.as_str(), v.as_str()), ("tunnel.vni", "16777216"));
        let (f, _, r) = invalid_field(&d, &with("tunnel: { protocol: vxlan, prot: 1 }"));
        assert_eq!(f, "tunnel");
        assert!(r.contains("unknown field `prot`"), "{r}");
        let (f, v, r) = invalid_field(&d, &with("tunnel: { protocol: vxlan, port: 51820 }"));
        assert_eq!((f.as_str(), v.as_str()), ("tunnel.port", "51820"));
        assert!(r.contains("wireguard"), "{r}");
        let (f, _, _) = invalid_field(&d, &with("tunnel: { protocol: disabled, port: 9 }"));
        assert_eq!(f, "tunnel.protocol");
        let v6 = GOOD.replace("podCidr: 10.244.1.0/24", "podCidr: fd00:1::/64");
        let v6 = v6.replace("statusSocket:", "tunnel: vxlan\nstatusSocket:");
        let (f, _, r) = invalid_field(&d, &v6);
        assert_eq!(f, "node.podCidr");
        assert!(r.contains("address family"), "{r}");
    }

    #[test]
    fn encryption_none_turns_strict_mode_off_and_refuses_it_explicitly() {
        let d = dir();
        let none = GOOD.replace("type: wireguard", "type: none");
        let c = parse(&d, &none).unwrap();
        assert_eq!(c.encryption, EncryptionConfig::None);
        assert!(!c.strict_mode);
        assert_eq!(c.encryption_name(), "none");
        let strict = GOOD.replace("type: wireguard", "type: none\n  strictMode: true");
        let (f, v, r) = invalid_field(&d, &strict);
        assert_eq!((f.as_str(), v.as_str()), ("encryption.strictMode", "true"));
        assert!(r.contains("none"), "{r}");
        let (f, _, r) = invalid_field(&d, &GOOD.replace("type: wireguard", "type: aes"));
        assert_eq!(f, "encryption.type");
        assert!(r.contains("none, wireguard, ipsec"), "{r}");
    }
}
