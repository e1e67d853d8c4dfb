//! What the control plane sent, translated resource by resource, and the configuration
//! assembled from it.
//!
//! Each resource is decoded and translated once, when it arrives; the encoded bytes are not
//! kept. Assembling a configuration costs what changed, not what is held: the clusters in
//! force are a persistent map, updated by name as they change and shared with every
//! configuration built from it; the listeners and what is set aside are rebuilt only when a
//! listener or cluster resource changes. So an EDS push to one of 10,000 clusters rebuilds
//! that one cluster, and the snapshot keeps every other cluster's picker and pools.
//!
//! Warming is per cluster, as Envoy's: a cluster waiting for its first endpoints keeps its
//! previous version in force (or stays out, if new) until they arrive or its
//! `initial_fetch_timeout` passes; everything else applies at once.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use tern_proto::{Listener as XdsListener, ThriftRouteConfiguration};

use super::translate::{
    cluster::{self, Endpoints},
    endpoints::LoadAssignment,
    listener::{self, ListenerKind},
};
use crate::config::{Cluster, ClusterMap, Config, Listener, Passthrough, SetAside};

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
    /// Since when it waits for endpoints.
    since: Instant,
}

impl HeldCluster {
    /// The EDS name it takes its endpoints from, if any.
    fn eds_name(&self) -> Option<&str> {
        match &self.translated.endpoints {
            Endpoints::Eds { name, .. } => Some(name),
            Endpoints::Fixed(_) => None,
        }
    }
}

/// What listeners and cluster resources make besides the clusters in force, kept while
/// none of them changes (an EDS push changes none).
#[derive(Default)]
struct Shape {
    listeners: Arc<[Arc<Listener>]>,
    inbound: Option<Arc<Listener>>,
    passthrough: Passthrough,
    set_aside: Vec<SetAside>,
}

/// Everything held from the control plane, translated.
#[derive(Default)]
pub struct Store {
    listeners: BTreeMap<String, HeldListener>,
    clusters: BTreeMap<Arc<str>, HeldCluster>,
    endpoints: BTreeMap<String, Arc<LoadAssignment>>,
    pub(super) thrift_routes: BTreeMap<String, ThriftRouteConfiguration>,
    /// The clusters in force, as the last configuration carried them.
    published: ClusterMap,
    /// Clusters whose version in force is behind their resource or their endpoints.
    stale: BTreeSet<Arc<str>>,
    /// The clusters that take their endpoints from each EDS name (usually one, its own).
    eds_users: BTreeMap<String, BTreeSet<Arc<str>>>,
    /// Built again when a listener or cluster resource changes.
    shape: Option<Shape>,
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
        self.shape = None;
    }

    pub fn remove_listener(&mut self, name: &str) {
        self.listeners.remove(name);
        self.shape = None;
    }

    /// A new version of cluster `name`; its version in force (if any) stays until this one
    /// is built.
    pub fn put_cluster(&mut self, name: String, translated: cluster::Translated) {
        let name: Arc<str> = name.into();
        self.forget_endpoints_user(&name);
        let held = HeldCluster {
            translated,
            since: Instant::now(),
        };
        if let Some(eds) = held.eds_name() {
            self.eds_users
                .entry(eds.to_owned())
                .or_default()
                .insert(name.clone());
        }
        self.clusters.insert(name.clone(), held);
        self.stale.insert(name);
        self.shape = None;
    }

    pub fn remove_cluster(&mut self, name: &str) {
        self.forget_endpoints_user(name);
        self.clusters.remove(name);
        self.published.remove(name);
        self.stale.remove(name);
        self.shape = None;
    }

    /// Cluster `name` no longer takes endpoints from the EDS name it had.
    fn forget_endpoints_user(&mut self, name: &str) {
        let Some(eds) = self.clusters.get(name).and_then(HeldCluster::eds_name) else {
            return;
        };
        if let Some(users) = self.eds_users.get_mut(eds) {
            users.remove(name);
            if users.is_empty() {
                self.eds_users.remove(eds);
            }
        }
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
        if let Some(users) = self.eds_users.get(name) {
            self.stale.extend(users.iter().cloned());
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
    pub fn eds_names(&self) -> BTreeSet<String> {
        self.eds_users.keys().cloned().collect()
    }

    pub fn trds_names(&self) -> BTreeSet<String> {
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
        self.stale_clusters().any(|c| !self.waits(c))
    }

    /// Whether some cluster still waits for its first endpoints (within its timeout).
    pub fn warming(&self) -> bool {
        self.stale_clusters().any(|c| self.waits(c))
    }

    fn stale_clusters(&self) -> impl Iterator<Item = &HeldCluster> {
        self.stale.iter().filter_map(|n| self.clusters.get(n))
    }

    fn waits(&self, c: &HeldCluster) -> bool {
        waits(c, &self.endpoints)
    }

    /// The configuration the resources held make: `version` labels it.
    pub fn assemble(&mut self, version: String) -> Config {
        // Past its timeout an EDS cluster without endpoints is used without them.
        let ready: Vec<Arc<str>> = self
            .stale
            .iter()
            .filter(|n| self.clusters.get(*n).is_some_and(|c| !self.waits(c)))
            .cloned()
            .collect();
        for name in ready {
            self.stale.remove(&name);
            let Some(c) = self.clusters.get(&name) else {
                continue;
            };
            let endpoints = match &c.translated.endpoints {
                Endpoints::Fixed(la) => Some(la),
                Endpoints::Eds { name, .. } => self.endpoints.get(name).map(|la| &**la),
            };
            let LoadAssignment {
                endpoints,
                locality_weights,
            } = endpoints.cloned().unwrap_or_default();
            let built = Arc::new(Cluster {
                endpoints,
                locality_weights,
                ..c.translated.cluster.clone()
            });
            self.published.insert(name, built);
        }
        let shape = match &self.shape {
            Some(shape) => shape,
            None => self.shape.insert(self.shape()),
        };
        Config {
            version,
            listeners: shape.listeners.clone(),
            inbound: shape.inbound.clone(),
            passthrough: shape.passthrough,
            clusters: self.published.clone(),
            set_aside: shape.set_aside.clone(),
            ..Config::default()
        }
    }

    /// What the listeners and cluster resources held make besides the clusters in force.
    fn shape(&self) -> Shape {
        let mut shape = Shape::default();
        let mut listeners = Vec::new();
        for (name, c) in &self.clusters {
            if let Some(reason) = c.translated.set_aside {
                shape.set_aside.push(SetAside {
                    kind: "cluster",
                    name: name.to_string(),
                    reason,
                    filter: None,
                });
            }
        }
        for (name, l) in &self.listeners {
            match &l.translated.kind {
                ListenerKind::VirtualOutbound(mode) => shape.passthrough = *mode,
                ListenerKind::Inbound(listener) => shape.inbound = Some(listener.clone()),
                ListenerKind::Outbound(listener) => listeners.push(listener.clone()),
                ListenerKind::SetAside(reason) => shape.set_aside.push(SetAside {
                    kind: "listener",
                    name: name.clone(),
                    reason: *reason,
                    filter: None,
                }),
            }
            for chain in &l.translated.set_aside_chains {
                shape.set_aside.push(SetAside {
                    kind: "filter_chain",
                    name: format!("{name}/{}", chain.name),
                    reason: chain.reason,
                    filter: chain.filter.clone(),
                });
            }
        }
        if !self.has_listeners() {
            shape.passthrough = Passthrough::default();
        }
        shape.listeners = listeners.into();
        shape
    }
}

/// Whether a cluster still waits for its first endpoints (within its initial fetch timeout).
/// Only a stale cluster is asked.
fn waits(c: &HeldCluster, endpoints: &BTreeMap<String, Arc<LoadAssignment>>) -> bool {
    match &c.translated.endpoints {
        Endpoints::Eds {
            name,
            initial_fetch_timeout,
        } => {
            !endpoints.contains_key(name)
                && initial_fetch_timeout.is_none_or(|t| c.since.elapsed() < t)
        }
        Endpoints::Fixed(_) => false,
    }
}
