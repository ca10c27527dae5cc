//! Discovery is not trusted for keys: two agents run the real control channel in-process (TLS
//! over loopback, fake datapath backends); a forged discovery entry for node-1 (its name, an
//! attacker's address, fingerprint and certificate) moves no key and no traffic.

use crate::app::{Shared, peer_supervisor, reconcile_once, test_shared};
use crate::backend::Crypto;
use crate::config::{Config, PeerConfig};
use crate::peers::Auth;
use enc_certs::{CaOptions, CertificateAuthority, ExpectedPeer, NodeCertRequest, NodeIdentity};
use enc_wireguard::{FakeWg, PrivateKey, WgBackend};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

const ATTACKER: &str = "127.0.0.66";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn issue(ca: &CertificateAuthority, node: &str, addr: &str) -> (String, String) {
    let now = time::OffsetDateTime::now_utc();
    let req = NodeCertRequest {
        node: node.into(),
        ips: vec![ip(addr)],
        days: 1,
    };
    let p = enc_certs::issue_node_cert_pem(
        ca,
        &req,
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    )
    .unwrap();
    (p.cert_pem, p.key_pem)
}

struct Agent {
    shared: Arc<Shared>,
    wg: Arc<FakeWg>,
    /// The agent's discovery: what the test sends here is what "the API server" says.
    discovery: watch::Sender<Vec<PeerConfig>>,
}

fn config(dir: &std::path::Path, name: &str, n: u8, addr: &str, port: u16) -> Config {
    let text = format!(
        "node: {{ name: {name}, underlayAddress: 10.0.0.{n}, podCidr: 10.244.{n}.0/24 }}\n\
         tls: {{ cert: c, key: k, ca: ca }}\n\
         encryption: {{ type: wireguard }}\n\
         control: {{ connectTimeout: 2s }}\n\
         metrics: {{ listen: 'off' }}\n\
         statusSocket: /nonexistent/enc-{name}.sock\n"
    );
    let mut c = Config::parse(&text, &dir.join("agent.yaml")).unwrap();
    // Loopback addresses (the file refuses them; tests may use them).
    c.node.underlay_address = ip(addr);
    c.control.listen = SocketAddr::new(ip(addr), port);
    c
}

fn peer(name: &str, n: u8, addr: &str, port: u16) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        underlay_address: ip(addr),
        pod_cidr: format!("10.244.{n}.0/24").parse().unwrap(),
        control_port: port,
        fingerprint: None,
    }
}

async fn agent(
    dir: &std::path::Path,
    (name, n, addr): (&str, u8, &str),
    identity: NodeIdentity,
    listener: TcpListener,
    peers: Vec<PeerConfig>,
) -> Agent {
    let port = listener.local_addr().unwrap().port();
    let wg = Arc::new(FakeWg::new(
        "wg0",
        PrivateKey::generate().unwrap().public_key(),
        51820,
    ));
    let links = Arc::new(enc_geneve_vxlan::FakeLinks::new());
    links.add_link("wg0", 1420);
    let dp = Arc::new(enc_tunnel_ebpf::FakeDatapath::new(
        enc_tunnel_ebpf::AttachMode::Tcx,
    ));
    let shared = test_shared(
        config(dir, name, n, addr, port),
        identity,
        Crypto::Wireguard(wg.clone() as Arc<dyn WgBackend>),
        links,
        dp,
    );
    let (discovery, rx) = watch::channel(peers);
    tokio::spawn(crate::control::net::listen(shared.clone(), listener));
    tokio::spawn(peer_supervisor(shared.clone(), rx));
    Agent {
        shared,
        wg,
        discovery,
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// WireGuard endpoints the agent's device has (after a reconcile).
fn endpoints(a: &Agent) -> Vec<SocketAddr> {
    reconcile_once(&a.shared);
    a.wg.dump()
        .unwrap()
        .peers
        .iter()
        .filter_map(|p| p.endpoint)
        .collect()
}

fn node1_keyed(a: &Agent) -> bool {
    // Absent until the agent's supervisor applied its first peer set.
    a.shared
        .table()
        .get("node-1")
        .is_some_and(|e| e.auth == Auth::Authenticated && e.outbound.is_some())
}

/// Connects to `target` from the attacker's address and runs a TLS handshake with
/// `identity`; returns once the server has closed the connection.
async fn attack(identity: &NodeIdentity, target: SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(ATTACKER), 0)).unwrap();
    let stream = socket.connect(target).await.unwrap();
    let exp = ExpectedPeer {
        name: "node-2".into(),
        addr: target.ip(),
    };
    let config = enc_certs::client_config(identity, &exp).unwrap();
    let name = enc_certs::server_name(&exp).unwrap();
    // TLS 1.3: the client may finish before the server refuses its certificate; the refusal
    // then arrives as an alert (or a close) on the first read.
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
    {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
        assert!(
            !matches!(r, Ok(Ok(n)) if n > 0),
            "the agent answered an attacker"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_encnode_never_gets_a_key_or_redirects_traffic() {
    enc_certs::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    for f in ["c", "k", "ca"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let ca = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let ca_pem = ca.cert_pem().to_owned();
    let id = |node: &str, addr: &str| {
        let (c, k) = issue(&ca, node, addr);
        NodeIdentity::from_pem(&c, &k, &ca_pem).unwrap()
    };
    let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l2 = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let (p1, p2) = (
        l1.local_addr().unwrap().port(),
        l2.local_addr().unwrap().port(),
    );
    let legit_node1 = peer("node-1", 1, "127.0.0.1", p1);
    let n1 = agent(
        dir.path(),
        ("node-1", 1, "127.0.0.1"),
        id("node-1", "127.0.0.1"),
        l1,
        vec![peer("node-2", 2, "127.0.0.2", p2)],
    )
    .await;
    let n2 = agent(
        dir.path(),
        ("node-2", 2, "127.0.0.2"),
        id("node-2", "127.0.0.2"),
        l2,
        vec![legit_node1.clone()],
    )
    .await;

    // The genuine pair authenticates and is keyed; node-2 sends to node-1's real address.
    eventually("node-1 keyed at node-2", || node1_keyed(&n2)).await;
    let wg_port = n1.wg.listen_port();
    assert_eq!(endpoints(&n2), [SocketAddr::new(ip("127.0.0.1"), wg_port)]);

    // The attacker: a node-9 that the cluster CA did enrol (a compromised node), and a
    // certificate for node-1 at the attacker's address from a CA of its own.
    let rogue = id("node-9", ATTACKER);
    let evil_ca = CertificateAuthority::generate(&CaOptions::default()).unwrap();
    let (evil_cert, evil_key) = issue(&evil_ca, "node-1", ATTACKER);
    let impostor = NodeIdentity::from_pem(
        &evil_cert,
        &evil_key,
        &format!("{}{ca_pem}", evil_ca.cert_pem()),
    )
    .unwrap();

    // The forged EncNode: node-1's name, the attacker's address and fingerprint.
    let mut forged = peer("node-1", 1, ATTACKER, p1);
    forged.fingerprint = Some(impostor.info().sha256_fingerprint.clone());
    n2.discovery.send_replace(vec![forged]);
    eventually("the forged entry applied", || {
        n2.shared
            .table()
            .get("node-1")
            .unwrap()
            .config
            .underlay_address
            == ip(ATTACKER)
    })
    .await;
    // Keys are gone at once, and nothing is sent to the attacker's address: strict mode drops
    // node-1's traffic instead of redirecting it.
    {
        let t = n2.shared.table();
        let e = t.get("node-1").unwrap();
        assert!(e.keys.is_none() && e.epochs.is_empty(), "{:?}", e.auth);
    }
    assert!(endpoints(&n2).is_empty(), "{:?}", endpoints(&n2));

    // Neither attacker certificate passes the handshake at the forged address.
    for (who, identity, reason) in [
        ("enrolled node-9", &rogue, "node-1"),
        ("node-1 from another CA", &impostor, "CA"),
    ] {
        let before = n2.shared.table().get("node-1").unwrap().failures;
        attack(identity, SocketAddr::new(ip("127.0.0.2"), p2)).await;
        eventually(&format!("{who} refused"), || {
            n2.shared.table().get("node-1").unwrap().failures > before
        })
        .await;
        let t = n2.shared.table();
        let e = t.get("node-1").unwrap();
        assert!(
            matches!(&e.auth, Auth::Failed(r) if r.contains(reason)),
            "{who}: {:?}",
            e.auth
        );
        assert!(e.keys.is_none() && e.epochs.is_empty() && e.cert.is_none());
        drop(t);
        assert!(endpoints(&n2).is_empty(), "{who}: {:?}", endpoints(&n2));
    }

    // The genuine node-1 keeps dialling from its real address, which node-2 no longer
    // expects: it is turned away, so the forged entry cannot be "confirmed" by it either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!node1_keyed(&n2));
    assert!(endpoints(&n2).is_empty());

    // Once discovery tells the truth again, the genuine pair recovers by itself.
    n2.discovery.send_replace(vec![legit_node1]);
    eventually("node-1 keyed again", || node1_keyed(&n2)).await;
    assert_eq!(endpoints(&n2), [SocketAddr::new(ip("127.0.0.1"), wg_port)]);
    assert_eq!(n2.shared.table().get("node-1").unwrap().id, 1);
}
