//! Istio's standard metrics with their standard labels: TCP connections and bytes, and
//! Thrift requests (`request_protocol="thrift"`, `response_code` `success`, `exception` or
//! `error` from the reply). Each family holds at most [`MAX_SERIES`] label sets; the rest
//! count under a series whose peer labels say `overflow` (a client chooses its identity,
//! so it cannot choose how much memory tern spends on it).
use std::{
    collections::HashSet,
    hash::Hash,
    sync::{Arc, Mutex},
};

use prometheus_client::{encoding::EncodeLabelSet, metrics::family::Family, registry::Registry};

use super::workload::{UNKNOWN, Workload};
use crate::{
    config::ServiceRef,
    sharded::{Counter, Histogram},
};

/// Label sets per family, at most.
pub const MAX_SERIES: usize = 2048;

/// Which side reports: the client's sidecar (`source`) or the server's (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// The labels Istio's TCP and request metrics share.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub response_code: &'static str,
    pub grpc_response_status: &'static str,
    // Flattened last: the derive moves its encoder there.
    #[prometheus(flatten)]
    pub peers: PeerLabels,
}

/// Who is on each side of a connection.
#[derive(Clone, Debug)]
pub struct Peers<'a> {
    pub reporter: Reporter,
    pub source: &'a Workload,
    pub source_principal: Option<&'a str>,
    pub destination: &'a Workload,
    pub destination_principal: Option<&'a str>,
    pub service: Option<&'a ServiceRef>,
    /// mTLS terminated by tern (`mutual_tls`) or not (`none`); the client side says
    /// `unknown`, as Envoy does.
    pub mutual_tls: bool,
}

impl Peers<'_> {
    fn labels(&self, protocol: &'static str, flags: &'static str) -> PeerLabels {
        let s = self.source;
        let d = self.destination;
        let principal = |p: Option<&str>| p.unwrap_or(UNKNOWN).to_owned();
        let (service, service_name, service_namespace) = match self.service {
            Some(svc) => (svc.host.clone(), svc.name.clone(), svc.namespace.clone()),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        PeerLabels {
            reporter: match self.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            },
            source_workload: s.name.clone(),
            source_workload_namespace: s.namespace.clone(),
            source_principal: principal(self.source_principal),
            source_app: s.app.clone(),
            source_version: s.version.clone(),
            source_canonical_service: s.canonical_service.clone(),
            source_canonical_revision: s.canonical_revision.clone(),
            source_cluster: s.cluster.clone(),
            destination_workload: d.name.clone(),
            destination_workload_namespace: d.namespace.clone(),
            destination_principal: principal(self.destination_principal),
            destination_app: d.app.clone(),
            destination_version: d.version.clone(),
            destination_service: service,
            destination_service_name: service_name,
            destination_service_namespace: service_namespace,
            destination_canonical_service: d.canonical_service.clone(),
            destination_canonical_revision: d.canonical_revision.clone(),
            destination_cluster: d.cluster.clone(),
            request_protocol: protocol,
            response_flags: flags,
            connection_security_policy: match (self.reporter, self.mutual_tls) {
                (Reporter::Source, _) => "unknown",
                (Reporter::Destination, true) => "mutual_tls",
                (Reporter::Destination, false) => "none",
            },
        }
    }
}

/// A family that makes at most [`MAX_SERIES`] label sets.
#[derive(Debug)]
struct Bounded<L, M, C = fn() -> M> {
    family: Family<L, M, C>,
    made: Mutex<HashSet<L>>,
}

impl<L, M, C> Bounded<L, M, C>
where
    L: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: Clone
        + prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
    C: prometheus_client::metrics::family::MetricConstructor<M>
        + Clone
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
{
    fn get(&self, labels: L, overflow: impl FnOnce() -> L) -> M {
        let labels = {
            let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
            if made.contains(&labels) {
                labels
            } else if made.len() < MAX_SERIES - 1 {
                made.insert(labels.clone());
                labels
            } else {
                overflow()
            }
        };
        self.family.get_or_create(&labels).clone()
    }
}

/// The handles of one request series.
#[derive(Clone, Debug)]
pub struct RequestSeries {
    pub requests: Counter,
    pub duration_ms: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

impl RequestSeries {
    pub fn observe(&self, duration_ms: f64, request_bytes: usize, response_bytes: usize) {
        self.requests.inc();
        self.duration_ms.observe(duration_ms);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// The handles of one TCP series.
#[derive(Clone, Debug)]
pub struct TcpSeries {
    pub opened: Counter,
    pub closed: Counter,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
}

type HistogramFamily<L> = Bounded<L, Histogram, fn() -> Histogram>;

/// Istio's metrics, in a registry of their own (no `tern_` prefix).
#[derive(Debug)]
pub struct IstioMetrics {
    pub registry: Registry,
    /// The workload tern serves.
    pub local: Workload,
    requests: Bounded<RequestLabels, Counter>,
    duration: HistogramFamily<RequestLabels>,
    request_bytes: HistogramFamily<RequestLabels>,
    response_bytes: HistogramFamily<RequestLabels>,
    tcp_opened: Bounded<PeerLabels, Counter>,
    tcp_closed: Bounded<PeerLabels, Counter>,
    tcp_sent: Bounded<PeerLabels, Counter>,
    tcp_received: Bounded<PeerLabels, Counter>,
}

/// Istio's duration buckets, in milliseconds.
fn duration_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

/// Istio's size buckets, in bytes.
fn bytes_histogram() -> Histogram {
    Histogram::new((0..9).map(|e| 10f64.powi(e)))
}

fn bounded<L, M, C>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    family: Family<L, M, C>,
) -> Bounded<L, M, C>
where
    L: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
    C: prometheus_client::metrics::family::MetricConstructor<M>
        + Clone
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
{
    registry.register(name, help, family.clone());
    Bounded {
        family,
        made: Mutex::new(HashSet::new()),
    }
}

fn overflowed(labels: &PeerLabels) -> PeerLabels {
    let o = || "overflow".to_owned();
    PeerLabels {
        source_workload: o(),
        source_workload_namespace: o(),
        source_principal: o(),
        source_app: o(),
        source_version: o(),
        source_canonical_service: o(),
        source_canonical_revision: o(),
        source_cluster: o(),
        destination_workload: o(),
        destination_workload_namespace: o(),
        destination_principal: o(),
        destination_app: o(),
        destination_version: o(),
        destination_service: o(),
        destination_service_name: o(),
        destination_service_namespace: o(),
        destination_canonical_service: o(),
        destination_canonical_revision: o(),
        destination_cluster: o(),
        ..labels.clone()
    }
}

impl IstioMetrics {
    pub fn new(local: Workload) -> Arc<Self> {
        let mut registry = Registry::default();
        let r = &mut registry;
        let requests = bounded(
            r,
            "istio_requests",
            "Requests (Thrift calls)",
            Family::default(),
        );
        let duration = bounded(
            r,
            "istio_request_duration_milliseconds",
            "Request duration",
            Family::new_with_constructor(duration_histogram as fn() -> Histogram),
        );
        let request_bytes = bounded(
            r,
            "istio_request_bytes",
            "Request size",
            Family::new_with_constructor(bytes_histogram as fn() -> Histogram),
        );
        let response_bytes = bounded(
            r,
            "istio_response_bytes",
            "Response size",
            Family::new_with_constructor(bytes_histogram as fn() -> Histogram),
        );
        let tcp_opened = bounded(
            r,
            "istio_tcp_connections_opened",
            "TCP connections opened",
            Family::default(),
        );
        let tcp_closed = bounded(
            r,
            "istio_tcp_connections_closed",
            "TCP connections closed",
            Family::default(),
        );
        let tcp_sent = bounded(
            r,
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream (TCP)",
            Family::default(),
        );
        let tcp_received = bounded(
            r,
            "istio_tcp_received_bytes",
            "Bytes received from the downstream (TCP)",
            Family::default(),
        );
        Arc::new(Self {
            registry,
            local,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
        })
    }

    /// The series of Thrift requests between `peers` with this result.
    pub fn requests(
        &self,
        peers: &Peers,
        response_code: &'static str,
        flags: &'static str,
    ) -> RequestSeries {
        let labels = RequestLabels {
            peers: peers.labels("thrift", flags),
            response_code,
            grpc_response_status: "",
        };
        let overflow = || RequestLabels {
            peers: overflowed(&labels.peers),
            ..labels.clone()
        };
        RequestSeries {
            requests: self.requests.get(labels.clone(), overflow),
            duration_ms: self.duration.get(labels.clone(), overflow),
            request_bytes: self.request_bytes.get(labels.clone(), overflow),
            response_bytes: self.response_bytes.get(labels.clone(), overflow),
        }
    }

    /// The series of TCP connections between `peers`.
    pub fn tcp(&self, peers: &Peers, flags: &'static str) -> TcpSeries {
        let labels = peers.labels("tcp", flags);
        let overflow = || overflowed(&labels);
        TcpSeries {
            opened: self.tcp_opened.get(labels.clone(), overflow),
            closed: self.tcp_closed.get(labels.clone(), overflow),
            sent_bytes: self.tcp_sent.get(labels.clone(), overflow),
            received_bytes: self.tcp_received.get(labels.clone(), overflow),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_bounded_whatever_peers_claim() {
        let m = IstioMetrics::new(Workload::default());
        let local = Workload::default();
        for i in 0..MAX_SERIES + 100 {
            let principal = format!("spiffe://cluster.local/ns/n{i}/sa/s");
            let remote = Workload::from_principal(&principal);
            let peers = Peers {
                reporter: Reporter::Destination,
                source: &remote,
                source_principal: Some(&principal),
                destination: &local,
                destination_principal: None,
                service: None,
                mutual_tls: true,
            };
            m.tcp(&peers, "-").opened.inc();
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        let series = out
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .count();
        assert_eq!(series, MAX_SERIES);
        assert!(out.contains(r#"source_principal="overflow""#));
        assert!(out.contains(r#"connection_security_policy="mutual_tls""#));
    }
}
