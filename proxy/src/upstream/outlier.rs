//! Envoy's consecutive-error outlier detection, for the clusters that ask for it.
//!
//! An endpoint counts its consecutive 5xx errors and, among them, its consecutive gateway
//! errors (it could not be reached, the connection was lost, the request timed out). When
//! either reaches its threshold, the endpoint is ejected — if the roll against the
//! `enforcing_*` percentage says so, and if no more than `max_ejection_percent` of the
//! cluster would be ejected (one endpoint always can be). The nth ejection lasts n times the
//! base time, up to the maximum; then the endpoint comes back by itself.
use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use rand::Rng;

use crate::config::OutlierDetection;

/// Milliseconds since the process started (for ejection deadlines in atomics).
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What went wrong with a request or connection, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not reached, connection lost, or timed out (Envoy's gateway errors, also 5xx).
    Gateway,
    /// The server answered with a `TApplicationException` (a 5xx, not a gateway error).
    Application,
}

/// One endpoint's outlier state.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
}

impl Outlier {
    /// Whether the endpoint is ejected now. Every pick asks this of its candidates, so an
    /// endpoint that is not ejected (0) costs no clock read; one whose ejection ran out is
    /// set back to 0 by the first look after (unless a new ejection came in between).
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if until > now_ms() {
            return true;
        }
        let _ =
            self.ejected_until_ms
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// A success ends both runs of failures. Every answered request says so, from every
    /// worker: the counts are written only when there is a run to end, so the line stays
    /// shared between the cores rather than passed back and forth.
    pub fn success(&self) {
        for run in [&self.consecutive_5xx, &self.consecutive_gateway] {
            if run.load(Ordering::Relaxed) != 0 {
                run.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Counts a failure; returns how long the endpoint is ejected for, if it now is.
    /// `ejected_now` is how many of the cluster's `endpoints` are ejected already.
    pub fn failure(
        &self,
        failure: Failure,
        config: &OutlierDetection,
        ejected_now: impl FnOnce() -> usize,
        endpoints: usize,
    ) -> Option<Duration> {
        let n5xx = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        let ngateway = match failure {
            Failure::Gateway => self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1,
            Failure::Application => {
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                0
            }
        };
        let by_5xx = config.consecutive_5xx > 0
            && n5xx >= config.consecutive_5xx
            && roll(config.enforcing_consecutive_5xx);
        let by_gateway = config.consecutive_gateway_failure > 0
            && ngateway >= config.consecutive_gateway_failure
            && roll(config.enforcing_consecutive_gateway_failure);
        if !(by_5xx || by_gateway) || self.ejected() {
            return None;
        }
        // Envoy checks the percentage before ejecting, and always lets one endpoint go.
        let ejected = ejected_now();
        let limit = u128::from(config.max_ejection_percent) * endpoints as u128;
        if ejected > 0 && (ejected as u128) * 100 >= limit {
            return None;
        }
        self.success();
        let times = self
            .ejections
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let duration = config
            .base_ejection
            .saturating_mul(times)
            .min(config.max_ejection.max(config.base_ejection));
        // Saturating: a base ejection time of years ejects until the end of time, and never
        // wraps to "not ejected".
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        self.ejected_until_ms
            .store(now_ms().saturating_add(millis), Ordering::Relaxed);
        Some(duration)
    }
}

/// True with `percent` percent probability.
fn roll(percent: u32) -> bool {
    percent >= 100 || (percent > 0 && rand::rng().random_range(0..100) < percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(consecutive: u32, base: Duration) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: consecutive,
            base_ejection: base,
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        }
    }

    #[test]
    fn consecutive_errors_eject_and_the_endpoint_comes_back() {
        let o = Outlier::default();
        let c = config(2, Duration::from_millis(50));
        assert_eq!(o.failure(Failure::Gateway, &c, || 0, 3), None);
        o.success();
        assert_eq!(o.failure(Failure::Application, &c, || 0, 3), None);
        assert!(!o.ejected(), "a success resets the count");
        assert!(o.failure(Failure::Application, &c, || 0, 3).is_some());
        assert!(o.ejected());
        std::thread::sleep(Duration::from_millis(80));
        assert!(!o.ejected());
        assert_eq!(
            o.ejected_until_ms.load(Ordering::Relaxed),
            0,
            "a lapsed ejection is cleared, so later looks read no clock"
        );
        assert!(o.failure(Failure::Application, &c, || 0, 3).is_none());
        assert!(o.failure(Failure::Application, &c, || 0, 3).is_some());
        assert!(o.ejected(), "ejected again after being cleared");
    }

    #[test]
    fn a_huge_ejection_time_ejects_without_overflow() {
        let o = Outlier::default();
        let c = OutlierDetection {
            max_ejection: Duration::MAX,
            ..config(1, Duration::MAX)
        };
        assert!(o.failure(Failure::Gateway, &c, || 0, 1).is_some());
        assert!(o.ejected());
    }

    #[test]
    fn gateway_errors_eject_only_where_enforced() {
        // Envoy's defaults: 5 gateway errors eject with 0% enforcement, so never by that
        // rule; the same 5 count as 5xx, which are enforced.
        let defaults = OutlierDetection {
            consecutive_5xx: 0,
            ..OutlierDetection::default()
        };
        let o = Outlier::default();
        for _ in 0..10 {
            assert_eq!(o.failure(Failure::Gateway, &defaults, || 0, 1), None);
        }
        let enforced = OutlierDetection {
            enforcing_consecutive_gateway_failure: 100,
            ..defaults
        };
        let o = Outlier::default();
        let ejections: Vec<_> = (0..5)
            .map(|_| o.failure(Failure::Gateway, &enforced, || 0, 1))
            .collect();
        assert_eq!(ejections[4], Some(Duration::from_secs(30)));
        assert!(ejections[..4].iter().all(Option::is_none));
    }

    #[test]
    fn ejections_grow_to_the_maximum_and_respect_the_percentage() {
        let c = OutlierDetection {
            max_ejection: Duration::from_secs(70),
            max_ejection_percent: 10,
            ..config(1, Duration::from_secs(30))
        };
        let o = Outlier::default();
        assert_eq!(
            o.failure(Failure::Gateway, &c, || 0, 20),
            Some(Duration::from_secs(30))
        );
        o.ejected_until_ms.store(0, Ordering::Relaxed);
        assert_eq!(
            o.failure(Failure::Gateway, &c, || 0, 20),
            Some(Duration::from_secs(60))
        );
        o.ejected_until_ms.store(0, Ordering::Relaxed);
        assert_eq!(
            o.failure(Failure::Gateway, &c, || 0, 20),
            Some(Duration::from_secs(70))
        );
        // 10% of 20 endpoints: two may be ejected at once, not three; one always may.
        let other = Outlier::default();
        assert!(other.failure(Failure::Gateway, &c, || 1, 20).is_some());
        let third = Outlier::default();
        assert_eq!(third.failure(Failure::Gateway, &c, || 2, 20), None);
        let lone = Outlier::default();
        assert!(lone.failure(Failure::Gateway, &c, || 0, 2).is_some());
    }
}
