//! IPsec for enc: ESP in tunnel mode between node addresses, with RFC 4106 AES-256-GCM.
//!
//! Two implementations sit behind one seam, [`IpsecBackend`]:
//! - the kernel's XFRM (states and policies over netlink), where the kernel can do ESP-GCM;
//! - a userspace ESP engine (RFC 4303 + RFC 4106, anti-replay with ESN) on a TUN device and a
//!   raw IP-protocol-50 socket, where it cannot.
//!
//! Both use the same SPIs, keys, salts and sequence numbers, so a kernel-ESP node and a
//! userspace-ESP node interoperate on the wire. Keys come from the agent (derived from the
//! authenticated control session); this crate never derives or prints them.

use ipnet::IpNet;
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;
use zeroize::{Zeroize, ZeroizeOnDrop};

pub mod error;
pub mod esp;
pub mod replay;
pub mod sa_log;
pub mod userspace;
pub mod xfrm;

pub use error::{Error, Result};

/// Length of an AES-256-GCM key.
pub const KEY_LEN: usize = 32;
/// Length of the RFC 4106 salt.
pub const SALT_LEN: usize = 4;

/// The UDP port of ESP in UDP (RFC 3948 section 2.1, the IKE NAT-traversal port).
pub const ESP_IN_UDP_PORT: u16 = 4500;

/// How ESP travels on the underlay, for both implementations. Every node of a cluster must use
/// the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Encapsulation {
    /// Raw ESP, IP protocol 50 (RFC 4303).
    #[default]
    None,
    /// ESP in UDP (RFC 3948): every ESP packet is the payload of a UDP datagram from `port` to
    /// `port` ([`ESP_IN_UDP_PORT`] in a cluster). The userspace engine's socket binds the
    /// underlay address and `port`, which lets it use UDP GSO and GRO; inbound datagrams must
    /// come from a peer's address and from `port`. The kernel XFRM backend gives its SAs
    /// `XFRMA_ENCAP` with `port` at both ends and holds a `UDP_ENCAP_ESPINUDP` socket on the
    /// underlay address and `port` ([`xfrm::KernelIpsec::with_encapsulation`]).
    Udp {
        /// The UDP port at both ends.
        port: u16,
    },
}

impl fmt::Display for Encapsulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none (raw ESP, IP protocol 50)"),
            Self::Udp { port } => write!(f, "udp (ESP in UDP port {port})"),
        }
    }
}

/// Key material of one ESP security association: SPI, AES-256-GCM key and RFC 4106 salt.
/// Never printed: `Debug` shows only the SPI.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SaKeys {
    /// Security parameter index (the receiver's name for the SA).
    pub spi: u32,
    /// AES-256-GCM key.
    pub key: [u8; KEY_LEN],
    /// Salt: the implicit first four bytes of every nonce.
    pub salt: [u8; SALT_LEN],
}

impl fmt::Debug for SaKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaKeys")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Which implementation carries ESP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpsecKind {
    /// The kernel's XFRM.
    Kernel,
    /// enc's userspace ESP engine.
    Userspace,
}

/// Desired IPsec state towards one peer node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpsecPeerSpec {
    /// The agent's datapath id of the peer (bits 31..16 of the skb mark).
    pub peer_id: u16,
    /// Peer node name, for logs and status.
    pub name: String,
    /// This node's underlay address (outer source).
    pub local: IpAddr,
    /// The peer's underlay address (outer destination).
    pub remote: IpAddr,
    /// Pod CIDRs behind this node (inner destinations of inbound traffic).
    pub local_cidrs: Vec<IpNet>,
    /// Pod CIDRs behind the peer (inner destinations of outbound traffic; inner sources of
    /// inbound traffic must lie in them).
    pub remote_cidrs: Vec<IpNet>,
    /// Key epoch of `outbound` (bits 15..12 of the mark carry it modulo 16).
    pub epoch: u8,
    /// The SA this node sends with.
    pub outbound: SaKeys,
    /// The SAs this node accepts (the current epoch's, plus a neighbouring one during a
    /// rotation).
    pub inbound: Vec<SaKeys>,
    /// Outbound SAs of older epochs, `(epoch, keys)`, kept from the commit of a rotation until
    /// its retirement. The kernel backend keeps an outbound SA and `out` policies for each,
    /// matching that epoch's mark: packets the datapath marked before it switched epochs (in
    /// flight in the stack) still leave encrypted instead of hitting the block policy. The
    /// userspace engine takes traffic by route, not by mark, so it seals with `outbound` only
    /// and ignores this list (it still refuses an invalid one, as the kernel backend does).
    pub older_outbound: Vec<(u8, SaKeys)>,
    /// Pairs `(local, remote)` of pod CIDRs that travel inside an overlay (VXLAN, Geneve)
    /// whose packets this peer's SAs protect (`local_cidrs` / `remote_cidrs` are then the two
    /// underlay addresses). The datapath marks the inner pod packets before the overlay
    /// device encapsulates them, so the kernel backend gives each pair an `out` allow policy
    /// without a template for every outbound epoch's mark: the inner packet passes XFRM
    /// unencrypted on its way into the overlay device, instead of hitting the catch-all
    /// block policy, and only the overlay's packet is encrypted. Empty without an overlay.
    /// The userspace engine takes traffic by route and ignores it.
    pub bypass: Vec<(IpNet, IpNet)>,
}

impl IpsecPeerSpec {
    /// Checks `older_outbound` against `epoch` and `outbound`: every epoch distinct modulo 16
    /// (the mark carries 4 bits), every SPI distinct.
    pub(crate) fn check_older_outbound(&self) -> Result<()> {
        let invalid = |field, value: String, reason: &str| Error::Invalid {
            field,
            value,
            reason: format!("peer {} ({}): {reason}", self.peer_id, self.name),
        };
        for (i, (epoch, keys)) in self.older_outbound.iter().enumerate() {
            let earlier = &self.older_outbound[..i];
            if epoch & 0xF == self.epoch & 0xF
                || earlier.iter().any(|(e, _)| e & 0xF == epoch & 0xF)
            {
                return Err(invalid(
                    "older_outbound.epoch",
                    epoch.to_string(),
                    "epochs of outbound SAs must differ modulo 16",
                ));
            }
            if keys.spi == self.outbound.spi || earlier.iter().any(|(_, k)| k.spi == keys.spi) {
                return Err(invalid(
                    "older_outbound.spi",
                    format!("{:#010x}", keys.spi),
                    "SPIs of outbound SAs must differ",
                ));
            }
        }
        Ok(())
    }
}

/// Drop reasons of ESP input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EspDrop {
    /// No inbound SA has this SPI.
    BadSpi,
    /// Sequence number already seen, or left of the replay window.
    Replay,
    /// Authentication (GCM tag) failed: tampered, or wrong key.
    IcvFailure,
    /// Too short, bad padding, bad next header, or not ESP.
    Malformed,
    /// Decrypted, but the inner source is not in the peer's pod CIDRs.
    BadInnerSource,
}

impl EspDrop {
    /// Every reason.
    pub const ALL: [EspDrop; 5] = [
        EspDrop::BadSpi,
        EspDrop::Replay,
        EspDrop::IcvFailure,
        EspDrop::Malformed,
        EspDrop::BadInnerSource,
    ];

    /// Stable kebab-case label.
    pub const fn label(self) -> &'static str {
        match self {
            EspDrop::BadSpi => "bad-spi",
            EspDrop::Replay => "replay",
            EspDrop::IcvFailure => "icv-failure",
            EspDrop::Malformed => "malformed",
            EspDrop::BadInnerSource => "bad-inner-source",
        }
    }
}

/// What a backend reports about one inbound SA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundSaSnapshot {
    /// SPI.
    pub spi: u32,
    /// Highest authenticated sequence number received (64-bit, ESN).
    pub highest_seq: u64,
    /// Packets accepted.
    pub packets: u64,
    /// Bytes of inner packets accepted.
    pub bytes: u64,
}

/// What a backend reports about one peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IpsecPeerSnapshot {
    /// Datapath id of the peer.
    pub peer_id: u16,
    /// SPI of the current outbound SA (the spec's `outbound`).
    pub out_spi: u32,
    /// Last sequence number sent on the current outbound SA (64-bit, ESN); it restarts from 0
    /// when a rotation switches `outbound`.
    pub out_seq: u64,
    /// Packets sent to the peer, over every outbound SA since the peer was added (monotonic
    /// across rotations).
    pub tx_packets: u64,
    /// Bytes of inner packets sent, like `tx_packets`.
    pub tx_bytes: u64,
    /// Packets accepted from the peer, over every inbound SA since the peer was added
    /// (monotonic across rotations, unlike the per-SA counts in `inbound`).
    pub rx_packets: u64,
    /// Bytes of inner packets accepted, like `rx_packets`.
    pub rx_bytes: u64,
    /// Inbound SAs installed, each with its own counts.
    pub inbound: Vec<InboundSaSnapshot>,
    /// Input drops by reason (userspace engine; the kernel reports its own in /proc/net/xfrm_stat).
    pub drops: Vec<(EspDrop, u64)>,
}

/// The seam between the agent and an IPsec implementation. Operations are idempotent:
/// upserting an unchanged spec keeps sequence numbers and replay windows.
pub trait IpsecBackend: Send + Sync {
    /// Which implementation this is.
    fn kind(&self) -> IpsecKind;
    /// The device marked traffic must be routed into (the userspace engine's TUN), or `None`
    /// when the kernel's XFRM policies take marked traffic by themselves.
    fn ifname(&self) -> Option<&str>;
    /// Adds or updates the SAs (and, for the kernel, policies) of one peer.
    fn upsert_peer(&self, spec: &IpsecPeerSpec) -> Result<()>;
    /// Removes everything of one peer; absent is `Ok`.
    fn delete_peer(&self, peer_id: u16) -> Result<()>;
    /// The peers currently configured.
    fn peers(&self) -> Result<Vec<IpsecPeerSnapshot>>;
    /// Packets the device dropped, or failed to handle, that belong to no peer: pairs of a
    /// stable kebab-case reason and a monotonic count, every reason the implementation counts
    /// listed (zeros included), in a fixed order. Empty for an implementation without device
    /// counters (kernel XFRM: see `/proc/net/xfrm_stat`), which the default does.
    fn device_drop_counts(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
