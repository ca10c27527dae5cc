//! Privileged test of the userspace ESP engine's offload and batching paths (TUN TSO split, GRO
//! coalescing on write, `sendmmsg`/`recvmmsg` on the raw socket; with ESP in UDP also UDP GSO
//! and GRO): large TCP transfers through the tunnel, over IPv4 and IPv6 inner addresses, with
//! writes of mixed sizes, checked end to end with SHA-256, once with raw ESP and once with ESP
//! in UDP. Needs root; under `CI` it fails instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use enc_ipsec::userspace::{ESP_IN_UDP_PORT, Encapsulation, UserspaceConfig, UserspaceEsp};
use enc_ipsec::{IpsecBackend, IpsecPeerSpec, SaKeys};
use enc_tests::netns::Netns;
use enc_tests::offload_check::{transfers_both_ways, tunnel_addresses, veth_pair};

/// Bytes per transfer.
const TOTAL: usize = 48 << 20;

fn keys(spi: u32, fill: u8) -> SaKeys {
    SaKeys {
        spi,
        key: [fill; 32],
        salt: [fill ^ 0x55; 4],
    }
}

#[test]
fn privileged_userspace_esp_offload_large_tcp_transfers_ipv4_ipv6() {
    if enc_tests::require_root("privileged_userspace_esp_offload_large_tcp_transfers_ipv4_ipv6") {
        large_transfers("espoff", Encapsulation::None);
    }
}

#[test]
fn privileged_userspace_esp_in_udp_large_tcp_transfers_ipv4_ipv6() {
    if enc_tests::require_root("privileged_userspace_esp_in_udp_large_tcp_transfers_ipv4_ipv6") {
        large_transfers(
            "espudp",
            Encapsulation::Udp {
                port: ESP_IN_UDP_PORT,
            },
        );
    }
}

/// Two namespaces on a veth, a device in each with `encapsulation`, then 48 MiB each way over
/// IPv4 and IPv6 inner addresses; also checks that the wire carries what `encapsulation` says.
fn large_transfers(prefix: &str, encapsulation: Encapsulation) {
    let a = Netns::new(&format!("{prefix}-a-{}", std::process::id())).unwrap();
    let b = Netns::new(&format!("{prefix}-b-{}", std::process::id())).unwrap();
    veth_pair(&a, &b, "ul0", ["10.93.0.1/24", "10.93.0.2/24"]).unwrap();
    let under = ["10.93.0.1", "10.93.0.2"];
    let v4 = ["10.94.0.1", "10.94.0.2"];
    let v6 = ["fd00:94::1", "fd00:94::2"];
    let spis = [0x1100, 0x2200];
    let mut devs = Vec::new();
    for (i, ns) in [&a, &b].into_iter().enumerate() {
        let local = under[i].parse().unwrap();
        let esp = ns
            .enter(move || {
                UserspaceEsp::start(UserspaceConfig {
                    ifname: "espoff0".into(),
                    local,
                    replay_window: 1024,
                    sa_log: None,
                    encapsulation,
                })
            })
            .unwrap()
            .unwrap();
        esp.upsert_peer(&IpsecPeerSpec {
            peer_id: 1,
            name: "peer".into(),
            local,
            remote: under[1 - i].parse().unwrap(),
            local_cidrs: vec![
                format!("{}/32", v4[i]).parse().unwrap(),
                format!("{}/128", v6[i]).parse().unwrap(),
            ],
            remote_cidrs: vec![
                format!("{}/32", v4[1 - i]).parse().unwrap(),
                format!("{}/128", v6[1 - i]).parse().unwrap(),
            ],
            epoch: 1,
            outbound: keys(spis[i], 1 + i as u8),
            inbound: vec![keys(spis[1 - i], 2 - i as u8)],
            older_outbound: vec![],
            bypass: vec![],
        })
        .unwrap();
        tunnel_addresses(ns, "espoff0", 1400, [v4[i], v6[i]], [v4[1 - i], v6[1 - i]]).unwrap();
        devs.push(esp);
    }
    transfers_both_ways(&a, &b, v4, v6, 7101, TOTAL).unwrap();
    for d in &devs {
        let c = d.device_counters();
        assert_eq!((c.tun_errors, c.seal_errors), (0, 0), "{c:?}");
        assert_eq!(
            (c.bad_source_port, c.non_esp_marker, c.nat_keepalives),
            (0, 0, 0),
            "{c:?}"
        );
        assert_eq!(d.encapsulation(), encapsulation);
        let p = &d.peers().unwrap()[0];
        assert!(p.rx_packets > (TOTAL as u64) / 1400, "{p:?}");
        assert!(p.drops.iter().all(|(_, n)| *n == 0), "{p:?}");
    }
    // What went over the veth: ESP packets (raw) or UDP to port 4500, nothing else in bulk.
    // /proc/net/snmp counts per namespace, one per receive call (a GRO message counts once):
    // 4 x 48 MiB is at least 3072 full 64 KiB messages.
    let udp_in = |ns: &Netns| -> u64 {
        let out = ns.run(&["cat", "/proc/net/snmp"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines().filter(|l| l.starts_with("Udp: "));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|n| n == "InDatagrams")
            .unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    };
    let datagrams = udp_in(&a) + udp_in(&b);
    match encapsulation {
        Encapsulation::None => assert!(datagrams < 100, "{datagrams} UDP datagrams"),
        Encapsulation::Udp { .. } => assert!(datagrams > 1000, "{datagrams} UDP datagrams"),
    }
}
