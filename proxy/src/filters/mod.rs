//! What happens to an accepted connection: its original destination selects a filter chain
//! (Envoy's rules, see [`crate::state::Snapshot::select`]), whose filter handles it.
//!
//! - [`thrift`]: per-request routing and balancing for Thrift;
//! - [`tcp`]: a byte relay to a cluster, or to the original destination (passthrough).
//!
//! A TCP proxy chain configured to sniff upgrades a connection whose first bytes are Thrift
//! to the Thrift proxy, with the TCP proxy's cluster as default route: Istio sends Thrift
//! services as plain `tcp_proxy`, and this is how tern balances them per request anyway.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{io::AsyncReadExt, net::TcpStream, sync::watch};
use tracing::debug;

use crate::{
    config::Filter,
    state::{Selection, State},
    thrift::{DecoderLimits, frame::detect},
};

mod ordered;
pub mod tcp;
pub mod thrift;

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

/// What every connection handler needs.
pub struct Ctx {
    pub state: Arc<State>,
    /// `SO_MARK` on upstream sockets, so capture skips them.
    pub mark: u32,
    pub limits: DecoderLimits,
    /// Flips to true when tern starts draining.
    pub drain: watch::Receiver<bool>,
    /// Connect timeout for passthrough connections (clusters have their own).
    pub connect_timeout: Duration,
    /// Log one line per connection when it closes (target `tern::access`).
    pub access_log: bool,
}

/// How long a sniffing chain waits for a client's first bytes before relaying as plain TCP
/// (server-first protocols send nothing until the server speaks).
const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

/// What handled a connection, for the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// The Thrift proxy, per request.
    Thrift,
    /// A TCP proxy chain's byte relay.
    Tcp,
    /// No listener: relayed to the original destination.
    Passthrough,
    /// No listener, and passthrough is denied: closed.
    Denied,
}

impl Handled {
    pub fn as_str(self) -> &'static str {
        match self {
            Handled::Thrift => "thrift",
            Handled::Tcp => "tcp",
            Handled::Passthrough => "passthrough",
            Handled::Denied => "denied",
        }
    }
}

/// Handles one accepted connection whose original destination is `dst`.
pub async fn handle(
    mut down: TcpStream,
    direction: Direction,
    dst: SocketAddr,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
) -> Handled {
    let snap = ctx.state.load();
    let selection = match direction {
        Direction::Outbound => snap.select(dst, peer),
        Direction::Inbound => snap
            .select_inbound(dst, peer)
            .map_or(Selection::Passthrough, |(l, c)| Selection::Chain(l, c)),
    };
    let (chain, filter) = match selection {
        Selection::Chain(l, c) => (
            thrift::ChainRef {
                listener: l.name.clone(),
                chain: c.name.clone(),
            },
            c.filter.clone(),
        ),
        Selection::Passthrough => {
            drop(snap);
            debug!(%dst, "no listener: passthrough");
            tcp::passthrough(down, BytesMut::new(), dst, direction, &ctx).await;
            return Handled::Passthrough;
        }
        Selection::Deny => {
            debug!(%dst, "no listener and passthrough is denied: closing");
            return Handled::Denied;
        }
    };
    drop(snap);
    debug!(%dst, listener = %chain.listener, chain = %chain.chain, "filter chain");
    match filter {
        Filter::Thrift(_) => {
            thrift::serve(down, BytesMut::new(), chain, ctx).await;
            Handled::Thrift
        }
        Filter::TcpProxy {
            target,
            sniff_thrift,
        } => {
            let mut first = BytesMut::with_capacity(8 * 1024);
            if sniff_thrift && sniff(&mut down, &mut first).await {
                debug!("first bytes are Thrift: balancing per request");
                thrift::serve(down, first, chain, ctx).await;
                Handled::Thrift
            } else {
                tcp::proxy(down, first, &target, dst, direction, &ctx).await;
                Handled::Tcp
            }
        }
    }
}

/// Reads a connection's first bytes into `buf` until they show whether it speaks Thrift.
async fn sniff(down: &mut TcpStream, buf: &mut BytesMut) -> bool {
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        match detect(buf) {
            Ok(Some(_)) => return true,
            Err(_) => return false,
            Ok(None) => {}
        }
        match tokio::time::timeout_at(deadline, down.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
}
