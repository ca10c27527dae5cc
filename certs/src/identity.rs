//! This node's TLS identity.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;

use crate::info::{self, CertInfo};
use crate::verify::{self, AuthFailure};
use crate::{Error, Result};

/// This node's TLS identity: its certificate chain, key and the cluster CA roots.
///
/// `Debug` redacts the private key.
pub struct NodeIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    ca_certs: Vec<CertificateDer<'static>>,
    info: CertInfo,
    name: String,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .field("info", &self.info)
            .field("chain_len", &self.chain.len())
            .field("ca_certs", &self.ca_certs.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl NodeIdentity {
    /// Loads the certificate (PEM; extra certificates are sent along, but peers do not use
    /// them), key (PEM) and CA bundle (PEM, one or more CAs).
    ///
    /// Fails, naming the file, if the certificate is not signed directly by a CA of the bundle
    /// (peers use no intermediates, see [`AuthFailure::UnknownCa`]), is outside its validity,
    /// does not allow both TLS client and server authentication and handshake signatures
    /// ([`AuthFailure::WrongKeyUsage`]), or the key does not match it.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io("read", p, e));
        let (cert_pem, key_pem, ca_pem) = (read(cert)?, read(key)?, read(ca)?);
        Self::build(
            &cert_pem,
            &key_pem,
            &ca_pem,
            Origins {
                cert: &cert.display().to_string(),
                key: &key.display().to_string(),
                ca: &ca.display().to_string(),
            },
        )
    }

    /// Like [`NodeIdentity::load`], from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self> {
        Self::build(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            ca_pem.as_bytes(),
            Origins {
                cert: "node certificate PEM",
                key: "node key PEM",
                ca: "CA bundle PEM",
            },
        )
    }

    fn build(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8], o: Origins<'_>) -> Result<Self> {
        let chain = info::pem_certs(cert_pem, o.cert)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => Error::NoPrivateKey {
                origin: o.key.to_owned(),
            },
            source => Error::Pem {
                origin: o.key.to_owned(),
                source,
            },
        })?;
        let ca_certs = info::pem_certs(ca_pem, o.ca)?;
        let mut roots = RootCertStore::empty();
        for der in &ca_certs {
            roots.add(der.clone()).map_err(|e| Error::BadCa {
                origin: o.ca.to_owned(),
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);

        let leaf = chain.first().ok_or_else(|| Error::NoCertificate {
            origin: o.cert.to_owned(),
        })?;
        let x509 = info::parse_x509(leaf.as_ref(), o.cert)?;
        let info = info::from_x509(&x509, leaf.as_ref());
        let name = info
            .dns_names
            .first()
            .cloned()
            .or_else(|| {
                x509.subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok())
                    .map(str::to_owned)
            })
            .ok_or_else(|| Error::Untrusted {
                origin: o.cert.to_owned(),
                ca: o.ca.to_owned(),
                reason: AuthFailure::NameMismatch {
                    expected: String::new(),
                    presented: Vec::new(),
                },
            })?;

        // Chain (without intermediates), validity, both extended key usages and the key
        // usage, as peers will check them.
        let untrusted = |e: rustls::Error| Error::Untrusted {
            origin: o.cert.to_owned(),
            ca: o.ca.to_owned(),
            reason: AuthFailure::from_tls_error(&verify::self_signed_error(e, leaf)),
        };
        let now = UnixTime::now();
        verify::webpki_client_verifier(&roots, &[])?
            .verify_client_cert(leaf, verify::NO_INTERMEDIATES, now)
            .map_err(untrusted)?;
        let server_name =
            ServerName::try_from(name.clone()).map_err(|source| Error::ServerName {
                name: name.clone(),
                source,
            })?;
        verify::webpki_server_verifier(&roots, &[])?
            .verify_server_cert(leaf, verify::NO_INTERMEDIATES, &server_name, &[], now)
            .map_err(untrusted)?;
        verify::check_key_usage(&x509).map_err(untrusted)?;

        CertifiedKey::from_der(chain.clone(), key.clone_key(), &verify::provider()).map_err(
            |source| Error::KeyMismatch {
                cert: o.cert.to_owned(),
                key: o.key.to_owned(),
                source,
            },
        )?;

        Ok(Self {
            chain,
            key,
            roots,
            ca_certs,
            info,
            name,
        })
    }

    /// Our node name: the first DNS SAN of our certificate, else its common name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Details of our certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Our certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The cluster CA certificates this identity trusts.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }

    pub(crate) fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub(crate) fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }
}

/// Names of the inputs, for error messages.
#[derive(Clone, Copy)]
struct Origins<'a> {
    cert: &'a str,
    key: &'a str,
    ca: &'a str,
}
