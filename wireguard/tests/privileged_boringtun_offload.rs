//! Privileged test of the boringtun device's offload paths (TUN TSO split, UDP GSO/GRO, GRO
//! coalescing): large TCP transfers through the tunnel, over IPv4 and IPv6 inner addresses,
//! with writes of mixed sizes, checked end to end with SHA-256. Needs root; under `CI` it fails
//! instead of skipping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use enc_tests::netns::Netns;
use enc_wireguard::{BoringtunConfig, BoringtunWg, PeerSpec, PresharedKey, PrivateKey, WgBackend};
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

#[test]
fn privileged_boringtun_offload_large_tcp_transfers_ipv4_ipv6() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "privileged test needs root under CI"
        );
        eprintln!("skipped: needs root");
        return;
    }
    let a = Netns::new(&format!("wgoff-a-{}", std::process::id())).unwrap();
    let b = Netns::new(&format!("wgoff-b-{}", std::process::id())).unwrap();
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
    for (ns, addr) in [(&a, "10.91.0.1/24"), (&b, "10.91.0.2/24")] {
        ns.run(&["ip", "addr", "add", addr, "dev", "ul0"]).unwrap();
        ns.run(&["ip", "link", "set", "ul0", "up"]).unwrap();
    }
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
        ns.run(&["ip", "link", "set", "wgoff0", "mtu", "1420", "up"])
            .unwrap();
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/32", v4[i]),
            "dev",
            "wgoff0",
        ])
        .unwrap();
        ns.run(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/128", v6[i]),
            "dev",
            "wgoff0",
            "nodad",
        ])
        .unwrap();
        ns.run(&[
            "ip",
            "route",
            "add",
            &format!("{}/32", v4[1 - i]),
            "dev",
            "wgoff0",
        ])
        .unwrap();
        ns.run(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{}/128", v6[1 - i]),
            "dev",
            "wgoff0",
        ])
        .unwrap();
        devs.push(wg);
    }
    for dst in [
        SocketAddr::new(v4[1].parse().unwrap(), 7001),
        SocketAddr::new(v6[1].parse().unwrap(), 7002),
    ] {
        let (sent, got) = transfer(&a, &b, dst);
        assert_eq!(sent, got, "SHA-256 of {TOTAL} bytes to {dst}");
        let (sent, got) = transfer(
            &b,
            &a,
            SocketAddr::new(
                if dst.is_ipv4() {
                    v4[0].parse().unwrap()
                } else {
                    v6[0].parse().unwrap()
                },
                dst.port() + 10,
            ),
        );
        assert_eq!(sent, got, "SHA-256 of {TOTAL} bytes back from {dst}");
    }
    let drops = devs[0].drop_counters();
    assert_eq!(drops.tun_errors, 0, "{drops:?}");
    assert_eq!(devs[1].drop_counters().tun_errors, 0);
}
