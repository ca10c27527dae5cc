//! On-disk CA and node certificate handling, inspection, and identity loading.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use enc_certs::{
    CaOptions, CertificateAuthority, Error, NodeCertRequest, NodeIdentity, init_ca, inspect,
    inspect_file, issue_node_cert, issue_node_cert_pem,
};
use time::{Duration, OffsetDateTime};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn req(node: &str, ips: &[&str], days: u32) -> NodeCertRequest {
    NodeCertRequest {
        node: node.to_owned(),
        ips: ips.iter().map(|s| ip(s)).collect(),
        days,
    }
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem).unwrap().to_vec()
}

#[test]
fn init_ca_writes_files_with_modes_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/ca");
    let info = init_ca(&out, &CaOptions::default()).unwrap();
    assert!(info.is_ca);
    assert_eq!(info.subject, "CN=enc cluster CA");
    assert_eq!(info.subject, info.issuer);
    assert_eq!(mode(&out.join("ca.crt")), 0o644);
    assert_eq!(mode(&out.join("ca.key")), 0o600);
    let key = std::fs::read_to_string(out.join("ca.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
    let valid = info.not_after - info.not_before;
    assert!(
        (valid - Duration::days(3650) - Duration::minutes(5)).abs() <= Duration::seconds(2),
        "{valid}"
    );
    let crt_before = std::fs::read(out.join("ca.crt")).unwrap();

    let err = init_ca(&out, &CaOptions::default()).unwrap_err();
    assert!(err.is_already_exists(), "{err}");
    assert!(err.to_string().contains("ca.key"), "{err}");
    assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), crt_before);
    assert_eq!(std::fs::read_to_string(out.join("ca.key")).unwrap(), key);

    // Only the certificate left behind: still refused, naming it.
    std::fs::remove_file(out.join("ca.key")).unwrap();
    let err = init_ca(&out, &CaOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists { path } if path.ends_with("ca.crt")),
        "{err}"
    );
    assert!(!out.join("ca.key").exists());
}

#[test]
fn init_ca_rejects_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    for days in [0, 4000] {
        let err = init_ca(
            dir.path(),
            &CaOptions {
                days,
                ..CaOptions::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidField { field: "days", value, .. } if *value == days.to_string()),
            "{err}"
        );
    }
    assert!(!dir.path().join("ca.key").exists());
}

#[test]
fn issue_node_cert_writes_files_and_round_trips_through_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca_info = init_ca(&ca_dir, &CaOptions::default()).unwrap();
    let out = dir.path().join("nodes");
    let before = OffsetDateTime::now_utc();
    let info =
        issue_node_cert(&ca_dir, &req("node-1", &["10.0.0.1", "fd00::1"], 30), &out).unwrap();
    let after = OffsetDateTime::now_utc();
    let crt = out.join("node-1.crt");
    let key = out.join("node-1.key");
    assert_eq!(mode(&crt), 0o644);
    assert_eq!(mode(&key), 0o600);

    let pem = std::fs::read(&crt).unwrap();
    let der = pem_to_der(&pem);
    let from_pem = inspect(&pem).unwrap();
    let from_der = inspect(&der).unwrap();
    let from_file = inspect_file(&crt).unwrap();
    assert_eq!(from_pem, info);
    assert_eq!(from_der, info);
    assert_eq!(from_file, info);

    assert_eq!(info.subject, "CN=node-1");
    assert_eq!(info.issuer, ca_info.subject);
    assert_eq!(info.dns_names, vec!["node-1".to_owned()]);
    assert_eq!(info.ips, vec![ip("10.0.0.1"), ip("fd00::1")]);
    assert!(!info.is_ca);
    assert_eq!(info.sha256_fingerprint, sha256_hex(&der));
    assert_eq!(info.serial.len(), 32, "{}", info.serial);
    assert!(
        info.serial
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_ne!(info.serial, ca_info.serial);
    // not_before is backdated by 5 minutes, not_after is 30 days out (second precision).
    let slack = Duration::seconds(1);
    assert!(info.not_before >= before - Duration::minutes(5) - slack);
    assert!(info.not_before <= after - Duration::minutes(5));
    assert!(info.not_after >= before + Duration::days(30) - slack);
    assert!(info.not_after <= after + Duration::days(30));

    // Serialized times are RFC 3339 strings.
    let json = serde_json::to_value(&info).unwrap();
    let nb = json["notBefore"].as_str().unwrap();
    assert!(nb.ends_with('Z') && nb.contains('T'), "{nb}");
    assert_eq!(json["serial"], info.serial.as_str());

    // Refuses to overwrite, naming the path, leaving the files alone.
    let err = issue_node_cert(&ca_dir, &req("node-1", &["10.0.0.1"], 30), &out).unwrap_err();
    assert!(err.is_already_exists(), "{err}");
    assert!(err.to_string().contains("node-1."), "{err}");
    assert_eq!(std::fs::read(&crt).unwrap(), pem);

    // The written files load as an identity against the written CA.
    let id = NodeIdentity::load(&crt, &key, &ca_dir.join("ca.crt")).unwrap();
    assert_eq!(id.name(), "node-1");
    assert_eq!(id.info(), &info);
    let dbg = format!("{id:?}");
    assert!(
        dbg.contains("redacted") && !dbg.contains("PRIVATE"),
        "{dbg}"
    );
}

#[test]
fn issue_node_cert_validates_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    init_ca(&ca_dir, &CaOptions::default()).unwrap();
    let out = dir.path().join("nodes");
    let long_label = "a".repeat(64);
    let too_long = ["abcdefghi"; 26].join("."); // 259 characters
    let cases: Vec<(NodeCertRequest, &str, String)> = vec![
        (req("Node_1", &["10.0.0.1"], 30), "node", "Node_1".into()),
        (req("", &["10.0.0.1"], 30), "node", String::new()),
        (req(&too_long, &["10.0.0.1"], 30), "node", too_long.clone()),
        (
            req(&long_label, &["10.0.0.1"], 30),
            "node",
            long_label.clone(),
        ),
        (req("-node", &["10.0.0.1"], 30), "node", "-node".into()),
        (req("node..1", &["10.0.0.1"], 30), "node", "node..1".into()),
        (req("node-1", &[], 30), "ips", "[]".into()),
        (req("node-1", &["10.0.0.1"], 0), "days", "0".into()),
        (req("node-1", &["10.0.0.1"], 4000), "days", "4000".into()),
    ];
    for (request, want_field, want_value) in cases {
        let err = issue_node_cert(&ca_dir, &request, &out).unwrap_err();
        match &err {
            Error::InvalidField { field, value, .. } => {
                assert_eq!(*field, want_field, "{err}");
                assert_eq!(*value, want_value, "{err}");
            }
            other => panic!("{request:?}: unexpected error {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(want_field), "{msg}");
        assert!(msg.contains(&format!("{want_value:?}")), "{msg}");
    }
    // Nothing was written.
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
    // Boundaries are accepted.
    issue_node_cert(&ca_dir, &req("a", &["10.0.0.1"], 1), &out).unwrap();
    issue_node_cert(&ca_dir, &req("node-1.example", &["10.0.0.1"], 3650), &out).unwrap();
}

#[test]
fn issue_node_cert_requires_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let err =
        issue_node_cert(dir.path(), &req("node-1", &["10.0.0.1"], 30), dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("ca.crt")),
        "{err}"
    );
}

#[test]
fn ca_load_rejects_mismatched_key() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    init_ca(&a, &CaOptions::default()).unwrap();
    init_ca(&b, &CaOptions::default()).unwrap();
    std::fs::remove_file(a.join("ca.key")).unwrap();
    std::fs::copy(b.join("ca.key"), a.join("ca.key")).unwrap();
    let err = CertificateAuthority::load(&a).unwrap_err();
    assert!(
        matches!(&err, Error::BadCa { origin, .. } if origin.ends_with("ca.key")),
        "{err}"
    );
}

#[test]
fn inspect_rejects_garbage() {
    assert!(matches!(
        inspect(b"not a certificate"),
        Err(Error::Parse { .. })
    ));
    assert!(matches!(
        inspect(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
        Err(Error::NoCertificate { .. })
    ));
}

struct Written {
    dir: tempfile::TempDir,
}

impl Written {
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

#[test]
fn identity_load_rejects_mismatched_key_and_foreign_ca_naming_the_file() {
    let ca = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let other_ca = CertificateAuthority::generate(&CaOptions {
        common_name: "other CA".into(),
        days: 30,
    })
    .unwrap();
    let now = OffsetDateTime::now_utc();
    let window = (now - Duration::minutes(5), now + Duration::days(1));
    let r = req("node-1", &["10.0.0.1"], 1);
    let good = issue_node_cert_pem(&ca, &r, window.0, window.1).unwrap();
    let second = issue_node_cert_pem(&ca, &r, window.0, window.1).unwrap();
    let foreign = issue_node_cert_pem(&other_ca, &r, window.0, window.1).unwrap();
    let expired =
        issue_node_cert_pem(&ca, &r, now - Duration::days(10), now - Duration::days(1)).unwrap();

    let w = Written {
        dir: tempfile::tempdir().unwrap(),
    };
    let ca_path = w.write("ca.crt", ca.cert_pem());
    let cert = w.write("node-1.crt", &good.cert_pem);
    let key = w.write("node-1.key", &good.key_pem);
    let wrong_key = w.write("wrong.key", &second.key_pem);
    let foreign_cert = w.write("foreign.crt", &foreign.cert_pem);
    let foreign_key = w.write("foreign.key", &foreign.key_pem);
    let expired_cert = w.write("expired.crt", &expired.cert_pem);
    let expired_key = w.write("expired.key", &expired.key_pem);

    NodeIdentity::load(&cert, &key, &ca_path).unwrap();

    let err = NodeIdentity::load(&cert, &wrong_key, &ca_path).unwrap_err();
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("wrong.key"), "{err}");

    let err = NodeIdentity::load(&foreign_cert, &foreign_key, &ca_path).unwrap_err();
    match &err {
        Error::Untrusted { origin, reason, .. } => {
            assert!(origin.ends_with("foreign.crt"), "{err}");
            assert_eq!(*reason, enc_certs::AuthFailure::UnknownCa);
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("foreign.crt"), "{err}");

    let err = NodeIdentity::load(&expired_cert, &expired_key, &ca_path).unwrap_err();
    assert!(
        matches!(&err, Error::Untrusted { origin, reason: enc_certs::AuthFailure::Expired { .. }, .. } if origin.ends_with("expired.crt")),
        "{err}"
    );

    // A bundle with several CAs is accepted.
    let bundle = w.write(
        "bundle.crt",
        &format!("{}{}", other_ca.cert_pem(), ca.cert_pem()),
    );
    NodeIdentity::load(&cert, &key, &bundle).unwrap();
    NodeIdentity::load(&foreign_cert, &foreign_key, &bundle).unwrap();

    // Missing file: the I/O error names it.
    let missing = w.path("missing.key");
    let err = NodeIdentity::load(&cert, &missing, &ca_path).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if *path == missing),
        "{err}"
    );
}

#[test]
fn debug_output_redacts_keys() {
    let ca = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let now = OffsetDateTime::now_utc();
    let issued = issue_node_cert_pem(
        &ca,
        &req("node-1", &["10.0.0.1"], 1),
        now,
        now + Duration::days(1),
    )
    .unwrap();
    for dbg in [format!("{ca:?}"), format!("{issued:?}")] {
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
        assert!(dbg.contains("redacted"), "{dbg}");
    }
}
