//! The issuer protocol: online enrolment and renewal with an agent in the issuer role.
//!
//! One request and one answer per TLS 1.3 connection, each a frame: a 4-byte big-endian
//! length, then that many bytes of JSON. A request longer than [`MAX_REQUEST`] or an answer
//! longer than [`MAX_RESPONSE`] is refused before it is read. The codec is sans-IO
//! ([`encode`], [`decode_request`], [`decode_response`]); [`read_frame`] / [`write_frame`] /
//! [`call`] run it over any blocking `Read + Write` stream.
//!
//! - [`IssuerRequest::Enrol`]: a node without a certificate sends a one-time join token and a
//!   certificate signing request; no client certificate.
//! - [`IssuerRequest::EnrolServiceAccount`]: a node without a certificate, in Kubernetes,
//!   sends a projected ServiceAccount token (bound to its pod and node) and a certificate
//!   signing request; the issuer verifies the token with the TokenReview API and issues a
//!   certificate only for the node the token names. No client certificate.
//! - [`IssuerRequest::Renew`]: a node presents its current certificate as the TLS client
//!   certificate and sends a request for a new key with the same names.
//!
//! Compatibility: the `op` tag is the protocol's version switch. A new kind of request is a
//! new `op` (`enrolServiceAccount` was added after `enrol` and `renew`); an issuer that does
//! not know it refuses the frame as malformed (`unknown variant`), and the existing
//! operations are unchanged on the wire.
//!
//! The answer is [`IssuerResponse::Issued`] (certificate and CA bundle) or
//! [`IssuerResponse::Refused`] with the reason.

use std::fmt;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Default TCP port of an issuer.
pub const DEFAULT_ISSUER_PORT: u16 = 7946;
/// Largest request frame body (a request is well under 2 KiB).
pub const MAX_REQUEST: usize = 16 * 1024;
/// Largest answer frame body (a certificate and a CA bundle of a few CAs).
pub const MAX_RESPONSE: usize = 256 * 1024;

/// A request to an issuer. `Debug` redacts the join token and the ServiceAccount token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum IssuerRequest {
    /// First enrolment with a join token.
    Enrol {
        /// The join token (`enc1.…`), single use.
        token: String,
        /// The certificate signing request, PEM.
        csr: String,
    },
    /// First enrolment attested by Kubernetes: a projected ServiceAccount token whose
    /// audience is the issuer's, bound to the agent's pod on its node.
    #[serde(rename_all = "camelCase")]
    EnrolServiceAccount {
        /// The ServiceAccount token (a JWT), as the kubelet wrote it. A secret.
        service_account_token: String,
        /// The certificate signing request, PEM.
        csr: String,
    },
    /// Renewal, authenticated by the TLS client certificate.
    Renew {
        /// The certificate signing request for the new key, PEM.
        csr: String,
    },
}

impl IssuerRequest {
    /// `enrol`, `enrolServiceAccount` or `renew`.
    pub fn op(&self) -> &'static str {
        match self {
            IssuerRequest::Enrol { .. } => "enrol",
            IssuerRequest::EnrolServiceAccount { .. } => "enrolServiceAccount",
            IssuerRequest::Renew { .. } => "renew",
        }
    }
}

impl fmt::Debug for IssuerRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IssuerRequest::Enrol { csr, .. } => f
                .debug_struct("Enrol")
                .field("token", &"<redacted>")
                .field("csr", csr)
                .finish(),
            IssuerRequest::EnrolServiceAccount { csr, .. } => f
                .debug_struct("EnrolServiceAccount")
                .field("service_account_token", &"<redacted>")
                .field("csr", csr)
                .finish(),
            IssuerRequest::Renew { csr } => f.debug_struct("Renew").field("csr", csr).finish(),
        }
    }
}

/// An issuer's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase", deny_unknown_fields)]
pub enum IssuerResponse {
    /// The certificate was issued.
    Issued(Issued),
    /// The request was refused; nothing was issued (and a join token was not used up).
    Refused {
        /// Why, naming what was wrong.
        reason: String,
    },
}

/// A certificate issued by an issuer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Issued {
    /// The node certificate, PEM.
    pub cert: String,
    /// The cluster CA bundle the issuer trusts, PEM.
    pub ca: String,
    /// The certificate's serial (lowercase hex).
    pub serial: String,
    /// End of its validity (RFC 3339).
    pub not_after: String,
}

/// A frame or message that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds the limit.
    #[error("issuer frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A zero-length frame.
    #[error("empty issuer frame")]
    Empty,
    /// The body is not a valid message.
    #[error("malformed issuer message: {0}")]
    Malformed(String),
    /// The stream failed or ended early.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Encodes a message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a length prefix against `max`.
pub fn frame_len(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    Ok(len)
}

fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = bytes.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = frame_len(*prefix, max)?;
    let Some(body) = bytes.get(4..4 + len) else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(Some((msg, 4 + len)))
}

/// Decodes a request frame from the start of `bytes`: the request and the bytes used, or
/// `None` if the frame is not complete yet.
pub fn decode_request(bytes: &[u8]) -> Result<Option<(IssuerRequest, usize)>, FrameError> {
    decode(bytes, MAX_REQUEST)
}

/// Decodes an answer frame, like [`decode_request`].
pub fn decode_response(bytes: &[u8]) -> Result<Option<(IssuerResponse, usize)>, FrameError> {
    decode(bytes, MAX_RESPONSE)
}

/// Reads one frame of at most `max` body bytes (prefix included in the result).
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Vec<u8>, FrameError> {
    let io = |context| move |source| FrameError::Io { context, source };
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)
        .map_err(io("reading the frame length"))?;
    let len = frame_len(prefix, max)?;
    let mut frame = vec![0u8; 4 + len];
    frame[..4].copy_from_slice(&prefix);
    r.read_exact(&mut frame[4..])
        .map_err(io("reading the frame body"))?;
    Ok(frame)
}

/// Writes one frame and flushes.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame)
        .and_then(|()| w.flush())
        .map_err(|source| FrameError::Io {
            context: "writing the frame",
            source,
        })
}

/// Sends `req` and reads the answer (client side).
pub fn call<S: Read + Write>(
    stream: &mut S,
    req: &IssuerRequest,
) -> Result<IssuerResponse, FrameError> {
    write_frame(stream, &encode(req))?;
    let frame = read_frame(stream, MAX_RESPONSE)?;
    match decode_response(&frame)? {
        Some((resp, _)) => Ok(resp),
        None => Err(FrameError::Malformed("truncated answer".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let req = IssuerRequest::Enrol {
            token: "enc1.secret".into(),
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        };
        assert!(!format!("{req:?}").contains("secret"));
        let f = encode(&req);
        assert_eq!(decode_request(&f).unwrap(), Some((req.clone(), f.len())));
        assert_eq!(decode_request(&f[..f.len() - 1]).unwrap(), None);
        assert_eq!(decode_request(&f[..3]).unwrap(), None);
        let json = String::from_utf8(f[4..].to_vec()).unwrap();
        assert!(json.starts_with(r#"{"op":"enrol""#), "{json}");

        let big = ((MAX_REQUEST + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode_request(&big),
            Err(FrameError::TooLong { .. })
        ));
        assert!(matches!(decode_request(&[0; 4]), Err(FrameError::Empty)));
        let mut bad = encode(&serde_json::json!({"op": "steal"}));
        assert!(matches!(
            decode_request(&bad),
            Err(FrameError::Malformed(_))
        ));
        bad = encode(&serde_json::json!({"op": "renew", "csr": "x", "extra": 1}));
        assert!(decode_request(&bad).is_err());

        // Kubernetes-attested enrolment: its own op, camelCase fields, token redacted.
        let req = IssuerRequest::EnrolServiceAccount {
            service_account_token: "eyJhbGciOiJSUzI1NiJ9.secret.sig".into(),
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        };
        assert_eq!(req.op(), "enrolServiceAccount");
        assert!(!format!("{req:?}").contains("secret"), "{req:?}");
        let f = encode(&req);
        assert_eq!(decode_request(&f).unwrap(), Some((req.clone(), f.len())));
        let json = String::from_utf8(f[4..].to_vec()).unwrap();
        assert!(
            json.starts_with(r#"{"op":"enrolServiceAccount","serviceAccountToken":"#),
            "{json}"
        );
        for bad in [
            serde_json::json!({"op": "enrolServiceAccount", "csr": "x"}),
            serde_json::json!({"op": "enrolServiceAccount", "service_account_token": "t", "csr": "x"}),
            serde_json::json!({"op": "enrolServiceAccount", "serviceAccountToken": "t", "csr": "x", "node": "n"}),
        ] {
            assert!(decode_request(&encode(&bad)).is_err(), "{bad}");
        }
        // The frames of the first protocol version still decode to the same requests.
        let old = encode(&serde_json::json!({"op": "renew", "csr": "x"}));
        assert_eq!(
            decode_request(&old).unwrap().unwrap().0,
            IssuerRequest::Renew { csr: "x".into() }
        );

        let resp = IssuerResponse::Refused {
            reason: "join token used".into(),
        };
        let f = encode(&resp);
        assert_eq!(decode_response(&f).unwrap(), Some((resp, f.len())));
        let mut cursor = std::io::Cursor::new(f.clone());
        assert_eq!(read_frame(&mut cursor, MAX_RESPONSE).unwrap(), f);
        let mut cursor = std::io::Cursor::new(f);
        assert!(matches!(
            read_frame(&mut cursor, 3),
            Err(FrameError::TooLong { .. })
        ));
    }

    /// The fuzz target's invariant over its seed corpus (the fuzzer itself is not run by
    /// `cargo test`): each request seed decodes, and what it decodes to re-encodes to a frame
    /// that decodes to the same request.
    #[test]
    fn fuzz_seeds_decode_and_round_trip() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/issuer_frame");
        let mut ops = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            if let Ok(Some((req, used))) = decode_request(&bytes) {
                assert_eq!(used, bytes.len());
                let again = encode(&req);
                assert_eq!(
                    decode_request(&again).unwrap(),
                    Some((req.clone(), again.len()))
                );
                ops.push(req.op());
            } else {
                let (resp, _) = decode_response(&bytes).unwrap().unwrap();
                assert_eq!(decode_response(&encode(&resp)).unwrap().unwrap().0, resp);
            }
        }
        ops.sort_unstable();
        assert_eq!(ops, ["enrol", "enrolServiceAccount", "renew"]);
    }
}
