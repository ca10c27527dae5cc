//! CA side of revocation: [`revoke`] adds serials to the CA's CRL, `<ca_dir>/crl.pem`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use time::Duration;

use crate::ca::{self, CertificateAuthority};
use crate::crl::{self, RevocationList, RevokedEntry, parse_serial, sign_crl};
use crate::info;
use crate::ledger::{self, read_ledger};
use crate::{Error, Result};

/// File name of the CA's certificate revocation list inside a CA directory.
pub const CRL_FILE: &str = "crl.pem";
/// How long a list is declared valid (its nextUpdate); peers keep using it after that.
pub const CRL_VALIDITY: Duration = Duration::days(365);
/// Lock file serialising [`revoke`] runs on one CA directory.
const LOCK_FILE: &str = ".crl.lock";
/// Temporary file a new list is written to before it is renamed over [`CRL_FILE`].
const TEMP_FILE: &str = ".crl.pem.tmp";

/// What to revoke: serials and/or every certificate the ledger lists for some nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevokeRequest {
    /// Serials, hex with or without colons (see [`parse_serial`]).
    pub serials: Vec<String>,
    /// Node names; each resolves to every serial the issuance ledger lists for it.
    pub nodes: Vec<String>,
}

/// What [`revoke`] did.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokeOutcome {
    /// The CRL file, `<ca_dir>/crl.pem`.
    pub path: PathBuf,
    /// Whether a new list was signed and written (false when nothing was new).
    pub written: bool,
    /// The list now in `path` (the new one, or the unchanged existing one).
    pub crl: RevocationList,
    /// Serials this call added to the list (canonical [`CertInfo::serial`](crate::CertInfo) form).
    pub added: Vec<String>,
    /// Requested serials the list already held.
    pub already_revoked: Vec<String>,
    /// Requested serials (given with `serials`) the issuance ledger does not list; they are
    /// revoked anyway, as certificates issued before the ledger existed are not in it.
    pub not_in_ledger: Vec<String>,
}

/// Path of the CRL of the CA in `ca_dir`.
pub fn crl_path(ca_dir: &Path) -> PathBuf {
    ca_dir.join(CRL_FILE)
}

/// Revokes certificates of the CA in `ca_dir`: resolves `req` against the issuance ledger,
/// merges with the existing `<ca_dir>/crl.pem` (verified against the CA certificate; a list
/// that does not verify is an error, never overwritten), and when anything is new signs a
/// list with the next CRL number (the first is 1), thisUpdate now and nextUpdate now + 365
/// days, and writes it atomically (temporary file, then rename), mode 0644.
///
/// When every requested serial is already revoked, nothing is written and the outcome says
/// so (`written: false`). Errors: an empty request, a bad serial ([`Error::InvalidField`]),
/// a node the ledger does not know ([`Error::UnknownNode`]), a missing or unusable CA, a bad
/// ledger line, I/O (naming the file). Concurrent calls on one directory are serialised by a
/// lock on `<ca_dir>/.crl.lock`.
pub fn revoke(ca_dir: &Path, req: &RevokeRequest) -> Result<RevokeOutcome> {
    if req.serials.is_empty() && req.nodes.is_empty() {
        return Err(Error::invalid(
            "request",
            "",
            "name at least one serial or node to revoke",
        ));
    }
    let serials = req
        .serials
        .iter()
        .map(|s| parse_serial(s))
        .collect::<Result<Vec<_>>>()?;
    let ca = CertificateAuthority::load(ca_dir)?;
    let entries = read_ledger(ca_dir)?;

    let mut wanted: Vec<String> = Vec::new();
    let push = |serial: &str, wanted: &mut Vec<String>| {
        if !wanted.iter().any(|w| crl::same_serial(w, serial)) {
            wanted.push(serial.to_owned());
        }
    };
    let mut not_in_ledger = Vec::new();
    for serial in &serials {
        if !entries.iter().any(|e| crl::same_serial(&e.serial, serial)) {
            not_in_ledger.push(serial.clone());
        }
        push(serial, &mut wanted);
    }
    for node in &req.nodes {
        let mut found = false;
        for e in entries.iter().filter(|e| e.node == *node) {
            found = true;
            push(&e.serial, &mut wanted);
        }
        if !found {
            return Err(Error::UnknownNode {
                node: node.clone(),
                ledger: ledger::ledger_path(ca_dir),
            });
        }
    }

    let _lock = lock(ca_dir, LOCK_FILE)?;
    let path = crl_path(ca_dir);
    let existing = match RevocationList::load(&path, std::slice::from_ref(ca.cert_der())) {
        Ok(crl) => Some(crl),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let (already_revoked, added): (Vec<String>, Vec<String>) = wanted
        .into_iter()
        .partition(|s| existing.as_ref().is_some_and(|crl| crl.is_revoked(s)));

    if let Some(crl) = existing.as_ref().filter(|_| added.is_empty()) {
        tracing::info!(path = %path.display(), number = crl.number(), "nothing new to revoke");
        return Ok(RevokeOutcome {
            path,
            written: false,
            crl: crl.clone(),
            added,
            already_revoked,
            not_in_ledger,
        });
    }

    let now = ca::now_secs();
    let revoked_at = info::rfc3339(now);
    let mut list: Vec<RevokedEntry> = existing
        .as_ref()
        .map(|crl| crl.entries().to_vec())
        .unwrap_or_default();
    list.extend(added.iter().map(|serial| RevokedEntry {
        serial: serial.clone(),
        revoked_at: revoked_at.clone(),
    }));
    let number = match &existing {
        Some(crl) => crl.number().checked_add(1).ok_or_else(|| Error::BadCrl {
            origin: path.display().to_string(),
            reason: "CRL number is at its maximum".to_owned(),
        })?,
        None => 1,
    };
    let crl = sign_crl(&ca, number, &list, now, now + CRL_VALIDITY)?;
    write_atomically(ca_dir, &path, crl.pem())?;
    tracing::info!(
        path = %path.display(),
        number,
        added = added.len(),
        total = list.len(),
        "signed certificate revocation list"
    );
    Ok(RevokeOutcome {
        path,
        written: true,
        crl,
        added,
        already_revoked,
        not_in_ledger,
    })
}

/// Takes an exclusive lock on `ca_dir/name` (created if missing), held until the returned
/// file is dropped. Separate opens contend, so this serialises threads as well as processes.
pub(crate) fn lock(ca_dir: &Path, name: &str) -> Result<std::fs::File> {
    let path = ca_dir.join(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .open(&path)
        .map_err(|e| Error::io("create", &path, e))?;
    file.lock().map_err(|e| Error::io("lock", &path, e))?;
    Ok(file)
}

/// Writes `contents` to a temporary file in `dir` (0644, synced) and renames it to `path`,
/// so readers see the old list or the new one, never a part.
fn write_atomically(dir: &Path, path: &Path, contents: &str) -> Result<()> {
    let tmp = dir.join(TEMP_FILE);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale", &tmp, e)),
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io("set permissions on", &tmp, e))?;
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Make the rename durable.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}
