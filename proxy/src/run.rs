//! `tern run`: bind the listeners, set up capture, relay until SIGTERM or Ctrl-C, clean up.
//!
//! Order matters. With eBPF capture the proxy first joins the captured cgroup (sockets belong
//! to the cgroup of the process that creates them, and the getsockopt hook only answers on
//! sockets in the cgroup), then binds its listeners, then attaches the hooks — so the connect
//! hook never sees the proxy missing and no connection is refused while tern starts.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    capture::{
        CaptureError, OUTBOUND_IP4, OUTBOUND_IP6, ebpf::EbpfCapture, iptables::IptablesCapture,
    },
    cli::{CaptureMode, RunArgs},
    relay::{self, Direction, RelaySettings, RelayStats},
    socket,
};

/// Capture held for the lifetime of `tern run`.
enum Capture {
    None,
    Ebpf(EbpfCapture),
    Iptables(IptablesCapture),
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = args.capture_args.settings();
    let cgroup = match args.capture {
        CaptureMode::Ebpf => {
            let cgroup = args.capture_args.cgroup()?;
            if !cgroup.contains_self() {
                cgroup.join_self()?;
                info!(cgroup = %cgroup.path().display(), "joined the captured cgroup");
            }
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

    let capture = match (args.capture, cgroup) {
        (CaptureMode::Ebpf, Some(cgroup)) => {
            let capture = match EbpfCapture::open(&cgroup) {
                Ok(pinned) => {
                    info!(cgroup = %cgroup.path().display(), "using the eBPF capture already pinned for this cgroup");
                    let config = pinned.config()?;
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
                    EbpfCapture::attach(&cgroup, &args.capture_args.netns, &settings)?
                }
                Err(e) => return Err(e.into()),
            };
            capture.register_inbound(&inbound.0, inbound.1.as_ref())?;
            Capture::Ebpf(capture)
        }
        (CaptureMode::Iptables, _) => Capture::Iptables(IptablesCapture::install(&settings)?),
        _ => Capture::None,
    };

    let relay_settings = RelaySettings {
        mark: settings.mark,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs),
    };
    let stats = Arc::new(RelayStats::default());
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, direction) in [
        (Some(outbound.0), Direction::Outbound),
        (outbound.1, Direction::Outbound),
        (Some(inbound.0), Direction::Inbound),
        (inbound.1, Direction::Inbound),
    ] {
        if let Some(listener) = listener {
            info!(addr = ?listener.local_addr().ok(), dir = direction.as_str(), "listening");
            tasks.spawn(relay::serve(
                listener,
                direction,
                relay_settings.clone(),
                stats.clone(),
            ));
        }
    }
    info!("tern is running");

    let signal = wait_for_shutdown().await;
    info!(signal, "shutting down");
    tasks.shutdown().await;
    stats.log(Direction::Outbound);
    stats.log(Direction::Inbound);
    match capture {
        Capture::None => {}
        Capture::Ebpf(c) => c.release(),
        Capture::Iptables(mut c) => c.remove(),
    }
    Ok(())
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

async fn wait_for_shutdown() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
