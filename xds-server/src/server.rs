//! The gRPC services over `tonic`: ADS and the per-type services (CDS, EDS, LDS, RDS) in both
//! protocols, one task per stream driving a [`SotwStream`] or [`DeltaStream`], and
//! [`Clients`], the registry of connected clients.
//!
//! A stream's task waits for the client's next request or a new snapshot of the client's view,
//! whichever comes first. Snapshots arrive through a `watch` channel, so a client that cannot
//! keep up never builds a backlog: when its bounded queue is full its task waits, later
//! snapshots replace each other, and it is sent the newest state once it reads again. Other
//! clients are never held up by it.
use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use serde::Serialize;
use tern_proto::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Node,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    discovery_services::{
        cluster_discovery_service_server, endpoint_discovery_service_server,
        listener_discovery_service_server, route_discovery_service_server,
    },
    type_url,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::{
    delta::{DeltaResponse, DeltaStream},
    limits::Refused,
    snapshot::Snapshot,
    sotw::SotwStream,
    status::{Received, TypeStatus},
};

/// Where the server gets what to serve a client.
pub trait Views: Send + Sync + 'static {
    /// The snapshots for a client identified by `node` (its kind decides what it is served).
    fn view(&self, node: &Node) -> watch::Receiver<Arc<Snapshot>>;
}

/// A connected client, as the admin port and CSDS show it.
#[derive(Clone, Debug, Serialize)]
pub struct ClientInfo {
    /// The stream's number in this process.
    pub stream: u64,
    pub node_id: String,
    pub cluster: String,
    pub user_agent: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    pub peer: Option<String>,
    /// Unix seconds.
    pub connected_at: u64,
    /// What it has of each type, by type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

/// The connected clients, and counts over every stream since the start.
#[derive(Debug, Default)]
pub struct Clients {
    streams: Mutex<BTreeMap<u64, ClientInfo>>,
    /// Streams open, from their opening (before their first request) to their end.
    open: AtomicUsize,
    next: AtomicU64,
    responses: AtomicU64,
    nacks: AtomicU64,
}

/// Counts over every stream since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub streams: u64,
    pub responses: u64,
    pub nacks: u64,
}

impl Clients {
    pub fn totals(&self) -> Totals {
        Totals {
            streams: self.next.load(Ordering::Relaxed),
            responses: self.responses.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
        }
    }

    /// Every connected client, in the order they connected.
    pub fn list(&self) -> Vec<ClientInfo> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ClientInfo>> {
        // A panic elsewhere never leaves the registry half-written: every update is one
        // insert or remove.
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, mut info: ClientInfo) -> u64 {
        let stream = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        info.stream = stream;
        self.lock().insert(stream, info);
        stream
    }

    fn update<'a>(&self, stream: u64, types: impl Iterator<Item = (&'a str, &'a TypeStatus)>) {
        if let Some(c) = self.lock().get_mut(&stream) {
            c.types = types.map(|(t, s)| (t.to_owned(), s.clone())).collect();
        }
    }

    fn remove(&self, stream: u64) {
        self.lock().remove(&stream);
    }

    /// Takes one of `max` stream slots, if one is free.
    fn open_slot(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self.clone()))
    }
}

/// A stream's slot among `--max-clients`, given back when the stream's task ends.
struct Slot(Arc<Clients>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a new stream may take to send its first request before it is closed (it holds a
/// slot meanwhile).
const FIRST_REQUEST_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How many responses may wait for one client before its task waits (and coalesces).
const CLIENT_QUEUE: usize = 4;

/// The xDS services, serving what `views` gives each client.
pub struct Server<V> {
    views: Arc<V>,
    clients: Arc<Clients>,
    max_clients: usize,
}

impl<V> Clone for Server<V> {
    fn clone(&self) -> Self {
        Self {
            views: self.views.clone(),
            clients: self.clients.clone(),
            max_clients: self.max_clients,
        }
    }
}

impl<V: Views> Server<V> {
    /// A server of `views`, registering its clients in `clients`, with at most `max_clients`
    /// streams at once (more are refused with `RESOURCE_EXHAUSTED`).
    pub fn new(views: Arc<V>, clients: Arc<Clients>, max_clients: usize) -> Self {
        Self {
            views,
            clients,
            max_clients,
        }
    }

    /// The ADS service (both protocols), for a `tonic` router.
    pub fn ads(&self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self.clone())
    }

    /// CDS, EDS, LDS and RDS on their own (each stream carries one type), for clients whose
    /// bootstrap names them instead of ADS.
    pub fn per_type(
        &self,
    ) -> (
        cluster_discovery_service_server::ClusterDiscoveryServiceServer<Self>,
        endpoint_discovery_service_server::EndpointDiscoveryServiceServer<Self>,
        listener_discovery_service_server::ListenerDiscoveryServiceServer<Self>,
        route_discovery_service_server::RouteDiscoveryServiceServer<Self>,
    ) {
        (
            cluster_discovery_service_server::ClusterDiscoveryServiceServer::new(self.clone()),
            endpoint_discovery_service_server::EndpointDiscoveryServiceServer::new(self.clone()),
            listener_discovery_service_server::ListenerDiscoveryServiceServer::new(self.clone()),
            route_discovery_service_server::RouteDiscoveryServiceServer::new(self.clone()),
        )
    }

    /// A one-shot `Fetch*`: the resources the request names (or all of a wildcard type),
    /// whatever version it says it holds.
    fn fetch(
        &self,
        request: Request<DiscoveryRequest>,
        type_url: &'static str,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let mut request = request.into_inner();
        if request.type_url.is_empty() {
            request.type_url = type_url.to_owned();
        }
        if request.type_url != type_url {
            return Err(Status::invalid_argument(format!(
                "this service serves {type_url}, not {}",
                request.type_url
            )));
        }
        request.version_info.clear();
        request.response_nonce.clear();
        let node = request.node.clone().unwrap_or_default();
        let snapshot = self.views.view(&node).borrow().clone();
        let (_, response) = SotwStream::new().on_request(&request, &snapshot);
        response
            .map(Response::new)
            .ok_or_else(|| Status::not_found("nothing of that type is subscribed"))
    }

    fn open<E: Engine>(
        &self,
        request: Request<Streaming<E::Request>>,
        only: Option<&'static str>,
    ) -> Result<ReceiverStream<Result<E::Message, Status>>, Status> {
        let Some(slot) = self.clients.open_slot(self.max_clients) else {
            warn!(
                max = self.max_clients,
                "too many xDS clients: stream refused"
            );
            return Err(Status::resource_exhausted("too many xDS clients"));
        };
        let peer = request.remote_addr().map(|a| a.to_string());
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        tokio::spawn(serve_stream::<E>(
            slot,
            requests,
            tx,
            self.views.clone(),
            self.clients.clone(),
            peer,
            only,
        ));
        Ok(ReceiverStream::new(rx))
    }
}

/// One protocol's engine, as the stream task drives it.
trait Engine: Default + Send + 'static {
    type Request: Send + 'static;
    /// What the engine answers, made into a `Message` when it is sent.
    type Response: Send + 'static;
    type Message: Send + 'static;
    const PROTOCOL: &'static str;
    fn node(request: &Self::Request) -> Option<&Node>;
    fn describe(request: &Self::Request) -> (&str, Option<&str>);
    fn admit(&self, request: &Self::Request) -> Result<(), Refused>;
    fn on_request(
        &mut self,
        request: &Self::Request,
        snapshot: &Snapshot,
    ) -> (Received, Vec<Self::Response>);
    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Vec<Self::Response>;
    fn message(response: Self::Response) -> Self::Message;
    fn status(&self) -> Vec<(&str, &TypeStatus)>;
}

impl Engine for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type Message = DiscoveryResponse;
    const PROTOCOL: &'static str = "sotw";
    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }
    fn describe(request: &DiscoveryRequest) -> (&str, Option<&str>) {
        (
            &request.type_url,
            request.error_detail.as_ref().map(|e| e.message.as_str()),
        )
    }
    fn admit(&self, request: &DiscoveryRequest) -> Result<(), Refused> {
        SotwStream::admit(self, request)
    }
    fn on_request(
        &mut self,
        request: &DiscoveryRequest,
        snapshot: &Snapshot,
    ) -> (Received, Vec<DiscoveryResponse>) {
        let (received, response) = SotwStream::on_request(self, request, snapshot);
        (received, response.into_iter().collect())
    }
    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Vec<DiscoveryResponse> {
        SotwStream::on_snapshot(self, snapshot)
    }
    fn message(response: DiscoveryResponse) -> DiscoveryResponse {
        response
    }
    fn status(&self) -> Vec<(&str, &TypeStatus)> {
        SotwStream::status(self).collect()
    }
}

impl Engine for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaResponse;
    type Message = DeltaDiscoveryResponse;
    const PROTOCOL: &'static str = "delta";
    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }
    fn describe(request: &DeltaDiscoveryRequest) -> (&str, Option<&str>) {
        (
            &request.type_url,
            request.error_detail.as_ref().map(|e| e.message.as_str()),
        )
    }
    fn admit(&self, request: &DeltaDiscoveryRequest) -> Result<(), Refused> {
        DeltaStream::admit(self, request)
    }
    fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        snapshot: &Snapshot,
    ) -> (Received, Vec<DeltaResponse>) {
        DeltaStream::on_request(self, request, snapshot)
    }
    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Vec<DeltaResponse> {
        DeltaStream::on_snapshot(self, snapshot)
    }
    fn message(response: DeltaResponse) -> DeltaDiscoveryResponse {
        response.into_message()
    }
    fn status(&self) -> Vec<(&str, &TypeStatus)> {
        DeltaStream::status(self).collect()
    }
}

/// One client stream, from its first request to its end; with `only`, a per-type service's
/// stream that carries that type alone.
async fn serve_stream<E: Engine>(
    _slot: Slot,
    mut requests: Streaming<E::Request>,
    tx: mpsc::Sender<Result<E::Message, Status>>,
    views: Arc<impl Views>,
    clients: Arc<Clients>,
    peer: Option<String>,
    only: Option<&'static str>,
) {
    let first = match tokio::time::timeout(FIRST_REQUEST_WITHIN, requests.message()).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return debug!(error = %e, "xDS stream ended before its first request"),
        Err(_) => {
            let _ = tx
                .send(Err(Status::deadline_exceeded(format!(
                    "no first request within {FIRST_REQUEST_WITHIN:?}"
                ))))
                .await;
            return debug!("xDS stream without a first request closed");
        }
    };
    let Some(node) = E::node(&first).cloned() else {
        let _ = tx
            .send(Err(Status::invalid_argument(
                "the first request of a stream must carry the node",
            )))
            .await;
        return;
    };
    let mut snapshots = views.view(&node);
    let stream = clients.add(ClientInfo {
        stream: 0,
        node_id: node.id.clone(),
        cluster: node.cluster.clone(),
        user_agent: node.user_agent_name.clone(),
        protocol: E::PROTOCOL,
        peer: peer.clone(),
        connected_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        types: BTreeMap::new(),
    });
    info!(node = %node.id, protocol = E::PROTOCOL, peer = peer.as_deref().unwrap_or("-"), "xDS client connected");
    let mut engine = E::default();
    let mut next = Some(first);
    loop {
        if let Some(request) = next.take() {
            let (type_url, _) = E::describe(&request);
            if let Some(only) = only.filter(|t| *t != type_url) {
                let _ = tx
                    .send(Err(Status::invalid_argument(format!(
                        "this service serves {only}, not {type_url}"
                    ))))
                    .await;
                break;
            }
            if let Err(refused) = engine.admit(&request) {
                warn!(node = %node.id, %refused, "xDS stream refused");
                let _ = tx
                    .send(Err(Status::resource_exhausted(refused.to_string())))
                    .await;
                break;
            }
            let snapshot = snapshots.borrow_and_update().clone();
            let (received, responses) = engine.on_request(&request, &snapshot);
            let (type_url, error) = E::describe(&request);
            match (received, error) {
                (Received::Nack, Some(message)) => {
                    clients.nacks.fetch_add(1, Ordering::Relaxed);
                    warn!(node = %node.id, type_url, message, "xDS client NACKed")
                }
                _ => debug!(node = %node.id, type_url, ?received, "xDS request"),
            }
            clients.update(stream, engine.status().into_iter());
            if send::<E>(&tx, &clients, responses).await.is_err() {
                break;
            }
            continue;
        }
        tokio::select! {
            message = requests.message() => match message {
                Ok(Some(r)) => next = Some(r),
                Ok(None) => break,
                Err(e) => {
                    debug!(node = %node.id, error = %e, "xDS stream failed");
                    break;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                let responses = engine.on_snapshot(&snapshot);
                clients.update(stream, engine.status().into_iter());
                if send::<E>(&tx, &clients, responses).await.is_err() {
                    break;
                }
            }
        }
    }
    clients.remove(stream);
    info!(node = %node.id, protocol = E::PROTOCOL, "xDS client disconnected");
}

/// Sends `responses` in order, each made a message only once the client's queue has room;
/// fails once the client is gone.
async fn send<E: Engine>(
    tx: &mpsc::Sender<Result<E::Message, Status>>,
    clients: &Clients,
    responses: Vec<E::Response>,
) -> Result<(), ()> {
    for r in responses {
        let permit = tx.reserve().await.map_err(|_| ())?;
        clients.responses.fetch_add(1, Ordering::Relaxed);
        permit.send(Ok(E::message(r)));
    }
    Ok(())
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<V: Views> AggregatedDiscoveryService for Server<V> {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let responses = self.open::<SotwStream>(request, None)?;
        Ok(Response::new(Box::pin(responses)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let responses = self.open::<DeltaStream>(request, None)?;
        Ok(Response::new(Box::pin(responses)))
    }
}

/// A per-type discovery service: the ADS machinery, one type per stream.
macro_rules! per_type_service {
    ($service:path, $type_url:expr, $sotw:ident, $sotw_stream:ident, $delta:ident, $delta_stream:ident, $fetch:ident) => {
        #[tonic::async_trait]
        impl<V: Views> $service for Server<V> {
            type $sotw_stream = Responses<DiscoveryResponse>;
            type $delta_stream = Responses<DeltaDiscoveryResponse>;

            async fn $sotw(
                &self,
                request: Request<Streaming<DiscoveryRequest>>,
            ) -> Result<Response<Self::$sotw_stream>, Status> {
                let responses = self.open::<SotwStream>(request, Some($type_url))?;
                Ok(Response::new(Box::pin(responses)))
            }

            async fn $delta(
                &self,
                request: Request<Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<Response<Self::$delta_stream>, Status> {
                let responses = self.open::<DeltaStream>(request, Some($type_url))?;
                Ok(Response::new(Box::pin(responses)))
            }

            async fn $fetch(
                &self,
                request: Request<DiscoveryRequest>,
            ) -> Result<Response<DiscoveryResponse>, Status> {
                self.fetch(request, $type_url)
            }
        }
    };
}

per_type_service!(
    cluster_discovery_service_server::ClusterDiscoveryService,
    type_url::CLUSTER,
    stream_clusters,
    StreamClustersStream,
    delta_clusters,
    DeltaClustersStream,
    fetch_clusters
);
per_type_service!(
    endpoint_discovery_service_server::EndpointDiscoveryService,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    stream_endpoints,
    StreamEndpointsStream,
    delta_endpoints,
    DeltaEndpointsStream,
    fetch_endpoints
);
per_type_service!(
    listener_discovery_service_server::ListenerDiscoveryService,
    type_url::LISTENER,
    stream_listeners,
    StreamListenersStream,
    delta_listeners,
    DeltaListenersStream,
    fetch_listeners
);
per_type_service!(
    route_discovery_service_server::RouteDiscoveryService,
    type_url::ROUTE_CONFIGURATION,
    stream_routes,
    StreamRoutesStream,
    delta_routes,
    DeltaRoutesStream,
    fetch_routes
);
