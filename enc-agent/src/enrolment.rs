//! Enrolment at start-up with a Kubernetes ServiceAccount token (`tls.enrolment`).
//!
//! A node without a certificate makes its key and a certificate signing request (DNS SAN
//! `node.name`, IP SAN `node.underlayAddress`), reads its projected ServiceAccount token, and
//! sends both to the issuer (`enrolServiceAccount`, TLS 1.3, the issuer authenticated by
//! `tls.ca` and the name dialled). The answer must be a node identity for this node under
//! `tls.ca` before anything is written; the key (0600) and certificate are then written
//! beside `tls.key` / `tls.cert` and renamed into place. Failures are retried with capped
//! exponential backoff: the issuer may come up after the agents. Renewal then works as for
//! any node (`tls.renewal`).

use crate::app::{ask_issuer, check_identity, format_chain, install_key_pair};
use crate::config::{Config, EnrolmentConfig};
use enc_api::issuer::IssuerRequest;
use enc_certs::{CertInfo, NodeIdentity};
use std::time::Duration;
use tracing::{info, warn};

/// Timeout of each step of an attempt (connect, handshake, request, answer).
pub const ENROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts.
pub const ENROL_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why this node must enrol before it can start (`None`: its certificate is usable): the
/// certificate or key is missing, does not load under `tls.ca`, does not name this node and
/// its address, or has expired. An expired certificate cannot be renewed, and a certificate
/// for an old address (the host's IP changed) is of no use, so both are replaced.
pub fn needs_enrolment(config: &Config) -> Option<String> {
    let tls = &config.tls;
    if !tls.cert.exists() || !tls.key.exists() {
        return Some(format!(
            "no certificate yet ({} / {})",
            tls.cert.display(),
            tls.key.display()
        ));
    }
    let id = match NodeIdentity::load(&tls.cert, &tls.key, &tls.ca) {
        Ok(id) => id,
        Err(e) => {
            return Some(format!(
                "the certificate does not load: {}",
                format_chain(&e)
            ));
        }
    };
    if let Err(e) = check_identity(config, &id) {
        return Some(format_chain(&e));
    }
    let not_after = id.info().not_after;
    (time::OffsetDateTime::now_utc() >= not_after).then(|| {
        format!(
            "the certificate {} expired at {not_after}",
            id.info().serial
        )
    })
}

/// Enrols until it succeeds and returns the new certificate's summary. Every failure (the
/// issuer not reachable yet, a refusal) is logged with its reason and retried, from 1 s
/// doubling to [`ENROL_BACKOFF_MAX`]; the token file is read again at each attempt, since
/// the kubelet refreshes it.
pub async fn enrol_until_done(config: &Config, enrolment: &EnrolmentConfig) -> CertInfo {
    let mut delay = Duration::from_secs(1);
    let mut attempt: u32 = 0;
    loop {
        attempt = attempt.saturating_add(1);
        let (c, e) = (config.clone(), enrolment.clone());
        let result = tokio::task::spawn_blocking(move || enrol_once(&c, &e))
            .await
            .unwrap_or_else(|e| Err(format!("enrolment task failed: {e}")));
        match result {
            Ok(info) => {
                info!(issuer = %enrolment.issuer, serial = %info.serial, not_after = %info.not_after, "enrolled with the ServiceAccount token");
                return info;
            }
            Err(reason) => {
                warn!(issuer = %enrolment.issuer, attempt, %reason, retry_in_s = delay.as_secs(), "enrolment failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(ENROL_BACKOFF_MAX);
            }
        }
    }
}

/// One enrolment attempt. The error says what failed; the token never appears in it.
pub fn enrol_once(config: &Config, enrolment: &EnrolmentConfig) -> Result<CertInfo, String> {
    let tls = &config.tls;
    let token_path = &enrolment.service_account_token_file;
    let token = std::fs::read_to_string(token_path).map_err(|e| {
        format!(
            "read the ServiceAccount token {}: {e}",
            token_path.display()
        )
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!(
            "the ServiceAccount token file {} is empty",
            token_path.display()
        ));
    }
    let ca_pem =
        std::fs::read_to_string(&tls.ca).map_err(|e| format!("read {}: {e}", tls.ca.display()))?;
    let csr = enc_certs::generate_csr(&config.node.name, &[config.node.underlay_address])
        .map_err(|e| format_chain(&e))?;
    let client =
        enc_certs::issuer_client_config(ca_pem.as_bytes(), None).map_err(|e| format_chain(&e))?;
    let issuer = &enrolment.issuer;
    let issued = ask_issuer(
        issuer,
        client,
        ENROL_TIMEOUT,
        &IssuerRequest::EnrolServiceAccount {
            service_account_token: token.to_owned(),
            csr: csr.csr_pem.clone(),
        },
    )?;
    let unusable = |e: &dyn std::error::Error| {
        format!(
            "the certificate from {issuer} is not usable: {}",
            format_chain(e)
        )
    };
    let new =
        NodeIdentity::from_pem(&issued.cert, &csr.key_pem, &ca_pem).map_err(|e| unusable(&e))?;
    check_identity(config, &new).map_err(|e| unusable(&e))?;
    install_key_pair(&tls.key, &tls.cert, &csr.key_pem, &issued.cert)?;
    Ok(new.info().clone())
}
