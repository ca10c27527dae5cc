//! The issuer role: online enrolment and renewal over TLS 1.3 (protocol in
//! [`enc_api::issuer`]).
//!
//! One request per connection, answered and closed. The checks are the certs crate's:
//! enrolment is [`enc_certs::sign_csr`] (the same as `encctl cert sign`), renewal is
//! [`enc_certs::renew_csr`] on the TLS client certificate, which the TLS layer verified
//! against the issuing CA. At most [`MAX_CONNECTIONS`] requests are served at once, each
//! within [`REQUEST_TIMEOUT`]; a request frame above [`enc_api::issuer::MAX_REQUEST`] bytes is
//! refused before it is read.

use crate::app::{Shared, format_chain};
use crate::config::IssuerConfig;
use crate::events::Detail;
use enc_api::EventKind;
use enc_api::issuer::{self, Issued, IssuerRequest, IssuerResponse};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Accepts issuer connections forever.
pub async fn serve(shared: Arc<Shared>, cfg: IssuerConfig, listener: TcpListener) {
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
                tokio::spawn(async move {
                    let _permit = permit;
                    if tokio::time::timeout(REQUEST_TIMEOUT, handle(&shared, &cfg, stream, src))
                        .await
                        .is_err()
                    {
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

async fn handle(shared: &Arc<Shared>, cfg: &IssuerConfig, stream: TcpStream, src: SocketAddr) {
    let ca_cert = cfg.ca_dir.join(enc_certs::CA_CERT_FILE);
    let config = match enc_certs::read_pem_certs(&ca_cert)
        .and_then(|cas| enc_certs::issuer_server_config(&shared.identity(), &cas))
    {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %format_chain(&e), "cannot build the issuer's TLS configuration");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut tls = match TlsAcceptor::from(config).accept(stream).await {
        Ok(t) => t,
        Err(e) => {
            let reason = enc_certs::AuthFailure::from_io_error(&e)
                .map_or_else(|| e.to_string(), |f| f.to_string());
            refused(shared, src, None, format!("TLS handshake failed: {reason}"));
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
            refused(shared, src, None, reason.clone());
            IssuerResponse::Refused { reason }
        }
        Ok(req) => {
            let shared2 = shared.clone();
            let cfg2 = cfg.clone();
            match tokio::task::spawn_blocking(move || {
                decide(&shared2, &cfg2, src, req, client_cert)
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

/// Checks and signs one request (blocking: file locks and signing).
fn decide(
    shared: &Shared,
    cfg: &IssuerConfig,
    src: SocketAddr,
    req: IssuerRequest,
    client_cert: Option<Vec<u8>>,
) -> IssuerResponse {
    let now = time::OffsetDateTime::now_utc();
    let op = req.op();
    let result = match req {
        IssuerRequest::Enrol { token, csr } => {
            enc_certs::sign_csr(&cfg.ca_dir, &csr, &token, cfg.cert_lifetime, now)
                .map(|s| (s.token.node, s.cert_pem, s.info, None))
                .map_err(|e| format_chain(&e))
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
                            (node, r.cert_pem, r.info, Some(r.previous.serial))
                        })
                        .map_err(|e| format_chain(&e)),
                }
            }
        },
    };
    let (node, cert_pem, info, previous) = match result {
        Ok(v) => v,
        Err(reason) => {
            let reason = format!("{op} refused: {reason}");
            refused(shared, src, None, reason.clone());
            return IssuerResponse::Refused { reason };
        }
    };
    let ca = match std::fs::read_to_string(&shared.config.tls.ca) {
        Ok(ca) => ca,
        Err(e) => {
            // Issued and recorded already; the node can still use it with the bundle it has.
            warn!(error = %e, path = %shared.config.tls.ca.display(), "cannot read the CA bundle to return with a certificate");
            String::new()
        }
    };
    let stats = shared.issuer_stats();
    let detail = match &previous {
        None => {
            stats.enrolled.fetch_add(1, Ordering::Relaxed);
            format!(
                "enrolled {node} from {src} with a join token: serial {}, valid until {}",
                info.serial, info.not_after
            )
        }
        Some(prev) => {
            stats.renewed.fetch_add(1, Ordering::Relaxed);
            format!(
                "renewed {node} from {src}: serial {prev} -> {}, valid until {}",
                info.serial, info.not_after
            )
        }
    };
    info!(%node, %src, serial = %info.serial, "{detail}");
    shared.events.record(
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

fn refused(shared: &Shared, src: SocketAddr, node: Option<String>, reason: String) {
    shared
        .issuer_stats()
        .refused
        .fetch_add(1, Ordering::Relaxed);
    warn!(%src, %reason, "issuer request refused");
    shared.events.record(
        EventKind::IssueRefused,
        Detail {
            peer: node,
            detail: format!("request from {src}: {reason}"),
            ..Default::default()
        },
    );
}
