//! Upstream connections to one endpoint, with requests from many downstream connections
//! multiplexed over them.
//!
//! Each request gets a sequence id that is free on the connection it is sent on and is
//! rewritten in place; the reply's id is mapped back to the client's and rewritten again, so
//! replies may come back in any order. In compact protocol ids are varints: a request's
//! upstream id is chosen with the same encoded length as the client's, so both rewrites fit
//! the bytes exactly. One-way calls are written and done. A connection that fails to connect
//! hands every queued request back (for a retry on another endpoint); one that closes fails
//! its requests in flight (the client gets a local reply).
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufWriter},
    sync::mpsc,
};
use tracing::debug;

use crate::{
    socket,
    state::ClusterRuntime,
    thrift::{Decoder, DecoderLimits, Message, MessageType, Protocol, Transport},
};

/// Why a request got no reply from upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {0} failed: {1}")]
    ConnectFailed(SocketAddr, io::Error),
    #[error("upstream connection closed: {0}")]
    Closed(String),
    #[error("circuit breaker overflow: {0}")]
    Overflow(&'static str),
}

/// A request handed back unsent, with the reason.
pub type Refused = (UpstreamError, Message);

/// What to wait for after sending.
pub enum Sent {
    /// The reply comes to the [`ReplyCell`] given to [`Pool::send`]; these are the request's
    /// bytes as sent (a shared handle, not a copy) for naming a local reply or retrying
    /// elsewhere if the connection never opens.
    Reply(Bytes),
    /// A one-way call: nothing comes back.
    Oneway,
}

/// What comes back for a request: its reply, or why there is none.
pub type Reply = Result<Message, Failed>;

/// Where the reply to a request is delivered. A cell is reused by one request after another
/// (it is allocated once per in-flight slot of a downstream connection, not per request);
/// each request is a new generation, so a reply that arrives after its request gave up
/// (timed out) is dropped instead of reaching the next one.
#[derive(Debug, Default)]
pub struct ReplyCell {
    value: Mutex<(u64, Option<Reply>)>,
    waker: AtomicWaker,
}

impl ReplyCell {
    /// Starts a new request: earlier replies no longer land here. Returns its generation.
    pub fn begin(&self) -> u64 {
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        v.0 += 1;
        v.1 = None;
        v.0
    }

    /// Delivers the reply of `generation`, unless that request is gone.
    fn complete(&self, generation: u64, reply: Reply) {
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        if v.0 == generation && v.1.is_none() {
            v.1 = Some(reply);
            drop(v);
            self.waker.wake();
        }
    }

    /// Whether the request of `generation` still waits.
    fn waiting(&self, generation: u64) -> bool {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).0 == generation
    }

    /// Waits for the reply of `generation`.
    pub async fn reply(&self, generation: u64) -> Reply {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
            match v.1.take() {
                Some(r) if v.0 == generation => std::task::Poll::Ready(r),
                _ => std::task::Poll::Pending,
            }
        })
        .await
    }
}

/// Why a sent request got no reply.
#[derive(Debug)]
pub enum Failed {
    /// The connection never opened; the request can be retried elsewhere.
    NotSent(UpstreamError),
    /// The request may have reached the server; no retry.
    Lost(UpstreamError),
}

/// Settings a pool needs from its cluster.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub mark: u32,
    pub connect_timeout: Duration,
    pub per_endpoint: usize,
    pub max_connections: usize,
    pub max_pending: usize,
    pub limits: DecoderLimits,
}

const CONNECTING: u8 = 0;
const OPEN: u8 = 1;
const CLOSED: u8 = 2;

/// The connections to one endpoint.
#[derive(Debug, Default)]
pub struct Pool {
    conns: Mutex<Vec<Arc<Conn>>>,
}

#[derive(Debug)]
struct Conn {
    format: (Transport, Protocol),
    tx: mpsc::UnboundedSender<Bytes>,
    state: AtomicU8,
    inflight: AtomicUsize,
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    waiting: HashMap<i32, Waiter>,
    /// Next candidate id per varint length class (0: binary).
    next: [u32; 6],
    /// Requests queued while connecting (counted against max pending requests).
    queued: usize,
    closed: bool,
    registered: u32,
}

#[derive(Debug)]
struct Waiter {
    client_seq: i32,
    cell: Arc<ReplyCell>,
    generation: u64,
}

impl Pending {
    /// A free id in the class: any non-negative i32 for binary; for compact, one whose
    /// varint has exactly `len` bytes.
    fn allocate(&mut self, len: usize) -> Option<i32> {
        let (lo, span): (u64, u64) = match len {
            0 => (0, 1 << 31),
            1 => (0, 1 << 7),
            l => {
                let lo = 1u64 << (7 * (l - 1));
                let hi = (1u64 << (7 * l)).min(1 << 32);
                (lo, hi - lo)
            }
        };
        let tries = (self.waiting.len() as u64 + 1).min(span);
        for _ in 0..tries {
            let id = (lo + u64::from(self.next[len]) % span) as u32 as i32;
            self.next[len] = self.next[len].wrapping_add(1);
            if !self.waiting.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Drops waiters whose caller stopped waiting (timed out), now and then; returns how
    /// many went.
    fn sweep(&mut self) -> usize {
        self.registered = self.registered.wrapping_add(1);
        if !self.registered.is_multiple_of(256) {
            return 0;
        }
        let before = self.waiting.len();
        self.waiting.retain(|_, w| w.cell.waiting(w.generation));
        before - self.waiting.len()
    }
}

impl Conn {
    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Fails every waiter and refuses new ones.
    fn close(&self, reason: impl Fn() -> Failed) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.closed = true;
        self.state.store(CLOSED, Ordering::Release);
        for (_, w) in p.waiting.drain() {
            w.cell.complete(w.generation, Err(reason()));
        }
        self.inflight.store(0, Ordering::Relaxed);
    }
}

impl Pool {
    /// Sends a request to `addr` on a connection of its transport and protocol, opening one
    /// when none is free and the cluster's limits allow.
    #[expect(
        clippy::result_large_err,
        reason = "the refused request is handed back by value; boxing would allocate per request"
    )]
    pub fn send(
        &self,
        addr: SocketAddr,
        mut msg: Message,
        settings: &PoolSettings,
        cluster: &Arc<ClusterRuntime>,
        reply_to: (&Arc<ReplyCell>, u64),
    ) -> Result<Sent, Refused> {
        let meta = msg.meta();
        let conn = match self.connection(addr, (meta.transport, meta.protocol), settings, cluster) {
            Ok(c) => c,
            Err(e) => return Err((e, msg)),
        };
        let oneway = msg.kind() == MessageType::Oneway;
        let class = match meta.protocol {
            Protocol::Binary => 0,
            Protocol::Compact => msg.seq_len(),
        };
        let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.closed {
            return Err((UpstreamError::Closed("connection closed".into()), msg));
        }
        if conn.state() == CONNECTING {
            if cluster.pending_requests.load(Ordering::Relaxed) >= settings.max_pending {
                return Err((UpstreamError::Overflow("max_pending_requests"), msg));
            }
            cluster.pending_requests.fetch_add(1, Ordering::Relaxed);
            p.queued += 1;
        }
        if oneway {
            // Nothing comes back, so the sequence id needs no rewriting.
            let _ = conn.tx.send(msg.into_bytes());
            return Ok(Sent::Oneway);
        }
        let Some(id) = p.allocate(class) else {
            return Err((
                UpstreamError::Overflow("sequence ids on the connection"),
                msg,
            ));
        };
        let client_seq = msg.seq_id();
        if msg.set_seq_id(id).is_err() {
            return Err((UpstreamError::Overflow("sequence id length"), msg));
        }
        let swept = p.sweep();
        conn.inflight.fetch_sub(swept, Ordering::Relaxed);
        let (cell, generation) = reply_to;
        p.waiting.insert(
            id,
            Waiter {
                client_seq,
                cell: cell.clone(),
                generation,
            },
        );
        conn.inflight.fetch_add(1, Ordering::Relaxed);
        // Sent while holding the lock, so a connection closing now drains this waiter.
        let bytes = msg.into_bytes();
        let _ = conn.tx.send(bytes.clone());
        Ok(Sent::Reply(bytes))
    }

    /// Open connections to this endpoint (for `/clusters`).
    pub fn open_connections(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.iter().filter(|c| c.state() == OPEN).count()
    }

    fn connection(
        &self,
        addr: SocketAddr,
        format: (Transport, Protocol),
        settings: &PoolSettings,
        cluster: &Arc<ClusterRuntime>,
    ) -> Result<Arc<Conn>, UpstreamError> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| c.state() != CLOSED);
        let same = conns.iter().filter(|c| c.format == format);
        let count = same.clone().count();
        let least = same
            .min_by_key(|c| c.inflight.load(Ordering::Relaxed))
            .cloned();
        let busy = least
            .as_ref()
            .is_none_or(|c| c.inflight.load(Ordering::Relaxed) > 0);
        if !(busy && count < settings.per_endpoint) {
            return least.ok_or(UpstreamError::Overflow("connections"));
        }
        if cluster.connections.load(Ordering::Relaxed) >= settings.max_connections {
            return least.ok_or(UpstreamError::Overflow("max_connections"));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            format,
            tx,
            state: AtomicU8::new(CONNECTING),
            inflight: AtomicUsize::new(0),
            pending: Mutex::new(Pending::default()),
        });
        cluster.connections.fetch_add(1, Ordering::Relaxed);
        cluster.connections_opened.inc();
        tokio::spawn(run(conn.clone(), addr, *settings, rx, cluster.clone()));
        conns.push(conn.clone());
        Ok(conn)
    }
}

async fn run(
    conn: Arc<Conn>,
    addr: SocketAddr,
    settings: PoolSettings,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    cluster: Arc<ClusterRuntime>,
) {
    let connected = tokio::time::timeout(
        settings.connect_timeout,
        socket::connect_upstream(addr, settings.mark, None),
    )
    .await
    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    {
        let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
        cluster
            .pending_requests
            .fetch_sub(p.queued, Ordering::Relaxed);
        p.queued = 0;
        if connected.is_ok() {
            conn.state.store(OPEN, Ordering::Release);
        }
    }
    let stream = match connected {
        Ok(s) => s,
        Err(e) => {
            debug!(%addr, error = %e, "upstream connect failed");
            let kind = e.kind();
            conn.close(|| Failed::NotSent(UpstreamError::ConnectFailed(addr, kind.into())));
            cluster.connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    };
    cluster.connections_gauge.inc();
    let (mut rd, wr) = stream.into_split();
    let (transport, protocol) = conn.format;
    let reader = async {
        let mut decoder = Decoder::configured(settings.limits, transport, protocol, false);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(mut reply)) => {
                        let waiter = {
                            let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
                            p.waiting.remove(&reply.seq_id())
                        };
                        match waiter {
                            Some(w) => {
                                conn.inflight.fetch_sub(1, Ordering::Relaxed);
                                // Same varint class both ways: the client's id always fits.
                                let _ = reply.set_seq_id(w.client_seq);
                                w.cell.complete(w.generation, Ok(reply));
                            }
                            None => {
                                debug!(%addr, seq = reply.seq_id(), "reply for no pending request (timed out?)")
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return format!("invalid reply from {addr}: {e}"),
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(64 * 1024);
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => return format!("{addr} closed the connection"),
                Ok(_) => {}
                Err(e) => return format!("read from {addr}: {e}"),
            }
        }
    };
    let writer = async {
        let mut out = BufWriter::with_capacity(64 * 1024, wr);
        while let Some(bytes) = rx.recv().await {
            out.write_all(&bytes).await?;
            while let Ok(more) = rx.try_recv() {
                out.write_all(&more).await?;
            }
            out.flush().await?;
        }
        Ok::<_, io::Error>(())
    };
    let reason = tokio::select! {
        reason = reader => reason,
        w = writer => match w {
            Ok(()) => "pool dropped".to_owned(),
            Err(e) => format!("write to {addr}: {e}"),
        },
    };
    debug!(%addr, %reason, "upstream connection closed");
    conn.close(|| Failed::Lost(UpstreamError::Closed(reason.clone())));
    cluster.connections.fetch_sub(1, Ordering::Relaxed);
    cluster.connections_gauge.dec();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_late_reply_does_not_reach_the_next_request_of_the_cell() {
        let cell = ReplyCell::default();
        let first = cell.begin();
        // The first request gave up (timed out); the cell serves the next one.
        let second = cell.begin();
        cell.complete(
            first,
            Err(Failed::Lost(UpstreamError::Closed("late".into()))),
        );
        assert!(!cell.waiting(first) && cell.waiting(second));
        cell.complete(
            second,
            Err(Failed::Lost(UpstreamError::Closed("on time".into()))),
        );
        match cell.reply(second).await {
            Err(Failed::Lost(UpstreamError::Closed(why))) => assert_eq!(why, "on time"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn compact_ids_keep_their_varint_length() {
        let mut p = Pending::default();
        for len in 1..=5 {
            for _ in 0..300 {
                let id = p.allocate(len).unwrap();
                assert_eq!(crate::thrift::wire::varint_len(id as u32), len, "{id}");
            }
        }
    }

    #[test]
    fn ids_in_use_are_skipped_and_a_full_class_is_refused() {
        let mut p = Pending::default();
        for _ in 0..128 {
            let id = p.allocate(1).unwrap();
            let cell = Arc::new(ReplyCell::default());
            let generation = cell.begin();
            p.waiting.insert(
                id,
                Waiter {
                    client_seq: 0,
                    cell,
                    generation,
                },
            );
        }
        assert_eq!(p.waiting.len(), 128);
        assert_eq!(p.allocate(1), None);
    }
}
