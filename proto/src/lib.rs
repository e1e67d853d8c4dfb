//! tern's protobuf boundary: the xDS type URLs tern subscribes to.
//!
//! The xDS issue adds the `envoy-types` re-exports and `Any` decoding here, so that no other
//! crate depends on generated code directly.

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
}

#[cfg(test)]
mod tests {
    #[test]
    fn type_urls_share_the_google_prefix() {
        for url in [
            super::type_url::LISTENER,
            super::type_url::ROUTE_CONFIGURATION,
            super::type_url::CLUSTER,
            super::type_url::CLUSTER_LOAD_ASSIGNMENT,
            super::type_url::THRIFT_ROUTE_CONFIGURATION,
        ] {
            assert!(url.starts_with("type.googleapis.com/envoy."), "{url}");
        }
    }
}
