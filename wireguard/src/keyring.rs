//! The device's static key pairs, and which of them an incoming handshake message is for.
//!
//! A node rolls its static key make-before-break: for a while it uses its new key towards the
//! peers that already switched and the old one towards the others, so the device holds several
//! keys. The newest is the primary (`public_key()`, the default for a peer). Each key has its own
//! rate limiter: MAC1 and cookie replies are keyed on the responder's static public key, so the
//! MAC1 of a handshake message tells which of our keys it was sent to. An initiation's sender is
//! then learned by boringtun's anonymous parsing with that key. No I/O here.

use std::net::IpAddr;
use std::sync::Arc;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use crate::generations::{StaticKeys, Target};
use crate::keys::{PresharedKey, PrivateKey, PublicKey};

/// Size of a cookie reply.
const COOKIE_REPLY_LEN: usize = 64;

/// One static key pair of the device.
pub(crate) struct DeviceKey {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    key: PublicKey,
    /// Checks MAC1/MAC2 of handshake messages sent to this key and makes its cookies; shared by
    /// the device and every `Tunn` built with this key.
    limiter: Arc<RateLimiter>,
}

impl DeviceKey {
    fn new(private: &PrivateKey, limit: u64) -> Self {
        let secret = private.to_static_secret();
        let public = x25519::PublicKey::from(&secret);
        Self {
            limiter: Arc::new(RateLimiter::new(&public, limit)),
            key: PublicKey(public.to_bytes()),
            secret,
            public,
        }
    }

    /// The public half.
    pub(crate) fn public_key(&self) -> PublicKey {
        self.key
    }

    /// A noise state with this key towards `remote`.
    pub(crate) fn tunn(
        &self,
        remote: &PublicKey,
        psk: Option<&PresharedKey>,
        keepalive: Option<u16>,
        index: u32,
    ) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(remote.0),
            psk.map(|k| *k.expose_secret()),
            keepalive.filter(|k| *k > 0),
            index,
            Some(Arc::clone(&self.limiter)),
        )
    }
}

/// Why [`KeyRing::verify`] refused a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// The device is under load and the handshake message had no valid MAC2: send the cookie
    /// reply written to the first `n` bytes of the buffer back to the sender.
    Cookie(usize),
    /// Malformed, a MAC1 for none of our keys, or an initiation that does not decrypt.
    Invalid,
}

/// The device's static keys, the primary (newest) first; never empty.
pub(crate) struct KeyRing {
    keys: Vec<DeviceKey>,
    /// Handshake messages per second per key before cookies are demanded.
    limit: u64,
}

impl KeyRing {
    /// A ring holding `first` as the primary.
    pub(crate) fn new(first: &PrivateKey, limit: u64) -> Self {
        Self {
            keys: vec![DeviceKey::new(first, limit)],
            limit,
        }
    }

    /// Adds `private` as the new primary; a key already held changes nothing (it does not become
    /// primary again). Returns its public key.
    pub(crate) fn add(&mut self, private: &PrivateKey) -> PublicKey {
        let key = private.public_key();
        if self.get(&key).is_none() {
            self.keys.insert(0, DeviceKey::new(private, self.limit));
        }
        key
    }

    /// Drops the keys not in `keep` except the primary (the caller checks that it is kept).
    pub(crate) fn retain(&mut self, keep: &[PublicKey]) {
        let primary = self.primary().key;
        self.keys
            .retain(|k| k.key == primary || keep.contains(&k.key));
    }

    /// The newest key: the device's public key and the default for peers.
    pub(crate) fn primary(&self) -> &DeviceKey {
        &self.keys[0]
    }

    /// The key with this public half.
    pub(crate) fn get(&self, key: &PublicKey) -> Option<&DeviceKey> {
        self.keys.iter().find(|k| k.key == *key)
    }

    /// Public halves, the primary first.
    pub(crate) fn public_keys(&self) -> Vec<PublicKey> {
        self.keys.iter().map(|k| k.key).collect()
    }

    /// Resets every key's handshake count (once a second).
    pub(crate) fn reset_counts(&self) {
        for k in &self.keys {
            k.limiter.reset_count();
        }
    }

    /// Checks a datagram from `src` and tells where it goes. Handshake messages must carry the
    /// MAC1 of one of our keys (tried primary first: a keyed hash each, no Diffie-Hellman) and
    /// pass that key's load check; an initiation is then opened with that key to learn the
    /// sender's static key. Data and cookie replies go by receiver index.
    pub(crate) fn verify(
        &self,
        src: IpAddr,
        datagram: &[u8],
        dst: &mut [u8],
    ) -> Result<Target, Rejected> {
        match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::PacketData(p)) => return Ok(Target::Index(p.receiver_idx >> 8)),
            Ok(Packet::PacketCookieReply(p)) => return Ok(Target::Index(p.receiver_idx >> 8)),
            Ok(Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)) => {}
            Err(_) => return Err(Rejected::Invalid),
        }
        let mut cookie = [0u8; COOKIE_REPLY_LEN];
        for k in &self.keys {
            match k.limiter.verify_packet(Some(src), datagram, &mut cookie) {
                Ok(Packet::HandshakeInit(p)) => {
                    return parse_handshake_anon(&k.secret, &k.public, &p)
                        .map(|half| {
                            Target::Initiation(StaticKeys {
                                local: k.key,
                                remote: PublicKey(half.peer_static_public),
                            })
                        })
                        .map_err(|_| Rejected::Invalid);
                }
                Ok(Packet::HandshakeResponse(p)) => return Ok(Target::Index(p.receiver_idx >> 8)),
                Ok(Packet::PacketData(p)) => return Ok(Target::Index(p.receiver_idx >> 8)),
                Ok(Packet::PacketCookieReply(p)) => return Ok(Target::Index(p.receiver_idx >> 8)),
                Err(TunnResult::Err(WireGuardError::InvalidMac)) => {}
                Err(TunnResult::WriteToNetwork(reply)) => {
                    let n = reply.len();
                    return match dst.get_mut(..n) {
                        Some(d) => {
                            d.copy_from_slice(reply);
                            Err(Rejected::Cookie(n))
                        }
                        None => Err(Rejected::Invalid),
                    };
                }
                Err(_) => return Err(Rejected::Invalid),
            }
        }
        Err(Rejected::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));

    fn private(b: u8) -> PrivateKey {
        PrivateKey::from_bytes([b; 32])
    }

    /// An initiation from `from` to `to` (seeds of private keys).
    fn initiation(from: u8, to: u8) -> Vec<u8> {
        let mut tunn =
            DeviceKey::new(&private(from), 10).tunn(&private(to).public_key(), None, None, 1);
        let mut buf = [0u8; 148];
        match tunn.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        }
    }

    #[test]
    fn add_is_idempotent_and_the_newest_is_primary() {
        let mut ring = KeyRing::new(&private(1), 10);
        let k2 = ring.add(&private(2));
        assert_eq!(k2, private(2).public_key());
        assert_eq!(ring.add(&private(1)), private(1).public_key());
        assert_eq!(ring.add(&private(2)), k2);
        assert_eq!(ring.public_keys(), vec![k2, private(1).public_key()]);
        assert_eq!(ring.primary().public_key(), k2);
        ring.add(&private(3));
        ring.retain(&[k2]);
        // The primary always stays.
        assert_eq!(
            ring.public_keys(),
            vec![private(3).public_key(), private(2).public_key()]
        );
    }

    #[test]
    fn initiations_are_matched_to_the_key_they_were_sent_to() {
        let mut ring = KeyRing::new(&private(1), 10);
        ring.add(&private(2));
        let mut dst = [0u8; 256];
        for to in [1, 2] {
            assert_eq!(
                ring.verify(SRC, &initiation(7, to), &mut dst),
                Ok(Target::Initiation(StaticKeys {
                    local: private(to).public_key(),
                    remote: private(7).public_key(),
                }))
            );
        }
        // Sent to a key we do not hold: MAC1 fails for every key.
        assert_eq!(
            ring.verify(SRC, &initiation(7, 3), &mut dst),
            Err(Rejected::Invalid)
        );
        // A flipped bit fails MAC1; a truncated message does not parse.
        let mut bad = initiation(7, 1);
        bad[40] ^= 1;
        assert_eq!(ring.verify(SRC, &bad, &mut dst), Err(Rejected::Invalid));
        let good = initiation(7, 1);
        assert_eq!(
            ring.verify(SRC, &good[..good.len() - 1], &mut dst),
            Err(Rejected::Invalid)
        );
    }

    #[test]
    fn under_load_each_key_answers_with_its_own_cookie() {
        let mut ring = KeyRing::new(&private(1), 0);
        ring.add(&private(2));
        let mut dst = [0u8; 256];
        for to in [1, 2] {
            // The initiator's Tunn accepts the cookie reply only if it was made with the key
            // it sent to (the cookie is encrypted under HASH(label, responder's public key)).
            let mut tunn =
                DeviceKey::new(&private(7), 10).tunn(&private(to).public_key(), None, None, 1);
            let mut init = [0u8; 148];
            let init = match tunn.format_handshake_initiation(&mut init, false) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!("no initiation"),
            };
            let Err(Rejected::Cookie(n)) = ring.verify(SRC, &init, &mut dst) else {
                panic!("no cookie under load");
            };
            let mut out = [0u8; 256];
            assert!(
                matches!(
                    tunn.decapsulate(None, &dst[..n], &mut out),
                    TunnResult::Done
                ),
                "cookie for key {to} rejected"
            );
        }
    }
}
