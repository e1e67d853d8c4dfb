//! A control plane that misbehaves, for tests of what no control plane should do: an ADS
//! proxy in front of a real ADS server (`tern-istiod` in the tests) that passes every request
//! and response of both protocols through unchanged, except as its faults file says.
//!
//! `tern-controlplane ADDR UPSTREAM FAULTS.yaml` (UPSTREAM: `http://host:port`) prints
//! `ready`, then `CLOSE` for each stream it ends. The file is read again when it changes
//! (`FAULTS` once read); a change applies from the next response on.
//!
//! ```yaml
//! delay_ms: 0              # wait this long before passing each response on (a slow control plane)
//! close_every_ms: 0        # end every stream cleanly this often (istiod's maximum connection age)
//! corrupt_cluster: false   # add a cluster whose body does not decode to every CDS response
//! broken_listener: false   # add a listener whose address is a hostname to every LDS response
//! ```
use std::{pin::Pin, time::Duration};

use serde::Deserialize;
use tern_proto::{
    Any, DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Listener, Resource,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    build::{address, eds_cluster, tcp_proxy},
    encode, listener_types, type_url,
};
use tern_tests::say;
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, transport::Channel};

/// What the proxy does wrong.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Faults {
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    close_every_ms: u64,
    #[serde(default)]
    corrupt_cluster: bool,
    #[serde(default)]
    broken_listener: bool,
}

impl Faults {
    /// The malformed resources to add to a response of `type_url`, by name.
    fn malformed(&self, type_url: &str) -> Vec<(String, Any)> {
        match type_url {
            type_url::CLUSTER if self.corrupt_cluster => {
                // A body that names itself, then does not decode.
                let name = "outbound|7777||corrupt.default.svc.cluster.local";
                let mut any = encode(&eds_cluster(name), type_url::CLUSTER);
                any.value.extend_from_slice(&[0xff, 0xff]);
                vec![(name.into(), any)]
            }
            type_url::LISTENER if self.broken_listener => {
                let l = Listener {
                    name: "broken_9999".into(),
                    address: Some(address("calc.default.svc.cluster.local", 9999)),
                    filter_chains: vec![listener_types::FilterChain {
                        filters: vec![tcp_proxy("PassthroughCluster")],
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                vec![(l.name.clone(), encode(&l, type_url::LISTENER))]
            }
            _ => Vec::new(),
        }
    }

    /// Resolves when a stream opened now is to be ended (never without `close_every_ms`).
    fn closing(&self) -> impl Future<Output = ()> + use<> {
        let every = self.close_every_ms;
        async move {
            if every == 0 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(every)).await;
        }
    }
}

/// A response of either protocol, which malformed resources can be added to.
trait Malformable: Send + 'static {
    fn type_url(&self) -> &str;
    fn add(&mut self, name: String, any: Any);
}

impl Malformable for DiscoveryResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }

    fn add(&mut self, _name: String, any: Any) {
        self.resources.push(any);
    }
}

impl Malformable for DeltaDiscoveryResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }

    fn add(&mut self, name: String, any: Any) {
        self.resources.push(Resource {
            name,
            version: self.system_version_info.clone(),
            resource: Some(any),
            ..Default::default()
        });
    }
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The responses of a stream relayed to `up` (see [`relay`]).
fn relayed<Req: Send + 'static, Resp: Malformable>(
    down: Streaming<Req>,
    up_tx: mpsc::Sender<Req>,
    up: Streaming<Resp>,
    faults: watch::Receiver<Faults>,
) -> Response<Responses<Resp>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(relay(down, up_tx, up, faults, tx));
    Response::new(Box::pin(ReceiverStream::new(rx)))
}

/// Passes one stream's requests upstream and its responses back, with the faults in force,
/// until either side ends or the stream is to be closed.
async fn relay<Req: Send + 'static, Resp: Malformable>(
    mut down: Streaming<Req>,
    up_tx: mpsc::Sender<Req>,
    mut up: Streaming<Resp>,
    faults: watch::Receiver<Faults>,
    tx: mpsc::Sender<Result<Resp, Status>>,
) {
    let close = faults.borrow().closing();
    tokio::pin!(close);
    loop {
        tokio::select! {
            () = &mut close => {
                say("CLOSE");
                return;
            }
            request = down.message() => {
                let Ok(Some(r)) = request else { return };
                if up_tx.send(r).await.is_err() {
                    return;
                }
            }
            response = up.message() => {
                let mut r = match response {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let f = faults.borrow().clone();
                let t = r.type_url().to_owned();
                for (name, any) in f.malformed(&t) {
                    r.add(name, any);
                }
                if f.delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(f.delay_ms)).await;
                }
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        }
    }
}

struct Proxy {
    upstream: String,
    faults: watch::Receiver<Faults>,
}

impl Proxy {
    async fn client(&self) -> Result<AggregatedDiscoveryServiceClient<Channel>, Status> {
        let client = AggregatedDiscoveryServiceClient::connect(self.upstream.clone())
            .await
            .map_err(|e| Status::unavailable(format!("{}: {e}", self.upstream)))?;
        Ok(client.max_decoding_message_size(64 << 20))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Proxy {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (up_tx, up_rx) = mpsc::channel(64);
        let up = self
            .client()
            .await?
            .stream_aggregated_resources(ReceiverStream::new(up_rx))
            .await?
            .into_inner();
        Ok(relayed(
            request.into_inner(),
            up_tx,
            up,
            self.faults.clone(),
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (up_tx, up_rx) = mpsc::channel(64);
        let up = self
            .client()
            .await?
            .delta_aggregated_resources(ReceiverStream::new(up_rx))
            .await?
            .into_inner();
        Ok(relayed(
            request.into_inner(),
            up_tx,
            up,
            self.faults.clone(),
        ))
    }
}

fn load(path: &str) -> Option<Faults> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_yaml::from_str(&text)
        .map_err(|e| say(format!("ERROR {path}: {e}")))
        .ok()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, upstream, path] = &args[..] else {
        eprintln!("usage: tern-controlplane ADDR UPSTREAM FAULTS.yaml");
        std::process::exit(2);
    };
    let addr: std::net::SocketAddr = addr.parse().expect("ADDR");
    let (tx, faults) = watch::channel(load(path).expect("a valid faults file"));
    let path = path.clone();
    tokio::spawn(async move {
        tern_tests::on_change(&path, || {
            if let Some(f) = load(&path) {
                tx.send_replace(f);
                say("FAULTS");
            }
        })
        .await;
    });
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    say("ready");
    tonic::transport::Server::builder()
        .add_service(
            AggregatedDiscoveryServiceServer::new(Proxy {
                upstream: upstream.clone(),
                faults,
            })
            .max_decoding_message_size(64 << 20),
        )
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .expect("serve");
}
