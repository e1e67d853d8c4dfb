//! A scriptable xDS control plane for tern's tests: a tonic ADS server (state of the world)
//! over `envoy-types`, serving Istio-shaped resources built from a YAML snapshot file.
//!
//! `tern-controlplane ADDR SNAPSHOT.yaml [--tls CERT KEY] [--token FILE] [--ca CERT KEY IDENTITY]`
//! serves both ADS protocols (state of the world and
//! delta) and prints `ready`, then one line per event: `STREAM` (or `STREAM delta`), `SUBSCRIBE <type> version=<v> names=<a,b>`, `ACK <type> <version>`,
//! `NACK <type> <version> <reason>`, `SENT <type> <n> bytes` (state of the world), `CLOSE` (a
//! stream ended by `close_every_ms`). Rewriting the file pushes a new version to every stream.
//! With `--ca`, it is also Istio's CA: `CreateCertificate` signs CSRs for IDENTITY with the
//! CA's files (`ISSUE <identity> ttl=<s> cluster=<id>` per certificate). The token file holds
//! one token per line; a token followed by a SPIFFE identity stands for that identity (as a
//! TokenReview tells istiod whose service account a token is), and the CA issues it instead of
//! IDENTITY to callers that present it.
//!
//! ```yaml
//! version: "1"
//! services:
//!   - { name: calc, vip: 10.96.0.10, port: 9090, filter: thrift, endpoints: ["10.66.1.2:9001"] }
//!   - { name: sticky, vip: 10.96.0.11, port: 7070, filter: tcp, lb: ring_hash, endpoints: [...] }
//!   - { name: secure, vip: 10.96.0.12, port: 7070, filter: tcp, mtls: "spiffe://cluster.local/ns/x/sa/y", endpoints: [...] }
//! inbound: strict           # Istio's virtualInbound with mTLS chains (strict or permissive)
//! inbound_rbac:             # its network RBAC (an AuthorizationPolicy's rules)
//!   - { name: p, action: allow, principals: ["spiffe://…"], ports: [8080], methods: ["get*"] }
//! broken_listener: false   # add a listener whose address is a hostname (tern must NACK it)
//! bulk: 0                   # add this many generated services (10 endpoints each)
//! cluster_padding: 0        # bytes of metadata in every generated cluster (a large CDS)
//! delay_ms: 0               # wait this long before every response (a slow control plane)
//! close_every_ms: 0         # end every stream cleanly this often (istiod's max connection age)
//! corrupt_cluster: false    # add a cluster whose body does not decode
//! churn_per_sec: 0          # push this many one-endpoint EDS changes a second (SotW)
//! # Real istiod resources (`tests/python/istio_dump.py` converts a /config_dump): listeners,
//! # clusters and endpoints served as they are. Clusters the listeners name that the dump
//! # lacks are made in istiod's EDS shape; EDS clusters without endpoints get
//! # `dump_endpoints`, except those listed in `endpoints`.
//! dumps: [/tmp/istio.bin]
//! dump_endpoints: ["10.66.1.2:9999"]
//! endpoints: { "outbound|443||kubernetes.default.svc.cluster.local": ["10.66.1.2:9443"] }
//! ```
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use tern_proto::{
    Any, Cluster, ClusterLoadAssignment, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    DiscoveryRequest, DiscoveryResponse, Listener, Resource, TcpProxy, ThriftProxy,
    ThriftRouteConfiguration,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    build::{self, address as addr, eds_cluster, filter as typed, tcp_proxy},
    cluster_types, core_types, encode, listener_types, tcp_proxy_types, thrift_types, type_url,
    wkt,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, Debug, Default, Deserialize)]
struct Snapshot {
    version: String,
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    broken_listener: bool,
    /// Extra services (10 endpoints each) to make a large snapshot.
    #[serde(default)]
    bulk: usize,
    /// Wait this long before every response of this version (a slow control plane).
    #[serde(default)]
    delay_ms: u64,
    /// End every stream cleanly this often (istiod's maximum connection age).
    #[serde(default)]
    close_every_ms: u64,
    #[serde(default)]
    corrupt_cluster: bool,
    /// State of the world: push this many single-endpoint changes a second (each a response
    /// with one generated service's `ClusterLoadAssignment`, as istiod pushes EDS).
    #[serde(default)]
    churn_per_sec: u64,
    #[serde(default)]
    cluster_padding: usize,
    /// Files of real istiod resources (`tests/python/istio_dump.py`).
    #[serde(default)]
    dumps: Vec<String>,
    #[serde(default)]
    dump_endpoints: Vec<String>,
    /// Endpoints by EDS name, for clusters from the dumps.
    #[serde(default)]
    endpoints: BTreeMap<String, Vec<String>>,
    /// Istio's `virtualInbound` listener, its connections relayed to the application:
    /// `strict` (mTLS only), `permissive` (mTLS and plaintext), `plaintext` (istiod's shape
    /// with mTLS disabled: the default, as istiod always sends one), or `none` (no inbound
    /// listener at all: tern then refuses inbound connections). Dumps bring their own.
    #[serde(default)]
    inbound: Option<String>,
    /// `AuthorizationPolicy` rules for the inbound chains, as istiod writes them (network
    /// RBAC filters: DENY, then ALLOW).
    #[serde(default)]
    inbound_rbac: Vec<RbacPolicy>,
    /// The inbound mTLS chain matches any TLS client, not only those offering Istio's ALPN
    /// (for clients such as `openssl s_time`, which offer none).
    #[serde(default)]
    inbound_any_alpn: bool,
    /// How the inbound mTLS chains' `DownstreamTlsContext` departs from istiod's.
    #[serde(default)]
    inbound_tls: InboundTls,
    /// The dumps' resources, read when the snapshot is loaded.
    #[serde(skip)]
    dumped: Dumped,
}

/// Departures from istiod's inbound `DownstreamTlsContext`.
#[derive(Clone, Debug, Default, Deserialize)]
struct InboundTls {
    /// `tls_params.tls_minimum_protocol_version` (`TLSv1_3`: MeshConfig's
    /// `meshMTLS.minProtocolVersion`).
    #[serde(default)]
    min_version: Option<String>,
    /// No validation context at all (nobody says whom to trust).
    #[serde(default)]
    unverified: bool,
    /// `require_client_certificate` (istiod: true).
    #[serde(default)]
    require_client_certificate: Option<bool>,
}

impl InboundTls {
    fn socket(&self) -> core_types::TransportSocket {
        use tern_proto::tls_types::{self, common_tls_context::ValidationContextType};
        let mut socket = build::istio_downstream_tls("cluster.local");
        let Some(core_types::transport_socket::ConfigType::TypedConfig(any)) =
            socket.config_type.as_mut()
        else {
            return socket;
        };
        let mut t: tls_types::DownstreamTlsContext =
            tern_proto::decode(any, type_url::DOWNSTREAM_TLS_CONTEXT).expect("istiod's context");
        let common = t.common_tls_context.get_or_insert_with(Default::default);
        if let Some(v) = &self.min_version {
            common.tls_params = Some(tls_types::TlsParameters {
                tls_minimum_protocol_version: match v.as_str() {
                    "TLSv1_3" => 4,
                    _ => 3,
                },
                ..Default::default()
            });
        }
        if self.unverified {
            common.validation_context_type = None::<ValidationContextType>;
        }
        if let Some(r) = self.require_client_certificate {
            t.require_client_certificate = Some(wkt::BoolValue { value: r });
        }
        *any = encode(&t, type_url::DOWNSTREAM_TLS_CONTEXT);
        socket
    }
}

impl Snapshot {
    /// The inbound listener's mode, if one is served (`own`: no dumps).
    fn inbound_mode(&self, own: bool) -> Option<&str> {
        match self.inbound.as_deref() {
            Some("none") => None,
            Some(mode) => Some(mode),
            None => own.then_some("plaintext"),
        }
    }
}

/// Resources read from dump files, by type URL and name (encoded as istiod sent them).
#[derive(Clone, Debug, Default)]
struct Dumped(BTreeMap<String, BTreeMap<String, Any>>);

impl Dumped {
    /// Reads files of records: type URL, name, body (u16, u16, u32 big-endian lengths).
    fn read(paths: &[String]) -> Result<Self, String> {
        let mut out: BTreeMap<String, BTreeMap<String, Any>> = BTreeMap::new();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let mut take = |width: usize| -> Result<Vec<u8>, String> {
                    let len = match width {
                        2 => rest
                            .get(..2)
                            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))),
                        _ => rest
                            .get(..4)
                            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize),
                    }
                    .ok_or(format!("{path}: truncated"))?;
                    let body = rest
                        .get(width..width + len)
                        .ok_or(format!("{path}: truncated"))?
                        .to_vec();
                    rest = &rest[width + len..];
                    Ok(body)
                };
                let type_url = String::from_utf8(take(2)?).map_err(|e| e.to_string())?;
                let name = String::from_utf8(take(2)?).map_err(|e| e.to_string())?;
                let value = take(4)?;
                out.entry(type_url.clone())
                    .or_default()
                    .insert(name, Any { type_url, value });
            }
        }
        Ok(Self(out))
    }

    fn of(&self, type_url: &str) -> impl Iterator<Item = (&String, &Any)> {
        self.0.get(type_url).into_iter().flatten()
    }

    /// The clusters the dump's listeners send to (tcp_proxy), whether the dump has them or not.
    fn clusters_named_by_listeners(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (_, any) in self.of(type_url::LISTENER) {
            let Ok(l) = tern_proto::decode::<Listener>(any, type_url::LISTENER) else {
                continue;
            };
            for f in l
                .filter_chains
                .iter()
                .chain(&l.default_filter_chain)
                .flat_map(|c| &c.filters)
            {
                if let Some(listener_types::filter::ConfigType::TypedConfig(a)) = &f.config_type
                    && a.type_url == type_url::TCP_PROXY
                    && let Ok(t) = tern_proto::decode::<TcpProxy>(a, type_url::TCP_PROXY)
                    && let Some(tcp_proxy_types::ClusterSpecifier::Cluster(c)) = t.cluster_specifier
                {
                    names.insert(c);
                }
            }
        }
        names
    }
}

impl Snapshot {
    /// The services, with `bulk` generated ones after those listed.
    fn all_services(&self) -> Vec<Service> {
        let mut all = self.services.clone();
        all.extend((0..self.bulk).map(|i| {
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
        }));
        all
    }
}

/// One rule of an `AuthorizationPolicy`.
#[derive(Clone, Debug, Deserialize)]
struct RbacPolicy {
    name: String,
    /// `allow` or `deny`.
    action: String,
    /// Peer identities (SPIFFE URIs); none: anyone.
    #[serde(default)]
    principals: Vec<String>,
    /// Destination ports; none: any.
    #[serde(default)]
    ports: Vec<u32>,
    /// Thrift methods (tern's `tern.thrift_method`; `get*` is a prefix); none: any.
    #[serde(default)]
    methods: Vec<String>,
    /// Adds an HTTP header permission (what a TCP filter cannot decide).
    #[serde(default)]
    header: bool,
}

/// The network RBAC filters for `policies`: one per action, DENY first (istiod's order).
fn rbac_filters(policies: &[RbacPolicy]) -> Vec<listener_types::Filter> {
    use tern_proto::rbac_types::{self, permission::Rule, principal::Identifier};
    let or_rules = |rules: Vec<rbac_types::Permission>| rbac_types::Permission {
        rule: Some(Rule::OrRules(rbac_types::permission::Set { rules })),
    };
    let any_permission = rbac_types::Permission {
        rule: Some(Rule::Any(true)),
    };
    let policy = |p: &RbacPolicy| {
        let mut and = Vec::new();
        if !p.ports.is_empty() {
            and.push(or_rules(
                p.ports
                    .iter()
                    .map(|port| rbac_types::Permission {
                        rule: Some(Rule::DestinationPort(*port)),
                    })
                    .collect(),
            ));
        }
        if !p.methods.is_empty() {
            and.push(or_rules(
                p.methods
                    .iter()
                    .map(|m| rbac_types::Permission {
                        rule: Some(Rule::Matcher(core_types::TypedExtensionConfig {
                            name: "tern.thrift_method".into(),
                            typed_config: Some(encode(
                                &wkt::Struct {
                                    fields: [(
                                        "method".to_owned(),
                                        wkt::Value {
                                            kind: Some(wkt::Kind::StringValue(m.clone())),
                                        },
                                    )]
                                    .into(),
                                },
                                "type.googleapis.com/google.protobuf.Struct",
                            )),
                        })),
                    })
                    .collect(),
            ));
        }
        if p.header {
            and.push(rbac_types::Permission {
                rule: Some(Rule::Header(Default::default())),
            });
        }
        let permission = if and.is_empty() {
            any_permission.clone()
        } else {
            rbac_types::Permission {
                rule: Some(Rule::AndRules(rbac_types::permission::Set { rules: and })),
            }
        };
        let principal = if p.principals.is_empty() {
            rbac_types::Principal {
                identifier: Some(Identifier::Any(true)),
            }
        } else {
            rbac_types::Principal {
                identifier: Some(Identifier::OrIds(rbac_types::principal::Set {
                    ids: p
                        .principals
                        .iter()
                        .map(|id| rbac_types::Principal {
                            identifier: Some(Identifier::FilterState(
                                tern_proto::matcher_types::FilterStateMatcher {
                                    key: "io.istio.peer_principal".into(),
                                    matcher: Some(
                                        tern_proto::matcher_types::filter_state_matcher::Matcher::StringMatch(
                                            tern_proto::matcher_types::StringMatcher {
                                                match_pattern: Some(tern_proto::matcher_types::string_matcher::MatchPattern::Exact(id.clone())),
                                                ignore_case: false,
                                            },
                                        ),
                                    ),
                                },
                            )),
                        })
                        .collect(),
                })),
            }
        };
        rbac_types::Policy {
            permissions: vec![permission],
            principals: vec![principal],
            ..Default::default()
        }
    };
    [("deny", 1), ("allow", 0)]
        .iter()
        .filter(|(action, _)| policies.iter().any(|p| p.action == *action))
        .map(|(action, code)| {
            let rules = rbac_types::Rbac {
                action: *code,
                policies: policies
                    .iter()
                    .filter(|p| p.action == *action)
                    .map(|p| (p.name.clone(), policy(p)))
                    .collect(),
                ..Default::default()
            };
            let filter = tern_proto::NetworkRbac {
                rules: Some(rules),
                stat_prefix: "tcp.".into(),
                ..Default::default()
            };
            typed(
                "envoy.filters.network.rbac",
                encode(&filter, type_url::NETWORK_RBAC),
            )
        })
        .collect()
}

#[derive(Clone, Debug, Deserialize)]
struct Service {
    name: String,
    vip: String,
    port: u32,
    /// `thrift` (a thrift_proxy filter, as an EnvoyFilter would patch in) or `tcp` (istiod's
    /// plain tcp_proxy).
    filter: String,
    endpoints: Vec<String>,
    /// `ring_hash` or `maglev` (what a DestinationRule's `consistentHash` produces);
    /// default round robin.
    #[serde(default)]
    lb: Option<String>,
    /// Istio's auto-mTLS: the endpoints are labelled `tlsMode: istio` and the cluster
    /// verifies this SAN.
    #[serde(default)]
    mtls: Option<String>,
    /// A DestinationRule's SIMPLE TLS: `{ca, sni, san}`.
    #[serde(default)]
    simple_tls: Option<SimpleTls>,
}

#[derive(Clone, Debug, Deserialize)]
struct SimpleTls {
    ca: String,
    sni: String,
    san: String,
}

impl Service {
    fn cluster(&self) -> String {
        format!(
            "outbound|{}||{}.default.svc.cluster.local",
            self.port, self.name
        )
    }
}

fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

fn short(t: &str) -> &str {
    t.rsplit('.').next().unwrap_or(t)
}

fn thrift_proxy(cluster: &str) -> listener_types::Filter {
    let t = ThriftProxy {
        stat_prefix: cluster.into(),
        route_config: Some(ThriftRouteConfiguration {
            name: cluster.into(),
            routes: vec![thrift_types::Route {
                r#match: Some(thrift_types::RouteMatch {
                    match_specifier: Some(thrift_types::route_match::MatchSpecifier::MethodName(
                        String::new(),
                    )),
                    ..Default::default()
                }),
                route: Some(thrift_types::RouteAction {
                    cluster_specifier: Some(thrift_types::route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    ..Default::default()
                }),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    typed(
        "envoy.filters.network.thrift_proxy",
        encode(&t, type_url::THRIFT_PROXY),
    )
}

/// Istio's `virtualInbound` for a TCP port: a chain for mesh mTLS (ALPN
/// `istio-peer-exchange`/`istio`), one for other TLS, and in permissive mode one for
/// plaintext; all relay to the application.
fn virtual_inbound(
    mode: &str,
    rbac: &[listener_types::Filter],
    any_alpn: bool,
    tls: &InboundTls,
) -> Listener {
    let to_app = || {
        let mut filters = rbac.to_vec();
        filters.push(tcp_proxy("InboundPassthroughCluster"));
        filters
    };
    let matching = |transport: &str, alpn: &[&str]| listener_types::FilterChainMatch {
        transport_protocol: transport.into(),
        application_protocols: alpn.iter().map(|a| (*a).into()).collect(),
        prefix_ranges: vec![core_types::CidrRange {
            address_prefix: "0.0.0.0".into(),
            prefix_len: Some(wkt::UInt32Value { value: 0 }),
        }],
        ..Default::default()
    };
    let mut chains = Vec::new();
    if mode != "plaintext" {
        chains.push(listener_types::FilterChain {
            name: "virtualInbound".into(),
            filter_chain_match: Some(matching(
                "tls",
                if any_alpn {
                    &[]
                } else {
                    &["istio-peer-exchange", "istio"]
                },
            )),
            transport_socket: Some(tls.socket()),
            filters: to_app(),
            ..Default::default()
        });
    }
    if mode == "permissive" || mode == "plaintext" {
        chains.push(listener_types::FilterChain {
            name: "virtualInbound".into(),
            filter_chain_match: Some(matching("raw_buffer", &[])),
            filters: to_app(),
            ..Default::default()
        });
    }
    Listener {
        name: "virtualInbound".into(),
        address: Some(addr("0.0.0.0", 15006)),
        filter_chains: chains,
        ..Default::default()
    }
}

fn chain(filters: Vec<listener_types::Filter>) -> listener_types::FilterChain {
    listener_types::FilterChain {
        filters,
        ..Default::default()
    }
}

/// The resources of one type in a snapshot, by name, limited to `names` when given.
/// The resources of one type: those the snapshot generates, then those of its dumps.
fn resources(s: &Snapshot, type_url: &str, names: &[String]) -> Vec<(String, Any)> {
    let mut out = generated(s, type_url, names);
    out.extend(from_dumps(s, type_url, names));
    out
}

/// A `ClusterLoadAssignment` of `ip:port` endpoints.
fn load_assignment(name: &str, endpoints: &[String]) -> ClusterLoadAssignment {
    build::load_assignment(
        name,
        endpoints
            .iter()
            .map(|e| {
                let (ip, port) = e.rsplit_once(':').expect("ip:port");
                build::endpoint(ip, port.parse().expect("port"), 1)
            })
            .collect(),
    )
}

/// The dumps' resources, with what the test supplies: clusters the listeners name but the
/// dump lacks, and endpoints for EDS clusters.
fn from_dumps(s: &Snapshot, type_url: &str, names: &[String]) -> Vec<(String, Any)> {
    let d = &s.dumped;
    if d.0.is_empty() {
        return Vec::new();
    }
    let wanted = |n: &str| names.is_empty() || names.iter().any(|x| x == n);
    let dumped: BTreeMap<&String, Cluster> = d
        .of(type_url::CLUSTER)
        .filter_map(|(n, a)| Some((n, tern_proto::decode(a, type_url::CLUSTER).ok()?)))
        .collect();
    let missing: Vec<String> = d
        .clusters_named_by_listeners()
        .into_iter()
        .filter(|n| !dumped.contains_key(n))
        .collect();
    match type_url {
        type_url::LISTENER => d
            .of(type_url)
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect(),
        type_url::CLUSTER => d
            .of(type_url)
            .map(|(n, a)| (n.clone(), a.clone()))
            .chain(
                missing
                    .iter()
                    .map(|n| (n.clone(), encode(&eds_cluster(n), type_url::CLUSTER))),
            )
            .collect(),
        type_url::CLUSTER_LOAD_ASSIGNMENT => {
            let eds_names = dumped
                .values()
                .filter(|c| {
                    c.cluster_discovery_type == Some(cluster_types::ClusterDiscoveryType::Type(3))
                })
                .map(|c| {
                    c.eds_cluster_config
                        .as_ref()
                        .map(|e| e.service_name.clone())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| c.name.clone())
                })
                .chain(missing);
            let held: BTreeMap<&String, &Any> = d.of(type_url).collect();
            eds_names
                .filter(|n| wanted(n))
                .filter_map(|n| {
                    let any = match (s.endpoints.get(&n), held.get(&n)) {
                        (Some(eps), _) => encode(&load_assignment(&n, eps), type_url),
                        (None, Some(any)) => (*any).clone(),
                        (None, None) if !s.dump_endpoints.is_empty() => {
                            encode(&load_assignment(&n, &s.dump_endpoints), type_url)
                        }
                        (None, None) => return None,
                    };
                    Some((n, any))
                })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// The resources the snapshot's settings generate.
fn generated(s: &Snapshot, type_url: &str, names: &[String]) -> Vec<(String, Any)> {
    let wanted = |n: &str| names.is_empty() || names.iter().any(|x| x == n);
    // With dumps, the dump's own virtualOutbound and PassthroughCluster are served.
    let own = s.dumped.0.is_empty();
    match type_url {
        type_url::LISTENER => {
            let mut listeners: Vec<Listener> = own
                .then(|| Listener {
                    name: "virtualOutbound".into(),
                    address: Some(addr("0.0.0.0", 15001)),
                    use_original_dst: Some(wkt::BoolValue { value: true }),
                    default_filter_chain: Some(chain(vec![tcp_proxy("PassthroughCluster")])),
                    ..Default::default()
                })
                .into_iter()
                .collect();
            for svc in &s.all_services() {
                let filter = if svc.filter == "thrift" {
                    thrift_proxy(&svc.cluster())
                } else {
                    tcp_proxy(&svc.cluster())
                };
                listeners.push(Listener {
                    name: format!("{}_{}", svc.vip, svc.port),
                    address: Some(addr(&svc.vip, svc.port)),
                    filter_chains: vec![chain(vec![filter])],
                    bind_to_port: Some(wkt::BoolValue { value: false }),
                    ..Default::default()
                });
            }
            if let Some(mode) = s.inbound_mode(own) {
                listeners.push(virtual_inbound(
                    mode,
                    &rbac_filters(&s.inbound_rbac),
                    s.inbound_any_alpn,
                    &s.inbound_tls,
                ));
            }
            if s.broken_listener {
                listeners.push(Listener {
                    name: "broken_9999".into(),
                    address: Some(addr("calc.default.svc.cluster.local", 9999)),
                    filter_chains: vec![chain(vec![tcp_proxy("PassthroughCluster")])],
                    ..Default::default()
                });
            }
            listeners
                .iter()
                .map(|l| (l.name.clone(), encode(l, type_url::LISTENER)))
                .collect()
        }
        type_url::CLUSTER => {
            let mut clusters: Vec<Cluster> = own
                .then(|| Cluster {
                    name: "PassthroughCluster".into(),
                    cluster_discovery_type: Some(cluster_types::ClusterDiscoveryType::Type(4)),
                    lb_policy: 6, // CLUSTER_PROVIDED, as istiod sends it
                    ..Default::default()
                })
                .into_iter()
                .collect();
            if s.inbound_mode(own).is_some() {
                clusters.push(Cluster {
                    name: "InboundPassthroughCluster".into(),
                    cluster_discovery_type: Some(cluster_types::ClusterDiscoveryType::Type(4)),
                    lb_policy: 6,
                    ..Default::default()
                });
            }
            for svc in &s.all_services() {
                let mut c = eds_cluster(&svc.cluster());
                if let Some(t) = &svc.simple_tls {
                    build::istio_simple_tls(&mut c, &t.ca, &t.sni, &t.san);
                }
                if let Some(san) = &svc.mtls {
                    let sni = format!(
                        "outbound_.{}_._.{}.default.svc.cluster.local",
                        svc.port, svc.name
                    );
                    build::istio_auto_mtls(&mut c, san, &sni);
                }
                c.lb_policy = match svc.lb.as_deref() {
                    Some("ring_hash") => 2,
                    Some("maglev") => 5,
                    _ => 0,
                };
                if s.cluster_padding > 0 {
                    c.metadata = Some(core_types::Metadata {
                        filter_metadata: [(
                            "padding".to_string(),
                            wkt::Struct {
                                fields: [(
                                    "bytes".to_string(),
                                    wkt::Value {
                                        kind: Some(wkt::Kind::StringValue(
                                            "x".repeat(s.cluster_padding),
                                        )),
                                    },
                                )]
                                .into(),
                            },
                        )]
                        .into(),
                        ..Default::default()
                    });
                }
                clusters.push(c);
            }
            let mut out: Vec<(String, Any)> = clusters
                .iter()
                .map(|c| (c.name.clone(), encode(c, type_url::CLUSTER)))
                .collect();
            if s.corrupt_cluster {
                // A body that names itself, then does not decode.
                let name = "outbound|7777||corrupt.default.svc.cluster.local";
                let mut any = encode(&eds_cluster(name), type_url::CLUSTER);
                any.value.extend_from_slice(&[0xff, 0xff]);
                out.push((name.into(), any));
            }
            out
        }
        type_url::CLUSTER_LOAD_ASSIGNMENT => s
            .all_services()
            .iter()
            .filter(|svc| wanted(&svc.cluster()))
            .map(|svc| {
                let mut cla = load_assignment(&svc.cluster(), &svc.endpoints);
                for e in cla.endpoints.iter_mut().flat_map(|l| &mut l.lb_endpoints) {
                    build::istio_workload(
                        e,
                        &format!("{}-v1;default;{};v1;Kubernetes", svc.name, svc.name),
                    );
                    if svc.mtls.is_some() {
                        build::istio_tls_mode(e);
                    }
                }
                (
                    svc.cluster(),
                    encode(&cla, type_url::CLUSTER_LOAD_ASSIGNMENT),
                )
            })
            .collect(),
        _ => Vec::new(),
    }
}

struct ControlPlane {
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

/// A slow control plane: waits before answering with this snapshot.
async fn delay(s: &Snapshot) {
    if s.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(s.delay_ms)).await;
    }
}

/// One churned endpoint change: generated service `n` (cycling through those `wanted`)
/// with its first endpoint on another port, alone in a response.
fn churn_response(
    s: &Snapshot,
    wanted: &[String],
    n: u64,
    nonce: u64,
) -> Option<DiscoveryResponse> {
    let services = s.all_services();
    let candidates: Vec<&Service> = services
        .iter()
        .filter(|svc| wanted.is_empty() || wanted.contains(&svc.cluster()))
        .filter(|svc| svc.name.starts_with("bulk-"))
        .collect();
    let svc = candidates.get(usize::try_from(n).ok()? % candidates.len().max(1))?;
    let mut endpoints = svc.endpoints.clone();
    if let Some((ip, _)) = endpoints.first().and_then(|e| e.rsplit_once(':')) {
        endpoints[0] = format!("{ip}:{}", 10_000 + n % 50_000);
    }
    let cla = load_assignment(&svc.cluster(), &endpoints);
    Some(DiscoveryResponse {
        version_info: format!("churn-{n}"),
        resources: vec![encode(&cla, type_url::CLUSTER_LOAD_ASSIGNMENT)],
        type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.to_owned(),
        nonce: nonce.to_string(),
        ..Default::default()
    })
}

/// Resolves when a stream opened now is to be ended cleanly (never without `close_every_ms`).
fn closing(s: &Snapshot) -> impl std::future::Future<Output = ()> + use<> {
    let every = s.close_every_ms;
    async move {
        if every == 0 {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(every)).await;
    }
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for ControlPlane {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let mut snapshot = self.snapshot.clone();
        let (tx, rx) = mpsc::channel(64);
        say("STREAM");
        tokio::spawn(async move {
            let mut subscriptions: HashMap<String, Vec<String>> = HashMap::new();
            let mut nonce = 0u64;
            let send = |type_url: &str, names: &[String], s: &Snapshot, nonce: &mut u64| {
                *nonce += 1;
                let response = DiscoveryResponse {
                    version_info: s.version.clone(),
                    resources: resources(s, type_url, names)
                        .into_iter()
                        .map(|(_, r)| r)
                        .collect(),
                    type_url: type_url.to_owned(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                say(format!(
                    "SENT {} {} bytes",
                    short(type_url),
                    prost::Message::encoded_len(&response)
                ));
                response
            };
            let close = closing(&snapshot.borrow());
            tokio::pin!(close);
            let mut churned = 0u64;
            let churn = tokio::time::sleep(Duration::from_millis(100));
            tokio::pin!(churn);
            loop {
                tokio::select! {
                    _ = &mut close => {
                        say("CLOSE");
                        break;
                    }
                    _ = &mut churn => {
                        let s = snapshot.borrow().clone();
                        let wanted = subscriptions.get(type_url::CLUSTER_LOAD_ASSIGNMENT);
                        let every = match s.churn_per_sec {
                            0 => Duration::from_millis(100),
                            n => Duration::from_micros(1_000_000 / n),
                        };
                        churn.as_mut().reset(tokio::time::Instant::now() + every);
                        if let (true, Some(wanted)) = (s.churn_per_sec > 0, wanted) {
                            churned += 1;
                            nonce += 1;
                            if let Some(response) = churn_response(&s, wanted, churned, nonce)
                                && tx.send(Ok(response)).await.is_err()
                            {
                                break;
                            }
                        }
                    }
                    request = requests.message() => {
                        let Ok(Some(r)) = request else { break };
                        let t = r.type_url.clone();
                        if r.response_nonce.is_empty() {
                            say(format!("SUBSCRIBE {} version={} names={}", short(&t), r.version_info, r.resource_names.join(",")));
                        } else if let Some(e) = &r.error_detail {
                            say(format!("NACK {} {} {}", short(&t), r.version_info, e.message));
                        } else {
                            say(format!("ACK {} {}", short(&t), r.version_info));
                        }
                        let changed = subscriptions.get(&t) != Some(&r.resource_names);
                        subscriptions.insert(t.clone(), r.resource_names.clone());
                        if r.response_nonce.is_empty() || changed {
                            let s = snapshot.borrow().clone();
                            delay(&s).await;
                            if tx.send(Ok(send(&t, &r.resource_names, &s, &mut nonce))).await.is_err() { break }
                        }
                    }
                    changed = snapshot.changed() => {
                        if changed.is_err() { break }
                        let s = snapshot.borrow().clone();
                        for (t, names) in &subscriptions {
                            delay(&s).await;
                            if tx.send(Ok(send(t, names, &s, &mut nonce))).await.is_err() { return }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let mut snapshot = self.snapshot.clone();
        let (tx, rx) = mpsc::channel(64);
        say("STREAM delta");
        tokio::spawn(async move {
            // Per type: the names subscribed (empty: wildcard), and the names last sent.
            let mut subscriptions: HashMap<String, BTreeSet<String>> = HashMap::new();
            let mut sent: HashMap<String, BTreeSet<String>> = HashMap::new();
            let mut versions_by_nonce: HashMap<String, String> = HashMap::new();
            let mut nonce = 0u64;
            let respond =
                |t: &str,
                 s: &Snapshot,
                 subscribed: &BTreeSet<String>,
                 sent: &mut BTreeSet<String>,
                 nonce: &mut u64,
                 versions_by_nonce: &mut HashMap<String, String>| {
                    *nonce += 1;
                    let names: Vec<String> = subscribed.iter().cloned().collect();
                    let now: Vec<(String, Any)> = resources(s, t, &names);
                    let present: BTreeSet<String> = now.iter().map(|(n, _)| n.clone()).collect();
                    let removed = sent.difference(&present).cloned().collect();
                    *sent = present;
                    versions_by_nonce.insert(nonce.to_string(), s.version.clone());
                    DeltaDiscoveryResponse {
                        system_version_info: s.version.clone(),
                        type_url: t.to_owned(),
                        resources: now
                            .into_iter()
                            .map(|(name, any)| Resource {
                                name,
                                version: s.version.clone(),
                                resource: Some(any),
                                ..Default::default()
                            })
                            .collect(),
                        removed_resources: removed,
                        nonce: nonce.to_string(),
                        ..Default::default()
                    }
                };
            let close = closing(&snapshot.borrow());
            tokio::pin!(close);
            loop {
                tokio::select! {
                    _ = &mut close => {
                        say("CLOSE");
                        break;
                    }
                    request = requests.message() => {
                        let Ok(Some(r)) = request else { break };
                        let t = r.type_url.clone();
                        if r.response_nonce.is_empty() {
                            let held: Vec<String> = r.initial_resource_versions.iter().map(|(n, v)| format!("{n}@{v}")).collect();
                            say(format!("SUBSCRIBE {} held={} names={}", short(&t), held.join(","), r.resource_names_subscribe.join(",")));
                        } else {
                            let version = versions_by_nonce.get(&r.response_nonce).cloned().unwrap_or_default();
                            match &r.error_detail {
                                Some(e) => say(format!("NACK {} {version} {}", short(&t), e.message)),
                                None => say(format!("ACK {} {version}", short(&t))),
                            }
                        }
                        let subs = subscriptions.entry(t.clone()).or_default();
                        let before = subs.clone();
                        subs.extend(r.resource_names_subscribe.iter().cloned());
                        for n in &r.resource_names_unsubscribe {
                            subs.remove(n);
                        }
                        if r.response_nonce.is_empty() || *subs != before {
                            let s = snapshot.borrow().clone();
                            let subs = subs.clone();
                            delay(&s).await;
                            let response = respond(&t, &s, &subs, sent.entry(t.clone()).or_default(), &mut nonce, &mut versions_by_nonce);
                            if tx.send(Ok(response)).await.is_err() { break }
                        }
                    }
                    changed = snapshot.changed() => {
                        if changed.is_err() { break }
                        let s = snapshot.borrow().clone();
                        for (t, subs) in &subscriptions {
                            delay(&s).await;
                            let response = respond(t, &s, subs, sent.entry(t.clone()).or_default(), &mut nonce, &mut versions_by_nonce);
                            if tx.send(Ok(response)).await.is_err() { return }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn load(path: &str) -> Option<Snapshot> {
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

/// Istio's CA: signs a CSR when the caller's token is valid (the interceptor checks it)
/// and the CSR asks for the identity the token stands for, as istiod does.
struct Ca {
    ca: tern_tests::pki::TestCa,
    identity: String,
}

/// The identity the caller's token stands for, when the token file names one.
#[derive(Clone)]
struct TokenIdentity(String);

#[tonic::async_trait]
impl tern_proto::istio_ca::istio_certificate_service_server::IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        request: Request<tern_proto::istio_ca::IstioCertificateRequest>,
    ) -> Result<Response<tern_proto::istio_ca::IstioCertificateResponse>, Status> {
        let cluster = request
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let identity = request
            .extensions()
            .get::<TokenIdentity>()
            .map_or_else(|| self.identity.clone(), |t| t.0.clone());
        let r = request.into_inner();
        let ttl = Duration::from_secs(u64::try_from(r.validity_duration).unwrap_or(0).max(1));
        let (cert, sans) = self
            .ca
            .sign_csr(&r.csr, ttl)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        if sans != [identity.clone()] {
            say(format!("DENY {sans:?}"));
            return Err(Status::permission_denied(format!(
                "the token is for {identity}, not {sans:?}"
            )));
        }
        say(format!(
            "ISSUE {identity} ttl={}s cluster={cluster}",
            ttl.as_secs()
        ));
        Ok(Response::new(
            tern_proto::istio_ca::IstioCertificateResponse {
                cert_chain: vec![cert, self.ca.pem()],
            },
        ))
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: std::net::SocketAddr = args[1].parse().expect("ADDR");
    let path = args[2].clone();
    let option = |name: &str, n: usize| -> Option<Vec<String>> {
        let i = args.iter().position(|a| a == name)?;
        Some(args[i + 1..i + 1 + n].to_vec())
    };
    let tls = option("--tls", 2);
    // Token → the identity it stands for (if the file names one).
    let tokens: Option<HashMap<String, Option<String>>> = option("--token", 1).map(|f| {
        std::fs::read_to_string(&f[0])
            .expect("token file")
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                Some((words.next()?.to_owned(), words.next().map(str::to_owned)))
            })
            .collect()
    });
    let (tx, rx) = watch::channel(Arc::new(load(&path).expect("a valid snapshot file")));
    tokio::spawn(async move {
        let mut last = std::fs::read(&path).ok();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = std::fs::read(&path).ok();
            if now != last {
                last = now;
                if let Some(s) = load(&path) {
                    say(format!("PUSH {}", s.version));
                    tx.send_replace(Arc::new(s));
                }
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let mut server = tonic::transport::Server::builder();
    if let Some(files) = tls {
        let cert = std::fs::read(&files[0]).expect("cert");
        let key = std::fs::read(&files[1]).expect("key");
        let identity = tonic::transport::Identity::from_pem(cert, key);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .expect("TLS settings");
    }
    // With --token, streams must carry `authorization: Bearer <token>`, as istiod checks.
    let check = move |mut request: Request<()>| {
        let Some(tokens) = &tokens else {
            return Ok(request);
        };
        let got = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match got
            .as_deref()
            .and_then(|g| g.strip_prefix("Bearer "))
            .and_then(|t| tokens.get(t))
        {
            Some(identity) => {
                if let Some(id) = identity {
                    request.extensions_mut().insert(TokenIdentity(id.clone()));
                }
                Ok(request)
            }
            None => {
                say(format!("REJECT {}", got.as_deref().unwrap_or("no token")));
                Err(Status::unauthenticated("invalid bearer token"))
            }
        }
    };
    let ca = option("--ca", 3).map(|a| {
        let ca = tern_tests::pki::TestCa::load(a[0].as_ref(), a[1].as_ref()).expect("the CA files");
        tern_proto::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer::with_interceptor(
            Ca { ca, identity: a[2].clone() },
            check.clone(),
        )
    });
    say("ready");
    let service =
        AggregatedDiscoveryServiceServer::with_interceptor(ControlPlane { snapshot: rx }, check);
    server
        .add_service(service)
        .add_optional_service(ca)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .expect("serve");
}
