//! Wiring: everything the agent runs, started and stopped in one place.

use crate::Error;
use crate::config::{Config, EncryptionConfig};
use crate::control::proto::{Hello, PROTOCOL_VERSION, WireguardAnnounce};
use crate::control::session::Timing;
use crate::peers::{Desired, PeerTable, Role};
use crate::reconcile::reconcile;
use enc_certs::NodeIdentity;
use enc_geneve_vxlan::{LinkBackend, RT_TABLE_MAIN, RtnetlinkLinks, mtu};
use enc_wireguard::{BoringtunConfig, BoringtunWg, PrivateKey, WgBackend};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{info, warn};

/// How often the reconciler runs even when nothing asked it to.
const RECONCILE_PERIOD: Duration = Duration::from_secs(5);

/// State shared by the agent's tasks.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// This node's TLS identity.
    pub identity: NodeIdentity,
    /// The WireGuard datapath.
    pub wg: Arc<dyn WgBackend>,
    /// Links and routes.
    pub links: Arc<dyn LinkBackend>,
    /// Why this WireGuard implementation was chosen.
    pub backend_reason: String,
    /// MTU of the encryption device and of the routes into it.
    pub mtu: u32,
    /// When the agent started.
    pub started: Instant,
    /// Control session timers.
    pub timing: Timing,
    table: Mutex<PeerTable>,
    reconcile: Notify,
    next_session: AtomicU64,
}

impl Shared {
    /// Locks the peer table; a poisoned lock (a panicked task) is recovered, since the table
    /// is plain data that every transition leaves consistent.
    pub fn table(&self) -> MutexGuard<'_, PeerTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the reconciler to run.
    pub fn request_reconcile(&self) {
        self.reconcile.notify_one();
    }

    /// A fresh control-session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The hello this node sends to every peer.
    pub fn hello(&self) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            node: self.config.node.name.clone(),
            wireguard: WireguardAnnounce {
                public_key: self.wg.public_key().to_string(),
                listen_port: self.wg.listen_port(),
            },
        }
    }

    fn desired(&self) -> Desired {
        let mut t = self.table();
        t.expire(Instant::now(), self.config.control.key_grace_period);
        t.desired(self.wg.ifname(), self.mtu)
    }
}

/// Picks the WireGuard implementation and says why.
pub fn choose_wireguard_backend() -> String {
    if std::path::Path::new("/sys/module/wireguard").exists() {
        "the kernel has WireGuard, but this build has no kernel backend yet; using boringtun in userspace".into()
    } else {
        "kernel WireGuard module not loaded (/sys/module/wireguard absent); using boringtun in userspace".into()
    }
}

/// Checks that the certificate names this node as configured.
fn check_identity(config: &Config, identity: &NodeIdentity) -> Result<(), Error> {
    let info = identity.info();
    if !info.dns_names.contains(&config.node.name) {
        return Err(Error::IdentityMismatch(format!(
            "tls.cert {} names {:?}, but node.name is {:?}",
            config.tls.cert.display(),
            info.dns_names,
            config.node.name
        )));
    }
    if !info.ips.contains(&config.node.underlay_address) {
        return Err(Error::IdentityMismatch(format!(
            "tls.cert {} carries addresses {:?}, but node.underlayAddress is {}",
            config.tls.cert.display(),
            info.ips,
            config.node.underlay_address
        )));
    }
    Ok(())
}

/// Runs the agent until `shutdown` completes, then removes what it configured.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    enc_certs::install_crypto_provider();
    let identity = NodeIdentity::load(&config.tls.cert, &config.tls.key, &config.tls.ca)
        .map_err(Error::Certs)?;
    check_identity(&config, &identity)?;

    let EncryptionConfig::Wireguard(wg_cfg) = &config.encryption;
    let backend_reason = choose_wireguard_backend();
    let links: Arc<dyn LinkBackend> = Arc::new(RtnetlinkLinks::new().map_err(Error::Links)?);
    let private_key = PrivateKey::generate().map_err(Error::Wireguard)?;
    let wg = BoringtunWg::start(BoringtunConfig {
        ifname: wg_cfg.interface.clone(),
        private_key,
        listen: SocketAddr::new(config.node.underlay_address, wg_cfg.listen_port),
    })
    .map_err(Error::Wireguard)?;
    let wg: Arc<dyn WgBackend> = Arc::new(wg);
    let underlay = if config.node.underlay_address.is_ipv4() {
        mtu::Underlay::V4
    } else {
        mtu::Underlay::V6
    };
    let mtu = mtu::wireguard_device_mtu(config.underlay_mtu, underlay).map_err(Error::Links)?;
    links
        .set_link(wg.ifname(), mtu, true)
        .map_err(Error::Links)?;
    info!(
        node = %config.node.name,
        interface = wg.ifname(),
        public_key = %wg.public_key(),
        port = wg.listen_port(),
        mtu,
        reason = %backend_reason,
        "WireGuard datapath up (boringtun)"
    );

    let shared = Arc::new(Shared {
        table: Mutex::new(PeerTable::new(&config, Instant::now())),
        config,
        identity,
        wg,
        links,
        backend_reason,
        mtu,
        started: Instant::now(),
        timing: Timing::default(),
        reconcile: Notify::new(),
        next_session: AtomicU64::new(1),
    });

    // First reconcile before any peer is reachable: routes for every peer go into the
    // device, so nothing reaches a peer's pods except through WireGuard.
    reconcile_once(&shared);

    let listener = tokio::net::TcpListener::bind(shared.config.control.listen)
        .await
        .map_err(Error::io(format!(
            "bind control listener {}",
            shared.config.control.listen
        )))?;
    let status = crate::status::bind(&shared.config.status_socket)?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(reconciler(shared.clone()));
    tasks.spawn(crate::control::net::listen(shared.clone(), listener));
    for peer in &shared.config.peers {
        if Role::of(&shared.config.node.name, &peer.name) == Role::Dial {
            tasks.spawn(crate::control::net::dial_loop(shared.clone(), peer.clone()));
        }
    }
    tasks.spawn(crate::status::serve(shared.clone(), status));
    info!(
        listen = %shared.config.control.listen,
        socket = %shared.config.status_socket.display(),
        peers = shared.config.peers.len(),
        "agent running"
    );

    shutdown.await;
    info!("shutting down");
    tasks.shutdown().await;

    let empty = Desired {
        wg_peers: vec![],
        routes: vec![],
    };
    if let Err(e) = reconcile(
        &empty,
        shared.wg.as_ref(),
        shared.links.as_ref(),
        RT_TABLE_MAIN,
    ) {
        warn!(error = %format_chain(&e), "cleanup of routes and peers failed");
    }
    if let Err(e) = std::fs::remove_file(&shared.config.status_socket) {
        warn!(error = %e, socket = %shared.config.status_socket.display(), "cannot remove status socket");
    }
    info!("stopped; routes and WireGuard peers removed");
    Ok(())
}

fn reconcile_once(shared: &Shared) {
    let desired = shared.desired();
    match reconcile(
        &desired,
        shared.wg.as_ref(),
        shared.links.as_ref(),
        RT_TABLE_MAIN,
    ) {
        Ok(out) if out != Default::default() => info!(?out, "reconciled datapath"),
        Ok(_) => {}
        Err(e) => warn!(error = %format_chain(&e), "reconcile failed; will retry"),
    }
}

async fn reconciler(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.reconcile.notified() => {}
            _ = tokio::time::sleep(RECONCILE_PERIOD) => {}
        }
        reconcile_once(&shared);
    }
}

/// Formats an error and its sources on one line.
pub fn format_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
