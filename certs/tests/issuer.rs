//! Online issuance: the checks of a renewal ([`renew_csr`]) and the TLS configurations and
//! connection of the issuer protocol, over real sockets.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use enc_certs::{
    CaOptions, CertificateAuthority, NodeCertRequest, NodeIdentity, RevokeRequest, TokenRequest,
    connect_issuer, create_token, generate_csr, issue_node_cert_pem, issuer_client_config,
    issuer_server_config, read_ledger, renew_csr, revoke, sign_csr,
};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

const LIFETIME: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ca_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    enc_certs::init_ca(dir.path(), &CaOptions::default()).unwrap();
    dir
}

/// A node enrolled with a join token: its key, certificate (PEM) and DER.
struct Enrolled {
    key_pem: String,
    cert_pem: String,
}

impl Enrolled {
    fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}

fn enrol(ca: &Path, node: &str, ips: &[&str], now: OffsetDateTime) -> Enrolled {
    let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
    let token = create_token(
        ca,
        &TokenRequest {
            node: node.into(),
            ips: ips.clone(),
            ttl: Duration::from_secs(600),
        },
        now,
    )
    .unwrap();
    let csr = generate_csr(node, &ips).unwrap();
    let signed = sign_csr(ca, &csr.csr_pem, &token.secret, LIFETIME, now).unwrap();
    Enrolled {
        key_pem: csr.key_pem,
        cert_pem: signed.cert_pem,
    }
}

fn csr_with(key: &KeyPair, cn: &str, sans: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

fn ipsan(s: &str) -> SanType {
    SanType::IpAddress(ip(s))
}

#[test]
fn renewal_issues_a_new_key_the_same_names_and_records_it() {
    let ca = ca_dir();
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let node = enrol(ca.path(), "node-1", &["10.0.0.1", "fd00::1"], t0);
    let first = enc_certs::inspect(node.cert_pem.as_bytes()).unwrap();
    // A 20 s certificate is backdated by a tenth of its lifetime, not 5 minutes.
    assert_eq!(first.not_before, t0 - time::Duration::seconds(2));
    assert_eq!(first.not_after, t0 + time::Duration::seconds(20));

    let csr = generate_csr("node-1", &[ip("10.0.0.1"), ip("fd00::1")]).unwrap();
    let t1 = t0 + time::Duration::seconds(1);
    let renewed = renew_csr(ca.path(), &csr.csr_pem, &node.der(), LIFETIME, t1).unwrap();
    assert_eq!(renewed.previous, first);
    assert_ne!(renewed.info.serial, first.serial);
    assert_eq!(renewed.info.dns_names, first.dns_names);
    assert_eq!(renewed.info.ips, first.ips);
    assert_eq!(renewed.info.not_after, t1 + time::Duration::seconds(20));
    let ledger = read_ledger(ca.path()).unwrap();
    assert_eq!(
        ledger.iter().map(|e| e.serial.as_str()).collect::<Vec<_>>(),
        [first.serial.as_str(), renewed.info.serial.as_str()]
    );
    // The renewed pair loads as this node's identity under the CA.
    let ca_pem = std::fs::read_to_string(ca.path().join("ca.crt")).unwrap();
    NodeIdentity::from_pem(&renewed.cert_pem, &csr.key_pem, &ca_pem).unwrap();
    // And may itself be renewed.
    let der = CertificateDer::from_pem_slice(renewed.cert_pem.as_bytes()).unwrap();
    let csr2 = generate_csr("node-1", &[ip("10.0.0.1"), ip("fd00::1")]).unwrap();
    renew_csr(ca.path(), &csr2.csr_pem, &der, LIFETIME, t1).unwrap();
}

#[test]
fn renewal_refusals_name_the_problem_and_issue_nothing() {
    let ca = ca_dir();
    let t0 = OffsetDateTime::now_utc();
    let node = enrol(ca.path(), "node-1", &["10.0.0.1", "10.0.0.2"], t0);
    let current_key = KeyPair::from_pem(&node.key_pem).unwrap();
    let fresh = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let both = || vec![dns("node-1"), ipsan("10.0.0.1"), ipsan("10.0.0.2")];
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "other IP",
            csr_with(
                &fresh,
                "node-1",
                vec![dns("node-1"), ipsan("10.0.0.1"), ipsan("10.0.0.9")],
            ),
            "it requests IP SAN IP:10.0.0.9",
        ),
        (
            "missing IP",
            csr_with(&fresh, "node-1", vec![dns("node-1"), ipsan("10.0.0.1")]),
            "it omits IP SAN IP:10.0.0.2",
        ),
        (
            "other name",
            csr_with(
                &fresh,
                "node-2",
                vec![dns("node-2"), ipsan("10.0.0.1"), ipsan("10.0.0.2")],
            ),
            "it requests DNS SAN DNS:node-2",
        ),
        (
            "extra name",
            csr_with(&fresh, "node-1", {
                let mut s = both();
                s.push(dns("node-9"));
                s
            }),
            "it requests DNS SAN DNS:node-9",
        ),
        (
            "same key",
            csr_with(&current_key, "node-1", both()),
            "renewal needs a new key",
        ),
    ];
    let before = read_ledger(ca.path()).unwrap().len();
    for (what, csr, want) in cases {
        let e = renew_csr(ca.path(), &csr, &node.der(), LIFETIME, t0).unwrap_err();
        assert!(e.is_renew_refused(), "{what}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(want), "{what}: {msg}");
        assert!(
            msg.contains("DNS:node-1, IP:10.0.0.1, IP:10.0.0.2"),
            "{what}: {msg}"
        );
    }
    assert_eq!(read_ledger(ca.path()).unwrap().len(), before);

    let good = generate_csr("node-1", &[ip("10.0.0.1"), ip("10.0.0.2")]).unwrap();
    // Expired, not yet valid, too short a lifetime, garbage.
    let late = t0 + time::Duration::seconds(21);
    let e = renew_csr(ca.path(), &good.csr_pem, &node.der(), LIFETIME, late).unwrap_err();
    assert!(e.to_string().contains("expired at"), "{e}");
    let early = t0 - time::Duration::minutes(1);
    let e = renew_csr(ca.path(), &good.csr_pem, &node.der(), LIFETIME, early).unwrap_err();
    assert!(e.to_string().contains("not valid before"), "{e}");
    let e = renew_csr(
        ca.path(),
        &good.csr_pem,
        &node.der(),
        Duration::from_secs(9),
        t0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("lifetime"), "{e}");
    let e = renew_csr(ca.path(), "not a request", &node.der(), LIFETIME, t0).unwrap_err();
    assert!(e.is_renew_refused(), "{e}");

    // A certificate of another CA.
    let other = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let foreign = issue_node_cert_pem(
        &other,
        &NodeCertRequest {
            node: "node-1".into(),
            ips: vec![ip("10.0.0.1"), ip("10.0.0.2")],
            days: 1,
        },
        t0 - time::Duration::minutes(1),
        t0 + time::Duration::hours(1),
    )
    .unwrap();
    let der = CertificateDer::from_pem_slice(foreign.cert_pem.as_bytes()).unwrap();
    let e = renew_csr(ca.path(), &good.csr_pem, &der, LIFETIME, t0).unwrap_err();
    assert!(
        e.to_string().contains("not signed by this issuer's CA"),
        "{e}"
    );

    // A revoked certificate.
    revoke(
        ca.path(),
        &RevokeRequest {
            nodes: vec!["node-1".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let e = renew_csr(ca.path(), &good.csr_pem, &node.der(), LIFETIME, t0).unwrap_err();
    assert!(e.to_string().contains("it is revoked"), "{e}");
    assert_eq!(read_ledger(ca.path()).unwrap().len(), before);
}

/// Serves one connection with `config`, echoing back the number of client certificates it
/// saw and then what the client sent.
fn serve_once(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        let mut conn = rustls::ServerConnection::new(config).unwrap();
        while conn.is_handshaking() {
            if conn.complete_io(&mut tcp).is_err() {
                return;
            }
        }
        let n = conn.peer_certificates().map_or(0, |c| c.len()) as u8;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 5];
        if s.read_exact(&mut buf).is_ok() {
            let _ = s.write_all(&[n]);
            let _ = s.write_all(&buf);
            let _ = s.flush();
        }
    })
}

#[test]
fn issuer_tls_enrols_without_and_renews_with_a_client_certificate() {
    enc_certs::install_crypto_provider();
    let ca = ca_dir();
    let ca_pem = std::fs::read(ca.path().join("ca.crt")).unwrap();
    let t0 = OffsetDateTime::now_utc();
    let issuer = enrol(ca.path(), "issuer", &["127.0.0.1"], t0);
    let issuer = NodeIdentity::from_pem(
        &issuer.cert_pem,
        &issuer.key_pem,
        std::str::from_utf8(&ca_pem).unwrap(),
    )
    .unwrap();
    let node = enrol(ca.path(), "node-2", &["10.0.0.2"], t0);
    let node = NodeIdentity::from_pem(
        &node.cert_pem,
        &node.key_pem,
        std::str::from_utf8(&ca_pem).unwrap(),
    )
    .unwrap();
    let server = issuer_server_config(&issuer, issuer.ca_certs()).unwrap();

    for (client, want) in [(None, 0u8), (Some(&node), 1)] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = serve_once(listener, server.clone());
        let config = issuer_client_config(&ca_pem, client).unwrap();
        let mut s = connect_issuer(&addr, config, Duration::from_secs(5)).unwrap();
        s.write_all(b"hello").unwrap();
        let mut back = [0u8; 6];
        s.read_exact(&mut back).unwrap();
        let mut expected = *b"\0hello";
        expected[0] = want;
        assert_eq!(back, expected);
        t.join().unwrap();
    }

    // A client given another CA bundle refuses the issuer, and says so.
    let other = ca_dir();
    let other_pem = std::fs::read(other.path().join("ca.crt")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = serve_once(listener, server.clone());
    let config = issuer_client_config(&other_pem, None).unwrap();
    let e = connect_issuer(&addr, config, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("issuer not trusted"), "{e}");
    t.join().unwrap();

    // Dialled by a name its certificate does not carry: refused too.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = serve_once(listener, server);
    let config = issuer_client_config(&ca_pem, None).unwrap();
    let e =
        connect_issuer(&format!("localhost:{port}"), config, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("issuer not trusted"), "{e}");
    t.join().unwrap();

    let e = connect_issuer(
        "127.0.0.1:1",
        issuer_client_config(&ca_pem, None).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert!(e.to_string().contains("connecting"), "{e}");
}

#[test]
fn attested_enrolment_issues_only_for_the_attested_node_and_its_addresses() {
    use enc_certs::sign_attested_csr;
    let ca = ca_dir();
    let now = OffsetDateTime::now_utc();
    let allowed = [ip("10.0.0.1"), ip("fd00::1")];
    let csr = generate_csr("node-1", &[ip("10.0.0.1")]).unwrap();
    let signed =
        sign_attested_csr(ca.path(), &csr.csr_pem, "node-1", &allowed, LIFETIME, now).unwrap();
    assert_eq!(signed.info.dns_names, ["node-1"]);
    assert_eq!(signed.info.ips, [ip("10.0.0.1")]);
    let ca_pem = std::fs::read_to_string(ca.path().join("ca.crt")).unwrap();
    NodeIdentity::from_pem(&signed.cert_pem, &csr.key_pem, &ca_pem).unwrap();
    assert_eq!(read_ledger(ca.path()).unwrap().len(), 1);

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cases = [
        (
            generate_csr("node-2", &[ip("10.0.0.1")]).unwrap().csr_pem,
            "it is for node node-2 (DNS SAN DNS:node-2), not for node node-1; the ServiceAccount token attests node node-1, which may be issued DNS:node-1, IP:10.0.0.1, IP:fd00::1",
        ),
        (
            generate_csr("node-1", &[ip("10.0.0.9")]).unwrap().csr_pem,
            "it requests IP SAN IP:10.0.0.9",
        ),
        (
            csr_with(
                &key,
                "node-1",
                vec![dns("node-1"), dns("node-2"), ipsan("10.0.0.1")],
            ),
            "it requests DNS SAN DNS:node-2",
        ),
        (
            csr_with(&key, "node-1", vec![dns("node-1")]),
            "it has no IP SAN",
        ),
        (
            csr_with(&key, "admin", vec![dns("node-1"), ipsan("10.0.0.1")]),
            "its subject common name is \"admin\"",
        ),
    ];
    for (csr, want) in cases {
        let e = sign_attested_csr(ca.path(), &csr, "node-1", &allowed, LIFETIME, now).unwrap_err();
        assert!(e.is_csr_refused(), "{e}");
        assert!(e.to_string().contains(want), "{e}\nwant: {want}");
    }
    // The Node without addresses: nothing can be issued.
    let e = sign_attested_csr(ca.path(), &csr.csr_pem, "node-1", &[], LIFETIME, now).unwrap_err();
    assert!(e.to_string().contains("IP SAN IP:10.0.0.1"), "{e}");
    assert_eq!(
        read_ledger(ca.path()).unwrap().len(),
        1,
        "refusals issue nothing"
    );
}
