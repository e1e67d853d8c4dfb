//! Applies what the control plane sends: decode, translate, merge with the static
//! configuration, and publish a new snapshot once the clusters it uses are warm.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use tern_proto::{Any, type_url};
use tern_xds_client::{Handler, Interest};
use tracing::{info, warn};

use super::translate::{Resources, to_config};
use crate::{config::Config, metrics::ConfigLabels, state::State};

/// The types the handler translates.
const SUPPORTED: [&str; 4] = [
    type_url::LISTENER,
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::THRIFT_ROUTE_CONFIGURATION,
];

/// How long a configuration waits for the endpoints of its clusters before it is used anyway.
const WARMING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The proxy's xDS handler.
pub struct XdsHandler {
    state: Arc<State>,
    /// The static configuration (`--config`), under what xDS adds.
    base: Config,
    /// What the control plane sent, by type URL and name, still encoded.
    raw: BTreeMap<String, BTreeMap<String, Any>>,
    /// The endpoint and Thrift route names the held listeners and clusters ask for.
    eds_names: BTreeSet<String>,
    trds_names: BTreeSet<String>,
    /// Whether listeners came from the control plane (its passthrough mode then applies).
    has_listeners: bool,
    updates: u64,
    /// A translated configuration waiting for its clusters' endpoints, and since when.
    warming: Option<(Config, Instant)>,
}

impl XdsHandler {
    pub fn new(state: Arc<State>, base: Config) -> Self {
        Self {
            state,
            base,
            raw: BTreeMap::new(),
            eds_names: BTreeSet::new(),
            trds_names: BTreeSet::new(),
            has_listeners: false,
            updates: 0,
            warming: None,
        }
    }

    fn count(&self, type_url: &str, result: &'static str) {
        let source = match type_url {
            type_url::LISTENER => "Listener",
            type_url::CLUSTER => "Cluster",
            type_url::CLUSTER_LOAD_ASSIGNMENT => "ClusterLoadAssignment",
            type_url::THRIFT_ROUTE_CONFIGURATION => "ThriftRouteConfiguration",
            _ => "other",
        };
        self.state
            .metrics
            .config_updates
            .get_or_create(&ConfigLabels { source, result })
            .inc();
    }

    /// The static configuration with the control plane's on top (its names win).
    fn merged(&self, xds: Config) -> Config {
        let mut config = self.base.clone();
        config.version = xds.version;
        config
            .listeners
            .retain(|l| !xds.listeners.iter().any(|x| x.name == l.name));
        config.listeners.extend(xds.listeners);
        config.clusters.extend(xds.clusters);
        if xds.inbound.is_some() {
            config.inbound = xds.inbound;
        }
        if self.has_listeners {
            config.passthrough = xds.passthrough;
        }
        config
    }

    fn publish(&mut self, config: Config) {
        info!(version = %config.version, listeners = config.listeners.len(), clusters = config.clusters.len(), "xDS configuration ready");
        self.state.apply(config);
        self.warming = None;
    }
}

impl Handler for XdsHandler {
    fn apply(
        &mut self,
        type_url: &str,
        resources: &BTreeMap<String, Any>,
        _removed: &[String],
    ) -> Result<(), String> {
        if !SUPPORTED.contains(&type_url) {
            return Err(format!("unsupported type {type_url}"));
        }
        let previous = self.raw.insert(type_url.to_owned(), resources.clone());
        let version = format!("xds-{}", self.updates + 1);
        let translated = Resources::decode(&self.raw).and_then(|r| {
            let config = to_config(&r, version)?;
            Ok((config, r))
        });
        let (xds, decoded) = match translated {
            Ok(t) => t,
            Err(e) => {
                match previous {
                    Some(p) => self.raw.insert(type_url.to_owned(), p),
                    None => self.raw.remove(type_url),
                };
                warn!(type_url, error = %e, "xDS update refused; the last good configuration keeps serving");
                self.count(type_url, "rejected");
                return Err(e);
            }
        };
        self.eds_names = decoded.eds_names().collect();
        self.trds_names = decoded.trds_names().collect();
        self.has_listeners = !decoded.listeners.is_empty();
        let warm = decoded.warm();
        drop(decoded);
        self.updates += 1;
        self.count(type_url, "applied");
        let config = self.merged(xds);
        if warm {
            self.publish(config);
        } else {
            let since = self.warming.as_ref().map_or_else(Instant::now, |(_, t)| *t);
            self.warming = Some((config, since));
        }
        Ok(())
    }

    fn interest(&self, type_url: &str) -> Interest {
        match type_url {
            type_url::LISTENER | type_url::CLUSTER => Interest::Wildcard,
            type_url::CLUSTER_LOAD_ASSIGNMENT => Interest::Names(self.eds_names.clone()),
            type_url::THRIFT_ROUTE_CONFIGURATION => Interest::Names(self.trds_names.clone()),
            _ => Interest::Names(Default::default()),
        }
    }

    fn tick(&mut self) {
        if let Some((_, since)) = &self.warming
            && since.elapsed() >= WARMING_TIMEOUT
            && let Some((config, _)) = self.warming.take()
        {
            warn!(
                "clusters still without endpoints after the warming timeout; using the configuration anyway"
            );
            self.publish(config);
        }
    }
}
