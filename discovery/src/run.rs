//! `tern discovery`: its flags, and the process: sources feeding the catalog, the catalog
//! publishing both views, the xDS server (h2c, or TLS with optional client certificates) and
//! the admin server.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tern_xds_server::{Clients, Server};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    catalog::{Catalog, SourceState, SourceStatus},
    health::checker::Checker,
    sources::{SourceEvent, file},
    views::ClientViews,
};

/// `tern discovery`'s flags.
#[derive(Debug, clap::Args)]
pub struct DiscoveryArgs {
    /// The services file (YAML: services and their endpoints), watched for changes.
    #[arg(long, env = "TERN_DISCOVERY_SERVICES")]
    pub services: PathBuf,
    /// Where to serve xDS over gRPC (istiod's 15010 plaintext; with a certificate, TLS).
    #[arg(long, env = "TERN_DISCOVERY_ADDRESS", default_value = "0.0.0.0:15010")]
    pub address: SocketAddr,
    /// The server certificate (PEM) for TLS; with it, `--tls-key`.
    #[arg(long, env = "TERN_DISCOVERY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "TERN_DISCOVERY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by these roots (PEM).
    #[arg(long, env = "TERN_DISCOVERY_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// The admin server: /debug/syncz, /debug/sources, /debug/config_dump, /ready, /metrics
    /// (istiod's monitoring port).
    #[arg(long, env = "TERN_DISCOVERY_ADMIN", default_value = "127.0.0.1:15014")]
    pub admin_address: SocketAddr,
    /// How often the services file is checked for changes, in milliseconds.
    #[arg(long, env = "TERN_DISCOVERY_FILE_INTERVAL_MS", default_value_t = 500)]
    pub file_interval_ms: u64,
    /// At most this many xDS streams at once.
    #[arg(long, env = "TERN_DISCOVERY_MAX_CLIENTS", default_value_t = 10_000)]
    pub max_clients: usize,
    /// etcd members (`http://host:port`, comma-separated) whose registry to serve, in
    /// CloudWeGo Kitex's `registry-etcd` layout.
    #[arg(long, env = "TERN_DISCOVERY_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The etcd key prefix the registry lives under.
    #[arg(long, env = "TERN_DISCOVERY_ETCD_PREFIX", default_value = crate::sources::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// ZooKeeper servers (`host:port`, comma-separated) holding Finagle/Aurora serversets.
    #[arg(long, env = "TERN_DISCOVERY_ZOOKEEPER", value_delimiter = ',')]
    pub zookeeper: Vec<String>,
    /// The serversets to serve, as `NAME=/path` or `NAME=/path!endpoint` (an
    /// `additionalEndpoints` name), comma-separated.
    #[arg(
        long,
        env = "TERN_DISCOVERY_SERVERSETS",
        value_delimiter = ',',
        requires = "zookeeper"
    )]
    pub serverset: Vec<crate::sources::zookeeper::Serverset>,
    /// The ZooKeeper session timeout, in milliseconds (pings go every third of it).
    #[arg(
        long,
        env = "TERN_DISCOVERY_ZOOKEEPER_SESSION_MS",
        default_value_t = 6000
    )]
    pub zookeeper_session_ms: u64,
    /// At most this many health checks in flight at once (each holds a connection).
    #[arg(long, env = "TERN_DISCOVERY_MAX_HEALTH_CHECKS", default_value_t = 256)]
    pub max_health_checks: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViewLabels {
    view: &'static str,
    type_url: String,
}

/// What the admin server reads.
pub struct State {
    pub clients: Arc<Clients>,
    pub views: Arc<ClientViews>,
    pub checker: Arc<Checker>,
    catalog: Mutex<Catalog>,
}

impl State {
    pub fn sources(&self) -> Vec<SourceStatus> {
        self.catalog().status()
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a source's event, checks the endpoints it brings, and publishes the views if
    /// anything changed.
    fn apply(&self, event: SourceEvent) {
        let started = std::time::Instant::now();
        let services = {
            let mut catalog = self.catalog();
            match event.result {
                Ok(parsed) => {
                    for s in &parsed.skipped {
                        warn!(source = %event.source, entry = %s.entry, reason = %s.reason, "entry skipped");
                    }
                    catalog.update(&event.source, event.kind, parsed.services, parsed.skipped);
                }
                Err(e) => {
                    warn!(source = %event.source, error = %e, "source failed: its last endpoints stay");
                    catalog.failed(&event.source, event.kind, e)
                }
            }
            catalog.services()
        };
        let merged = started.elapsed();
        self.checker.reconcile(&services);
        self.publish(&services);
        tracing::debug!(?merged, total = ?started.elapsed(), "source event applied");
    }

    /// Publishes the views of `services` with the health checks' verdicts.
    fn publish(&self, services: &[crate::model::Service]) {
        let started = std::time::Instant::now();
        let health = self.checker.statuses(services);
        let changed = self.views.publish(services, |s, e| {
            health
                .get(&(s.cluster(), e.address))
                .copied()
                .unwrap_or_else(|| e.health.eds())
        });
        if changed {
            info!(services = services.len(), took = ?started.elapsed(), "configuration published");
            // The previous snapshots, decoded registries and parsed files were freed at once;
            // glibc keeps such memory unless asked.
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only walks glibc's own heap metadata; it takes no pointers.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// What is served of every service: its endpoints with the health clients see.
    pub fn endpoints(&self) -> serde_json::Value {
        let services = self.catalog().services();
        let health = self.checker.statuses(&services);
        services
            .iter()
            .map(|s| {
                let endpoints: Vec<serde_json::Value> = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let status = health
                            .get(&(s.cluster(), e.address))
                            .copied()
                            .unwrap_or_else(|| e.health.eds());
                        serde_json::json!({
                            "address": e.address,
                            "weight": e.weight,
                            "locality": e.locality,
                            "health_status": status,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": s.name,
                    "port": s.port,
                    "protocol": s.protocol,
                    "vip": s.vip,
                    "cluster": s.cluster(),
                    "endpoints": endpoints,
                })
            })
            .collect()
    }

    /// A health verdict changed: publishes the views again.
    fn republish(&self) {
        let services = self.catalog().services();
        self.publish(&services);
    }

    /// The metrics, in Prometheus' text format (computed when scraped).
    pub fn metrics(&self) -> String {
        let mut registry = Registry::with_prefix("tern_discovery");
        let clients: Family<Vec<(String, String)>, Gauge> = Family::default();
        for c in self.clients.list() {
            clients
                .get_or_create(&vec![("protocol".to_owned(), c.protocol.to_owned())])
                .inc();
        }
        registry.register("clients", "Connected xDS clients, by protocol", clients);
        let totals = self.clients.totals();
        for (name, help, value) in [
            ("streams", "xDS streams opened", totals.streams),
            ("responses", "Discovery responses sent", totals.responses),
            ("nacks", "NACKs received from clients", totals.nacks),
        ] {
            let c: Counter = Counter::default();
            c.inc_by(value);
            registry.register(name, help, c);
        }
        let skipped: Family<SourceLabels, Counter> = Family::default();
        let stale: Family<SourceLabels, Gauge> = Family::default();
        for s in self.sources() {
            let labels = SourceLabels {
                source: s.name.clone(),
            };
            skipped.get_or_create(&labels).inc_by(s.skipped_total);
            stale
                .get_or_create(&labels)
                .set(i64::from(s.state != SourceState::Ok));
        }
        registry.register(
            "source_entries_skipped",
            "Registry entries skipped as malformed",
            skipped,
        );
        registry.register(
            "source_stale",
            "1 while a source's last read failed (its last good endpoints are served)",
            stale,
        );
        let resources: Family<ViewLabels, Gauge> = Family::default();
        for (view, snapshot) in [
            ("sidecar", self.views.sidecar()),
            ("grpc", self.views.grpc()),
        ] {
            for (type_url, n) in snapshot.counts() {
                resources
                    .get_or_create(&ViewLabels {
                        view,
                        type_url: type_url.to_owned(),
                    })
                    .set(n as i64);
            }
        }
        registry.register("resources", "Resources served, by view and type", resources);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Runs `tern discovery` until SIGTERM or Ctrl-C.
pub async fn run(args: DiscoveryArgs) -> anyhow::Result<()> {
    let first = file::read(&args.services).map_err(anyhow::Error::msg)?;
    let verdicts = Arc::new(tokio::sync::Notify::new());
    let state = Arc::new(State {
        clients: Arc::new(Clients::default()),
        views: Arc::new(ClientViews::default()),
        checker: Checker::new(args.max_health_checks, verdicts.clone()),
        catalog: Mutex::new(Catalog::default()),
    });
    state.apply(SourceEvent {
        source: file::name(&args.services),
        kind: crate::catalog::SourceKind::Definitions,
        result: Ok(first),
    });

    let (events_tx, mut events) = mpsc::channel(64);
    tokio::spawn(file::watch(
        args.services.clone(),
        Duration::from_millis(args.file_interval_ms.max(10)),
        events_tx.clone(),
    ));
    if !args.etcd.is_empty() {
        let source = crate::sources::etcd::EtcdSource {
            endpoints: args.etcd.clone(),
            prefix: args.etcd_prefix.clone(),
        };
        tokio::spawn(crate::sources::keep_watching(source, events_tx.clone()));
    }
    if !args.zookeeper.is_empty() && !args.serverset.is_empty() {
        let source = crate::sources::zookeeper::ZookeeperSource {
            hosts: args.zookeeper.clone(),
            serversets: args.serverset.clone(),
            session_timeout: Duration::from_millis(args.zookeeper_session_ms.clamp(2000, 60_000)),
        };
        tokio::spawn(crate::sources::keep_watching(source, events_tx.clone()));
    }
    let applier = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => applier.apply(event),
                    None => return,
                },
                () = verdicts.notified() => applier.republish(),
            }
        }
    });

    let admin = tokio::net::TcpListener::bind(args.admin_address)
        .await
        .with_context(|| format!("bind the admin server to {}", args.admin_address))?;
    tokio::spawn(crate::admin::serve(admin, state.clone()));

    let listener = tokio::net::TcpListener::bind(args.address)
        .await
        .with_context(|| format!("bind the xDS server to {}", args.address))?;
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    let tls = args.tls_cert.is_some();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        let mut config = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
        );
        if let Some(ca) = &args.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        server = server.tls_config(config).context("the TLS settings")?;
    }
    info!(
        address = %args.address,
        tls,
        client_certificates = args.client_ca.is_some(),
        admin = %args.admin_address,
        "serving xDS"
    );
    let xds = Server::new(state.views.clone(), state.clients.clone(), args.max_clients);
    let (cds, eds, lds, rds) = xds.per_type();
    server
        .add_service(xds.ads())
        .add_service(cds)
        .add_service(eds)
        .add_service(lds)
        .add_service(rds)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown(),
        )
        .await
        .context("the xDS server")?;
    info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "no SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
