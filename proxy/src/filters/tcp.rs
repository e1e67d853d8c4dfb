//! The TCP proxy: relays a connection's bytes to a cluster endpoint (over TLS when the
//! endpoint takes it) or to its original destination, with `copy_bidirectional` (each
//! direction's end of stream forwarded on its own: half-close).
use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::debug;

use super::{
    Ctx, Direction,
    authz::{Authz, Denied},
};
use crate::{
    balance::source_hash,
    socket,
    state::{ClusterState, Failure},
    stream::Stream,
    telemetry::TcpSeries,
    upstream::dial::{dial, secure},
};

/// An upstream connection and, for a cluster endpoint, the endpoint it goes to.
pub struct Connected {
    pub stream: Stream,
    /// The endpoint's index in the cluster (none for the original destination).
    pub endpoint: Option<usize>,
}

/// Connects to an endpoint of `cluster`, or to the original destination for an
/// original-destination cluster; `None` when nothing could be reached. Ring hash and Maglev
/// clusters hash the connection's source IP (Istio's `useSourceIp`).
pub async fn connect(
    cluster: &Arc<ClusterState>,
    dst: SocketAddr,
    source: SocketAddr,
    direction: Direction,
    ctx: &Ctx,
) -> Option<Connected> {
    if cluster.config.original_dst {
        let (tcp, target) = connect_original(dst, direction, ctx).await?;
        // A DestinationRule's TLS applies to the original destination too.
        let tls = cluster.config.transport.for_endpoint(&[]);
        let stream = match secure(tcp, target, tls, &cluster.runtime).await {
            Ok(s) => s,
            Err(e) => {
                debug!(%target, error = %e, "TLS to the original destination failed");
                return None;
            }
        };
        return Some(Connected {
            stream,
            endpoint: None,
        });
    }
    let hash = cluster
        .config
        .lb_policy
        .hashes()
        .then(|| source_hash(source.ip()));
    let mut tried = Vec::new();
    for _ in 0..3 {
        let i = cluster.picker.pick(&cluster.endpoints, hash, &tried)?;
        tried.push(i);
        let ep = &cluster.endpoints[i];
        let connect = dial(
            &ep.runtime,
            &cluster.runtime,
            ctx.mark,
            cluster.config.connect_timeout,
        );
        match connect.await {
            Ok(stream) => {
                cluster.record_success(&ep.runtime);
                return Some(Connected {
                    stream,
                    endpoint: Some(i),
                });
            }
            _ => cluster.record_failure(&ep.runtime, Failure::Gateway),
        }
    }
    debug!(cluster = %cluster.config.name, "no endpoint reachable");
    None
}

/// Connects to the original destination; inbound connections reach the local application
/// from 127.0.0.6.
/// The socket to the original destination, and the address it reached.
async fn connect_original(
    dst: SocketAddr,
    direction: Direction,
    ctx: &Ctx,
) -> Option<(TcpStream, SocketAddr)> {
    let (target, source) = match direction {
        Direction::Outbound => (dst, None),
        Direction::Inbound => socket::inbound_target(dst),
    };
    debug!(original_dst = %dst, %target, "relaying");
    let connect = socket::connect_upstream(target, ctx.mark, source);
    match tokio::time::timeout(ctx.connect_timeout, connect).await {
        Ok(Ok(up)) => Some((up, target)),
        Ok(Err(e)) => {
            debug!(%target, error = %e, "upstream connect failed");
            None
        }
        Err(_) => {
            debug!(%target, "upstream connect timed out");
            None
        }
    }
}

/// Relays to the original destination (no listener matched, or a chain set aside);
/// `peer_identity` is the client's, when tern terminated mTLS; `authz`, the chain's.
pub async fn passthrough(
    down: Stream,
    dst: SocketAddr,
    direction: Direction,
    peer_identity: Option<&str>,
    authz: Option<Authz>,
    ctx: &Ctx,
) -> Result<(), Denied> {
    if let Some((up, _)) = connect_original(dst, direction, ctx).await {
        let up = Stream::Plain(up);
        let series = super::istio::tcp(ctx, direction, None, None, Some(&up), peer_identity);
        relay(down, BytesMut::new(), BytesMut::new(), up, series, authz).await?;
    }
    Ok(())
}

/// Relays bytes both ways until both sides are done, starting with what each side sent
/// before the relay began; closes both sides as soon as the policy in force (`authz`, for
/// a filter chain's connection) no longer allows the connection, and says why.
pub async fn relay(
    mut down: Stream,
    from_client: BytesMut,
    from_server: BytesMut,
    mut up: Stream,
    series: TcpSeries,
    authz: Option<Authz>,
) -> Result<(), Denied> {
    series.opened.inc();
    let _closed = Closed(&series);
    let _ = down.set_nodelay(true);
    if !from_server.is_empty() && down.write_all(&from_server).await.is_err() {
        return Ok(());
    }
    if !from_client.is_empty() && up.write_all(&from_client).await.is_err() {
        return Ok(());
    }
    series.received_bytes.inc_by(from_client.len() as u64);
    series.sent_bytes.inc_by(from_server.len() as u64);
    let mut authz = authz;
    let revoked = async {
        match authz.as_mut() {
            Some(a) => a.revoked().await,
            None => std::future::pending().await,
        }
    };
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut down, &mut up) => copied,
        denied = revoked => {
            debug!(policy = %denied.policy, reason = denied.reason.as_str(), "the policy in force no longer allows the connection: closing");
            return Err(denied);
        }
    };
    match copied {
        Ok((to_up, to_down)) => {
            series.received_bytes.inc_by(to_up);
            series.sent_bytes.inc_by(to_down);
            debug!(
                bytes_up = to_up + from_client.len() as u64,
                bytes_down = to_down + from_server.len() as u64,
                "relay closed"
            );
        }
        Err(e) => debug!(error = %e, "relay ended with an error"),
    }
    Ok(())
}

/// Counts the connection closed however the relay ends.
struct Closed<'a>(&'a TcpSeries);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.closed.inc();
    }
}
