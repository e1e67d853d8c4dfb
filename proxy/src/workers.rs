//! The data plane's threads. Each worker runs a current-thread runtime that owns the
//! connections handed to it and the upstream connections they open (its own slice of every
//! endpoint's pool): a request is read, balanced, sent, answered and written on one thread,
//! with no wakeup of another. The listeners accept on the main runtime and hand each
//! connection to the worker with the fewest open (one listening socket per address, so no
//! other process can join a `SO_REUSEPORT` group and take captured connections).
use std::{
    cell::Cell,
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use tokio::runtime::Handle;

thread_local! {
    /// The worker this thread is (0 on any other thread).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// How many workers run; pools are made with a slice for each.
static COUNT: OnceLock<usize> = OnceLock::new();

/// How many workers run (1 before [`plan`], and in tests).
pub fn count() -> usize {
    COUNT.get().copied().unwrap_or(1)
}

/// The worker running this thread (0 on any other thread).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// Fixes how many workers run, `n` (one per core available to the process when 0), before
/// they start, and returns it: pools and per-worker metrics made from then on have a slice
/// for each (the configuration is applied before the workers start). Only the first call in
/// a process counts.
pub fn plan(n: usize) -> usize {
    let n = match n {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    *COUNT.get_or_init(|| n)
}

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    runtime: Handle,
    /// Connections it serves now.
    open: Arc<AtomicUsize>,
}

impl Workers {
    /// Starts the workers [`plan`] fixes for `n`; they end with the process.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let n = plan(n);
        let workers = (0..n)
            .map(|index| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("start a worker's runtime")?;
                let handle = runtime.handle().clone();
                std::thread::Builder::new()
                    .name(format!("tern-worker-{index}"))
                    .spawn(move || {
                        INDEX.with(|i| i.set(index));
                        runtime.block_on(std::future::pending::<()>());
                    })
                    .context("start a worker thread")?;
                Ok(Worker {
                    runtime: handle,
                    open: Arc::default(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { workers })
    }

    /// Runs `serve` on the worker with the fewest connections open; `make` builds it there
    /// (so the sockets it takes register with that worker's runtime).
    pub fn hand_off<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
        else {
            return;
        };
        let open = worker.open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        worker.runtime.spawn(async move {
            let _served = Served(open);
            make().await;
        });
    }
}

/// Counts a connection open on its worker until it is done.
struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn connections_go_to_the_least_busy_worker_and_run_on_its_thread() {
        let workers = Workers::start(2).unwrap();
        let n = count();
        let (tx, rx) = mpsc::channel();
        let (release, hold) = tokio::sync::watch::channel(false);
        for _ in 0..2 * n {
            let (tx, mut hold) = (tx.clone(), hold.clone());
            workers.hand_off(move || async move {
                tx.send((current(), std::thread::current().name().map(str::to_owned)))
                    .unwrap();
                let _ = hold.wait_for(|go| *go).await;
            });
        }
        let mut seen: Vec<(usize, Option<String>)> = rx.iter().take(2 * n).collect();
        seen.sort();
        for (i, (index, name)) in seen.iter().enumerate() {
            // Two connections held open on each worker: the least busy took each.
            assert_eq!(*index, i / 2);
            assert_eq!(
                name.as_deref(),
                Some(format!("tern-worker-{index}").as_str())
            );
        }
        release.send_replace(true);
    }
}
