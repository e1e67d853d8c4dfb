//! Live state that outlives snapshots: per endpoint (counters, outlier state, connection
//! pool) and per cluster (circuit-breaker counts, metric handles). A new snapshot that keeps
//! an endpoint or cluster shares its runtime, so an update neither resets counters nor
//! drops upstream connections.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};

use super::outlier::Outlier;
use crate::{
    method_labels::MethodCounters,
    metrics::{ClusterLabel, Metrics, ResultLabels},
    thrift::frame::ReplyResult,
    upstream::Pool,
};

/// Live state of one endpoint of one cluster.
#[derive(Debug)]
pub struct EndpointRuntime {
    pub address: SocketAddr,
    pub active: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub outlier: Outlier,
    pub pool: Pool,
}

impl EndpointRuntime {
    pub(super) fn new(address: SocketAddr) -> Self {
        Self {
            address,
            active: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            outlier: Outlier::default(),
            pool: Pool::default(),
        }
    }

    pub fn ejected(&self) -> bool {
        self.outlier.ejected()
    }
}

/// Live state of a cluster: what its circuit breakers count, and its metric handles.
#[derive(Debug)]
pub struct ClusterRuntime {
    pub active_requests: AtomicUsize,
    pub pending_requests: AtomicUsize,
    /// Upstream connections, connecting or open (`max_connections` counts them).
    pub connections: AtomicUsize,
    /// Notified when a connection is given back or closes, for requests waiting for one.
    pub released: tokio::sync::Notify,
    pub active_gauge: Gauge,
    pub request_seconds: Histogram,
    pub connections_opened: Counter,
    pub connections_gauge: Gauge,
    /// Replies by result (success, declared exception, application error), resolved once so
    /// counting a reply looks nothing up and allocates nothing.
    pub replies: [Counter; 3],
    /// Requests by method, with bounded labels.
    pub methods: MethodCounters,
    /// The runtime of each endpoint, by address; read and written only when a snapshot is
    /// built (the data path reaches endpoints through the snapshot).
    pub(super) endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointRuntime>>>,
}

impl ClusterRuntime {
    pub(super) fn new(name: &str, metrics: &Metrics) -> Self {
        let label = ClusterLabel {
            cluster: name.to_owned(),
        };
        Self {
            active_requests: AtomicUsize::new(0),
            pending_requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            released: tokio::sync::Notify::new(),
            active_gauge: metrics.active_requests.get_or_create(&label).clone(),
            request_seconds: metrics
                .upstream_request_seconds
                .get_or_create(&label)
                .clone(),
            connections_opened: metrics.upstream_connections.get_or_create(&label).clone(),
            connections_gauge: metrics
                .upstream_connections_active
                .get_or_create(&label)
                .clone(),
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
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    /// The reply counter for a result.
    pub fn replies(&self, result: ReplyResult) -> &Counter {
        &self.replies[result as usize]
    }
}

/// Counts a request against its cluster's `max_requests` while it lives.
#[derive(Debug)]
pub struct ActiveRequest(Arc<ClusterRuntime>);

impl ActiveRequest {
    pub fn new(cluster: Arc<ClusterRuntime>) -> Self {
        cluster.active_requests.fetch_add(1, Ordering::Relaxed);
        cluster.active_gauge.inc();
        Self(cluster)
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::Relaxed);
        self.0.active_gauge.dec();
    }
}
