//! Cluster CA, node certificates and mutual-TLS node authentication for enc.
//!
//! - [`init_ca`] / [`issue_node_cert`] create the cluster CA and node certificates on disk
//!   (used by `encctl`); [`inspect`] summarises a certificate as [`CertInfo`].
//! - [`NodeIdentity`] is a node's certificate, key and CA bundle, checked on load.
//! - [`client_config`] / [`server_config`] build TLS 1.3 configurations whose verifiers check
//!   the peer against the CA *and* against the node discovery says should be there
//!   ([`ExpectedPeer`]: DNS SAN = node name, IP SAN = address).
//! - [`AuthFailure`] turns handshake errors into a short reason for status display.
//! - Revocation: [`issue_node_cert`] records every certificate in the issuance ledger
//!   `<ca_dir>/issued.jsonl` ([`read_ledger`]); [`revoke`] adds serials (or all of a node's)
//!   to the CA-signed list `<ca_dir>/crl.pem`; [`RevocationList`] is such a list with its
//!   signature verified, and [`client_config_with_crls`] / [`server_config_with_crls`]
//!   refuse peers it revokes ([`AuthFailure::Revoked`]).
//! - Enrolment without the CA key on the node: the operator creates a one-time join token
//!   ([`create_token`], recorded by hash in `<ca_dir>/tokens.jsonl`); the node makes its key
//!   and a request ([`request_node_cert`] / [`generate_csr`]); the operator signs the request
//!   with the token ([`sign_csr`] / [`sign_csr_to_dir`]), which checks its names against the
//!   token and uses the token up ([`redeem_token`]).
//! - Online issuance by an agent in the issuer role: the same [`sign_csr`] for enrolment, and
//!   [`renew_csr`] for a node that authenticates with its current certificate; the TLS side
//!   is [`issuer_server_config`] / [`issuer_client_config`] / [`connect_issuer`].
//! - Kubernetes-attested enrolment: [`sign_attested_csr`] signs a request for the node a
//!   verified ServiceAccount token names, with the addresses the API server reports.

mod ca;
mod crl;
mod enrol;
mod error;
mod identity;
mod info;
mod issuer;
mod ledger;
mod revoke;
mod token;
mod verify;

pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW, CaOptions, CertificateAuthority, IssuedPem, MAX_DAYS,
    NodeCertRequest, init_ca, issue_node_cert, issue_node_cert_pem, validate_node_name,
};
pub use crl::{
    CRL_PEM_LABEL, CrlInfo, RevocationList, RevokedEntry, inspect_crl, inspect_crl_file,
    parse_serial, sign_crl,
};
pub use enrol::{
    AttestedNodeCert, CsrFiles, DEFAULT_CSR_LIFETIME, MIN_CERT_LIFETIME, NodeCsr, SignedNodeCert,
    generate_csr, request_node_cert, sign_attested_csr, sign_csr, sign_csr_to_dir,
};
pub use error::{Error, Result};
pub use identity::NodeIdentity;
pub use info::{CertInfo, inspect, inspect_file, read_pem_certs};
pub use issuer::{
    IssuerStream, RenewedNodeCert, connect_issuer, issuer_client_config, issuer_server_config,
    renew_csr,
};
pub use ledger::{IssuedEntry, LEDGER_FILE, ledger_path, read_ledger};
pub use revoke::{CRL_FILE, CRL_VALIDITY, RevokeOutcome, RevokeRequest, crl_path, revoke};
pub use token::{
    MAX_TOKEN_TTL, MIN_TOKEN_TTL, NewToken, TOKEN_PREFIX, TOKENS_FILE, TokenInfo, TokenRequest,
    TokenState, TokenStatus, create_token, list_tokens, redeem_token, tokens_path,
};
pub use verify::{
    AuthFailure, ExpectedPeer, client_config, client_config_with_crls, peer_info, server_config,
    server_config_with_crls, server_name,
};

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
