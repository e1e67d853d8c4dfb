//! The services of every source, merged by name and port, and what each source is doing.
//!
//! The services file defines services (port, protocol, virtual IP, policy, health check);
//! registries (etcd, ZooKeeper) contribute endpoints to the service of the same name, and
//! define with defaults those the file does not (Thrift, round robin, the port of their
//! endpoints, no virtual IP). A source's update replaces what it contributed. A source that fails keeps what it last
//! gave (marked stale, counted): a registry that goes away never empties a service. Entries a
//! source skipped are counted and the latest kept (bounded) with their reasons.
use std::{
    collections::{BTreeMap, VecDeque},
    time::SystemTime,
};

use serde::Serialize;

use crate::{config::Skipped, model::Service};

/// How many skipped entries each source keeps for the admin port.
const SKIPPED_KEPT: usize = 32;

/// A source's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// Its last read succeeded.
    Ok,
    /// Its last read failed: its last good services are still served.
    Stale,
    /// It never gave anything.
    Failing,
}

/// What the admin port shows of a source.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub state: SourceState,
    /// Unix seconds of the last good update.
    pub updated_at: Option<u64>,
    pub last_error: Option<String>,
    pub failures: u64,
    pub services: usize,
    pub endpoints: usize,
    /// Entries skipped since the start, and the latest of them.
    pub skipped_total: u64,
    pub skipped: VecDeque<Skipped>,
}

impl SourceStatus {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: SourceState::Failing,
            updated_at: None,
            last_error: None,
            failures: 0,
            services: 0,
            endpoints: 0,
            skipped_total: 0,
            skipped: VecDeque::new(),
        }
    }
}

/// Whether a source defines services or only lists their endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The services file.
    Definitions,
    /// A registry: its endpoints join the defined service of the same name.
    Registry,
}

/// Every source's contribution.
#[derive(Debug, Default)]
pub struct Catalog {
    sources: BTreeMap<String, (SourceStatus, SourceKind, Vec<Service>)>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Catalog {
    /// `source` read `services`, skipping `skipped`.
    pub fn update(
        &mut self,
        source: &str,
        kind: SourceKind,
        services: Vec<Service>,
        skipped: Vec<Skipped>,
    ) {
        let (status, _, current) = self
            .sources
            .entry(source.to_owned())
            .or_insert_with(|| (SourceStatus::new(source), kind, Vec::new()));
        status.state = SourceState::Ok;
        status.updated_at = Some(unix_now());
        status.last_error = None;
        status.services = services.len();
        status.endpoints = services.iter().map(|s| s.endpoints.len()).sum();
        status.skipped_total += skipped.len() as u64;
        for s in skipped {
            if status.skipped.len() == SKIPPED_KEPT {
                status.skipped.pop_front();
            }
            status.skipped.push_back(s);
        }
        *current = services;
    }

    /// `source` could not be read: what it gave before stays.
    pub fn failed(&mut self, source: &str, kind: SourceKind, error: String) {
        let (status, _, _) = self
            .sources
            .entry(source.to_owned())
            .or_insert_with(|| (SourceStatus::new(source), kind, Vec::new()));
        status.failures += 1;
        status.last_error = Some(error);
        if status.state == SourceState::Ok {
            status.state = SourceState::Stale;
        }
    }

    /// The services of every source, merged: each defined service (the first definition of a
    /// name and port wins) with the endpoints of every registry for its name, and the
    /// services only registries know, each address once.
    pub fn services(&self) -> Vec<Service> {
        let mut defined: BTreeMap<(String, u16), Service> = BTreeMap::new();
        let mut registered: BTreeMap<String, Service> = BTreeMap::new();
        for (_, kind, services) in self.sources.values() {
            for s in services {
                match kind {
                    SourceKind::Definitions => {
                        defined
                            .entry((s.name.clone(), s.port))
                            .or_insert_with(|| s.clone());
                    }
                    SourceKind::Registry => match registered.get_mut(&s.name) {
                        None => {
                            registered.insert(s.name.clone(), s.clone());
                        }
                        Some(r) => add_endpoints(r, s),
                    },
                }
            }
        }
        for r in registered.values() {
            let mut joined = false;
            for d in defined.values_mut().filter(|d| d.name == r.name) {
                add_endpoints(d, r);
                joined = true;
            }
            if !joined {
                defined.insert((r.name.clone(), r.port), r.clone());
            }
        }
        defined.into_values().collect()
    }

    pub fn status(&self) -> Vec<SourceStatus> {
        self.sources.values().map(|(s, _, _)| s.clone()).collect()
    }
}

/// Adds the endpoints of `from` that `to` lacks.
fn add_endpoints(to: &mut Service, from: &Service) {
    for e in &from.endpoints {
        if !to.endpoints.iter().any(|x| x.address == e.address) {
            to.endpoints.push(e.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn services(yaml: &str) -> Vec<Service> {
        config::parse(yaml).unwrap().services
    }

    #[test]
    fn sources_merge_and_a_failing_one_keeps_its_endpoints() {
        let mut c = Catalog::default();
        c.update(
            "file",
            SourceKind::Definitions,
            services("services: [{name: calc, port: 9090, vip: 10.96.0.1, endpoints: [\"10.0.0.1:9090\"]}]"),
            Vec::new(),
        );
        c.update(
            "etcd",
            SourceKind::Registry,
            services(
                "services: [{name: calc, port: 9001, endpoints: [\"10.0.0.1:9090\", \"10.0.0.2:9001\"]},
                            {name: other, port: 7000, endpoints: [\"10.0.0.3:7000\"]}]",
            ),
            vec![Skipped {
                entry: "x".into(),
                reason: "bad".into(),
            }],
        );
        let merged = c.services();
        assert_eq!(merged.len(), 2);
        let calc = &merged[0];
        assert_eq!(
            (calc.port, calc.vip.is_some()),
            (9090, true),
            "the file defines it"
        );
        assert_eq!(calc.endpoints.len(), 2, "each address once");
        assert_eq!(merged[1].name, "other", "known to the registry only");
        c.failed("etcd", SourceKind::Registry, "connection refused".into());
        assert_eq!(c.services()[0].endpoints.len(), 2, "stale, not emptied");
        let etcd = c.status().into_iter().find(|s| s.name == "etcd").unwrap();
        assert_eq!(etcd.state, SourceState::Stale);
        assert_eq!(etcd.skipped_total, 1);
        assert_eq!(etcd.last_error.as_deref(), Some("connection refused"));
    }
}
