//! Privileged tests of the real programs: load them with maps pinned in a temporary directory
//! on bpffs, fill the maps, and run crafted packets through each hook with BPF_PROG_TEST_RUN.
//! One test attaches to a veth pair in a network namespace. All need root.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use enc_tests::netns::Netns;
use enc_tunnel_ebpf::common::{MARK_MAGIC_DECRYPTED, encrypt_mark};
use enc_tunnel_ebpf::{
    AttachMode, AyaDatapath, Backend, Datapath, DatapathConfig, DropReason, Hook, PeerState,
    TC_ACT_OK, TC_ACT_SHOT,
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
    assert_eq!((r.action, r.mark), (TC_ACT_OK, want));

    let v6 = ipv6("fd00:1::7", "fd00:2::5");
    let r = dp.test_run(Hook::PodIngress, &v6, 0, 1).unwrap();
    assert_eq!((r.action, r.mark), (TC_ACT_OK, want));

    // Bits 7..0 are not ours and survive; a stale enc mark is replaced.
    let r = dp
        .test_run_with_mark(Hook::PodIngress, &v4, 0, 0xFFFF_FF5A, 1)
        .unwrap();
    assert_eq!((r.action, r.mark), (TC_ACT_OK, want | 0x5A));

    // Fragments are handled like whole packets: first (MF), middle and last (offset != 0).
    for frag in [0x2000, 0x2000 | 185, 185] {
        let p = ipv4_frag("10.244.1.7", "10.244.2.5", frag);
        let r = dp.test_run(Hook::PodIngress, &p, 0, 1).unwrap();
        assert_eq!((r.action, r.mark), (TC_ACT_OK, want), "frag word {frag:#x}");
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
            Ok(r) => assert_eq!((r.action, r.mark), (TC_ACT_OK, mark_in), "{what}"),
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
        assert_eq!((r.action, r.mark), (TC_ACT_OK, mark_in), "{what}");
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
    assert_eq!((r.action, r.mark), (TC_ACT_OK, 0));
    let r = dp
        .test_run(Hook::UnderlayEgress, &ipv4("10.0.0.1", "10.244.2.5"), 0, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_OK);
    let r = dp
        .test_run(
            Hook::UnderlayIngress,
            &ipv4("10.244.2.5", "10.244.1.7"),
            0,
            1,
        )
        .unwrap();
    assert_eq!(r.action, TC_ACT_OK);
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
        assert_eq!((r.action, r.mark), (TC_ACT_OK, 0), "{src} via wg");
        let r = dp.test_run(Hook::PodEgress, &p, 7, 1).unwrap();
        assert_eq!(r.action, TC_ACT_SHOT, "{src} via ifindex 7");
        // The decrypted mark (XFRM output mark) also proves the decrypt path.
        let r = dp
            .test_run_with_mark(Hook::PodEgress, &p, 7, MARK_MAGIC_DECRYPTED << 8, 1)
            .unwrap();
        assert_eq!(r.action, TC_ACT_OK, "{src} with decrypted mark");
    }
    assert_eq!(drops(&dp, 2, DropReason::NotDecrypted), 2);

    let r = dp
        .test_run(Hook::PodEgress, &ipv4("10.244.3.5", "10.244.1.7"), wg, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_SHOT);
    assert_eq!(drops(&dp, 3, DropReason::PeerNotAuthenticated), 1);
    let r = dp
        .test_run(Hook::PodEgress, &ipv4("10.244.1.8", "10.244.1.7"), 7, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_OK, "local source");

    // decrypt_ifindex 0 turns the interface check off.
    dp.set_config(DatapathConfig {
        strict: true,
        decrypt_ifindex: 0,
    })
    .unwrap();
    let r = dp
        .test_run(Hook::PodEgress, &ipv4("10.244.2.5", "10.244.1.7"), 7, 1)
        .unwrap();
    assert_eq!(r.action, TC_ACT_OK);
    assert_eq!(drops(&dp, 2, DropReason::NotDecrypted), 2);
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
        assert_eq!(r.action, TC_ACT_OK, "{hook}");
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
    assert_eq!(r.action, TC_ACT_OK);
    assert!(r.duration.as_nanos() > 0);
    assert_eq!(dp.counters().unwrap()[&2].steered_packets, 1000);
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
