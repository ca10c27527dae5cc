//! The kernel's XFRM: ESP states (SAs) and policies, over a NETLINK_XFRM socket.
//!
//! [`XfrmBackend`] is the seam: [`NetlinkXfrm`] talks to the kernel, [`FakeXfrm`] keeps the
//! same objects in memory with the same validation and idempotence. [`KernelIpsec`] turns an
//! [`IpsecPeerSpec`](crate::IpsecPeerSpec) into SAs and policies and applies them through a
//! backend.
//!
//! Every SA is ESP in tunnel mode with `rfc4106(gcm(aes))`: a 36-byte key (AES-256 key, then
//! the 4-byte salt) and a 128-bit ICV.
//!
//! # Which objects are enc's
//!
//! The kernel's SA and policy databases are shared with other software (an IKE daemon, another
//! CNI, an operator with `ip xfrm`). enc recognises its own objects by their marks, so that a
//! restarted agent adopts what it installed before and never touches anything else:
//!
//! - an **SA** is enc's when its match mark (`XFRMA_MARK`) or its output mark
//!   (`XFRMA_SET_MARK`) masks the whole magic nibble (bits 11..8) and the nibble is `0xE`
//!   (encrypt) or `0xD` (decrypted) — see [`is_enc_mark`];
//! - a **policy** is enc's when its mark passes the same test *and* its priority lies in
//!   [`PRIORITY_BAND`].
//!
//! # ESP in UDP
//!
//! With [`Encapsulation::Udp`](crate::Encapsulation) every SA carries `XFRMA_ENCAP`
//! ([`UdpEncap`]: `UDP_ENCAP_ESPINUDP`, the port at both ends), so the kernel sends ESP inside
//! UDP. It decapsulates ESP in UDP only when it arrives on a UDP socket with
//! `UDP_ENCAP_ESPINUDP` bound to the destination port: [`XfrmBackend::open_esp_in_udp`] opens
//! one, and [`KernelIpsec`] holds it for its lifetime.
//!
//! Dumps ([`XfrmBackend::dump_sas`], [`XfrmBackend::dump_policies`]) return enc's objects
//! only, and the backends refuse to install an object that would not be recognised as enc's,
//! so enc can never create something it would later fail to adopt or clean up.
//! Objects of one peer are those whose mask covers the peer-id bits (31..16); their value
//! there is the peer id ([`peer_of_mark`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;
use serde::Serialize;

use crate::{Error, Result, SaKeys};

mod fake;
mod kernel;
mod netlink;

pub use fake::{FakeOp, FakeXfrm};
pub use kernel::{KernelIpsec, PeerObjects, REPLAY_WINDOW, block_policies, peer_objects};
pub use netlink::NetlinkXfrm;

/// The AEAD of every enc SA.
pub const AEAD_NAME: &str = "rfc4106(gcm(aes))";
/// ICV length of [`AEAD_NAME`], in bits.
pub const AEAD_ICV_BITS: u32 = 128;

/// Position of the magic nibble in the skb mark.
pub const MAGIC_SHIFT: u32 = 8;
/// The magic nibble in place.
pub const MAGIC_MASK: u32 = 0xF << MAGIC_SHIFT;
/// Magic of traffic to be encrypted (set by the pod-side eBPF program).
pub const MAGIC_ENCRYPT: u32 = 0xE;
/// Magic of traffic that an inbound SA decrypted (set by the SA's output mark).
pub const MAGIC_DECRYPTED: u32 = 0xD;
/// The peer-id bits (31..16) in place.
pub const PEER_MASK: u32 = 0xFFFF_0000;
/// The epoch bits (15..12) in place.
pub const EPOCH_MASK: u32 = 0xF000;
/// Mask of outbound marks: peer id, epoch and magic.
pub const OUT_MARK_MASK: u32 = PEER_MASK | EPOCH_MASK | MAGIC_MASK;
/// Mask of the marks of decrypted traffic: peer id and magic (inbound SAs are not bound to
/// the epoch bits, so the sender's epoch survives decryption untouched).
pub const IN_MARK_MASK: u32 = PEER_MASK | MAGIC_MASK;

/// Priorities of enc's policies (lower value = higher precedence in the kernel).
pub const PRIORITY_BAND: RangeInclusive<u32> = 0x0E0C_0000..=0x0E0C_FFFF;
/// Priority of per-peer policies.
pub const PRIORITY_PEER: u32 = 0x0E0C_0100;
/// Priority of the catch-all block policies: numerically larger, so they lose to every
/// per-peer policy and catch only marked traffic that no peer policy takes.
pub const PRIORITY_BLOCK: u32 = 0x0E0C_FF00;

/// The mark of traffic to `peer_id` under key `epoch` (modulo 16): DESIGN §2.
pub const fn encrypt_mark(peer_id: u16, epoch: u8) -> u32 {
    ((peer_id as u32) << 16) | (((epoch & 0xF) as u32) << 12) | (MAGIC_ENCRYPT << MAGIC_SHIFT)
}

/// The mark an inbound SA of `peer_id` puts on what it decrypted.
pub const fn decrypted_mark(peer_id: u16) -> u32 {
    ((peer_id as u32) << 16) | (MAGIC_DECRYPTED << MAGIC_SHIFT)
}

/// The reqid binding a peer's policy templates to its SAs.
pub const fn peer_reqid(peer_id: u16) -> u32 {
    0x0E0C_0000 | peer_id as u32
}

/// Whether a `(value, mask)` mark is enc's: the mask covers the magic nibble and the nibble is
/// `0xE` or `0xD`.
pub const fn is_enc_mark(mark: (u32, u32)) -> bool {
    let (value, mask) = mark;
    let magic = (value & MAGIC_MASK) >> MAGIC_SHIFT;
    mask & MAGIC_MASK == MAGIC_MASK && (magic == MAGIC_ENCRYPT || magic == MAGIC_DECRYPTED)
}

/// The peer an enc mark belongs to: `Some` when the mark is enc's and its mask covers the
/// peer-id bits.
pub const fn peer_of_mark(mark: (u32, u32)) -> Option<u16> {
    if is_enc_mark(mark) && mark.1 & PEER_MASK == PEER_MASK {
        Some((mark.0 >> 16) as u16)
    } else {
        None
    }
}

/// `UDP_ENCAP_ESPINUDP`: ESP in UDP as RFC 3948 defines it (the encapsulation type of
/// `struct xfrm_encap_tmpl`).
pub const UDP_ENCAP_ESPINUDP: u16 = 2;

/// An SA's UDP encapsulation (`XFRMA_ENCAP`, `struct xfrm_encap_tmpl`; the original address
/// `encap_oa` is always zero: enc does no NAT-T address fix-up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UdpEncap {
    /// Encapsulation type; enc uses [`UDP_ENCAP_ESPINUDP`] only.
    pub kind: u16,
    /// UDP source port of the ESP datagrams.
    pub sport: u16,
    /// UDP destination port of the ESP datagrams.
    pub dport: u16,
}

impl UdpEncap {
    /// ESP in UDP from `port` to `port` ([`crate::ESP_IN_UDP_PORT`] in a cluster).
    pub const fn esp_in_udp(port: u16) -> Self {
        Self {
            kind: UDP_ENCAP_ESPINUDP,
            sport: port,
            dport: port,
        }
    }
}

/// Desired state of one ESP SA (tunnel mode, [`AEAD_NAME`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaSpec {
    /// Outer source address.
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
    /// SPI; must equal `keys.spi`.
    pub spi: u32,
    /// Binds the SA to policy templates with the same reqid.
    pub reqid: u32,
    /// Key and salt.
    pub keys: SaKeys,
    /// Match mark `(value, mask)`: the SA is used for packets whose mark matches.
    pub mark: Option<(u32, u32)>,
    /// Output mark `(value, mask)` (`XFRMA_SET_MARK`): set on packets the SA processed.
    pub output_mark: Option<(u32, u32)>,
    /// Anti-replay window in packets (0 for outbound SAs; at most 4096).
    pub replay_window: u32,
    /// 64-bit extended sequence numbers.
    pub esn: bool,
    /// ESP in UDP (`XFRMA_ENCAP`), or `None` for raw ESP (IP protocol 50).
    pub encap: Option<UdpEncap>,
}

/// Largest replay window the kernel takes (`XFRMA_REPLAY_ESN_MAX` bytes of bitmap).
pub const MAX_REPLAY_WINDOW: u32 = 4096;

impl SaSpec {
    /// The id of this SA.
    pub fn id(&self) -> SaId {
        SaId {
            src: self.src,
            dst: self.dst,
            spi: self.spi,
        }
    }

    /// Whether this SA is enc's (see the module docs).
    pub fn is_enc(&self) -> bool {
        self.mark.is_some_and(is_enc_mark) || self.output_mark.is_some_and(is_enc_mark)
    }

    /// Checks what the kernel would refuse, or what enc could not adopt later.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, value: String, reason: &str| Error::Invalid {
            field,
            value,
            reason: reason.to_owned(),
        };
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(invalid(
                "sa.src/dst",
                format!("{} -> {}", self.src, self.dst),
                "source and destination must be of one address family",
            ));
        }
        if self.src.is_unspecified() || self.dst.is_unspecified() {
            return Err(invalid(
                "sa.src/dst",
                format!("{} -> {}", self.src, self.dst),
                "tunnel endpoints must be specified",
            ));
        }
        if self.spi == 0 {
            return Err(invalid("sa.spi", "0".into(), "SPI 0 is reserved"));
        }
        if self.spi != self.keys.spi {
            return Err(invalid(
                "sa.keys.spi",
                format!("{:#010x}", self.keys.spi),
                "differs from sa.spi",
            ));
        }
        if self.replay_window > MAX_REPLAY_WINDOW {
            return Err(invalid(
                "sa.replay_window",
                self.replay_window.to_string(),
                "at most 4096",
            ));
        }
        for (field, mark) in [("sa.mark", self.mark), ("sa.output_mark", self.output_mark)] {
            if let Some((value, mask)) = mark
                && value & !mask != 0
            {
                return Err(invalid(
                    field,
                    format!("{value:#x}/{mask:#x}"),
                    "value has bits outside the mask",
                ));
            }
        }
        if let Some(encap) = self.encap
            && (encap.kind != UDP_ENCAP_ESPINUDP || encap.sport == 0 || encap.dport == 0)
        {
            return Err(invalid(
                "sa.encap",
                format!("{encap:?}"),
                "enc encapsulates as UDP_ENCAP_ESPINUDP (2) between two fixed ports",
            ));
        }
        if !self.is_enc() {
            return Err(invalid(
                "sa.mark",
                format!("{:?} / output {:?}", self.mark, self.output_mark),
                "neither mark carries enc's magic (0xE or 0xD in bits 11..8, fully masked)",
            ));
        }
        Ok(())
    }
}

/// Identifies an SA: the kernel keys SAs by destination, SPI and protocol (always ESP here);
/// `src` is carried for messages only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SaId {
    /// Outer source address (for display).
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
    /// SPI.
    pub spi: u32,
}

impl fmt::Display for SaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spi {:#010x} {} -> {}", self.spi, self.src, self.dst)
    }
}

/// What the kernel reports about one SA. Never holds key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SaSnapshot {
    /// The SA.
    pub id: SaId,
    /// Its reqid.
    pub reqid: u32,
    /// Match mark.
    pub mark: Option<(u32, u32)>,
    /// Output mark.
    pub output_mark: Option<(u32, u32)>,
    /// ESN enabled.
    pub esn: bool,
    /// Anti-replay window in packets.
    pub replay_window: u32,
    /// Last sequence number sent (64-bit with ESN).
    pub oseq: u64,
    /// Highest sequence number received (64-bit with ESN).
    pub seq: u64,
    /// Bytes processed.
    pub bytes: u64,
    /// Packets processed.
    pub packets: u64,
    /// Packets dropped as replays.
    pub replay_drops: u32,
    /// Packets dropped for a failed integrity check.
    pub integrity_failed: u32,
    /// UDP encapsulation, `None` for raw ESP.
    pub encap: Option<UdpEncap>,
}

impl SaSnapshot {
    /// Whether this SA is enc's (see the module docs).
    pub fn is_enc(&self) -> bool {
        self.mark.is_some_and(is_enc_mark) || self.output_mark.is_some_and(is_enc_mark)
    }

    /// The peer this SA belongs to, by the peer-id bits of its match or output mark.
    pub fn peer(&self) -> Option<u16> {
        self.mark
            .and_then(peer_of_mark)
            .or_else(|| self.output_mark.and_then(peer_of_mark))
    }
}

/// Direction of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyDir {
    /// Locally generated or forwarded traffic leaving the node.
    Out,
    /// Traffic delivered to this node.
    In,
    /// Traffic forwarded by this node (to its pods).
    Fwd,
}

/// What a policy does with matching traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyAction {
    /// Let it through (through the template's SA, if there is one).
    Allow,
    /// Drop it.
    Block,
}

/// The SA a policy requires: ESP, tunnel mode, between two node addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Tmpl {
    /// Outer source.
    pub src: IpAddr,
    /// Outer destination.
    pub dst: IpAddr,
    /// Must equal the SA's reqid.
    pub reqid: u32,
}

/// Desired state of one policy. The kernel identifies a policy by selector, direction and
/// mark; `priority`, `action` and `tmpl` are its content.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PolicySpec {
    /// Direction.
    pub dir: PolicyDir,
    /// Inner source prefix.
    pub src: IpNet,
    /// Inner destination prefix.
    pub dst: IpNet,
    /// Mark `(value, mask)`.
    pub mark: (u32, u32),
    /// Priority (lower value wins); in [`PRIORITY_BAND`].
    pub priority: u32,
    /// Allow or block.
    pub action: PolicyAction,
    /// Required SA, for `Allow`.
    pub tmpl: Option<Tmpl>,
}

impl PolicySpec {
    /// Whether this policy is enc's (see the module docs).
    pub fn is_enc(&self) -> bool {
        is_enc_mark(self.mark) && PRIORITY_BAND.contains(&self.priority)
    }

    /// Whether `other` is the same kernel object (selector, direction, mark).
    pub fn same_key(&self, other: &PolicySpec) -> bool {
        self.dir == other.dir
            && self.src == other.src
            && self.dst == other.dst
            && self.mark == other.mark
    }

    /// Checks what the kernel would refuse, or what enc could not adopt later.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, value: String, reason: &str| Error::Invalid {
            field,
            value,
            reason: reason.to_owned(),
        };
        if self.src.addr().is_ipv4() != self.dst.addr().is_ipv4() {
            return Err(invalid(
                "policy.src/dst",
                format!("{} -> {}", self.src, self.dst),
                "selector prefixes must be of one address family",
            ));
        }
        for (field, net) in [("policy.src", self.src), ("policy.dst", self.dst)] {
            if net.trunc() != net {
                return Err(invalid(field, net.to_string(), "host bits set"));
            }
        }
        let (value, mask) = self.mark;
        if value & !mask != 0 {
            return Err(invalid(
                "policy.mark",
                format!("{value:#x}/{mask:#x}"),
                "value has bits outside the mask",
            ));
        }
        if !self.is_enc() {
            return Err(invalid(
                "policy.mark/priority",
                format!("{value:#x}/{mask:#x} priority {:#x}", self.priority),
                "not enc's: needs magic 0xE or 0xD in bits 11..8 (fully masked) and a priority in 0xe0c0000..=0xe0cffff",
            ));
        }
        match (self.action, self.tmpl) {
            (PolicyAction::Block, Some(_)) => Err(invalid(
                "policy.tmpl",
                "Some".into(),
                "a block policy takes no template",
            )),
            (_, Some(tmpl)) if tmpl.src.is_ipv4() != tmpl.dst.is_ipv4() => Err(invalid(
                "policy.tmpl",
                format!("{} -> {}", tmpl.src, tmpl.dst),
                "template endpoints must be of one address family",
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {} -> {} mark {:#x}/{:#x}",
            self.dir, self.src, self.dst, self.mark.0, self.mark.1
        )
    }
}

/// An open ESP-in-UDP socket ([`XfrmBackend::open_esp_in_udp`]): while it lives, the kernel
/// decapsulates ESP in UDP that arrives at its address and port and hands it to the SAs.
/// Dropping it closes the socket.
pub struct EncapSocket {
    at: SocketAddr,
    _hold: Box<dyn std::any::Any + Send + Sync>,
}

impl EncapSocket {
    /// Wraps what keeps the socket open (the socket itself, or a fake's guard) for `at`.
    pub fn new(at: SocketAddr, hold: impl std::any::Any + Send + Sync) -> Self {
        Self {
            at,
            _hold: Box::new(hold),
        }
    }

    /// The address and port the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.at
    }
}

impl fmt::Debug for EncapSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncapSocket")
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

/// The seam over the kernel's XFRM. Every operation is idempotent.
pub trait XfrmBackend: Send + Sync {
    /// Opens a UDP socket bound to `at` with `UDP_ENCAP_ESPINUDP`, in the calling thread's
    /// network namespace (the one the backend works in), so that the kernel decapsulates ESP in UDP arriving there. A taken address
    /// and port is [`Error::PortInUse`].
    fn open_esp_in_udp(&self, at: SocketAddr) -> Result<EncapSocket>;
    /// Adds an SA, or updates the one with the same destination, SPI and mark
    /// (`XFRM_MSG_NEWSA`, then `XFRM_MSG_UPDSA` if it exists). An update keeps the SA's
    /// sequence numbers and replay state, and the kernel keeps its key: a new key comes with a
    /// new SPI.
    fn upsert_sa(&self, sa: &SaSpec) -> Result<()>;
    /// Deletes one of enc's SAs; absent is `Ok`.
    fn delete_sa(&self, id: &SaId) -> Result<()>;
    /// enc's SAs, without key material.
    fn dump_sas(&self) -> Result<Vec<SaSnapshot>>;
    /// Adds or replaces a policy (`XFRM_MSG_UPDPOLICY`).
    fn upsert_policy(&self, p: &PolicySpec) -> Result<()>;
    /// Deletes the policy with `p`'s selector, direction and mark; absent is `Ok`.
    fn delete_policy(&self, p: &PolicySpec) -> Result<()>;
    /// enc's policies.
    fn dump_policies(&self) -> Result<Vec<PolicySpec>>;
}

/// SPI of the probe SA: in 1..=255, which IANA reserves, so no real SA can collide with it.
pub const PROBE_SPI: u32 = 0xE0;

/// Replay window given to outbound SAs. The window means nothing for sending, but kernels
/// before 6.10 refuse an ESN state whose window is 0 ("ESN replay window must be > 0",
/// `EINVAL`), outbound or not.
pub const OUTBOUND_REPLAY_WINDOW: u32 = 32;

/// Start-up probe: can this kernel do ESP with `rfc4106(gcm(aes))`? Adds (and removes) a
/// throwaway SA with [`PROBE_SPI`] from 192.0.2.1 to 198.51.100.1 (TEST-NET-1 and -2, never
/// routed). `Err` carries a reason that quotes the kernel's error.
pub fn probe_esp_gcm(backend: &dyn XfrmBackend) -> std::result::Result<(), String> {
    let src = IpAddr::from([192, 0, 2, 1]);
    let dst = IpAddr::from([198, 51, 100, 1]);
    let sa = SaSpec {
        src,
        dst,
        spi: PROBE_SPI,
        reqid: 0,
        keys: SaKeys {
            spi: PROBE_SPI,
            key: [0x5A; crate::KEY_LEN],
            salt: [0xA5; crate::SALT_LEN],
        },
        // Peer 0xFFFF, epoch 0xF: never assigned to a real peer.
        mark: Some((encrypt_mark(u16::MAX, 0xF), OUT_MARK_MASK)),
        output_mark: None,
        replay_window: OUTBOUND_REPLAY_WINDOW,
        esn: true,
        encap: None,
    };
    let reason = |e: &Error| match e {
        Error::Xfrm { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    backend
        .upsert_sa(&sa)
        .map_err(|e| format!("kernel refused an ESP {AEAD_NAME} SA: {}", reason(&e)))?;
    backend
        .delete_sa(&sa.id())
        .map_err(|e| format!("cannot remove the ESP probe SA: {}", reason(&e)))
}

/// Path of the kernel's XFRM error counters (per network namespace; needs
/// `CONFIG_XFRM_STATISTICS`).
pub const XFRM_STAT_PATH: &str = "/proc/net/xfrm_stat";

/// Names and values of [`XFRM_STAT_PATH`].
pub fn xfrm_stat() -> Result<Vec<(String, u64)>> {
    let text = std::fs::read_to_string(XFRM_STAT_PATH).map_err(|source| Error::Syscall {
        call: "read",
        target: XFRM_STAT_PATH.to_owned(),
        source,
    })?;
    parse_xfrm_stat(&text)
}

fn parse_xfrm_stat(text: &str) -> Result<Vec<(String, u64)>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut fields = line.split_whitespace();
            match (
                fields.next(),
                fields.next().map(str::parse::<u64>),
                fields.next(),
            ) {
                (Some(name), Some(Ok(value)), None) => Ok((name.to_owned(), value)),
                _ => Err(Error::Protocol {
                    op: "read /proc/net/xfrm_stat",
                    reason: format!("unexpected line {line:?}"),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_follow_the_design_layout() {
        assert_eq!(encrypt_mark(0x1234, 3), 0x1234_3E00);
        assert_eq!(
            encrypt_mark(1, 0x13),
            0x0001_3E00,
            "epoch is taken modulo 16"
        );
        assert_eq!(decrypted_mark(0x00AB), 0x00AB_0D00);
        assert!(is_enc_mark((0xE00, 0xF00)));
        assert!(is_enc_mark((0x0001_0D00, IN_MARK_MASK)));
        assert!(!is_enc_mark((0xE00, 0xE00)), "magic not fully masked");
        assert!(!is_enc_mark((0xC00, 0xF00)));
        assert!(!is_enc_mark((0, 0)));
        assert_eq!(peer_of_mark((0x0007_1E00, OUT_MARK_MASK)), Some(7));
        assert_eq!(peer_of_mark((0xE00, 0xF00)), None, "catch-all is nobody's");
    }

    #[test]
    fn xfrm_stat_parses_and_rejects_garbage() {
        let parsed = parse_xfrm_stat("XfrmInError             \t0\nXfrmInNoStates   12\n").unwrap();
        assert_eq!(
            parsed,
            vec![("XfrmInError".into(), 0), ("XfrmInNoStates".into(), 12)]
        );
        assert!(parse_xfrm_stat("XfrmInError x\n").is_err());
    }

    #[test]
    fn xfrm_stat_reads_this_kernel_if_present() {
        if std::path::Path::new(XFRM_STAT_PATH).exists() {
            let stat = xfrm_stat().unwrap();
            assert!(stat.iter().any(|(name, _)| name == "XfrmOutNoStates"));
        }
    }

    #[test]
    fn probe_reports_the_kernel_error() {
        let fake = FakeXfrm::new();
        assert_eq!(probe_esp_gcm(&fake), Ok(()));
        assert!(fake.dump_sas().unwrap().is_empty(), "probe SA removed");
        let refusing = FakeXfrm::new();
        refusing.refuse_sas(libc::ENOSYS);
        let reason = probe_esp_gcm(&refusing).unwrap_err();
        assert!(
            reason.starts_with(
                "kernel refused an ESP rfc4106(gcm(aes)) SA: Function not implemented (os error 38)"
            ),
            "{reason}"
        );
    }
}
