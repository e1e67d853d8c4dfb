//! `tern webhook`: Kubernetes' mutating admission webhook for tern, over HTTPS.
//!
//! `POST /inject` answers `AdmissionReview`s ([`review`]); `GET /healthz/ready` is its
//! readiness; `GET /metrics` counts reviews by verdict. Selection is the API server's, from
//! the `MutatingWebhookConfiguration` (namespace label `tern-injection=enabled`, or the Pod
//! label `tern.io/inject=true`); the webhook then honours the Pod's own opt-outs, never
//! injects twice, and never denies a Pod. With `failurePolicy: Ignore`, Pods keep being
//! created while it is down — without tern, so on SIGTERM it first reports itself unready and
//! keeps answering for a grace period, while its Service stops sending it reviews.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    admin::{respond, text},
    inject::Options,
};

pub mod cert;
pub mod review;

/// The largest request body read: the API server sends at most 3 MiB (its own request
/// limit), and etcd holds Pods of at most 1.5 MiB.
const MAX_BODY: usize = 3 << 20;
/// How long a client has to send a request's body (its head: [`tern_http_server::HEADER_TIMEOUT`]).
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Reviews computed at once. A review holds its Pod in a few forms, about 40 times the
/// body's size at its peak (measured: a 2.0 MB review, +83 MiB; 20,000 `proxyMetadata`
/// entries, 0.37 s in a debug build): one at a time keeps the webhook under its 192 Mi limit
/// for any body the 3 MiB bound admits.
const CONCURRENT_REVIEWS: usize = 1;
/// Bytes of request bodies held at once, all connections together (four of the largest): a
/// request waits for its share before its body is read, so many clients sending large
/// bodies at once cannot take the webhook past its limit (64 bodies of 3 MB at once took it
/// to 262 MiB before).
const BODY_BUDGET: usize = 4 * MAX_BODY;
/// Connections open at once; more are closed as they come. The API server keeps a few, and
/// may open many in a burst of admissions, so one address may take them all.
const LIMITS: tern_http_server::Limits = tern_http_server::Limits {
    connections: 256,
    per_peer: 256,
};
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CERT_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// What `tern webhook` serves with.
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub options: Options,
    /// How long it keeps answering, unready, after SIGTERM.
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    result: &'static str,
}

struct Webhook {
    options: Options,
    /// Set on SIGTERM: `/healthz/ready` fails while reviews are still answered.
    stopping: AtomicBool,
    reviews: Family<VerdictLabels, Counter>,
    registry: Registry,
    /// Reviews computed at once.
    reviewing: tokio::sync::Semaphore,
    /// What request bodies may hold, in KiB.
    bodies: tokio::sync::Semaphore,
}

/// Serves until the process ends.
pub async fn serve(config: WebhookConfig) -> anyhow::Result<()> {
    let cert = cert::ReloadingCert::load(&config.cert, &config.key)
        .context("the webhook's serving certificate")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_cert_resolver(cert.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(cert.watch(CERT_RELOAD_EVERY));

    let mut registry = Registry::with_prefix("tern_webhook");
    let reviews = Family::<VerdictLabels, Counter>::default();
    registry.register(
        "reviews",
        "AdmissionReviews answered, by verdict",
        reviews.clone(),
    );
    let webhook = Arc::new(Webhook {
        options: config.options,
        stopping: AtomicBool::new(false),
        reviews,
        registry,
        reviewing: tokio::sync::Semaphore::new(CONCURRENT_REVIEWS),
        bodies: tokio::sync::Semaphore::new(BODY_BUDGET / 1024),
    });
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    tracing::info!(address = %config.listen, "tern webhook is serving");
    let accepting = tokio::spawn(accept(listener, acceptor, webhook.clone()));
    let why = crate::signal::wait_for_signal().await;
    webhook.stopping.store(true, Ordering::Relaxed);
    tracing::info!(why, grace = ?config.shutdown_grace, "stopping: unready, still answering");
    tokio::time::sleep(config.shutdown_grace).await;
    accepting.abort();
    tracing::info!("tern webhook stopped");
    Ok(())
}

async fn accept(listener: TcpListener, acceptor: TlsAcceptor, webhook: Arc<Webhook>) {
    tern_http_server::accept_each(listener, LIMITS, |stream, peer| {
        let (acceptor, webhook) = (acceptor.clone(), webhook.clone());
        async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = service_fn(move |req| {
                let webhook = webhook.clone();
                async move { Ok::<_, Infallible>(handle(&webhook, req).await) }
            });
            if let Err(e) = tern_http_server::http1()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "webhook connection");
            }
        }
    })
    .await;
}

async fn handle(webhook: &Webhook, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => {}
        (&Method::GET, "/healthz/ready") if webhook.stopping.load(Ordering::Relaxed) => {
            return text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
        }
        (&Method::GET, "/healthz/ready") => return text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => {
            let mut out = String::new();
            return match encode(&mut out, &webhook.registry) {
                Ok(()) => text(StatusCode::OK, out),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed
",
                ),
            };
        }
        (_, path) => return text(StatusCode::NOT_FOUND, format!("no endpoint {path}\n")),
    }
    let json = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "an AdmissionReview is application/json\n",
        );
    }
    // The body's share of what bodies may hold, before it is read: what it says it carries
    // (the API server says), or the most a body may be.
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body refused: more than {MAX_BODY} bytes\n"),
        );
    }
    let limit = declared.unwrap_or(MAX_BODY);
    let share = u32::try_from(limit.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let started = tokio::time::Instant::now();
    let Ok(Ok(_body_share)) =
        tokio::time::timeout(READ_TIMEOUT, webhook.bodies.acquire_many(share)).await
    else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: too many large requests at once\n",
        );
    };
    let collected = tokio::time::timeout_at(
        started + READ_TIMEOUT,
        Limited::new(req.into_body(), limit).collect(),
    )
    .await;
    let body = match collected {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body refused: {e}\n"),
            );
        }
        Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "request body too slow\n"),
    };
    // Injection is CPU work: off the I/O threads, a few at a time.
    let Ok(_permit) = webhook.reviewing.acquire().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
    };
    let options = webhook.options.clone();
    let reviewed = tokio::task::spawn_blocking(move || review::review(&body, &options)).await;
    let Ok(reviewed) = reviewed else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "review failed\n");
    };
    match reviewed {
        Ok((answer, verdict)) => {
            webhook
                .reviews
                .get_or_create(&VerdictLabels {
                    result: verdict.label(),
                })
                .inc();
            respond(StatusCode::OK, "application/json", answer.to_string())
        }
        Err(e) => {
            webhook
                .reviews
                .get_or_create(&VerdictLabels {
                    result: "malformed",
                })
                .inc();
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}
