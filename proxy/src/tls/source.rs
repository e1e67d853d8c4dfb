//! Where the workload certificate comes from, and keeping it fresh:
//! - Istio's CA ([`super::ca`]): renewed when the given share of its lifetime has passed
//!   (istio-agent's `SECRET_GRACE_PERIOD_RATIO`, 0.5), retried with backoff on failure while
//!   the old one serves;
//! - files (`cert-chain.pem`, `key.pem`, `root-cert.pem`, as Istio's `OUTPUT_CERTS` or
//!   istio-csr write them): read again when they change.
//!
//! A certificate issued by the CA is also written to `OUTPUT_CERTS` when asked.
use std::{path::PathBuf, sync::Arc, time::Duration};

use rand::Rng;
use tracing::{info, warn};

use super::{
    ca::CaClient,
    certs::{PemFiles, WorkloadCert, unix_now},
    store::CertStore,
};

/// The three files of a certificate directory.
pub const CHAIN_FILE: &str = "cert-chain.pem";
pub const KEY_FILE: &str = "key.pem";
pub const ROOT_FILE: &str = "root-cert.pem";

#[derive(Clone, Debug)]
pub enum CertSource {
    IstioCa {
        client: Box<CaClient>,
        /// Renew once this share of the lifetime has passed.
        renew_ratio: f64,
        /// Write each certificate there too (`OUTPUT_CERTS`).
        output: Option<PathBuf>,
    },
    Files(PathBuf),
}

/// What the source loop reports after each attempt (for metrics and logs).
pub trait CertEvents: Send + Sync {
    fn installed(&self, cert: &WorkloadCert);
    fn failed(&self);
}

/// Keeps `store` supplied from `source`, forever.
pub async fn run(source: CertSource, store: Arc<CertStore>, events: Arc<dyn CertEvents>) {
    match source {
        CertSource::IstioCa {
            client,
            renew_ratio,
            output,
        } => from_ca(client, renew_ratio, output, store, events).await,
        CertSource::Files(dir) => from_files(dir, store, events).await,
    }
}

async fn from_ca(
    client: Box<CaClient>,
    renew_ratio: f64,
    output: Option<PathBuf>,
    store: Arc<CertStore>,
    events: Arc<dyn CertEvents>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match client.issue().await {
            Ok(cert) => {
                info!(identity = %client.identity, serial = %cert.info.serial, not_after = cert.info.not_after, "workload certificate issued");
                if let Some(dir) = &output
                    && let Err(e) = write_files(dir, &cert.pem)
                {
                    warn!(dir = %dir.display(), error = %e, "could not write the certificate files");
                }
                let wait = renew_in(&cert, renew_ratio);
                events.installed(&cert);
                store.install(cert);
                backoff = Duration::from_millis(500);
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                events.failed();
                let delay = rand::rng().random_range(backoff / 2..=backoff);
                warn!(error = %e, retry_in = ?delay, "no certificate from the CA; the current one (if any) keeps serving");
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// When to renew: once `ratio` of the lifetime has passed (at least 1 s from now).
fn renew_in(cert: &WorkloadCert, ratio: f64) -> Duration {
    let lifetime = (cert.info.not_after - cert.info.not_before).max(0) as f64;
    let at = cert.info.not_before as f64 + lifetime * ratio.clamp(0.0, 1.0);
    Duration::from_secs_f64((at - unix_now() as f64).max(1.0))
}

fn write_files(dir: &std::path::Path, pem: &PemFiles) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    for (name, text, mode) in [
        (CHAIN_FILE, &pem.chain, 0o644),
        (KEY_FILE, &pem.key, 0o600),
        (ROOT_FILE, &pem.roots, 0o644),
    ] {
        // Written aside and renamed, so a reader never sees half a file.
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

async fn from_files(dir: PathBuf, store: Arc<CertStore>, events: Arc<dyn CertEvents>) {
    let mut last: Option<PemFiles> = None;
    let mut warned = false;
    loop {
        let read = |name| std::fs::read_to_string(dir.join(name));
        match (read(CHAIN_FILE), read(KEY_FILE), read(ROOT_FILE)) {
            (Ok(chain), Ok(key), Ok(roots)) => {
                let same = last
                    .as_ref()
                    .is_some_and(|l| l.chain == chain && l.key == key && l.roots == roots);
                if !same {
                    let pem = PemFiles { chain, key, roots };
                    match WorkloadCert::from_pem(pem.clone()) {
                        Ok(cert) => {
                            info!(dir = %dir.display(), subject = %cert.info.subject, sans = ?cert.info.sans, "workload certificate read");
                            events.installed(&cert);
                            store.install(cert);
                        }
                        Err(e) => {
                            events.failed();
                            warn!(dir = %dir.display(), error = %e, "certificate files refused; the current one (if any) keeps serving");
                        }
                    }
                    // A refused set is not retried until it changes.
                    last = Some(pem);
                }
            }
            (chain, key, roots) => {
                if !warned {
                    warned = true;
                    let e = [chain.err(), key.err(), roots.err()];
                    warn!(dir = %dir.display(), error = ?e.iter().flatten().next(), "certificate files not readable (tried again every second)");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
