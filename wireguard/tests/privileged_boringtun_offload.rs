//! Privileged test of the boringtun device's offload paths (TUN TSO split, UDP GSO/GRO, GRO
//! coalescing): large TCP transfers through the tunnel, over IPv4 and IPv6 inner addresses,
//! with writes of mixed sizes, checked end to end with SHA-256. Needs root; under `CI` it fails
//! instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use enc_tests::netns::Netns;
use enc_tests::offload_check::{transfers_both_ways, tunnel_addresses, veth_pair};
use enc_wireguard::{BoringtunConfig, BoringtunWg, PeerSpec, PresharedKey, PrivateKey, WgBackend};

/// Bytes per transfer.
const TOTAL: usize = 48 << 20;

#[test]
fn privileged_boringtun_offload_large_tcp_transfers_ipv4_ipv6() {
    if !enc_tests::require_root("privileged_boringtun_offload_large_tcp_transfers_ipv4_ipv6") {
        return;
    }
    let a = Netns::new(&format!("wgoff-a-{}", std::process::id())).unwrap();
    let b = Netns::new(&format!("wgoff-b-{}", std::process::id())).unwrap();
    veth_pair(&a, &b, "ul0", ["10.91.0.1/24", "10.91.0.2/24"]).unwrap();
    let keys = [
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    ];
    let psk = PresharedKey::generate().unwrap();
    let under = ["10.91.0.1", "10.91.0.2"];
    let v4 = ["10.92.0.1", "10.92.0.2"];
    let v6 = ["fd00:92::1", "fd00:92::2"];
    let mut devs = Vec::new();
    for (i, ns) in [&a, &b].into_iter().enumerate() {
        let cfg = BoringtunConfig {
            ifname: "wgoff0".into(),
            private_key: keys[i].clone(),
            listen: format!("{}:51820", under[i]).parse().unwrap(),
        };
        let wg = ns.enter(move || BoringtunWg::start(cfg)).unwrap().unwrap();
        wg.upsert_peer(&PeerSpec {
            public_key: keys[1 - i].public_key(),
            preshared_key: Some(psk.clone()),
            endpoint: Some(format!("{}:51820", under[1 - i]).parse().unwrap()),
            allowed_ips: vec![
                format!("{}/32", v4[1 - i]).parse().unwrap(),
                format!("{}/128", v6[1 - i]).parse().unwrap(),
            ],
            persistent_keepalive: None,
            local_key: None,
            previous_public_key: None,
        })
        .unwrap();
        tunnel_addresses(ns, "wgoff0", 1420, [v4[i], v6[i]], [v4[1 - i], v6[1 - i]]).unwrap();
        devs.push(wg);
    }
    transfers_both_ways(&a, &b, v4, v6, 7001, TOTAL).unwrap();
    let drops = devs[0].drop_counters();
    assert_eq!(drops.tun_errors, 0, "{drops:?}");
    assert_eq!(devs[1].drop_counters().tun_errors, 0);
}
