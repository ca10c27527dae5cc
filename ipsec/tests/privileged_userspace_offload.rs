//! Privileged test of the userspace ESP engine's offload and batching paths (TUN TSO split, GRO
//! coalescing on write, `sendmmsg`/`recvmmsg` on the raw socket; with ESP in UDP also UDP GSO
//! and GRO): large TCP transfers through the tunnel, over IPv4 and IPv6 inner addresses, with
//! writes of mixed sizes, checked end to end with SHA-256, once with raw ESP and once with ESP
//! in UDP. Needs root; under `CI` it fails instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use enc_ipsec::userspace::{ESP_IN_UDP_PORT, Encapsulation, UserspaceConfig, UserspaceEsp};
use enc_ipsec::{IpsecBackend, IpsecPeerSpec, SaKeys};
use enc_tests::netns::Netns;
use ring::digest::{Context, SHA256};

/// Bytes per transfer.
const TOTAL: usize = 48 << 20;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Deterministic data, and write sizes from 1 byte to 64 KiB (small writes with NODELAY make
/// small segments between the TSO super-packets).
fn transfer(client: &Netns, server: &Netns, dst: SocketAddr) -> ([u8; 32], [u8; 32]) {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server
        .spawn(move || {
            let l = TcpListener::bind(dst).unwrap();
            tx.send(()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut h = Context::new(&SHA256);
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            while n < TOTAL {
                let k = s.read(&mut buf).unwrap();
                assert!(k > 0, "stream ended after {n} bytes");
                h.update(&buf[..k]);
                n += k;
            }
            let d: [u8; 32] = h.finish().as_ref().try_into().unwrap();
            d
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let cli = client
        .spawn(move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
            s.set_nodelay(true).unwrap();
            let data: Vec<u8> = (0..TOTAL)
                .map(|i| (i ^ (i >> 11) ^ (i >> 19)) as u8)
                .collect();
            let mut h = Context::new(&SHA256);
            h.update(&data);
            let mut off = 0;
            let mut step = 1usize;
            while off < TOTAL {
                // 1, 7, 49, ... bytes up to 64 KiB, cycling.
                let len = step.min(TOTAL - off);
                s.write_all(&data[off..off + len]).unwrap();
                off += len;
                step = if step >= 1 << 16 { 1 } else { step * 7 };
            }
            let d: [u8; 32] = h.finish().as_ref().try_into().unwrap();
            d
        })
        .unwrap();
    let sent = cli.join().unwrap().unwrap();
    let got = srv.join().unwrap().unwrap();
    (sent, got)
}

fn keys(spi: u32, fill: u8) -> SaKeys {
    SaKeys {
        spi,
        key: [fill; 32],
        salt: [fill ^ 0x55; 4],
    }
}

fn needs_root() -> bool {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "privileged test needs root under CI"
        );
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

#[test]
fn privileged_userspace_esp_offload_large_tcp_transfers_ipv4_ipv6() {
    if needs_root() {
        large_transfers("espoff", Encapsulation::None);
    }
}

#[test]
fn privileged_userspace_esp_in_udp_large_tcp_transfers_ipv4_ipv6() {
    if needs_root() {
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
    a.run(&[
        "ip",
        "link",
        "add",
        "ul0",
        "type",
        "veth",
        "peer",
        "name",
        "ul0",
        "netns",
        b.name(),
    ])
    .unwrap();
    for (ns, addr) in [(&a, "10.93.0.1/24"), (&b, "10.93.0.2/24")] {
        ns.run(&["ip", "addr", "add", addr, "dev", "ul0"]).unwrap();
        ns.run(&["ip", "link", "set", "ul0", "up"]).unwrap();
    }
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
        ns.run(&["ip", "link", "set", "espoff0", "mtu", "1400", "up"])
            .unwrap();
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/32", v4[i]),
            "dev",
            "espoff0",
        ])
        .unwrap();
        ns.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/128", v6[i]),
            "dev",
            "espoff0",
            "nodad",
        ])
        .unwrap();
        ns.run(&[
            "ip",
            "route",
            "add",
            &format!("{}/32", v4[1 - i]),
            "dev",
            "espoff0",
        ])
        .unwrap();
        ns.run(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{}/128", v6[1 - i]),
            "dev",
            "espoff0",
        ])
        .unwrap();
        devs.push(esp);
    }
    for (port, addrs) in [(7101, v4), (7102, v6)] {
        let (sent, got) = transfer(&a, &b, SocketAddr::new(addrs[1].parse().unwrap(), port));
        assert_eq!(sent, got, "SHA-256 of {TOTAL} bytes to {}", addrs[1]);
        let (sent, got) = transfer(
            &b,
            &a,
            SocketAddr::new(addrs[0].parse().unwrap(), port + 10),
        );
        assert_eq!(sent, got, "SHA-256 of {TOTAL} bytes to {}", addrs[0]);
    }
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
