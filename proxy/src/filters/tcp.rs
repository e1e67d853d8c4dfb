//! The TCP proxy: relays a connection's bytes to a cluster endpoint or to its original
//! destination, with `copy_bidirectional` (each direction's end of stream forwarded on its
//! own: half-close).
use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::debug;

use super::{Ctx, Direction};
use crate::{config::Target, socket, state::ClusterState};

/// Relays to an endpoint of the target's cluster (or the original destination for an
/// original-destination cluster); `first` holds bytes already read from the client.
pub async fn proxy(
    down: TcpStream,
    first: BytesMut,
    target: &Target,
    dst: SocketAddr,
    direction: Direction,
    ctx: &Ctx,
) {
    let name = target.pick();
    let Some(cluster) = ctx.state.load().clusters.get(name).cloned() else {
        debug!(cluster = %name, "unknown cluster: closing");
        return;
    };
    if cluster.config.original_dst {
        return passthrough(down, first, dst, direction, ctx).await;
    }
    let Some(upstream) = connect_endpoint(&cluster, ctx.mark).await else {
        debug!(cluster = %name, "no endpoint reachable: closing");
        return;
    };
    splice(down, first, upstream).await;
}

/// Connects to an endpoint, trying others when a connect fails.
async fn connect_endpoint(cluster: &Arc<ClusterState>, mark: u32) -> Option<TcpStream> {
    let mut tried = Vec::new();
    for _ in 0..3 {
        let i = cluster.picker.pick(&cluster.endpoints, None, &tried)?;
        tried.push(i);
        let ep = &cluster.endpoints[i];
        let connect = socket::connect_upstream(ep.config.address, mark, None);
        match tokio::time::timeout(cluster.config.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                ep.runtime.record_success();
                return Some(s);
            }
            _ => ep.runtime.record_error(&cluster.config.outlier),
        }
    }
    None
}

/// Relays to the original destination; inbound connections reach the local application
/// from 127.0.0.6.
pub async fn passthrough(
    down: TcpStream,
    first: BytesMut,
    dst: SocketAddr,
    direction: Direction,
    ctx: &Ctx,
) {
    let (target, source) = match direction {
        Direction::Outbound => (dst, None),
        Direction::Inbound => socket::inbound_target(dst),
    };
    debug!(original_dst = %dst, %target, "relaying");
    let connect = socket::connect_upstream(target, ctx.mark, source);
    match tokio::time::timeout(ctx.connect_timeout, connect).await {
        Ok(Ok(up)) => splice(down, first, up).await,
        Ok(Err(e)) => debug!(%target, error = %e, "upstream connect failed"),
        Err(_) => debug!(%target, "upstream connect timed out"),
    }
}

async fn splice(mut down: TcpStream, first: BytesMut, mut up: TcpStream) {
    let _ = down.set_nodelay(true);
    if !first.is_empty() && up.write_all(&first).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((to_up, to_down)) => debug!(
            bytes_up = to_up + first.len() as u64,
            bytes_down = to_down,
            "relay closed"
        ),
        Err(e) => debug!(error = %e, "relay ended with an error"),
    }
}
