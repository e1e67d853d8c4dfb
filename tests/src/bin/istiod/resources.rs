//! The Istio-shaped resources a snapshot's services make, as istiod generates them:
//! `<vip>_<port>` listeners (a `tcp_proxy`, or a `thrift_proxy` as an EnvoyFilter patches in),
//! EDS clusters (auto-mTLS, SIMPLE TLS, consistent hashing) and their endpoints.
use tern_proto::{
    Any, Cluster, ClusterLoadAssignment, Listener, ThriftProxy, ThriftRouteConfiguration,
    build::{self, address as addr, eds_cluster, filter as typed, tcp_proxy},
    cluster_types, encode, listener_types, thrift_types, type_url, wkt,
};

use crate::{
    dumps::from_dumps,
    inbound::{rbac_filters, virtual_inbound},
    snapshot::Snapshot,
};

/// The resources of one type in a snapshot, by name, limited to `names` when given: those
/// the snapshot generates, then those of its dumps.
pub(crate) fn resources(s: &Snapshot, type_url: &str, names: &[String]) -> Vec<(String, Any)> {
    let mut out = generated(s, type_url, names);
    out.extend(from_dumps(s, type_url, names));
    out
}

/// A `ClusterLoadAssignment` of `ip:port` endpoints.
pub(crate) fn load_assignment(name: &str, endpoints: &[String]) -> ClusterLoadAssignment {
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
                    build::filter_metadata(
                        &mut c.metadata,
                        "padding",
                        "bytes",
                        wkt::Kind::StringValue("x".repeat(s.cluster_padding)),
                    );
                }
                clusters.push(c);
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
