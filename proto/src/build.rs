//! Envoy resources built the way istiod shapes them, for tern's tests, its test control
//! plane and its benchmarks (one place, so they all send the same shapes).
use crate::{
    Address, Any, Cluster, ClusterLoadAssignment, SocketAddress, TcpProxy, cluster_types,
    core_types, encode, endpoint_types, listener_types, tcp_proxy_types, type_url, wkt,
};

/// `ip:port` as a socket address.
pub fn address(ip: &str, port: u32) -> Address {
    Address {
        address: Some(core_types::address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(core_types::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// A network filter with a typed configuration.
pub fn filter(name: &str, any: Any) -> listener_types::Filter {
    listener_types::Filter {
        name: name.into(),
        config_type: Some(listener_types::filter::ConfigType::TypedConfig(any)),
    }
}

/// A `tcp_proxy` filter to `cluster`, its stat prefix the cluster name (istiod's).
pub fn tcp_proxy(cluster: &str) -> listener_types::Filter {
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

/// An EDS cluster reading the `ClusterLoadAssignment` of its own name over ADS.
pub fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster_types::ClusterDiscoveryType::Type(3)),
        eds_cluster_config: Some(cluster_types::EdsClusterConfig {
            service_name: name.into(),
            ..Default::default()
        }),
        connect_timeout: Some(wkt::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A healthy endpoint at `ip:port` with a load-balancing weight.
pub fn endpoint(ip: &str, port: u32, weight: u32) -> endpoint_types::LbEndpoint {
    endpoint_types::LbEndpoint {
        health_status: 1,
        load_balancing_weight: Some(wkt::UInt32Value { value: weight }),
        host_identifier: Some(endpoint_types::lb_endpoint::HostIdentifier::Endpoint(
            endpoint_types::Endpoint {
                address: Some(address(ip, port)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The endpoints of `cluster`, in one locality.
pub fn load_assignment(
    cluster: &str,
    endpoints: Vec<endpoint_types::LbEndpoint>,
) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.into(),
        endpoints: vec![endpoint_types::LocalityLbEndpoints {
            lb_endpoints: endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
}
