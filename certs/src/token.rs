//! One-time join tokens: the CA operator creates one per node enrolment ([`create_token`]);
//! signing that node's certificate signing request redeems it ([`redeem_token`], used by
//! [`sign_csr`](crate::sign_csr)). Tokens are single use and expire.
//!
//! They live in `<ca_dir>/tokens.jsonl` (mode 0600), append-only, one JSON object a line:
//!
//! - a token: `{"id":"1a2b3c4d","sha256":"…","node":"node-1","ips":["10.0.0.1"],
//!   "createdAt":"…","expiresAt":"…"}`, where `sha256` is the SHA-256 of the secret text
//!   (lowercase hex) and `id` its first 8 hex digits; the secret itself is never stored;
//! - its use: `{"used":"1a2b3c4d","at":"…","serial":"…"}` (`serial`: the certificate it was
//!   redeemed for, absent when redeemed without signing).
//!
//! Creation and redemption hold an exclusive lock on `<ca_dir>/.tokens.lock`, so a token can
//! be redeemed once even by concurrent signers, threads or processes.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ca::{self, CertificateAuthority};
use crate::info;
use crate::ledger::append_line;
use crate::revoke::lock;
use crate::{Error, Result};

/// File name of the join token file inside a CA directory.
pub const TOKENS_FILE: &str = "tokens.jsonl";
/// Lock file serialising token creation and redemption on one CA directory.
const LOCK_FILE: &str = ".tokens.lock";
/// Prefix of every join token secret (the format version).
pub const TOKEN_PREFIX: &str = "enc1.";
/// Random bytes in a token secret (base64url-encoded after [`TOKEN_PREFIX`]).
const SECRET_BYTES: usize = 32;
/// Characters of the SHA-256 hex digest used as a token's public id.
const ID_LEN: usize = 8;
/// Shortest join token lifetime accepted.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Longest join token lifetime accepted (30 days).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

/// A request for a join token: which node may enrol, with which addresses, for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The node name the certificate will carry (validated like [`NodeCertRequest::node`](crate::NodeCertRequest)).
    pub node: String,
    /// The addresses the node may request as IP SANs (at least one).
    pub ips: Vec<IpAddr>,
    /// How long the token can be redeemed ([`MIN_TOKEN_TTL`] to [`MAX_TOKEN_TTL`]).
    pub ttl: Duration,
}

/// The public part of a join token: everything but the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// Short public id: the first 8 hex digits of the secret's SHA-256.
    pub id: String,
    /// The node the token lets enrol.
    pub node: String,
    /// The addresses that node may request.
    pub ips: Vec<IpAddr>,
    /// When the token was created.
    #[serde(serialize_with = "info::ser_rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it stops being redeemable.
    #[serde(serialize_with = "info::ser_rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl TokenInfo {
    /// What a certificate signing request redeeming this token may name, e.g.
    /// `DNS:node-1, IP:10.0.0.1`.
    pub fn allowed_sans(&self) -> String {
        std::iter::once(format!("DNS:{}", self.node))
            .chain(self.ips.iter().map(|ip| format!("IP:{ip}")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A newly created join token: the secret, shown once to the operator and stored nowhere,
/// and its public details. `Debug` redacts the secret.
#[derive(Clone)]
pub struct NewToken {
    /// The secret: [`TOKEN_PREFIX`] then 32 random bytes, base64url without padding.
    pub secret: String,
    /// The token's public details, as [`list_tokens`] shows them.
    pub info: TokenInfo,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken")
            .field("secret", &"<redacted>")
            .field("info", &self.info)
            .finish()
    }
}

/// Whether a token can still be redeemed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(
    tag = "state",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
pub enum TokenState {
    /// Not used and not expired.
    Unused,
    /// Redeemed (whether or not it has expired since).
    Used {
        /// When it was redeemed.
        #[serde(serialize_with = "info::ser_rfc3339")]
        used_at: OffsetDateTime,
        /// The serial of the certificate it was redeemed for, if redeemed by a signing.
        #[serde(skip_serializing_if = "Option::is_none")]
        serial: Option<String>,
    },
    /// Not used, and past its expiry.
    Expired,
}

/// A join token as [`list_tokens`] reports it: its details and state, never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenStatus {
    /// The token's details.
    #[serde(flatten)]
    pub info: TokenInfo,
    /// Unused, used or expired.
    #[serde(flatten)]
    pub state: TokenState,
}

/// Path of the join token file of the CA in `ca_dir`.
pub fn tokens_path(ca_dir: &Path) -> PathBuf {
    ca_dir.join(TOKENS_FILE)
}

/// Creates a join token for `req.node` and records its hash in `<ca_dir>/tokens.jsonl`
/// (created mode 0600), valid from `now` for `req.ttl`.
///
/// The CA in `ca_dir` must load (so that tokens are only made where they can be redeemed).
/// Errors: a bad node name, no address, a ttl outside [`MIN_TOKEN_TTL`]..=[`MAX_TOKEN_TTL`]
/// ([`Error::InvalidField`]), an unusable CA, a bad token file line, I/O.
pub fn create_token(ca_dir: &Path, req: &TokenRequest, now: OffsetDateTime) -> Result<NewToken> {
    ca::validate_node_and_ips(&req.node, &req.ips)?;
    if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&req.ttl) {
        return Err(Error::invalid(
            "ttl",
            format!("{}s", req.ttl.as_secs()),
            "must be between 1 minute and 30 days",
        ));
    }
    CertificateAuthority::load(ca_dir)?;
    let now = ca::trunc_secs(now);
    let ttl = time::Duration::try_from(req.ttl)
        .map_err(|e| Error::invalid("ttl", format!("{}s", req.ttl.as_secs()), e.to_string()))?;
    let mut ips = Vec::new();
    for ip in &req.ips {
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }

    let _lock = lock(ca_dir, LOCK_FILE)?;
    let path = tokens_path(ca_dir);
    let existing = read_tokens(&path)?;
    // A fresh id is all but certain; retry on the rare prefix collision so ids stay unique.
    let (secret, sha256) = loop {
        let secret = new_secret()?;
        let sha256 = secret_sha256(&secret);
        if !existing
            .iter()
            .any(|t| t.sha256[..ID_LEN] == sha256[..ID_LEN])
        {
            break (secret, sha256);
        }
    };
    let info = TokenInfo {
        id: sha256[..ID_LEN].to_owned(),
        node: req.node.clone(),
        ips,
        created_at: now,
        expires_at: now + ttl,
    };
    let record = TokenRecord {
        id: info.id.clone(),
        sha256,
        node: info.node.clone(),
        ips: info.ips.clone(),
        created_at: info::rfc3339(info.created_at),
        expires_at: info::rfc3339(info.expires_at),
    };
    append_line(&path, &encode(&record, &path)?, 0o600)?;
    tracing::info!(id = %info.id, node = %info.node, expires_at = %record.expires_at, "created join token");
    Ok(NewToken { secret, info })
}

/// Redeems a join token of the CA in `ca_dir` at `now`: marks it used and returns its details.
///
/// Errors, each with its own variant: a secret not in the `enc1.` format
/// ([`Error::TokenMalformed`]), one the CA never created ([`Error::TokenUnknown`]), one used
/// before ([`Error::TokenUsed`], saying when and for which node), one past its expiry
/// ([`Error::TokenExpired`], saying when). No message contains the secret.
pub fn redeem_token(ca_dir: &Path, secret: &str, now: OffsetDateTime) -> Result<TokenInfo> {
    redeem_with(ca_dir, secret, now, |_| Ok(((), None))).map(|(info, ())| info)
}

/// Lists the join tokens of the CA in `ca_dir`, oldest first, with their state at `now`.
/// A missing token file lists as empty; a directory without `ca.crt` is an error naming it.
pub fn list_tokens(ca_dir: &Path, now: OffsetDateTime) -> Result<Vec<TokenStatus>> {
    let ca_cert = ca_dir.join(ca::CA_CERT_FILE);
    ca_cert
        .symlink_metadata()
        .map_err(|e| Error::io("read", &ca_cert, e))?;
    let path = tokens_path(ca_dir);
    let tokens = match path.symlink_metadata() {
        Ok(_) => {
            let _lock = lock(ca_dir, LOCK_FILE)?;
            read_tokens(&path)?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io("stat", path, e)),
    };
    Ok(tokens
        .into_iter()
        .map(|t| {
            let state = match t.used {
                Some((used_at, serial)) => TokenState::Used { used_at, serial },
                None if now >= t.info.expires_at => TokenState::Expired,
                None => TokenState::Unused,
            };
            TokenStatus {
                info: t.info,
                state,
            }
        })
        .collect())
}

/// Redeems a token like [`redeem_token`], running `check` on its details under the lock
/// first: if `check` fails, the token stays unused and its error is returned. `check` returns
/// a value and the serial of the certificate the token is being used for.
pub(crate) fn redeem_with<T>(
    ca_dir: &Path,
    secret: &str,
    now: OffsetDateTime,
    check: impl FnOnce(&TokenInfo) -> Result<(T, Option<String>)>,
) -> Result<(TokenInfo, T)> {
    let sha256 = parse_secret(secret)?;
    let now = ca::trunc_secs(now);
    let _lock = lock(ca_dir, LOCK_FILE)?;
    let path = tokens_path(ca_dir);
    let tokens = read_tokens(&path)?;
    let token = tokens
        .into_iter()
        .find(|t| t.sha256 == sha256)
        .ok_or_else(|| Error::TokenUnknown {
            id: sha256[..ID_LEN].to_owned(),
            ca_dir: ca_dir.to_owned(),
        })?;
    if let Some((used_at, serial)) = token.used {
        return Err(Error::TokenUsed {
            id: token.info.id,
            node: token.info.node,
            used_at: info::rfc3339(used_at),
            serial,
        });
    }
    if now >= token.info.expires_at {
        return Err(Error::TokenExpired {
            id: token.info.id,
            node: token.info.node,
            expired_at: info::rfc3339(token.info.expires_at),
        });
    }
    let (value, serial) = check(&token.info)?;
    let record = UsedRecord {
        used: token.info.id.clone(),
        at: info::rfc3339(now),
        serial,
    };
    append_line(&path, &encode(&record, &path)?, 0o600)?;
    tracing::info!(id = %token.info.id, node = %token.info.node, "redeemed join token");
    Ok((token.info, value))
}

/// A token line of the file.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRecord {
    id: String,
    sha256: String,
    node: String,
    ips: Vec<IpAddr>,
    created_at: String,
    expires_at: String,
}

/// A use line of the file.
#[derive(Serialize, Deserialize)]
struct UsedRecord {
    used: String,
    at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
}

/// A token as read from the file, with its use if any.
struct StoredToken {
    info: TokenInfo,
    sha256: String,
    used: Option<(OffsetDateTime, Option<String>)>,
}

fn encode<T: Serialize>(record: &T, path: &Path) -> Result<String> {
    serde_json::to_string(record)
        .map_err(|e| Error::io("encode entry for", path, std::io::Error::other(e)))
}

/// Reads the token file (missing: empty). Blank lines are skipped; anything else that is not
/// a valid token or use line is an [`Error::TokenFile`] naming the line.
fn read_tokens(path: &Path) -> Result<Vec<StoredToken>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let mut tokens: Vec<StoredToken> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| Error::TokenFile {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if value.get("used").is_some() {
            let used: UsedRecord = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            let at = parse_time("at", &used.at).map_err(bad)?;
            let token = tokens
                .iter_mut()
                .find(|t| t.info.id == used.used)
                .ok_or_else(|| {
                    bad(format!(
                        "use of token {:?}, which no earlier line creates",
                        used.used
                    ))
                })?;
            // Under the lock a token is used once; should a second use line appear anyway,
            // the first one stands.
            token.used.get_or_insert((at, used.serial));
        } else {
            let record: TokenRecord =
                serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            let token = check_record(record).map_err(bad)?;
            if tokens.iter().any(|t| t.info.id == token.info.id) {
                return Err(bad(format!("token id {:?} appears twice", token.info.id)));
            }
            tokens.push(token);
        }
    }
    Ok(tokens)
}

fn check_record(r: TokenRecord) -> std::result::Result<StoredToken, String> {
    if r.sha256.len() != 64
        || !r
            .sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err("sha256 is not 64 lowercase hex digits".to_owned());
    }
    if r.id != r.sha256[..ID_LEN] {
        return Err(format!(
            "id {:?} is not the first {ID_LEN} digits of sha256",
            r.id
        ));
    }
    ca::validate_node_and_ips(&r.node, &r.ips).map_err(|e| e.to_string())?;
    let created_at = parse_time("createdAt", &r.created_at)?;
    let expires_at = parse_time("expiresAt", &r.expires_at)?;
    Ok(StoredToken {
        info: TokenInfo {
            id: r.id,
            node: r.node,
            ips: r.ips,
            created_at,
            expires_at,
        },
        sha256: r.sha256,
        used: None,
    })
}

fn parse_time(field: &str, value: &str) -> std::result::Result<OffsetDateTime, String> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map_err(|e| format!("{field} {value:?} is not an RFC 3339 time: {e}"))
}

fn new_secret() -> Result<String> {
    let mut bytes = [0u8; SECRET_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|ring::error::Unspecified| Error::Random {
            context: "generating a join token",
        })?;
    Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// SHA-256 of the secret text, lowercase hex.
fn secret_sha256(secret: &str) -> String {
    info::hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// Checks the format of a presented secret (surrounding whitespace ignored, as when read from
/// a file) and returns its SHA-256.
fn parse_secret(secret: &str) -> Result<String> {
    let secret = secret.trim();
    let body = secret
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(Error::TokenMalformed {
            reason: "it does not start with \"enc1.\" (pass the token encctl token create printed, or @FILE holding it)",
        })?;
    match URL_SAFE_NO_PAD.decode(body) {
        Ok(bytes) if bytes.len() == SECRET_BYTES => Ok(secret_sha256(secret)),
        _ => Err(Error::TokenMalformed {
            reason: "expected \"enc1.\" followed by 43 base64url characters",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_the_documented_format_and_parse_back() {
        let s = new_secret().unwrap();
        assert!(s.starts_with(TOKEN_PREFIX));
        assert_eq!(s.len(), TOKEN_PREFIX.len() + 43);
        assert_eq!(parse_secret(&format!(" {s}\n")).unwrap(), secret_sha256(&s));
        for bad in ["", "enc1.", "enc2.abc", &s[..s.len() - 1], &format!("{s}A")] {
            let e = parse_secret(bad).unwrap_err();
            assert!(matches!(e, Error::TokenMalformed { .. }), "{bad:?}: {e}");
            if bad.len() > 10 {
                assert!(
                    !e.to_string().contains(bad),
                    "error repeats the secret: {e}"
                );
            }
        }
    }
}
