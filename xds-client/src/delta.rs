//! The incremental (delta) ADS protocol as a state machine, without a transport.
//!
//! Same contract as [`crate::sotw`], other wire rules: a response carries only the resources
//! that changed (each with its own version) and the names removed; the client ACKs or NACKs
//! by nonce alone; subscriptions change by difference (`resource_names_subscribe` /
//! `_unsubscribe`); a new stream announces the versions held (`initial_resource_versions`)
//! so the server sends only what changed. The handler sees exactly what changed.
use std::collections::{BTreeMap, HashSet};

use tern_proto::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};

use crate::{
    handler::{Handler, Interest, RejectedConfig, Update},
    resource::{Changes, Held, ResponseError, TypeState, resource_name},
    sotw::forget_unwanted,
};

/// The protocol state of one delta ADS client.
#[derive(Debug)]
pub struct Delta {
    node: Node,
    types: Vec<&'static str>,
    state: BTreeMap<&'static str, TypeState>,
    node_sent: bool,
}

/// A delta resource the client itself refuses (the handler never sees it).
#[derive(Debug, thiserror::Error)]
enum MalformedResource {
    #[error("no body")]
    NoBody,
    #[error("its body is named {0:?}")]
    Misnamed(Option<String>),
}

impl Delta {
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
            if interest.is_nothing() {
                state.subscribed = Some(Default::default());
                continue;
            }
            let initial_resource_versions = state
                .resources
                .iter()
                .map(|(n, h)| (n.clone(), h.version.clone()))
                .collect();
            state.subscribed = interest.subscribed();
            let mut req = self.base(t);
            req.initial_resource_versions = initial_resource_versions;
            req.resource_names_subscribe = interest.names();
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
        let version = response.system_version_info.clone();
        let nonce = response.nonce.clone();
        let changes = self.changes(type_url, response);
        let state = self.state.entry(type_url).or_default();
        let nack = match changes {
            Ok(changes) => state.apply(type_url, changes, version, handler),
            Err(e) => Some(state.refuse(&e)),
        };
        state.nonce = nonce.clone();
        let mut reply = self.base(type_url);
        reply.response_nonce = nonce;
        reply.error_detail = nack.map(|message| Status {
            code: 3,
            message,
            details: Vec::new(),
        });
        let mut out = vec![reply];
        out.extend(self.interest_changes(handler));
        out
    }

    fn interest_changes(&mut self, handler: &mut impl Handler) -> Vec<DeltaDiscoveryRequest> {
        let types = self.types.clone();
        let mut out = Vec::new();
        for t in types {
            let interest = handler.interest(t);
            let Interest::Names(wanted) = &interest else {
                continue;
            };
            let had = self
                .state
                .get(t)
                .and_then(|s| s.subscribed.clone())
                .unwrap_or_default();
            if &had == wanted {
                continue;
            }
            let mut req = self.base(t);
            req.resource_names_subscribe = wanted.difference(&had).cloned().collect();
            req.resource_names_unsubscribe = had.difference(wanted).cloned().collect();
            forget_unwanted(self.state.get_mut(t), t, &interest, handler);
            self.state.entry(t).or_default().subscribed = Some(wanted.clone());
            out.push(req);
        }
        out
    }

    /// Checks a response: the update for the handler, what will be held of each changed
    /// resource, and the resources refused before the handler (no body, a wrong name).
    fn changes(
        &self,
        type_url: &'static str,
        response: DeltaDiscoveryResponse,
    ) -> Result<Changes, ResponseError> {
        let state = &self.state[type_url];
        let mut seen = HashSet::with_capacity(response.resources.len());
        let mut update = Update::default();
        let mut held = Vec::new();
        let mut malformed = Vec::new();
        for r in response.resources {
            if !seen.insert(r.name.clone()) {
                return Err(ResponseError::Duplicate(r.name));
            }
            let Some(any) = r.resource else {
                malformed.push(RejectedConfig::new(r.name, MalformedResource::NoBody));
                continue;
            };
            if any.type_url != type_url {
                return Err(ResponseError::WrongType {
                    expected: type_url.to_owned(),
                    found: any.type_url,
                });
            }
            let inside = resource_name(&any.value);
            if inside.as_deref() != Some(r.name.as_str()) {
                malformed.push(RejectedConfig::new(
                    r.name,
                    MalformedResource::Misnamed(inside),
                ));
                continue;
            }
            held.push((
                r.name.clone(),
                Held {
                    version: r.version,
                    hash: 0,
                },
            ));
            update.changed.push((r.name, any));
        }
        update.removed = response
            .removed_resources
            .into_iter()
            .filter(|n| state.resources.contains_key(n) || state.rejected.contains_key(n))
            .collect();
        Ok(Changes {
            update,
            held,
            malformed,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tern_proto::{Cluster, ClusterLoadAssignment, Resource, encode, type_url};

    use super::*;

    #[derive(Default)]
    struct Fake {
        clusters: BTreeSet<String>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Refused;

    impl Handler for Fake {
        fn apply(&mut self, t: &'static str, update: Update) -> Result<(), Vec<RejectedConfig>> {
            let mut rejected = Vec::new();
            for (name, _) in update.changed {
                if name == "bad" {
                    rejected.push(RejectedConfig::new(name, Refused));
                } else if t == type_url::CLUSTER {
                    self.clusters.insert(name);
                }
            }
            if t == type_url::CLUSTER {
                for r in &update.removed {
                    self.clusters.remove(r);
                }
            }
            if rejected.is_empty() {
                Ok(())
            } else {
                Err(rejected)
            }
        }
        fn interest(&self, t: &str) -> Interest {
            if t == type_url::CLUSTER_LOAD_ASSIGNMENT {
                Interest::Names(std::sync::Arc::new(self.clusters.clone()))
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
    fn a_refused_resource_is_nacked_by_nonce_and_the_others_apply() {
        let mut d = engine();
        let mut h = Fake::default();
        d.open_stream(&h);
        d.on_response(response("1", vec![cluster("a", "1")], &[]), &mut h);
        let out = d.on_response(
            response("2", vec![cluster("bad", "2"), cluster("b", "2")], &[]),
            &mut h,
        );
        assert_eq!(out[0].response_nonce, "2");
        assert_eq!(
            out[0].error_detail.as_ref().unwrap().message,
            "bad: refused"
        );
        assert_eq!(
            d.state()[type_url::CLUSTER]
                .resources
                .keys()
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
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
