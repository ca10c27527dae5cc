//! Privileged tests of the real programs: load them with maps pinned in a temporary directory
//! on bpffs, fill the maps, and run crafted packets through each hook with BPF_PROG_TEST_RUN.
//! One test attaches to a veth pair in a network namespace. All need root.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use enc_tests::netns::Netns;
use enc_tunnel_ebpf::common::{MARK_MAGIC_DECRYPTED, MAX_PREFIX_LENS, encrypt_mark};
use enc_tunnel_ebpf::{
    AttachMode, AyaDatapath, Backend, Datapath, DatapathConfig, DropReason, Error, Hook, PeerState,
    TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC,
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
