//! A pool connection's read buffer. Replies are cut from it zero-copy, so each keeps the
//! allocation it was read into alive until it is written. The buffer's usual size is the
//! connection's own and is not charged to the buffer budget, but is allocated only while the
//! budget has room for it; growth beyond it is charged. When the buffer moves on from an
//! allocation that replies still hold (to make room, or because its connection closes), that
//! allocation is charged until the last of them is gone ([`BufferBudget::keep`]). Without
//! that, replies waiting for a client that does not read, up to 128 per client connection and
//! each holding an allocation of 16 or 64 KiB, held memory the budget never saw.
use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Closed, UpstreamError};
use crate::budget::{BufferBudget, Exhausted, Held};

#[derive(Debug)]
pub struct ReplyBuffer {
    pub buf: BytesMut,
    usual: usize,
    /// The size of the allocation `buf` is in (cutting replies off its front shrinks `buf`'s
    /// capacity, not the allocation).
    chunk: usize,
    /// What the allocation takes beyond the usual size.
    grown: Held,
}

impl ReplyBuffer {
    /// A buffer of the `usual` size, allocated by the first [`ReplyBuffer::make_room`].
    pub fn new(usual: usize, budget: &Arc<BufferBudget>) -> Self {
        Self {
            buf: BytesMut::new(),
            usual,
            chunk: 0,
            grown: budget.hold(),
        }
    }

    /// Reads more of what `addr` sends on `rd`, with room made for at least `min_spare`
    /// bytes first. An end or error of the connection, or no room in the budget, is why it
    /// can read no more.
    pub async fn fill(
        &mut self,
        rd: &mut (impl AsyncRead + Unpin),
        min_spare: usize,
        addr: SocketAddr,
    ) -> Result<(), UpstreamError> {
        self.make_room(min_spare)?;
        match rd.read_buf(&mut self.buf).await {
            Ok(0) => Err(UpstreamError::Closed(Closed::ByPeer(addr))),
            Ok(_) => Ok(()),
            Err(e) => Err(UpstreamError::Closed(Closed::Read(addr, e.kind()))),
        }
    }

    /// Makes room for a read of at least `min_spare` bytes: in place when no reply holds the
    /// allocation any more, else in a new one (of the usual size, or twice what a large
    /// message has so far). Refused when the budget has no room for the new allocation; the
    /// buffer may then have lost what it held, and the connection cannot read on.
    pub fn make_room(&mut self, min_spare: usize) -> Result<(), Exhausted> {
        let len = self.buf.len();
        if self.buf.capacity() - len >= min_spare {
            return Ok(());
        }
        let capacity = len
            .saturating_mul(2)
            .max(self.usual)
            .max(len.saturating_add(min_spare));
        if self.buf.try_reclaim(capacity - len) {
            return Ok(());
        }
        let budget = self.grown.budget().clone();
        let old = std::mem::take(&mut self.buf).freeze();
        let held = self.chunk > 0 && !old.is_unique();
        if held {
            // Replies still hold the old allocation: it stays, charged until they are gone.
            budget.keep(old.clone(), self.chunk);
        }
        // A new allocation of the usual size, beside what is kept (or the first one).
        let adds_usual = held || self.chunk == 0;
        self.chunk = 0;
        if adds_usual {
            budget.has_room(self.usual)?;
        }
        self.grown.resize(capacity.saturating_sub(self.usual))?;
        let mut fresh = BytesMut::with_capacity(capacity);
        fresh.extend_from_slice(&old);
        self.chunk = fresh.capacity();
        self.buf = fresh;
        Ok(())
    }

    /// Charges only what is left of the allocation beyond the usual size, once a large
    /// reply cut from it took its own charge along.
    pub fn charge_what_is_left(&mut self) {
        self.grown
            .set(self.buf.capacity().saturating_sub(self.usual));
    }

    /// When the buffer is empty and its allocation grew for a large reply, lets that reply
    /// take the allocation along, with its charge (returned: the whole allocation), so a
    /// large reply does not keep the connection reading into a large buffer; the next
    /// [`ReplyBuffer::make_room`] starts a buffer of the usual size.
    pub fn hand_over_if_grown(&mut self) -> Option<Held> {
        if !self.buf.is_empty() || self.chunk <= self.usual {
            return None;
        }
        self.buf = BytesMut::new();
        let fresh = self.grown.budget().hold();
        let mut charge = std::mem::replace(&mut self.grown, fresh);
        charge.set(std::mem::take(&mut self.chunk));
        Some(charge)
    }
}

impl Drop for ReplyBuffer {
    fn drop(&mut self) {
        // Replies still waiting to be written keep the allocation: it stays charged.
        let old = std::mem::take(&mut self.buf).freeze();
        self.grown.budget().keep(old, self.chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USUAL: usize = 16 * 1024;

    /// A buffer of the usual size, allocated.
    fn buffer(budget: &Arc<BufferBudget>) -> ReplyBuffer {
        let mut rb = ReplyBuffer::new(USUAL, budget);
        rb.make_room(1024).unwrap();
        assert_eq!(rb.buf.capacity(), USUAL);
        rb
    }

    /// Fills `rb` with `n` bytes and cuts them off as a reply.
    fn reply(rb: &mut ReplyBuffer, n: usize) -> bytes::Bytes {
        rb.buf.extend_from_slice(&vec![7; n]);
        rb.buf.split().freeze()
    }

    #[test]
    fn an_allocation_replies_still_hold_is_charged_until_they_are_gone() {
        let budget = BufferBudget::new(1 << 20);
        let mut rb = buffer(&budget);
        let first = reply(&mut rb, USUAL - 512);
        assert_eq!(budget.used(), 0, "the usual buffer is not charged");
        rb.make_room(1024).unwrap();
        assert_eq!(budget.used(), USUAL, "the reply holds the old allocation");
        let second = reply(&mut rb, 100);
        drop(first);
        assert_eq!(budget.sweep(), 0, "nothing holds it any more");
        // The reply cut from the current allocation holds it when the connection closes.
        drop(rb);
        assert_eq!(budget.used(), USUAL);
        drop(second);
        assert_eq!(budget.sweep(), 0);
    }

    #[test]
    fn an_allocation_no_reply_holds_is_reused_in_place() {
        let budget = BufferBudget::new(1 << 20);
        let mut rb = buffer(&budget);
        let at = rb.buf.as_ptr();
        drop(reply(&mut rb, USUAL - 512));
        rb.make_room(1024).unwrap();
        assert_eq!(rb.buf.as_ptr(), at, "the same allocation");
        assert_eq!(budget.used(), 0);
        drop(rb);
        assert_eq!(budget.used(), 0, "nothing to keep");
    }

    #[test]
    fn a_large_message_grows_the_buffer_within_the_budget() {
        let budget = BufferBudget::new(USUAL);
        let mut rb = buffer(&budget);
        rb.buf.extend_from_slice(&vec![7; USUAL - 100]);
        rb.make_room(1024).unwrap();
        assert!(rb.buf.capacity() >= 2 * (USUAL - 100));
        assert_eq!(budget.used(), USUAL - 200, "growth beyond the usual size");
        // Growing again does not fit.
        rb.buf.resize(rb.buf.capacity(), 7);
        assert_eq!(rb.make_room(1024).unwrap_err().limit, USUAL);
        assert_eq!(budget.used(), USUAL - 200, "a refusal holds nothing more");
        drop(rb);
        // A message leaves with the allocation and a charge for all of it; the next read
        // is into a buffer of the usual size.
        let mut rb = buffer(&budget);
        rb.buf.extend_from_slice(&vec![7; USUAL - 100]);
        rb.make_room(1024).unwrap();
        let large = rb.buf.split().freeze();
        let charge = rb.hand_over_if_grown().expect("grown");
        assert_eq!(budget.used(), 2 * (USUAL - 100));
        drop(rb);
        assert_eq!(budget.used(), 2 * (USUAL - 100), "the message holds it");
        drop((large, charge));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn no_new_buffer_while_the_budget_cannot_take_one() {
        let budget = BufferBudget::new(2 * USUAL + USUAL / 2);
        let mut a = buffer(&budget);
        let mut b = buffer(&budget);
        let held_a = reply(&mut a, USUAL - 512);
        let held_b = reply(&mut b, USUAL - 512);
        a.make_room(1024).unwrap();
        assert_eq!(budget.used(), USUAL, "the allocation a's reply holds");
        assert!(
            b.make_room(1024).is_err(),
            "no room for a new buffer beside two held allocations"
        );
        assert_eq!(budget.used(), 2 * USUAL, "what exists is charged");
        assert!(ReplyBuffer::new(USUAL, &budget).make_room(1024).is_err());
        drop((held_a, held_b));
        assert_eq!(budget.sweep(), 0);
        b.make_room(1024).unwrap();
        drop((a, b));
        assert_eq!(budget.used(), 0);
    }
}
