//! TLS material for HTTPS listeners: load the configured pair or make a self-signed one.
//!
//! Owns the files `data_dir/tls/{cert,key}.pem` that courier generates when a TLS
//! listener has no configured certificate, and the rustls server configuration built
//! from them. It never overwrites a pair that exists, and never touches an
//! operator-supplied file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, Listener};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("cannot write generated TLS material to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Installs the process-wide rustls crypto provider (aws-lc-rs); safe to call twice.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The certificate and key files a TLS listener uses: configured or generated.
pub fn cert_paths(config: &Config, listener: &Listener) -> (PathBuf, PathBuf) {
    match (&listener.tls_cert, &listener.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => generated_paths(&config.data_dir),
    }
}

/// Where the self-signed pair lives inside `data_dir`.
pub fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Makes sure a self-signed pair exists in `data_dir` for `names`; returns true when
/// it was just created.
pub fn ensure_self_signed(data_dir: &Path, names: &[String]) -> Result<bool, TlsError> {
    let (cert_path, key_path) = generated_paths(data_dir);
    if cert_path.exists() && key_path.exists() {
        return Ok(false);
    }
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let dir = cert_path.parent().expect("generated paths have a parent");
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    write_private(&key_path, ck.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, ck.cert.pem()).map_err(|source| TlsError::Write {
        path: cert_path.clone(),
        source,
    })?;
    Ok(true)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            message: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Builds the rustls server configuration of one listener (ALPN h2 and http/1.1).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    let mut cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_loads() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_self_signed(dir.path(), &["127.0.0.1".into()]).unwrap());
        let (c, k) = generated_paths(dir.path());
        let before = std::fs::read(&c).unwrap();
        assert!(!ensure_self_signed(dir.path(), &["127.0.0.1".into()]).unwrap());
        assert_eq!(before, std::fs::read(&c).unwrap(), "never regenerated");
        server_config(&c, &k).unwrap();
    }

    #[test]
    fn bad_pem_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pem");
        std::fs::write(&p, "not pem").unwrap();
        assert!(load_certs(&p).is_err());
        assert!(load_certs(&dir.path().join("missing.pem")).is_err());
    }
}
