//! etcd v3 as a registry, in CloudWeGo Kitex's `registry-etcd` layout
//! (kitex-contrib/registry-etcd `common.go`): a key `<prefix>/<service>/<host:port>` per
//! instance, held by the instance's lease, whose value is JSON
//! `{"network": "tcp", "address": "host:port", "weight": N, "tags": {…}}`. A weight of 0 or
//! less is Kitex's default, 10. An instance that dies leaves when its lease expires.
//!
//! The source reads the prefix once, then watches it from the next revision (Kitex's own
//! clients re-read every 5 s instead). When etcd cannot be reached, or the watch ends, the
//! source is marked failing (its last endpoints stay served) and reads everything again
//! once etcd answers.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::Deserialize;
use tern_proto::etcd::{
    DELETE, RangeRequest, WatchCreateRequest, WatchRequest, k_v_client::KVClient, prefix_end,
    watch_client::WatchClient,
};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tracing::info;

use super::{Backoff, SourceEvent};
use crate::{
    catalog::SourceKind,
    config::{Parsed, Skipped},
    model::{Endpoint as Instance, Health, Locality, Service},
};

/// Kitex's default prefix.
pub const DEFAULT_PREFIX: &str = "kitex/registry-etcd";
/// At most this many keys are held from one prefix; more are skipped, counted.
const MAX_KEYS: usize = 100_000;

/// Where the registry is.
#[derive(Clone, Debug)]
pub struct EtcdSource {
    /// `http://host:port` of etcd members, tried in turn.
    pub endpoints: Vec<String>,
    pub prefix: String,
}

impl EtcdSource {
    pub fn name(&self) -> String {
        format!("etcd:{}", self.prefix)
    }

    fn key_prefix(&self) -> Vec<u8> {
        format!("{}/", self.prefix.trim_end_matches('/')).into_bytes()
    }
}

#[derive(Deserialize)]
struct InstanceJson {
    #[serde(default)]
    network: String,
    address: String,
    #[serde(default)]
    weight: i64,
}

/// The services the keys under `prefix` (ending in `/`) describe.
pub fn services(prefix: &[u8], keys: &BTreeMap<Vec<u8>, Vec<u8>>) -> Parsed {
    let mut by_service: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (key, value) in keys {
        let key = String::from_utf8_lossy(key);
        let rest = key.get(prefix.len()..).unwrap_or_default();
        let mut skip = |reason: String| {
            skipped.push(Skipped {
                entry: key.to_string(),
                reason,
            })
        };
        let Some((service, _)) = rest
            .split_once('/')
            .filter(|(s, a)| !s.is_empty() && !a.is_empty())
        else {
            skip("not <prefix>/<service>/<address>".into());
            continue;
        };
        let instance: InstanceJson = match serde_json::from_slice(value) {
            Ok(i) => i,
            Err(e) => {
                skip(format!("not a Kitex instance: {e}"));
                continue;
            }
        };
        if !instance.network.is_empty() && instance.network != "tcp" {
            skip(format!(
                "network {:?}: only tcp is served",
                instance.network
            ));
            continue;
        }
        let Ok(address) = instance.address.parse::<SocketAddr>() else {
            skip(format!(
                "{:?} is not an IP address and port",
                instance.address
            ));
            continue;
        };
        let endpoints = by_service.entry(service.to_owned()).or_default();
        if endpoints.iter().any(|e| e.address == address) {
            skip("the same address twice in a service".into());
            continue;
        }
        endpoints.push(Instance {
            address,
            weight: if instance.weight <= 0 {
                10
            } else {
                u32::try_from(instance.weight).unwrap_or(u32::MAX)
            },
            locality: Locality::default(),
            health: Health::Unknown,
        });
    }
    let services = by_service
        .into_iter()
        .map(|(name, endpoints)| Service::registered(name, endpoints))
        .collect();
    Parsed { services, skipped }
}

async fn connect(source: &EtcdSource) -> Result<Channel, String> {
    let mut last = format!("no etcd endpoint given for {}", source.prefix);
    for url in &source.endpoints {
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| format!("{url}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(last)
}

impl super::Registry for EtcdSource {
    fn name(&self) -> String {
        EtcdSource::name(self)
    }

    async fn session(&self, events: &mpsc::Sender<SourceEvent>, backoff: &mut Backoff) -> String {
        session(self, events, backoff).await
    }
}

/// One connection: a full read, then the watch; returns why it ended.
async fn session(
    source: &EtcdSource,
    events: &mpsc::Sender<SourceEvent>,
    backoff: &mut Backoff,
) -> String {
    let channel = match connect(source).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let prefix = source.key_prefix();
    let end = prefix_end(&prefix);
    let range = KVClient::new(channel.clone())
        .range(RangeRequest {
            key: prefix.clone(),
            range_end: end.clone(),
            limit: MAX_KEYS as i64,
            revision: 0,
        })
        .await;
    let range = match range {
        Ok(r) => r.into_inner(),
        Err(e) => return format!("read {}: {}", source.prefix, e.message()),
    };
    let revision = range.header.map_or(0, |h| h.revision);
    let mut keys: BTreeMap<Vec<u8>, Vec<u8>> =
        range.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    let send = |keys: &BTreeMap<Vec<u8>, Vec<u8>>, truncated: bool| {
        let mut parsed = services(&prefix, keys);
        if truncated {
            parsed.skipped.push(Skipped {
                entry: source.prefix.clone(),
                reason: format!("more than {MAX_KEYS} keys: the rest are not read"),
            });
        }
        SourceEvent {
            source: source.name(),
            kind: SourceKind::Registry,
            result: Ok(parsed),
        }
    };
    if events.send(send(&keys, range.more)).await.is_err() {
        return "stopped".into();
    }
    backoff.reset();
    info!(prefix = %source.prefix, keys = keys.len(), revision, "etcd registry read; watching it");

    let (requests, rx) = mpsc::channel(1);
    let create = WatchRequest {
        create_request: Some(WatchCreateRequest {
            key: prefix.clone(),
            range_end: end,
            start_revision: revision + 1,
            progress_notify: true,
        }),
    };
    if requests.send(create).await.is_err() {
        return "stopped".into();
    }
    let mut stream = match WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return format!("watch {}: {}", source.prefix, e.message()),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return "etcd ended the watch".into(),
            Err(e) => return format!("watch {}: {}", source.prefix, e.message()),
        };
        if response.canceled || response.compact_revision > 0 {
            return format!(
                "etcd canceled the watch ({}); reading everything again",
                if response.cancel_reason.is_empty() {
                    "compacted"
                } else {
                    &response.cancel_reason
                }
            );
        }
        if response.events.is_empty() {
            continue;
        }
        for event in response.events {
            let Some(kv) = event.kv else { continue };
            if event.r#type == DELETE {
                keys.remove(&kv.key);
            } else if keys.len() < MAX_KEYS || keys.contains_key(&kv.key) {
                keys.insert(kv.key, kv.value);
            }
        }
        if events
            .send(send(&keys, keys.len() >= MAX_KEYS))
            .await
            .is_err()
        {
            return "stopped".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn kitex_instances_become_endpoints_and_bad_ones_are_skipped() {
        let prefix = b"kitex/registry-etcd/";
        let kv = |k: &str, v: &str| {
            (
                format!("kitex/registry-etcd/{k}").into_bytes(),
                v.as_bytes().to_vec(),
            )
        };
        let keys: BTreeMap<_, _> = [
            kv(
                "echo/10.0.0.1:8888",
                r#"{"network":"tcp","address":"10.0.0.1:8888","weight":10,"tags":{"cluster":"a"}}"#,
            ),
            kv(
                "echo/10.0.0.2:8888",
                r#"{"network":"tcp","address":"10.0.0.2:8888","weight":0}"#,
            ),
            kv(
                "echo/host:8888",
                r#"{"network":"tcp","address":"host:8888","weight":1}"#,
            ),
            kv("echo/10.0.0.3:8888", "not json"),
            kv(
                "echo/sock",
                r#"{"network":"unix","address":"/tmp/s","weight":1}"#,
            ),
            kv(
                "lonely",
                r#"{"network":"tcp","address":"10.0.0.9:1","weight":1}"#,
            ),
        ]
        .into();
        let parsed = services(prefix, &keys);
        assert_eq!(parsed.services.len(), 1);
        let echo = &parsed.services[0];
        assert_eq!(
            (echo.name.as_str(), echo.port, echo.protocol),
            ("echo", 8888, Protocol::Thrift)
        );
        let weights: Vec<u32> = echo.endpoints.iter().map(|e| e.weight).collect();
        assert_eq!(weights, [10, 10], "a weight of 0 is Kitex's default, 10");
        let reasons: Vec<&str> = parsed.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("not a Kitex instance")));
        assert!(reasons.iter().any(|r| r.contains("not an IP address")));
        assert!(reasons.iter().any(|r| r.contains("only tcp")));
        assert!(reasons.iter().any(|r| r.contains("<service>/<address>")));
    }
}
