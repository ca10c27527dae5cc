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
            older_outbound: vec![],
            bypass: vec![],
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
            older_outbound: vec![],
            bypass: vec![],
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
fn device_drop_counts_list_every_reason_once() {
    let (a, b) = pair();
    let (mut esp, _) = seal(&a, &ipv4("10.99.1.1", "10.99.2.1", 60));
    assert!(b.open(ip("192.0.2.99"), &mut esp).is_none());
    let mut out = Vec::new();
    assert_eq!(b.seal(&ipv4("10.99.2.1", "172.16.0.1", 40), &mut out), None);
    b.stats.send_errors.fetch_add(4, Relaxed);
    assert_eq!(
        b.device_drop_counts(),
        [
            ("no-route", 1),
            ("seal-error", 0),
            ("send-error", 4),
            ("recv-error", 0),
            ("tun-error", 0),
            ("non-esp-marker", 0),
            ("nat-keepalive", 0),
            ("bad-source-port", 0),
            ("bad-spi", 1),
            ("replay", 0),
            ("icv-failure", 0),
            ("malformed", 0),
            ("bad-inner-source", 0),
        ]
    );
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
    let cases: [(&str, &str, Edit); 10] = [
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
        ("older_outbound.epoch", "16", |s| {
            s.older_outbound.push((16, keys(0x1002, 8)))
        }),
        ("older_outbound.spi", "0x00001001", |s| {
            s.older_outbound.push((15, keys(0x1001, 8)))
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
        encapsulation: Encapsulation::None,
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
    let mut c = cfg("esp0", 2048);
    c.encapsulation = Encapsulation::Udp { port: 0 };
    let err = UserspaceEsp::start(c).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "encapsulation",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn udp_payloads_are_classified_per_rfc_3948() {
    assert_eq!(udp_payload(&[0xff]), UdpPayload::NatKeepalive);
    assert_eq!(udp_payload(&[0, 0, 0, 0]), UdpPayload::NonEsp);
    assert_eq!(
        udp_payload(&[0, 0, 0, 0, 0x25, 1, 2, 3, 4]),
        UdpPayload::NonEsp
    );
    assert_eq!(udp_payload(&[]), UdpPayload::Malformed);
    assert_eq!(udp_payload(&[0xff, 0xff]), UdpPayload::Malformed);
    assert_eq!(udp_payload(&[0, 0, 1, 0, 0, 0, 0]), UdpPayload::Malformed);
    assert_eq!(udp_payload(&[0, 0, 1, 0, 0, 0, 0, 1]), UdpPayload::Esp);
}

fn udp_from(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(s), port)
}

#[test]
fn esp_in_udp_checks_the_source_port_the_marker_and_the_sender() {
    let (a, b) = pair();
    let inner = ipv4("10.99.1.1", "10.99.2.9", 300);
    let (esp, _) = seal(&a, &inner);

    // A wrong source port is dropped before any SA is touched: the same packet from the right
    // port then opens (its sequence number was not consumed).
    assert!(
        b.open_udp(udp_from(A, 4501), 4500, &mut esp.clone())
            .is_none()
    );
    assert_eq!(b.stats.snapshot().bad_source_port, 1);
    let mut ok = esp.clone();
    let range = b
        .open_udp(udp_from(A, 4500), 4500, &mut ok)
        .expect("opened");
    assert_eq!(&ok[range], &inner[..]);

    // The non-ESP marker (IKE) and a NAT-keepalive are counted and never reach an SA.
    let mut ike = vec![0u8; 40];
    ike[4] = 0x25;
    assert!(b.open_udp(udp_from(A, 4500), 4500, &mut ike).is_none());
    assert!(b.open_udp(udp_from(A, 4500), 4500, &mut [0xff]).is_none());
    let c = b.stats.snapshot();
    assert_eq!((c.non_esp_marker, c.nat_keepalives), (1, 1), "{c:?}");

    // Right port, wrong address: not a peer's SA.
    let (esp2, _) = seal(&a, &inner);
    assert!(
        b.open_udp(udp_from("192.0.2.77", 4500), 4500, &mut esp2.clone())
            .is_none()
    );
    assert_eq!(drops(&b.device_drops.snapshot(), EspDrop::BadSpi), 1);
    // A short datagram from the peer is charged to it as malformed.
    assert!(
        b.open_udp(udp_from(A, 4500), 4500, &mut [1, 2, 3])
            .is_none()
    );
    assert_eq!(peer_drops(&b, 1, EspDrop::Malformed), 1);
    // Nothing above was charged to the peer as bad SPI, replay or ICV failure.
    for r in [EspDrop::BadSpi, EspDrop::Replay, EspDrop::IcvFailure] {
        assert_eq!(peer_drops(&b, 1, r), 0, "{r:?}");
    }
    assert!(
        b.open_udp(udp_from(A, 4500), 4500, &mut esp2.clone())
            .is_some()
    );
}

/// An IPv4 header (protocol 50) from `src` to `dst` in front of `esp`.
fn outer(src: &str, dst: &str, esp: &[u8]) -> Vec<u8> {
    let mut p = ipv4(src, dst, 20 + esp.len());
    p[9] = PROTO_ESP;
    p[20..].copy_from_slice(esp);
    p
}

#[test]
fn raw_ipv4_packets_open_in_place_behind_their_header() {
    let (a, b) = pair();
    let inner = ipv4("10.99.1.1", "10.99.2.9", 120);
    let (esp, _) = seal(&a, &inner);
    let mut pkt = outer(A, B, &esp);
    let range = b.open_raw(&mut pkt, None).expect("opened");
    assert!(range.start > 20);
    assert_eq!(&pkt[range], &inner[..]);
    // Addressed to another of our addresses: ignored, not counted.
    let (esp, _) = seal(&a, &inner);
    assert!(
        b.open_raw(&mut outer(A, "192.0.2.99", &esp), None)
            .is_none()
    );
    assert!(b.open_raw(&mut [0x45, 0, 0], None).is_none());
    assert_eq!(drops(&b.device_drops.snapshot(), EspDrop::Malformed), 1);
    assert_eq!(peer_drops(&b, 1, EspDrop::BadSpi), 0);
}

#[test]
fn sealed_segments_of_a_super_packet_share_one_gso_message() {
    let (a, _) = pair();
    // What splitting one TSO super-packet yields: equal segments, the last one shorter.
    let segments: Vec<Vec<u8>> = (0..10)
        .map(|_| ipv4("10.99.1.1", "10.99.2.9", 1400))
        .chain([ipv4("10.99.1.1", "10.99.2.9", 333)])
        .collect();
    for (gso, messages) in [(true, 1), (false, segments.len())] {
        let mut batch = SendBatch::new(SEND_MSGS, SEND_BYTES, gso);
        for s in &segments {
            assert!(batch.has_room(s.len() + SEAL_SLACK));
            assert!(batch.push(|out| a.seal_append(s, out).map(|ip| SocketAddr::new(ip, 4500))));
        }
        // A packet no peer routes queues nothing.
        assert!(!batch.push(|out| {
            a.seal_append(&ipv4("10.99.1.1", "172.16.0.1", 100), out)
                .map(|ip| SocketAddr::new(ip, 4500))
        }));
        assert_eq!(
            (batch.messages(), batch.datagrams()),
            (messages, segments.len()),
            "gso {gso}"
        );
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever arrives on the ESP-in-UDP port, classifying and opening it never panics,
        /// never opens without the SA's key, and lands in exactly one counter.
        #[test]
        fn arbitrary_udp_datagrams_never_open(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            spi_of_peer in any::<bool>(),
            port in prop_oneof![Just(4500u16), any::<u16>()],
        ) {
            let (_, b) = pair();
            let mut d = bytes.clone();
            if spi_of_peer && d.len() >= 4 {
                d[..4].copy_from_slice(&0x1001u32.to_be_bytes());
            }
            let kind = udp_payload(&d);
            match kind {
                UdpPayload::NatKeepalive => prop_assert_eq!(&d[..], &[0xff][..]),
                UdpPayload::NonEsp => prop_assert_eq!(&d[..4], &[0u8; 4][..]),
                UdpPayload::Esp => prop_assert!(d.len() >= 8 && d[..4] != [0; 4]),
                UdpPayload::Malformed => prop_assert!(d.len() < 8 && d != [0xff]),
            }
            prop_assert!(b.open_udp(udp_from(A, port), 4500, &mut d).is_none());
            let c = b.stats.snapshot();
            let peer: u64 = b.peers()[0].drops.iter().map(|(_, n)| n).sum();
            let device: u64 = b.device_drops.snapshot().iter().map(|(_, n)| n).sum();
            let counted = c.bad_source_port + c.non_esp_marker + c.nat_keepalives + peer + device;
            prop_assert_eq!(counted, 1, "{:?} {:?}", kind, c);
        }
    }
}

/// A step of the rotation from epoch `e` to `e + 1`.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// At `e`, before the rotation.
    Steady,
    /// Inbound of `e + 1` installed beside `e`'s.
    Prepare,
    /// Outbound switched to `e + 1`; `e`'s listed as older.
    Commit,
    /// `e` gone: the steady state of `e + 1`.
    Retire,
}

/// Keys of epoch `e` for A -> B (`ab`) or B -> A: the epoch in SPI bits 31..28, a key per
/// epoch and direction.
fn epoch_keys(e: u8, ab: bool) -> SaKeys {
    let spi = (u32::from(e & 0xF) << 28) | if ab { 0x1001 } else { 0x2001 };
    keys(spi, e.wrapping_mul(2).wrapping_add(u8::from(ab)))
}

/// A's spec of peer B (or, with `mirror`, B's of A) at `step` of the rotation from `e`.
fn rotation_spec(mirror: bool, e: u8, step: Step) -> IpsecPeerSpec {
    let out = |e| epoch_keys(e, !mirror);
    let inb = |e| epoch_keys(e, mirror);
    let next = e.wrapping_add(1);
    let mut s = spec(mirror);
    (s.epoch, s.outbound, s.inbound) = (e, out(e), vec![inb(e)]);
    match step {
        Step::Steady => {}
        Step::Prepare => s.inbound.push(inb(next)),
        Step::Commit => {
            (s.epoch, s.outbound) = (next, out(next));
            s.inbound.push(inb(next));
            s.older_outbound = vec![(e, out(e))];
        }
        Step::Retire => return rotation_spec(mirror, next, Step::Steady),
    }
    s
}

/// Upserts `spec` and checks that it kept what it must: inbound SAs that stay keep their
/// windows and counts, an unchanged outbound SA its sequence number, the peer its totals; then
/// that upserting it again changes nothing.
fn upsert_keeping(st: &State, spec: &IpsecPeerSpec) {
    let find = |peers: Vec<IpsecPeerSnapshot>| {
        peers
            .into_iter()
            .find(|p| p.peer_id == spec.peer_id)
            .unwrap()
    };
    let before = find(st.peers());
    st.upsert(spec).unwrap();
    let after = find(st.peers());
    for sa in &after.inbound {
        if let Some(old) = before.inbound.iter().find(|o| o.spi == sa.spi) {
            assert_eq!(sa, old, "inbound SA reset by {spec:?}");
        }
    }
    assert_eq!(
        after.inbound.iter().map(|s| s.spi).collect::<Vec<_>>(),
        spec.inbound.iter().map(|k| k.spi).collect::<Vec<_>>()
    );
    assert_eq!(after.out_spi, spec.outbound.spi);
    if before.out_spi == after.out_spi {
        assert_eq!(
            after.out_seq, before.out_seq,
            "outbound SA reset by {spec:?}"
        );
    } else {
        assert_eq!(after.out_seq, 0, "a new outbound SA starts afresh");
    }
    let totals = |p: &IpsecPeerSnapshot| {
        (
            p.tx_packets,
            p.tx_bytes,
            p.rx_packets,
            p.rx_bytes,
            p.drops.clone(),
        )
    };
    assert_eq!(totals(&after), totals(&before));
    st.upsert(spec).unwrap();
    assert_eq!(find(st.peers()), after, "an unchanged spec is a no-op");
}

/// One direction of traffic between two states, and what it expects.
struct Flow<'a> {
    from: &'a State,
    to: &'a State,
    from_ip: IpAddr,
    src: &'static str,
    dst: &'static str,
    /// Packets sealed (and handed to the network or held).
    sealed: u64,
    /// Packets sealed with the current outbound SA.
    sealed_on_sa: u64,
    /// Packets opened.
    opened: u64,
    /// Sealed, not delivered yet: in flight.
    held: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Length of every inner packet.
const LEN: usize = 100;

impl<'a> Flow<'a> {
    fn new(from: &'a State, to: &'a State, ab: bool) -> Self {
        let (from_ip, src, dst) = if ab {
            (ip(A), "10.99.1.1", "10.99.2.1")
        } else {
            (ip(B), "10.99.2.1", "10.99.1.1")
        };
        Flow {
            from,
            to,
            from_ip,
            src,
            dst,
            sealed: 0,
            sealed_on_sa: 0,
            opened: 0,
            held: Vec::new(),
        }
    }

    /// Seals a packet with a unique payload; returns it and its ESP bytes.
    fn seal(&mut self) -> (Vec<u8>, Vec<u8>) {
        let mut inner = ipv4(self.src, self.dst, LEN);
        inner[20..28].copy_from_slice(&self.sealed.to_be_bytes());
        let (esp, _) = seal(self.from, &inner);
        self.sealed += 1;
        self.sealed_on_sa += 1;
        (inner, esp)
    }

    /// Opens `esp`, which must be accepted and give back `inner`.
    fn deliver(&mut self, inner: &[u8], mut esp: Vec<u8>) {
        let spi = esp::spi_of(&esp);
        let range = self.to.open(self.from_ip, &mut esp).unwrap_or_else(|| {
            panic!(
                "packet {} on SPI {spi:x?} refused: {:?}",
                u64::from_be_bytes(inner[20..28].try_into().unwrap()),
                self.to.peers()
            )
        });
        assert_eq!(&esp[range], inner);
        self.opened += 1;
    }

    /// Seals and delivers `n` packets in order.
    fn burst(&mut self, n: usize) {
        for _ in 0..n {
            let (inner, esp) = self.seal();
            self.deliver(&inner, esp);
        }
    }

    /// Seals `n` packets and keeps them in flight.
    fn hold(&mut self, n: usize) {
        for _ in 0..n {
            let p = self.seal();
            self.held.push(p);
        }
    }

    /// Delivers the packets in flight, last sealed first.
    fn release(&mut self) {
        while let Some((inner, esp)) = self.held.pop() {
            self.deliver(&inner, esp);
        }
    }

    /// The switch to a new outbound SA happened.
    fn switched(&mut self) {
        self.sealed_on_sa = 0;
    }

    /// The counters of both ends match the traffic: everything sealed counted as sent,
    /// everything delivered counted as accepted, no drop but `bad_spi` ones.
    fn check(&self, bad_spi: u64, what: &str) {
        let sender = &self.from.peers()[0];
        assert_eq!(
            (sender.tx_packets, sender.tx_bytes, sender.out_seq),
            (self.sealed, self.sealed * LEN as u64, self.sealed_on_sa),
            "{what}: sender {sender:?}"
        );
        let receiver = &self.to.peers()[0];
        assert_eq!(
            (receiver.rx_packets, receiver.rx_bytes),
            (self.opened, self.opened * LEN as u64),
            "{what}: receiver {receiver:?}"
        );
        for (reason, n) in &receiver.drops {
            let want = if *reason == EspDrop::BadSpi {
                bad_spi
            } else {
                0
            };
            assert_eq!(*n, want, "{what}: {reason:?} drops at the receiver");
        }
    }
}

/// The four steps of the rotation, twenty times over (epochs wrap modulo 16 in marks and
/// SPIs), in both directions, with packets sealed and opened between every two upserts:
/// nothing is refused, packets of the old epoch opened after the new epoch's are accepted,
/// and a packet of a retired epoch is refused as bad-spi.
#[test]
fn rotation_steps_lose_no_packet() {
    let a = State::new(ip(A), 64, None);
    let b = State::new(ip(B), 64, None);
    a.upsert(&rotation_spec(false, 0, Step::Steady)).unwrap();
    b.upsert(&rotation_spec(true, 0, Step::Steady)).unwrap();
    let mut ab = Flow::new(&a, &b, true);
    let mut ba = Flow::new(&b, &a, false);
    // Packets of retired epochs delivered so far, per direction.
    let mut stale = 0;
    for e in 0..20u8 {
        let what = |step: &str| format!("epoch {e} {step}");
        ab.burst(50);
        ba.burst(50);
        ab.check(stale, &what("steady"));
        ba.check(stale, &what("steady"));

        // Prepare: B first, then A (each after the other's ACK).
        upsert_keeping(&b, &rotation_spec(true, e, Step::Prepare));
        ab.burst(20);
        ba.burst(20);
        upsert_keeping(&a, &rotation_spec(false, e, Step::Prepare));
        ab.burst(20);
        ba.burst(20);
        ab.check(stale, &what("prepare"));
        ba.check(stale, &what("prepare"));

        // Commit. Packets of epoch e are still in flight when each side switches; one of each
        // direction stays in flight past the retirement.
        ab.hold(10);
        ba.hold(10);
        let (late_ab, late_ba) = (ab.seal(), ba.seal());
        upsert_keeping(&a, &rotation_spec(false, e, Step::Commit));
        ab.switched();
        ab.burst(30);
        ba.burst(30);
        upsert_keeping(&b, &rotation_spec(true, e, Step::Commit));
        ba.switched();
        ab.burst(30);
        ba.burst(30);
        // The old epoch's packets arrive after the new epoch's: still accepted.
        ab.release();
        ba.release();
        ab.check(stale, &what("commit"));
        ba.check(stale, &what("commit"));

        // Retire, after the grace period.
        upsert_keeping(&a, &rotation_spec(false, e, Step::Retire));
        ab.burst(20);
        ba.burst(20);
        upsert_keeping(&b, &rotation_spec(true, e, Step::Retire));
        ab.burst(20);
        ba.burst(20);
        ab.check(stale, &what("retire"));
        ba.check(stale, &what("retire"));

        // A packet of the retired epoch: bad SPI, charged to the sending peer.
        for (flow, (_, mut esp)) in [(&ab, late_ab), (&ba, late_ba)] {
            assert!(flow.to.open(flow.from_ip, &mut esp).is_none());
        }
        stale += 1;
        ab.check(stale, &what("stale"));
        ba.check(stale, &what("stale"));
        let inbound: Vec<u32> = b.peers()[0].inbound.iter().map(|s| s.spi).collect();
        assert_eq!(inbound, vec![epoch_keys(e.wrapping_add(1), true).spi]);
    }
    assert_eq!((ab.opened, ba.opened), (ab.sealed - 20, ba.sealed - 20));
}

/// Rotations while one thread seals and another opens without pause, with reordering (each
/// run of 8 packets delivered backwards, across the switches too): no packet is refused.
#[test]
fn rotations_under_a_concurrent_stream_lose_no_packet() {
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc;

    const ROTATIONS: u8 = 20;
    const RUN: usize = 8;
    let a = Arc::new(State::new(ip(A), 64, None));
    let b = Arc::new(State::new(ip(B), 64, None));
    a.upsert(&rotation_spec(false, 0, Step::Steady)).unwrap();
    b.upsert(&rotation_spec(true, 0, Step::Steady)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Packets sealed and opened per SPI; sealing and counting happen under one lock, so once
    // an upsert returned and the lock was taken, the count of the SA it replaced is final.
    let sealed = Arc::new(Mutex::new(HashMap::<u32, u64>::new()));
    let opened = Arc::new(Mutex::new(HashMap::<u32, u64>::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(1024);

    let sender = {
        let (a, stop, sealed) = (a.clone(), stop.clone(), sealed.clone());
        std::thread::spawn(move || {
            let inner = ipv4("10.99.1.1", "10.99.2.1", LEN);
            let mut out = Vec::new();
            while !stop.load(Relaxed) {
                {
                    let mut sealed = lock(&sealed);
                    a.seal(&inner, &mut out).expect("sealed");
                    *sealed.entry(esp::spi_of(&out).unwrap()).or_default() += 1;
                }
                if tx.send(out.clone()).is_err() {
                    break;
                }
            }
        })
    };
    let receiver = {
        let (b, opened, refused) = (b.clone(), opened.clone(), refused.clone());
        std::thread::spawn(move || {
            let mut run = Vec::with_capacity(RUN);
            let deliver = |run: &mut Vec<Vec<u8>>| {
                while let Some(mut esp) = run.pop() {
                    let spi = esp::spi_of(&esp).unwrap();
                    if b.open(ip(A), &mut esp).is_some() {
                        *lock(&opened).entry(spi).or_default() += 1;
                    } else {
                        refused.fetch_add(1, Relaxed);
                    }
                }
            };
            for esp in rx {
                run.push(esp);
                if run.len() == RUN {
                    deliver(&mut run);
                }
            }
            deliver(&mut run);
        })
    };

    let total_opened = || lock(&opened).values().sum::<u64>();
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            assert_eq!(refused.load(Relaxed), 0, "{what}: {:?}", b.peers());
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: timed out"
            );
            std::thread::yield_now();
        }
    };
    let flowing = |what: &str| {
        let from = total_opened();
        wait(what, &|| total_opened() >= from + 200);
    };
    for e in 0..ROTATIONS {
        flowing("steady");
        b.upsert(&rotation_spec(true, e, Step::Prepare)).unwrap();
        flowing("prepare at B");
        a.upsert(&rotation_spec(false, e, Step::Prepare)).unwrap();
        flowing("prepare at A");
        a.upsert(&rotation_spec(false, e, Step::Commit)).unwrap();
        flowing("commit at A");
        b.upsert(&rotation_spec(true, e, Step::Commit)).unwrap();
        // Grace period: until every packet of epoch e has been opened.
        let old = epoch_keys(e, true).spi;
        let last = lock(&sealed).get(&old).copied().unwrap_or(0);
        assert!(last > 0, "epoch {e} carried no packet");
        wait("grace", &|| {
            lock(&opened).get(&old).copied().unwrap_or(0) >= last
        });
        a.upsert(&rotation_spec(false, e, Step::Retire)).unwrap();
        b.upsert(&rotation_spec(true, e, Step::Retire)).unwrap();
        // A new epoch reuses an SPI 16 epochs later: start its counts afresh.
        lock(&opened).remove(&old);
        lock(&sealed).remove(&old);
        assert_eq!(refused.load(Relaxed), 0, "epoch {e}: {:?}", b.peers());
    }
    stop.store(true, Relaxed);
    sender.join().unwrap();
    receiver.join().unwrap();
    assert_eq!(refused.load(Relaxed), 0, "{:?}", b.peers());
    let (pa, pb) = (&a.peers()[0], &b.peers()[0]);
    assert_eq!(pa.tx_packets, pb.rx_packets, "A {pa:?} B {pb:?}");
    assert!(pb.drops.iter().all(|(_, n)| *n == 0), "{pb:?}");
    assert_eq!(pa.out_spi, epoch_keys(ROTATIONS, true).spi);
}
