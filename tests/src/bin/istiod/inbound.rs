//! Istio's inbound side: the `virtualInbound` listener with its mTLS chains, and the network
//! RBAC filters an `AuthorizationPolicy` becomes.
use serde::Deserialize;
use tern_proto::{
    Listener,
    build::{self, address as addr, filter as typed, tcp_proxy},
    core_types, encode, listener_types, type_url, wkt,
};

/// Departures from istiod's inbound `DownstreamTlsContext`.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct InboundTls {
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
    pub(crate) fn socket(&self) -> core_types::TransportSocket {
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

/// One rule of an `AuthorizationPolicy`.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct RbacPolicy {
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
pub(crate) fn rbac_filters(policies: &[RbacPolicy]) -> Vec<listener_types::Filter> {
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

/// Istio's `virtualInbound` for a TCP port: a chain for mesh mTLS (ALPN
/// `istio-peer-exchange`/`istio`), one for other TLS, and in permissive mode one for
/// plaintext; all relay to the application.
pub(crate) fn virtual_inbound(
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
