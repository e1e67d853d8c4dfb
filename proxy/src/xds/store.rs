//! What the control plane sent, translated resource by resource, and the configuration
//! assembled from it.
//!
//! Each resource is decoded and translated once, when it arrives; the encoded bytes are not
//! kept. Assembling a configuration clones only `Arc`s: a cluster is rebuilt when its own
//! resource or its endpoints change, so an EDS update touches its one cluster, and the
//! snapshot keeps every other cluster's picker and pools.
//!
//! Warming is per cluster, as Envoy's: a cluster waiting for its first endpoints keeps its
//! previous version in force (or stays out, if new) until they arrive or its
//! `initial_fetch_timeout` passes; everything else applies at once.
use std::{collections::BTreeMap, sync::Arc, time::Instant};

use tern_proto::{Listener as XdsListener, ThriftRouteConfiguration};

use super::translate::{
    cluster::{self, Endpoints},
    endpoints::LoadAssignment,
    listener::{self, ListenerKind},
};
use crate::config::{Cluster, Config, Passthrough, SetAside};

struct HeldListener {
    /// Its outbound listener is an `Arc`, shared with every configuration built while it
    /// does not change.
    translated: listener::Translated,
    /// Kept only for a listener that names Thrift route configurations: it is translated
    /// again when they change. Boxed: a decoded `Listener` is large, and most hold none.
    proto: Option<Box<XdsListener>>,
}

struct HeldCluster {
    translated: cluster::Translated,
    /// The version in force (what the last configuration carried).
    published: Option<Arc<Cluster>>,
    /// Whether `published` is behind the resource or its endpoints.
    stale: bool,
    /// Since when it waits for endpoints.
    since: Instant,
}

/// Everything held from the control plane, translated.
#[derive(Default)]
pub struct Store {
    listeners: BTreeMap<String, HeldListener>,
    clusters: BTreeMap<Arc<str>, HeldCluster>,
    endpoints: BTreeMap<String, Arc<LoadAssignment>>,
    pub(super) thrift_routes: BTreeMap<String, ThriftRouteConfiguration>,
}

impl Store {
    pub fn put_listener(
        &mut self,
        name: String,
        translated: listener::Translated,
        proto: XdsListener,
    ) {
        let proto = (!translated.thrift_routes.is_empty()).then(|| Box::new(proto));
        self.listeners
            .insert(name, HeldListener { translated, proto });
    }

    pub fn remove_listener(&mut self, name: &str) {
        self.listeners.remove(name);
    }

    pub fn put_cluster(&mut self, name: String, translated: cluster::Translated) {
        let published = self
            .clusters
            .remove(name.as_str())
            .and_then(|c| c.published);
        self.clusters.insert(
            name.into(),
            HeldCluster {
                translated,
                published,
                stale: true,
                since: Instant::now(),
            },
        );
    }

    pub fn remove_cluster(&mut self, name: &str) {
        self.clusters.remove(name);
    }

    /// New endpoints for `name`: the clusters that use them are rebuilt.
    pub fn put_endpoints(&mut self, name: String, endpoints: LoadAssignment) {
        self.endpoints.insert(name.clone(), Arc::new(endpoints));
        self.endpoints_changed(&name);
    }

    pub fn remove_endpoints(&mut self, name: &str) {
        if self.endpoints.remove(name).is_some() {
            self.endpoints_changed(name);
        }
    }

    fn endpoints_changed(&mut self, name: &str) {
        for c in self.clusters.values_mut() {
            if matches!(&c.translated.endpoints, Endpoints::Eds { name: n, .. } if n == name) {
                c.stale = true;
            }
        }
    }

    /// The listeners that name Thrift route configuration `route`, with their resources,
    /// to be translated again.
    pub fn listeners_using(&self, route: &str) -> Vec<(String, XdsListener)> {
        self.listeners
            .iter()
            .filter(|(_, l)| l.translated.thrift_routes.iter().any(|r| r == route))
            .filter_map(|(n, l)| Some((n.clone(), (**l.proto.as_ref()?).clone())))
            .collect()
    }

    /// The endpoint and Thrift route names the held clusters and listeners ask for.
    pub fn eds_names(&self) -> std::collections::BTreeSet<String> {
        self.clusters
            .values()
            .filter_map(|c| match &c.translated.endpoints {
                Endpoints::Eds { name, .. } => Some(name.clone()),
                Endpoints::Fixed(_) => None,
            })
            .collect()
    }

    pub fn trds_names(&self) -> std::collections::BTreeSet<String> {
        self.listeners
            .values()
            .flat_map(|l| l.translated.thrift_routes.iter().cloned())
            .collect()
    }

    pub fn has_listeners(&self) -> bool {
        !self.listeners.is_empty()
    }

    /// Whether a cluster waited past its initial fetch timeout and is not yet in force
    /// without its endpoints (every other stale cluster is built when it goes stale).
    pub fn stale_past_timeout(&self) -> bool {
        self.clusters.values().any(|c| c.stale && !self.waits(c))
    }

    /// Whether some cluster still waits for its first endpoints (within its timeout).
    pub fn warming(&self) -> bool {
        self.clusters.values().any(|c| self.waits(c))
    }

    fn waits(&self, c: &HeldCluster) -> bool {
        waits(c, &self.endpoints)
    }

    /// The configuration the resources held make: `version` labels it.
    pub fn assemble(&mut self, version: String) -> Config {
        let mut config = Config {
            version,
            ..Config::default()
        };
        for c in self.clusters.values_mut() {
            if c.stale && !waits(c, &self.endpoints) {
                // Past its timeout an EDS cluster without endpoints is used without them.
                let endpoints = match &c.translated.endpoints {
                    Endpoints::Fixed(la) => Some(la),
                    Endpoints::Eds { name, .. } => self.endpoints.get(name).map(|la| &**la),
                };
                let LoadAssignment {
                    endpoints,
                    locality_weights,
                } = endpoints.cloned().unwrap_or_default();
                c.published = Some(Arc::new(Cluster {
                    endpoints,
                    locality_weights,
                    ..c.translated.cluster.clone()
                }));
                c.stale = false;
            }
        }
        // Built from sorted names in one pass (no comparisons), sharing names and clusters.
        config.clusters = self
            .clusters
            .iter()
            .filter_map(|(name, c)| Some((name.clone(), c.published.clone()?)))
            .collect();
        for (name, c) in &self.clusters {
            if let Some(reason) = c.translated.set_aside {
                config.set_aside.push(SetAside {
                    kind: "cluster",
                    name: name.to_string(),
                    reason,
                    filter: None,
                });
            }
        }
        for (name, l) in &self.listeners {
            match &l.translated.kind {
                ListenerKind::VirtualOutbound(mode) => config.passthrough = *mode,
                ListenerKind::Inbound(listener) => config.inbound = Some(listener.clone()),
                ListenerKind::Outbound(listener) => config.listeners.push(listener.clone()),
                ListenerKind::SetAside(reason) => config.set_aside.push(SetAside {
                    kind: "listener",
                    name: name.clone(),
                    reason: *reason,
                    filter: None,
                }),
            }
            for chain in &l.translated.set_aside_chains {
                config.set_aside.push(SetAside {
                    kind: "filter_chain",
                    name: format!("{name}/{}", chain.name),
                    reason: chain.reason,
                    filter: chain.filter.clone(),
                });
            }
        }
        if !self.has_listeners() {
            config.passthrough = Passthrough::default();
        }
        config
    }
}

/// Whether a cluster still waits for its first endpoints (within its initial fetch timeout).
fn waits(c: &HeldCluster, endpoints: &BTreeMap<String, Arc<LoadAssignment>>) -> bool {
    match &c.translated.endpoints {
        Endpoints::Eds {
            name,
            initial_fetch_timeout,
        } => {
            c.stale
                && !endpoints.contains_key(name)
                && initial_fetch_timeout.is_none_or(|t| c.since.elapsed() < t)
        }
        Endpoints::Fixed(_) => false,
    }
}
