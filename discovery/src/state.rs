//! What tern discovery holds while it runs: the catalog of every source, the health checker,
//! the views served and the connected clients; how a source's event or a health verdict
//! becomes a published configuration; and what the admin server reads of it (metrics, what
//! is served).
use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tern_xds_server::Clients;
use tracing::{info, warn};

use crate::{
    catalog::{Catalog, SourceState, SourceStatus},
    health::checker::Checker,
    memory::Trimmer,
    sources::SourceEvent,
    views::ClientViews,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViewLabels {
    view: &'static str,
    type_url: String,
}

/// What tern discovery holds while it runs.
pub struct State {
    pub clients: Arc<Clients>,
    pub views: Arc<ClientViews>,
    pub checker: Arc<Checker>,
    catalog: Mutex<Catalog>,
    trimmer: Trimmer,
}

impl State {
    pub fn new(
        clients: Arc<Clients>,
        views: Arc<ClientViews>,
        checker: Arc<Checker>,
        catalog: Catalog,
    ) -> Self {
        Self {
            clients,
            views,
            checker,
            catalog: Mutex::new(catalog),
            trimmer: Trimmer::default(),
        }
    }

    pub fn sources(&self) -> Vec<SourceStatus> {
        self.catalog().status()
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a source's event, checks the endpoints it brings, and publishes the views if
    /// anything changed.
    pub fn apply(&self, event: SourceEvent) {
        let started = std::time::Instant::now();
        let services = {
            let mut catalog = self.catalog();
            match event.result {
                Ok(parsed) => {
                    for s in &parsed.skipped {
                        warn!(source = %event.source, entry = %s.entry, reason = %s.reason, "entry skipped");
                    }
                    catalog.update(&event.source, event.kind, parsed.services, parsed.skipped);
                }
                Err(e) => {
                    warn!(source = %event.source, error = %e, "source failed: its last endpoints stay");
                    catalog.failed(&event.source, event.kind, e)
                }
            }
            catalog.services()
        };
        let merged = started.elapsed();
        self.checker.reconcile(&services);
        self.publish(&services);
        tracing::debug!(?merged, total = ?started.elapsed(), "source event applied");
    }

    /// Publishes the views of `services` with the health checks' verdicts.
    fn publish(&self, services: &[crate::model::Service]) {
        let started = std::time::Instant::now();
        let health = self.checker.statuses(services);
        let changed = self.views.publish(services, &health);
        if changed {
            info!(services = services.len(), took = ?started.elapsed(), "configuration published");
            self.trimmer.trim();
        }
    }

    /// What is served of every service: its endpoints with the health clients see.
    pub fn endpoints(&self) -> serde_json::Value {
        let services = self.catalog().services();
        let health = self.checker.statuses(&services);
        services
            .iter()
            .zip(health)
            .map(|(s, health)| {
                let endpoints: Vec<serde_json::Value> = s
                    .endpoints
                    .iter()
                    .zip(health)
                    .map(|(e, status)| {
                        serde_json::json!({
                            "address": e.address,
                            "weight": e.weight,
                            "locality": e.locality,
                            "health_status": status,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": s.name,
                    "port": s.port,
                    "protocol": s.protocol,
                    "vip": s.vip,
                    "cluster": s.cluster(),
                    "endpoints": endpoints,
                })
            })
            .collect()
    }

    /// A health verdict changed: publishes the views again.
    pub fn republish(&self) {
        let services = self.catalog().services();
        self.publish(&services);
    }

    /// The metrics, in Prometheus' text format (computed when scraped).
    pub fn metrics(&self) -> String {
        let mut registry = Registry::with_prefix("tern_discovery");
        let clients: Family<Vec<(String, String)>, Gauge> = Family::default();
        for c in self.clients.list() {
            clients
                .get_or_create(&vec![("protocol".to_owned(), c.protocol.to_owned())])
                .inc();
        }
        registry.register("clients", "Connected xDS clients, by protocol", clients);
        let totals = self.clients.totals();
        for (name, help, value) in [
            ("streams", "xDS streams opened", totals.streams),
            ("responses", "Discovery responses sent", totals.responses),
            ("nacks", "NACKs received from clients", totals.nacks),
        ] {
            let c: Counter = Counter::default();
            c.inc_by(value);
            registry.register(name, help, c);
        }
        let skipped: Family<SourceLabels, Counter> = Family::default();
        let stale: Family<SourceLabels, Gauge> = Family::default();
        for s in self.sources() {
            let labels = SourceLabels {
                source: s.name.clone(),
            };
            skipped.get_or_create(&labels).inc_by(s.skipped_total);
            stale
                .get_or_create(&labels)
                .set(i64::from(s.state != SourceState::Ok));
        }
        registry.register(
            "source_entries_skipped",
            "Registry entries skipped as malformed",
            skipped,
        );
        registry.register(
            "source_stale",
            "1 while a source's last read failed (its last good endpoints are served)",
            stale,
        );
        let resources: Family<ViewLabels, Gauge> = Family::default();
        for (view, snapshot) in [
            ("sidecar", self.views.sidecar()),
            ("grpc", self.views.grpc()),
        ] {
            for (type_url, n) in snapshot.counts() {
                resources
                    .get_or_create(&ViewLabels {
                        view,
                        type_url: type_url.to_owned(),
                    })
                    .set(n as i64);
            }
        }
        registry.register("resources", "Resources served, by view and type", resources);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
