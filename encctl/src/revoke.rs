//! Text output of `encctl revoke` and `encctl crl inspect`.

use std::fmt::Write;
use std::path::Path;

use enc_certs::{CrlInfo, IssuedEntry, RevokeOutcome};
use time::OffsetDateTime;

/// `encctl revoke` text: what was added, what was already there, the list and how to ship it.
///
/// `ledger` annotates serials with the node they were issued to (empty when unreadable).
pub fn outcome_text(out: &RevokeOutcome, ledger: &[IssuedEntry]) -> String {
    let node_of = |serial: &str| {
        ledger
            .iter()
            .find(|e| e.serial == serial)
            .map_or("-", |e| e.node.as_str())
    };
    let serial_lines = |s: &mut String, serials: &[String]| {
        for serial in serials {
            let _ = writeln!(s, "  {serial}  {}", node_of(serial));
        }
    };
    let mut s = String::new();
    if out.written {
        let _ = writeln!(s, "revoked {} certificate(s):", out.added.len());
        serial_lines(&mut s, &out.added);
    } else {
        s.push_str("nothing new to revoke\n");
    }
    if !out.already_revoked.is_empty() {
        let _ = writeln!(s, "already revoked ({}):", out.already_revoked.len());
        serial_lines(&mut s, &out.already_revoked);
    }
    if !out.not_in_ledger.is_empty() {
        let _ = writeln!(
            s,
            "not in the issuance ledger (revoked anyway; certificates issued before the ledger are not listed): {}",
            out.not_in_ledger.join(", ")
        );
    }
    let crl = out.crl.info();
    let _ = writeln!(
        s,
        "CRL {}{}: number {}, {} revoked, next update {}",
        out.path.display(),
        if out.written { "" } else { " unchanged" },
        crl.number,
        crl.entries.len(),
        crl.next_update.map_or_else(|| "-".to_owned(), rfc3339),
    );
    let _ = writeln!(
        s,
        "distribute it with: encctl crl push {}",
        out.path.display()
    );
    s
}

/// `encctl crl inspect` text. `verified` is the CA file the signature was checked against.
pub fn crl_text(crl: &CrlInfo, verified: Option<&Path>, now: OffsetDateTime) -> String {
    let next = match crl.next_update {
        Some(t) if t < now => format!("{} (passed)", rfc3339(t)),
        Some(t) => rfc3339(t),
        None => "-".to_owned(),
    };
    let signature = match verified {
        Some(ca) => format!("verified against {}", ca.display()),
        None => "not checked (pass --ca CA_CERT_FILE)".to_owned(),
    };
    let mut s = format!(
        "  issuer:       {}\n  number:       {}\n  this update:  {}\n  next update:  {}\n  sha256:       {}\n  signature:    {}\n  revoked:      {}\n",
        crl.issuer,
        crl.number,
        rfc3339(crl.this_update),
        next,
        crl.sha256_fingerprint,
        signature,
        crl.entries.len(),
    );
    for e in &crl.entries {
        let _ = writeln!(s, "    {}  revoked {}", e.serial, e.revoked_at);
    }
    s
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
