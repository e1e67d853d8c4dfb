//! The services of every source, merged by name and port, and what each source is doing.
//!
//! A source's update replaces what it contributed. A source that fails keeps what it last
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

/// Every source's contribution.
#[derive(Debug, Default)]
pub struct Catalog {
    sources: BTreeMap<String, (SourceStatus, Vec<Service>)>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Catalog {
    /// `source` read `services`, skipping `skipped`.
    pub fn update(&mut self, source: &str, services: Vec<Service>, skipped: Vec<Skipped>) {
        let (status, current) = self
            .sources
            .entry(source.to_owned())
            .or_insert_with(|| (SourceStatus::new(source), Vec::new()));
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
    pub fn failed(&mut self, source: &str, error: String) {
        let (status, _) = self
            .sources
            .entry(source.to_owned())
            .or_insert_with(|| (SourceStatus::new(source), Vec::new()));
        status.failures += 1;
        status.last_error = Some(error);
        if status.state == SourceState::Ok {
            status.state = SourceState::Stale;
        }
    }

    /// The services of every source, merged: one per name and port (the first source, by
    /// name, defines it), with the endpoints of all, each address once.
    pub fn services(&self) -> Vec<Service> {
        let mut merged: BTreeMap<(String, u16), Service> = BTreeMap::new();
        for (_, services) in self.sources.values() {
            for s in services {
                match merged.get_mut(&(s.name.clone(), s.port)) {
                    None => {
                        merged.insert((s.name.clone(), s.port), s.clone());
                    }
                    Some(m) => {
                        for e in &s.endpoints {
                            if !m.endpoints.iter().any(|x| x.address == e.address) {
                                m.endpoints.push(e.clone());
                            }
                        }
                    }
                }
            }
        }
        merged.into_values().collect()
    }

    pub fn status(&self) -> Vec<SourceStatus> {
        self.sources.values().map(|(s, _)| s.clone()).collect()
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
            services("services: [{name: calc, port: 9090, endpoints: [\"10.0.0.1:9090\"]}]"),
            Vec::new(),
        );
        c.update(
            "etcd",
            services("services: [{name: calc, port: 9090, endpoints: [\"10.0.0.1:9090\", \"10.0.0.2:9090\"]}]"),
            vec![Skipped {
                entry: "x".into(),
                reason: "bad".into(),
            }],
        );
        let merged = c.services();
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].endpoints.len(), 2, "each address once");
        c.failed("etcd", "connection refused".into());
        assert_eq!(c.services()[0].endpoints.len(), 2, "stale, not emptied");
        let etcd = c.status().into_iter().find(|s| s.name == "etcd").unwrap();
        assert_eq!(etcd.state, SourceState::Stale);
        assert_eq!(etcd.skipped_total, 1);
        assert_eq!(etcd.last_error.as_deref(), Some("connection refused"));
    }
}
