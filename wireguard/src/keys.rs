//! Curve25519 keys: private (secret), public, and preshared (secret).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

/// Length of every WireGuard key in bytes.
pub const KEY_LEN: usize = 32;

fn random_bytes() -> Result<[u8; KEY_LEN]> {
    let mut b = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Random)?;
    Ok(b)
}

fn decode_key(kind: &'static str, s: &str) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    let mut buf = Zeroizing::new([0u8; KEY_LEN + 3]);
    let n = STANDARD
        .decode_slice(s.trim().as_bytes(), &mut buf[..])
        .map_err(|_| Error::InvalidKey {
            kind,
            reason: "not standard base64 of 32 bytes",
        })?;
    if n != KEY_LEN {
        return Err(Error::InvalidKey {
            kind,
            reason: "not 32 bytes long",
        });
    }
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    out.copy_from_slice(&buf[..KEY_LEN]);
    Ok(out)
}

fn ct_eq(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    // Constant time: fold every byte difference, branch once.
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A Curve25519 private key. Never printed; wiped from memory on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// Generates a fresh key from the system CSPRNG, clamped as X25519 requires.
    pub fn generate() -> Result<Self> {
        let mut b = random_bytes()?;
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        let key = Self(b);
        b.zeroize();
        Ok(key)
    }

    /// Wraps raw key bytes (clamping happens in the X25519 operation).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw key, for handing to the kernel; never for logs.
    pub(crate) fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Decodes a key from standard base64 (the `wg genkey` format). Errors never echo the input.
    pub fn from_base64(s: &str) -> Result<Self> {
        decode_key("private", s).map(|b| Self(*b))
    }

    /// Encodes the SECRET key as standard base64, in a buffer that is wiped on drop.
    /// Only for writing key files; never log the result.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.to_static_secret()).to_bytes())
    }

    /// The key as the x25519 type boringtun consumes (it zeroizes itself on drop).
    pub(crate) fn to_static_secret(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A Curve25519 public key. Not secret: Display, Debug and serde use standard base64 (44 chars).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Standard base64, as `wg` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl From<[u8; KEY_LEN]> for PublicKey {
    fn from(b: [u8; KEY_LEN]) -> Self {
        Self(b)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        decode_key("public", s).map(|b| Self(*b))
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A 32-byte symmetric preshared key mixed into the handshake. Never printed; wiped on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    /// Wraps raw key bytes (e.g. the output of a KDF).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Generates a random key from the system CSPRNG.
    pub fn generate() -> Result<Self> {
        let mut b = random_bytes()?;
        let key = Self(b);
        b.zeroize();
        Ok(key)
    }

    /// Decodes a key from standard base64 (the `wg genpsk` format). Errors never echo the input.
    pub fn from_base64(s: &str) -> Result<Self> {
        decode_key("preshared", s).map(|b| Self(*b))
    }

    /// The secret bytes, for handing to a WireGuard implementation. Never log them.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl PartialEq for PresharedKey {
    fn eq(&self, other: &Self) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl Eq for PresharedKey {}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn rfc7748_public_key_derivation() {
        // RFC 7748 section 6.1, Alice and Bob.
        let alice = PrivateKey::from_bytes(hex32(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            alice.public_key().0,
            hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let bob = PrivateKey::from_bytes(hex32(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            bob.public_key().0,
            hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
    }

    #[test]
    fn generate_is_clamped_random_and_round_trips() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        assert_ne!(a.0, b.0);
        assert_eq!(a.0[0] & 7, 0);
        assert_eq!(a.0[31] & 0xc0, 0x40);
        let s = a.to_base64();
        assert_eq!(s.len(), 44);
        let back = PrivateKey::from_base64(&s).unwrap();
        assert_eq!(back.0, a.0);
        assert_eq!(back.public_key(), a.public_key());
    }

    #[test]
    fn public_key_base64_and_serde() {
        let pk = PrivateKey::generate().unwrap().public_key();
        let s = pk.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<PublicKey>().unwrap(), pk);
        assert_eq!(format!("{pk:?}"), format!("PublicKey({s})"));
        let json = serde_json::to_string(&pk).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), pk);
    }

    #[test]
    fn bad_base64_is_rejected_without_echo() {
        for bad in [
            "",
            "abc",
            "!!!!",
            &STANDARD.encode([1u8; 31]),
            &STANDARD.encode([1u8; 33]),
        ] {
            let e = bad.parse::<PublicKey>().unwrap_err();
            assert!(
                matches!(e, Error::InvalidKey { kind: "public", .. }),
                "{bad}: {e}"
            );
            let e = PrivateKey::from_base64(bad).unwrap_err();
            if !bad.is_empty() {
                assert!(!e.to_string().contains(bad));
            }
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let sk = PrivateKey::from_bytes([0xab; 32]);
        let psk = PresharedKey::from_bytes([0xcd; 32]);
        let b64_sk = STANDARD.encode([0xab; 32]);
        let b64_psk = STANDARD.encode([0xcd; 32]);
        for s in [
            format!("{sk:?}"),
            format!("{sk:#?}"),
            format!("{psk:?}"),
            format!("{:?}", Some(psk.clone())),
        ] {
            assert!(s.contains("<redacted>"), "{s}");
            assert!(
                !s.contains("ab") && !s.contains("AB") && !s.contains("171"),
                "{s}"
            );
            assert!(
                !s.contains("cd") && !s.contains("CD") && !s.contains("205"),
                "{s}"
            );
            assert!(!s.contains(&b64_sk) && !s.contains(&b64_psk), "{s}");
        }
        assert_eq!(format!("{sk:?}"), "PrivateKey(<redacted>)");
    }

    #[test]
    fn preshared_key_equality() {
        let a = PresharedKey::from_bytes([1; 32]);
        assert_eq!(a, a.clone());
        assert_ne!(a, PresharedKey::from_bytes([2; 32]));
        assert_ne!(
            PresharedKey::generate().unwrap(),
            PresharedKey::generate().unwrap()
        );
    }
}
