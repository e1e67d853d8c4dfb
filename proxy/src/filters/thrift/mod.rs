//! The Thrift proxy: every request of a downstream connection is routed and balanced on its own.
//!
//! Each request is planned synchronously (route match, cluster, hash key, metric handles),
//! then executed: pick an endpoint, send over that endpoint's multiplexed pool, wait for the
//! reply within the timeout. A connect failure retries on another endpoint; every other
//! failure — no healthy endpoint, overflow, timeout, an upstream that closed — answers the
//! client with a `TApplicationException` in its own encoding. Replies are written back in
//! request order, so pipelining clients see what they sent, in order, complete. Requests in
//! flight live in reused slots (`filters::ordered`) and their replies come back through the
//! slot's reply cell: the steady state allocates nothing per request.
//!
//! Malformed input closes the connection with a counted cause, after the replies to the
//! requests already accepted are written: nothing accepted is dropped silently.
//!
//! - [`connection`]: a downstream connection: read, cut, keep order, write back;
//! - [`routing`]: one request's route, cluster and hash key (its `Plan`);
//! - [`call`]: one request upstream: pick, send, wait, retry, conclude;
//! - [`local`]: what tern answers itself;
//! - [`read_buffer`]: the read buffer, and what it and the requests cut from it hold of the
//!   buffer budget.
mod call;
mod connection;
mod local;
mod read_buffer;
mod routing;
#[cfg(test)]
mod testing;

pub use call::pool_settings;
pub use connection::serve;

/// Requests one downstream connection may have in flight before tern stops reading it (TCP
/// pushes back on the client). Each holds an upstream connection (exclusive mode), so this
/// also bounds how many connections one pipelining client can make tern open: with 1,024, a
/// 10,000-call burst opened hundreds of connections to thread-per-connection servers, and
/// under load their setup alone outlived a 1 s timeout.
const MAX_IN_FLIGHT: usize = 128;
/// Replies written back in one system call, at most.
const MAX_BATCH: usize = 64;
/// Endpoints tried for one request when connects fail.
const MAX_ATTEMPTS: usize = 3;

/// Which filter chain a connection belongs to; it follows the chain across snapshots.
#[derive(Clone, Debug)]
pub struct ChainRef {
    pub listener: String,
    pub chain: String,
}
