//! Certificate revocation lists: [`RevocationList`] (signature verified against a CA),
//! [`CrlInfo`] / [`inspect_crl`] (unverified summary), [`sign_crl`], and the serial format
//! they share with [`CertInfo`](crate::CertInfo).

use std::fmt;
use std::path::Path;

use base64::Engine;
use rcgen::{CertificateRevocationListParams, RevokedCertParams, SerialNumber};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::X509Version;

use crate::ca::{self, CertificateAuthority};
use crate::info;
use crate::{Error, Result};

/// PEM label of a certificate revocation list.
pub const CRL_PEM_LABEL: &str = "X509 CRL";

/// One revoked certificate of a CRL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokedEntry {
    /// Serial number, lowercase hex without separators, as [`CertInfo::serial`](crate::CertInfo)
    /// formats it (canonical form: see [`parse_serial`]).
    pub serial: String,
    /// When the certificate was revoked (RFC 3339, UTC).
    pub revoked_at: String,
}

/// Summary of a certificate revocation list, for display. Obtained from [`inspect_crl`]
/// (signature *not* checked) or [`RevocationList::info`] (checked).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CrlInfo {
    /// Issuer distinguished name (the subject of the CA that signed it), e.g. `CN=enc cluster CA`.
    pub issuer: String,
    /// The CRL number extension: increases with every list the CA issues.
    pub number: u64,
    /// When this list was issued.
    #[serde(serialize_with = "info::ser_rfc3339")]
    pub this_update: OffsetDateTime,
    /// When the CA promised the next list (absent in non-conforming CRLs).
    #[serde(serialize_with = "ser_opt_rfc3339")]
    pub next_update: Option<OffsetDateTime>,
    /// The revoked certificates, in list order.
    pub entries: Vec<RevokedEntry>,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub sha256_fingerprint: String,
}

fn ser_opt_rfc3339<S: Serializer>(
    t: &Option<OffsetDateTime>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&info::rfc3339(*t)),
        None => s.serialize_none(),
    }
}

impl CrlInfo {
    /// Whether the list revokes `serial` (hex, any case, with or without colons and leading
    /// zeros; the [`CertInfo::serial`](crate::CertInfo) format works as is). False for text
    /// that is not a hex serial.
    pub fn is_revoked(&self, serial: &str) -> bool {
        match serial_key(serial) {
            Some(key) => self
                .entries
                .iter()
                .any(|e| serial_key(&e.serial).as_deref() == Some(key.as_str())),
            None => false,
        }
    }
}

/// A certificate revocation list (X.509 v2, with a CRL number) whose signature has been
/// verified against a CA certificate.
///
/// Only [`RevocationList::from_pem`], [`RevocationList::from_der`], [`RevocationList::load`]
/// and [`sign_crl`] construct one, so holding a `RevocationList` means its issuer and
/// signature were checked. `Debug` prints a summary, not the encoding.
#[derive(Clone)]
pub struct RevocationList {
    info: CrlInfo,
    der: CertificateRevocationListDer<'static>,
    pem: String,
}

impl fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationList")
            .field("issuer", &self.info.issuer)
            .field("number", &self.info.number)
            .field("this_update", &info::rfc3339(self.info.this_update))
            .field("next_update", &self.info.next_update.map(info::rfc3339))
            .field("entries", &self.info.entries.len())
            .field("sha256", &self.info.sha256_fingerprint)
            .finish()
    }
}

/// Serializes as its [`CrlInfo`] summary.
impl Serialize for RevocationList {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.info.serialize(s)
    }
}

impl RevocationList {
    /// Parses a PEM CRL (`-----BEGIN X509 CRL-----`, exactly one) and verifies that it was
    /// issued and signed by one of `cas`.
    ///
    /// Refuses, with a distinct [`Error`] variant each: PEM without a CRL or with several
    /// ([`Error::NoCrl`], [`Error::BadCrl`]), undecodable PEM ([`Error::Pem`]), DER that is not
    /// a CRL ([`Error::CrlParse`]), a version other than v2 or a missing CRL number
    /// ([`Error::BadCrl`]), an issuer name that no CA in `cas` has
    /// ([`Error::CrlIssuerUnknown`]), and a signature that no CA of that name verifies
    /// ([`Error::CrlSignature`]).
    pub fn from_pem(pem: &str, cas: &[CertificateDer<'static>]) -> Result<Self> {
        Self::from_bytes(pem.as_bytes(), cas, "CRL PEM", true)
    }

    /// Like [`RevocationList::from_pem`], from the DER encoding.
    pub fn from_der(der: &[u8], cas: &[CertificateDer<'static>]) -> Result<Self> {
        Self::from_bytes(der, cas, "CRL DER", false)
    }

    /// Reads a CRL file (PEM or DER) and verifies it like [`RevocationList::from_pem`];
    /// errors name the file.
    pub fn load(path: &Path, cas: &[CertificateDer<'static>]) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        let pem = looks_like_pem(&bytes);
        Self::from_bytes(&bytes, cas, &path.display().to_string(), pem)
    }

    fn from_bytes(
        bytes: &[u8],
        cas: &[CertificateDer<'static>],
        origin: &str,
        pem: bool,
    ) -> Result<Self> {
        let der = if pem {
            single_pem_crl(bytes, origin)?
        } else {
            CertificateRevocationListDer::from(bytes.to_vec())
        };
        Self::verified(der, cas, origin)
    }

    pub(crate) fn verified(
        der: CertificateRevocationListDer<'static>,
        cas: &[CertificateDer<'static>],
        origin: &str,
    ) -> Result<Self> {
        let crl = parse_crl(der.as_ref(), origin)?;
        let info = summarize(&crl, der.as_ref(), origin)?;
        verify_issuer(&crl, cas, origin)?;
        let pem = pem_encode(der.as_ref());
        Ok(Self { info, der, pem })
    }

    /// Checks again that this list is issued and signed by one of `cas` (for example the
    /// CA bundle of a node identity, which may differ from the CAs it was loaded against).
    pub fn check_issued_by(&self, cas: &[CertificateDer<'static>]) -> Result<()> {
        let origin = format!("CRL number {}", self.info.number);
        let crl = parse_crl(self.der.as_ref(), &origin)?;
        verify_issuer(&crl, cas, &origin)
    }

    /// The summary: issuer, number, times, entries, fingerprint.
    pub fn info(&self) -> &CrlInfo {
        &self.info
    }

    /// The CRL number (increases with every list the CA issues).
    pub fn number(&self) -> u64 {
        self.info.number
    }

    /// Subject distinguished name of the issuing CA, display form (`CN=enc cluster CA`).
    pub fn issuer(&self) -> &str {
        &self.info.issuer
    }

    /// When this list was issued.
    pub fn this_update(&self) -> OffsetDateTime {
        self.info.this_update
    }

    /// When the CA promised the next list; `None` if the list does not say.
    ///
    /// The TLS configurations of this crate keep using a list past this time (see
    /// [`client_config_with_crls`](crate::client_config_with_crls)).
    pub fn next_update(&self) -> Option<OffsetDateTime> {
        self.info.next_update
    }

    /// The revoked certificates, in list order.
    pub fn entries(&self) -> &[RevokedEntry] {
        &self.info.entries
    }

    /// Whether the list revokes `serial`; see [`CrlInfo::is_revoked`] for the accepted forms.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.info.is_revoked(serial)
    }

    /// The list, PEM (one `X509 CRL` block, re-encoded from the DER).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The list, DER.
    pub fn der(&self) -> &CertificateRevocationListDer<'static> {
        &self.der
    }
}

/// Summarises a CRL (PEM or DER) **without checking its signature**, for display.
///
/// Use [`RevocationList`] for anything that acts on the list.
pub fn inspect_crl(bytes: &[u8]) -> Result<CrlInfo> {
    inspect_crl_from(bytes, "CRL input")
}

/// Reads and summarises a CRL file (PEM or DER) **without checking its signature**.
pub fn inspect_crl_file(path: &Path) -> Result<CrlInfo> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    inspect_crl_from(&bytes, &path.display().to_string())
}

fn inspect_crl_from(bytes: &[u8], origin: &str) -> Result<CrlInfo> {
    let der = if looks_like_pem(bytes) {
        single_pem_crl(bytes, origin)?
    } else {
        CertificateRevocationListDer::from(bytes.to_vec())
    };
    let crl = parse_crl(der.as_ref(), origin)?;
    summarize(&crl, der.as_ref(), origin)
}

/// Signs a CRL with the CA key: version 2, the given CRL number and entries, authority key
/// identifier of the CA, times truncated to seconds.
///
/// `entries` serials are parsed with [`parse_serial`] and `revoked_at` as RFC 3339; a bad
/// value is an [`Error::InvalidField`] naming it. Used by [`revoke`](crate::revoke), which
/// keeps the numbering; call it directly only with explicit times (tests, re-issuing).
pub fn sign_crl(
    ca: &CertificateAuthority,
    number: u64,
    entries: &[RevokedEntry],
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
) -> Result<RevocationList> {
    let this_update = ca::trunc_secs(this_update);
    let next_update = ca::trunc_secs(next_update);
    if next_update <= this_update {
        return Err(Error::invalid(
            "next_update",
            info::rfc3339(next_update),
            format!("must be after this_update {}", info::rfc3339(this_update)),
        ));
    }
    let revoked_certs = entries
        .iter()
        .map(|e| {
            let serial = parse_serial(&e.serial)?;
            let revocation_time = OffsetDateTime::parse(&e.revoked_at, &Rfc3339)
                .map_err(|err| Error::invalid("revoked_at", &e.revoked_at, err.to_string()))?;
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial_bytes(&serial)),
                revocation_time: ca::trunc_secs(revocation_time),
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: ca.key_id_method(),
    };
    let crl = params
        .signed_by(ca.issuer())
        .map_err(|source| Error::Rcgen {
            context: format!("signing CRL number {number}"),
            source,
        })?;
    RevocationList::verified(
        crl.der().clone(),
        std::slice::from_ref(ca.cert_der()),
        &format!("signed CRL number {number}"),
    )
}

/// Parses a certificate serial given as hex, with or without colons (`4a:3f:...`), any case,
/// and returns it in the [`CertInfo::serial`](crate::CertInfo) format: lowercase hex of the
/// DER integer's content bytes (minimal, a `00` byte first when the top bit is set).
///
/// An empty value, non-hex characters or more than 20 bytes (RFC 5280's limit) is an
/// [`Error::InvalidField`] with field `serial` and the value as given.
pub fn parse_serial(value: &str) -> Result<String> {
    let bad = |reason: &str| Error::invalid("serial", value, reason);
    let digits: String = value.chars().filter(|&c| c != ':').collect();
    if digits.is_empty() {
        return Err(bad("must not be empty"));
    }
    if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(
            "must be hexadecimal, with or without colons (e.g. 4a3f01 or 4a:3f:01)",
        ));
    }
    let digits = digits.to_ascii_lowercase();
    let trimmed = digits.trim_start_matches('0');
    let mut even = String::with_capacity(trimmed.len() + 2);
    if trimmed.len() % 2 == 1 {
        even.push('0');
    }
    even.push_str(trimmed);
    if even.is_empty() {
        even.push_str("00");
    } else if even.as_bytes()[0] >= b'8' {
        even.insert_str(0, "00");
    }
    if even.len() > 42 || (even.len() == 42 && !even.starts_with("00")) {
        return Err(bad("longer than 20 bytes"));
    }
    Ok(even)
}

/// Comparison key of a serial: lowercase hex without colons or leading zeros.
fn serial_key(serial: &str) -> Option<String> {
    let digits: String = serial
        .chars()
        .filter(|&c| c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let key = digits.trim_start_matches('0');
    Some(if key.is_empty() { "0" } else { key }.to_owned())
}

/// Whether two serials name the same number (see [`CrlInfo::is_revoked`] for the forms).
pub(crate) fn same_serial(a: &str, b: &str) -> bool {
    matches!((serial_key(a), serial_key(b)), (Some(x), Some(y)) if x == y)
}

/// Bytes of a serial in [`parse_serial`]'s canonical (even-length, valid hex) form.
fn serial_bytes(canonical: &str) -> Vec<u8> {
    canonical
        .as_bytes()
        .chunks(2)
        .filter_map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
        })
        .collect()
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    start.is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN"))
}

fn single_pem_crl(bytes: &[u8], origin: &str) -> Result<CertificateRevocationListDer<'static>> {
    let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            origin: origin.to_owned(),
            source,
        })?;
    let count = crls.len();
    let mut crls = crls.into_iter();
    match (crls.next(), count) {
        (Some(der), 1) => Ok(der),
        (None, _) => Err(Error::NoCrl {
            origin: origin.to_owned(),
        }),
        (Some(_), n) => Err(Error::BadCrl {
            origin: origin.to_owned(),
            reason: format!("holds {n} CRLs, expected one"),
        }),
    }
}

fn parse_crl<'a>(der: &'a [u8], origin: &str) -> Result<CertificateRevocationList<'a>> {
    match CertificateRevocationList::from_der(der) {
        Ok(([], crl)) => Ok(crl),
        Ok((rest, _)) => Err(Error::BadCrl {
            origin: origin.to_owned(),
            reason: format!("{} bytes of trailing data after the CRL", rest.len()),
        }),
        Err(e) => {
            let source = match e {
                x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
                x509_parser::nom::Err::Incomplete(_) => {
                    x509_parser::error::X509Error::InvalidCertificate
                }
            };
            Err(Error::CrlParse {
                origin: origin.to_owned(),
                source,
            })
        }
    }
}

fn summarize(crl: &CertificateRevocationList<'_>, der: &[u8], origin: &str) -> Result<CrlInfo> {
    let bad = |reason: String| Error::BadCrl {
        origin: origin.to_owned(),
        reason,
    };
    match crl.version() {
        Some(X509Version::V2) => {}
        Some(v) => return Err(bad(format!("version {}, expected 2", v.0 + 1))),
        None => return Err(bad("version 1, expected 2".to_owned())),
    }
    let number = crl
        .crl_number()
        .ok_or_else(|| bad("no CRL number extension".to_owned()))?;
    let number_bytes = number.to_bytes_be();
    let number = if number_bytes.len() <= 8 {
        number_bytes
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        return Err(bad(format!("CRL number {number} does not fit in 64 bits")));
    };
    let entries = crl
        .iter_revoked_certificates()
        .map(|r| RevokedEntry {
            serial: info::hex(r.raw_serial()),
            revoked_at: info::rfc3339(r.revocation_date.to_datetime()),
        })
        .collect();
    Ok(CrlInfo {
        issuer: crl.issuer().to_string(),
        number,
        this_update: crl.last_update().to_datetime(),
        next_update: crl.next_update().map(|t| t.to_datetime()),
        entries,
        sha256_fingerprint: info::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref()),
    })
}

/// Finds the CA of `cas` whose subject is the CRL's issuer (byte for byte, as WebPKI matches
/// them) and that verifies the signature (ring, through x509-parser).
fn verify_issuer(
    crl: &CertificateRevocationList<'_>,
    cas: &[CertificateDer<'static>],
    origin: &str,
) -> Result<()> {
    let issuer = crl.issuer().to_string();
    if crl.signature_algorithm.algorithm != crl.tbs_cert_list.signature.algorithm {
        return Err(Error::BadCrl {
            origin: origin.to_owned(),
            reason: "outer and inner signature algorithms differ".to_owned(),
        });
    }
    let mut candidates = 0;
    let mut reason = String::new();
    for der in cas {
        let ca = info::parse_x509(der.as_ref(), "CA certificate")?;
        if ca.subject().as_raw() != crl.issuer().as_raw() {
            continue;
        }
        candidates += 1;
        if !matches!(ca.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
            reason = "the certificate of that name is not a CA".to_owned();
            continue;
        }
        if let Ok(Some(ku)) = ca.key_usage()
            && !ku.value.crl_sign()
        {
            reason = "the CA certificate lacks the cRLSign key usage".to_owned();
            continue;
        }
        match crl.verify_signature(ca.public_key()) {
            Ok(()) => return Ok(()),
            Err(e) => reason = e.to_string(),
        }
    }
    if candidates == 0 {
        Err(Error::CrlIssuerUnknown {
            origin: origin.to_owned(),
            issuer,
            cas: cas.len(),
        })
    } else {
        Err(Error::CrlSignature {
            origin: origin.to_owned(),
            issuer,
            reason,
        })
    }
}

fn pem_encode(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {CRL_PEM_LABEL}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {CRL_PEM_LABEL}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_serial_canonical_form() {
        assert_eq!(parse_serial("4A:3F:01").unwrap(), "4a3f01");
        assert_eq!(parse_serial("4a3f01").unwrap(), "4a3f01");
        assert_eq!(parse_serial("00:4a").unwrap(), "4a");
        assert_eq!(parse_serial("abc").unwrap(), "0abc");
        // Top bit set: DER needs a leading zero byte, and CertInfo shows it.
        assert_eq!(parse_serial("80").unwrap(), "0080");
        assert_eq!(parse_serial("0").unwrap(), "00");
        assert_eq!(parse_serial(&"7f".repeat(20)).unwrap(), "7f".repeat(20));
        for bad in ["", ":", "zz", "4a-3f", "0x4a", &"7f".repeat(21)] {
            let err = parse_serial(bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidField { field: "serial", value, .. } if value == bad),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn serial_keys_ignore_case_colons_and_leading_zeros() {
        assert!(same_serial("004A:3f", "4a3F"));
        assert!(same_serial("0080", "80"));
        assert!(!same_serial("4a", "4b"));
        assert!(!same_serial("zz", "zz"));
        assert_eq!(serial_bytes("0080"), vec![0, 0x80]);
    }

    #[test]
    fn pem_encoding_wraps_at_64() {
        let pem = pem_encode(&[0u8; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN X509 CRL-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END X509 CRL-----"));
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(der.as_ref(), &[0u8; 100][..]);
    }
}
