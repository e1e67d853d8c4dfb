//! A bound on bytes many holders take together: what tern holds for clients' messages —
//! downstream read buffers (partial messages included), the requests cut from them until they
//! are done, requests waiting to be written on a multiplexed connection ([`Backlog`]), and
//! large replies until they are written (see `filters::thrift::read_buffer`, and the pools'
//! reply buffers in `upstream`) — so clients and servers cannot grow tern past its memory
//! limit; the clusters' ring hash and Maglev tables (see
//! [`crate::balance::EndpointPicker::within`]); the pipes bulk relays splice through
//! (counted one each, see `filters::tcp::splice`); and pool buffers that replies waiting to be
//! written still hold after their connection moved on from them ([`BufferBudget::keep`]).
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};

/// The shared budget.
#[derive(Debug)]
pub struct BufferBudget {
    used: AtomicUsize,
    limit: usize,
    /// Allocations kept alive by slices cut from them, each with what it is charged, oldest
    /// first ([`BufferBudget::keep`]).
    kept: Mutex<VecDeque<(Bytes, usize)>>,
}

/// How many kept allocations [`BufferBudget::keep`] looks at, to let go of what nothing holds.
const LOOKED_AT_WHEN_KEEPING: usize = 4;
/// How many kept allocations a refusal looks at first, and a sweep at a time.
const LOOKED_AT_BEFORE_REFUSING: usize = 64;

/// What one connection's buffer holds of the budget; given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<BufferBudget>,
    bytes: usize,
}

/// The budget cannot take a buffer that large.
#[derive(Clone, Debug, thiserror::Error)]
#[error("buffered messages would take more than {limit} bytes (--max-buffered-bytes)")]
pub struct Exhausted {
    pub limit: usize,
}

impl BufferBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
            kept: Mutex::default(),
        })
    }

    /// Bytes held now, across connections.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `bytes` for the allocation `handle` is a slice of, for as long as anything
    /// else holds it: a buffer that moved on from an allocation that slices cut from it
    /// (replies waiting to be written) still hold. The memory exists, so it is charged
    /// whatever the limit. Nothing is kept when `handle` is the last holder (or holds no
    /// allocation: `bytes` is 0).
    pub fn keep(&self, handle: Bytes, bytes: usize) {
        if bytes == 0 || handle.is_unique() {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        self.let_go(&mut kept, LOOKED_AT_WHEN_KEEPING);
        self.used.fetch_add(bytes, Ordering::Relaxed);
        kept.push_back((handle, bytes));
    }

    /// Whether `bytes` more would fit, without holding them: for memory that is not charged
    /// (a pool connection's buffer of the usual size) but must not be allocated while the
    /// budget is full.
    pub fn has_room(&self, bytes: usize) -> Result<(), Exhausted> {
        let fits = |used: usize| used.saturating_add(bytes) <= self.limit;
        if fits(self.used()) || fits(self.let_go_before_refusing()) {
            Ok(())
        } else {
            Err(Exhausted { limit: self.limit })
        }
    }

    /// Lets go of every kept allocation nothing else holds any more (when scraped); returns
    /// the bytes held after. A few at a time under the lock, so a worker that keeps one
    /// meanwhile waits for a few, not for all.
    pub fn sweep(&self) -> usize {
        let all = self.kept.lock().unwrap_or_else(|e| e.into_inner()).len();
        for _ in 0..all.div_ceil(LOOKED_AT_BEFORE_REFUSING) {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            self.let_go(&mut kept, LOOKED_AT_BEFORE_REFUSING);
        }
        self.used()
    }

    /// Before a refusal: lets go of what nothing holds among some of the kept allocations;
    /// returns the bytes held after. Not all of them: refusals come as often as an attacker
    /// likes, and each would otherwise look at every kept allocation.
    fn let_go_before_refusing(&self) -> usize {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        self.let_go(&mut kept, LOOKED_AT_BEFORE_REFUSING);
        self.used()
    }

    /// Looks at the `n` oldest kept allocations, in turn: those nothing else holds any more
    /// are let go, the others go to the back (so allocations that stay held, such as replies
    /// for a client that does not read, do not hide the ones behind them).
    fn let_go(&self, kept: &mut VecDeque<(Bytes, usize)>, n: usize) {
        for _ in 0..n.min(kept.len()) {
            let Some((handle, bytes)) = kept.pop_front() else {
                break;
            };
            if handle.is_unique() {
                self.used.fetch_sub(bytes, Ordering::Relaxed);
            } else {
                kept.push_back((handle, bytes));
            }
        }
    }

    /// A connection's share, holding nothing yet.
    pub fn hold(self: &Arc<Self>) -> Held {
        Held {
            budget: self.clone(),
            bytes: 0,
        }
    }
}

impl Held {
    /// The budget this is a share of.
    pub fn budget(&self) -> &Arc<BufferBudget> {
        &self.budget
    }

    /// Accounts a buffer that now has `capacity` bytes; refused (and nothing changed) when
    /// the total would go over the limit.
    pub fn resize(&mut self, capacity: usize) -> Result<(), Exhausted> {
        let budget = &self.budget;
        if capacity > self.bytes {
            let more = capacity - self.bytes;
            let grow = || {
                budget
                    .used
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                        used.checked_add(more)
                            .filter(|total| *total <= budget.limit)
                    })
            };
            // Before refusing, let go of kept allocations that are no longer held.
            if grow().is_err() {
                budget.let_go_before_refusing();
                if grow().is_err() {
                    return Err(Exhausted {
                        limit: budget.limit,
                    });
                }
            }
        } else {
            budget
                .used
                .fetch_sub(self.bytes - capacity, Ordering::Relaxed);
        }
        self.bytes = capacity;
        Ok(())
    }

    /// Accounts a buffer that already has `capacity` bytes: memory that exists is counted,
    /// whatever the limit (growth is held with [`Held::resize`] before it happens; this
    /// corrects the estimate afterwards).
    pub fn set(&mut self, capacity: usize) {
        if capacity == self.bytes {
            // The common case on a request's path: no trip to the shared counter.
            return;
        }
        if capacity > self.bytes {
            self.budget
                .used
                .fetch_add(capacity - self.bytes, Ordering::Relaxed);
        } else {
            self.budget
                .used
                .fetch_sub(self.bytes - capacity, Ordering::Relaxed);
        }
        self.bytes = capacity;
    }

    /// Holds `bytes` more; refused (and nothing changed) over the limit.
    pub fn grow(&mut self, bytes: usize) -> Result<(), Exhausted> {
        self.resize(self.bytes.saturating_add(bytes))
    }

    /// Grows `buf` by at least `additional` bytes of spare capacity, within the budget.
    /// Refused (and nothing changed) over the limit.
    pub fn reserve(
        &mut self,
        buf: &mut bytes::BytesMut,
        additional: usize,
    ) -> Result<(), Exhausted> {
        if buf.capacity() >= buf.len().saturating_add(additional) {
            return Ok(());
        }
        self.resize(most_after_reserve(buf, additional))?;
        buf.reserve(additional);
        self.set(buf.capacity());
        Ok(())
    }
}

/// Bytes waiting in a queue (a multiplexed connection's requests to write): what it holds
/// beyond an allowance that is not charged, in steps of the allowance, so a queue that stays
/// short never touches the shared counter.
#[derive(Debug)]
pub struct Backlog {
    bytes: usize,
    held: Held,
}

impl Backlog {
    /// Bytes a queue holds uncharged, and the step its charge moves by.
    pub const STEP: usize = 64 * 1024;

    pub fn new(budget: &Arc<BufferBudget>) -> Self {
        Self {
            bytes: 0,
            held: budget.hold(),
        }
    }

    /// What `bytes` waiting are charged.
    fn charge(bytes: usize) -> usize {
        bytes
            .saturating_sub(Self::STEP)
            .checked_next_multiple_of(Self::STEP)
            .unwrap_or(usize::MAX)
    }

    /// `n` more bytes wait; refused (and nothing changed) over the limit.
    pub fn add(&mut self, n: usize) -> Result<(), Exhausted> {
        let bytes = self.bytes.saturating_add(n);
        let charge = Self::charge(bytes);
        if charge > self.held.bytes {
            self.held.resize(charge)?;
        }
        self.bytes = bytes;
        Ok(())
    }

    /// `n` bytes no longer wait (written, or dropped with their connection).
    pub fn remove(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_sub(n);
        let charge = Self::charge(self.bytes);
        if charge < self.held.bytes {
            self.held.set(charge);
        }
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Nothing waits any more.
    pub fn clear(&mut self) {
        self.remove(self.bytes);
    }
}

/// The most capacity `buf` may have after `reserve(additional)`: `BytesMut` may double, so
/// growth is held for this before it happens.
pub fn most_after_reserve(buf: &bytes::BytesMut, additional: usize) -> usize {
    buf.len()
        .saturating_add(additional)
        .max(buf.capacity().saturating_mul(2))
}

/// Exports a budget's use and limit when scraped (`…_used_bytes`, `…_limit_bytes`): how close
/// tern is to refusing for it.
#[derive(Debug)]
pub struct BudgetCollector {
    /// The metrics' name before `_used_bytes` and `_limit_bytes`.
    pub name: &'static str,
    pub help: &'static str,
    pub budget: Arc<BufferBudget>,
}

impl Collector for BudgetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |n: usize| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
        for (suffix, what, value) in [
            ("used", "held now", self.budget.sweep()),
            ("limit", "the limit", self.budget.limit),
        ] {
            let name = format!("{}_{suffix}_bytes", self.name);
            let help = format!("{}: {what}", self.help);
            let metric = encoder.encode_descriptor(&name, &help, None, MetricType::Gauge)?;
            gauge(value).encode(metric)?;
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_share_one_bound() {
        let budget = BufferBudget::new(1000);
        let mut a = budget.hold();
        let mut b = budget.hold();
        a.resize(600).unwrap();
        assert!(b.resize(500).is_err(), "over the bound");
        assert_eq!(budget.used(), 600);
        b.resize(400).unwrap();
        a.resize(100).unwrap();
        assert_eq!(budget.used(), 500);
        drop(a);
        assert_eq!(budget.used(), 400);
        let mut buf = bytes::BytesMut::new();
        assert!(b.reserve(&mut buf, 10_000).is_err());
        assert_eq!(budget.used(), 400, "a refused growth holds nothing more");
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_kept_allocation_is_charged_until_its_last_slice_is_gone() {
        let budget = BufferBudget::new(1000);
        let mut buf = bytes::BytesMut::with_capacity(800);
        buf.extend_from_slice(&[1; 100]);
        let slice = buf.split().freeze();
        budget.keep(buf.freeze(), 800);
        assert_eq!(budget.used(), 800, "the slice holds the allocation");
        assert!(budget.has_room(300).is_err());
        let mut held = budget.hold();
        assert!(held.resize(300).is_err());
        drop(slice);
        // A refusal would let go of what nothing holds any more first.
        held.resize(300).unwrap();
        budget.has_room(700).unwrap();
        assert_eq!(budget.used(), 300);
        let lone = bytes::Bytes::from(vec![0; 10]);
        budget.keep(lone, 10);
        assert_eq!(budget.used(), 300, "nothing else held it: nothing kept");
    }

    #[test]
    fn allocations_that_stay_held_do_not_hide_those_behind_them() {
        let budget = BufferBudget::new(1000);
        let kept = |n: usize| {
            let mut buf = bytes::BytesMut::with_capacity(n);
            buf.extend_from_slice(&[1]);
            let slice = buf.split().freeze();
            budget.keep(buf.freeze(), n);
            slice
        };
        let _stays = kept(300);
        let goes = kept(600);
        drop(goes);
        // The oldest is still held; the one behind it is looked at too.
        budget.has_room(600).unwrap();
        assert_eq!(budget.used(), 300);
    }

    #[test]
    fn the_collector_exports_use_and_limit() {
        let budget = BufferBudget::new(1000);
        let mut registry = prometheus_client::registry::Registry::with_prefix("tern");
        registry.register_collector(Box::new(BudgetCollector {
            name: "buffer_budget",
            help: "Bytes held",
            budget: budget.clone(),
        }));
        let mut held = budget.hold();
        held.resize(300).unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("\ntern_buffer_budget_used_bytes 300\n"),
            "{text}"
        );
        assert!(
            text.contains("\ntern_buffer_budget_limit_bytes 1000\n"),
            "{text}"
        );
    }

    #[test]
    fn a_backlog_is_charged_beyond_its_allowance_in_steps() {
        const STEP: usize = Backlog::STEP;
        let budget = BufferBudget::new(4 * STEP);
        let mut queue = Backlog::new(&budget);
        queue.add(STEP).unwrap();
        assert_eq!(budget.used(), 0, "the allowance is not charged");
        queue.add(1).unwrap();
        assert_eq!(budget.used(), STEP, "a byte past it takes a step");
        queue.add(STEP - 1).unwrap();
        assert_eq!(budget.used(), STEP);
        assert!(queue.add(4 * STEP).is_err(), "over the limit");
        assert_eq!(budget.used(), STEP, "a refused add holds nothing more");
        queue.add(3 * STEP).unwrap();
        assert_eq!(budget.used(), 4 * STEP);
        queue.remove(3 * STEP);
        assert_eq!(budget.used(), STEP);
        queue.clear();
        assert_eq!(budget.used(), 0);
        queue.add(3 * STEP).unwrap();
        drop(queue);
        assert_eq!(budget.used(), 0, "given back when dropped");
    }
}
