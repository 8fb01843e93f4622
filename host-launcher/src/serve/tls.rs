//! TLS for the CI service (`--tls-cert FILE --tls-key FILE`): rustls (aws-lc-rs), the
//! certificate chain and key from PEM files, HTTP/1.1 announced through ALPN.
//!
//! What is not here: the handshake's place in a connection ([`super::server`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file.
    #[error("reading the certificate chain {0} (PEM)")]
    Cert(PathBuf, #[source] rustls::pki_types::pem::Error),
    /// No certificate in it.
    #[error("{0} holds no certificate (PEM `BEGIN CERTIFICATE`)")]
    NoCert(PathBuf),
    /// The key file.
    #[error("reading the private key {0} (PEM: PKCS#8, PKCS#1 or SEC1)")]
    Key(PathBuf, #[source] rustls::pki_types::pem::Error),
    /// rustls refused them.
    #[error("the certificate {0} and key {1} do not make a TLS configuration")]
    Config(PathBuf, PathBuf, #[source] rustls::Error),
}

/// The server configuration of `cert` (a PEM chain, leaf first) and `key`.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Cert(cert.to_owned(), e))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(cert.to_owned(), e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(cert.to_owned()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key(key.to_owned(), e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
        .map_err(|e| TlsError::Config(cert.to_owned(), key.to_owned(), e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
