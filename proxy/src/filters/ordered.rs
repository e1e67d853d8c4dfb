//! The requests in flight on one downstream connection: they complete in any order and come
//! out in the order they went in, in slots that are reused, so a request allocates nothing.
//!
//! Each slot keeps its future's heap cell (replaced in place with `Pin::set`), its waker
//! (an `Arc` that marks the slot ready and wakes the connection's task), the
//! [`ReplyCell`] its request's reply is delivered to, and its deadline. A new slot is
//! allocated only when more requests are in flight than ever before on the connection.
//!
//! Deadlines are kept by the connection's one timer, not a timer per request (registering
//! and removing one costs each request two trips to the runtime's timer wheel):
//! [`Ordered::expire`] marks the slots whose deadline has passed, and their futures see it
//! through their [`Expiry`] the next time they are polled.
use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use futures_util::task::AtomicWaker;
use tokio::time::Instant;

use crate::upstream::ReplyCell;

/// Wakes the connection's task and marks one slot as worth polling.
struct SlotWaker {
    ready: AtomicBool,
    task: Arc<AtomicWaker>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Whether a request's deadline has passed, as its connection's timer found.
#[derive(Debug, Default)]
pub struct Expiry(AtomicBool);

/// A request's deadline passed before its work was done.
#[derive(Debug)]
pub struct Expired;

impl Expiry {
    /// `work`'s output, unless the deadline is found passed first. The work is polled first,
    /// so what is already done when the deadline passes is kept. It is pinned by the caller,
    /// so the future of a request, large, is not moved again.
    pub async fn within<F: Future>(&self, mut work: Pin<&mut F>) -> Result<F::Output, Expired> {
        std::future::poll_fn(|cx| match work.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(Ok(output)),
            Poll::Pending if self.0.load(Ordering::Acquire) => Poll::Ready(Err(Expired)),
            Poll::Pending => Poll::Pending,
        })
        .await
    }
}

/// What a slot lends the future it runs: where the reply is delivered and its deadline's
/// mark.
pub struct SlotRefs {
    pub cell: Arc<ReplyCell>,
    pub expiry: Arc<Expiry>,
}

struct Slot<F: Future> {
    future: Pin<Box<Option<F>>>,
    output: Option<F::Output>,
    waker: Arc<SlotWaker>,
    cell: Arc<ReplyCell>,
    expiry: Arc<Expiry>,
    deadline: Option<Instant>,
}

/// Futures in flight, yielded in the order they were pushed.
pub struct Ordered<F: Future> {
    in_flight: VecDeque<Slot<F>>,
    free: Vec<Slot<F>>,
    task: Arc<AtomicWaker>,
}

impl<F: Future> Default for Ordered<F> {
    fn default() -> Self {
        Self {
            in_flight: VecDeque::new(),
            free: Vec::new(),
            task: Arc::new(AtomicWaker::new()),
        }
    }
}

impl<F: Future> Ordered<F> {
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Adds the future `make` builds with what the slot lends it; its deadline, if it has
    /// one, is kept by [`Ordered::expire`].
    pub fn push(&mut self, deadline: Option<Instant>, make: impl FnOnce(SlotRefs) -> F) {
        let mut slot = self.free.pop().unwrap_or_else(|| Slot {
            future: Box::pin(None),
            output: None,
            waker: Arc::new(SlotWaker {
                ready: AtomicBool::new(false),
                task: self.task.clone(),
            }),
            cell: Arc::new(ReplyCell::default()),
            expiry: Arc::new(Expiry::default()),
            deadline: None,
        });
        slot.expiry.0.store(false, Ordering::Release);
        slot.deadline = deadline;
        slot.future.set(Some(make(SlotRefs {
            cell: slot.cell.clone(),
            expiry: slot.expiry.clone(),
        })));
        slot.waker.ready.store(true, Ordering::Release);
        self.in_flight.push_back(slot);
    }

    /// Marks every unfinished future whose deadline is at or before `now` as expired (to be
    /// polled again, when it sees it); returns the earliest deadline still to come.
    pub fn expire(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for slot in &mut self.in_flight {
            let Some(deadline) = slot.deadline else {
                continue;
            };
            if slot.output.is_some() {
                continue;
            }
            if deadline <= now {
                slot.deadline = None;
                slot.expiry.0.store(true, Ordering::Release);
                slot.waker.ready.store(true, Ordering::Release);
            } else if next.is_none_or(|n| deadline < n) {
                next = Some(deadline);
            }
        }
        next
    }

    /// The oldest future's output, once it is ready.
    pub async fn next(&mut self) -> Option<F::Output> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        if self.in_flight.is_empty() {
            return Poll::Ready(None);
        }
        self.task.register(cx.waker());
        for slot in &mut self.in_flight {
            if slot.output.is_some() || !slot.waker.ready.swap(false, Ordering::AcqRel) {
                continue;
            }
            let waker = Waker::from(slot.waker.clone());
            let mut slot_cx = Context::from_waker(&waker);
            if let Some(future) = slot.future.as_mut().as_pin_mut()
                && let Poll::Ready(output) = future.poll(&mut slot_cx)
            {
                slot.output = Some(output);
                slot.future.set(None);
            }
        }
        match self.in_flight.front_mut().and_then(|s| s.output.take()) {
            Some(output) => {
                let slot = self.in_flight.pop_front().expect("the front slot exists");
                self.free.push(slot);
                Poll::Ready(Some(output))
            }
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{pin::pin, time::Duration};

    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn outputs_come_in_push_order_whatever_order_they_complete_in() {
        let mut q = Ordered::default();
        for ms in [30u64, 10, 20, 0] {
            q.push(None, move |_| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                ms
            });
        }
        let mut out = Vec::new();
        while let Some(v) = q.next().await {
            out.push(v);
        }
        assert_eq!(out, [30, 10, 20, 0]);
    }

    #[tokio::test]
    async fn slots_and_their_cells_are_reused() {
        let mut q = Ordered::default();
        let mut cells = Vec::new();
        for round in 0..3 {
            for i in 0..4 {
                q.push(None, |refs| {
                    cells.push(Arc::as_ptr(&refs.cell));
                    async move { round * 10 + i }
                });
            }
            for i in 0..4 {
                assert_eq!(q.next().await, Some(round * 10 + i));
            }
        }
        cells.sort();
        cells.dedup();
        assert_eq!(cells.len(), 4, "four slots served twelve requests");
    }

    #[tokio::test]
    async fn only_futures_past_their_deadline_expire_and_see_it() {
        let start = Instant::now();
        let at = |ms| Some(start + Duration::from_millis(ms));
        let mut q = Ordered::default();
        for deadline in [at(10), at(30), None, at(20)] {
            q.push(deadline, |refs| async move {
                let never = pin!(std::future::pending::<()>());
                refs.expiry.within(never).await.is_err()
            });
        }
        // Nothing is due yet: the earliest deadline is the next to look at.
        assert_eq!(q.expire(start), at(10));
        assert!(q.next().now_or_never().is_none());
        // At 20 ms the first and the last are due; the one due at 30 ms is next.
        assert_eq!(q.expire(start + Duration::from_millis(20)), at(30));
        assert_eq!(q.next().now_or_never(), Some(Some(true)));
        // The second is not due yet.
        assert!(q.next().now_or_never().is_none());
        assert_eq!(q.expire(start + Duration::from_secs(1)), None);
        assert_eq!(q.next().now_or_never(), Some(Some(true)));
        assert!(
            q.next().now_or_never().is_none(),
            "one without a deadline never expires"
        );
    }

    #[tokio::test]
    async fn work_done_by_the_deadline_is_kept() {
        let expiry = Expiry::default();
        expiry.0.store(true, Ordering::Release);
        assert!(matches!(expiry.within(pin!(async { 7 })).await, Ok(7)));
    }
}
