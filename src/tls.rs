//! What hark's TLS clients trust and which crypto they use, shared by transcription (ureq) and MQTT
//! (rumqttc): Mozilla's roots (webpki-root-certs), the system store (`/etc/ssl/certs`, or
//! `SSL_CERT_FILE`), and an optional extra CA file in PEM; rustls with ring.
//!
//! Deliberately not here: installing a process-wide default crypto provider. Each client is given
//! ring explicitly, so that no crate can pick another provider behind hark's back.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why the extra CA file cannot be used. The caller adds the config key.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    Empty { path: String },
}

/// The ring provider, for every TLS client hark builds.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Mozilla's roots, the system's, and the certificates of `ca_file` (which must hold at least one).
pub(crate) fn trust_roots(
    ca_file: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let mut roots: Vec<CertificateDer<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    roots.extend(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        roots.extend(ca_certs(path)?);
    }
    Ok(roots)
}

/// The certificates in a PEM file; an error when there is none.
pub(crate) fn ca_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| CaFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).flatten().collect();
    if certs.is_empty() {
        return Err(CaFileError::Empty { path: shown });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused_and_a_missing_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = trust_roots(Some(&empty)).unwrap_err();
        assert!(matches!(e, CaFileError::Empty { .. }), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = trust_roots(Some(&missing)).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        assert!(!trust_roots(None).unwrap().is_empty());
    }
}
