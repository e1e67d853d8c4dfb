//! For tests: a filter context on a configuration, and the chain of its first listener.
use std::{sync::Arc, time::Duration};

use prometheus_client::registry::Registry;

use super::ChainRef;
use crate::{
    budget::BufferBudget,
    config::file::parse,
    filters::{Ctx, metrics::FilterMetrics},
    refusal::Refusals,
    state::State,
    telemetry::IstioMetrics,
    thrift::DecoderLimits,
    tls::metrics::Handshakes,
};

/// A context serving `config` (tern's file format) with a buffer budget of `budget` bytes;
/// the chain of its first listener's first filter chain; the registry of its metrics.
pub(super) fn ctx(config: &str, budget: usize) -> (Arc<Ctx>, ChainRef, Registry) {
    let state = State::new(Default::default());
    let mut registry = Registry::default();
    let refusals = Refusals::register(&mut registry);
    let istio = IstioMetrics::new(Default::default());
    let metrics = FilterMetrics::register(&mut registry, refusals, Handshakes::default(), istio);
    state.apply(parse(config, "test").unwrap());
    let snapshot = state.load();
    let listener = &snapshot.config.listeners[0];
    let chain = ChainRef {
        listener: listener.name.clone(),
        chain: listener.filter_chains[0].name.clone(),
    };
    let ctx = Arc::new(Ctx {
        state,
        metrics: Arc::new(metrics),
        mark: 0,
        limits: DecoderLimits::default(),
        closing: Default::default(),
        connect_timeout: Duration::from_secs(1),
        access_log: false,
        thrift_ports: Default::default(),
        budget: BufferBudget::new(budget),
        message_timeout: Duration::from_secs(1),
    });
    (ctx, chain, registry)
}
