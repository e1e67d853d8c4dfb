//! tern's configuration model: listeners, filter chains, Thrift routes, clusters, endpoints.
//!
//! Both sources produce the same [`Config`]: the static file ([`file`], `tern run --config`)
//! and, later, the xDS client. A `Config` is validated once, then immutable; the proxy swaps
//! whole snapshots atomically ([`crate::state`]), so a broken update is refused while the
//! last good configuration keeps serving, and the data path never takes a lock to read it.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use ipnet::IpNet;

use crate::thrift::{Protocol, Transport};

pub mod file;
pub mod matcher;
pub mod rbac;
pub mod tls;

pub use tls::{DownstreamTls, TransportSockets, UpstreamTls};

/// Everything the data path routes with.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Config {
    /// A label for this configuration (file hash or xDS version).
    pub version: String,
    /// Outbound listeners, matched against a connection's original destination. Shared, so
    /// a new configuration that keeps a listener does not copy it, and one that keeps them
    /// all (an EDS push) shares the list.
    pub listeners: Arc<[Arc<Listener>]>,
    /// The inbound listener's filter chains (Istio's `virtualInbound`), if any; shared as
    /// the outbound ones are, so an update that keeps it neither copies nor compares it.
    pub inbound: Option<Arc<Listener>>,
    /// What inbound connections get while no inbound listener is in force.
    pub no_inbound: NoInbound,
    /// What happens to outbound destinations no listener matches.
    pub passthrough: Passthrough,
    /// Shared, so a new configuration that keeps a cluster does not copy it, and the
    /// snapshot keeps its picker and pools (see [`crate::state`]).
    pub clusters: ClusterMap,
    /// What the control plane sent that tern knowingly does not run (shown, and counted).
    pub set_aside: Vec<SetAside>,
}

/// Clusters by name: a persistent map, so a configuration that changes one cluster of
/// 10,000 shares the rest with the one before (a clone costs nothing, a change copies one
/// path of the tree), and names are shared, never copied.
pub type ClusterMap = imbl::OrdMap<Arc<str>, Arc<Cluster>>;

/// A resource, or part of one, that tern knowingly does not run as configured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SetAside {
    /// `listener`, `filter_chain` (`<listener>/<chain>`) or `cluster`.
    pub kind: &'static str,
    pub name: String,
    pub reason: SetAsideReason,
    /// The filter that made it so, where one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

/// Why something is set aside, and what becomes of its traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SetAsideReason {
    /// An Envoy internal listener (HBONE's `connect_originate`, `main_internal`): no address
    /// a connection can reach.
    InternalListener,
    /// A listener bound to a port of its own (HBONE's `connect_terminate` on 15008); tern
    /// serves only 15001 and 15006.
    BoundListener,
    /// An HTTP connection manager chain: its connections are relayed to their original
    /// destination as TCP, after its RBAC (decided on the connection, see
    /// `xds::translate::rbac`).
    Http,
    /// A filter whose configuration comes from ECDS: its chain's connections are refused.
    Ecds,
    /// A filter tern cannot run and must not skip (ext_authz, jwt_authn, Wasm, Lua, or any
    /// filter tern does not know): its chain's connections are refused.
    Unenforceable,
    /// A chain with no filter tern runs: skipped.
    NoFilter,
    /// A DNS cluster (STRICT_DNS, LOGICAL_DNS): tern does not resolve it; no endpoints.
    DnsCluster,
    /// A custom cluster type (aggregate, dynamic forward proxy): no endpoints.
    CustomCluster,
}

impl SetAsideReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SetAsideReason::InternalListener => "internal_listener",
            SetAsideReason::BoundListener => "bound_listener",
            SetAsideReason::Http => "http",
            SetAsideReason::Ecds => "ecds",
            SetAsideReason::Unenforceable => "unenforceable_filter",
            SetAsideReason::NoFilter => "no_filter",
            SetAsideReason::DnsCluster => "dns_cluster",
            SetAsideReason::CustomCluster => "custom_cluster",
        }
    }
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

/// Inbound connections when no inbound listener is in force.
///
/// Only a configuration without a control plane relays them to the application: with a
/// control plane, inbound policy is the control plane's, so until an inbound listener it
/// sent is in force (first start, a control plane slow or unreachable, a listener refused)
/// every inbound connection is refused, as Envoy's unbound 15006 refuses them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoInbound {
    /// Relay to the application: no control plane, and the static configuration has no
    /// inbound listener.
    #[default]
    Passthrough,
    /// Refused: no inbound listener from the control plane yet.
    AwaitingPolicy,
    /// Refused: the control plane's inbound listener was refused (its reason is in the NACK,
    /// the log and `/config_dump`).
    Refused,
}

impl NoInbound {
    pub fn as_str(self) -> &'static str {
        match self {
            NoInbound::Passthrough => "passthrough",
            NoInbound::AwaitingPolicy => "awaiting_policy",
            NoInbound::Refused => "inbound_listener_refused",
        }
    }
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
    /// TLS terminated before the filter sees the bytes.
    pub tls: Option<Arc<DownstreamTls>>,
    /// Network RBAC filters, in order: every one must allow a connection.
    pub rbac: Vec<Arc<rbac::Rbac>>,
    pub filter: Filter,
}

/// Envoy's `filter_chain_match`, the parts tern uses. Empty lists match anything.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ChainMatch {
    pub destination_port: Option<u16>,
    pub destination_prefixes: Vec<IpNet>,
    pub source_prefixes: Vec<IpNet>,
    /// `raw_buffer` or `tls`.
    pub transport_protocol: Option<String>,
    /// ALPN (TLS) or the detected protocol (`http/1.1`, `h2c`) of plaintext.
    pub application_protocols: Vec<String>,
    /// TLS SNI: exact names or `*.suffix` wildcards.
    pub server_names: Vec<String>,
    /// The listener's default chain: used when no other chain matches.
    pub default_chain: bool,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Filter {
    /// Relay bytes to a cluster; `sniff_thrift` (on unless configured off) upgrades a
    /// connection whose client speaks Thrift first to per-request balancing, with the TCP
    /// proxy's cluster as the default route.
    TcpProxy {
        target: Target,
        sniff_thrift: bool,
        /// A relayed connection with no bytes either way for this long is closed (`None`:
        /// never; Envoy's and Istio's default is 1 h).
        idle_timeout: Option<Duration>,
    },
    Thrift(ThriftProxy),
    /// Relay to the original destination (a chain set aside whose traffic still flows, such
    /// as HTTP).
    Passthrough,
    /// Close the connection (a chain set aside that must not fail open, such as one whose
    /// filter comes from ECDS).
    Refuse,
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
            Filter::Passthrough | Filter::Refuse => Vec::new(),
        }
    }
}

/// Multiplexed connections per endpoint unless a cluster says otherwise.
pub const DEFAULT_CONNECTIONS_PER_ENDPOINT: usize = 4;

/// How long an upstream connection stays open unused (Envoy's default idle timeout: 1 h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where traffic goes: one cluster, or several by weight.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Target {
    Cluster(String),
    Weighted(Vec<(String, u32)>),
}

impl Target {
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

impl LbPolicy {
    /// Whether the policy picks by a hash key (ring hash, Maglev).
    pub fn hashes(self) -> bool {
        matches!(self, LbPolicy::RingHash | LbPolicy::Maglev)
    }
}

/// `Eq`, so an `Arc<Cluster>` compares by pointer before content: a diff of two snapshots'
/// clusters passes over the shared ones without reading them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cluster {
    pub name: String,
    pub lb_policy: LbPolicy,
    /// Ring hash and Maglev: the THeader header whose value is a Thrift request's key
    /// (requests without it use the source IP, as TCP connections always do).
    pub hash_header: Option<String>,
    /// Ring hash and Maglev table sizes.
    pub hash_table: HashTable,
    /// Shared with the xDS store that received them, so a cluster holds no copy of its own.
    pub endpoints: Arc<[Endpoint]>,
    /// Weight of each locality within a priority (missing ones weigh 1).
    pub locality_weights: Arc<BTreeMap<Arc<str>, u32>>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub circuit_breakers: CircuitBreakers,
    /// Off unless the cluster asks for it (Envoy's default).
    pub outlier: Option<OutlierDetection>,
    /// How Thrift requests use upstream connections.
    pub upstream: UpstreamMode,
    /// Multiplexed connections per endpoint (per transport and protocol, per worker); a new
    /// one opens when every open one has 8 requests waiting, up to this many (default 4).
    /// Exclusive connections grow to `max_connections` instead.
    pub connections_per_endpoint: usize,
    /// Idle upstream connections close after this long.
    pub idle_timeout: Duration,
    /// Connects to the original destination instead of endpoints (Istio's passthrough).
    pub original_dst: bool,
    /// TLS or plaintext, per endpoint.
    pub transport: TransportSockets,
    /// The service it stands for, for Istio's metrics.
    pub service: Option<Arc<ServiceRef>>,
}

/// A Kubernetes service: Istio's `istio.services` cluster metadata, else the host in an
/// `outbound|<port>|<subset>|<host>` cluster name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceRef {
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceRef {
    /// From a host `name.namespace.svc…` (a host of another shape has no namespace).
    pub fn from_host(host: &str) -> Self {
        let mut labels = host.split('.');
        let name = labels.next().unwrap_or_default().to_owned();
        let namespace = labels.next().unwrap_or_default().to_owned();
        Self {
            host: host.to_owned(),
            name,
            namespace,
        }
    }

    /// From istiod's cluster name `outbound|<port>|<subset>|<host>`.
    pub fn from_cluster_name(cluster: &str) -> Option<Self> {
        let mut parts = cluster.split('|');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("outbound" | "inbound"), Some(_), Some(_), Some(host)) if !host.is_empty() => {
                Some(Self::from_host(host))
            }
            _ => None,
        }
    }
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

/// Envoy's consecutive-error outlier detection. Gateway errors are failures to connect,
/// connections lost mid-request, and timeouts; 5xx errors are those plus `TApplicationException`
/// replies. Success-rate and failure-percentage ejection are not implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx errors that eject an endpoint (0 disables).
    pub consecutive_5xx: u32,
    /// Percent chance such an ejection is enforced.
    pub enforcing_consecutive_5xx: u32,
    /// Consecutive gateway errors that eject an endpoint (0 disables).
    pub consecutive_gateway_failure: u32,
    /// Percent chance such an ejection is enforced (Envoy's default: 0, never).
    pub enforcing_consecutive_gateway_failure: u32,
    /// How long the first ejection lasts; the nth lasts n times longer, up to `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this percent of a cluster's endpoints are ejected at once (at least one can be).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    /// Envoy's defaults.
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            enforcing_consecutive_5xx: 100,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_gateway_failure: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// Envoy's ring hash and Maglev sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HashTable {
    pub minimum_ring_size: u64,
    pub maximum_ring_size: u64,
    /// Maglev's table size (a prime).
    pub maglev_table_size: u64,
}

impl Default for HashTable {
    fn default() -> Self {
        Self {
            minimum_ring_size: 1024,
            maximum_ring_size: 8 * 1024 * 1024,
            maglev_table_size: 65_537,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub priority: u32,
    /// `region/zone/subzone`, shared by the endpoints of a locality.
    pub locality: Arc<str>,
    pub health: Health,
    /// What the control plane says of it (shared by the endpoints that have the same).
    pub metadata: Option<Arc<EndpointMetadata>>,
}

/// An endpoint's metadata that tern uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EndpointMetadata {
    /// `envoy.transport_socket_match` (Istio's `tlsMode`): picks TLS or plaintext.
    pub socket_match: Vec<(String, String)>,
    /// Istio's `istio.workload`: `name;namespace;canonical name;revision;cluster`.
    pub workload: Option<String>,
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
    /// Whether some connection it describes presents the workload certificate: a cluster's
    /// TLS (Istio's auto-mTLS) or a chain terminating TLS with it.
    pub fn needs_workload_certificate(&self) -> bool {
        let workload = |c: &tls::CertSource| *c == tls::CertSource::Workload;
        let chains = self
            .listeners
            .iter()
            .chain(&self.inbound)
            .flat_map(|l| &l.filter_chains)
            .filter_map(|c| c.tls.as_ref());
        let clusters = self.clusters.values().flat_map(|c| {
            c.transport
                .matches
                .iter()
                .filter_map(|m| m.tls.as_ref())
                .chain(&c.transport.default)
        });
        chains.map(|t| &t.cert).any(workload)
            || clusters
                .filter_map(|t| t.client_cert.as_ref())
                .any(workload)
    }

    /// Checks what the types cannot: names are unique and every referenced cluster exists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: String, why: &str| ConfigError::Invalid {
            what,
            why: why.to_owned(),
        };
        let mut names = std::collections::HashSet::new();
        for l in self
            .listeners
            .iter()
            .map(|l| &**l)
            .chain(self.inbound.as_deref())
        {
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
        }
        Ok(())
    }
}
