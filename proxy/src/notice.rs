//! The end of the drain, as every open connection waits for it: each connection registers
//! its waker once, and then looks with one atomic load.
//!
//! A Thrift connection waits for this beside its reads and replies, so it is polled several
//! times per request. A tokio `watch` (or `Notify`) would take the lock of its waiter list on
//! every such poll — one lock shared by every connection on every worker.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// Set once, when the drain's time is up; cloned into everything that waits for it.
#[derive(Clone, Debug, Default)]
pub struct Closing(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    closed: AtomicBool,
    waiters: Mutex<Waiters>,
}

/// The wakers of the connections that wait, in reused slots (one per open connection).
#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Arc<AtomicWaker>>>,
    free: Vec<usize>,
}

impl Closing {
    /// The drain's time is up: every waiter wakes, and every later look says so.
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
        let waiters = self.0.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for waker in waiters.slots.iter().flatten() {
            waker.wake();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// A waiter for one connection (registered until it is dropped).
    pub fn waiter(&self) -> Waiter {
        let waker = Arc::new(AtomicWaker::new());
        let mut waiters = self.0.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match waiters.free.pop() {
            Some(slot) => {
                waiters.slots[slot] = Some(waker.clone());
                slot
            }
            None => {
                waiters.slots.push(Some(waker.clone()));
                waiters.slots.len() - 1
            }
        };
        drop(waiters);
        Waiter {
            closing: self.clone(),
            waker,
            slot,
        }
    }
}

/// One connection's wait for [`Closing::close`].
#[derive(Debug)]
pub struct Waiter {
    closing: Closing,
    waker: Arc<AtomicWaker>,
    slot: usize,
}

impl Waiter {
    pub fn is_closed(&self) -> bool {
        self.closing.is_closed()
    }

    /// Resolves once the drain's time is up (at once if it already is).
    pub async fn closed(&mut self) {
        std::future::poll_fn(|cx| self.poll_closed(cx)).await
    }

    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before looking: a close in between finds the waker and wakes it.
        self.waker.register(cx.waker());
        if self.is_closed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = self
            .closing
            .0
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        waiters.slots[self.slot] = None;
        waiters.free.push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn every_waiter_wakes_when_closed_and_later_ones_see_it_at_once() {
        let closing = Closing::default();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let mut waiter = closing.waiter();
                tokio::spawn(async move { waiter.closed().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tasks.iter().all(|t| !t.is_finished()));
        closing.close();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("woken")
                .unwrap();
        }
        let mut late = closing.waiter();
        assert!(late.is_closed());
        tokio::time::timeout(Duration::from_secs(5), late.closed())
            .await
            .expect("at once");
    }

    #[test]
    fn slots_of_dropped_waiters_are_reused() {
        let closing = Closing::default();
        let (a, b) = (closing.waiter(), closing.waiter());
        drop(a);
        let c = closing.waiter();
        assert_eq!(c.slot, 0);
        drop((b, c));
        let waiters = closing.0.waiters.lock().unwrap();
        assert_eq!(waiters.slots.len(), 2);
        assert!(waiters.slots.iter().all(Option::is_none));
    }
}
