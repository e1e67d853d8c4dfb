//! The registry every metric tern exports is in (`prometheus-client`, prefix `tern_`, and
//! Istio's standard metrics without it). Each component defines and registers its own
//! families and is handed them; this module only puts the registry together and encodes it.
use std::{fmt::Write as _, path::PathBuf, sync::Arc};

use prometheus_client::{encoding::text::encode, registry::Registry};

use crate::{
    budget::{BudgetCollector, BufferBudget},
    capture::metrics::CaptureCollector,
    filters::metrics::FilterMetrics,
    listener::ListenerMetrics,
    refusal::Refusals,
    telemetry::{IstioMetrics, Workload},
    tls::metrics::TlsMetrics,
    upstream::metrics::UpstreamMetrics,
    xds::metrics::ConfigMetrics,
};

/// tern's metrics: the registry, and each component's families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    istio: Arc<IstioMetrics>,
    pub listeners: ListenerMetrics,
    pub filters: Arc<FilterMetrics>,
    pub upstream: Arc<UpstreamMetrics>,
    pub config: ConfigMetrics,
    pub tls: TlsMetrics,
}

impl Metrics {
    /// The registry; `capture_pins` is the pin directory of the eBPF capture this proxy
    /// serves, whose counters are exported at each scrape.
    pub fn new(capture_pins: Option<PathBuf>) -> Arc<Self> {
        Self::for_workload(capture_pins, Workload::default(), None)
    }

    /// [`Metrics::new`], for Istio's metrics naming `local` as tern's workload, and the
    /// buffer budget's use exported from `budget`.
    pub fn for_workload(
        capture_pins: Option<PathBuf>,
        local: Workload,
        budget: Option<Arc<BufferBudget>>,
    ) -> Arc<Self> {
        let mut registry = Registry::with_prefix("tern");
        registry.register_collector(Box::new(CaptureCollector { pins: capture_pins }));
        if let Some(budget) = budget {
            registry.register_collector(Box::new(BudgetCollector {
                name: "buffer_budget",
                help: "Bytes held for messages, all connections together (--max-buffered-bytes)",
                budget,
            }));
        }
        let istio = IstioMetrics::new(local);
        let tls = TlsMetrics::register(&mut registry);
        let refusals = Refusals::register(&mut registry);
        Arc::new(Self {
            listeners: ListenerMetrics::register(&mut registry),
            filters: Arc::new(FilterMetrics::register(
                &mut registry,
                refusals,
                tls.handshakes.clone(),
                istio.clone(),
            )),
            upstream: Arc::new(UpstreamMetrics::register(
                &mut registry,
                tls.handshakes.clone(),
            )),
            config: ConfigMetrics::register(&mut registry),
            tls,
            istio,
            registry,
        })
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Each registry ends with `# EOF`: only the last one may.
        if encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        if let Some(cut) = out.rfind("# EOF") {
            out.truncate(cut);
        }
        if encode(&mut out, &self.istio.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_component_registers_its_families_once() {
        let text = Metrics::new(None).encode();
        let mut described: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP tern_"))
            .filter_map(|l| l.split(' ').next())
            .collect();
        described.sort_unstable();
        let mut expected = [
            "config_updates",
            "connections_refused",
            "downstream_connections",
            "downstream_connections_active",
            "rbac_decisions",
            "thrift_active_requests",
            "thrift_frames_rejected",
            "thrift_local_replies",
            "thrift_replies",
            "thrift_requests",
            "thrift_upstream_request_seconds",
            "tls_certificate_expiry_timestamp_seconds",
            "tls_certificate_updates",
            "tls_handshakes",
            "upstream_connections",
            "upstream_connections_active",
            "xds_apply_seconds",
            "xds_connected",
            "xds_reconnects",
            "xds_rejected",
            "xds_set_aside",
        ];
        expected.sort_unstable();
        assert_eq!(described, expected);
        // Istio's standard metrics follow, without the prefix, after one `# EOF`.
        assert!(text.contains("# HELP istio_requests"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }
}
