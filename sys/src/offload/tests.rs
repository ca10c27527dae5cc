use super::*;
use proptest::prelude::*;

/// An IPv4 or IPv6 TCP packet with `payload`, TCP options `opts` (a multiple of 4 bytes) and
/// `flags`, with correct checksums.
fn tcp_packet(v6: bool, seq: u32, flags: u8, opts: &[u8], payload: &[u8]) -> Vec<u8> {
    let ip_len = if v6 { 40 } else { 20 };
    let th = 20 + opts.len();
    let total = ip_len + th + payload.len();
    let mut p = vec![0u8; total];
    if v6 {
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        p[6] = PROTO_TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 81, 0, 1]);
        p[16..20].copy_from_slice(&[10, 81, 0, 2]);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let t = &mut p[ip_len..];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&777u32.to_be_bytes());
    t[12] = ((th / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&512u16.to_be_bytes());
    t[20..th].copy_from_slice(opts);
    t[th..].copy_from_slice(payload);
    let c = !fold(sum16(&p[ip_len..], pseudo_sum(&p, v6, total - ip_len)));
    p[ip_len + 16..ip_len + 18].copy_from_slice(&c.to_be_bytes());
    p
}

/// What the kernel hands a TSO TUN device: the super-packet with the pseudo-header sum in the
/// TCP checksum field, behind a GSO header.
fn tso_read(v6: bool, seq: u32, flags: u8, opts: &[u8], payload: &[u8], mss: u16) -> Vec<u8> {
    let mut p = tcp_packet(v6, seq, flags, opts, payload);
    let ip_len = if v6 { 40 } else { 20 };
    let ps = fold(pseudo_sum(&p, v6, p.len() - ip_len));
    p[ip_len + 16..ip_len + 18].copy_from_slice(&ps.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: (ip_len + 20 + opts.len()) as u16,
        gso_size: mss,
        csum_start: ip_len as u16,
        csum_offset: 16,
    };
    let mut out = hdr.encode().to_vec();
    out.extend_from_slice(&p);
    out
}

fn split_all(read: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
    let mut read = read.to_vec();
    let mut scratch = vec![0u8; MAX_SUPER];
    let mut out = Vec::new();
    split(&mut read, &mut scratch, |s| out.push(s.to_vec()))?;
    Ok(out)
}

/// Checks the IPv4 header checksum and the TCP checksum of `p`; returns (seq, flags, payload).
fn check_segment(p: &[u8]) -> (u32, u8, Vec<u8>) {
    let v6 = p[0] >> 4 == 6;
    let (ip_len, th) = tcp_headers(p, v6).expect("TCP packet");
    if !v6 {
        assert_eq!(checksum(&p[..ip_len]), 0, "IPv4 header checksum");
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
    } else {
        assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])) + 40, p.len());
    }
    let s = fold(sum16(&p[ip_len..], pseudo_sum(p, v6, p.len() - ip_len)));
    assert_eq!(s, 0xffff, "TCP checksum");
    (
        tcp_seq(p, ip_len),
        p[ip_len + 13],
        p[ip_len + th..].to_vec(),
    )
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn rfc1071_checksum() {
    // RFC 1071's example words 0001 f203 f4f5 f6f7: sum ddf2, checksum 220d.
    let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(fold(sum16(&d, 0)), 0xddf2);
    assert_eq!(checksum(&d), 0x220d);
    // An odd length pads with a zero byte.
    assert_eq!(fold(sum16(&[0x01], 0)), 0x0100);
}

/// RFC 1071 word by word, in network order: the reference for the wide `sum16`.
fn sum16_reference(data: &[u8], mut sum: u64) -> u64 {
    for w in data.chunks(2) {
        sum += u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
    }
    sum
}

proptest! {
    #[test]
    fn sum16_matches_the_word_by_word_sum(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        skip in 0usize..16,
        seed in any::<u32>(),
    ) {
        // Every alignment and length, including the odd tails after the 16-byte blocks.
        let data = &data[skip.min(data.len())..];
        let seed = u64::from(seed);
        prop_assert_eq!(fold(sum16(data, seed)), fold(sum16_reference(data, seed)));
    }
}

#[test]
fn sum16_of_all_ones_folds_to_ffff() {
    // The worst case for carries: every word 0xffff, over a full 64 KiB packet.
    let d = vec![0xff; 65535];
    assert_eq!(fold(sum16(&d, 0)), fold(sum16_reference(&d, 0)));
    assert_eq!(checksum(&[0xff; 64]), 0);
}

#[test]
fn vnet_header_round_trip() {
    let h = VnetHdr {
        flags: 1,
        gso_type: GSO_TCPV6,
        hdr_len: 72,
        gso_size: 1348,
        csum_start: 40,
        csum_offset: 16,
    };
    let bytes = h.encode();
    let (back, rest) = VnetHdr::parse(&bytes).unwrap();
    assert_eq!(back, h);
    assert!(rest.is_empty());
    assert_eq!(VnetHdr::parse(&[0; 9]), Err(OffloadError::ShortHeader));
}

#[test]
fn splits_a_tso_packet_into_checksummed_segments() {
    for v6 in [false, true] {
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        let data = payload(10_000);
        let read = tso_read(v6, 1000, TCP_ACK | TCP_PSH, &opts, &data, 1348);
        let segs = split_all(&read).unwrap();
        assert_eq!(segs.len(), 8, "10000 bytes at 1348 per segment");
        let mut got = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let (seq, flags, p) = check_segment(s);
            assert_eq!(seq, 1000 + (i * 1348) as u32);
            let last = i + 1 == segs.len();
            assert_eq!(flags & TCP_PSH != 0, last, "PSH only on the last");
            assert!(p.len() == 1348 || last);
            if !v6 {
                assert_eq!(
                    u16::from_be_bytes([s[4], s[5]]),
                    0x1234 + i as u16,
                    "IPv4 id"
                );
            }
            got.extend(p);
        }
        assert_eq!(got, data);
    }
}

#[test]
fn completes_the_checksum_of_a_plain_packet() {
    let p = tcp_packet(false, 5, TCP_ACK, &[], b"hello");
    let mut partial = p.clone();
    let ps = fold(pseudo_sum(&p, false, p.len() - 20));
    partial[36..38].copy_from_slice(&ps.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 16,
        ..VnetHdr::default()
    };
    let mut read = hdr.encode().to_vec();
    read.extend_from_slice(&partial);
    assert_eq!(split_all(&read).unwrap(), vec![p]);
}

#[test]
fn refuses_malformed_reads() {
    let mut bad = tso_read(false, 0, TCP_ACK, &[], &payload(3000), 1000);
    bad[1] = 3; // GSO_UDP
    assert_eq!(split_all(&bad), Err(OffloadError::UnsupportedGso(3)));
    let mut zero = tso_read(false, 0, TCP_ACK, &[], &payload(3000), 1000);
    zero[4..6].copy_from_slice(&[0, 0]);
    assert_eq!(split_all(&zero), Err(OffloadError::ZeroSegmentSize));
    let mut not_tcp = tso_read(false, 0, TCP_ACK, &[], &payload(3000), 1000);
    not_tcp[VNET_HDR_LEN + 9] = 17;
    assert_eq!(split_all(&not_tcp), Err(OffloadError::BadHeaders));
    let mut offsets = VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 60,
        csum_offset: 16,
        ..VnetHdr::default()
    }
    .encode()
    .to_vec();
    offsets.extend_from_slice(&tcp_packet(false, 0, TCP_ACK, &[], b"x"));
    assert_eq!(split_all(&offsets), Err(OffloadError::BadChecksumOffsets));
}

fn coalesce(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut c = Coalescer::new();
    let mut out = Vec::new();
    let mut w = |b: &[u8]| out.push(b.to_vec());
    for p in packets {
        c.push(p, &mut w);
    }
    c.flush(&mut w);
    out
}

#[test]
fn coalesces_consecutive_segments_into_one_gso_write() {
    for v6 in [false, true] {
        let data = payload(20_000);
        let segs = split_all(&tso_read(v6, 7, TCP_ACK | TCP_PSH, &[], &data, 1360)).unwrap();
        let writes = coalesce(&segs);
        assert_eq!(writes.len(), 1);
        let (hdr, pkt) = VnetHdr::parse(&writes[0]).unwrap();
        assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
        assert_eq!(hdr.gso_size, 1360);
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        let ip_len = if v6 { 40 } else { 20 };
        assert_eq!(usize::from(hdr.hdr_len), ip_len + 20);
        assert_eq!(&pkt[ip_len + 20..], &data[..]);
        // Splitting the super-packet again gives the very same segments.
        assert_eq!(split_all(&writes[0]).unwrap(), segs);
    }
}

#[test]
fn does_not_coalesce_across_flows_gaps_or_flags() {
    let a = tcp_packet(false, 0, TCP_ACK, &[], &payload(100));
    let gap = tcp_packet(false, 200, TCP_ACK, &[], &payload(100));
    let syn = tcp_packet(false, 100, TCP_SYN | TCP_ACK, &[], &payload(100));
    let mut udp = a.clone();
    udp[9] = 17;
    let writes = coalesce(&[a.clone(), gap.clone(), syn.clone(), udp.clone()]);
    assert_eq!(writes.len(), 4);
    for (w, p) in writes.iter().zip([&a, &gap, &syn, &udp]) {
        assert_eq!(&w[..VNET_HDR_LEN], &[0; VNET_HDR_LEN], "plain header");
        assert_eq!(&w[VNET_HDR_LEN..], &p[..]);
    }
    // A longer segment after a shorter one starts a new super-packet.
    let short = tcp_packet(false, 0, TCP_ACK, &[], &payload(50));
    let long = tcp_packet(false, 50, TCP_ACK, &[], &payload(100));
    assert_eq!(coalesce(&[short, long]).len(), 2);
}

proptest! {
    #[test]
    fn split_then_coalesce_round_trips(
        v6 in any::<bool>(),
        len in 1usize..30_000,
        mss in 536u16..1460,
        seq in any::<u32>(),
        ts in any::<bool>(),
    ) {
        let opts: &[u8] = if ts { &[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8] } else { &[] };
        let data = payload(len);
        let segs = split_all(&tso_read(v6, seq, TCP_ACK, opts, &data, mss)).unwrap();
        prop_assert_eq!(segs.len(), len.div_ceil(usize::from(mss)));
        let mut got = Vec::new();
        for s in &segs {
            got.extend(check_segment(s).2);
        }
        prop_assert_eq!(&got, &data);
        let writes = coalesce(&segs);
        prop_assert_eq!(writes.len(), 1);
        prop_assert_eq!(split_all(&writes[0]).unwrap(), segs);
    }

    #[test]
    fn split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = split_all(&bytes);
        let _ = coalesce(&[bytes]);
    }
}
