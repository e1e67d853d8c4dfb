//! One request upstream: pick an endpoint, send on its pool, wait for the reply within the
//! timeout, retry on another endpoint when nothing was sent, and conclude (metrics, outlier
//! detection, latency for least request, or a `TApplicationException`).
use std::{
    pin::pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;
use tracing::debug;

use super::{
    MAX_ATTEMPTS,
    local::{self, Answered},
    routing::{Forward, Plan},
};
use crate::{
    budget::{Exhausted, Held},
    config::{Cluster, UpstreamMode},
    filters::{
        Ctx, istio,
        ordered::{Expired, SlotRefs},
    },
    state::{ClusterState, EndpointHandle},
    thrift::{
        Message, MessageType,
        frame::{Meta, ReplyResult, split_name},
        reply::AppExceptionType,
    },
    upstream::{
        ActiveRequest, EndpointRuntime, Failed, Failure, PoolSettings, UpstreamError, exclusive,
        multiplexed::{self, Sent},
    },
};

/// What goes back to the client for one request: its bytes (none for a one-way call), and
/// what they hold of the buffer budget (a large reply) until they are written.
pub(super) struct Answer {
    pub bytes: Option<Bytes>,
    pub held: Option<Held>,
}

/// Sends a request that began at `began` upstream and returns what to write back to the
/// client. Its deadline is kept by its connection, which marks `slot.expiry` when it passes.
pub(super) async fn execute(plan: Plan, ctx: &Ctx, slot: SlotRefs, began: Instant) -> Answer {
    let mut held = None;
    let bytes = forward(plan, ctx, slot, began, &mut held).await;
    Answer { bytes, held }
}

/// [`execute`]; a reply read within the buffer budget leaves its charge in `held`.
async fn forward(
    plan: Plan,
    ctx: &Ctx,
    slot: SlotRefs,
    began: Instant,
    held: &mut Option<Held>,
) -> Option<Bytes> {
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
    let SlotRefs { cell, expiry } = slot;
    let call = Call {
        ctx,
        cluster: &cluster,
        meta,
        client_seq,
        oneway: msg.kind() == MessageType::Oneway,
        began,
        request_len: msg.as_bytes().len(),
        timeout,
    };
    let cfg = &cluster.config;
    let rt = &cluster.runtime;
    if rt.active_requests() >= cfg.circuit_breakers.max_requests {
        return call.local(
            msg.name(),
            "overflow",
            AppExceptionType::InternalError,
            "circuit breaker overflow: max_requests",
        );
    }
    let _active = ActiveRequest::new(&**rt);
    let settings = pool_settings(cfg, ctx);
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    for attempt in 0..MAX_ATTEMPTS {
        let started = if attempt == 0 { began } else { Instant::now() };
        let Some(i) = cluster.picker.pick(
            &cluster.endpoints,
            hash,
            &tried[..attempt],
            started.into_std(),
        ) else {
            let cause = if attempt == 0 {
                "no_healthy_upstream"
            } else {
                "connect_failure"
            };
            return call.local(
                msg.name(),
                cause,
                AppExceptionType::InternalError,
                &format!("{cause} in cluster {}", cfg.name),
            );
        };
        tried[attempt] = i;
        let ep = &cluster.endpoints[i];
        let ert = &ep.runtime;
        ert.traffic()
            .pool()
            .requests
            .fetch_add(1, Ordering::Relaxed);
        debug!(endpoint = %ep.config.address, attempt, "sending");
        let _in_flight = ActiveEndpoint::new(ert, started);
        let next = match cfg.upstream {
            UpstreamMode::Exclusive => {
                let outcome = {
                    let sent = pin!(exclusive::call(
                        ert,
                        &mut msg,
                        &settings,
                        rt,
                        (&ctx.budget, &mut *held)
                    ));
                    expiry.within(sent).await
                };
                call.conclude(ep, started, outcome, msg.name())
            }
            UpstreamMode::Multiplexed => {
                let generation = cell.begin();
                let sent =
                    multiplexed::send(ert, msg, (&settings, &ctx.budget), rt, (&cell, generation));
                match sent {
                    Ok(Sent::Oneway(sent)) => {
                        call.sent_oneway(ep, &sent[meta.name_range()]);
                        return None;
                    }
                    Ok(Sent::Reply(sent)) => {
                        let reply = pin!(cell.reply(generation));
                        let outcome = expiry.within(reply).await.map(|(reply, charge)| {
                            *held = charge;
                            reply.map(Some)
                        });
                        match call.conclude(ep, started, outcome, &sent[meta.name_range()]) {
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
                        let next =
                            call.conclude(ep, started, Ok(Err(Failed::NotSent(e))), back.name());
                        msg = back;
                        next
                    }
                }
            }
        };
        match next {
            Next::Done(reply) => return reply,
            Next::Retry => {}
        }
    }
    call.local(
        msg.name(),
        "connect_failure",
        AppExceptionType::InternalError,
        &format!("could not connect to any endpoint of {}", cfg.name),
    )
}

/// One request on its way upstream: what its local replies and its metrics need.
struct Call<'a> {
    ctx: &'a Ctx,
    cluster: &'a Arc<ClusterState>,
    meta: Meta,
    client_seq: i32,
    oneway: bool,
    began: Instant,
    request_len: usize,
    timeout: Duration,
}

/// An attempt's outcome: a reply (`None` for a one-way call sent), a failure, or the timeout.
type Outcome = Result<Result<Option<Message>, Failed>, Expired>;

impl Call<'_> {
    /// Milliseconds from the request's start to `now`.
    fn elapsed_ms(&self, now: Instant) -> f64 {
        (now - self.began).as_secs_f64() * 1000.0
    }

    /// A `TApplicationException` for the client (nothing for a one-way call), counted; the
    /// name comes from the request bytes, wherever they are now.
    fn local(
        &self,
        name: &[u8],
        cause: &'static str,
        kind: AppExceptionType,
        why: &str,
    ) -> Option<Bytes> {
        let cluster = self.cluster;
        cluster
            .runtime
            .metrics()
            .methods
            .count(split_name(name).1, false);
        let request = Answered {
            cluster: Some(cluster),
            meta: &self.meta,
            name,
            seq: self.client_seq,
            oneway: self.oneway,
            len: self.request_len,
            elapsed_ms: self.elapsed_ms(Instant::now()),
        };
        local::reply(self.ctx, request, cause, kind, why)
    }

    /// The local reply to a request the buffer budget had no room for.
    fn over_budget(&self, name: &[u8], e: &Exhausted) -> Option<Bytes> {
        self.local(
            name,
            "buffer_budget",
            AppExceptionType::InternalError,
            &e.to_string(),
        )
    }

    /// A one-way call went out to `ep`.
    fn sent_oneway(&self, ep: &EndpointHandle, name: &[u8]) {
        istio::endpoint_requests(self.ctx, self.cluster, ep)[0].observe(
            self.elapsed_ms(Instant::now()),
            self.request_len,
            0,
        );
        self.cluster
            .runtime
            .metrics()
            .methods
            .count(split_name(name).1, false);
    }

    /// What an attempt on `ep`, begun at `started`, means for the client; `name` names a
    /// local reply.
    fn conclude(
        &self,
        ep: &EndpointHandle,
        started: Instant,
        outcome: Outcome,
        name: &[u8],
    ) -> Next {
        let (cluster, endpoint) = (self.cluster, &*ep.runtime);
        let rt = &cluster.runtime;
        // How long it took, for least request: an answer, a lost connection or a timeout (not
        // a request that never left, nor a one-way call).
        let took = |now: Instant| {
            let took = now - started;
            endpoint.latency.observe(took, now.into_std());
            took
        };
        match outcome {
            Ok(Ok(Some(reply))) => {
                let now = Instant::now();
                let took = took(now);
                // The first attempt began with the request: its time is the request's.
                let elapsed = if started == self.began {
                    took
                } else {
                    now - self.began
                };
                istio::endpoint_requests(self.ctx, cluster, ep)[reply.reply_result() as usize]
                    .observe(
                        elapsed.as_secs_f64() * 1000.0,
                        self.request_len,
                        reply.as_bytes().len(),
                    );
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
                self.sent_oneway(ep, name);
                Next::Done(None)
            }
            Ok(Err(Failed::NotSent(UpstreamError::Overflow(what)))) => Next::Done(self.local(
                name,
                "overflow",
                AppExceptionType::InternalError,
                &format!("circuit breaker overflow: {what}"),
            )),
            Ok(Err(Failed::NotSent(UpstreamError::Budget(e)))) => {
                // tern's own limit, not the endpoint's failing: another endpoint would not do.
                Next::Done(self.over_budget(name, &e))
            }
            Ok(Err(Failed::NotSent(e))) => {
                debug!(error = %e, "not sent; trying another endpoint");
                cluster.record_failure(endpoint, Failure::Gateway);
                Next::Retry
            }
            Ok(Err(Failed::Lost(UpstreamError::Budget(e)))) => {
                took(Instant::now());
                Next::Done(self.over_budget(name, &e))
            }
            Ok(Err(Failed::Lost(e))) => {
                took(Instant::now());
                cluster.record_failure(endpoint, Failure::Gateway);
                Next::Done(self.local(
                    name,
                    "upstream_reset",
                    AppExceptionType::InternalError,
                    &e.to_string(),
                ))
            }
            Err(_) => {
                took(Instant::now());
                cluster.record_failure(endpoint, Failure::Gateway);
                Next::Done(self.local(
                    name,
                    "timeout",
                    AppExceptionType::InternalError,
                    &format!("upstream request timeout after {:?}", self.timeout),
                ))
            }
        }
    }
}

/// What a cluster's pools need to know.
pub fn pool_settings(cfg: &Cluster, ctx: &Ctx) -> PoolSettings {
    PoolSettings {
        mark: ctx.mark,
        connect_timeout: cfg.connect_timeout,
        per_endpoint: cfg.connections_per_endpoint,
        max_connections: cfg.circuit_breakers.max_connections,
        max_pending: cfg.circuit_breakers.max_pending_requests,
        limits: ctx.limits,
        write_timeout: ctx.message_timeout,
    }
}

/// What an attempt leaves to do.
enum Next {
    /// Answer the client with this (nothing for a one-way call).
    Done(Option<Bytes>),
    /// Nothing reached the server: try another endpoint.
    Retry,
}

/// Counts a request as in flight to an endpoint while it lives (least request reads it).
struct ActiveEndpoint<'a>(&'a EndpointRuntime);

impl<'a> ActiveEndpoint<'a> {
    /// From `now`, when the attempt starts.
    #[inline]
    fn new(endpoint: &'a EndpointRuntime, now: Instant) -> Self {
        if endpoint.active.fetch_add(1, Ordering::Relaxed) == 0 {
            endpoint.latency.busy_from(now.into_std());
        }
        Self(endpoint)
    }
}

impl Drop for ActiveEndpoint<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
