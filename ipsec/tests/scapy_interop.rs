//! Interop with an independent ESP implementation: scapy's `SecurityAssociation` (AES-GCM,
//! ESN), driven by `tests/scapy/interop.py`.
//!
//! enc seals packets (across the 2^32 boundary) and scapy decrypts them; scapy encrypts
//! packets with given 64-bit sequence numbers (one above 2^32) and enc opens them. Once with
//! raw ESP, once with ESP in UDP (RFC 3948: scapy's `nat_t_header`, port 4500), where enc
//! classifies scapy's UDP payloads with `udp_payload` before opening them.
//!
//! Needs python3 with scapy (and `cryptography`). If scapy is missing, the test tries
//! `pip install --quiet scapy`; if that fails it FAILS under `CI=true` and is reported as
//! skipped elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use enc_ipsec::esp::{InboundSa, NEXT_HEADER_IPV4, OutboundSa};
use enc_ipsec::userspace::{UdpPayload, udp_payload};
use enc_ipsec::{EspDrop, SaKeys};
use std::path::PathBuf;
use std::process::Command;

const PROBE: &str = "import scapy.layers.ipsec, cryptography.hazmat.primitives.ciphers.aead";

fn python_ok() -> bool {
    Command::new("python3")
        .args(["-c", PROBE])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes sure scapy can be imported; returns false when the test should be skipped.
fn require_scapy() -> bool {
    if python_ok() {
        return true;
    }
    let installed = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "scapy", "cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    if installed && python_ok() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("scapy interop: python3 cannot import scapy (and pip install failed) with CI=true");
    }
    eprintln!("SKIPPED scapy interop: python3 cannot import scapy and `pip install scapy` failed");
    false
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex from interop.py"))
        .collect()
}

fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4/UDP 10.1.0.1:1111 -> 10.2.0.1:2222 carrying `payload`, valid checksum, UDP checksum 0.
fn ipv4_udp(payload: &[u8]) -> Vec<u8> {
    let len = 28 + payload.len();
    let mut p = vec![
        0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0, 10, 1, 0, 1, 10, 2, 0, 1, 0x04, 0x57, 0x08, 0xae,
        0, 0, 0, 0,
    ];
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// IPv6/UDP fd00::1 -> fd00::2 carrying `payload` (UDP checksum left 0: scapy does not check).
fn ipv6_udp(payload: &[u8]) -> Vec<u8> {
    let plen = 8 + payload.len();
    let mut p = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
    p[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = 1;
    p.extend_from_slice(&a);
    a[15] = 2;
    p.extend_from_slice(&a);
    p.extend_from_slice(&[0x04, 0x57, 0x08, 0xae]);
    p.extend_from_slice(&(plen as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn scapy_interop_both_directions() {
    if require_scapy() {
        interop(false);
    }
}

#[test]
fn scapy_interop_esp_in_udp_both_directions() {
    if require_scapy() {
        interop(true);
    }
}

fn interop(nat_t: bool) {
    let keys = SaKeys {
        spi: 0xc0ff_ee01,
        key: std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11)),
        salt: [0x5a, 0x17, 0x00, 0xfe],
    };

    // enc -> scapy: six packets from 2^32 - 3 up, crossing the boundary (2^32 has low half 0).
    let mut tx = OutboundSa::with_last_seq(&keys, (1 << 32) - 4).unwrap();
    let mut sealed = Vec::new();
    for i in 0..6u32 {
        let payload = format!("enc to scapy #{i}");
        let inner = if i == 2 {
            ipv6_udp(payload.as_bytes())
        } else {
            ipv4_udp(payload.as_bytes())
        };
        let mut esp = Vec::new();
        let seq = tx.seal(&inner, &mut esp).unwrap();
        sealed.push((seq, inner, esp));
    }
    assert_eq!(sealed[3].0, 1 << 32);

    // scapy -> enc: in order, a reordering, a jump to the top of subspace 0, then over 2^32.
    let to_enc: [u64; 9] = [
        1,
        2,
        7,
        5,
        0xffff_fff0,
        0xffff_ffff,
        (1 << 32) + 1,
        (1 << 32) + 3,
        (1 << 32) + 2,
    ];

    let decrypt: Vec<String> = sealed
        .iter()
        .map(|(seq, _, esp)| format!(r#"{{"hi": {}, "esp": "{}"}}"#, seq >> 32, hex(esp)))
        .collect();
    let encrypt: Vec<String> = to_enc
        .iter()
        .map(|seq| {
            format!(
                r#"{{"seq": {seq}, "payload": "scapy to enc {seq}", "inner_src": "10.3.0.1", "inner_dst": "10.4.0.1"}}"#
            )
        })
        .collect();
    let case = format!(
        r#"{{"spi": {}, "key": "{}", "salt": "{}", "src": "192.0.2.1", "dst": "192.0.2.2", "nat_t": {nat_t}, "decrypt": [{}], "encrypt": [{}]}}"#,
        keys.spi,
        hex(&keys.key),
        hex(&keys.salt),
        decrypt.join(", "),
        encrypt.join(", ")
    );
    let file = TempFile(std::env::temp_dir().join(format!(
        "enc-scapy-interop-{}-{nat_t}-{}.json",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )));
    std::fs::write(&file.0, case).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/scapy/interop.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&file.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "interop.py failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let mut decrypted = Vec::new();
    let mut encrypted = Vec::new();
    for line in stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["decrypted", i, inner] => decrypted.push((i.parse::<usize>().unwrap(), unhex(inner))),
            ["encrypted", seq, inner, esp] => {
                encrypted.push((seq.parse::<u64>().unwrap(), unhex(inner), unhex(esp)))
            }
            _ => panic!("unexpected line from interop.py: {line}"),
        }
    }

    // scapy decrypted every packet enc sealed, to the same inner packet.
    assert_eq!(decrypted.len(), sealed.len());
    for (i, inner) in &decrypted {
        assert_eq!(hex(inner), hex(&sealed[*i].1), "enc->scapy packet {i}");
    }

    // enc opens every packet scapy encrypted, infers the high half, and refuses replays.
    assert_eq!(encrypted.len(), to_enc.len());
    let mut rx = InboundSa::new(&keys, 2048).unwrap();
    for (seq, inner, esp) in &encrypted {
        // What came out of scapy's UDP datagram (or after the IP header) is ESP: a non-zero SPI.
        assert_eq!(udp_payload(esp), UdpPayload::Esp, "nat_t {nat_t}");
        let mut buf = esp.clone();
        let opened = rx
            .open(&mut buf)
            .unwrap_or_else(|e| panic!("scapy->enc seq {seq}: {e:?}"));
        assert_eq!(opened.seq, *seq);
        assert_eq!(opened.next_header, NEXT_HEADER_IPV4);
        assert_eq!(hex(&buf[opened.inner]), hex(inner), "scapy->enc seq {seq}");
    }
    assert_eq!(rx.highest_seq(), (1 << 32) + 3);
    for (seq, _, esp) in &encrypted {
        let got = rx.open(&mut esp.clone());
        if (1 << 32) + 3 - seq < 2048 {
            assert_eq!(got, Err(EspDrop::Replay), "replay of {seq}");
        } else {
            // Left of the window (1, 2, 5, 7): the low half is read relative to the window
            // (RFC 4303 A2.2), as 2^32 + lo, which is either a number already seen (Replay)
            // or one ahead whose AAD does not match (IcvFailure). Never accepted.
            assert!(
                matches!(got, Err(EspDrop::Replay | EspDrop::IcvFailure)),
                "replay of {seq}: {got:?}"
            );
        }
    }
    assert_eq!(rx.highest_seq(), (1 << 32) + 3);
    // A tampered scapy packet is caught by the ICV.
    let (_, _, esp) = &encrypted[0];
    let mut bad = esp.clone();
    bad[20] ^= 0x40;
    let mut fresh = InboundSa::new(&keys, 2048).unwrap();
    assert_eq!(fresh.open(&mut bad), Err(EspDrop::IcvFailure));
}
