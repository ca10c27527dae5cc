//! The device's packet path and configuration rules, without a kernel: two `State`s talk to each
//! other through plain byte buffers.

use super::*;

const A: &str = "192.0.2.1";
const B: &str = "192.0.2.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn keys(spi: u32, k: u8) -> SaKeys {
    SaKeys {
        spi,
        key: [k; 32],
        salt: [k, 1, 2, 3],
    }
}

/// The spec of A's peer B, or (with `mirror`) of B's peer A, with SPIs 0x1001 (A -> B) and
/// 0x2001 (B -> A).
fn spec(mirror: bool) -> IpsecPeerSpec {
    let (a_to_b, b_to_a) = (keys(0x1001, 1), keys(0x2001, 2));
    if mirror {
        IpsecPeerSpec {
            peer_id: 1,
            name: "node-a".into(),
            local: ip(B),
            remote: ip(A),
            local_cidrs: vec!["10.99.2.0/24".parse().unwrap()],
            remote_cidrs: vec!["10.99.1.0/24".parse().unwrap()],
            epoch: 0,
            outbound: b_to_a,
            inbound: vec![a_to_b],
        }
    } else {
        IpsecPeerSpec {
            peer_id: 2,
            name: "node-b".into(),
            local: ip(A),
            remote: ip(B),
            local_cidrs: vec!["10.99.1.0/24".parse().unwrap()],
            remote_cidrs: vec!["10.99.2.0/24".parse().unwrap()],
            epoch: 0,
            outbound: a_to_b,
            inbound: vec![b_to_a],
        }
    }
}

fn pair() -> (State, State) {
    let a = State::new(ip(A), 64, None);
    let b = State::new(ip(B), 64, None);
    a.upsert(&spec(false)).unwrap();
    b.upsert(&spec(true)).unwrap();
    (a, b)
}

fn ipv4(src: &str, dst: &str, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn drops(list: &[(EspDrop, u64)], reason: EspDrop) -> u64 {
    list.iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

fn peer_drops(st: &State, peer_id: u16, reason: EspDrop) -> u64 {
    let peers = st.peers();
    let p = peers.iter().find(|p| p.peer_id == peer_id).unwrap();
    drops(&p.drops, reason)
}

/// Seals `inner` at `from` and returns the ESP bytes and where they go.
fn seal(from: &State, inner: &[u8]) -> (Vec<u8>, IpAddr) {
    let mut out = Vec::new();
    let to = from.seal(inner, &mut out).expect("sealed");
    (out, to)
}

#[test]
fn round_trip_and_counters() {
    let (a, b) = pair();
    let inner = ipv4("10.99.1.1", "10.99.2.1", 84);
    let (mut esp, to) = seal(&a, &inner);
    assert_eq!(to, ip(B));
    assert_eq!(esp::spi_of(&esp), Some(0x1001));
    let range = b.open(ip(A), &mut esp).expect("opened");
    assert_eq!(&esp[range], &inner[..]);

    let pa = a.peers();
    assert_eq!(
        (
            pa[0].out_spi,
            pa[0].out_seq,
            pa[0].tx_packets,
            pa[0].tx_bytes
        ),
        (0x1001, 1, 1, 84)
    );
    let pb = b.peers();
    assert_eq!(
        pb[0].inbound,
        vec![InboundSaSnapshot {
            spi: 0x1001,
            highest_seq: 1,
            packets: 1,
            bytes: 84
        }]
    );
    assert!(pb[0].drops.iter().all(|(_, n)| *n == 0));
    assert_eq!(
        pb[0].drops.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        EspDrop::ALL
    );
}

#[test]
fn replay_tamper_and_wrong_key_are_charged_to_the_peer() {
    let (a, b) = pair();
    let inner = ipv4("10.99.1.1", "10.99.2.1", 60);
    let (esp, _) = seal(&a, &inner);
    assert!(b.open(ip(A), &mut esp.clone()).is_some());
    assert!(b.open(ip(A), &mut esp.clone()).is_none());
    assert_eq!(peer_drops(&b, 1, EspDrop::Replay), 1);

    let (mut tampered, _) = seal(&a, &inner);
    tampered[20] ^= 0x01;
    assert!(b.open(ip(A), &mut tampered).is_none());
    assert_eq!(peer_drops(&b, 1, EspDrop::IcvFailure), 1);

    // Same SPI, other key at the receiver.
    let mut wrong = spec(true);
    wrong.inbound = vec![keys(0x1001, 9)];
    b.upsert(&wrong).unwrap();
    let (mut esp, _) = seal(&a, &inner);
    assert!(b.open(ip(A), &mut esp).is_none());
    assert_eq!(peer_drops(&b, 1, EspDrop::IcvFailure), 2);
}

#[test]
fn bad_spi_goes_to_the_sender_or_the_device() {
    let (a, b) = pair();
    let inner = ipv4("10.99.1.1", "10.99.2.1", 60);
    let (mut esp, _) = seal(&a, &inner);
    esp[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    assert!(b.open(ip(A), &mut esp).is_none());
    assert_eq!(peer_drops(&b, 1, EspDrop::BadSpi), 1);

    // A valid SPI from an address that is no peer: the device's counter.
    let (mut esp, _) = seal(&a, &inner);
    assert!(b.open(ip("192.0.2.99"), &mut esp).is_none());
    assert_eq!(drops(&b.device_drops.snapshot(), EspDrop::BadSpi), 1);
    assert_eq!(peer_drops(&b, 1, EspDrop::BadSpi), 1);

    // Too short to hold an SPI.
    assert!(b.open(ip("192.0.2.99"), &mut [1, 2]).is_none());
    assert_eq!(drops(&b.device_drops.snapshot(), EspDrop::Malformed), 1);
}

#[test]
fn an_sa_is_only_accepted_from_its_own_peer() {
    let (a, b) = pair();
    // B gets a second peer C; C cannot use A's SA.
    let mut c = spec(true);
    c.peer_id = 3;
    c.name = "node-c".into();
    c.remote = ip("192.0.2.3");
    c.remote_cidrs = vec!["10.99.3.0/24".parse().unwrap()];
    c.outbound = keys(0x3002, 4);
    c.inbound = vec![keys(0x3001, 3)];
    b.upsert(&c).unwrap();
    let (mut esp, _) = seal(&a, &ipv4("10.99.1.1", "10.99.2.1", 60));
    assert!(b.open(ip("192.0.2.3"), &mut esp).is_none());
    assert_eq!(peer_drops(&b, 3, EspDrop::BadSpi), 1);
    assert_eq!(peer_drops(&b, 1, EspDrop::BadSpi), 0);
    // It was refused before decryption, so from its real sender it still opens.
    assert!(b.open(ip(A), &mut esp).is_some());
}

#[test]
fn inner_source_must_be_the_peers() {
    let (a, b) = pair();
    // A routes 10.99.2.0/24 to B, but the source is not in A's pod CIDR.
    let (mut esp, _) = seal(&a, &ipv4("10.77.0.1", "10.99.2.1", 60));
    assert!(b.open(ip(A), &mut esp).is_none());
    assert_eq!(peer_drops(&b, 1, EspDrop::BadInnerSource), 1);
    assert_eq!(b.peers()[0].inbound[0].packets, 0);
}

#[test]
fn outbound_uses_the_longest_prefix() {
    let a = State::new(ip(A), 64, None);
    let mut wide = spec(false);
    wide.remote_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    a.upsert(&wide).unwrap();
    let mut narrow = spec(false);
    narrow.peer_id = 3;
    narrow.remote = ip("192.0.2.3");
    narrow.remote_cidrs = vec!["10.99.3.0/24".parse().unwrap()];
    narrow.outbound = keys(0x3001, 3);
    narrow.inbound = vec![keys(0x3002, 4)];
    a.upsert(&narrow).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        a.seal(&ipv4("10.99.1.1", "10.99.3.7", 40), &mut out),
        Some(ip("192.0.2.3"))
    );
    assert_eq!(esp::spi_of(&out), Some(0x3001));
    assert_eq!(
        a.seal(&ipv4("10.99.1.1", "10.1.2.3", 40), &mut out),
        Some(ip(B))
    );
    assert_eq!(esp::spi_of(&out), Some(0x1001));
    assert_eq!(a.seal(&ipv4("10.99.1.1", "172.16.0.1", 40), &mut out), None);
    assert_eq!(a.seal(&[0x00; 40], &mut out), None);
    assert_eq!(a.seal(&[], &mut out), None);
    assert_eq!(a.stats.snapshot().no_route, 3);
}

#[test]
fn upsert_is_idempotent_and_keeps_sequence_numbers_and_windows() {
    let (a, b) = pair();
    let inner = ipv4("10.99.1.1", "10.99.2.1", 60);
    for _ in 0..3 {
        let (mut esp, _) = seal(&a, &inner);
        b.open(ip(A), &mut esp).unwrap();
    }
    a.upsert(&spec(false)).unwrap();
    b.upsert(&spec(true)).unwrap();
    assert_eq!(a.peers()[0].out_seq, 3);
    assert_eq!(b.peers()[0].inbound[0].highest_seq, 3);

    // A spec change that leaves the SAs alone (a new CIDR) keeps them too.
    let mut more = spec(false);
    more.remote_cidrs.push("10.98.0.0/16".parse().unwrap());
    a.upsert(&more).unwrap();
    assert_eq!(a.peers()[0].out_seq, 3);
    assert_eq!(a.peers()[0].tx_packets, 3);

    // Rotation at B: a second inbound SA is added; the old one keeps its window.
    let mut rot = spec(true);
    rot.inbound.push(keys(0x1002, 5));
    b.upsert(&rot).unwrap();
    let inb = &b.peers()[0].inbound;
    assert_eq!(
        inb.iter()
            .map(|s| (s.spi, s.highest_seq))
            .collect::<Vec<_>>(),
        vec![(0x1001, 3), (0x1002, 0)]
    );
    // A replayed old packet is still caught by the kept window.
    let (esp, _) = seal(&a, &inner);
    assert!(b.open(ip(A), &mut esp.clone()).is_some());
    assert!(b.open(ip(A), &mut esp.clone()).is_none());
    assert_eq!(peer_drops(&b, 1, EspDrop::Replay), 1);

    // A switches to the new outbound SA: fresh sequence numbers; tx counters continue.
    let mut next = more.clone();
    next.outbound = keys(0x1002, 5);
    a.upsert(&next).unwrap();
    let pa = &a.peers()[0];
    assert_eq!((pa.out_spi, pa.out_seq, pa.tx_packets), (0x1002, 0, 4));
    let (mut esp, _) = seal(&a, &inner);
    assert!(b.open(ip(A), &mut esp).is_some());

    // The old inbound SA is dropped when no longer listed.
    let mut done = rot.clone();
    done.inbound.remove(0);
    b.upsert(&done).unwrap();
    assert_eq!(
        b.peers()[0]
            .inbound
            .iter()
            .map(|s| (s.spi, s.highest_seq))
            .collect::<Vec<_>>(),
        vec![(0x1002, 1)]
    );
    assert!(!b.read().by_spi.contains_key(&0x1001));
}

#[test]
fn same_spi_with_a_new_key_is_a_new_sa() {
    let (a, b) = pair();
    let (mut esp, _) = seal(&a, &ipv4("10.99.1.1", "10.99.2.1", 60));
    b.open(ip(A), &mut esp).unwrap();
    let mut rekeyed = spec(true);
    rekeyed.inbound = vec![keys(0x1001, 7)];
    b.upsert(&rekeyed).unwrap();
    assert_eq!(b.peers()[0].inbound[0].highest_seq, 0);
}

#[test]
fn inbound_spi_of_another_peer_is_refused() {
    let (_, b) = pair();
    let mut c = spec(true);
    c.peer_id = 3;
    c.name = "node-c".into();
    c.remote = ip("192.0.2.3");
    c.remote_cidrs = vec!["10.99.3.0/24".parse().unwrap()];
    c.inbound = vec![keys(0x1001, 3)];
    let err = b.upsert(&c).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "inbound.spi",
                ..
            }
        ),
        "{msg}"
    );
    for part in ["0x00001001", "1 (node-a)", "3 (node-c)"] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    assert_eq!(b.peers().len(), 1);

    // Once node-a is gone the SPI is free.
    b.delete(1);
    b.delete(1);
    b.upsert(&c).unwrap();
    assert_eq!(b.peers()[0].peer_id, 3);
}

#[test]
fn invalid_specs_name_the_field_and_value() {
    let st = State::new(ip(A), 64, None);
    type Edit = fn(&mut IpsecPeerSpec);
    let cases: [(&str, &str, Edit); 8] = [
        ("remote", "2001:db8::2", |s| s.remote = ip("2001:db8::2")),
        ("remote", "192.0.2.1", |s| s.remote = ip(A)),
        ("remote", "0.0.0.0", |s| s.remote = ip("0.0.0.0")),
        ("local", "192.0.2.9", |s| s.local = ip("192.0.2.9")),
        ("remote_cidrs", "[]", |s| s.remote_cidrs.clear()),
        ("outbound.spi", "0x00000007", |s| s.outbound.spi = 7),
        ("inbound.spi", "0x00000000", |s| s.inbound[0].spi = 0),
        ("inbound.spi", "0x00002001", |s| {
            s.inbound.push(keys(0x2001, 8))
        }),
    ];
    for (field, value, edit) in cases {
        let mut s = spec(false);
        edit(&mut s);
        match st.upsert(&s) {
            Err(Error::Invalid {
                field: f, value: v, ..
            }) => assert_eq!((f, v.as_str()), (field, value)),
            other => panic!("{field}={value}: {other:?}"),
        }
    }
    assert!(st.peers().is_empty());

    // A pod CIDR already routed to another peer.
    st.upsert(&spec(false)).unwrap();
    let mut dup = spec(false);
    dup.peer_id = 9;
    dup.remote = ip("192.0.2.9");
    dup.outbound = keys(0x9001, 9);
    dup.inbound = vec![keys(0x9002, 9)];
    dup.remote_cidrs = vec!["10.99.2.77/24".parse().unwrap()];
    let err = st.upsert(&dup).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "remote_cidrs",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("2 (node-b)"), "{err}");
}

#[test]
fn sa_log_records_each_new_sa_once() {
    let path =
        std::env::temp_dir().join(format!("enc-ipsec-userspace-salog-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let st = State::new(ip(A), 64, Some(SaLog::open(&path).unwrap()));
    st.upsert(&spec(false)).unwrap();
    st.upsert(&spec(false)).unwrap();
    let mut rot = spec(false);
    rot.inbound.push(keys(0x2002, 6));
    st.upsert(&rot).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("192.0.2.1") && lines[0].contains("0x00001001"),
        "{text}"
    );
    assert!(lines[2].contains("0x00002002"), "{text}");
}

#[test]
fn outer_ipv4_header() {
    let local: Ipv4Addr = B.parse().unwrap();
    let mut p = ipv4(A, B, 60);
    p[9] = PROTO_ESP;
    assert_eq!(
        outer_v4(&p, local),
        Outer::Esp {
            src: ip(A),
            esp: 20..60
        }
    );
    // Options, and a total length shorter than what was read.
    let mut q = p.clone();
    q[0] = 0x46;
    q[2..4].copy_from_slice(&56u16.to_be_bytes());
    assert_eq!(
        outer_v4(&q, local),
        Outer::Esp {
            src: ip(A),
            esp: 24..56
        }
    );
    assert_eq!(outer_v4(&p, "192.0.2.7".parse().unwrap()), Outer::NotOurs);
    let mut udp = p.clone();
    udp[9] = 17;
    assert_eq!(outer_v4(&udp, local), Outer::NotOurs);
    assert_eq!(outer_v4(&p[..19], local), Outer::Malformed);
    assert_eq!(outer_v4(&[], local), Outer::Malformed);
    let mut v6 = p.clone();
    v6[0] = 0x65;
    assert_eq!(outer_v4(&v6, local), Outer::Malformed);
}

#[test]
fn start_validates_before_touching_the_kernel() {
    let cfg = |ifname: &str, window: u32| UserspaceConfig {
        ifname: ifname.into(),
        local: ip(A),
        replay_window: window,
        sa_log: None,
    };
    let err = UserspaceEsp::start(cfg("a-name-that-is-too-long", 2048)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "ifname",
                ..
            }
        ),
        "{err}"
    );
    let err = UserspaceEsp::start(cfg("esp0", 1)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "replay_window",
                ..
            }
        ),
        "{err}"
    );
    let mut c = cfg("esp0", 2048);
    c.local = ip("0.0.0.0");
    let err = UserspaceEsp::start(c).unwrap_err();
    assert!(
        matches!(err, Error::Invalid { field: "local", .. }),
        "{err}"
    );
}
