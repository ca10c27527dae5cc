//! The cluster CA and node certificate issuance.

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
    SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;

use crate::info::{self, CertInfo};
use crate::ledger::{self, IssuedEntry};
use crate::{Error, Result};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Longest certificate lifetime accepted, in days.
pub const MAX_DAYS: u32 = 3650;
/// Backdating of `not_before` to tolerate clock skew between nodes.
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Options for a new cluster CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaOptions {
    /// Subject common name of the CA certificate.
    pub common_name: String,
    /// Lifetime in days.
    pub days: u32,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            common_name: "enc cluster CA".to_owned(),
            days: 3650,
        }
    }
}

/// A request for a node certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCertRequest {
    /// Node name: a lowercase RFC 1123 DNS name, used as CN and DNS SAN.
    pub node: String,
    /// Node addresses, used as IP SANs (at least one).
    pub ips: Vec<IpAddr>,
    /// Lifetime in days (1 to 3650).
    pub days: u32,
}

/// PEM-encoded certificate and private key; `Debug` redacts the key.
#[derive(Clone)]
pub struct IssuedPem {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM PKCS#8.
    pub key_pem: String,
}

impl fmt::Debug for IssuedPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A CA certificate together with its signing key; `Debug` redacts the key.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_id: KeyIdMethod,
    info: CertInfo,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("info", &self.info)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// Generates a new self-signed CA in memory (ECDSA P-256, path length 0).
    pub fn generate(opts: &CaOptions) -> Result<Self> {
        if opts.common_name.trim().is_empty() {
            return Err(Error::invalid(
                "common_name",
                &opts.common_name,
                "must not be empty",
            ));
        }
        check_days(opts.days)?;
        let now = now_secs();
        let mut params = CertificateParams::default();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::days(i64::from(opts.days));
        params.serial_number = Some(random_serial()?);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, opts.common_name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Rcgen {
                context: "generating CA key".to_owned(),
                source,
            })?;
        let cert = params.self_signed(&key).map_err(|source| Error::Rcgen {
            context: "self-signing CA certificate".to_owned(),
            source,
        })?;
        let cert_der = cert.der().clone();
        let x509 = info::parse_x509(cert_der.as_ref(), "generated CA certificate")?;
        let info = info::from_x509(&x509, cert_der.as_ref());
        let key_id = key_id_method(&x509);
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            cert_der,
            key_id,
            info,
        })
    }

    /// Loads a CA from `ca_dir/ca.crt` and `ca_dir/ca.key`, checking that the key matches.
    pub fn load(ca_dir: &Path) -> Result<Self> {
        let cert_path = ca_dir.join(CA_CERT_FILE);
        let key_path = ca_dir.join(CA_KEY_FILE);
        let cert_pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
        Self::from_pem_with_origin(
            &cert_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    /// Builds a CA from a PEM certificate and a PEM private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        Self::from_pem_with_origin(cert_pem, key_pem, "CA certificate", "CA key")
    }

    fn from_pem_with_origin(
        cert_pem: &str,
        key_pem: &str,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self> {
        let der = info::pem_certs(cert_pem.as_bytes(), cert_origin)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::NoCertificate {
                origin: cert_origin.to_owned(),
            })?;
        let x509 = info::parse_x509(der.as_ref(), cert_origin)?;
        let info = info::from_x509(&x509, der.as_ref());
        if !info.is_ca {
            return Err(Error::BadCa {
                origin: cert_origin.to_owned(),
                reason: "certificate is not a CA (basic constraints)".to_owned(),
            });
        }
        let key = KeyPair::from_pem(key_pem).map_err(|source| Error::Rcgen {
            context: format!("{key_origin}: loading CA key"),
            source,
        })?;
        if key.subject_public_key_info() != x509.tbs_certificate.subject_pki.raw {
            return Err(Error::BadCa {
                origin: key_origin.to_owned(),
                reason: format!("private key does not match certificate {cert_origin}"),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|source| Error::Rcgen {
            context: format!("{cert_origin}: reading CA certificate"),
            source,
        })?;
        let key_id = key_id_method(&x509);
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            key_id,
            info,
            cert_der: der,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER (for example to check CRLs against it with
    /// [`RevocationList::from_pem`](crate::RevocationList::from_pem)).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Details of the CA certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// How to derive the authority key identifier of what this CA signs: its own subject
    /// key identifier when the certificate has one.
    pub(crate) fn key_id_method(&self) -> KeyIdMethod {
        self.key_id.clone()
    }

    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

/// Creates a new CA in `out` (`ca.crt`, 0644, and `ca.key`, 0600), creating `out` if missing.
///
/// Refuses to overwrite an existing `ca.crt` or `ca.key`.
pub fn init_ca(out: &Path, opts: &CaOptions) -> Result<CertInfo> {
    let cert_path = out.join(CA_CERT_FILE);
    let key_path = out.join(CA_KEY_FILE);
    refuse_existing(&[&key_path, &cert_path])?;
    let ca = CertificateAuthority::generate(opts)?;
    create_dir(out)?;
    write_pair(&cert_path, ca.cert_pem(), &key_path, &ca.key_pem())?;
    tracing::info!(path = %cert_path.display(), serial = %ca.info.serial, "created cluster CA");
    Ok(ca.info)
}

/// Issues a node certificate signed by the CA in `ca_dir`, writing `out/<node>.crt` (0644)
/// and `out/<node>.key` (0600). Refuses to overwrite.
///
/// The certificate is valid from 5 minutes ago (clock skew) for `days` days, but never past
/// the CA's own expiry.
///
/// Before the files are written, the certificate is recorded in the issuance ledger
/// `ca_dir/issued.jsonl` (see [`read_ledger`](crate::read_ledger)), so that every certificate
/// that may be in use can be revoked by node name; if writing the files then fails, the
/// ledger lists a certificate nobody holds, which is harmless.
pub fn issue_node_cert(ca_dir: &Path, req: &NodeCertRequest, out: &Path) -> Result<CertInfo> {
    validate_request(req)?;
    check_days(req.days)?;
    let cert_path = out.join(format!("{}.crt", req.node));
    let key_path = out.join(format!("{}.key", req.node));
    refuse_existing(&[&key_path, &cert_path])?;
    let ca = CertificateAuthority::load(ca_dir)?;
    let now = now_secs();
    let mut not_after = now + Duration::days(i64::from(req.days));
    if not_after > ca.info.not_after {
        tracing::warn!(
            node = %req.node,
            ca_not_after = %info::rfc3339(ca.info.not_after),
            "node certificate lifetime capped at the CA's expiry"
        );
        not_after = ca.info.not_after;
    }
    let issued = issue_node_cert_pem(&ca, req, now - CLOCK_SKEW, not_after)?;
    let info = info::inspect_from(issued.cert_pem.as_bytes(), "issued certificate")?;
    ledger::append(ca_dir, &IssuedEntry::new(&req.node, &info, now))?;
    create_dir(out)?;
    write_pair(&cert_path, &issued.cert_pem, &key_path, &issued.key_pem)?;
    tracing::info!(node = %req.node, path = %cert_path.display(), serial = %info.serial, "issued node certificate");
    Ok(info)
}

/// Issues a node certificate with an explicit validity window and returns it as PEM.
///
/// Validates the node name and addresses (not `days`, which the window replaces). Works in
/// memory: nothing is recorded in the issuance ledger ([`issue_node_cert`] does that).
pub fn issue_node_cert_pem(
    ca: &CertificateAuthority,
    req: &NodeCertRequest,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<IssuedPem> {
    validate_request(req)?;
    let params = node_cert_params(&req.node, &req.ips, not_before, not_after)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Rcgen {
        context: format!("generating key for node {}", req.node),
        source,
    })?;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|source| Error::Rcgen {
            context: format!("signing certificate for node {}", req.node),
            source,
        })?;
    Ok(IssuedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The certificate profile of every node certificate, whoever made the key: CN and DNS SAN
/// = node, IP SANs = `ips`, not a CA, key usage digitalSignature, extended key usages TLS
/// server and client, authority key identifier, a random serial, validity
/// `not_before..not_after` (truncated to seconds).
pub(crate) fn node_cert_params(
    node: &str,
    ips: &[IpAddr],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams> {
    let not_before = trunc_secs(not_before);
    let not_after = trunc_secs(not_after);
    if not_after <= not_before {
        return Err(Error::invalid(
            "not_after",
            info::rfc3339(not_after),
            format!("must be after not_before {}", info::rfc3339(not_before)),
        ));
    }
    let mut params = CertificateParams::default();
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    set_node_subject(&mut params, node, ips)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Checks that `name` is a lowercase RFC 1123 DNS name.
pub fn validate_node_name(name: &str) -> Result<()> {
    let bad = |reason: &str| Err(Error::invalid("node", name, reason));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("has an empty label");
        }
        if label.len() > 63 {
            return bad("has a label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("must be a lowercase RFC 1123 DNS name (a-z, 0-9, '-', '.')");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("labels must not start or end with '-'");
        }
    }
    Ok(())
}

fn validate_request(req: &NodeCertRequest) -> Result<()> {
    validate_node_and_ips(&req.node, &req.ips)
}

/// Checks a node name and that it has at least one address.
pub(crate) fn validate_node_and_ips(node: &str, ips: &[IpAddr]) -> Result<()> {
    validate_node_name(node)?;
    if ips.is_empty() {
        return Err(Error::invalid(
            "ips",
            "[]",
            format!("node {node} needs at least one IP address"),
        ));
    }
    Ok(())
}

fn check_days(days: u32) -> Result<()> {
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(Error::invalid(
            "days",
            days.to_string(),
            format!("must be between 1 and {MAX_DAYS}"),
        ));
    }
    Ok(())
}

pub(crate) fn now_secs() -> OffsetDateTime {
    trunc_secs(OffsetDateTime::now_utc())
}

pub(crate) fn trunc_secs(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

fn key_id_method(cert: &x509_parser::certificate::X509Certificate<'_>) -> KeyIdMethod {
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(KeyIdMethod::PreSpecified(id.0.to_vec()))
            }
            _ => None,
        })
        .unwrap_or(KeyIdMethod::Sha256)
}

/// A random positive 16-byte serial whose first byte is non-zero, so its DER form is exactly
/// these 16 bytes.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|ring::error::Unspecified| Error::Random {
            context: "generating a certificate serial",
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

pub(crate) fn read_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))
}

pub(crate) fn refuse_existing(paths: &[&PathBuf]) -> Result<()> {
    for path in paths {
        match path.symlink_metadata() {
            Ok(_) => {
                return Err(Error::AlreadyExists {
                    path: (*path).clone(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("stat", *path, e)),
        }
    }
    Ok(())
}

pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| Error::io("create directory", dir, e))
}

/// Writes the key (created 0600) and then the certificate (0644); removes the key again if
/// the certificate cannot be written.
pub(crate) fn write_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
) -> Result<()> {
    write_new(key_path, key_pem, 0o600)?;
    if let Err(e) = write_new(cert_path, cert_pem, 0o644) {
        if let Err(rm) = std::fs::remove_file(key_path) {
            tracing::warn!(path = %key_path.display(), error = %rm, "cannot remove key after failed write");
        }
        return Err(e);
    }
    Ok(())
}

pub(crate) fn write_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                Error::io("create", path, e)
            }
        })?;
    // The umask may have cleared bits of a public file; set them exactly.
    if mode & 0o044 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("set permissions on", path, e))?;
    }
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write", path, e))
}

/// Sets the subject of a node certificate or request: CN and DNS SAN `node`, IP SANs `ips`.
pub(crate) fn set_node_subject(
    params: &mut CertificateParams,
    node: &str,
    ips: &[std::net::IpAddr],
) -> Result<()> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let dns = node.to_owned().try_into().map_err(|source| Error::Rcgen {
        context: format!("node name {node:?} as DNS SAN"),
        source,
    })?;
    params.subject_alt_names = std::iter::once(SanType::DnsName(dns))
        .chain(ips.iter().copied().map(SanType::IpAddress))
        .collect();
    Ok(())
}
