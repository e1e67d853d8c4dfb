//! Envoy resources built the way istiod shapes them, for tern's tests, its test control
//! plane and its benchmarks (one place, so they all send the same shapes).
use crate::{
    Address, Any, Cluster, ClusterLoadAssignment, SocketAddress, TcpProxy, cluster_types,
    core_types, encode, endpoint_types, listener_types, matcher_types, tcp_proxy_types, tls_types,
    type_url, wkt,
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

/// An SDS secret from istio-agent (`default`: the workload certificate; `ROOTCA`: the
/// mesh roots).
fn sds(name: &str) -> tls_types::SdsSecretConfig {
    tls_types::SdsSecretConfig {
        name: name.into(),
        sds_config: None,
    }
}

/// istiod's common TLS context: TLS 1.2–1.3, the `default` certificate, and peers checked
/// against `ROOTCA` and these SAN matchers.
fn istio_common_tls(
    alpn: &[&str],
    sans: Vec<matcher_types::StringMatcher>,
) -> tls_types::CommonTlsContext {
    use tls_types::common_tls_context::{
        CombinedCertificateValidationContext, ValidationContextType,
    };
    #[allow(deprecated)]
    let validation = tls_types::CertificateValidationContext {
        match_subject_alt_names: sans,
        ..Default::default()
    };
    tls_types::CommonTlsContext {
        tls_params: Some(tls_types::TlsParameters {
            tls_minimum_protocol_version: 3,
            tls_maximum_protocol_version: 4,
            ..Default::default()
        }),
        alpn_protocols: alpn.iter().map(|p| (*p).into()).collect(),
        tls_certificate_sds_secret_configs: vec![sds("default")],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(validation),
                validation_context_sds_secret_config: Some(sds("ROOTCA")),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn exact(s: &str) -> matcher_types::StringMatcher {
    matcher_types::StringMatcher {
        match_pattern: Some(matcher_types::string_matcher::MatchPattern::Exact(s.into())),
        ignore_case: false,
    }
}

/// The transport socket of an inbound chain that terminates Istio mTLS, as istiod writes
/// it for a TCP port: client certificates required, any identity of `trust_domain`.
pub fn istio_downstream_tls(trust_domain: &str) -> core_types::TransportSocket {
    let prefix = matcher_types::StringMatcher {
        match_pattern: Some(matcher_types::string_matcher::MatchPattern::Prefix(
            format!("spiffe://{trust_domain}/"),
        )),
        ignore_case: false,
    };
    let t = tls_types::DownstreamTlsContext {
        common_tls_context: Some(istio_common_tls(
            &["istio-peer-exchange", "h2", "http/1.1"],
            vec![prefix],
        )),
        require_client_certificate: Some(wkt::BoolValue { value: true }),
        ..Default::default()
    };
    core_types::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core_types::transport_socket::ConfigType::TypedConfig(
            encode(&t, type_url::DOWNSTREAM_TLS_CONTEXT),
        )),
    }
}

/// istiod's auto-mTLS on an outbound cluster: endpoints labelled `tlsMode: istio` get mTLS
/// verifying `san`, with this SNI; the others plaintext.
pub fn istio_auto_mtls(cluster: &mut Cluster, san: &str, sni: &str) {
    let t = tls_types::UpstreamTlsContext {
        common_tls_context: Some(istio_common_tls(
            &["istio-peer-exchange", "istio"],
            vec![exact(san)],
        )),
        sni: sni.into(),
        ..Default::default()
    };
    let socket = |any| core_types::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core_types::transport_socket::ConfigType::TypedConfig(any)),
    };
    let tls_mode = |v: &str| wkt::Struct {
        fields: [(
            "tlsMode".to_owned(),
            wkt::Value {
                kind: Some(wkt::Kind::StringValue(v.into())),
            },
        )]
        .into(),
    };
    cluster.transport_socket_matches = vec![
        cluster_types::TransportSocketMatch {
            name: "tlsMode-istio".into(),
            r#match: Some(tls_mode("istio")),
            transport_socket: Some(socket(encode(&t, type_url::UPSTREAM_TLS_CONTEXT))),
        },
        cluster_types::TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(wkt::Struct::default()),
            transport_socket: Some(socket(Any {
                type_url: type_url::RAW_BUFFER.into(),
                value: Vec::new(),
            })),
        },
    ];
}

/// A DestinationRule's `tls: {mode: SIMPLE, caCertificates, sni, subjectAltNames}` on a
/// cluster, as istiod writes it: TLS to every endpoint, no client certificate, the server
/// checked against the file's roots and `san`.
pub fn istio_simple_tls(cluster: &mut Cluster, ca_file: &str, sni: &str, san: &str) {
    let mut common = istio_common_tls(&[], vec![exact(san)]);
    common.tls_certificate_sds_secret_configs.clear();
    if let Some(tls_types::common_tls_context::ValidationContextType::CombinedValidationContext(
        c,
    )) = &mut common.validation_context_type
    {
        c.validation_context_sds_secret_config = Some(sds(&format!("file-root:{ca_file}")));
    }
    let t = tls_types::UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: sni.into(),
        ..Default::default()
    };
    cluster.transport_socket = Some(core_types::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core_types::transport_socket::ConfigType::TypedConfig(
            encode(&t, type_url::UPSTREAM_TLS_CONTEXT),
        )),
    });
}

/// Sets `filter_metadata.<filter>.<key>` to `value`, beside the struct's other fields.
pub fn filter_metadata(
    metadata: &mut Option<core_types::Metadata>,
    filter: &str,
    key: &str,
    value: wkt::Kind,
) {
    metadata
        .get_or_insert_with(Default::default)
        .filter_metadata
        .entry(filter.into())
        .or_default()
        .fields
        .insert(key.into(), wkt::Value { kind: Some(value) });
}

/// Gives an endpoint istiod's workload metadata (`istio.workload`:
/// `name;namespace;canonical name;revision;cluster`).
pub fn istio_workload(e: &mut endpoint_types::LbEndpoint, workload: &str) {
    let workload = wkt::Kind::StringValue(workload.into());
    filter_metadata(&mut e.metadata, "istio", "workload", workload);
}

/// Labels an endpoint `tlsMode: istio`, as istiod does for Pods with a sidecar.
pub fn istio_tls_mode(e: &mut endpoint_types::LbEndpoint) {
    filter_metadata(
        &mut e.metadata,
        "envoy.transport_socket_match",
        "tlsMode",
        wkt::Kind::StringValue("istio".into()),
    );
}
