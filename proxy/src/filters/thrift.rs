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
use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};
use tracing::{Instrument, debug, debug_span, warn};

use super::{Ctx, authz::Authz, istio, ordered::Ordered};
use crate::budget::Held;
use crate::{
    balance::{hash_key, source_hash},
    config::{Cluster, Filter, Route, RouteAction, RouteMatch, Target, UpstreamMode},
    state::{ClusterState, Snapshot},
    stream::Stream,
    thrift::{
        Decoder, Message, MessageType,
        frame::{Meta, ReplyResult, split_name},
        reply::{AppExceptionType, application_exception},
    },
    upstream::{ActiveRequest, EndpointRuntime, Failure},
    upstream::{
        Failed, PoolSettings, ReplyCell, UpstreamError, exclusive,
        multiplexed::{self, Sent},
    },
};

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

/// Serves one downstream connection whose first bytes (`buf`) were Thrift.
pub async fn serve(
    down: Stream,
    buf: BytesMut,
    mut held: Held,
    chain: ChainRef,
    authz: Authz,
    ctx: Arc<Ctx>,
) {
    let _ = down.set_nodelay(true);
    let source = down.peer_addr().ok().map(|a| a.ip());
    let (mut rd, mut wr) = down.into_split();
    let mut conn = Downstream::new(chain, ctx.clone(), source);
    conn.authz = Some(authz);
    let mut buf = buf;
    let mut replies = Ordered::default();
    // Replies ready to write together (kept, so its capacity is reused).
    let mut out: Vec<Bytes> = Vec::with_capacity(MAX_BATCH);
    // Draining serves every request until the drain's time is up (closing a connection
    // between requests would fail the client's next call, which may already be on its way);
    // then no new requests, only the replies in flight.
    let mut closing = ctx.closing.clone();
    let mut reading = !*closing.borrow_and_update();
    // A message must arrive whole within the message timeout of its first byte: one timer,
    // set when a partial message starts (or the one before it completed).
    let stall = tokio::time::sleep(ctx.message_timeout);
    let mut stall = std::pin::pin!(stall);
    let mut partial = false;
    loop {
        let mut progressed = false;
        while reading && replies.len() < MAX_IN_FLIGHT {
            match conn.decoder.decode(&mut buf) {
                Ok(Some(msg)) => {
                    progressed = true;
                    let plan = conn.plan(msg);
                    let span = debug_span!("request", seq = plan.client_seq());
                    let ctx = ctx.clone();
                    replies.push(|cell| execute(plan, ctx, cell).instrument(span));
                    if conn.revoked {
                        debug!(
                            "the policy in force no longer allows the connection: no new requests"
                        );
                        reading = false;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    ctx.state.metrics.rejected(e.cause());
                    warn!(error = %e, "closing a connection that sent malformed Thrift");
                    reading = false;
                }
            }
        }
        if !reading && replies.is_empty() {
            break;
        }
        let now_partial = reading && !buf.is_empty();
        if now_partial && (!partial || progressed) {
            stall
                .as_mut()
                .reset(tokio::time::Instant::now() + ctx.message_timeout);
        }
        partial = now_partial;
        tokio::select! {
            read = rd.read_buf(&mut buf), if reading && replies.len() < MAX_IN_FLIGHT => match read {
                Ok(0) => {
                    if !buf.is_empty() {
                        ctx.state.metrics.rejected("truncated");
                        debug!(bytes = buf.len(), "connection closed inside a message");
                    }
                    reading = false;
                }
                Ok(_) => {
                    if buf.capacity() - buf.len() < 4096
                        && let Err(e) = held.reserve(&mut buf, 64 * 1024)
                    {
                        ctx.state.metrics.rejected("buffer_budget");
                        warn!(error = %e, "closing a connection: no buffer left for it");
                        reading = false;
                        buf.clear();
                    }
                }
                Err(e) => {
                    debug!(error = %e, "downstream read failed");
                    reading = false;
                }
            },
            Some(reply) = replies.next(), if !replies.is_empty() => {
                // This reply and every one already done behind it go out in one write.
                out.extend(reply);
                while out.len() < MAX_BATCH {
                    match replies.next().now_or_never() {
                        Some(Some(reply)) => out.extend(reply),
                        _ => break,
                    }
                }
                let written = write_all_vectored(&mut wr, &out).await;
                out.clear();
                if let Err(e) = written {
                    debug!(error = %e, "downstream write failed");
                    return;
                }
            },
            () = &mut stall, if partial => {
                ctx.state.metrics.rejected("message_timeout");
                debug!(bytes = buf.len(), "a message took longer than its time: no new requests");
                reading = false;
                partial = false;
                buf.clear();
            },
            _ = closing.changed(), if reading => {
                debug!("the drain's time is up: no new requests on this connection");
                reading = false;
            },
        }
    }
    let _ = wr.shutdown().await;
}

/// Writes every buffer, in order, with as few (vectored) writes as the socket takes.
async fn write_all_vectored(
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    bufs: &[Bytes],
) -> std::io::Result<()> {
    let (mut i, mut offset) = (0, 0);
    while i < bufs.len() {
        let mut slices = [std::io::IoSlice::new(&[]); MAX_BATCH];
        let mut n = 0;
        for (k, b) in bufs[i..].iter().enumerate().take(MAX_BATCH) {
            slices[k] = std::io::IoSlice::new(if k == 0 { &b[offset..] } else { b });
            n = k + 1;
        }
        let mut written = wr.write_vectored(&slices[..n]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while i < bufs.len() && written >= bufs[i].len() - offset {
            written -= bufs[i].len() - offset;
            i += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

/// Per-connection routing state.
struct Downstream {
    chain: ChainRef,
    ctx: Arc<Ctx>,
    decoder: Decoder,
    /// The snapshot this connection routes with, and its chain's filter, resolved once per
    /// snapshot (finding a chain walks the listeners by name).
    snapshot: Arc<Snapshot>,
    filter: Option<Arc<Filter>>,
    /// The last snapshot looked at: a snapshot without this chain is looked at once, and the
    /// connection keeps routing with the one before.
    seen: Arc<Snapshot>,
    /// The hash key of the client's address, for ring hash and Maglev requests without a
    /// hash header.
    source_hash: Option<u64>,
    /// RBAC rules that name Thrift methods, decided per call.
    authz: Option<Authz>,
    /// The policy in force no longer allows the connection: it takes no new requests.
    revoked: bool,
}

impl Downstream {
    fn new(chain: ChainRef, ctx: Arc<Ctx>, source: Option<IpAddr>) -> Self {
        let snapshot = ctx.state.load();
        let filter = snapshot
            .chain(&chain.listener, &chain.chain)
            .map(|c| Arc::new(c.filter.clone()));
        let format = match filter.as_deref() {
            Some(Filter::Thrift(t)) => t.transport.zip(t.protocol),
            _ => None,
        };
        let decoder = match format {
            Some((t, p)) => Decoder::configured(ctx.limits, t, p, false),
            None => Decoder::detecting(ctx.limits),
        };
        Self {
            chain,
            ctx,
            decoder,
            seen: snapshot.clone(),
            snapshot,
            filter,
            source_hash: source.map(source_hash),
            authz: None,
            revoked: false,
        }
    }

    fn plan(&mut self, msg: Message) -> Plan {
        let current = self.ctx.state.load();
        if !Arc::ptr_eq(&current, &self.seen) {
            if let Some(c) = current.chain(&self.chain.listener, &self.chain.chain) {
                self.filter = Some(Arc::new(c.filter.clone()));
                self.snapshot = current.clone();
            }
            self.seen = current;
        }
        let snap = self.snapshot.clone();
        let filter = self.filter.clone();
        if !matches!(msg.kind(), MessageType::Call | MessageType::Oneway) {
            return Plan::local(
                &self.ctx,
                &msg,
                "",
                "invalid_message_type",
                AppExceptionType::ProtocolError,
                "tern accepts only calls and one-way calls from clients",
            );
        }
        if let Some(a) = &mut self.authz
            && let Err(denied) = a.check_call(&msg)
        {
            self.revoked |= denied.connection;
            return Plan::local(
                &self.ctx,
                &msg,
                "",
                "rbac_access_denied",
                AppExceptionType::Unknown,
                "RBAC: access denied",
            );
        }
        let (routes, default): (&[Route], Option<&Target>) = match filter.as_deref() {
            Some(Filter::Thrift(t)) => (&t.routes, t.default_target.as_ref()),
            Some(Filter::TcpProxy { target, .. }) => (&[], Some(target)),
            // A chain that became a relay or refusal: nothing to route to.
            Some(Filter::Passthrough | Filter::Refuse) | None => (&[], None),
        };
        let routed = routes.iter().find(|r| matches(&r.matcher, &msg));
        let (name, timeout): (Option<&str>, Option<Duration>) = match routed {
            Some(Route {
                action: RouteAction::Target(t),
                timeout,
                ..
            }) => (Some(crate::balance::cluster_of(t)), *timeout),
            Some(Route {
                action: RouteAction::ClusterHeader(h),
                timeout,
                ..
            }) => (
                msg.header(h.as_bytes())
                    .and_then(|v| std::str::from_utf8(v).ok()),
                *timeout,
            ),
            None => (default.map(crate::balance::cluster_of), None),
        };
        let Some(name) = name else {
            return Plan::local(
                &self.ctx,
                &msg,
                "",
                "no_route",
                AppExceptionType::UnknownMethod,
                "no route for this method",
            );
        };
        let Some(cluster) = snap.clusters.get(name).cloned() else {
            // The name may come from a client's header: it is no label value.
            let why = format!("unknown cluster {name}");
            return Plan::local(
                &self.ctx,
                &msg,
                "",
                "no_cluster",
                AppExceptionType::InternalError,
                &why,
            );
        };
        debug!(method = %String::from_utf8_lossy(msg.name()), cluster = %cluster.config.name, "routed");
        let hash = if cluster.config.lb_policy.hashes() {
            cluster
                .config
                .hash_header
                .as_ref()
                .and_then(|h| msg.header(h.as_bytes()))
                .map(hash_key)
                .or(self.source_hash)
        } else {
            None
        };
        let timeout = timeout.unwrap_or(cluster.config.request_timeout);
        Plan::Forward(Forward {
            client_seq: msg.seq_id(),
            meta: msg.meta(),
            msg,
            cluster,
            timeout,
            hash,
        })
    }
}

/// Envoy's thrift route match. `method` matches the full name or the part after a
/// multiplexed `Service:` prefix; `service` matches that prefix; headers match exactly.
fn matches(m: &RouteMatch, msg: &Message) -> bool {
    let method = m
        .method
        .as_deref()
        .is_none_or(|want| want.as_bytes() == msg.name() || want.as_bytes() == msg.method());
    let service = m
        .service
        .as_deref()
        .is_none_or(|want| msg.service() == Some(want.as_bytes()));
    let headers = m
        .headers
        .iter()
        .all(|(k, v)| msg.header(k.as_bytes()) == Some(v.as_bytes()));
    (method && service && headers) != m.invert
}

/// What to do with one request.
#[expect(
    clippy::large_enum_variant,
    reason = "boxing the common variant would allocate once per request"
)]
enum Plan {
    /// Answer at once (already encoded), or nothing for a one-way call.
    Local(Option<Bytes>),
    Forward(Forward),
}

struct Forward {
    msg: Message,
    client_seq: i32,
    meta: Meta,
    cluster: Arc<ClusterState>,
    timeout: Duration,
    hash: Option<u64>,
}

impl Plan {
    /// A local reply decided while routing, counted under `cluster` (empty when none).
    fn local(
        ctx: &Ctx,
        msg: &Message,
        cluster: &str,
        cause: &'static str,
        kind: AppExceptionType,
        why: &str,
    ) -> Plan {
        ctx.state.metrics.local_reply(cluster, cause);
        debug!(cause, "local reply");
        let reply = (msg.kind() != MessageType::Oneway)
            .then(|| application_exception(&msg.meta(), msg.name(), msg.seq_id(), kind, why));
        istio::local_reply(ctx, None, cause).observe(
            0.0,
            msg.as_bytes().len(),
            reply.as_ref().map_or(0, Bytes::len),
        );
        Plan::Local(reply)
    }

    fn client_seq(&self) -> i32 {
        match self {
            Plan::Forward(f) => f.client_seq,
            Plan::Local(_) => 0,
        }
    }
}

/// Sends a request upstream and returns what to write back to the client.
async fn execute(plan: Plan, ctx: Arc<Ctx>, cell: Arc<ReplyCell>) -> Option<Bytes> {
    let f = match plan {
        Plan::Local(reply) => return reply,
        Plan::Forward(f) => f,
    };
    let Forward {
        mut msg,
        client_seq,
        meta,
        cluster,
        timeout,
        hash,
    } = f;
    let cfg = &cluster.config;
    let rt = &cluster.runtime;
    let oneway = msg.kind() == MessageType::Oneway;
    let began = Instant::now();
    let request_len = msg.as_bytes().len();
    let elapsed_ms = || began.elapsed().as_secs_f64() * 1000.0;
    // The name of a local reply comes from the request bytes, wherever they are now.
    let local = |name: &[u8], cause: &'static str, kind: AppExceptionType, why: &str| {
        rt.metrics().methods.count(split_name(name).1, false);
        ctx.state.metrics.local_reply(&cfg.name, cause);
        debug!(cause, "local reply");
        let reply = (!oneway).then(|| application_exception(&meta, name, client_seq, kind, why));
        istio::local_reply(&ctx, Some(&cluster), cause).observe(
            elapsed_ms(),
            request_len,
            reply.as_ref().map_or(0, Bytes::len),
        );
        reply
    };
    if rt.active_requests.load(Ordering::Relaxed) >= cfg.circuit_breakers.max_requests {
        return local(
            msg.name(),
            "overflow",
            AppExceptionType::InternalError,
            "circuit breaker overflow: max_requests",
        );
    }
    let _active = ActiveRequest::new(rt.clone());
    let settings = pool_settings(cfg, &ctx);
    let deadline = deadline_after(timeout);
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    // What an attempt's outcome means for the client; `name` names a local reply.
    let conclude_with =
        |ep: &crate::state::EndpointHandle,
         started: Instant,
         outcome: Result<Result<Option<Message>, Failed>, tokio::time::error::Elapsed>,
         name: &[u8]| {
            let endpoint = &*ep.runtime;
            // How long it took, for least request: an answer, a lost connection or a timeout
            // (not a request that never left, nor a one-way call).
            let took = || {
                let now = Instant::now();
                let took = now - started;
                endpoint.latency.observe(took, now.into_std());
                took
            };
            match outcome {
                Ok(Ok(Some(reply))) => {
                    let took = took();
                    istio::endpoint_requests(&ctx, &cluster, ep)[reply.reply_result() as usize]
                        .observe(elapsed_ms(), request_len, reply.as_bytes().len());
                    let answered = reply.kind() == MessageType::Reply;
                    rt.metrics().methods.count(split_name(name).1, answered);
                    match reply.reply_result() {
                        ReplyResult::ApplicationException => {
                            cluster.record_failure(endpoint, Failure::Application)
                        }
                        _ => cluster.record_success(endpoint),
                    }
                    rt.metrics().request_seconds.observe(took.as_secs_f64());
                    rt.metrics().replies(reply.reply_result()).inc();
                    Next::Done(Some(reply.into_bytes()))
                }
                Ok(Ok(None)) => {
                    istio::endpoint_requests(&ctx, &cluster, ep)[0].observe(
                        elapsed_ms(),
                        request_len,
                        0,
                    );
                    rt.metrics().methods.count(split_name(name).1, false);
                    Next::Done(None)
                }
                Ok(Err(Failed::NotSent(UpstreamError::Overflow(what)))) => Next::Done(local(
                    name,
                    "overflow",
                    AppExceptionType::InternalError,
                    &format!("circuit breaker overflow: {what}"),
                )),
                Ok(Err(Failed::NotSent(e))) => {
                    debug!(error = %e, "not sent; trying another endpoint");
                    cluster.record_failure(endpoint, Failure::Gateway);
                    Next::Retry
                }
                Ok(Err(Failed::Lost(e))) => {
                    took();
                    cluster.record_failure(endpoint, Failure::Gateway);
                    Next::Done(local(
                        name,
                        "upstream_reset",
                        AppExceptionType::InternalError,
                        &e.to_string(),
                    ))
                }
                Err(_) => {
                    took();
                    cluster.record_failure(endpoint, Failure::Gateway);
                    Next::Done(local(
                        name,
                        "timeout",
                        AppExceptionType::InternalError,
                        &format!("upstream request timeout after {timeout:?}"),
                    ))
                }
            }
        };
    for attempt in 0..MAX_ATTEMPTS {
        let Some(i) = cluster
            .picker
            .pick(&cluster.endpoints, hash, &tried[..attempt])
        else {
            let cause = if attempt == 0 {
                "no_healthy_upstream"
            } else {
                "connect_failure"
            };
            return local(
                msg.name(),
                cause,
                AppExceptionType::InternalError,
                &format!("{cause} in cluster {}", cfg.name),
            );
        };
        tried[attempt] = i;
        let ep = &cluster.endpoints[i];
        let ert = &ep.runtime;
        ert.requests.fetch_add(1, Ordering::Relaxed);
        debug!(endpoint = %ep.config.address, attempt, "sending");
        let _in_flight = ActiveEndpoint::new(ert);
        let started = Instant::now();
        let conclude = |outcome, name: &[u8]| conclude_with(ep, started, outcome, name);
        let outcome = match cfg.upstream {
            UpstreamMode::Exclusive => {
                let call = exclusive::call(ert, &msg, &settings, rt);
                let outcome = tokio::time::timeout_at(deadline, call).await;
                conclude(outcome, msg.name())
            }
            UpstreamMode::Multiplexed => {
                let generation = cell.begin();
                match multiplexed::send(ert, msg, &settings, rt, (&cell, generation)) {
                    Ok(Sent::Oneway(sent)) => {
                        istio::endpoint_requests(&ctx, &cluster, ep)[0].observe(
                            elapsed_ms(),
                            request_len,
                            0,
                        );
                        rt.metrics()
                            .methods
                            .count(split_name(&sent[meta.name_range()]).1, false);
                        return None;
                    }
                    Ok(Sent::Reply(sent)) => {
                        let waited = tokio::time::timeout_at(deadline, cell.reply(generation));
                        let outcome = waited.await.map(|reply| reply.map(Some));
                        match conclude(outcome, &sent[meta.name_range()]) {
                            Next::Retry => {
                                // Only a retry (the connection never opened) needs the
                                // bytes again.
                                msg = Message::from_parts(BytesMut::from(&sent[..]), meta);
                                continue;
                            }
                            Next::Done(reply) => return reply,
                        }
                    }
                    Err((e, back)) => {
                        let next = conclude(Ok(Err(Failed::NotSent(e))), back.name());
                        msg = back;
                        next
                    }
                }
            }
        };
        match outcome {
            Next::Done(reply) => return reply,
            Next::Retry => {}
        }
    }
    local(
        msg.name(),
        "connect_failure",
        AppExceptionType::InternalError,
        &format!("could not connect to any endpoint of {}", cfg.name),
    )
}

/// What a cluster's pools need to know.
pub(super) fn pool_settings(cfg: &Cluster, ctx: &Ctx) -> PoolSettings {
    PoolSettings {
        mark: ctx.mark,
        connect_timeout: cfg.connect_timeout,
        per_endpoint: cfg.connections_per_endpoint,
        max_connections: cfg.circuit_breakers.max_connections,
        max_pending: cfg.circuit_breakers.max_pending_requests,
        limits: ctx.limits,
    }
}

/// What an attempt leaves to do.
enum Next {
    /// Answer the client with this (nothing for a one-way call).
    Done(Option<Bytes>),
    /// Nothing reached the server: try another endpoint.
    Retry,
}

/// When a request that starts now times out; a timeout too long to represent never does
/// (in practice: in a century).
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Counts a request as in flight to an endpoint while it lives (least request reads it).
struct ActiveEndpoint<'a>(&'a EndpointRuntime);

impl<'a> ActiveEndpoint<'a> {
    fn new(endpoint: &'a EndpointRuntime) -> Self {
        if endpoint.active.fetch_add(1, Ordering::Relaxed) == 0 {
            endpoint.latency.busy_from(std::time::Instant::now());
        }
        Self(endpoint)
    }
}

impl Drop for ActiveEndpoint<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies_written_together_arrive_whole_and_in_order_through_short_writes() {
        use tokio::io::AsyncReadExt;
        let bufs: Vec<Bytes> = (0..70u8)
            .map(|i| Bytes::from(vec![i; 1 + usize::from(i % 13)]))
            .collect();
        let expected: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
        // A pipe that takes 7 bytes at a time: every write is short.
        let (mut a, mut b) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        for chunk in bufs.chunks(MAX_BATCH) {
            write_all_vectored(&mut a, chunk).await.unwrap();
        }
        drop(a);
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[test]
    fn a_timeout_too_long_to_represent_never_fires() {
        let far = deadline_after(Duration::MAX);
        assert!(far > Instant::now() + Duration::from_secs(50 * 365 * 24 * 3600));
        let near = deadline_after(Duration::from_millis(5));
        assert!(near <= Instant::now() + Duration::from_millis(5));
    }
}
