//! Cluster CA, node certificates and mutual-TLS node authentication for enc.
//!
//! - [`init_ca`] / [`issue_node_cert`] create the cluster CA and node certificates on disk
//!   (used by `encctl`); [`inspect`] summarises a certificate as [`CertInfo`].
//! - [`NodeIdentity`] is a node's certificate, key and CA bundle, checked on load.
//! - [`client_config`] / [`server_config`] build TLS 1.3 configurations whose verifiers check
//!   the peer against the CA *and* against the node discovery says should be there
//!   ([`ExpectedPeer`]: DNS SAN = node name, IP SAN = address).
//! - [`AuthFailure`] turns handshake errors into a short reason for status display.

mod ca;
mod error;
mod identity;
mod info;
mod verify;

pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW, CaOptions, CertificateAuthority, IssuedPem, MAX_DAYS,
    NodeCertRequest, init_ca, issue_node_cert, issue_node_cert_pem, validate_node_name,
};
pub use error::{Error, Result};
pub use identity::NodeIdentity;
pub use info::{CertInfo, inspect, inspect_file};
pub use verify::{AuthFailure, ExpectedPeer, client_config, peer_info, server_config, server_name};

/// Installs ring as rustls' process-wide `CryptoProvider`; idempotent, call at start-up.
///
/// The configurations built by this crate carry the ring provider explicitly and do not
/// depend on this; it is for other rustls users in the process.
pub fn install_crypto_provider() {
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
}
