//! Enrolment with join tokens: token creation and redemption, CSR checks, signing, and a
//! real handshake between an enrolled node and a node issued the classic way.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use base64::Engine;
use enc_certs::{
    CaOptions, CertificateAuthority, Error, ExpectedPeer, NodeCertRequest, NodeIdentity,
    TOKENS_FILE, TokenRequest, TokenState, client_config, create_token, generate_csr,
    issue_node_cert, list_tokens, read_ledger, redeem_token, request_node_cert, server_config,
    server_name, sign_csr, sign_csr_to_dir,
};
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConnection, ServerConnection};
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(86_400);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A CA directory (as `encctl ca init` makes it).
fn ca_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    enc_certs::init_ca(dir.path(), &CaOptions::default()).unwrap();
    dir
}

fn token_req(node: &str, ips: &[&str], ttl: Duration) -> TokenRequest {
    TokenRequest {
        node: node.into(),
        ips: ips.iter().map(|s| ip(s)).collect(),
        ttl,
    }
}

fn state_of(ca: &Path, id: &str) -> TokenState {
    list_tokens(ca, now())
        .unwrap()
        .into_iter()
        .find(|t| t.info.id == id)
        .unwrap()
        .state
}

/// A CSR for arbitrary names, signed by a fresh P-256 key.
fn custom_csr(cn: Option<&str>, sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[test]
fn token_is_created_redeemed_once_and_never_stored() {
    let ca = ca_dir();
    let t0 = now();
    let new = create_token(
        ca.path(),
        &token_req("node-1", &["10.0.0.1", "fd00::1", "10.0.0.1"], DAY),
        t0,
    )
    .unwrap();
    assert!(new.secret.starts_with("enc1."), "{}", new.secret.len());
    assert_eq!(new.secret.len(), 5 + 43);
    assert_eq!(new.info.node, "node-1");
    assert_eq!(
        new.info.ips,
        vec![ip("10.0.0.1"), ip("fd00::1")],
        "deduplicated"
    );
    assert_eq!(new.info.id.len(), 8);
    assert_eq!(
        (new.info.expires_at - new.info.created_at).whole_seconds(),
        86_400
    );
    let debug = format!("{new:?}");
    assert!(!debug.contains(&new.secret[5..]), "Debug shows the secret");

    let file = ca.path().join(TOKENS_FILE);
    assert_eq!(mode(&file), 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains(&new.secret[5..]),
        "token file holds the secret"
    );
    let hash = ring::digest::digest(&ring::digest::SHA256, new.secret.as_bytes());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert!(text.contains(&hex), "token file lacks the hash: {text}");
    assert!(hex.starts_with(&new.info.id));
    assert_eq!(state_of(ca.path(), &new.info.id), TokenState::Unused);

    let redeemed = redeem_token(ca.path(), &format!("{}\n", new.secret), t0).unwrap();
    assert_eq!(redeemed, new.info);
    match state_of(ca.path(), &new.info.id) {
        TokenState::Used { serial, .. } => assert_eq!(serial, None),
        other => panic!("{other:?}"),
    }

    let e = redeem_token(ca.path(), &new.secret, t0 + time::Duration::minutes(1)).unwrap_err();
    assert!(e.is_token_used(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("already used") && msg.contains("node-1") && msg.contains(&new.info.id),
        "{msg}"
    );
    let used_at = enc_certs::list_tokens(ca.path(), t0).unwrap()[0].clone();
    let TokenState::Used { used_at, .. } = used_at.state else {
        panic!()
    };
    let used_at = used_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(
        msg.contains(&used_at),
        "message lacks when ({used_at}): {msg}"
    );
    assert!(!msg.contains(&new.secret[5..]));
}

#[test]
fn expired_unknown_and_malformed_tokens_are_refused_distinctly() {
    let ca = ca_dir();
    let t0 = now();
    let new = create_token(
        ca.path(),
        &token_req("node-1", &["10.0.0.1"], Duration::from_secs(60)),
        t0,
    )
    .unwrap();
    let later = t0 + time::Duration::seconds(61);
    let e = redeem_token(ca.path(), &new.secret, later).unwrap_err();
    assert!(e.is_token_expired(), "{e}");
    let expires = new
        .info
        .expires_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(
        e.to_string().contains("expired") && e.to_string().contains(&expires),
        "{e}"
    );
    assert_eq!(
        list_tokens(ca.path(), later).unwrap()[0].state,
        TokenState::Expired
    );
    // Expiry did not use it up: still usable before the deadline.
    redeem_token(ca.path(), &new.secret, t0 + time::Duration::seconds(59)).unwrap();

    // A token of another CA.
    let other = ca_dir();
    let foreign = create_token(other.path(), &token_req("node-1", &["10.0.0.1"], DAY), t0).unwrap();
    let e = redeem_token(ca.path(), &foreign.secret, t0).unwrap_err();
    assert!(
        matches!(e, Error::TokenUnknown { .. }) && e.is_token_unknown(),
        "{e}"
    );
    assert!(
        e.to_string().contains("unknown") && e.to_string().contains(&foreign.info.id),
        "{e}"
    );
    assert!(!e.to_string().contains(&foreign.secret[5..]));

    for bad in ["", "hello", "enc1.short", &foreign.secret[1..]] {
        let e = redeem_token(ca.path(), bad, t0).unwrap_err();
        assert!(matches!(e, Error::TokenMalformed { .. }), "{bad:?}: {e}");
    }
}

#[test]
fn token_requests_are_validated() {
    let ca = ca_dir();
    let t0 = now();
    let cases = [
        (
            token_req("node-1", &["10.0.0.1"], Duration::from_secs(59)),
            "ttl",
        ),
        (token_req("node-1", &["10.0.0.1"], 31 * DAY), "ttl"),
        (token_req("node-1", &[], DAY), "ips"),
        (token_req("Node_1", &["10.0.0.1"], DAY), "Node_1"),
    ];
    for (req, want) in cases {
        let e = create_token(ca.path(), &req, t0).unwrap_err();
        assert!(e.to_string().contains(want), "{req:?}: {e}");
    }
    create_token(ca.path(), &token_req("node-1", &["10.0.0.1"], 30 * DAY), t0).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let e = create_token(empty.path(), &token_req("node-1", &["10.0.0.1"], DAY), t0).unwrap_err();
    assert!(e.to_string().contains("ca.crt"), "{e}");
}

#[test]
fn concurrent_redeems_of_one_token_have_exactly_one_winner() {
    let ca = ca_dir();
    let t0 = now();
    for _ in 0..8 {
        let new = create_token(ca.path(), &token_req("node-1", &["10.0.0.1"], DAY), t0).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let results: Vec<_> = (0..2)
            .map(|_| {
                let (dir, secret, barrier) =
                    (ca.path().to_owned(), new.secret.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    redeem_token(&dir, &secret, t0)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "{results:?}");
        assert!(
            results
                .iter()
                .any(|r| r.as_ref().is_err_and(Error::is_token_used)),
            "{results:?}"
        );
    }
}

#[test]
fn concurrent_signs_with_one_token_issue_one_certificate() {
    let ca = ca_dir();
    let t0 = now();
    let new = create_token(ca.path(), &token_req("node-1", &["10.0.0.1"], DAY), t0).unwrap();
    let barrier = Arc::new(Barrier::new(2));
    let results: Vec<_> = (0..2)
        .map(|_| {
            let csr = generate_csr("node-1", &[ip("10.0.0.1")]).unwrap().csr_pem;
            let (dir, secret, barrier) =
                (ca.path().to_owned(), new.secret.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                sign_csr(&dir, &csr, &secret, DAY, t0)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .any(|r| r.as_ref().is_err_and(Error::is_token_used))
    );
    assert_eq!(read_ledger(ca.path()).unwrap().len(), 1);
}

#[test]
fn bad_requests_are_refused_without_using_the_token() {
    let ca = ca_dir();
    let t0 = now();
    let new = create_token(
        ca.path(),
        &token_req("node-1", &["10.0.0.1", "10.0.0.11"], DAY),
        t0,
    )
    .unwrap();
    let v4 = |s: &str| SanType::IpAddress(ip(s));
    // A request tampered with after signing: names changed from node-x to node-1.
    let tampered = {
        let csr = generate_csr("node-x", &[ip("10.0.0.1")]).unwrap().csr_pem;
        let der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let mut n = 0;
        for i in 0..bytes.len() - 6 {
            if &bytes[i..i + 6] == b"node-x" {
                bytes[i + 5] = b'1';
                n += 1;
            }
        }
        assert_eq!(n, 2, "CN and DNS SAN");
        pem("CERTIFICATE REQUEST", &bytes)
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "extra DNS SAN",
            custom_csr(
                Some("node-1"),
                vec![dns("node-1"), dns("evil.example"), v4("10.0.0.1")],
            ),
            vec!["DNS:evil.example", "DNS:node-1, IP:10.0.0.1, IP:10.0.0.11"],
        ),
        (
            "other node",
            generate_csr("node-2", &[ip("10.0.0.1")]).unwrap().csr_pem,
            vec!["DNS:node-2", "allows DNS:node-1"],
        ),
        (
            "foreign IP",
            generate_csr("node-1", &[ip("10.0.0.1"), ip("10.0.0.2")])
                .unwrap()
                .csr_pem,
            vec!["IP:10.0.0.2", "allows DNS:node-1, IP:10.0.0.1"],
        ),
        (
            "no IP",
            custom_csr(Some("node-1"), vec![dns("node-1")]),
            vec!["no IP SAN", "IP:10.0.0.1"],
        ),
        (
            "no DNS",
            custom_csr(Some("node-1"), vec![v4("10.0.0.1")]),
            vec!["no DNS SAN"],
        ),
        (
            "duplicate DNS",
            custom_csr(
                Some("node-1"),
                vec![dns("node-1"), dns("node-1"), v4("10.0.0.1")],
            ),
            vec!["2 times"],
        ),
        (
            "URI SAN",
            custom_csr(
                Some("node-1"),
                vec![
                    dns("node-1"),
                    v4("10.0.0.1"),
                    SanType::URI("spiffe://x/y".try_into().unwrap()),
                ],
            ),
            vec!["URI:spiffe://x/y"],
        ),
        (
            "other CN",
            custom_csr(Some("admin"), vec![dns("node-1"), v4("10.0.0.1")]),
            vec!["\"admin\""],
        ),
        ("bad signature", tampered, vec!["signature does not verify"]),
        (
            "not a CSR",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
            vec!["CERTIFICATE REQUEST"],
        ),
    ];
    for (what, csr, wants) in &cases {
        let e = sign_csr(ca.path(), csr, &new.secret, DAY, t0).unwrap_err();
        assert!(e.is_csr_refused(), "{what}: {e}");
        for want in wants {
            assert!(e.to_string().contains(want), "{what}: lacks {want}: {e}");
        }
        assert!(!e.to_string().contains(&new.secret[5..]));
        assert_eq!(
            state_of(ca.path(), &new.info.id),
            TokenState::Unused,
            "{what} used the token"
        );
    }
    assert!(read_ledger(ca.path()).unwrap().is_empty());

    // A subset of the allowed addresses, with no common name, is fine; the token is then used.
    let csr = custom_csr(None, vec![dns("node-1"), v4("10.0.0.11")]);
    let signed = sign_csr(ca.path(), &csr, &new.secret, DAY, t0).unwrap();
    assert_eq!(signed.info.ips, vec![ip("10.0.0.11")]);
    assert_eq!(signed.info.subject, "CN=node-1");
    match state_of(ca.path(), &new.info.id) {
        TokenState::Used { serial, .. } => assert_eq!(serial, Some(signed.info.serial)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn request_and_sign_write_files_and_refuse_to_overwrite() {
    let ca = ca_dir();
    let node_dir = tempfile::tempdir().unwrap();
    let out = node_dir.path().join("pki");
    let files = request_node_cert("node-1", &[ip("10.0.0.1")], &out).unwrap();
    assert_eq!(files.key_path, out.join("node-1.key"));
    assert_eq!(files.csr_path, out.join("node-1.csr"));
    assert_eq!(mode(&files.key_path), 0o600);
    assert_eq!(mode(&files.csr_path), 0o644);
    let key_before = std::fs::read_to_string(&files.key_path).unwrap();
    let e = request_node_cert("node-1", &[ip("10.0.0.1")], &out).unwrap_err();
    assert!(
        e.is_already_exists() && e.to_string().contains("node-1.key"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(&files.key_path).unwrap(),
        key_before
    );

    let t0 = now();
    let csr = std::fs::read_to_string(&files.csr_path).unwrap();
    let new = create_token(ca.path(), &token_req("node-1", &["10.0.0.1"], DAY), t0).unwrap();
    std::fs::write(out.join("node-1.crt"), "occupied").unwrap();
    let e = sign_csr_to_dir(ca.path(), &csr, &new.secret, DAY, t0, &out).unwrap_err();
    assert!(
        e.is_already_exists() && e.to_string().contains("node-1.crt"),
        "{e}"
    );
    assert_eq!(state_of(ca.path(), &new.info.id), TokenState::Unused);
    std::fs::remove_file(out.join("node-1.crt")).unwrap();
    let (path, signed) = sign_csr_to_dir(ca.path(), &csr, &new.secret, DAY, t0, &out).unwrap();
    assert_eq!(path, out.join("node-1.crt"));
    assert_eq!(mode(&path), 0o644);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), signed.cert_pem);
    NodeIdentity::load(&path, &files.key_path, &ca.path().join("ca.crt")).unwrap();
}

fn transfer(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
) -> Result<bool, rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        if from.write_tls(&mut buf).unwrap() == 0 {
            break;
        }
    }
    if buf.is_empty() {
        return Ok(false);
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        if to.read_tls(&mut rest).unwrap() == 0 {
            break;
        }
        to.process_new_packets()?;
    }
    Ok(true)
}

/// Runs a mutual-TLS handshake between `dialer` and `listener` with enc's verifiers.
fn mutual_handshake(dialer: &NodeIdentity, d_addr: &str, listener: &NodeIdentity, l_addr: &str) {
    let to_listener = ExpectedPeer {
        name: listener.name().into(),
        addr: ip(l_addr),
    };
    let to_dialer = ExpectedPeer {
        name: dialer.name().into(),
        addr: ip(d_addr),
    };
    let mut client = ClientConnection::new(
        client_config(dialer, &to_listener).unwrap(),
        server_name(&to_listener).unwrap(),
    )
    .unwrap();
    let mut server = ServerConnection::new(server_config(listener, &to_dialer).unwrap()).unwrap();
    for _ in 0..50 {
        let a = transfer(&mut client, &mut server).unwrap();
        let b = transfer(&mut server, &mut client).unwrap();
        if !a && !b {
            break;
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    let seen = enc_certs::peer_info(server.peer_certificates().unwrap()).unwrap();
    assert_eq!(&seen, dialer.info());
    let seen = enc_certs::peer_info(client.peer_certificates().unwrap()).unwrap();
    assert_eq!(&seen, listener.info());
}

#[test]
fn enrolled_node_has_the_classic_profile_and_handshakes_with_a_classic_node() {
    let ca = ca_dir();
    let t0 = now();
    let new = create_token(ca.path(), &token_req("node-1", &["10.0.0.1"], DAY), t0).unwrap();
    let csr = generate_csr("node-1", &[ip("10.0.0.1")]).unwrap();
    assert!(!format!("{csr:?}").contains(csr.key_pem.lines().nth(1).unwrap()));
    let lifetime = Duration::from_secs(6 * 3600);
    let signed = sign_csr(ca.path(), &csr.csr_pem, &new.secret, lifetime, t0).unwrap();
    assert_eq!(signed.token, new.info);
    let info = &signed.info;
    let ca_cert = CertificateAuthority::load(ca.path()).unwrap();
    assert_eq!(info.subject, "CN=node-1");
    assert_eq!(info.issuer, ca_cert.info().subject);
    assert_eq!(info.dns_names, vec!["node-1".to_owned()]);
    assert_eq!(info.ips, vec![ip("10.0.0.1")]);
    assert!(!info.is_ca);
    let t0s = t0.replace_nanosecond(0).unwrap();
    assert_eq!(info.not_before, t0s - time::Duration::minutes(5));
    assert_eq!(info.not_after, t0s + time::Duration::hours(6));
    let ledger = read_ledger(ca.path()).unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].serial, info.serial);
    assert_eq!(ledger[0].node, "node-1");

    // Chain, validity, key usages and key match, as peers check them.
    let enrolled =
        NodeIdentity::from_pem(&signed.cert_pem, &csr.key_pem, ca_cert.cert_pem()).unwrap();
    // The certificate carries the request's key, not one the CA made.
    let other_key = generate_csr("node-1", &[ip("10.0.0.1")]).unwrap().key_pem;
    let e = NodeIdentity::from_pem(&signed.cert_pem, &other_key, ca_cert.cert_pem()).unwrap_err();
    assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");

    let classic_dir = tempfile::tempdir().unwrap();
    issue_node_cert(
        ca.path(),
        &NodeCertRequest {
            node: "node-2".into(),
            ips: vec![ip("10.0.0.2")],
            days: 1,
        },
        classic_dir.path(),
    )
    .unwrap();
    let classic = NodeIdentity::load(
        &classic_dir.path().join("node-2.crt"),
        &classic_dir.path().join("node-2.key"),
        &ca.path().join("ca.crt"),
    )
    .unwrap();
    mutual_handshake(&enrolled, "10.0.0.1", &classic, "10.0.0.2");
    mutual_handshake(&classic, "10.0.0.2", &enrolled, "10.0.0.1");
}

#[test]
fn signing_checks_lifetime_and_ca_before_the_token() {
    let ca = ca_dir();
    let t0 = now();
    let new = create_token(ca.path(), &token_req("node-1", &["10.0.0.1"], DAY), t0).unwrap();
    let csr = generate_csr("node-1", &[ip("10.0.0.1")]).unwrap().csr_pem;
    for lifetime in [Duration::from_secs(9), 3651 * DAY] {
        let e = sign_csr(ca.path(), &csr, &new.secret, lifetime, t0).unwrap_err();
        assert!(e.to_string().contains("lifetime"), "{e}");
    }
    std::fs::rename(ca.path().join("ca.key"), ca.path().join("ca.key.away")).unwrap();
    let e = sign_csr(ca.path(), &csr, &new.secret, DAY, t0).unwrap_err();
    assert!(e.to_string().contains("ca.key"), "{e}");
    assert_eq!(state_of(ca.path(), &new.info.id), TokenState::Unused);
}
