//! Certificates as peers present them (DER) or as files hold them (PEM): parsing must never
//! panic, and what parses must have a fingerprint of 64 hex digits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = enc_certs::inspect(data) {
        assert_eq!(info.sha256_fingerprint.len(), 64);
    }
    let _ = enc_certs::peer_info(&[rustls_pki_types::CertificateDer::from(data.to_vec())]);
});
