//! Privileged tests of the real programs: load them with maps pinned in a temporary directory
//! on bpffs, fill the maps, and run crafted packets through each hook with BPF_PROG_TEST_RUN.
//! One test attaches to a veth pair in a network namespace. All need root.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use enc_tests::netns::Netns;
use enc_tunnel_ebpf::common::{MARK_MAGIC_DECRYPTED, MAX_PREFIX_LENS, encrypt_mark};
use enc_tunnel_ebpf::{
    AttachMode, AyaDatapath, Backend, Datapath, DatapathConfig, DropReason, Error, Hook, Overlay,
    OverlayKind, PeerState, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC,
};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A unique pin directory under /sys/fs/bpf, removed (with everything attached) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(test: &str) -> Self {
        enc_tunnel_ebpf::mount_bpffs(std::path::Path::new("/sys/fs/bpf")).unwrap();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/enc-test-{test}-{}-{n}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = AyaDatapath::remove_all(&self.0) {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

const AUTH_KEY: PeerState = PeerState {
    authenticated: true,
    has_key: true,
    epoch: 17, // slot 1 in the mark
    backend: Backend::Wireguard,
};
const AUTH_NO_KEY: PeerState = PeerState {
    has_key: false,
    ..AUTH_KEY
};
const NOT_AUTH: PeerState = PeerState {
    authenticated: false,
    has_key: true,
    ..AUTH_KEY
};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Peers: 2 authenticated with key, 3 not authenticated, 4 no PEERS entry, 5 no key.
/// Local pod CIDR 10.244.1.0/24 is in no map.
fn setup(dp: &AyaDatapath, strict: bool, decrypt_ifindex: u32) {
    dp.set_config(DatapathConfig {
        strict,
        decrypt_ifindex,
        overlay: None,
    })
    .unwrap();
    for (cidr, peer) in [
        ("10.244.2.0/24", 2),
        ("fd00:2::/64", 2),
        ("10.244.3.0/24", 3),
        ("10.244.4.0/24", 4),
        ("10.244.5.0/24", 5),
    ] {
        dp.upsert_cidr(net(cidr), peer).unwrap();
    }
    dp.upsert_peer(2, AUTH_KEY).unwrap();
    dp.upsert_peer(3, NOT_AUTH).unwrap();
    dp.upsert_peer(5, AUTH_NO_KEY).unwrap();
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// IPv4 + 8 bytes of UDP-ish payload; `frag` is the flags/fragment-offset word.
fn ipv4_frag(src: &str, dst: &str, frag: u16) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let mut ip = vec![0x45, 0, 0, 28, 0, 1];
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&[64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
    eth(0x0800, &ip)
}

fn ipv4(src: &str, dst: &str) -> Vec<u8> {
    ipv4_frag(src, dst, 0x4000) // DF
}

fn ipv6(src: &str, dst: &str) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().unwrap();
    let dst: Ipv6Addr = dst.parse().unwrap();
    let mut ip = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
    eth(0x86DD, &ip)
}

fn packet(src: &str, dst: &str) -> Vec<u8> {
    match src.parse::<IpAddr>().unwrap() {
        IpAddr::V4(_) => ipv4(src, dst),
        IpAddr::V6(_) => ipv6(src, dst),
    }
}

fn arp() -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 244, 2, 1]);
    a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 244, 2, 5]);
    eth(0x0806, &a)
}

fn load(test: &str) -> (PinDir, AyaDatapath) {
    let dir = PinDir::new(test);
    let dp = AyaDatapath::load(&dir.0).unwrap();
    (dir, dp)
}

fn drops(dp: &AyaDatapath, peer: u16, reason: DropReason) -> u64 {
    dp.counters()
        .unwrap()
        .get(&peer)
        .map_or(0, |c| c.drops_for(reason))
}

#[test]
fn privileged_pod_ingress_marks_authenticated_peers() {
    if !enc_tests::require_root("privileged_pod_ingress_marks_authenticated_peers") {
        return;
    }
    let (_dir, dp) = load("ingress-mark");
    setup(&dp, true, 0);
    let want = encrypt_mark(2, 17);
    assert_eq!(want, 0x0002_1E00);

    let v4 = ipv4("10.244.1.7", "10.244.2.5");
    let r = dp.test_run(Hook::PodIngress, &v4, 0, 1).unwrap();
    assert_eq!((r.action, r.mark), (TC_ACT_UNSPEC, want));

    let v6 = ipv6("fd00:1::7", "fd00:2::5");
    let r = dp.test_run(Hook::PodIngress, &v6, 0, 1).unwrap();
    assert_eq!((r.action, r.mark), (TC_ACT_UNSPEC, want));

    // Bits 7..0 are not ours and survive; a stale enc mark is replaced.
    let r = dp
        .test_run_with_mark(Hook::PodIngress, &v4, 0, 0xFFFF_FF5A, 1)
        .unwrap();
    assert_eq!((r.action, r.mark), (TC_ACT_UNSPEC, want | 0x5A));

    // Fragments are handled like whole packets: first (MF), middle and last (offset != 0).
    for frag in [0x2000, 0x2000 | 185, 185] {
        let p = ipv4_frag("10.244.1.7", "10.244.2.5", frag);
        let r = dp.test_run(Hook::PodIngress, &p, 0, 1).unwrap();
        assert_eq!(
            (r.action, r.mark),
            (TC_ACT_UNSPEC, want),
            "frag word {frag:#x}"
        );
    }

    let c = dp.counters().unwrap()[&2].clone();
    assert_eq!(c.steered_packets, 6);
    assert_eq!(
        c.steered_bytes,
        4 * v4.len() as u64 + v6.len() as u64 + v4.len() as u64
    );
    assert!(c.drops.is_empty(), "{c:?}");
}

#[test]
fn privileged_pod_ingress_strict_drops_unready_peers() {
    if !enc_tests::require_root("privileged_pod_ingress_strict_drops_unready_peers") {
        return;
    }
    let (_dir, dp) = load("ingress-strict");
    setup(&dp, true, 0);
    for (dst, peer, reason) in [
        ("10.244.3.5", 3, DropReason::PeerNotAuthenticated),
        ("10.244.4.5", 4, DropReason::PeerNotAuthenticated),
        ("10.244.5.5", 5, DropReason::PeerNoKey),
    ] {
        let r = dp
            .test_run_with_mark(Hook::PodIngress, &ipv4("10.244.1.7", dst), 0, 0x77, 1)
            .unwrap();
        assert_eq!((r.action, r.mark), (TC_ACT_SHOT, 0x77), "{dst}");
        assert_eq!(drops(&dp, peer, reason), 1, "{dst}");
        assert_eq!(dp.counters().unwrap()[&peer].steered_packets, 0);
    }
    // Not authenticated takes precedence over no key.
    dp.upsert_peer(
        3,
        PeerState {
            has_key: false,
            ..NOT_AUTH
        },
    )
    .unwrap();
    let r = dp
        .test_run(Hook::PodIngress, &ipv4("10.244.1.7", "10.244.3.5"), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
    assert_eq!(drops(&dp, 3, DropReason::PeerNotAuthenticated), 2);
}

#[test]
fn privileged_pod_ingress_passes_local_non_ip_and_short_packets() {
    if !enc_tests::require_root("privileged_pod_ingress_passes_local_non_ip_and_short_packets") {
        return;
    }
    let (_dir, dp) = load("ingress-pass");
    setup(&dp, true, 0);
    let mark_in = 0x1234_0077;
    let v4 = ipv4("10.244.2.5", "10.244.2.6");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("local v4", ipv4("10.244.1.7", "10.244.1.8")),
        ("local v6", ipv6("fd00:1::7", "fd00:1::8")),
        ("internet", ipv4("10.244.1.7", "1.1.1.1")),
        ("arp", arp()),
        ("bad ihl", {
            let mut p = ipv4("10.244.1.7", "10.244.2.5");
            p[14] = 0x44;
            p
        }),
        ("v6 ethertype, version 4", {
            let mut p = ipv6("fd00:1::7", "fd00:2::5");
            p[14] = 0x45;
            p
        }),
        ("v4 ethertype, version 6", {
            let mut p = ipv4("10.244.1.7", "10.244.2.5");
            p[14] = 0x65;
            p
        }),
    ];
    // Short IP frames: this kernel's BPF_PROG_TEST_RUN refuses an IPv4/IPv6 frame shorter than
    // the fixed IP header with EINVAL before the program runs, so these can only be checked
    // where the kernel accepts them.
    let short: Vec<(&str, Vec<u8>)> = vec![
        ("truncated v4", v4[..14 + 19].to_vec()),
        (
            "truncated v6",
            ipv6("fd00:1::7", "fd00:2::5")[..14 + 39].to_vec(),
        ),
        ("one IP byte", eth(0x0800, &[0x45])),
    ];
    for (what, p) in short {
        match dp.test_run_with_mark(Hook::PodIngress, &p, 0, mark_in, 1) {
            Ok(r) => assert_eq!((r.action, r.mark), (TC_ACT_UNSPEC, mark_in), "{what}"),
            Err(e) => {
                let einval = e.raw_os_error() == Some(libc::EINVAL);
                assert!(einval, "{what}: {e:?}");
                eprintln!("{what}: refused by BPF_PROG_TEST_RUN (EINVAL), not run");
            }
        }
    }
    for (what, p) in cases {
        let r = dp
            .test_run_with_mark(Hook::PodIngress, &p, 0, mark_in, 1)
            .unwrap_or_else(|e| panic!("{what} ({} bytes): {e:?}", p.len()));
        assert_eq!((r.action, r.mark), (TC_ACT_UNSPEC, mark_in), "{what}");
    }
    assert!(
        dp.counters()
            .unwrap()
            .values()
            .all(|c| c.steered_packets == 0)
    );
}

#[test]
fn privileged_non_strict_counts_without_dropping() {
    if !enc_tests::require_root("privileged_non_strict_counts_without_dropping") {
        return;
    }
    let (_dir, dp) = load("non-strict");
    setup(&dp, false, 0);
    let p = ipv4("10.244.1.7", "10.244.3.5");
    let r = dp.test_run(Hook::PodIngress, &p, 0, 1).unwrap();
    assert_eq!((r.action, r.mark), (TC_ACT_UNSPEC, 0));
    let r = dp
        .test_run(Hook::UnderlayEgress, &ipv4("10.0.0.1", "10.244.2.5"), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_UNSPEC);
    let r = dp
        .test_run(
            Hook::UnderlayIngress,
            &ipv4("10.244.2.5", "10.244.1.7"),
            0,
            1,
        )
        .unwrap();
    assert_eq!(r.action, TC_ACT_UNSPEC);
    let c = dp.counters().unwrap();
    assert_eq!(c[&3].drops_for(DropReason::PeerNotAuthenticated), 1);
    assert_eq!(c[&2].drops_for(DropReason::UnencryptedEgress), 1);
    assert_eq!(c[&2].drops_for(DropReason::PlaintextFromUnderlay), 1);
    assert_eq!(c[&2].leak_packets, 1);
}

#[test]
fn privileged_unwritten_config_is_strict() {
    if !enc_tests::require_root("privileged_unwritten_config_is_strict") {
        return;
    }
    let (_dir, dp) = load("default-strict");
    dp.upsert_cidr(net("10.244.3.0/24"), 3).unwrap();
    let r = dp
        .test_run(Hook::PodIngress, &ipv4("10.244.1.7", "10.244.3.5"), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
}

#[test]
fn privileged_pod_egress_requires_decrypt_path() {
    if !enc_tests::require_root("privileged_pod_egress_requires_decrypt_path") {
        return;
    }
    let (_dir, dp) = load("egress");
    let wg = 42;
    setup(&dp, true, wg);
    for (src, dst) in [("10.244.2.5", "10.244.1.7"), ("fd00:2::5", "fd00:1::7")] {
        let p = packet(src, dst);
        let r = dp.test_run(Hook::PodEgress, &p, wg, 1).unwrap();
        assert_eq!((r.action, r.mark), (TC_ACT_UNSPEC, 0), "{src} via wg");
        let r = dp.test_run(Hook::PodEgress, &p, 7, 1).unwrap();
        assert_eq!(r.action, TC_ACT_SHOT, "{src} via ifindex 7");
        // The decrypted mark (XFRM output mark) of this peer also proves the decrypt path.
        let r = dp
            .test_run_with_mark(Hook::PodEgress, &p, 7, decrypted(2), 1)
            .unwrap();
        assert_eq!(r.action, TC_ACT_UNSPEC, "{src} with decrypted mark");
        // Decrypted under another peer's keys: a spoofed source.
        let r = dp
            .test_run_with_mark(Hook::PodEgress, &p, 7, decrypted(3), 1)
            .unwrap();
        assert_eq!(r.action, TC_ACT_SHOT, "{src} decrypted for peer 3");
    }
    assert_eq!(drops(&dp, 2, DropReason::NotDecrypted), 4);

    let r = dp
        .test_run(Hook::PodEgress, &ipv4("10.244.3.5", "10.244.1.7"), wg, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
    assert_eq!(drops(&dp, 3, DropReason::PeerNotAuthenticated), 1);
    let r = dp
        .test_run(Hook::PodEgress, &ipv4("10.244.1.8", "10.244.1.7"), 7, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_UNSPEC, "local source");

    // decrypt_ifindex 0 (kernel XFRM: no decrypt device): only the peer's decrypted mark
    // lets remote-pod traffic through.
    dp.set_config(DatapathConfig {
        strict: true,
        decrypt_ifindex: 0,
        overlay: None,
    })
    .unwrap();
    let p = ipv4("10.244.2.5", "10.244.1.7");
    let r = dp.test_run(Hook::PodEgress, &p, 7, 1).unwrap();
    assert_eq!(r.action, TC_ACT_SHOT, "no mark");
    let r = dp.test_run(Hook::PodEgress, &p, 0, 1).unwrap();
    assert_eq!(r.action, TC_ACT_SHOT, "no mark, ifindex 0");
    let r = dp
        .test_run_with_mark(Hook::PodEgress, &p, 7, decrypted(2), 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_UNSPEC, "decrypted mark");
    assert_eq!(drops(&dp, 2, DropReason::NotDecrypted), 6);
}

/// The mark an XFRM inbound SA of `peer` puts on what it decrypted.
fn decrypted(peer: u32) -> u32 {
    peer << 16 | MARK_MAGIC_DECRYPTED << 8
}

#[test]
fn privileged_underlay_refuses_plaintext_and_counts_leaks() {
    if !enc_tests::require_root("privileged_underlay_refuses_plaintext_and_counts_leaks") {
        return;
    }
    let (_dir, dp) = load("underlay");
    setup(&dp, true, 0);
    // Node-to-node traffic (WireGuard UDP, the TLS control channel) passes both ways.
    for hook in [Hook::UnderlayIngress, Hook::UnderlayEgress] {
        let r = dp
            .test_run(hook, &ipv4("10.0.0.2", "10.0.0.1"), 0, 1)
            .unwrap();
        assert_eq!(r.action, TC_ACT_UNSPEC, "{hook}");
        assert_eq!(r.action, dp.test_run(hook, &arp(), 0, 1).unwrap().action);
    }
    let r = dp
        .test_run(
            Hook::UnderlayIngress,
            &ipv4("10.244.2.5", "10.244.1.7"),
            0,
            1,
        )
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
    let r = dp
        .test_run(Hook::UnderlayIngress, &ipv6("fd00:2::5", "fd00:1::7"), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
    assert_eq!(drops(&dp, 2, DropReason::PlaintextFromUnderlay), 2);
    // Kernel XFRM hands the decrypted inner packet back to the underlay's ingress with the
    // SA's output mark: it passes for the right peer only.
    let inner = ipv4("10.244.2.5", "10.244.1.7");
    let r = dp
        .test_run_with_mark(Hook::UnderlayIngress, &inner, 0, decrypted(2), 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_UNSPEC, "decrypted by peer 2's SA");
    let r = dp
        .test_run_with_mark(Hook::UnderlayIngress, &inner, 0, decrypted(3), 1)
        .unwrap();
    assert_eq!(
        r.action, TC_ACT_SHOT,
        "peer 2's source decrypted by peer 3's SA"
    );
    assert_eq!(drops(&dp, 2, DropReason::PlaintextFromUnderlay), 3);

    let leak = ipv4("10.244.1.7", "10.244.2.5");
    let r = dp.test_run(Hook::UnderlayEgress, &leak, 0, 1).unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
    let c = dp.counters().unwrap()[&2].clone();
    assert_eq!((c.leak_packets, c.leak_bytes), (1, leak.len() as u64));
    assert_eq!(c.drops_for(DropReason::UnencryptedEgress), 1);
}

// ---- Overlay (VXLAN / Geneve) packets on the underlay ----

const VXLAN: Overlay = Overlay {
    kind: OverlayKind::Vxlan,
    port: 8472,
};
const GENEVE: Overlay = Overlay {
    kind: OverlayKind::Geneve,
    port: 6081,
};

fn set_overlay(dp: &AyaDatapath, strict: bool, overlay: Option<Overlay>) {
    dp.set_config(DatapathConfig {
        strict,
        decrypt_ifindex: 0,
        overlay,
    })
    .unwrap();
}

/// A UDP datagram to `dport` (source port 40000, no checksum) carrying `payload`.
fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap();
    let mut u = 40000u16.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An outer IPv4 frame with protocol `proto`, `opt_words` 4-byte words of IP options (IHL =
/// 5 + opt_words) and flags/fragment-offset word `frag`, carrying `payload`.
fn outer_v4_with(
    src: &str,
    dst: &str,
    proto: u8,
    opt_words: u8,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let hlen = 20 + 4 * usize::from(opt_words);
    let total = u16::try_from(hlen + payload.len()).unwrap();
    let mut ip = vec![0x40 | (5 + opt_words), 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1]);
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&[64, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    // Options: NOPs (type 1).
    ip.resize(hlen, 1);
    ip.extend_from_slice(payload);
    eth(0x0800, &ip)
}

/// Node 10.0.0.2 to node 10.0.0.1 (outside every pod CIDR), UDP to `dport`.
fn outer_v4(dport: u16, payload: &[u8]) -> Vec<u8> {
    outer_v4_with("10.0.0.2", "10.0.0.1", 17, 0, 0x4000, &udp(dport, payload))
}

/// Node fd00:99::2 to node fd00:99::1, next header `next`, carrying `payload`.
fn outer_v6_with(next: u8, payload: &[u8]) -> Vec<u8> {
    let src: Ipv6Addr = "fd00:99::2".parse().unwrap();
    let dst: Ipv6Addr = "fd00:99::1".parse().unwrap();
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    ip.extend_from_slice(&[next, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(payload);
    eth(0x86DD, &ip)
}

fn outer_v6(dport: u16, payload: &[u8]) -> Vec<u8> {
    outer_v6_with(17, &udp(dport, payload))
}

/// A VXLAN header (flags: VNI valid; VNI 1) followed by the inner frame.
fn vxlan(inner: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    v.extend_from_slice(inner);
    v
}

/// A Geneve header (version 0, `opts.len() / 4` option words, protocol Ethernet, VNI 1), the
/// options, and the inner frame.
fn geneve(opts: &[u8], inner: &[u8]) -> Vec<u8> {
    assert_eq!(opts.len() % 4, 0);
    let words = u8::try_from(opts.len() / 4).unwrap();
    let mut g = vec![words & 0x3F, 0, 0x65, 0x58, 0, 0, 1, 0];
    g.extend_from_slice(opts);
    g.extend_from_slice(inner);
    g
}

/// 8 bytes of Geneve options: one TLV (class 0x0102, type 0x80, 4 bytes of data).
const GENEVE_OPTS: [u8; 8] = [0x01, 0x02, 0x80, 0x01, 0xAA, 0xBB, 0xCC, 0xDD];

/// What one test run did: the verdict, and where it was counted (every (peer, reason) whose
/// drop count grew, and every peer whose leak count grew, each with its increase).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    action: i32,
    drops: Vec<(u16, DropReason, u64)>,
    leaks: Vec<(u16, u64)>,
}

fn outcome(action: i32, drops: &[(u16, DropReason)], leaks: &[u16]) -> Outcome {
    Outcome {
        action,
        drops: drops.iter().map(|(p, r)| (*p, *r, 1)).collect(),
        leaks: leaks.iter().map(|p| (*p, 1)).collect(),
    }
}

fn run(dp: &AyaDatapath, hook: Hook, frame: &[u8], mark: u32) -> Outcome {
    let before = dp.counters().unwrap();
    let r = dp
        .test_run_with_mark(hook, frame, 0, mark, 1)
        .unwrap_or_else(|e| panic!("{hook} ({} bytes): {e:?}", frame.len()));
    // No program of ours changes the mark on the underlay.
    assert_eq!(r.mark, mark, "{hook}");
    let after = dp.counters().unwrap();
    let mut drops = Vec::new();
    let mut leaks = Vec::new();
    for (peer, c) in &after {
        let old = before.get(peer).cloned().unwrap_or_default();
        for reason in DropReason::ALL {
            let d = c.drops_for(reason) - old.drops_for(reason);
            if d != 0 {
                drops.push((*peer, reason, d));
            }
        }
        if c.leak_packets != old.leak_packets {
            leaks.push((*peer, c.leak_packets - old.leak_packets));
        }
    }
    Outcome {
        action: r.action,
        drops,
        leaks,
    }
}

fn passes(dp: &AyaDatapath, hook: Hook, frame: &[u8], mark: u32) -> bool {
    run(dp, hook, frame, mark) == outcome(TC_ACT_UNSPEC, &[], &[])
}

const PLAIN: DropReason = DropReason::PlaintextFromUnderlay;
const UNENC: DropReason = DropReason::UnencryptedEgress;

#[test]
fn privileged_underlay_ingress_refuses_plaintext_vxlan() {
    if !enc_tests::require_root("privileged_underlay_ingress_refuses_plaintext_vxlan") {
        return;
    }
    let (_dir, dp) = load("ovl-vxlan-in");
    setup(&dp, true, 0);
    set_overlay(&dp, true, Some(VXLAN));
    let ui = Hook::UnderlayIngress;
    let from_peer2 = outer_v4(8472, &vxlan(&ipv4("10.244.2.5", "10.244.1.7")));
    let shot = |peer| outcome(TC_ACT_SHOT, &[(peer, PLAIN)], &[]);

    // Inner source in peer 2's CIDR: refused under peer 2, over IPv4 and IPv6, inner and outer.
    assert_eq!(run(&dp, ui, &from_peer2, 0), shot(2));
    let v6_inner = outer_v4(8472, &vxlan(&ipv6("fd00:2::5", "fd00:1::7")));
    assert_eq!(run(&dp, ui, &v6_inner, 0), shot(2), "inner IPv6");
    let v6_outer = outer_v6(8472, &vxlan(&ipv4("10.244.2.5", "10.244.1.7")));
    assert_eq!(run(&dp, ui, &v6_outer, 0), shot(2), "outer IPv6");
    let v6_both = outer_v6(8472, &vxlan(&ipv6("fd00:2::5", "fd00:1::7")));
    assert_eq!(run(&dp, ui, &v6_both, 0), shot(2), "IPv6 in IPv6");
    // The outer IHL is honoured (two words of options).
    let opts = outer_v4_with(
        "10.0.0.2",
        "10.0.0.1",
        17,
        2,
        0,
        &udp(8472, &vxlan(&ipv4("10.244.2.5", "10.244.1.7"))),
    );
    assert_eq!(run(&dp, ui, &opts, 0), shot(2), "IPv4 options");
    // A first fragment holds the UDP header: checked; a later one is not an overlay packet.
    let first = outer_v4_with(
        "10.0.0.2",
        "10.0.0.1",
        17,
        0,
        0x2000,
        &udp(8472, &vxlan(&ipv4("10.244.2.5", "10.244.1.7"))),
    );
    assert_eq!(run(&dp, ui, &first, 0), shot(2), "first fragment");
    let later = outer_v4_with(
        "10.0.0.2",
        "10.0.0.1",
        17,
        0,
        0x2000 | 185,
        &udp(8472, &vxlan(&ipv4("10.244.2.5", "10.244.1.7"))),
    );
    assert!(passes(&dp, ui, &later, 0), "non-first fragment");

    // Inner source in no remote pod CIDR (or no inner IP at all): refused under peer 0.
    let stranger = outer_v4(8472, &vxlan(&ipv4("192.168.7.7", "10.244.1.7")));
    assert_eq!(run(&dp, ui, &stranger, 0), shot(0), "unattributed");
    let inner_arp = outer_v4(8472, &vxlan(&arp()));
    assert_eq!(run(&dp, ui, &inner_arp, 0), shot(0), "inner ARP");
    // Inner Ethernet header present, inner IP header cut: the overlay device would still
    // decapsulate it, so it is refused too (unattributed).
    let cut_ip = outer_v4(8472, &vxlan(&ipv4("10.244.2.5", "10.244.1.7")[..14 + 10]));
    assert_eq!(run(&dp, ui, &cut_ip, 0), shot(0), "inner IP cut");

    // Kernel XFRM's re-injected, decrypted packet: the mark of the inner source's peer passes.
    for p in [&from_peer2, &v6_inner, &v6_outer, &v6_both] {
        assert!(passes(&dp, ui, p, decrypted(2)));
        assert!(
            passes(&dp, ui, p, decrypted(2) | 0x5A),
            "bits 7..0 are not ours"
        );
        assert_eq!(run(&dp, ui, p, decrypted(3)), shot(2), "another peer's SA");
        assert_eq!(
            run(&dp, ui, p, encrypt_mark(2, 1)),
            shot(2),
            "encrypt magic"
        );
    }
    // Unattributed inner source: any decrypted mark will do, the magic is still required.
    assert!(passes(&dp, ui, &stranger, decrypted(3)));
    assert!(passes(&dp, ui, &stranger, decrypted(0)));
    assert_eq!(run(&dp, ui, &stranger, encrypt_mark(3, 1)), shot(0));

    // Non-strict: counted, not dropped.
    set_overlay(&dp, false, Some(VXLAN));
    assert_eq!(
        run(&dp, ui, &from_peer2, 0),
        outcome(TC_ACT_UNSPEC, &[(2, PLAIN)], &[])
    );
    assert_eq!(
        run(&dp, ui, &stranger, 0),
        outcome(TC_ACT_UNSPEC, &[(0, PLAIN)], &[])
    );
    // Never counted as a leak or under any other reason.
    let c = dp.counters().unwrap();
    assert!(
        c.values()
            .all(|c| c.leak_packets == 0 && c.drops.len() == 1),
        "{c:?}"
    );
}

#[test]
fn privileged_underlay_ingress_refuses_plaintext_geneve() {
    if !enc_tests::require_root("privileged_underlay_ingress_refuses_plaintext_geneve") {
        return;
    }
    let (_dir, dp) = load("ovl-geneve-in");
    setup(&dp, true, 0);
    set_overlay(&dp, true, Some(GENEVE));
    let ui = Hook::UnderlayIngress;
    let shot = |peer| outcome(TC_ACT_SHOT, &[(peer, PLAIN)], &[]);
    let inner = ipv4("10.244.2.5", "10.244.1.7");
    // Attribution to peer 2 shows the inner frame was found past the options (reading it at
    // the wrong offset finds no IP header: peer 0).
    for (what, opts) in [
        ("no options", &[][..]),
        ("8 bytes of options", &GENEVE_OPTS[..]),
    ] {
        let p = outer_v4(6081, &geneve(opts, &inner));
        assert_eq!(run(&dp, ui, &p, 0), shot(2), "{what}");
        assert!(passes(&dp, ui, &p, decrypted(2)), "{what}");
        assert_eq!(run(&dp, ui, &p, decrypted(5)), shot(2), "{what}");
        let p6 = outer_v6(6081, &geneve(opts, &ipv6("fd00:2::5", "fd00:1::7")));
        assert_eq!(run(&dp, ui, &p6, 0), shot(2), "{what}, IPv6");
        let stranger = outer_v4(6081, &geneve(opts, &ipv4("192.168.7.7", "10.244.1.7")));
        assert_eq!(run(&dp, ui, &stranger, 0), shot(0), "{what}, unattributed");
    }
    // A VXLAN packet is no Geneve packet (other port): the plain checks, which pass it.
    assert!(passes(&dp, ui, &outer_v4(8472, &vxlan(&inner)), 0));
    // With VXLAN configured on the Geneve port, the options are not skipped: the inner frame
    // is read at the wrong offset and the packet is unattributed.
    set_overlay(
        &dp,
        true,
        Some(Overlay {
            kind: OverlayKind::Vxlan,
            port: 6081,
        }),
    );
    let p = outer_v4(6081, &geneve(&GENEVE_OPTS, &inner));
    assert_eq!(run(&dp, ui, &p, 0), shot(0));
}

#[test]
fn privileged_underlay_egress_counts_overlay_leaks() {
    if !enc_tests::require_root("privileged_underlay_egress_counts_overlay_leaks") {
        return;
    }
    let (_dir, dp) = load("ovl-egress");
    setup(&dp, true, 0);
    let ue = Hook::UnderlayEgress;
    let leak = |action, peer| outcome(action, &[(peer, UNENC)], &[peer]);
    for (overlay, frames) in [
        (
            VXLAN,
            [
                outer_v4(8472, &vxlan(&ipv4("10.244.1.7", "10.244.2.5"))),
                outer_v6(8472, &vxlan(&ipv6("fd00:1::7", "fd00:2::5"))),
                outer_v4(8472, &vxlan(&ipv4("10.244.1.7", "192.168.7.7"))),
            ],
        ),
        (
            GENEVE,
            [
                outer_v4(
                    6081,
                    &geneve(&GENEVE_OPTS, &ipv4("10.244.1.7", "10.244.2.5")),
                ),
                outer_v6(6081, &geneve(&[], &ipv6("fd00:1::7", "fd00:2::5"))),
                outer_v4(6081, &geneve(&[], &ipv4("10.244.1.7", "192.168.7.7"))),
            ],
        ),
    ] {
        let [to_peer2, to_peer2_v6, to_stranger] = &frames;
        let kind = overlay.kind;
        set_overlay(&dp, true, Some(overlay));
        assert_eq!(run(&dp, ue, to_peer2, 0), leak(TC_ACT_SHOT, 2), "{kind:?}");
        assert_eq!(
            run(&dp, ue, to_peer2_v6, 0),
            leak(TC_ACT_SHOT, 2),
            "{kind:?} v6"
        );
        assert_eq!(
            run(&dp, ue, to_stranger, 0),
            leak(TC_ACT_SHOT, 0),
            "{kind:?}"
        );
        // A mark does not excuse anything on egress.
        assert_eq!(run(&dp, ue, to_peer2, decrypted(2)), leak(TC_ACT_SHOT, 2));
        set_overlay(&dp, false, Some(overlay));
        assert_eq!(
            run(&dp, ue, to_peer2, 0),
            leak(TC_ACT_UNSPEC, 2),
            "{kind:?}"
        );
        assert_eq!(
            run(&dp, ue, to_stranger, 0),
            leak(TC_ACT_UNSPEC, 0),
            "{kind:?}"
        );
    }
    let c = dp.counters().unwrap();
    assert_eq!(c[&2].leak_packets, 8);
    assert_eq!(c[&0].leak_packets, 4);
    let frame = outer_v4(8472, &vxlan(&ipv4("10.244.1.7", "192.168.7.7")));
    // Every unattributed frame has the same length (Geneve without options = VXLAN).
    assert_eq!(c[&0].leak_bytes, 4 * frame.len() as u64);
}

#[test]
fn privileged_overlay_off_and_other_udp_keep_plain_checks() {
    if !enc_tests::require_root("privileged_overlay_off_and_other_udp_keep_plain_checks") {
        return;
    }
    let (_dir, dp) = load("ovl-off");
    setup(&dp, true, 0);
    let vx = |inner: &[u8]| outer_v4(8472, &vxlan(inner));
    let ge = |inner: &[u8]| outer_v6(6081, &geneve(&GENEVE_OPTS, inner));
    let frames = [
        vx(&ipv4("10.244.2.5", "10.244.2.6")),
        vx(&ipv4("192.168.7.7", "192.168.7.8")),
        ge(&ipv4("10.244.2.5", "10.244.2.6")),
        ge(&ipv6("fd00:2::5", "fd00:2::6")),
    ];
    // No overlay configured (as before this check existed; and after turning it off again):
    // the outer addresses are node addresses, outside every pod CIDR, so everything passes.
    let all_pass = |dp: &AyaDatapath| {
        for (i, f) in frames.iter().enumerate() {
            for hook in [Hook::UnderlayIngress, Hook::UnderlayEgress] {
                assert!(passes(dp, hook, f, 0), "frame {i} {hook}");
            }
        }
    };
    all_pass(&dp);
    set_overlay(&dp, true, Some(VXLAN));
    assert_eq!(
        run(&dp, Hook::UnderlayIngress, &frames[0], 0),
        outcome(TC_ACT_SHOT, &[(2, PLAIN)], &[])
    );
    set_overlay(&dp, true, None);
    all_pass(&dp);
    // The plain checks still run on the outer addresses of an overlay-looking packet.
    let outer_from_pod = outer_v4_with(
        "10.244.2.5",
        "10.244.1.7",
        17,
        0,
        0,
        &udp(8472, &vxlan(&ipv4("192.168.7.7", "192.168.7.8"))),
    );
    assert_eq!(
        run(&dp, Hook::UnderlayIngress, &outer_from_pod, 0),
        outcome(TC_ACT_SHOT, &[(2, PLAIN)], &[])
    );

    // With an overlay configured, UDP to another port (WireGuard's 51820), another protocol
    // on the overlay port (TCP), and IPv6 with an extension header before UDP are not overlay
    // packets.
    for overlay in [VXLAN, GENEVE] {
        set_overlay(&dp, true, Some(overlay));
        let inner = ipv4("10.244.2.5", "10.244.2.6");
        let payload = if overlay.kind == OverlayKind::Vxlan {
            vxlan(&inner)
        } else {
            geneve(&[], &inner)
        };
        let mut hop_by_hop = vec![17, 0, 1, 4, 0, 0, 0, 0]; // next: UDP; PadN
        hop_by_hop.extend_from_slice(&udp(overlay.port, &payload));
        let others = [
            ("wireguard", outer_v4(51820, &payload)),
            ("wireguard v6", outer_v6(51820, &payload)),
            (
                "tcp",
                outer_v4_with(
                    "10.0.0.2",
                    "10.0.0.1",
                    6,
                    0,
                    0,
                    &udp(overlay.port, &payload),
                ),
            ),
            ("v6 extension header", outer_v6_with(0, &hop_by_hop)),
        ];
        for (what, f) in &others {
            for hook in [Hook::UnderlayIngress, Hook::UnderlayEgress] {
                assert!(passes(&dp, hook, f, 0), "{:?} {what} {hook}", overlay.kind);
            }
        }
        // ... while the real thing is refused.
        let real = outer_v4(overlay.port, &payload);
        assert_eq!(
            run(&dp, Hook::UnderlayIngress, &real, 0),
            outcome(TC_ACT_SHOT, &[(2, PLAIN)], &[])
        );
    }
}

#[test]
fn privileged_truncated_overlay_packets_pass() {
    if !enc_tests::require_root("privileged_truncated_overlay_packets_pass") {
        return;
    }
    let (_dir, dp) = load("ovl-short");
    setup(&dp, true, 0);
    let inner = ipv4("10.244.2.5", "10.244.1.7");
    for overlay in [VXLAN, GENEVE] {
        set_overlay(&dp, true, Some(overlay));
        let full = if overlay.kind == OverlayKind::Vxlan {
            vxlan(&inner)
        } else {
            geneve(&GENEVE_OPTS, &inner)
        };
        let hdr = if overlay.kind == OverlayKind::Vxlan {
            8
        } else {
            16
        };
        // Cut: right after UDP, inside the overlay header (and Geneve options), and inside
        // the inner Ethernet header. The overlay device drops these: not overlay packets, and
        // the outer (node) addresses are in no pod CIDR.
        for cut in [0, 4, hdr - 1, hdr, hdr + 13] {
            for (what, f) in [
                ("v4", outer_v4(overlay.port, &full[..cut])),
                ("v6", outer_v6(overlay.port, &full[..cut])),
            ] {
                for hook in [Hook::UnderlayIngress, Hook::UnderlayEgress] {
                    assert!(
                        passes(&dp, hook, &f, 0),
                        "{:?} {what} cut at {cut} {hook}",
                        overlay.kind
                    );
                }
            }
        }
        // The full inner Ethernet header is enough to count as an overlay packet.
        let f = outer_v4(overlay.port, &full[..hdr + 14]);
        assert_eq!(
            run(&dp, Hook::UnderlayIngress, &f, 0),
            outcome(TC_ACT_SHOT, &[(0, PLAIN)], &[])
        );
    }
    // Geneve claiming the most options (63 words) with few bytes behind them.
    set_overlay(&dp, true, Some(GENEVE));
    let mut g = geneve(&GENEVE_OPTS, &inner);
    g[0] = 0x3F;
    let f = outer_v4(6081, &g);
    for hook in [Hook::UnderlayIngress, Hook::UnderlayEgress] {
        assert!(passes(&dp, hook, &f, 0), "opt_len 63 {hook}");
    }
    // ... and the same with all 252 option bytes there and an inner frame behind them, behind
    // a maximal IPv4 header: the largest inner offset there is, still parsed.
    let opts = [0u8; 252];
    let f = outer_v4_with(
        "10.0.0.2",
        "10.0.0.1",
        17,
        10,
        0,
        &udp(6081, &geneve(&opts, &inner)),
    );
    assert_eq!(
        run(&dp, Hook::UnderlayIngress, &f, 0),
        outcome(TC_ACT_SHOT, &[(2, PLAIN)], &[])
    );
}

#[test]
fn privileged_pin_dir_without_overlay_map_loads() {
    if !enc_tests::require_root("privileged_pin_dir_without_overlay_map_loads") {
        return;
    }
    use enc_tunnel_ebpf::common::map_names;
    let (dir, dp) = load("ovl-pins");
    setup(&dp, true, 0);
    set_overlay(&dp, true, Some(VXLAN));
    let p = outer_v4(8472, &vxlan(&ipv4("10.244.2.5", "10.244.1.7")));
    assert_eq!(run(&dp, Hook::UnderlayIngress, &p, 0).action, TC_ACT_SHOT);
    drop(dp);
    // A pin directory of an earlier version has every map but OVERLAY.
    let overlay_pin = dir.0.join(map_names::OVERLAY);
    std::fs::remove_file(&overlay_pin).unwrap();
    let dp = AyaDatapath::load(&dir.0).unwrap();
    assert!(overlay_pin.exists(), "OVERLAY is pinned again");
    for name in map_names::ALL {
        assert!(dir.0.join(name).exists(), "{name}");
    }
    // The other maps kept their state; the new OVERLAY is zeroed (no overlay check) until
    // the agent sets the config again.
    assert_eq!(dp.dump_cidrs().unwrap().len(), 5);
    assert!(passes(&dp, Hook::UnderlayIngress, &p, 0));
    set_overlay(&dp, true, Some(VXLAN));
    assert_eq!(run(&dp, Hook::UnderlayIngress, &p, 0).action, TC_ACT_SHOT);
    // And a reload keeps it.
    drop(dp);
    let dp = AyaDatapath::load(&dir.0).unwrap();
    assert_eq!(run(&dp, Hook::UnderlayIngress, &p, 0).action, TC_ACT_SHOT);
}

#[test]
fn privileged_maps_upsert_delete_dump() {
    if !enc_tests::require_root("privileged_maps_upsert_delete_dump") {
        return;
    }
    let (_dir, dp) = load("maps");
    setup(&dp, true, 0);
    dp.upsert_cidr(net("10.244.2.0/24"), 2).unwrap();
    dp.upsert_cidr(net("10.0.0.0/8"), 9).unwrap();
    let cidrs = dp.dump_cidrs().unwrap();
    assert_eq!(cidrs.len(), 6);
    assert!(cidrs.contains(&(net("fd00:2::/64"), 2)));
    assert!(cidrs.contains(&(net("10.0.0.0/8"), 9)));
    // Longest prefix wins: 10.244.2.5 is peer 2, 10.9.9.9 is peer 9 (no PEERS entry: dropped).
    let r = dp
        .test_run(Hook::PodIngress, &ipv4("10.244.1.7", "10.9.9.9"), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
    assert_eq!(drops(&dp, 9, DropReason::PeerNotAuthenticated), 1);
    dp.delete_cidr(net("10.0.0.0/8")).unwrap();
    dp.delete_cidr(net("10.0.0.0/8")).unwrap();
    dp.delete_cidr(net("fd00:9::/64")).unwrap();
    assert_eq!(dp.dump_cidrs().unwrap().len(), 5);

    let err = dp.upsert_cidr(net("10.244.2.1/24"), 2).unwrap_err();
    assert!(err.to_string().contains("10.244.2.1/24"), "{err}");
    assert!(dp.upsert_cidr(net("10.244.9.0/24"), 0).is_err());

    assert_eq!(
        dp.dump_peers().unwrap(),
        vec![(2, AUTH_KEY), (3, NOT_AUTH), (5, AUTH_NO_KEY)]
    );
    dp.test_run(Hook::PodIngress, &ipv4("10.244.1.7", "10.244.2.5"), 0, 1)
        .unwrap();
    assert!(dp.counters().unwrap().contains_key(&2));
    dp.delete_peer(2).unwrap();
    dp.delete_peer(2).unwrap();
    assert!(!dp.counters().unwrap().contains_key(&2));
    assert_eq!(dp.dump_peers().unwrap().len(), 2);
    // Without its PEERS entry peer 2 is refused.
    let r = dp
        .test_run(Hook::PodIngress, &ipv4("10.244.1.7", "10.244.2.5"), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
}

#[test]
fn privileged_test_run_reports_duration() {
    if !enc_tests::require_root("privileged_test_run_reports_duration") {
        return;
    }
    let (_dir, dp) = load("duration");
    setup(&dp, true, 0);
    let r = dp
        .test_run(Hook::PodIngress, &ipv4("10.244.1.7", "10.244.2.5"), 0, 1000)
        .unwrap();
    assert_eq!(r.action, TC_ACT_UNSPEC);
    assert!(r.duration.as_nanos() > 0);
    assert_eq!(dp.counters().unwrap()[&2].steered_packets, 1000);
}

/// The mark pod ingress sets for a packet to `dst` (0 if it passes unmarked); panics on a drop.
fn marked_peer(dp: &AyaDatapath, dst: &str) -> u32 {
    let src = if dst.contains(':') {
        "fd00:1::7"
    } else {
        "10.244.1.7"
    };
    let r = dp
        .test_run(Hook::PodIngress, &packet(src, dst), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_UNSPEC, "{dst}");
    r.mark
}

#[test]
fn privileged_overlapping_prefixes_longest_wins() {
    if !enc_tests::require_root("privileged_overlapping_prefixes_longest_wins") {
        return;
    }
    let (_dir, dp) = load("overlap");
    setup(&dp, true, 0);
    dp.upsert_peer(9, AUTH_KEY).unwrap();
    // 10.244.2.0/24 (peer 2) is inside 10.244.0.0/16 (peer 9); the same in IPv6.
    dp.upsert_cidr(net("10.244.0.0/16"), 9).unwrap();
    dp.upsert_cidr(net("fd00:2::/48"), 9).unwrap();
    let (two, nine) = (encrypt_mark(2, 17), encrypt_mark(9, 17));
    assert_eq!(marked_peer(&dp, "10.244.2.5"), two);
    assert_eq!(marked_peer(&dp, "10.244.2.255"), two);
    assert_eq!(marked_peer(&dp, "10.244.7.5"), nine);
    assert_eq!(marked_peer(&dp, "10.244.255.1"), nine);
    assert_eq!(marked_peer(&dp, "10.245.0.1"), 0);
    assert_eq!(marked_peer(&dp, "fd00:2::5"), two);
    assert_eq!(marked_peer(&dp, "fd00:2:0:1::5"), nine);
    assert_eq!(marked_peer(&dp, "fd00:3::5"), 0);
    // A host route (/32) beats both, and a default route (/0) catches the rest.
    dp.upsert_cidr(net("10.244.2.9/32"), 9).unwrap();
    dp.upsert_cidr(net("0.0.0.0/0"), 2).unwrap();
    assert_eq!(marked_peer(&dp, "10.244.2.9"), nine);
    assert_eq!(marked_peer(&dp, "10.244.2.8"), two);
    assert_eq!(marked_peer(&dp, "192.0.2.1"), two);
    dp.delete_cidr(net("10.244.2.9/32")).unwrap();
    dp.delete_cidr(net("0.0.0.0/0")).unwrap();
    assert_eq!(marked_peer(&dp, "10.244.2.9"), two);
    assert_eq!(marked_peer(&dp, "192.0.2.1"), 0);

    // Deleting the /24 falls back to the /16; the /24 length stays in use (10.244.3.0/24...).
    dp.delete_cidr(net("10.244.2.0/24")).unwrap();
    assert_eq!(marked_peer(&dp, "10.244.2.5"), nine);
    dp.delete_cidr(net("fd00:2::/64")).unwrap();
    assert_eq!(marked_peer(&dp, "fd00:2::5"), nine);
    // ... and deleting the /16 too leaves no match at all.
    dp.delete_cidr(net("10.244.0.0/16")).unwrap();
    assert_eq!(marked_peer(&dp, "10.244.2.5"), 0);
    assert_eq!(marked_peer(&dp, "10.244.7.5"), 0);
    // The other /24s still match after their length's neighbours came and went.
    let r = dp
        .test_run(Hook::PodIngress, &ipv4("10.244.1.7", "10.244.3.5"), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
    // Re-adding brings the /24 back.
    dp.upsert_cidr(net("10.244.2.0/24"), 2).unwrap();
    assert_eq!(marked_peer(&dp, "10.244.2.5"), two);
}

#[test]
fn privileged_prefix_length_limit() {
    if !enc_tests::require_root("privileged_prefix_length_limit") {
        return;
    }
    let (dir, dp) = load("len-limit");
    setup(&dp, true, 0); // IPv4 /24, IPv6 /64
    dp.upsert_peer(9, AUTH_KEY).unwrap();
    // Fill the IPv4 list: /24 plus MAX_PREFIX_LENS - 1 more lengths, nested in 10.0.0.0/8.
    let extra: Vec<u8> = (8..24).chain(25..=32).take(MAX_PREFIX_LENS - 1).collect();
    for len in &extra {
        let cidr = IpNet::new("10.200.0.0".parse().unwrap(), *len)
            .unwrap()
            .trunc();
        dp.upsert_cidr(cidr, 9).unwrap();
    }
    let unused = (8..=32)
        .find(|l| *l != 24 && !extra.contains(l))
        .unwrap_or(0);
    let over = IpNet::new("10.201.0.0".parse().unwrap(), unused)
        .unwrap()
        .trunc();
    let err = dp.upsert_cidr(over, 9).unwrap_err();
    assert!(matches!(err, Error::TooManyPrefixLengths { limit, .. } if limit == MAX_PREFIX_LENS));
    let msg = err.to_string();
    assert!(msg.contains(&over.to_string()), "{msg}");
    assert!(msg.contains(&format!("at most {MAX_PREFIX_LENS}")), "{msg}");
    assert!(!dp.dump_cidrs().unwrap().iter().any(|(c, _)| *c == over));
    // A length in use is still fine, and IPv6 has its own list.
    dp.upsert_cidr(net("10.202.0.0/24"), 9).unwrap();
    dp.upsert_cidr(net("fd00:9::/56"), 9).unwrap();
    // Every length still matches: the longest one in use first.
    assert_eq!(marked_peer(&dp, "10.200.0.1"), encrypt_mark(9, 17));
    assert_eq!(marked_peer(&dp, "10.244.2.5"), encrypt_mark(2, 17));

    // Dropping the last CIDR of a length frees its slot.
    let freed = IpNet::new("10.200.0.0".parse().unwrap(), extra[0])
        .unwrap()
        .trunc();
    dp.delete_cidr(freed).unwrap();
    dp.upsert_cidr(over, 9).unwrap();
    assert_eq!(
        marked_peer(&dp, &over.addr().to_string()),
        encrypt_mark(9, 17)
    );
    let err = dp.upsert_cidr(freed, 9).unwrap_err();
    assert!(err.to_string().contains(&freed.to_string()), "{err}");

    // A reload recounts the lengths from the maps: the limit and the matches survive it.
    let cidrs = dp.dump_cidrs().unwrap();
    drop(dp);
    let dp = AyaDatapath::load(&dir.0).unwrap();
    assert_eq!(dp.dump_cidrs().unwrap(), cidrs);
    assert!(matches!(
        dp.upsert_cidr(freed, 9).unwrap_err(),
        Error::TooManyPrefixLengths { .. }
    ));
    assert_eq!(marked_peer(&dp, "10.200.0.1"), encrypt_mark(9, 17));
    assert_eq!(
        marked_peer(&dp, &over.addr().to_string()),
        encrypt_mark(9, 17)
    );
}

#[test]
fn privileged_reload_rebuilds_prefix_lengths() {
    if !enc_tests::require_root("privileged_reload_rebuilds_prefix_lengths") {
        return;
    }
    use aya::maps::{HashMap, Map, MapData};
    use enc_tunnel_ebpf::common::{PREFIX_LENS_V4, PREFIX_LENS_V6, PrefixLens, map_names};
    let (dir, dp) = load("lens-reload");
    setup(&dp, true, 0);
    dp.upsert_cidr(net("10.0.0.0/8"), 2).unwrap();
    assert_eq!(marked_peer(&dp, "10.9.9.9"), encrypt_mark(2, 17));
    drop(dp);
    // Lose the lists (as if an update had been interrupted, or an older version had run).
    let lens_path = dir.0.join(map_names::PREFIX_LENS);
    let mut lens: HashMap<MapData, u32, PrefixLens> =
        HashMap::try_from(Map::from_map_data(MapData::from_pin(&lens_path).unwrap()).unwrap())
            .unwrap();
    lens.remove(&PREFIX_LENS_V4).unwrap();
    lens.remove(&PREFIX_LENS_V6).unwrap();
    let dp = AyaDatapath::load(&dir.0).unwrap();
    let v4 = lens.get(&PREFIX_LENS_V4, 0).unwrap();
    assert_eq!((v4.count, &v4.lens[..2]), (2, &[24u8, 8][..]));
    assert_eq!(lens.get(&PREFIX_LENS_V6, 0).unwrap().lens[0], 64);
    assert_eq!(marked_peer(&dp, "10.9.9.9"), encrypt_mark(2, 17));
    assert_eq!(marked_peer(&dp, "10.244.2.5"), encrypt_mark(2, 17));
    assert_eq!(marked_peer(&dp, "fd00:2::5"), encrypt_mark(2, 17));
    // Deleting the only /8 drops the length from the list.
    dp.delete_cidr(net("10.0.0.0/8")).unwrap();
    assert_eq!(lens.get(&PREFIX_LENS_V4, 0).unwrap().count, 1);
}

#[test]
fn privileged_legacy_lpm_pins_are_migrated() {
    if !enc_tests::require_root("privileged_legacy_lpm_pins_are_migrated") {
        return;
    }
    use aya::maps::LpmTrie;
    use aya::maps::lpm_trie::Key;
    use enc_tunnel_ebpf::common::map_names;
    let dir = PinDir::new("legacy");
    std::fs::create_dir_all(&dir.0).unwrap();
    // What an earlier version pinned: LPM tries (BPF_F_NO_PREALLOC is required for them).
    let mut v4: LpmTrie<_, [u8; 4], u32> = LpmTrie::create(16, 1).unwrap();
    v4.insert(&Key::new(24, [10, 244, 2, 0]), 2, 0).unwrap();
    v4.insert(&Key::new(16, [10, 250, 0, 0]), 3, 0).unwrap();
    v4.pin(dir.0.join(map_names::LEGACY_REMOTE_CIDRS_V4))
        .unwrap();
    let mut v6: LpmTrie<_, [u8; 16], u32> = LpmTrie::create(16, 1).unwrap();
    let a6: std::net::Ipv6Addr = "fd00:2::".parse().unwrap();
    v6.insert(&Key::new(64, a6.octets()), 2, 0).unwrap();
    v6.pin(dir.0.join(map_names::LEGACY_REMOTE_CIDRS_V6))
        .unwrap();

    let dp = AyaDatapath::load(&dir.0).unwrap();
    assert_eq!(
        dp.dump_cidrs().unwrap(),
        vec![
            (net("10.244.2.0/24"), 2),
            (net("10.250.0.0/16"), 3),
            (net("fd00:2::/64"), 2)
        ]
    );
    assert!(!dir.0.join(map_names::LEGACY_REMOTE_CIDRS_V4).exists());
    assert!(!dir.0.join(map_names::LEGACY_REMOTE_CIDRS_V6).exists());
    dp.upsert_peer(2, AUTH_KEY).unwrap();
    assert_eq!(marked_peer(&dp, "10.244.2.5"), encrypt_mark(2, 17));
    assert_eq!(marked_peer(&dp, "fd00:2::5"), encrypt_mark(2, 17));
}

fn tcx_program_count(ifname: &str, hook: Hook) -> usize {
    use aya::programs::{SchedClassifier, TcAttachType};
    let t = match hook {
        Hook::PodIngress | Hook::UnderlayIngress => TcAttachType::Ingress,
        Hook::PodEgress | Hook::UnderlayEgress => TcAttachType::Egress,
    };
    SchedClassifier::query_tcx(ifname, t).unwrap().1.len()
}

#[test]
fn privileged_attach_in_netns_survives_reload() {
    if !enc_tests::require_root("privileged_attach_in_netns_survives_reload") {
        return;
    }
    let ns = Netns::new(&format!("enc-tebpf-{}", std::process::id())).unwrap();
    ns.run(&[
        "ip", "link", "add", "encpod0", "type", "veth", "peer", "name", "encul0",
    ])
    .unwrap();
    ns.run(&["ip", "link", "set", "encpod0", "up"]).unwrap();
    ns.run(&["ip", "link", "set", "encul0", "up"]).unwrap();
    ns.run(&[
        "ip", "link", "add", "encpod1", "type", "veth", "peer", "name", "encpeer1",
    ])
    .unwrap();
    let dir = PinDir::new("attach");
    let pin = dir.0.clone();
    ns.enter(move || {
        let dp = AyaDatapath::load(&pin).unwrap();
        assert_eq!(dp.attach_mode(), AttachMode::Tcx);
        setup(&dp, true, 0);
        dp.attach_pod("encpod0").unwrap();
        dp.attach_pod("encpod0").unwrap();
        dp.attach_underlay("encul0").unwrap();
        let want = vec![
            ("encpod0".to_owned(), Hook::PodIngress),
            ("encpod0".to_owned(), Hook::PodEgress),
            ("encul0".to_owned(), Hook::UnderlayIngress),
            ("encul0".to_owned(), Hook::UnderlayEgress),
        ];
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(dp.attached().unwrap(), want_sorted);
        for (ifname, hook) in &want {
            assert_eq!(tcx_program_count(ifname, *hook), 1, "{ifname} {hook}");
        }
        let err = dp.attach_pod("nosuchif0").unwrap_err();
        assert!(err.to_string().contains("nosuchif0"), "{err}");
        let cidrs = dp.dump_cidrs().unwrap();
        let peers = dp.dump_peers().unwrap();
        dp.test_run(Hook::PodIngress, &ipv4("10.244.1.7", "10.244.2.5"), 0, 3)
            .unwrap();
        let counters = dp.counters().unwrap();
        drop(dp);

        // A restart: same pins, new programs; links are adopted, nothing is duplicated.
        let dp = AyaDatapath::load(&pin).unwrap();
        assert_eq!(dp.dump_cidrs().unwrap(), cidrs);
        assert_eq!(dp.dump_peers().unwrap(), peers);
        assert_eq!(dp.counters().unwrap(), counters);
        assert_eq!(dp.attached().unwrap(), want_sorted);
        for (ifname, hook) in &want {
            assert_eq!(
                tcx_program_count(ifname, *hook),
                1,
                "{ifname} {hook} after reload"
            );
        }
        dp.attach_pod("encpod0").unwrap();
        assert_eq!(tcx_program_count("encpod0", Hook::PodIngress), 1);

        dp.detach_pod("encpod0").unwrap();
        dp.detach_pod("encpod0").unwrap();
        // Unpinning drops the last reference to the link; the kernel may release it (and
        // detach the program) from a work item a moment later.
        for _ in 0..100 {
            if tcx_program_count("encpod0", Hook::PodIngress) == 0
                && tcx_program_count("encpod0", Hook::PodEgress) == 0
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(tcx_program_count("encpod0", Hook::PodIngress), 0);
        assert_eq!(tcx_program_count("encpod0", Hook::PodEgress), 0);
        assert_eq!(dp.attached().unwrap().len(), 2);

        // A vanished interface's link leaves attached() and is unpinned on the next load.
        dp.attach_pod("encpod1").unwrap();
        assert_eq!(dp.attached().unwrap().len(), 4);
        let status = std::process::Command::new("ip")
            .args(["link", "del", "encpod1"])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(dp.attached().unwrap().len(), 2);
        drop(dp);
        let dp = AyaDatapath::load(&pin).unwrap();
        assert_eq!(dp.attached().unwrap().len(), 2);
        assert!(!pin.join("links/pod-ingress/encpod1").exists());
        drop(dp);
        AyaDatapath::remove_all(&pin).unwrap();
        assert!(!pin.exists());
    })
    .unwrap();
}

/// Sends `frame` out of `ifname` through an AF_PACKET socket (it arrives at the ingress of the
/// veth peer). Call from inside the namespace.
fn send_frame(ifname: &str, frame: &[u8]) {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a NUL-terminated name that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "{ifname}: {}", std::io::Error::last_os_error());
    // SAFETY: plain socket(2); protocol 0 = send only.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = i32::try_from(ifindex).unwrap();
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `sll` are valid for the lengths given and outlive the call.
    let rc = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    assert_eq!(rc, frame.len() as isize, "sendto {ifname}: {err}");
}

/// The programs answer "no objection" with TC_ACT_UNSPEC (TCX_NEXT), so a tcx program attached
/// after ours still runs. Here the one after ours is another datapath's underlay-ingress
/// program on the same interface; with TC_ACT_OK (TCX_PASS) it would never see the packet.
#[test]
fn privileged_pass_verdict_lets_the_next_tcx_program_run() {
    if !enc_tests::require_root("privileged_pass_verdict_lets_the_next_tcx_program_run") {
        return;
    }
    let ns = Netns::new(&format!("enc-tnext-{}", std::process::id())).unwrap();
    ns.run(&[
        "ip", "link", "add", "encpod0", "type", "veth", "peer", "name", "encpeer0",
    ])
    .unwrap();
    ns.run(&["ip", "link", "set", "encpod0", "up"]).unwrap();
    ns.run(&["ip", "link", "set", "encpeer0", "up"]).unwrap();
    let (first_dir, second_dir) = (PinDir::new("next-1"), PinDir::new("next-2"));
    let (first_pin, second_pin) = (first_dir.0.clone(), second_dir.0.clone());
    ns.enter(move || {
        let first = AyaDatapath::load(&first_pin).unwrap();
        setup(&first, true, 0);
        first.attach_pod("encpod0").unwrap();
        let second = AyaDatapath::load(&second_pin).unwrap();
        setup(&second, true, 0);
        second.attach_underlay("encpod0").unwrap();
        assert_eq!(tcx_program_count("encpod0", Hook::PodIngress), 2);

        // The verdict itself: not TC_ACT_OK, which would end the chain.
        let local = ipv4("10.244.2.5", "10.244.1.7");
        let r = first.test_run(Hook::PodIngress, &local, 0, 1).unwrap();
        assert_eq!(r.action, TC_ACT_UNSPEC);
        assert_ne!(r.action, TC_ACT_OK);

        // Plaintext from a remote pod CIDR to a local pod: ours (first) has no objection, the
        // second program drops and counts it.
        for _ in 0..3 {
            send_frame("encpeer0", &local);
        }
        let mut seen = 0;
        for _ in 0..50 {
            seen = second
                .counters()
                .unwrap()
                .get(&2)
                .map_or(0, |c| c.drops_for(DropReason::PlaintextFromUnderlay));
            if seen >= 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(seen, 3, "the program after ours did not see every packet");
        assert!(!first.counters().unwrap().contains_key(&2));
    })
    .unwrap();
    drop((first_dir, second_dir));
}
