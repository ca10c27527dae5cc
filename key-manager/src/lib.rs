//! Key material for enc: per-pair keys derived from an authenticated control session.
//!
//! This crate does no I/O and reads no clock. Its input is the secret that both ends of a
//! mutually authenticated TLS 1.3 control session export (RFC 8446 section 7.5, via
//! [`EXPORTER_LABEL`]); its output is key material bound to a purpose, a key epoch and the two
//! node names. Both ends derive the same bytes without sending any key over the wire, and a
//! key derived for one pair, epoch or purpose says nothing about any other.
//!
//! Derivation is HKDF-SHA256 (RFC 5869): `PRK = HKDF-Extract(salt = "enc/v1", IKM = exporter
//! secret)`, then `OKM = HKDF-Expand(PRK, info, L)` where `info` is the purpose label, the epoch
//! as a big-endian u32, and both node names, each length-prefixed, in sorted order so that the
//! two ends build the same `info` whichever of them dials.

use ring::hkdf;
pub mod rotation;

use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Label for `export_keying_material` on the control session (RFC 8446 7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-enc-control-v1";

/// Length of the exporter secret taken from the control session.
pub const EXPORTER_LEN: usize = 32;

/// HKDF salt; versioned so that a future derivation scheme can never collide with this one.
const HKDF_SALT: &[u8] = b"enc/v1";

/// Errors of key derivation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A node name cannot be part of a derivation label (empty or longer than 255 bytes).
    #[error("node name {name:?} cannot be used in a key label: {reason}")]
    BadNodeName {
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Both ends of a pair carry the same name.
    #[error("cannot derive pair keys between node {0:?} and itself")]
    SamePeer(String),
    /// HKDF refused the requested output length (never expected for our fixed sizes).
    #[error("HKDF expansion failed for purpose {purpose}")]
    Hkdf {
        /// The purpose label being expanded.
        purpose: &'static str,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A key epoch: increases by one with every rotation of a pair's keys.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u32);

impl Epoch {
    /// The epoch a freshly authenticated pair starts in.
    pub const FIRST: Epoch = Epoch(1);
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The secret exported from one authenticated control session. Never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionSecret([u8; EXPORTER_LEN]);

impl SessionSecret {
    /// Wraps exporter output.
    pub fn from_bytes(bytes: [u8; EXPORTER_LEN]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

/// 32 bytes of derived key material. Never printed; zeroed on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Key32([u8; 32]);

impl Key32 {
    /// The raw bytes, for handing to a datapath backend.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key32(<redacted>)")
    }
}

/// The unordered pair of nodes a key belongs to, stored in sorted order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pair {
    low: String,
    high: String,
}

impl Pair {
    /// Builds the pair from the two node names in any order.
    pub fn new(a: &str, b: &str) -> Result<Self> {
        for name in [a, b] {
            if name.is_empty() {
                return Err(Error::BadNodeName {
                    name: name.to_owned(),
                    reason: "empty",
                });
            }
            if name.len() > 255 {
                return Err(Error::BadNodeName {
                    name: name.to_owned(),
                    reason: "longer than 255 bytes",
                });
            }
        }
        if a == b {
            return Err(Error::SamePeer(a.to_owned()));
        }
        let (low, high) = if a < b { (a, b) } else { (b, a) };
        Ok(Self {
            low: low.to_owned(),
            high: high.to_owned(),
        })
    }

    /// The name that sorts first.
    pub fn low(&self) -> &str {
        &self.low
    }

    /// The name that sorts last.
    pub fn high(&self) -> &str {
        &self.high
    }
}

/// What a derived key is for; the label is part of the HKDF info, so purposes never share keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Purpose {
    /// The WireGuard preshared key of the pair (binds the tunnel to the certificate check).
    WireguardPsk,
    /// A public, non-secret identifier of the pair's key at an epoch, for status displays:
    /// both ends show the same id when they hold the same key.
    KeyId,
    /// ESP (RFC 4106 AES-256-GCM) key material of one direction: 32 bytes of key, then the
    /// 4-byte salt and the SPI from a second expansion.
    EspKey,
    /// SPI and salt of one ESP direction.
    EspSpiSalt,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::WireguardPsk => "enc wireguard-psk",
            Purpose::KeyId => "enc key-id",
            Purpose::EspKey => "enc esp-key",
            Purpose::EspSpiSalt => "enc esp-spi-salt",
        }
    }
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn info_bytes(purpose: Purpose, epoch: Epoch, pair: &Pair) -> Vec<u8> {
    info_bytes_dir(purpose, epoch, pair, None)
}

/// `info` of a derivation; a directional one appends the sender's name, length-prefixed.
fn info_bytes_dir(purpose: Purpose, epoch: Epoch, pair: &Pair, sender: Option<&str>) -> Vec<u8> {
    let label = purpose.label().as_bytes();
    let mut info = Vec::with_capacity(label.len() + 4 + 2 + pair.low.len() + pair.high.len() + 1);
    info.push(label.len() as u8);
    info.extend_from_slice(label);
    info.extend_from_slice(&epoch.0.to_be_bytes());
    // Names are at most 255 bytes (checked in Pair::new).
    info.push(pair.low.len() as u8);
    info.extend_from_slice(pair.low.as_bytes());
    info.push(pair.high.len() as u8);
    info.extend_from_slice(pair.high.as_bytes());
    if let Some(sender) = sender {
        info.push(b'>');
        info.push(sender.len() as u8);
        info.extend_from_slice(sender.as_bytes());
    }
    info
}

/// Derives 32 bytes for `purpose` at `epoch` for `pair` from the session secret.
pub fn derive(
    secret: &SessionSecret,
    purpose: Purpose,
    epoch: Epoch,
    pair: &Pair,
) -> Result<Key32> {
    expand(secret, purpose, &info_bytes(purpose, epoch, pair))
}

fn expand(secret: &SessionSecret, purpose: Purpose, info: &[u8]) -> Result<Key32> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&secret.0);
    let parts = [info];
    let okm = prk.expand(&parts, Len32).map_err(|_| Error::Hkdf {
        purpose: purpose.label(),
    })?;
    let mut out = [0u8; 32];
    okm.fill(&mut out).map_err(|_| Error::Hkdf {
        purpose: purpose.label(),
    })?;
    Ok(Key32(out))
}

/// One direction of ESP: the SPI the receiver knows it by, and the RFC 4106 key material.
#[derive(Clone, PartialEq, Eq)]
pub struct EspSaKeys {
    /// Security parameter index: bits 31..28 are the epoch (mod 16), so the next epoch's SA
    /// can be installed beside the current one; never below 256 (RFC 4303 reserves 1..255).
    pub spi: u32,
    /// AES-256-GCM key.
    pub key: Key32,
    /// RFC 4106 salt (the implicit part of the nonce).
    pub salt: [u8; 4],
}

impl fmt::Debug for EspSaKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EspSaKeys")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl EspSaKeys {
    /// Derives the SA that `sender` uses towards the other node of `pair` at `epoch`.
    ///
    /// SPIs are derived, not negotiated: both ends compute the same value. The 28 random bits
    /// make a clash between two peers of one receiver unlikely but possible; the IPsec
    /// backends refuse a clashing inbound SPI with an error that names both peers.
    pub fn derive(secret: &SessionSecret, epoch: Epoch, pair: &Pair, sender: &str) -> Result<Self> {
        if sender != pair.low && sender != pair.high {
            return Err(Error::BadNodeName {
                name: sender.to_owned(),
                reason: "is not a member of the pair",
            });
        }
        let key = expand(
            secret,
            Purpose::EspKey,
            &info_bytes_dir(Purpose::EspKey, epoch, pair, Some(sender)),
        )?;
        let extra = expand(
            secret,
            Purpose::EspSpiSalt,
            &info_bytes_dir(Purpose::EspSpiSalt, epoch, pair, Some(sender)),
        )?;
        let e = extra.expose();
        let mut spi = u32::from_be_bytes([e[0], e[1], e[2], e[3]]) & 0x0fff_ffff;
        if spi < 0x100 {
            spi |= 0x100;
        }
        spi |= (epoch.0 & 0xf) << 28;
        Ok(Self {
            spi,
            key,
            salt: [e[4], e[5], e[6], e[7]],
        })
    }
}

/// The key material a pair uses at one epoch.
#[derive(Clone, Debug)]
pub struct PairKeys {
    /// The epoch these keys belong to.
    pub epoch: Epoch,
    /// WireGuard preshared key.
    pub wireguard_psk: Key32,
    /// Public identifier of these keys (8 hex digits), safe to show in status.
    pub key_id: String,
    /// ESP SA this node sends with.
    pub esp_out: EspSaKeys,
    /// ESP SA this node receives with.
    pub esp_in: EspSaKeys,
}

impl PairKeys {
    /// Derives every key of `pair` at `epoch`, as seen from `local` (one of the pair).
    pub fn derive(secret: &SessionSecret, epoch: Epoch, pair: &Pair, local: &str) -> Result<Self> {
        let remote = if local == pair.low {
            pair.high.as_str()
        } else {
            pair.low.as_str()
        };
        let wireguard_psk = derive(secret, Purpose::WireguardPsk, epoch, pair)?;
        let id = derive(secret, Purpose::KeyId, epoch, pair)?;
        let key_id = id.expose()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            epoch,
            wireguard_psk,
            key_id,
            esp_out: EspSaKeys::derive(secret, epoch, pair, local)?,
            esp_in: EspSaKeys::derive(secret, epoch, pair, remote)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret(b: u8) -> SessionSecret {
        SessionSecret::from_bytes([b; 32])
    }

    #[test]
    fn both_sides_derive_the_same_psk() {
        let s = secret(7);
        let ab = PairKeys::derive(
            &s,
            Epoch::FIRST,
            &Pair::new("node-a", "node-b").unwrap(),
            "node-a",
        )
        .unwrap();
        let ba = PairKeys::derive(
            &s,
            Epoch::FIRST,
            &Pair::new("node-b", "node-a").unwrap(),
            "node-b",
        )
        .unwrap();
        assert_eq!(ab.wireguard_psk, ba.wireguard_psk);
        assert_eq!(ab.key_id, ba.key_id);
        assert_eq!(ab.key_id.len(), 8);
        // One side's outbound SA is the other's inbound SA, and the two directions differ.
        assert_eq!(ab.esp_out, ba.esp_in);
        assert_eq!(ab.esp_in, ba.esp_out);
        assert_ne!(ab.esp_out.key, ab.esp_in.key);
        assert_ne!(ab.esp_out.spi, ab.esp_in.spi);
    }

    #[test]
    fn spis_carry_the_epoch_and_avoid_reserved_values() {
        let pair = Pair::new("node-a", "node-b").unwrap();
        for e in 0..40u32 {
            let k = EspSaKeys::derive(&secret(e as u8), Epoch(e), &pair, "node-a").unwrap();
            assert_eq!(k.spi >> 28, e & 0xf);
            assert!(k.spi & 0x0fff_ffff >= 0x100);
        }
        assert!(EspSaKeys::derive(&secret(1), Epoch(1), &pair, "node-z").is_err());
        let k = EspSaKeys::derive(&secret(1), Epoch(1), &pair, "node-a").unwrap();
        let shown = format!("{k:?}");
        assert!(shown.contains("redacted") && shown.contains("spi"));
    }

    #[test]
    fn pairs_epochs_purposes_and_sessions_differ() {
        let s = secret(7);
        let p1 = Pair::new("node-a", "node-b").unwrap();
        let p2 = Pair::new("node-a", "node-c").unwrap();
        let base = derive(&s, Purpose::WireguardPsk, Epoch(1), &p1).unwrap();
        assert_ne!(
            base,
            derive(&s, Purpose::WireguardPsk, Epoch(1), &p2).unwrap()
        );
        assert_ne!(
            base,
            derive(&s, Purpose::WireguardPsk, Epoch(2), &p1).unwrap()
        );
        assert_ne!(base, derive(&s, Purpose::KeyId, Epoch(1), &p1).unwrap());
        assert_ne!(
            base,
            derive(&secret(8), Purpose::WireguardPsk, Epoch(1), &p1).unwrap()
        );
    }

    #[test]
    fn names_are_length_prefixed_so_boundaries_cannot_shift() {
        // "ab"+"c" and "a"+"bc" must not produce the same info.
        let s = secret(1);
        let x = derive(
            &s,
            Purpose::WireguardPsk,
            Epoch(1),
            &Pair::new("ab", "c").unwrap(),
        )
        .unwrap();
        let y = derive(
            &s,
            Purpose::WireguardPsk,
            Epoch(1),
            &Pair::new("a", "bc").unwrap(),
        )
        .unwrap();
        assert_ne!(x, y);
    }

    #[test]
    fn known_answer() {
        // Pins the derivation: a change here breaks interop between agent versions.
        let k = derive(
            &secret(0),
            Purpose::WireguardPsk,
            Epoch(1),
            &Pair::new("n1", "n2").unwrap(),
        )
        .unwrap();
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"enc/v1").extract(&[0u8; 32]);
        let info = b"\x11enc wireguard-psk\x00\x00\x00\x01\x02n1\x02n2";
        let mut expect = [0u8; 32];
        prk.expand(&[&info[..]], Len32)
            .unwrap()
            .fill(&mut expect)
            .unwrap();
        assert_eq!(k.expose(), &expect);
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(Pair::new("", "b"), Err(Error::BadNodeName { .. })));
        assert!(matches!(
            Pair::new("a", &"x".repeat(256)),
            Err(Error::BadNodeName { .. })
        ));
        assert!(matches!(Pair::new("a", "a"), Err(Error::SamePeer(_))));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = PairKeys::derive(&secret(9), Epoch(3), &Pair::new("a", "b").unwrap(), "a").unwrap();
        let shown = format!("{k:?} {:?}", secret(9));
        assert!(shown.contains("redacted"));
        let hex: String = k
            .wireguard_psk
            .expose()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!shown.contains(&hex));
        assert!(!shown.contains("9, 9, 9"));
    }

    proptest! {
        #[test]
        fn order_of_names_never_matters(a in "[a-z]{1,12}", b in "[a-z]{1,12}", e in any::<u32>(), s in any::<[u8; 32]>()) {
            prop_assume!(a != b);
            let s = SessionSecret::from_bytes(s);
            let x = derive(&s, Purpose::WireguardPsk, Epoch(e), &Pair::new(&a, &b).unwrap()).unwrap();
            let y = derive(&s, Purpose::WireguardPsk, Epoch(e), &Pair::new(&b, &a).unwrap()).unwrap();
            prop_assert_eq!(x, y);
        }
    }
}
