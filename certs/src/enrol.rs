//! Enrolment without the CA key on the node: the node makes its key and a certificate
//! signing request ([`generate_csr`], [`request_node_cert`]); the CA operator signs it with a
//! one-time join token ([`sign_csr`], [`sign_csr_to_dir`]).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SubjectPublicKeyInfo};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::ca::{self, CLOCK_SKEW, CertificateAuthority, MAX_DAYS};
use crate::info::{self, CertInfo};
use crate::ledger::{self, IssuedEntry};
use crate::token::{self, TokenInfo};
use crate::{Error, Result};

/// Certificate lifetime `encctl cert sign` uses unless told otherwise.
pub const DEFAULT_CSR_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Shortest certificate lifetime [`sign_csr`] and [`renew_csr`](crate::renew_csr) accept
/// (short-lived certificates for tests and demos; production uses hours).
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(10);

/// A node's new private key and its certificate signing request; `Debug` redacts the key.
#[derive(Clone)]
pub struct NodeCsr {
    /// The private key, PEM PKCS#8 (ECDSA P-256). Stays on the node (mode 0600).
    pub key_pem: String,
    /// The certificate signing request, PEM (`CERTIFICATE REQUEST`). Public.
    pub csr_pem: String,
}

impl fmt::Debug for NodeCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCsr")
            .field("key_pem", &"<redacted>")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// Where [`request_node_cert`] wrote the key and the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsrFiles {
    /// `<out>/<node>.key`, mode 0600.
    pub key_path: PathBuf,
    /// `<out>/<node>.csr`, mode 0644.
    pub csr_path: PathBuf,
}

/// A certificate signed from a request by [`sign_csr`].
#[derive(Clone, Debug)]
pub struct SignedNodeCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its summary.
    pub info: CertInfo,
    /// The join token it was signed with (now used).
    pub token: TokenInfo,
}

/// Generates a node key (ECDSA P-256, like [`issue_node_cert`](crate::issue_node_cert)'s) and
/// a request signed with it for CN and DNS SAN `node` and IP SANs `ips`.
///
/// Errors: a bad node name or no address ([`Error::InvalidField`]), key generation.
pub fn generate_csr(node: &str, ips: &[IpAddr]) -> Result<NodeCsr> {
    ca::validate_node_and_ips(node, ips)?;
    let mut params = CertificateParams::default();
    ca::set_node_subject(&mut params, node, ips)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Rcgen {
        context: format!("generating key for node {node}"),
        source,
    })?;
    let rcgen_err = |source| Error::Rcgen {
        context: format!("creating certificate signing request for node {node}"),
        source,
    };
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(rcgen_err)?;
    Ok(NodeCsr {
        key_pem: key.serialize_pem(),
        csr_pem,
    })
}

/// On the node: [`generate_csr`] and write `out/<node>.key` (0600) and `out/<node>.csr`
/// (0644), creating `out` if missing. Never overwrites: an existing key or request is an
/// [`Error::AlreadyExists`] naming it.
pub fn request_node_cert(node: &str, ips: &[IpAddr], out: &Path) -> Result<CsrFiles> {
    ca::validate_node_and_ips(node, ips)?;
    let key_path = out.join(format!("{node}.key"));
    let csr_path = out.join(format!("{node}.csr"));
    ca::refuse_existing(&[&key_path, &csr_path])?;
    let csr = generate_csr(node, ips)?;
    ca::create_dir(out)?;
    ca::write_pair(&csr_path, &csr.csr_pem, &key_path, &csr.key_pem)?;
    tracing::info!(node, path = %csr_path.display(), "created key and certificate signing request");
    Ok(CsrFiles { key_path, csr_path })
}

/// Signs a node's certificate signing request with the CA in `ca_dir`, redeeming a join token.
///
/// In order, each step failing with nothing changed:
/// 1. `lifetime` is between [`MIN_CERT_LIFETIME`] and [`MAX_DAYS`] days;
/// 2. the request parses, its self-signature verifies (so the requester holds the key) and
///    its key is ECDSA P-256 ([`Error::BadCsr`], [`Error::CsrSignature`]);
/// 3. the CA loads;
/// 4. under the token lock: the token is known, unused and not expired (see
///    [`redeem_token`](crate::redeem_token)), and the request names exactly one DNS SAN equal
///    to the token's node, a non-empty subset of the token's addresses as IP SANs, no other
///    SAN, and no common name other than the node ([`Error::CsrRefused`], naming the SAN and
///    what the token allows);
/// 5. the certificate is signed with the profile of
///    [`issue_node_cert`](crate::issue_node_cert) (the request's other extensions are
///    ignored), valid from `now` - 5 minutes (or a tenth of `lifetime`, if less) for
///    `lifetime` but not past the CA's expiry,
///    and recorded in the issuance ledger;
/// 6. the token is marked used, naming the certificate's serial.
///
/// A refused request leaves the token unused; concurrent signers with one token get one
/// certificate between them.
pub fn sign_csr(
    ca_dir: &Path,
    csr_pem: &str,
    token_secret: &str,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<SignedNodeCert> {
    let lifetime = check_lifetime(lifetime)?;
    let csr = parse_csr(csr_pem, CSR_ORIGIN)?;
    let ca = CertificateAuthority::load(ca_dir)?;
    let now = ca::trunc_secs(now);

    let (token, (cert_pem, info)) = token::redeem_with(ca_dir, token_secret, now, |token| {
        let ips = csr
            .check_names(&token.node, &token.ips)
            .map_err(|problem| Error::CsrRefused {
                problem,
                token: token.id.clone(),
                allowed: token.allowed_sans(),
            })?;
        let (cert_pem, info) = sign_node(&ca, ca_dir, &token.node, &ips, &csr.key, lifetime, now)?;
        let serial = info.serial.clone();
        Ok(((cert_pem, info), Some(serial)))
    })?;
    tracing::info!(node = %token.node, token = %token.id, serial = %info.serial, "signed node certificate request");
    Ok(SignedNodeCert {
        cert_pem,
        info,
        token,
    })
}

/// A certificate signed by [`sign_attested_csr`].
#[derive(Clone, Debug)]
pub struct AttestedNodeCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its summary.
    pub info: CertInfo,
}

/// Signs a node's certificate signing request with the CA in `ca_dir` for a node whose
/// identity was attested by other means than a join token: a Kubernetes ServiceAccount
/// token bound to a pod on `node`, verified by the caller with the TokenReview API, and
/// `allowed_ips`, the addresses the API server reports for that Node.
///
/// The checks are [`sign_csr`]'s with the attested node in place of the token's: the
/// lifetime, the request's parse, signature and key type, the CA, then exactly one DNS SAN
/// equal to `node` (a request for another node is refused naming both), a non-empty subset
/// of `allowed_ips` as IP SANs, no other SAN and no other common name
/// ([`Error::AttestedCsrRefused`]). The certificate has the node profile and is recorded in
/// the issuance ledger. Nothing is issued on any refusal.
pub fn sign_attested_csr(
    ca_dir: &Path,
    csr_pem: &str,
    node: &str,
    allowed_ips: &[IpAddr],
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<AttestedNodeCert> {
    let lifetime = check_lifetime(lifetime)?;
    let csr = parse_csr(csr_pem, CSR_ORIGIN)?;
    let ca = CertificateAuthority::load(ca_dir)?;
    let now = ca::trunc_secs(now);
    let refuse = |problem: String| Error::AttestedCsrRefused {
        problem,
        node: node.to_owned(),
        allowed: std::iter::once(format!("DNS:{node}"))
            .chain(allowed_ips.iter().map(|ip| format!("IP:{ip}")))
            .collect::<Vec<_>>()
            .join(", "),
    };
    if let [requested] = csr.dns.as_slice()
        && requested != node
    {
        return Err(refuse(format!(
            "it is for node {requested} (DNS SAN DNS:{requested}), not for node {node}"
        )));
    }
    let ips = csr.check_names(node, allowed_ips).map_err(refuse)?;
    let (cert_pem, info) = sign_node(&ca, ca_dir, node, &ips, &csr.key, lifetime, now)?;
    tracing::info!(node = %node, serial = %info.serial, "signed attested node certificate request");
    Ok(AttestedNodeCert { cert_pem, info })
}

/// Checks a requested certificate lifetime: [`MIN_CERT_LIFETIME`] to [`MAX_DAYS`] days.
pub(crate) fn check_lifetime(lifetime: Duration) -> Result<time::Duration> {
    let max = Duration::from_secs(u64::from(MAX_DAYS) * 86_400);
    let shown = || humantime_secs(lifetime);
    if !(MIN_CERT_LIFETIME..=max).contains(&lifetime) {
        return Err(Error::invalid(
            "lifetime",
            shown(),
            format!(
                "must be between {} and {MAX_DAYS} days",
                humantime_secs(MIN_CERT_LIFETIME)
            ),
        ));
    }
    time::Duration::try_from(lifetime)
        .map_err(|e| Error::invalid("lifetime", shown(), e.to_string()))
}

fn humantime_secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// How far `not_before` is backdated for a certificate of `lifetime`: [`CLOCK_SKEW`], but at
/// most a tenth of the lifetime, so that a short-lived certificate's validity (and the
/// renewal time derived from it) stays close to its issue time.
pub(crate) fn backdate(lifetime: time::Duration) -> time::Duration {
    CLOCK_SKEW.min(lifetime / 10)
}

/// Signs a node certificate for `key` with the node profile (see
/// [`node_cert_params`](ca::node_cert_params)), valid from `now` minus [`backdate`] for
/// `lifetime` but not past the CA's expiry, and records it in the issuance ledger.
pub(crate) fn sign_node(
    ca: &CertificateAuthority,
    ca_dir: &Path,
    node: &str,
    ips: &[IpAddr],
    key: &SubjectPublicKeyInfo,
    lifetime: time::Duration,
    now: OffsetDateTime,
) -> Result<(String, CertInfo)> {
    let mut not_after = now + lifetime;
    if not_after > ca.info().not_after {
        tracing::warn!(
            node = %node,
            ca_not_after = %info::rfc3339(ca.info().not_after),
            "node certificate lifetime capped at the CA's expiry"
        );
        not_after = ca.info().not_after;
    }
    let params = ca::node_cert_params(node, ips, now - backdate(lifetime), not_after)?;
    let cert = params
        .signed_by(key, ca.issuer())
        .map_err(|source| Error::Rcgen {
            context: format!("signing certificate for node {node}"),
            source,
        })?;
    let cert_pem = cert.pem();
    let info = info::inspect_from(cert_pem.as_bytes(), "issued certificate")?;
    ledger::append(ca_dir, &IssuedEntry::new(node, &info, now))?;
    Ok((cert_pem, info))
}

/// [`sign_csr`], then writes the certificate to `out/<node>.crt` (0644, `out` created if
/// missing) and returns its path.
///
/// An existing `out/<node>.crt` is refused before the token is redeemed. Should writing fail
/// after signing, the error ([`Error::IssuedNotWritten`]) carries the certificate.
pub fn sign_csr_to_dir(
    ca_dir: &Path,
    csr_pem: &str,
    token_secret: &str,
    lifetime: Duration,
    now: OffsetDateTime,
    out: &Path,
) -> Result<(PathBuf, SignedNodeCert)> {
    // The file is named after the token's node, which signing requires the request's single
    // DNS SAN to equal; a request without one is refused by sign_csr.
    if let [node] = parse_csr(csr_pem, CSR_ORIGIN)?.dns.as_slice()
        && ca::validate_node_name(node).is_ok()
    {
        ca::refuse_existing(&[&out.join(format!("{node}.crt"))])?;
    }
    let signed = sign_csr(ca_dir, csr_pem, token_secret, lifetime, now)?;
    let path = out.join(format!("{}.crt", signed.token.node));
    if let Err(e) = ca::create_dir(out).and_then(|()| ca::write_new(&path, &signed.cert_pem, 0o644))
    {
        return Err(Error::IssuedNotWritten {
            path,
            serial: signed.info.serial,
            cert_pem: signed.cert_pem,
            source: Box::new(e),
        });
    }
    Ok((path, signed))
}

/// How errors name a request given as text.
pub(crate) const CSR_ORIGIN: &str = "certificate signing request";

/// What a verified request asks for.
pub(crate) struct ParsedCsr {
    cn: Option<String>,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    /// SANs that are neither DNS names nor IP addresses, as text.
    others: Vec<String>,
    pub(crate) key: SubjectPublicKeyInfo,
    /// The DER SubjectPublicKeyInfo of the requested key.
    pub(crate) spki_der: Vec<u8>,
}

pub(crate) fn parse_csr(pem: &str, origin: &str) -> Result<ParsedCsr> {
    let bad = |reason: String| Error::BadCsr {
        origin: origin.to_owned(),
        reason,
    };
    let der =
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                bad("no PEM block \"CERTIFICATE REQUEST\" found".to_owned())
            }
            e => bad(format!("invalid PEM: {e}")),
        })?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| bad(format!("invalid PKCS#10 DER: {e}")))?;
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    csr.verify_signature().map_err(|e| Error::CsrSignature {
        origin: origin.to_owned(),
        reason: e.to_string(),
    })?;
    let info = &csr.certification_request_info;
    let key = SubjectPublicKeyInfo::from_der(info.subject_pki.raw)
        .ok()
        .filter(|k| rcgen::PublicKeyData::algorithm(k) == &PKCS_ECDSA_P256_SHA256)
        .ok_or_else(|| {
            bad(format!(
                "public key algorithm {} is not ECDSA P-256, the node key type",
                info.subject_pki.algorithm.algorithm
            ))
        })?;
    let mut cns = info.subject.iter_common_name();
    let cn = match cns.next() {
        None => None,
        Some(cn) => Some(
            cn.as_str()
                .map_err(|e| bad(format!("subject common name is not text: {e}")))?
                .to_owned(),
        ),
    };
    if cns.next().is_some() {
        return Err(bad("subject has more than one common name".to_owned()));
    }
    let (mut dns, mut ips, mut others) = (Vec::new(), Vec::new(), Vec::new());
    for ext in csr.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                GeneralName::IPAddress(octets) => match crate::info::ip_from_octets(octets) {
                    Some(ip) => ips.push(ip),
                    None => others.push(format!("IP:<{} bytes>", octets.len())),
                },
                GeneralName::URI(u) => others.push(format!("URI:{u}")),
                GeneralName::RFC822Name(m) => others.push(format!("email:{m}")),
                other => others.push(other.to_string()),
            }
        }
    }
    Ok(ParsedCsr {
        cn,
        dns,
        ips,
        others,
        key,
        spki_der: info.subject_pki.raw.to_vec(),
    })
}

impl ParsedCsr {
    /// Checks the request's names against what may be issued (`node` as the one DNS SAN and
    /// common name, a non-empty subset of `ips` as IP SANs, nothing else); returns the IP
    /// SANs to issue (duplicates removed), or the problem in words.
    pub(crate) fn check_names(
        &self,
        node: &str,
        allowed_ips: &[IpAddr],
    ) -> std::result::Result<Vec<IpAddr>, String> {
        if let Some(other) = self.others.first() {
            return Err(format!(
                "it requests SAN {other}, which is neither a DNS name nor an IP address"
            ));
        }
        if let Some(d) = self.dns.iter().find(|d| **d != node) {
            return Err(format!("it requests DNS SAN DNS:{d}"));
        }
        match self.dns.len() {
            0 => return Err("it has no DNS SAN".to_owned()),
            1 => {}
            n => return Err(format!("it requests DNS SAN DNS:{node} {n} times")),
        }
        if let Some(ip) = self.ips.iter().find(|ip| !allowed_ips.contains(ip)) {
            return Err(format!("it requests IP SAN IP:{ip}"));
        }
        if self.ips.is_empty() {
            return Err("it has no IP SAN".to_owned());
        }
        if let Some(cn) = self.cn.as_ref().filter(|cn| **cn != node) {
            return Err(format!("its subject common name is {cn:?}"));
        }
        let mut ips = Vec::new();
        for ip in &self.ips {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        Ok(ips)
    }
}
