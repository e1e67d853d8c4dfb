//! Applies what the control plane sends: decode, translate, merge with the static
//! configuration, and publish a new snapshot once the clusters it uses are warm.
use std::{collections::BTreeMap, sync::Arc, time::Instant};

use tern_proto::{Any, decode, type_url};
use tern_xds_client::{Handler, Interest};
use tracing::{info, warn};

use super::translate::{Resources, to_config};
use crate::{config::Config, metrics::ConfigLabels, state::State};

/// How long a configuration waits for the endpoints of its clusters before it is used anyway.
const WARMING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The proxy's xDS handler.
pub struct XdsHandler {
    state: Arc<State>,
    /// The static configuration (`--config`), under what xDS adds.
    base: Config,
    resources: Resources,
    updates: u64,
    /// A translated configuration waiting for its clusters' endpoints, and since when.
    warming: Option<(Config, Instant)>,
}

impl XdsHandler {
    pub fn new(state: Arc<State>, base: Config) -> Self {
        Self {
            state,
            base,
            resources: Resources::default(),
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
        if !self.resources.listeners.is_empty() {
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

fn decode_all<T: prost::Message + Default>(
    resources: &BTreeMap<String, Any>,
    url: &'static str,
) -> Result<BTreeMap<String, T>, String> {
    resources
        .iter()
        .map(|(name, any)| {
            decode(any, url)
                .map(|r| (name.clone(), r))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect()
}

impl Handler for XdsHandler {
    fn apply(
        &mut self,
        type_url: &str,
        resources: &BTreeMap<String, Any>,
        _removed: &[String],
    ) -> Result<(), String> {
        let mut next = self.resources.clone();
        let decoded = match type_url {
            type_url::LISTENER => {
                decode_all(resources, type_url::LISTENER).map(|r| next.listeners = r)
            }
            type_url::CLUSTER => {
                decode_all(resources, type_url::CLUSTER).map(|r| next.clusters = r)
            }
            type_url::CLUSTER_LOAD_ASSIGNMENT => {
                decode_all(resources, type_url::CLUSTER_LOAD_ASSIGNMENT).map(|r| next.endpoints = r)
            }
            type_url::THRIFT_ROUTE_CONFIGURATION => {
                decode_all(resources, type_url::THRIFT_ROUTE_CONFIGURATION)
                    .map(|r| next.thrift_routes = r)
            }
            other => Err(format!("unsupported type {other}")),
        };
        let translated =
            decoded.and_then(|()| to_config(&next, format!("xds-{}", self.updates + 1)));
        let xds = match translated {
            Ok(c) => c,
            Err(e) => {
                warn!(type_url, error = %e, "xDS update refused; the last good configuration keeps serving");
                self.count(type_url, "rejected");
                return Err(e);
            }
        };
        self.updates += 1;
        self.resources = next;
        self.count(type_url, "applied");
        let config = self.merged(xds);
        if self.resources.warm() {
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
            type_url::CLUSTER_LOAD_ASSIGNMENT => {
                Interest::Names(self.resources.eds_names().collect())
            }
            type_url::THRIFT_ROUTE_CONFIGURATION => {
                Interest::Names(self.resources.trds_names().collect())
            }
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
