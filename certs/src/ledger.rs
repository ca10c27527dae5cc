//! The issuance ledger: one JSON line per node certificate issued, in `<ca_dir>/issued.jsonl`,
//! so that `encctl revoke --node NAME` finds every certificate a node was given.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::info::{self, CertInfo};
use crate::{Error, Result};

/// File name of the issuance ledger inside a CA directory.
pub const LEDGER_FILE: &str = "issued.jsonl";

/// One issued certificate, as a line of the ledger:
/// `{"serial":"…","node":"…","ips":[…],"notBefore":"…","notAfter":"…","issuedAt":"…"}`.
///
/// Unknown fields are ignored on reading, so later versions may add some.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedEntry {
    /// Serial number, in the [`CertInfo::serial`] format (lowercase hex, no separators).
    pub serial: String,
    /// The node the certificate was issued to (its CN and DNS SAN).
    pub node: String,
    /// The IP SANs.
    pub ips: Vec<IpAddr>,
    /// Start of validity (RFC 3339, UTC).
    pub not_before: String,
    /// End of validity (RFC 3339, UTC).
    pub not_after: String,
    /// When the certificate was issued (RFC 3339, UTC).
    pub issued_at: String,
}

impl IssuedEntry {
    /// The ledger entry of a certificate issued to `node` at `issued_at`.
    pub fn new(node: &str, cert: &CertInfo, issued_at: OffsetDateTime) -> Self {
        Self {
            serial: cert.serial.clone(),
            node: node.to_owned(),
            ips: cert.ips.clone(),
            not_before: info::rfc3339(cert.not_before),
            not_after: info::rfc3339(cert.not_after),
            issued_at: info::rfc3339(issued_at),
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        let canonical = crate::crl::parse_serial(&self.serial).map_err(|e| e.to_string())?;
        if canonical != self.serial {
            return Err(format!(
                "serial {:?} is not in canonical form (expected {canonical:?})",
                self.serial
            ));
        }
        crate::validate_node_name(&self.node).map_err(|e| e.to_string())?;
        for (field, value) in [
            ("notBefore", &self.not_before),
            ("notAfter", &self.not_after),
            ("issuedAt", &self.issued_at),
        ] {
            OffsetDateTime::parse(value, &Rfc3339)
                .map_err(|e| format!("{field} {value:?} is not an RFC 3339 time: {e}"))?;
        }
        Ok(())
    }
}

/// Path of the ledger of the CA in `ca_dir`.
pub fn ledger_path(ca_dir: &Path) -> PathBuf {
    ca_dir.join(LEDGER_FILE)
}

/// Reads the issuance ledger of the CA in `ca_dir`, oldest first.
///
/// A missing ledger (a CA older than the ledger, or that issued nothing yet) reads as empty.
/// Blank lines are skipped; any other line that is not a valid entry (JSON, canonical serial,
/// node name, RFC 3339 times) is an [`Error::Ledger`] naming the file and line number.
pub fn read_ledger(ca_dir: &Path) -> Result<Vec<IssuedEntry>> {
    let path = ledger_path(ca_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read", path, e)),
    };
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| Error::Ledger {
            path: path.clone(),
            line: i + 1,
            reason,
        };
        let entry: IssuedEntry = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        entry.check().map_err(bad)?;
        entries.push(entry);
    }
    Ok(entries)
}

/// Appends one entry to the ledger, creating it (mode 0644) if missing.
///
/// The line is written with one `write` on an `O_APPEND` descriptor and synced, so
/// concurrent issuers do not interleave lines.
pub(crate) fn append(ca_dir: &Path, entry: &IssuedEntry) -> Result<()> {
    let path = ledger_path(ca_dir);
    let line = serde_json::to_string(entry)
        .map_err(|e| Error::io("encode entry for", &path, std::io::Error::other(e)))?;
    append_line(&path, &line, 0o644)
}

/// Appends `line` and a newline to `path`, creating it with exactly `mode` if missing.
///
/// The line is written with one `write` on an `O_APPEND` descriptor and synced, so
/// concurrent writers do not interleave lines.
pub(crate) fn append_line(path: &Path, line: &str, mode: u32) -> Result<()> {
    let mut line = line.to_owned();
    line.push('\n');
    let (mut file, created) = match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
            OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|e| Error::io("open", path, e))?,
            false,
        ),
        Err(e) => return Err(Error::io("create", path, e)),
    };
    if created {
        // The umask may have cleared bits of a public file; set them exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("set permissions on", path, e))?;
    }
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("append to", path, e))
}
