//! The static configuration file (`tern run --config FILE`, YAML or JSON), shaped after
//! Envoy's resources with the names flattened. Unknown fields are refused, so a typo is an
//! error and not a silently ignored setting.
//!
//! ```yaml
//! passthrough: allow            # or deny: unmatched outbound destinations
//! listeners:
//!   - name: 10.96.0.10_9090
//!     address: 10.96.0.10:9090  # 0.0.0.0:9090 matches any address on the port
//!     filter_chains:
//!       - thrift_proxy:
//!           routes:
//!             - match: { method: add }
//!               route: { cluster: calc-v2 }
//!               timeout_ms: 200
//!           default_cluster: calc
//! clusters:
//!   - name: calc
//!     lb_policy: round_robin    # least_request, random, ring_hash, maglev
//!     endpoints:
//!       - { address: 10.0.0.1:9090, weight: 1, priority: 0, locality: zone-a, health: healthy }
//! ```
use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    ChainMatch, CircuitBreakers, Cluster, Config, ConfigError, Endpoint, Filter, FilterChain,
    HashTable, Health, LbPolicy, Listener, NoInbound, OutlierDetection, Passthrough, Route,
    RouteAction, RouteMatch, Target, ThriftProxy, UpstreamMode,
};
use crate::thrift::{Protocol, Transport};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    passthrough: Passthrough,
    #[serde(default)]
    listeners: Vec<ListenerFile>,
    #[serde(default)]
    inbound: Option<InboundFile>,
    #[serde(default)]
    clusters: Vec<ClusterFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFile {
    name: Option<String>,
    address: SocketAddr,
    filter_chains: Vec<ChainFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InboundFile {
    filter_chains: Vec<ChainFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainFile {
    name: Option<String>,
    #[serde(default, rename = "match")]
    matcher: ChainMatchFile,
    tcp_proxy: Option<TcpProxyFile>,
    thrift_proxy: Option<ThriftProxyFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainMatchFile {
    destination_port: Option<u16>,
    #[serde(default)]
    destination_prefixes: Vec<IpNet>,
    #[serde(default)]
    source_prefixes: Vec<IpNet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    cluster: Option<String>,
    weighted_clusters: Option<Vec<WeightedFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedFile {
    name: String,
    weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpProxyFile {
    #[serde(flatten)]
    target: TargetFile,
    /// Look at the client's first bytes and balance Thrift per request (default on).
    sniff_thrift: Option<bool>,
    /// Milliseconds a relayed connection may stay silent both ways (default 1 h; 0: forever).
    idle_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThriftProxyFile {
    transport: Option<AutoOr<Transport>>,
    protocol: Option<AutoOr<Protocol>>,
    #[serde(default)]
    routes: Vec<RouteFile>,
    default_cluster: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AutoOr<T> {
    Auto(AutoWord),
    Is(T),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AutoWord {
    Auto,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    #[serde(default, rename = "match")]
    matcher: RouteMatchFile,
    route: RouteActionFile,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteMatchFile {
    method: Option<String>,
    service: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    invert: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteActionFile {
    #[serde(flatten)]
    target: TargetFile,
    cluster_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    name: String,
    #[serde(default)]
    lb_policy: LbPolicy,
    hash_header: Option<String>,
    #[serde(default)]
    endpoints: Vec<EndpointFile>,
    #[serde(default)]
    locality_weights: BTreeMap<String, u32>,
    timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    circuit_breakers: CircuitBreakersFile,
    /// Off unless present (Envoy's default).
    outlier_detection: Option<OutlierFile>,
    connections_per_endpoint: Option<usize>,
    /// `exclusive` (default) or `multiplexed`.
    #[serde(default)]
    thrift_upstream: UpstreamMode,
    idle_timeout_ms: Option<u64>,
    #[serde(default)]
    original_dst: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CircuitBreakersFile {
    max_connections: Option<usize>,
    max_pending_requests: Option<usize>,
    max_requests: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutlierFile {
    /// Consecutive errors (5xx) that eject an endpoint.
    consecutive_errors: Option<u32>,
    consecutive_gateway_failure: Option<u32>,
    enforcing_consecutive_gateway_failure: Option<u32>,
    base_ejection_ms: Option<u64>,
    max_ejection_ms: Option<u64>,
    max_ejection_percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    address: SocketAddr,
    weight: Option<u32>,
    #[serde(default)]
    priority: u32,
    #[serde(default)]
    locality: String,
    #[serde(default)]
    health: Health,
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text, &shown)
}

/// Parses and validates configuration text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let file: File = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
        path: origin.to_owned(),
        source,
    })?;
    let config = convert(file, version_of(text))?;
    config.validate()?;
    Ok(config)
}

/// The version a configuration text gets: a hash of it.
pub fn version_of(text: &str) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    format!("file-{:016x}", h.finish())
}

fn convert(file: File, version: String) -> Result<Config, ConfigError> {
    let listeners = file
        .listeners
        .into_iter()
        .map(|l| {
            let name = l
                .name
                .unwrap_or_else(|| format!("{}_{}", l.address.ip(), l.address.port()));
            let filter_chains = chains(&name, l.filter_chains)?;
            Ok(Arc::new(Listener {
                name,
                address: l.address,
                filter_chains,
            }))
        })
        .collect::<Result<_, ConfigError>>()?;
    let inbound = file
        .inbound
        .map(|i| {
            Ok::<_, ConfigError>(Arc::new(Listener {
                name: "virtualInbound".into(),
                address: SocketAddr::from(([0, 0, 0, 0], 0)),
                filter_chains: chains("virtualInbound", i.filter_chains)?,
            }))
        })
        .transpose()?;
    let clusters = file
        .clusters
        .into_iter()
        .map(|c| (Arc::from(c.name.as_str()), Arc::new(cluster(c))))
        .collect();
    Ok(Config {
        version,
        listeners,
        inbound,
        no_inbound: NoInbound::Passthrough,
        passthrough: file.passthrough,
        clusters,
        set_aside: Vec::new(),
    })
}

fn chains(listener: &str, files: Vec<ChainFile>) -> Result<Vec<FilterChain>, ConfigError> {
    files
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let name = c.name.unwrap_or_else(|| format!("{listener}#{i}"));
            let what = || format!("listener {listener} filter chain {name}");
            let filter = match (c.tcp_proxy, c.thrift_proxy) {
                (Some(tcp), None) => {
                    let target = target(tcp.target, &what)?;
                    Filter::TcpProxy {
                        target,
                        sniff_thrift: tcp.sniff_thrift.unwrap_or(true),
                        idle_timeout: match tcp.idle_timeout_ms {
                            Some(0) => None,
                            Some(ms) => Some(Duration::from_millis(ms)),
                            None => Some(super::DEFAULT_IDLE_TIMEOUT),
                        },
                    }
                }
                (None, Some(t)) => Filter::Thrift(ThriftProxy {
                    transport: t.transport.and_then(AutoOr::value),
                    protocol: t.protocol.and_then(AutoOr::value),
                    routes: t
                        .routes
                        .into_iter()
                        .map(|r| route(r, &what))
                        .collect::<Result<_, _>>()?,
                    default_target: t.default_cluster.map(Target::Cluster),
                }),
                _ => {
                    return Err(ConfigError::Invalid {
                        what: what(),
                        why: "needs exactly one of tcp_proxy and thrift_proxy".into(),
                    });
                }
            };
            Ok(FilterChain {
                name: name.clone(),
                tls: None,
                rbac: Vec::new(),
                matcher: ChainMatch {
                    destination_port: c.matcher.destination_port,
                    destination_prefixes: c.matcher.destination_prefixes,
                    source_prefixes: c.matcher.source_prefixes,
                    ..ChainMatch::default()
                },
                filter,
            })
        })
        .collect()
}

impl<T> AutoOr<T> {
    fn value(self) -> Option<T> {
        match self {
            AutoOr::Auto(AutoWord::Auto) => None,
            AutoOr::Is(v) => Some(v),
        }
    }
}

fn target(t: TargetFile, what: &dyn Fn() -> String) -> Result<Target, ConfigError> {
    match (t.cluster, t.weighted_clusters) {
        (Some(c), None) => Ok(Target::Cluster(c)),
        (None, Some(w)) => Ok(Target::Weighted(
            w.into_iter().map(|w| (w.name, w.weight)).collect(),
        )),
        _ => Err(ConfigError::Invalid {
            what: what(),
            why: "needs exactly one of cluster and weighted_clusters".into(),
        }),
    }
}

fn route(r: RouteFile, what: &dyn Fn() -> String) -> Result<Route, ConfigError> {
    let action = match r.route.cluster_header {
        Some(h)
            if r.route.target.cluster.is_none() && r.route.target.weighted_clusters.is_none() =>
        {
            RouteAction::ClusterHeader(h)
        }
        Some(_) => {
            return Err(ConfigError::Invalid {
                what: what(),
                why: "a route has one of cluster, weighted_clusters and cluster_header".into(),
            });
        }
        None => RouteAction::Target(target(r.route.target, what)?),
    };
    Ok(Route {
        matcher: RouteMatch {
            method: r.matcher.method,
            service: r.matcher.service,
            headers: r.matcher.headers.into_iter().collect(),
            invert: r.matcher.invert,
        },
        action,
        timeout: r.timeout_ms.map(Duration::from_millis),
    })
}

fn cluster(c: ClusterFile) -> Cluster {
    let defaults = CircuitBreakers::default();
    let outlier = OutlierDetection::default();
    Cluster {
        transport: Default::default(),
        service: crate::config::ServiceRef::from_cluster_name(&c.name).map(Arc::new),
        lb_policy: c.lb_policy,
        hash_header: c.hash_header,
        hash_table: HashTable::default(),
        endpoints: c
            .endpoints
            .into_iter()
            .map(|e| Endpoint {
                address: e.address,
                weight: e.weight.unwrap_or(1).max(1),
                priority: e.priority,
                locality: e.locality.into(),
                health: e.health,
                metadata: None,
            })
            .collect(),
        locality_weights: Arc::new(
            c.locality_weights
                .into_iter()
                .map(|(l, w)| (Arc::from(l), w))
                .collect(),
        ),
        request_timeout: Duration::from_millis(c.timeout_ms.unwrap_or(15_000)),
        connect_timeout: Duration::from_millis(c.connect_timeout_ms.unwrap_or(1_000)),
        circuit_breakers: CircuitBreakers {
            max_connections: c
                .circuit_breakers
                .max_connections
                .unwrap_or(defaults.max_connections),
            max_pending_requests: c
                .circuit_breakers
                .max_pending_requests
                .unwrap_or(defaults.max_pending_requests),
            max_requests: c
                .circuit_breakers
                .max_requests
                .unwrap_or(defaults.max_requests),
        },
        outlier: c.outlier_detection.map(|o| OutlierDetection {
            consecutive_5xx: o.consecutive_errors.unwrap_or(outlier.consecutive_5xx),
            consecutive_gateway_failure: o
                .consecutive_gateway_failure
                .unwrap_or(outlier.consecutive_gateway_failure),
            enforcing_consecutive_gateway_failure: o
                .enforcing_consecutive_gateway_failure
                .unwrap_or(outlier.enforcing_consecutive_gateway_failure),
            base_ejection: o
                .base_ejection_ms
                .map_or(outlier.base_ejection, Duration::from_millis),
            max_ejection: o
                .max_ejection_ms
                .map_or(outlier.max_ejection, Duration::from_millis),
            max_ejection_percent: o
                .max_ejection_percent
                .unwrap_or(outlier.max_ejection_percent),
            ..outlier
        }),
        upstream: c.thrift_upstream,
        connections_per_endpoint: c
            .connections_per_endpoint
            .unwrap_or(super::DEFAULT_CONNECTIONS_PER_ENDPOINT),
        idle_timeout: c
            .idle_timeout_ms
            .map_or(super::DEFAULT_IDLE_TIMEOUT, Duration::from_millis),
        original_dst: c.original_dst,
        name: c.name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listeners:
  - address: 10.96.0.10:9090
    filter_chains:
      - thrift_proxy:
          transport: auto
          protocol: compact
          routes:
            - match: { method: add, headers: { x-version: v2 } }
              route: { weighted_clusters: [ { name: calc, weight: 1 }, { name: calc-v2, weight: 3 } ] }
              timeout_ms: 200
            - match: { service: Admin }
              route: { cluster_header: x-cluster }
          default_cluster: calc
  - name: db
    address: 0.0.0.0:5432
    filter_chains:
      - match: { destination_prefixes: [ 10.0.0.0/8 ] }
        tcp_proxy: { cluster: calc }
clusters:
  - name: calc
    endpoints:
      - { address: 10.0.0.1:9090 }
      - { address: 10.0.0.2:9090, weight: 3, health: draining }
  - name: calc-v2
    lb_policy: ring_hash
    hash_header: x-user
    timeout_ms: 50
"#;

    #[test]
    fn parses_the_documented_shape() {
        let c = parse(EXAMPLE, "example").unwrap();
        assert_eq!(c.listeners[0].name, "10.96.0.10_9090");
        let Filter::Thrift(t) = &c.listeners[0].filter_chains[0].filter else {
            panic!("a thrift proxy");
        };
        assert_eq!((t.transport, t.protocol), (None, Some(Protocol::Compact)));
        assert_eq!(t.routes[0].timeout, Some(Duration::from_millis(200)));
        assert_eq!(
            t.routes[1].action,
            RouteAction::ClusterHeader("x-cluster".into())
        );
        assert_eq!(c.clusters["calc"].endpoints[1].health, Health::Draining);
        assert_eq!(
            c.clusters["calc-v2"].request_timeout,
            Duration::from_millis(50)
        );
        assert!(matches!(
            c.listeners[1].filter_chains[0].filter,
            Filter::TcpProxy {
                sniff_thrift: true,
                ..
            }
        ));
    }

    #[test]
    fn refuses_what_cannot_work_and_says_where() {
        let unknown = EXAMPLE.replace("default_cluster: calc", "default_cluster: nowhere");
        let err = parse(&unknown, "x").unwrap_err().to_string();
        assert!(err.contains("unknown cluster \"nowhere\""), "{err}");
        assert!(err.contains("10.96.0.10_9090"), "{err}");

        let typo = EXAMPLE.replace("lb_policy: ring_hash", "lb_polcy: ring_hash");
        let err = parse(&typo, "x").unwrap_err().to_string();
        assert!(err.contains("lb_polcy"), "{err}");

        // Without a header to hash, ring hash keys on the client's source IP (Istio's
        // `useSourceIp`), as over xDS.
        let no_key = EXAMPLE.replace("    hash_header: x-user\n", "");
        let c = parse(&no_key, "x").unwrap();
        assert_eq!(c.clusters["calc-v2"].hash_header, None);
    }

    #[test]
    fn every_tcp_proxy_detects_thrift_unless_told_not_to() {
        let c = parse(
            "listeners: [{address: '0.0.0.0:9090', filter_chains: [\
               {match: {destination_port: 1}, tcp_proxy: {cluster: echo}},\
               {tcp_proxy: {cluster: echo, sniff_thrift: false}}]}]\n\
             clusters: [{name: echo}]",
            "x",
        )
        .unwrap();
        let sniffs: Vec<bool> = c.listeners[0]
            .filter_chains
            .iter()
            .map(|chain| match chain.filter {
                Filter::TcpProxy { sniff_thrift, .. } => sniff_thrift,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(sniffs, [true, false]);
    }
}
