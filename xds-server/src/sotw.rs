//! The state-of-the-world protocol, server side, as a state machine without a transport: the
//! mirror of `tern_xds_client::Sotw`.
//!
//! [`SotwStream`] is one client stream. Each request is an ACK, a NACK (it carries
//! `error_detail`, whatever its version says), a stale request (its nonce is not the type's
//! latest: ignored) or a first request; all of them may change the subscription. The server
//! answers when what the client should hold differs from what this stream last sent it:
//! - wildcard types (LDS, CDS never naming a resource, or naming `*`) hold every resource of the
//!   type, named subscriptions the named resources that exist (a name that appears later is sent
//!   then);
//! - after a NACK nothing is sent again until the resources change, so a client never loops
//!   on a configuration it refuses;
//! - a reconnecting client whose first request already carries the current version of a
//!   wildcard type gets nothing it holds;
//! - a snapshot change reaches only the types, and only the clients, whose subscribed
//!   resources changed.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tern_proto::{DiscoveryRequest, DiscoveryResponse, type_url};

use crate::{
    limits::{self, Refused},
    snapshot::Snapshot,
    status::{Received, TypeStatus},
};

/// Types whose first request naming nothing means every resource (legacy wildcard).
pub fn is_wildcard_type(type_url: &str) -> bool {
    type_url == type_url::LISTENER || type_url == type_url::CLUSTER
}

#[derive(Debug, Default)]
struct TypeState {
    status: TypeStatus,
    /// The names subscribed (besides `*`).
    names: BTreeSet<String>,
    /// Whether a request of this type named anything on this stream (after which an empty
    /// list means nothing, not everything).
    named: bool,
    nonce: Option<String>,
    /// What the client holds as far as this stream knows: name → version of the resources
    /// last sent (`None`: nothing sent yet).
    sent: Option<BTreeMap<Arc<str>, Arc<str>>>,
    /// The version of the type's set when this subscription was last compared with it: the
    /// same set and subscription need no comparison (an ACK, a change to another type).
    compared: Option<String>,
}

impl TypeState {
    fn subscribed(&self) -> bool {
        self.status.wildcard || !self.names.is_empty()
    }

    /// The resources this client should hold, by name → version.
    fn wanted(&self, type_url: &str, snapshot: &Snapshot) -> BTreeMap<Arc<str>, Arc<str>> {
        if self.status.wildcard {
            snapshot
                .of_type(type_url)
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect()
        } else {
            self.names
                .iter()
                .filter_map(|n| snapshot.get(type_url, n))
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect()
        }
    }
}

/// One state-of-the-world stream's protocol state.
#[derive(Debug, Default)]
pub struct SotwStream {
    types: BTreeMap<String, TypeState>,
    nonces: u64,
}

impl SotwStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the client has of each type.
    pub fn status(&self) -> impl Iterator<Item = (&str, &TypeStatus)> {
        self.types.iter().map(|(t, s)| (t.as_str(), &s.status))
    }

    /// Whether this stream may take `request` (see [`crate::limits`]); a refused request
    /// ends the stream.
    pub fn admit(&self, request: &DiscoveryRequest) -> Result<(), Refused> {
        limits::check(
            self.types.len(),
            !self.types.contains_key(&request.type_url),
            &request.type_url,
            request.resource_names.len(),
        )
    }

    /// Handles one request; returns what it was and the response to send, if any.
    pub fn on_request(
        &mut self,
        request: &DiscoveryRequest,
        snapshot: &Snapshot,
    ) -> (Received, Option<DiscoveryResponse>) {
        let type_url = request.type_url.as_str();
        let state = self.types.entry(type_url.to_owned()).or_default();
        let received = state.status.receive(
            state.nonce.as_deref(),
            &[],
            &request.response_nonce,
            request.error_detail.as_ref().map(|e| e.message.as_str()),
        );
        if received == Received::Stale {
            // Superseded: its subscription too (state of the world).
            return (received, None);
        }

        let names: BTreeSet<String> = request.resource_names.iter().cloned().collect();
        let legacy_wildcard = !state.named && names.is_empty() && is_wildcard_type(type_url);
        state.named |= !names.is_empty();
        let wildcard = legacy_wildcard || names.contains("*");
        let names: BTreeSet<String> = names.into_iter().filter(|n| n != "*").collect();
        if wildcard != state.status.wildcard || names != state.names {
            state.compared = None;
        }
        state.status.wildcard = wildcard;
        state.names = names;
        state.status.subscribed = state.names.len();

        if state.sent.is_none()
            && received == Received::Request
            && state.status.wildcard
            && !request.version_info.is_empty()
            && request.version_info == snapshot.version(type_url)
        {
            // A reconnecting client that holds the current set: nothing to send.
            state.sent = Some(state.wanted(type_url, snapshot));
            state.compared = Some(request.version_info.clone());
            state.status.sent_version = Some(request.version_info.clone());
            state.status.ack(&request.version_info);
            return (received, None);
        }
        // What the client unsubscribed from is no longer held: naming it again sends it.
        if !state.status.wildcard
            && let Some(sent) = &mut state.sent
        {
            sent.retain(|name, _| state.names.contains(&**name));
        }
        let response = self.respond_if_changed(type_url, snapshot, true);
        (received, response)
    }

    /// A new snapshot: the responses for every type whose subscribed resources changed.
    pub fn on_snapshot(&mut self, snapshot: &Snapshot) -> Vec<DiscoveryResponse> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        types
            .iter()
            .filter_map(|t| self.respond_if_changed(t, snapshot, false))
            .collect()
    }

    fn respond_if_changed(
        &mut self,
        type_url: &str,
        snapshot: &Snapshot,
        asked: bool,
    ) -> Option<DiscoveryResponse> {
        let state = self.types.get_mut(type_url)?;
        let version = snapshot.version(type_url);
        if state.compared.as_deref() == Some(version) {
            return None;
        }
        // A named subscription none of whose names changed since it was last compared
        // needs nothing (the snapshot knows what changed since its predecessor).
        let untouched = !state.status.wildcard
            && state
                .compared
                .as_deref()
                .and_then(|v| snapshot.changed_since(type_url, v))
                .is_some_and(|changed| !changed.iter().any(|n| state.names.contains(&**n)));
        state.compared = Some(version.to_owned());
        if untouched {
            return None;
        }
        let wanted = state.wanted(type_url, snapshot);
        match &state.sent {
            Some(sent) if *sent == wanted => return None,
            // Nothing subscribed and nothing asked: nothing to say.
            None if !asked && !state.subscribed() => return None,
            _ => {}
        }
        if !state.subscribed() && state.sent.is_some() {
            // Unsubscribed from everything of a named type: nothing to send.
            state.sent = Some(BTreeMap::new());
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let version = version.to_owned();
        let resources = wanted
            .keys()
            .filter_map(|n| snapshot.get(type_url, n))
            .map(|r| r.body.clone())
            .collect();
        state.sent = Some(wanted);
        state.nonce = Some(nonce.clone());
        state.status.sent_version = Some(version.clone());
        state.status.responses += 1;
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: type_url.to_owned(),
            nonce,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use tern_proto::{Any, Status};

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

    fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(type_url: &str, version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: "LB policy is not supported".into(),
                details: Vec::new(),
            }),
            ..request(type_url, &[], version, nonce)
        }
    }

    fn names(r: &DiscoveryResponse) -> Vec<String> {
        r.resources
            .iter()
            .map(|a| String::from_utf8(a.value.clone()).unwrap())
            .collect()
    }

    #[test]
    fn wildcard_clusters_are_sent_whole_and_acked() {
        let snap = snapshot(&[(CDS, "a", "a1"), (CDS, "b", "b1"), (EDS, "a", "ea")]);
        let mut s = SotwStream::new();
        let (what, r) = s.on_request(&request(CDS, &[], "", ""), &snap);
        assert_eq!(what, Received::Request);
        let r = r.unwrap();
        assert_eq!(names(&r), ["a1", "b1"]);
        assert_eq!(r.version_info, snap.version(CDS));
        let (what, again) = s.on_request(&request(CDS, &[], &r.version_info, &r.nonce), &snap);
        assert_eq!((what, again), (Received::Ack, None));
        let status = s.status().next().unwrap().1;
        assert!(status.wildcard && status.in_sync());

        // A change to endpoints only: nothing for a client that watches clusters.
        let eds_only = snapshot(&[(CDS, "a", "a1"), (CDS, "b", "b1"), (EDS, "a", "ea2")]);
        assert!(s.on_snapshot(&eds_only).is_empty());
        // A removed cluster: the whole set again, without it.
        let fewer = snapshot(&[(CDS, "a", "a1")]);
        let pushed = s.on_snapshot(&fewer);
        assert_eq!(pushed.len(), 1);
        assert_eq!(names(&pushed[0]), ["a1"]);
        assert_ne!(pushed[0].nonce, r.nonce);
    }

    #[test]
    fn named_subscriptions_get_what_exists_and_what_appears_later() {
        let snap = snapshot(&[(EDS, "a", "ea")]);
        let mut s = SotwStream::new();
        let (_, r) = s.on_request(&request(EDS, &["a", "b"], "", ""), &snap);
        let r = r.unwrap();
        assert_eq!(names(&r), ["ea"]);
        s.on_request(&request(EDS, &["a", "b"], &r.version_info, &r.nonce), &snap);
        // Another name's resource changes: nothing for this client.
        let other = snapshot(&[(EDS, "a", "ea"), (EDS, "c", "ec")]);
        assert!(s.on_snapshot(&other).is_empty());
        // `b` appears: sent then.
        let with_b = snapshot(&[(EDS, "a", "ea"), (EDS, "b", "eb")]);
        let pushed = s.on_snapshot(&with_b);
        assert_eq!(names(&pushed[0]), ["ea", "eb"]);
        // Unsubscribed from `b`, then subscribed again: sent again.
        let p = &pushed[0];
        let (_, none) = s.on_request(&request(EDS, &["a"], &p.version_info, &p.nonce), &with_b);
        assert!(none.is_none(), "dropping a name needs no answer");
        let (_, again) = s.on_request(
            &request(EDS, &["a", "b"], &p.version_info, &p.nonce),
            &with_b,
        );
        assert_eq!(names(&again.unwrap()), ["ea", "eb"]);
    }

    #[test]
    fn a_nack_is_recorded_and_not_answered_with_the_same_resources() {
        let snap = snapshot(&[(CDS, "a", "bad")]);
        let mut s = SotwStream::new();
        let r = s.on_request(&request(CDS, &[], "", ""), &snap).1.unwrap();
        let (what, again) = s.on_request(&nack(CDS, "", &r.nonce), &snap);
        assert_eq!((what, again), (Received::Nack, None), "no resend loop");
        let status = s.status().next().unwrap().1;
        assert_eq!(
            status.acked_version, None,
            "a NACKed version never counts as applied"
        );
        let nack = status.last_nack.as_ref().unwrap();
        assert_eq!(nack.version, r.version_info);
        assert!(nack.message.contains("LB policy"));
        assert!(!status.in_sync());
        // Fixed: sent, and the ACK makes the client in sync (the NACK stays visible).
        let fixed = snapshot(&[(CDS, "a", "good")]);
        let p = s.on_snapshot(&fixed).remove(0);
        s.on_request(&request(CDS, &[], &p.version_info, &p.nonce), &fixed);
        let status = s.status().next().unwrap().1;
        assert!(status.in_sync() && status.last_nack.is_some());
    }

    #[test]
    fn stale_nonces_are_ignored() {
        let one = snapshot(&[(CDS, "a", "1")]);
        let two = snapshot(&[(CDS, "a", "2")]);
        let mut s = SotwStream::new();
        let first = s.on_request(&request(CDS, &[], "", ""), &one).1.unwrap();
        let second = s.on_snapshot(&two).remove(0);
        // The ACK of the first response arrives after the second was sent.
        let (what, r) = s.on_request(&request(CDS, &[], &first.version_info, &first.nonce), &two);
        assert_eq!((what, r), (Received::Stale, None));
        assert_eq!(s.status().next().unwrap().1.acked_version, None);
        let (what, _) = s.on_request(
            &request(CDS, &[], &second.version_info, &second.nonce),
            &two,
        );
        assert_eq!(what, Received::Ack);
    }

    #[test]
    fn a_reconnecting_client_holding_the_current_set_gets_nothing() {
        let snap = snapshot(&[(CDS, "a", "1")]);
        let mut s = SotwStream::new();
        let (_, r) = s.on_request(&request(CDS, &[], snap.version(CDS), ""), &snap);
        assert!(r.is_none());
        assert!(s.status().next().unwrap().1.in_sync());
        // An older version: the current set.
        let mut t = SotwStream::new();
        assert!(
            t.on_request(&request(CDS, &[], "old", ""), &snap)
                .1
                .is_some()
        );
        // Named (gRPC, EDS): sent again, the client may lack some.
        let mut u = SotwStream::new();
        let eds = snapshot(&[(EDS, "a", "1")]);
        assert!(
            u.on_request(&request(EDS, &["a"], eds.version(EDS), ""), &eds)
                .1
                .is_some()
        );
    }

    #[test]
    fn an_empty_wildcard_type_is_still_answered() {
        // Envoy finishes its initialisation only once LDS and CDS answered, even with nothing.
        let mut s = SotwStream::new();
        let r = s.on_request(
            &request(type_url::LISTENER, &[], "", ""),
            &Snapshot::default(),
        );
        assert!(r.1.unwrap().resources.is_empty());
    }
}
