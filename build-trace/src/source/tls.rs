//! Which certificate authorities a remote trace store's HTTPS certificate may chain to
//! ([`TlsRoots`]), and the names given to the TLS failures a verifier meets
//! ([`describe_tls`]).
//!
//! Roots: Mozilla's (webpki-roots, built in) unless CA files are given; given files are
//! trusted *instead of* the built-in roots, as `curl --cacert`, OpenSSL's `SSL_CERT_FILE` and
//! Nix's `ssl-cert-file` do (to trust both, give a bundle that holds both, e.g. the system's
//! `/etc/ssl/certs/ca-certificates.crt`). [`TlsRoots::choose`] applies the precedence: explicit
//! files (`--tls-ca`), else `SSL_CERT_FILE` when set and not empty, else the built-in roots.
//! The files are read only when an `https://` store is opened.
//!
//! TLS protects the fetch only: what a store serves is judged by the verifier whatever the
//! channel (`docs/threat-model.md`).

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The environment variable OpenSSL, curl and Nix read for a CA bundle.
pub const SSL_CERT_FILE: &str = "SSL_CERT_FILE";

/// The roots a remote store's certificate must chain to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsRoots {
    /// Mozilla's roots, built in (webpki-roots).
    #[default]
    BuiltIn,
    /// Only the certificates in these PEM files (each one certificate or a bundle).
    Files {
        /// The files.
        paths: Vec<PathBuf>,
        /// Who named them, for errors: `--tls-ca` or `SSL_CERT_FILE`.
        given_by: String,
    },
}

/// Why a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// Unreadable, or not PEM.
    #[error("CA file {path} (given by {given_by}) is not a readable PEM file")]
    Read {
        /// The file.
        path: PathBuf,
        /// `--tls-ca` or `SSL_CERT_FILE`.
        given_by: String,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// PEM without a certificate.
    #[error("CA file {path} (given by {given_by}) holds no certificate (PEM `BEGIN CERTIFICATE`)")]
    NoCert {
        /// The file.
        path: PathBuf,
        /// `--tls-ca` or `SSL_CERT_FILE`.
        given_by: String,
    },
}

impl TlsRoots {
    /// `files` if any (`given_by` names where they came from), else `SSL_CERT_FILE` if set and
    /// not empty, else the built-in roots.
    pub fn choose(files: Vec<PathBuf>, given_by: &str) -> TlsRoots {
        let env = std::env::var_os(SSL_CERT_FILE).filter(|v| !v.is_empty());
        TlsRoots::choose_with(files, given_by, env.map(PathBuf::from))
    }

    /// [`TlsRoots::choose`] with the environment's value given.
    pub fn choose_with(files: Vec<PathBuf>, given_by: &str, env: Option<PathBuf>) -> TlsRoots {
        if !files.is_empty() {
            return TlsRoots::Files { paths: files, given_by: given_by.to_owned() };
        }
        match env {
            Some(p) => TlsRoots::Files { paths: vec![p], given_by: SSL_CERT_FILE.to_owned() },
            None => TlsRoots::BuiltIn,
        }
    }

    /// The certificates of the files (`None`: the built-in roots).
    pub fn load(&self) -> Result<Option<Vec<CertificateDer<'static>>>, CaFileError> {
        let TlsRoots::Files { paths, given_by } = self else { return Ok(None) };
        let mut all = Vec::new();
        for p in paths {
            all.extend(load_file(p, given_by)?);
        }
        Ok(Some(all))
    }
}

fn load_file(path: &Path, given_by: &str) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let read =
        |source| CaFileError::Read { path: path.to_owned(), given_by: given_by.into(), source };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<_, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(CaFileError::NoCert { path: path.to_owned(), given_by: given_by.into() });
    }
    Ok(certs)
}

/// What a certificate must chain to, for errors: `roots`' files (who gave them), or the
/// built-in roots and how to trust another CA (`ca_option`, the flag that gives CA files).
pub(crate) fn roots_text(roots: &TlsRoots, ca_option: &str) -> String {
    match roots {
        TlsRoots::Files { given_by, .. } => format!("the CA files given by {given_by}"),
        TlsRoots::BuiltIn => format!(
            "Mozilla's built-in roots; trust another CA with {ca_option} FILE or {SSL_CERT_FILE}"
        ),
    }
}

/// A TLS failure of a fetch, named for a verifier (`None`: not a certificate problem); `roots`
/// says what the certificate must chain to ([`roots_text`]).
pub(crate) fn describe_tls(e: &ureq::Error, roots: &str) -> Option<String> {
    let rustls_err = match e {
        ureq::Error::Rustls(r) => r,
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    let rustls::Error::InvalidCertificate(c) = rustls_err else { return None };
    use rustls::CertificateError as C;
    Some(match c {
        C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension => {
            format!("TLS: the server's certificate is not trusted ({c:?}: it chains to none of {roots})")
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!(
                "TLS: the server's certificate is not valid for this host name or address ({c})"
            )
        }
        other => format!("TLS: the server's certificate is not trusted ({other})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_files_win_over_ssl_cert_file_which_wins_over_the_built_in_roots() {
        let env = Some(PathBuf::from("/env.pem"));
        let given = TlsRoots::choose_with(vec!["/a.pem".into()], "--tls-ca", env.clone());
        assert_eq!(
            given,
            TlsRoots::Files { paths: vec!["/a.pem".into()], given_by: "--tls-ca".into() }
        );
        let from_env = TlsRoots::choose_with(vec![], "--tls-ca", env);
        assert_eq!(
            from_env,
            TlsRoots::Files { paths: vec!["/env.pem".into()], given_by: SSL_CERT_FILE.into() }
        );
        assert_eq!(TlsRoots::choose_with(vec![], "--tls-ca", None), TlsRoots::BuiltIn);
        assert_eq!(TlsRoots::BuiltIn.load().unwrap(), None);
    }

    #[test]
    fn bad_ca_files_are_named_with_what_is_wrong() {
        let d = tempfile::tempdir().unwrap();
        let (garbled, empty) = (d.path().join("garbled.pem"), d.path().join("empty.pem"));
        std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n")
            .unwrap();
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let load = |p: &Path| {
            let roots = TlsRoots::Files { paths: vec![p.to_owned()], given_by: "--tls-ca".into() };
            crate::error_chain(&roots.load().unwrap_err())
        };
        let e = load(&garbled);
        assert!(e.contains("garbled.pem") && e.contains("not a readable PEM"), "{e}");
        let e = load(&empty);
        assert!(e.contains("empty.pem") && e.contains("holds no certificate"), "{e}");
        let e = load(&d.path().join("absent.pem"));
        assert!(e.contains("absent.pem") && e.contains("--tls-ca"), "{e}");
    }
}
