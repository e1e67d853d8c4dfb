//! What proxyless gRPC clients are served (gRFC A27, A28): for each service `S` on port `P`, an
//! API listener `S:P` (and `S`, for the first port of that name) holding an
//! `HttpConnectionManager` that reads the route configuration `S:P` over ADS, with the router
//! as its only HTTP filter; that route configuration, one virtual host for every domain
//! routing everything to the service's cluster; and the EDS cluster. gRPC balances only by ROUND_ROBIN and RING_HASH and NACKs the rest, so other
//! policies are served to it as ROUND_ROBIN.
use tern_proto::{
    Any, HttpConnectionManager, Listener, RouteConfiguration, encode, hcm_types, listener_types,
    route_types, type_url,
};

use super::{ads, eds_cluster, named};
use crate::model::{LbPolicy, Service};

const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn api_listener(name: &str, route: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.into(),
        route_specifier: Some(hcm_types::http_connection_manager::RouteSpecifier::Rds(
            hcm_types::Rds {
                config_source: Some(ads()),
                route_config_name: route.into(),
            },
        )),
        http_filters: vec![hcm_types::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm_types::http_filter::ConfigType::TypedConfig(Any {
                type_url: ROUTER.into(),
                value: Vec::new(),
            })),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: name.into(),
        api_listener: Some(listener_types::ApiListener {
            api_listener: Some(encode(&hcm, type_url::HTTP_CONNECTION_MANAGER)),
        }),
        ..Default::default()
    }
}

fn route_configuration(service: &Service, name: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![route_types::VirtualHost {
            name: service.name.clone(),
            domains: vec!["*".into()],
            routes: vec![route_types::Route {
                r#match: Some(route_types::RouteMatch {
                    path_specifier: Some(route_types::route_match::PathSpecifier::Prefix(
                        String::new(),
                    )),
                    ..Default::default()
                }),
                action: Some(route_types::route::Action::Route(
                    route_types::RouteAction {
                        cluster_specifier: Some(
                            route_types::route_action::ClusterSpecifier::Cluster(service.cluster()),
                        ),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One service's listeners, route configuration and cluster for gRPC clients; with
/// `first_of_name`, also the listener named by the service's name alone.
pub fn service(s: &Service, first_of_name: bool) -> Vec<(String, Any)> {
    let mut out = Vec::with_capacity(4);
    let route = format!("{}:{}", s.name, s.port);
    if first_of_name {
        out.push(named(
            &s.name,
            &api_listener(&s.name, &route),
            type_url::LISTENER,
        ));
    }
    out.push(named(
        &route,
        &api_listener(&route, &route),
        type_url::LISTENER,
    ));
    out.push(named(
        &route,
        &route_configuration(s, &route),
        type_url::ROUTE_CONFIGURATION,
    ));
    let lb = match s.lb {
        LbPolicy::RingHash => LbPolicy::RingHash,
        _ => LbPolicy::RoundRobin,
    };
    out.push(named(&s.cluster(), &eds_cluster(s, lb), type_url::CLUSTER));
    out
}
