//! The xDS client's handler: decodes and translates each changed resource once, refuses the
//! ones it cannot use by name (the others apply), and publishes the configuration they make
//! on top of the static one.
//!
//! It runs on the control thread (see `run.rs`), never on a data-plane worker: decoding,
//! translating and building the snapshot cost the data path nothing but the atomic swap.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tern_proto::{
    Cluster as XdsCluster, ClusterLoadAssignment, Listener as XdsListener,
    ThriftRouteConfiguration, decode, type_url,
};
use tern_xds_client::{Handler, Interest, RejectedConfig, Update};
use tracing::{debug, info, warn};

use super::{
    metrics::{ConfigMetrics, SetAsideLabels},
    store::Store,
    translate::{TranslateError, cluster, endpoints, listener},
};
use crate::{
    config::{Config, NoInbound},
    state::State,
};

/// The types the handler translates.
const SUPPORTED: [&str; 4] = [
    type_url::LISTENER,
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::THRIFT_ROUTE_CONFIGURATION,
];

/// A resource type's short name, for logs and metric labels.
fn short(type_url: &str) -> &'static str {
    match type_url {
        type_url::LISTENER => "Listener",
        type_url::CLUSTER => "Cluster",
        type_url::CLUSTER_LOAD_ASSIGNMENT => "ClusterLoadAssignment",
        type_url::THRIFT_ROUTE_CONFIGURATION => "ThriftRouteConfiguration",
        _ => "other",
    }
}

/// The proxy's xDS handler.
pub struct XdsHandler {
    state: Arc<State>,
    metrics: ConfigMetrics,
    /// The static configuration (`--config`), under what xDS adds.
    base: Config,
    store: Store,
    /// Resources refused and not in force, by type (for the gauge).
    rejected: BTreeMap<&'static str, std::collections::BTreeSet<String>>,
    /// Whether listeners and clusters have each arrived once (tern is ready after both,
    /// once no cluster warms).
    seen_listeners: bool,
    seen_clusters: bool,
    /// The control plane's inbound listener was refused (inbound stays closed until one is
    /// accepted).
    inbound_refused: bool,
    updates: u64,
    /// Set-aside gauge series set last time, reset when they go away.
    set_aside_series: Vec<SetAsideLabels>,
    /// The endpoint and Thrift route names wanted, kept while they stay the same: the xDS
    /// client compares them after every response, and an EDS push changes neither.
    eds_wanted: Arc<BTreeSet<String>>,
    trds_wanted: Arc<BTreeSet<String>>,
}

impl XdsHandler {
    pub fn new(state: Arc<State>, base: Config, metrics: ConfigMetrics) -> Self {
        Self {
            state,
            metrics,
            base,
            store: Store::default(),
            rejected: BTreeMap::new(),
            seen_listeners: false,
            seen_clusters: false,
            inbound_refused: false,
            updates: 0,
            set_aside_series: Vec::new(),
            eds_wanted: Arc::default(),
            trds_wanted: Arc::default(),
        }
    }

    fn count(&self, type_url: &str, result: &'static str) {
        self.metrics.update(short(type_url), result);
    }

    /// Decodes, checks and translates one resource into the store.
    fn put(
        &mut self,
        type_url: &str,
        name: &str,
        any: &tern_proto::Any,
    ) -> Result<(), TranslateError> {
        match type_url {
            type_url::LISTENER => {
                let l: XdsListener = decode(any, type_url::LISTENER)?;
                let t = listener::translate(&l, &self.store.thrift_routes)?;
                self.store.put_listener(name.to_owned(), t, l);
            }
            type_url::CLUSTER => {
                let c: XdsCluster = decode(any, type_url::CLUSTER)?;
                let t = cluster::translate(&c)?;
                self.store.put_cluster(name.to_owned(), t);
            }
            type_url::CLUSTER_LOAD_ASSIGNMENT => {
                let cla: ClusterLoadAssignment = decode(any, type_url::CLUSTER_LOAD_ASSIGNMENT)?;
                let la = endpoints::translate_resource(&cla)?;
                self.store.put_endpoints(name.to_owned(), la);
            }
            type_url::THRIFT_ROUTE_CONFIGURATION => {
                let rc: ThriftRouteConfiguration =
                    decode(any, type_url::THRIFT_ROUTE_CONFIGURATION)?;
                self.store.thrift_routes.insert(name.to_owned(), rc);
                self.retranslate_listeners(name);
            }
            _ => {}
        }
        Ok(())
    }

    fn remove(&mut self, type_url: &str, name: &str) {
        match type_url {
            type_url::LISTENER => self.store.remove_listener(name),
            type_url::CLUSTER => self.store.remove_cluster(name),
            type_url::CLUSTER_LOAD_ASSIGNMENT => self.store.remove_endpoints(name),
            type_url::THRIFT_ROUTE_CONFIGURATION => {
                self.store.thrift_routes.remove(name);
                self.retranslate_listeners(name);
            }
            _ => {}
        }
    }

    /// Listeners whose Thrift routes changed are translated again (they were accepted with
    /// the same routes missing, so they translate now too, or keep their last version).
    fn retranslate_listeners(&mut self, route: &str) {
        for (name, proto) in self.store.listeners_using(route) {
            match listener::translate(&proto, &self.store.thrift_routes) {
                Ok(t) => self.store.put_listener(name, t, proto),
                Err(e) => {
                    warn!(listener = %name, error = %e, "listener no longer translates with its new Thrift routes; keeping its last version")
                }
            }
        }
    }

    /// The static configuration with the control plane's on top (its names win).
    fn merged(&self, xds: Config) -> Config {
        let mut config = self.base.clone();
        config.version = xds.version;
        // The control plane's listeners as they are (shared), after the static ones it does
        // not name.
        config.listeners = if config.listeners.is_empty() {
            xds.listeners
        } else {
            config
                .listeners
                .iter()
                .filter(|l| !xds.listeners.iter().any(|x| x.name == l.name))
                .chain(xds.listeners.iter())
                .cloned()
                .collect()
        };
        // The control plane's clusters as they are (a persistent map: no copy), with the
        // static ones it does not name.
        let statics = std::mem::replace(&mut config.clusters, xds.clusters);
        for (name, cluster) in statics {
            config.clusters.entry(name).or_insert(cluster);
        }
        if xds.inbound.is_some() {
            config.inbound = xds.inbound;
        }
        // Inbound policy is the control plane's: closed until its inbound listener is in
        // force, and closed again if it refuses one (never the previous policy, which may
        // lack a DENY the refused one carried).
        config.no_inbound = if self.inbound_refused {
            config.inbound = None;
            NoInbound::Refused
        } else {
            NoInbound::AwaitingPolicy
        };
        if self.store.has_listeners() {
            config.passthrough = xds.passthrough;
        }
        config.set_aside = xds.set_aside;
        config
    }

    /// Builds and swaps in the configuration the store holds now.
    fn publish(&mut self) {
        self.updates += 1;
        let xds = self.store.assemble(format!("xds-{}", self.updates));
        self.export_set_aside(&xds);
        let config = self.merged(xds);
        // Pushes can come a hundred times a second: one line each only at debug level.
        debug!(version = %config.version, listeners = config.listeners.len(), clusters = config.clusters.len(), set_aside = config.set_aside.len(), "xDS configuration in force");
        let summary = (
            config.version.clone(),
            config.listeners.len(),
            config.clusters.len(),
            config.set_aside.len(),
        );
        let inbound = config.inbound.is_some();
        let no_inbound = config.no_inbound;
        self.state.update(config);
        // Ready once listeners and clusters came, none warms, and inbound policy is in force:
        // a Pod whose inbound refuses everything must not get traffic.
        let ready = self.seen_listeners && self.seen_clusters && !self.store.warming() && inbound;
        let was = self.state.set_ready(ready);
        let (version, listeners, clusters, set_aside) = summary;
        if ready && !was {
            info!(%version, listeners, clusters, set_aside, "a complete xDS configuration with inbound policy is in force: ready");
        } else if was && !ready {
            warn!(%version, reason = no_inbound.as_str(), "no inbound policy in force: inbound connections are refused and tern is not ready");
        }
    }

    /// The names clusters and listeners ask for now; a set that did not change stays the
    /// same `Arc`.
    fn refresh_wanted(&mut self) {
        let eds = self.store.eds_names();
        if *self.eds_wanted != eds {
            self.eds_wanted = Arc::new(eds);
        }
        let trds = self.store.trds_names();
        if *self.trds_wanted != trds {
            self.trds_wanted = Arc::new(trds);
        }
    }

    fn export_set_aside(&mut self, config: &Config) {
        let family = &self.metrics.set_aside;
        for labels in self.set_aside_series.drain(..) {
            family.get_or_create(&labels).set(0);
        }
        let mut counts: BTreeMap<(&'static str, &'static str), i64> = BTreeMap::new();
        for s in &config.set_aside {
            *counts.entry((s.kind, s.reason.as_str())).or_default() += 1;
        }
        for ((kind, reason), n) in counts {
            let labels = SetAsideLabels { kind, reason };
            family.get_or_create(&labels).set(n);
            self.set_aside_series.push(labels);
        }
    }
}

impl Handler for XdsHandler {
    fn apply(&mut self, type_url: &'static str, update: Update) -> Result<(), Vec<RejectedConfig>> {
        let started = std::time::Instant::now();
        if !SUPPORTED.contains(&type_url) {
            return Err(update
                .changed
                .into_iter()
                .map(|(name, _)| RejectedConfig::new(name, UnsupportedType(type_url)))
                .collect());
        }
        for name in &update.removed {
            self.rejected.entry(type_url).or_default().remove(name);
            self.remove(type_url, name);
            if type_url == type_url::LISTENER && name == listener::VIRTUAL_INBOUND {
                self.inbound_refused = false;
            }
        }
        let mut rejected = Vec::new();
        for (name, any) in update.changed {
            let inbound = type_url == type_url::LISTENER && name == listener::VIRTUAL_INBOUND;
            match self.put(type_url, &name, &any) {
                Ok(()) => {
                    self.rejected.entry(type_url).or_default().remove(&name);
                    if inbound {
                        self.inbound_refused = false;
                    }
                }
                Err(e) if inbound => {
                    warn!(resource = short(type_url), %name, error = %e, "inbound listener refused: every inbound connection is refused until one is accepted");
                    self.store.remove_listener(&name);
                    self.inbound_refused = true;
                    self.rejected
                        .entry(type_url)
                        .or_default()
                        .insert(name.clone());
                    rejected.push(RejectedConfig::new(name, e));
                }
                Err(e) => {
                    warn!(resource = short(type_url), %name, error = %e, "resource refused; its last good version (if any) stays in force");
                    self.rejected
                        .entry(type_url)
                        .or_default()
                        .insert(name.clone());
                    rejected.push(RejectedConfig::new(name, e));
                }
            }
        }
        match type_url {
            type_url::LISTENER => self.seen_listeners = true,
            type_url::CLUSTER => self.seen_clusters = true,
            _ => {}
        }
        if type_url != type_url::CLUSTER_LOAD_ASSIGNMENT {
            self.refresh_wanted();
        }
        let count = self.rejected.get(type_url).map_or(0, |r| r.len());
        self.metrics.rejected(short(type_url), count);
        self.count(
            type_url,
            if rejected.is_empty() {
                "applied"
            } else {
                "rejected"
            },
        );
        self.publish();
        self.metrics
            .applied_in(short(type_url), started.elapsed().as_secs_f64());
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(rejected)
        }
    }

    fn interest(&self, type_url: &str) -> Interest {
        match type_url {
            type_url::LISTENER | type_url::CLUSTER => Interest::Wildcard,
            type_url::CLUSTER_LOAD_ASSIGNMENT => Interest::Names(self.eds_wanted.clone()),
            type_url::THRIFT_ROUTE_CONFIGURATION => Interest::Names(self.trds_wanted.clone()),
            _ => Interest::Names(Default::default()),
        }
    }

    fn tick(&mut self) {
        // A cluster whose endpoints did not come within its initial fetch timeout is used
        // without them, and readiness no longer waits for it.
        if self.store.stale_past_timeout() {
            warn!(
                "clusters still without endpoints after their initial fetch timeout; using them without"
            );
            self.publish();
        }
        self.state.release_memory();
    }
}

/// A resource of a type tern does not subscribe to.
#[derive(Debug, thiserror::Error)]
#[error("unsupported resource type {0}")]
struct UnsupportedType(&'static str);
