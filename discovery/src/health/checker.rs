//! The health checker: one task per checked endpoint, first run at a random point of its
//! jitter (so thousands of endpoints never check in step), then every interval plus random
//! jitter, with at most a bounded number of checks in flight at once. Verdicts are kept by
//! service and address, so a source update that keeps an endpoint keeps its verdict; an
//! endpoint that leaves loses its task and its verdict.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::Rng;
use serde::Serialize;
use tokio::{
    sync::{Notify, Semaphore},
    task::AbortHandle,
};
use tracing::info;

use super::{
    HealthCheck, probe,
    state::{EndpointHealth, Verdict},
};
use crate::model::Service;

/// An endpoint of a service: its cluster name and address.
type Key = (String, SocketAddr);

/// What `/debug/health` shows of a checked endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointStatus {
    pub cluster: String,
    pub address: SocketAddr,
    #[serde(flatten)]
    pub health: EndpointHealth,
}

/// The health checks of every endpoint whose service has one.
#[derive(Debug)]
pub struct Checker {
    verdicts: Mutex<HashMap<Key, EndpointHealth>>,
    tasks: Mutex<HashMap<Key, (HealthCheck, AbortHandle)>>,
    in_flight: Arc<Semaphore>,
    changed: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Checker {
    /// A checker running at most `max_in_flight` checks at once, notifying `changed` when a
    /// verdict changes.
    pub fn new(max_in_flight: usize, changed: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            verdicts: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            changed,
        })
    }

    /// Checks the endpoints of `services` from now on: starts tasks for new endpoints (or
    /// whose check changed) and stops those of endpoints that left.
    pub fn reconcile(self: &Arc<Self>, services: &[Service]) {
        let mut wanted: HashMap<Key, HealthCheck> = HashMap::new();
        for s in services {
            if let Some(hc) = &s.health_check {
                for e in &s.endpoints {
                    wanted.insert((s.cluster(), e.address), hc.clone());
                }
            }
        }
        let mut tasks = lock(&self.tasks);
        tasks.retain(|key, (hc, task)| {
            let keep = wanted.get(key) == Some(hc);
            if !keep {
                task.abort();
            }
            keep
        });
        lock(&self.verdicts).retain(|key, _| tasks.contains_key(key) || wanted.contains_key(key));
        for (key, hc) in wanted {
            if tasks.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(self.clone().check(key.clone(), hc.clone())).abort_handle();
            tasks.insert(key, (hc, task));
        }
    }

    async fn check(self: Arc<Self>, key: Key, hc: HealthCheck) {
        let spread = hc.interval_jitter.max(hc.interval / 10);
        tokio::time::sleep(jitter(spread)).await;
        loop {
            let result = {
                let Ok(_permit) = self.in_flight.acquire().await else {
                    return;
                };
                probe::run(&hc, key.1).await
            };
            let changed = {
                let mut verdicts = lock(&self.verdicts);
                let health = verdicts.entry(key.clone()).or_default();
                let changed = health.record(result, hc.healthy_threshold, hc.unhealthy_threshold);
                if changed {
                    info!(
                        cluster = %key.0,
                        endpoint = %key.1,
                        verdict = ?health.verdict,
                        last_failure = health.last_failure.as_deref().unwrap_or("-"),
                        "health check verdict changed"
                    );
                }
                changed
            };
            if changed {
                self.changed.notify_one();
            }
            tokio::time::sleep(hc.interval + jitter(hc.interval_jitter)).await;
        }
    }

    /// The EDS health of every endpoint of `services`, in their order: the checks' verdicts
    /// where they hold, the registry's word elsewhere and for services in panic.
    pub fn statuses(&self, services: &[Service]) -> Vec<Vec<i32>> {
        let verdicts = lock(&self.verdicts);
        services
            .iter()
            .map(|s| {
                let registry = || s.endpoints.iter().map(|e| e.health.eds()).collect();
                let Some(hc) = &s.health_check else {
                    return registry();
                };
                let cluster = s.cluster();
                let found: Vec<Verdict> = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        verdicts
                            .get(&(cluster.clone(), e.address))
                            .map_or(Verdict::Pending, |h| h.verdict)
                    })
                    .collect();
                let failing = found.iter().filter(|v| **v == Verdict::Unhealthy).count();
                let passing = s.endpoints.len() - failing;
                if passing * 100 < usize::from(hc.panic_threshold) * s.endpoints.len() {
                    return registry();
                }
                s.endpoints
                    .iter()
                    .zip(found)
                    .map(|(e, v)| match v {
                        Verdict::Pending => e.health.eds(),
                        Verdict::Healthy => crate::model::Health::Healthy.eds(),
                        Verdict::Unhealthy => crate::model::Health::Unhealthy.eds(),
                    })
                    .collect()
            })
            .collect()
    }

    /// Every checked endpoint's state.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let mut all: Vec<EndpointStatus> = lock(&self.verdicts)
            .iter()
            .map(|((cluster, address), health)| EndpointStatus {
                cluster: cluster.clone(),
                address: *address,
                health: health.clone(),
            })
            .collect();
        all.sort_by(|a, b| (&a.cluster, a.address).cmp(&(&b.cluster, b.address)));
        all
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, task) in lock(&self.tasks).values() {
            task.abort();
        }
    }
}

fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_micros(rand::rng().random_range(0..=max.as_micros() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    /// A source update that keeps an endpoint keeps its verdict (and its task); one that drops
    /// it drops both.
    #[tokio::test]
    async fn verdicts_survive_updates_that_keep_the_endpoint() {
        let yaml = |endpoints: &str| {
            config::parse(&format!(
                "services:
  - name: calc
    port: 9090
    endpoints: [{endpoints}]
    health_check: {{ interval: 3600s, timeout: 1s, healthy_threshold: 1, unhealthy_threshold: 1, tcp_health_check: {{}} }}
"
            ))
            .unwrap()
            .services
        };
        let checker = Checker::new(4, Arc::new(Notify::new()));
        checker.reconcile(&yaml("\"10.0.0.1:9090\""));
        let key = (
            "outbound|9090||calc".to_owned(),
            "10.0.0.1:9090".parse().unwrap(),
        );
        lock(&checker.verdicts)
            .entry(key.clone())
            .or_default()
            .record(Err("refused".into()), 1, 1);
        checker.reconcile(&yaml("\"10.0.0.1:9090\", \"10.0.0.2:9090\""));
        assert_eq!(lock(&checker.verdicts)[&key].verdict, Verdict::Unhealthy);
        assert_eq!(lock(&checker.tasks).len(), 2);
        checker.reconcile(&yaml("\"10.0.0.2:9090\""));
        assert!(!lock(&checker.verdicts).contains_key(&key));
        assert_eq!(lock(&checker.tasks).len(), 1);
    }

    /// Endpoints of a service whose check fails everywhere are served as their registry says
    /// (panic); one failing endpoint of three is served UNHEALTHY.
    #[test]
    fn verdicts_become_eds_health_unless_the_service_panics() {
        let services = config::parse(
            "services:
  - name: calc
    port: 9090
    endpoints: [\"10.0.0.1:9090\", \"10.0.0.2:9090\", \"10.0.0.3:9090\"]
    health_check: { interval: 1s, timeout: 1s, healthy_threshold: 1, unhealthy_threshold: 1, tcp_health_check: {} }
",
        )
        .unwrap()
        .services;
        let checker = Checker::new(4, Arc::new(Notify::new()));
        let set = |addr: &str, ok: bool| {
            let key = ("outbound|9090||calc".to_owned(), addr.parse().unwrap());
            let r = if ok {
                Ok(())
            } else {
                Err("refused".to_owned())
            };
            lock(&checker.verdicts)
                .entry(key)
                .or_default()
                .record(r, 1, 1);
        };
        set("10.0.0.1:9090", true);
        set("10.0.0.2:9090", false);
        assert_eq!(checker.statuses(&services), [[1, 2, 0]]);
        set("10.0.0.1:9090", false);
        set("10.0.0.3:9090", false);
        assert_eq!(
            checker.statuses(&services),
            [[0, 0, 0]],
            "every check fails: panic, all served"
        );
    }
}
