//! `tern run`: bind the listeners, set up capture, load the configuration, serve until
//! SIGTERM, Ctrl-C or `/quitquitquit`, drain, clean up.
//!
//! Order matters. With eBPF capture the proxy first checks that it runs inside the captured
//! cgroup (sockets belong to the cgroup of the process that creates them, and the getsockopt
//! hook only answers on sockets in the cgroup), then binds its listeners, then attaches the
//! hooks — so the connect hook never sees the proxy missing and no connection is refused while
//! tern starts.
//! Draining keeps the listeners open (see [`crate::listener::serve`]) and serves on until the
//! connections close or the drain timeout passes (see `drain`). Capture is not released at exit:
//! while tern is down (exited, crashed, restarting) the Pod's captured connections are
//! refused, and a restarted tern takes the capture over.
pub mod args;

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

use crate::{
    admin::{self, Admin},
    capture::{
        CaptureError, OUTBOUND_IP4, OUTBOUND_IP6, ebpf::EbpfCapture, iptables::IptablesCapture,
    },
    config::{Config, NoInbound, file},
    filters::{Ctx, Direction, ThriftPorts},
    listener::{self, OpenConnections},
    metrics::Metrics,
    notice::Notice,
    socket,
    state::State,
    thrift::DecoderLimits,
    tls,
    workers::Workers,
    xds::metrics::ConfigMetrics,
};
use args::{CaptureMode, RunArgs};

/// The capture `tern run` set up (it outlives `tern run`: see the module doc).
enum Capture {
    None,
    Ebpf(EbpfCapture),
    Iptables,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Before the configuration makes pools and metrics: they are sliced per worker.
    crate::workers::plan(args.concurrency);
    let settings = args.capture_args.settings();
    let probers = crate::probe::AppProbers::parse(&args.app_probers)?;
    let mark = own_sockets_mark(&args, &settings)?;
    // A broken configuration is refused before anything is attached.
    let config = match &args.config {
        Some(path) => file::load(path)?,
        None => Config::default(),
    };
    let cgroup = match args.capture {
        CaptureMode::Ebpf => {
            let cgroup = args.capture_args.cgroup()?;
            cgroup.require_self_inside()?;
            Some(cgroup)
        }
        _ => None,
    };

    let outbound = bind_pair(
        SocketAddr::new(IpAddr::V4(OUTBOUND_IP4), settings.outbound_port),
        SocketAddr::new(IpAddr::V6(OUTBOUND_IP6), settings.outbound_port),
    )?;
    let inbound = bind_pair(
        SocketAddr::new(IpAddr::V4([0, 0, 0, 0].into()), settings.inbound_port),
        SocketAddr::new(IpAddr::V6([0u16; 8].into()), settings.inbound_port),
    )?;
    // The admin server runs on the control thread; its socket is bound now, so a port in
    // use fails the start.
    let admin_listener = std::net::TcpListener::bind(args.admin)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("listen on the admin address {}", args.admin))?;

    let capture = attach_capture(&args, &settings, cgroup, &inbound)?;

    // Everything that needs privileges is done (capture attached or taken over, the inbound
    // socket registered, every listener bound): give them up before serving anything.
    if let Some(uid) = args.run_as_uid {
        crate::privileges::drop_to(uid)?;
        info!(uid, "running unprivileged: no capabilities left");
    }
    let pins = match &capture {
        Capture::Ebpf(c) => Some(c.pins().to_owned()),
        _ => None,
    };
    let interception = match args.capture {
        CaptureMode::Iptables => "REDIRECT",
        CaptureMode::Ebpf => "EBPF",
        CaptureMode::None => "NONE",
    };
    let node = crate::xds::node::node(args.node_id.as_deref(), interception);
    let budget = crate::budget::BufferBudget::new(args.max_buffered_bytes);
    let metrics = Metrics::for_workload(
        pins,
        crate::telemetry::Workload::from_node(&node),
        Some(budget.clone()),
    );
    let loaded_version = config.version.clone();
    let (state, xds) = configured_state(&args, &node, config, &metrics, mark)?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let drain_tx = Arc::new(drain_tx);
    let closing = Notice::default();
    let ctx = Arc::new(context(
        &args,
        (&state, budget),
        &metrics,
        mark,
        closing.clone(),
    ));
    let open = Arc::new(OpenConnections::default());
    let mut tasks = serve_listeners(
        &args,
        [outbound, inbound],
        &ctx,
        &open,
        metrics.listeners.clone(),
    )?;
    info!(addr = %args.admin, "admin server listening");
    let (xds_stream, xds_status) = match xds {
        Some((stream, status)) => (Some(stream), Some(status)),
        None => (None, None),
    };
    let certificates = cert_source(&args, mark)?;
    let admin = Arc::new(Admin {
        state: state.clone(),
        metrics: metrics.clone(),
        drain: drain_tx.clone(),
        xds: xds_status.clone(),
        app_health: admin::AppHealth {
            probers,
            pod_ip: args.instance_ip,
            mark,
        },
        certificate_source: certificates.is_some(),
        connections: Default::default(),
    });
    let control = control_tasks(
        &state,
        &metrics,
        xds_stream,
        xds_status.clone(),
        certificates,
    );
    let servers = admin_servers(&args, admin_listener);
    spawn_control_thread(servers, admin.clone(), control)?;
    // The file is re-read when it changes unless a control plane owns the configuration
    // (then the file is only the base it adds to).
    if let (Some(path), None) = (args.config.clone(), &xds_status) {
        tasks.spawn(watch_config(
            path,
            state.clone(),
            metrics.config.clone(),
            loaded_version,
        ));
    }
    tasks.spawn(close_idle_connections(state.clone()));
    info!("tern is running");

    let mut drain_requested = drain_rx.clone();
    let why = tokio::select! {
        signal = crate::signal::wait_for_signal() => signal,
        _ = drain_requested.wait_for(|d| *d) => "/quitquitquit",
    };
    info!(why, "draining");
    drain_tx.send_replace(true);
    drain(
        &open,
        &closing,
        Duration::from_secs(args.drain_timeout_secs),
    )
    .await;
    // `/quitquitquit`'s reply (and any admin request in flight) is written before the exit.
    until_none(|| admin.connections(), Duration::from_secs(1)).await;
    tasks.shutdown().await;
    capture.stays();
    info!("tern stopped");
    Ok(())
}

impl Capture {
    /// Says that the capture outlives tern: without tern the Pod's inbound is refused (and
    /// its outbound too, unless it fails open), never let through unchecked. A restarted
    /// tern takes it over; it goes with the Pod (`tern capture gc`, at every start).
    fn stays(&self) {
        match self {
            Capture::None => {}
            Capture::Ebpf(_) => info!("the eBPF capture stays attached while the Pod lives"),
            Capture::Iptables => info!("the iptables capture stays while the Pod lives"),
        }
    }
}

/// The state with the static configuration in force, and the xDS client when a control
/// plane is configured. With one, tern is ready once its first configuration is warm, and
/// the static configuration is the base it adds to; without one, the static configuration
/// is all.
fn configured_state(
    args: &RunArgs,
    node: &tern_proto::Node,
    config: Config,
    metrics: &Metrics,
    mark: u32,
) -> anyhow::Result<(Arc<State>, Option<XdsClient>)> {
    let state = State::with_table_budget(metrics.upstream.clone(), args.max_hash_table_bytes);
    let xds = xds_client(args, node, &state, &config, metrics, mark)?;
    if xds.is_none() {
        state.apply(config);
    } else {
        // Until the control plane's first configuration, the static one serves outbound,
        // and inbound is closed unless it has an inbound listener of its own; not ready.
        state.update(Config {
            no_inbound: NoInbound::AwaitingPolicy,
            ..config
        });
    }
    Ok((state, xds))
}

/// The mark tern's own sockets carry so that capture skips them: none once tern runs
/// unprivileged, when capture must know them by their uid instead.
fn own_sockets_mark(
    args: &RunArgs,
    settings: &crate::capture::CaptureSettings,
) -> anyhow::Result<u32> {
    if let Some(uid) = args.run_as_uid {
        if args.capture != CaptureMode::None && settings.skip_uid != Some(uid) {
            anyhow::bail!(
                "--run-as-uid {uid} needs --proxy-uid {uid}: capture must skip tern's own sockets by their uid"
            );
        }
        return Ok(0);
    }
    Ok(settings.mark)
}

/// What every connection handler needs, from the arguments.
fn context(
    args: &RunArgs,
    (state, budget): (&Arc<State>, Arc<crate::budget::BufferBudget>),
    metrics: &Metrics,
    mark: u32,
    closing: Notice,
) -> Ctx {
    Ctx {
        state: state.clone(),
        metrics: metrics.filters.clone(),
        mark,
        limits: DecoderLimits {
            max_frame: args.max_frame_size,
            max_depth: args.max_depth,
        },
        closing,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
        access_log: args.access_log,
        thrift_ports: ThriftPorts {
            relay: args.thrift_detect_exclude_ports.clone(),
            forced: args.thrift_ports.clone(),
        },
        budget,
        message_timeout: Duration::from_secs(args.message_timeout_secs),
    }
}

/// Starts the data-plane workers and accepts on every listener (outbound's pair, then
/// inbound's), handing connections to them.
fn serve_listeners(
    args: &RunArgs,
    [outbound, inbound]: [(TcpListener, Option<TcpListener>); 2],
    ctx: &Arc<Ctx>,
    open: &Arc<OpenConnections>,
    metrics: listener::ListenerMetrics,
) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let workers = Arc::new(Workers::start(args.concurrency)?);
    info!(
        workers = crate::workers::count(),
        "data-plane workers started"
    );
    let mut tasks = tokio::task::JoinSet::new();
    for (l, direction) in [
        (Some(outbound.0), Direction::Outbound),
        (outbound.1, Direction::Outbound),
        (Some(inbound.0), Direction::Inbound),
        (inbound.1, Direction::Inbound),
    ] {
        if let Some(l) = l {
            info!(addr = ?l.local_addr().ok(), dir = direction.as_str(), "listening");
            tasks.spawn(listener::serve(
                l,
                direction,
                ctx.clone(),
                open.clone(),
                args.max_connections,
                workers.clone(),
                metrics.clone(),
            ));
        }
    }
    Ok(tasks)
}

/// Attaches capture (or takes over the one pinned for the cgroup), or installs iptables
/// rules; eBPF capture registers the inbound listeners for `sk_lookup`.
fn attach_capture(
    args: &RunArgs,
    settings: &crate::capture::CaptureSettings,
    cgroup: Option<crate::capture::cgroup::CgroupDir>,
    inbound: &(TcpListener, Option<TcpListener>),
) -> anyhow::Result<Capture> {
    Ok(match (args.capture, cgroup) {
        (CaptureMode::Ebpf, Some(cgroup)) => {
            // Pods deleted while their tern was dead left their hooks pinned: free them.
            if let Err(e) = crate::capture::gc::collect() {
                warn!(error = %e, "could not remove the captures of deleted Pods");
            }
            let capture = match EbpfCapture::open(&cgroup) {
                Ok(pinned) => {
                    info!(cgroup = %cgroup.path().display(), "using the eBPF capture already pinned for this cgroup");
                    let config = pinned.config().with_context(|| {
                        format!(
                            "the capture pinned at {} was attached by another tern version; \
                         detach it (`tern capture detach`) and start again",
                            pinned.pins().display()
                        )
                    })?;
                    if config.outbound_port != u32::from(settings.outbound_port) {
                        warn!(
                            pinned = config.outbound_port,
                            ours = settings.outbound_port,
                            "the pinned capture sends connections to another outbound port"
                        );
                    }
                    pinned
                }
                Err(CaptureError::NotAttached { .. }) => {
                    EbpfCapture::attach(&cgroup, &args.capture_args.netns, settings)?
                }
                Err(e) => return Err(e.into()),
            };
            capture.register_inbound(&inbound.0, inbound.1.as_ref())?;
            Capture::Ebpf(capture)
        }
        (CaptureMode::Iptables, _) => {
            IptablesCapture::install(settings)?;
            Capture::Iptables
        }
        _ => Capture::None,
    })
}

/// The xDS client's stream (to run on the control thread) and its status, when a control
/// plane is configured.
fn xds_client(
    args: &RunArgs,
    node: &tern_proto::Node,
    state: &Arc<State>,
    config: &Config,
    metrics: &Metrics,
    mark: u32,
) -> anyhow::Result<Option<XdsClient>> {
    args.xds_address
        .clone()
        .map(|address| -> anyhow::Result<_> {
            let node = node.clone();
            info!(%address, node = %node.id, "connecting to the control plane");
            let types = [
                tern_proto::type_url::CLUSTER,
                tern_proto::type_url::CLUSTER_LOAD_ASSIGNMENT,
                tern_proto::type_url::LISTENER,
                tern_proto::type_url::THRIFT_ROUTE_CONFIGURATION,
            ];
            let engine = if args.xds_delta {
                tern_xds_client::Engine::Delta(tern_xds_client::Delta::new(node, &types))
            } else {
                tern_xds_client::Engine::Sotw(tern_xds_client::Sotw::new(node, &types))
            };
            let (status_tx, status_rx) = watch::channel(tern_xds_client::ClientStatus::default());
            let stream = tern_xds_client::run(
                tern_xds_client::StreamConfig {
                    channel: channel_config(args, address, args.xds_ca.as_deref(), mark)?,
                    initial_backoff: Duration::from_millis(250),
                    max_backoff: Duration::from_secs(15),
                },
                engine,
                crate::xds::handler::XdsHandler::new(
                    state.clone(),
                    config.clone(),
                    metrics.config.clone(),
                ),
                status_tx,
            );
            Ok((Box::pin(stream) as ControlTask, status_rx))
        })
        .transpose()
}

/// The control thread's work besides the admin servers: the xDS stream, exporting its
/// state, and the workload certificate's source.
fn control_tasks(
    state: &Arc<State>,
    metrics: &Metrics,
    xds_stream: Option<ControlTask>,
    xds_status: Option<XdsStatus>,
    certificates: Option<(tls::source::CertSource, &'static str)>,
) -> Vec<ControlTask> {
    let mut control: Vec<ControlTask> = Vec::new();
    if let Some(stream) = xds_stream {
        control.push(stream);
    }
    if let Some(status) = xds_status {
        control.push(Box::pin(export_xds_state(status, metrics.config.clone())));
    }
    if let Some((source, label)) = certificates {
        info!(source = label, "workload certificate source");
        let events = Arc::new(metrics.tls.certificate_events(label));
        control.push(Box::pin(tls::source::run(
            source,
            state.tls.store.clone(),
            events,
        )));
    }
    control
}

/// The admin server's socket, and the stats server's when it binds.
fn admin_servers(
    args: &RunArgs,
    admin_listener: std::net::TcpListener,
) -> Vec<(std::net::TcpListener, admin::Scope)> {
    let mut servers = vec![(admin_listener, admin::Scope::Admin)];
    if let Some(addr) = args.stats_address.0 {
        // Prometheus scrapes it; a port in use costs the metrics, not the Pod.
        match std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => {
                info!(%addr, "stats server listening");
                servers.push((l, admin::Scope::Stats));
            }
            Err(e) => warn!(%addr, error = %e, "no stats server"),
        }
    }
    servers
}

/// How long replies in flight when the drain's time is up get to arrive: a reply cut off
/// would be a call the server executed reported to its client as failed.
const REPLIES_GRACE: Duration = Duration::from_secs(5);

/// Drains: connections are served as usual (every request of a Thrift connection is
/// answered, so no client's next call meets a closed connection) until they all close or
/// `timeout` passes; then Thrift connections take no new requests and close once their
/// replies in flight are written, for up to [`REPLIES_GRACE`].
async fn drain(open: &OpenConnections, closing: &Notice, timeout: Duration) {
    let until_closed = |within| until_none(|| open.count(), within);
    until_closed(timeout).await;
    if open.count() == 0 {
        return;
    }
    info!(
        open = open.count(),
        "drain timeout: no new requests; closing connections once their replies are written"
    );
    closing.post();
    until_closed(REPLIES_GRACE).await;
    if open.count() > 0 {
        warn!(
            open = open.count(),
            "closing the remaining connections with replies still in flight"
        );
    }
}

/// Waits until `open` counts nothing, at most `within`.
async fn until_none(open: impl Fn() -> usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The xDS client's status, as the admin server shows it.
type XdsStatus = watch::Receiver<tern_xds_client::ClientStatus>;

/// The xDS client's stream (to run on the control thread), and its status.
type XdsClient = (ControlTask, XdsStatus);

/// Work for the control thread.
type ControlTask = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the workload certificate comes from: files, Istio's CA (`CA_ADDR`, else an
/// `https` xDS address), or nowhere (then TLS contexts that need it fail their handshakes).
fn cert_source(
    args: &RunArgs,
    mark: u32,
) -> anyhow::Result<Option<(tls::source::CertSource, &'static str)>> {
    use tls::source::CertSource;
    let id = &args.identity;
    if let Some(dir) = &id.cert_dir {
        return Ok(Some((CertSource::Files(dir.clone()), "files")));
    }
    let address = id.ca_address.clone().or_else(|| {
        args.xds_address
            .clone()
            .filter(|a| a.starts_with("https://"))
    });
    let Some(address) = address else {
        return Ok(None);
    };
    if !address.starts_with("https://") {
        anyhow::bail!(
            "the CA address {address} is plaintext: certificates are requested, and the token sent, only over TLS verified against a root"
        );
    }
    let root = id.ca_root.clone().or_else(|| args.xds_ca.clone());
    let channel = channel_config(args, address, root.as_deref(), mark)?;
    let extra_roots = root
        .map(|r| {
            std::fs::read_to_string(&r).with_context(|| format!("read the CA root {}", r.display()))
        })
        .transpose()?;
    let client = Box::new(tls::ca::CaClient {
        channel,
        identity: tls::SpiffeId::new(&id.trust_domain, &id.namespace, &id.service_account),
        cluster_id: id.cluster_id.clone(),
        ttl: id.secret_ttl,
        extra_roots,
    });
    Ok(Some((
        CertSource::IstioCa {
            client,
            renew_ratio: id.secret_grace_period_ratio,
            output: id.output_certs.clone(),
        },
        "istio_ca",
    )))
}

/// Runs control work on a thread and runtime of its own, as ztunnel does: the xDS client
/// (decoding, translating, building snapshots) and the admin server never take a data-plane
/// worker; the data path sees only the atomic swap of a finished snapshot. The thread ends
/// with the process.
fn spawn_control_thread(
    servers: Vec<(std::net::TcpListener, admin::Scope)>,
    admin: Arc<Admin>,
    control: Vec<ControlTask>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the control runtime")?;
    std::thread::Builder::new()
        .name("tern-control".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for (listener, scope) in servers {
                    match TcpListener::from_std(listener) {
                        Ok(l) => {
                            tasks.spawn(admin::serve(l, admin.clone(), scope));
                        }
                        Err(e) => warn!(error = %e, ?scope, "an admin server cannot run"),
                    }
                }
                for task in control {
                    tasks.spawn(task);
                }
                while tasks.join_next().await.is_some() {}
            });
        })
        .context("start the control thread")?;
    Ok(())
}

/// How to reach the control plane at `address` (istiod's xDS, and its CA), verified
/// against `root`. An `https` address needs a root; a plaintext one takes none (it would go
/// unused) and never carries the token.
fn channel_config(
    args: &RunArgs,
    address: String,
    root: Option<&std::path::Path>,
    mark: u32,
) -> anyhow::Result<tern_xds_client::ChannelConfig> {
    let https = address.starts_with("https://");
    let tls = match (https, root) {
        (true, Some(ca)) => Some(tern_xds_client::TlsFiles {
            ca: ca.to_owned(),
            client_cert: args
                .xds_client_cert
                .clone()
                .zip(args.xds_client_key.clone()),
            server_name: args.xds_server_name.clone(),
        }),
        (true, None) => anyhow::bail!("an https address ({address}) needs a root to verify it"),
        (false, Some(ca)) => anyhow::bail!(
            "{address} is plaintext, so the root {} would not be used: use an https:// address",
            ca.display()
        ),
        (false, None) => None,
    };
    let token_file = match (&args.xds_token_file, https) {
        (Some(t), false) => {
            warn!(%address, token = %t.display(), "the token is never sent in cleartext: this plaintext address gets none");
            None
        }
        (token, _) => token.clone(),
    };
    Ok(tern_xds_client::ChannelConfig {
        address,
        tls,
        token_file,
        socket_mark: (mark != 0).then_some(mark),
    })
}

/// Closes upstream connections that stayed idle past their cluster's idle timeout.
async fn close_idle_connections(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = state.load();
        for cluster in snapshot.clusters.values() {
            for endpoint in &cluster.endpoints {
                for pool in endpoint.runtime.seen().map_or(&[][..], |t| t.pools()) {
                    pool.close_idle(&cluster.runtime, cluster.config.idle_timeout);
                }
            }
        }
    }
}

/// Re-reads the configuration file when it changes; a broken one is refused (logged and
/// counted) and the last good configuration keeps serving.
async fn watch_config(path: PathBuf, state: Arc<State>, metrics: ConfigMetrics, loaded: String) {
    // What was loaded at start, by its version (a hash of the text): a change written before
    // this task first looks is still a change.
    let mut last = loaded;
    let count = |result: &'static str| metrics.update("file", result);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(now) = std::fs::read_to_string(&path) else {
            continue;
        };
        let version = file::version_of(&now);
        if version == last {
            continue;
        }
        last = version;
        match file::parse(&now, &path.display().to_string()) {
            Ok(config) => {
                state.apply(config);
                count("applied");
            }
            Err(e) => {
                warn!(error = %e, "configuration refused; the last good one keeps serving");
                count("rejected");
            }
        }
    }
}

/// Mirrors the xDS client's connection state into metrics.
async fn export_xds_state(
    mut status: watch::Receiver<tern_xds_client::ClientStatus>,
    metrics: ConfigMetrics,
) {
    let mut reconnects = 0;
    while status.changed().await.is_ok() {
        let (connected, now) = {
            let s = status.borrow();
            (s.connected, s.reconnects)
        };
        metrics.stream(connected, now.saturating_sub(reconnects));
        reconnects = now;
    }
}

/// Binds the IPv4 listener (required) and the IPv6 one (when the namespace has IPv6).
fn bind_pair(v4: SocketAddr, v6: SocketAddr) -> anyhow::Result<(TcpListener, Option<TcpListener>)> {
    let l4 = socket::listen(v4).with_context(|| format!("listen on {v4}"))?;
    let l6 = match socket::listen(v6) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(addr = %v6, error = %e, "no IPv6 listener");
            None
        }
    };
    Ok((l4, l6))
}
