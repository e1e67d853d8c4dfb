//! Every metric tern exports, defined once with its labels (`prometheus-client`, prefix `tern_`).
//!
//! Handlers increment; they never define. Label values on the request path are resolved
//! once per cluster or per (connection, method) and kept as cheap metric handles, so counting
//! a request does not allocate.
use std::{fmt::Write as _, path::PathBuf, sync::Arc};

use crate::telemetry::{IstioMetrics, Workload};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub cluster: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub cluster: String,
    /// `success`, `exception` (a declared exception in a reply), `error` (an EXCEPTION message).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalReplyLabels {
    pub cluster: String,
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// `file`, or the xDS resource type (`Listener`, `Cluster`, `ClusterLoadAssignment`, …).
    pub source: &'static str,
    /// `applied` or `rejected` (an xDS NACK).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SetAsideLabels {
    /// `listener`, `filter_chain` or `cluster`.
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    /// The xDS resource type (`Listener`, `Cluster`, …).
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` (tern terminates) or `outbound` (tern originates).
    pub direction: &'static str,
    /// `ok`, or why it failed (`san_mismatch`, `unknown_issuer`, `no_peer_certificate`, …).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RbacLabels {
    /// `allowed`, `denied`, `shadow_allowed`, `shadow_denied` (Envoy's `rbac.*` counters).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Why (see [`crate::refusal::Refusal`]).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertUpdateLabels {
    /// `istio_ca` or `files`.
    pub source: &'static str,
    /// `installed` or `failed`.
    pub result: &'static str,
}

/// tern's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<MethodLabels, Counter>,
    pub replies: Family<ResultLabels, Counter>,
    pub local_replies: Family<LocalReplyLabels, Counter>,
    pub upstream_request_seconds: Family<ClusterLabel, Histogram>,
    pub active_requests: Family<ClusterLabel, Gauge>,
    pub downstream_connections: Family<ListenerLabel, Counter>,
    pub downstream_connections_active: Family<ListenerLabel, Gauge>,
    pub upstream_connections: Family<ClusterLabel, Counter>,
    pub upstream_connections_active: Family<ClusterLabel, Gauge>,
    pub frames_rejected: Family<CauseLabel, Counter>,
    pub config_updates: Family<ConfigLabels, Counter>,
    pub xds_connected: Gauge,
    pub xds_reconnects: Counter,
    pub xds_set_aside: Family<SetAsideLabels, Gauge>,
    pub xds_rejected: Family<TypeLabel, Gauge>,
    pub xds_apply_seconds: Family<TypeLabel, Histogram, fn() -> Histogram>,
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    pub tls_certificate_updates: Family<CertUpdateLabels, Counter>,
    pub tls_certificate_expiry: Gauge,
    pub rbac_decisions: Family<RbacLabels, Counter>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// Istio's standard metrics (exported with these, without the `tern_` prefix).
    pub istio: Arc<IstioMetrics>,
}

impl Metrics {
    /// The registry; `capture_pins` is the pin directory of the eBPF capture this proxy
    /// serves, whose counters are exported at each scrape.
    pub fn new(capture_pins: Option<PathBuf>) -> Arc<Self> {
        Self::for_workload(capture_pins, Workload::default())
    }

    /// [`Metrics::new`], for Istio's metrics naming `local` as tern's workload.
    pub fn for_workload(capture_pins: Option<PathBuf>, local: Workload) -> Arc<Self> {
        let mut registry = Registry::with_prefix("tern");
        registry.register_collector(Box::new(CaptureCollector { pins: capture_pins }));
        let requests = Family::default();
        registry.register(
            "thrift_requests",
            "Thrift requests by cluster and method",
            requests.clone(),
        );
        let replies = Family::default();
        registry.register(
            "thrift_replies",
            "Upstream replies by result",
            replies.clone(),
        );
        let local_replies = Family::default();
        registry.register(
            "thrift_local_replies",
            "TApplicationExceptions tern answered itself, by cause",
            local_replies.clone(),
        );
        let upstream_request_seconds =
            Family::<ClusterLabel, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            });
        registry.register(
            "thrift_upstream_request_seconds",
            "Time from sending a request upstream to its reply",
            upstream_request_seconds.clone(),
        );
        let active_requests = Family::default();
        registry.register(
            "thrift_active_requests",
            "Requests waiting for a reply",
            active_requests.clone(),
        );
        let downstream_connections = Family::default();
        registry.register(
            "downstream_connections",
            "Connections accepted by listener",
            downstream_connections.clone(),
        );
        let downstream_connections_active = Family::default();
        registry.register(
            "downstream_connections_active",
            "Open downstream connections by listener",
            downstream_connections_active.clone(),
        );
        let upstream_connections = Family::default();
        registry.register(
            "upstream_connections",
            "Upstream connections opened by cluster",
            upstream_connections.clone(),
        );
        let upstream_connections_active = Family::default();
        registry.register(
            "upstream_connections_active",
            "Open upstream connections by cluster",
            upstream_connections_active.clone(),
        );
        let frames_rejected = Family::default();
        registry.register(
            "thrift_frames_rejected",
            "Malformed or oversized Thrift input that closed its connection, by cause",
            frames_rejected.clone(),
        );
        let config_updates = Family::default();
        registry.register(
            "config_updates",
            "Configuration updates by source (file, or xDS type) and result (applied, rejected)",
            config_updates.clone(),
        );
        let xds_connected = Gauge::default();
        registry.register(
            "xds_connected",
            "1 while the ADS stream to the control plane is open",
            xds_connected.clone(),
        );
        let xds_reconnects = Counter::default();
        registry.register(
            "xds_reconnects",
            "Times the ADS stream was reopened",
            xds_reconnects.clone(),
        );
        let xds_set_aside = Family::default();
        registry.register(
            "xds_set_aside",
            "Resources (or filter chains) from the control plane tern knowingly does not run, by kind and reason",
            xds_set_aside.clone(),
        );
        let xds_rejected = Family::default();
        registry.register(
            "xds_rejected",
            "Resources refused (NACKed) and not in force, by type",
            xds_rejected.clone(),
        );
        let xds_apply_seconds: Family<TypeLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.00005, 1.5, 28)));
        registry.register(
            "xds_apply_seconds",
            "Time to apply one xDS response (decode, translate, build and swap the snapshot), by type",
            xds_apply_seconds.clone(),
        );
        let tls_handshakes = Family::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes by direction and result (ok, or why they failed)",
            tls_handshakes.clone(),
        );
        let tls_certificate_updates = Family::default();
        registry.register(
            "tls_certificate_updates",
            "Workload certificates installed, or attempts that failed, by source",
            tls_certificate_updates.clone(),
        );
        let tls_certificate_expiry = Gauge::default();
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the workload certificate in force expires (Unix seconds; 0: none yet)",
            tls_certificate_expiry.clone(),
        );
        let rbac_decisions = Family::default();
        registry.register(
            "rbac_decisions",
            "Network RBAC decisions on connections and Thrift calls, shadow rules included",
            rbac_decisions.clone(),
        );
        let connections_refused = Family::default();
        registry.register(
            "connections_refused",
            "Connections tern closed without reaching their destination, by direction and reason",
            connections_refused.clone(),
        );
        Arc::new(Self {
            registry,
            istio: IstioMetrics::new(local),
            rbac_decisions,
            connections_refused,
            tls_handshakes,
            tls_certificate_updates,
            tls_certificate_expiry,
            xds_apply_seconds,
            xds_set_aside,
            xds_rejected,
            xds_connected,
            xds_reconnects,
            requests,
            replies,
            local_replies,
            upstream_request_seconds,
            active_requests,
            downstream_connections,
            downstream_connections_active,
            upstream_connections,
            upstream_connections_active,
            frames_rejected,
            config_updates,
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

    pub fn rejected(&self, cause: &'static str) {
        self.frames_rejected
            .get_or_create(&CauseLabel { cause })
            .inc();
    }

    /// Counts a TLS handshake.
    pub fn handshake(&self, direction: &'static str, result: Result<(), &std::io::Error>) {
        let result = match result {
            Ok(()) => "ok",
            Err(e) => crate::tls::failure::reason(e),
        };
        self.tls_handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    /// Counts a refused connection.
    pub fn refused(&self, direction: &'static str, why: crate::refusal::Refusal) {
        self.connections_refused
            .get_or_create(&RefusedLabels {
                direction,
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn rbac(&self, result: &'static str) {
        self.rbac_decisions
            .get_or_create(&RbacLabels { result })
            .inc();
    }

    pub fn local_reply(&self, cluster: &str, cause: &'static str) {
        self.local_replies
            .get_or_create(&LocalReplyLabels {
                cluster: cluster.to_owned(),
                cause,
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaptureLabels {
    hook: &'static str,
    decision: &'static str,
}

/// Reads the per-CPU counters of tern's eBPF hooks when scraped.
#[derive(Debug)]
struct CaptureCollector {
    /// The pin directory of the capture this proxy serves, if it runs with eBPF capture.
    pins: Option<PathBuf>,
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(dir) = &self.pins else {
            return Ok(());
        };
        let Ok(counters) = crate::capture::ebpf::counters(dir) else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "capture_decisions",
            "Decisions of tern's eBPF capture hooks",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (hook, decision, value) in counters {
            let labels = CaptureLabels { hook, decision };
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The workload certificate's source reports here.
#[derive(Debug)]
pub struct CertMetrics {
    pub metrics: Arc<Metrics>,
    pub source: &'static str,
}

impl crate::tls::source::CertEvents for CertMetrics {
    fn installed(&self, cert: &crate::tls::WorkloadCert) {
        self.metrics.tls_certificate_expiry.set(cert.info.not_after);
        self.metrics
            .tls_certificate_updates
            .get_or_create(&CertUpdateLabels {
                source: self.source,
                result: "installed",
            })
            .inc();
    }

    fn failed(&self) {
        self.metrics
            .tls_certificate_updates
            .get_or_create(&CertUpdateLabels {
                source: self.source,
                result: "failed",
            })
            .inc();
    }
}
