//! Wire format of the control channel, sans-IO.
//!
//! Inside the mutually authenticated TLS 1.3 stream, each message is a frame: a 4-byte
//! big-endian length followed by that many bytes of JSON. Frames longer than [`MAX_FRAME`]
//! are refused before any allocation, so a peer cannot make the agent buffer unbounded data.
//! The decoder takes bytes and returns messages; it never reads a socket.

pub use enc_key_manager::rotation::RotationMsg;
use serde::{Deserialize, Serialize};

/// Version of the control protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest accepted frame body, in bytes.
/// 256 KiB: room for a revocation list of a few thousand entries (about 60 bytes each in PEM).
pub const MAX_FRAME: usize = 256 * 1024;

/// A malformed control message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("control frame of {len} bytes exceeds the limit of {MAX_FRAME}")]
    TooLong {
        /// The announced length.
        len: usize,
    },
    /// A zero-length frame.
    #[error("empty control frame")]
    Empty,
    /// The body is not a valid message.
    #[error("malformed control message: {0}")]
    Malformed(String),
}

/// A control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Message {
    /// First message of each side: who it is and its datapath parameters.
    Hello(Hello),
    /// Liveness probe.
    Ping(Seq),
    /// Answer to a [`Message::Ping`].
    Pong(Seq),
    /// The sender is closing the session.
    Goodbye(Goodbye),
    /// A step of the two-phase key rotation.
    Rotate(Rotate),
    /// The newest certificate revocation list the sender holds, signed by the cluster CA.
    /// The receiver checks the signature itself: the channel carries it, it does not vouch
    /// for it.
    Revocations(Revocations),
}

/// A certificate revocation list (X.509 CRL, PEM) and its CRL number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revocations {
    /// CRL number (the receiver keeps the highest it has verified).
    pub number: u64,
    /// The CRL, PEM.
    pub pem: String,
}

/// A rotation step, with the WireGuard static public key the sender binds to its epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rotate {
    /// The protocol step.
    pub step: RotationMsg,
    /// With WireGuard, on `prepare` and `ack`: the static public key (base64) the sender uses
    /// with the receiver from the prepared epoch on. A node that rolled its static key
    /// announces the new one here; the receiver adopts it when it switches to that epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_key: Option<String>,
}

/// Announces a node and its WireGuard public parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hello {
    /// Control protocol version of the sender.
    pub protocol: u32,
    /// The sender's node name (must equal its certificate's DNS SAN).
    pub node: String,
    /// The sender's encryption type (`wireguard` or `ipsec`); both ends must agree.
    pub encryption: String,
    /// The epoch the sender last sent with towards the receiver, from an earlier session
    /// (0: none). The new session's first epoch is one above both ends' values, so its keys
    /// never share an epoch slot with keys still installed from before.
    #[serde(default)]
    pub epoch: u32,
    /// The sender's WireGuard public key (base64) and UDP port, with WireGuard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardAnnounce>,
}

/// WireGuard parameters a node announces; public values only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireguardAnnounce {
    /// Public key, base64.
    pub public_key: String,
    /// UDP listen port on the sender's underlay address.
    pub listen_port: u16,
}

/// Sequence number of a ping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seq {
    /// Sequence number.
    pub seq: u64,
}

/// Why the sender closes the session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Goodbye {
    /// Human-readable reason.
    pub reason: String,
}

/// Encodes one message as a frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a length prefix.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(ProtoError::Empty);
    }
    if len > MAX_FRAME {
        return Err(ProtoError::TooLong { len });
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode_body(body: &[u8]) -> Result<Message, ProtoError> {
    serde_json::from_slice(body).map_err(|e| ProtoError::Malformed(e.to_string()))
}

/// Decodes the first frame in `buf`: `Ok(None)` if more bytes are needed, else the message
/// and the number of bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, ProtoError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = frame_len([prefix[0], prefix[1], prefix[2], prefix[3]])?;
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            node: "node-1".into(),
            encryption: "wireguard".into(),
            epoch: 0,
            wireguard: Some(WireguardAnnounce {
                public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
                listen_port: 51820,
            }),
        })
    }

    #[test]
    fn round_trip_and_partial_input() {
        let frame = encode(&hello());
        for cut in 0..frame.len() {
            assert_eq!(decode(&frame[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (msg, used) = decode(&frame).unwrap().unwrap();
        assert_eq!((msg, used), (hello(), frame.len()));
    }

    #[test]
    fn rotation_wire_format() {
        let body = br#"{"type":"rotate","step":{"kind":"commit","epoch":4}}"#;
        assert_eq!(
            decode_body(body).unwrap(),
            Message::Rotate(Rotate {
                step: RotationMsg::Commit {
                    epoch: enc_key_manager::Epoch(4)
                },
                wireguard_key: None
            })
        );
        for bad in [
            &br#"{"type":"rotate","step":{"kind":"commit"}}"#[..],
            br#"{"type":"rotate","step":{"kind":"explode","epoch":1}}"#,
            br#"{"type":"rotate","step":{"kind":"ack","epoch":-1}}"#,
            br#"{"type":"rotate","step":{"kind":"ack","epoch":1},"key":"x"}"#,
        ] {
            assert!(
                decode_body(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn limits_and_garbage_are_refused() {
        assert_eq!(decode(&[0, 0, 0, 0]), Err(ProtoError::Empty));
        assert_eq!(
            decode(&[0, 4, 0, 1]),
            Err(ProtoError::TooLong { len: 262_145 })
        );
        // Exactly the limit is not refused for its length.
        assert_ne!(
            decode(&[0, 4, 0, 0]),
            Err(ProtoError::TooLong { len: 262_144 })
        );
        assert!(matches!(
            decode(b"\0\0\0\x02{}"),
            Err(ProtoError::Malformed(_))
        ));
        let extra = br#"{"type":"ping","seq":1,"key":"x"}"#;
        let mut f = (extra.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(extra);
        assert!(matches!(decode(&f), Err(ProtoError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn rotation_steps_round_trip(e in any::<u32>(), k in 0u8..5) {
            use enc_key_manager::Epoch;
            let epoch = Epoch(e);
            let r = match k {
                0 => RotationMsg::Request { epoch },
                1 => RotationMsg::Prepare { epoch },
                2 => RotationMsg::Ack { epoch },
                3 => RotationMsg::Commit { epoch },
                _ => RotationMsg::Committed { epoch },
            };
            let m = Message::Rotate(Rotate { step: r, wireguard_key: (k == 1).then(|| "x".repeat(44)) });
            let f = encode(&m);
            prop_assert_eq!(decode(&f).unwrap(), Some((m, f.len())));
        }

        #[test]
        fn pings_round_trip(seq in any::<u64>()) {
            let m = Message::Ping(Seq { seq });
            let f = encode(&m);
            prop_assert_eq!(decode(&f).unwrap(), Some((m, f.len())));
        }
    }
}
