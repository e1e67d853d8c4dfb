//! An endpoint's latency as least-request balancing weighs it: a moving average that takes
//! any slower observation at once and decays towards zero while nothing is observed
//! (linkerd2-proxy's peak EWMA), kept in atomics; and, while requests are in flight, at
//! least the time since its last answer or since it became busy, whichever is later (a
//! server that stopped answering looks slower every moment instead of looking as fast as it
//! last was).
use std::{
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How fast the average forgets: a peak is down to 1/e of itself after this long.
const DECAY: Duration = Duration::from_secs(10);
/// What an endpoint that never answered yet is assumed to take.
const PRIOR: Duration = Duration::from_millis(1);
/// Latencies below this weigh the same: between endpoints that answer in time, requests in
/// flight decide (as Envoy's least request does, spreading a quiet caller's requests), and
/// only an endpoint slower than this, or one that stopped answering, is weighed by its
/// slowness.
pub const ALIKE: Duration = Duration::from_millis(10);

/// Nanoseconds since the process's first use of this module.
fn nanos(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// One endpoint's latency.
#[derive(Debug)]
pub struct PeakEwma {
    /// Seconds (an `f64`'s bits), as of `at`.
    estimate: AtomicU64,
    /// When it was last observed (or made), in [`nanos`].
    at: AtomicU64,
    /// Whether anything was observed: the first observation replaces the prior.
    observed: AtomicBool,
    /// When its requests in flight last went from none to one, in [`nanos`].
    busy: AtomicU64,
}

impl Default for PeakEwma {
    /// The prior, decaying from now (an endpoint nothing is sent to is tried in time).
    fn default() -> Self {
        Self {
            estimate: AtomicU64::new(PRIOR.as_secs_f64().to_bits()),
            at: AtomicU64::new(nanos(Instant::now())),
            observed: AtomicBool::new(false),
            busy: AtomicU64::new(0),
        }
    }
}

impl PeakEwma {
    /// The average at `now` (in [`nanos`]) decayed since the last observation, the share of
    /// it the decay kept, and the seconds since then.
    fn decayed(&self, now: u64) -> (f64, f64, f64) {
        let estimate = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let since = now.saturating_sub(self.at.load(Ordering::Relaxed)) as f64 / 1e9;
        let kept = (-since / DECAY.as_secs_f64()).exp();
        (estimate * kept, kept, since)
    }

    /// The latency to weigh it with at `now` (seconds), with `in_flight` requests to it: the average,
    /// or while anything is in flight at least the time since its last answer or since it
    /// became busy, whichever is later.
    pub fn weigh(&self, now: Instant, in_flight: u64) -> f64 {
        let now = nanos(now);
        let (average, _, since) = self.decayed(now);
        let waiting = if in_flight > 0 {
            let busy = now.saturating_sub(self.busy.load(Ordering::Relaxed)) as f64 / 1e9;
            since.min(busy)
        } else {
            0.0
        };
        average.max(waiting)
    }

    /// Its requests in flight went from none to one at `now`.
    pub fn busy_from(&self, now: Instant) {
        self.busy.store(nanos(now), Ordering::Relaxed);
    }

    /// Records how long a request took (an answer, a failure, a timeout) at `now`.
    pub fn observe(&self, took: Duration, now: Instant) {
        let now = nanos(now);
        let (average, kept, _) = self.decayed(now);
        let took = took.as_secs_f64();
        let first = !self.observed.swap(true, Ordering::Relaxed);
        let next = if first || took > average {
            took
        } else {
            average + took * (1.0 - kept)
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_answer_counts_at_once_and_fades_and_silence_in_flight_counts() {
        let l = PeakEwma::default();
        let t0 = Instant::now();
        assert!((l.weigh(t0, 0) - 1e-3).abs() < 1e-4, "the prior");
        // The first answer replaces the prior.
        l.observe(Duration::from_micros(100), t0);
        assert!((l.weigh(t0, 0) - 1e-4).abs() < 1e-9);
        // A timeout: at once as slow as it was.
        l.observe(Duration::from_secs(1), t0);
        assert!((l.weigh(t0, 0) - 1.0).abs() < 1e-9);
        // Faded after a while without answers (10 s: to 1/e).
        let later = t0 + Duration::from_secs(10);
        assert!((l.weigh(later, 0) - (-1.0f64).exp()).abs() < 1e-6);
        // With a request in flight, at least the time since the last answer or since it
        // became busy, whichever is later.
        let much_later = t0 + Duration::from_secs(100);
        assert!(l.weigh(much_later, 0) < 1e-4);
        l.busy_from(t0 + Duration::from_secs(99));
        assert!((l.weigh(much_later, 1) - 1.0).abs() < 1e-6);
        l.busy_from(t0);
        assert!((l.weigh(much_later, 1) - 100.0).abs() < 1e-6);
        // Fast answers bring it down only as time passes (a peak is not forgotten by volume).
        let m = PeakEwma::default();
        m.observe(Duration::from_secs(1), t0);
        for i in 1..=1000 {
            m.observe(Duration::from_micros(100), t0 + Duration::from_micros(i));
        }
        assert!(m.weigh(t0 + Duration::from_millis(1), 0) > 0.99);
    }
}
