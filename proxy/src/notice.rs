//! A notice that every open connection watches and looks at often — the end of the drain, a
//! change of policy: each watcher registers its waker once, and a look is one atomic load.
//!
//! A Thrift connection waits for the drain's end beside its reads and replies, and a relay
//! for a policy change beside its copying, so each polls its watch several times per request
//! or chunk. A tokio `watch` (or `Notify`) takes the lock of its waiter list on every such
//! poll: one lock shared by every connection on every worker.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// Posted any number of times; cloned into everything that posts or watches it.
#[derive(Clone, Debug, Default)]
pub struct Notice(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    /// Notices posted so far.
    posted: AtomicU64,
    waiters: Mutex<Waiters>,
}

/// The wakers of the watchers, in reused slots (one per open connection).
#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Arc<AtomicWaker>>>,
    free: Vec<usize>,
}

impl Notice {
    /// Posts a notice: every watcher wakes and sees a change.
    pub fn post(&self) {
        self.0.posted.fetch_add(1, Ordering::AcqRel);
        let waiters = self.0.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for waker in waiters.slots.iter().flatten() {
            waker.wake();
        }
    }

    /// Whether any notice was ever posted (for a notice posted once, like the drain's end).
    pub fn was_posted(&self) -> bool {
        self.0.posted.load(Ordering::Acquire) > 0
    }

    /// A watcher that sees the notices posted from now on (registered until it is dropped).
    pub fn watch(&self) -> Watcher {
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
        Watcher {
            seen: self.0.posted.load(Ordering::Acquire),
            notice: self.clone(),
            waker,
            slot,
        }
    }
}

/// One connection's watch of a [`Notice`].
#[derive(Debug)]
pub struct Watcher {
    notice: Notice,
    waker: Arc<AtomicWaker>,
    slot: usize,
    /// The notices posted when this watcher last marked them seen.
    seen: u64,
}

impl Watcher {
    /// Whether a notice was posted since the last one seen.
    pub fn has_changed(&self) -> bool {
        self.notice.0.posted.load(Ordering::Acquire) != self.seen
    }

    /// Marks every notice posted so far as seen.
    pub fn mark_seen(&mut self) {
        self.seen = self.notice.0.posted.load(Ordering::Acquire);
    }

    /// Resolves once a notice was posted since the last one seen (at once if one was), and
    /// marks it seen.
    pub async fn changed(&mut self) {
        std::future::poll_fn(|cx| self.poll_changed(cx)).await
    }

    fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before looking: a notice posted in between finds the waker and wakes it.
        self.waker.register(cx.waker());
        if self.has_changed() {
            self.mark_seen();
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut waiters = self
            .notice
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
    async fn every_watcher_wakes_when_posted_and_sees_each_notice_once() {
        let notice = Notice::default();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let mut watcher = notice.watch();
                tokio::spawn(async move {
                    watcher.changed().await;
                    watcher
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tasks.iter().all(|t| !t.is_finished()));
        assert!(!notice.was_posted());
        notice.post();
        for t in tasks {
            let watcher = tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("woken")
                .unwrap();
            assert!(!watcher.has_changed(), "seen once it resolved");
        }
        assert!(notice.was_posted());
    }

    #[tokio::test]
    async fn a_watcher_sees_what_was_posted_after_it_was_made_even_unpolled() {
        let notice = Notice::default();
        notice.post();
        let mut watcher = notice.watch();
        assert!(!watcher.has_changed(), "posted before it was made");
        notice.post();
        assert!(watcher.has_changed());
        tokio::time::timeout(Duration::from_secs(5), watcher.changed())
            .await
            .expect("at once");
        assert!(!watcher.has_changed());
        notice.post();
        watcher.mark_seen();
        assert!(!watcher.has_changed());
    }

    #[test]
    fn slots_of_dropped_watchers_are_reused() {
        let notice = Notice::default();
        let (a, b) = (notice.watch(), notice.watch());
        drop(a);
        let c = notice.watch();
        assert_eq!(c.slot, 0);
        drop((b, c));
        let waiters = notice.0.waiters.lock().unwrap();
        assert_eq!(waiters.slots.len(), 2);
        assert!(waiters.slots.iter().all(Option::is_none));
    }
}
