//! What the filters count: refused connections, RBAC decisions, inbound TLS handshakes,
//! Thrift input that closed its connection, the TApplicationExceptions tern answered
//! itself, and Istio's standard metrics.
use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::{refusal::Refusals, telemetry::IstioMetrics, tls::metrics::Handshakes};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LocalReplyLabels {
    cluster: String,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RbacLabels {
    /// `allowed`, `denied`, `shadow_allowed`, `shadow_denied` (Envoy's `rbac.*` counters).
    result: &'static str,
}

/// The filters' metric families.
#[derive(Debug)]
pub struct FilterMetrics {
    pub refusals: Refusals,
    /// Handshakes of inbound TLS (the family is TLS's).
    pub handshakes: Handshakes,
    pub istio: Arc<IstioMetrics>,
    local_replies: Family<LocalReplyLabels, Counter>,
    frames_rejected: Family<CauseLabel, Counter>,
    rbac_decisions: Family<RbacLabels, Counter>,
}

impl FilterMetrics {
    pub fn register(
        registry: &mut Registry,
        refusals: Refusals,
        handshakes: Handshakes,
        istio: Arc<IstioMetrics>,
    ) -> Self {
        let m = Self {
            refusals,
            handshakes,
            istio,
            local_replies: Family::default(),
            frames_rejected: Family::default(),
            rbac_decisions: Family::default(),
        };
        registry.register(
            "thrift_local_replies",
            "TApplicationExceptions tern answered itself, by cause",
            m.local_replies.clone(),
        );
        registry.register(
            "thrift_frames_rejected",
            "Malformed or oversized Thrift input that closed its connection, by cause",
            m.frames_rejected.clone(),
        );
        registry.register(
            "rbac_decisions",
            "Network RBAC decisions on connections and Thrift calls, shadow rules included",
            m.rbac_decisions.clone(),
        );
        m
    }

    /// Counts Thrift input that closed its connection.
    pub fn rejected(&self, cause: &'static str) {
        self.frames_rejected
            .get_or_create(&CauseLabel { cause })
            .inc();
    }

    /// Counts an RBAC decision.
    pub fn rbac(&self, result: &'static str) {
        self.rbac_decisions
            .get_or_create(&RbacLabels { result })
            .inc();
    }

    /// Counts a TApplicationException tern answered itself.
    pub fn local_reply(&self, cluster: &str, cause: &'static str) {
        self.local_replies
            .get_or_create(&LocalReplyLabels {
                cluster: cluster.to_owned(),
                cause,
            })
            .inc();
    }
}
