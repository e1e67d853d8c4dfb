//! Live state that outlives snapshots: per endpoint (counters, outlier state, connection
//! pool) and per cluster (circuit-breaker counts, metric handles). A new snapshot that keeps
//! an endpoint or cluster shares its runtime, so an update neither resets counters nor
//! drops upstream connections.
use std::{
    borrow::Borrow,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use super::{
    Pool,
    metrics::{ClusterMetrics, UpstreamMetrics},
    outlier::Outlier,
};
use crate::{
    config::{Cluster, UpstreamTls},
    latency::PeakEwma,
    telemetry::RequestSeries,
    tls::{ClientTls, ContextError, TlsContexts},
};

/// Live state of one endpoint of one cluster, for one way of reaching it (an endpoint that
/// switches between TLS and plaintext gets a new runtime, and a new pool). What balancing
/// reads of every endpoint is inline; the rest waits in [`Traffic`] for the first use.
#[derive(Debug)]
pub struct EndpointRuntime {
    pub address: SocketAddr,
    /// TLS towards it, or plaintext.
    pub tls: Option<Arc<UpstreamTls>>,
    pub active: AtomicU64,
    /// How long its requests take (least request weighs it).
    pub latency: PeakEwma,
    pub outlier: Outlier,
    /// Made at its first connection or failure (boxed: a mesh has 10,000s of endpoints, and
    /// most never see one).
    traffic: OnceLock<Box<Traffic>>,
}

/// An endpoint's connections, and what its traffic counted and taught.
#[derive(Debug)]
pub struct Traffic {
    /// Its connections, a pool for each worker (see [`crate::workers`]).
    pools: Box<[Pool]>,
    pub errors: AtomicU64,
    /// The identity its certificate showed at the first TLS handshake.
    pub server_identity: OnceLock<Box<str>>,
    /// Istio's request series of calls to it (made at the first call).
    pub istio: OnceLock<[RequestSeries; 3]>,
}

impl Traffic {
    /// The pool of the worker running this thread.
    pub fn pool(&self) -> &Pool {
        &self.pools[crate::workers::current() % self.pools.len()]
    }

    /// Every worker's pool.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Connections open to the endpoint, across workers.
    pub fn open_connections(&self) -> usize {
        self.pools.iter().map(Pool::open_connections).sum()
    }

    /// Requests sent to the endpoint, across workers.
    pub fn requests(&self) -> u64 {
        self.pools
            .iter()
            .map(|p| p.requests.load(Ordering::Relaxed))
            .sum()
    }
}

impl EndpointRuntime {
    pub(super) fn new(address: SocketAddr, tls: Option<Arc<UpstreamTls>>) -> Self {
        Self {
            address,
            tls,
            active: AtomicU64::new(0),
            latency: PeakEwma::default(),
            outlier: Outlier::default(),
            traffic: OnceLock::new(),
        }
    }

    /// Its connections and what its traffic taught (made on first use).
    pub fn traffic(&self) -> &Traffic {
        self.traffic.get_or_init(|| {
            Box::new(Traffic {
                pools: (0..crate::workers::count())
                    .map(|_| Pool::default())
                    .collect(),
                errors: AtomicU64::new(0),
                server_identity: OnceLock::new(),
                istio: OnceLock::new(),
            })
        })
    }

    /// Its traffic so far, if it had any (for reports, which make nothing).
    pub fn seen(&self) -> Option<&Traffic> {
        self.traffic.get().map(|t| &**t)
    }

    /// The endpoint left the configuration: its connections close once their requests are
    /// done. One that never had any has nothing to close; a request that picked it from an
    /// older snapshot holds the runtime, pool and all, only until it is done.
    pub fn retire(&self, cluster: &ClusterRuntime) {
        if let Some(t) = self.seen() {
            for pool in t.pools() {
                pool.retire(cluster);
            }
        }
    }

    pub fn ejected(&self) -> bool {
        self.outlier.ejected()
    }
}

/// Live state of a cluster: what its circuit breakers count, and its metric handles.
#[derive(Debug)]
pub struct ClusterRuntime {
    pub pending_requests: AtomicUsize,
    /// Upstream connections, connecting or open (`max_connections` counts them).
    pub connections: AtomicUsize,
    /// Notified when a connection is given back or closes, for requests waiting for one.
    pub released: tokio::sync::Notify,
    /// The cluster's metric series, made when it first sees traffic: a mesh has thousands of
    /// clusters and each series costs memory (and a line on the metrics page).
    metrics: OnceLock<ClusterMetrics>,
    name: Box<str>,
    families: Arc<UpstreamMetrics>,
    /// The runtime of each endpoint, by address and TLS; read and written only when a
    /// snapshot is built (the data path reaches endpoints through the snapshot).
    endpoints: Mutex<Vec<(EndpointKey, Arc<EndpointRuntime>)>>,
    /// TLS clients of the cluster's contexts, made when a connection first needs one (a
    /// mesh has thousands of clusters; a Pod talks to a few). Taken when a connection
    /// opens, never per request, and never by the control path.
    client_tls: Mutex<Vec<(Arc<UpstreamTls>, Arc<ClientTls>)>>,
    contexts: TlsContexts,
}

/// An endpoint runtime's identity: its address, and which of its cluster's TLS contexts
/// reaches it (none: plaintext).
type EndpointKey = (SocketAddr, Option<usize>);

/// The runtime kept for `key` in a vector sorted by key.
fn find<'a>(
    sorted: &'a [(EndpointKey, Arc<EndpointRuntime>)],
    key: &EndpointKey,
) -> Option<&'a Arc<EndpointRuntime>> {
    sorted
        .binary_search_by_key(key, |(k, _)| *k)
        .ok()
        .map(|i| &sorted[i].1)
}

/// TLS clients a cluster keeps (it has one or two contexts; more only after changes).
const CLIENT_TLS_KEPT: usize = 4;

impl ClusterRuntime {
    pub fn new(name: &str, metrics: &Arc<UpstreamMetrics>, contexts: &TlsContexts) -> Self {
        Self {
            client_tls: Mutex::new(Vec::new()),
            contexts: contexts.clone(),
            pending_requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            released: tokio::sync::Notify::new(),
            metrics: OnceLock::new(),
            name: name.into(),
            families: metrics.clone(),
            endpoints: Mutex::new(Vec::new()),
        }
    }

    /// The runtime of each of `config`'s endpoints, in order, for a new or changed
    /// configuration of this cluster: endpoints it keeps keep their runtime (counters,
    /// outlier state, pool); endpoints that left have their connections closed after their
    /// requests.
    pub fn endpoints_for(&self, config: &Cluster) -> Vec<Arc<EndpointRuntime>> {
        let mut known = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        // Sorted by key: 1,000 clusters of a few endpoints each hold a vector apiece, where a
        // map each cost 0.9 MB more (heaptrack).
        let mut kept = Vec::with_capacity(config.endpoints.len());
        // An endpoint's TLS context, by its place among the cluster's few: hashing the context
        // itself for every endpoint of a large cluster would cost more than the rest.
        let contexts = config.transport.contexts();
        let runtimes = config
            .endpoints
            .iter()
            .map(|e| {
                let tls = config
                    .transport
                    .for_endpoint(e.metadata.as_ref().map_or(&[], |m| &m.socket_match[..]));
                let key = (
                    e.address,
                    tls.and_then(|t| contexts.iter().position(|c| Arc::ptr_eq(c, t))),
                );
                // The same place may hold another context after an update: then a new
                // runtime (and pool), so no connection made under the old one is reused.
                let same = |rt: &&Arc<EndpointRuntime>| match (&rt.tls, tls) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                    _ => false,
                };
                let rt = find(&known, &key)
                    .filter(same)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(EndpointRuntime::new(e.address, tls.cloned())));
                kept.push((key, rt.clone()));
                rt
            })
            .collect();
        kept.sort_by_key(|(key, _)| *key);
        kept.dedup_by_key(|(key, _)| *key);
        for (key, gone) in known.iter() {
            if find(&kept, key).is_none_or(|k| !Arc::ptr_eq(k, gone)) {
                gone.retire(self);
            }
        }
        *known = kept;
        runtimes
    }

    /// The cluster left the configuration: its connections close once their requests are
    /// done.
    pub fn retire(&self) {
        let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        for (_, e) in endpoints.iter() {
            e.retire(self);
        }
    }

    /// The TLS client for `tls`, made on first use.
    pub fn client_tls(&self, tls: &Arc<UpstreamTls>) -> Result<Arc<ClientTls>, ContextError> {
        let mut kept = self.client_tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, client)) = kept.iter().find(|(t, _)| Arc::ptr_eq(t, tls) || t == tls) {
            return Ok(client.clone());
        }
        let client = Arc::new(self.contexts.client(tls)?);
        if kept.len() >= CLIENT_TLS_KEPT {
            kept.remove(0);
        }
        kept.push((tls.clone(), client.clone()));
        Ok(client)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Handshakes of upstream TLS connections (counted per direction, not per cluster).
    pub fn handshakes(&self) -> &crate::tls::metrics::Handshakes {
        &self.families.handshakes
    }

    /// The cluster's metric handles (made on first use).
    pub fn metrics(&self) -> &ClusterMetrics {
        self.metrics
            .get_or_init(|| ClusterMetrics::new(&self.name, &self.families))
    }

    /// Requests waiting for a reply (`max_requests` counts them): the gauge that exports
    /// them, so a request counts itself once.
    pub fn active_requests(&self) -> usize {
        self.metrics
            .get()
            .map_or(0, |m| usize::try_from(m.active_gauge.get()).unwrap_or(0))
    }
}

/// Counts a request against its cluster's `max_requests` while it lives.
#[derive(Debug)]
pub struct ActiveRequest<C: Borrow<ClusterRuntime> = Arc<ClusterRuntime>>(C);

impl<C: Borrow<ClusterRuntime>> ActiveRequest<C> {
    /// Borrowed by a request's own future; owned (an `Arc`) by a request queued elsewhere.
    pub fn new(cluster: C) -> Self {
        cluster.borrow().metrics().active_gauge.inc();
        Self(cluster)
    }
}

impl<C: Borrow<ClusterRuntime>> Drop for ActiveRequest<C> {
    fn drop(&mut self) {
        self.0.borrow().metrics().active_gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_traffic_stays_small() {
        // 10,000 endpoints take 1.4 MiB at this size (with the `Arc`'s counts; 2.3 MiB when
        // each had its pool and counters inline); those wait for the first connection.
        let size = std::mem::size_of::<EndpointRuntime>();
        assert!(size <= 128, "{size} bytes");
        let e = EndpointRuntime::new("10.0.0.1:80".parse().unwrap(), None);
        assert!(e.seen().is_none());
        e.traffic().pool().requests.fetch_add(1, Ordering::Relaxed);
        assert_eq!(e.seen().map(Traffic::requests), Some(1));
    }
}
