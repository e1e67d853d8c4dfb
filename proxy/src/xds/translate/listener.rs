//! A `Listener` into tern's model.
//!
//! - `virtualOutbound` (`use_original_dst`) is tern's own outbound listener: only the cluster
//!   its catch-all chain (or default chain) goes to is read — `BlackHoleCluster` means
//!   unknown destinations are refused (`REGISTRY_ONLY`), anything else relays them. Such a
//!   listener that carries authorization, or is named `virtualInbound`, is refused: its
//!   policy would be dropped;
//! - `virtualInbound` supplies the inbound filter chains;
//! - listeners bound to no port (`<vip>_<port>`, `0.0.0.0_<port>`) are matched against
//!   original destinations, with each chain's `tcp_proxy` or `thrift_proxy`;
//! - internal listeners and listeners bound to ports of their own (HBONE) are set aside.
//!
//! Per chain, nothing is skipped that could decide a connection's fate: filters that only
//! observe (stats, metadata exchange, peer authentication metadata) are skipped; RBAC filters
//! are enforced ([`super::rbac`]), network and HTTP alike; TLS is terminated where the chain
//! has a `DownstreamTlsContext` ([`super::tls`]); an HTTP connection manager chain is relayed
//! as TCP to its original destination after its RBAC; a chain with anything else (ext_authz,
//! jwt_authn, Wasm, Lua, ECDS, a filter tern does not know) is set aside and refuses its
//! connections, never relays them. An RBAC rule tern cannot decide refuses the listener.
use std::{collections::BTreeMap, sync::Arc};

use tern_proto::{
    Listener as XdsListener, TcpProxy, ThriftProxy as XdsThrift, ThriftRouteConfiguration, decode,
    listener_types, type_url,
};

use super::{Invalid, SetAsideReason, TranslateError, cidrs, socket_addr, typed_config};
use crate::{
    config::{
        ChainMatch, Filter, FilterChain, Listener, Passthrough, Route, RouteAction, RouteMatch,
        Target, ThriftProxy, rbac::Rbac,
    },
    thrift::{Protocol, Transport},
};

/// Istio's inbound listener, by its name.
pub const VIRTUAL_INBOUND: &str = "virtualInbound";

/// What a listener becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum ListenerKind {
    /// Istio's `virtualOutbound`: what happens to destinations no listener matches.
    VirtualOutbound(Passthrough),
    /// Istio's `virtualInbound` (shared like an outbound listener).
    Inbound(Arc<Listener>),
    /// A listener matched against original destinations (shared by the configurations
    /// built while it does not change).
    Outbound(Arc<Listener>),
    /// Not run at all.
    SetAside(SetAsideReason),
}

/// A translated listener, the chains it set aside, and the Thrift route configurations it
/// names (it is translated again when they change).
#[derive(Clone, Debug, PartialEq)]
pub struct Translated {
    pub kind: ListenerKind,
    pub set_aside_chains: Vec<ChainSetAside>,
    pub thrift_routes: Vec<String>,
}

/// A chain set aside, why, and the filter that made it so.
#[derive(Clone, Debug, PartialEq)]
pub struct ChainSetAside {
    pub name: String,
    pub reason: SetAsideReason,
    pub filter: Option<String>,
}

/// Translates one listener; `routes` are the Thrift route configurations held.
pub fn translate(
    l: &XdsListener,
    routes: &BTreeMap<String, ThriftRouteConfiguration>,
) -> Result<Translated, TranslateError> {
    let thrift_routes = trds_names(l);
    let done = |kind| Translated {
        kind,
        set_aside_chains: Vec::new(),
        thrift_routes: thrift_routes.clone(),
    };
    let inbound = l.name == VIRTUAL_INBOUND;
    if l.use_original_dst.is_some_and(|b| b.value) {
        // Only the passthrough cluster of such a listener is read: one that carries policy
        // (or names itself the inbound listener) would have that policy dropped.
        if inbound {
            return Err(Invalid::Unenforceable("virtualInbound with use_original_dst").at(""));
        }
        if carries_policy(l) {
            return Err(Invalid::Unenforceable(
                "authorization filters on a use_original_dst listener",
            )
            .at(""));
        }
        return Ok(done(ListenerKind::VirtualOutbound(passthrough_mode(l))));
    }
    let internal = matches!(
        l.listener_specifier,
        Some(listener_types::listener::ListenerSpecifier::InternalListener(_))
    );
    if internal || is_internal_address(l) {
        return Ok(done(ListenerKind::SetAside(
            SetAsideReason::InternalListener,
        )));
    }
    let address = socket_addr(l.address.as_ref()).map_err(|e| e.at("address"))?;
    // Listeners other than Istio's two that bind a port (HBONE's connect_terminate): tern
    // listens on 15001 and 15006 only, so nothing ever reaches them.
    // Istio before 1.10 says it in `deprecated_v1`.
    #[allow(deprecated)]
    let bind_to_port = l
        .bind_to_port
        .or_else(|| l.deprecated_v1.as_ref().and_then(|d| d.bind_to_port))
        .is_none_or(|b| b.value);
    if !inbound && bind_to_port {
        return Ok(done(ListenerKind::SetAside(SetAsideReason::BoundListener)));
    }
    let mut chains = Vec::with_capacity(l.filter_chains.len() + 1);
    let mut set_aside_chains = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    let listed = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (c, i.to_string()));
    let default = l
        .default_filter_chain
        .iter()
        .map(|c| (c, "default".to_owned()));
    for (c, index) in listed.chain(default) {
        let is_default = index == "default";
        // A connection finds its chain again by name in later snapshots, so names are made
        // unique (istiod gives several of virtualInbound's chains the same one).
        let name = match c.name.as_str() {
            "" => format!("{}#{index}", l.name),
            n if used.contains(n) => format!("{n}#{index}"),
            n => n.to_owned(),
        };
        used.insert(name.clone());
        let context = format!("filter chain {name}");
        let at = |e: Invalid| e.at(context.clone());
        let (filter, rbac) = chain_filter(c, routes).map_err(at)?;
        let filter = match filter {
            ChainFilter::Run(f) => f,
            ChainFilter::Pending => continue,
            ChainFilter::SetAside(reason, filter) => {
                if reason == SetAsideReason::Unenforceable {
                    tracing::warn!(listener = %l.name, chain = %name, filter = filter.as_deref().unwrap_or("-"), "a filter tern cannot enforce: the chain refuses its connections");
                }
                set_aside_chains.push(ChainSetAside {
                    name: name.clone(),
                    reason,
                    filter,
                });
                match reason {
                    SetAsideReason::Http => Filter::Passthrough,
                    SetAsideReason::NoFilter => continue,
                    _ => Filter::Refuse,
                }
            }
        };
        let m = c.filter_chain_match.clone().unwrap_or_default();
        let destination_port = m
            .destination_port
            .map(|p| u16::try_from(p.value).map_err(|_| Invalid::PortOutOfRange(p.value.into())))
            .transpose()
            .map_err(at)?;
        let tls = super::tls::downstream_socket(c.transport_socket.as_ref()).map_err(at)?;
        chains.push(FilterChain {
            name,
            tls,
            rbac,
            matcher: ChainMatch {
                destination_port,
                destination_prefixes: cidrs(&m.prefix_ranges).map_err(at)?,
                source_prefixes: cidrs(&m.source_prefix_ranges).map_err(at)?,
                transport_protocol: Some(m.transport_protocol).filter(|t| !t.is_empty()),
                application_protocols: m.application_protocols,
                server_names: m.server_names,
                default_chain: is_default,
            },
            filter,
        });
    }
    // Held for as long as the listener is: no spare capacity (1,000 listeners).
    chains.shrink_to_fit();
    let listener = Listener {
        name: l.name.clone(),
        address,
        filter_chains: chains,
    };
    let listener = Arc::new(listener);
    let kind = if inbound {
        ListenerKind::Inbound(listener)
    } else {
        ListenerKind::Outbound(listener)
    };
    Ok(Translated {
        kind,
        set_aside_chains,
        thrift_routes,
    })
}

fn is_internal_address(l: &XdsListener) -> bool {
    use tern_proto::core_types::address::Address;
    matches!(
        l.address.as_ref().and_then(|a| a.address.as_ref()),
        Some(Address::EnvoyInternalAddress(_))
    )
}

/// Whether any chain of the listener has an authorization filter.
fn carries_policy(l: &XdsListener) -> bool {
    l.filter_chains
        .iter()
        .chain(&l.default_filter_chain)
        .flat_map(|c| &c.filters)
        .filter_map(typed_config)
        .any(|a| a.type_url == type_url::NETWORK_RBAC || a.type_url == type_url::NETWORK_EXT_AUTHZ)
}

/// `virtualOutbound`'s mode: its catch-all chain (no match criteria other than a port of
/// its own) or default chain going to `BlackHoleCluster` means `REGISTRY_ONLY`.
fn passthrough_mode(l: &XdsListener) -> Passthrough {
    let catch_all = l
        .filter_chains
        .iter()
        .filter(|c| {
            c.filter_chain_match
                .as_ref()
                .is_none_or(|m| m.destination_port.is_none())
        })
        .chain(&l.default_filter_chain);
    for c in catch_all {
        for f in &c.filters {
            if let Some(any) = typed_config(f)
                && any.type_url == type_url::TCP_PROXY
                && let Ok(t) = decode::<TcpProxy>(any, type_url::TCP_PROXY)
                && let Ok(Target::Cluster(cluster)) = tcp_target(&t)
            {
                return if cluster == "BlackHoleCluster" {
                    Passthrough::Deny
                } else {
                    Passthrough::Allow
                };
            }
        }
    }
    Passthrough::Allow
}

/// The Thrift route configurations a listener's thrift_proxy filters name (`trds`).
fn trds_names(l: &XdsListener) -> Vec<String> {
    l.filter_chains
        .iter()
        .chain(&l.default_filter_chain)
        .flat_map(|c| &c.filters)
        .filter_map(typed_config)
        .filter(|a| a.type_url == type_url::THRIFT_PROXY)
        .filter_map(|a| decode::<XdsThrift>(a, type_url::THRIFT_PROXY).ok())
        .filter_map(|t| t.trds.map(|r| r.route_config_name))
        .collect()
}

/// What a chain's filters come to.
enum ChainFilter {
    Run(Filter),
    /// A thrift_proxy whose `trds` route configuration has not arrived.
    Pending,
    /// Set aside, and the filter that made it so.
    SetAside(SetAsideReason, Option<String>),
}

/// Filters that only observe or annotate a connection: skipping them changes no routing and
/// no authorization.
fn observes_only(name: &str, any: &tern_proto::Any) -> bool {
    let observing_names = [
        "istio.stats",
        "istio.metadata_exchange",
        "envoy.filters.network.metadata_exchange",
        "istio_authn",
        "istio.set_internal_dst_address",
    ];
    observing_names.contains(&name)
        || any.type_url.ends_with("stats.PluginConfig")
        || any
            .type_url
            .ends_with("envoy.tcp.metadataexchange.config.MetadataExchange")
}

/// HTTP filters that change nothing a request's admission depends on, so a chain relayed as
/// TCP may go without them: Istio's observers (stats, metadata exchange, ALPN, JWT metadata
/// for RBAC, which [`super::rbac`] handles, and HBONE's baggage), CORS and fault injection
/// (they shape responses, never admit a request), gRPC stats and the router.
fn http_filter_skippable(name: &str, any: &tern_proto::Any) -> bool {
    let istio_observers = [
        "istio.stats",
        "istio.metadata_exchange",
        "istio.alpn",
        "istio_authn",
        "connect_baggage",
        "connect_authority",
    ];
    let harmless = [
        "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors",
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
    ];
    istio_observers.contains(&name)
        || harmless.contains(&any.type_url.as_str())
        || any.type_url.ends_with("stats.PluginConfig")
}

/// A chain's terminal filter, and the RBAC filters ahead of it (or, for an HTTP chain, in
/// it).
fn chain_filter(
    c: &listener_types::FilterChain,
    routes: &BTreeMap<String, ThriftRouteConfiguration>,
) -> Result<(ChainFilter, Vec<Arc<Rbac>>), Invalid> {
    let mut rbac = Vec::new();
    let filter = terminal_filter(c, routes, &mut rbac)?;
    Ok((filter, rbac))
}

fn terminal_filter(
    c: &listener_types::FilterChain,
    routes: &BTreeMap<String, ThriftRouteConfiguration>,
    rbac: &mut Vec<Arc<Rbac>>,
) -> Result<ChainFilter, Invalid> {
    let refuse = |name: &str| {
        Ok(ChainFilter::SetAside(
            SetAsideReason::Unenforceable,
            Some(name.to_owned()),
        ))
    };
    for f in &c.filters {
        let Some(any) = typed_config(f) else {
            // ECDS (`config_discovery`): whatever it is, tern cannot run it.
            return Ok(ChainFilter::SetAside(
                SetAsideReason::Ecds,
                Some(f.name.clone()),
            ));
        };
        match any.type_url.as_str() {
            type_url::TCP_PROXY => {
                let t: TcpProxy = decode(any, type_url::TCP_PROXY)?;
                return Ok(ChainFilter::Run(Filter::TcpProxy {
                    target: tcp_target(&t)?,
                    // istiod's names never say Thrift: every tcp_proxy looks at the bytes.
                    sniff_thrift: true,
                    // Envoy's default is 1 h; zero turns it off.
                    idle_timeout: match &t.idle_timeout {
                        None => Some(crate::config::DEFAULT_IDLE_TIMEOUT),
                        Some(d) => Some(super::duration(d)).filter(|d| !d.is_zero()),
                    },
                }));
            }
            type_url::THRIFT_PROXY => {
                let t: XdsThrift = decode(any, type_url::THRIFT_PROXY)?;
                return Ok(match thrift(&t, routes)? {
                    Some(t) => ChainFilter::Run(Filter::Thrift(t)),
                    None => ChainFilter::Pending,
                });
            }
            type_url::HTTP_CONNECTION_MANAGER => return http_chain(any, rbac),
            type_url::NETWORK_RBAC => rbac.push(Arc::new(super::rbac::translate(any)?)),
            _ if observes_only(&f.name, any) => {}
            _ => return refuse(&f.name),
        }
    }
    Ok(ChainFilter::SetAside(SetAsideReason::NoFilter, None))
}

/// An HTTP chain is relayed as TCP: its RBAC filters are decided on the connection; any
/// other filter that could refuse a request (ext_authz, jwt_authn, Wasm, Lua, ECDS, unknown)
/// sets the chain aside, refusing its connections.
fn http_chain(any: &tern_proto::Any, rbac: &mut Vec<Arc<Rbac>>) -> Result<ChainFilter, Invalid> {
    use tern_proto::hcm_types::http_filter::ConfigType;
    let hcm: tern_proto::HttpConnectionManager = decode(any, type_url::HTTP_CONNECTION_MANAGER)?;
    for f in &hcm.http_filters {
        let Some(ConfigType::TypedConfig(t)) = &f.config_type else {
            return Ok(ChainFilter::SetAside(
                SetAsideReason::Ecds,
                Some(f.name.clone()),
            ));
        };
        match t.type_url.as_str() {
            type_url::HTTP_RBAC => rbac.push(Arc::new(super::rbac::translate_http(t)?)),
            _ if http_filter_skippable(&f.name, t) => {}
            _ => {
                return Ok(ChainFilter::SetAside(
                    SetAsideReason::Unenforceable,
                    Some(f.name.clone()),
                ));
            }
        }
    }
    Ok(ChainFilter::SetAside(SetAsideReason::Http, None))
}

fn tcp_target(t: &TcpProxy) -> Result<Target, Invalid> {
    use tern_proto::tcp_proxy_types::ClusterSpecifier;
    match &t.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => Ok(Target::Cluster(c.clone())),
        Some(ClusterSpecifier::WeightedClusters(w)) => weighted(
            w.clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight))
                .collect(),
        ),
        None => Err(Invalid::TcpProxyWithoutCluster),
    }
}

fn weighted(w: Vec<(String, u32)>) -> Result<Target, Invalid> {
    if w.iter().all(|(_, weight)| *weight == 0) {
        return Err(Invalid::NoWeight);
    }
    Ok(Target::Weighted(w))
}

/// A thrift_proxy filter; `None` while its `trds` route configuration has not arrived.
fn thrift(
    t: &XdsThrift,
    held: &BTreeMap<String, ThriftRouteConfiguration>,
) -> Result<Option<ThriftProxy>, Invalid> {
    use tern_proto::thrift_types::{route_action::ClusterSpecifier, route_match::MatchSpecifier};
    let routes = match (&t.route_config, &t.trds) {
        (Some(rc), _) => rc,
        (None, Some(trds)) => match held.get(&trds.route_config_name) {
            Some(rc) => rc,
            None => return Ok(None),
        },
        (None, None) => return Err(Invalid::ThriftWithoutRoutes),
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
        4 => return Err(Invalid::TwitterProtocol),
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
            .map(header_exact)
            .collect::<Result<_, _>>()?;
        let action = match route
            .route
            .as_ref()
            .and_then(|a| a.cluster_specifier.clone())
        {
            Some(ClusterSpecifier::Cluster(c)) => RouteAction::Target(Target::Cluster(c)),
            Some(ClusterSpecifier::WeightedClusters(w)) => RouteAction::Target(weighted(
                w.clusters
                    .iter()
                    .map(|c| (c.name.clone(), c.weight.map_or(0, |w| w.value)))
                    .collect(),
            )?),
            Some(ClusterSpecifier::ClusterHeader(h)) => RouteAction::ClusterHeader(h),
            None => return Err(Invalid::RouteWithoutCluster),
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

fn header_exact(h: &tern_proto::route_types::HeaderMatcher) -> Result<(String, String), Invalid> {
    use tern_proto::route_types::header_matcher::HeaderMatchSpecifier;
    #[allow(deprecated)]
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::ExactMatch(v)) => v.clone(),
        Some(HeaderMatchSpecifier::StringMatch(s)) => match &s.match_pattern {
            Some(tern_proto::matcher_types::string_matcher::MatchPattern::Exact(v)) => v.clone(),
            _ => return Err(Invalid::HeaderMatch(h.name.clone())),
        },
        _ => return Err(Invalid::HeaderMatch(h.name.clone())),
    };
    Ok((h.name.clone(), value))
}
