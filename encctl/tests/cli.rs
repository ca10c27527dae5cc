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

#[test]
fn rotate_bad_arguments_name_the_value() {
    let e = err(&["rotate", "--wait", "--timeout", "5x"]);
    assert!(e.contains("5x") && e.contains("--timeout"), "{e}");
    let e = err(&["rotate", "--wait", "--timeout", "0s"]);
    assert!(e.contains("0s") && e.contains("--timeout"), "{e}");
    let e = err(&["rotate", "--peer", ""]);
    assert!(e.contains("--peer"), "{e}");
    let e = err(&["rotate", "--timeout", "30s"]);
    assert!(
        e.contains("--wait"),
        "--timeout without --wait must say so: {e}"
    );
    let e = err(&["rotate", "-o", "yaml"]);
    assert!(e.contains("yaml"), "{e}");
}

#[test]
fn rotate_without_agent_says_where_it_looked() {
    for args in [
        &["rotate", "--socket", "/nonexistent/enc.sock"][..],
        &[
            "rotate",
            "--socket",
            "/nonexistent/enc.sock",
            "--peer",
            "node-2",
            "--wait",
            "--timeout",
            "1s",
            "-o",
            "json",
        ],
    ] {
        let out = encctl(args);
        assert!(!out.status.success(), "{args:?} unexpectedly succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("/nonexistent/enc.sock") && e.contains("enc-agent"),
            "{e}"
        );
    }
}

/// A fake agent on a Unix socket: answers each request with `answer(method, path, body)`
/// and records the requests.
struct FakeAgent {
    socket: std::path::PathBuf,
    requests: std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>,
    _dir: tempfile::TempDir,
}

fn fake_agent(answer: impl Fn(&str, &str, &str) -> (u16, String) + Send + 'static) -> FakeAgent {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind fake agent socket");
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("read request line");
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or_default().to_owned(),
                parts.next().unwrap_or_default().to_owned(),
            );
            let mut len = 0;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).expect("read header");
                if h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().expect("content-length");
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).expect("read body");
            let body = String::from_utf8(body).expect("utf-8 body");
            let (code, answer) = answer(&method, &path, &body);
            log.lock().expect("request log").push((method, path, body));
            let _ = write!(
                stream,
                "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    FakeAgent {
        socket,
        requests,
        _dir: dir,
    }
}

fn rotation(
    side: &str,
    phase: &str,
    outbound: u32,
    inbound: &[u32],
    done: Option<u32>,
    stuck: Option<&str>,
) -> enc_api::RotationInfo {
    enc_api::RotationInfo {
        side: side.into(),
        outbound_epoch: Some(outbound),
        inbound_epochs: inbound.to_vec(),
        phase: phase.into(),
        target_epoch: (phase != "idle").then_some(4),
        phase_age_seconds: Some(1),
        stuck: stuck.map(str::to_owned),
        completed: u64::from(done.is_some()),
        last_completed_epoch: done,
        last_completed_seconds_ago: done.map(|_| 0),
    }
}

fn peers_json(rotations: &[(&str, Option<enc_api::RotationInfo>)]) -> String {
    let peers = rotations
        .iter()
        .enumerate()
        .map(|(i, (name, r))| enc_api::PeerInfo {
            name: (*name).into(),
            address: format!("10.0.0.{}", i + 2).parse().expect("address"),
            pod_cidr: "10.244.2.0/24".into(),
            role: "dial".into(),
            auth: enc_api::AuthState::Authenticated,
            state_age_seconds: 1,
            failures: 0,
            last_success_seconds: None,
            last_failure: None,
            certificate: None,
            key: None,
            wireguard: None,
            ipsec: None,
            rotation: r.clone(),
            datapath_id: i as u16 + 1,
            counters: Default::default(),
        })
        .collect();
    serde_json::to_string(&enc_api::Peers { peers }).expect("encode peers")
}

fn started(peers: &[&str]) -> String {
    serde_json::to_string(&enc_api::RotateResponse {
        rotations: peers
            .iter()
            .map(|p| enc_api::RotationStarted {
                peer: (*p).into(),
                from_epoch: Some(3),
                target_epoch: 4,
            })
            .collect(),
    })
    .expect("encode rotations")
}

#[test]
fn rotate_posts_the_request_and_shows_refusals() {
    let agent = fake_agent(|_, _, body| {
        if body.contains("node-9") {
            (
                404,
                r#"{"error":"no peer named \"node-9\" is expected by this node"}"#.into(),
            )
        } else {
            (200, started(&["node-2", "node-3"]))
        }
    });
    let sock = p(&agent.socket);
    let e = err(&["rotate", "--socket", sock, "--peer", "node-9"]);
    assert!(e.contains("node-9") && e.contains("404"), "{e}");
    let text = ok(&["rotate", "--socket", sock]);
    assert_eq!(
        text,
        "node-2  epoch 3 -> 4  started\nnode-3  epoch 3 -> 4  started\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["rotate", "--socket", sock, "-o", "json"])).unwrap();
    assert_eq!(json["rotations"][1]["peer"], "node-3");
    assert_eq!(json["rotations"][1]["targetEpoch"], 4);
    let reqs = agent.requests.lock().unwrap().clone();
    assert_eq!(
        reqs[0],
        (
            "POST".to_owned(),
            "/v1/rotate".to_owned(),
            r#"{"peer":"node-9"}"#.to_owned()
        )
    );
    assert_eq!(reqs[1].2, "{}");
}

#[test]
fn rotate_wait_prints_every_step_and_names_the_stuck_peer() {
    let polls = std::sync::atomic::AtomicUsize::new(0);
    let stuck = "rotation stuck: no ack since 2026-11-22T08:40:01Z (12s)";
    let agent = fake_agent(move |method, _, _| {
        if method == "POST" {
            return (200, started(&["node-2", "node-3"]));
        }
        let n = polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let node2 = match n {
            0 => rotation("leader", "prepared", 3, &[3, 4], None, None),
            // Skips acked and committed between two polls.
            _ => rotation("leader", "idle", 4, &[4], Some(4), None),
        };
        let node3 = match n {
            0 => rotation("follower", "prepared", 3, &[3, 4], None, None),
            1 => {
                return (
                    200,
                    peers_json(&[("node-2", Some(node2)), ("node-3", None)]),
                );
            }
            _ => rotation("leader", "prepared", 3, &[3, 4], None, Some(stuck)),
        };
        (
            200,
            peers_json(&[("node-2", Some(node2)), ("node-3", Some(node3))]),
        )
    });
    let sock = p(&agent.socket);
    let out = encctl(&["rotate", "--socket", sock, "--wait", "--timeout", "1s"]);
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let steps: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("node-2"))
        .map(|l| l.split("  ").nth(2).unwrap())
        .collect();
    assert_eq!(
        steps,
        ["started", "prepared", "acked", "committed", "retired"],
        "{text}"
    );
    assert!(
        text.contains("node-3  epoch 3 -> 4  session down"),
        "{text}"
    );
    assert!(
        text.contains("node-3  epoch 3 -> 4  session back"),
        "{text}"
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains(&format!(
            "rotation did not finish for node-3 (last step: prepared; {stuck})"
        )) && !e.contains("node-2"),
        "{e}"
    );

    // JSON: one final object instead of progress lines.
    let out = encctl(&[
        "rotate",
        "--socket",
        sock,
        "--wait",
        "--timeout",
        "1s",
        "-o",
        "json",
    ]);
    assert!(!out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["rotations"][0]["done"], true);
    assert_eq!(json["rotations"][0]["lastStep"], "retired");
    assert_eq!(json["rotations"][1]["done"], false);
    assert_eq!(json["rotations"][1]["stuck"], stuck);
}

#[test]
fn rotate_wait_succeeds_when_every_peer_retired() {
    let agent = fake_agent(|method, _, _| {
        if method == "POST" {
            (200, started(&["node-2"]))
        } else {
            (
                200,
                peers_json(&[(
                    "node-2",
                    Some(rotation("follower", "idle", 4, &[4], Some(4), None)),
                )]),
            )
        }
    });
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "rotate",
        "--socket",
        p(&agent.socket),
        "--peer",
        "node-2",
        "--wait",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        json,
        serde_json::json!({"rotations": [{"peer": "node-2", "fromEpoch": 3, "targetEpoch": 4,
            "done": true, "lastStep": "retired", "stuck": null}]})
    );
}

fn issue(ca: &Path, node: &str, addr: &str, out: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&[
        "cert",
        "issue",
        "--ca",
        p(ca),
        "--node",
        node,
        "--ip",
        addr,
        "--out",
        p(out),
        "-o",
        "json",
    ]))
    .expect("cert issue -o json prints JSON")
}

#[test]
fn revoke_a_node_and_inspect_the_list() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    ok(&["ca", "init", "--out", p(&ca)]);
    let first = issue(&ca, "node-1", "10.0.0.1", &d.path().join("a"));
    let second = issue(&ca, "node-1", "10.0.0.1", &d.path().join("b"));
    let other = issue(&ca, "node-2", "10.0.0.2", &d.path().join("a"));
    let s1 = first["serial"].as_str().unwrap();
    let s2 = second["serial"].as_str().unwrap();
    let s3 = other["serial"].as_str().unwrap();
    assert_ne!(s1, s2);

    let text = ok(&["revoke", "--ca", p(&ca), "--node", "node-1"]);
    let crl = ca.join("crl.pem");
    for want in [
        "revoked 2 certificate(s)",
        s1,
        s2,
        "number 1",
        &format!("distribute it with: encctl crl push {}", p(&crl)),
    ] {
        assert!(text.contains(want), "revoke output lacks {want:?}:\n{text}");
    }
    assert!(!text.contains(s3), "{text}");

    let text = ok(&["crl", "inspect", p(&crl), "--ca", p(&ca.join("ca.crt"))]);
    for want in [
        "CN=enc cluster CA",
        "number:       1",
        "verified against",
        s1,
        s2,
    ] {
        assert!(text.contains(want), "inspect lacks {want:?}:\n{text}");
    }
    assert!(!text.contains(s3), "{text}");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "crl",
        "inspect",
        p(&crl),
        "--ca",
        p(&ca.join("ca.crt")),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["number"], 1);
    assert_eq!(json["signatureVerified"], true);
    let listed: Vec<&str> = json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["serial"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [s1, s2]);
    let text = ok(&["crl", "inspect", p(&crl)]);
    assert!(text.contains("not checked"), "{text}");

    // Again, plus node-2's serial with colons in upper case: one new, two already there.
    let colons = s3
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "revoke",
        "--ca",
        p(&ca),
        "--node",
        "node-1",
        "--serial",
        &colons,
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["written"], true);
    assert_eq!(json["added"], serde_json::json!([s3]));
    assert_eq!(json["alreadyRevoked"], serde_json::json!([s1, s2]));
    assert_eq!(json["crl"]["number"], 2);
    let text = ok(&["revoke", "--ca", p(&ca), "--serial", s3]);
    assert!(
        text.contains("nothing new") && text.contains("unchanged"),
        "{text}"
    );

    // Checked against another CA, the list is refused.
    let other_ca = d.path().join("other");
    ok(&["ca", "init", "--out", p(&other_ca)]);
    let e = err(&[
        "crl",
        "inspect",
        p(&crl),
        "--ca",
        p(&other_ca.join("ca.crt")),
    ]);
    assert!(e.contains("crl.pem") && e.contains("signature"), "{e}");
}

#[test]
fn revoke_errors_name_the_bad_value() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    ok(&["ca", "init", "--out", p(&ca)]);
    issue(&ca, "node-1", "10.0.0.1", &d.path().join("a"));

    let e = err(&["revoke", "--ca", p(&ca), "--node", "unknown"]);
    assert!(
        e.contains("\"unknown\"") && e.contains("issued.jsonl"),
        "{e}"
    );
    let e = err(&["revoke", "--ca", p(&ca), "--serial", "zz"]);
    assert!(e.contains("zz") && e.contains("--serial"), "{e}");
    let e = err(&["revoke", "--ca", p(&ca)]);
    assert!(e.contains("--serial") && e.contains("--node"), "{e}");
    let missing = d.path().join("missing");
    let e = err(&["revoke", "--ca", p(&missing), "--serial", "4a"]);
    assert!(e.contains(&format!("{}/ca.crt", p(&missing))), "{e}");
    assert!(!ca.join("crl.pem").exists(), "a failed revoke wrote a list");

    let e = err(&["crl", "inspect", p(&ca.join("ca.crt"))]);
    assert!(e.contains("ca.crt") && e.contains("CRL"), "{e}");
    let e = err(&["crl", "inspect", p(&d.path().join("none.pem"))]);
    assert!(e.contains("none.pem"), "{e}");
}

/// `encctl token create -o json` for node-1 at 10.0.0.1: the token and its details.
fn create_token(ca: &Path, ttl: &str) -> (String, serde_json::Value) {
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "token",
        "create",
        "--ca",
        p(ca),
        "--node",
        "node-1",
        "--ip",
        "10.0.0.1",
        "--ttl",
        ttl,
        "-o",
        "json",
    ]))
    .expect("token create -o json prints JSON");
    let token = json["token"]
        .as_str()
        .expect("JSON has the token")
        .to_owned();
    (token, json)
}

#[test]
fn enrol_with_a_join_token_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    let node_dir = d.path().join("node");
    ok(&["ca", "init", "--out", p(&ca)]);

    let text = ok(&[
        "token",
        "create",
        "--ca",
        p(&ca),
        "--node",
        "node-1",
        "--ip",
        "10.0.0.1",
        "--ip",
        "fd00::1",
        "--ttl",
        "2h",
    ]);
    let secret = text
        .split_whitespace()
        .find(|w| w.starts_with("enc1."))
        .unwrap_or_else(|| panic!("no token printed:\n{text}"))
        .to_owned();
    for want in [
        "node-1",
        "10.0.0.1",
        "fd00::1",
        "expires",
        "encctl cert request",
        "encctl cert sign",
    ] {
        assert!(text.contains(want), "token create lacks {want}:\n{text}");
    }
    let id = text.split_whitespace().nth(3).unwrap().to_owned();
    assert_eq!(id.len(), 8, "{text}");

    // On the node: key and request, never overwritten.
    let text = ok(&[
        "cert",
        "request",
        "--node",
        "node-1",
        "--ip",
        "10.0.0.1",
        "--out",
        p(&node_dir),
    ]);
    assert!(
        text.contains("node-1.key") && text.contains("node-1.csr"),
        "{text}"
    );
    let key = node_dir.join("node-1.key");
    let csr = node_dir.join("node-1.csr");
    use std::os::unix::fs::PermissionsExt;
    let mode = |f: &Path| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&csr), 0o644);
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let e = err(&[
        "cert",
        "request",
        "--node",
        "node-1",
        "--ip",
        "10.0.0.1",
        "--out",
        p(&node_dir),
    ]);
    assert!(e.contains("node-1.key") && e.contains("overwrite"), "{e}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), key_pem);

    // With the CA: sign, the token read from a file.
    let token_file = d.path().join("token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    let token_arg = format!("@{}", p(&token_file));
    let signed = d.path().join("signed");
    let text = ok(&[
        "cert",
        "sign",
        "--ca",
        p(&ca),
        "--csr",
        p(&csr),
        "--token",
        &token_arg,
        "--out",
        p(&signed),
    ]);
    assert!(text.contains(&id) && text.contains("node-1.crt"), "{text}");
    let crt = signed.join("node-1.crt");
    let inspect = ok(&["cert", "inspect", p(&crt)]);
    for want in ["CN=node-1", "DNS:node-1", "IP:10.0.0.1", "enc cluster CA"] {
        assert!(inspect.contains(want), "inspect lacks {want}:\n{inspect}");
    }
    assert!(!inspect.contains("fd00::1"), "{inspect}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["cert", "inspect", p(&crt), "-o", "json"])).unwrap();
    let (nb, na) = (
        time::OffsetDateTime::parse(
            json["notBefore"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap(),
        time::OffsetDateTime::parse(
            json["notAfter"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap(),
    );
    assert_eq!(
        na - nb,
        time::Duration::hours(24) + time::Duration::minutes(5),
        "default lifetime 24h"
    );
    // The certificate is in the issuance ledger, so it can be revoked by node name.
    let ledger = std::fs::read_to_string(ca.join("issued.jsonl")).unwrap();
    assert!(
        ledger.contains(json["serial"].as_str().unwrap()),
        "{ledger}"
    );

    // The token is single use.
    let e = err(&[
        "cert",
        "sign",
        "--ca",
        p(&ca),
        "--csr",
        p(&csr),
        "--token",
        &secret,
        "--out",
        p(&d.path().join("again")),
    ]);
    assert!(
        e.contains("already used") && e.contains("node-1") && e.contains(&id),
        "{e}"
    );
    assert!(!d.path().join("again").join("node-1.crt").exists());

    // Listing shows it used, and the secret is nowhere but in what create printed.
    let list = ok(&["token", "list", "--ca", p(&ca)]);
    assert!(list.contains(&id) && list.contains("used"), "{list}");
    let list_json = ok(&["token", "list", "--ca", p(&ca), "-o", "json"]);
    let body = &secret["enc1.".len()..];
    for (what, text) in [
        ("token list", &list),
        ("token list -o json", &list_json),
        (
            "tokens.jsonl",
            &std::fs::read_to_string(ca.join("tokens.jsonl")).unwrap(),
        ),
        ("cert sign", &text),
        ("reuse error", &e),
    ] {
        assert!(!text.contains(body), "{what} shows the secret:\n{text}");
    }
    assert!(
        !text.contains(key_pem.lines().nth(1).unwrap()),
        "sign printed key material"
    );
}

#[test]
fn enrol_refusals_are_clear_and_leave_the_token_usable() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    ok(&["ca", "init", "--out", p(&ca)]);
    let (secret, json) = create_token(&ca, "1m");
    let id = json["id"].as_str().unwrap().to_owned();
    assert_eq!(json["node"], "node-1");

    // A request for another node is refused, naming the SAN and what the token allows.
    let node2 = d.path().join("n2");
    ok(&[
        "cert",
        "request",
        "--node",
        "node-2",
        "--ip",
        "10.0.0.1",
        "--out",
        p(&node2),
    ]);
    let e = err(&[
        "cert",
        "sign",
        "--ca",
        p(&ca),
        "--csr",
        p(&node2.join("node-2.csr")),
        "--token",
        &secret,
        "--out",
        p(&node2),
    ]);
    assert!(
        e.contains("DNS:node-2") && e.contains("allows DNS:node-1, IP:10.0.0.1"),
        "{e}"
    );
    let list = ok(&["token", "list", "--ca", p(&ca)]);
    assert!(
        list.contains("unused"),
        "refused request used the token:\n{list}"
    );

    // An unknown token and a missing token file are named.
    let other = d.path().join("other");
    ok(&["ca", "init", "--out", p(&other)]);
    let (foreign, foreign_json) = create_token(&other, "1h");
    let foreign_id = foreign_json["id"].as_str().unwrap().to_owned();
    let node1 = d.path().join("n1");
    ok(&[
        "cert",
        "request",
        "--node",
        "node-1",
        "--ip",
        "10.0.0.1",
        "--out",
        p(&node1),
    ]);
    let csr = node1.join("node-1.csr");
    let e = err(&[
        "cert",
        "sign",
        "--ca",
        p(&ca),
        "--csr",
        p(&csr),
        "--token",
        &foreign,
        "--out",
        p(&node1),
    ]);
    assert!(e.contains("unknown join token"), "{e}");
    let e = err(&[
        "cert",
        "sign",
        "--ca",
        p(&ca),
        "--csr",
        p(&csr),
        "--token",
        &format!("@{}", p(&d.path().join("missing-token"))),
        "--out",
        p(&node1),
    ]);
    assert!(e.contains("missing-token"), "{e}");

    // Expiry, without waiting: the CLI has no clock to inject, so the token's recorded
    // expiry is moved into the past.
    let file = ca.join("tokens.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let expires = json["expiresAt"].as_str().unwrap();
    std::fs::write(&file, text.replace(expires, "2020-01-01T00:00:00Z")).unwrap();
    let e = err(&[
        "cert",
        "sign",
        "--ca",
        p(&ca),
        "--csr",
        p(&csr),
        "--token",
        &secret,
        "--out",
        p(&node1),
    ]);
    assert!(
        e.contains("expired at 2020-01-01T00:00:00Z") && e.contains(&id),
        "{e}"
    );
    let list = ok(&["token", "list", "--ca", p(&ca)]);
    assert!(list.contains("expired"), "{list}");
    assert!(!node1.join("node-1.crt").exists());

    // Bad arguments name the option.
    let e = err(&[
        "token",
        "create",
        "--ca",
        p(&ca),
        "--node",
        "node-1",
        "--ip",
        "10.0.0.1",
        "--ttl",
        "30s",
    ]);
    assert!(e.contains("--ttl") && e.contains("30s"), "{e}");
    let e = err(&[
        "token",
        "create",
        "--ca",
        p(&ca),
        "--node",
        "Node_1",
        "--ip",
        "10.0.0.1",
    ]);
    assert!(e.contains("Node_1"), "{e}");
    let e = err(&[
        "cert",
        "sign",
        "--ca",
        p(&ca),
        "--csr",
        p(&csr),
        "--token",
        &secret,
        "--lifetime",
        "9s",
        "--out",
        p(&node1),
    ]);
    assert!(
        e.contains("--lifetime") && e.contains("at least 10s"),
        "{e}"
    );
    let e = err(&["token", "list", "--ca", p(&d.path().join("nothing"))]);
    assert!(e.contains("nothing/ca.crt"), "{e}");
    assert!(ok(&["token", "list", "--ca", p(&other)]).contains(&foreign_id));
}
