//! The admin server (`--admin`, default 127.0.0.1:15000), with Envoy's endpoints:
//! `GET /ready`, `/stats/prometheus`, `/config_dump`, `/clusters`; `POST /quitquitquit`
//! (drain and exit), `POST /logging?level=<filter>`. The stats port (15020) serves metrics,
//! readiness and the application's rewritten probes (`/app-health/…`).
use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::UNIX_EPOCH,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info};

use crate::{probe::AppProbers, state::State, upstream::runtime::Traffic};

/// What the admin endpoints read and act on.
pub struct Admin {
    pub state: Arc<State>,
    /// What `/stats/prometheus` encodes.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set to true to start draining (`/quitquitquit`).
    pub drain: Arc<watch::Sender<bool>>,
    /// The xDS client's view, when tern has a control plane.
    pub xds: Option<watch::Receiver<tern_xds_client::ClientStatus>>,
    /// The application's probes, forwarded on the stats port.
    pub app_health: AppHealth,
    /// A workload certificate source runs (Istio's CA, or files): readiness waits for its
    /// first certificate when the configuration presents one.
    pub certificate_source: bool,
    /// Admin connections open (tern's exit waits for them, so `/quitquitquit` is answered).
    pub connections: AtomicUsize,
}

impl Admin {
    /// Admin connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// Counts an admin connection open until its task ends.
struct Connection(Arc<Admin>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Kubelet's rewritten probes (see [`crate::probe`]) and where the application is.
pub struct AppHealth {
    pub probers: AppProbers,
    pub pod_ip: std::net::IpAddr,
    pub mark: u32,
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything (Envoy's 15000, on loopback).
    Admin,
    /// What Prometheus and kubelet read, on the Pod's address (istio-agent's 15020):
    /// `/stats/prometheus` (tern's and Istio's metrics) and `/healthz/ready`.
    Stats,
}

/// Admin or stats connections open at once, each server, and from one address: Prometheus
/// and kubelet keep a few; an idle one costs a few KiB, and one that sends no request head
/// goes after 10 s.
const LIMITS: tern_http_server::Limits = tern_http_server::Limits {
    connections: 1024,
    per_peer: 64,
};

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, scope: Scope) {
    tern_http_server::accept_each(listener, LIMITS, |stream, peer| {
        let admin = admin.clone();
        admin.connections.fetch_add(1, Ordering::Relaxed);
        let open = Connection(admin.clone());
        async move {
            let _open = open;
            let service = service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move {
                    // What changes tern (draining, log levels) only from inside the Pod, as
                    // pilot-agent allows, whatever address the admin server is bound to.
                    if req.method() != Method::GET && !peer.ip().to_canonical().is_loopback() {
                        return Ok::<_, Infallible>(text(
                            StatusCode::FORBIDDEN,
                            "only from loopback\n".to_owned(),
                        ));
                    }
                    Ok::<_, Infallible>(match (scope, req.uri().path()) {
                        (Scope::Admin, _) | (Scope::Stats, "/stats/prometheus") => {
                            handle(&admin, req)
                        }
                        (Scope::Stats, "/healthz/ready") => ready(&admin),
                        (Scope::Stats, path) if path.starts_with(crate::probe::PREFIX) => {
                            app_health(&admin.app_health, path).await
                        }
                        (Scope::Stats, path) => {
                            text(StatusCode::NOT_FOUND, format!("no endpoint {path}\n"))
                        }
                    })
                }
            });
            if let Err(e) = tern_http_server::http1()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection");
            }
        }
    })
    .await;
}

/// One of the application's probes: 200 when it passes, 503 (with why) when not, 404 for a
/// path injection did not write.
async fn app_health(health: &AppHealth, path: &str) -> Response<Full<Bytes>> {
    let Some(prober) = health.probers.get(path) else {
        return text(StatusCode::NOT_FOUND, format!("no probe {path}\n"));
    };
    match prober.run(health.pod_ip, health.mark).await {
        Ok(()) => text(StatusCode::OK, "OK\n".to_owned()),
        Err(why) => {
            debug!(%path, %why, "application probe failed");
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
    }
}

/// A response with this status, content type and body (also the webhook's).
pub(crate) fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("a valid response")
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json_body(v: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )
}

/// Ready once the configuration is complete and, when it presents the workload certificate
/// and a source for one runs, once the first certificate is in (as Envoy's listeners and
/// clusters warm until their SDS secret arrives): before, every mTLS connection would fail.
fn ready(admin: &Admin) -> Response<Full<Bytes>> {
    if *admin.drain.borrow() {
        text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
    } else if !admin.state.ready() {
        text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n")
    } else if admin.certificate_source
        && admin.state.tls.store.current().is_none()
        && admin.state.load().config.needs_workload_certificate()
    {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "PRE_INITIALIZING: waiting for the workload certificate\n",
        )
    } else {
        text(StatusCode::OK, "LIVE\n")
    }
}

fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => ready(admin),
        (&Method::GET, "/stats/prometheus") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            admin.metrics.encode(),
        ),
        (&Method::GET, "/config_dump") => {
            let snap = admin.state.load();
            let applied = snap
                .applied_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let xds = admin.xds.as_ref().map(|x| x.borrow().clone());
            // The workload certificate (never its key), as Envoy's `/certs` shows it.
            let certificate = admin.state.tls.store.current().map(|c| {
                json!({
                    "info": c.info,
                    "expires_in_seconds": c.expires_in(),
                    "roots": c.roots.roots.len(),
                })
            });
            json_body(&json!({
                "version": snap.config.version,
                "applied_at_unix": applied,
                "config": &*snap.config,
                "xds": xds,
                "certificate": certificate,
            }))
        }
        (&Method::GET, "/clusters") => {
            let snap = admin.state.load();
            let clusters: Vec<_> = snap
                .clusters
                .values()
                .map(|c| {
                    let endpoints: Vec<_> = c
                        .endpoints
                        .iter()
                        .map(|e| {
                            let rt = &e.runtime;
                            use std::sync::atomic::Ordering::Relaxed;
                            json!({
                                "address": e.config.address,
                                "health": e.config.health,
                                "weight": e.config.weight,
                                "priority": e.config.priority,
                                "locality": e.config.locality,
                                "ejected": rt.ejected(),
                                "active_requests": rt.active.load(Relaxed),
                                "latency_ms": rt.latency.weigh(std::time::Instant::now(), rt.active.load(Relaxed)) * 1e3,
                                "requests": rt.seen().map_or(0, Traffic::requests),
                                "errors": rt.seen().map_or(0, |t| t.errors.load(Relaxed)),
                                "connections": rt.seen().map_or(0, |t| t.open_connections()),
                            })
                        })
                        .collect();
                    json!({
                        "name": c.config.name,
                        "lb_policy": c.config.lb_policy,
                        "thrift_upstream": c.config.upstream,
                        "connections_per_endpoint": c.config.connections_per_endpoint,
                        "endpoints": endpoints,
                    })
                })
                .collect();
            json_body(&json!({ "clusters": clusters }))
        }
        (&Method::POST, "/quitquitquit") => {
            info!("drain requested through the admin server");
            admin.drain.send_replace(true);
            text(StatusCode::OK, "OK\n")
        }
        (&Method::POST, "/logging") => {
            let level = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="))
                .unwrap_or("");
            match crate::logging::set_level(level) {
                Ok(()) => text(StatusCode::OK, format!("log filter is now {level}\n")),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        (_, path) => text(StatusCode::NOT_FOUND, format!("no admin endpoint {path}\n")),
    }
}
