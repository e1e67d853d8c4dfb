//! tern's configuration model: listeners, filter chains, Thrift routes, clusters, endpoints.
//!
//! Both sources produce the same [`Config`]: the static file ([`file`], `tern run --config`)
//! and, later, the xDS client. A `Config` is validated once, then immutable; the proxy swaps
//! whole snapshots atomically ([`crate::state`]), so a broken update is refused while the
//! last good configuration keeps serving, and the data path never takes a lock to read it.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use ipnet::IpNet;

use crate::thrift::{Protocol, Transport};

pub mod file;

/// Everything the data path routes with.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Config {
    /// A label for this configuration (file hash or xDS version).
    pub version: String,
    /// Outbound listeners, matched against a connection's original destination.
    pub listeners: Vec<Listener>,
    /// The inbound listener's filter chains (Istio's `virtualInbound`), if any.
    pub inbound: Option<Listener>,
    /// What happens to outbound destinations no listener matches.
    pub passthrough: Passthrough,
    pub clusters: BTreeMap<String, Cluster>,
}

/// Outbound destinations that match no listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Passthrough {
    /// Relay to the original destination (Istio's `PassthroughCluster`, `ALLOW_ANY`).
    #[default]
    Allow,
    /// Close the connection (Istio's `BlackHoleCluster`, `REGISTRY_ONLY`).
    Deny,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Listener {
    pub name: String,
    /// The address it stands for; an unspecified IP (0.0.0.0 / ::) matches any on the port.
    pub address: SocketAddr,
    pub filter_chains: Vec<FilterChain>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FilterChain {
    pub name: String,
    pub matcher: ChainMatch,
    pub filter: Filter,
}

/// Envoy's `filter_chain_match`, the parts tern uses. Empty lists match anything.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ChainMatch {
    pub destination_port: Option<u16>,
    pub destination_prefixes: Vec<IpNet>,
    pub source_prefixes: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Filter {
    /// Relay bytes to a cluster; `sniff_thrift` (on unless configured off) upgrades a
    /// connection whose client speaks Thrift first to per-request balancing, with the TCP
    /// proxy's cluster as the default route.
    TcpProxy {
        target: Target,
        sniff_thrift: bool,
    },
    Thrift(ThriftProxy),
}

impl Filter {
    /// The targets the filter can send to (a cluster named by a header is not among them).
    pub fn targets(&self) -> Vec<&Target> {
        match self {
            Filter::TcpProxy { target, .. } => vec![target],
            Filter::Thrift(t) => t
                .routes
                .iter()
                .filter_map(|r| match &r.action {
                    RouteAction::Target(t) => Some(t),
                    RouteAction::ClusterHeader(_) => None,
                })
                .chain(&t.default_target)
                .collect(),
        }
    }
}

/// How long an upstream connection stays open unused (Envoy's default idle timeout: 1 h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where traffic goes: one cluster, or several by weight.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Target {
    Cluster(String),
    Weighted(Vec<(String, u32)>),
}

impl Target {
    /// The cluster for one request or connection: weighted clusters pick by weight.
    pub fn pick(&self) -> &str {
        match self {
            Target::Cluster(c) => c,
            // Validation refuses weights that are all zero; the first is the fallback anyway.
            Target::Weighted(w) => {
                crate::balance::weighted_pick(w.iter().map(|(c, weight)| (c.as_str(), *weight)))
                    .unwrap_or(&w[0].0)
            }
        }
    }

    pub fn clusters(&self) -> Vec<&str> {
        match self {
            Target::Cluster(c) => vec![c.as_str()],
            Target::Weighted(w) => w.iter().map(|(c, _)| c.as_str()).collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ThriftProxy {
    /// Configured transport and protocol; `None` detects them from the first bytes.
    pub transport: Option<Transport>,
    pub protocol: Option<Protocol>,
    pub routes: Vec<Route>,
    /// Where requests no route matches go (the TCP proxy's cluster when upgraded by sniffing).
    pub default_target: Option<Target>,
}

/// Envoy thrift_proxy route semantics: the first route whose match fits wins.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Route {
    pub matcher: RouteMatch,
    pub action: RouteAction,
    /// Overrides the cluster's request timeout.
    pub timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct RouteMatch {
    /// Exact method name (without the multiplexed service prefix).
    pub method: Option<String>,
    /// Multiplexed service name (the part before `:`).
    pub service: Option<String>,
    /// THeader headers that must be present with these values.
    pub headers: Vec<(String, String)>,
    /// Match when the rest does not.
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum RouteAction {
    Target(Target),
    /// The cluster named by this THeader header's value.
    ClusterHeader(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Cluster {
    pub name: String,
    pub lb_policy: LbPolicy,
    /// THeader header hashed by ring hash and Maglev (requests without it pick at random).
    pub hash_header: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// Weight of each locality within a priority (missing ones weigh 1).
    pub locality_weights: BTreeMap<String, u32>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub circuit_breakers: CircuitBreakers,
    pub outlier: OutlierDetection,
    /// How Thrift requests use upstream connections.
    pub upstream: UpstreamMode,
    /// Multiplexed connections per endpoint (per transport and protocol); a new one opens
    /// when all are busy, up to this many (default 4). Exclusive connections grow to
    /// `max_connections` instead.
    pub connections_per_endpoint: usize,
    /// Idle upstream connections close after this long.
    pub idle_timeout: Duration,
    /// Connects to the original destination instead of endpoints (Istio's passthrough).
    pub original_dst: bool,
}

/// How a cluster's Thrift requests share upstream connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamMode {
    /// A request has a connection to itself until its reply arrives, as Thrift servers
    /// expect (they answer one request per connection at a time). Envoy's thrift_proxy too.
    #[default]
    Exclusive,
    /// Requests share connections, with sequence ids rewritten; only for servers known to
    /// answer out of order.
    Multiplexed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CircuitBreakers {
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_requests: usize,
}

impl Default for CircuitBreakers {
    /// Envoy's defaults.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutlierDetection {
    /// Consecutive connect failures or errors that eject an endpoint (0 disables).
    pub consecutive_errors: u32,
    /// How long the first ejection lasts (later ones last longer, as in Envoy).
    pub base_ejection: Duration,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            base_ejection: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub priority: u32,
    pub locality: String,
    pub health: Health,
}

/// Envoy's `HealthStatus`; UNHEALTHY and DRAINING endpoints get no requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
    Timeout,
    Degraded,
}

impl Health {
    pub fn routable(self) -> bool {
        !matches!(self, Health::Unhealthy | Health::Draining | Health::Timeout)
    }
}

/// Why a configuration was refused; names the part that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
}

impl Config {
    /// Checks what the types cannot: names are unique and every referenced cluster exists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: String, why: &str| ConfigError::Invalid {
            what,
            why: why.to_owned(),
        };
        let mut names = std::collections::HashSet::new();
        for l in self.listeners.iter().chain(&self.inbound) {
            if !names.insert(&l.name) {
                return Err(invalid(format!("listener {}", l.name), "duplicate name"));
            }
            for chain in &l.filter_chains {
                let what = || format!("listener {} filter chain {}", l.name, chain.name);
                for target in chain.filter.targets() {
                    if let Target::Weighted(w) = target
                        && (w.is_empty() || w.iter().all(|(_, weight)| *weight == 0))
                    {
                        return Err(invalid(what(), "weighted clusters need a positive weight"));
                    }
                    for cluster in target.clusters() {
                        if !self.clusters.contains_key(cluster) {
                            return Err(invalid(what(), &format!("unknown cluster {cluster:?}")));
                        }
                    }
                }
            }
        }
        for c in self.clusters.values() {
            let what = || format!("cluster {}", c.name);
            if c.connections_per_endpoint == 0 {
                return Err(invalid(
                    what(),
                    "connections_per_endpoint must be at least 1",
                ));
            }
            if matches!(c.lb_policy, LbPolicy::RingHash | LbPolicy::Maglev)
                && c.hash_header.is_none()
            {
                return Err(invalid(what(), "ring_hash and maglev need hash_header"));
            }
        }
        Ok(())
    }
}
