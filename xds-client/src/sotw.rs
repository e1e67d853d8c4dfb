//! The state-of-the-world ADS protocol as a state machine, without a transport.
//!
//! [`Sotw`] turns responses into the requests Envoy would send: an ACK carrying the version
//! and nonce of a response the [`Handler`] accepted, or a NACK carrying the last accepted
//! version, the response's nonce and the handler's reason in `error_detail` — while the
//! previous resources stay in force. Subscriptions follow the handler: after every update
//! it says which resources of each type it wants ([`Interest`]), and a changed interest is
//! sent at once (CDS names the EDS resources to watch, LDS the RDS ones).
//!
//! Listener and Cluster responses carry the whole set: a resource missing from one is
//! removed. Other types (endpoints, routes) arrive as they change; they leave only when no
//! longer wanted. Keeping the protocol free of I/O makes every rule above a unit test.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use tern_proto::{
    Any, Cluster, ClusterLoadAssignment, DiscoveryRequest, DiscoveryResponse, Listener, Node,
    RouteConfiguration, Status, ThriftRouteConfiguration, decode, type_url,
};

/// Which resources of a type a handler wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Everything the server has (Envoy's wildcard for listeners and clusters).
    Wildcard,
    /// These names.
    Names(BTreeSet<String>),
}

impl Interest {
    fn names(&self) -> Vec<String> {
        match self {
            Interest::Wildcard => Vec::new(),
            Interest::Names(n) => n.iter().cloned().collect(),
        }
    }

    fn wants(&self, name: &str) -> bool {
        match self {
            Interest::Wildcard => true,
            Interest::Names(n) => n.contains(name),
        }
    }
}

/// What a user of the client does with resources. The client ACKs what `apply` accepts and
/// NACKs (with the returned reason) what it refuses.
pub trait Handler {
    /// The complete set of resources of `type_url` now held, by name, and the names that
    /// went away. An error refuses the whole update; the previous set stays.
    fn apply(
        &mut self,
        type_url: &str,
        resources: &BTreeMap<String, Any>,
        removed: &[String],
    ) -> Result<(), String>;

    /// Which resources of each subscribed type the handler wants now.
    fn interest(&self, type_url: &str) -> Interest;

    /// Called about once a second while a stream is open (for timeouts such as warming).
    fn tick(&mut self) {}
}

/// Whether a type's responses carry the whole set (absence means removal).
pub fn is_full_state(type_url: &str) -> bool {
    type_url == type_url::LISTENER || type_url == type_url::CLUSTER
}

/// The name of a resource, read from the message itself.
pub fn resource_name(any: &Any) -> Result<String, String> {
    let name = match any.type_url.as_str() {
        type_url::LISTENER => decode::<Listener>(any, type_url::LISTENER).map(|r| r.name),
        type_url::CLUSTER => decode::<Cluster>(any, type_url::CLUSTER).map(|r| r.name),
        type_url::CLUSTER_LOAD_ASSIGNMENT => {
            decode::<ClusterLoadAssignment>(any, type_url::CLUSTER_LOAD_ASSIGNMENT)
                .map(|r| r.cluster_name)
        }
        type_url::ROUTE_CONFIGURATION => {
            decode::<RouteConfiguration>(any, type_url::ROUTE_CONFIGURATION).map(|r| r.name)
        }
        type_url::THRIFT_ROUTE_CONFIGURATION => {
            decode::<ThriftRouteConfiguration>(any, type_url::THRIFT_ROUTE_CONFIGURATION)
                .map(|r| r.name)
        }
        other => return Err(format!("unsupported resource type {other}")),
    };
    name.map_err(|e| e.to_string())
}

/// What the client holds for one type, as `/config_dump` and `tern xds status` show it.
#[derive(Clone, Debug, Default)]
pub struct TypeState {
    /// Version of the last accepted response ("" before the first).
    pub version: String,
    /// Nonce of the last response, accepted or not.
    pub nonce: String,
    pub resources: BTreeMap<String, Any>,
    /// The names last subscribed to (`None` for a wildcard).
    pub subscribed: Option<BTreeSet<String>>,
    pub last_update: Option<SystemTime>,
    /// The reason of the last NACK, cleared by the next ACK.
    pub last_error: Option<String>,
    pub acks: u64,
    pub nacks: u64,
    /// Whether this type was requested on the current stream.
    requested: bool,
}

/// A type's resources after a response, and the names it removed.
type Update = (BTreeMap<String, Any>, Vec<String>);

/// The protocol state of one ADS client.
#[derive(Debug)]
pub struct Sotw {
    node: Node,
    types: Vec<&'static str>,
    state: BTreeMap<&'static str, TypeState>,
    /// Whether the current stream has carried the node yet (only its first request does).
    node_sent: bool,
}

impl Sotw {
    /// A client subscribing to `types`, in this order (the order requests are sent in).
    pub fn new(node: Node, types: &[&'static str]) -> Self {
        Self {
            node,
            types: types.to_vec(),
            state: types.iter().map(|t| (*t, TypeState::default())).collect(),
            node_sent: false,
        }
    }

    pub fn state(&self) -> &BTreeMap<&'static str, TypeState> {
        &self.state
    }

    /// The requests that open a stream: every type with its interest and the versions held,
    /// so a reconnected client does not get what it already has.
    pub fn open_stream(&mut self, handler: &impl Handler) -> Vec<DiscoveryRequest> {
        self.node_sent = false;
        for s in self.state.values_mut() {
            s.requested = false;
            // Nonces belong to a stream; versions are kept so the server can skip what we hold.
            s.nonce.clear();
        }
        let types = self.types.clone();
        types
            .into_iter()
            .filter_map(|t| {
                let interest = handler.interest(t);
                if interest == Interest::Names(BTreeSet::new()) {
                    return None;
                }
                Some(self.request_for(t, &interest, None))
            })
            .collect()
    }

    fn request_for(
        &mut self,
        type_url: &'static str,
        interest: &Interest,
        error: Option<String>,
    ) -> DiscoveryRequest {
        let node = (!self.node_sent).then(|| self.node.clone());
        self.node_sent = true;
        let state = self.state.entry(type_url).or_default();
        state.requested = true;
        state.subscribed = match interest {
            Interest::Wildcard => None,
            Interest::Names(n) => Some(n.clone()),
        };
        DiscoveryRequest {
            version_info: state.version.clone(),
            node,
            resource_names: interest.names(),
            type_url: type_url.to_owned(),
            response_nonce: state.nonce.clone(),
            error_detail: error.map(|message| Status {
                code: 3, // INVALID_ARGUMENT, as Envoy sends
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    /// Handles one response; returns the requests to send: its ACK or NACK, then a request
    /// for every type whose interest changed.
    pub fn on_response(
        &mut self,
        response: DiscoveryResponse,
        handler: &mut impl Handler,
    ) -> Vec<DiscoveryRequest> {
        let Some(type_url) = self.types.iter().copied().find(|t| *t == response.type_url) else {
            // Not a type this client asked for: nothing to ACK.
            return Vec::new();
        };
        let interest = handler.interest(type_url);
        let outcome =
            self.check(type_url, &response, &interest)
                .and_then(|(resources, removed)| {
                    handler.apply(type_url, &resources, &removed)?;
                    Ok(resources)
                });
        let state = self.state.entry(type_url).or_default();
        state.nonce = response.nonce.clone();
        state.last_update = Some(SystemTime::now());
        let mut out = Vec::new();
        match outcome {
            Ok(resources) => {
                state.version = response.version_info.clone();
                state.resources = resources;
                state.last_error = None;
                state.acks += 1;
                out.push(self.request_for(type_url, &interest, None));
            }
            Err(reason) => {
                state.last_error = Some(reason.clone());
                state.nacks += 1;
                out.push(self.request_for(type_url, &interest, Some(reason)));
            }
        }
        out.extend(self.interest_changes(handler));
        out
    }

    /// Requests for types whose interest differs from what was last subscribed.
    fn interest_changes(&mut self, handler: &impl Handler) -> Vec<DiscoveryRequest> {
        let types = self.types.clone();
        let mut out = Vec::new();
        for t in types {
            let interest = handler.interest(t);
            let state = self.state.get(t);
            let requested = state.is_some_and(|s| s.requested);
            // An empty first request would mean "everything": a type nobody wants yet waits.
            if !requested && interest == Interest::Names(BTreeSet::new()) {
                continue;
            }
            let subscribed = state.map(|s| s.subscribed.clone());
            let current = match &interest {
                Interest::Wildcard => None,
                Interest::Names(n) => Some(n.clone()),
            };
            if !requested || subscribed != Some(current) {
                // Resources no longer wanted leave at once.
                if let Some(state) = self.state.get_mut(t) {
                    state.resources.retain(|name, _| interest.wants(name));
                }
                out.push(self.request_for(t, &interest, None));
            }
        }
        out
    }

    /// Validates a response and computes the resource set it leads to, and what it removes.
    fn check(
        &self,
        type_url: &'static str,
        response: &DiscoveryResponse,
        interest: &Interest,
    ) -> Result<Update, String> {
        let held = &self.state[type_url].resources;
        let mut incoming = BTreeMap::new();
        for any in &response.resources {
            if any.type_url != type_url {
                return Err(format!(
                    "a resource of type {} in a response of type {type_url}",
                    any.type_url
                ));
            }
            let name = resource_name(any)?;
            if name.is_empty() {
                return Err(format!("a {type_url} resource without a name"));
            }
            if incoming.insert(name.clone(), any.clone()).is_some() {
                return Err(format!("resource {name} appears twice"));
            }
        }
        let mut resources = if is_full_state(type_url) {
            BTreeMap::new()
        } else {
            held.clone()
        };
        resources.extend(incoming);
        resources.retain(|name, _| interest.wants(name));
        let removed = held
            .keys()
            .filter(|n| !resources.contains_key(*n))
            .cloned()
            .collect();
        Ok((resources, removed))
    }
}

#[cfg(test)]
mod tests {
    use tern_proto::encode;

    use super::*;

    /// Wants every cluster and listener, and the endpoints of every cluster it holds;
    /// refuses clusters named "bad".
    #[derive(Default)]
    struct Fake {
        clusters: BTreeSet<String>,
        applied: Vec<(String, Vec<String>, Vec<String>)>,
    }

    impl Handler for Fake {
        fn apply(
            &mut self,
            t: &str,
            resources: &BTreeMap<String, Any>,
            removed: &[String],
        ) -> Result<(), String> {
            if resources.contains_key("bad") {
                return Err("cluster bad: unsupported lb_policy".into());
            }
            if t == type_url::CLUSTER {
                self.clusters = resources.keys().cloned().collect();
            }
            self.applied.push((
                t.to_owned(),
                resources.keys().cloned().collect(),
                removed.to_vec(),
            ));
            Ok(())
        }

        fn interest(&self, t: &str) -> Interest {
            if t == type_url::CLUSTER_LOAD_ASSIGNMENT {
                Interest::Names(self.clusters.clone())
            } else {
                Interest::Wildcard
            }
        }
    }

    fn node() -> Node {
        Node {
            id: "sidecar~10.0.0.1~app-0.default~default.svc.cluster.local".into(),
            ..Default::default()
        }
    }

    fn clusters(version: &str, nonce: &str, names: &[&str]) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            nonce: nonce.into(),
            type_url: type_url::CLUSTER.into(),
            resources: names
                .iter()
                .map(|n| {
                    encode(
                        &Cluster {
                            name: (*n).into(),
                            ..Default::default()
                        },
                        type_url::CLUSTER,
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn endpoints(version: &str, nonce: &str, names: &[&str]) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            nonce: nonce.into(),
            type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.into(),
            resources: names
                .iter()
                .map(|n| {
                    let cla = ClusterLoadAssignment {
                        cluster_name: (*n).into(),
                        ..Default::default()
                    };
                    encode(&cla, type_url::CLUSTER_LOAD_ASSIGNMENT)
                })
                .collect(),
            ..Default::default()
        }
    }

    fn engine() -> Sotw {
        Sotw::new(
            node(),
            &[
                type_url::LISTENER,
                type_url::CLUSTER,
                type_url::CLUSTER_LOAD_ASSIGNMENT,
            ],
        )
    }

    #[test]
    fn a_stream_opens_with_wildcards_and_the_node_once() {
        let mut s = engine();
        let reqs = s.open_stream(&Fake::default());
        let types: Vec<&str> = reqs.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(
            types,
            [type_url::LISTENER, type_url::CLUSTER],
            "no endpoints wanted yet"
        );
        assert!(reqs[0].node.is_some() && reqs[1].node.is_none());
        assert!(
            reqs.iter()
                .all(|r| r.resource_names.is_empty() && r.version_info.is_empty())
        );
    }

    #[test]
    fn an_accepted_response_is_acked_and_endpoints_follow_clusters() {
        let mut s = engine();
        let mut h = Fake::default();
        s.open_stream(&h);
        let out = s.on_response(clusters("v1", "n1", &["a", "b"]), &mut h);
        assert_eq!(out[0].type_url, type_url::CLUSTER);
        assert_eq!(
            (out[0].version_info.as_str(), out[0].response_nonce.as_str()),
            ("v1", "n1")
        );
        assert!(out[0].error_detail.is_none());
        assert_eq!(out[1].type_url, type_url::CLUSTER_LOAD_ASSIGNMENT);
        assert_eq!(out[1].resource_names, ["a", "b"]);
        assert_eq!(out.len(), 2, "nothing for types still unwanted: {out:?}");
    }

    #[test]
    fn a_refused_response_is_nacked_with_the_last_good_version_and_kept_out() {
        let mut s = engine();
        let mut h = Fake::default();
        s.open_stream(&h);
        s.on_response(clusters("v1", "n1", &["a"]), &mut h);
        let out = s.on_response(clusters("v2", "n2", &["a", "bad"]), &mut h);
        let nack = &out[0];
        assert_eq!(
            (nack.version_info.as_str(), nack.response_nonce.as_str()),
            ("v1", "n2")
        );
        assert!(
            nack.error_detail
                .as_ref()
                .unwrap()
                .message
                .contains("unsupported lb_policy")
        );
        let state = &s.state()[type_url::CLUSTER];
        assert_eq!(state.version, "v1");
        assert_eq!(state.resources.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!((state.acks, state.nacks), (1, 1));
        assert!(state.last_error.is_some());
        // The next good response clears the error.
        s.on_response(clusters("v3", "n3", &["a"]), &mut h);
        assert!(s.state()[type_url::CLUSTER].last_error.is_none());
    }

    #[test]
    fn wrong_types_unnamed_and_duplicate_resources_are_nacked() {
        let mut s = engine();
        let mut h = Fake::default();
        s.open_stream(&h);
        let mut wrong = clusters("v1", "n1", &["a"]);
        wrong.resources.push(encode(
            &Listener {
                name: "l".into(),
                ..Default::default()
            },
            type_url::LISTENER,
        ));
        assert!(s.on_response(wrong, &mut h)[0].error_detail.is_some());
        assert!(
            s.on_response(clusters("v1", "n2", &[""]), &mut h)[0]
                .error_detail
                .is_some()
        );
        assert!(
            s.on_response(clusters("v1", "n3", &["a", "a"]), &mut h)[0]
                .error_detail
                .is_some()
        );
        assert!(h.applied.is_empty());
    }

    #[test]
    fn clusters_missing_from_a_response_are_removed_endpoints_are_not() {
        let mut s = engine();
        let mut h = Fake::default();
        s.open_stream(&h);
        s.on_response(clusters("v1", "n1", &["a", "b"]), &mut h);
        s.on_response(endpoints("e1", "m1", &["a", "b"]), &mut h);
        // An endpoints update for "a" alone leaves "b" in place.
        s.on_response(endpoints("e2", "m2", &["a"]), &mut h);
        assert_eq!(
            s.state()[type_url::CLUSTER_LOAD_ASSIGNMENT].resources.len(),
            2
        );
        // Cluster "b" disappears: removed, and its endpoints are no longer wanted.
        let out = s.on_response(clusters("v2", "n2", &["a"]), &mut h);
        assert_eq!(h.applied.last().unwrap().2, ["b"]);
        let eds = out
            .iter()
            .find(|r| r.type_url == type_url::CLUSTER_LOAD_ASSIGNMENT)
            .unwrap();
        assert_eq!(eds.resource_names, ["a"]);
        assert_eq!(
            (eds.version_info.as_str(), eds.response_nonce.as_str()),
            ("e2", "m2")
        );
        assert_eq!(
            s.state()[type_url::CLUSTER_LOAD_ASSIGNMENT].resources.len(),
            1
        );
    }

    #[test]
    fn a_reopened_stream_carries_the_versions_held() {
        let mut s = engine();
        let mut h = Fake::default();
        s.open_stream(&h);
        s.on_response(clusters("v7", "n7", &["a"]), &mut h);
        let reqs = s.open_stream(&h);
        let cds = reqs
            .iter()
            .find(|r| r.type_url == type_url::CLUSTER)
            .unwrap();
        assert_eq!(cds.version_info, "v7");
        let eds = reqs
            .iter()
            .find(|r| r.type_url == type_url::CLUSTER_LOAD_ASSIGNMENT)
            .unwrap();
        assert_eq!(eds.resource_names, ["a"]);
        assert!(
            reqs[0].node.is_some(),
            "a new stream identifies the node again"
        );
    }
}
