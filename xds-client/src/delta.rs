//! The incremental (delta) ADS protocol as a state machine, without a transport.
//!
//! Same contract as [`crate::sotw`], other wire rules: a response carries only the resources
//! that changed (each with its own version) and the names removed; the client ACKs or NACKs
//! by nonce alone; subscriptions change by difference (`resource_names_subscribe` /
//! `_unsubscribe`); a new stream announces the versions held (`initial_resource_versions`)
//! so the server sends only what changed. The handler still sees the complete set.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use tern_proto::{Any, DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};

use crate::sotw::{Handler, Interest, TypeState, resource_name};

/// A type's resources after a response, their versions, and the names it removed.
type DeltaUpdate = (BTreeMap<String, Any>, BTreeMap<String, String>, Vec<String>);

/// The protocol state of one delta ADS client.
#[derive(Debug)]
pub struct Delta {
    node: Node,
    types: Vec<&'static str>,
    state: BTreeMap<&'static str, TypeState>,
    /// Version of every resource held, by type and name.
    versions: BTreeMap<&'static str, BTreeMap<String, String>>,
    node_sent: bool,
}

impl Delta {
    pub fn new(node: Node, types: &[&'static str]) -> Self {
        Self {
            node,
            types: types.to_vec(),
            state: types.iter().map(|t| (*t, TypeState::default())).collect(),
            versions: types.iter().map(|t| (*t, BTreeMap::new())).collect(),
            node_sent: false,
        }
    }

    pub fn state(&self) -> &BTreeMap<&'static str, TypeState> {
        &self.state
    }

    fn base(&mut self, type_url: &'static str) -> DeltaDiscoveryRequest {
        let node = (!self.node_sent).then(|| self.node.clone());
        self.node_sent = true;
        DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_owned(),
            ..Default::default()
        }
    }

    /// The requests that open a stream: every wanted type with its names (none for a
    /// wildcard) and the versions held.
    pub fn open_stream(&mut self, handler: &impl Handler) -> Vec<DeltaDiscoveryRequest> {
        self.node_sent = false;
        let types = self.types.clone();
        let mut out = Vec::new();
        for t in types {
            let interest = handler.interest(t);
            let state = self.state.entry(t).or_default();
            state.nonce.clear();
            if interest == Interest::Names(BTreeSet::new()) {
                state.subscribed = Some(BTreeSet::new());
                continue;
            }
            let mut req = self.base(t);
            req.initial_resource_versions = self.versions[t]
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect::<HashMap<_, _>>();
            let state = self.state.entry(t).or_default();
            match interest {
                Interest::Wildcard => state.subscribed = None,
                Interest::Names(names) => {
                    req.resource_names_subscribe = names.iter().cloned().collect();
                    state.subscribed = Some(names);
                }
            }
            out.push(req);
        }
        out
    }

    /// Handles one response; returns its ACK or NACK, then subscription changes.
    pub fn on_response(
        &mut self,
        response: DeltaDiscoveryResponse,
        handler: &mut impl Handler,
    ) -> Vec<DeltaDiscoveryRequest> {
        let Some(type_url) = self.types.iter().copied().find(|t| *t == response.type_url) else {
            return Vec::new();
        };
        let outcome = self
            .check(type_url, &response)
            .and_then(|(resources, versions, removed)| {
                handler.apply(type_url, &resources, &removed)?;
                Ok((resources, versions))
            });
        let mut reply = self.base(type_url);
        reply.response_nonce = response.nonce.clone();
        let state = self.state.entry(type_url).or_default();
        state.nonce = response.nonce.clone();
        state.last_update = Some(std::time::SystemTime::now());
        match outcome {
            Ok((resources, versions)) => {
                state.version = response.system_version_info.clone();
                state.resources = resources;
                state.last_error = None;
                state.acks += 1;
                self.versions.insert(type_url, versions);
            }
            Err(reason) => {
                state.last_error = Some(reason.clone());
                state.nacks += 1;
                reply.error_detail = Some(Status {
                    code: 3,
                    message: reason,
                    details: Vec::new(),
                });
            }
        }
        let mut out = vec![reply];
        out.extend(self.interest_changes(handler));
        out
    }

    fn interest_changes(&mut self, handler: &impl Handler) -> Vec<DeltaDiscoveryRequest> {
        let types = self.types.clone();
        let mut out = Vec::new();
        for t in types {
            let Interest::Names(wanted) = handler.interest(t) else {
                continue;
            };
            let had = self
                .state
                .get(t)
                .and_then(|s| s.subscribed.clone())
                .unwrap_or_default();
            if had == wanted {
                continue;
            }
            let mut req = self.base(t);
            req.resource_names_subscribe = wanted.difference(&had).cloned().collect();
            req.resource_names_unsubscribe = had.difference(&wanted).cloned().collect();
            let state = self.state.entry(t).or_default();
            state.resources.retain(|n, _| wanted.contains(n));
            if let Some(v) = self.versions.get_mut(t) {
                v.retain(|n, _| wanted.contains(n));
            }
            self.state.entry(t).or_default().subscribed = Some(wanted);
            out.push(req);
        }
        out
    }

    /// Validates a response and computes the resources, their versions, and what it removed.
    fn check(
        &self,
        type_url: &'static str,
        response: &DeltaDiscoveryResponse,
    ) -> Result<DeltaUpdate, String> {
        let mut resources = self.state[type_url].resources.clone();
        let mut versions = self.versions[type_url].clone();
        for r in &response.resources {
            let Some(any) = &r.resource else {
                return Err(format!("resource {} has no body", r.name));
            };
            if any.type_url != type_url {
                return Err(format!(
                    "a resource of type {} in a response of type {type_url}",
                    any.type_url
                ));
            }
            let name = resource_name(any)?;
            if name != r.name {
                return Err(format!("resource {} is named {name} inside", r.name));
            }
            resources.insert(name.clone(), any.clone());
            versions.insert(name, r.version.clone());
        }
        let mut removed = Vec::new();
        for name in &response.removed_resources {
            if resources.remove(name).is_some() {
                removed.push(name.clone());
            }
            versions.remove(name);
        }
        Ok((resources, versions, removed))
    }
}

#[cfg(test)]
mod tests {
    use tern_proto::{Cluster, ClusterLoadAssignment, Resource, encode, type_url};

    use super::*;

    #[derive(Default)]
    struct Fake {
        clusters: BTreeSet<String>,
    }

    impl Handler for Fake {
        fn apply(
            &mut self,
            t: &str,
            resources: &BTreeMap<String, Any>,
            _removed: &[String],
        ) -> Result<(), String> {
            if resources.contains_key("bad") {
                return Err("cluster bad is refused".into());
            }
            if t == type_url::CLUSTER {
                self.clusters = resources.keys().cloned().collect();
            }
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

    fn cluster(name: &str, version: &str) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(encode(
                &Cluster {
                    name: name.into(),
                    ..Default::default()
                },
                type_url::CLUSTER,
            )),
            ..Default::default()
        }
    }

    fn response(nonce: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: nonce.into(),
            type_url: type_url::CLUSTER.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn engine() -> Delta {
        Delta::new(
            Node::default(),
            &[type_url::CLUSTER, type_url::CLUSTER_LOAD_ASSIGNMENT],
        )
    }

    #[test]
    fn changes_add_up_and_removals_remove() {
        let mut d = engine();
        let mut h = Fake::default();
        let open = d.open_stream(&h);
        assert_eq!(open.len(), 1, "endpoints are not wanted yet");
        assert!(open[0].node.is_some() && open[0].resource_names_subscribe.is_empty());

        let out = d.on_response(
            response("1", vec![cluster("a", "1"), cluster("b", "1")], &[]),
            &mut h,
        );
        assert_eq!(out[0].response_nonce, "1");
        assert!(out[0].error_detail.is_none());
        assert_eq!(out[1].type_url, type_url::CLUSTER_LOAD_ASSIGNMENT);
        assert_eq!(out[1].resource_names_subscribe, ["a", "b"]);

        // Only "c" changes; "a" goes away explicitly; "b" stays.
        let out = d.on_response(response("2", vec![cluster("c", "2")], &["a"]), &mut h);
        assert_eq!(
            d.state()[type_url::CLUSTER]
                .resources
                .keys()
                .collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert_eq!(out[1].resource_names_subscribe, ["c"]);
        assert_eq!(out[1].resource_names_unsubscribe, ["a"]);
    }

    #[test]
    fn a_refused_response_is_nacked_by_nonce_and_changes_nothing() {
        let mut d = engine();
        let mut h = Fake::default();
        d.open_stream(&h);
        d.on_response(response("1", vec![cluster("a", "1")], &[]), &mut h);
        let out = d.on_response(response("2", vec![cluster("bad", "2")], &[]), &mut h);
        assert_eq!(out[0].response_nonce, "2");
        assert!(
            out[0]
                .error_detail
                .as_ref()
                .unwrap()
                .message
                .contains("refused")
        );
        assert_eq!(d.state()[type_url::CLUSTER].resources.len(), 1);
        let mismatched = Resource {
            name: "x".into(),
            ..cluster("y", "3")
        };
        assert!(
            d.on_response(response("3", vec![mismatched], &[]), &mut h)[0]
                .error_detail
                .is_some()
        );
    }

    #[test]
    fn a_new_stream_announces_the_versions_held() {
        let mut d = engine();
        let mut h = Fake::default();
        d.open_stream(&h);
        d.on_response(response("1", vec![cluster("a", "v1")], &[]), &mut h);
        let eds = DeltaDiscoveryResponse {
            type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.into(),
            nonce: "e1".into(),
            resources: vec![Resource {
                name: "a".into(),
                version: "e1".into(),
                resource: Some(encode(
                    &ClusterLoadAssignment {
                        cluster_name: "a".into(),
                        ..Default::default()
                    },
                    type_url::CLUSTER_LOAD_ASSIGNMENT,
                )),
                ..Default::default()
            }],
            ..Default::default()
        };
        d.on_response(eds, &mut h);
        let reqs = d.open_stream(&h);
        assert_eq!(
            reqs[0]
                .initial_resource_versions
                .get("a")
                .map(String::as_str),
            Some("v1")
        );
        assert_eq!(reqs[1].resource_names_subscribe, ["a"]);
        assert_eq!(
            reqs[1]
                .initial_resource_versions
                .get("a")
                .map(String::as_str),
            Some("e1")
        );
        assert!(reqs.iter().all(|r| r.response_nonce.is_empty()));
    }
}
