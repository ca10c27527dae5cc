//! The issuer role: online enrolment and renewal over TLS 1.3 (protocol in
//! [`enc_api::issuer`]).
//!
//! One request per connection, answered and closed. The checks are the certs crate's:
//! enrolment is [`enc_certs::sign_csr`] (the same as `encctl cert sign`), renewal is
//! [`enc_certs::renew_csr`] on the TLS client certificate, which the TLS layer verified
//! against the issuing CA. Kubernetes-attested enrolment (`issuer.kubernetes`) verifies the
//! ServiceAccount token with [`crate::attest`] and signs with
//! [`enc_certs::sign_attested_csr`] for the node the token names and that Node's addresses.
//!
//! The role runs inside an agent ([`IssuerHost`] for the agent's shared state) or on its own
//! ([`StandaloneIssuer`], `enc-agent --issuer-only`, the chart's issuer Deployment).
//!
//! At most [`MAX_CONNECTIONS`] requests are served at once, each within [`REQUEST_TIMEOUT`]
//! (the TokenReview included); a request frame above [`enc_api::issuer::MAX_REQUEST`] bytes
//! is refused before it is read.

use crate::app::{Shared, format_chain};
use crate::attest::{AttestedNode, Refusal, TokenReviewer};
use crate::config::{IssuerConfig, StandaloneIssuerConfig};
use crate::events::Detail;
use enc_api::EventKind;
use enc_api::issuer::{self, Issued, IssuerRequest, IssuerResponse};
use enc_certs::{CertificateAuthority, NodeIdentity};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// Requests served at once; further connections are closed unanswered.
pub const MAX_CONNECTIONS: usize = 32;
/// Limit on one connection: TLS handshake, request, signing and answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the issuer did since start, for status and metrics.
#[derive(Debug, Default)]
pub struct IssuerStats {
    /// Enrolments signed.
    pub enrolled: AtomicU64,
    /// Renewals signed.
    pub renewed: AtomicU64,
    /// Requests refused.
    pub refused: AtomicU64,
}

/// What the issuer role needs from whoever runs it.
pub trait IssuerHost: Send + Sync + 'static {
    /// The certificate and key the issuer presents.
    fn server_identity(&self) -> Result<Arc<NodeIdentity>, String>;
    /// Whether a revocation list this host holds revokes `serial`.
    fn is_revoked(&self, serial: &str) -> bool;
    /// The CA bundle returned with a certificate (PEM), or why it cannot be read.
    fn ca_bundle(&self) -> Result<String, String>;
    /// The counters.
    fn stats(&self) -> &IssuerStats;
    /// Records an audit event.
    fn record(&self, kind: EventKind, detail: Detail);
}

impl IssuerHost for Shared {
    fn server_identity(&self) -> Result<Arc<NodeIdentity>, String> {
        Ok(self.identity())
    }
    fn is_revoked(&self, serial: &str) -> bool {
        Shared::is_revoked(self, serial)
    }
    fn ca_bundle(&self) -> Result<String, String> {
        std::fs::read_to_string(&self.config.tls.ca)
            .map_err(|e| format!("{}: {e}", self.config.tls.ca.display()))
    }
    fn stats(&self) -> &IssuerStats {
        self.issuer_stats()
    }
    fn record(&self, kind: EventKind, detail: Detail) {
        self.events.record(kind, detail);
    }
}

/// The issuer role on its own: holds the CA in memory and signs its own serving
/// certificate for `serverName` and `serverAddress`, re-signed when half of its lifetime has
/// passed. Events are logged (tracing), not written to a file.
pub struct StandaloneIssuer {
    ca: CertificateAuthority,
    cfg: StandaloneIssuerConfig,
    current: Mutex<Option<Arc<NodeIdentity>>>,
    stats: IssuerStats,
}

impl StandaloneIssuer {
    /// Loads the CA of `cfg.issuer.caDir` and signs the first serving certificate.
    pub fn new(cfg: StandaloneIssuerConfig) -> Result<Self, crate::Error> {
        let ca = CertificateAuthority::load(&cfg.issuer.ca_dir).map_err(crate::Error::Certs)?;
        let me = Self {
            ca,
            cfg,
            current: Mutex::new(None),
            stats: IssuerStats::default(),
        };
        let first = me.mint().map_err(crate::Error::Certs)?;
        *me.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(first);
        Ok(me)
    }

    fn mint(&self) -> Result<Arc<NodeIdentity>, enc_certs::Error> {
        let now = time::OffsetDateTime::now_utc();
        // Validated to 10 s .. 3650 days on load, so this conversion holds.
        let life =
            time::Duration::try_from(self.cfg.issuer.cert_lifetime).unwrap_or(time::Duration::DAY);
        let req = enc_certs::NodeCertRequest {
            node: self.cfg.server_name.clone(),
            ips: vec![self.cfg.server_address],
            days: 1,
        };
        let pem = enc_certs::issue_node_cert_pem(
            &self.ca,
            &req,
            now - enc_certs::CLOCK_SKEW.min(life / 10),
            (now + life).min(self.ca.info().not_after),
        )?;
        let id = NodeIdentity::from_pem(&pem.cert_pem, &pem.key_pem, self.ca.cert_pem())?;
        info!(name = %self.cfg.server_name, address = %self.cfg.server_address, serial = %id.info().serial, "issuer serving certificate signed");
        Ok(Arc::new(id))
    }
}

impl IssuerHost for StandaloneIssuer {
    fn server_identity(&self) -> Result<Arc<NodeIdentity>, String> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = time::OffsetDateTime::now_utc();
        let fresh = cur.as_ref().filter(|id| {
            let i = id.info();
            now < i.not_before + (i.not_after - i.not_before) / 2
        });
        if let Some(id) = fresh {
            return Ok(id.clone());
        }
        let id = self.mint().map_err(|e| format_chain(&e))?;
        *cur = Some(id.clone());
        Ok(id)
    }
    fn is_revoked(&self, _serial: &str) -> bool {
        // The CA directory's crl.pem is checked by renew_csr itself.
        false
    }
    fn ca_bundle(&self) -> Result<String, String> {
        Ok(self.ca.cert_pem().to_owned())
    }
    fn stats(&self) -> &IssuerStats {
        &self.stats
    }
    fn record(&self, kind: EventKind, detail: Detail) {
        info!(event = ?kind, node = ?detail.peer, serial = ?detail.serial, "{}", detail.detail);
    }
}

/// Runs a standalone issuer until `shutdown` completes.
pub async fn run_standalone(
    cfg: StandaloneIssuerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::Error> {
    enc_certs::install_crypto_provider();
    let listen = cfg.issuer.listen;
    let issuer_cfg = cfg.issuer.clone();
    let host = Arc::new(StandaloneIssuer::new(cfg)?);
    let reviewer: Option<Arc<dyn TokenReviewer>> = match &issuer_cfg.kubernetes {
        None => None,
        Some(_) => {
            let client =
                kube::Client::try_default()
                    .await
                    .map_err(|source| crate::Error::Kube {
                        context: "connecting to the Kubernetes API for TokenReviews".to_owned(),
                        source,
                    })?;
            Some(Arc::new(crate::attest::KubeTokenReviewer::new(client)))
        }
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(crate::Error::io(format!("bind issuer listener {listen}")))?;
    info!(%listen, ca_dir = %issuer_cfg.ca_dir.display(), kubernetes = issuer_cfg.kubernetes.is_some(), "standalone issuer up");
    tokio::select! {
        () = serve(host, issuer_cfg, reviewer, listener) => {}
        () = shutdown => info!("standalone issuer stopping"),
    }
    Ok(())
}

/// Accepts issuer connections forever. `reviewer` verifies ServiceAccount tokens when
/// `cfg.kubernetes` is set.
pub async fn serve<H: IssuerHost>(
    shared: Arc<H>,
    cfg: IssuerConfig,
    reviewer: Option<Arc<dyn TokenReviewer>>,
    listener: TcpListener,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, src)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    warn!(%src, "issuer busy ({MAX_CONNECTIONS} requests in progress); connection closed");
                    continue;
                };
                let shared = shared.clone();
                let cfg = cfg.clone();
                let reviewer = reviewer.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let work = handle(&shared, &cfg, reviewer.as_deref(), stream, src);
                    if tokio::time::timeout(REQUEST_TIMEOUT, work).await.is_err() {
                        warn!(%src, "issuer request timed out after {}s", REQUEST_TIMEOUT.as_secs());
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting an issuer connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle<H: IssuerHost>(
    shared: &Arc<H>,
    cfg: &IssuerConfig,
    reviewer: Option<&dyn TokenReviewer>,
    stream: TcpStream,
    src: SocketAddr,
) {
    let ca_cert = cfg.ca_dir.join(enc_certs::CA_CERT_FILE);
    let config = match shared.server_identity().and_then(|id| {
        enc_certs::read_pem_certs(&ca_cert)
            .and_then(|cas| enc_certs::issuer_server_config(&id, &cas))
            .map_err(|e| format_chain(&e))
    }) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot build the issuer's TLS configuration");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut tls = match TlsAcceptor::from(config).accept(stream).await {
        Ok(t) => t,
        Err(e) => {
            let reason = enc_certs::AuthFailure::from_io_error(&e)
                .map_or_else(|| e.to_string(), |f| f.to_string());
            refused(
                shared.as_ref(),
                src,
                None,
                format!("TLS handshake failed: {reason}"),
            );
            return;
        }
    };
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let answer = match read_request(&mut tls).await {
        Err(reason) => {
            refused(shared.as_ref(), src, None, reason.clone());
            IssuerResponse::Refused { reason }
        }
        Ok(req) => {
            // The TokenReview is an API call: made here, before the blocking signing.
            let attested = match &req {
                IssuerRequest::EnrolServiceAccount {
                    service_account_token,
                    ..
                } => Some(match (&cfg.kubernetes, reviewer) {
                    (Some(policy), Some(reviewer)) => {
                        crate::attest::attest(reviewer, policy, service_account_token).await
                    }
                    _ => Err(Refusal::NotEnabled),
                }),
                _ => None,
            };
            let shared2 = shared.clone();
            let cfg2 = cfg.clone();
            match tokio::task::spawn_blocking(move || {
                decide(shared2.as_ref(), &cfg2, src, req, client_cert, attested)
            })
            .await
            {
                Ok(a) => a,
                Err(e) => IssuerResponse::Refused {
                    reason: format!("internal error: {e}"),
                },
            }
        }
    };
    let frame = issuer::encode(&answer);
    if let Err(e) = async {
        tls.write_all(&frame).await?;
        tls.shutdown().await
    }
    .await
    {
        warn!(%src, error = %e, "cannot send the issuer's answer");
    }
}

/// Reads one request frame; the error is the refusal reason.
async fn read_request(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
) -> Result<IssuerRequest, String> {
    let mut prefix = [0u8; 4];
    tls.read_exact(&mut prefix)
        .await
        .map_err(|e| format!("reading the request length: {e}"))?;
    let len = issuer::frame_len(prefix, issuer::MAX_REQUEST).map_err(|e| e.to_string())?;
    let mut frame = vec![0u8; 4 + len];
    frame[..4].copy_from_slice(&prefix);
    tls.read_exact(&mut frame[4..])
        .await
        .map_err(|e| format!("reading the request body: {e}"))?;
    match issuer::decode_request(&frame) {
        Ok(Some((req, _))) => Ok(req),
        Ok(None) => Err("truncated request".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// How a certificate was granted, for the log and the event.
enum Grant {
    JoinToken,
    ServiceAccount { pod: Option<String> },
    Renewal { previous: String },
}

/// Checks and signs one request (blocking: file locks and signing). `attested` is the
/// outcome of the ServiceAccount token check of an `enrolServiceAccount` request.
fn decide(
    shared: &dyn IssuerHost,
    cfg: &IssuerConfig,
    src: SocketAddr,
    req: IssuerRequest,
    client_cert: Option<Vec<u8>>,
    attested: Option<Result<AttestedNode, Refusal>>,
) -> IssuerResponse {
    let now = time::OffsetDateTime::now_utc();
    let op = req.op();
    let result = match req {
        IssuerRequest::Enrol { token, csr } => {
            enc_certs::sign_csr(&cfg.ca_dir, &csr, &token, cfg.cert_lifetime, now)
                .map(|s| (s.token.node, s.cert_pem, s.info, Grant::JoinToken))
                .map_err(|e| format_chain(&e))
        }
        IssuerRequest::EnrolServiceAccount { csr, .. } => {
            match attested.unwrap_or(Err(Refusal::NotEnabled)) {
                Err(refusal) => Err(refusal.to_string()),
                Ok(a) => enc_certs::sign_attested_csr(
                    &cfg.ca_dir,
                    &csr,
                    &a.node,
                    &a.ips,
                    cfg.cert_lifetime,
                    now,
                )
                .map(|s| {
                    (
                        a.node.clone(),
                        s.cert_pem,
                        s.info,
                        Grant::ServiceAccount { pod: a.pod.clone() },
                    )
                })
                .map_err(|e| format_chain(&e)),
            }
        }
        IssuerRequest::Renew { csr } => match client_cert {
            None => Err(
                "renewal needs the current certificate as the TLS client certificate (a node without one enrols with a join token)"
                    .to_owned(),
            ),
            Some(der) => {
                let held_revoked = enc_certs::inspect(&der)
                    .ok()
                    .filter(|c| shared.is_revoked(&c.serial));
                match held_revoked {
                    Some(c) => Err(format!(
                        "renewal refused: certificate {} is revoked by the list this node holds",
                        c.serial
                    )),
                    None => enc_certs::renew_csr(&cfg.ca_dir, &csr, &der, cfg.cert_lifetime, now)
                        .map(|r| {
                            let node = r.info.dns_names.first().cloned().unwrap_or_default();
                            (
                                node,
                                r.cert_pem,
                                r.info,
                                Grant::Renewal {
                                    previous: r.previous.serial,
                                },
                            )
                        })
                        .map_err(|e| format_chain(&e)),
                }
            }
        },
    };
    let (node, cert_pem, info, grant) = match result {
        Ok(v) => v,
        Err(reason) => {
            let reason = format!("{op} refused: {reason}");
            refused(shared, src, None, reason.clone());
            return IssuerResponse::Refused { reason };
        }
    };
    let ca = match shared.ca_bundle() {
        Ok(ca) => ca,
        Err(e) => {
            // Issued and recorded already; the node can still use it with the bundle it has.
            warn!(error = %e, "cannot read the CA bundle to return with a certificate");
            String::new()
        }
    };
    let stats = shared.stats();
    let detail = match &grant {
        Grant::JoinToken => {
            stats.enrolled.fetch_add(1, Ordering::Relaxed);
            format!(
                "enrolled {node} from {src} with a join token: serial {}, valid until {}",
                info.serial, info.not_after
            )
        }
        Grant::ServiceAccount { pod } => {
            stats.enrolled.fetch_add(1, Ordering::Relaxed);
            format!(
                "enrolled {node} from {src} with a ServiceAccount token of pod {}: serial {}, valid until {}",
                pod.as_deref().unwrap_or("?"),
                info.serial,
                info.not_after
            )
        }
        Grant::Renewal { previous: prev } => {
            stats.renewed.fetch_add(1, Ordering::Relaxed);
            format!(
                "renewed {node} from {src}: serial {prev} -> {}, valid until {}",
                info.serial, info.not_after
            )
        }
    };
    info!(%node, %src, serial = %info.serial, "{detail}");
    shared.record(
        EventKind::Issued,
        Detail {
            peer: Some(node),
            serial: Some(info.serial.clone()),
            detail,
            ..Default::default()
        },
    );
    IssuerResponse::Issued(Issued {
        cert: cert_pem,
        ca,
        serial: info.serial.clone(),
        not_after: info
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    })
}

fn refused(
    shared: &(impl IssuerHost + ?Sized),
    src: SocketAddr,
    node: Option<String>,
    reason: String,
) {
    shared.stats().refused.fetch_add(1, Ordering::Relaxed);
    warn!(%src, %reason, "issuer request refused");
    shared.record(
        EventKind::IssueRefused,
        Detail {
            peer: node,
            detail: format!("request from {src}: {reason}"),
            ..Default::default()
        },
    );
}
