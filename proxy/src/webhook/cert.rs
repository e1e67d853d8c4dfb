//! The webhook's serving certificate, read again when its files change, so a rotated Secret
//! (cert-manager, or the chart's own job) takes effect without a restart.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{server::ResolvesServerCert, sign::CertifiedKey};

use crate::tls::certs::{CertError, certified_key};

#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The PEM texts in use, to tell a change from a rewrite of the same content.
    loaded: std::sync::Mutex<(String, String)>,
}

/// Why the certificate files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WebhookCertError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cert(#[from] CertError),
}

fn read(path: &Path) -> Result<String, WebhookCertError> {
    std::fs::read_to_string(path).map_err(|source| WebhookCertError::Read {
        path: path.to_owned(),
        source,
    })
}

impl ReloadingCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, WebhookCertError> {
        let (chain, key_pem) = (read(cert)?, read(key)?);
        let certified = certified_key(&chain, &key_pem)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(certified),
            loaded: std::sync::Mutex::new((chain, key_pem)),
        }))
    }

    /// Reads the files again; installs them when they changed and are valid. Returns whether
    /// a new certificate was installed.
    pub fn reload(&self) -> Result<bool, WebhookCertError> {
        let (chain, key_pem) = (read(&self.cert)?, read(&self.key)?);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == chain && loaded.1 == key_pem {
            return Ok(false);
        }
        let certified = certified_key(&chain, &key_pem)?;
        self.current.store(Arc::new(certified));
        *loaded = (chain, key_pem);
        Ok(true)
    }

    /// Checks the files every `every`, forever; a bad rewrite keeps the current certificate.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate files refused; the current one keeps serving")
                }
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
