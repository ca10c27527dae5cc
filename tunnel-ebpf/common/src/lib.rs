//! Map keys, values and constants shared by the enc tc programs and their loader.
//!
//! Everything here is `#[repr(C)]` plain data with a fixed layout: the programs
//! (`enc-tunnel-ebpf-programs`, built for the BPF target) and the loader (`enc-tunnel-ebpf`)
//! both compile this crate, and the kernel hands the bytes from one to the other. With the
//! `user` feature the types implement `aya::Pod`, so the loader can store them in maps.
//!
//! # skb mark layout
//!
//! ```text
//!  31            16 15     12 11      8 7        0
//! +----------------+---------+---------+----------+
//! |  peer node id  |  epoch  |  magic  | (theirs) |
//! +----------------+---------+---------+----------+
//! ```
//!
//! Magic `0xE` asks the kernel to encrypt towards the peer (an `ip rule fwmark` sends it to the
//! WireGuard device, or an XFRM policy matches it); magic `0xD` marks decrypted traffic. Bits
//! 7..0 are not ours: the programs leave them as they found them.
#![no_std]

/// Mark magic: the packet is to be encrypted towards the peer in the mark.
pub const MARK_MAGIC_ENCRYPT: u32 = 0xE;
/// Mark magic: the packet was decrypted (set by the decrypt path, for example an XFRM output mark).
pub const MARK_MAGIC_DECRYPTED: u32 = 0xD;
/// The magic nibble in place in the mark (bits 11..8).
pub const MARK_MAGIC_MASK: u32 = 0xF00;
/// Shift of the magic nibble.
pub const MARK_MAGIC_SHIFT: u32 = 8;
/// The epoch slot in place in the mark (bits 15..12).
pub const MARK_EPOCH_MASK: u32 = 0xF000;
/// Shift of the epoch slot.
pub const MARK_EPOCH_SHIFT: u32 = 12;
/// The peer node id in place in the mark (bits 31..16).
pub const MARK_PEER_MASK: u32 = 0xFFFF_0000;
/// Shift of the peer node id.
pub const MARK_PEER_SHIFT: u32 = 16;
/// The bits of the mark that enc owns (31..8); the programs keep the others.
pub const MARK_OWNED_MASK: u32 = MARK_PEER_MASK | MARK_EPOCH_MASK | MARK_MAGIC_MASK;
/// Number of distinct epoch slots (the epoch is stored modulo this).
pub const EPOCH_SLOTS: u8 = 16;

/// The mark that steers a packet into encryption towards `peer` with key epoch `epoch`.
/// The epoch is stored in 4 bits: only `epoch % 16` survives.
#[inline(always)]
pub const fn encrypt_mark(peer: u16, epoch: u8) -> u32 {
    ((peer as u32) << MARK_PEER_SHIFT)
        | (((epoch & 0x0F) as u32) << MARK_EPOCH_SHIFT)
        | (MARK_MAGIC_ENCRYPT << MARK_MAGIC_SHIFT)
}

/// The magic nibble of a mark (`MARK_MAGIC_ENCRYPT`, `MARK_MAGIC_DECRYPTED` or anything else).
#[inline(always)]
pub const fn mark_magic(mark: u32) -> u32 {
    (mark & MARK_MAGIC_MASK) >> MARK_MAGIC_SHIFT
}

/// The peer node id of a mark (0 = none).
#[inline(always)]
pub const fn mark_peer(mark: u32) -> u16 {
    ((mark & MARK_PEER_MASK) >> MARK_PEER_SHIFT) as u16
}

/// The epoch slot of a mark (0..=15).
#[inline(always)]
pub const fn mark_epoch(mark: u32) -> u8 {
    ((mark & MARK_EPOCH_MASK) >> MARK_EPOCH_SHIFT) as u8
}

/// Names of the maps, as the programs declare them and as they are pinned.
pub mod map_names {
    /// IPv4 remote pod CIDRs: `HashMap<NetKeyV4 (prefix length, masked address), u32 peer id>`.
    pub const REMOTE_NETS_V4: &str = "REMOTE_NETS_V4";
    /// IPv6 remote pod CIDRs: `HashMap<NetKeyV6 (prefix length, masked address), u32 peer id>`.
    pub const REMOTE_NETS_V6: &str = "REMOTE_NETS_V6";
    /// The distinct prefix lengths in `REMOTE_NETS_V4` / `REMOTE_NETS_V6`, longest first:
    /// `HashMap<u32 family (PREFIX_LENS_V4 / PREFIX_LENS_V6), PrefixLens>`.
    pub const PREFIX_LENS: &str = "PREFIX_LENS";
    /// Peer states: `HashMap<u32 peer id, PeerState>`.
    pub const PEERS: &str = "PEERS";
    /// Per-CPU per-peer counters: `PerCpuHashMap<u32 peer id, PeerCounters>`.
    pub const COUNTERS: &str = "COUNTERS";
    /// The datapath configuration: `Array<Config>` with one entry.
    pub const CONFIG: &str = "CONFIG";
    /// The overlay (VXLAN / Geneve) the underlay programs recognise: `Array<OverlayConfig>`
    /// with one entry. A separate map rather than new `Config` fields, so that a `CONFIG`
    /// pinned by an earlier version keeps its layout; a pin directory without it simply gets
    /// it created (zeroed: no overlay check) on the next load.
    pub const OVERLAY: &str = "OVERLAY";
    /// Every map, in a fixed order.
    pub const ALL: [&str; 7] = [
        REMOTE_NETS_V4,
        REMOTE_NETS_V6,
        PREFIX_LENS,
        PEERS,
        COUNTERS,
        CONFIG,
        OVERLAY,
    ];
    /// The LPM-trie maps of earlier versions (`LpmTrie<[u8; 4] / [u8; 16], u32 peer id>`).
    /// The loader moves their entries into `REMOTE_NETS_*` and unpins them.
    pub const LEGACY_REMOTE_CIDRS_V4: &str = "REMOTE_CIDRS_V4";
    /// See `LEGACY_REMOTE_CIDRS_V4`.
    pub const LEGACY_REMOTE_CIDRS_V6: &str = "REMOTE_CIDRS_V6";
}

/// Names of the programs (the ELF symbols the loader looks up).
pub mod program_names {
    /// tc ingress of a pod-facing veth: packets from a local pod.
    pub const POD_INGRESS: &str = "tunnel_pod_ingress";
    /// tc egress of a pod-facing veth: packets to a local pod.
    pub const POD_EGRESS: &str = "tunnel_pod_egress";
    /// tc ingress of the underlay interface.
    pub const UNDERLAY_INGRESS: &str = "tunnel_underlay_ingress";
    /// tc egress of the underlay interface: the leak sentinel.
    pub const UNDERLAY_EGRESS: &str = "tunnel_underlay_egress";
}

/// Capacity of each remote-CIDR map (`REMOTE_NETS_V4`, `REMOTE_NETS_V6`).
pub const MAX_CIDRS: u32 = 65536;
/// Capacity of `PEERS` and `COUNTERS`.
pub const MAX_PEERS: u32 = 65536;
/// How many distinct prefix lengths each family's remote CIDRs may use. The programs try
/// each length in use (longest first) with one hash lookup, so this bounds the per-packet
/// cost; the loader refuses a CIDR that would need one more.
pub const MAX_PREFIX_LENS: usize = 16;
/// `PREFIX_LENS` key of the IPv4 list.
pub const PREFIX_LENS_V4: u32 = 4;
/// `PREFIX_LENS` key of the IPv6 list.
pub const PREFIX_LENS_V6: u32 = 6;

/// Key of `REMOTE_NETS_V4`: a CIDR as (prefix length, address with the host bits cleared).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetKeyV4 {
    /// 0..=32.
    pub prefix_len: u32,
    /// The network address in network byte order; bits past `prefix_len` are zero.
    pub addr: [u8; 4],
}

impl NetKeyV4 {
    /// The key of the `prefix_len` network holding `addr` (host bits cleared). A
    /// `prefix_len` above 32 is taken as 32.
    #[inline(always)]
    pub const fn masked(addr: [u8; 4], prefix_len: u32) -> Self {
        let len = if prefix_len > 32 { 32 } else { prefix_len };
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Self {
            prefix_len: len,
            addr: (u32::from_be_bytes(addr) & mask).to_be_bytes(),
        }
    }
}

/// Key of `REMOTE_NETS_V6`: a CIDR as (prefix length, address with the host bits cleared).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetKeyV6 {
    /// 0..=128.
    pub prefix_len: u32,
    /// The network address in network byte order; bits past `prefix_len` are zero.
    pub addr: [u8; 16],
}

/// The top `len` bits of a u64 set (`len` 0..=64).
#[inline(always)]
const fn high_bits(len: u32) -> u64 {
    if len == 0 {
        0
    } else if len >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - len)
    }
}

impl NetKeyV6 {
    /// The key of the `prefix_len` network holding `addr` (host bits cleared). A
    /// `prefix_len` above 128 is taken as 128.
    #[inline(always)]
    pub const fn masked(addr: [u8; 16], prefix_len: u32) -> Self {
        let len = if prefix_len > 128 { 128 } else { prefix_len };
        // Two u64 halves: 128-bit arithmetic is not available on the BPF target.
        let hi = u64::from_be_bytes([
            addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
        ]) & high_bits(len);
        let lo = u64::from_be_bytes([
            addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15],
        ]) & high_bits(len.saturating_sub(64));
        let h = hi.to_be_bytes();
        let l = lo.to_be_bytes();
        Self {
            prefix_len: len,
            addr: [
                h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5],
                l[6], l[7],
            ],
        }
    }
}

/// Value of `PREFIX_LENS`: the distinct prefix lengths of one family's remote CIDRs, longest
/// first. Written by the loader as a whole (a hash-map update replaces the value, so the
/// programs never see a half-written list).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixLens {
    /// How many entries of `lens` are in use (0..=MAX_PREFIX_LENS).
    pub count: u32,
    /// The lengths, strictly decreasing; entries past `count` are 0 and unused.
    pub lens: [u8; MAX_PREFIX_LENS],
}

/// `PeerState::flags` bit: the peer passed the mutual-TLS node check.
pub const PEER_F_AUTHENTICATED: u32 = 1 << 0;
/// `PeerState::flags` bit: a key for the peer is installed in the backend.
pub const PEER_F_HAS_KEY: u32 = 1 << 1;

/// `PeerState::backend`: WireGuard.
pub const BACKEND_WIREGUARD: u32 = 1;
/// `PeerState::backend`: IPsec (ESP).
pub const BACKEND_IPSEC: u32 = 2;

/// Value of `PEERS`: what the datapath knows about a peer node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerState {
    /// `PEER_F_*` bits.
    pub flags: u32,
    /// Current outbound key epoch (only the low 4 bits reach the mark).
    pub epoch: u32,
    /// `BACKEND_*`.
    pub backend: u32,
}

impl PeerState {
    /// Whether the peer is authenticated.
    #[inline(always)]
    pub const fn authenticated(&self) -> bool {
        self.flags & PEER_F_AUTHENTICATED != 0
    }

    /// Whether a key for the peer is installed.
    #[inline(always)]
    pub const fn has_key(&self) -> bool {
        self.flags & PEER_F_HAS_KEY != 0
    }
}

/// Why a packet was dropped (or, outside strict mode, would have been). The value is the
/// index into `PeerCounters::drop_packets` / `drop_bytes`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// The peer has no `PEERS` entry or is not authenticated.
    PeerNotAuthenticated = 0,
    /// The peer is authenticated but has no key installed.
    PeerNoKey = 1,
    /// Plaintext pod traffic from a remote pod CIDR arrived on the underlay.
    PlaintextFromUnderlay = 2,
    /// Traffic to a remote pod CIDR was about to leave on the underlay unencrypted.
    UnencryptedEgress = 3,
    /// Traffic from a remote pod CIDR reached a local pod without passing the decrypt path.
    NotDecrypted = 4,
}

/// Number of drop reasons (length of the per-reason counter arrays).
pub const DROP_REASONS: usize = 5;

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [Self; DROP_REASONS] = [
        Self::PeerNotAuthenticated,
        Self::PeerNoKey,
        Self::PlaintextFromUnderlay,
        Self::UnencryptedEgress,
        Self::NotDecrypted,
    ];

    /// Index into the per-reason counter arrays.
    #[inline(always)]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The reason with this index, if any.
    pub const fn from_index(index: usize) -> Option<Self> {
        if index < DROP_REASONS {
            Some(Self::ALL[index])
        } else {
            None
        }
    }

    /// Stable SCREAMING_CASE name, for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PeerNotAuthenticated => "PEER_NOT_AUTHENTICATED",
            Self::PeerNoKey => "PEER_NO_KEY",
            Self::PlaintextFromUnderlay => "PLAINTEXT_FROM_UNDERLAY",
            Self::UnencryptedEgress => "UNENCRYPTED_EGRESS",
            Self::NotDecrypted => "NOT_DECRYPTED",
        }
    }
}

/// Value of `COUNTERS` (per CPU): what the programs did with a peer's traffic.
/// All fields are `u64` so the layout has no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Packets marked for encryption towards the peer (pod ingress).
    pub steered_packets: u64,
    /// Bytes (skb length, L2 included) marked for encryption towards the peer.
    pub steered_bytes: u64,
    /// Packets dropped (strict) or that would have been dropped, by `DropReason` index.
    pub drop_packets: [u64; DROP_REASONS],
    /// Bytes dropped or that would have been dropped, by `DropReason` index.
    pub drop_bytes: [u64; DROP_REASONS],
    /// Packets towards the peer's pod CIDRs seen leaving on the underlay unencrypted.
    pub leak_packets: u64,
    /// Bytes of those packets.
    pub leak_bytes: u64,
}

/// `Config::flags` bit: the entry was written by the agent. Without it (a fresh, zeroed map)
/// the programs run in strict mode with the decrypt-interface check off: fail closed.
pub const CONFIG_F_VALID: u32 = 1 << 0;

/// The single entry of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Non-zero: drop what the checks refuse. Zero: count only.
    pub strict: u32,
    /// Interface index of the decrypt device (the WireGuard device); 0 turns the check off.
    pub decrypt_ifindex: u32,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
}

impl Config {
    /// Whether the programs drop (true) or only count (false). A never-written entry is strict.
    #[inline(always)]
    pub const fn is_strict(&self) -> bool {
        self.flags & CONFIG_F_VALID == 0 || self.strict != 0
    }
}

/// `OverlayConfig::kind`: VXLAN (RFC 7348), an 8-byte header after UDP.
pub const OVERLAY_KIND_VXLAN: u32 = 1;
/// `OverlayConfig::kind`: Geneve (RFC 8926), an 8-byte header plus `opt_len * 4` bytes of
/// options after UDP.
pub const OVERLAY_KIND_GENEVE: u32 = 2;
/// Linux's historical VXLAN UDP port (the vxlan module's default; flannel and Cilium use it),
/// not IANA's 4789.
pub const VXLAN_DEFAULT_PORT: u16 = 8472;
/// IANA UDP port of Geneve.
pub const GENEVE_DEFAULT_PORT: u16 = 6081;

/// The single entry of `OVERLAY`: which UDP packets on the underlay are pod traffic
/// encapsulated by a kernel overlay device. When encryption is on, such packets are routed into
/// the encryption device, so on the underlay they must never appear in plaintext; the underlay
/// programs look up their inner addresses and refuse them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayConfig {
    /// UDP destination port of the overlay, in host byte order; 0 (a fresh, zeroed map) turns
    /// the overlay check off.
    pub port: u32,
    /// `OVERLAY_KIND_VXLAN` or `OVERLAY_KIND_GENEVE`; any other value is parsed as VXLAN.
    pub kind: u32,
}

impl OverlayConfig {
    /// Whether the overlay check is on.
    #[inline(always)]
    pub const fn enabled(&self) -> bool {
        self.port != 0
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers (arrays included), and
    // have no padding (u32 x3; u64 x14; u32 x3; u32 + [u8; 4]; u32 + [u8; 16];
    // u32 + [u8; 16]; u32 x2), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PeerState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PeerCounters {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::NetKeyV4 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::NetKeyV6 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PrefixLens {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::OverlayConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encrypt_mark_layout() {
        assert_eq!(encrypt_mark(0x1234, 5), 0x1234_5E00);
        assert_eq!(encrypt_mark(0, 0), 0x0000_0E00);
        assert_eq!(encrypt_mark(u16::MAX, 0x1F), 0xFFFF_FE00);
        assert_eq!(encrypt_mark(7, 3) & !MARK_OWNED_MASK, 0);
    }

    #[test]
    fn magic_constants_fit_the_mask() {
        assert_eq!(MARK_MAGIC_ENCRYPT << MARK_MAGIC_SHIFT & !MARK_MAGIC_MASK, 0);
        assert_eq!(
            MARK_MAGIC_DECRYPTED << MARK_MAGIC_SHIFT & !MARK_MAGIC_MASK,
            0
        );
        assert_eq!(mark_magic(0xD00), MARK_MAGIC_DECRYPTED);
    }

    #[test]
    fn drop_reason_indices_and_names() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(DropReason::from_index(i), Some(*r));
        }
        assert_eq!(DropReason::from_index(DROP_REASONS), None);
        assert_eq!(DropReason::NotDecrypted.name(), "NOT_DECRYPTED");
    }

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<PeerState>(), 12);
        assert_eq!(core::mem::size_of::<Config>(), 12);
        assert_eq!(
            core::mem::size_of::<PeerCounters>(),
            8 * (4 + 2 * DROP_REASONS)
        );
        assert_eq!(core::mem::size_of::<NetKeyV4>(), 8);
        assert_eq!(core::mem::size_of::<NetKeyV6>(), 20);
        assert_eq!(core::mem::size_of::<PrefixLens>(), 4 + MAX_PREFIX_LENS);
        assert_eq!(core::mem::size_of::<OverlayConfig>(), 8);
    }

    #[test]
    fn zeroed_overlay_is_off() {
        assert!(!OverlayConfig::default().enabled());
        let vxlan = OverlayConfig {
            port: u32::from(VXLAN_DEFAULT_PORT),
            kind: OVERLAY_KIND_VXLAN,
        };
        assert!(vxlan.enabled());
        assert_ne!(OVERLAY_KIND_VXLAN, OVERLAY_KIND_GENEVE);
        assert!(map_names::ALL.contains(&map_names::OVERLAY));
    }

    #[test]
    fn net_keys_mask_host_bits() {
        let k = NetKeyV4::masked([10, 244, 2, 77], 24);
        assert_eq!(
            k,
            NetKeyV4 {
                prefix_len: 24,
                addr: [10, 244, 2, 0]
            }
        );
        assert_eq!(NetKeyV4::masked([10, 244, 2, 77], 0).addr, [0; 4]);
        assert_eq!(
            NetKeyV4::masked([10, 244, 2, 77], 32).addr,
            [10, 244, 2, 77]
        );
        assert_eq!(NetKeyV4::masked([10, 244, 2, 77], 40).prefix_len, 32);
        assert_eq!(
            NetKeyV4::masked([10, 244, 255, 77], 17).addr,
            [10, 244, 128, 0]
        );
        let a = [
            0xfd, 0, 0, 2, 0xab, 0xcd, 0xef, 0x12, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        assert_eq!(NetKeyV6::masked(a, 128).addr, a);
        assert_eq!(NetKeyV6::masked(a, 0).addr, [0; 16]);
        assert_eq!(
            NetKeyV6::masked(a, 64).addr,
            [
                0xfd, 0, 0, 2, 0xab, 0xcd, 0xef, 0x12, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(
            NetKeyV6::masked(a, 20).addr,
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            NetKeyV6::masked(a, 68).addr,
            [
                0xfd, 0, 0, 2, 0xab, 0xcd, 0xef, 0x12, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(NetKeyV6::masked(a, 72).addr[8], 1);
        assert_eq!(NetKeyV6::masked(a, 200).prefix_len, 128);
    }

    #[test]
    fn unwritten_config_is_strict() {
        assert!(Config::default().is_strict());
        let relaxed = Config {
            strict: 0,
            decrypt_ifindex: 0,
            flags: CONFIG_F_VALID,
        };
        assert!(!relaxed.is_strict());
        assert!(
            Config {
                strict: 1,
                ..relaxed
            }
            .is_strict()
        );
    }

    /// Reference masking, bit by bit.
    fn mask_bits<const N: usize>(addr: [u8; N], len: u32) -> [u8; N] {
        let mut out = [0u8; N];
        for bit in 0..(len as usize).min(N * 8) {
            out[bit / 8] |= addr[bit / 8] & (0x80 >> (bit % 8));
        }
        out
    }

    proptest! {
        #[test]
        fn net_key_masking_matches_bitwise(a4 in any::<[u8; 4]>(), a6 in any::<[u8; 16]>(), len in 0u32..=140) {
            let k4 = NetKeyV4::masked(a4, len);
            prop_assert_eq!(k4.prefix_len, len.min(32));
            prop_assert_eq!(k4.addr, mask_bits(a4, len));
            let k6 = NetKeyV6::masked(a6, len);
            prop_assert_eq!(k6.prefix_len, len.min(128));
            prop_assert_eq!(k6.addr, mask_bits(a6, len));
        }

        #[test]
        fn encrypt_mark_round_trips(peer in any::<u16>(), epoch in any::<u8>(), low in any::<u8>()) {
            let mark = encrypt_mark(peer, epoch) | u32::from(low);
            prop_assert_eq!(mark_peer(mark), peer);
            prop_assert_eq!(mark_epoch(mark), epoch % EPOCH_SLOTS);
            prop_assert_eq!(mark_magic(mark), MARK_MAGIC_ENCRYPT);
            prop_assert_eq!(mark & 0xFF, u32::from(low));
        }
    }
}
