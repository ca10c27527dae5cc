//! The crate's error type.

use std::path::PathBuf;

use crate::AuthFailure;

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading, writing or creating a file or directory failed.
    #[error("{op} {path}: {source}", path = path.display())]
    Io {
        /// What was being done ("read", "create", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A file that must not be overwritten already exists.
    #[error("refusing to overwrite existing file {path}", path = path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },

    /// A request or option field has an invalid value.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidField {
        /// The field name (`node`, `ips`, `days`, ...).
        field: &'static str,
        /// The offending value, as text.
        value: String,
        /// Why it was rejected.
        reason: String,
    },

    /// PEM input could not be decoded.
    #[error("{origin}: invalid PEM: {source}")]
    Pem {
        /// Where the PEM came from (a path or a description).
        origin: String,
        /// The decoding error.
        source: rustls_pki_types::pem::Error,
    },

    /// The input holds no certificate.
    #[error("{origin}: no certificate found")]
    NoCertificate {
        /// Where the input came from.
        origin: String,
    },

    /// The input holds no private key.
    #[error("{origin}: no private key found")]
    NoPrivateKey {
        /// Where the input came from.
        origin: String,
    },

    /// A certificate could not be parsed as X.509.
    #[error("{origin}: cannot parse certificate: {source}")]
    Parse {
        /// Where the certificate came from.
        origin: String,
        /// The parser error.
        source: x509_parser::error::X509Error,
    },

    /// Generating, signing or loading a certificate or key with rcgen failed.
    #[error("{context}: {source}")]
    Rcgen {
        /// What was being done.
        context: String,
        /// The rcgen error.
        source: rcgen::Error,
    },

    /// The system random number generator failed.
    #[error("random number generator failed while {context}")]
    Random {
        /// What the random bytes were for.
        context: &'static str,
    },

    /// A CA certificate is not usable as a CA (not a CA, or its key does not match).
    #[error("{origin}: unusable CA: {reason}")]
    BadCa {
        /// The CA certificate or key file.
        origin: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A certificate does not verify against the CA bundle or is outside its validity.
    #[error("{origin}: certificate rejected (CA bundle {ca}): {reason}")]
    Untrusted {
        /// The certificate file.
        origin: String,
        /// The CA bundle it was checked against.
        ca: String,
        /// Why it was rejected.
        reason: AuthFailure,
    },

    /// The private key does not belong to the certificate.
    #[error("{key}: private key does not match certificate {cert}: {source}")]
    KeyMismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// The rustls error describing the mismatch.
        source: rustls::Error,
    },

    /// A node name cannot be used as a TLS server name.
    #[error("invalid server name {name:?}: {source}")]
    ServerName {
        /// The name.
        name: String,
        /// The rustls error.
        source: rustls_pki_types::InvalidDnsNameError,
    },

    /// Building a rustls configuration or verifier failed.
    #[error("{context}: {source}")]
    Tls {
        /// What was being built.
        context: &'static str,
        /// The rustls error.
        source: rustls::Error,
    },

    /// Building a rustls certificate verifier failed.
    #[error("{context}: {source}")]
    Verifier {
        /// What was being built.
        context: &'static str,
        /// The builder error.
        source: rustls::server::VerifierBuilderError,
    },

    /// A line of the issuance ledger (`issued.jsonl`) cannot be read.
    #[error("{path}:{line}: bad issuance ledger entry: {reason}", path = path.display())]
    Ledger {
        /// The ledger file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// A node name to revoke has no certificate in the issuance ledger.
    #[error(
        "no certificate issued to node {node:?} is recorded in {ledger} (revoke it by --serial instead)",
        ledger = ledger.display()
    )]
    UnknownNode {
        /// The node name.
        node: String,
        /// The issuance ledger that was searched.
        ledger: PathBuf,
    },

    /// The input holds no certificate revocation list (PEM label `X509 CRL`).
    #[error("{origin}: no certificate revocation list (X509 CRL) found")]
    NoCrl {
        /// Where the input came from.
        origin: String,
    },

    /// A certificate revocation list could not be parsed as X.509.
    #[error("{origin}: cannot parse certificate revocation list: {source}")]
    CrlParse {
        /// Where the CRL came from.
        origin: String,
        /// The parser error.
        source: x509_parser::error::X509Error,
    },

    /// A certificate revocation list parses but is not usable (version, CRL number, ...).
    #[error("{origin}: unusable certificate revocation list: {reason}")]
    BadCrl {
        /// Where the CRL came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },

    /// No CA certificate has the issuer name of a certificate revocation list.
    #[error("{origin}: CRL issuer {issuer} matches none of the {cas} CA certificate(s)")]
    CrlIssuerUnknown {
        /// Where the CRL came from.
        origin: String,
        /// The CRL's issuer name.
        issuer: String,
        /// How many CA certificates were tried.
        cas: usize,
    },

    /// The signature of a certificate revocation list does not verify against its CA.
    #[error("{origin}: CRL signature does not verify against CA {issuer}: {reason}")]
    CrlSignature {
        /// Where the CRL came from.
        origin: String,
        /// The CRL's issuer name.
        issuer: String,
        /// Why verification failed.
        reason: String,
    },

    /// A join token given to redeem or sign is not in the `enc1.` format; the message never
    /// repeats the secret.
    #[error("malformed join token: {reason}")]
    TokenMalformed {
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A join token is not recorded in the CA's token file (not created by this CA).
    #[error(
        "unknown join token {id}: the CA in {ca_dir} never created it (see encctl token list)",
        ca_dir = ca_dir.display()
    )]
    TokenUnknown {
        /// The public id derived from the token presented.
        id: String,
        /// The CA directory whose token file was searched.
        ca_dir: PathBuf,
    },

    /// A join token was redeemed before; tokens are single use.
    #[error(
        "join token {id} for node {node} was already used at {used_at}{serial}; create a new one with encctl token create",
        serial = serial.as_deref().map(|s| format!(" (certificate serial {s})")).unwrap_or_default()
    )]
    TokenUsed {
        /// The token's public id.
        id: String,
        /// The node the token was created for.
        node: String,
        /// When it was used (RFC 3339, UTC).
        used_at: String,
        /// The serial of the certificate it was used for, if it was used by a signing.
        serial: Option<String>,
    },

    /// A join token is past its expiry.
    #[error(
        "join token {id} for node {node} expired at {expired_at}; create a new one with encctl token create"
    )]
    TokenExpired {
        /// The token's public id.
        id: String,
        /// The node the token was created for.
        node: String,
        /// When it expired (RFC 3339, UTC).
        expired_at: String,
    },

    /// A line of the join token file (`tokens.jsonl`) cannot be read.
    #[error("{path}:{line}: bad join token entry: {reason}", path = path.display())]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// A certificate signing request cannot be decoded or parsed, or asks for a key type
    /// node certificates do not use.
    #[error("{origin}: unusable certificate signing request: {reason}")]
    BadCsr {
        /// Where the request came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The self-signature of a certificate signing request does not verify: the request was
    /// altered, or its signer does not hold the key it names.
    #[error("{origin}: certificate signing request signature does not verify: {reason}")]
    CsrSignature {
        /// Where the request came from.
        origin: String,
        /// The verification error.
        reason: String,
    },

    /// A certificate signing request asks for names or a key the join token does not allow.
    #[error("certificate signing request refused: {problem}; join token {token} allows {allowed}")]
    CsrRefused {
        /// What the request asks for that is not allowed (names the SAN or key).
        problem: String,
        /// The join token's public id.
        token: String,
        /// What the token allows, e.g. `DNS:node-1, IP:10.0.0.1`.
        allowed: String,
    },

    /// A certificate signing request asks for names the attested node may not have: its DNS
    /// SAN is not the node a Kubernetes ServiceAccount token was bound to, or an IP SAN is
    /// not one of that Node's addresses.
    #[error(
        "certificate signing request refused: {problem}; the ServiceAccount token attests node {node}, which may be issued {allowed}"
    )]
    AttestedCsrRefused {
        /// What the request asks for that is not allowed, e.g. `it requests DNS SAN DNS:node-2`.
        problem: String,
        /// The node the token was issued for.
        node: String,
        /// What may be issued, e.g. `DNS:node-1, IP:10.0.0.1`.
        allowed: String,
    },

    /// A renewal request was refused: the presented certificate is not this CA's, or the
    /// request does not name exactly what it names, or reuses its key.
    #[error("renewal refused: {problem}; the current certificate {serial} carries {current}")]
    RenewRefused {
        /// What is wrong, e.g. `it requests IP SAN IP:10.0.0.9`.
        problem: String,
        /// Serial of the certificate presented for renewal.
        serial: String,
        /// What that certificate names, e.g. `DNS:node-1, IP:10.0.0.1`.
        current: String,
    },

    /// Connecting to an issuer, or the TLS handshake with it, failed.
    #[error("issuer {issuer}: {what}: {reason}")]
    IssuerConnect {
        /// The issuer address as given (`HOST:PORT`).
        issuer: String,
        /// What was being done (`resolving`, `connecting`, `TLS handshake`).
        what: &'static str,
        /// What went wrong (the I/O error, or why the issuer is not trusted).
        reason: String,
    },

    /// A certificate was issued (its join token is used up and it is in the issuance
    /// ledger) but could not be written; the message carries the certificate, which is public.
    #[error(
        "certificate {serial} was issued (join token used, ledger updated) but writing {path} failed: {source}; the certificate follows, save it by hand:\n{cert_pem}",
        path = path.display()
    )]
    IssuedNotWritten {
        /// The certificate file that could not be written.
        path: PathBuf,
        /// The certificate's serial.
        serial: String,
        /// The certificate, PEM.
        cert_pem: String,
        /// Why writing failed.
        source: Box<Error>,
    },
}

impl Error {
    /// True if the error is a refusal to overwrite an existing file.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, Error::AlreadyExists { .. })
    }

    /// True if a certificate revocation list was refused because it is not issued and
    /// signed by one of the trusted CAs (unknown issuer or bad signature).
    pub fn is_untrusted_crl(&self) -> bool {
        matches!(
            self,
            Error::CrlIssuerUnknown { .. } | Error::CrlSignature { .. }
        )
    }

    /// True if a join token was refused because it was already used.
    pub fn is_token_used(&self) -> bool {
        matches!(self, Error::TokenUsed { .. })
    }

    /// True if a join token was refused because it expired.
    pub fn is_token_expired(&self) -> bool {
        matches!(self, Error::TokenExpired { .. })
    }

    /// True if a join token was refused because the CA does not know it (or it is malformed).
    pub fn is_token_unknown(&self) -> bool {
        matches!(
            self,
            Error::TokenUnknown { .. } | Error::TokenMalformed { .. }
        )
    }

    /// True if a certificate signing request itself was refused (unparsable, bad signature,
    /// or names or a key the token does not allow); its join token is then left unused.
    pub fn is_csr_refused(&self) -> bool {
        matches!(
            self,
            Error::BadCsr { .. }
                | Error::CsrSignature { .. }
                | Error::CsrRefused { .. }
                | Error::AttestedCsrRefused { .. }
        )
    }

    /// True if a renewal request was refused ([`Error::RenewRefused`]) or its request was
    /// unusable.
    pub fn is_renew_refused(&self) -> bool {
        matches!(
            self,
            Error::RenewRefused { .. } | Error::BadCsr { .. } | Error::CsrSignature { .. }
        )
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(
        field: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidField {
            field,
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
