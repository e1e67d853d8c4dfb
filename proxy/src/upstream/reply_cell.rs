//! Where the reply to a multiplexed request is delivered, without a channel per request.
use std::sync::Mutex;

use futures_util::task::AtomicWaker;

use super::Reply;
use crate::budget::Held;

/// A reply, with what it holds of the buffer budget (a large one) until it is written.
type Delivered = (Reply, Option<Held>);

/// A cell is reused by one request after another (it is allocated once per in-flight slot of
/// a downstream connection, not per request); each request is a new generation, so a reply
/// that arrives after its request gave up (timed out) is dropped instead of reaching the next.
#[derive(Debug, Default)]
pub struct ReplyCell {
    /// The generation, and its reply once delivered.
    value: Mutex<(u64, Option<Delivered>)>,
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
    pub(super) fn complete(&self, generation: u64, reply: Reply) {
        self.complete_held(generation, reply, None);
    }

    /// [`ReplyCell::complete`], with what the reply holds of the buffer budget (given back
    /// when the reply is dropped, here if its request is gone).
    pub(super) fn complete_held(&self, generation: u64, reply: Reply, held: Option<Held>) {
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        if v.0 == generation && v.1.is_none() {
            v.1 = Some((reply, held));
            drop(v);
            self.waker.wake();
        }
    }

    /// Whether the request of `generation` still waits.
    pub(super) fn waiting(&self, generation: u64) -> bool {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).0 == generation
    }

    /// Ends `generation` unless a newer request began: the request gave up (timed out, or
    /// its downstream connection went away), so nothing waits for its reply any more.
    fn give_up(&self, generation: u64) {
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        if v.0 == generation {
            v.0 += 1;
            v.1 = None;
        }
    }

    /// Waits for the reply of `generation`, with what it holds of the buffer budget. Dropping
    /// the wait (at the request's timeout, or with its downstream connection) gives the
    /// request up, so the connection it was sent on no longer counts it as waiting.
    pub async fn reply(&self, generation: u64) -> Delivered {
        let mut wait = GiveUp {
            cell: self,
            generation,
            answered: false,
        };
        let reply = std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
            match v.1.take() {
                Some(r) if v.0 == generation => std::task::Poll::Ready(r),
                _ => std::task::Poll::Pending,
            }
        })
        .await;
        // Delivered: the connection already forgot the request.
        wait.answered = true;
        reply
    }
}

/// Gives a request up when its wait ends before its reply came.
struct GiveUp<'a> {
    cell: &'a ReplyCell,
    generation: u64,
    answered: bool,
}

impl Drop for GiveUp<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.cell.give_up(self.generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Closed, Failed, UpstreamError};

    #[tokio::test]
    async fn a_late_reply_does_not_reach_the_next_request_of_the_cell() {
        let cell = ReplyCell::default();
        let first = cell.begin();
        // The first request gave up (timed out); the cell serves the next one.
        let second = cell.begin();
        cell.complete(
            first,
            Err(Failed::Lost(UpstreamError::Closed(Closed::EndpointRemoved))),
        );
        assert!(!cell.waiting(first) && cell.waiting(second));
        cell.complete(
            second,
            Err(Failed::Lost(UpstreamError::Closed(Closed::PoolDropped))),
        );
        match cell.reply(second).await.0 {
            Err(Failed::Lost(UpstreamError::Closed(why))) => assert_eq!(why, Closed::PoolDropped),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_wait_dropped_before_its_reply_gives_the_request_up() {
        let cell = ReplyCell::default();
        let generation = cell.begin();
        {
            let mut wait = std::pin::pin!(cell.reply(generation));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(wait.as_mut().poll(&mut cx).is_pending());
            assert!(cell.waiting(generation));
        }
        assert!(
            !cell.waiting(generation),
            "a timed-out request still counted as waiting"
        );
        // Its late reply lands nowhere, and the cell serves the next request.
        cell.complete(
            generation,
            Err(Failed::Lost(UpstreamError::Closed(Closed::EndpointRemoved))),
        );
        let next = cell.begin();
        assert!(cell.waiting(next));
    }
}
