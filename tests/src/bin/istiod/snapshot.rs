//! The snapshot file: services, inbound policy, dumps and load settings, read whole.
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{
    dumps::Dumped,
    inbound::{InboundTls, RbacPolicy},
    say,
};

/// What the stand-in serves (the YAML the binary's documentation describes).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Snapshot {
    pub(crate) version: String,
    #[serde(default)]
    pub(crate) services: Vec<Service>,
    /// Extra services (10 endpoints each) to make a large snapshot.
    #[serde(default)]
    pub(crate) bulk: usize,
    /// State of the world: push this many single-endpoint changes a second (each a response
    /// with one generated service's `ClusterLoadAssignment`, as istiod pushes EDS).
    #[serde(default)]
    pub(crate) churn_per_sec: u64,
    #[serde(default)]
    pub(crate) cluster_padding: usize,
    /// Files of real istiod resources (`tests/python/istio_dump.py`).
    #[serde(default)]
    pub(crate) dumps: Vec<String>,
    #[serde(default)]
    pub(crate) dump_endpoints: Vec<String>,
    /// Endpoints by EDS name, for clusters from the dumps.
    #[serde(default)]
    pub(crate) endpoints: BTreeMap<String, Vec<String>>,
    /// Istio's `virtualInbound` listener, its connections relayed to the application:
    /// `strict` (mTLS only), `permissive` (mTLS and plaintext), `plaintext` (istiod's shape
    /// with mTLS disabled: the default, as istiod always sends one), or `none` (no inbound
    /// listener at all: tern then refuses inbound connections). Dumps bring their own.
    #[serde(default)]
    pub(crate) inbound: Option<String>,
    /// `AuthorizationPolicy` rules for the inbound chains, as istiod writes them (network
    /// RBAC filters: DENY, then ALLOW).
    #[serde(default)]
    pub(crate) inbound_rbac: Vec<RbacPolicy>,
    /// The inbound mTLS chain matches any TLS client, not only those offering Istio's ALPN
    /// (for clients such as `openssl s_time`, which offer none).
    #[serde(default)]
    pub(crate) inbound_any_alpn: bool,
    /// How the inbound mTLS chains' `DownstreamTlsContext` departs from istiod's.
    #[serde(default)]
    pub(crate) inbound_tls: InboundTls,
    /// The dumps' resources, read when the snapshot is loaded.
    #[serde(skip)]
    pub(crate) dumped: Dumped,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) vip: String,
    pub(crate) port: u32,
    /// `thrift` (a thrift_proxy filter, as an EnvoyFilter would patch in) or `tcp` (istiod's
    /// plain tcp_proxy).
    pub(crate) filter: String,
    pub(crate) endpoints: Vec<String>,
    /// `ring_hash` or `maglev` (what a DestinationRule's `consistentHash` produces);
    /// default round robin.
    #[serde(default)]
    pub(crate) lb: Option<String>,
    /// Istio's auto-mTLS: the endpoints are labelled `tlsMode: istio` and the cluster
    /// verifies this SAN.
    #[serde(default)]
    pub(crate) mtls: Option<String>,
    /// A DestinationRule's SIMPLE TLS: `{ca, sni, san}`.
    #[serde(default)]
    pub(crate) simple_tls: Option<SimpleTls>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct SimpleTls {
    pub(crate) ca: String,
    pub(crate) sni: String,
    pub(crate) san: String,
}

impl Service {
    pub(crate) fn cluster(&self) -> String {
        format!(
            "outbound|{}||{}.default.svc.cluster.local",
            self.port, self.name
        )
    }
}

impl Snapshot {
    /// The inbound listener's mode, if one is served (`own`: no dumps).
    pub(crate) fn inbound_mode(&self, own: bool) -> Option<&str> {
        match self.inbound.as_deref() {
            Some("none") => None,
            Some(mode) => Some(mode),
            None => own.then_some("plaintext"),
        }
    }
}

impl Snapshot {
    /// The services, with `bulk` generated ones after those listed.
    pub(crate) fn all_services(&self) -> Vec<Service> {
        let mut all = self.services.clone();
        all.extend((0..self.bulk).map(bulk_service));
        all
    }
}

/// Generated service `i` (of `bulk`): 10 endpoints.
pub(crate) fn bulk_service(i: usize) -> Service {
    Service {
        name: format!("bulk-{i}"),
        vip: format!("10.97.{}.{}", i / 256, i % 256),
        port: 9090,
        filter: "tcp".into(),
        lb: None,
        mtls: None,
        simple_tls: None,
        endpoints: (0..10)
            .map(|e| format!("10.200.{}.{}:{}", i / 256, i % 256, 9000 + e))
            .collect(),
    }
}

/// The snapshot in the file at `path`; `None` (said as `ERROR`) when it does not parse.
pub(crate) fn load(path: &str) -> Option<Snapshot> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_yaml::from_str::<Snapshot>(&text) {
        Ok(mut s) => match Dumped::read(&s.dumps) {
            Ok(d) => {
                s.dumped = d;
                Some(s)
            }
            Err(e) => {
                say(format!("ERROR {path}: {e}"));
                None
            }
        },
        Err(e) => {
            say(format!("ERROR {path}: {e}"));
            None
        }
    }
}
