//! Real in-memory rustls handshakes between node identities, for both verifiers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::IpAddr;
use std::sync::Arc;

use enc_certs::{
    AuthFailure, CA_KEY_FILE, CaOptions, CertificateAuthority, Error, ExpectedPeer, IssuedPem,
    NodeCertRequest, NodeIdentity, RevocationList, RevokedEntry, client_config,
    client_config_with_crls, init_ca, issue_node_cert_pem, peer_info, server_config,
    server_config_with_crls, server_name, sign_crl,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Cluster {
    ca: CertificateAuthority,
    /// The cluster CA's key, for certificates enc itself would never issue.
    ca_issuer: Issuer<'static, KeyPair>,
    foreign_ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    node1: NodeIdentity,
    node2: NodeIdentity,
}

fn issue(ca: &CertificateAuthority, node: &str, addr: &str) -> IssuedPem {
    let now = OffsetDateTime::now_utc();
    issue_window(
        ca,
        node,
        addr,
        now - Duration::minutes(5),
        now + Duration::days(1),
    )
}

fn issue_window(
    ca: &CertificateAuthority,
    node: &str,
    addr: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> IssuedPem {
    let req = NodeCertRequest {
        node: node.into(),
        ips: vec![ip(addr)],
        days: 1,
    };
    issue_node_cert_pem(ca, &req, not_before, not_after).unwrap()
}

fn identity(ca: &CertificateAuthority, issued: &IssuedPem) -> NodeIdentity {
    NodeIdentity::from_pem(&issued.cert_pem, &issued.key_pem, ca.cert_pem()).unwrap()
}

fn cluster() -> Cluster {
    // Made on disk (as `encctl ca init` does) so that the test can read the key.
    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), &CaOptions::default()).unwrap();
    let ca = CertificateAuthority::load(dir.path()).unwrap();
    let key = std::fs::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap();
    let ca_issuer =
        Issuer::from_ca_cert_pem(ca.cert_pem(), KeyPair::from_pem(&key).unwrap()).unwrap();
    let foreign_ca = CertificateAuthority::generate(&CaOptions {
        common_name: "enc cluster CA".into(), // same name, different key
        days: 30,
    })
    .unwrap();
    let other_ca = CertificateAuthority::generate(&CaOptions {
        common_name: "some other CA".into(),
        days: 30,
    })
    .unwrap();
    let node1 = identity(&ca, &issue(&ca, "node-1", "10.0.0.1"));
    let node2 = identity(&ca, &issue(&ca, "node-2", "10.0.0.2"));
    Cluster {
        ca,
        ca_issuer,
        foreign_ca,
        other_ca,
        node1,
        node2,
    }
}

fn expect(name: &str, addr: &str) -> ExpectedPeer {
    ExpectedPeer {
        name: name.into(),
        addr: ip(addr),
    }
}

struct Outcome {
    client: ClientConnection,
    server: ServerConnection,
    client_err: Option<rustls::Error>,
    server_err: Option<rustls::Error>,
}

/// Moves all pending TLS records from `from` to `to`; returns whether anything moved.
fn transfer(
    from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    to_err: &mut Option<rustls::Error>,
) -> bool {
    let mut buf = Vec::new();
    while from.wants_write() {
        if from.write_tls(&mut buf).unwrap() == 0 {
            break;
        }
    }
    if buf.is_empty() {
        return false;
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        match to.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Err(e) = to.process_new_packets() {
            to_err.get_or_insert(e);
        }
    }
    true
}

fn handshake(
    client_cfg: Arc<ClientConfig>,
    name: ServerName<'static>,
    server_cfg: Arc<ServerConfig>,
) -> Outcome {
    let mut client = ClientConnection::new(client_cfg, name).unwrap();
    let mut server = ServerConnection::new(server_cfg).unwrap();
    let (mut client_err, mut server_err) = (None, None);
    for _ in 0..50 {
        let a = transfer(&mut client, &mut server, &mut server_err);
        let b = transfer(&mut server, &mut client, &mut client_err);
        if !a && !b {
            break;
        }
    }
    Outcome {
        client,
        server,
        client_err,
        server_err,
    }
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn roots(ca: &CertificateAuthority) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca.cert_pem()) {
        roots.add(c).unwrap();
    }
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that presents `issued` unchecked and verifies the server with plain WebPKI
/// against `trust` (stands in for a misconfigured or malicious peer).
fn raw_client(issued: &IssuedPem, trust: &CertificateAuthority) -> Arc<ClientConfig> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(trust))
        .with_client_auth_cert(
            certs(&issued.cert_pem),
            PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    Arc::new(cfg)
}

/// A server that presents `issued` unchecked and requires a client certificate from `trust`.
fn raw_server(issued: &IssuedPem, trust: &CertificateAuthority) -> Arc<ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(trust), provider())
        .build()
        .unwrap();
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&issued.cert_pem),
            PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    Arc::new(cfg)
}

#[test]
fn mutual_handshake_succeeds_with_tls13_and_equal_exporters() {
    let c = cluster();
    // node-1 dials node-2.
    let ccfg = client_config(&c.node1, &expect("node-2", "10.0.0.2")).unwrap();
    let scfg = server_config(&c.node2, &expect("node-1", "10.0.0.1")).unwrap();
    let name = server_name(&expect("node-2", "10.0.0.2")).unwrap();
    let out = handshake(ccfg, name, scfg);
    assert!(out.client_err.is_none(), "{:?}", out.client_err);
    assert!(out.server_err.is_none(), "{:?}", out.server_err);
    assert!(!out.client.is_handshaking());
    assert!(!out.server.is_handshaking());
    assert_eq!(
        out.client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        out.server.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    let label = b"EXPORTER-enc-test";
    let ctx = Some(&b"epoch-1"[..]);
    let k1 = out
        .client
        .export_keying_material([0u8; 64], label, ctx)
        .unwrap();
    let k2 = out
        .server
        .export_keying_material([0u8; 64], label, ctx)
        .unwrap();
    assert_eq!(k1, k2);
    assert_ne!(k1, [0u8; 64]);
    let k3 = out
        .server
        .export_keying_material([0u8; 64], label, Some(&b"epoch-2"[..]))
        .unwrap();
    assert_ne!(k1, k3);

    let server_seen = peer_info(out.client.peer_certificates().unwrap()).unwrap();
    assert_eq!(server_seen.dns_names, vec!["node-2".to_owned()]);
    let client_seen = peer_info(out.server.peer_certificates().unwrap()).unwrap();
    assert_eq!(client_seen.dns_names, vec!["node-1".to_owned()]);
    assert_eq!(client_seen.ips, vec![ip("10.0.0.1")]);
    assert_eq!(&client_seen, c.node1.info());
    assert!(peer_info(&[]).is_none());
}

#[test]
fn ipv4_mapped_source_address_matches() {
    let c = cluster();
    let ccfg = client_config(&c.node1, &expect("node-2", "10.0.0.2")).unwrap();
    let scfg = server_config(&c.node2, &expect("node-1", "::ffff:10.0.0.1")).unwrap();
    let name = server_name(&expect("node-2", "10.0.0.2")).unwrap();
    let out = handshake(ccfg, name, scfg);
    assert!(out.server_err.is_none(), "{:?}", out.server_err);
    assert!(out.client_err.is_none(), "{:?}", out.client_err);
}

struct Case {
    label: &'static str,
    bad: IssuedPem,
    want: AuthFailure,
    alert: &'static str,
}

/// Which end of the connection presents the bad certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Presented {
    /// As the server's certificate, checked by the client (`client_config`).
    AsServer,
    /// As the client's certificate, checked by the server (`server_config`).
    AsClient,
}

/// Parameters of a certificate shaped like enc's node certificates (CN and DNS SAN `node`,
/// IP SAN `addr`, valid from 5 minutes ago for a day, digitalSignature, serverAuth and
/// clientAuth), for tests to alter.
fn node_params(node: &str, addr: &str) -> CertificateParams {
    let mut params = CertificateParams::new(vec![node.to_owned()]).unwrap();
    params.subject_alt_names.push(SanType::IpAddress(ip(addr)));
    params.distinguished_name.push(DnType::CommonName, node);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(1);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

/// Signs `params` for a new key, by `issuer`, or by the new key itself when `None`.
fn sign(params: &CertificateParams, issuer: Option<&Issuer<'_, KeyPair>>) -> IssuedPem {
    let key = KeyPair::generate().unwrap();
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    IssuedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Parameters of a CA certificate named `name`.
fn ca_params(name: &str, constraint: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(30);
    params.is_ca = IsCa::Ca(constraint);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// An intermediate CA named `name` signed by `parent`: its certificate (PEM) and issuer.
fn intermediate(name: &str, parent: &Issuer<'_, KeyPair>) -> (String, Issuer<'static, KeyPair>) {
    let params = ca_params(name, BasicConstraints::Constrained(0));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, parent).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// `leaf` with `extra` certificates (PEM) after it in its chain.
fn with_chain(mut leaf: IssuedPem, extra: &str) -> IssuedPem {
    leaf.cert_pem.push_str(extra);
    leaf
}

fn rfc3339(pem: &IssuedPem, not_after: bool) -> String {
    let info = enc_certs::inspect(pem.cert_pem.as_bytes()).unwrap();
    let t = if not_after {
        info.not_after
    } else {
        info.not_before
    };
    t.format(&Rfc3339).unwrap()
}

/// Bad certificates for node-2 (expected at 10.0.0.2) presented at its end `presented`, and
/// what node-1 must report (`want`) and node-2 then sees (`alert`).
fn cases(c: &Cluster, presented: Presented) -> Vec<Case> {
    let now = OffsetDateTime::now_utc();
    let expired = issue_window(
        &c.ca,
        "node-2",
        "10.0.0.2",
        now - Duration::days(10),
        now - Duration::days(1),
    );
    let future = issue_window(
        &c.ca,
        "node-2",
        "10.0.0.2",
        now + Duration::days(1),
        now + Duration::days(10),
    );
    vec![
        Case {
            label: "foreign CA",
            bad: issue(&c.other_ca, "node-2", "10.0.0.2"),
            want: AuthFailure::UnknownCa,
            alert: "unknown_ca",
        },
        // Same CA name, different key: found by name, fails the signature check
        // (rustls answers that with a decrypt_error alert).
        Case {
            label: "foreign CA with the cluster CA's name",
            bad: issue(&c.foreign_ca, "node-2", "10.0.0.2"),
            want: AuthFailure::UnknownCa,
            alert: "decrypt_error",
        },
        Case {
            label: "expired",
            want: AuthFailure::Expired {
                not_after: rfc3339(&expired, true),
            },
            bad: expired,
            alert: "certificate_expired",
        },
        Case {
            label: "not yet valid",
            want: AuthFailure::NotYetValid {
                not_before: rfc3339(&future, false),
            },
            bad: future,
            alert: "certificate_expired",
        },
        Case {
            label: "DNS SAN mismatch",
            bad: issue(&c.ca, "node-9", "10.0.0.2"),
            want: AuthFailure::NameMismatch {
                expected: "node-2".into(),
                presented: vec!["node-9".into()],
            },
            alert: "certificate_unknown",
        },
        Case {
            label: "IP SAN mismatch",
            bad: issue(&c.ca, "node-2", "10.0.0.9"),
            want: AuthFailure::AddressMismatch {
                expected: ip("10.0.0.2"),
                presented: vec![ip("10.0.0.9")],
            },
            alert: "certificate_unknown",
        },
        // Issue 8: self-signed. webpki finds no issuer; enc says why (and, as for other
        // enc-specific reasons, the peer gets certificate_unknown).
        Case {
            label: "self-signed",
            bad: sign(&node_params("node-2", "10.0.0.2"), None),
            want: AuthFailure::SelfSigned,
            alert: "certificate_unknown",
        },
        // Self-signed under the cluster CA's name: webpki finds the CA by name and the
        // signature check fails; still self-signed.
        Case {
            label: "self-signed with the cluster CA's name",
            bad: {
                let mut params = node_params("node-2", "10.0.0.2");
                params.distinguished_name = rcgen::DistinguishedName::new();
                params
                    .distinguished_name
                    .push(DnType::CommonName, "enc cluster CA");
                sign(&params, None)
            },
            want: AuthFailure::SelfSigned,
            alert: "certificate_unknown",
        },
        // Issue 8: wrong key usage. An extended key usage for the other end only; rustls'
        // error says which purpose is missing, and the peer gets unsupported_certificate.
        match presented {
            Presented::AsClient => Case {
                label: "extended key usage serverAuth only, as a client",
                bad: {
                    let mut params = node_params("node-2", "10.0.0.2");
                    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                    sign(&params, Some(&c.ca_issuer))
                },
                want: AuthFailure::WrongKeyUsage {
                    detail: "lacks TLS client authentication (extended key usage; presents: \
                             TLS server authentication)"
                        .into(),
                },
                alert: "unsupported_certificate",
            },
            Presented::AsServer => Case {
                label: "extended key usage clientAuth only, as a server",
                bad: {
                    let mut params = node_params("node-2", "10.0.0.2");
                    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                    sign(&params, Some(&c.ca_issuer))
                },
                want: AuthFailure::WrongKeyUsage {
                    detail: "lacks TLS server authentication (extended key usage; presents: \
                             TLS client authentication)"
                        .into(),
                },
                alert: "unsupported_certificate",
            },
        },
        // A key usage without digitalSignature: webpki ignores key usage for end entities;
        // enc's own check refuses it (the key must sign the handshake).
        Case {
            label: "key usage without digitalSignature",
            bad: {
                let mut params = node_params("node-2", "10.0.0.2");
                params.key_usages = vec![KeyUsagePurpose::KeyAgreement];
                sign(&params, Some(&c.ca_issuer))
            },
            want: AuthFailure::WrongKeyUsage {
                detail: "lacks digital signature (key usage; presents: key agreement)".into(),
            },
            alert: "certificate_unknown",
        },
        // Issue 8: chains that do not reach a trusted CA.
        Case {
            label: "issued by an intermediate of the cluster CA, sent without it",
            bad: {
                let (_, sub) = intermediate("enc intermediate CA", &c.ca_issuer);
                sign(&node_params("node-2", "10.0.0.2"), Some(&sub))
            },
            want: AuthFailure::UnknownCa,
            alert: "unknown_ca",
        },
        Case {
            label: "issued by an intermediate of a foreign root, sent with it",
            bad: {
                let root = ca_params("foreign root CA", BasicConstraints::Unconstrained);
                let root = Issuer::new(root, KeyPair::generate().unwrap());
                let (sub_pem, sub) = intermediate("foreign intermediate CA", &root);
                with_chain(
                    sign(&node_params("node-2", "10.0.0.2"), Some(&sub)),
                    &sub_pem,
                )
            },
            want: AuthFailure::UnknownCa,
            alert: "unknown_ca",
        },
        // enc uses no intermediates (the cluster CA has path length 0, which webpki does not
        // enforce for a trust anchor, and CRLs are checked for the end entity only), so this
        // one is refused too, although the chain it sends does reach the cluster CA.
        Case {
            label: "issued by an intermediate of the cluster CA, sent with it",
            bad: {
                let (sub_pem, sub) = intermediate("enc intermediate CA", &c.ca_issuer);
                with_chain(
                    sign(&node_params("node-2", "10.0.0.2"), Some(&sub)),
                    &sub_pem,
                )
            },
            want: AuthFailure::UnknownCa,
            alert: "unknown_ca",
        },
    ]
}

/// The handshake keys are not available on `conn`: it never completed its handshake.
fn assert_no_keys<D>(conn: &rustls::ConnectionCommon<D>, label: &str, side: &str) {
    assert!(
        conn.is_handshaking(),
        "{label}: {side} completed its handshake"
    );
    assert!(
        conn.export_keying_material([0u8; 32], b"EXPORTER-enc-test", None)
            .is_err(),
        "{label}: {side} can export keying material"
    );
    assert!(
        conn.peer_certificates().is_none(),
        "{label}: {side} kept the peer's certificate"
    );
}

#[test]
fn client_side_verifier_rejects_bad_server_certificates() {
    let c = cluster();
    let expected = expect("node-2", "10.0.0.2");
    for case in cases(&c, Presented::AsServer) {
        let ccfg = client_config(&c.node1, &expected).unwrap();
        let scfg = raw_server(&case.bad, &c.ca);
        let out = handshake(ccfg, server_name(&expected).unwrap(), scfg);
        let client_err = out
            .client_err
            .unwrap_or_else(|| panic!("{}: client accepted the server", case.label));
        assert_eq!(
            AuthFailure::from_tls_error(&client_err),
            case.want,
            "{}: {client_err}",
            case.label
        );
        let server_err = out
            .server_err
            .unwrap_or_else(|| panic!("{}: server saw no failure", case.label));
        assert_eq!(
            AuthFailure::from_tls_error(&server_err),
            AuthFailure::RejectedByPeer {
                alert: case.alert.into()
            },
            "{}: {server_err}",
            case.label
        );
        // tokio-rustls hands these out wrapped in io::Error.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, client_err);
        assert_eq!(AuthFailure::from_io_error(&io), Some(case.want.clone()));
        assert_no_keys(&out.client, case.label, "client");
        // The server waits for the client's Finished, which never comes.
        assert!(out.server.is_handshaking(), "{}", case.label);
    }
}

#[test]
fn server_side_verifier_rejects_bad_client_certificates() {
    let c = cluster();
    // node-1 accepts a connection it expects to come from node-2 at 10.0.0.2.
    let expected = expect("node-2", "10.0.0.2");
    for case in cases(&c, Presented::AsClient) {
        let scfg = server_config(&c.node1, &expected).unwrap();
        let ccfg = raw_client(&case.bad, &c.ca);
        let out = handshake(
            ccfg,
            server_name(&expect("node-1", "10.0.0.1")).unwrap(),
            scfg,
        );
        let server_err = out
            .server_err
            .unwrap_or_else(|| panic!("{}: server accepted the client", case.label));
        assert_eq!(
            AuthFailure::from_tls_error(&server_err),
            case.want,
            "{}: {server_err}",
            case.label
        );
        let client_err = out
            .client_err
            .unwrap_or_else(|| panic!("{}: client saw no failure", case.label));
        assert_eq!(
            AuthFailure::from_tls_error(&client_err),
            AuthFailure::RejectedByPeer {
                alert: case.alert.into()
            },
            "{}: {client_err}",
            case.label
        );
        // In TLS 1.3 the client has finished its handshake by then; the agent installs keys
        // only once the server's hello arrives, and the alert comes first.
        assert_no_keys(&out.server, case.label, "server");
    }
}

#[test]
fn server_requires_a_client_certificate() {
    let c = cluster();
    let scfg = server_config(&c.node1, &expect("node-2", "10.0.0.2")).unwrap();
    let ccfg = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(&c.ca))
            .with_no_client_auth(),
    );
    let out = handshake(
        ccfg,
        server_name(&expect("node-1", "10.0.0.1")).unwrap(),
        scfg,
    );
    let err = out
        .server_err
        .expect("server accepted a client without certificate");
    assert_eq!(
        AuthFailure::from_tls_error(&err),
        AuthFailure::NoCertificate
    );
    assert_eq!(
        AuthFailure::NoCertificate.to_string(),
        "peer presented no certificate"
    );
}

#[test]
fn identity_from_the_wrong_peer_is_rejected_even_with_a_valid_cert() {
    // node-2's genuine certificate, but discovery says 10.0.0.2 is node-3.
    let c = cluster();
    let ccfg = client_config(&c.node1, &expect("node-3", "10.0.0.2")).unwrap();
    let scfg = server_config(&c.node2, &expect("node-1", "10.0.0.1")).unwrap();
    let out = handshake(
        ccfg,
        server_name(&expect("node-3", "10.0.0.2")).unwrap(),
        scfg,
    );
    let err = out.client_err.expect("client accepted node-2 as node-3");
    let failure = AuthFailure::from_tls_error(&err);
    assert_eq!(
        failure.to_string(),
        "certificate SAN does not name node \"node-3\" (presents: node-2)"
    );
}

/// A CRL of `ca` revoking `serials`, valid over `[this_update, next_update]`, as an agent
/// would install it: from its PEM, verified against the CA certificate.
fn crl_window(
    ca: &CertificateAuthority,
    serials: &[&str],
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
) -> RevocationList {
    let revoked_at = this_update.format(&Rfc3339).unwrap();
    let entries: Vec<RevokedEntry> = serials
        .iter()
        .map(|s| RevokedEntry {
            serial: (*s).to_owned(),
            revoked_at: revoked_at.clone(),
        })
        .collect();
    let signed = sign_crl(ca, 1, &entries, this_update, next_update).unwrap();
    RevocationList::from_pem(signed.pem(), &[ca.cert_der().clone()]).unwrap()
}

fn crl(ca: &CertificateAuthority, serials: &[&str]) -> RevocationList {
    let now = OffsetDateTime::now_utc();
    crl_window(
        ca,
        serials,
        now - Duration::minutes(1),
        now + Duration::days(1),
    )
}

/// A CRL whose nextUpdate has passed.
fn expired_crl(ca: &CertificateAuthority, serials: &[&str]) -> RevocationList {
    let now = OffsetDateTime::now_utc();
    crl_window(
        ca,
        serials,
        now - Duration::days(10),
        now - Duration::days(1),
    )
}

#[test]
fn server_refuses_a_revoked_client_and_names_the_serial() {
    let c = cluster();
    let node2_serial = c.node2.info().serial.clone();
    for (label, list) in [
        ("current CRL", crl(&c.ca, &[&node2_serial])),
        (
            "CRL past its nextUpdate",
            expired_crl(&c.ca, &[&node2_serial]),
        ),
    ] {
        // node-2 dials node-1, whose CRL revokes node-2's certificate.
        let scfg = server_config_with_crls(
            &c.node1,
            &expect("node-2", "10.0.0.2"),
            std::slice::from_ref(&list),
        )
        .unwrap();
        let ccfg = client_config(&c.node2, &expect("node-1", "10.0.0.1")).unwrap();
        let out = handshake(
            ccfg,
            server_name(&expect("node-1", "10.0.0.1")).unwrap(),
            scfg,
        );
        let server_err = out
            .server_err
            .unwrap_or_else(|| panic!("{label}: server accepted a revoked client"));
        let failure = AuthFailure::from_tls_error(&server_err);
        assert_eq!(
            failure,
            AuthFailure::Revoked {
                serial: node2_serial.clone()
            },
            "{label}: {server_err}"
        );
        assert_eq!(
            failure.to_string(),
            format!("certificate revoked (serial {node2_serial})")
        );
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, server_err);
        assert_eq!(AuthFailure::from_io_error(&io), Some(failure));
        // The detail stays local: the revoked peer gets rustls' alert for a custom
        // verifier error.
        let client_err = out
            .client_err
            .unwrap_or_else(|| panic!("{label}: client saw no failure"));
        assert_eq!(
            AuthFailure::from_tls_error(&client_err),
            AuthFailure::RejectedByPeer {
                alert: "certificate_unknown".into()
            },
            "{label}: {client_err}"
        );
        assert!(out.server.peer_certificates().is_none());
    }
}

#[test]
fn client_refuses_a_revoked_server_and_names_the_serial() {
    let c = cluster();
    let node2_serial = c.node2.info().serial.clone();
    for (label, list) in [
        ("current CRL", crl(&c.ca, &[&node2_serial])),
        (
            "CRL past its nextUpdate",
            expired_crl(&c.ca, &[&node2_serial]),
        ),
    ] {
        // node-1 dials node-2, and node-1's CRL revokes node-2's certificate.
        let ccfg = client_config_with_crls(
            &c.node1,
            &expect("node-2", "10.0.0.2"),
            std::slice::from_ref(&list),
        )
        .unwrap();
        let scfg = server_config(&c.node2, &expect("node-1", "10.0.0.1")).unwrap();
        let out = handshake(
            ccfg,
            server_name(&expect("node-2", "10.0.0.2")).unwrap(),
            scfg,
        );
        let client_err = out
            .client_err
            .unwrap_or_else(|| panic!("{label}: client accepted a revoked server"));
        assert_eq!(
            AuthFailure::from_tls_error(&client_err),
            AuthFailure::Revoked {
                serial: node2_serial.clone()
            },
            "{label}: {client_err}"
        );
        let server_err = out
            .server_err
            .unwrap_or_else(|| panic!("{label}: server saw no failure"));
        assert_eq!(
            AuthFailure::from_tls_error(&server_err),
            AuthFailure::RejectedByPeer {
                alert: "certificate_unknown".into()
            },
            "{label}: {server_err}"
        );
        assert!(out.client.peer_certificates().is_none());
    }
}

#[test]
fn certificates_a_crl_does_not_list_still_authenticate() {
    let c = cluster();
    // Revokes a third certificate (and an unrelated serial), not node-1's or node-2's.
    let node3 = identity(&c.ca, &issue(&c.ca, "node-3", "10.0.0.3"));
    let serial3 = node3.info().serial.clone();
    for (label, list) in [
        ("current CRL", crl(&c.ca, &[&serial3, "7f0001"])),
        ("CRL past its nextUpdate", expired_crl(&c.ca, &[&serial3])),
        ("empty CRL", crl(&c.ca, &[])),
    ] {
        let lists = std::slice::from_ref(&list);
        let ccfg = client_config_with_crls(&c.node1, &expect("node-2", "10.0.0.2"), lists).unwrap();
        let scfg = server_config_with_crls(&c.node2, &expect("node-1", "10.0.0.1"), lists).unwrap();
        let out = handshake(
            ccfg,
            server_name(&expect("node-2", "10.0.0.2")).unwrap(),
            scfg,
        );
        assert!(out.client_err.is_none(), "{label}: {:?}", out.client_err);
        assert!(out.server_err.is_none(), "{label}: {:?}", out.server_err);
        assert!(!out.client.is_handshaking() && !out.server.is_handshaking());
        let seen = peer_info(out.server.peer_certificates().unwrap()).unwrap();
        assert_eq!(&seen, c.node1.info(), "{label}");
    }
    // And node-3 itself is refused under the same list.
    let list = crl(&c.ca, &[&serial3]);
    let scfg = server_config_with_crls(
        &c.node1,
        &expect("node-3", "10.0.0.3"),
        std::slice::from_ref(&list),
    )
    .unwrap();
    let ccfg = client_config(&node3, &expect("node-1", "10.0.0.1")).unwrap();
    let out = handshake(
        ccfg,
        server_name(&expect("node-1", "10.0.0.1")).unwrap(),
        scfg,
    );
    assert_eq!(
        AuthFailure::from_tls_error(&out.server_err.unwrap()),
        AuthFailure::Revoked { serial: serial3 }
    );
}

#[test]
fn crls_of_other_cas_can_never_be_installed() {
    let c = cluster();
    let cas = [c.ca.cert_der().clone()];
    let serial = c.node2.info().serial.clone();
    let now = OffsetDateTime::now_utc();
    let entries = [RevokedEntry {
        serial: serial.clone(),
        revoked_at: now.format(&Rfc3339).unwrap(),
    }];
    for (label, foreign) in [("other CA", &c.other_ca), ("same-name CA", &c.foreign_ca)] {
        let list = sign_crl(foreign, 1, &entries, now, now + Duration::days(1)).unwrap();
        // Loading it against the cluster CA fails...
        let err = RevocationList::from_pem(list.pem(), &cas).unwrap_err();
        assert!(err.is_untrusted_crl(), "{label}: {err}");
        // ...and a list verified against its own CA is refused by the configurations,
        // which check it against the identity's CA bundle.
        let err = server_config_with_crls(
            &c.node1,
            &expect("node-2", "10.0.0.2"),
            std::slice::from_ref(&list),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::CrlIssuerUnknown { .. } | Error::CrlSignature { .. }
            ),
            "{label}: {err}"
        );
        let err = client_config_with_crls(
            &c.node1,
            &expect("node-2", "10.0.0.2"),
            std::slice::from_ref(&list),
        )
        .unwrap_err();
        assert!(err.is_untrusted_crl(), "{label}: {err}");
    }
}

#[test]
fn extra_certificates_after_a_node_certificate_are_ignored() {
    // A chain file with the CA appended (a common habit) still authenticates, both ways:
    // the leaf is signed by the cluster CA itself, and the rest of the chain is not used.
    let c = cluster();
    let appended = |node: &str, addr: &str| {
        let issued = with_chain(issue(&c.ca, node, addr), c.ca.cert_pem());
        let id = identity(&c.ca, &issued);
        assert_eq!(id.cert_chain().len(), 2);
        id
    };
    let node1 = appended("node-1", "10.0.0.1");
    let node2 = appended("node-2", "10.0.0.2");
    for (dialer, dialer_exp, acceptor, acceptor_exp) in [
        (
            &node1,
            expect("node-1", "10.0.0.1"),
            &node2,
            expect("node-2", "10.0.0.2"),
        ),
        (
            &node2,
            expect("node-2", "10.0.0.2"),
            &node1,
            expect("node-1", "10.0.0.1"),
        ),
    ] {
        let ccfg = client_config(dialer, &acceptor_exp).unwrap();
        let scfg = server_config(acceptor, &dialer_exp).unwrap();
        let out = handshake(ccfg, server_name(&acceptor_exp).unwrap(), scfg);
        assert!(out.client_err.is_none(), "{:?}", out.client_err);
        assert!(out.server_err.is_none(), "{:?}", out.server_err);
        assert!(!out.client.is_handshaking() && !out.server.is_handshaking());
        let seen = peer_info(out.server.peer_certificates().unwrap()).unwrap();
        assert_eq!(&seen, dialer.info());
    }
}

#[test]
fn identities_peers_would_refuse_do_not_load() {
    let c = cluster();
    let untrusted = |issued: &IssuedPem| match NodeIdentity::from_pem(
        &issued.cert_pem,
        &issued.key_pem,
        c.ca.cert_pem(),
    ) {
        Err(Error::Untrusted { reason, .. }) => reason,
        other => panic!("expected Untrusted, got {other:?}"),
    };
    let (sub_pem, sub) = intermediate("enc intermediate CA", &c.ca_issuer);
    let via_intermediate = with_chain(
        sign(&node_params("node-1", "10.0.0.1"), Some(&sub)),
        &sub_pem,
    );
    assert_eq!(untrusted(&via_intermediate), AuthFailure::UnknownCa);
    assert_eq!(
        untrusted(&sign(&node_params("node-1", "10.0.0.1"), None)),
        AuthFailure::SelfSigned
    );
    let mut server_only = node_params("node-1", "10.0.0.1");
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    assert!(matches!(
        untrusted(&sign(&server_only, Some(&c.ca_issuer))),
        AuthFailure::WrongKeyUsage { detail } if detail.contains("TLS client authentication")
    ));
    let mut no_signature = node_params("node-1", "10.0.0.1");
    no_signature.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert_eq!(
        untrusted(&sign(&no_signature, Some(&c.ca_issuer))),
        AuthFailure::WrongKeyUsage {
            detail: "lacks digital signature (key usage; presents: key encipherment)".into()
        }
    );
    // The same shapes with enc's own parameters load.
    identity(
        &c.ca,
        &sign(&node_params("node-1", "10.0.0.1"), Some(&c.ca_issuer)),
    );
}
