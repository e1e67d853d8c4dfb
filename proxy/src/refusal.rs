//! Why tern refused a connection: every refusal has a reason, counted
//! (`tern_connections_refused_total{direction,reason}`) and written in the access log, so a
//! closed door is never silent.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::config::NoInbound;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    /// `inbound` or `outbound`.
    direction: &'static str,
    reason: &'static str,
}

/// Counts refused connections by direction and [`Refusal`].
#[derive(Clone, Debug, Default)]
pub struct Refusals(Family<RefusedLabels, Counter>);

impl Refusals {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "connections_refused",
            "Connections tern closed without reaching their destination, by direction and reason",
            m.0.clone(),
        );
        m
    }

    /// Counts a refused connection.
    pub fn count(&self, direction: &'static str, why: Refusal) {
        self.0
            .get_or_create(&RefusedLabels {
                direction,
                reason: why.as_str(),
            })
            .inc();
    }
}

/// Why a connection was closed without reaching its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Inbound, and no inbound listener is in force: the control plane's has not arrived yet.
    AwaitingPolicy,
    /// Inbound, and the control plane's inbound listener was refused.
    InboundListenerRefused,
    /// A listener is in force and none of its filter chains matches.
    NoFilterChain,
    /// Outbound to a destination no listener knows, with `REGISTRY_ONLY`.
    RegistryOnly,
    /// The chain needs something tern cannot do (ext_authz, jwt_authn, Wasm, ECDS, an unknown
    /// filter): it is set aside and refuses its connections.
    ChainNotEnforceable,
    /// The chain's TLS server could not be built (no certificate, a context tern refuses).
    TlsUnusable,
    /// The TLS handshake failed (or timed out).
    TlsHandshake,
    /// An RBAC policy denied it.
    Rbac,
    /// Rules on the chain name Thrift methods, and the client sent something other than a
    /// Thrift call tern fully understands.
    NotAThriftCall,
    /// The policy in force changed and no longer allows the connection.
    PolicyChanged,
    /// Too many connections, or no buffer left for this one.
    Overloaded,
    /// The client sent nothing decisive in time.
    FirstBytesTimeout,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::AwaitingPolicy => "awaiting_policy",
            Refusal::InboundListenerRefused => "inbound_listener_refused",
            Refusal::NoFilterChain => "no_filter_chain",
            Refusal::RegistryOnly => "registry_only",
            Refusal::ChainNotEnforceable => "chain_not_enforceable",
            Refusal::TlsUnusable => "tls_unusable",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::Rbac => "rbac",
            Refusal::NotAThriftCall => "not_a_thrift_call",
            Refusal::PolicyChanged => "policy_changed",
            Refusal::Overloaded => "overloaded",
            Refusal::FirstBytesTimeout => "first_bytes_timeout",
        }
    }

    /// The refusal of an inbound connection when no inbound listener is in force (`None`:
    /// relayed to the application).
    pub fn without_inbound(mode: NoInbound) -> Option<Self> {
        match mode {
            NoInbound::Passthrough => None,
            NoInbound::AwaitingPolicy => Some(Refusal::AwaitingPolicy),
            NoInbound::Refused => Some(Refusal::InboundListenerRefused),
        }
    }
}
