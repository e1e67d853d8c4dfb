//! The xDS path end to end in one process: istiod-shaped resources through the handler
//! (decode, translate, store, publish) into the snapshot the data path reads.
use std::{collections::BTreeMap, sync::Arc};

use tern_proto::{
    Any, Cluster as XdsCluster, ClusterLoadAssignment, Listener as XdsListener,
    ThriftRouteConfiguration,
    build::{address as addr, filter, tcp_proxy},
    core_types, encode, endpoint_types, listener_types, thrift_types, type_url, wkt,
};
use tern_xds_client::{Handler, Update};

use super::{handler::XdsHandler, metrics::ConfigMetrics};
use crate::{
    config::{Config, Filter, Health, LbPolicy, Passthrough, SetAsideReason, Target},
    refusal::Refusal,
    state::{Peeked, Selection, State},
    thrift::{Protocol, Transport},
};

/// Resources by type, decoded (the test builds them; the handler gets them encoded).
#[derive(Default)]
struct Resources {
    listeners: BTreeMap<String, XdsListener>,
    clusters: BTreeMap<String, XdsCluster>,
    endpoints: BTreeMap<String, ClusterLoadAssignment>,
    thrift_routes: BTreeMap<String, ThriftRouteConfiguration>,
}

fn changed<T: prost::Message>(items: &BTreeMap<String, T>, url: &str) -> Update {
    Update {
        changed: items
            .iter()
            .map(|(n, r)| (n.clone(), encode(r, url)))
            .collect(),
        removed: Vec::new(),
    }
}

/// An EDS push of `r`'s endpoints for CALC under the name `name`, its first locality cut to
/// `keep` endpoints (the second keeps its one).
fn push_calc_endpoints(h: &mut XdsHandler, r: &Resources, name: &str, keep: usize) {
    let mut cla = r.endpoints[CALC].clone();
    cla.cluster_name = name.into();
    cla.endpoints[0].lb_endpoints.truncate(keep);
    h.apply(
        type_url::CLUSTER_LOAD_ASSIGNMENT,
        changed(
            &BTreeMap::from([(name.to_string(), cla)]),
            type_url::CLUSTER_LOAD_ASSIGNMENT,
        ),
    )
    .unwrap();
}

/// A handler with every resource of `r` applied in istiod's order (CDS, EDS, LDS).
fn apply_all(r: &Resources) -> (XdsHandler, std::sync::Arc<State>, Vec<String>) {
    let (h, state, rejected, _) = apply_all_counted(r);
    (h, state, rejected)
}

/// [`apply_all`], and the configuration path's metrics it counted, as Prometheus text.
fn apply_all_counted(r: &Resources) -> (XdsHandler, std::sync::Arc<State>, Vec<String>, String) {
    let mut registry = prometheus_client::registry::Registry::with_prefix("tern");
    let metrics = ConfigMetrics::register(&mut registry);
    let state = State::new(Default::default());
    let mut h = XdsHandler::new(state.clone(), Config::default(), metrics);
    let mut rejected = Vec::new();
    for (url, update) in [
        (type_url::CLUSTER, changed(&r.clusters, type_url::CLUSTER)),
        (
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            changed(&r.endpoints, type_url::CLUSTER_LOAD_ASSIGNMENT),
        ),
        (
            type_url::THRIFT_ROUTE_CONFIGURATION,
            changed(&r.thrift_routes, type_url::THRIFT_ROUTE_CONFIGURATION),
        ),
        (
            type_url::LISTENER,
            changed(&r.listeners, type_url::LISTENER),
        ),
    ] {
        if let Err(r) = h.apply(url, update) {
            rejected.extend(r.iter().map(ToString::to_string));
        }
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    (h, state, rejected, text)
}

fn chain(port: Option<u32>, filters: Vec<listener_types::Filter>) -> listener_types::FilterChain {
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
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/xds_translate");
    if std::env::var_os("TERN_UPDATE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (name, bytes) in &seeds {
        let committed = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("seed {name}: {e} (TERN_UPDATE_FUZZ_SEEDS=1 writes it)"));
        assert_eq!(&committed, bytes, "seed {name} is stale");
    }
}

/// A network RBAC filter with one ALLOW policy, as istiod writes it.
fn rbac_filter(
    policy: &str,
    permission: tern_proto::rbac_types::permission::Rule,
    principal: tern_proto::rbac_types::principal::Identifier,
) -> tern_proto::listener_types::Filter {
    use tern_proto::rbac_types;
    let rules = rbac_types::Rbac {
        action: 0,
        policies: [(
            policy.to_owned(),
            rbac_types::Policy {
                permissions: vec![rbac_types::Permission {
                    rule: Some(permission),
                }],
                principals: vec![rbac_types::Principal {
                    identifier: Some(principal),
                }],
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    };
    filter(
        "envoy.filters.network.rbac",
        encode(
            &tern_proto::NetworkRbac {
                rules: Some(rules),
                stat_prefix: "tcp.".into(),
                ..Default::default()
            },
            type_url::NETWORK_RBAC,
        ),
    )
}

/// istiod's network RBAC for `AuthorizationPolicy` ALLOW `from.source.namespaces: [ns]`.
fn allow_namespace(ns: &str) -> tern_proto::listener_types::Filter {
    use tern_proto::{
        matcher_types::{self, filter_state_matcher::Matcher, string_matcher::MatchPattern},
        rbac_types::{permission::Rule, principal::Identifier},
    };
    let by_namespace = matcher_types::StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(matcher_types::RegexMatcher {
            regex: format!(".*/ns/{ns}/.*"),
            ..Default::default()
        })),
        ignore_case: false,
    };
    rbac_filter(
        &format!("ns[{ns}]-policy[allow]-rule[0]"),
        Rule::Any(true),
        Identifier::FilterState(matcher_types::FilterStateMatcher {
            key: "io.istio.peer_principal".into(),
            matcher: Some(Matcher::StringMatch(by_namespace)),
        }),
    )
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
        bind_to_port: Some(wkt::BoolValue { value: false }),
        ..Default::default()
    };
    let thrift = thrift_types::ThriftProxy {
        transport: 1,
        protocol: 3,
        route_config: Some(ThriftRouteConfiguration {
            name: "store".into(),
            routes: vec![thrift_types::Route {
                r#match: Some(thrift_types::RouteMatch {
                    match_specifier: Some(thrift_types::route_match::MatchSpecifier::ServiceName(
                        "Store:".into(),
                    )),
                    ..Default::default()
                }),
                route: Some(thrift_types::RouteAction {
                    cluster_specifier: Some(thrift_types::route_action::ClusterSpecifier::Cluster(
                        CALC.into(),
                    )),
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
        bind_to_port: Some(wkt::BoolValue { value: false }),
        filter_chains: vec![chain(
            None,
            vec![filter(
                "envoy.filters.network.thrift_proxy",
                encode(&thrift, type_url::THRIFT_PROXY),
            )],
        )],
        ..Default::default()
    };
    // Port 8443 takes Istio mTLS, with a TCP AuthorizationPolicy (network RBAC).
    let mut mtls_chain = chain(
        Some(8443),
        vec![allow_namespace("shop"), tcp_proxy("inbound|8080||")],
    );
    mtls_chain.transport_socket = Some(tern_proto::build::istio_downstream_tls("cluster.local"));
    let inbound = XdsListener {
        name: "virtualInbound".into(),
        address: Some(addr("0.0.0.0", 15006)),
        filter_chains: vec![
            chain(Some(8080), vec![tcp_proxy("inbound|8080||")]),
            mtls_chain,
        ],
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
    let mut eds = eds;
    tern_proto::build::istio_auto_mtls(
        &mut eds,
        "spiffe://cluster.local/ns/default/sa/calc",
        "outbound_.9090_._.calc.default.svc.cluster.local",
    );
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
                lb_endpoints: vec![
                    // One metadata key per endpoint: prost encodes a map in hash order,
                    // and the seeds must not change from run to run.
                    {
                        // A Pod with a sidecar: mTLS.
                        let mut e = lb("10.0.0.1", 1);
                        tern_proto::build::istio_tls_mode(&mut e);
                        e
                    },
                    {
                        // Its workload, for Istio's metrics.
                        let mut e = lb("10.0.0.2", 3);
                        tern_proto::build::istio_workload(
                            &mut e,
                            "calc-v1;default;calc;v1;Kubernetes",
                        );
                        e
                    },
                ],
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
    let (_, state, rejected) = apply_all(&istiod());
    assert!(rejected.is_empty(), "{rejected:?}");
    assert!(state.ready());
    let snap = state.load();
    let c = &snap.config;
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
    assert_eq!(
        calc.outlier, None,
        "outlier detection only where a cluster asks"
    );
    assert_eq!(calc.endpoints.len(), 3);
    assert_eq!(calc.endpoints[1].health, Health::Draining);
    assert_eq!(
        (calc.endpoints[2].priority, &*calc.endpoints[0].locality),
        (1, "r/a/")
    );
    assert_eq!(calc.locality_weights[&Arc::<str>::from("r/a/")], 2);
    assert!(c.clusters["inbound|8080||"].original_dst);
    match snap.select(
        "10.96.0.10:9090".parse().unwrap(),
        "10.0.9.9:1".parse().unwrap(),
        &Peeked::default(),
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
        &Peeked::default(),
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
            "10.0.9.9:1".parse().unwrap(),
            &Peeked::default()
        ),
        Selection::Refused(Refusal::RegistryOnly)
    ));
    // An inbound port no chain matches is refused, as Envoy does.
    assert!(matches!(
        snap.select_inbound(
            "10.0.0.5:9999".parse().unwrap(),
            "10.0.9.9:1".parse().unwrap(),
            &Peeked::default()
        ),
        Selection::Refused(Refusal::NoFilterChain)
    ));
}

/// One corrupt cluster and one unusable listener: they are refused by name, everything
/// else applies, and a later good version replaces the refusal.
#[test]
fn a_bad_resource_is_refused_by_name_and_the_rest_applies() {
    let (mut h, state, _) = apply_all(&istiod());
    let mut corrupt = encode(
        &XdsCluster {
            name: "outbound|7070||corrupt.default.svc.cluster.local".into(),
            ..Default::default()
        },
        type_url::CLUSTER,
    );
    corrupt.value.extend_from_slice(&[0xff, 0xff]);
    let good = XdsCluster {
        name: "outbound|6060||good.default.svc.cluster.local".into(),
        ..Default::default()
    };
    let err = h
        .apply(
            type_url::CLUSTER,
            Update {
                changed: vec![
                    (
                        "outbound|7070||corrupt.default.svc.cluster.local".into(),
                        corrupt,
                    ),
                    (good.name.clone(), encode(&good, type_url::CLUSTER)),
                ],
                removed: Vec::new(),
            },
        )
        .unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(
        err[0].name,
        "outbound|7070||corrupt.default.svc.cluster.local"
    );
    let snap = state.load();
    assert!(
        snap.clusters.contains_key(good.name.as_str()),
        "the good cluster serves"
    );
    assert!(
        snap.clusters.contains_key(CALC),
        "clusters held before stay"
    );

    let hostname = XdsListener {
        name: "broken_9999".into(),
        address: Some(addr("calc.default.svc", 9999)),
        bind_to_port: Some(wkt::BoolValue { value: false }),
        ..Default::default()
    };
    let err = h
        .apply(
            type_url::LISTENER,
            changed(
                &BTreeMap::from([(hostname.name.clone(), hostname)]),
                type_url::LISTENER,
            ),
        )
        .unwrap_err();
    let message = err[0].to_string();
    assert!(
        message.contains("broken_9999") && message.contains("not an IP"),
        "{message}"
    );
    assert_eq!(
        state.load().config.listeners.len(),
        2,
        "the other listeners stay"
    );
}

/// What istiod sends that tern does not run is set aside and counted, never refused; an
/// authorization filter tern cannot enforce refuses its listener.
#[test]
fn set_aside_listeners_tls_chains_and_network_rbac() {
    let mut r = istiod();
    let internal = XdsListener {
        name: "connect_originate".into(),
        listener_specifier: Some(
            listener_types::listener::ListenerSpecifier::InternalListener(Default::default()),
        ),
        filter_chains: vec![chain(None, vec![tcp_proxy(CALC)])],
        ..Default::default()
    };
    let terminate = XdsListener {
        name: "connect_terminate".into(),
        address: Some(addr("0.0.0.0", 15008)),
        filter_chains: vec![chain(None, vec![tcp_proxy(CALC)])],
        ..Default::default()
    };
    let hcm = filter(
        "envoy.filters.network.http_connection_manager",
        encode(
            &tern_proto::HttpConnectionManager::default(),
            type_url::HTTP_CONNECTION_MANAGER,
        ),
    );
    let mut tls_chain = chain(Some(8443), vec![tcp_proxy("inbound|8080||")]);
    tls_chain.name = "tls".into();
    tls_chain.transport_socket = Some(tern_proto::build::istio_downstream_tls("cluster.local"));
    let mut http_chain = chain(Some(8080), vec![hcm]);
    http_chain.name = "http".into();
    let inbound = r.listeners.get_mut("virtualInbound").unwrap();
    inbound.filter_chains.push(tls_chain);
    inbound.filter_chains.push(http_chain);
    for l in [internal, terminate] {
        r.listeners.insert(l.name.clone(), l);
    }
    let (mut h, state, rejected, metrics) = apply_all_counted(&r);
    assert!(rejected.is_empty(), "{rejected:?}");
    let snap = state.load();
    let reasons: Vec<(&str, &str, SetAsideReason)> = snap
        .config
        .set_aside
        .iter()
        .map(|s| (s.kind, s.name.as_str(), s.reason))
        .collect();
    assert!(
        reasons.contains(&(
            "listener",
            "connect_originate",
            SetAsideReason::InternalListener
        )),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&(
            "listener",
            "connect_terminate",
            SetAsideReason::BoundListener
        )),
        "{reasons:?}"
    );
    // The chain that terminates TLS runs, with its TLS server.
    let inbound = snap.config.inbound.as_ref().expect("virtualInbound");
    let tls_chain = inbound
        .filter_chains
        .iter()
        .find(|c| c.name == "tls")
        .unwrap();
    assert!(tls_chain.tls.is_some());
    assert!(snap.server_tls("virtualInbound", "tls").is_some());
    assert!(
        reasons.contains(&("filter_chain", "virtualInbound/http", SetAsideReason::Http)),
        "{reasons:?}"
    );
    assert!(
        metrics.contains(r#"tern_xds_set_aside{kind="listener",reason="internal_listener"} 1"#),
        "{metrics}"
    );

    // Network RBAC in virtualInbound is enforced; a rule it cannot decide on a connection
    // (an HTTP header) refuses the listener, which is never run without its policy.
    use tern_proto::rbac_types::{permission::Rule, principal::Identifier};
    let any_peer = |permission| {
        rbac_filter(
            "ns[default]-policy[p]-rule[0]",
            permission,
            Identifier::Any(true),
        )
    };
    let with = |rbac| {
        let mut inbound = r.listeners["virtualInbound"].clone();
        inbound.filter_chains[0].filters.insert(0, rbac);
        changed(
            &BTreeMap::from([(inbound.name.clone(), inbound)]),
            type_url::LISTENER,
        )
    };
    h.apply(
        type_url::LISTENER,
        with(any_peer(Rule::DestinationPort(8080))),
    )
    .unwrap();
    let snap = state.load();
    let chain = &snap.config.inbound.as_ref().unwrap().filter_chains[0];
    assert_eq!(chain.rbac.len(), 1, "{chain:?}");
    assert!(state.ready());
    let err = h
        .apply(
            type_url::LISTENER,
            with(any_peer(Rule::Header(Default::default()))),
        )
        .unwrap_err();
    assert!(
        err[0].to_string().contains("header permission"),
        "{}",
        err[0]
    );
    // A refused inbound listener closes inbound (never the previous policy) and tern is no
    // longer ready.
    let snap = state.load();
    assert!(snap.config.inbound.is_none());
    assert_eq!(snap.config.no_inbound, crate::config::NoInbound::Refused);
    assert!(matches!(
        snap.select_inbound(
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:1".parse().unwrap(),
            &Peeked::default()
        ),
        Selection::Refused(Refusal::InboundListenerRefused)
    ));
    assert!(!state.ready());
    // istiod's empty rules (`rules: {}`): ALLOW with no policy, which denies every connection.
    let empty = filter(
        "envoy.filters.network.rbac",
        encode(
            &tern_proto::NetworkRbac {
                rules: Some(Default::default()),
                ..Default::default()
            },
            type_url::NETWORK_RBAC,
        ),
    );
    h.apply(type_url::LISTENER, with(empty)).unwrap();
    assert!(state.ready());
    let snap = state.load();
    let rbac = &snap.config.inbound.as_ref().unwrap().filter_chains[0].rbac[0];
    let attrs = crate::config::rbac::Attributes {
        source: "10.0.0.1:1".parse().unwrap(),
        destination: "10.0.0.2:8080".parse().unwrap(),
        principal: Some("spiffe://cluster.local/ns/a/sa/b"),
        server_name: None,
        thrift: None,
    };
    assert!(!rbac.decide(&attrs).allowed);
}

/// An EDS change rebuilds its one cluster; every other cluster keeps its state (picker,
/// pools, outlier state) by pointer.
#[test]
fn an_endpoint_change_touches_only_its_cluster() {
    let mut r = istiod();
    let other = XdsCluster {
        name: "outbound|80||other.default.svc.cluster.local".into(),
        cluster_discovery_type: Some(tern_proto::cluster_types::ClusterDiscoveryType::Type(3)),
        ..Default::default()
    };
    r.endpoints.insert(
        other.name.clone(),
        ClusterLoadAssignment {
            cluster_name: other.name.clone(),
            ..r.endpoints[CALC].clone()
        },
    );
    r.clusters.insert(other.name.clone(), other.clone());
    let (mut h, state, _) = apply_all(&r);
    let before = state.load();
    push_calc_endpoints(&mut h, &r, CALC, 1);
    let after = state.load();
    assert_eq!(after.clusters[CALC].endpoints.len(), 2);
    assert!(!std::sync::Arc::ptr_eq(
        &before.clusters[CALC],
        &after.clusters[CALC]
    ));
    assert!(std::sync::Arc::ptr_eq(
        &before.clusters[other.name.as_str()],
        &after.clusters[other.name.as_str()]
    ));
    assert!(
        std::sync::Arc::ptr_eq(
            &before.clusters[CALC].endpoints[0].runtime,
            &after.clusters[CALC].endpoints[0].runtime
        ),
        "a kept endpoint keeps its runtime"
    );
}

/// A changed cluster waiting for its new endpoints keeps its previous version in force; a
/// new one waits outside; neither holds anything else back.
#[test]
fn warming_is_per_cluster() {
    let r = istiod();
    let (mut h, state, _) = apply_all(&r);
    // CALC now reads endpoints under another name, not sent yet.
    let mut moved = r.clusters[CALC].clone();
    moved.eds_cluster_config = Some(tern_proto::cluster_types::EdsClusterConfig {
        service_name: "calc-v2".into(),
        ..Default::default()
    });
    moved.lb_policy = 0;
    let fresh = XdsCluster {
        name: "outbound|81||fresh.default.svc.cluster.local".into(),
        cluster_discovery_type: Some(tern_proto::cluster_types::ClusterDiscoveryType::Type(3)),
        ..Default::default()
    };
    let static_one = XdsCluster {
        name: "static".into(),
        ..Default::default()
    };
    h.apply(
        type_url::CLUSTER,
        changed(
            &BTreeMap::from([
                (CALC.to_string(), moved),
                (fresh.name.clone(), fresh.clone()),
                ("static".to_string(), static_one),
            ]),
            type_url::CLUSTER,
        ),
    )
    .unwrap();
    let snap = state.load();
    assert_eq!(
        snap.clusters[CALC].config.lb_policy,
        LbPolicy::LeastRequest,
        "the old version serves"
    );
    assert!(
        !snap.clusters.contains_key(fresh.name.as_str()),
        "a new cluster waits for its endpoints"
    );
    assert!(
        snap.clusters.contains_key("static"),
        "the rest applies at once"
    );
    let mut cla = r.endpoints[CALC].clone();
    cla.cluster_name = "calc-v2".into();
    h.apply(
        type_url::CLUSTER_LOAD_ASSIGNMENT,
        changed(
            &BTreeMap::from([("calc-v2".to_string(), cla)]),
            type_url::CLUSTER_LOAD_ASSIGNMENT,
        ),
    )
    .unwrap();
    assert_eq!(
        state.load().clusters[CALC].config.lb_policy,
        LbPolicy::RoundRobin
    );
}

/// An EDS push rebuilds exactly the clusters that read that name: both clusters that share
/// it, and not one that moved to another name.
#[test]
fn an_eds_push_rebuilds_the_clusters_that_read_its_name() {
    let r = istiod();
    let (mut h, state, _) = apply_all(&r);
    // A second cluster reads CALC's endpoints; CALC's own cluster moves to "calc-v2".
    let twin = XdsCluster {
        name: "outbound|9091||twin.default.svc.cluster.local".into(),
        eds_cluster_config: Some(tern_proto::cluster_types::EdsClusterConfig {
            service_name: CALC.into(),
            ..Default::default()
        }),
        ..r.clusters[CALC].clone()
    };
    h.apply(
        type_url::CLUSTER,
        changed(
            &BTreeMap::from([(twin.name.clone(), twin.clone())]),
            type_url::CLUSTER,
        ),
    )
    .unwrap();
    push_calc_endpoints(&mut h, &r, CALC, 1);
    let snap = state.load();
    assert_eq!(snap.clusters[CALC].endpoints.len(), 2);
    assert_eq!(snap.clusters[twin.name.as_str()].endpoints.len(), 2);

    let mut moved = r.clusters[CALC].clone();
    moved.eds_cluster_config = Some(tern_proto::cluster_types::EdsClusterConfig {
        service_name: "calc-v2".into(),
        ..Default::default()
    });
    h.apply(
        type_url::CLUSTER,
        changed(
            &BTreeMap::from([(CALC.to_string(), moved)]),
            type_url::CLUSTER,
        ),
    )
    .unwrap();
    push_calc_endpoints(&mut h, &r, "calc-v2", 2);
    let before = state.load();
    assert_eq!(before.clusters[CALC].endpoints.len(), 3);
    push_calc_endpoints(&mut h, &r, CALC, 0);
    let after = state.load();
    assert_eq!(after.clusters[twin.name.as_str()].endpoints.len(), 1);
    assert!(
        std::sync::Arc::ptr_eq(&before.clusters[CALC], &after.clusters[CALC]),
        "a cluster that reads another name is not rebuilt"
    );
    let tern_xds_client::handler::Interest::Names(names) =
        h.interest(type_url::CLUSTER_LOAD_ASSIGNMENT)
    else {
        panic!("EDS asks for names");
    };
    assert!(
        names.contains("calc-v2") && names.contains(CALC),
        "EDS asks for the names the clusters read: {names:?}"
    );
}

/// The listeners and inbound policy a configuration carries are kept between EDS pushes; a
/// policy pushed after them still takes effect at once, and so does its removal (inbound
/// closes, it does not keep the cached policy).
#[test]
fn a_policy_pushed_after_eds_pushes_is_in_force() {
    use tern_proto::rbac_types::{permission::Rule, principal::Identifier};
    let r = istiod();
    let (mut h, state, _) = apply_all(&r);
    let eds = |h: &mut XdsHandler, keep: usize| push_calc_endpoints(h, &r, CALC, keep);
    eds(&mut h, 1);
    let before = state.load();
    eds(&mut h, 2);
    let after = state.load();
    assert!(
        std::sync::Arc::ptr_eq(&before.config.listeners, &after.config.listeners),
        "an EDS push shares the listener list"
    );
    assert!(
        after.config.inbound.as_ref().unwrap().filter_chains[0]
            .rbac
            .is_empty()
    );

    let mut inbound = r.listeners["virtualInbound"].clone();
    inbound.filter_chains[0].filters.insert(
        0,
        rbac_filter(
            "ns[default]-policy[p]-rule[0]",
            Rule::DestinationPort(8080),
            Identifier::Any(true),
        ),
    );
    h.apply(
        type_url::LISTENER,
        changed(
            &BTreeMap::from([(inbound.name.clone(), inbound.clone())]),
            type_url::LISTENER,
        ),
    )
    .unwrap();
    eds(&mut h, 1);
    let snap = state.load();
    assert_eq!(
        snap.config.inbound.as_ref().unwrap().filter_chains[0]
            .rbac
            .len(),
        1,
        "the policy pushed after the EDS pushes is in force, and stays through the next"
    );

    h.apply(
        type_url::LISTENER,
        Update {
            changed: Vec::new(),
            removed: vec![inbound.name.clone()],
        },
    )
    .unwrap();
    eds(&mut h, 2);
    let snap = state.load();
    assert!(snap.config.inbound.is_none(), "no cached inbound policy");
    assert!(matches!(
        snap.select_inbound(
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:1".parse().unwrap(),
            &Peeked::default()
        ),
        Selection::Refused(Refusal::AwaitingPolicy)
    ));
}

/// Chains that match on the first bytes: istiod's HTTP chain (`raw_buffer` with
/// `http/1.1`/`h2c`), its TLS chains, and the listener's default chain for the rest.
#[test]
fn chains_match_on_tls_alpn_and_http_with_the_default_chain_last() {
    let mut r = istiod();
    let hcm = filter(
        "envoy.filters.network.http_connection_manager",
        encode(
            &tern_proto::HttpConnectionManager::default(),
            type_url::HTTP_CONNECTION_MANAGER,
        ),
    );
    let mut http = chain(None, vec![hcm]);
    http.filter_chain_match = Some(listener_types::FilterChainMatch {
        transport_protocol: "raw_buffer".into(),
        application_protocols: vec!["http/1.1".into(), "h2c".into()],
        ..Default::default()
    });
    let mut mtls = chain(None, vec![tcp_proxy(CALC)]);
    mtls.name = "mtls".into();
    mtls.filter_chain_match = Some(listener_types::FilterChainMatch {
        transport_protocol: "tls".into(),
        application_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
        server_names: vec!["*.cluster.local".into()],
        ..Default::default()
    });
    let zipkin = XdsListener {
        name: "0.0.0.0_9411".into(),
        address: Some(addr("0.0.0.0", 9411)),
        filter_chains: vec![http, mtls],
        default_filter_chain: Some(chain(None, vec![tcp_proxy("inbound|8080||")])),
        bind_to_port: Some(wkt::BoolValue { value: false }),
        ..Default::default()
    };
    r.listeners.insert(zipkin.name.clone(), zipkin);
    let (_, state, rejected) = apply_all(&r);
    assert!(rejected.is_empty(), "{rejected:?}");
    let snap = state.load();
    let dst = "10.96.3.3:9411".parse().unwrap();
    assert!(snap.needs_inspection(dst, false));
    assert!(!snap.needs_inspection("10.96.0.10:9090".parse().unwrap(), false));
    let chain_for = |peeked: Peeked| match snap.select(dst, "10.0.9.9:1".parse().unwrap(), &peeked)
    {
        Selection::Chain(_, c) => c.name.clone(),
        other => panic!("{other:?}"),
    };
    let http11 = ["http/1.1".to_string()];
    assert_eq!(
        chain_for(Peeked {
            application_protocols: &http11,
            ..Peeked::default()
        }),
        "0.0.0.0_9411#0"
    );
    assert_eq!(chain_for(Peeked::default()), "0.0.0.0_9411#default");
    let istio = ["istio-peer-exchange".to_string(), "istio".to_string()];
    let tls = |sni| Peeked {
        tls: true,
        application_protocols: &istio,
        server_name: sni,
    };
    assert_eq!(
        chain_for(tls(Some("outbound_.9411_._.zipkin.cluster.local"))),
        "mtls"
    );
    assert_eq!(chain_for(tls(Some("example.com"))), "0.0.0.0_9411#default");
    assert_eq!(chain_for(tls(None)), "0.0.0.0_9411#default");
}

/// Inbound is closed until the control plane's inbound listener is in force: before the
/// first configuration, with listeners and clusters but no `virtualInbound`, and readiness
/// waits for it.
#[test]
fn inbound_is_closed_until_its_listener_is_in_force() {
    let mut r = istiod();
    let inbound = r.listeners.remove("virtualInbound").unwrap();
    let (mut h, state, rejected) = apply_all(&r);
    assert!(rejected.is_empty(), "{rejected:?}");
    let snap = state.load();
    assert_eq!(
        snap.config.no_inbound,
        crate::config::NoInbound::AwaitingPolicy
    );
    assert!(matches!(
        snap.select_inbound(
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:1".parse().unwrap(),
            &Peeked::default()
        ),
        Selection::Refused(Refusal::AwaitingPolicy)
    ));
    assert!(!state.ready(), "ready without inbound policy");
    h.apply(
        type_url::LISTENER,
        changed(
            &BTreeMap::from([(inbound.name.clone(), inbound)]),
            type_url::LISTENER,
        ),
    )
    .unwrap();
    assert!(state.load().config.inbound.is_some());
    assert!(state.ready());
    // A static configuration without a control plane keeps its passthrough.
    assert_eq!(
        Config::default().no_inbound,
        crate::config::NoInbound::Passthrough
    );
}

/// A listener that says `use_original_dst` is read only for its passthrough cluster: one
/// named `virtualInbound`, or carrying RBAC, is refused rather than misread.
#[test]
fn roles_are_not_taken_from_shape() {
    use tern_proto::rbac_types::{permission::Rule, principal::Identifier};
    let mut r = istiod();
    let inbound = r.listeners.get_mut("virtualInbound").unwrap();
    inbound.use_original_dst = Some(wkt::BoolValue { value: true });
    let (_, state, rejected) = apply_all(&r);
    assert!(
        rejected
            .iter()
            .any(|e| e.contains("virtualInbound with use_original_dst")),
        "{rejected:?}"
    );
    assert_eq!(
        state.load().config.no_inbound,
        crate::config::NoInbound::Refused
    );
    let mut r = istiod();
    let outbound = r.listeners.get_mut("virtualOutbound").unwrap();
    outbound
        .default_filter_chain
        .as_mut()
        .unwrap()
        .filters
        .insert(0, rbac_filter("p", Rule::Any(true), Identifier::Any(true)));
    let (_, _, rejected) = apply_all(&r);
    assert!(
        rejected.iter().any(|e| e.contains("use_original_dst")),
        "{rejected:?}"
    );
}

/// HTTP chains are relayed as TCP with their HTTP RBAC decided as istiod decides a TCP
/// policy: an ALLOW rule that needs HTTP attributes never matches, a DENY rule matches on
/// its L4 parts. A chain with a filter tern cannot run (ext_authz, jwt_authn, anything
/// unknown) refuses its connections, visibly; a network filter tern does not know does too.
#[test]
#[allow(deprecated)]
fn http_policy_on_connections_and_unenforceable_chains() {
    use tern_proto::rbac_types::{self, permission::Rule, principal::Identifier};
    let http_rbac = |action: i32, policies: Vec<(&str, Vec<Rule>, Vec<Identifier>)>| {
        let rules = rbac_types::Rbac {
            action,
            policies: policies
                .into_iter()
                .map(|(name, perms, ids)| {
                    (
                        name.to_owned(),
                        rbac_types::Policy {
                            permissions: perms
                                .into_iter()
                                .map(|r| rbac_types::Permission { rule: Some(r) })
                                .collect(),
                            principals: ids
                                .into_iter()
                                .map(|i| rbac_types::Principal {
                                    identifier: Some(i),
                                })
                                .collect(),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            ..Default::default()
        };
        tern_proto::hcm_types::HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(tern_proto::hcm_types::http_filter::ConfigType::TypedConfig(
                encode(
                    &tern_proto::HttpRbac {
                        rules: Some(rules),
                        ..Default::default()
                    },
                    type_url::HTTP_RBAC,
                ),
            )),
            ..Default::default()
        }
    };
    let other_filter = |name: &str, url: &str| tern_proto::hcm_types::HttpFilter {
        name: name.into(),
        config_type: Some(tern_proto::hcm_types::http_filter::ConfigType::TypedConfig(
            Any {
                type_url: url.into(),
                value: Vec::new(),
            },
        )),
        ..Default::default()
    };
    let router = other_filter(
        "envoy.filters.http.router",
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    );
    let hcm = |filters: Vec<tern_proto::hcm_types::HttpFilter>| {
        filter(
            "envoy.filters.network.http_connection_manager",
            encode(
                &tern_proto::HttpConnectionManager {
                    http_filters: filters,
                    ..Default::default()
                },
                type_url::HTTP_CONNECTION_MANAGER,
            ),
        )
    };
    let header = || Rule::Header(Default::default());
    let peer = |p: &str| {
        Identifier::Authenticated(rbac_types::principal::Authenticated {
            principal_name: Some(tern_proto::matcher_types::StringMatcher {
                match_pattern: Some(
                    tern_proto::matcher_types::string_matcher::MatchPattern::Exact(p.into()),
                ),
                ..Default::default()
            }),
        })
    };
    let mut r = istiod();
    let inbound = r.listeners.get_mut("virtualInbound").unwrap();
    let mut named = |name: &str, port: u32, filters| {
        let mut c = chain(Some(port), filters);
        c.name = name.into();
        inbound.filter_chains.push(c);
    };
    // ALLOW: a GET-only rule for `sleep` never matches; a port rule for `admin` does.
    named(
        "allow",
        8001,
        vec![hcm(vec![
            http_rbac(
                0,
                vec![
                    ("get-only", vec![header()], vec![peer("spiffe://td/sleep")]),
                    (
                        "port",
                        vec![Rule::DestinationPort(8001)],
                        vec![peer("spiffe://td/admin")],
                    ),
                ],
            ),
            router.clone(),
        ])],
    );
    // DENY: "deny POST from anyone not carrying a JWT" becomes "deny everyone".
    named(
        "deny",
        8002,
        vec![hcm(vec![
            http_rbac(
                1,
                vec![(
                    "no-jwt",
                    vec![header()],
                    vec![Identifier::NotId(Box::new(rbac_types::Principal {
                        identifier: Some(Identifier::Metadata(Default::default())),
                    }))],
                )],
            ),
            router.clone(),
        ])],
    );
    named(
        "ext-authz",
        8003,
        vec![hcm(vec![
            other_filter("envoy.filters.http.ext_authz", type_url::HTTP_EXT_AUTHZ),
            router.clone(),
        ])],
    );
    named(
        "jwt",
        8004,
        vec![hcm(vec![
            other_filter(
                "envoy.filters.http.jwt_authn",
                "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            ),
            router,
        ])],
    );
    named(
        "unknown-network",
        8005,
        vec![
            filter(
                "envoy.filters.network.local_ratelimit",
                Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit".into(),
                    value: Vec::new(),
                },
            ),
            tcp_proxy("inbound|8005||"),
        ],
    );
    named(
        "network-ext-authz",
        8006,
        vec![
            filter(
                "envoy.filters.network.ext_authz",
                Any {
                    type_url: type_url::NETWORK_EXT_AUTHZ.into(),
                    value: Vec::new(),
                },
            ),
            tcp_proxy("inbound|8006||"),
        ],
    );
    let (_, state, rejected, metrics) = apply_all_counted(&r);
    assert!(rejected.is_empty(), "{rejected:?}");
    let snap = state.load();
    let inbound = snap.config.inbound.as_ref().unwrap();
    let decide = |chain: &str, port: u16, principal: &str| {
        let c = inbound
            .filter_chains
            .iter()
            .find(|c| c.name == chain)
            .unwrap();
        assert_eq!(c.filter, Filter::Passthrough, "{chain}");
        let attrs = crate::config::rbac::Attributes {
            source: "10.0.0.1:1".parse().unwrap(),
            destination: std::net::SocketAddr::from(([10, 0, 0, 2], port)),
            principal: Some(principal),
            server_name: None,
            thrift: None,
        };
        c.rbac.iter().all(|f| f.decide(&attrs).allowed)
    };
    assert!(!decide("allow", 8001, "spiffe://td/sleep"));
    assert!(decide("allow", 8001, "spiffe://td/admin"));
    assert!(!decide("deny", 8002, "spiffe://td/sleep"));
    assert!(!decide("deny", 8002, "spiffe://td/admin"));
    for (chain, filter) in [
        ("ext-authz", "envoy.filters.http.ext_authz"),
        ("jwt", "envoy.filters.http.jwt_authn"),
        ("unknown-network", "envoy.filters.network.local_ratelimit"),
        ("network-ext-authz", "envoy.filters.network.ext_authz"),
    ] {
        let c = inbound
            .filter_chains
            .iter()
            .find(|c| c.name == chain)
            .unwrap();
        assert_eq!(c.filter, Filter::Refuse, "{chain}");
        let s = snap
            .config
            .set_aside
            .iter()
            .find(|s| s.name == format!("virtualInbound/{chain}"))
            .unwrap();
        assert_eq!(s.reason, SetAsideReason::Unenforceable);
        assert_eq!(s.filter.as_deref(), Some(filter));
    }
    assert!(
        metrics
            .contains(r#"tern_xds_set_aside{kind="filter_chain",reason="unenforceable_filter"} 4"#),
        "{metrics}"
    );
}
