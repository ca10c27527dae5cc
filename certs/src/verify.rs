//! Mutual TLS 1.3 between nodes: configurations, identity-checking verifiers and
//! [`AuthFailure`] classification.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ExtendedKeyPurpose,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use crate::info::{self, CertInfo};
use crate::{Error, NodeIdentity, Result, RevocationList};

/// Who discovery says should be on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedPeer {
    /// The peer's node name; must be a DNS SAN of its certificate.
    pub name: String,
    /// The peer's address; must be an IP SAN of its certificate.
    pub addr: IpAddr,
}

/// Why a peer's authentication failed, for status display.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(
    tag = "reason",
    content = "detail",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
#[non_exhaustive]
pub enum AuthFailure {
    /// The certificate is not signed by a CA of the bundle (or its signature is bad). This
    /// includes a certificate issued by an intermediate CA, whatever the intermediate chains
    /// to: enc uses no intermediates (see [`client_config`]).
    #[error("certificate not issued by the cluster CA")]
    UnknownCa,
    /// The certificate is its own issuer: its issuer name is its subject name and it is signed
    /// with its own key, so no CA of the bundle vouches for it.
    #[error("certificate is self-signed, not issued by the cluster CA")]
    SelfSigned,
    /// The certificate has expired.
    #[error("certificate expired at {not_after}")]
    Expired {
        /// Expiry time (RFC 3339), or "unknown time".
        not_after: String,
    },
    /// The certificate is not valid yet.
    #[error("certificate not valid before {not_before}")]
    NotYetValid {
        /// Start of validity (RFC 3339), or "unknown time".
        not_before: String,
    },
    /// The certificate's extended key usage does not allow this end of the connection (TLS
    /// client or server authentication), or its key usage does not allow the handshake
    /// signature (digitalSignature).
    #[error("certificate not valid for this use: {detail}")]
    WrongKeyUsage {
        /// What is missing and what the certificate presents, e.g. `lacks TLS client
        /// authentication (extended key usage; presents: TLS server authentication)`.
        detail: String,
    },
    /// No DNS SAN names the expected node.
    #[error(
        "certificate SAN does not name node {expected:?} (presents: {})",
        list(presented)
    )]
    NameMismatch {
        /// The expected node name.
        expected: String,
        /// The names the certificate presents.
        presented: Vec<String>,
    },
    /// No IP SAN holds the expected address.
    #[error(
        "certificate SAN lacks address {expected} (presents: {})",
        list(presented)
    )]
    AddressMismatch {
        /// The expected address.
        expected: IpAddr,
        /// The addresses the certificate presents.
        presented: Vec<IpAddr>,
    },
    /// The certificate is on a revocation list of the cluster CA.
    #[error("certificate revoked (serial {serial})")]
    Revoked {
        /// The certificate's serial, in the [`CertInfo::serial`] format, or "unknown" when
        /// the error came from a verifier that does not know it.
        serial: String,
    },
    /// The peer sent no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The peer refused our certificate with a TLS alert.
    #[error("peer rejected our certificate: {alert} (alert)")]
    RejectedByPeer {
        /// The alert, snake_case (e.g. `unknown_ca`).
        alert: String,
    },
    /// Any other TLS failure.
    #[error("tls: {0}")]
    Tls(String),
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

const UNKNOWN_TIME: &str = "unknown time";
const UNKNOWN_SERIAL: &str = "unknown";

fn unix_rfc3339(t: UnixTime) -> String {
    i64::try_from(t.as_secs())
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .map_or_else(|| UNKNOWN_TIME.to_owned(), info::rfc3339)
}

impl AuthFailure {
    /// Classifies a rustls error (from either end of a handshake).
    pub fn from_tls_error(err: &rustls::Error) -> AuthFailure {
        use CertificateError as C;
        match err {
            rustls::Error::InvalidCertificate(ce) => match ce {
                // Our verifiers replace these by `SelfSigned` when the certificate is its
                // own issuer (see `remap_error`).
                C::UnknownIssuer | C::BadSignature => AuthFailure::UnknownCa,
                C::Expired => AuthFailure::Expired {
                    not_after: UNKNOWN_TIME.to_owned(),
                },
                C::ExpiredContext { not_after, .. } => AuthFailure::Expired {
                    not_after: unix_rfc3339(*not_after),
                },
                C::NotValidYet => AuthFailure::NotYetValid {
                    not_before: UNKNOWN_TIME.to_owned(),
                },
                C::NotValidYetContext { not_before, .. } => AuthFailure::NotYetValid {
                    not_before: unix_rfc3339(*not_before),
                },
                C::NotValidForName => AuthFailure::NameMismatch {
                    expected: String::new(),
                    presented: Vec::new(),
                },
                C::NotValidForNameContext {
                    expected,
                    presented,
                } => AuthFailure::NameMismatch {
                    expected: expected.to_str().into_owned(),
                    presented: presented.clone(),
                },
                // Our verifiers replace this by `Revoked` with the serial (see `remap_error`).
                C::Revoked => AuthFailure::Revoked {
                    serial: UNKNOWN_SERIAL.to_owned(),
                },
                // Left as rustls made it (so that the peer gets `unsupported_certificate`):
                // the error itself says which purpose was missing.
                C::InvalidPurposeContext {
                    required,
                    presented,
                } => AuthFailure::WrongKeyUsage {
                    detail: format!(
                        "lacks {} (extended key usage; presents: {})",
                        purpose(required),
                        list(&presented.iter().map(purpose).collect::<Vec<_>>())
                    ),
                },
                C::InvalidPurpose => AuthFailure::WrongKeyUsage {
                    detail: "lacks the TLS authentication purpose of its role (extended key usage)"
                        .to_owned(),
                },
                C::Other(OtherError(inner)) => inner
                    .downcast_ref::<AuthFailure>()
                    .cloned()
                    .unwrap_or_else(|| AuthFailure::Tls(err.to_string())),
                _ => AuthFailure::Tls(err.to_string()),
            },
            rustls::Error::NoCertificatesPresented => AuthFailure::NoCertificate,
            rustls::Error::AlertReceived(desc) => AuthFailure::RejectedByPeer {
                alert: desc
                    .as_str()
                    .map_or_else(|| format!("{desc:?}").to_ascii_lowercase(), snake_case),
            },
            _ => AuthFailure::Tls(err.to_string()),
        }
    }

    /// Classifies an I/O error if it wraps a rustls error (as tokio-rustls does).
    pub fn from_io_error(err: &std::io::Error) -> Option<AuthFailure> {
        err.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(AuthFailure::from_tls_error)
    }

    fn into_tls_error(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// An extended key usage, for [`AuthFailure::WrongKeyUsage`].
fn purpose(p: &ExtendedKeyPurpose) -> String {
    match p {
        ExtendedKeyPurpose::ClientAuth => "TLS client authentication".to_owned(),
        ExtendedKeyPurpose::ServerAuth => "TLS server authentication".to_owned(),
        ExtendedKeyPurpose::Other(arcs) => arcs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("."),
    }
}

/// `UnknownCA` -> `unknown_ca`, `BadCertificate` -> `bad_certificate`.
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(char::is_ascii_lowercase);
            if prev.is_ascii_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_ascii_uppercase() && next_lower)
            {
                out.push('_');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Certificate details of the authenticated peer (first certificate of the chain).
pub fn peer_info(certs: &[CertificateDer<'_>]) -> Option<CertInfo> {
    let first = certs.first()?;
    info::parse_der(first.as_ref(), "peer certificate").ok()
}

/// The ring provider, shared by all configurations.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The `ServerName` to dial with for a peer (its node name).
pub fn server_name(expected: &ExpectedPeer) -> Result<ServerName<'static>> {
    ServerName::try_from(expected.name.clone()).map_err(|source| Error::ServerName {
        name: expected.name.clone(),
        source,
    })
}

/// The intermediates our verifiers hand to webpki: none, whatever the peer sends.
///
/// enc's CA issues node certificates itself and is constrained to path length 0, so a node
/// certificate is signed directly by a CA of the bundle. An intermediate would not be held to
/// that: webpki does not apply a trust anchor's path length constraint, and revocation is
/// checked for the end entity only, so a revoked intermediate would still be honoured. A leaf
/// issued by an intermediate is therefore refused ([`AuthFailure::UnknownCa`]) even when the
/// peer sends an intermediate that chains to the cluster CA; extra certificates after a leaf
/// the CA signed itself (such as the CA appended to a chain file) are ignored.
/// [`NodeIdentity`] loads our own certificate under the same rule.
pub(crate) const NO_INTERMEDIATES: &[CertificateDer<'static>] = &[];

/// Checks the leaf certificate's key usage ([`check_key_usage`]) and that it names `expected`
/// by DNS SAN and by IP SAN.
fn check_leaf(
    end_entity: &CertificateDer<'_>,
    expected: &ExpectedPeer,
) -> std::result::Result<(), rustls::Error> {
    let cert = info::parse_x509(end_entity.as_ref(), "peer certificate")
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    check_key_usage(&cert)?;
    let (dns, ips) = info::sans(&cert);
    name_check(&dns, expected)?;
    let want = expected.addr.to_canonical();
    if !ips.iter().any(|ip| ip.to_canonical() == want) {
        return Err(AuthFailure::AddressMismatch {
            expected: expected.addr,
            presented: ips,
        }
        .into_tls_error());
    }
    Ok(())
}

/// Checks the key usage extension, which webpki does not look at for end entities: when
/// present it must allow digitalSignature, since the peer signs the TLS 1.3 handshake
/// (CertificateVerify) with this key (RFC 5280 4.2.1.3, RFC 8446 4.4.3). A certificate
/// without the extension is not restricted. Refusals are [`AuthFailure::WrongKeyUsage`],
/// carried as `CertificateError::Other` (the peer sees `certificate_unknown`).
pub(crate) fn check_key_usage(
    cert: &X509Certificate<'_>,
) -> std::result::Result<(), rustls::Error> {
    match cert.key_usage() {
        Err(_) => Err(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        )),
        Ok(None) => Ok(()),
        Ok(Some(ku)) if ku.value.digital_signature() => Ok(()),
        Ok(Some(ku)) => {
            let presented = ku.value.to_string().to_ascii_lowercase();
            Err(AuthFailure::WrongKeyUsage {
                detail: format!(
                    "lacks digital signature (key usage; presents: {})",
                    if presented.is_empty() {
                        "none"
                    } else {
                        &presented
                    }
                ),
            }
            .into_tls_error())
        }
    }
}

/// Replaces webpki's unknown-issuer and bad-signature errors by [`AuthFailure::SelfSigned`]
/// when `end_entity` is self-signed; other errors pass unchanged.
pub(crate) fn self_signed_error(
    err: rustls::Error,
    end_entity: &CertificateDer<'_>,
) -> rustls::Error {
    match err {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) if is_self_signed(end_entity) => AuthFailure::SelfSigned.into_tls_error(),
        other => other,
    }
}

/// Whether the certificate is self-signed: issued under its own subject name and signed with
/// its own key. A certificate merely issued under its own name by another key is not.
fn is_self_signed(end_entity: &CertificateDer<'_>) -> bool {
    info::parse_x509(end_entity.as_ref(), "peer certificate").is_ok_and(|cert| {
        cert.issuer().as_raw() == cert.subject().as_raw() && cert.verify_signature(None).is_ok()
    })
}

fn name_check(dns: &[String], expected: &ExpectedPeer) -> std::result::Result<(), rustls::Error> {
    if dns.iter().any(|n| n.eq_ignore_ascii_case(&expected.name)) {
        Ok(())
    } else {
        Err(AuthFailure::NameMismatch {
            expected: expected.name.clone(),
            presented: dns.to_vec(),
        }
        .into_tls_error())
    }
}

/// Replaces webpki's name error by our own, which lists the presented DNS names, its
/// revocation error by [`AuthFailure::Revoked`] naming the serial, and its unknown-issuer and
/// bad-signature errors by [`AuthFailure::SelfSigned`] when the certificate is self-signed.
///
/// These travel as `CertificateError::Other`, which rustls answers with a
/// `certificate_unknown` alert: the peer learns that it was refused, not why (the local
/// failure has the detail). rustls' own variants cannot carry the detail, and the reason is
/// worked out from the error alone (see [`AuthFailure::from_tls_error`]), so a self-signed
/// certificate costs the peer the `unknown_ca` (or `decrypt_error`) alert it would otherwise
/// get. Only refusals are reworded: the decision stays webpki's. Extended key usage errors
/// are left alone, as they carry their detail (the peer gets `unsupported_certificate`).
fn remap_error(
    err: rustls::Error,
    end_entity: &CertificateDer<'_>,
    expected: &ExpectedPeer,
) -> rustls::Error {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            let serial = info::parse_der(end_entity.as_ref(), "peer certificate")
                .map_or_else(|_| UNKNOWN_SERIAL.to_owned(), |c| c.serial);
            // Debug only: the caller reports the failure (with the serial) itself.
            tracing::debug!(
                peer = %expected.name,
                addr = %expected.addr,
                %serial,
                "peer presented a revoked certificate"
            );
            AuthFailure::Revoked { serial }.into_tls_error()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => match info::parse_x509(end_entity.as_ref(), "peer certificate") {
            Ok(cert) => {
                let (dns, _) = info::sans(&cert);
                name_check(&dns, expected).err().unwrap_or(err)
            }
            Err(_) => err,
        },
        other => self_signed_error(other, end_entity),
    }
}

/// Server verifier: standard WebPKI checks against the CA bundle (without intermediates, see
/// [`NO_INTERMEDIATES`]), then the key usage and identity checks.
/// Handshake signatures are checked by `inner` (built with [`provider`]).
#[derive(Debug)]
struct PeerServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: ExpectedPeer,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(
                end_entity,
                NO_INTERMEDIATES,
                server_name,
                ocsp_response,
                now,
            )
            .map_err(|e| remap_error(e, end_entity, &self.expected))?;
        check_leaf(end_entity, &self.expected)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client verifier: standard WebPKI checks against the CA bundle (without intermediates, see
/// [`NO_INTERMEDIATES`]), then the key usage and identity checks.
/// Handshake signatures are checked by `inner` (built with [`provider`]).
#[derive(Debug)]
struct PeerClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    expected: ExpectedPeer,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, NO_INTERMEDIATES, now)
            .map_err(|e| remap_error(e, end_entity, &self.expected))?;
        check_leaf(end_entity, &self.expected)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The WebPKI server verifier. With CRLs: only the end entity is checked (the chain is
/// CA -> node, and the CA is the trust anchor), a certificate no CRL speaks for passes (as it
/// would without CRLs), and an expired CRL (past nextUpdate) is still used, so a CA that
/// has not re-signed in time never stops the cluster from authenticating.
pub(crate) fn webpki_server_verifier(
    roots: &Arc<RootCertStore>,
    crls: &[RevocationList],
) -> Result<Arc<WebPkiServerVerifier>> {
    // rustls' default revocation expiration policy is to ignore nextUpdate; we rely on it.
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.iter().map(|c| c.der().clone()))
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|source| Error::Verifier {
            context: "building server certificate verifier",
            source,
        })
}

/// The WebPKI client verifier; CRLs are handled as in [`webpki_server_verifier`].
pub(crate) fn webpki_client_verifier(
    roots: &Arc<RootCertStore>,
    crls: &[RevocationList],
) -> Result<Arc<dyn ClientCertVerifier>> {
    // rustls' default revocation expiration policy is to ignore nextUpdate; we rely on it.
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.iter().map(|c| c.der().clone()))
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|source| Error::Verifier {
            context: "building client certificate verifier",
            source,
        })
}

/// Client configuration: TLS 1.3 only, ring provider, presents our certificate and verifies
/// the server against the CA bundle, its validity, its key usages, and a DNS SAN equal to
/// `expected.name` and an IP SAN equal to `expected.addr`. No revocation check: see
/// [`client_config_with_crls`].
///
/// The server's certificate must be signed directly by a CA of the bundle: intermediates
/// it sends are not used (see [`AuthFailure::UnknownCa`]). Its extended key usage, if
/// present, must include TLS server authentication; its key usage, if present, must include
/// digitalSignature ([`AuthFailure::WrongKeyUsage`]). A self-signed certificate is refused as
/// [`AuthFailure::SelfSigned`].
pub fn client_config(id: &NodeIdentity, expected: &ExpectedPeer) -> Result<Arc<ClientConfig>> {
    client_config_with_crls(id, expected, &[])
}

/// Like [`client_config`], and refuses a server whose certificate one of `crls` revokes
/// ([`AuthFailure::Revoked`] with its serial).
///
/// Each CRL must be issued by a CA of the identity's bundle (checked again here, as a list
/// signed by another key of the same name would fail every handshake); otherwise an
/// [`Error::CrlIssuerUnknown`] / [`Error::CrlSignature`]. Only the peer's own certificate
/// is looked up; a CRL past its nextUpdate is still applied (a stale list is better than
/// none, and an expiry must not cut the cluster off); a certificate of a CA no list speaks
/// for is accepted, as without lists.
pub fn client_config_with_crls(
    id: &NodeIdentity,
    expected: &ExpectedPeer,
    crls: &[RevocationList],
) -> Result<Arc<ClientConfig>> {
    check_crls(id, crls)?;
    let verifier = PeerServerVerifier {
        inner: webpki_server_verifier(id.roots(), crls)?,
        expected: expected.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::Tls {
            context: "selecting TLS 1.3",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(id.cert_chain().to_vec(), id.key().clone_key())
        .map_err(|source| Error::Tls {
            context: "installing client certificate",
            source,
        })?;
    Ok(Arc::new(config))
}

/// Server configuration: TLS 1.3 only, ring provider, requires a client certificate and
/// verifies it like [`client_config`] does, with TLS client authentication as the extended
/// key usage it must allow (the acceptor knows `expected` from the TCP source address before
/// the handshake). No revocation check: see [`server_config_with_crls`].
pub fn server_config(id: &NodeIdentity, expected: &ExpectedPeer) -> Result<Arc<ServerConfig>> {
    server_config_with_crls(id, expected, &[])
}

/// Like [`server_config`], and refuses a client whose certificate one of `crls` revokes;
/// CRLs are checked and applied as in [`client_config_with_crls`].
pub fn server_config_with_crls(
    id: &NodeIdentity,
    expected: &ExpectedPeer,
    crls: &[RevocationList],
) -> Result<Arc<ServerConfig>> {
    check_crls(id, crls)?;
    let verifier = PeerClientVerifier {
        inner: webpki_client_verifier(id.roots(), crls)?,
        expected: expected.clone(),
    };
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::Tls {
            context: "selecting TLS 1.3",
            source,
        })?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(id.cert_chain().to_vec(), id.key().clone_key())
        .map_err(|source| Error::Tls {
            context: "installing server certificate",
            source,
        })?;
    Ok(Arc::new(config))
}

fn check_crls(id: &NodeIdentity, crls: &[RevocationList]) -> Result<()> {
    crls.iter()
        .try_for_each(|crl| crl.check_issued_by(id.ca_certs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_alerts() {
        assert_eq!(snake_case("UnknownCA"), "unknown_ca");
        assert_eq!(snake_case("BadCertificate"), "bad_certificate");
        assert_eq!(snake_case("CertificateExpired"), "certificate_expired");
        assert_eq!(snake_case("DecryptError"), "decrypt_error");
    }

    #[test]
    fn display_messages() {
        let f = AuthFailure::NameMismatch {
            expected: "node-2".into(),
            presented: vec!["node-9".into()],
        };
        assert_eq!(
            f.to_string(),
            "certificate SAN does not name node \"node-2\" (presents: node-9)"
        );
        let f = AuthFailure::AddressMismatch {
            expected: "10.0.0.2".parse().unwrap(),
            presented: vec!["10.0.0.9".parse().unwrap()],
        };
        assert_eq!(
            f.to_string(),
            "certificate SAN lacks address 10.0.0.2 (presents: 10.0.0.9)"
        );
        let f = AuthFailure::Revoked {
            serial: "4a3f".into(),
        };
        assert_eq!(f.to_string(), "certificate revoked (serial 4a3f)");
        let f = AuthFailure::RejectedByPeer {
            alert: "unknown_ca".into(),
        };
        assert_eq!(
            f.to_string(),
            "peer rejected our certificate: unknown_ca (alert)"
        );
    }

    #[test]
    fn tls_error_round_trip_through_io_error() {
        let failure = AuthFailure::AddressMismatch {
            expected: "10.0.0.2".parse().unwrap(),
            presented: vec![],
        };
        let tls = failure.clone().into_tls_error();
        assert_eq!(AuthFailure::from_tls_error(&tls), failure);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert_eq!(AuthFailure::from_io_error(&io), Some(failure));
        assert_eq!(
            AuthFailure::from_io_error(&std::io::Error::other("plain")),
            None
        );
        assert_eq!(
            AuthFailure::from_tls_error(&rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            )),
            AuthFailure::RejectedByPeer {
                alert: "unknown_ca".into()
            }
        );
        assert_eq!(
            AuthFailure::from_tls_error(&rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRevoked
            )),
            AuthFailure::RejectedByPeer {
                alert: "certificate_revoked".into()
            }
        );
        assert_eq!(
            AuthFailure::from_tls_error(&rustls::Error::InvalidCertificate(
                CertificateError::Revoked
            )),
            AuthFailure::Revoked {
                serial: "unknown".into()
            }
        );
    }

    #[test]
    fn new_reasons_display_and_classify() {
        assert_eq!(
            AuthFailure::SelfSigned.to_string(),
            "certificate is self-signed, not issued by the cluster CA"
        );
        let purpose_error = |required, presented| {
            AuthFailure::from_tls_error(&rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurposeContext {
                    required,
                    presented,
                },
            ))
        };
        let f = purpose_error(
            ExtendedKeyPurpose::ClientAuth,
            vec![ExtendedKeyPurpose::ServerAuth],
        );
        assert_eq!(
            f,
            AuthFailure::WrongKeyUsage {
                detail: "lacks TLS client authentication (extended key usage; presents: TLS \
                         server authentication)"
                    .into()
            }
        );
        assert_eq!(
            f.to_string(),
            "certificate not valid for this use: lacks TLS client authentication (extended key \
             usage; presents: TLS server authentication)"
        );
        assert_eq!(
            purpose_error(
                ExtendedKeyPurpose::ServerAuth,
                vec![
                    ExtendedKeyPurpose::ClientAuth,
                    ExtendedKeyPurpose::Other(vec![1, 3, 6, 1, 5, 5, 7, 3, 4])
                ],
            )
            .to_string(),
            "certificate not valid for this use: lacks TLS server authentication (extended key \
             usage; presents: TLS client authentication, 1.3.6.1.5.5.7.3.4)"
        );
        assert!(matches!(
            AuthFailure::from_tls_error(&rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose
            )),
            AuthFailure::WrongKeyUsage { .. }
        ));
        // What the refused peer sees for each of them.
        for (alert, name) in [
            (
                rustls::AlertDescription::CertificateUnknown,
                "certificate_unknown",
            ),
            (
                rustls::AlertDescription::UnsupportedCertificate,
                "unsupported_certificate",
            ),
            (rustls::AlertDescription::DecryptError, "decrypt_error"),
        ] {
            assert_eq!(
                AuthFailure::from_tls_error(&rustls::Error::AlertReceived(alert)),
                AuthFailure::RejectedByPeer { alert: name.into() }
            );
        }
    }

    fn leaf_params(cn: &str) -> rcgen::CertificateParams {
        let mut params = rcgen::CertificateParams::new(vec!["node-2".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
    }

    fn der(cert: &rcgen::Certificate) -> CertificateDer<'static> {
        cert.der().clone()
    }

    #[test]
    fn self_signed_means_own_name_and_own_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let own = leaf_params("node-2").self_signed(&key).unwrap();
        assert!(is_self_signed(own.der()));
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            AuthFailure::from_tls_error(&self_signed_error(unknown.clone(), own.der())),
            AuthFailure::SelfSigned
        );
        // Other errors are left alone.
        let expired = rustls::Error::InvalidCertificate(CertificateError::Expired);
        assert_eq!(self_signed_error(expired.clone(), own.der()), expired);

        // Issued under its own name, but by another key (a CA that happens to share it).
        let mut ca_params = leaf_params("node-2");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let other_key = rcgen::KeyPair::generate().unwrap();
        let same_name = der(&leaf_params("node-2")
            .signed_by(&other_key, &issuer)
            .unwrap());
        assert!(!is_self_signed(&same_name));
        assert_eq!(
            AuthFailure::from_tls_error(&self_signed_error(unknown.clone(), &same_name)),
            AuthFailure::UnknownCa
        );
        // Issued under another name.
        let issued = der(&leaf_params("node-3")
            .signed_by(&other_key, &issuer)
            .unwrap());
        assert!(!is_self_signed(&issued));
    }

    #[test]
    fn key_usage_must_allow_signatures_when_present() {
        let key = rcgen::KeyPair::generate().unwrap();
        let check = |usages: Option<Vec<rcgen::KeyUsagePurpose>>| {
            let mut params = leaf_params("node-2");
            if let Some(u) = usages {
                params.key_usages = u;
            }
            let cert = params.self_signed(&key).unwrap();
            let x509 = info::parse_x509(cert.der().as_ref(), "test").unwrap();
            check_key_usage(&x509).map_err(|e| AuthFailure::from_tls_error(&e))
        };
        use rcgen::KeyUsagePurpose as K;
        assert_eq!(check(None), Ok(()));
        assert_eq!(check(Some(vec![K::DigitalSignature])), Ok(()));
        assert_eq!(
            check(Some(vec![K::KeyEncipherment, K::DigitalSignature])),
            Ok(())
        );
        assert_eq!(
            check(Some(vec![K::KeyAgreement, K::KeyEncipherment])),
            Err(AuthFailure::WrongKeyUsage {
                detail: "lacks digital signature (key usage; presents: key encipherment, key \
                         agreement)"
                    .into()
            })
        );
    }

    #[test]
    fn serializes_tagged() {
        let json = serde_json::to_string(&AuthFailure::Expired {
            not_after: "2026-01-01T00:00:00Z".into(),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"reason":"expired","detail":{"notAfter":"2026-01-01T00:00:00Z"}}"#
        );
        assert_eq!(
            serde_json::to_string(&AuthFailure::SelfSigned).unwrap(),
            r#"{"reason":"selfSigned"}"#
        );
        assert_eq!(
            serde_json::to_string(&AuthFailure::WrongKeyUsage { detail: "x".into() }).unwrap(),
            r#"{"reason":"wrongKeyUsage","detail":{"detail":"x"}}"#
        );
    }
}
