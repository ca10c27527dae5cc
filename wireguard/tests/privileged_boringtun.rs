//! Privileged integration tests: BoringtunWg devices in network namespaces joined by veth pairs
//! (two, or three for mixed static keys). Need root; under `CI` they fail instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::thread;
use std::time::Duration;

use enc_tests::netns::Netns;
use enc_tests::sys;
use enc_tests::traffic::{TcpFlow, UdpStream};
use enc_wireguard::{
    BoringtunConfig, BoringtunWg, PeerSnapshot, PeerSpec, PresharedKey, PrivateKey, PublicKey,
    WgBackend,
};

/// Starts a device from a thread inside `ns`: its TUN device and UDP socket stay in that
/// namespace and can be used from any thread afterwards.
fn start_in(ns: &Netns, ifname: &str, key: &PrivateKey, listen: &str) -> BoringtunWg {
    let cfg = BoringtunConfig {
        ifname: ifname.to_owned(),
        private_key: key.clone(),
        listen: listen.parse().unwrap(),
    };
    ns.enter(move || BoringtunWg::start(cfg))
        .unwrap()
        .expect("start BoringtunWg")
}

fn spec(key: PublicKey, psk: &PresharedKey, endpoint: &str, allowed: &str) -> PeerSpec {
    PeerSpec {
        public_key: key,
        preshared_key: Some(psk.clone()),
        endpoint: Some(endpoint.parse().unwrap()),
        allowed_ips: vec![allowed.parse().unwrap()],
        persistent_keepalive: None,
        local_key: None,
        previous_public_key: None,
    }
}

fn configure_link(ns: &Netns, ifname: &str, local: &str, remote: &str) {
    ns.run(&["ip", "link", "set", ifname, "up", "mtu", "1420"])
        .unwrap();
    ns.run(&["ip", "addr", "add", &format!("{local}/32"), "dev", ifname])
        .unwrap();
    ns.run(&["ip", "route", "add", &format!("{remote}/32"), "dev", ifname])
        .unwrap();
}

fn ping(ns: &Netns, count: &str, wait: &str, dst: &str) -> bool {
    sys::output_in(
        ns.name(),
        &["ping", "-n", "-q", "-c", count, "-W", wait, dst],
    )
    .unwrap()
    .status
    .success()
}

#[test]
fn privileged_boringtun_two_netns_ping() {
    if !enc_tests::require_root("privileged_boringtun_two_netns_ping") {
        return;
    }

    let pid = std::process::id();
    let ns_a = Netns::new(&format!("encwg-a-{pid}")).unwrap();
    let ns_b = Netns::new(&format!("encwg-b-{pid}")).unwrap();
    let (veth_a, veth_b) = (format!("encva{pid}"), format!("encvb{pid}"));
    sys::run(&[
        "ip", "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
    ])
    .unwrap();
    for (ns, veth, addr) in [
        (&ns_a, &veth_a, "192.0.2.1/24"),
        (&ns_b, &veth_b, "192.0.2.2/24"),
    ] {
        sys::run(&["ip", "link", "set", veth, "netns", ns.name()]).unwrap();
        ns.run(&["ip", "addr", "add", addr, "dev", veth]).unwrap();
        ns.run(&["ip", "link", "set", veth, "up"]).unwrap();
    }

    // --- matching preshared keys: traffic flows ---
    let (key_a, key_b) = (
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    );
    let psk = PresharedKey::generate().unwrap();
    let wg_a = start_in(&ns_a, "wg0", &key_a, "192.0.2.1:51820");
    let wg_b = start_in(&ns_b, "wg0", &key_b, "192.0.2.2:51820");
    assert_eq!(wg_a.listen_port(), 51820);
    let spec_ab = spec(key_b.public_key(), &psk, "192.0.2.2:51820", "10.99.0.2/32");
    wg_a.upsert_peer(&spec_ab).unwrap();
    wg_b.upsert_peer(&spec(
        key_a.public_key(),
        &psk,
        "192.0.2.1:51820",
        "10.99.0.1/32",
    ))
    .unwrap();
    configure_link(&ns_a, "wg0", "10.99.0.1", "10.99.0.2");
    configure_link(&ns_b, "wg0", "10.99.0.2", "10.99.0.1");

    assert!(
        ping(&ns_a, "3", "2", "10.99.0.2"),
        "ping over WireGuard failed"
    );

    for (wg, peer) in [(&wg_a, key_b.public_key()), (&wg_b, key_a.public_key())] {
        let d = wg.dump().unwrap();
        assert_eq!(d.peers.len(), 1, "{d:?}");
        let p = &d.peers[0];
        assert_eq!(p.public_key, peer);
        assert!(p.last_handshake.is_some(), "no handshake: {d:?}");
        assert!(
            p.rx_bytes > 0 && p.tx_bytes > 0,
            "no traffic counted: {d:?}"
        );
        assert!(p.has_preshared_key);
        assert_eq!(wg.drop_counters().bad_source, 0);
    }

    // Re-applying the same spec must not reset the session.
    wg_a.upsert_peer(&spec_ab).unwrap();
    assert!(wg_a.dump().unwrap().peers[0].last_handshake.is_some());
    assert!(
        ping(&ns_a, "1", "2", "10.99.0.2"),
        "ping after idempotent upsert failed"
    );

    // Cryptokey routing: B sends from an inner source A does not allow for B; A drops it.
    ns_b.run(&["ip", "addr", "add", "10.99.0.9/32", "dev", "wg0"])
        .unwrap();
    let spoofed = sys::output_in(
        ns_b.name(),
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            "10.99.0.9",
            "10.99.0.1",
        ],
    )
    .unwrap();
    assert!(
        !spoofed.status.success(),
        "packet from a disallowed source passed"
    );
    assert!(
        wg_a.drop_counters().bad_source > 0,
        "{:?}",
        wg_a.drop_counters()
    );

    // --- mismatching preshared keys: nothing passes ---
    let (psk_a, psk_b) = (
        PresharedKey::generate().unwrap(),
        PresharedKey::generate().unwrap(),
    );
    let wg1_a = start_in(&ns_a, "wg1", &key_a, "192.0.2.1:51821");
    let wg1_b = start_in(&ns_b, "wg1", &key_b, "192.0.2.2:51821");
    wg1_a
        .upsert_peer(&spec(
            key_b.public_key(),
            &psk_a,
            "192.0.2.2:51821",
            "10.99.1.2/32",
        ))
        .unwrap();
    wg1_b
        .upsert_peer(&spec(
            key_a.public_key(),
            &psk_b,
            "192.0.2.1:51821",
            "10.99.1.1/32",
        ))
        .unwrap();
    configure_link(&ns_a, "wg1", "10.99.1.1", "10.99.1.2");
    configure_link(&ns_b, "wg1", "10.99.1.2", "10.99.1.1");

    assert!(
        !ping(&ns_a, "2", "1", "10.99.1.2"),
        "ping passed with mismatching preshared keys"
    );
    let d = wg1_a.dump().unwrap();
    assert!(
        d.peers[0].last_handshake.is_none(),
        "handshake with wrong psk: {d:?}"
    );
    assert_eq!(d.peers[0].rx_bytes, 0, "{d:?}");
    assert!(
        wg1_a.drop_counters().invalid > 0,
        "the responder's handshake should have failed to authenticate: {:?}",
        wg1_a.drop_counters()
    );

    // Dropping a device removes its interface.
    wg1_a.shutdown();
    thread::sleep(Duration::from_millis(100));
    assert!(
        !sys::output_in(ns_a.name(), &["ip", "link", "show", "wg1"])
            .unwrap()
            .status
            .success(),
        "wg1 still exists after shutdown"
    );
    drop((wg_a, wg_b, wg1_b));
}

/// Inner addresses of the two ends in [`Pair`].
const A_INNER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const B_INNER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

/// Two namespaces joined by a veth pair (192.0.2.1 and 192.0.2.2), each with a BoringtunWg
/// device `wg0` (10.99.0.1 and 10.99.0.2) peered with the other one. The devices come first so
/// that they stop before their namespaces go.
struct Pair {
    wg_a: BoringtunWg,
    wg_b: BoringtunWg,
    /// A's spec for B, and B's spec for A.
    spec_ab: PeerSpec,
    spec_ba: PeerSpec,
    ns_a: Netns,
    ns_b: Netns,
}

/// One end of a [`Pair`].
#[derive(Clone, Copy, Debug)]
enum End {
    A,
    B,
}

impl Pair {
    /// Builds the pair with `psk` on both ends; `tag` keeps names apart from other tests.
    fn new(tag: char, psk: &PresharedKey) -> Self {
        let pid = std::process::id();
        let ns_a = Netns::new(&format!("encwg-{tag}-a-{pid}")).unwrap();
        let ns_b = Netns::new(&format!("encwg-{tag}-b-{pid}")).unwrap();
        let (veth_a, veth_b) = (format!("encv{tag}a{pid}"), format!("encv{tag}b{pid}"));
        sys::run(&[
            "ip", "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
        ])
        .unwrap();
        for (ns, veth, addr) in [
            (&ns_a, &veth_a, "192.0.2.1/24"),
            (&ns_b, &veth_b, "192.0.2.2/24"),
        ] {
            sys::run(&["ip", "link", "set", veth, "netns", ns.name()]).unwrap();
            ns.run(&["ip", "addr", "add", addr, "dev", veth]).unwrap();
            ns.run(&["ip", "link", "set", veth, "up"]).unwrap();
        }
        let (key_a, key_b) = (
            PrivateKey::generate().unwrap(),
            PrivateKey::generate().unwrap(),
        );
        let wg_a = start_in(&ns_a, "wg0", &key_a, "192.0.2.1:51820");
        let wg_b = start_in(&ns_b, "wg0", &key_b, "192.0.2.2:51820");
        let spec_ab = spec(key_b.public_key(), psk, "192.0.2.2:51820", "10.99.0.2/32");
        let spec_ba = spec(key_a.public_key(), psk, "192.0.2.1:51820", "10.99.0.1/32");
        wg_a.upsert_peer(&spec_ab).unwrap();
        wg_b.upsert_peer(&spec_ba).unwrap();
        configure_link(&ns_a, "wg0", "10.99.0.1", "10.99.0.2");
        configure_link(&ns_b, "wg0", "10.99.0.2", "10.99.0.1");
        Self {
            wg_a,
            wg_b,
            spec_ab,
            spec_ba,
            ns_a,
            ns_b,
        }
    }

    /// Sets a new preshared key on one end (as the agent does at a rotation).
    fn set_psk(&mut self, end: End, psk: &PresharedKey) {
        let (wg, spec) = match end {
            End::A => (&self.wg_a, &mut self.spec_ab),
            End::B => (&self.wg_b, &mut self.spec_ba),
        };
        spec.preshared_key = Some(psk.clone());
        wg.upsert_peer(spec).unwrap();
    }

    /// Re-upserts one end's peer as the agent does once both ends rolled their static keys: the
    /// other end's new key (the old one as `previous_public_key`), our new key, a new psk.
    fn roll_keys(&mut self, end: End, own: PublicKey, other: PublicKey, psk: &PresharedKey) {
        let (wg, spec) = match end {
            End::A => (&self.wg_a, &mut self.spec_ab),
            End::B => (&self.wg_b, &mut self.spec_ba),
        };
        spec.previous_public_key = Some(spec.public_key);
        spec.public_key = other;
        spec.local_key = Some(own);
        spec.preshared_key = Some(psk.clone());
        wg.upsert_peer(spec).unwrap();
    }

    /// What an end reports about its only peer.
    fn peer(&self, end: End) -> PeerSnapshot {
        let wg = match end {
            End::A => &self.wg_a,
            End::B => &self.wg_b,
        };
        let d = wg.dump().unwrap();
        assert_eq!(d.peers.len(), 1, "{d:?}");
        d.peers.into_iter().next().unwrap()
    }

    /// Waits until both ends have a session under their newest key.
    fn wait_switched(&self, timeout: Duration) {
        sys::wait_for("both ends on the new key", timeout, || {
            let (a, b) = (self.peer(End::A), self.peer(End::B));
            if a.current_has_session && b.current_has_session {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!("A: {a:?}; B: {b:?}"))
            }
        })
        .unwrap();
    }
}

/// Rotations as the agent runs them: both ends switch the preshared key up to 300 ms apart,
/// alternating which goes first, under a 3000 packet/s UDP stream and a TCP stream. Not one
/// datagram may be lost and TCP must not stall.
#[test]
fn privileged_boringtun_psk_rotation_loses_no_packets() {
    if !enc_tests::require_root("privileged_boringtun_psk_rotation_loses_no_packets") {
        return;
    }
    let mut pair = Pair::new('r', &PresharedKey::generate().unwrap());
    assert!(
        ping(&pair.ns_a, "3", "2", "10.99.0.2"),
        "ping over WireGuard failed"
    );

    let udp = UdpStream::start(&pair.ns_a, &pair.ns_b, B_INNER, 3000, 200).unwrap();
    let udp_back = UdpStream::start(&pair.ns_b, &pair.ns_a, A_INNER, 500, 200).unwrap();
    let tcp = TcpFlow::start(&pair.ns_b, &pair.ns_a, A_INNER, 1_000_000).unwrap();
    thread::sleep(Duration::from_millis(500));

    let mut counters = [pair.peer(End::A), pair.peer(End::B)].map(|p| (p.rx_bytes, p.tx_bytes));
    let apart_ms = [0, 300, 150, 40, 250, 100, 200, 10];
    for (i, apart) in apart_ms.into_iter().enumerate() {
        let psk = PresharedKey::generate().unwrap();
        let (first, second) = if i % 2 == 0 {
            (End::A, End::B)
        } else {
            (End::B, End::A)
        };
        pair.set_psk(first, &psk);
        let during = pair.peer(first);
        assert_eq!(during.generations, 2, "change {i}: {during:?}");
        thread::sleep(Duration::from_millis(apart));
        pair.set_psk(second, &psk);
        thread::sleep(Duration::from_millis(1000));
        pair.wait_switched(Duration::from_secs(3));
        // Byte counters span the generations: they never go backwards across a change.
        for (end, before) in [End::A, End::B].into_iter().zip(counters.iter_mut()) {
            let p = pair.peer(end);
            assert!(
                p.rx_bytes >= before.0 && p.tx_bytes >= before.1,
                "change {i}: {end:?} counters went back from {before:?}: {p:?}"
            );
            *before = (p.rx_bytes, p.tx_bytes);
        }
    }
    thread::sleep(Duration::from_millis(500));

    let report = udp.stop(Duration::from_millis(500)).unwrap();
    eprintln!("A -> B {report}");
    let back = udp_back.stop(Duration::from_millis(500)).unwrap();
    eprintln!("B -> A {back}");
    let tcp = tcp.stop().unwrap();
    eprintln!("B -> A {tcp}");
    for (name, wg) in [("A", &pair.wg_a), ("B", &pair.wg_b)] {
        eprintln!("{name} drops: {:?}", wg.drop_counters());
    }
    assert!(report.sent > 25_000, "stream too short: {report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.corrupt + report.send_errors, 0, "{report}");
    assert_eq!(back.lost, 0, "{back}");
    assert!(tcp.is_intact(), "{tcp}");
    assert!(tcp.max_stall < Duration::from_millis(500), "{tcp}");

    // The previous generations go once the grace period after the last switch is over.
    sys::wait_for("one generation per peer", Duration::from_secs(45), || {
        let (a, b) = (pair.peer(End::A), pair.peer(End::B));
        if a.generations == 1 && b.generations == 1 {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("A: {a:?}; B: {b:?}"))
        }
    })
    .unwrap();
    for end in [End::A, End::B] {
        let p = pair.peer(end);
        assert!(p.current_has_session && p.last_handshake.is_some(), "{p:?}");
    }
    assert!(
        ping(&pair.ns_a, "2", "2", "10.99.0.2"),
        "ping after the rotations failed"
    );
}

/// Only one end changes its preshared key: its new generation cannot complete a handshake, and
/// the previous one keeps carrying traffic both ways. A second change before the first
/// completed keeps the working generation; once the other end catches up, traffic moves over.
#[test]
fn privileged_boringtun_psk_mismatch_keeps_the_previous_generation() {
    if !enc_tests::require_root("privileged_boringtun_psk_mismatch_keeps_the_previous_generation") {
        return;
    }
    let mut pair = Pair::new('m', &PresharedKey::generate().unwrap());
    assert!(
        ping(&pair.ns_a, "3", "2", "10.99.0.2"),
        "ping over WireGuard failed"
    );
    let udp = UdpStream::start(&pair.ns_a, &pair.ns_b, B_INNER, 1000, 200).unwrap();
    let udp_back = UdpStream::start(&pair.ns_b, &pair.ns_a, A_INNER, 1000, 200).unwrap();
    thread::sleep(Duration::from_millis(500));

    // A alone switches; 7 s is past boringtun's 5 s retry of the failed handshake.
    let invalid_before = pair.wg_a.drop_counters().invalid;
    pair.set_psk(End::A, &PresharedKey::generate().unwrap());
    thread::sleep(Duration::from_secs(7));
    let a = pair.peer(End::A);
    assert_eq!(a.generations, 2, "{a:?}");
    assert!(
        !a.current_has_session && a.last_handshake.is_none(),
        "{a:?}"
    );
    let b = pair.peer(End::B);
    assert_eq!(b.generations, 1, "{b:?}");
    assert!(
        pair.wg_a.drop_counters().invalid > invalid_before,
        "B's old-key answers should fail at A: {:?}",
        pair.wg_a.drop_counters()
    );

    // A changes again before its first change completed: the working generation stays.
    let latest = PresharedKey::generate().unwrap();
    pair.set_psk(End::A, &latest);
    let a = pair.peer(End::A);
    assert_eq!(a.generations, 2, "{a:?}");
    thread::sleep(Duration::from_secs(2));

    // B catches up with the latest key; both move over to it.
    pair.set_psk(End::B, &latest);
    pair.wait_switched(Duration::from_secs(5));
    thread::sleep(Duration::from_millis(500));

    let report = udp.stop(Duration::from_millis(500)).unwrap();
    eprintln!("A -> B {report}");
    let back = udp_back.stop(Duration::from_millis(500)).unwrap();
    eprintln!("B -> A {back}");
    eprintln!("A drops: {:?}", pair.wg_a.drop_counters());
    assert!(report.sent > 9_000, "stream too short: {report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(back.lost, 0, "{back}");

    // Neither an unchanged spec nor an allowed-IPs change starts a new generation.
    let before = pair.peer(End::A);
    pair.wg_a.upsert_peer(&pair.spec_ab.clone()).unwrap();
    pair.spec_ab
        .allowed_ips
        .push("10.99.7.0/24".parse().unwrap());
    pair.wg_a.upsert_peer(&pair.spec_ab.clone()).unwrap();
    let after = pair.peer(End::A);
    assert!(
        after.current_has_session && after.generations == before.generations,
        "before {before:?}, after {after:?}"
    );
    assert!(after.last_handshake.is_some(), "{after:?}");
    assert!(
        ping(&pair.ns_a, "2", "2", "10.99.0.2"),
        "ping after the key changes failed"
    );
}

/// Rotations where both ends also roll their static key pairs, as the agent runs them: each end
/// adds a new key, then re-upserts its peer with the other end's new key (the old one as
/// `previous_public_key`), its own new key and a new psk, the two ends up to 300 ms apart, under a
/// 3000 packet/s UDP stream and a TCP stream. Keys older than the current ones are dropped at each
/// rotation, while the previous generations still use them. Not one datagram may be lost.
#[test]
fn privileged_boringtun_static_key_rotation_loses_no_packets() {
    if !enc_tests::require_root("privileged_boringtun_static_key_rotation_loses_no_packets") {
        return;
    }
    let mut pair = Pair::new('s', &PresharedKey::generate().unwrap());
    assert!(
        ping(&pair.ns_a, "3", "2", "10.99.0.2"),
        "ping over WireGuard failed"
    );
    let udp = UdpStream::start(&pair.ns_a, &pair.ns_b, B_INNER, 3000, 200).unwrap();
    let udp_back = UdpStream::start(&pair.ns_b, &pair.ns_a, A_INNER, 500, 200).unwrap();
    let tcp = TcpFlow::start(&pair.ns_b, &pair.ns_a, A_INNER, 1_000_000).unwrap();
    thread::sleep(Duration::from_millis(500));

    let mut counters = [pair.peer(End::A), pair.peer(End::B)].map(|p| (p.rx_bytes, p.tx_bytes));
    let mut keys = [pair.wg_a.public_key(), pair.wg_b.public_key()];
    let apart_ms = [0, 300, 150, 40, 250, 100];
    for (i, apart) in apart_ms.into_iter().enumerate() {
        // Keys older than the current ones go, as the agent drops a key no epoch uses; the
        // previous generations that still use them keep their sessions until retired.
        for (wg, key) in [(&pair.wg_a, keys[0]), (&pair.wg_b, keys[1])] {
            wg.retain_private_keys(&[key]).unwrap();
            assert_eq!(wg.private_keys(), vec![key], "change {i}");
        }
        let new = [&pair.wg_a, &pair.wg_b]
            .map(|wg| wg.add_private_key(PrivateKey::generate().unwrap()).unwrap());
        assert_eq!(pair.wg_a.private_keys(), vec![new[0], keys[0]]);
        assert_eq!(pair.wg_a.public_key(), new[0]);
        let psk = PresharedKey::generate().unwrap();
        let ((first, f), (second, s)) = if i % 2 == 0 {
            ((End::A, 0), (End::B, 1))
        } else {
            ((End::B, 1), (End::A, 0))
        };
        pair.roll_keys(first, new[f], new[s], &psk);
        let during = pair.peer(first);
        assert_eq!(during.generations, 2, "change {i}: {during:?}");
        assert_eq!(
            (during.public_key, during.local_key),
            (new[s], new[f]),
            "change {i}"
        );
        thread::sleep(Duration::from_millis(apart));
        pair.roll_keys(second, new[s], new[f], &psk);
        thread::sleep(Duration::from_millis(1000));
        pair.wait_switched(Duration::from_secs(3));
        // Byte counters span the generations, across the re-keying too.
        for (end, before) in [End::A, End::B].into_iter().zip(counters.iter_mut()) {
            let p = pair.peer(end);
            assert!(
                p.rx_bytes >= before.0 && p.tx_bytes >= before.1,
                "change {i}: {end:?} counters went back from {before:?}: {p:?}"
            );
            *before = (p.rx_bytes, p.tx_bytes);
        }
        keys = new;
    }
    // Only the newest keys are left; traffic goes on.
    for (wg, key) in [(&pair.wg_a, keys[0]), (&pair.wg_b, keys[1])] {
        wg.retain_private_keys(&[key]).unwrap();
        assert_eq!(wg.private_keys(), vec![key]);
    }
    thread::sleep(Duration::from_millis(1000));

    let report = udp.stop(Duration::from_millis(500)).unwrap();
    eprintln!("A -> B {report}");
    let back = udp_back.stop(Duration::from_millis(500)).unwrap();
    eprintln!("B -> A {back}");
    let tcp = tcp.stop().unwrap();
    eprintln!("B -> A {tcp}");
    for (name, wg) in [("A", &pair.wg_a), ("B", &pair.wg_b)] {
        eprintln!("{name} drops: {:?}", wg.drop_counters());
    }
    assert!(report.sent > 18_000, "stream too short: {report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.corrupt + report.send_errors, 0, "{report}");
    assert_eq!(back.lost, 0, "{back}");
    assert!(tcp.is_intact(), "{tcp}");
    assert!(tcp.max_stall < Duration::from_millis(500), "{tcp}");

    sys::wait_for("one generation per peer", Duration::from_secs(45), || {
        let (a, b) = (pair.peer(End::A), pair.peer(End::B));
        if a.generations == 1 && b.generations == 1 {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("A: {a:?}; B: {b:?}"))
        }
    })
    .unwrap();
    for (end, wg, own, other) in [
        (End::A, &pair.wg_a, keys[0], keys[1]),
        (End::B, &pair.wg_b, keys[1], keys[0]),
    ] {
        let d = wg.dump().unwrap();
        assert_eq!(d.public_key, own, "{d:?}");
        let p = pair.peer(end);
        assert_eq!((p.public_key, p.local_key), (other, own), "{p:?}");
        assert!(p.current_has_session && p.last_handshake.is_some(), "{p:?}");
    }
    assert!(
        ping(&pair.ns_a, "2", "2", "10.99.0.2"),
        "ping after the rotations failed"
    );
}

/// What `wg` reports about the peer with `key`.
fn peer_of(wg: &BoringtunWg, key: PublicKey) -> PeerSnapshot {
    let d = wg.dump().unwrap();
    d.peers
        .iter()
        .find(|p| p.public_key == key)
        .cloned()
        .unwrap_or_else(|| panic!("no peer {key}: {d:?}"))
}

/// Waits until both ends of a link have a session under their newest keys.
fn wait_link(what: &str, ends: [(&BoringtunWg, PublicKey); 2]) {
    sys::wait_for(what, Duration::from_secs(3), || {
        let [x, y] = ends.map(|(wg, key)| peer_of(wg, key));
        if x.current_has_session && y.current_has_session {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("{x:?}; {y:?}"))
        }
    })
    .unwrap();
}

/// A holds two static keys at once: it rolls its key towards B while C still uses A's old key,
/// so initiations and responses for both keys reach A, which routes each by its keys. Then a
/// preshared-key change with C completes through C's initiation to A's older key, A cannot drop
/// that key while C uses it, and once A rolled towards C too it can. Nothing is lost on either
/// link.
#[test]
fn privileged_boringtun_static_key_rolled_towards_one_peer_only() {
    if !enc_tests::require_root("privileged_boringtun_static_key_rolled_towards_one_peer_only") {
        return;
    }
    let pid = std::process::id();
    let [ns_a, ns_b, ns_c] =
        ["a", "b", "c"].map(|n| Netns::new(&format!("encwg-t-{n}-{pid}")).unwrap());
    for (tag, peer, a_addr, addr) in [
        ('b', &ns_b, "192.0.2.1/24", "192.0.2.2/24"),
        ('c', &ns_c, "198.51.100.1/24", "198.51.100.3/24"),
    ] {
        let (veth_a, veth_peer) = (format!("encvta{tag}{pid}"), format!("encvt{tag}a{pid}"));
        sys::run(&[
            "ip", "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_peer,
        ])
        .unwrap();
        for (ns, veth, addr) in [(&ns_a, &veth_a, a_addr), (peer, &veth_peer, addr)] {
            sys::run(&["ip", "link", "set", veth, "netns", ns.name()]).unwrap();
            ns.run(&["ip", "addr", "add", addr, "dev", veth]).unwrap();
            ns.run(&["ip", "link", "set", veth, "up"]).unwrap();
        }
    }
    let [key_a, key_b, key_c] = [(); 3].map(|()| PrivateKey::generate().unwrap());
    let (a0, b, c) = (key_a.public_key(), key_b.public_key(), key_c.public_key());
    let wg_a = start_in(&ns_a, "wg0", &key_a, "0.0.0.0:51820");
    let wg_b = start_in(&ns_b, "wg0", &key_b, "192.0.2.2:51820");
    let wg_c = start_in(&ns_c, "wg0", &key_c, "198.51.100.3:51820");
    let (psk_ab, psk_ac) = (
        PresharedKey::generate().unwrap(),
        PresharedKey::generate().unwrap(),
    );
    let mut ab = spec(b, &psk_ab, "192.0.2.2:51820", "10.99.0.2/32");
    let mut ac = spec(c, &psk_ac, "198.51.100.3:51820", "10.99.0.3/32");
    let mut ba = spec(a0, &psk_ab, "192.0.2.1:51820", "10.99.0.1/32");
    let mut ca = spec(a0, &psk_ac, "198.51.100.1:51820", "10.99.0.1/32");
    wg_a.upsert_peer(&ab).unwrap();
    wg_a.upsert_peer(&ac).unwrap();
    wg_b.upsert_peer(&ba).unwrap();
    wg_c.upsert_peer(&ca).unwrap();
    configure_link(&ns_a, "wg0", "10.99.0.1", "10.99.0.2");
    ns_a.run(&["ip", "route", "add", "10.99.0.3/32", "dev", "wg0"])
        .unwrap();
    configure_link(&ns_b, "wg0", "10.99.0.2", "10.99.0.1");
    configure_link(&ns_c, "wg0", "10.99.0.3", "10.99.0.1");
    assert!(ping(&ns_a, "3", "2", "10.99.0.2"), "ping A -> B failed");
    assert!(ping(&ns_a, "3", "2", "10.99.0.3"), "ping A -> C failed");
    const C_INNER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
    let streams = [
        (
            "A -> B",
            UdpStream::start(&ns_a, &ns_b, B_INNER, 1000, 200).unwrap(),
        ),
        (
            "A -> C",
            UdpStream::start(&ns_a, &ns_c, C_INNER, 1000, 200).unwrap(),
        ),
        (
            "B -> A",
            UdpStream::start(&ns_b, &ns_a, A_INNER, 500, 200).unwrap(),
        ),
        (
            "C -> A",
            UdpStream::start(&ns_c, &ns_a, A_INNER, 500, 200).unwrap(),
        ),
    ];
    thread::sleep(Duration::from_millis(500));

    // C's sessions stay bound to A's current key: naming it explicitly changes nothing.
    ac.local_key = Some(a0);
    wg_a.upsert_peer(&ac).unwrap();
    let p = peer_of(&wg_a, c);
    assert!(p.generations == 1 && p.current_has_session, "{p:?}");

    // A rolls its key towards B only.
    let a1 = wg_a
        .add_private_key(PrivateKey::generate().unwrap())
        .unwrap();
    assert_eq!(wg_a.private_keys(), vec![a1, a0]);
    let psk = PresharedKey::generate().unwrap();
    ab.local_key = Some(a1);
    ab.preshared_key = Some(psk.clone());
    wg_a.upsert_peer(&ab).unwrap();
    thread::sleep(Duration::from_millis(100));
    ba.previous_public_key = Some(a0);
    ba.public_key = a1;
    ba.preshared_key = Some(psk);
    wg_b.upsert_peer(&ba).unwrap();
    wait_link("A and B on A's new key", [(&wg_a, b), (&wg_b, a1)]);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(peer_of(&wg_a, b).local_key, a1);
    let p = peer_of(&wg_a, c);
    assert!(
        p.local_key == a0 && p.generations == 1 && p.current_has_session,
        "{p:?}"
    );

    // A changes the preshared key with C first: C answers A's initiation under the old one,
    // which fails. C follows 100 ms later; within 3 s (before A's 5 s retry) only C's
    // initiation, which is for A's older key, can complete the handshake.
    let psk = PresharedKey::generate().unwrap();
    ac.preshared_key = Some(psk.clone());
    wg_a.upsert_peer(&ac).unwrap();
    thread::sleep(Duration::from_millis(100));
    ca.preshared_key = Some(psk);
    wg_c.upsert_peer(&ca).unwrap();
    wait_link("A and C on the new psk", [(&wg_a, c), (&wg_c, a0)]);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(peer_of(&wg_a, c).local_key, a0);

    // A cannot drop its older key while C uses it.
    let err = wg_a.retain_private_keys(&[a1]).unwrap_err();
    assert!(
        matches!(err, enc_wireguard::Error::KeyInUse { key, peer, .. } if key == a0 && peer == c),
        "{err}"
    );
    assert_eq!(wg_a.private_keys(), vec![a1, a0]);

    // A rolls towards C too; then the older key can go.
    let psk = PresharedKey::generate().unwrap();
    ac.local_key = Some(a1);
    ac.preshared_key = Some(psk.clone());
    wg_a.upsert_peer(&ac).unwrap();
    thread::sleep(Duration::from_millis(100));
    ca.previous_public_key = Some(a0);
    ca.public_key = a1;
    ca.preshared_key = Some(psk);
    wg_c.upsert_peer(&ca).unwrap();
    wait_link("A and C on A's new key", [(&wg_a, c), (&wg_c, a1)]);
    wg_a.retain_private_keys(&[a1]).unwrap();
    assert_eq!(wg_a.private_keys(), vec![a1]);
    thread::sleep(Duration::from_millis(1000));

    for (name, stream) in streams {
        let report = stream.stop(Duration::from_millis(500)).unwrap();
        eprintln!("{name} {report}");
        assert!(report.sent > 1_500, "{name}: stream too short: {report}");
        assert_eq!(report.lost, 0, "{name}: {report}");
        assert_eq!(report.corrupt + report.send_errors, 0, "{name}: {report}");
    }
    for (name, wg) in [("A", &wg_a), ("B", &wg_b), ("C", &wg_c)] {
        eprintln!("{name} drops: {:?}", wg.drop_counters());
    }
    assert!(ping(&ns_a, "2", "2", "10.99.0.2"), "ping A -> B failed");
    assert!(ping(&ns_a, "2", "2", "10.99.0.3"), "ping A -> C failed");
    for (wg, peer) in [(&wg_b, a1), (&wg_c, a1)] {
        let p = peer_of(wg, peer);
        assert_eq!(wg.dump().unwrap().peers.len(), 1);
        assert!(p.current_has_session, "{p:?}");
    }
    drop((wg_a, wg_b, wg_c));
}
