//! The upstream side: each cluster's and endpoint's live state, which outlives snapshots
//! ([`runtime`]: counters, breakers, pools; [`outlier`]: Envoy's consecutive-error
//! ejection; [`metrics`]: what it counts), and the connections to one endpoint, for the
//! Thrift proxy.
//!
//! Thrift servers — Apache Thrift's `TSimpleServer`, `TThreadedServer`, `TThreadPoolServer`,
//! and most in production — read a connection's next request only after answering the one
//! before. Requests of many clients pipelined onto one connection would wait behind the
//! slowest of them. So by default ([`exclusive`]) a request takes a connection for itself
//! until its reply arrives (a one-way call: until it is written), as Envoy's thrift_proxy
//! does; idle connections are reused, and the pool grows to the cluster's circuit breakers.
//! A cluster whose servers answer out of order can opt in to [`multiplexed`] connections.
//!
//! Either way a reply must belong to its request: its sequence id, a reply message type and
//! the request's method name are checked ([`answers`]), and a connection that breaks that is
//! closed. A request that gives up (times out) leaves its connection unusable for others:
//! closed (exclusive), or its sequence id held until its reply or the connection's end
//! (multiplexed).
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::thrift::{
    DecoderLimits, Message, MessageType, ThriftError,
    frame::{SeqIdTooLong, split_name},
};

pub mod dial;
pub mod exclusive;
pub mod metrics;
pub mod multiplexed;
pub mod outlier;
mod reply_buffer;
mod reply_cell;
pub mod runtime;

pub use outlier::Failure;
pub use reply_cell::ReplyCell;
pub use runtime::{ActiveRequest, ClusterRuntime, EndpointRuntime};

/// Why a request got no reply from upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {0} failed: {1}")]
    ConnectFailed(SocketAddr, io::Error),
    #[error("upstream connection closed: {0}")]
    Closed(Closed),
    #[error("circuit breaker overflow: {0}")]
    Overflow(&'static str),
    #[error("reply does not answer its request: {0}")]
    Mismatch(Mismatch),
    /// The buffer budget has no room: for a large reply, or for a request to wait in a
    /// multiplexed connection's write queue.
    #[error("no buffer left: {0}")]
    Budget(#[from] crate::budget::Exhausted),
}

/// Why an upstream connection ended under its requests.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Closed {
    #[error("{0} closed the connection")]
    ByPeer(SocketAddr),
    #[error("read from {0}: {1}")]
    Read(SocketAddr, io::ErrorKind),
    #[error("write to {0}: {1}")]
    Write(SocketAddr, io::ErrorKind),
    #[error("invalid reply from {0}: {1}")]
    InvalidReply(SocketAddr, ThriftError),
    /// Another request's reply on the connection did not answer it.
    #[error("a reply on it did not answer its request: {0}")]
    Mismatch(Mismatch),
    #[error("endpoint removed")]
    EndpointRemoved,
    #[error("pool dropped")]
    PoolDropped,
    /// Found closed when a request was about to be queued on it.
    #[error("connection closed")]
    Already,
}

/// One connection's end fails each of its requests with the same error.
impl Clone for UpstreamError {
    fn clone(&self) -> Self {
        match self {
            // An `io::Error` is not `Clone`: its kind is what requests are told.
            Self::ConnectFailed(addr, e) => Self::ConnectFailed(*addr, e.kind().into()),
            Self::Closed(why) => Self::Closed(why.clone()),
            Self::Overflow(what) => Self::Overflow(what),
            Self::Mismatch(why) => Self::Mismatch(why.clone()),
            Self::Budget(e) => Self::Budget(e.clone()),
        }
    }
}

/// Why a request got no reply.
#[derive(Debug)]
pub enum Failed {
    /// Nothing reached the server; the request can be retried elsewhere (or, for an
    /// overflow, answered at once).
    NotSent(UpstreamError),
    /// The request may have reached the server; no retry.
    Lost(UpstreamError),
}

/// What comes back for a request: its reply, or why there is none.
pub type Reply = Result<Message, Failed>;

/// Settings a pool needs from its cluster.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub mark: u32,
    pub connect_timeout: Duration,
    /// Multiplexed connections per endpoint (per transport and protocol).
    pub per_endpoint: usize,
    pub max_connections: usize,
    pub max_pending: usize,
    pub limits: DecoderLimits,
    /// What a multiplexed connection has to write must go out within this (the message
    /// timeout), or the connection closes: a server that stopped reading holds nothing for
    /// longer.
    pub write_timeout: Duration,
}

/// The connections to one endpoint from one worker, and the requests that worker sent it.
/// Aligned to two cache lines (the span the CPU's adjacent-line prefetch pulls together), so
/// the workers' pools of an endpoint, which sit side by side, share none: each is written
/// on every request.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Pool {
    exclusive: exclusive::Idle,
    multiplexed: multiplexed::Conns,
    /// Open connections of either kind (for `/clusters`).
    open: Arc<AtomicUsize>,
    /// The endpoint left the configuration: connections close once their requests are done.
    retired: AtomicBool,
    /// Requests sent (attempts, one-way calls included).
    pub requests: AtomicU64,
}

impl Pool {
    /// Open connections to this endpoint (for `/clusters`).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The endpoint left the configuration: idle connections close now, busy ones after
    /// their requests.
    pub fn retire(&self, cluster: &ClusterRuntime) {
        self.retired.store(true, Ordering::Release);
        self.exclusive.close_idle(self, cluster, None);
        self.multiplexed.retire();
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Closes exclusive connections idle for longer than `timeout`.
    pub fn close_idle(&self, cluster: &ClusterRuntime, timeout: Duration) {
        if let Some(since) = Instant::now().checked_sub(timeout) {
            self.exclusive.close_idle(self, cluster, Some(since));
        }
    }
}

/// Counts a connection (connecting or open) against its cluster's `max_connections`.
fn reserve_connection(cluster: &ClusterRuntime, max: usize) -> bool {
    cluster
        .connections
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// Gives a connection's place back to its cluster; requests waiting for one look again.
fn release_connection(cluster: &ClusterRuntime) {
    cluster.connections.fetch_sub(1, Ordering::AcqRel);
    wake_pending(cluster);
}

/// Wakes requests waiting for a connection, if any wait.
fn wake_pending(cluster: &ClusterRuntime) {
    if cluster.pending_requests.load(Ordering::SeqCst) > 0 {
        cluster.released.notify_waiters();
    }
}

/// How a reply fails to answer its request; the connection it came on closes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("sequence id {got} for request {sent}")]
    SeqId { got: i32, sent: i32 },
    #[error("a reply with sequence id {0} nobody sent")]
    Unsolicited(i32),
    #[error("a {0} message")]
    Kind(&'static str),
    /// The names, cut to 64 bytes.
    #[error("method {got:?} for a call of {sent:?}")]
    Method { got: String, sent: String },
    #[error("the client's {0}")]
    ClientSeq(#[from] SeqIdTooLong),
}

/// Whether `reply` answers `request`: the same sequence id, a reply or exception, and the
/// request's method name (a multiplexing server may answer with the name without its
/// `Service:` prefix).
pub fn answers(request: &Message, reply: &Message) -> Result<(), Mismatch> {
    if reply.seq_id() != request.seq_id() {
        return Err(Mismatch::SeqId {
            got: reply.seq_id(),
            sent: request.seq_id(),
        });
    }
    answers_by_name(request.name(), reply)
}

/// Puts the client's sequence id back on a reply that came under tern's. It fits: tern chose
/// its id with the varint length the client's takes (`thrift::frame::seq_id_in_class`);
/// were it not to, the reply is refused like one that does not answer its request, never
/// passed on under tern's id.
fn restore_client_seq(reply: &mut Message, client_seq: i32) -> Result<(), Mismatch> {
    Ok(reply.set_seq_id(client_seq)?)
}

/// [`answers`] without the sequence id (a multiplexed connection maps ids itself).
fn answers_by_name(request_name: &[u8], reply: &Message) -> Result<(), Mismatch> {
    if !matches!(reply.kind(), MessageType::Reply | MessageType::Exception) {
        return Err(Mismatch::Kind(reply.kind().as_str()));
    }
    let name = reply.name();
    if name != request_name && name != split_name(request_name).1 {
        let shown = |n: &[u8]| String::from_utf8_lossy(&n[..n.len().min(64)]).into_owned();
        return Err(Mismatch::Method {
            got: shown(name),
            sent: shown(request_name),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::thrift::Decoder;

    /// A framed strict-binary message with an empty body.
    fn message(name: &str, kind: u8, seq: i32) -> Message {
        let mut m = vec![0x80, 0x01, 0x00, kind];
        m.extend_from_slice(&(name.len() as i32).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.push(0);
        let mut framed = (m.len() as u32).to_be_bytes().to_vec();
        framed.extend(m);
        Decoder::detecting(DecoderLimits::default())
            .decode(&mut BytesMut::from(&framed[..]))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_reply_must_match_its_request() {
        let call = message("Calc:add", 1, 7);
        assert!(answers(&call, &message("Calc:add", 2, 7)).is_ok());
        // A multiplexing server answers with the method alone; an exception is an answer.
        assert!(answers(&call, &message("add", 3, 7)).is_ok());
        let method = |got: &str| Mismatch::Method {
            got: got.to_owned(),
            sent: "Calc:add".to_owned(),
        };
        let wrong = [
            // another request's sequence id
            (message("add", 2, 8), Mismatch::SeqId { got: 8, sent: 7 }),
            (message("add", 1, 7), Mismatch::Kind("call")), // a call, not a reply
            (message("sub", 2, 7), method("sub")),          // another method
            (message("Other:add", 2, 7), method("Other:add")), // another service
        ];
        for (reply, why) in wrong {
            assert_eq!(answers(&call, &reply), Err(why), "{reply:?}");
        }
    }
}
