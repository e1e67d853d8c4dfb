//! The workload certificate in force, swapped atomically when renewed: handshakes read
//! it when they start, so connections already open keep the certificate they were made
//! with and new ones get the new one — no gap.
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::certs::WorkloadCert;

/// The current workload certificate, if any has been issued or read yet.
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwapOption<WorkloadCert>,
}

impl CertStore {
    pub fn current(&self) -> Option<Arc<WorkloadCert>> {
        self.current.load_full()
    }

    pub fn install(&self, cert: WorkloadCert) {
        self.current.store(Some(Arc::new(cert)));
    }
}
