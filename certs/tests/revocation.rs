//! Issuance ledger, `revoke` and CRL parsing/verification on disk.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use enc_certs::{
    CaOptions, CertInfo, CertificateAuthority, Error, NodeCertRequest, RevocationList,
    RevokeRequest, RevokedEntry, init_ca, inspect_crl, issue_node_cert, read_ledger, revoke,
    sign_crl,
};
use rustls_pki_types::CertificateDer;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn req(node: &str, addr: &str) -> NodeCertRequest {
    NodeCertRequest {
        node: node.to_owned(),
        ips: vec![ip(addr)],
        days: 30,
    }
}

/// A CA directory with its CA loaded, and certificates issued through `issue_node_cert`.
struct Dir {
    tmp: tempfile::TempDir,
    n: usize,
}

impl Dir {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(&tmp.path().join("ca"), &CaOptions::default()).unwrap();
        Self { tmp, n: 0 }
    }
    fn ca_dir(&self) -> PathBuf {
        self.tmp.path().join("ca")
    }
    fn ca(&self) -> CertificateAuthority {
        CertificateAuthority::load(&self.ca_dir()).unwrap()
    }
    fn cas(&self) -> Vec<CertificateDer<'static>> {
        vec![self.ca().cert_der().clone()]
    }
    /// Issues a certificate for `node` into a fresh output directory.
    fn issue(&mut self, node: &str, addr: &str) -> CertInfo {
        self.n += 1;
        let out = self.tmp.path().join(format!("out{}", self.n));
        issue_node_cert(&self.ca_dir(), &req(node, addr), &out).unwrap()
    }
    fn crl_path(&self) -> PathBuf {
        self.ca_dir().join("crl.pem")
    }
}

fn serials(req_serials: &[&str], nodes: &[&str]) -> RevokeRequest {
    RevokeRequest {
        serials: req_serials.iter().map(|s| (*s).to_owned()).collect(),
        nodes: nodes.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn colon_upper(serial: &str) -> String {
    serial
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn ledger_records_every_issued_certificate() {
    let mut d = Dir::new();
    assert!(
        read_ledger(&d.ca_dir()).unwrap().is_empty(),
        "no ledger yet"
    );
    let before = OffsetDateTime::now_utc() - Duration::seconds(1);
    let a = d.issue("node-1", "10.0.0.1");
    let b = d.issue("node-1", "10.0.0.1");
    let c = d.issue("node-2", "10.0.0.2");
    let ledger_file = d.ca_dir().join("issued.jsonl");
    assert_eq!(mode(&ledger_file), 0o644);

    let entries = read_ledger(&d.ca_dir()).unwrap();
    assert_eq!(entries.len(), 3);
    for (entry, (info, node)) in
        entries
            .iter()
            .zip([(&a, "node-1"), (&b, "node-1"), (&c, "node-2")])
    {
        assert_eq!(entry.serial, info.serial);
        assert_eq!(entry.node, node);
        assert_eq!(entry.ips, info.ips);
        assert_eq!(
            OffsetDateTime::parse(&entry.not_before, &Rfc3339).unwrap(),
            info.not_before
        );
        assert_eq!(
            OffsetDateTime::parse(&entry.not_after, &Rfc3339).unwrap(),
            info.not_after
        );
        let issued = OffsetDateTime::parse(&entry.issued_at, &Rfc3339).unwrap();
        assert!(issued >= before && issued <= OffsetDateTime::now_utc());
    }
    assert_ne!(entries[0].serial, entries[1].serial);

    // The file format: one JSON object per line with exactly these keys.
    let text = std::fs::read_to_string(&ledger_file).unwrap();
    assert_eq!(text.lines().count(), 3);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mut keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["ips", "issuedAt", "node", "notAfter", "notBefore", "serial"]
    );
    assert_eq!(first["ips"][0], "10.0.0.1");

    // Append-only: a failed issuance (refused overwrite) leaves the ledger alone.
    let out1 = d.tmp.path().join("out1");
    issue_node_cert(&d.ca_dir(), &req("node-1", "10.0.0.1"), &out1).unwrap_err();
    assert_eq!(std::fs::read_to_string(&ledger_file).unwrap(), text);
}

#[test]
fn bad_ledger_lines_are_reported_with_file_and_line() {
    let mut d = Dir::new();
    d.issue("node-1", "10.0.0.1");
    let ledger_file = d.ca_dir().join("issued.jsonl");
    let good = std::fs::read_to_string(&ledger_file).unwrap();
    let line: serde_json::Value = serde_json::from_str(good.trim()).unwrap();

    let mut bad_serial = line.clone();
    bad_serial["serial"] = "zz".into();
    let mut bad_time = line.clone();
    bad_time["issuedAt"] = "yesterday".into();
    let mut bad_node = line.clone();
    bad_node["node"] = "Node_1".into();
    let cases = [
        ("{not json".to_owned(), "key must be a string"),
        (r#"{"serial":"4a"}"#.to_owned(), "missing field"),
        (bad_serial.to_string(), "zz"),
        (bad_time.to_string(), "yesterday"),
        (bad_node.to_string(), "Node_1"),
    ];
    for (bad, want) in cases {
        // Line 1 good, line 2 blank (skipped), line 3 bad.
        std::fs::write(&ledger_file, format!("{good}\n{bad}\n")).unwrap();
        let err = read_ledger(&d.ca_dir()).unwrap_err();
        match &err {
            Error::Ledger { path, line, .. } => {
                assert_eq!(*path, ledger_file, "{err}");
                assert_eq!(*line, 3, "{err}");
            }
            other => panic!("{bad}: unexpected {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("issued.jsonl:3"), "{msg}");
        assert!(msg.contains(want), "{bad}: {msg}");
    }
}

#[test]
fn revoke_by_node_takes_every_certificate_of_the_node() {
    let mut d = Dir::new();
    let a = d.issue("node-1", "10.0.0.1");
    let b = d.issue("node-1", "10.0.0.1");
    let other = d.issue("node-2", "10.0.0.2");
    assert!(!d.crl_path().exists());

    let out = revoke(&d.ca_dir(), &serials(&[], &["node-1"])).unwrap();
    assert!(out.written);
    assert_eq!(out.path, d.crl_path());
    assert_eq!(out.added, vec![a.serial.clone(), b.serial.clone()]);
    assert!(out.already_revoked.is_empty());
    assert!(out.not_in_ledger.is_empty());
    assert_eq!(out.crl.number(), 1);
    assert_eq!(out.crl.issuer(), "CN=enc cluster CA");
    assert!(out.crl.is_revoked(&a.serial));
    assert!(out.crl.is_revoked(&b.serial));
    assert!(!out.crl.is_revoked(&other.serial));
    let next = out.crl.next_update().unwrap();
    let validity = next - out.crl.this_update();
    assert_eq!(validity, Duration::days(365));
    assert!((out.crl.this_update() - OffsetDateTime::now_utc()).abs() < Duration::seconds(5));

    // On disk: mode 0644, verifies against the CA, the same list as returned.
    assert_eq!(mode(&d.crl_path()), 0o644);
    let text = std::fs::read_to_string(d.crl_path()).unwrap();
    assert!(text.starts_with("-----BEGIN X509 CRL-----\n"), "{text}");
    assert_eq!(text, out.crl.pem());
    let loaded = RevocationList::from_pem(&text, &d.cas()).unwrap();
    assert_eq!(loaded.der().as_ref(), out.crl.der().as_ref());
    assert_eq!(loaded.entries(), out.crl.entries());
    assert!(
        !d.ca_dir().join(".crl.pem.tmp").exists(),
        "temporary file left behind"
    );
}

#[test]
fn revoke_merges_increments_and_skips_when_nothing_is_new() {
    let mut d = Dir::new();
    let a = d.issue("node-1", "10.0.0.1");
    let b = d.issue("node-1", "10.0.0.1");
    let c = d.issue("node-2", "10.0.0.2");

    let first = revoke(&d.ca_dir(), &serials(&[&a.serial], &[])).unwrap();
    assert_eq!(first.crl.number(), 1);
    assert_eq!(first.crl.entries().len(), 1);
    let a_entry = first.crl.entries()[0].clone();
    assert_eq!(a_entry.serial, a.serial);

    // Nothing new (serial given in another spelling): no rewrite, outcome says so.
    let bytes = std::fs::read(d.crl_path()).unwrap();
    let mtime = std::fs::metadata(d.crl_path()).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let same = revoke(&d.ca_dir(), &serials(&[&colon_upper(&a.serial)], &[])).unwrap();
    assert!(!same.written);
    assert!(same.added.is_empty());
    assert_eq!(same.already_revoked, vec![a.serial.clone()]);
    assert_eq!(same.crl.number(), 1);
    assert_eq!(std::fs::read(d.crl_path()).unwrap(), bytes);
    assert_eq!(
        std::fs::metadata(d.crl_path()).unwrap().modified().unwrap(),
        mtime
    );

    // Node-1 now: only b is new; a keeps its entry (and revocation time).
    let second = revoke(&d.ca_dir(), &serials(&[], &["node-1"])).unwrap();
    assert!(second.written);
    assert_eq!(second.crl.number(), 2);
    assert_eq!(second.added, vec![b.serial.clone()]);
    assert_eq!(second.already_revoked, vec![a.serial.clone()]);
    assert_eq!(second.crl.entries()[0], a_entry);
    assert_eq!(second.crl.entries()[1].serial, b.serial);

    // A serial the ledger does not know is accepted, and reported.
    let third = revoke(&d.ca_dir(), &serials(&["7f:00:01", &c.serial], &[])).unwrap();
    assert_eq!(third.crl.number(), 3);
    assert_eq!(third.added, vec!["7f0001".to_owned(), c.serial.clone()]);
    assert_eq!(third.not_in_ledger, vec!["7f0001".to_owned()]);
    let all: Vec<&str> = third
        .crl
        .entries()
        .iter()
        .map(|e| e.serial.as_str())
        .collect();
    assert_eq!(
        all,
        [
            a.serial.as_str(),
            b.serial.as_str(),
            "7f0001",
            c.serial.as_str()
        ]
    );
    // The list on disk is the third one.
    let loaded = RevocationList::load(&d.crl_path(), &d.cas()).unwrap();
    assert_eq!(loaded.number(), 3);
}

#[test]
fn revoke_refuses_bad_requests_without_touching_the_list() {
    let mut d = Dir::new();
    let a = d.issue("node-1", "10.0.0.1");
    revoke(&d.ca_dir(), &serials(&[&a.serial], &[])).unwrap();
    let bytes = std::fs::read(d.crl_path()).unwrap();

    let err = revoke(&d.ca_dir(), &serials(&[], &["node-9"])).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownNode { node, .. } if node == "node-9"),
        "{err}"
    );
    assert!(err.to_string().contains("\"node-9\""), "{err}");
    // A known node does not excuse an unknown one in the same request.
    let err = revoke(&d.ca_dir(), &serials(&[], &["node-1", "node-9"])).unwrap_err();
    assert!(matches!(&err, Error::UnknownNode { .. }), "{err}");

    let err = revoke(&d.ca_dir(), &serials(&["zz"], &[])).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidField { field: "serial", value, .. } if value == "zz"),
        "{err}"
    );
    let err = revoke(&d.ca_dir(), &RevokeRequest::default()).unwrap_err();
    assert!(matches!(&err, Error::InvalidField { .. }), "{err}");
    assert_eq!(std::fs::read(d.crl_path()).unwrap(), bytes);

    // Missing CA: the error names the CA certificate it looked for.
    let missing = d.tmp.path().join("nope");
    let err = revoke(&missing, &serials(&["4a"], &[])).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("nope/ca.crt")),
        "{err}"
    );

    // A corrupt or foreign crl.pem is an error naming it, never overwritten.
    std::fs::write(d.crl_path(), "garbage").unwrap();
    let err = revoke(&d.ca_dir(), &serials(&["4a"], &[])).unwrap_err();
    assert!(err.to_string().contains("crl.pem"), "{err}");
    assert_eq!(std::fs::read_to_string(d.crl_path()).unwrap(), "garbage");
    let other = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let now = OffsetDateTime::now_utc();
    let foreign = sign_crl(&other, 7, &[], now, now + Duration::days(1)).unwrap();
    std::fs::write(d.crl_path(), foreign.pem()).unwrap();
    let err = revoke(&d.ca_dir(), &serials(&["4a"], &[])).unwrap_err();
    assert!(err.is_untrusted_crl(), "{err}");
    assert!(err.to_string().contains("crl.pem"), "{err}");
}

fn entry(serial: &str) -> RevokedEntry {
    RevokedEntry {
        serial: serial.to_owned(),
        revoked_at: "2026-01-02T03:04:05Z".to_owned(),
    }
}

fn signed(ca: &CertificateAuthority, entries: &[RevokedEntry]) -> RevocationList {
    let now = OffsetDateTime::now_utc();
    sign_crl(ca, 5, entries, now, now + Duration::days(1)).unwrap()
}

fn pem_of(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<String> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    format!(
        "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
        body.join("\n")
    )
}

fn position(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

#[test]
fn from_pem_verifies_issuer_and_signature() {
    let ca = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let same_name = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let other = CertificateAuthority::generate(&CaOptions {
        common_name: "other CA".into(),
        days: 30,
    })
    .unwrap();
    let cas = vec![ca.cert_der().clone()];
    let good = signed(&ca, &[entry("4a3f01"), entry("0080")]);
    let parsed = RevocationList::from_pem(good.pem(), &cas).unwrap();
    assert_eq!(parsed.number(), 5);
    assert_eq!(parsed.entries(), &[entry("4a3f01"), entry("0080")]);
    // Accepted when the right CA is anywhere in the bundle.
    let bundle = vec![other.cert_der().clone(), ca.cert_der().clone()];
    RevocationList::from_pem(good.pem(), &bundle).unwrap();
    RevocationList::from_der(good.der().as_ref(), &bundle).unwrap();

    // Signed by a CA of another name: no issuer.
    let foreign = signed(&other, &[entry("4a3f01")]);
    let err = RevocationList::from_pem(foreign.pem(), &cas).unwrap_err();
    assert!(
        matches!(&err, Error::CrlIssuerUnknown { issuer, .. } if issuer == "CN=other CA"),
        "{err}"
    );
    assert!(err.is_untrusted_crl());
    // Signed by another key with the cluster CA's name: bad signature.
    let impostor = signed(&same_name, &[entry("4a3f01")]);
    let err = RevocationList::from_pem(impostor.pem(), &cas).unwrap_err();
    assert!(matches!(&err, Error::CrlSignature { .. }), "{err}");
    assert!(err.to_string().contains("CN=enc cluster CA"), "{err}");

    // Tampered body: one bit of a revoked serial flipped (still parses).
    let mut der = good.der().as_ref().to_vec();
    let at = position(&der, &[0x02, 0x03, 0x4a, 0x3f, 0x01]);
    der[at + 4] ^= 0x01;
    let tampered = pem_of(&der);
    assert!(inspect_crl(tampered.as_bytes()).unwrap().entries[0].serial == "4a3f00");
    let err = RevocationList::from_pem(&tampered, &cas).unwrap_err();
    assert!(matches!(&err, Error::CrlSignature { .. }), "{err}");
    // Tampered signature: its last byte flipped.
    let mut der = good.der().as_ref().to_vec();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let err = RevocationList::from_pem(&pem_of(&der), &cas).unwrap_err();
    assert!(matches!(&err, Error::CrlSignature { .. }), "{err}");
    let err = RevocationList::from_der(&der, &cas).unwrap_err();
    assert!(matches!(&err, Error::CrlSignature { .. }), "{err}");

    // No CRL number: the extension's OID changed to an unknown one (checked before the
    // signature, so the broken signature does not mask it).
    let mut der = good.der().as_ref().to_vec();
    let at = position(&der, &[0x06, 0x03, 0x55, 0x1d, 0x14]);
    der[at + 4] = 0x7f;
    let err = RevocationList::from_der(&der, &cas).unwrap_err();
    assert!(
        matches!(&err, Error::BadCrl { reason, .. } if reason.contains("CRL number")),
        "{err}"
    );

    // Garbage.
    for (input, label) in [
        ("", "empty"),
        ("not a crl", "text"),
        (ca.cert_pem(), "a certificate"),
    ] {
        let err = RevocationList::from_pem(input, &cas).unwrap_err();
        assert!(matches!(&err, Error::NoCrl { .. }), "{label}: {err}");
    }
    let err = RevocationList::from_pem(
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        &cas,
    )
    .unwrap_err();
    assert!(matches!(&err, Error::CrlParse { .. }), "{err}");
    let err = RevocationList::from_pem(
        "-----BEGIN X509 CRL-----\n!!!!\n-----END X509 CRL-----\n",
        &cas,
    )
    .unwrap_err();
    assert!(matches!(&err, Error::Pem { .. }), "{err}");
    let two = format!("{}{}", good.pem(), good.pem());
    let err = RevocationList::from_pem(&two, &cas).unwrap_err();
    assert!(matches!(&err, Error::BadCrl { .. }), "{err}");
    let err = RevocationList::from_der(b"\x30\x03\x02\x01\x01", &cas).unwrap_err();
    assert!(matches!(&err, Error::CrlParse { .. }), "{err}");

    // Debug is a summary, not the encoding.
    let dbg = format!("{good:?}");
    assert!(
        dbg.contains("number: 5") && dbg.contains("entries: 2"),
        "{dbg}"
    );
    assert!(!dbg.contains("BEGIN") && dbg.len() < 400, "{dbg}");
}

#[test]
fn is_revoked_matches_cert_info_serials() {
    let mut d = Dir::new();
    let a = d.issue("node-1", "10.0.0.1");
    let b = d.issue("node-2", "10.0.0.2");
    let out = revoke(&d.ca_dir(), &serials(&[&colon_upper(&a.serial)], &[])).unwrap();
    // The entry is in CertInfo's format, and every spelling of the serial matches.
    assert_eq!(out.crl.entries()[0].serial, a.serial);
    assert_eq!(out.added, vec![a.serial.clone()]);
    for spelling in [
        a.serial.clone(),
        a.serial.to_ascii_uppercase(),
        colon_upper(&a.serial),
        format!("00{}", a.serial),
    ] {
        assert!(out.crl.is_revoked(&spelling), "{spelling}");
    }
    assert!(!out.crl.is_revoked(&b.serial));
    assert!(!out.crl.is_revoked("zz"));
    assert!(!out.crl.is_revoked(""));
    // The revoked certificate's own CertInfo, read back from its file.
    let info = enc_certs::inspect_file(&d.tmp.path().join("out1/node-1.crt")).unwrap();
    assert!(out.crl.is_revoked(&info.serial));

    // Serials with the top bit set get the DER sign byte, as CertInfo shows them.
    let ca = d.ca();
    let crl = signed(&ca, &[entry("80:01")]);
    assert_eq!(crl.entries()[0].serial, "008001");
    assert!(crl.is_revoked("8001") && crl.is_revoked("008001"));

    // JSON summary.
    let json = serde_json::to_value(&out.crl).unwrap();
    assert_eq!(json["number"], 1);
    assert_eq!(json["entries"][0]["serial"], a.serial.as_str());
    assert!(json["nextUpdate"].as_str().unwrap().ends_with('Z'));
    assert!(
        json["entries"][0]["revokedAt"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
}

#[test]
fn sign_crl_validates_its_input() {
    let ca = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let now = OffsetDateTime::now_utc();
    let err = sign_crl(&ca, 1, &[entry("zz")], now, now + Duration::days(1)).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InvalidField {
                field: "serial",
                ..
            }
        ),
        "{err}"
    );
    let bad_time = RevokedEntry {
        serial: "4a".into(),
        revoked_at: "soon".into(),
    };
    let err = sign_crl(&ca, 1, &[bad_time], now, now + Duration::days(1)).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InvalidField {
                field: "revoked_at",
                ..
            }
        ),
        "{err}"
    );
    let err = sign_crl(&ca, 1, &[], now, now).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InvalidField {
                field: "next_update",
                ..
            }
        ),
        "{err}"
    );
    // An empty list is fine (a CA that revoked nothing yet).
    let empty = sign_crl(&ca, 0, &[], now, now + Duration::days(1)).unwrap();
    assert!(empty.entries().is_empty());
    assert_eq!(
        RevocationList::from_pem(empty.pem(), &[ca.cert_der().clone()])
            .unwrap()
            .number(),
        0
    );
}
