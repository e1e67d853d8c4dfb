//! A downstream connection's read buffer and what it holds of the buffer budget. Requests are
//! cut from the buffer zero-copy, so each keeps the memory it was read into alive until it is
//! done: a chunk of the buffer stays charged to the budget while any request cut from it is
//! in flight, not only while it is the buffer being read into. Without that, requests in
//! flight (up to 128 per connection, each up to the frame limit) held memory the budget
//! never saw.
use bytes::BytesMut;

use crate::budget::{Exhausted, Held, most_after_reserve};

/// Spare room a read needs; below it the buffer grows by [`GROWTH`].
const MIN_SPARE: usize = 4096;
/// How much the buffer grows by when it runs short.
const GROWTH: usize = 64 * 1024;

/// A chunk the buffer has moved on from, kept alive by requests still in flight.
#[derive(Debug)]
struct Retired {
    bytes: usize,
    live: usize,
}

#[derive(Debug)]
pub struct ReadBuffer {
    pub buf: BytesMut,
    held: Held,
    /// The size of the allocation `buf` is in now (its capacity when it was last grown;
    /// cutting requests off its front shrinks `buf`'s capacity, not the allocation).
    chunk: usize,
    /// Requests cut from the current chunk and still in flight.
    live: usize,
    /// Older chunks with requests in flight, oldest first; requests finish in the order they
    /// were cut, so the oldest chunk is always the next to lose one.
    retired: std::collections::VecDeque<Retired>,
    retired_bytes: usize,
}

impl ReadBuffer {
    /// `buf` (its capacity already held by `held`) as a connection's read buffer.
    pub fn new(buf: BytesMut, held: Held) -> Self {
        let chunk = buf.capacity();
        let mut this = Self {
            buf,
            held,
            chunk,
            live: 0,
            retired: Default::default(),
            retired_bytes: 0,
        };
        this.account();
        this
    }

    /// A request was cut from the front of the buffer: its chunk stays charged until
    /// [`ReadBuffer::done`] is called for it.
    pub fn cut(&mut self) {
        self.live += 1;
    }

    /// The oldest request still in flight is done (requests finish in the order they were
    /// cut, as replies are written in order): a chunk it was the last request of is no
    /// longer charged.
    pub fn done(&mut self) {
        match self.retired.front_mut() {
            Some(oldest) => {
                oldest.live -= 1;
                if oldest.live == 0 {
                    self.retired_bytes -= oldest.bytes;
                    self.retired.pop_front();
                    self.account();
                }
            }
            None => self.live = self.live.saturating_sub(1),
        }
    }

    /// Makes room for a read, within the budget. Refused (nothing changed) when the budget
    /// cannot take a larger buffer: the connection then holds what it has until requests in
    /// flight finish, or, with none in flight, cannot go on.
    pub fn make_room(&mut self) -> Result<(), Exhausted> {
        if self.buf.capacity() - self.buf.len() >= MIN_SPARE {
            return Ok(());
        }
        // Requests in flight keep the current allocation alive: growing moves the unread
        // bytes to a new one, and the old one stays charged until they are done.
        let retiring = self.live > 0;
        let retired_bytes = self.retired_bytes + if retiring { self.chunk } else { 0 };
        self.held
            .resize(retired_bytes.saturating_add(most_after_reserve(&self.buf, GROWTH)))?;
        if retiring {
            self.retired.push_back(Retired {
                bytes: self.chunk,
                live: self.live,
            });
            self.retired_bytes = retired_bytes;
            self.live = 0;
        }
        self.buf.reserve(GROWTH);
        self.chunk = self.buf.capacity();
        self.account();
        Ok(())
    }

    /// Drops what is buffered (a connection that will read no more).
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// Holds what the buffer's chunks take now (memory that exists: growth was held, as an
    /// estimate, before it happened).
    fn account(&mut self) {
        self.held.set(self.retired_bytes.saturating_add(self.chunk));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::BufferBudget;

    #[test]
    fn chunks_stay_charged_while_requests_cut_from_them_are_in_flight() {
        let budget = BufferBudget::new(16 << 20);
        let mut rb = ReadBuffer::new(BytesMut::new(), budget.hold());
        rb.make_room().unwrap();
        let first = budget.used();
        assert!(first >= GROWTH, "{first}");
        // Fill the chunk with two requests and cut them (both in flight).
        let cap = rb.buf.capacity();
        rb.buf.resize(cap, 0);
        let a = rb.buf.split_to(cap / 2);
        rb.cut();
        let b = rb.buf.split_to(rb.buf.len());
        rb.cut();
        // Growing moves on to a new chunk; the old one stays charged.
        rb.make_room().unwrap();
        assert!(budget.used() >= first + GROWTH, "{}", budget.used());
        // A request from the new chunk is in flight too.
        rb.buf.resize(10, 0);
        let c = rb.buf.split_to(10);
        rb.cut();
        rb.done();
        drop(a);
        assert!(
            budget.used() >= first + GROWTH,
            "the old chunk has a request in flight"
        );
        rb.done();
        drop(b);
        assert_eq!(budget.used(), rb.chunk, "only the current chunk is charged");
        rb.done();
        drop(c);
        drop(rb);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn growth_past_the_budget_is_refused_and_changes_nothing() {
        let budget = BufferBudget::new(3 * GROWTH);
        let mut rb = ReadBuffer::new(BytesMut::new(), budget.hold());
        rb.make_room().unwrap();
        let mut in_flight = Vec::new();
        let refused = loop {
            let len = rb.buf.capacity();
            rb.buf.resize(len, 0);
            in_flight.push(rb.buf.split_to(len));
            rb.cut();
            let before = budget.used();
            if let Err(e) = rb.make_room() {
                assert_eq!(budget.used(), before, "a refusal holds nothing more");
                break e;
            }
        };
        assert_eq!(refused.limit, 3 * GROWTH);
        assert!(budget.used() <= 3 * GROWTH);
        // Once the requests are done, there is room again.
        for _ in in_flight.drain(..) {
            rb.done();
        }
        rb.make_room().unwrap();
    }
}
