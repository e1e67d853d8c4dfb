//! The state-of-the-world ADS protocol as a state machine, without a transport.
//!
//! [`Sotw`] turns responses into the requests Envoy would send: an ACK carrying the version
//! and nonce of a response whose resources the [`Handler`] all accepted, or a NACK carrying
//! the last version accepted whole, the response's nonce and the refused resources by name
//! in `error_detail`. Either way the accepted resources are in force (Envoy's per-resource
//! acceptance). Subscriptions follow the handler: after every update it says which
//! resources of each type it wants ([`Interest`]), and a changed interest is sent at once
//! (CDS names the EDS resources to watch, LDS the RDS ones).
//!
//! Listener and Cluster responses carry the whole set: a resource missing from one is
//! removed. Other types (endpoints, routes) arrive as they change; they leave only when no
//! longer wanted. Only what changed reaches the handler: the client keeps a hash of every
//! body it holds, not the body. Keeping the protocol free of I/O makes every rule above a
//! unit test.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    hash::{DefaultHasher, Hasher},
    sync::Arc,
};

use bytes::BytesMut;
use tern_proto::{DiscoveryRequest, DiscoveryResponse, Node, Status};

use crate::{
    grpc::Outgoing,
    handler::{Handler, Interest, Update},
    resource::{Changes, Held, ResponseError, TypeState, is_full_state, resource_name},
};

/// A hash of a resource body, to tell a changed resource from one sent again.
pub(crate) fn body_hash(body: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(body);
    h.finish()
}

/// A request as the engine sends it: the protobuf message, with its resource names shared
/// with the engine's subscription instead of copied into it. Every ACK carries the names it
/// subscribes to (an EDS ACK in a mesh of 1,000 services: 1,000 names on every push); they are
/// written straight from the shared set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SotwRequest {
    /// The request, `resource_names` left empty.
    pub message: DiscoveryRequest,
    /// The names subscribed to; `None` for a wildcard.
    pub names: Option<Arc<BTreeSet<String>>>,
}

/// `resource_names`' field number in `DiscoveryRequest`.
const RESOURCE_NAMES: u32 = 3;

impl SotwRequest {
    fn names(&self) -> impl Iterator<Item = &String> {
        self.names.iter().flat_map(|n| n.iter())
    }

    /// The whole `DiscoveryRequest`, its names copied in: for a transport of its own (the
    /// stream this crate runs writes the names from the shared set instead).
    pub fn to_message(&self) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: self.names().cloned().collect(),
            ..self.message.clone()
        }
    }
}

impl Outgoing for SotwRequest {
    fn encoded_len(&self) -> usize {
        let names: usize = self
            .names()
            .map(|n| prost::encoding::string::encoded_len(RESOURCE_NAMES, n))
            .sum();
        prost::Message::encoded_len(&self.message) + names
    }

    /// The message's own fields, then the names: a protobuf reader takes fields in any order,
    /// and each name is one more element of the repeated field.
    fn encode_raw(&self, buf: &mut BytesMut) {
        prost::Message::encode_raw(&self.message, buf);
        for name in self.names() {
            prost::encoding::string::encode(RESOURCE_NAMES, name, buf);
        }
    }
}

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
    pub fn open_stream(&mut self, handler: &impl Handler) -> Vec<SotwRequest> {
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
                if interest.is_nothing() {
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
    ) -> SotwRequest {
        let node = (!self.node_sent).then(|| self.node.clone());
        self.node_sent = true;
        let state = self.state.entry(type_url).or_default();
        state.requested = true;
        state.subscribed = interest.subscribed();
        SotwRequest {
            message: DiscoveryRequest {
                version_info: state.version.clone(),
                node,
                type_url: type_url.to_owned(),
                response_nonce: state.nonce.clone(),
                error_detail: error.map(|message| Status {
                    code: 3, // INVALID_ARGUMENT, as Envoy sends
                    message,
                    details: Vec::new(),
                }),
                ..Default::default()
            },
            names: state.subscribed.clone(),
        }
    }

    /// Handles one response; returns the requests to send: its ACK or NACK, then a request
    /// for every type whose interest changed.
    pub fn on_response(
        &mut self,
        response: DiscoveryResponse,
        handler: &mut impl Handler,
    ) -> Vec<SotwRequest> {
        let Some(type_url) = self.types.iter().copied().find(|t| *t == response.type_url) else {
            // Not a type this client asked for: nothing to ACK.
            return Vec::new();
        };
        let interest = handler.interest(type_url);
        let version = response.version_info.clone();
        let nonce = response.nonce.clone();
        let changes = self.changes(type_url, response, &interest);
        let state = self.state.entry(type_url).or_default();
        let nack = match changes {
            Ok(changes) => {
                let nack = state.apply(type_url, changes, version, handler);
                // What was unwanted is gone, and what came was wanted.
                state.within = interest.subscribed();
                nack
            }
            Err(e) => Some(state.refuse(&e)),
        };
        state.nonce = nonce;
        let mut out = vec![self.request_for(type_url, &interest, nack)];
        out.extend(self.interest_changes(handler));
        out
    }

    /// Requests for types whose interest differs from what was last subscribed; resources
    /// no longer wanted leave at once.
    fn interest_changes(&mut self, handler: &mut impl Handler) -> Vec<SotwRequest> {
        let types = self.types.clone();
        let mut out = Vec::new();
        for t in types {
            let interest = handler.interest(t);
            let state = self.state.get(t);
            let requested = state.is_some_and(|s| s.requested);
            // An empty first request would mean "everything": a type nobody wants yet waits.
            if !requested && interest.is_nothing() {
                continue;
            }
            let same = state.is_some_and(|s| s.subscribed == interest.subscribed());
            if !requested || !same {
                forget_unwanted(self.state.get_mut(t), t, &interest, handler);
                out.push(self.request_for(t, &interest, None));
            }
        }
        out
    }

    /// Checks a response and works out what changed: the update for the handler, and what
    /// the client will hold of each changed resource if it is accepted.
    fn changes(
        &self,
        type_url: &'static str,
        response: DiscoveryResponse,
        interest: &Interest,
    ) -> Result<Changes, ResponseError> {
        let held = &self.state[type_url].resources;
        let mut seen = HashSet::with_capacity(response.resources.len());
        let mut update = Update::default();
        let mut changed = Vec::new();
        for (index, any) in response.resources.into_iter().enumerate() {
            if any.type_url != type_url {
                return Err(ResponseError::WrongType {
                    expected: type_url.to_owned(),
                    found: any.type_url,
                });
            }
            let name = resource_name(&any.value)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| ResponseError::Unnamed {
                    type_url: type_url.to_owned(),
                    index,
                })?;
            if !seen.insert(name.clone()) {
                return Err(ResponseError::Duplicate(name));
            }
            if !interest.wants(&name) {
                continue;
            }
            let hash = body_hash(&any.value);
            if held.get(&name).is_some_and(|h| h.hash == hash) {
                continue;
            }
            changed.push((
                name.clone(),
                Held {
                    version: response.version_info.clone(),
                    hash,
                },
            ));
            update.changed.push((name, any));
        }
        let state = &self.state[type_url];
        let within = match (&state.within, interest) {
            (Some(within), Interest::Names(names)) => Arc::ptr_eq(within, names),
            _ => false,
        };
        // A full-state type drops what the response lacks; any type drops what is no longer
        // wanted, unless nothing held can be unwanted (the subscription it was checked
        // against is this one).
        if is_full_state(type_url) || !within {
            let known: BTreeSet<&String> = held.keys().chain(state.rejected.keys()).collect();
            update.removed = known
                .into_iter()
                .filter(|n| !interest.wants(n) || (is_full_state(type_url) && !seen.contains(*n)))
                .cloned()
                .collect();
        }
        Ok(Changes {
            update,
            held: changed,
            malformed: Vec::new(),
        })
    }
}

/// Drops what a type holds beyond `interest`, telling the handler.
pub(crate) fn forget_unwanted(
    state: Option<&mut TypeState>,
    type_url: &'static str,
    interest: &Interest,
    handler: &mut impl Handler,
) {
    let Some(state) = state else { return };
    let removed: Vec<String> = state
        .resources
        .keys()
        .chain(state.rejected.keys())
        .filter(|n| !interest.wants(n))
        .cloned()
        .collect();
    state.within = interest.subscribed();
    if removed.is_empty() {
        return;
    }
    for n in &removed {
        state.forget(n);
    }
    // Removing resources nobody wants cannot be refused.
    let _ = handler.apply(
        type_url,
        Update {
            changed: Vec::new(),
            removed,
        },
    );
}

#[cfg(test)]
mod tests {
    use tern_proto::{Cluster, ClusterLoadAssignment, Listener, encode, type_url};

    use super::*;
    use crate::handler::RejectedConfig;

    /// What the server reads of the engine's requests: each encoded as the stream writes it,
    /// then decoded as one `DiscoveryRequest`.
    trait Wire {
        fn wire(self) -> Vec<DiscoveryRequest>;
    }

    impl Wire for Vec<SotwRequest> {
        fn wire(self) -> Vec<DiscoveryRequest> {
            self.iter()
                .map(|r| {
                    let mut buf = BytesMut::new();
                    r.encode_raw(&mut buf);
                    assert_eq!(buf.len(), Outgoing::encoded_len(r));
                    let decoded = <DiscoveryRequest as prost::Message>::decode(&buf[..]).unwrap();
                    assert_eq!(decoded, r.to_message());
                    decoded
                })
                .collect()
        }
    }

    /// Wants every cluster and listener, and the endpoints of every cluster it holds;
    /// refuses clusters named "bad".
    #[derive(Default)]
    struct Fake {
        clusters: BTreeSet<String>,
        applied: Vec<(String, Vec<String>, Vec<String>)>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("unsupported lb_policy")]
    struct Unsupported;

    impl Handler for Fake {
        fn apply(&mut self, t: &'static str, update: Update) -> Result<(), Vec<RejectedConfig>> {
            let mut rejected = Vec::new();
            let mut changed = Vec::new();
            for (name, _) in update.changed {
                if name == "bad" {
                    rejected.push(RejectedConfig::new(name, Unsupported));
                } else {
                    changed.push(name);
                }
            }
            if t == type_url::CLUSTER {
                self.clusters.extend(changed.iter().cloned());
                for r in &update.removed {
                    self.clusters.remove(r);
                }
            }
            self.applied.push((t.to_owned(), changed, update.removed));
            if rejected.is_empty() {
                Ok(())
            } else {
                Err(rejected)
            }
        }

        fn interest(&self, t: &str) -> Interest {
            if t == type_url::CLUSTER_LOAD_ASSIGNMENT {
                Interest::Names(Arc::new(self.clusters.clone()))
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

    /// Wants the endpoints named in one shared set, as a real handler hands its interest
    /// over: the same `Arc` while it does not change.
    struct Shared {
        wanted: Arc<BTreeSet<String>>,
        removed: Vec<String>,
    }

    impl Handler for Shared {
        fn apply(&mut self, _: &'static str, update: Update) -> Result<(), Vec<RejectedConfig>> {
            self.removed.extend(update.removed);
            Ok(())
        }

        fn interest(&self, _: &str) -> Interest {
            Interest::Names(self.wanted.clone())
        }
    }

    #[test]
    fn endpoints_no_longer_wanted_go_even_when_the_interest_changed_unannounced() {
        let names = |n: &[&str]| Arc::new(n.iter().map(|s| (*s).to_owned()).collect());
        let mut s = Sotw::new(node(), &[type_url::CLUSTER_LOAD_ASSIGNMENT]);
        let mut h = Shared {
            wanted: names(&["a", "b"]),
            removed: Vec::new(),
        };
        s.open_stream(&h).wire();
        s.on_response(endpoints("1", "n1", &["a", "b"]), &mut h)
            .wire();
        // The same subscription: a response with part of it removes nothing (EDS is not
        // state of the world).
        s.on_response(endpoints("2", "n2", &["a"]), &mut h).wire();
        assert!(h.removed.is_empty(), "{:?}", h.removed);
        assert_eq!(
            s.state()[type_url::CLUSTER_LOAD_ASSIGNMENT].names().len(),
            2
        );
        // The handler stops wanting "b" with no response in between: the next response
        // drops it.
        h.wanted = names(&["a"]);
        s.on_response(endpoints("3", "n3", &["a"]), &mut h).wire();
        assert_eq!(h.removed, ["b"]);
        assert_eq!(
            &*s.state()[type_url::CLUSTER_LOAD_ASSIGNMENT].names(),
            ["a"]
        );
    }

    #[test]
    fn a_stream_opens_with_wildcards_and_the_node_once() {
        let mut s = engine();
        let reqs = s.open_stream(&Fake::default()).wire();
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
        s.open_stream(&h).wire();
        let out = s
            .on_response(clusters("v1", "n1", &["a", "b"]), &mut h)
            .wire();
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
    fn a_refused_resource_is_nacked_by_name_and_the_others_apply() {
        let mut s = engine();
        let mut h = Fake::default();
        s.open_stream(&h).wire();
        s.on_response(clusters("v1", "n1", &["a"]), &mut h).wire();
        let out = s
            .on_response(clusters("v2", "n2", &["a", "b", "bad"]), &mut h)
            .wire();
        let nack = &out[0];
        assert_eq!(
            (nack.version_info.as_str(), nack.response_nonce.as_str()),
            ("v1", "n2")
        );
        let message = &nack.error_detail.as_ref().unwrap().message;
        assert_eq!(message, "bad: unsupported lb_policy");
        let state = &s.state()[type_url::CLUSTER];
        assert_eq!(state.version, "v1");
        assert_eq!(
            state.resources.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "b applies"
        );
        assert_eq!(state.rejected.keys().collect::<Vec<_>>(), ["bad"]);
        assert_eq!(
            h.applied.last().unwrap().1,
            ["b"],
            "a did not change: not handed again"
        );
        assert_eq!((state.acks, state.nacks), (1, 1));
        // The same bad resource again is refused again; once it is gone, the next response
        // is ACKed and clears the error.
        let out = s
            .on_response(clusters("v3", "n3", &["a", "b", "bad"]), &mut h)
            .wire();
        assert!(out[0].error_detail.is_some());
        let out = s
            .on_response(clusters("v4", "n4", &["a", "b"]), &mut h)
            .wire();
        assert!(out[0].error_detail.is_none());
        let state = &s.state()[type_url::CLUSTER];
        assert!(state.last_error.is_none() && state.rejected.is_empty());
        assert_eq!(state.version, "v4");
    }

    #[test]
    fn wrong_types_unnamed_and_duplicate_resources_are_nacked() {
        let mut s = engine();
        let mut h = Fake::default();
        s.open_stream(&h).wire();
        let mut wrong = clusters("v1", "n1", &["a"]);
        wrong.resources.push(encode(
            &Listener {
                name: "l".into(),
                ..Default::default()
            },
            type_url::LISTENER,
        ));
        assert!(
            s.on_response(wrong, &mut h).wire()[0]
                .error_detail
                .is_some()
        );
        assert!(
            s.on_response(clusters("v1", "n2", &[""]), &mut h).wire()[0]
                .error_detail
                .is_some()
        );
        assert!(
            s.on_response(clusters("v1", "n3", &["a", "a"]), &mut h)
                .wire()[0]
                .error_detail
                .is_some()
        );
        assert!(h.applied.is_empty());
    }

    #[test]
    fn clusters_missing_from_a_response_are_removed_endpoints_are_not() {
        let mut s = engine();
        let mut h = Fake::default();
        s.open_stream(&h).wire();
        s.on_response(clusters("v1", "n1", &["a", "b"]), &mut h)
            .wire();
        s.on_response(endpoints("e1", "m1", &["a", "b"]), &mut h)
            .wire();
        // An endpoints update for "a" alone leaves "b" in place.
        s.on_response(endpoints("e2", "m2", &["a"]), &mut h).wire();
        assert_eq!(
            s.state()[type_url::CLUSTER_LOAD_ASSIGNMENT].resources.len(),
            2
        );
        // Cluster "b" disappears: removed, and its endpoints are no longer wanted.
        let out = s.on_response(clusters("v2", "n2", &["a"]), &mut h).wire();
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
        s.open_stream(&h).wire();
        s.on_response(clusters("v7", "n7", &["a"]), &mut h).wire();
        let reqs = s.open_stream(&h).wire();
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
