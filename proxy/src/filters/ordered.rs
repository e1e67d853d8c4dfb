//! The requests in flight on one downstream connection: they complete in any order and come
//! out in the order they went in, in slots that are reused, so a request allocates nothing.
//!
//! Each slot keeps its future's heap cell (replaced in place with `Pin::set`), its waker
//! (an `Arc` that marks the slot ready and wakes the connection's task) and the
//! [`ReplyCell`] its request's reply is delivered to. A new slot is allocated only when more
//! requests are in flight than ever before on the connection.
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

struct Slot<F: Future> {
    future: Pin<Box<Option<F>>>,
    output: Option<F::Output>,
    waker: Arc<SlotWaker>,
    cell: Arc<ReplyCell>,
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

    /// Adds the future `make` builds with the slot's reply cell.
    pub fn push(&mut self, make: impl FnOnce(Arc<ReplyCell>) -> F) {
        let mut slot = self.free.pop().unwrap_or_else(|| Slot {
            future: Box::pin(None),
            output: None,
            waker: Arc::new(SlotWaker {
                ready: AtomicBool::new(false),
                task: self.task.clone(),
            }),
            cell: Arc::new(ReplyCell::default()),
        });
        slot.future.set(Some(make(slot.cell.clone())));
        slot.waker.ready.store(true, Ordering::Release);
        self.in_flight.push_back(slot);
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
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn outputs_come_in_push_order_whatever_order_they_complete_in() {
        let mut q = Ordered::default();
        for ms in [30u64, 10, 20, 0] {
            q.push(move |_cell| async move {
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
                q.push(|cell| {
                    cells.push(Arc::as_ptr(&cell));
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
}
