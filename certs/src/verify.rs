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
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use serde::Serialize;
use time::OffsetDateTime;

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
    /// The certificate does not chain to the cluster CA (or its signature is bad).
    #[error("certificate not issued by the cluster CA")]
    UnknownCa,
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

/// Checks that the leaf certificate names `expected` by DNS SAN and by IP SAN.
fn check_identity(
    end_entity: &CertificateDer<'_>,
    expected: &ExpectedPeer,
) -> std::result::Result<(), rustls::Error> {
    let cert = info::parse_x509(end_entity.as_ref(), "peer certificate")
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
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

/// Replaces webpki's name error by our own, which lists the presented DNS names, and its
/// revocation error by [`AuthFailure::Revoked`] naming the serial.
///
/// Both travel as `CertificateError::Other`, which rustls answers with a
/// `certificate_unknown` alert: the peer learns that it was refused, not why (the local
/// failure has the detail).
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
        other => other,
    }
}

/// Server verifier: standard WebPKI checks against the CA bundle, then the identity check.
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
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| remap_error(e, end_entity, &self.expected))?;
        check_identity(end_entity, &self.expected)?;
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

/// Client verifier: standard WebPKI checks against the CA bundle, then the identity check.
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
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| remap_error(e, end_entity, &self.expected))?;
        check_identity(end_entity, &self.expected)?;
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
/// the server against the CA bundle, its validity, and a DNS SAN equal to `expected.name`
/// and an IP SAN equal to `expected.addr`. No revocation check: see
/// [`client_config_with_crls`].
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
/// verifies it like [`client_config`] does (the acceptor knows `expected` from the TCP
/// source address before the handshake). No revocation check: see
/// [`server_config_with_crls`].
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
    fn serializes_tagged() {
        let json = serde_json::to_string(&AuthFailure::Expired {
            not_after: "2026-01-01T00:00:00Z".into(),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"reason":"expired","detail":{"notAfter":"2026-01-01T00:00:00Z"}}"#
        );
    }
}
