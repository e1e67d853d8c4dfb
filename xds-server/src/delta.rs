//! The incremental (delta) protocol, server side, as a state machine without a transport: the
//! mirror of `tern_xds_client::Delta`.
//!
//! [`DeltaStream`] keeps, per type, what the client holds (name → version): seeded from
//! `initial_resource_versions` when a client reconnects, then from what was sent. Every
//! answer carries only the difference: resources whose version the client lacks, and
//! `removed_resources` for those it holds that are gone or no longer subscribed, and for
//! subscribed names that do not exist (said once, so the client need not wait for a timer).
//! Subscriptions change with every request, stale nonce or not; ACKs and NACKs count only
//! with the type's latest nonce. A NACKed resource is not sent again until it changes.
//! Wildcard is `*`, or a first request of a listener or cluster type naming nothing.
use std::collections::{BTreeMap, BTreeSet};

use tern_proto::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as WireResource};

use crate::{
    snapshot::Snapshot,
    sotw::is_wildcard_type,
    status::{Received, TypeStatus},
};

#[derive(Debug, Default)]
struct TypeState {
    status: TypeStatus,
    /// The names subscribed (besides `*`).
    names: BTreeSet<String>,
    /// Whether the type's first request on this stream was handled.
    started: bool,
    nonce: Option<String>,
    /// What the client holds: name → version.
    held: BTreeMap<String, String>,
    /// Subscribed names already reported absent.
    reported_absent: BTreeSet<String>,
    /// The version of the type's set when this subscription was last compared with it: the
    /// same set and subscription need no comparison (an ACK, a change to another type).
    compared: Option<String>,
}

/// One delta stream's protocol state.
#[derive(Debug, Default)]
pub struct DeltaStream {
    types: BTreeMap<String, TypeState>,
    nonces: u64,
}

impl DeltaStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the client has of each type.
    pub fn status(&self) -> impl Iterator<Item = (&str, &TypeStatus)> {
        self.types.iter().map(|(t, s)| (t.as_str(), &s.status))
    }

    /// Handles one request; returns what it was and the response to send, if any.
    pub fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        snapshot: &Snapshot,
    ) -> (Received, Option<DeltaDiscoveryResponse>) {
        let type_url = request.type_url.as_str();
        let state = self.types.entry(type_url.to_owned()).or_default();
        // A stale nonce's subscription changes still count (delta).
        let received = state.status.receive(
            state.nonce.as_deref(),
            &request.response_nonce,
            request.error_detail.as_ref().map(|e| e.message.as_str()),
        );

        let first = !state.started;
        if first {
            state.started = true;
            state.held = request
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            if request.resource_names_subscribe.is_empty()
                && request.resource_names_unsubscribe.is_empty()
                && is_wildcard_type(type_url)
            {
                state.status.wildcard = true;
            }
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                state.status.wildcard = true;
            } else {
                state.names.insert(name.clone());
                state.reported_absent.remove(name);
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.status.wildcard = false;
            } else {
                state.names.remove(name);
                state.reported_absent.remove(name);
                if !state.status.wildcard {
                    // The client drops it: naming it again sends it again.
                    state.held.remove(name);
                }
            }
        }
        state.status.subscribed = state.names.len();
        if first
            || !request.resource_names_subscribe.is_empty()
            || !request.resource_names_unsubscribe.is_empty()
        {
            state.compared = None;
        }
        let response = self.respond(type_url, snapshot, first);
        (received, response)
    }

    /// A new snapshot: the responses for every type whose subscribed resources changed.
    pub fn on_snapshot(&mut self, snapshot: &Snapshot) -> Vec<DeltaDiscoveryResponse> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        types
            .iter()
            .filter_map(|t| self.respond(t, snapshot, false))
            .collect()
    }

    fn respond(
        &mut self,
        type_url: &str,
        snapshot: &Snapshot,
        first: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let state = self.types.get_mut(type_url)?;
        let version = snapshot.version(type_url);
        if state.compared.as_deref() == Some(version) {
            return None;
        }
        state.compared = Some(version.to_owned());
        // One pass over what is in scope, one over what the client holds.
        let mut updates = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        let mut absent: Vec<String> = Vec::new();
        if state.status.wildcard {
            updates.extend(
                snapshot
                    .of_type(type_url)
                    .filter(|r| state.held.get(&r.name) != Some(&r.version)),
            );
            removed.extend(
                state
                    .held
                    .keys()
                    .filter(|n| snapshot.get(type_url, n).is_none())
                    .cloned(),
            );
        } else {
            removed.extend(
                state
                    .held
                    .keys()
                    .filter(|n| !state.names.contains(*n))
                    .cloned(),
            );
        }
        for name in &state.names {
            match snapshot.get(type_url, name) {
                Some(r) if !state.status.wildcard && state.held.get(name) != Some(&r.version) => {
                    updates.push(r)
                }
                Some(_) => {}
                // Under the wildcard, the pass over what the client holds found it gone.
                None if state.held.contains_key(name) && !state.status.wildcard => {
                    removed.push(name.clone());
                }
                None if state.held.contains_key(name) => {}
                None if !state.reported_absent.contains(name) => absent.push(name.clone()),
                None => {}
            }
        }
        for name in &removed {
            state.held.remove(name);
        }
        state.reported_absent.extend(absent.iter().cloned());
        removed.extend(absent);
        // The first request of a wildcard type is answered even with nothing (Envoy waits
        // for it to finish its initialisation).
        if updates.is_empty() && removed.is_empty() && !(first && state.status.wildcard) {
            return None;
        }
        let resources = updates
            .into_iter()
            .map(|r| {
                state.reported_absent.remove(&r.name);
                state.held.insert(r.name.clone(), r.version.clone());
                WireResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                }
            })
            .collect();
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let version = version.to_owned();
        state.nonce = Some(nonce.clone());
        state.status.sent_version = Some(version.clone());
        state.status.responses += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: type_url.to_owned(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use tern_proto::{Any, Status, type_url};

    use super::*;

    const EDS: &str = type_url::CLUSTER_LOAD_ASSIGNMENT;
    const CDS: &str = type_url::CLUSTER;

    fn snapshot(items: &[(&str, &str, &str)]) -> Snapshot {
        Snapshot::new(items.iter().map(|(t, name, body)| {
            (
                (*name).to_owned(),
                Any {
                    type_url: (*t).to_owned(),
                    value: body.as_bytes().to_vec(),
                },
            )
        }))
    }

    fn request(
        type_url: &str,
        subscribe: &[&str],
        unsubscribe: &[&str],
        nonce: &str,
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: subscribe.iter().map(|n| (*n).to_owned()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| (*n).to_owned()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn sent(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn wildcard_sends_only_differences() {
        let one = snapshot(&[(CDS, "a", "1"), (CDS, "b", "1")]);
        let mut s = DeltaStream::new();
        let r = s.on_request(&request(CDS, &[], &[], ""), &one).1.unwrap();
        assert_eq!(sent(&r), ["a", "b"]);
        let (what, none) = s.on_request(&request(CDS, &[], &[], &r.nonce), &one);
        assert_eq!((what, none), (Received::Ack, None));
        assert!(s.status().next().unwrap().1.in_sync());

        let two = snapshot(&[(CDS, "a", "2"), (CDS, "c", "1")]);
        let p = s.on_snapshot(&two).remove(0);
        assert_eq!(sent(&p), ["a", "c"]);
        assert_eq!(p.removed_resources, ["b"]);
        assert!(s.on_snapshot(&two).is_empty(), "nothing changed since");
    }

    #[test]
    fn a_reconnect_with_initial_versions_gets_only_what_changed() {
        let one = snapshot(&[(CDS, "a", "1"), (CDS, "b", "1"), (CDS, "c", "1")]);
        let mut before = DeltaStream::new();
        let r = before
            .on_request(&request(CDS, &["*"], &[], ""), &one)
            .1
            .unwrap();
        let held: std::collections::HashMap<String, String> = r
            .resources
            .iter()
            .map(|x| (x.name.clone(), x.version.clone()))
            .collect();
        // While the client was away, `b` changed and `c` went.
        let two = snapshot(&[(CDS, "a", "1"), (CDS, "b", "2")]);
        let mut after = DeltaStream::new();
        let reconnect = DeltaDiscoveryRequest {
            initial_resource_versions: held,
            ..request(CDS, &["*"], &[], "")
        };
        let r = after.on_request(&reconnect, &two).1.unwrap();
        assert_eq!(sent(&r), ["b"]);
        assert_eq!(r.removed_resources, ["c"]);
    }

    #[test]
    fn named_resources_come_and_go_and_absent_ones_are_said_once() {
        let one = snapshot(&[(EDS, "a", "1")]);
        let mut s = DeltaStream::new();
        let r = s
            .on_request(&request(EDS, &["a", "x"], &[], ""), &one)
            .1
            .unwrap();
        assert_eq!(sent(&r), ["a"]);
        assert_eq!(r.removed_resources, ["x"], "x does not exist");
        assert!(
            s.on_request(&request(EDS, &[], &[], &r.nonce), &one)
                .1
                .is_none()
        );
        // x appears.
        let two = snapshot(&[(EDS, "a", "1"), (EDS, "x", "1")]);
        assert_eq!(sent(&s.on_snapshot(&two)[0]), ["x"]);
        // Unsubscribing needs no answer; subscribing again sends it again.
        assert!(
            s.on_request(&request(EDS, &[], &["x"], ""), &two)
                .1
                .is_none()
        );
        let again = s
            .on_request(&request(EDS, &["x"], &[], ""), &two)
            .1
            .unwrap();
        assert_eq!(sent(&again), ["x"]);
        // Another name's change is nothing to this client.
        let three = snapshot(&[(EDS, "a", "1"), (EDS, "x", "1"), (EDS, "y", "9")]);
        assert!(s.on_snapshot(&three).is_empty());
    }

    #[test]
    fn a_nack_is_recorded_and_the_refused_resource_is_not_resent() {
        let bad = snapshot(&[(CDS, "a", "bad")]);
        let mut s = DeltaStream::new();
        let r = s.on_request(&request(CDS, &[], &[], ""), &bad).1.unwrap();
        let nack = DeltaDiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: "refused".into(),
                details: Vec::new(),
            }),
            ..request(CDS, &[], &[], &r.nonce)
        };
        assert_eq!(s.on_request(&nack, &bad), (Received::Nack, None));
        let status = s.status().next().unwrap().1;
        assert_eq!(status.acked_version, None);
        assert_eq!(status.last_nack.as_ref().unwrap().message, "refused");
        let good = snapshot(&[(CDS, "a", "good")]);
        assert_eq!(sent(&s.on_snapshot(&good)[0]), ["a"]);
    }

    #[test]
    fn subscription_changes_count_with_a_stale_nonce() {
        let snap = snapshot(&[(EDS, "a", "1"), (EDS, "b", "1")]);
        let mut s = DeltaStream::new();
        s.on_request(&request(EDS, &["a"], &[], ""), &snap);
        let (what, r) = s.on_request(&request(EDS, &["b"], &[], "old"), &snap);
        assert_eq!(what, Received::Stale);
        assert_eq!(sent(&r.unwrap()), ["b"]);
    }

    #[test]
    fn the_first_wildcard_request_is_answered_even_with_nothing() {
        let mut s = DeltaStream::new();
        let r = s.on_request(&request(CDS, &[], &[], ""), &Snapshot::default());
        assert!(r.1.unwrap().resources.is_empty());
        let mut named = DeltaStream::new();
        assert!(
            named
                .on_request(&request(EDS, &[], &[], ""), &Snapshot::default())
                .1
                .is_none()
        );
    }
}
