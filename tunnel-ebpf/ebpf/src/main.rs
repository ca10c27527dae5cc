//! The enc tc programs: marking of inter-node pod traffic, strict mode, and the leak sentinel.
//!
//! Four `SchedClassifier` programs share seven maps (see `enc_tunnel_ebpf_common`):
//!
//! * `tunnel_pod_ingress`: packets from a local pod. A destination in a remote pod CIDR gets the
//!   encrypt mark of its peer when the peer is authenticated and has a key; otherwise the packet
//!   is dropped (strict) and counted.
//! * `tunnel_pod_egress`: packets to a local pod. A source in a remote pod CIDR must have come
//!   through the decrypt path (the decrypt device, or a decrypted mark) from an authenticated
//!   peer with a key.
//! * `tunnel_underlay_ingress`: plaintext from a remote pod CIDR on the wire is dropped, and so
//!   is a plaintext overlay (VXLAN / Geneve) packet, whatever its inner source.
//! * `tunnel_underlay_egress`: the leak sentinel; plaintext towards a remote pod CIDR, or a
//!   plaintext overlay packet, leaving on the wire is counted as a leak and dropped (strict).
//!
//! Only the Ethernet header and the fixed IPv4 / IPv6 header are read (of an overlay packet on
//! the underlay, also the outer UDP and overlay headers and the inner frame's), so fragments
//! are handled like whole packets. Non-IP and short or malformed packets pass untouched. Outside strict mode
//! nothing is dropped, but every verdict is still counted under its reason.
//!
//! # Overlay packets
//!
//! When `OVERLAY` has a non-zero port, the underlay programs first check whether a packet is
//! overlay-encapsulated pod traffic: outer IPv4 (any IHL; not a non-first fragment) or IPv6
//! (next header directly UDP, no extension headers), UDP to that destination port, and room
//! for the overlay header (VXLAN: 8 bytes; Geneve: 8 + `opt_len * 4`) and the inner Ethernet
//! header, i.e. everything the kernel overlay device needs to decapsulate it. With encryption
//! on, overlay packets are routed into the encryption device, so a legitimate one never
//! crosses the underlay in plaintext; the one exception is kernel XFRM, which re-injects the
//! decrypted packet at the underlay's ingress with the inbound SA's output mark (magic `0xD`).
//! Such a packet is refused (unless so marked, on ingress) and counted under the peer owning
//! the inner source (ingress) / destination (egress) address, looked up with the same code at
//! the inner Ethernet header's offset; under peer 0 ("unattributed") when that address is in no
//! remote pod CIDR or the inner frame is not a readable IPv4 / IPv6 packet. A packet too short
//! to hold the inner Ethernet header is no overlay packet (the device would drop it) and
//! keeps the plain checks, like every non-overlay packet.
//!
//! "Pass" is `TC_ACT_UNSPEC` (-1, `TCX_NEXT` under tcx): no objection, the next tcx program or
//! clsact filter (or the default action) decides. `TC_ACT_OK` (0, `TCX_PASS`) would end the tcx
//! chain and skip whatever another component attached after us. Drops are `TC_ACT_SHOT`.
//!
//! Remote pod CIDRs are found by longest-prefix match without an LPM trie (whose walk deepens
//! with the number of entries): `REMOTE_NETS_V4/V6` are hash maps keyed by (prefix length,
//! masked address), and `PREFIX_LENS` lists the distinct lengths in use, longest first. The
//! programs try each length in turn and stop at the first hit, so the cost depends on the
//! number of distinct lengths (at most `MAX_PREFIX_LENS`), not on the number of CIDRs.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuHashMap},
    programs::TcContext,
};
use enc_tunnel_ebpf_common::{
    Config, DropReason, MARK_MAGIC_DECRYPTED, MARK_OWNED_MASK, MAX_CIDRS, MAX_PEERS,
    MAX_PREFIX_LENS, NetKeyV4, NetKeyV6, OVERLAY_KIND_GENEVE, OverlayConfig, PREFIX_LENS_V4,
    PREFIX_LENS_V6, PeerCounters, PeerState, PrefixLens, encrypt_mark, mark_magic, mark_peer,
};

#[map]
static REMOTE_NETS_V4: HashMap<NetKeyV4, u32> = HashMap::pinned(MAX_CIDRS, 0);
#[map]
static REMOTE_NETS_V6: HashMap<NetKeyV6, u32> = HashMap::pinned(MAX_CIDRS, 0);
/// A hash map rather than an array: an update replaces the value as a whole, so a program
/// never reads a list the loader is halfway through rewriting.
#[map]
static PREFIX_LENS: HashMap<u32, PrefixLens> = HashMap::pinned(2, 0);
#[map]
static PEERS: HashMap<u32, PeerState> = HashMap::pinned(MAX_PEERS, 0);
#[map]
static COUNTERS: PerCpuHashMap<u32, PeerCounters> = PerCpuHashMap::pinned(MAX_PEERS, 0);
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
/// Port 0 (a fresh, zeroed map): no overlay check.
#[map]
static OVERLAY: Array<OverlayConfig> = Array::pinned(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPV4_MAX_HLEN: usize = 60;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;
/// The VXLAN header, and the fixed part of the Geneve header.
const OVERLAY_HLEN: usize = 8;
/// Geneve options: `opt_len` (6 bits) counts 4-byte words.
const GENEVE_MAX_OPTS: usize = 63 * 4;
/// The largest offset of an inner Ethernet header the parser can compute (IPv4 with options,
/// UDP, Geneve with every option); a bound the verifier can see, never reached otherwise.
const MAX_INNER_OFF: usize = ETH_HLEN + IPV4_MAX_HLEN + UDP_HLEN + OVERLAY_HLEN + GENEVE_MAX_OPTS;

/// `TC_ACT_UNSPEC` (== `TCX_NEXT`): no objection, let the next program or filter decide.
/// Not `TC_ACT_OK` (== `TCX_PASS`), which would skip the programs attached after ours.
const PASS: i32 = -1;
/// `TC_ACT_SHOT`: drop. (Both are spelled out: their binding type differs between targets.)
const SHOT: i32 = 2;

/// Which address of the IP header to look up.
#[derive(Clone, Copy)]
enum Addr {
    Src,
    Dst,
}

/// Peer id owning the remote pod CIDR that holds the chosen address of the Ethernet frame at
/// offset `base` (0: the packet itself; else an overlay packet's inner frame), if any. `None`
/// for non-IP, short or malformed frames and for addresses in no remote CIDR.
#[inline(always)]
fn remote_peer(ctx: &TcContext, base: usize, which: Addr) -> Option<u32> {
    if base > MAX_INNER_OFF {
        return None;
    }
    let ip = base + ETH_HLEN;
    let ethertype = u16::from_be(ctx.load::<u16>(base + 12).ok()?);
    match ethertype {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ip).ok()?;
            if vihl >> 4 != 4 || vihl & 0x0F < 5 {
                return None;
            }
            if (ctx.len() as usize) < ip + IPV4_HLEN {
                return None;
            }
            let off = match which {
                Addr::Src => ip + 12,
                Addr::Dst => ip + 16,
            };
            let addr: [u8; 4] = ctx.load(off).ok()?;
            lookup_v4(addr)
        }
        ETH_P_IPV6 => {
            let v: u8 = ctx.load(ip).ok()?;
            if v >> 4 != 6 {
                return None;
            }
            if (ctx.len() as usize) < ip + IPV6_HLEN {
                return None;
            }
            let off = match which {
                Addr::Src => ip + 8,
                Addr::Dst => ip + 24,
            };
            let addr: [u8; 16] = ctx.load(off).ok()?;
            lookup_v6(addr)
        }
        _ => None,
    }
}

#[inline(always)]
fn overlay_config() -> OverlayConfig {
    // A missing entry cannot happen with an array map; default() is "no overlay".
    OVERLAY.get(0).copied().unwrap_or_default()
}

/// If the packet (an Ethernet frame on the underlay) is an overlay packet as `OVERLAY`
/// describes it, the offset of its inner Ethernet header; `None` when the overlay check is off,
/// for anything else, and for a packet too short to hold the overlay header and the inner
/// Ethernet header (the overlay device would drop it).
#[inline(always)]
fn overlay_inner(ctx: &TcContext) -> Option<usize> {
    let ov = overlay_config();
    if !ov.enabled() {
        return None;
    }
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let udp = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
            let ihl = usize::from(vihl & 0x0F) * 4;
            if vihl >> 4 != 4 || ihl < IPV4_HLEN {
                return None;
            }
            // Only a first fragment (or a whole packet) holds the UDP header.
            let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
            if frag & 0x1FFF != 0 {
                return None;
            }
            let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
            if proto != IPPROTO_UDP {
                return None;
            }
            ETH_HLEN + ihl
        }
        ETH_P_IPV6 => {
            let v: u8 = ctx.load(ETH_HLEN).ok()?;
            if v >> 4 != 6 {
                return None;
            }
            let next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
            if next != IPPROTO_UDP {
                return None;
            }
            ETH_HLEN + IPV6_HLEN
        }
        _ => return None,
    };
    let dport = u16::from_be(ctx.load::<u16>(udp + 2).ok()?);
    if u32::from(dport) != ov.port {
        return None;
    }
    let hdr = udp + UDP_HLEN;
    let mut inner = hdr + OVERLAY_HLEN;
    if ov.kind == OVERLAY_KIND_GENEVE {
        let ver_opt: u8 = ctx.load(hdr).ok()?;
        inner += usize::from(ver_opt & 0x3F) * 4;
    }
    if inner > MAX_INNER_OFF || (ctx.len() as usize) < inner + ETH_HLEN {
        return None;
    }
    Some(inner)
}

/// The prefix lengths in use for `family` (`PREFIX_LENS_V4` / `PREFIX_LENS_V6`), longest first.
#[inline(always)]
fn prefix_lens(family: u32) -> Option<PrefixLens> {
    // SAFETY: PrefixLens is plain data, and the loader replaces it as a whole (hash-map update).
    unsafe { PREFIX_LENS.get(family) }.copied()
}

/// Longest-prefix match of `addr` in `REMOTE_NETS_V4`: one hash lookup per prefix length in
/// use, longest first, stopping at the first hit.
#[inline(always)]
fn lookup_v4(addr: [u8; 4]) -> Option<u32> {
    let lens = prefix_lens(PREFIX_LENS_V4)?;
    for i in 0..MAX_PREFIX_LENS {
        if i >= lens.count as usize {
            break;
        }
        let len = u32::from(*lens.lens.get(i)?);
        // SAFETY: the value is a plain u32.
        if let Some(peer) = unsafe { REMOTE_NETS_V4.get(NetKeyV4::masked(addr, len)) } {
            return Some(*peer);
        }
    }
    None
}

/// Longest-prefix match of `addr` in `REMOTE_NETS_V6` (see `lookup_v4`).
#[inline(always)]
fn lookup_v6(addr: [u8; 16]) -> Option<u32> {
    let lens = prefix_lens(PREFIX_LENS_V6)?;
    for i in 0..MAX_PREFIX_LENS {
        if i >= lens.count as usize {
            break;
        }
        let len = u32::from(*lens.lens.get(i)?);
        // SAFETY: the value is a plain u32.
        if let Some(peer) = unsafe { REMOTE_NETS_V6.get(NetKeyV6::masked(addr, len)) } {
            return Some(*peer);
        }
    }
    None
}

#[inline(always)]
fn config() -> Config {
    // A missing entry cannot happen with an array map; default() is strict anyway.
    CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn peer_state(peer: u32) -> Option<PeerState> {
    // SAFETY: PeerState is plain data; a concurrent update can at worst give a torn read of
    // three u32 flags/epoch/backend words, which is no worse than reading just before it.
    unsafe { PEERS.get(peer) }.copied()
}

/// This CPU's counters of `peer`, created zeroed on first use.
#[inline(always)]
fn counters(peer: u32) -> Option<*mut PeerCounters> {
    if let Some(p) = COUNTERS.get_ptr_mut(peer) {
        return Some(p);
    }
    let zero = PeerCounters::default();
    // Losing a race with another CPU creating it (EEXIST) is fine: the lookup below finds it.
    let _ = COUNTERS.insert(peer, zero, u64::from(BPF_NOEXIST));
    COUNTERS.get_ptr_mut(peer)
}

#[inline(always)]
fn count_steered(peer: u32, len: u32) {
    if let Some(c) = counters(peer) {
        // SAFETY: a valid per-CPU map value; tc programs do not migrate CPUs while running.
        unsafe {
            (*c).steered_packets += 1;
            (*c).steered_bytes += u64::from(len);
        }
    }
}

#[inline(always)]
fn count_leak(peer: u32, len: u32) {
    if let Some(c) = counters(peer) {
        // SAFETY: as in count_steered.
        unsafe {
            (*c).leak_packets += 1;
            (*c).leak_bytes += u64::from(len);
        }
    }
}

/// Counts a refused packet and returns the verdict: SHOT in strict mode, PASS otherwise.
#[inline(always)]
fn refuse(ctx: &TcContext, cfg: &Config, peer: u32, reason: DropReason) -> i32 {
    if let Some(c) = counters(peer) {
        let i = reason.index();
        // SAFETY: as in count_steered; `i` < DROP_REASONS by construction of DropReason.
        unsafe {
            if let Some(p) = (*c).drop_packets.get_mut(i) {
                *p += 1;
            }
            if let Some(b) = (*c).drop_bytes.get_mut(i) {
                *b += u64::from(ctx.len());
            }
        }
    }
    if cfg.is_strict() { SHOT } else { PASS }
}

/// Why traffic of `peer` is not allowed, if it is not: no entry or not authenticated, no key.
#[inline(always)]
fn peer_refusal(peer: u32) -> Result<PeerState, DropReason> {
    match peer_state(peer) {
        Some(s) if s.authenticated() && s.has_key() => Ok(s),
        Some(s) if s.authenticated() => Err(DropReason::PeerNoKey),
        _ => Err(DropReason::PeerNotAuthenticated),
    }
}

#[inline(always)]
fn skb_mark(ctx: &TcContext) -> u32 {
    // SAFETY: ctx.skb.skb is the __sk_buff the kernel passed to the program.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn skb_ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as in skb_mark.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// Whether `mark` says the packet was decrypted under `peer`'s keys.
#[inline(always)]
fn decrypted_for(mark: u32, peer: u32) -> bool {
    mark_magic(mark) == MARK_MAGIC_DECRYPTED && u32::from(mark_peer(mark)) == peer
}

/// tc ingress of a pod-facing veth: packets from a local pod.
#[classifier]
pub fn tunnel_pod_ingress(ctx: TcContext) -> i32 {
    match try_tunnel_pod_ingress(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_tunnel_pod_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let Some(peer) = remote_peer(ctx, 0, Addr::Dst) else {
        return Ok(PASS);
    };
    match peer_refusal(peer) {
        Ok(state) => {
            let mark =
                (skb_mark(ctx) & !MARK_OWNED_MASK) | encrypt_mark(peer as u16, state.epoch as u8);
            ctx.set_mark(mark);
            count_steered(peer, ctx.len());
            Ok(PASS)
        }
        Err(reason) => Err(refuse(ctx, &config(), peer, reason)),
    }
}

/// tc egress of a pod-facing veth: packets to a local pod.
#[classifier]
pub fn tunnel_pod_egress(ctx: TcContext) -> i32 {
    match try_tunnel_pod_egress(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_tunnel_pod_egress(ctx: &TcContext) -> Result<i32, i32> {
    let Some(peer) = remote_peer(ctx, 0, Addr::Src) else {
        return Ok(PASS);
    };
    let cfg = config();
    // From the decrypt device, or decrypted by the kernel for this very peer (an XFRM
    // output mark; kernel XFRM has no decrypt device, so then the mark is the only proof).
    let from_device = cfg.decrypt_ifindex != 0 && skb_ingress_ifindex(ctx) == cfg.decrypt_ifindex;
    if !from_device && !decrypted_for(skb_mark(ctx), peer) {
        return Err(refuse(ctx, &cfg, peer, DropReason::NotDecrypted));
    }
    match peer_refusal(peer) {
        // Received traffic is counted by the decrypt device; nothing to count here.
        Ok(_) => Ok(PASS),
        Err(reason) => Err(refuse(ctx, &cfg, peer, reason)),
    }
}

/// tc ingress of the underlay interface.
#[classifier]
pub fn tunnel_underlay_ingress(ctx: TcContext) -> i32 {
    match try_tunnel_underlay_ingress(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_tunnel_underlay_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let mark = skb_mark(ctx);
    // An overlay packet is judged by its inner source; anything else by its own.
    let overlay = overlay_inner(ctx);
    let peer = match (overlay, remote_peer(ctx, overlay.unwrap_or(0), Addr::Src)) {
        // Kernel XFRM in tunnel mode hands the decrypted inner packet back to this
        // interface's ingress with the SA's output mark set; a mark never arrives from the
        // wire. It must be the mark of the peer owning the source.
        (_, Some(peer)) if decrypted_for(mark, peer) => return Ok(PASS),
        (_, Some(peer)) => peer,
        // An overlay packet never crosses the underlay in plaintext except decrypted by
        // kernel XFRM; with an unattributable inner source any peer's decrypted mark will do.
        (Some(_), None) if mark_magic(mark) == MARK_MAGIC_DECRYPTED => return Ok(PASS),
        (Some(_), None) => 0,
        // Encrypted traffic and the control channel are node-to-node, never in a pod CIDR.
        (None, None) => return Ok(PASS),
    };
    Err(refuse(
        ctx,
        &config(),
        peer,
        DropReason::PlaintextFromUnderlay,
    ))
}

/// tc egress of the underlay interface: the leak sentinel.
#[classifier]
pub fn tunnel_underlay_egress(ctx: TcContext) -> i32 {
    match try_tunnel_underlay_egress(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_tunnel_underlay_egress(ctx: &TcContext) -> Result<i32, i32> {
    // An overlay packet on the wire is plaintext by definition (encrypted traffic leaves as
    // WireGuard UDP on another port, or as ESP): a leak, counted under the inner destination's
    // peer, or peer 0 when that is in no remote pod CIDR.
    let overlay = overlay_inner(ctx);
    let peer = match (overlay, remote_peer(ctx, overlay.unwrap_or(0), Addr::Dst)) {
        (_, Some(peer)) => peer,
        (Some(_), None) => 0,
        (None, None) => return Ok(PASS),
    };
    count_leak(peer, ctx.len());
    Err(refuse(ctx, &config(), peer, DropReason::UnencryptedEgress))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
