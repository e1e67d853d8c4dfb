//! tern's protobuf boundary: the Envoy messages tern reads, their type URLs, and decoding
//! `Any` into them with the type URL checked.
//!
//! Every other crate names Envoy types through here, so generated code has one entry point
//! and a change of `envoy-types` version touches one file.
#![forbid(unsafe_code)]
pub use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster,
            core::v3::{Address, Node, SocketAddress},
            endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener,
            route::v3::RouteConfiguration,
        },
        extensions::filters::network::{
            http_connection_manager::v3::HttpConnectionManager, tcp_proxy::v3::TcpProxy,
            thrift_proxy::v3::RouteConfiguration as ThriftRouteConfiguration,
            thrift_proxy::v3::ThriftProxy,
        },
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            Resource, aggregated_discovery_service_client, aggregated_discovery_service_server,
        },
    },
    google::{protobuf::Any, rpc::Status},
};

pub mod build;
pub mod etcd;

/// Client status discovery (CSDS): what a control plane knows of each client's configuration.
pub mod csds_types {
    pub use envoy_types::pb::envoy::{
        admin::v3::{ClientResourceStatus, UpdateFailureState},
        service::status::v3::{
            ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
            client_config::GenericXdsConfig, client_status_discovery_service_server,
        },
    };
}

/// The per-type discovery services (CDS, EDS, LDS, RDS), beside ADS.
pub mod discovery_services {
    pub use envoy_types::pb::envoy::service::{
        cluster::v3::cluster_discovery_service_server,
        endpoint::v3::endpoint_discovery_service_server,
        listener::v3::listener_discovery_service_server, route::v3::route_discovery_service_server,
    };
}
pub mod istio_ca;

/// The generated modules behind the types above, for their nested enums and messages.
pub mod core_types {
    pub use envoy_types::pb::envoy::config::core::v3::*;
}
pub mod listener_types {
    pub use envoy_types::pb::envoy::config::listener::v3::*;
}
pub mod cluster_types {
    pub use envoy_types::pb::envoy::config::cluster::v3::cluster::*;
    pub use envoy_types::pb::envoy::config::cluster::v3::{
        CircuitBreakers, OutlierDetection, circuit_breakers,
    };
}
pub mod endpoint_types {
    pub use envoy_types::pb::envoy::config::endpoint::v3::*;
}
pub mod route_types {
    pub use envoy_types::pb::envoy::config::route::v3::*;
}
pub mod matcher_types {
    pub use envoy_types::pb::envoy::r#type::matcher::v3::*;
}
pub mod tcp_proxy_types {
    pub use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::*;
}
pub mod thrift_types {
    pub use envoy_types::pb::envoy::extensions::filters::network::thrift_proxy::v3::*;
}
pub mod hcm_types {
    pub use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::*;
}
pub mod tls_types {
    pub use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::*;
}
pub mod rbac_types {
    pub use envoy_types::pb::envoy::config::rbac::v3::*;
}
pub use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
pub use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
pub mod wkt {
    pub use envoy_types::pb::google::protobuf::{
        BoolValue, Duration, Struct, Timestamp, UInt32Value, UInt64Value, Value, value::Kind,
    };
}

/// Type URLs of the xDS resources tern reads, as Envoy and istiod spell them.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE_CONFIGURATION: &str =
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const CLUSTER_LOAD_ASSIGNMENT: &str =
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const THRIFT_ROUTE_CONFIGURATION: &str =
        "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.RouteConfiguration";
    pub const TCP_PROXY: &str =
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    pub const THRIFT_PROXY: &str =
        "type.googleapis.com/envoy.extensions.filters.network.thrift_proxy.v3.ThriftProxy";
    pub const HTTP_CONNECTION_MANAGER: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    pub const NETWORK_RBAC: &str =
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
    pub const NETWORK_EXT_AUTHZ: &str =
        "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz";
    pub const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
    pub const HTTP_EXT_AUTHZ: &str =
        "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
    pub const RAW_BUFFER: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
    pub const DOWNSTREAM_TLS_CONTEXT: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
    pub const UPSTREAM_TLS_CONTEXT: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
}

/// Why an `Any` could not be decoded as the type asked for.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("expected a resource of type {expected}, got {actual}")]
    WrongType {
        expected: &'static str,
        actual: String,
    },
    #[error("resource of type {type_url} does not decode: {source}")]
    Invalid {
        type_url: &'static str,
        source: prost::DecodeError,
    },
}

/// Decodes `any` as `T`, whose type URL is `type_url`.
pub fn decode<T: prost::Message + Default>(
    any: &Any,
    type_url: &'static str,
) -> Result<T, DecodeError> {
    if any.type_url != type_url {
        return Err(DecodeError::WrongType {
            expected: type_url,
            actual: any.type_url.clone(),
        });
    }
    T::decode(any.value.as_slice()).map_err(|source| DecodeError::Invalid { type_url, source })
}

/// Wraps a message as an `Any` of `type_url` (for tests and istiod's stand-in).
pub fn encode<T: prost::Message>(message: &T, type_url: &str) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: message.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_checks_the_type_url() {
        let cluster = Cluster {
            name: "outbound|9090||calc.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let any = encode(&cluster, type_url::CLUSTER);
        let back: Cluster = decode(&any, type_url::CLUSTER).unwrap();
        assert_eq!(back.name, cluster.name);
        let err = decode::<Listener>(&any, type_url::LISTENER).unwrap_err();
        assert!(
            err.to_string().contains("envoy.config.cluster.v3.Cluster"),
            "{err}"
        );
        let garbage = Any {
            type_url: type_url::CLUSTER.into(),
            value: vec![0xff, 0xff],
        };
        assert!(matches!(
            decode::<Cluster>(&garbage, type_url::CLUSTER),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn type_urls_share_the_google_prefix() {
        for url in [
            type_url::LISTENER,
            type_url::ROUTE_CONFIGURATION,
            type_url::CLUSTER,
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            type_url::THRIFT_ROUTE_CONFIGURATION,
        ] {
            assert!(url.starts_with("type.googleapis.com/envoy."), "{url}");
        }
    }
}
