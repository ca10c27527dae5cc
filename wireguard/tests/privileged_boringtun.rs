//! Privileged integration test: two BoringtunWg devices in two network namespaces joined by a
//! veth pair. Needs root; under `CI` it fails instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::thread;
use std::time::Duration;

use enc_tests::netns::Netns;
use enc_tests::sys;
use enc_wireguard::{
    BoringtunConfig, BoringtunWg, PeerSpec, PresharedKey, PrivateKey, PublicKey, WgBackend,
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
