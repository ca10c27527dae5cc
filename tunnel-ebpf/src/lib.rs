//! The enc eBPF datapath: tc programs that mark inter-node pod traffic for encryption, drop
//! what strict mode refuses, and count per peer; and the loader that owns their maps.
//!
//! [`Datapath`] is the seam the agent programs against. [`AyaDatapath`] is the real one (aya,
//! maps and tc links pinned under a per-node directory on bpffs so that state, counters and
//! attachments survive an agent restart); [`FakeDatapath`] is an in-memory stand-in with the
//! same validation, for unit tests of the agent.
//!
//! The programs themselves live in `tunnel-ebpf/ebpf` (built by this crate's build script with
//! nightly and bpf-linker, and embedded in the library); the map layouts they share with this
//! crate are in `enc-tunnel-ebpf-common`. See `tunnel-ebpf/README.md` for the semantics of each
//! hook.

mod aya_datapath;
mod error;
mod fake;

use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

pub use aya_datapath::{AyaDatapath, mount_bpffs};
pub use enc_tunnel_ebpf_common as common;
pub use error::{Error, Result};
pub use fake::FakeDatapath;

/// A peer node id as carried in the skb mark (bits 31..16). 0 means "no peer" and is refused.
pub type PeerId = u16;

/// The encryption backend towards a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// WireGuard (kernel or boringtun): marked traffic is routed into the WireGuard device.
    Wireguard,
    /// IPsec ESP (kernel XFRM or the userspace engine): XFRM policies match the mark.
    Ipsec,
}

impl Backend {
    const fn to_raw(self) -> u32 {
        match self {
            Self::Wireguard => common::BACKEND_WIREGUARD,
            Self::Ipsec => common::BACKEND_IPSEC,
        }
    }

    const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            common::BACKEND_WIREGUARD => Some(Self::Wireguard),
            common::BACKEND_IPSEC => Some(Self::Ipsec),
            _ => None,
        }
    }
}

/// What the datapath knows about a peer node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PeerState {
    /// The peer passed the mutual-TLS node check.
    pub authenticated: bool,
    /// A key for the peer is installed in the backend.
    pub has_key: bool,
    /// The current outbound key epoch; the mark carries `epoch % 16`.
    pub epoch: u8,
    /// The backend that encrypts towards the peer.
    pub backend: Backend,
}

impl PeerState {
    fn to_raw(self) -> common::PeerState {
        let mut flags = 0;
        if self.authenticated {
            flags |= common::PEER_F_AUTHENTICATED;
        }
        if self.has_key {
            flags |= common::PEER_F_HAS_KEY;
        }
        common::PeerState {
            flags,
            epoch: u32::from(self.epoch),
            backend: self.backend.to_raw(),
        }
    }

    fn from_raw(peer: PeerId, raw: common::PeerState) -> Result<Self> {
        let backend = Backend::from_raw(raw.backend).ok_or(Error::InvalidEntry {
            map: common::map_names::PEERS,
            key: u32::from(peer),
            reason: "unknown backend",
        })?;
        let epoch = u8::try_from(raw.epoch).map_err(|_| Error::InvalidEntry {
            map: common::map_names::PEERS,
            key: u32::from(peer),
            reason: "epoch does not fit in u8",
        })?;
        Ok(Self {
            authenticated: raw.authenticated(),
            has_key: raw.has_key(),
            epoch,
            backend,
        })
    }
}

/// Datapath-wide settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DatapathConfig {
    /// Drop what the checks refuse (true), or only count it (false). Until the first
    /// `set_config` the programs are strict.
    pub strict: bool,
    /// Interface index of the decrypt device (the WireGuard device): traffic from a remote pod
    /// CIDR to a local pod is legitimate only if it entered through it (or carries the
    /// decrypted mark). 0 turns that check off.
    pub decrypt_ifindex: u32,
    /// The overlay whose packets are routed into encryption, if pod traffic between nodes is
    /// encapsulated by a kernel VXLAN / Geneve device. The underlay programs then refuse such
    /// packets in plaintext on the wire (judged by their inner addresses), since a legitimate
    /// one only crosses the underlay encrypted. `None`: no overlay check. Set it only when the
    /// overlay's traffic is in fact encrypted, or every overlay packet is refused.
    pub overlay: Option<Overlay>,
}

impl DatapathConfig {
    const fn to_raw(self) -> common::Config {
        common::Config {
            strict: self.strict as u32,
            decrypt_ifindex: self.decrypt_ifindex,
            flags: common::CONFIG_F_VALID,
        }
    }

    /// The `OVERLAY` entry: port 0 when there is no overlay.
    const fn overlay_raw(self) -> common::OverlayConfig {
        match self.overlay {
            Some(o) => o.to_raw(),
            None => common::OverlayConfig { port: 0, kind: 0 },
        }
    }
}

/// A kernel overlay device's encapsulation, as the underlay programs recognise it: UDP to
/// `port` carrying a `kind` header and the inner Ethernet frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Overlay {
    /// The encapsulation.
    pub kind: OverlayKind,
    /// The UDP destination port of the overlay (for example 8472 for VXLAN, 6081 for Geneve;
    /// see [`common::VXLAN_DEFAULT_PORT`] and [`common::GENEVE_DEFAULT_PORT`]). Port 0 turns
    /// the overlay check off, like `None`.
    pub port: u16,
}

impl Overlay {
    const fn to_raw(self) -> common::OverlayConfig {
        common::OverlayConfig {
            port: self.port as u32,
            kind: self.kind.to_raw(),
        }
    }
}

/// An overlay encapsulation: how far past the UDP header the inner Ethernet frame starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverlayKind {
    /// VXLAN (RFC 7348): an 8-byte header.
    Vxlan,
    /// Geneve (RFC 8926): an 8-byte header and `opt_len * 4` bytes of options.
    Geneve,
}

impl OverlayKind {
    const fn to_raw(self) -> u32 {
        match self {
            Self::Vxlan => common::OVERLAY_KIND_VXLAN,
            Self::Geneve => common::OVERLAY_KIND_GENEVE,
        }
    }
}

/// How tc programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// tcx links (kernel >= 6.6), pinned so that they outlive the agent and are replaced atomically.
    Tcx,
    /// A clsact qdisc with cls_bpf filters in direct-action mode (older kernels).
    Clsact,
}

/// Why a packet was dropped (in strict mode), or would have been.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropReason {
    /// The peer is unknown to the datapath or not authenticated.
    PeerNotAuthenticated,
    /// The peer is authenticated but has no key installed.
    PeerNoKey,
    /// Plaintext from a remote pod CIDR arrived on the underlay.
    PlaintextFromUnderlay,
    /// Traffic to a remote pod CIDR would have left the underlay unencrypted.
    UnencryptedEgress,
    /// Traffic from a remote pod CIDR reached a local pod without passing the decrypt path.
    NotDecrypted,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [Self; common::DROP_REASONS] = [
        Self::PeerNotAuthenticated,
        Self::PeerNoKey,
        Self::PlaintextFromUnderlay,
        Self::UnencryptedEgress,
        Self::NotDecrypted,
    ];

    /// Stable SCREAMING_CASE name, for logs and metric labels.
    pub const fn name(self) -> &'static str {
        self.to_raw().name()
    }

    /// Stable kebab-case label, as the status API and `encctl` show it.
    pub const fn label(self) -> &'static str {
        match self {
            Self::PeerNotAuthenticated => "peer-not-authenticated",
            Self::PeerNoKey => "peer-no-key",
            Self::PlaintextFromUnderlay => "plaintext-from-underlay",
            Self::UnencryptedEgress => "unencrypted-egress",
            Self::NotDecrypted => "not-decrypted",
        }
    }

    const fn to_raw(self) -> common::DropReason {
        match self {
            Self::PeerNotAuthenticated => common::DropReason::PeerNotAuthenticated,
            Self::PeerNoKey => common::DropReason::PeerNoKey,
            Self::PlaintextFromUnderlay => common::DropReason::PlaintextFromUnderlay,
            Self::UnencryptedEgress => common::DropReason::UnencryptedEgress,
            Self::NotDecrypted => common::DropReason::NotDecrypted,
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-peer counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerCounters {
    /// Packets marked for encryption towards the peer.
    pub steered_packets: u64,
    /// Bytes (skb length) marked for encryption towards the peer.
    pub steered_bytes: u64,
    /// Packets dropped (strict) or that would have been dropped, by reason; reasons with no
    /// packet are left out.
    pub drops: BTreeMap<DropReason, u64>,
    /// Packets towards the peer's pod CIDRs seen leaving on the underlay unencrypted.
    pub leak_packets: u64,
    /// Bytes of those packets.
    pub leak_bytes: u64,
}

impl PeerCounters {
    fn add_raw(&mut self, raw: &common::PeerCounters) {
        self.steered_packets = self.steered_packets.wrapping_add(raw.steered_packets);
        self.steered_bytes = self.steered_bytes.wrapping_add(raw.steered_bytes);
        self.leak_packets = self.leak_packets.wrapping_add(raw.leak_packets);
        self.leak_bytes = self.leak_bytes.wrapping_add(raw.leak_bytes);
        for reason in DropReason::ALL {
            let n = raw
                .drop_packets
                .get(reason.to_raw().index())
                .copied()
                .unwrap_or(0);
            if n != 0 {
                let e = self.drops.entry(reason).or_insert(0);
                *e = e.wrapping_add(n);
            }
        }
    }

    /// Packets dropped (or that would have been) for `reason`.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops.get(&reason).copied().unwrap_or(0)
    }
}

/// A tc hook the programs attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    /// Ingress of a pod-facing veth (packets from a local pod): marking and outbound strict mode.
    PodIngress,
    /// Egress of a pod-facing veth (packets to a local pod): inbound strict mode.
    PodEgress,
    /// Ingress of the underlay interface: plaintext pod traffic on the wire is refused.
    UnderlayIngress,
    /// Egress of the underlay interface: the leak sentinel.
    UnderlayEgress,
}

impl Hook {
    /// Every hook.
    pub const ALL: [Self; 4] = [
        Self::PodIngress,
        Self::PodEgress,
        Self::UnderlayIngress,
        Self::UnderlayEgress,
    ];

    /// The name of the program attached at this hook (`tunnel_<hook>`).
    pub const fn program_name(self) -> &'static str {
        use common::program_names as p;
        match self {
            Self::PodIngress => p::POD_INGRESS,
            Self::PodEgress => p::POD_EGRESS,
            Self::UnderlayIngress => p::UNDERLAY_INGRESS,
            Self::UnderlayEgress => p::UNDERLAY_EGRESS,
        }
    }

    /// Short kebab-case name (also the directory of its link pins).
    pub const fn slug(self) -> &'static str {
        match self {
            Self::PodIngress => "pod-ingress",
            Self::PodEgress => "pod-egress",
            Self::UnderlayIngress => "underlay-ingress",
            Self::UnderlayEgress => "underlay-egress",
        }
    }

    const fn is_ingress(self) -> bool {
        matches!(self, Self::PodIngress | Self::UnderlayIngress)
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.slug())
    }
}

/// The outcome of running a program once (or `repeat` times) on a packet with
/// `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The tc action the program returned: [`TC_ACT_UNSPEC`] (-1, no objection) or
    /// [`TC_ACT_SHOT`] (2, drop).
    pub action: i32,
    /// The skb mark after the program ran.
    pub mark: u32,
    /// Average time of one run, as the kernel measured it.
    pub duration: Duration,
}

/// tc action the programs return for "no objection": `TC_ACT_UNSPEC` (-1), which tcx calls
/// `TCX_NEXT`. The next tcx program (another component's) or clsact filter runs, and at the
/// end of the chain the packet goes on. The programs never return [`TC_ACT_OK`].
pub const TC_ACT_UNSPEC: i32 = -1;
/// tc action `TC_ACT_OK` (0; `TCX_PASS` under tcx): let the packet through *and skip every
/// program attached after this one*. The programs do not return it; it is exported for
/// callers that want to assert so.
pub const TC_ACT_OK: i32 = 0;
/// tc action: drop the packet.
pub const TC_ACT_SHOT: i32 = 2;

/// The seam between the agent and the eBPF datapath. Every operation is idempotent.
pub trait Datapath: Send + Sync {
    /// How programs are attached on this kernel.
    fn attach_mode(&self) -> AttachMode;
    /// Sets the datapath-wide configuration (`CONFIG`, and the overlay in `OVERLAY`).
    fn set_config(&self, cfg: DatapathConfig) -> Result<()>;
    /// Maps a remote pod CIDR to its peer node. The CIDR must have no host bits set and the
    /// peer id must not be 0. Overlapping CIDRs are allowed: the longest prefix wins. Each
    /// family may use at most [`common::MAX_PREFIX_LENS`] distinct prefix lengths; a CIDR
    /// that would need one more is refused with [`Error::TooManyPrefixLengths`].
    fn upsert_cidr(&self, cidr: IpNet, peer: PeerId) -> Result<()>;
    /// Removes a remote pod CIDR; an absent one is Ok.
    fn delete_cidr(&self, cidr: IpNet) -> Result<()>;
    /// Every remote pod CIDR and its peer.
    fn dump_cidrs(&self) -> Result<Vec<(IpNet, PeerId)>>;
    /// Sets what the datapath knows about a peer.
    fn upsert_peer(&self, peer: PeerId, state: PeerState) -> Result<()>;
    /// Forgets a peer and clears its counters; an absent one is Ok.
    fn delete_peer(&self, peer: PeerId) -> Result<()>;
    /// Every peer and its state.
    fn dump_peers(&self) -> Result<Vec<(PeerId, PeerState)>>;
    /// Per-peer counters, summed over CPUs.
    fn counters(&self) -> Result<BTreeMap<PeerId, PeerCounters>>;
    /// Attaches the pod programs (ingress and egress) to a pod-facing interface; already
    /// attached = Ok.
    fn attach_pod(&self, ifname: &str) -> Result<()>;
    /// Detaches the pod programs from an interface; not attached = Ok.
    fn detach_pod(&self, ifname: &str) -> Result<()>;
    /// Attaches the underlay programs (ingress and egress) to the underlay interface; already
    /// attached = Ok.
    fn attach_underlay(&self, ifname: &str) -> Result<()>;
    /// (ifname, hook) pairs currently attached by us.
    fn attached(&self) -> Result<Vec<(String, Hook)>>;
}

/// The distinct prefix lengths in use per family, as the programs see them (`PREFIX_LENS`):
/// a count of CIDRs per length, so that a length is dropped when its last CIDR goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PrefixLenSet {
    v4: BTreeMap<u8, u32>,
    v6: BTreeMap<u8, u32>,
}

impl PrefixLenSet {
    fn family(&self, cidr: IpNet) -> &BTreeMap<u8, u32> {
        match cidr {
            IpNet::V4(_) => &self.v4,
            IpNet::V6(_) => &self.v6,
        }
    }

    fn family_mut(&mut self, cidr: IpNet) -> &mut BTreeMap<u8, u32> {
        match cidr {
            IpNet::V4(_) => &mut self.v4,
            IpNet::V6(_) => &mut self.v6,
        }
    }

    /// The lengths in use for the family of `cidr`, longest first.
    fn in_use(&self, cidr: IpNet) -> Vec<u8> {
        self.family(cidr).keys().rev().copied().collect()
    }

    /// Whether `cidr` brings a new prefix length to its family; an error if that would exceed
    /// [`common::MAX_PREFIX_LENS`].
    fn check_new(&self, cidr: IpNet) -> Result<bool> {
        let lens = self.family(cidr);
        if lens.contains_key(&cidr.prefix_len()) {
            return Ok(false);
        }
        if lens.len() >= common::MAX_PREFIX_LENS {
            return Err(Error::TooManyPrefixLengths {
                cidr,
                limit: common::MAX_PREFIX_LENS,
                in_use: self.in_use(cidr),
            });
        }
        Ok(true)
    }

    /// Counts one more CIDR (call only for a CIDR that was not there yet).
    fn add(&mut self, cidr: IpNet) {
        *self.family_mut(cidr).entry(cidr.prefix_len()).or_insert(0) += 1;
    }

    /// Counts one CIDR less; returns whether that was the last of its length (now dropped).
    fn remove(&mut self, cidr: IpNet) -> bool {
        let lens = self.family_mut(cidr);
        let len = cidr.prefix_len();
        match lens.get_mut(&len) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                lens.remove(&len);
                true
            }
            None => false,
        }
    }

    /// The `PREFIX_LENS` value of a family (`v4` or not), longest first.
    fn to_raw(&self, v4: bool) -> common::PrefixLens {
        let lens = if v4 { &self.v4 } else { &self.v6 };
        let mut raw = common::PrefixLens::default();
        for (slot, len) in raw.lens.iter_mut().zip(lens.keys().rev()) {
            *slot = *len;
            raw.count += 1;
        }
        raw
    }
}

/// Checks a CIDR and peer id before they reach a map.
fn validate_cidr(cidr: IpNet) -> Result<()> {
    if cidr.trunc() != cidr {
        return Err(Error::InvalidCidr {
            cidr,
            reason: "host bits are set",
        });
    }
    Ok(())
}

fn validate_peer(peer: PeerId) -> Result<()> {
    if peer == 0 {
        return Err(Error::InvalidPeerId { peer });
    }
    Ok(())
}

/// Checks an interface name (it also names a pin) with [`enc_sys::tun::validate_ifname`]: 1 to
/// 15 bytes, no '/', '%', ':', whitespace or control characters.
fn validate_ifname(ifname: &str) -> Result<()> {
    enc_sys::tun::validate_ifname(ifname).map_err(|e| match e {
        enc_sys::Error::InvalidIfname { ifname, reason } => Error::InvalidIfname { ifname, reason },
        // Validation reports nothing else; keep the name in any case.
        _ => Error::InvalidIfname {
            ifname: ifname.to_owned(),
            reason: "rejected",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_state_round_trips_through_raw() {
        for authenticated in [false, true] {
            for has_key in [false, true] {
                for backend in [Backend::Wireguard, Backend::Ipsec] {
                    let s = PeerState {
                        authenticated,
                        has_key,
                        epoch: 200,
                        backend,
                    };
                    assert_eq!(PeerState::from_raw(3, s.to_raw()).unwrap(), s);
                }
            }
        }
    }

    #[test]
    fn corrupt_peer_entry_is_an_error_naming_the_peer() {
        let raw = common::PeerState {
            flags: 3,
            epoch: 1,
            backend: 9,
        };
        let err = PeerState::from_raw(7, raw).unwrap_err();
        assert!(err.to_string().contains("PEERS"), "{err}");
        assert!(err.to_string().contains('7'), "{err}");
    }

    #[test]
    fn counters_sum_and_skip_zero_reasons() {
        let mut raw = common::PeerCounters {
            steered_packets: 2,
            steered_bytes: 200,
            leak_packets: 1,
            leak_bytes: 60,
            ..Default::default()
        };
        raw.drop_packets[common::DropReason::NotDecrypted.index()] = 4;
        let mut c = PeerCounters::default();
        c.add_raw(&raw);
        c.add_raw(&raw);
        assert_eq!(c.steered_packets, 4);
        assert_eq!(c.steered_bytes, 400);
        assert_eq!(c.leak_packets, 2);
        assert_eq!(c.leak_bytes, 120);
        assert_eq!(c.drops.len(), 1);
        assert_eq!(c.drops_for(DropReason::NotDecrypted), 8);
        assert_eq!(c.drops_for(DropReason::PeerNoKey), 0);
    }

    #[test]
    fn drop_reason_names_and_serde() {
        assert_eq!(DropReason::PeerNoKey.name(), "PEER_NO_KEY");
        assert_eq!(
            serde_json::to_string(&DropReason::UnencryptedEgress).unwrap(),
            "\"unencrypted-egress\""
        );
        assert_eq!(DropReason::ALL.len(), common::DROP_REASONS);
    }

    #[test]
    fn overlay_to_raw_and_serde() {
        let mut cfg = DatapathConfig {
            strict: true,
            decrypt_ifindex: 3,
            overlay: None,
        };
        assert_eq!(cfg.overlay_raw(), common::OverlayConfig::default());
        assert!(!cfg.overlay_raw().enabled());
        cfg.overlay = Some(Overlay {
            kind: OverlayKind::Geneve,
            port: common::GENEVE_DEFAULT_PORT,
        });
        assert_eq!(
            cfg.overlay_raw(),
            common::OverlayConfig {
                port: 6081,
                kind: common::OVERLAY_KIND_GENEVE
            }
        );
        let vxlan = Overlay {
            kind: OverlayKind::Vxlan,
            port: common::VXLAN_DEFAULT_PORT,
        };
        assert_eq!(vxlan.to_raw().kind, common::OVERLAY_KIND_VXLAN);
        assert_eq!(vxlan.to_raw().port, 8472);
        assert_eq!(
            serde_json::to_value(cfg).unwrap()["overlay"],
            serde_json::json!({"kind": "geneve", "port": 6081})
        );
        assert_eq!(
            serde_json::to_string(&OverlayKind::Vxlan).unwrap(),
            "\"vxlan\""
        );
    }

    #[test]
    fn ifname_validation() {
        for ok in ["eth0", "veth1234abcd", "enc-wg0", "eth0.100"] {
            validate_ifname(ok).unwrap();
        }
        for bad in ["", "a/b", "a b", "0123456789abcdef", "..", "x:y"] {
            let err = validate_ifname(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidIfname { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn hook_names() {
        for hook in Hook::ALL {
            assert!(hook.program_name().starts_with("tunnel_"));
            assert_eq!(
                hook.program_name()["tunnel_".len()..],
                hook.slug().replace('-', "_")
            );
        }
    }
}
