//! Sans-IO ESP: RFC 4303 tunnel mode with RFC 4106 AES-256-GCM (16-byte ICV) and extended
//! sequence numbers, always on.
//!
//! This module turns inner IP packets into ESP packets and back; it does no I/O and reads no
//! clock. The caller owns the outer IP header, the sockets and the SA lookup by SPI.
//!
//! Wire format of one packet (everything after the outer IP header):
//!
//! ```text
//! | SPI (4) | seq low 32 bits (4) | IV (8) | ciphertext of: inner | pad 1,2,.. | pad len | next header | ICV (16) |
//! ```
//!
//! - Nonce (RFC 4106 section 4): the SA's 4-byte salt followed by the 8-byte IV. The sender
//!   uses the 64-bit sequence number as IV, which RFC 4106 section 3.1 allows: it never
//!   repeats under one key, since the sequence number never wraps.
//! - AAD (RFC 4106 section 5, ESN): SPI, then the high and the low half of the sequence
//!   number, 12 bytes. Only the low half is on the wire; the receiver infers the high half
//!   from its replay window ([`crate::replay`]).
//! - Padding (RFC 4303 section 2.4): the monotonic bytes 1, 2, 3, .. until the ciphertext
//!   (inner + padding + 2) is a multiple of 4 bytes; the receiver checks them.
//! - Next header: 4 (IPv4) or 41 (IPv6), the inner packet's version.

use crate::replay::{MAX_WINDOW, MIN_WINDOW, ReplayWindow};
use crate::{Error, EspDrop, Result, SaKeys};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use std::fmt;
use std::ops::Range;
use zeroize::Zeroize;

/// Length of the ESP header: SPI and the low half of the sequence number.
pub const ESP_HDR_LEN: usize = 8;
/// Length of the explicit IV carried in each packet (RFC 4106).
pub const IV_LEN: usize = 8;
/// Length of the GCM tag (ICV).
pub const ICV_LEN: usize = 16;
/// Length of the ESP trailer after the padding: pad length and next header.
const TRAILER_LEN: usize = 2;
/// Next header of an IPv4 inner packet (IP-in-IP).
pub const NEXT_HEADER_IPV4: u8 = 4;
/// Next header of an IPv6 inner packet.
pub const NEXT_HEADER_IPV6: u8 = 41;
/// Largest inner packet [`OutboundSa::seal`] takes: an IP packet's total length field is 16 bits.
pub const MAX_INNER_LEN: usize = u16::MAX as usize;

/// Per-packet overhead excluding the outer IP header and padding: 8 + 8 + 2 (pad len, next
/// header) + 16.
pub const fn overhead() -> usize {
    ESP_HDR_LEN + IV_LEN + TRAILER_LEN + ICV_LEN
}

/// The SPI of an ESP packet (first 4 bytes), or `None` if too short.
pub fn spi_of(esp: &[u8]) -> Option<u32> {
    let spi: [u8; 4] = esp.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(spi))
}

fn aead_key(keys: &SaKeys) -> Result<LessSafeKey> {
    let key = UnboundKey::new(&AES_256_GCM, &keys.key).map_err(|_| Error::Invalid {
        field: "ESP key",
        value: format!("SPI {:#010x}", keys.spi),
        reason: "not an AES-256-GCM key".to_owned(),
    })?;
    Ok(LessSafeKey::new(key))
}

/// RFC 4106 section 4: salt || IV.
fn nonce(salt: &[u8; 4], iv: &[u8; IV_LEN]) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(salt);
    n[4..].copy_from_slice(iv);
    Nonce::assume_unique_for_key(n)
}

/// RFC 4106 section 5, extended sequence numbers: SPI || seq high || seq low.
fn aad(spi: u32, seq: u64) -> [u8; 12] {
    let mut a = [0u8; 12];
    a[..4].copy_from_slice(&spi.to_be_bytes());
    a[4..].copy_from_slice(&seq.to_be_bytes());
    a
}

/// Sending side of one SA. Sequence numbers are 64-bit (ESN): the first packet carries 1;
/// [`seal`](Self::seal) refuses to wrap (returns [`Error::Esp`]): rekey before 2^64.
pub struct OutboundSa {
    spi: u32,
    key: LessSafeKey,
    salt: [u8; 4],
    last_seq: u64,
}

impl fmt::Debug for OutboundSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

impl Drop for OutboundSa {
    fn drop(&mut self) {
        self.salt.zeroize();
    }
}

impl OutboundSa {
    /// A fresh SA: the first packet will carry sequence number 1.
    pub fn new(keys: &SaKeys) -> Result<Self> {
        Self::with_last_seq(keys, 0)
    }

    /// An SA whose last sent sequence number is `last_seq`: the next packet carries
    /// `last_seq + 1`. For carrying a sequence counter over (for instance from the kernel's
    /// state of the same SA); reusing a number under the same key breaks GCM, so never go
    /// backwards.
    pub fn with_last_seq(keys: &SaKeys, last_seq: u64) -> Result<Self> {
        Ok(OutboundSa {
            spi: keys.spi,
            key: aead_key(keys)?,
            salt: keys.salt,
            last_seq,
        })
    }

    /// The SA's SPI.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// The last sequence number used (0 before the first packet).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Appends to `out` the ESP packet (header .. ICV, no outer IP header) carrying `inner`
    /// (a whole IP packet). Next header is 4 (IPv4) or 41 (IPv6), from the inner version
    /// nibble; anything else, an empty packet or one longer than [`MAX_INNER_LEN`] is
    /// [`Error::Invalid`]. Returns the sequence number used. On error `out` is unchanged
    /// and no sequence number is consumed, except when the sequence space is exhausted
    /// ([`Error::Esp`]), which is final for this SA.
    pub fn seal(&mut self, inner: &[u8], out: &mut Vec<u8>) -> Result<u64> {
        let next_header = match inner.first().map(|b| b >> 4) {
            Some(4) => NEXT_HEADER_IPV4,
            Some(6) => NEXT_HEADER_IPV6,
            other => {
                return Err(Error::Invalid {
                    field: "inner packet",
                    value: match other {
                        Some(v) => format!("IP version {v}"),
                        None => "empty".to_owned(),
                    },
                    reason: "not an IPv4 or IPv6 packet".to_owned(),
                });
            }
        };
        if inner.len() > MAX_INNER_LEN {
            return Err(Error::Invalid {
                field: "inner packet",
                value: format!("{} bytes", inner.len()),
                reason: format!("longer than {MAX_INNER_LEN} bytes"),
            });
        }
        let seq = self.last_seq.checked_add(1).ok_or(Error::Esp {
            spi: self.spi,
            reason: "sequence number space exhausted: rekey",
        })?;
        let pad_len = (4 - (inner.len() + TRAILER_LEN) % 4) % 4;
        let start = out.len();
        out.reserve(overhead() + inner.len() + pad_len);
        out.extend_from_slice(&self.spi.to_be_bytes());
        out.extend_from_slice(&(seq as u32).to_be_bytes());
        let iv = seq.to_be_bytes();
        out.extend_from_slice(&iv);
        out.extend_from_slice(inner);
        // pad_len <= 3.
        out.extend((1..=pad_len as u8).chain([pad_len as u8, next_header]));
        let plaintext = &mut out[start + ESP_HDR_LEN + IV_LEN..];
        let sealed = self.key.seal_in_place_separate_tag(
            nonce(&self.salt, &iv),
            Aad::from(aad(self.spi, seq)),
            plaintext,
        );
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                self.last_seq = seq;
                Ok(seq)
            }
            Err(_) => {
                out.truncate(start);
                Err(Error::Esp {
                    spi: self.spi,
                    reason: "AES-GCM seal failed",
                })
            }
        }
    }
}

/// What [`InboundSa::open`] found in an authenticated packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The packet's full 64-bit sequence number.
    pub seq: u64,
    /// Next header: 4 (IPv4) or 41 (IPv6).
    pub next_header: u8,
    /// Where the inner IP packet lies in the buffer passed to `open`, exactly its IP length
    /// (any TFC padding after it is left out).
    pub inner: Range<usize>,
}

/// Receiving side of one SA, with its replay window.
pub struct InboundSa {
    spi: u32,
    key: LessSafeKey,
    salt: [u8; 4],
    window: ReplayWindow,
}

impl fmt::Debug for InboundSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundSa")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("highest_seq", &self.window.top())
            .field("window", &self.window.size())
            .finish_non_exhaustive()
    }
}

impl Drop for InboundSa {
    fn drop(&mut self) {
        self.salt.zeroize();
    }
}

impl InboundSa {
    /// An SA with a replay window of `window` packets (32..=65536, e.g. 2048; else
    /// [`Error::Invalid`]).
    pub fn new(keys: &SaKeys, window: u32) -> Result<Self> {
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
            return Err(Error::Invalid {
                field: "replay window",
                value: window.to_string(),
                reason: format!("must be {MIN_WINDOW}..={MAX_WINDOW} packets"),
            });
        }
        Ok(InboundSa {
            spi: keys.spi,
            key: aead_key(keys)?,
            salt: keys.salt,
            window: ReplayWindow::new(window),
        })
    }

    /// The SA's SPI.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Highest authenticated sequence number received (0 if none).
    pub fn highest_seq(&self) -> u64 {
        self.window.top()
    }

    /// Authenticates and decrypts one ESP packet (header .. ICV, without the outer IP header)
    /// in place.
    ///
    /// Order (RFC 4303 section 3.4): length checks; the replay window is checked BEFORE
    /// decrypting (a cheap reject); then authentication and decryption in place; then the
    /// trailer and the inner packet are checked; the window is updated only when all of
    /// this succeeded.
    ///
    /// Errors: [`EspDrop::BadSpi`] if the packet's SPI is not this SA's (the caller normally
    /// looked it up by SPI, so this is a guard); [`EspDrop::Malformed`] when too short, not a
    /// multiple of 4 bytes, with padding bytes other than 1, 2, 3, .., a pad length beyond the
    /// payload, a next header other than 4/41, or an inner packet that is not an IP packet of
    /// that version; [`EspDrop::Replay`]; [`EspDrop::IcvFailure`]. After an error the
    /// contents of `esp` are unspecified.
    pub fn open(&mut self, esp: &mut [u8]) -> std::result::Result<Opened, EspDrop> {
        const MIN_LEN: usize = overhead();
        // RFC 4303 section 2.4: the trailer ends on a 4-byte boundary; with the 8-byte
        // header, 8-byte IV and 16-byte ICV, the whole packet is a multiple of 4.
        if esp.len() < MIN_LEN || !esp.len().is_multiple_of(4) {
            return Err(EspDrop::Malformed);
        }
        let spi = spi_of(esp).ok_or(EspDrop::Malformed)?;
        if spi != self.spi {
            return Err(EspDrop::BadSpi);
        }
        let (header, body) = esp.split_at_mut(ESP_HDR_LEN + IV_LEN);
        let seq_lo = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let seq = self.window.check(seq_lo)?;
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&header[ESP_HDR_LEN..]);
        let (ciphertext, icv) = body.split_at_mut(body.len() - ICV_LEN);
        let tag = Tag::try_from(&*icv).map_err(|_| EspDrop::Malformed)?;
        self.key
            .open_in_place_separate_tag(
                nonce(&self.salt, &iv),
                Aad::from(aad(spi, seq)),
                tag,
                ciphertext,
                0..,
            )
            .map_err(|_| EspDrop::IcvFailure)?;
        let plaintext = &*ciphertext;
        let (next_header, inner_len) = parse_plaintext(plaintext)?;
        self.window.accept(seq);
        let start = ESP_HDR_LEN + IV_LEN;
        Ok(Opened {
            seq,
            next_header,
            inner: start..start + inner_len,
        })
    }
}

/// Checks the decrypted `inner | padding | pad len | next header` and returns the next header
/// and the inner packet's IP length.
fn parse_plaintext(pt: &[u8]) -> std::result::Result<(u8, usize), EspDrop> {
    let [.., pad_len, next_header] = *pt else {
        return Err(EspDrop::Malformed);
    };
    let payload_end = pt
        .len()
        .checked_sub(TRAILER_LEN + usize::from(pad_len))
        .ok_or(EspDrop::Malformed)?;
    let padding = &pt[payload_end..pt.len() - TRAILER_LEN];
    if !padding.iter().zip(1u8..).all(|(&b, want)| b == want) {
        return Err(EspDrop::Malformed);
    }
    let inner = &pt[..payload_end];
    let ip_len = match next_header {
        NEXT_HEADER_IPV4 => ipv4_len(inner),
        NEXT_HEADER_IPV6 => ipv6_len(inner),
        _ => None,
    }
    .ok_or(EspDrop::Malformed)?;
    Ok((next_header, ip_len))
}

/// The total length of the IPv4 packet at the start of `p`, if `p` holds one.
fn ipv4_len(p: &[u8]) -> Option<usize> {
    let (&first, rest) = p.split_first()?;
    let total = usize::from(u16::from_be_bytes([*rest.get(1)?, *rest.get(2)?]));
    let header = usize::from(first & 0x0f) * 4;
    (first >> 4 == 4 && p.len() >= 20 && header >= 20 && header <= total && total <= p.len())
        .then_some(total)
}

/// The total length (40 + payload length) of the IPv6 packet at the start of `p`, if `p`
/// holds one.
fn ipv6_len(p: &[u8]) -> Option<usize> {
    const HEADER: usize = 40;
    if p.len() < HEADER || p[0] >> 4 != 6 {
        return None;
    }
    let total = HEADER + usize::from(u16::from_be_bytes([p[4], p[5]]));
    (total <= p.len()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SaKeys {
        SaKeys {
            spi: 0x1234_5678,
            key: [7; 32],
            salt: [1, 2, 3, 4],
        }
    }

    fn ipv4(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p
    }

    #[test]
    fn overhead_is_34() {
        assert_eq!(overhead(), 34);
    }

    #[test]
    fn padding_aligns_to_four() {
        let mut tx = OutboundSa::new(&keys()).unwrap();
        for len in 20..40 {
            let mut out = Vec::new();
            tx.seal(&ipv4(len), &mut out).unwrap();
            assert_eq!(out.len() % 4, 0, "inner {len}");
            assert!(out.len() - overhead() - len < 4);
        }
    }

    #[test]
    fn seal_refuses_to_wrap() {
        let mut tx = OutboundSa::with_last_seq(&keys(), u64::MAX - 1).unwrap();
        let mut out = Vec::new();
        assert_eq!(tx.seal(&ipv4(20), &mut out).unwrap(), u64::MAX);
        out.clear();
        assert!(matches!(
            tx.seal(&ipv4(20), &mut out),
            Err(Error::Esp {
                spi: 0x1234_5678,
                ..
            })
        ));
        assert!(out.is_empty());
        assert_eq!(tx.last_seq(), u64::MAX);
    }

    #[test]
    fn seal_rejects_non_ip() {
        let mut tx = OutboundSa::new(&keys()).unwrap();
        let mut out = vec![9];
        assert!(matches!(tx.seal(&[], &mut out), Err(Error::Invalid { .. })));
        assert!(matches!(
            tx.seal(&[0x55; 20], &mut out),
            Err(Error::Invalid { .. })
        ));
        assert_eq!(out, [9]);
        assert_eq!(tx.last_seq(), 0);
    }

    #[test]
    fn window_bounds() {
        assert!(InboundSa::new(&keys(), 31).is_err());
        assert!(InboundSa::new(&keys(), 65537).is_err());
        assert!(InboundSa::new(&keys(), 32).is_ok());
        assert!(InboundSa::new(&keys(), 65536).is_ok());
    }

    #[test]
    fn open_trims_tfc_padding_and_checks_spi() {
        let mut tx = OutboundSa::new(&keys()).unwrap();
        let mut rx = InboundSa::new(&keys(), 64).unwrap();
        // An IPv4 packet of 20 bytes followed by 8 bytes of TFC padding.
        let mut inner = ipv4(28);
        inner[2..4].copy_from_slice(&20u16.to_be_bytes());
        let mut out = Vec::new();
        tx.seal(&inner, &mut out).unwrap();
        let mut other = out.clone();
        other[0] ^= 1;
        assert_eq!(rx.open(&mut other), Err(EspDrop::BadSpi));
        let opened = rx.open(&mut out).unwrap();
        assert_eq!(opened.inner.len(), 20);
        assert_eq!(opened.next_header, NEXT_HEADER_IPV4);
    }

    proptest::proptest! {
        /// The fuzz target's property on stable: arbitrary bytes (and mutations of a valid
        /// packet) never panic `open`.
        #[test]
        fn open_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            flip in proptest::prelude::any::<(usize, u8)>(),
        ) {
            let mut rx = InboundSa::new(&keys(), 64).unwrap();
            let mut b = bytes.clone();
            let _ = rx.open(&mut b);
            let mut tx = OutboundSa::new(&keys()).unwrap();
            let mut p = Vec::new();
            tx.seal(&ipv4(20 + bytes.len()), &mut p).unwrap();
            let i = flip.0 % p.len();
            p[i] ^= flip.1;
            let r = rx.open(&mut p);
            proptest::prop_assert!(flip.1 != 0 || r.is_ok());
        }
    }

    #[test]
    fn debug_hides_key_material() {
        let tx = OutboundSa::new(&keys()).unwrap();
        let s = format!("{tx:?}");
        assert!(s.contains("0x12345678"), "{s}");
        assert!(!s.contains("7, 7"), "{s}");
    }
}
