//! A downstream connection: read requests as they come, plan each, execute them concurrently
//! (up to a bound), write the replies back in request order, batched.
use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{Instant, Sleep},
};
use tracing::{Instrument, debug, debug_span, warn};

use super::{
    ChainRef, MAX_BATCH, MAX_IN_FLIGHT,
    call::{Answer, execute},
    read_buffer::ReadBuffer,
    routing::{Downstream, Plan},
};
use crate::{
    budget::Held,
    filters::{
        Ctx,
        authz::Authz,
        ordered::{Ordered, SlotRefs},
    },
    stream::{Stream, WriteHalf, write_all_vectored_within},
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
    let (mut rd, mut wr) = down.into_split();
    let mut conn = Downstream::new(chain, ctx.clone(), peer.map(|a| a.ip()));
    conn.authz = Some(authz);
    // Draining serves every request until the drain's time is up (closing a connection
    // between requests would fail the client's next call, which may already be on its way);
    // then no new requests, only the replies in flight.
    let mut closing = ctx.closing.watch();
    let mut input = Input {
        conn,
        peer,
        rb: ReadBuffer::new(buf, held),
        reading: !ctx.closing.was_posted(),
        starved: false,
    };
    let mut replies = Ordered::default();
    let mut batch = Batch::new();
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
        let progressed =
            input.take_requests(&ctx, &mut replies, &mut expiry, |plan, slot, began| {
                let span = debug_span!("request", seq = plan.client_seq());
                execute(plan, &ctx, slot, began).instrument(span)
            });
        input.make_room(replies.is_empty(), &ctx);
        // Nothing left to read or to answer (a malformed message, or no buffer for an idle
        // connection): done. Checked after the room is made, which may end the reading.
        if !input.reading && replies.is_empty() {
            break;
        }
        let now_partial = input.reading && !input.rb.buf.is_empty();
        if now_partial && (!partial || progressed) {
            stall.as_mut().reset(Instant::now() + ctx.message_timeout);
        }
        partial = now_partial;
        // In order: replies done go out before more requests are read (which the number in
        // flight bounds), and rare events before reads.
        tokio::select! {
            biased;
            Some(reply) = replies.next(), if !replies.is_empty() => {
                let written = batch
                    .write(reply, &mut replies, &mut input.rb, &mut wr, ctx.message_timeout)
                    .await;
                if let Err(e) = written {
                    debug!(error = %e, "downstream write failed");
                    return;
                }
                input.starved = false;
            },
            () = expiry.fired(), if expiry.armed.is_some() && !replies.is_empty() => {
                expiry.rearm(replies.expire(Instant::now()));
            },
            () = &mut stall, if partial => {
                ctx.metrics.rejected("message_timeout");
                debug!(bytes = input.rb.buf.len(), "a message took longer than its time: no new requests");
                input.stop();
                partial = false;
            },
            () = closing.changed(), if input.reading => {
                debug!("the drain's time is up: no new requests on this connection");
                input.reading = false;
            },
            read = rd.read_buf(&mut input.rb.buf), if input.wants_read(replies.len()) => {
                input.read(read, &ctx);
            },
            // Nothing could make progress (the check above ends the loop first): close
            // rather than wait on nothing.
            else => break,
        }
    }
    let _ = wr.shutdown().await;
}

/// A connection's read side: its requests' routing, its buffer, and whether it reads on.
struct Input {
    conn: Downstream,
    peer: Option<SocketAddr>,
    rb: ReadBuffer,
    /// New requests are taken (not after the client's end, malformed input, a policy that no
    /// longer allows the connection, the drain's end or a message past its time).
    reading: bool,
    /// The budget has no room for more buffer: no reads until a request in flight is done.
    starved: bool,
}

impl Input {
    /// Cuts the whole requests the buffer holds (as many as may be in flight), plans each
    /// and starts it with `start`; returns whether any was cut.
    fn take_requests<F: Future>(
        &mut self,
        ctx: &Ctx,
        replies: &mut Ordered<F>,
        expiry: &mut ExpiryTimer<'_>,
        mut start: impl FnMut(Plan, SlotRefs, Instant) -> F,
    ) -> bool {
        let mut progressed = false;
        // One clock read for the requests this turn decodes: they came in the same read.
        let mut now = None;
        while self.reading && replies.len() < MAX_IN_FLIGHT {
            match self.conn.decoder.decode(&mut self.rb.buf) {
                Ok(Some(msg)) => {
                    self.rb.cut();
                    progressed = true;
                    let began = *now.get_or_insert_with(Instant::now);
                    let plan = self.conn.plan(msg);
                    let deadline = plan.deadline(began);
                    if let Some(at) = deadline {
                        expiry.arm(at);
                    }
                    replies.push(deadline, |slot| start(plan, slot, began));
                    if self.conn.revoked {
                        debug!(
                            "the policy in force no longer allows the connection: no new requests"
                        );
                        self.reading = false;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    ctx.metrics.rejected(e.cause());
                    warn!(
                        peer = ?self.peer,
                        listener = %self.conn.chain().listener,
                        error = %e,
                        "closing a connection that sent malformed Thrift"
                    );
                    self.reading = false;
                }
            }
        }
        progressed
    }

    /// Makes room for the next read within the buffer budget. Without room, a connection
    /// with requests in flight (`idle` false) waits for one to be done; an idle one can
    /// never go on, and reads no more.
    fn make_room(&mut self, idle: bool, ctx: &Ctx) {
        if !self.reading || self.starved {
            return;
        }
        let Err(e) = self.rb.make_room() else {
            return;
        };
        if idle {
            ctx.metrics.rejected("buffer_budget");
            warn!(
                peer = ?self.peer,
                listener = %self.conn.chain().listener,
                error = %e,
                "closing a connection: no buffer left for it"
            );
            self.stop();
        } else {
            debug!(error = %e, "no buffer left: no reads until a request in flight is done");
            self.starved = true;
        }
    }

    /// Whether to read now, with `in_flight` requests in flight.
    fn wants_read(&self, in_flight: usize) -> bool {
        self.reading && !self.starved && in_flight < MAX_IN_FLIGHT
    }

    /// What a read into the buffer gave.
    fn read(&mut self, read: std::io::Result<usize>, ctx: &Ctx) {
        match read {
            Ok(0) => {
                if !self.rb.buf.is_empty() {
                    ctx.metrics.rejected("truncated");
                    debug!(
                        bytes = self.rb.buf.len(),
                        "connection closed inside a message"
                    );
                }
                self.reading = false;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "downstream read failed");
                self.reading = false;
            }
        }
    }

    /// No new requests, and what is buffered of the next one is dropped.
    fn stop(&mut self) {
        self.reading = false;
        self.rb.clear();
    }
}

/// Replies written back together (kept, so its capacity is reused), and what the large ones
/// among them hold of the buffer budget until they are written.
struct Batch {
    bytes: Vec<Bytes>,
    held: Vec<Held>,
}

impl Batch {
    fn new() -> Self {
        Self {
            bytes: Vec::with_capacity(MAX_BATCH),
            held: Vec::new(),
        }
    }

    /// Writes `first` and every reply already done behind it (up to [`MAX_BATCH`]) in one
    /// write. A client that stops reading fails it after `timeout`, so it is closed with
    /// what waits for it.
    async fn write<F: Future<Output = Answer>>(
        &mut self,
        first: Answer,
        replies: &mut Ordered<F>,
        rb: &mut ReadBuffer,
        wr: &mut WriteHalf,
        timeout: Duration,
    ) -> std::io::Result<()> {
        let (mut next, mut taken) = (Some(first), 0);
        while let Some(answer) = next.take() {
            self.bytes.extend(answer.bytes);
            self.held.extend(answer.held);
            rb.done();
            taken += 1;
            if taken < MAX_BATCH {
                next = replies.next().now_or_never().flatten();
            }
        }
        let written = write_all_vectored_within(wr, &self.bytes, timeout).await;
        self.bytes.clear();
        self.held.clear();
        written
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::encoding::text::encode;
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::{filters::thrift::testing, thrift::frame::tests::framed_ping};

    /// A Thrift listener whose cluster's one endpoint refuses connections: each call is
    /// answered by tern itself, quickly.
    const CONFIG: &str = "listeners:\n  - address: 10.96.0.1:9090\n    filter_chains: [ { thrift_proxy: { default_cluster: a } } ]\n\
                          clusters:\n  - name: a\n    endpoints: [ { address: 127.0.0.1:1 } ]\n";
    const BUDGET: usize = 1 << 20;

    /// Serves a connection whose first bytes are `first` (read into a buffer with no spare
    /// room) while another connection holds the whole buffer budget; returns what the client
    /// read until the connection closed, and the metrics.
    async fn serve_with_the_budget_spent(first: &[u8]) -> (Vec<u8>, String) {
        let (ctx, chain, registry) = testing::ctx(CONFIG, BUDGET);
        let mut hog = ctx.budget.hold();
        hog.resize(BUDGET).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (down, peer) = listener.accept().await.unwrap();
        let authz = Authz::new(
            chain.clone(),
            Vec::new(),
            ctx.state.clone(),
            ctx.metrics.clone(),
            ctx.state.policy_changes(),
            peer,
            down.local_addr().unwrap(),
            None,
            None,
        );
        let mut buf = BytesMut::with_capacity(first.len());
        buf.extend_from_slice(first);
        let held = ctx.budget.hold();
        let served = serve(down.into(), buf, held, chain, authz, ctx.clone());
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the connection was served and closed");
        let mut read = Vec::new();
        client.read_to_end(&mut read).await.unwrap();
        let mut metrics = String::new();
        encode(&mut metrics, &registry).unwrap();
        (read, metrics)
    }

    /// With no buffer left in the budget, a connection with nothing in flight cannot read on:
    /// it is closed and counted, whether it had nothing yet or its requests were all
    /// answered. Before, it went on to wait with every branch of its loop disabled, and its
    /// task panicked.
    #[tokio::test]
    async fn a_connection_with_no_buffer_left_and_nothing_in_flight_is_closed() {
        let (read, metrics) = serve_with_the_budget_spent(&[]).await;
        assert!(read.is_empty(), "{read:?}");
        assert!(
            metrics.contains("thrift_frames_rejected_total{cause=\"buffer_budget\"} 1"),
            "{metrics}"
        );

        // A call in flight: no reads until it is answered; then the connection, idle, closes.
        let (read, metrics) = serve_with_the_budget_spent(&framed_ping()).await;
        assert!(read.len() > 4, "the call was answered: {read:?}");
        let len = u32::from_be_bytes(read[..4].try_into().unwrap()) as usize;
        assert_eq!(read.len(), 4 + len, "one reply, then the end: {read:?}");
        assert!(
            metrics.contains("thrift_frames_rejected_total{cause=\"buffer_budget\"} 1"),
            "{metrics}"
        );
    }
}
