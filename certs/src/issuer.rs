//! Online issuance: what an issuing agent checks before renewing a node's certificate
//! ([`renew_csr`]; first enrolment is [`sign_csr`](crate::sign_csr) with a join token), and
//! the TLS configurations and connection of the issuer protocol ([`issuer_server_config`],
//! [`issuer_client_config`], [`connect_issuer`]).

use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, StreamOwned};
use time::OffsetDateTime;

use crate::ca::{self, CertificateAuthority};
use crate::enrol::{self, CSR_ORIGIN};
use crate::info::{self, CertInfo};
use crate::verify::{self, AuthFailure};
use crate::{Error, NodeIdentity, Result, RevocationList};

/// A certificate renewed by [`renew_csr`].
#[derive(Clone, Debug)]
pub struct RenewedNodeCert {
    /// The new certificate, PEM.
    pub cert_pem: String,
    /// Its summary.
    pub info: CertInfo,
    /// The certificate it replaces (the one presented for renewal).
    pub previous: CertInfo,
}

/// Renews a node certificate: signs `csr_pem` with the CA in `ca_dir` for a node that
/// presented `current_der` (its current certificate, which the issuer's TLS layer has
/// authenticated with the node's key).
///
/// In order, each failing with nothing issued:
/// 1. `lifetime` is between [`MIN_CERT_LIFETIME`](crate::MIN_CERT_LIFETIME) and
///    [`MAX_DAYS`](crate::MAX_DAYS) days;
/// 2. the request parses, its self-signature verifies and its key is ECDSA P-256 (as for
///    [`sign_csr`](crate::sign_csr));
/// 3. the CA loads, and the current certificate is a node certificate signed by it, valid at
///    `now`, and not revoked by `ca_dir/crl.pem` (if present; it must verify against the CA);
/// 4. the request names exactly what the current certificate names: its one DNS SAN (and
///    no other common name) and the same set of IP SANs, nothing else;
/// 5. the request's key differs from the current certificate's (renewal rotates the key).
///
/// Refusals are [`Error::RenewRefused`] naming the problem, the current serial and its
/// names. The certificate is then signed with the node profile, valid from `now` minus 5
/// minutes (or a tenth of `lifetime`, if less) for `lifetime`, capped at the CA's expiry,
/// and recorded in the issuance ledger.
pub fn renew_csr(
    ca_dir: &Path,
    csr_pem: &str,
    current_der: &[u8],
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<RenewedNodeCert> {
    let lifetime = enrol::check_lifetime(lifetime)?;
    let csr = enrol::parse_csr(csr_pem, CSR_ORIGIN)?;
    let ca = CertificateAuthority::load(ca_dir)?;
    let now = ca::trunc_secs(now);
    let x509 = info::parse_x509(current_der, "presented certificate")?;
    let current = info::from_x509(&x509, current_der);
    let refuse = |problem: String| Error::RenewRefused {
        problem,
        serial: current.serial.clone(),
        current: sans_text(&current.dns_names, &current.ips),
    };
    let ca_x509 = info::parse_x509(ca.cert_der().as_ref(), "CA certificate")?;
    if x509.verify_signature(Some(ca_x509.public_key())).is_err() {
        return Err(refuse(format!(
            "it is not signed by this issuer's CA {}",
            ca.info().subject
        )));
    }
    if current.is_ca {
        return Err(refuse("it is a CA certificate".to_owned()));
    }
    if now < current.not_before {
        return Err(refuse(format!(
            "it is not valid before {}",
            info::rfc3339(current.not_before)
        )));
    }
    if now >= current.not_after {
        return Err(refuse(format!(
            "it expired at {} (enrol again with a join token)",
            info::rfc3339(current.not_after)
        )));
    }
    let crl_path = crate::crl_path(ca_dir);
    if crl_path.exists() {
        let list = RevocationList::load(&crl_path, std::slice::from_ref(ca.cert_der()))?;
        if list.is_revoked(&current.serial) {
            return Err(refuse(format!(
                "it is revoked (serial {}, list number {})",
                current.serial,
                list.number()
            )));
        }
    }
    let node = match current.dns_names.as_slice() {
        [node] => node.clone(),
        other => {
            return Err(refuse(format!(
                "it carries {} DNS SANs; a node certificate has exactly one",
                other.len()
            )));
        }
    };
    let ips = csr.check_names(&node, &current.ips).map_err(refuse)?;
    if let Some(ip) = current.ips.iter().find(|ip| !ips.contains(ip)) {
        return Err(refuse(format!("it omits IP SAN IP:{ip}")));
    }
    if csr.spki_der == x509.tbs_certificate.subject_pki.raw {
        return Err(refuse(
            "it requests the key of the current certificate; renewal needs a new key".to_owned(),
        ));
    }
    let (cert_pem, info) = enrol::sign_node(&ca, ca_dir, &node, &ips, &csr.key, lifetime, now)?;
    tracing::info!(node = %node, previous = %current.serial, serial = %info.serial, "renewed node certificate");
    Ok(RenewedNodeCert {
        cert_pem,
        info,
        previous: current,
    })
}

/// `DNS:node-1, IP:10.0.0.1`.
fn sans_text(dns: &[String], ips: &[IpAddr]) -> String {
    dns.iter()
        .map(|d| format!("DNS:{d}"))
        .chain(ips.iter().map(|ip| format!("IP:{ip}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Server configuration of an issuer: TLS 1.3, ring, presents the issuer node's own
/// certificate, and asks for a client certificate without requiring one (enrolling nodes
/// have none; renewing nodes present theirs). A presented certificate must chain directly to
/// one of `client_cas` (the issuing CA), be valid, and allow TLS client authentication;
/// whether it may be renewed is then [`renew_csr`]'s decision.
pub fn issuer_server_config(
    id: &NodeIdentity,
    client_cas: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>> {
    let mut roots = RootCertStore::empty();
    for ca in client_cas {
        roots.add(ca.clone()).map_err(|e| Error::BadCa {
            origin: "issuer CA".to_owned(),
            reason: e.to_string(),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), verify::provider())
        .allow_unauthenticated()
        .build()
        .map_err(|source| Error::Verifier {
            context: "building issuer client verifier",
            source,
        })?;
    let config = ServerConfig::builder_with_provider(verify::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::Tls {
            context: "selecting TLS 1.3",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain().to_vec(), id.key().clone_key())
        .map_err(|source| Error::Tls {
            context: "installing issuer certificate",
            source,
        })?;
    Ok(Arc::new(config))
}

/// Client configuration for talking to an issuer: TLS 1.3, ring, verifies the issuer's
/// certificate against `ca_pem` (a CA bundle obtained out of band) and the address or name
/// dialled (an IP SAN or DNS SAN of the issuer node's certificate). With `client`, presents
/// that identity (renewal); without, presents nothing (enrolment with a join token).
pub fn issuer_client_config(
    ca_pem: &[u8],
    client: Option<&NodeIdentity>,
) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for der in info::pem_certs(ca_pem, "issuer CA bundle")? {
        roots.add(der).map_err(|e| Error::BadCa {
            origin: "issuer CA bundle".to_owned(),
            reason: e.to_string(),
        })?;
    }
    let builder = ClientConfig::builder_with_provider(verify::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::Tls {
            context: "selecting TLS 1.3",
            source,
        })?
        .with_webpki_verifier(verify::webpki_server_verifier(&Arc::new(roots), &[])?);
    let config = match client {
        Some(id) => builder
            .with_client_auth_cert(id.cert_chain().to_vec(), id.key().clone_key())
            .map_err(|source| Error::Tls {
                context: "installing client certificate",
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A TLS connection to an issuer (blocking I/O, with the read and write timeouts of
/// [`connect_issuer`]).
pub type IssuerStream = StreamOwned<ClientConnection, TcpStream>;

/// Connects to the issuer at `issuer` (`HOST:PORT`, `[V6]:PORT`) and completes the TLS
/// handshake, each step within `timeout`; reads and writes then time out after `timeout`
/// too. The issuer's certificate must name HOST (an IP SAN for an address).
pub fn connect_issuer(
    issuer: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<IssuerStream> {
    let fail = |what: &'static str, source: std::io::Error| Error::IssuerConnect {
        issuer: issuer.to_owned(),
        what,
        reason: source.to_string(),
    };
    let (host, port) = split_host_port(issuer)
        .ok_or_else(|| fail("parsing", std::io::Error::other("expected HOST:PORT")))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        fail(
            "parsing",
            std::io::Error::other(format!("{host:?} is not a DNS name or IP address: {e}")),
        )
    })?;
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| fail("resolving", e))?
        .collect();
    let mut last = std::io::Error::other("the name resolved to no address");
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut tcp = tcp.ok_or_else(|| fail("connecting", last))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .and_then(|()| tcp.set_nodelay(true))
        .map_err(|e| fail("connecting", e))?;
    let mut conn = ClientConnection::new(config, name).map_err(|e| {
        fail(
            "TLS handshake",
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| {
            let e = match AuthFailure::from_io_error(&e) {
                Some(reason) => std::io::Error::other(format!("issuer not trusted: {reason}")),
                None => e,
            };
            fail("TLS handshake", e)
        })?;
    }
    Ok(StreamOwned::new(conn, tcp))
}

/// Splits `HOST:PORT` or `[V6]:PORT`.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok().filter(|p| *p != 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("10.0.0.1:7946"), Some(("10.0.0.1", 7946)));
        assert_eq!(split_host_port("[fd00::1]:7946"), Some(("fd00::1", 7946)));
        assert_eq!(split_host_port("issuer.enc:1"), Some(("issuer.enc", 1)));
        for bad in [
            "",
            "x",
            ":1",
            "h:0",
            "h:99999",
            "fd00::1:7946",
            "[fd00::1:7",
            "h:p",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad}");
        }
    }
}
