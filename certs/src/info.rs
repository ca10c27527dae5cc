//! Certificate inspection: [`CertInfo`], [`inspect`], [`inspect_file`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

use crate::{Error, Result};

/// Summary of an X.509 certificate, for display and status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    /// Subject distinguished name, e.g. `CN=node-1`.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial number as lowercase hex without separators.
    pub serial: String,
    /// DNS names from the subject alternative name extension.
    pub dns_names: Vec<String>,
    /// IP addresses from the subject alternative name extension.
    pub ips: Vec<IpAddr>,
    /// Start of validity.
    #[serde(serialize_with = "ser_rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity.
    #[serde(serialize_with = "ser_rfc3339")]
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub sha256_fingerprint: String,
    /// Whether basic constraints mark the certificate as a CA.
    pub is_ca: bool,
}

pub(crate) fn ser_rfc3339<S: Serializer>(
    t: &OffsetDateTime,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// Formats a time as RFC 3339 (UTC), falling back to the default format when out of range.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses a PEM (first certificate) or DER certificate.
pub fn inspect(bytes: &[u8]) -> Result<CertInfo> {
    inspect_from(bytes, "certificate input")
}

/// Reads and parses a PEM or DER certificate file (the first certificate of a PEM file).
pub fn inspect_file(path: &Path) -> Result<CertInfo> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    inspect_from(&bytes, &path.display().to_string())
}

/// Reads all certificates of a PEM file (for example a CA bundle, to check CRLs against);
/// errors name the file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    pem_certs(&bytes, &path.display().to_string())
}

pub(crate) fn inspect_from(bytes: &[u8], origin: &str) -> Result<CertInfo> {
    if looks_like_pem(bytes) {
        let der = first_pem_cert(bytes, origin)?;
        parse_der(der.as_ref(), origin)
    } else {
        parse_der(bytes, origin)
    }
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    start.is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN"))
}

/// Decodes all certificates of a PEM text.
pub(crate) fn pem_certs(bytes: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            origin: origin.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            origin: origin.to_owned(),
        });
    }
    Ok(certs)
}

fn first_pem_cert(bytes: &[u8], origin: &str) -> Result<CertificateDer<'static>> {
    match CertificateDer::pem_slice_iter(bytes).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(source)) => Err(Error::Pem {
            origin: origin.to_owned(),
            source,
        }),
        None => Err(Error::NoCertificate {
            origin: origin.to_owned(),
        }),
    }
}

pub(crate) fn parse_x509<'a>(der: &'a [u8], origin: &str) -> Result<X509Certificate<'a>> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => Ok(cert),
        Err(e) => {
            let source = match e {
                x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
                x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
            };
            Err(Error::Parse {
                origin: origin.to_owned(),
                source,
            })
        }
    }
}

pub(crate) fn parse_der(der: &[u8], origin: &str) -> Result<CertInfo> {
    let cert = parse_x509(der, origin)?;
    Ok(from_x509(&cert, der))
}

/// DNS and IP subject alternative names of a certificate.
pub(crate) fn sans(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns.push((*n).to_owned()),
                GeneralName::IPAddress(octets) => {
                    if let Some(ip) = ip_from_octets(octets) {
                        ips.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
    (dns, ips)
}

/// An IP address from the 4 or 16 octets of an X.509 iPAddress name.
pub(crate) fn ip_from_octets(octets: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        Some(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(octets) {
        Some(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        None
    }
}

pub(crate) fn from_x509(cert: &X509Certificate<'_>, der: &[u8]) -> CertInfo {
    let (dns_names, ips) = sans(cert);
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let fingerprint = ring::digest::digest(&ring::digest::SHA256, der);
    CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: hex(cert.tbs_certificate.raw_serial()),
        dns_names,
        ips,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        sha256_fingerprint: hex(fingerprint.as_ref()),
        is_ca,
    }
}
