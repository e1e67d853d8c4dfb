//! `tern discovery`: its flags, and the process: sources feeding the catalog (`State`), the
//! xDS server (h2c, or TLS with optional client certificates) and the admin server.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tern_xds_server::{Clients, Server};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    catalog::Catalog,
    health::checker::Checker,
    sources::{SourceEvent, file},
    state::State,
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
    /// At most this many xDS streams at once (and connections: more are closed as they come).
    #[arg(long, env = "TERN_DISCOVERY_MAX_CLIENTS", default_value_t = 10_000)]
    pub max_clients: usize,
    /// At most this many xDS connections from one address (a sidecar keeps one; Pods on the
    /// host's network share its address), so one client cannot take every place.
    #[arg(
        long,
        env = "TERN_DISCOVERY_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_connections_per_address: usize,
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

/// The process: one heap arena (see [`crate::memory`]), a runtime, [`run`].
pub fn main(args: DiscoveryArgs) -> anyhow::Result<()> {
    crate::memory::one_arena();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(run(args))
}

/// Runs `tern discovery` until SIGTERM or Ctrl-C.
pub async fn run(args: DiscoveryArgs) -> anyhow::Result<()> {
    let first = file::read(&args.services).map_err(anyhow::Error::msg)?;
    let verdicts = Arc::new(tokio::sync::Notify::new());
    let state = Arc::new(State::new(
        Arc::new(Clients::default()),
        Arc::new(ClientViews::default()),
        Checker::new(args.max_health_checks, verdicts.clone()),
        Catalog::default(),
    ));
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
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ))
            .timeout(crate::incoming::HANDSHAKE_WITHIN);
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
        .add_service(tern_xds_server::Csds::new(state.clients.clone()))
        .serve_with_incoming_shutdown(
            crate::incoming::accepted(
                listener,
                tern_http_server::Limits {
                    connections: args.max_clients,
                    per_peer: args.max_connections_per_address,
                },
            ),
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
