//! Kubernetes-attested enrolment end to end, in-process: a standalone issuer (the chart's
//! issuer Deployment) served over real loopback TLS, with the fake TokenReviewer in place of
//! the API server (no API server can run here), and the agent's start-up enrolment
//! (`tls.enrolment`) and renewal against it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use enc_agent::attest::{FakeTokenReviewer, TokenReviewer};
use enc_agent::config::{Config, StandaloneIssuerConfig};
use enc_agent::issuer::{IssuerHost, StandaloneIssuer};
use enc_api::issuer::{IssuerRequest, IssuerResponse};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const SA: &str = "system:serviceaccount:kube-system:enc-agent";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A standalone issuer on a loopback port with `reviewer`; returns its address and host.
async fn start_issuer(
    dir: &Path,
    kubernetes: bool,
    reviewer: Option<Arc<dyn TokenReviewer>>,
) -> (String, Arc<StandaloneIssuer>) {
    let k8s = if kubernetes {
        "  kubernetes:\n    audience: enc-issuer\n    serviceAccount: kube-system/enc-agent\n"
    } else {
        ""
    };
    let text = format!(
        "issuer:\n  listen: 127.0.0.1:7946\n  caDir: ca\n  certLifetime: 1h\n{k8s}serverName: enc-issuer.test\nserverAddress: 127.0.0.1\n"
    );
    let cfg =
        StandaloneIssuerConfig::parse_with_env(&text, &dir.join("issuer.yaml"), |_| None).unwrap();
    let host = Arc::new(StandaloneIssuer::new(cfg.clone()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(enc_agent::issuer::serve(
        host.clone(),
        cfg.issuer,
        reviewer,
        listener,
    ));
    (addr, host)
}

/// An agent configuration for `node` at `address` enrolling with `issuer` and `token`.
fn agent_config(dir: &Path, node: &str, address: &str, issuer: &str, token: &str) -> Config {
    let tls = dir.join(node);
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::copy(dir.join("ca/ca.crt"), tls.join("ca.crt")).unwrap();
    std::fs::write(tls.join("token"), format!("{token}\n")).unwrap();
    let text = format!(
        r#"
node:
  name: {node}
  underlayAddress: {address}
  podCidr: 10.244.1.0/24
tls:
  cert: {node}/tls.crt
  key: {node}/tls.key
  ca: {node}/ca.crt
  enrolment:
    issuer: {issuer}
    serviceAccountTokenFile: {node}/token
  renewal:
    issuer: {issuer}
encryption:
  type: none
statusSocket: /tmp/enc-k8s-enrolment-{node}.sock
peers:
  - name: node-2
    underlayAddress: 10.0.0.2
    podCidr: 10.244.2.0/24
"#
    );
    let cfg = Config::parse(&text, &dir.join("agent.yaml")).unwrap();
    // The token is a secret: the printable configuration holds its path only.
    assert!(!cfg.to_yaml().contains(token), "{}", cfg.to_yaml());
    cfg
}

async fn enrol(cfg: &Config) -> Result<enc_certs::CertInfo, String> {
    let (c, e) = (cfg.clone(), cfg.tls.enrolment.clone().unwrap());
    tokio::task::spawn_blocking(move || enc_agent::enrolment::enrol_once(&c, &e))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_node_enrols_with_its_service_account_token_and_then_renews() {
    enc_certs::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    enc_certs::init_ca(&dir.path().join("ca"), &enc_certs::CaOptions::default()).unwrap();
    let reviewer = Arc::new(
        FakeTokenReviewer::new()
            .with_bound_token("tok-node-1", "enc-issuer", SA, "node-1", "enc-agent-a1")
            .with_bound_token("tok-node-3", "enc-issuer", SA, "node-3", "enc-agent-c3")
            .with_bound_token(
                "tok-other-sa",
                "enc-issuer",
                "system:serviceaccount:default:default",
                "node-1",
                "web-0",
            )
            .with_node("node-1", &[ip("10.0.0.1")])
            .with_node("node-3", &[ip("10.0.0.3")]),
    );
    let (addr, host) = start_issuer(dir.path(), true, Some(reviewer.clone())).await;
    // The issuer's serving certificate names 127.0.0.1; the agents dial that address.
    let issuer = format!("127.0.0.1:{}", addr.rsplit_once(':').unwrap().1);

    // Refusals, each naming what was wrong and the value, with nothing written.
    let cases = [
        // node-1's agent presenting node-3's token: the certificate would be for node-1.
        (
            "node-1",
            "10.0.0.1",
            "tok-node-3",
            "it is for node node-1 (DNS SAN DNS:node-1), not for node node-3",
        ),
        // The right node, an address the Node does not have.
        (
            "node-1",
            "10.0.0.9",
            "tok-node-1",
            "it requests IP SAN IP:10.0.0.9; the ServiceAccount token attests node node-1, which may be issued DNS:node-1, IP:10.0.0.1",
        ),
        (
            "node-1",
            "10.0.0.1",
            "forged",
            "not authenticated by the API server: [invalid bearer token",
        ),
        (
            "node-1",
            "10.0.0.1",
            "tok-other-sa",
            "belongs to \"system:serviceaccount:default:default\", not to \"system:serviceaccount:kube-system:enc-agent\"",
        ),
    ];
    for (i, (node, address, token, want)) in cases.iter().enumerate() {
        let sub = dir.path().join(format!("case{i}"));
        std::fs::create_dir_all(sub.join("ca")).unwrap();
        std::fs::copy(dir.path().join("ca/ca.crt"), sub.join("ca/ca.crt")).unwrap();
        let cfg = agent_config(&sub, node, address, &issuer, token);
        let e = enrol(&cfg).await.unwrap_err();
        assert!(e.contains(want), "{e}\nwant: {want}");
        assert!(e.contains("refused"), "{e}");
        assert!(!e.contains(token), "the token leaked into {e}");
        assert!(!cfg.tls.cert.exists() && !cfg.tls.key.exists());
    }
    assert_eq!(host.stats().refused.load(Ordering::Relaxed), 4);
    assert!(reviewer.asked_audiences().iter().all(|a| a == "enc-issuer"));

    // node-1 with its own token: enrolled.
    let cfg = agent_config(dir.path(), "node-1", "10.0.0.1", &issuer, "tok-node-1");
    let info = enrol(&cfg).await.unwrap();
    assert_eq!(info.dns_names, ["node-1"]);
    assert_eq!(info.ips, [ip("10.0.0.1")]);
    let id = enc_certs::NodeIdentity::load(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca).unwrap();
    assert_eq!(id.info().serial, info.serial);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cfg.tls.key)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(host.stats().enrolled.load(Ordering::Relaxed), 1);
    let ledger = enc_certs::read_ledger(&dir.path().join("ca")).unwrap();
    assert_eq!(ledger.len(), 1, "one issuance recorded: {ledger:?}");

    // Then renewal as for any node: mutual TLS with the enrolled certificate.
    let ca_pem = std::fs::read_to_string(&cfg.tls.ca).unwrap();
    let (issuer2, id2) = (issuer.clone(), id);
    let answer = tokio::task::spawn_blocking(move || {
        let client = enc_certs::issuer_client_config(ca_pem.as_bytes(), Some(&id2)).unwrap();
        let mut s = enc_certs::connect_issuer(&issuer2, client, Duration::from_secs(5)).unwrap();
        let csr = enc_certs::generate_csr("node-1", &[ip("10.0.0.1")]).unwrap();
        enc_api::issuer::call(&mut s, &IssuerRequest::Renew { csr: csr.csr_pem })
    })
    .await
    .unwrap()
    .unwrap();
    match answer {
        IssuerResponse::Issued(i) => assert_ne!(i.serial, info.serial),
        other => panic!("renewal refused: {other:?}"),
    }
    assert_eq!(host.stats().renewed.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_issuer_without_kubernetes_attestation_refuses_service_account_tokens() {
    enc_certs::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    enc_certs::init_ca(&dir.path().join("ca"), &enc_certs::CaOptions::default()).unwrap();
    let (addr, host) = start_issuer(dir.path(), false, None).await;
    let issuer = format!("127.0.0.1:{}", addr.rsplit_once(':').unwrap().1);
    let cfg = agent_config(dir.path(), "node-1", "10.0.0.1", &issuer, "tok-node-1");
    let e = enrol(&cfg).await.unwrap_err();
    assert!(
        e.contains("does not accept ServiceAccount tokens (issuer.kubernetes is not configured)"),
        "{e}"
    );
    assert_eq!(host.stats().refused.load(Ordering::Relaxed), 1);
    assert!(!cfg.tls.cert.exists());
}

#[tokio::test]
async fn start_up_enrolment_waits_for_an_issuer_that_comes_up_later() {
    enc_certs::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    enc_certs::init_ca(&dir.path().join("ca"), &enc_certs::CaOptions::default()).unwrap();
    // A free port, with nothing listening on it yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let issuer = format!("127.0.0.1:{port}");
    let cfg = agent_config(dir.path(), "node-1", "10.0.0.1", &issuer, "tok-node-1");
    let enrolling = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            enc_agent::enrolment::enrol_until_done(&cfg, cfg.tls.enrolment.as_ref().unwrap()).await
        })
    };
    // Two attempts fail (1 s apart), then the issuer starts on that port.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!enrolling.is_finished());
    assert!(!cfg.tls.cert.exists());
    let text = "issuer:\n  listen: 127.0.0.1:7946\n  caDir: ca\n  kubernetes:\n    serviceAccount: kube-system/enc-agent\nserverName: enc-issuer.test\nserverAddress: 127.0.0.1\n";
    let scfg =
        StandaloneIssuerConfig::parse_with_env(text, &dir.path().join("issuer.yaml"), |_| None)
            .unwrap();
    let host = Arc::new(StandaloneIssuer::new(scfg.clone()).unwrap());
    let reviewer: Arc<dyn TokenReviewer> = Arc::new(
        FakeTokenReviewer::new()
            .with_bound_token("tok-node-1", "enc-issuer", SA, "node-1", "enc-agent-a1")
            .with_node("node-1", &[ip("10.0.0.1")]),
    );
    let listener = tokio::net::TcpListener::bind(&issuer).await.unwrap();
    tokio::spawn(enc_agent::issuer::serve(
        host.clone(),
        scfg.issuer,
        Some(reviewer),
        listener,
    ));
    let info = tokio::time::timeout(Duration::from_secs(10), enrolling)
        .await
        .expect("enrolled within the backoff")
        .unwrap();
    assert_eq!(info.dns_names, ["node-1"]);
    enc_certs::NodeIdentity::load(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca).unwrap();
    assert_eq!(host.stats().enrolled.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_missing_expired_foreign_or_mismatched_certificate_needs_enrolment() {
    use enc_agent::enrolment::needs_enrolment;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    enc_certs::init_ca(&ca_dir, &enc_certs::CaOptions::default()).unwrap();
    let cfg = agent_config(
        dir.path(),
        "node-1",
        "10.0.0.1",
        "127.0.0.1:1",
        "eyJ-unused",
    );
    let why = needs_enrolment(&cfg).unwrap();
    assert!(why.contains("no certificate yet"), "{why}");
    let ca = enc_certs::CertificateAuthority::load(&ca_dir).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let write = |node: &str, ip: &str, from: time::OffsetDateTime, to: time::OffsetDateTime| {
        let pem = enc_certs::issue_node_cert_pem(
            &ca,
            &enc_certs::NodeCertRequest {
                node: node.into(),
                ips: vec![ip.parse().unwrap()],
                days: 1,
            },
            from,
            to,
        )
        .unwrap();
        std::fs::write(&cfg.tls.cert, pem.cert_pem).unwrap();
        std::fs::write(&cfg.tls.key, pem.key_pem).unwrap();
    };
    let hour = time::Duration::hours(1);
    write("node-1", "10.0.0.1", now - hour, now + hour);
    assert_eq!(needs_enrolment(&cfg), None);
    write("node-1", "10.0.0.1", now - hour * 2, now - hour);
    let why = needs_enrolment(&cfg).unwrap();
    assert!(why.contains("expired at"), "{why}");
    write("node-1", "10.0.0.7", now - hour, now + hour);
    let why = needs_enrolment(&cfg).unwrap();
    assert!(why.contains("10.0.0.1"), "{why}");
    write("node-2", "10.0.0.1", now - hour, now + hour);
    let why = needs_enrolment(&cfg).unwrap();
    assert!(why.contains("node-1"), "{why}");
    // A certificate of another CA does not load under tls.ca.
    let other = tempfile::tempdir().unwrap();
    enc_certs::init_ca(other.path(), &enc_certs::CaOptions::default()).unwrap();
    let other_ca = enc_certs::CertificateAuthority::load(other.path()).unwrap();
    let pem = enc_certs::issue_node_cert_pem(
        &other_ca,
        &enc_certs::NodeCertRequest {
            node: "node-1".into(),
            ips: vec![ip("10.0.0.1")],
            days: 1,
        },
        now - hour,
        now + hour,
    )
    .unwrap();
    std::fs::write(&cfg.tls.cert, pem.cert_pem).unwrap();
    std::fs::write(&cfg.tls.key, pem.key_pem).unwrap();
    let why = needs_enrolment(&cfg).unwrap();
    assert!(why.contains("does not load"), "{why}");
}
