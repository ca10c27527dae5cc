//! The `encctl` binary end to end: CA and certificate commands, and the errors users see.

use std::path::Path;
use std::process::{Command, Output};

fn encctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_encctl"))
        .args(args)
        .env_remove("ENC_SOCKET")
        .output()
        .expect("run encctl")
}

fn ok(args: &[&str]) -> String {
    let out = encctl(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn err(args: &[&str]) -> String {
    let out = encctl(args);
    assert!(!out.status.success(), "{args:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn ca_issue_inspect_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    let out = d.path().join("certs");
    let text = ok(&["ca", "init", "--out", p(&ca)]);
    assert!(text.contains("ca.key"), "{text}");
    let e = err(&["ca", "init", "--out", p(&ca)]);
    assert!(
        e.contains("ca.key") || e.contains("ca.crt"),
        "overwrite refusal must name the file: {e}"
    );

    ok(&[
        "cert",
        "issue",
        "--ca",
        p(&ca),
        "--node",
        "node-1",
        "--ip",
        "10.0.0.1",
        "--ip",
        "fd00::1",
        "--days",
        "3",
        "--out",
        p(&out),
    ]);
    let crt = out.join("node-1.crt");
    let text = ok(&["cert", "inspect", p(&crt)]);
    for want in [
        "CN=node-1",
        "DNS:node-1",
        "IP:10.0.0.1",
        "IP:fd00::1",
        "enc cluster CA",
        "sha256",
    ] {
        assert!(text.contains(want), "inspect lacks {want}:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["cert", "inspect", p(&crt), "-o", "json"])).unwrap();
    assert_eq!(json["dnsNames"][0], "node-1");
    assert_eq!(json["isCa"], false);
    let key = std::fs::read_to_string(out.join("node-1.key")).unwrap();
    assert!(
        !text.contains(key.lines().nth(1).unwrap()),
        "inspect printed key material"
    );
}

#[test]
fn bad_arguments_name_the_value() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    ok(&["ca", "init", "--out", p(&ca)]);
    let out = d.path().join("o");
    let e = err(&[
        "cert",
        "issue",
        "--ca",
        p(&ca),
        "--node",
        "node-1",
        "--ip",
        "10.0.0.300",
        "--out",
        p(&out),
    ]);
    assert!(e.contains("10.0.0.300"), "{e}");
    let e = err(&[
        "cert",
        "issue",
        "--ca",
        p(&ca),
        "--node",
        "Node_1",
        "--ip",
        "10.0.0.1",
        "--out",
        p(&out),
    ]);
    assert!(e.contains("Node_1"), "{e}");
    let e = err(&[
        "cert",
        "issue",
        "--ca",
        p(&ca),
        "--node",
        "node-1",
        "--ip",
        "10.0.0.1",
        "--days",
        "0",
        "--out",
        p(&out),
    ]);
    assert!(e.contains("days") && e.contains('0'), "{e}");
    let e = err(&["cert", "inspect", p(&d.path().join("missing.crt"))]);
    assert!(e.contains("missing.crt"), "{e}");
    let e = err(&["ca", "init", "--out", p(&d.path().join("x")), "--days", "0"]);
    assert!(e.contains("--days"), "{e}");
}

#[test]
fn status_without_agent_says_where_it_looked() {
    let e = err(&["status", "--socket", "/nonexistent/enc.sock"]);
    assert!(
        e.contains("/nonexistent/enc.sock") && e.contains("enc-agent"),
        "{e}"
    );
    let e = err(&["peers", "-o", "yaml"]);
    assert!(e.contains("yaml"), "{e}");
}
