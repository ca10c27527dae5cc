//! Known answers and edge cases of the ESP core: AES-256-GCM vectors, the RFC 4106 nonce and
//! AAD layout, a golden packet computed with an independent GCM implementation, round trips,
//! extended sequence numbers, and every drop reason.

use enc_ipsec::esp::{
    ESP_HDR_LEN, ICV_LEN, IV_LEN, InboundSa, NEXT_HEADER_IPV4, NEXT_HEADER_IPV6, OutboundSa,
    overhead, spi_of,
};
use enc_ipsec::{EspDrop, SaKeys};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const WINDOW: u32 = 2048;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(s.len().is_multiple_of(2), "odd hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex literal"))
        .collect()
}

fn keys() -> SaKeys {
    SaKeys {
        spi: 0x0000_abcd,
        key: hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .try_into()
            .expect("32 bytes"),
        salt: [0xca, 0xfe, 0xba, 0xbe],
    }
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet of exactly `len` bytes (>= 20) with a valid header.
fn ipv4(len: usize, fill: u8) -> Vec<u8> {
    assert!(len >= 20);
    let mut p = vec![fill; len];
    p[..20].copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 1, 0, 1, 10, 2, 0, 1,
    ]);
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    let c = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// An IPv6 packet of exactly `len` bytes (>= 40).
fn ipv6(len: usize, fill: u8) -> Vec<u8> {
    assert!(len >= 40);
    let mut p = vec![fill; len];
    p[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, 17, 64]);
    p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    p
}

/// An ESP packet around an arbitrary `plaintext` (inner, padding, pad length, next header),
/// built with ring directly and the RFC 4106 layout spelled out here, independently of
/// `esp.rs`.
fn craft(keys: &SaKeys, seq: u64, iv: [u8; 8], plaintext: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &keys.key).expect("AES-256 key"));
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&keys.salt);
    nonce[4..].copy_from_slice(&iv);
    let mut aad = Vec::new();
    aad.extend_from_slice(&keys.spi.to_be_bytes());
    aad.extend_from_slice(&((seq >> 32) as u32).to_be_bytes());
    aad.extend_from_slice(&(seq as u32).to_be_bytes());
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut body,
    )
    .expect("seal");
    let mut esp = Vec::new();
    esp.extend_from_slice(&keys.spi.to_be_bytes());
    esp.extend_from_slice(&(seq as u32).to_be_bytes());
    esp.extend_from_slice(&iv);
    esp.extend_from_slice(&body);
    esp
}

fn seal(tx: &mut OutboundSa, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    tx.seal(inner, &mut out).expect("seal");
    out
}

/// McGrew and Viega, "The Galois/Counter Mode of Operation (GCM)", test cases 13-16
/// (256-bit keys): the primitive the ESP layer is built on.
#[test]
fn mcgrew_viega_aes256_gcm_test_cases_13_to_16() {
    let k0 = hex(&"00".repeat(32));
    let k = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
    let p = hex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
         1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
    );
    let c = hex(
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
         8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad",
    );
    // (key, nonce, AAD, plaintext, ciphertext || tag)
    type Case<'a> = (&'a [u8], [u8; 12], Vec<u8>, Vec<u8>, Vec<u8>);
    let cases: [Case<'_>; 4] = [
        // 13: empty plaintext.
        (
            &k0,
            [0; 12],
            vec![],
            vec![],
            hex("530f8afbc74536b9a963b4f1c4cb738b"),
        ),
        // 14: one zero block.
        (
            &k0,
            [0; 12],
            vec![],
            vec![0; 16],
            hex("cea7403d4d606b6e074ec5d3baf39d18 d0d1c8a799996bf0265b98b5d48ab919"),
        ),
        // 15: four blocks, no AAD.
        (
            &k,
            hex("cafebabefacedbaddecaf888").try_into().unwrap(),
            vec![],
            p.clone(),
            [c.clone(), hex("b094dac5d93471bdec1a502270e3cc6c")].concat(),
        ),
        // 16: 60 bytes with 20 bytes of AAD.
        (
            &k,
            hex("cafebabefacedbaddecaf888").try_into().unwrap(),
            hex("feedfacedeadbeeffeedfacedeadbeefabaddad2"),
            p[..60].to_vec(),
            [c[..60].to_vec(), hex("76fc6ece0f4e1768cddf8853bb2d551b")].concat(),
        ),
    ];
    for (i, (key, nonce, aad, plaintext, expected)) in cases.into_iter().enumerate() {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
        let mut buf = plaintext.clone();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut buf,
        )
        .unwrap();
        assert_eq!(buf, expected, "test case {}", 13 + i);
        let opened = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut buf,
            )
            .unwrap();
        assert_eq!(opened, &plaintext[..], "test case {}", 13 + i);
    }
}

/// `seal` uses nonce = salt || seq (64-bit, big endian), AAD = SPI || seq hi || seq lo, and
/// monotonic padding: the same bytes as the layout spelled out in `craft`.
#[test]
fn seal_uses_the_rfc4106_esn_layout() {
    for last in [0u64, 41, (1 << 32) - 1, (7 << 32) + 0xffff_fff0] {
        let mut tx = OutboundSa::with_last_seq(&keys(), last).unwrap();
        for len in [20usize, 21, 22, 23, 100] {
            let inner = ipv4(len, len as u8);
            let seq = tx.last_seq() + 1;
            let got = seal(&mut tx, &inner);
            let pad = (4 - (len + 2) % 4) % 4;
            let mut pt = inner.clone();
            pt.extend((1..=pad as u8).chain([pad as u8, NEXT_HEADER_IPV4]));
            assert_eq!(
                got,
                craft(&keys(), seq, seq.to_be_bytes(), &pt),
                "seq {seq} len {len}"
            );
            assert_eq!(tx.last_seq(), seq);
        }
    }
}

/// A packet pinned byte for byte. The expected bytes were computed with Python's
/// `cryptography` AESGCM (an implementation independent of ring) from: key as in `keys()`,
/// salt cafebabe, SPI 0x0000abcd, seq 2^32 + 2 (so the AAD carries a high half of 1), the
/// 31-byte IPv4/UDP packet below, padding 01 02 03, pad length 3, next header 4.
#[test]
fn golden_packet() {
    let inner = hex("4500001f000040004011b6cac0000201c000020204d2162e000b0000616263");
    let golden = hex("0000abcd 00000002 0000000100000002
         f83689971065c86d567ced05672e8f59387e2dcaa207f922336e75e8023928812a29b9e0
         6a40ca0d558edfe88ba148ea90266d4e");
    let mut tx = OutboundSa::with_last_seq(&keys(), (1 << 32) + 1).unwrap();
    let sealed = seal(&mut tx, &inner);
    assert_eq!(hex_str(&sealed), hex_str(&golden));
    assert_eq!(spi_of(&golden), Some(0xabcd));

    // The receiver infers the high half from its window: bring it to 2^32 - 1 first, then the
    // golden packet's low half 2 lies beyond the window's bottom, in the next subspace.
    let mut rx = InboundSa::new(&keys(), WINDOW).unwrap();
    let mut before = OutboundSa::with_last_seq(&keys(), (1 << 32) - 2).unwrap();
    let mut p = seal(&mut before, &ipv4(40, 1));
    assert_eq!(rx.open(&mut p).unwrap().seq, (1 << 32) - 1);
    let mut buf = golden.clone();
    let opened = rx.open(&mut buf).unwrap();
    assert_eq!(opened.seq, (1 << 32) + 2);
    assert_eq!(opened.next_header, NEXT_HEADER_IPV4);
    assert_eq!(&buf[opened.inner], &inner[..]);
    assert_eq!(rx.highest_seq(), (1 << 32) + 2);

    // A fresh receiver infers a high half of 0: the AAD differs and the ICV fails.
    let mut fresh = InboundSa::new(&keys(), WINDOW).unwrap();
    let mut buf = golden.clone();
    assert_eq!(fresh.open(&mut buf), Err(EspDrop::IcvFailure));
}

fn hex_str(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn round_trips_ipv4_and_ipv6_of_every_length() {
    let mut tx = OutboundSa::new(&keys()).unwrap();
    let mut rx = InboundSa::new(&keys(), WINDOW).unwrap();
    let mut seq = 0;
    for len in 20..=1500usize {
        let mut inners = vec![(ipv4(len, len as u8), NEXT_HEADER_IPV4)];
        if len >= 40 {
            inners.push((ipv6(len, !(len as u8)), NEXT_HEADER_IPV6));
        }
        for (inner, nh) in inners {
            seq += 1;
            let mut esp = seal(&mut tx, &inner);
            let pad = (4 - (len + 2) % 4) % 4;
            assert_eq!(esp.len(), overhead() + len + pad);
            assert_eq!(tx.last_seq(), seq);
            let opened = rx.open(&mut esp).unwrap();
            assert_eq!(opened.seq, seq);
            assert_eq!(opened.next_header, nh);
            assert_eq!(opened.inner.start, ESP_HDR_LEN + IV_LEN);
            assert_eq!(&esp[opened.inner], &inner[..], "len {len}");
        }
    }
    assert_eq!(rx.highest_seq(), seq);
}

#[test]
fn esn_round_trip_across_2_32_in_and_out_of_order() {
    let start = (1u64 << 32) - 6;
    let mut tx = OutboundSa::with_last_seq(&keys(), start).unwrap();
    let packets: Vec<(u64, Vec<u8>, Vec<u8>)> = (0..12)
        .map(|i| {
            let inner = ipv4(60 + i, i as u8);
            let esp = seal(&mut tx, &inner);
            (tx.last_seq(), inner, esp)
        })
        .collect();
    assert_eq!(packets[5].0, 1 << 32);
    // Low half 0 on the wire for 2^32.
    assert_eq!(&packets[5].2[4..8], &[0, 0, 0, 0]);
    let mut rx = InboundSa::new(&keys(), WINDOW).unwrap();
    // In order up to just below the boundary, then out of order across it.
    let order = [0usize, 1, 2, 3, 7, 4, 6, 5, 11, 8, 10, 9];
    for i in order {
        let (seq, inner, esp) = &packets[i];
        let mut buf = esp.clone();
        let opened = rx.open(&mut buf).unwrap();
        assert_eq!(opened.seq, *seq, "packet {i}");
        assert_eq!(&buf[opened.inner], &inner[..]);
    }
    assert_eq!(rx.highest_seq(), start + 12);
    for (_, _, esp) in &packets {
        assert_eq!(rx.open(&mut esp.clone()), Err(EspDrop::Replay));
    }
}

#[test]
fn far_above_2_32_needs_a_receiver_that_followed() {
    // ESN: only the low half travels, so a receiver that has followed the sender's counter
    // (here, by receiving a packet in the same subspace) infers the high half.
    let hi = 5u64 << 32;
    let mut tx = OutboundSa::with_last_seq(&keys(), hi + 100).unwrap();
    let mut rx = InboundSa::new(&keys(), WINDOW).unwrap();
    let mut first = seal(&mut tx, &ipv4(20, 0));
    assert_eq!(rx.open(&mut first), Err(EspDrop::IcvFailure));
    assert_eq!(rx.highest_seq(), 0);
}

#[test]
fn tampering_any_byte_fails_authentication() {
    let mut tx = OutboundSa::with_last_seq(&keys(), 4).unwrap();
    let esp = seal(&mut tx, &ipv4(45, 0xaa));
    let mut rx = InboundSa::new(&keys(), WINDOW).unwrap();
    for i in 0..esp.len() {
        for flip in [0x01u8, 0x80] {
            let mut bad = esp.clone();
            bad[i] ^= flip;
            let want = if i < 4 {
                EspDrop::BadSpi
            } else {
                EspDrop::IcvFailure
            };
            assert_eq!(rx.open(&mut bad), Err(want), "byte {i} ^ {flip:#x}");
        }
    }
    // Nothing was accepted on the way.
    assert_eq!(rx.highest_seq(), 0);
    let opened = rx.open(&mut esp.clone()).unwrap();
    assert_eq!(opened.seq, 5);
}

#[test]
fn replays_are_dropped() {
    let mut tx = OutboundSa::new(&keys()).unwrap();
    let mut rx = InboundSa::new(&keys(), 32).unwrap();
    let packets: Vec<Vec<u8>> = (0..40).map(|i| seal(&mut tx, &ipv4(20 + i, 0))).collect();
    assert!(rx.open(&mut packets[0].clone()).is_ok());
    assert_eq!(rx.open(&mut packets[0].clone()), Err(EspDrop::Replay));
    // Jump to 40: the window now holds 9..=40.
    assert_eq!(rx.open(&mut packets[39].clone()).unwrap().seq, 40);
    // Left of the window: the low half reads as the next 2^32 subspace (RFC 4303 A2.2), so
    // the AAD carries the wrong high half and the ICV check rejects it.
    assert_eq!(rx.open(&mut packets[7].clone()), Err(EspDrop::IcvFailure));
    assert_eq!(rx.highest_seq(), 40);
    assert_eq!(rx.open(&mut packets[8].clone()).unwrap().seq, 9);
    assert_eq!(rx.open(&mut packets[8].clone()), Err(EspDrop::Replay));
    // A replay is rejected before decryption: even a packet whose ICV is broken reports
    // Replay, not IcvFailure.
    let mut broken = packets[39].clone();
    let last = broken.len() - 1;
    broken[last] ^= 1;
    assert_eq!(rx.open(&mut broken), Err(EspDrop::Replay));
}

#[test]
fn wrong_key_or_salt_fails_authentication() {
    let mut tx = OutboundSa::new(&keys()).unwrap();
    let esp = seal(&mut tx, &ipv4(64, 3));
    let mut other = keys();
    other.key[31] ^= 1;
    let mut rx = InboundSa::new(&other, WINDOW).unwrap();
    assert_eq!(rx.open(&mut esp.clone()), Err(EspDrop::IcvFailure));
    let mut other = keys();
    other.salt[0] ^= 1;
    let mut rx = InboundSa::new(&other, WINDOW).unwrap();
    assert_eq!(rx.open(&mut esp.clone()), Err(EspDrop::IcvFailure));
}

#[test]
fn truncated_and_odd_packets_are_malformed() {
    let mut tx = OutboundSa::new(&keys()).unwrap();
    let esp = seal(&mut tx, &ipv4(64, 3));
    let mut rx = InboundSa::new(&keys(), WINDOW).unwrap();
    for len in 0..overhead() {
        let mut short = esp[..len].to_vec();
        assert_eq!(rx.open(&mut short), Err(EspDrop::Malformed), "len {len}");
    }
    for cut in [1usize, 2, 3, 5, 7] {
        let mut odd = esp[..esp.len() - cut].to_vec();
        assert_eq!(rx.open(&mut odd), Err(EspDrop::Malformed), "cut {cut}");
    }
    let mut long = esp.clone();
    long.push(0);
    assert_eq!(rx.open(&mut long), Err(EspDrop::Malformed));
    // Aligned truncation: the ICV is read from the wrong bytes.
    let mut cut4 = esp[..esp.len() - 4].to_vec();
    assert_eq!(rx.open(&mut cut4), Err(EspDrop::IcvFailure));
    assert_eq!(rx.highest_seq(), 0);
    assert!(rx.open(&mut esp.clone()).is_ok());
}

#[test]
fn bad_trailers_and_inner_packets_are_malformed() {
    let k = keys();
    // 23 + 2 and 43 + 2 need three bytes of padding.
    let v4 = ipv4(23, 9);
    let v6 = ipv6(43, 9);
    let with = |inner: &[u8], trailer: &[u8]| [inner, trailer].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("padding 1,2,4", with(&v4, &[1, 2, 4, 3, 4])),
        ("padding 0,0,0", with(&v4, &[0, 0, 0, 3, 4])),
        ("padding 2,1", with(&ipv4(24, 9), &[2, 1, 2, 4])),
        ("pad length beyond payload", vec![0x45, 1, 200, 4]),
        (
            "pad length of the whole payload",
            with(&[1, 2, 3, 4, 5, 6], &[6, 4]),
        ),
        ("next header 17", with(&v4, &[1, 2, 3, 3, 17])),
        ("next header 0", with(&v4, &[1, 2, 3, 3, 0])),
        ("IPv6 inner with next header 4", with(&v6, &[1, 2, 3, 3, 4])),
        (
            "IPv4 inner with next header 41",
            with(&v4, &[1, 2, 3, 3, 41]),
        ),
        ("IPv4 header too short", with(&v4[..19], &[1, 2, 3, 3, 4])),
        ("IPv4 total length beyond the payload", {
            let mut p = v4.clone();
            p[2..4].copy_from_slice(&24u16.to_be_bytes());
            with(&p, &[1, 2, 3, 3, 4])
        }),
        ("IPv4 IHL below 5", {
            let mut p = v4.clone();
            p[0] = 0x44;
            with(&p, &[1, 2, 3, 3, 4])
        }),
        ("IPv6 payload length beyond the payload", {
            let mut p = v6.clone();
            p[4..6].copy_from_slice(&4u16.to_be_bytes());
            with(&p, &[1, 2, 3, 3, 41])
        }),
        ("IPv6 header too short", with(&v6[..38], &[0, 41])),
    ];
    let mut rx = InboundSa::new(&k, WINDOW).unwrap();
    for (i, (what, pt)) in cases.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(pt.len() % 4, 0, "{what}: test plaintext not aligned");
        let mut esp = craft(&k, seq, [0x11; 8], pt);
        assert_eq!(rx.open(&mut esp), Err(EspDrop::Malformed), "{what}");
        // Authenticated, but not accepted: the window did not move.
        assert_eq!(rx.highest_seq(), 0, "{what}");
    }
    // Control: the same construction with a good trailer opens, with an IV that is not the
    // sequence number (the receiver reads the IV from the packet).
    let mut esp = craft(&k, 100, [0x11; 8], &with(&v4, &[1, 2, 3, 3, 4]));
    let opened = rx.open(&mut esp).unwrap();
    assert_eq!(&esp[opened.inner], &v4[..]);
    let mut esp = craft(&k, 101, [0x22; 8], &with(&v6, &[1, 2, 3, 3, 41]));
    let opened = rx.open(&mut esp).unwrap();
    assert_eq!(opened.next_header, NEXT_HEADER_IPV6);
    assert_eq!(&esp[opened.inner], &v6[..]);
}

#[test]
fn overhead_and_constants() {
    assert_eq!(overhead(), ESP_HDR_LEN + IV_LEN + 2 + ICV_LEN);
    assert_eq!(spi_of(&[0, 0, 1]), None);
    assert_eq!(spi_of(&[0xde, 0xad, 0xbe, 0xef, 0]), Some(0xdead_beef));
}
