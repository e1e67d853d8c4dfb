//! TLS's metric families: handshakes by direction and result, and the workload
//! certificate's updates and expiry.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{WorkloadCert, source::CertEvents};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    /// `inbound` (tern terminates) or `outbound` (tern originates).
    direction: &'static str,
    /// `ok`, or why it failed (`san_mismatch`, `unknown_issuer`, `no_peer_certificate`, …).
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertUpdateLabels {
    /// `istio_ca` or `files`.
    source: &'static str,
    /// `installed` or `failed`.
    result: &'static str,
}

/// Counts TLS handshakes; both directions share it.
#[derive(Clone, Debug, Default)]
pub struct Handshakes(Family<HandshakeLabels, Counter>);

impl Handshakes {
    /// Counts a handshake of `direction` (`inbound` or `outbound`).
    pub fn count(&self, direction: &'static str, result: Result<(), &std::io::Error>) {
        let result = match result {
            Ok(()) => "ok",
            Err(e) => super::failure::reason(e),
        };
        self.0
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }
}

/// TLS's metric families.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    pub handshakes: Handshakes,
    certificate_updates: Family<CertUpdateLabels, Counter>,
    certificate_expiry: Gauge,
}

impl TlsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes by direction and result (ok, or why they failed)",
            m.handshakes.0.clone(),
        );
        registry.register(
            "tls_certificate_updates",
            "Workload certificates installed, or attempts that failed, by source",
            m.certificate_updates.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the workload certificate in force expires (Unix seconds; 0: none yet)",
            m.certificate_expiry.clone(),
        );
        m
    }

    /// What a workload certificate source (`istio_ca` or `files`) reports to.
    pub fn certificate_events(&self, source: &'static str) -> CertMetrics {
        CertMetrics {
            metrics: self.clone(),
            source,
        }
    }
}

/// The workload certificate's source reports here.
#[derive(Debug)]
pub struct CertMetrics {
    metrics: TlsMetrics,
    source: &'static str,
}

impl CertMetrics {
    fn count(&self, result: &'static str) {
        self.metrics
            .certificate_updates
            .get_or_create(&CertUpdateLabels {
                source: self.source,
                result,
            })
            .inc();
    }
}

impl CertEvents for CertMetrics {
    fn installed(&self, cert: &WorkloadCert) {
        self.metrics.certificate_expiry.set(cert.info.not_after);
        self.count("installed");
    }

    fn failed(&self) {
        self.count("failed");
    }
}
