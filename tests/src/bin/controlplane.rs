//! A scriptable xDS control plane for tern's tests: a tonic ADS server (state of the world)
//! over `envoy-types`, serving Istio-shaped resources built from a YAML snapshot file.
//!
//! `tern-controlplane ADDR SNAPSHOT.yaml [--tls CERT KEY] [--token FILE]` serves both ADS protocols (state of the world and
//! delta) and prints `ready`, then one line per event: `STREAM` (or `STREAM delta`), `SUBSCRIBE <type> version=<v> names=<a,b>`, `ACK <type> <version>`,
//! `NACK <type> <version> <reason>`. Rewriting the file pushes a new version to every stream.
//!
//! ```yaml
//! version: "1"
//! services:
//!   - { name: calc, vip: 10.96.0.10, port: 9090, filter: thrift, endpoints: ["10.66.1.2:9001"] }
//! broken_listener: false   # add a listener whose address is a hostname (tern must NACK it)
//! bulk: 0                   # add this many generated services (10 endpoints each)
//! delay_ms: 0               # wait this long before every response (a slow control plane)
//! ```
use std::{
    collections::{BTreeSet, HashMap},
    io::Write,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use tern_proto::{
    Address, Any, Cluster, ClusterLoadAssignment, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    DiscoveryRequest, DiscoveryResponse, Listener, Resource, SocketAddress, TcpProxy, ThriftProxy,
    ThriftRouteConfiguration,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    cluster_types, core_types, encode, endpoint_types, listener_types, tcp_proxy_types,
    thrift_types, type_url, wkt,
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
                endpoints: (0..10)
                    .map(|e| format!("10.200.{}.{}:{}", i / 256, i % 256, 9000 + e))
                    .collect(),
            }
        }));
        all
    }
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

fn addr(ip: &str, port: u32) -> Address {
    Address {
        address: Some(core_types::address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(core_types::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn typed(name: &str, any: Any) -> listener_types::Filter {
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
    typed(
        "envoy.filters.network.tcp_proxy",
        encode(&t, type_url::TCP_PROXY),
    )
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

fn chain(filters: Vec<listener_types::Filter>) -> listener_types::FilterChain {
    listener_types::FilterChain {
        filters,
        ..Default::default()
    }
}

/// The resources of one type in a snapshot, by name, limited to `names` when given.
fn resources(s: &Snapshot, type_url: &str, names: &[String]) -> Vec<(String, Any)> {
    let wanted = |n: &str| names.is_empty() || names.iter().any(|x| x == n);
    match type_url {
        type_url::LISTENER => {
            let mut listeners = vec![Listener {
                name: "virtualOutbound".into(),
                address: Some(addr("0.0.0.0", 15001)),
                use_original_dst: Some(wkt::BoolValue { value: true }),
                default_filter_chain: Some(chain(vec![tcp_proxy("PassthroughCluster")])),
                ..Default::default()
            }];
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
            let mut clusters = vec![Cluster {
                name: "PassthroughCluster".into(),
                cluster_discovery_type: Some(cluster_types::ClusterDiscoveryType::Type(4)),
                lb_policy: 6, // CLUSTER_PROVIDED, as istiod sends it
                ..Default::default()
            }];
            for svc in &s.all_services() {
                clusters.push(Cluster {
                    name: svc.cluster(),
                    cluster_discovery_type: Some(cluster_types::ClusterDiscoveryType::Type(3)),
                    eds_cluster_config: Some(cluster_types::EdsClusterConfig {
                        service_name: svc.cluster(),
                        ..Default::default()
                    }),
                    connect_timeout: Some(wkt::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    ..Default::default()
                });
            }
            clusters
                .iter()
                .map(|c| (c.name.clone(), encode(c, type_url::CLUSTER)))
                .collect()
        }
        type_url::CLUSTER_LOAD_ASSIGNMENT => s
            .all_services()
            .iter()
            .filter(|svc| wanted(&svc.cluster()))
            .map(|svc| {
                let lb_endpoints = svc
                    .endpoints
                    .iter()
                    .map(|e| {
                        let (ip, port) = e.rsplit_once(':').expect("ip:port");
                        endpoint_types::LbEndpoint {
                            health_status: 1,
                            host_identifier: Some(
                                endpoint_types::lb_endpoint::HostIdentifier::Endpoint(
                                    endpoint_types::Endpoint {
                                        address: Some(addr(ip, port.parse().expect("port"))),
                                        ..Default::default()
                                    },
                                ),
                            ),
                            ..Default::default()
                        }
                    })
                    .collect();
                let cla = ClusterLoadAssignment {
                    cluster_name: svc.cluster(),
                    endpoints: vec![endpoint_types::LocalityLbEndpoints {
                        lb_endpoints,
                        ..Default::default()
                    }],
                    ..Default::default()
                };
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
            let mut send = |type_url: &str, names: &[String], s: &Snapshot| {
                nonce += 1;
                DiscoveryResponse {
                    version_info: s.version.clone(),
                    resources: resources(s, type_url, names)
                        .into_iter()
                        .map(|(_, r)| r)
                        .collect(),
                    type_url: type_url.to_owned(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                }
            };
            loop {
                tokio::select! {
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
                            if tx.send(Ok(send(&t, &r.resource_names, &s))).await.is_err() { break }
                        }
                    }
                    changed = snapshot.changed() => {
                        if changed.is_err() { break }
                        let s = snapshot.borrow().clone();
                        for (t, names) in &subscriptions {
                            delay(&s).await;
                            if tx.send(Ok(send(t, names, &s))).await.is_err() { return }
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
            loop {
                tokio::select! {
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
    match serde_yaml::from_str(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            say(format!("ERROR {path}: {e}"));
            None
        }
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
    let token = option("--token", 1).map(|f| {
        std::fs::read_to_string(&f[0])
            .expect("token file")
            .trim()
            .to_owned()
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
    let check = move |request: Request<()>| {
        let Some(want) = &token else {
            return Ok(request);
        };
        let got = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if got == Some(format!("Bearer {want}").as_str()) {
            Ok(request)
        } else {
            say(format!("REJECT {}", got.unwrap_or("no token")));
            Err(Status::unauthenticated("invalid bearer token"))
        }
    };
    say("ready");
    let service =
        AggregatedDiscoveryServiceServer::with_interceptor(ControlPlane { snapshot: rx }, check);
    server
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .expect("serve");
}
