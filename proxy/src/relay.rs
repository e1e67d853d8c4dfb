//! The outbound and inbound listeners, relaying each captured connection to where it was going.
//!
//! Every accepted connection learns its original destination ([`crate::socket::original_dst`])
//! and is spliced to a marked upstream socket with `copy_bidirectional`, which forwards each
//! direction's end of stream (half-close) on its own. Inbound connections reach the local
//! application from 127.0.0.6. This is the byte relay the Thrift data plane builds on.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use crate::socket::{self, OriginalDstSource};

/// Which side of the Pod a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What the relay needs to open upstream connections.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// `SO_MARK` on upstream sockets, so capture skips them.
    pub mark: u32,
    pub connect_timeout: Duration,
}

/// Connection counters of the relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub accepted: [AtomicU64; 2],
    pub relayed: [AtomicU64; 2],
    pub rejected: [AtomicU64; 2],
    pub upstream_failed: [AtomicU64; 2],
}

impl RelayStats {
    fn bump(counter: &[AtomicU64; 2], dir: Direction) {
        counter[dir as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Logs the counters of one direction (at shutdown, until the admin server exports them).
    pub fn log(&self, dir: Direction) {
        let get = |c: &[AtomicU64; 2]| c[dir as usize].load(Ordering::Relaxed);
        tracing::info!(
            dir = dir.as_str(),
            accepted = get(&self.accepted),
            relayed = get(&self.relayed),
            rejected = get(&self.rejected),
            upstream_failed = get(&self.upstream_failed),
            "connections"
        );
    }
}

/// Accepts connections on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    direction: Direction,
    settings: RelaySettings,
    stats: Arc<RelayStats>,
) {
    let local = listener.local_addr().ok();
    let listen_port = local.map_or(0, |a| a.port());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        RelayStats::bump(&stats.accepted, direction);
        let span = info_span!("conn", dir = direction.as_str(), %peer);
        let (settings, stats) = (settings.clone(), stats.clone());
        tokio::spawn(
            async move {
                match relay(stream, direction, listen_port, &settings).await {
                    Ok(()) => RelayStats::bump(&stats.relayed, direction),
                    Err(RelayError::NotCaptured(dst)) => {
                        RelayStats::bump(&stats.rejected, direction);
                        debug!(%dst, "closing a connection that was not captured");
                    }
                    Err(RelayError::Upstream(dst, e)) => {
                        RelayStats::bump(&stats.upstream_failed, direction);
                        debug!(%dst, error = %e, "upstream connect failed");
                    }
                    Err(RelayError::Io(e)) => debug!(error = %e, "relay ended with an error"),
                }
            }
            .instrument(span),
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("connection to {0} was not captured")]
    NotCaptured(SocketAddr),
    #[error("connect to {0}: {1}")]
    Upstream(SocketAddr, std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

async fn relay(
    mut downstream: TcpStream,
    direction: Direction,
    listen_port: u16,
    settings: &RelaySettings,
) -> Result<(), RelayError> {
    let (dst, learned) = socket::original_dst(&downstream)?;
    // A connection made straight to a listener has no original destination; relaying it
    // would connect the proxy to itself. (sk_lookup-steered inbound connections keep their
    // original local address, so only a local address on the listener's port is refused.)
    let direct = direction == Direction::Outbound || dst.port() == listen_port;
    if learned == OriginalDstSource::LocalAddr && direct {
        return Err(RelayError::NotCaptured(dst));
    }
    let (target, source) = match direction {
        Direction::Outbound => (dst, None),
        Direction::Inbound => socket::inbound_target(dst),
    };
    debug!(original_dst = %dst, %target, ?learned, "relaying");
    let mut upstream = tokio::time::timeout(
        settings.connect_timeout,
        socket::connect_upstream(target, settings.mark, source),
    )
    .await
    .map_err(|_| RelayError::Upstream(target, std::io::ErrorKind::TimedOut.into()))?
    .map_err(|e| RelayError::Upstream(target, e))?;
    downstream.set_nodelay(true)?;
    let (up, down) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
    debug!(bytes_up = up, bytes_down = down, "relay closed");
    Ok(())
}
