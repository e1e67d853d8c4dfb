//! One request per connection at a time (the default): a request takes an idle connection
//! to its endpoint, or opens one while the cluster's `max_connections` allow, or waits for
//! one (counted against `max_pending_requests`). It writes itself and reads its reply on
//! that connection from its own task — no hop to a connection task and back — and gives the
//! connection back when the reply is whole and checked. A request that is dropped before
//! (timed out, or its client went away) drops the connection with it: a late reply can only
//! ever reach a closed socket, never another request. Requests go under sequence ids the
//! connection numbers, so a reply the server wrote twice, or for an earlier request, matches
//! none of the requests after it (clients that number every call 0 would otherwise match).
//! Replies are read into the connection's [`ReplyBuffer`], within the buffer budget; a reply
//! larger than its usual size takes its charge along to the client.
use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Instant,
};

use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::{
    Closed, ClusterRuntime, EndpointRuntime, Failed, Pool, PoolSettings, UpstreamError, answers,
    release_connection, reply_buffer::ReplyBuffer, reserve_connection, restore_client_seq,
    wake_pending,
};
use crate::{
    budget::{BufferBudget, Held},
    stream::Stream,
    thrift::{
        Decoder, DecoderLimits, Message, MessageType, Protocol, Transport, frame::seq_id_in_class,
    },
};

/// Initial read buffer of a connection; it grows with what arrives, never with what a frame
/// header claims.
const READ_BUFFER: usize = 16 * 1024;
/// Room a read needs in the read buffer; below it the buffer makes more.
const MIN_SPARE: usize = 1024;

/// An open connection with its reply decoder, boxed: a request takes it from the idle list
/// and gives it back, and a box moves as a pointer, not 200 bytes.
type Conn = Box<Open>;

#[derive(Debug)]
struct Open {
    stream: Stream,
    replies: ReplyBuffer,
    decoder: Decoder,
    format: (Transport, Protocol),
    /// Counts the requests written, for the sequence id each is sent with.
    sent: u32,
}

/// Idle connections of one endpoint, most recently used last.
#[derive(Debug, Default)]
pub(super) struct Idle(Mutex<Vec<(Conn, Instant)>>);

impl Idle {
    /// An idle connection of this format that is still usable (the server has neither
    /// closed it nor sent anything on it while it was idle).
    fn take(
        &self,
        pool: &Pool,
        cluster: &ClusterRuntime,
        format: (Transport, Protocol),
    ) -> Option<Conn> {
        let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(i) = idle.iter().rposition(|(c, _)| c.format == format) {
            let (mut conn, _) = idle.swap_remove(i);
            if conn.stream.idle_usable() {
                return Some(conn);
            }
            debug!("an idle upstream connection was closed or sent data: dropped");
            closed(pool, cluster);
        }
        None
    }

    fn put(&self, conn: Conn) {
        let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        idle.push((conn, Instant::now()));
    }

    fn has(&self, format: (Transport, Protocol)) -> bool {
        let idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter().any(|(c, _)| c.format == format)
    }

    /// Closes the connections idle since before `since` (all of them for `None`).
    pub(super) fn close_idle(&self, pool: &Pool, cluster: &ClusterRuntime, since: Option<Instant>) {
        let gone: Vec<(Conn, Instant)> = {
            let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let (keep, gone) = idle
                .drain(..)
                .partition(|(_, at)| since.is_some_and(|s| *at >= s));
            *idle = keep;
            gone
        };
        for _ in gone {
            closed(pool, cluster);
        }
    }
}

/// Bookkeeping for a connection that closed.
fn closed(pool: &Pool, cluster: &ClusterRuntime) {
    pool.open.fetch_sub(1, Ordering::Relaxed);
    cluster.metrics().connections_gauge.dec();
    release_connection(cluster);
}

/// A connection taken by one request. Dropped without [`Lease::release`], it is closed.
struct Lease<'a> {
    conn: Option<Conn>,
    pool: &'a Pool,
    cluster: &'a ClusterRuntime,
}

impl Lease<'_> {
    /// Puts the connection back for the next request (or closes it if its endpoint left).
    fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            if self.pool.retired() {
                drop(conn);
                closed(self.pool, self.cluster);
            } else {
                self.pool.exclusive.put(conn);
                wake_pending(self.cluster);
            }
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            closed(self.pool, self.cluster);
        }
    }
}

/// Counts a request waiting for a connection while it lives.
struct Pending<'a>(&'a ClusterRuntime);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending_requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sends `request` to `endpoint` on a connection of its own and reads the reply (none for a
/// one-way call). Wrap it in the request's timeout: dropping it closes the connection.
///
/// A reply that outgrows the connection's read buffer grows it within `budget`; the grown
/// buffer leaves the connection with the reply, and its charge in `charge`, which the caller
/// keeps until the reply is written. When the budget has no room (for that growth, or for a
/// buffer earlier replies still hold), the request fails (it may have run on the server) and
/// the connection closes.
pub async fn call(
    endpoint: &EndpointRuntime,
    request: &mut Message,
    settings: &PoolSettings,
    cluster: &ClusterRuntime,
    (budget, charge): (&Arc<BufferBudget>, &mut Option<Held>),
) -> Result<Option<Message>, Failed> {
    let meta = request.meta();
    let addr = endpoint.address;
    let format = (meta.transport, meta.protocol);
    let mut lease = acquire(endpoint, format, (settings, budget), cluster).await?;
    let conn = lease
        .conn
        .as_mut()
        .expect("a lease holds its connection until released");
    // Room to read the reply into before the request goes: without it, nothing is sent, and
    // the connection, unused, goes back.
    if let Err(e) = conn.replies.make_room(MIN_SPARE) {
        lease.release();
        return Err(Failed::NotSent(UpstreamError::Budget(e)));
    }
    // A call goes with an id of the connection's, a different one each time, and the
    // client's goes back on the reply: a reply the server wrote for an earlier request on
    // this connection (twice, or late) cannot pass for this one's, even from clients that
    // number every call 0. Only a request that is written is rewritten, and a written
    // request is never sent again.
    let oneway = request.kind() == MessageType::Oneway;
    let client_seq = request.seq_id();
    if !oneway {
        let id = seq_id_in_class(request.seq_class(), conn.sent);
        conn.sent = conn.sent.wrapping_add(1);
        if request.set_seq_id(id).is_err() {
            lease.release();
            return Err(Failed::NotSent(UpstreamError::Overflow(
                "sequence id length",
            )));
        }
    }
    if let Err(e) = conn.stream.write_all(request.as_bytes()).await {
        return Err(Failed::Lost(UpstreamError::Closed(Closed::Write(
            addr,
            e.kind(),
        ))));
    }
    if oneway {
        lease.release();
        return Ok(None);
    }
    let mut reply = loop {
        match conn.decoder.decode(&mut conn.replies.buf) {
            Ok(Some(reply)) => break reply,
            Ok(None) => {}
            Err(e) => {
                return Err(Failed::Lost(UpstreamError::Closed(Closed::InvalidReply(
                    addr, e,
                ))));
            }
        }
        if let Err(e) = conn.replies.fill(&mut conn.stream, MIN_SPARE, addr).await {
            return Err(Failed::Lost(e));
        }
    };
    if let Err(why) =
        answers(request, &reply).and_then(|()| restore_client_seq(&mut reply, client_seq))
    {
        debug!(%addr, %why, "closing an upstream connection whose reply is not its request's");
        return Err(Failed::Lost(UpstreamError::Mismatch(why)));
    }
    if conn.replies.buf.is_empty() {
        // A buffer grown for a large reply stays with that reply, which holds its charge;
        // the connection reads the next one into a buffer of the usual size.
        if let Some(grown) = conn.replies.hand_over_if_grown() {
            *charge = Some(grown);
        }
        lease.release();
    } else {
        debug!(%addr, bytes = conn.replies.buf.len(), "upstream sent bytes nobody asked for: closing");
    }
    Ok(Some(reply))
}

/// An idle connection, a new one, or — at the cluster's `max_connections` — the next one
/// given back, waiting as a pending request (at most `max_pending_requests` of them).
async fn acquire<'a>(
    endpoint: &'a EndpointRuntime,
    format: (Transport, Protocol),
    opening: (&PoolSettings, &Arc<BufferBudget>),
    cluster: &'a ClusterRuntime,
) -> Result<Lease<'a>, Failed> {
    let settings = opening.0;
    let pool = endpoint.traffic().pool();
    let lease = |conn| Lease {
        conn: Some(conn),
        pool,
        cluster,
    };
    if let Some(conn) = pool.exclusive.take(pool, cluster, format) {
        return Ok(lease(conn));
    }
    let mut pending = None;
    loop {
        if reserve_connection(cluster, settings.max_connections) {
            drop(pending);
            return connect(endpoint, format, opening, cluster).await.map(lease);
        }
        if pending.is_none() {
            if cluster.pending_requests.fetch_add(1, Ordering::SeqCst) >= settings.max_pending {
                cluster.pending_requests.fetch_sub(1, Ordering::SeqCst);
                return Err(Failed::NotSent(UpstreamError::Overflow(
                    "max_pending_requests",
                )));
            }
            pending = Some(Pending(cluster));
        }
        // Registered before looking again, so a connection given back in between wakes us.
        let released = cluster.released.notified();
        let mut released = std::pin::pin!(released);
        released.as_mut().enable();
        if let Some(conn) = pool.exclusive.take(pool, cluster, format) {
            return Ok(lease(conn));
        }
        if reserve_connection(cluster, settings.max_connections) {
            drop(pending);
            return connect(endpoint, format, opening, cluster).await.map(lease);
        }
        released.await;
    }
}

/// Opens a connection; its place in `max_connections` is already taken.
async fn connect(
    endpoint: &EndpointRuntime,
    format: (Transport, Protocol),
    (settings, budget): (&PoolSettings, &Arc<BufferBudget>),
    cluster: &ClusterRuntime,
) -> Result<Conn, Failed> {
    let (pool, addr) = (endpoint.traffic().pool(), endpoint.address);
    let connected =
        super::dial::dial(endpoint, cluster, settings.mark, settings.connect_timeout).await;
    match connected {
        Ok(stream) => {
            pool.open.fetch_add(1, Ordering::Relaxed);
            cluster.metrics().connections_gauge.inc();
            cluster.metrics().connections_opened.inc();
            Ok(new_conn(stream, format, settings.limits, budget))
        }
        Err(e) => {
            debug!(%addr, error = %e, "upstream connect failed");
            release_connection(cluster);
            Err(Failed::NotSent(UpstreamError::ConnectFailed(addr, e)))
        }
    }
}

fn new_conn(
    stream: Stream,
    format: (Transport, Protocol),
    limits: DecoderLimits,
    budget: &Arc<BufferBudget>,
) -> Conn {
    Box::new(Open {
        stream,
        replies: ReplyBuffer::new(READ_BUFFER, budget),
        decoder: Decoder::configured(limits, format.0, format.1, false),
        format,
        sent: 0,
    })
}

impl Pool {
    /// Keeps a connection opened for another reason (Thrift detection opens one before it
    /// knows) as an idle connection of this format, when the pool has none idle and the
    /// cluster has room; otherwise it is closed.
    pub fn adopt(
        &self,
        stream: Stream,
        format: (Transport, Protocol),
        (settings, budget): (&PoolSettings, &Arc<BufferBudget>),
        cluster: &ClusterRuntime,
    ) {
        if self.retired() || self.exclusive.has(format) {
            return;
        }
        if !reserve_connection(cluster, settings.max_connections) {
            return;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        cluster.metrics().connections_gauge.inc();
        cluster.metrics().connections_opened.inc();
        self.exclusive
            .put(new_conn(stream, format, settings.limits, budget));
        wake_pending(cluster);
    }
}
