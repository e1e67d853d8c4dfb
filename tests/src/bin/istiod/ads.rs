//! Both ADS protocols over the snapshot in force: state of the world (with istiod's EDS
//! churn when the snapshot asks for it) and delta; every request, ACK and NACK is said.
use std::{
    collections::{BTreeSet, HashMap},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tern_proto::{
    Any, DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource, aggregated_discovery_service_server::AggregatedDiscoveryService, encode, type_url,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    resources::{load_assignment, resources},
    say, short,
    snapshot::{Snapshot, bulk_service},
};

/// The ADS service, serving the snapshot in force.
pub(crate) struct Ads {
    pub(crate) snapshot: watch::Receiver<Arc<Snapshot>>,
}

/// One churned endpoint change: the generated service `n` (or the next of those `wanted`)
/// with its first endpoint on another port, alone in a response. Only that service is built:
/// istiod's cost per push is not what the churn measures.
fn churn_response(
    s: &Snapshot,
    wanted: &[String],
    n: u64,
    nonce: u64,
) -> Option<DiscoveryResponse> {
    let first = usize::try_from(n).ok()? % s.bulk.max(1);
    let svc = (0..s.bulk)
        .map(|k| bulk_service((first + k) % s.bulk))
        .find(|svc| wanted.is_empty() || wanted.contains(&svc.cluster()))?;
    let mut endpoints = svc.endpoints.clone();
    if let Some((ip, _)) = endpoints.first().and_then(|e| e.rsplit_once(':')) {
        endpoints[0] = format!("{ip}:{}", 10_000 + n % 50_000);
    }
    let cla = load_assignment(&svc.cluster(), &endpoints);
    Some(DiscoveryResponse {
        version_info: format!("churn-{n}"),
        resources: vec![encode(&cla, type_url::CLUSTER_LOAD_ASSIGNMENT)],
        type_url: type_url::CLUSTER_LOAD_ASSIGNMENT.to_owned(),
        nonce: nonce.to_string(),
        ..Default::default()
    })
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let mut snapshot = self.snapshot.clone();
        let (tx, rx) = mpsc::channel(64);
        say("STREAM");
        tokio::spawn(async move {
            let mut subscriptions: HashMap<String, Vec<String>> = HashMap::new();
            let mut nonce = 0u64;
            let send = |type_url: &str, names: &[String], s: &Snapshot, nonce: &mut u64| {
                *nonce += 1;
                let response = DiscoveryResponse {
                    version_info: s.version.clone(),
                    resources: resources(s, type_url, names)
                        .into_iter()
                        .map(|(_, r)| r)
                        .collect(),
                    type_url: type_url.to_owned(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                say(format!(
                    "SENT {} {} bytes",
                    short(type_url),
                    prost::Message::encoded_len(&response)
                ));
                response
            };

            let mut churned = 0u64;
            let churn = tokio::time::sleep(Duration::from_millis(100));
            tokio::pin!(churn);
            loop {
                tokio::select! {
                    _ = &mut churn => {
                        let s = snapshot.borrow().clone();
                        let wanted = subscriptions.get(type_url::CLUSTER_LOAD_ASSIGNMENT);
                        let every = match s.churn_per_sec {
                            0 => Duration::from_millis(100),
                            n => Duration::from_micros(1_000_000 / n),
                        };
                        churn.as_mut().reset(tokio::time::Instant::now() + every);
                        if let (true, Some(wanted)) = (s.churn_per_sec > 0, wanted) {
                            churned += 1;
                            nonce += 1;
                            if let Some(response) = churn_response(&s, wanted, churned, nonce)
                                && tx.send(Ok(response)).await.is_err()
                            {
                                break;
                            }
                        }
                    }
                    request = requests.message() => {
                        let Ok(Some(r)) = request else { break };
                        let t = r.type_url.clone();
                        if r.response_nonce.is_empty() {
                            say(format!("SUBSCRIBE {} version={} names={}", short(&t), r.version_info, r.resource_names.join(",")));
                        } else if let Some(e) = &r.error_detail {
                            say(format!("NACK {} {} {}", short(&t), r.version_info, e.message));
                        } else {
                            say(format!("ACK {} {}", short(&t), r.version_info));
                        }
                        // An ACK names every resource subscribed to (1,000 under churn): they
                        // are kept only when they changed.
                        let changed = subscriptions.get(&t) != Some(&r.resource_names);
                        let first = r.response_nonce.is_empty();
                        if changed {
                            subscriptions.insert(t.clone(), r.resource_names);
                        }
                        if let (true, Some(names)) = (first || changed, subscriptions.get(&t)) {
                            let s = snapshot.borrow().clone();
                            if tx.send(Ok(send(&t, names, &s, &mut nonce))).await.is_err() { break }
                        }
                    }
                    changed = snapshot.changed() => {
                        if changed.is_err() { break }
                        let s = snapshot.borrow().clone();
                        for (t, names) in &subscriptions {
                            if tx.send(Ok(send(t, names, &s, &mut nonce))).await.is_err() { return }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let mut snapshot = self.snapshot.clone();
        let (tx, rx) = mpsc::channel(64);
        say("STREAM delta");
        tokio::spawn(async move {
            // Per type: the names subscribed (empty: wildcard), and the names last sent.
            let mut subscriptions: HashMap<String, BTreeSet<String>> = HashMap::new();
            let mut sent: HashMap<String, BTreeSet<String>> = HashMap::new();
            let mut versions_by_nonce: HashMap<String, String> = HashMap::new();
            let mut nonce = 0u64;
            let respond =
                |t: &str,
                 s: &Snapshot,
                 subscribed: &BTreeSet<String>,
                 sent: &mut BTreeSet<String>,
                 nonce: &mut u64,
                 versions_by_nonce: &mut HashMap<String, String>| {
                    *nonce += 1;
                    let names: Vec<String> = subscribed.iter().cloned().collect();
                    let now: Vec<(String, Any)> = resources(s, t, &names);
                    let present: BTreeSet<String> = now.iter().map(|(n, _)| n.clone()).collect();
                    let removed = sent.difference(&present).cloned().collect();
                    *sent = present;
                    versions_by_nonce.insert(nonce.to_string(), s.version.clone());
                    DeltaDiscoveryResponse {
                        system_version_info: s.version.clone(),
                        type_url: t.to_owned(),
                        resources: now
                            .into_iter()
                            .map(|(name, any)| Resource {
                                name,
                                version: s.version.clone(),
                                resource: Some(any),
                                ..Default::default()
                            })
                            .collect(),
                        removed_resources: removed,
                        nonce: nonce.to_string(),
                        ..Default::default()
                    }
                };
            loop {
                tokio::select! {
                    request = requests.message() => {
                        let Ok(Some(r)) = request else { break };
                        let t = r.type_url.clone();
                        if r.response_nonce.is_empty() {
                            let held: Vec<String> = r.initial_resource_versions.iter().map(|(n, v)| format!("{n}@{v}")).collect();
                            say(format!("SUBSCRIBE {} held={} names={}", short(&t), held.join(","), r.resource_names_subscribe.join(",")));
                        } else {
                            let version = versions_by_nonce.get(&r.response_nonce).cloned().unwrap_or_default();
                            match &r.error_detail {
                                Some(e) => say(format!("NACK {} {version} {}", short(&t), e.message)),
                                None => say(format!("ACK {} {version}", short(&t))),
                            }
                        }
                        let subs = subscriptions.entry(t.clone()).or_default();
                        let before = subs.clone();
                        subs.extend(r.resource_names_subscribe.iter().cloned());
                        for n in &r.resource_names_unsubscribe {
                            subs.remove(n);
                        }
                        if r.response_nonce.is_empty() || *subs != before {
                            let s = snapshot.borrow().clone();
                            let subs = subs.clone();
                            let response = respond(&t, &s, &subs, sent.entry(t.clone()).or_default(), &mut nonce, &mut versions_by_nonce);
                            if tx.send(Ok(response)).await.is_err() { break }
                        }
                    }
                    changed = snapshot.changed() => {
                        if changed.is_err() { break }
                        let s = snapshot.borrow().clone();
                        for (t, subs) in &subscriptions {
                            let response = respond(t, &s, subs, sent.entry(t.clone()).or_default(), &mut nonce, &mut versions_by_nonce);
                            if tx.send(Ok(response)).await.is_err() { return }
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
