//! The ADS stream over gRPC (`tonic`): open, resubscribe, ACK/NACK, reconnect.
//!
//! On a broken or refused stream the client keeps what it holds (the handler's last good
//! configuration keeps serving), waits a jittered, exponentially growing delay, reconnects
//! and resubscribes with the versions it holds, as Envoy does.
use std::{collections::BTreeMap, time::Duration};

use rand::Rng;
use serde::Serialize;
use tern_proto::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::sotw::{Handler, Sotw};

/// Where and how to reach the control plane.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// `http://host:port` (plaintext gRPC, istiod's 15010).
    pub address: String,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// One type as the client holds it, for status pages (`/config_dump`, `tern xds status`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeSummary {
    pub version: String,
    pub nonce: String,
    pub resources: Vec<String>,
    pub last_update_unix: Option<u64>,
    pub last_error: Option<String>,
    pub acks: u64,
    pub nacks: u64,
}

/// The client's view: connection state and every type it holds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClientStatus {
    pub address: String,
    pub connected: bool,
    pub reconnects: u64,
    pub types: BTreeMap<String, TypeSummary>,
}

fn summary(engine: &Sotw) -> BTreeMap<String, TypeSummary> {
    engine
        .state()
        .iter()
        .map(|(t, s)| {
            let unix = s
                .last_update
                .and_then(|u| u.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            (
                (*t).to_owned(),
                TypeSummary {
                    version: s.version.clone(),
                    nonce: s.nonce.clone(),
                    resources: s.resources.keys().cloned().collect(),
                    last_update_unix: unix,
                    last_error: s.last_error.clone(),
                    acks: s.acks,
                    nacks: s.nacks,
                },
            )
        })
        .collect()
}

/// Runs the state-of-the-world ADS stream forever; `status` is updated after every change.
pub async fn run_sotw<H: Handler + Send>(
    config: StreamConfig,
    mut engine: Sotw,
    mut handler: H,
    status: watch::Sender<ClientStatus>,
) {
    let mut backoff = config.initial_backoff;
    let mut reconnects = 0u64;
    loop {
        match stream_once(&config, &mut engine, &mut handler, &status, reconnects).await {
            Ok(()) => info!(address = %config.address, "ADS stream closed by the control plane"),
            Err(e) => {
                warn!(address = %config.address, error = %e, "ADS stream failed; keeping the last configuration")
            }
        }
        status.send_modify(|s| s.connected = false);
        // Full jitter over an exponentially growing window.
        let delay = rand::rng().random_range(backoff / 2..=backoff);
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(config.max_backoff);
        reconnects += 1;
        status.send_modify(|s| s.reconnects = reconnects);
        if backoff == config.max_backoff {
            debug!("ADS backoff at its maximum");
        }
    }
}

async fn stream_once<H: Handler>(
    config: &StreamConfig,
    engine: &mut Sotw,
    handler: &mut H,
    status: &watch::Sender<ClientStatus>,
    reconnects: u64,
) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(config.address.clone())
        .map_err(|e| format!("invalid xDS address {}: {e}", config.address))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect to {}: {e}", config.address))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    for request in engine.open_stream(handler) {
        tx.send(request)
            .await
            .map_err(|_| "request channel closed")?;
    }
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("open the ADS stream: {e}"))?
        .into_inner();
    info!(address = %config.address, reconnects, "ADS stream open");
    status.send_modify(|s| {
        s.address = config.address.clone();
        s.connected = true;
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            message = responses.message() => {
                let Some(response) = message.map_err(|e| format!("ADS stream: {e}"))? else {
                    return Ok(());
                };
                debug!(type_url = %response.type_url, version = %response.version_info, resources = response.resources.len(), "xDS response");
                for request in engine.on_response(response, handler) {
                    if let Some(error) = &request.error_detail {
                        warn!(type_url = %request.type_url, reason = %error.message, "NACK");
                    }
                    tx.send(request).await.map_err(|_| "request channel closed")?;
                }
                status.send_modify(|s| s.types = summary(engine));
            }
            _ = tick.tick() => handler.tick(),
        }
    }
}
