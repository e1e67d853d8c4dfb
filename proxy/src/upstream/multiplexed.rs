//! Multiplexed connections (a cluster opts in, for servers that answer out of order): the
//! requests of many downstream connections share a few connections to one endpoint.
//!
//! Each request gets a sequence id that is free on the connection it is sent on and is
//! rewritten in place; the reply's id is mapped back to the client's and rewritten again. In
//! compact protocol ids are varints: a request's upstream id is chosen with the same encoded
//! length as the client's, so both rewrites fit the bytes exactly. A request that gives up
//! (times out) keeps its id reserved until its reply arrives or the connection closes, so a
//! late reply can never be mapped to a newer request; a connection whose ids run out, or that
//! holds 1,024 of them (its server stopped answering), takes no new requests and closes when
//! its live requests are done — answered, or given up at their timeout. One-way calls are
//! written and done, and count against the circuit breakers until written. The write queue
//! is bounded in requests and in bytes, and what waits in it beyond 64 KiB is charged to the
//! buffer budget; what is queued must be written within the message timeout, or the
//! connection closes. So a server that reads slowly, or not at all, cannot make tern hold its
//! callers' large or one-way calls, or those that timed out, beyond those bounds, nor for
//! longer than that.
//! A connection that fails to connect hands every queued request back (for a retry on
//! another endpoint); one that closes fails its requests in flight. Its read buffer grows
//! past its usual size, for a large reply, within the buffer budget (a connection the budget
//! cannot take closes), and a large reply takes its share of the budget with it to the
//! client.
use std::{
    collections::HashMap,
    io,
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tracing::debug;

use super::{
    ActiveRequest, Closed, ClusterRuntime, EndpointRuntime, Failed, Mismatch, Pool, PoolSettings,
    ReplyCell, UpstreamError, answers_by_name, reply_buffer::ReplyBuffer, restore_client_seq,
};
use crate::{
    budget::{Backlog, BufferBudget, Held},
    stream::write_all_vectored_within,
    thrift::{
        Decoder, Message, MessageType, Protocol, Transport,
        frame::{seq_class_size, seq_id_in_class},
    },
};

/// Requests queued for writing on one connection before new ones overflow.
const WRITE_QUEUE: usize = 1024;
/// Bytes queued for writing on one connection before new requests overflow (as Envoy's
/// per-connection buffer limit): one server that reads slowly takes this much of the buffer
/// budget per connection, not all of it.
const WRITE_QUEUE_BYTES: usize = 4 << 20;
/// Requests a connection holds ids for (waiting, or given up with no reply yet) before it
/// takes no more.
const MAX_WAITING: usize = 1024;
/// Queued requests written together, at most.
const WRITE_BATCH: usize = 64;
/// Requests waiting for their replies on every connection to an endpoint before another
/// opens (while `connections_per_endpoint` allows). Requests that share a connection go out
/// in one write and their replies come back in one read: spreading the requests of one turn
/// over a connection each (as opening one whenever all were busy did) cost a write and a read
/// per request, and 1.7 times the system calls per request of a filled connection.
const DEPTH_BEFORE_ANOTHER: usize = 8;
/// A connection's read buffer, and the size of reply that is charged to the buffer budget
/// (the buffer's growth past it, and each reply larger than it, while the client has it).
const READ_BUFFER: usize = 64 * 1024;
/// Room a read needs in the read buffer; below it the buffer makes more.
const MIN_SPARE: usize = 4096;
/// How often a retiring connection looks whether its last live request gave up.
const RETIRED_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// A request handed back unsent, with the reason.
pub type Refused = (UpstreamError, Message);

/// What to wait for after sending.
pub enum Sent {
    /// The reply comes to the [`ReplyCell`] given to [`Pool::send`]; these are the request's
    /// bytes as sent (a shared handle, not a copy) for naming a local reply or retrying
    /// elsewhere if the connection never opens.
    Reply(Bytes),
    /// A one-way call (its bytes as sent): nothing comes back.
    Oneway(Bytes),
}

/// Bytes to write, with what keeps a one-way call counted until it is written.
type Queued = (Bytes, Option<ActiveRequest>);

const CONNECTING: u8 = 0;
const OPEN: u8 = 1;
const CLOSED: u8 = 2;

/// The multiplexed connections to one endpoint.
#[derive(Debug, Default)]
pub(super) struct Conns(Mutex<Vec<Arc<Conn>>>);

#[derive(Debug)]
struct Conn {
    format: (Transport, Protocol),
    tx: mpsc::Sender<Queued>,
    state: AtomicU8,
    inflight: AtomicUsize,
    pending: Mutex<Pending>,
    /// Takes no new requests; closes once no live request waits on it.
    retiring: AtomicBool,
    /// The connection's task, woken when it retires (a waker the task polls beside every
    /// read and write: a `Notify` took its waiter list's lock on each of those polls).
    wake: AtomicWaker,
}

#[derive(Debug)]
struct Pending {
    /// By upstream id. tern chooses the ids and a reply's id only looks one up, so the map
    /// hashes with foldhash (SipHash was 2.4% of a multiplexed request's instructions).
    waiting: HashMap<i32, Waiter, foldhash::fast::RandomState>,
    /// Next candidate id per varint length class (0: binary).
    next: [u32; 6],
    /// Requests queued while connecting (counted against max pending requests).
    queued: usize,
    /// The bytes of the requests waiting to be written, within the buffer budget.
    unwritten: Backlog,
    closed: bool,
}

#[derive(Debug)]
struct Waiter {
    client_seq: i32,
    cell: Arc<ReplyCell>,
    generation: u64,
    /// The request's method name, for checking that the reply is its own: a copy, not a
    /// slice of the request, which would hold the downstream connection's whole read buffer
    /// for as long as a reply that may never come (its caller long gone).
    name: SmallVec<[u8; 64]>,
}

impl Waiter {
    fn new(
        client_seq: i32,
        (cell, generation): (Arc<ReplyCell>, u64),
        request: &[u8],
        name: Range<usize>,
    ) -> Self {
        Self {
            client_seq,
            cell,
            generation,
            name: SmallVec::from_slice(request.get(name).unwrap_or_default()),
        }
    }
}

impl Pending {
    fn new(budget: &Arc<BufferBudget>) -> Self {
        Self {
            waiting: HashMap::default(),
            next: [0; 6],
            queued: 0,
            unwritten: Backlog::new(budget),
            closed: false,
        }
    }

    /// Counts `len` more bytes to write: refused past the queue's own bound (unless it is
    /// empty: any one message fits) or the buffer budget.
    fn enqueue(&mut self, len: usize) -> Result<(), UpstreamError> {
        let waiting = self.unwritten.bytes();
        if waiting > 0 && waiting.saturating_add(len) > WRITE_QUEUE_BYTES {
            return Err(UpstreamError::Overflow("upstream write queue"));
        }
        Ok(self.unwritten.add(len)?)
    }

    /// A free id in the class: any non-negative i32 for binary; for compact, one whose
    /// varint has exactly `len` bytes.
    fn allocate(&mut self, len: usize) -> Option<i32> {
        let tries = (self.waiting.len() as u64 + 1).min(seq_class_size(len));
        for _ in 0..tries {
            let id = seq_id_in_class(len, self.next[len]);
            self.next[len] = self.next[len].wrapping_add(1);
            if !self.waiting.contains_key(&id) {
                return Some(id);
            }
        }
        None
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
        // What was queued goes with the connection's task.
        p.unwritten.clear();
        self.state.store(CLOSED, Ordering::Release);
        for (_, w) in p.waiting.drain() {
            w.cell.complete(w.generation, Err(reason()));
        }
        self.inflight.store(0, Ordering::Relaxed);
    }

    /// Takes no new requests from now on; closes once no live request waits.
    fn retire(&self) {
        self.retiring.store(true, Ordering::Release);
        self.wake.wake();
    }

    /// Whether a retiring connection has no live request left (abandoned ones, whose
    /// callers timed out, do not hold it open).
    fn done(&self) -> bool {
        if !self.retiring.load(Ordering::Acquire) {
            return false;
        }
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.waiting.values().all(|w| !w.cell.waiting(w.generation))
    }
}

impl Conns {
    /// Every connection takes no new requests; each closes when its live requests are done.
    pub(super) fn retire(&self) {
        let mut conns = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.drain(..) {
            c.retire();
        }
    }
}

/// Sends a request to `endpoint` on a multiplexed connection of its transport and protocol,
/// opening one when none is free and the cluster's limits allow.
#[expect(
    clippy::result_large_err,
    reason = "the refused request is handed back by value; boxing would allocate per request"
)]
pub fn send(
    endpoint: &Arc<EndpointRuntime>,
    msg: Message,
    (settings, budget): (&PoolSettings, &Arc<BufferBudget>),
    cluster: &Arc<ClusterRuntime>,
    reply_to: (&Arc<ReplyCell>, u64),
) -> Result<Sent, Refused> {
    endpoint
        .traffic()
        .pool()
        .send(endpoint, msg, (settings, budget), cluster, reply_to)
}

impl Pool {
    #[expect(
        clippy::result_large_err,
        reason = "the refused request is handed back by value; boxing would allocate per request"
    )]
    fn send(
        &self,
        endpoint: &Arc<EndpointRuntime>,
        mut msg: Message,
        (settings, budget): (&PoolSettings, &Arc<BufferBudget>),
        cluster: &Arc<ClusterRuntime>,
        reply_to: (&Arc<ReplyCell>, u64),
    ) -> Result<Sent, Refused> {
        let meta = msg.meta();
        let format = (meta.transport, meta.protocol);
        let conn = match self.connection(endpoint, format, (settings, budget), cluster) {
            Ok(c) => c,
            Err(e) => return Err((e, msg)),
        };
        let oneway = msg.kind() == MessageType::Oneway;
        let class = msg.seq_class();
        let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.closed {
            return Err((UpstreamError::Closed(Closed::Already), msg));
        }
        let Ok(slot) = conn.tx.try_reserve() else {
            return Err((UpstreamError::Overflow("upstream write queue"), msg));
        };
        if conn.state() == CONNECTING {
            if cluster.pending_requests.load(Ordering::Relaxed) >= settings.max_pending {
                return Err((UpstreamError::Overflow("max_pending_requests"), msg));
            }
            cluster.pending_requests.fetch_add(1, Ordering::Relaxed);
            p.queued += 1;
        }
        if oneway {
            // Nothing comes back, so the sequence id needs no rewriting; the call counts
            // against the circuit breakers until it is written.
            if let Err(e) = p.enqueue(msg.as_bytes().len()) {
                return Err((e, msg));
            }
            let bytes = msg.into_bytes();
            slot.send((bytes.clone(), Some(ActiveRequest::new(cluster.clone()))));
            return Ok(Sent::Oneway(bytes));
        }
        let Some(id) = p.allocate(class) else {
            // Ids held by requests that timed out: this connection takes no more.
            conn.retire();
            return Err((
                UpstreamError::Overflow("sequence ids on the connection"),
                msg,
            ));
        };
        let client_seq = msg.seq_id();
        if msg.set_seq_id(id).is_err() {
            return Err((UpstreamError::Overflow("sequence id length"), msg));
        }
        if let Err(e) = p.enqueue(msg.as_bytes().len()) {
            return Err((e, msg));
        }
        let (cell, generation) = reply_to;
        // Sent while holding the lock, so a connection closing now drains this waiter.
        let bytes = msg.into_bytes();
        p.waiting.insert(
            id,
            Waiter::new(
                client_seq,
                (cell.clone(), generation),
                &bytes,
                meta.name_range(),
            ),
        );
        conn.inflight.fetch_add(1, Ordering::Relaxed);
        if p.waiting.len() >= MAX_WAITING {
            // A connection whose server stopped answering keeps the id of every request sent
            // on it (so a late reply cannot reach another request): at the bound it takes no
            // more, and closes once none of them still waits.
            conn.retire();
        }
        slot.send((bytes.clone(), None));
        Ok(Sent::Reply(bytes))
    }

    fn connection(
        &self,
        endpoint: &Arc<EndpointRuntime>,
        format: (Transport, Protocol),
        (settings, budget): (&PoolSettings, &Arc<BufferBudget>),
        cluster: &Arc<ClusterRuntime>,
    ) -> Result<Arc<Conn>, UpstreamError> {
        let mut conns = self.multiplexed.0.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| c.state() != CLOSED && !c.retiring.load(Ordering::Acquire));
        let same = conns.iter().filter(|c| c.format == format);
        let count = same.clone().count();
        let least = same
            .min_by_key(|c| c.inflight.load(Ordering::Relaxed))
            .cloned();
        let busy = least
            .as_ref()
            .is_none_or(|c| c.inflight.load(Ordering::Relaxed) >= DEPTH_BEFORE_ANOTHER);
        if !(busy && count < settings.per_endpoint) {
            return least.ok_or(UpstreamError::Overflow("connections"));
        }
        if !super::reserve_connection(cluster, settings.max_connections) {
            return least.ok_or(UpstreamError::Overflow("max_connections"));
        }
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let conn = Arc::new(Conn {
            format,
            tx,
            state: AtomicU8::new(CONNECTING),
            inflight: AtomicUsize::new(0),
            pending: Mutex::new(Pending::new(budget)),
            retiring: AtomicBool::new(self.retired()),
            wake: AtomicWaker::new(),
        });
        cluster.metrics().connections_opened.inc();
        tokio::spawn(run(
            conn.clone(),
            endpoint.clone(),
            (*settings, budget.clone()),
            rx,
            cluster.clone(),
            self.open.clone(),
        ));
        conns.push(conn.clone());
        Ok(conn)
    }
}

async fn run(
    conn: Arc<Conn>,
    endpoint: Arc<EndpointRuntime>,
    (settings, budget): (PoolSettings, Arc<BufferBudget>),
    mut rx: mpsc::Receiver<Queued>,
    cluster: Arc<ClusterRuntime>,
    open: Arc<AtomicUsize>,
) {
    let addr = endpoint.address;
    // The reply buffer first: without room for it, nothing is sent.
    let mut replies = ReplyBuffer::new(READ_BUFFER, &budget);
    let connected = match replies.make_room(MIN_SPARE) {
        Ok(()) => super::dial::dial(&endpoint, &cluster, settings.mark, settings.connect_timeout)
            .await
            .map_err(|e| UpstreamError::ConnectFailed(addr, e)),
        Err(e) => Err(UpstreamError::Budget(e)),
    };
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
            debug!(%addr, error = %e, "upstream connection not opened");
            conn.close(|| Failed::NotSent(e.clone()));
            super::release_connection(&cluster);
            return;
        }
    };
    open.fetch_add(1, Ordering::Relaxed);
    cluster.metrics().connections_gauge.inc();
    let (mut rd, mut wr) = stream.into_split();
    let (transport, protocol) = conn.format;
    let reader = async {
        let mut decoder = Decoder::configured(settings.limits, transport, protocol, false);
        loop {
            loop {
                match decoder.decode(&mut replies.buf) {
                    Ok(Some(reply)) => {
                        // A large reply takes its charge with it; the buffer keeps the rest.
                        let charge = (reply.as_bytes().len() > READ_BUFFER).then(|| {
                            let mut charge = budget.hold();
                            charge.set(reply.as_bytes().len());
                            replies.charge_what_is_left();
                            charge
                        });
                        if let Err(why) = deliver(&conn, reply, charge) {
                            return UpstreamError::Closed(Closed::Mismatch(why));
                        }
                        if conn.done() {
                            return UpstreamError::Closed(Closed::EndpointRemoved);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return UpstreamError::Closed(Closed::InvalidReply(addr, e));
                    }
                }
            }
            if let Err(e) = replies.fill(&mut rd, MIN_SPARE, addr).await {
                return e;
            }
        }
    };
    let writer = async {
        // What is queued goes out together, in one vectored write of the requests' own
        // bytes (no copy); one-way calls stay counted until written.
        let mut queued: Vec<Queued> = Vec::with_capacity(WRITE_BATCH);
        let mut out: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
        let mut counted: Vec<ActiveRequest> = Vec::new();
        while rx.recv_many(&mut queued, WRITE_BATCH).await > 0 {
            for (bytes, count) in queued.drain(..) {
                out.push(bytes);
                counted.extend(count);
            }
            write_all_vectored_within(&mut wr, &out, settings.write_timeout).await?;
            let written = out.iter().map(Bytes::len).sum();
            conn.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unwritten
                .remove(written);
            out.clear();
            counted.clear();
        }
        Ok::<_, io::Error>(())
    };
    let retired = async {
        std::future::poll_fn(|cx| {
            conn.wake.register(cx.waker());
            if conn.retiring.load(Ordering::Acquire) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        // A live request ends with its reply (the reader looks then) or by giving up at its
        // timeout, which wakes nobody: a server that never answers would hold the connection
        // open for good. So a retiring connection also looks now and then.
        while !conn.done() {
            tokio::time::sleep(RETIRED_CHECK).await;
        }
    };
    let reason = tokio::select! {
        reason = reader => reason,
        w = writer => UpstreamError::Closed(match w {
            Ok(()) => Closed::PoolDropped,
            Err(e) => Closed::Write(addr, e.kind()),
        }),
        () = retired => UpstreamError::Closed(Closed::EndpointRemoved),
    };
    debug!(%addr, %reason, "upstream connection closed");
    conn.close(|| Failed::Lost(reason.clone()));
    open.fetch_sub(1, Ordering::Relaxed);
    cluster.metrics().connections_gauge.dec();
    super::release_connection(&cluster);
}

/// Hands a reply to the request it answers; an error closes the connection. A reply to a
/// request that gave up is dropped, and only then is its id free again.
fn deliver(conn: &Conn, mut reply: Message, charge: Option<Held>) -> Result<(), Mismatch> {
    let id = reply.seq_id();
    let waiter = {
        let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.waiting.remove(&id)
    };
    let Some(w) = waiter else {
        return Err(Mismatch::Unsolicited(id));
    };
    conn.inflight.fetch_sub(1, Ordering::Relaxed);
    if let Err(why) =
        answers_by_name(&w.name, &reply).and_then(|()| restore_client_seq(&mut reply, w.client_seq))
    {
        // The connection closes for this; the request learns it now, not at its timeout.
        w.cell.complete(
            w.generation,
            Err(Failed::Lost(UpstreamError::Mismatch(why.clone()))),
        );
        return Err(why);
    }
    if !w.cell.waiting(w.generation) {
        debug!(seq = id, "late reply to a request that gave up: dropped");
        return Ok(());
    }
    w.cell.complete_held(w.generation, Ok(reply), charge);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_ids_keep_their_varint_length() {
        let mut p = Pending::new(&BufferBudget::new(0));
        for len in 1..=5 {
            for _ in 0..300 {
                let id = p.allocate(len).unwrap();
                assert_eq!(crate::thrift::wire::varint_len(id as u32), len, "{id}");
            }
        }
    }

    #[test]
    fn ids_in_use_are_skipped_and_a_full_class_is_refused() {
        let mut p = Pending::new(&BufferBudget::new(0));
        for _ in 0..128 {
            let id = p.allocate(1).unwrap();
            let cell = Arc::new(ReplyCell::default());
            let generation = cell.begin();
            p.waiting
                .insert(id, Waiter::new(0, (cell, generation), &[], 0..0));
        }
        assert_eq!(p.waiting.len(), 128);
        assert_eq!(p.allocate(1), None);
    }

    #[test]
    fn a_waiter_copies_its_requests_method_name() {
        let request = b"....calc.add....";
        let cell = Arc::new(ReplyCell::default());
        let generation = cell.begin();
        let w = Waiter::new(7, (cell, generation), request, 4..12);
        assert_eq!(&w.name[..], b"calc.add");
        let out_of_range = Waiter::new(7, (w.cell.clone(), generation), request, 10..99);
        assert!(
            out_of_range.name.is_empty(),
            "a range past the request names nothing"
        );
    }
}
