//! enc-agent: the node agent of enc.
//!
//! The agent composes the other crates and owns nothing of their logic: it loads the
//! configuration and this node's identity, starts the WireGuard datapath, authenticates peers
//! over the mutual-TLS control channel, derives per-pair keys from each session, reconciles
//! the datapath with the peer table, and serves the status API.
//!
//! Layout: [`config`] (typed, validated configuration), [`discovery`] (which peers should
//! exist: the static list or Kubernetes `EncNode` objects), [`control`] (control channel),
//! [`peers`] (the peer table, plain data), [`reconcile`] (desired state to the backends),
//! [`status`] (the Unix-socket API), [`metrics`] (Prometheus endpoint), [`events`] (the
//! audit log), [`issuer`] (the issuer role: online enrolment and renewal), [`attest`]
//! (Kubernetes ServiceAccount token attestation for the issuer), [`enrolment`] (enrolling
//! this node at start-up with its ServiceAccount token), [`renewal`] (the renewal schedule,
//! sans-IO), [`app`] (wiring).

pub mod app;
pub mod attest;
pub mod backend;
pub mod config;
pub mod control;
pub mod discovery;
pub mod enrolment;
pub mod events;
pub mod issuer;
pub mod metrics;
pub mod peers;
pub mod reconcile;
pub mod renewal;
pub mod status;

/// Errors of the agent library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The node certificate, key or CA could not be used.
    #[error("node identity")]
    Certs(#[source] enc_certs::Error),
    /// The node certificate does not match the configuration.
    #[error("node identity does not match the configuration: {0}")]
    IdentityMismatch(String),
    /// The WireGuard datapath failed.
    #[error("WireGuard datapath")]
    Wireguard(#[source] enc_wireguard::Error),
    /// The IPsec datapath failed.
    #[error("IPsec datapath")]
    Ipsec(#[source] enc_ipsec::Error),
    /// A link or route operation failed.
    #[error("links and routes")]
    Links(#[source] enc_geneve_vxlan::Error),
    /// The eBPF datapath failed.
    #[error("eBPF datapath")]
    Datapath(#[source] enc_tunnel_ebpf::Error),
    /// Key derivation failed.
    #[error("key derivation")]
    Keys(#[source] enc_key_manager::Error),
    /// A Kubernetes API call failed; `context` names it and its object.
    #[error("{context}")]
    Kube {
        /// What was being done.
        context: String,
        /// kube's error.
        source: kube::Error,
    },
    /// An I/O operation failed; `context` names it and its target.
    #[error("{context}")]
    Io {
        /// What was being done, with the path or address.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
