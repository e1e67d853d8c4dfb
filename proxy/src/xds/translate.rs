//! Envoy resources (as istiod or any Envoy control plane sends them) into tern's [`Config`].
//!
//! What istiod sends a sidecar, and what tern makes of it:
//! - `virtualOutbound` (`use_original_dst`, 0.0.0.0:15001) is tern's own outbound listener:
//!   only its default cluster is read — `BlackHoleCluster` means unknown destinations are
//!   refused (`REGISTRY_ONLY`), anything else relays them (`ALLOW_ANY`);
//! - `virtualInbound` supplies the inbound filter chains;
//! - every other listener (`<vip>_<port>`, `0.0.0.0_<port>`, bound to no port) is matched
//!   against original destinations, with its chains' `tcp_proxy` or `thrift_proxy` filter;
//!   filters tern does not run (Istio's metadata exchange, stats, RBAC, HTTP) are skipped, and
//!   a chain left without a usable filter is dropped with a debug log;
//! - clusters: EDS (endpoints from the `ClusterLoadAssignment` named by `service_name`, else
//!   the cluster name), STATIC (inline endpoints), ORIGINAL_DST (passthrough); load balancing
//!   policy, connect timeout, default-priority circuit breakers and outlier detection.
//!
//! A resource that cannot be used at all (an address that is not an IP, a weighted cluster
//! without weights) is an error naming it, which the xDS client turns into a NACK.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use tern_proto::{
    Any, Cluster as XdsCluster, ClusterLoadAssignment, Listener as XdsListener, TcpProxy,
    ThriftProxy as XdsThrift, ThriftRouteConfiguration, decode, type_url,
};
use tracing::debug;

use crate::{
    config::{
        ChainMatch, CircuitBreakers, Cluster, Config, Endpoint, Filter, FilterChain, Health,
        LbPolicy, Listener, OutlierDetection, Passthrough, Route, RouteAction, RouteMatch, Target,
        ThriftProxy, UpstreamMode,
    },
    thrift::{Protocol, Transport},
};

/// Every resource held from the control plane, decoded.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub listeners: BTreeMap<String, XdsListener>,
    pub clusters: BTreeMap<String, XdsCluster>,
    pub endpoints: BTreeMap<String, ClusterLoadAssignment>,
    pub thrift_routes: BTreeMap<String, ThriftRouteConfiguration>,
}

fn decode_all<T: prost::Message + Default>(
    raw: &BTreeMap<String, BTreeMap<String, Any>>,
    url: &'static str,
) -> Result<BTreeMap<String, T>, String> {
    raw.get(url)
        .into_iter()
        .flatten()
        .map(|(name, any)| {
            decode(any, url)
                .map(|r| (name.clone(), r))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect()
}

impl Resources {
    /// Decodes what the control plane sent, held as `Any` by type URL and name. Decoded
    /// resources are several times larger than their encoding, so they live only while a
    /// configuration is translated.
    pub fn decode(raw: &BTreeMap<String, BTreeMap<String, Any>>) -> Result<Self, String> {
        Ok(Self {
            listeners: decode_all(raw, type_url::LISTENER)?,
            clusters: decode_all(raw, type_url::CLUSTER)?,
            endpoints: decode_all(raw, type_url::CLUSTER_LOAD_ASSIGNMENT)?,
            thrift_routes: decode_all(raw, type_url::THRIFT_ROUTE_CONFIGURATION)?,
        })
    }

    /// The `ClusterLoadAssignment` names the EDS clusters ask for.
    pub fn eds_names(&self) -> impl Iterator<Item = String> + '_ {
        self.clusters
            .values()
            .filter(|c| discovery_type(c) == DiscoveryType::Eds)
            .map(eds_name)
    }

    /// The Thrift route configurations the listeners ask for by name (`trds`).
    pub fn trds_names(&self) -> impl Iterator<Item = String> + '_ {
        self.listeners.values().flat_map(|l| {
            l.filter_chains
                .iter()
                .chain(&l.default_filter_chain)
                .flat_map(|c| &c.filters)
                .filter_map(typed_config)
                .filter(|a| a.type_url == type_url::THRIFT_PROXY)
                .filter_map(|a| decode::<XdsThrift>(a, type_url::THRIFT_PROXY).ok())
                .filter_map(|t| t.trds.map(|r| r.route_config_name))
        })
    }

    /// Whether every EDS cluster has its endpoints (a cluster is used only once warm).
    pub fn warm(&self) -> bool {
        self.eds_names().all(|n| self.endpoints.contains_key(&n))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DiscoveryType {
    Static,
    Eds,
    OriginalDst,
    Other(i32),
}

fn discovery_type(c: &XdsCluster) -> DiscoveryType {
    use tern_proto::cluster_types::ClusterDiscoveryType;
    match c.cluster_discovery_type {
        None | Some(ClusterDiscoveryType::Type(0)) => DiscoveryType::Static,
        Some(ClusterDiscoveryType::Type(3)) => DiscoveryType::Eds,
        Some(ClusterDiscoveryType::Type(4)) => DiscoveryType::OriginalDst,
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::Other(t),
        Some(ClusterDiscoveryType::ClusterType(_)) => DiscoveryType::Other(-1),
    }
}

fn eds_name(c: &XdsCluster) -> String {
    c.eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| c.name.clone())
}

fn typed_config(f: &tern_proto::listener_types::Filter) -> Option<&Any> {
    match &f.config_type {
        Some(tern_proto::listener_types::filter::ConfigType::TypedConfig(any)) => Some(any),
        _ => None,
    }
}

fn socket_addr(a: Option<&tern_proto::Address>, what: &str) -> Result<SocketAddr, String> {
    use tern_proto::core_types::{address, socket_address::PortSpecifier};
    let Some(address::Address::SocketAddress(s)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(format!("{what}: no socket address"));
    };
    let ip: IpAddr = s
        .address
        .parse()
        .map_err(|_| format!("{what}: {:?} is not an IP address", s.address))?;
    let port = match s.port_specifier {
        Some(PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| format!("{what}: port {p} out of range"))?
        }
        _ => return Err(format!("{what}: no port number")),
    };
    Ok(SocketAddr::new(ip, port))
}

fn cidrs(ranges: &[tern_proto::core_types::CidrRange], what: &str) -> Result<Vec<IpNet>, String> {
    ranges
        .iter()
        .map(|r| {
            let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
                format!("{what}: prefix {:?} is not an IP address", r.address_prefix)
            })?;
            let len = r
                .prefix_len
                .map_or(if ip.is_ipv4() { 32 } else { 128 }, |l| l.value);
            // Checked, not cast: a prefix length of 264 must not become 8.
            u8::try_from(len)
                .ok()
                .and_then(|l| IpNet::new(ip, l).ok())
                .ok_or_else(|| {
                    format!(
                        "{what}: prefix {}/{len}: length out of range",
                        r.address_prefix
                    )
                })
        })
        .collect()
}

/// Builds tern's configuration from the resources held; `version` labels it.
pub fn to_config(r: &Resources, version: String) -> Result<Config, String> {
    let mut config = Config {
        version,
        ..Config::default()
    };
    for l in r.listeners.values() {
        let what = format!("listener {}", l.name);
        if l.use_original_dst.is_some_and(|b| b.value) {
            let default = l
                .default_filter_chain
                .as_ref()
                .and_then(|c| chain_filter(c, r, &what).ok().flatten());
            if let Some(Filter::TcpProxy {
                target: Target::Cluster(c),
                ..
            }) = default
                && c == "BlackHoleCluster"
            {
                config.passthrough = Passthrough::Deny;
            }
            continue;
        }
        let address = socket_addr(l.address.as_ref(), &what)?;
        let mut chains = Vec::new();
        for (i, c) in l.filter_chains.iter().enumerate() {
            let name = if c.name.is_empty() {
                format!("{}#{i}", l.name)
            } else {
                c.name.clone()
            };
            let what = format!("{what} filter chain {name}");
            let Some(filter) = chain_filter(c, r, &what)? else {
                debug!(chain = %what, "no tcp_proxy or thrift_proxy filter: chain skipped");
                continue;
            };
            let m = c.filter_chain_match.clone().unwrap_or_default();
            let destination_port = m
                .destination_port
                .map(|p| {
                    u16::try_from(p.value)
                        .map_err(|_| format!("{what}: destination port {} out of range", p.value))
                })
                .transpose()?;
            chains.push(FilterChain {
                name,
                matcher: ChainMatch {
                    destination_port,
                    destination_prefixes: cidrs(&m.prefix_ranges, &what)?,
                    source_prefixes: cidrs(&m.source_prefix_ranges, &what)?,
                },
                filter,
            });
        }
        let listener = Listener {
            name: l.name.clone(),
            address,
            filter_chains: chains,
        };
        if l.name == "virtualInbound" {
            config.inbound = Some(listener);
        } else {
            config.listeners.push(listener);
        }
    }
    for c in r.clusters.values() {
        config.clusters.insert(c.name.clone(), cluster(c, r)?);
    }
    // References to clusters the control plane has not sent (yet) are dropped, as Envoy
    // would treat them as missing clusters, rather than refusing the whole update.
    for l in config.listeners.iter_mut().chain(config.inbound.as_mut()) {
        l.filter_chains.retain(|chain| {
            let known = chain
                .filter
                .targets()
                .into_iter()
                .flat_map(Target::clusters)
                .all(|c| config.clusters.contains_key(c));
            if !known {
                debug!(chain = %chain.name, "references an unknown cluster: skipped");
            }
            known
        });
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// The first filter of a chain that tern runs, translated.
fn chain_filter(
    c: &tern_proto::listener_types::FilterChain,
    r: &Resources,
    what: &str,
) -> Result<Option<Filter>, String> {
    for f in &c.filters {
        let Some(any) = typed_config(f) else { continue };
        match any.type_url.as_str() {
            type_url::TCP_PROXY => {
                let t: TcpProxy =
                    decode(any, type_url::TCP_PROXY).map_err(|e| format!("{what}: {e}"))?;
                // istiod's names never say Thrift: every tcp_proxy looks at the bytes.
                let target = tcp_target(&t, what)?;
                return Ok(Some(Filter::TcpProxy {
                    target,
                    sniff_thrift: true,
                }));
            }
            type_url::THRIFT_PROXY => {
                let t: XdsThrift =
                    decode(any, type_url::THRIFT_PROXY).map_err(|e| format!("{what}: {e}"))?;
                return thrift(&t, r, what).map(|t| t.map(Filter::Thrift));
            }
            other => {
                debug!(filter = %f.name, type_url = %other, "filter tern does not run: skipped")
            }
        }
    }
    Ok(None)
}

fn tcp_target(t: &TcpProxy, what: &str) -> Result<Target, String> {
    use tern_proto::tcp_proxy_types::ClusterSpecifier;
    match &t.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => Ok(Target::Cluster(c.clone())),
        Some(ClusterSpecifier::WeightedClusters(w)) => Ok(Target::Weighted(
            w.clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight))
                .collect(),
        )),
        None => Err(format!("{what}: tcp_proxy without a cluster")),
    }
}

/// A thrift_proxy filter; `None` while its `trds` route configuration has not arrived.
fn thrift(t: &XdsThrift, r: &Resources, what: &str) -> Result<Option<ThriftProxy>, String> {
    use tern_proto::thrift_types::{route_action::ClusterSpecifier, route_match::MatchSpecifier};
    let routes = match (&t.route_config, &t.trds) {
        (Some(rc), _) => rc,
        (None, Some(trds)) => match r.thrift_routes.get(&trds.route_config_name) {
            Some(rc) => rc,
            None => return Ok(None),
        },
        (None, None) => return Err(format!("{what}: thrift_proxy without routes")),
    };
    let transport = match t.transport {
        1 => Some(Transport::Framed),
        2 => Some(Transport::Unframed),
        3 => Some(Transport::Header),
        _ => None,
    };
    let protocol = match t.protocol {
        1 | 2 => Some(Protocol::Binary),
        3 => Some(Protocol::Compact),
        4 => return Err(format!("{what}: the Twitter protocol is not supported")),
        _ => None,
    };
    let mut out = Vec::new();
    for route in &routes.routes {
        let m = route.r#match.clone().unwrap_or_default();
        let (method, service) = match m.match_specifier {
            Some(MatchSpecifier::MethodName(n)) => (Some(n).filter(|n| !n.is_empty()), None),
            Some(MatchSpecifier::ServiceName(s)) => {
                (None, Some(s.trim_end_matches(':').to_owned()))
            }
            None => (None, None),
        };
        let headers = m
            .headers
            .iter()
            .map(|h| header_exact(h, what))
            .collect::<Result<_, _>>()?;
        let action = match route
            .route
            .as_ref()
            .and_then(|a| a.cluster_specifier.clone())
        {
            Some(ClusterSpecifier::Cluster(c)) => RouteAction::Target(Target::Cluster(c)),
            Some(ClusterSpecifier::WeightedClusters(w)) => RouteAction::Target(Target::Weighted(
                w.clusters
                    .iter()
                    .map(|c| (c.name.clone(), c.weight.map_or(0, |w| w.value)))
                    .collect(),
            )),
            Some(ClusterSpecifier::ClusterHeader(h)) => RouteAction::ClusterHeader(h),
            None => return Err(format!("{what}: a route without a cluster")),
        };
        out.push(Route {
            matcher: RouteMatch {
                method,
                service,
                headers,
                invert: m.invert,
            },
            action,
            timeout: None,
        });
    }
    Ok(Some(ThriftProxy {
        transport,
        protocol,
        routes: out,
        default_target: None,
    }))
}

fn header_exact(
    h: &tern_proto::route_types::HeaderMatcher,
    what: &str,
) -> Result<(String, String), String> {
    use tern_proto::route_types::header_matcher::HeaderMatchSpecifier;
    #[allow(deprecated)]
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::ExactMatch(v)) => v.clone(),
        Some(HeaderMatchSpecifier::StringMatch(s)) => match &s.match_pattern {
            Some(tern_proto::matcher_types::string_matcher::MatchPattern::Exact(v)) => v.clone(),
            _ => {
                return Err(format!(
                    "{what}: header {} uses a match tern does not support (only exact)",
                    h.name
                ));
            }
        },
        _ => {
            return Err(format!(
                "{what}: header {} uses a match tern does not support (only exact)",
                h.name
            ));
        }
    };
    Ok((h.name.clone(), value))
}

fn cluster(c: &XdsCluster, r: &Resources) -> Result<Cluster, String> {
    let what = format!("cluster {}", c.name);
    let (endpoints, locality_weights, original_dst) = match discovery_type(c) {
        DiscoveryType::Eds => match r.endpoints.get(&eds_name(c)) {
            Some(cla) => endpoints(cla, &what)?,
            None => (Vec::new(), BTreeMap::new(), false),
        },
        DiscoveryType::Static => match &c.load_assignment {
            Some(cla) => endpoints(cla, &what)?,
            None => (Vec::new(), BTreeMap::new(), false),
        },
        DiscoveryType::OriginalDst => (Vec::new(), BTreeMap::new(), true),
        // DNS clusters (ServiceEntries with DNS resolution) stay, without endpoints: requests
        // to them get a local reply rather than the whole update being refused.
        DiscoveryType::Other(t) => {
            debug!(cluster = %c.name, discovery_type = t, "cluster type tern does not resolve: no endpoints");
            (Vec::new(), BTreeMap::new(), false)
        }
    };
    let lb_policy = match c.lb_policy {
        0 => LbPolicy::RoundRobin,
        1 => LbPolicy::LeastRequest,
        2 => LbPolicy::RingHash,
        3 => LbPolicy::Random,
        5 => LbPolicy::Maglev,
        // CLUSTER_PROVIDED (istiod's PassthroughCluster) and policies tern lacks: round robin.
        other => {
            if !original_dst {
                debug!(cluster = %c.name, lb_policy = other, "load balancing policy not supported: round robin");
            }
            LbPolicy::RoundRobin
        }
    };
    let defaults = CircuitBreakers::default();
    let thresholds = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0).cloned());
    let outlier = OutlierDetection::default();
    Ok(Cluster {
        name: c.name.clone(),
        lb_policy,
        hash_header: None,
        endpoints,
        locality_weights,
        request_timeout: Duration::from_secs(15),
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map_or(Duration::from_secs(10), duration),
        circuit_breakers: CircuitBreakers {
            max_connections: thresholds
                .as_ref()
                .and_then(|t| t.max_connections)
                .map_or(defaults.max_connections, |v| count(v.value)),
            max_pending_requests: thresholds
                .as_ref()
                .and_then(|t| t.max_pending_requests)
                .map_or(defaults.max_pending_requests, |v| count(v.value)),
            max_requests: thresholds
                .as_ref()
                .and_then(|t| t.max_requests)
                .map_or(defaults.max_requests, |v| count(v.value)),
        },
        outlier: match &c.outlier_detection {
            Some(o) => OutlierDetection {
                consecutive_errors: o
                    .consecutive_5xx
                    .map_or(outlier.consecutive_errors, |v| v.value),
                base_ejection: o
                    .base_ejection_time
                    .as_ref()
                    .map_or(outlier.base_ejection, duration),
            },
            None => outlier,
        },
        upstream: upstream_mode(c),
        connections_per_endpoint: 4,
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
        original_dst,
    })
}

/// A cluster opts in to multiplexed Thrift upstream connections with the metadata
/// `filter_metadata: { tern: { thrift_upstream: multiplexed } }` (a DestinationRule cannot
/// say it; an EnvoyFilter or another control plane can).
fn upstream_mode(c: &XdsCluster) -> UpstreamMode {
    use tern_proto::wkt::Kind;
    let mode = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("tern"))
        .and_then(|s| s.fields.get("thrift_upstream"))
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        });
    match mode {
        Some("multiplexed") => UpstreamMode::Multiplexed,
        _ => UpstreamMode::Exclusive,
    }
}

/// A protobuf duration; negative parts count as zero.
fn duration(d: &tern_proto::wkt::Duration) -> Duration {
    Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))
        .saturating_add(Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0)))
}

/// A circuit breaker threshold.
fn count(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

type Endpoints = (Vec<Endpoint>, BTreeMap<String, u32>, bool);

fn endpoints(cla: &ClusterLoadAssignment, what: &str) -> Result<Endpoints, String> {
    use tern_proto::endpoint_types::lb_endpoint::HostIdentifier;
    let mut out = Vec::new();
    let mut locality_weights = BTreeMap::new();
    for group in &cla.endpoints {
        let locality = group
            .locality
            .as_ref()
            .map(|l| [l.region.as_str(), l.zone.as_str(), l.sub_zone.as_str()].join("/"))
            .unwrap_or_default();
        if let Some(w) = group.load_balancing_weight {
            locality_weights.insert(locality.clone(), w.value);
        }
        for e in &group.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let address = socket_addr(ep.address.as_ref(), &format!("{what} endpoint"))?;
            let health = match e.health_status {
                1 => Health::Healthy,
                2 => Health::Unhealthy,
                3 => Health::Draining,
                4 => Health::Timeout,
                5 => Health::Degraded,
                _ => Health::Unknown,
            };
            out.push(Endpoint {
                address,
                weight: e.load_balancing_weight.map_or(1, |w| w.value.max(1)),
                priority: group.priority,
                locality: locality.clone(),
                health,
            });
        }
    }
    Ok((out, locality_weights, false))
}

#[cfg(test)]
mod tests {
    use tern_proto::{
        SocketAddress, core_types, encode, endpoint_types, listener_types, tcp_proxy_types,
        thrift_types, wkt,
    };

    use super::*;
    use crate::state::{Selection, State};

    #[test]
    fn numbers_out_of_range_are_refused_not_wrapped() {
        let range = |len: u32| core_types::CidrRange {
            address_prefix: "10.0.0.0".into(),
            prefix_len: Some(wkt::UInt32Value { value: len }),
        };
        assert!(cidrs(&[range(8)], "x").is_ok());
        let err = cidrs(&[range(264)], "x").unwrap_err();
        assert!(err.contains("10.0.0.0/264"), "{err}");
        assert!(cidrs(&[range(33)], "x").is_err());
        let huge = wkt::Duration {
            seconds: i64::MAX,
            nanos: i32::MAX,
        };
        assert!(duration(&huge) >= Duration::from_secs(i64::MAX as u64));
        let negative = wkt::Duration {
            seconds: -5,
            nanos: -1,
        };
        assert_eq!(duration(&negative), Duration::ZERO);
    }

    fn addr(ip: &str, port: u32) -> tern_proto::Address {
        tern_proto::Address {
            address: Some(core_types::address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(core_types::socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }
    }

    fn filter(name: &str, any: Any) -> listener_types::Filter {
        listener_types::Filter {
            name: name.into(),
            config_type: Some(listener_types::filter::ConfigType::TypedConfig(any)),
        }
    }

    fn tcp_proxy(cluster: &str) -> listener_types::Filter {
        let t = TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(tcp_proxy_types::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        };
        filter(
            "envoy.filters.network.tcp_proxy",
            encode(&t, type_url::TCP_PROXY),
        )
    }

    fn chain(
        port: Option<u32>,
        filters: Vec<listener_types::Filter>,
    ) -> listener_types::FilterChain {
        listener_types::FilterChain {
            filter_chain_match: port.map(|p| listener_types::FilterChainMatch {
                destination_port: Some(wkt::UInt32Value { value: p }),
                ..Default::default()
            }),
            filters,
            ..Default::default()
        }
    }

    const CALC: &str = "outbound|9090||calc.default.svc.cluster.local";

    /// What istiod sends a sidecar for a Thrift service `calc` on port 9090 (plain TCP, as
    /// Istio sends Thrift), a second service routed with thrift_proxy, and the Pod's inbound.
    /// The fuzz target `xds_translate` starts from these resources: each seed is one of
    /// them alone, and one holds them all. `TERN_UPDATE_FUZZ_SEEDS=1` writes them.
    #[test]
    fn the_xds_fuzz_seeds_are_the_istiod_resources() {
        use prost::Message as _;
        let r = istiod();
        let mut records: Vec<(u8, String, Vec<u8>)> = Vec::new();
        records.extend(
            r.listeners
                .iter()
                .map(|(n, l)| (0, n.clone(), l.encode_to_vec())),
        );
        records.extend(
            r.clusters
                .iter()
                .map(|(n, c)| (1, n.clone(), c.encode_to_vec())),
        );
        records.extend(
            r.endpoints
                .iter()
                .map(|(n, e)| (2, n.clone(), e.encode_to_vec())),
        );
        records.extend(
            r.thrift_routes
                .iter()
                .map(|(n, t)| (3, n.clone(), t.encode_to_vec())),
        );
        let encode = |records: &[(u8, String, Vec<u8>)]| {
            let mut out = Vec::new();
            for (selector, name, body) in records {
                out.push(*selector);
                out.push(u8::try_from(name.len()).unwrap());
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
                out.extend_from_slice(body);
            }
            out
        };
        let mut seeds: Vec<(String, Vec<u8>)> = records
            .iter()
            .enumerate()
            .map(|(i, rec)| (format!("resource-{i}"), encode(std::slice::from_ref(rec))))
            .collect();
        seeds.push(("all".into(), encode(&records)));
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/xds_translate");
        if std::env::var_os("TERN_UPDATE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &seeds {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        for (name, bytes) in &seeds {
            let committed = std::fs::read(dir.join(name)).unwrap_or_else(|e| {
                panic!("seed {name}: {e} (TERN_UPDATE_FUZZ_SEEDS=1 writes it)")
            });
            assert_eq!(&committed, bytes, "seed {name} is stale");
        }
    }

    fn istiod() -> Resources {
        let mut r = Resources::default();
        let outbound = XdsListener {
            name: "virtualOutbound".into(),
            address: Some(addr("0.0.0.0", 15001)),
            use_original_dst: Some(wkt::BoolValue { value: true }),
            default_filter_chain: Some(chain(None, vec![tcp_proxy("BlackHoleCluster")])),
            ..Default::default()
        };
        // Istio's metadata exchange comes first: tern skips filters it does not run.
        let mx = filter(
            "istio.metadata_exchange",
            Any {
                type_url: "type.googleapis.com/udpa.type.v1.TypedStruct".into(),
                value: vec![],
            },
        );
        let calc = XdsListener {
            name: "10.96.0.10_9090".into(),
            address: Some(addr("10.96.0.10", 9090)),
            filter_chains: vec![chain(None, vec![mx, tcp_proxy(CALC)])],
            ..Default::default()
        };
        let thrift = thrift_types::ThriftProxy {
            transport: 1,
            protocol: 3,
            route_config: Some(ThriftRouteConfiguration {
                name: "store".into(),
                routes: vec![thrift_types::Route {
                    r#match: Some(thrift_types::RouteMatch {
                        match_specifier: Some(
                            thrift_types::route_match::MatchSpecifier::ServiceName("Store:".into()),
                        ),
                        ..Default::default()
                    }),
                    route: Some(thrift_types::RouteAction {
                        cluster_specifier: Some(
                            thrift_types::route_action::ClusterSpecifier::Cluster(CALC.into()),
                        ),
                        ..Default::default()
                    }),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let store = XdsListener {
            name: "0.0.0.0_9191".into(),
            address: Some(addr("0.0.0.0", 9191)),
            filter_chains: vec![chain(
                None,
                vec![filter(
                    "envoy.filters.network.thrift_proxy",
                    encode(&thrift, type_url::THRIFT_PROXY),
                )],
            )],
            ..Default::default()
        };
        let inbound = XdsListener {
            name: "virtualInbound".into(),
            address: Some(addr("0.0.0.0", 15006)),
            filter_chains: vec![chain(Some(8080), vec![tcp_proxy("inbound|8080||")])],
            ..Default::default()
        };
        for l in [outbound, calc, store, inbound] {
            r.listeners.insert(l.name.clone(), l);
        }
        let eds = XdsCluster {
            name: CALC.into(),
            cluster_discovery_type: Some(tern_proto::cluster_types::ClusterDiscoveryType::Type(3)),
            eds_cluster_config: Some(tern_proto::cluster_types::EdsClusterConfig {
                service_name: CALC.into(),
                ..Default::default()
            }),
            lb_policy: 1,
            ..Default::default()
        };
        let inbound_cluster = XdsCluster {
            name: "inbound|8080||".into(),
            cluster_discovery_type: Some(tern_proto::cluster_types::ClusterDiscoveryType::Type(4)),
            ..Default::default()
        };
        let blackhole = XdsCluster {
            name: "BlackHoleCluster".into(),
            ..Default::default()
        };
        for c in [eds, inbound_cluster, blackhole] {
            r.clusters.insert(c.name.clone(), c);
        }
        let lb = |ip: &str, health: i32| endpoint_types::LbEndpoint {
            health_status: health,
            host_identifier: Some(endpoint_types::lb_endpoint::HostIdentifier::Endpoint(
                endpoint_types::Endpoint {
                    address: Some(addr(ip, 9090)),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let cla = ClusterLoadAssignment {
            cluster_name: CALC.into(),
            endpoints: vec![
                endpoint_types::LocalityLbEndpoints {
                    locality: Some(core_types::Locality {
                        region: "r".into(),
                        zone: "a".into(),
                        ..Default::default()
                    }),
                    lb_endpoints: vec![lb("10.0.0.1", 1), lb("10.0.0.2", 3)],
                    load_balancing_weight: Some(wkt::UInt32Value { value: 2 }),
                    ..Default::default()
                },
                endpoint_types::LocalityLbEndpoints {
                    lb_endpoints: vec![lb("10.0.1.1", 0)],
                    priority: 1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        r.endpoints.insert(CALC.into(), cla);
        r
    }

    #[test]
    fn translates_what_istiod_sends_a_sidecar() {
        let r = istiod();
        assert!(r.warm());
        assert_eq!(r.eds_names().collect::<Vec<_>>(), [CALC]);
        let c = to_config(&r, "v1".into()).unwrap();
        assert_eq!(
            c.passthrough,
            Passthrough::Deny,
            "REGISTRY_ONLY from the BlackHoleCluster default"
        );
        assert_eq!(
            c.listeners.len(),
            2,
            "virtualOutbound is tern's own listener"
        );
        assert_eq!(
            c.inbound.as_ref().unwrap().filter_chains[0]
                .matcher
                .destination_port,
            Some(8080)
        );
        let calc = &c.clusters[CALC];
        assert_eq!(calc.lb_policy, LbPolicy::LeastRequest);
        assert_eq!(calc.endpoints.len(), 3);
        assert_eq!(calc.endpoints[1].health, Health::Draining);
        assert_eq!(
            (
                calc.endpoints[2].priority,
                calc.endpoints[0].locality.as_str()
            ),
            (1, "r/a/")
        );
        assert_eq!(calc.locality_weights["r/a/"], 2);
        assert!(c.clusters["inbound|8080||"].original_dst);

        let state = State::new(crate::metrics::Metrics::new(None));
        state.apply(c);
        let snap = state.load();
        match snap.select(
            "10.96.0.10:9090".parse().unwrap(),
            "10.0.9.9:1".parse().unwrap(),
        ) {
            Selection::Chain(l, chain) => {
                assert_eq!(l.name, "10.96.0.10_9090");
                assert!(
                    matches!(&chain.filter, Filter::TcpProxy { target: Target::Cluster(t), .. } if t == CALC)
                );
            }
            other => panic!("{other:?}"),
        }
        match snap.select(
            "10.7.7.7:9191".parse().unwrap(),
            "10.0.9.9:1".parse().unwrap(),
        ) {
            Selection::Chain(_, chain) => {
                let Filter::Thrift(t) = &chain.filter else {
                    panic!("thrift")
                };
                assert_eq!(
                    (t.transport, t.protocol),
                    (Some(Transport::Framed), Some(Protocol::Compact))
                );
                assert_eq!(t.routes[0].matcher.service.as_deref(), Some("Store"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            snap.select(
                "10.9.9.9:80".parse().unwrap(),
                "10.0.9.9:1".parse().unwrap()
            ),
            Selection::Deny
        ));
    }

    #[test]
    fn clusters_wait_for_their_endpoints_and_unknown_clusters_drop_chains() {
        let mut r = istiod();
        r.endpoints.clear();
        assert!(!r.warm());
        r.clusters.remove(CALC);
        let c = to_config(&r, "v2".into()).unwrap();
        let calc = c
            .listeners
            .iter()
            .find(|l| l.name == "10.96.0.10_9090")
            .unwrap();
        assert!(
            calc.filter_chains.is_empty(),
            "a chain to a cluster not sent yet is skipped"
        );
    }

    #[test]
    fn unusable_resources_are_refused_with_their_name() {
        let mut r = istiod();
        let l = r.listeners.get_mut("10.96.0.10_9090").unwrap();
        l.address = Some(addr("calc.default.svc", 9090));
        let err = to_config(&r, "v3".into()).unwrap_err();
        assert!(
            err.contains("10.96.0.10_9090") && err.contains("not an IP"),
            "{err}"
        );

        let mut r = istiod();
        let l = r.listeners.get_mut("10.96.0.10_9090").unwrap();
        l.filter_chains[0].filter_chain_match = Some(listener_types::FilterChainMatch {
            prefix_ranges: vec![core_types::CidrRange {
                address_prefix: "10.0.0.0".into(),
                prefix_len: Some(wkt::UInt32Value { value: 40 }),
            }],
            ..Default::default()
        });
        let err = to_config(&r, "v4".into()).unwrap_err();
        assert!(
            err.contains("10.96.0.10_9090") && err.contains("/40"),
            "{err}"
        );
    }

    /// What istiod really sends for passthrough and ServiceEntries is used, not refused.
    #[test]
    fn cluster_provided_and_dns_clusters_are_kept() {
        let mut r = istiod();
        let passthrough = XdsCluster {
            name: "PassthroughCluster".into(),
            cluster_discovery_type: Some(tern_proto::cluster_types::ClusterDiscoveryType::Type(4)),
            lb_policy: 6, // CLUSTER_PROVIDED
            ..Default::default()
        };
        let dns = XdsCluster {
            name: "outbound|443||api.example.com".into(),
            cluster_discovery_type: Some(tern_proto::cluster_types::ClusterDiscoveryType::Type(1)),
            ..Default::default()
        };
        r.clusters.insert(passthrough.name.clone(), passthrough);
        r.clusters.insert(dns.name.clone(), dns);
        r.clusters.get_mut(CALC).unwrap().lb_policy = 7;
        let c = to_config(&r, "v5".into()).unwrap();
        assert!(c.clusters["PassthroughCluster"].original_dst);
        assert!(
            c.clusters["outbound|443||api.example.com"]
                .endpoints
                .is_empty()
        );
        assert_eq!(c.clusters[CALC].lb_policy, LbPolicy::RoundRobin);
    }
}
