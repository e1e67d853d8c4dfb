//! tern discovery's admin server (istiod's monitoring port, 15014): `/debug/syncz` (every
//! connected client: node, protocol, and per type what it subscribed, was sent, ACKed, and
//! its last NACK), `/debug/sources` (each source's state), `/debug/health` (each checked
//! endpoint's verdict and last failure), `/debug/endpoints` (every service's endpoints with
//! the health served), `/debug/config_dump` (what each
//! kind of client is served, by type and name with versions), `/ready`, `/metrics`.
use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::state::State;

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_default()
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

/// What a snapshot holds, by type: name → version.
fn dump(snapshot: &tern_xds_server::Snapshot) -> serde_json::Value {
    let mut types = serde_json::Map::new();
    for type_url in snapshot.counts().keys() {
        let resources: serde_json::Map<String, serde_json::Value> = snapshot
            .of_type(type_url)
            .map(|r| (r.name.to_string(), r.version.to_string().into()))
            .collect();
        types.insert(
            (*type_url).to_owned(),
            serde_json::json!({"version": snapshot.version(type_url), "resources": resources}),
        );
    }
    types.into()
}

fn handle(state: &State, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/debug/syncz" => json(&state.clients.list()),
        "/debug/sources" => json(&state.sources()),
        "/debug/health" => json(&state.checker.status()),
        "/debug/endpoints" => json(&state.endpoints()),
        "/debug/config_dump" => json(&serde_json::json!({
            "sidecar": dump(&state.views.sidecar()),
            "grpc": dump(&state.views.grpc()),
        })),
        "/ready" => respond(StatusCode::OK, "text/plain", "LIVE\n"),
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no endpoint {path}\n"),
        ),
    }
}

/// Admin connections open at once, and from one address (one that sends no request head goes
/// after 10 s).
const LIMITS: tern_http_server::Limits = tern_http_server::Limits {
    connections: 1024,
    per_peer: 64,
};

/// Serves admin requests (GET only) until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    tern_http_server::accept_each(listener, LIMITS, |stream, _| {
        let state = state.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    Ok::<_, Infallible>(if req.method() == hyper::Method::GET {
                        handle(&state, req.uri().path())
                    } else {
                        respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n")
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
