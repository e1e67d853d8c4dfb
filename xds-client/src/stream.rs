//! The ADS stream over gRPC: open, resubscribe, ACK/NACK, reconnect.
//!
//! On a broken or refused stream the client keeps what it holds (the handler's last good
//! configuration keeps serving), waits a jittered, exponentially growing delay, reconnects
//! and resubscribes with the versions it holds, as Envoy does. A stream that lived (it
//! carried a response) resets the delay, and one the server ended cleanly (istiod does at
//! its maximum connection age) is reopened at once.
//!
//! Responses are accepted up to [`MAX_MESSAGE`] (tonic's default is 4 MiB; a big mesh's CDS
//! or EDS is larger); the channel itself is [`crate::channel`]'s, the call
//! [`crate::grpc`]'s.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rand::Rng;
use serde::Serialize;
use tern_proto::DeltaDiscoveryRequest;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::{
    channel::{ChannelConfig, ChannelError},
    delta::Delta,
    grpc::{self, Responses},
    handler::Handler,
    resource::TypeState,
    sotw::{Sotw, SotwRequest},
};

/// The largest response accepted (ztunnel's limit too).
pub const MAX_MESSAGE: usize = 200 * 1024 * 1024;

/// The two ADS calls.
const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Why a stream ended or could not open.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("open the ADS stream: {0}")]
    Open(tonic::Status),
    #[error("ADS stream: {0}")]
    Stream(tonic::Status),
    #[error("the request channel closed")]
    Closed,
}

/// Where and how to reach the control plane, and how soon to try again.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub channel: ChannelConfig,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// One type as the client holds it, for status pages (`/config_dump`, `tern xds status`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeSummary {
    pub version: String,
    pub nonce: String,
    /// Shared with the client's state until the names change.
    pub resources: Arc<[String]>,
    /// Resources refused, with the reason (a held one keeps its previous version).
    pub rejected: BTreeMap<String, String>,
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
    /// ADS streams opened, and reopened after the first (failed attempts count in neither).
    pub streams: u64,
    pub reconnects: u64,
    pub types: BTreeMap<String, TypeSummary>,
}

/// Which protocol a stream speaks, with its state.
#[derive(Debug)]
pub enum Engine {
    Sotw(Sotw),
    Delta(Delta),
}

fn summary(state: &BTreeMap<&'static str, TypeState>) -> BTreeMap<String, TypeSummary> {
    state
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
                    resources: s.names(),
                    rejected: s.rejected.clone(),
                    last_update_unix: unix,
                    last_error: s.last_error.clone(),
                    acks: s.acks,
                    nacks: s.nacks,
                },
            )
        })
        .collect()
}

/// Runs the ADS stream forever (state of the world or delta, as `engine` says); `status`
/// is updated after every change.
pub async fn run<H: Handler + Send>(
    config: StreamConfig,
    mut engine: Engine,
    mut handler: H,
    status: watch::Sender<ClientStatus>,
) {
    let mut backoff = config.initial_backoff;
    loop {
        let mut lived = false;
        let ended = stream_once(&config, &mut engine, &mut handler, &status, &mut lived).await;
        status.send_modify(|s| s.connected = false);
        if lived {
            backoff = config.initial_backoff;
        }
        match ended {
            Ok(()) => {
                // A clean end (istiod's maximum connection age): reconnect at once.
                info!(address = %config.channel.address, "ADS stream closed by the control plane; reconnecting");
            }
            Err(e) => {
                warn!(address = %config.channel.address, error = %e, "ADS stream failed; keeping the last configuration");
                // Full jitter over an exponentially growing window.
                let delay = rand::rng().random_range(backoff / 2..=backoff);
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(config.max_backoff);
            }
        }
    }
}

async fn stream_once<H: Handler>(
    config: &StreamConfig,
    engine: &mut Engine,
    handler: &mut H,
    status: &watch::Sender<ClientStatus>,
    lived: &mut bool,
) -> Result<(), StreamError> {
    let crate::channel::Connected { channel, bearer } =
        crate::channel::open(&config.channel).await?;
    let opened = |kind: &str| {
        status.send_modify(|s| {
            s.address = config.channel.address.clone();
            s.connected = true;
            s.streams += 1;
            s.reconnects = s.streams - 1;
        });
        let reconnects = status.borrow().reconnects;
        info!(address = %config.channel.address, reconnects, protocol = kind, "ADS stream open");
    };
    match engine {
        Engine::Sotw(e) => {
            let first = e.open_stream(handler);
            let open = |rx| grpc::open(channel, SOTW, bearer, rx, MAX_MESSAGE);
            converse(
                first,
                open,
                handler,
                status,
                lived,
                || opened("sotw"),
                |r, h| {
                    let out = e.on_response(r, h);
                    (out, summary(e.state()))
                },
            )
            .await
        }
        Engine::Delta(e) => {
            let first = e.open_stream(handler);
            let open = |rx| grpc::open(channel, DELTA, bearer, rx, MAX_MESSAGE);
            converse(
                first,
                open,
                handler,
                status,
                lived,
                || opened("delta"),
                |r, h| {
                    let out = e.on_response(r, h);
                    (out, summary(e.state()))
                },
            )
            .await
        }
    }
}

/// What the stream needs to know of a request: whether it NACKs, and why.
trait XdsRequest {
    fn nack(&self) -> Option<(&str, &str)>;
}

impl XdsRequest for SotwRequest {
    fn nack(&self) -> Option<(&str, &str)> {
        let m = &self.message;
        m.error_detail
            .as_ref()
            .map(|d| (m.type_url.as_str(), d.message.as_str()))
    }
}

impl XdsRequest for DeltaDiscoveryRequest {
    fn nack(&self) -> Option<(&str, &str)> {
        self.error_detail
            .as_ref()
            .map(|d| (self.type_url.as_str(), d.message.as_str()))
    }
}

/// Opens a stream with the engine's first requests, then feeds it until it ends.
async fn converse<H, Req, Resp, Fut>(
    first: Vec<Req>,
    open: impl FnOnce(ReceiverStream<Req>) -> Fut,
    handler: &mut H,
    status: &watch::Sender<ClientStatus>,
    lived: &mut bool,
    opened: impl FnOnce(),
    on_response: impl FnMut(Resp, &mut H) -> (Vec<Req>, BTreeMap<String, TypeSummary>),
) -> Result<(), StreamError>
where
    H: Handler,
    Req: XdsRequest,
    Resp: prost::Message + Default,
    Fut: std::future::Future<Output = Result<Responses<Resp>, tonic::Status>>,
{
    let (tx, rx) = mpsc::channel(64);
    for request in first {
        tx.send(request).await.map_err(|_| StreamError::Closed)?;
    }
    let mut responses = open(ReceiverStream::new(rx))
        .await
        .map_err(StreamError::Open)?;
    opened();
    pump(&mut responses, &tx, handler, status, lived, on_response).await
}

/// Feeds responses to the engine and its requests back, ticking the handler every second.
async fn pump<H: Handler, Req: XdsRequest, Resp: prost::Message + Default>(
    responses: &mut Responses<Resp>,
    tx: &mpsc::Sender<Req>,
    handler: &mut H,
    status: &watch::Sender<ClientStatus>,
    lived: &mut bool,
    mut on_response: impl FnMut(Resp, &mut H) -> (Vec<Req>, BTreeMap<String, TypeSummary>),
) -> Result<(), StreamError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            message = responses.message() => {
                let Some(response) = message.map_err(StreamError::Stream)? else {
                    return Ok(());
                };
                *lived = true;
                let (requests, types) = on_response(response, handler);
                for (type_url, reason) in requests.iter().filter_map(XdsRequest::nack) {
                    warn!(type_url, reason, "NACK");
                }
                for request in requests {
                    tx.send(request).await.map_err(|_| StreamError::Closed)?;
                }
                status.send_modify(|s| s.types = types);
            }
            _ = tick.tick() => handler.tick(),
        }
    }
}
