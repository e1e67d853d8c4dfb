//! The incremental (delta) protocol, server side, as a state machine without a transport: the
//! mirror of `tern_xds_client::Delta`.
//!
//! [`DeltaStream`] keeps, per type, what the client holds (name → version): seeded from
//! `initial_resource_versions` when a client reconnects, then from what was sent. Every
//! answer carries only the difference: resources whose version the client lacks, and
//! `removed_resources` for those it holds that are gone or no longer subscribed, and for
//! subscribed names that do not exist (said once, so the client need not wait for a timer).
//! Subscriptions change with every request, stale nonce or not; ACKs and NACKs count only
//! with the type's latest answer's nonces. A NACKed resource is not sent again until it
//! changes. Wildcard is `*`, or a first request of a listener or cluster type naming nothing.
//! An answer over 16 KiB goes in parts, each a response with its own nonce: it counts
//! as applied when its last part is ACKed, and a NACK of any part counts.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tern_proto::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as WireResource};

use crate::{
    limits::{self, Refused},
    snapshot::{Resource, Snapshot},
    sorted::{NameMap, NameSet},
    sotw::is_wildcard_type,
    status::{Received, TypeStatus},
};

#[derive(Debug, Default)]
struct TypeState {
    status: TypeStatus,
    /// The names subscribed (besides `*`), shared with the snapshot's resources where they
    /// exist (a fleet's clients hold the same thousands of names).
    names: NameSet,
    /// Whether the type's first request on this stream was handled.
    started: bool,
    /// The nonce of the type's last response, and of the earlier parts of the same answer
    /// (an answer too large for one response is sent in parts).
    nonce: Option<String>,
    earlier_parts: Vec<String>,
    /// What the client holds: name → version (shared with the snapshot's, once sent).
    held: NameMap<Arc<str>>,
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

    /// Whether this stream may take `request` (see [`crate::limits`]); a refused request
    /// ends the stream.
    pub fn admit(&self, request: &DeltaDiscoveryRequest) -> Result<(), Refused> {
        let state = self.types.get(&request.type_url);
        limits::check(
            self.types.len(),
            state.is_none(),
            &request.type_url,
            state.map_or(0, |s| s.names.len()) + request.resource_names_subscribe.len(),
        )
    }

    /// Handles one request; returns what it was and the response to send, if any.
    pub fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        snapshot: &Snapshot,
    ) -> (Received, Vec<DeltaResponse>) {
        let type_url = request.type_url.as_str();
        let state = self.types.entry(type_url.to_owned()).or_default();
        // A stale nonce's subscription changes still count (delta).
        let received = state.status.receive(
            state.nonce.as_deref(),
            &state.earlier_parts,
            &request.response_nonce,
            request.error_detail.as_ref().map(|e| e.message.as_str()),
        );

        let first = !state.started;
        if first {
            state.started = true;
            state.held = request
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (Arc::from(n.as_str()), Arc::from(v.as_str())))
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
                let shared = snapshot
                    .get(type_url, name)
                    .map_or_else(|| Arc::from(name.as_str()), |r| r.name.clone());
                state.names.insert(shared, ());
                state.reported_absent.remove(name);
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.status.wildcard = false;
            } else {
                state.names.remove(name.as_str());
                state.reported_absent.remove(name);
                if !state.status.wildcard {
                    // The client drops it: naming it again sends it again.
                    state.held.remove(name.as_str());
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
    pub fn on_snapshot(&mut self, snapshot: &Snapshot) -> Vec<DeltaResponse> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        types
            .iter()
            .flat_map(|t| self.respond(t, snapshot, false))
            .collect()
    }

    fn respond(&mut self, type_url: &str, snapshot: &Snapshot, first: bool) -> Vec<DeltaResponse> {
        let Some(state) = self.types.get_mut(type_url) else {
            return Vec::new();
        };
        let version = snapshot.version(type_url);
        if state.compared.as_deref() == Some(version) {
            return Vec::new();
        }
        // Only the names that changed since the set this subscription was last compared
        // with, when the snapshot knows them; otherwise every name in scope or held.
        let known = state
            .compared
            .as_deref()
            .and_then(|v| snapshot.changed_since(type_url, v));
        let mut updates = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        let mut absent: Vec<String> = Vec::new();
        let mut consider = |name: &str| match state.consider(type_url, name, snapshot) {
            Some(Change::Update(r)) => updates.push(r),
            Some(Change::Remove) => removed.push(name.to_owned()),
            Some(Change::Absent) => absent.push(name.to_owned()),
            None => {}
        };
        match known {
            Some(names) => names.iter().for_each(|n| consider(n)),
            None => {
                let mut names: BTreeSet<&str> = state.names.names().collect();
                names.extend(state.held.names());
                if state.status.wildcard {
                    names.extend(snapshot.of_type(type_url).map(|r| &*r.name));
                }
                names.into_iter().for_each(consider);
            }
        }
        state.compared = Some(version.to_owned());
        for name in &removed {
            state.held.remove(name.as_str());
        }
        state.reported_absent.extend(absent.iter().cloned());
        removed.extend(absent);
        // The first request of a wildcard type is answered even with nothing (Envoy waits
        // for it to finish its initialisation).
        if updates.is_empty() && removed.is_empty() && !(first && state.status.wildcard) {
            return Vec::new();
        }
        for r in &updates {
            state.reported_absent.remove(&*r.name);
            state.held.insert(r.name.clone(), r.version.clone());
        }
        let version = version.to_owned();
        let parts = parts(updates);
        let mut responses = Vec::with_capacity(parts.len());
        for (i, part) in parts.into_iter().enumerate() {
            self.nonces += 1;
            responses.push(DeltaResponse {
                system_version_info: version.clone(),
                resources: part.into_iter().cloned().collect(),
                type_url: type_url.to_owned(),
                removed_resources: if i == 0 {
                    std::mem::take(&mut removed)
                } else {
                    Vec::new()
                },
                nonce: self.nonces.to_string(),
            });
        }
        let mut nonces: Vec<String> = responses.iter().map(|r| r.nonce.clone()).collect();
        state.nonce = nonces.pop();
        state.earlier_parts = nonces;
        state.status.sent_version = Some(version);
        state.status.responses += 1;
        responses
    }
}

/// A response as the engine decided it, its resources still shared with the snapshot: it
/// becomes a message only when it is sent, so an answer in many parts is never in memory
/// all at once.
#[derive(Debug, PartialEq)]
pub struct DeltaResponse {
    pub type_url: String,
    pub system_version_info: String,
    pub nonce: String,
    pub resources: Vec<Arc<Resource>>,
    pub removed_resources: Vec<String>,
}

impl DeltaResponse {
    /// The message, with copies of the resources.
    pub fn into_message(self) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: self.system_version_info,
            resources: self
                .resources
                .iter()
                .map(|r| WireResource {
                    name: r.name.to_string(),
                    version: r.version.to_string(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: self.type_url,
            removed_resources: self.removed_resources,
            nonce: self.nonce,
            ..Default::default()
        }
    }
}

/// At most about this many bytes of resources go in one response: a larger answer is sent
/// in parts. The transport keeps a buffer as large as the largest message for the life of a
/// stream, so a client's first answer of a fleet's endpoints in one response would hold
/// hundreds of kilobytes per client for as long as it stays connected.
const PART_BYTES: usize = 16 * 1024;

/// `updates` in parts of at most [`PART_BYTES`] (at least one resource each; one part, perhaps
/// empty, when there is nothing or little).
fn parts(updates: Vec<&Arc<Resource>>) -> Vec<Vec<&Arc<Resource>>> {
    let mut parts = vec![Vec::new()];
    let mut bytes = 0;
    for r in updates {
        let size = r.body.value.len() + r.name.len() + r.version.len();
        if bytes + size > PART_BYTES && parts.last().is_some_and(|p| !p.is_empty()) {
            parts.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        parts.last_mut().expect("never empty").push(r);
    }
    parts
}

/// What one name needs sent.
enum Change<'a> {
    /// The client lacks this version of it.
    Update(&'a Arc<Resource>),
    /// The client holds it, and it is gone or no longer subscribed.
    Remove,
    /// Subscribed by name, does not exist, and was not said yet.
    Absent,
}

impl TypeState {
    fn consider<'a>(
        &self,
        type_url: &str,
        name: &str,
        snapshot: &'a Snapshot,
    ) -> Option<Change<'a>> {
        let in_scope = self.status.wildcard || self.names.contains(name);
        let held = self.held.get(name);
        match (in_scope, snapshot.get(type_url, name)) {
            (true, Some(r)) if held != Some(&r.version) => Some(Change::Update(r)),
            (true, Some(_)) => None,
            (_, _) if held.is_some() => Some(Change::Remove),
            (true, None) if self.names.contains(name) && !self.reported_absent.contains(name) => {
                Some(Change::Absent)
            }
            _ => None,
        }
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

    fn sent(r: &DeltaResponse) -> Vec<&str> {
        r.resources.iter().map(|r| &*r.name).collect()
    }

    #[test]
    fn wildcard_sends_only_differences() {
        let one = snapshot(&[(CDS, "a", "1"), (CDS, "b", "1")]);
        let mut s = DeltaStream::new();
        let r = s.on_request(&request(CDS, &[], &[], ""), &one).1.remove(0);
        assert_eq!(sent(&r), ["a", "b"]);
        let (what, none) = s.on_request(&request(CDS, &[], &[], &r.nonce), &one);
        assert_eq!((what, none), (Received::Ack, vec![]));
        assert!(s.status().next().unwrap().1.in_sync());

        let two = snapshot(&[(CDS, "a", "2"), (CDS, "c", "1")]);
        let p = s.on_snapshot(&two).remove(0);
        assert_eq!(sent(&p), ["a", "c"]);
        assert_eq!(p.removed_resources, ["b"]);
        assert!(s.on_snapshot(&two).is_empty(), "nothing changed since");
    }

    #[test]
    fn what_changed_since_the_last_snapshot_is_all_that_is_compared_and_gives_the_same_answers() {
        let one = snapshot(&[
            (EDS, "a", "1"),
            (EDS, "b", "1"),
            (EDS, "c", "1"),
            (CDS, "a", "1"),
        ]);
        let steps = [
            snapshot(&[
                (EDS, "a", "2"),
                (EDS, "b", "1"),
                (EDS, "d", "1"),
                (CDS, "a", "1"),
            ]),
            snapshot(&[
                (EDS, "a", "2"),
                (EDS, "b", "1"),
                (EDS, "x", "1"),
                (CDS, "b", "1"),
            ]),
            snapshot(&[(EDS, "b", "3")]),
        ];
        let run = |incremental: bool| {
            let mut s = DeltaStream::new();
            let mut out = Vec::new();
            let r = s
                .on_request(&request(EDS, &["a", "b", "x"], &[], ""), &one)
                .1
                .remove(0);
            out.push((sent(&r).join(","), r.removed_resources.clone()));
            s.on_request(&request(CDS, &["*"], &[], ""), &one);
            let mut previous = one.clone();
            for next in &steps {
                let next = if incremental {
                    next.clone().since(&previous)
                } else {
                    next.clone()
                };
                for r in s.on_snapshot(&next) {
                    out.push((
                        format!("{}:{}", r.type_url, sent(&r).join(",")),
                        r.removed_resources,
                    ));
                }
                previous = next;
            }
            out
        };
        let full = run(false);
        assert_eq!(full, run(true));
        assert_eq!(full[0], ("a,b".to_owned(), vec!["x".to_owned()]));
        assert_eq!(full[1], (format!("{EDS}:a"), vec![]), "d is not subscribed");
        assert_eq!(full.len(), 6, "{full:?}");
    }

    #[test]
    fn a_large_answer_goes_in_parts_and_is_applied_when_its_last_part_is_acked() {
        let body = "x".repeat(PART_BYTES / 4);
        let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let items: Vec<(&str, &str, &str)> = names
            .iter()
            .map(|n| (CDS, n.as_str(), body.as_str()))
            .collect();
        let big = snapshot(&items);
        let mut s = DeltaStream::new();
        let parts = s.on_request(&request(CDS, &["*"], &[], ""), &big).1;
        assert_eq!(parts.len(), 4, "10 resources of a quarter part each");
        let all: Vec<&str> = parts.iter().flat_map(sent).collect();
        assert_eq!(all.len(), 10);
        let status = |s: &DeltaStream| s.status().next().unwrap().1.clone();
        // An earlier part's ACK is not the answer's.
        let (what, none) = s.on_request(&request(CDS, &[], &[], &parts[0].nonce), &big);
        assert_eq!((what, none), (Received::Ack, vec![]));
        assert!(!status(&s).in_sync());
        // An earlier part's NACK counts.
        let nack = DeltaDiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: "part refused".into(),
                details: Vec::new(),
            }),
            ..request(CDS, &[], &[], &parts[1].nonce)
        };
        assert_eq!(s.on_request(&nack, &big).0, Received::Nack);
        assert_eq!(status(&s).last_nack.unwrap().message, "part refused");
        assert_eq!(
            s.on_request(&request(CDS, &[], &[], &parts[3].nonce), &big)
                .0,
            Received::Ack
        );
        assert!(status(&s).in_sync());
    }

    #[test]
    fn a_stream_that_asks_for_too_much_is_refused() {
        let mut s = DeltaStream::new();
        let half = |prefix: &str| -> Vec<String> {
            (0..limits::MAX_NAMES / 2)
                .map(|i| format!("{prefix}{i}"))
                .collect()
        };
        for names in [half("c"), half("d")] {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let r = request(EDS, &names, &[], "");
            assert_eq!(s.admit(&r), Ok(()), "up to the limit");
            s.on_request(&r, &Snapshot::default());
        }
        assert!(matches!(
            s.admit(&request(EDS, &["x"], &[], "")),
            Err(Refused::TooManyNames { .. })
        ));
        for i in 1..limits::MAX_TYPES {
            let r = request(&format!("t{i}"), &[], &[], "");
            assert_eq!(s.admit(&r), Ok(()));
            s.on_request(&r, &Snapshot::default());
        }
        assert_eq!(
            s.admit(&request("one-too-many", &[], &[], "")),
            Err(Refused::TooManyTypes)
        );
        assert_eq!(s.admit(&request(EDS, &[], &[], "")), Ok(()), "a known type");
    }

    #[test]
    fn a_reconnect_with_initial_versions_gets_only_what_changed() {
        let one = snapshot(&[(CDS, "a", "1"), (CDS, "b", "1"), (CDS, "c", "1")]);
        let mut before = DeltaStream::new();
        let r = before
            .on_request(&request(CDS, &["*"], &[], ""), &one)
            .1
            .remove(0);
        let held: std::collections::HashMap<String, String> = r
            .resources
            .iter()
            .map(|x| (x.name.to_string(), x.version.to_string()))
            .collect();
        // While the client was away, `b` changed and `c` went.
        let two = snapshot(&[(CDS, "a", "1"), (CDS, "b", "2")]);
        let mut after = DeltaStream::new();
        let reconnect = DeltaDiscoveryRequest {
            initial_resource_versions: held,
            ..request(CDS, &["*"], &[], "")
        };
        let r = after.on_request(&reconnect, &two).1.remove(0);
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
            .remove(0);
        assert_eq!(sent(&r), ["a"]);
        assert_eq!(r.removed_resources, ["x"], "x does not exist");
        assert!(
            s.on_request(&request(EDS, &[], &[], &r.nonce), &one)
                .1
                .is_empty()
        );
        // x appears.
        let two = snapshot(&[(EDS, "a", "1"), (EDS, "x", "1")]);
        assert_eq!(sent(&s.on_snapshot(&two)[0]), ["x"]);
        // Unsubscribing needs no answer; subscribing again sends it again.
        assert!(
            s.on_request(&request(EDS, &[], &["x"], ""), &two)
                .1
                .is_empty()
        );
        let again = s
            .on_request(&request(EDS, &["x"], &[], ""), &two)
            .1
            .remove(0);
        assert_eq!(sent(&again), ["x"]);
        // Another name's change is nothing to this client.
        let three = snapshot(&[(EDS, "a", "1"), (EDS, "x", "1"), (EDS, "y", "9")]);
        assert!(s.on_snapshot(&three).is_empty());
    }

    #[test]
    fn a_nack_is_recorded_and_the_refused_resource_is_not_resent() {
        let bad = snapshot(&[(CDS, "a", "bad")]);
        let mut s = DeltaStream::new();
        let r = s.on_request(&request(CDS, &[], &[], ""), &bad).1.remove(0);
        let nack = DeltaDiscoveryRequest {
            error_detail: Some(Status {
                code: 3,
                message: "refused".into(),
                details: Vec::new(),
            }),
            ..request(CDS, &[], &[], &r.nonce)
        };
        assert_eq!(s.on_request(&nack, &bad), (Received::Nack, vec![]));
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
        assert_eq!(sent(&r[0]), ["b"]);
    }

    #[test]
    fn the_first_wildcard_request_is_answered_even_with_nothing() {
        let mut s = DeltaStream::new();
        let r = s.on_request(&request(CDS, &[], &[], ""), &Snapshot::default());
        assert!(r.1[0].resources.is_empty());
        let mut named = DeltaStream::new();
        assert!(
            named
                .on_request(&request(EDS, &[], &[], ""), &Snapshot::default())
                .1
                .is_empty()
        );
    }
}
