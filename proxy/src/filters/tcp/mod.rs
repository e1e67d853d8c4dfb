//! The TCP proxy: relays a connection's bytes to a cluster endpoint (over TLS when the
//! endpoint takes it) or to its original destination, each direction's end of stream
//! forwarded on its own (half-close): between plain sockets by [`splice`] (copied while
//! messages are small, spliced once they are bulk), otherwise with `copy_bidirectional`.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

mod splice;

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use super::{
    Ctx, Direction,
    authz::{Authz, Denied},
};
use crate::{
    balance::source_hash,
    socket,
    state::ClusterState,
    stream::Stream,
    telemetry::TcpSeries,
    upstream::Failure,
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
        let i = cluster
            .picker
            .pick(&cluster.endpoints, hash, &tried, Instant::now())?;
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
        let idle = Some(crate::config::DEFAULT_IDLE_TIMEOUT);
        relay(down, Default::default(), up, series, authz, idle).await?;
    }
    Ok(())
}

/// Relays bytes both ways until both sides are done, starting with what each side sent
/// before the relay began (`early`: from the client, from the server); closes both sides as
/// soon as the policy in force (`authz`, for a filter chain's connection) no longer allows
/// the connection, and says why, or when no byte moved either way for `idle`.
pub async fn relay(
    mut down: Stream,
    early: (BytesMut, BytesMut),
    mut up: Stream,
    series: TcpSeries,
    authz: Option<Authz>,
    idle: Option<Duration>,
) -> Result<(), Denied> {
    let (from_client, from_server) = early;
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
    let activity = Activity::new();
    // The policy first: once it no longer allows the connection, no more bytes go through.
    let copied = tokio::select! {
        biased;
        denied = revoked => {
            debug!(policy = %denied.policy, reason = denied.reason.as_str(), "the policy in force no longer allows the connection: closing");
            return Err(denied);
        }
        copied = both_ways(&mut down, &mut up, &activity) => copied,
        () = idle_for(idle, &activity) => {
            debug!(?idle, "no bytes either way for the idle timeout: closing");
            return Ok(());
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

/// Copies both ways until both sides are done: between plain sockets with [`splice`], through
/// buffers otherwise.
async fn both_ways(
    down: &mut Stream,
    up: &mut Stream,
    activity: &Activity,
) -> std::io::Result<(u64, u64)> {
    if let (Stream::Plain(d), Stream::Plain(u)) = (&mut *down, &mut *up) {
        return splice::relay(d, u, &|| activity.moved()).await;
    }
    let (mut d, mut u) = (Active::new(down, activity), Active::new(up, activity));
    tokio::io::copy_bidirectional(&mut d, &mut u).await
}

/// When a relay last moved bytes, in milliseconds after it started (for its idle timeout).
struct Activity {
    started: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

/// Resolves once no byte moved for `idle` (never, without one). One timer per idle period,
/// not one per read.
async fn idle_for(idle: Option<Duration>, activity: &Activity) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let moved = activity.started + Duration::from_millis(activity.last.load(Ordering::Relaxed));
        let until = moved + idle;
        if Instant::now() >= until {
            return;
        }
        tokio::time::sleep_until(until.into()).await;
    }
}

/// A stream that tells its relay's [`Activity`] when it moves bytes.
struct Active<'a, S> {
    inner: &'a mut S,
    activity: &'a Activity,
}

impl<'a, S> Active<'a, S> {
    fn new(inner: &'a mut S, activity: &'a Activity) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.moved();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.moved();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_relay_is_idle_only_when_no_byte_moves_either_way() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let activity = Activity::new();
        let started = activity.started;
        let idle = Some(Duration::from_millis(300));
        let mut watched = Active::new(&mut a, &activity);
        // Bytes every 100 ms keep it alive past the idle timeout.
        let busy = async {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                watched.write_all(b"x").await.unwrap();
                let mut one = [0u8; 1];
                b.read_exact(&mut one).await.unwrap();
            }
        };
        tokio::select! {
            () = busy => {}
            () = idle_for(idle, &activity) => panic!("idle while bytes moved"),
        }
        assert!(started.elapsed() >= Duration::from_millis(600));
        let quiet = Instant::now();
        idle_for(idle, &activity).await;
        assert!(quiet.elapsed() >= Duration::from_millis(250));
        // No idle timeout: never.
        let never = tokio::time::timeout(Duration::from_millis(50), idle_for(None, &activity));
        assert!(never.await.is_err());
    }
}
