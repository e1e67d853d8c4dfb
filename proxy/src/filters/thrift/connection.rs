//! A downstream connection: read requests as they come, plan each, execute them concurrently
//! (up to a bound), write the replies back in request order, batched.
use std::{future::Future, pin::Pin, sync::Arc, task::Poll};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{Instant, Sleep},
};
use tracing::{Instrument, debug, debug_span, warn};

use super::{
    ChainRef, MAX_BATCH, MAX_IN_FLIGHT, call::execute, read_buffer::ReadBuffer, routing::Downstream,
};
use crate::{
    budget::Held,
    filters::{Ctx, authz::Authz, ordered::Ordered},
    stream::{Stream, write_all_vectored_within},
};

/// Serves one downstream connection whose first bytes (`buf`) were Thrift.
pub async fn serve(
    down: Stream,
    buf: BytesMut,
    held: Held,
    chain: ChainRef,
    authz: Authz,
    ctx: Arc<Ctx>,
) {
    let _ = down.set_nodelay(true);
    let peer = down.peer_addr().ok();
    let source = peer.map(|a| a.ip());
    let (mut rd, mut wr) = down.into_split();
    let mut conn = Downstream::new(chain, ctx.clone(), source);
    conn.authz = Some(authz);
    // Requests in flight keep the chunk they were read into charged to the buffer budget.
    let mut rb = ReadBuffer::new(buf, held);
    // The budget has no room for more buffer: no reads until a request in flight is done.
    let mut starved = false;
    let mut replies = Ordered::default();
    // Replies ready to write together (kept, so its capacity is reused), and what the large
    // ones among them hold of the buffer budget until they are written.
    let mut out: Vec<Bytes> = Vec::with_capacity(MAX_BATCH);
    let mut out_held: Vec<Held> = Vec::new();
    // Draining serves every request until the drain's time is up (closing a connection
    // between requests would fail the client's next call, which may already be on its way);
    // then no new requests, only the replies in flight.
    let mut closing = ctx.closing.watch();
    let mut reading = !ctx.closing.was_posted();
    // A message must arrive whole within the message timeout of its first byte: one timer,
    // set when a partial message starts (or the one before it completed).
    let stall = tokio::time::sleep(ctx.message_timeout);
    let mut stall = std::pin::pin!(stall);
    let mut partial = false;
    let expiry = tokio::time::sleep(ctx.message_timeout);
    let mut expiry = ExpiryTimer {
        sleep: std::pin::pin!(expiry),
        armed: None,
        polled: false,
    };
    loop {
        let mut progressed = false;
        // One clock read for the requests this turn decodes: they came in the same read.
        let mut now = None;
        while reading && replies.len() < MAX_IN_FLIGHT {
            match conn.decoder.decode(&mut rb.buf) {
                Ok(Some(msg)) => {
                    rb.cut();
                    progressed = true;
                    let began = *now.get_or_insert_with(Instant::now);
                    let plan = conn.plan(msg);
                    let deadline = plan.deadline(began);
                    if let Some(at) = deadline {
                        expiry.arm(at);
                    }
                    let span = debug_span!("request", seq = plan.client_seq());
                    replies.push(deadline, |slot| {
                        execute(plan, &ctx, slot, began).instrument(span)
                    });
                    if conn.revoked {
                        debug!(
                            "the policy in force no longer allows the connection: no new requests"
                        );
                        reading = false;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    ctx.metrics.rejected(e.cause());
                    warn!(
                        peer = ?peer,
                        listener = %conn.chain().listener,
                        error = %e,
                        "closing a connection that sent malformed Thrift"
                    );
                    reading = false;
                }
            }
        }
        if reading
            && !starved
            && let Err(e) = rb.make_room()
        {
            if replies.is_empty() {
                ctx.metrics.rejected("buffer_budget");
                warn!(
                    peer = ?peer,
                    listener = %conn.chain().listener,
                    error = %e,
                    "closing a connection: no buffer left for it"
                );
                reading = false;
                rb.clear();
            } else {
                debug!(error = %e, "no buffer left: no reads until a request in flight is done");
                starved = true;
            }
        }
        // Nothing left to read or to answer (a malformed message, or no buffer for an idle
        // connection): done. Checked after the room is made, which may end the reading.
        if !reading && replies.is_empty() {
            break;
        }
        let now_partial = reading && !rb.buf.is_empty();
        if now_partial && (!partial || progressed) {
            stall.as_mut().reset(Instant::now() + ctx.message_timeout);
        }
        partial = now_partial;
        // In order: replies done go out before more requests are read (which the number in
        // flight bounds), and rare events before reads.
        tokio::select! {
            biased;
            Some(reply) = replies.next(), if !replies.is_empty() => {
                // This reply and every one already done behind it go out in one write.
                let (mut next, mut taken) = (Some(reply), 0);
                while let Some(answer) = next.take() {
                    out.extend(answer.bytes);
                    out_held.extend(answer.held);
                    rb.done();
                    taken += 1;
                    if taken < MAX_BATCH {
                        next = replies.next().now_or_never().flatten();
                    }
                }
                starved = false;
                // A client that stops reading is closed after the message timeout, with what
                // waits for it.
                let written = write_all_vectored_within(&mut wr, &out, ctx.message_timeout).await;
                out.clear();
                out_held.clear();
                if let Err(e) = written {
                    debug!(error = %e, "downstream write failed");
                    return;
                }
            },
            () = expiry.fired(), if expiry.armed.is_some() && !replies.is_empty() => {
                expiry.rearm(replies.expire(Instant::now()));
            },
            () = &mut stall, if partial => {
                ctx.metrics.rejected("message_timeout");
                debug!(bytes = rb.buf.len(), "a message took longer than its time: no new requests");
                reading = false;
                partial = false;
                rb.clear();
            },
            () = closing.changed(), if reading => {
                debug!("the drain's time is up: no new requests on this connection");
                reading = false;
            },
            read = rd.read_buf(&mut rb.buf), if reading && !starved && replies.len() < MAX_IN_FLIGHT => match read {
                Ok(0) => {
                    if !rb.buf.is_empty() {
                        ctx.metrics.rejected("truncated");
                        debug!(bytes = rb.buf.len(), "connection closed inside a message");
                    }
                    reading = false;
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %e, "downstream read failed");
                    reading = false;
                }
            },
        }
    }
    let _ = wr.shutdown().await;
}

/// The connection's one timer for its requests' deadlines, armed at the earliest deadline
/// known when it was set. It stays put when that request finishes first; when it fires, the
/// requests past their deadline are marked and it is armed at the earliest left. So a request
/// costs no timer of its own, and the timer moves about once per timeout. Once polled it
/// holds the task's waker until it fires, so it is polled again only when it was moved or
/// has fired, not on every turn of the connection.
struct ExpiryTimer<'a> {
    sleep: Pin<&'a mut Sleep>,
    /// When it is set for, while anything may wait on it.
    armed: Option<Instant>,
    /// Polled since it was last moved: it holds the task's waker.
    polled: bool,
}

impl ExpiryTimer<'_> {
    /// A request due `at` joined.
    fn arm(&mut self, at: Instant) {
        if self.armed.is_none_or(|armed| at < armed) {
            self.rearm(Some(at));
        }
    }

    /// Sets the timer for `next`, the earliest deadline left (none: nothing waits).
    fn rearm(&mut self, next: Option<Instant>) {
        self.armed = next;
        if let Some(at) = next {
            self.sleep.as_mut().reset(at);
            self.polled = false;
        }
    }

    /// Done when the timer fires.
    async fn fired(&mut self) {
        std::future::poll_fn(|cx| {
            if self.polled && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            self.polled = true;
            self.sleep.as_mut().poll(cx)
        })
        .await
    }
}
