//! One endpoint's health from its consecutive check results: Envoy's thresholds, without I/O.
use serde::Serialize;

/// What the checks concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No conclusion yet: served as the registry says.
    Pending,
    Healthy,
    Unhealthy,
}

/// The results of one endpoint's checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointHealth {
    pub verdict: Verdict,
    /// Consecutive results of the same kind so far.
    pub successes: u32,
    pub failures: u32,
    /// Why the last check failed.
    pub last_failure: Option<String>,
    pub checks: u64,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        Self {
            verdict: Verdict::Pending,
            successes: 0,
            failures: 0,
            last_failure: None,
            checks: 0,
        }
    }
}

impl EndpointHealth {
    /// Records a check's result; returns whether the verdict changed.
    pub fn record(&mut self, result: Result<(), String>, healthy: u32, unhealthy: u32) -> bool {
        let before = self.verdict;
        self.checks += 1;
        match result {
            Ok(()) => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                // One success marks a new endpoint healthy; a failed one needs the threshold.
                if self.verdict == Verdict::Pending
                    || (self.verdict == Verdict::Unhealthy && self.successes >= healthy.max(1))
                {
                    self.verdict = Verdict::Healthy;
                }
            }
            Err(why) => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.last_failure = Some(why);
                if self.failures >= unhealthy.max(1) {
                    self.verdict = Verdict::Unhealthy;
                }
            }
        }
        self.verdict != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_decide_as_envoys_do() {
        let mut h = EndpointHealth::default();
        assert!(
            h.record(Ok(()), 2, 3),
            "one success marks a new endpoint healthy"
        );
        assert_eq!(h.verdict, Verdict::Healthy);
        assert!(!h.record(Err("timeout".into()), 2, 3));
        assert!(!h.record(Err("timeout".into()), 2, 3));
        assert!(
            h.record(Err("timeout".into()), 2, 3),
            "the third failure in a row"
        );
        assert_eq!(h.verdict, Verdict::Unhealthy);
        assert!(
            !h.record(Ok(()), 2, 3),
            "one success is not enough to come back"
        );
        assert!(h.record(Ok(()), 2, 3));
        assert_eq!(h.verdict, Verdict::Healthy);
        // A failure between successes starts the count again.
        let mut p = EndpointHealth::default();
        p.record(Err("refused".into()), 1, 2);
        assert_eq!(p.verdict, Verdict::Pending);
        p.record(Err("refused".into()), 1, 2);
        assert_eq!(p.verdict, Verdict::Unhealthy);
        assert_eq!(p.last_failure.as_deref(), Some("refused"));
    }
}
