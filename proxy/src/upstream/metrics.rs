//! The upstream side's metric families (requests and replies, their latency, requests in
//! flight and connections, by cluster), and each cluster's handles to them.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::exponential_buckets},
    registry::Registry,
};

use crate::{
    method_labels::{MethodCounters, MethodLabels},
    sharded,
    thrift::frame::ReplyResult,
    tls::metrics::Handshakes,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    cluster: String,
    /// `success`, `exception` (a declared exception in a reply), `error` (an EXCEPTION message).
    result: &'static str,
}

type Histograms = Family<ClusterLabel, sharded::Histogram, fn() -> sharded::Histogram>;

/// The upstream side's metric families.
#[derive(Debug)]
pub struct UpstreamMetrics {
    requests: Family<MethodLabels, sharded::Counter>,
    replies: Family<ResultLabels, sharded::Counter>,
    request_seconds: Histograms,
    active_requests: Family<ClusterLabel, Gauge>,
    connections: Family<ClusterLabel, Counter>,
    connections_active: Family<ClusterLabel, Gauge>,
    /// Handshakes of upstream TLS connections (the family is TLS's).
    pub handshakes: Handshakes,
}

impl UpstreamMetrics {
    pub fn register(registry: &mut Registry, handshakes: Handshakes) -> Self {
        let m = Self::unregistered(handshakes);
        registry.register(
            "thrift_requests",
            "Thrift requests by cluster and method",
            m.requests.clone(),
        );
        registry.register(
            "thrift_replies",
            "Upstream replies by result",
            m.replies.clone(),
        );
        registry.register(
            "thrift_upstream_request_seconds",
            "Time from sending a request upstream to its reply",
            m.request_seconds.clone(),
        );
        registry.register(
            "thrift_active_requests",
            "Requests waiting for a reply",
            m.active_requests.clone(),
        );
        registry.register(
            "upstream_connections",
            "Upstream connections opened by cluster",
            m.connections.clone(),
        );
        registry.register(
            "upstream_connections_active",
            "Open upstream connections by cluster",
            m.connections_active.clone(),
        );
        m
    }

    fn unregistered(handshakes: Handshakes) -> Self {
        Self {
            requests: Family::default(),
            replies: Family::default(),
            request_seconds: Family::new_with_constructor(|| {
                sharded::Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            }),
            active_requests: Family::default(),
            connections: Family::default(),
            connections_active: Family::default(),
            handshakes,
        }
    }
}

/// Families no registry exports (for tests of the parts that count).
impl Default for UpstreamMetrics {
    fn default() -> Self {
        Self::unregistered(Handshakes::default())
    }
}

/// A cluster's metric handles, resolved once so counting looks nothing up and allocates
/// nothing.
#[derive(Debug)]
pub struct ClusterMetrics {
    pub active_gauge: Gauge,
    pub request_seconds: sharded::Histogram,
    pub connections_opened: Counter,
    pub connections_gauge: Gauge,
    /// Replies by result (success, declared exception, application error).
    replies: [sharded::Counter; 3],
    /// Requests by method, with bounded labels.
    pub methods: MethodCounters,
}

impl ClusterMetrics {
    pub fn new(name: &str, metrics: &UpstreamMetrics) -> Self {
        let label = ClusterLabel {
            cluster: name.to_owned(),
        };
        Self {
            active_gauge: metrics.active_requests.get_or_create(&label).clone(),
            request_seconds: metrics.request_seconds.get_or_create(&label).clone(),
            connections_opened: metrics.connections.get_or_create(&label).clone(),
            connections_gauge: metrics.connections_active.get_or_create(&label).clone(),
            methods: MethodCounters::new(name, &metrics.requests),
            replies: ReplyResult::ALL.map(|result| {
                metrics
                    .replies
                    .get_or_create(&ResultLabels {
                        cluster: name.to_owned(),
                        result: result.as_str(),
                    })
                    .clone()
            }),
        }
    }

    /// The reply counter for a result.
    pub fn replies(&self, result: ReplyResult) -> &sharded::Counter {
        &self.replies[result as usize]
    }
}
