//! The `method` label of `tern_thrift_requests_total`, bounded per cluster.
//!
//! A client chooses its method names (up to the frame limit, 16 MiB each), so they cannot
//! become label values as they come. A method has its own label when the configuration
//! routes on it, or once the cluster's server answered it with a REPLY (so it exists there),
//! up to [`MAX_LEARNED`] names per cluster of at most [`MAX_NAME`] printable bytes; every
//! other request counts under `other`. Lookups read an immutable map (no lock); learning a
//! name copies it, which happens at most [`MAX_LEARNED`] times per cluster. Every request
//! looks its method up, so the map hashes with foldhash, not SipHash (whose lookup was 2.4% of
//! the user-space instructions of a proxied Thrift call): clients choose the names, but the
//! map is bounded and never grows from a lookup, so names that collide cost a lookup a few
//! comparisons at most.
use std::{collections::HashMap, sync::Arc, sync::Mutex};

use arc_swap::ArcSwap;
use prometheus_client::{encoding::EncodeLabelSet, metrics::family::Family};

use crate::sharded::Counter;

/// The labels of `tern_thrift_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub cluster: String,
    pub method: String,
}

/// Names learned from replies, per cluster.
pub const MAX_LEARNED: usize = 64;
/// Longest method name that gets its own label.
pub const MAX_NAME: usize = 128;

/// The methods that have a label of their own, and their counters.
type Labelled = HashMap<Box<[u8]>, Counter, foldhash::fast::RandomState>;

/// The request counters of one cluster, by method.
#[derive(Debug)]
pub struct MethodCounters {
    cluster: String,
    family: Family<MethodLabels, Counter>,
    labelled: ArcSwap<Labelled>,
    learned: Mutex<usize>,
    other: Counter,
}

impl MethodCounters {
    pub fn new(cluster: &str, family: &Family<MethodLabels, Counter>) -> Self {
        let other = family
            .get_or_create(&MethodLabels {
                cluster: cluster.to_owned(),
                method: "other".to_owned(),
            })
            .clone();
        Self {
            cluster: cluster.to_owned(),
            family: family.clone(),
            labelled: ArcSwap::default(),
            learned: Mutex::new(0),
            other,
        }
    }

    /// Counts one request of `method`; `answered` when the server answered it with a REPLY.
    pub fn count(&self, method: &[u8], answered: bool) {
        if let Some(c) = self.labelled.load().get(method) {
            c.inc();
            return;
        }
        let labelled = if answered {
            self.label(method, true)
        } else {
            None
        };
        labelled.as_ref().unwrap_or(&self.other).inc();
    }

    /// Gives a method the configuration routes on its own label.
    pub fn configure(&self, method: &[u8]) {
        self.label(method, false);
    }

    /// Gives `method` a label of its own if it may have one (learned names count against
    /// [`MAX_LEARNED`]) and returns its counter. Rare: once per name.
    fn label(&self, method: &[u8], learned: bool) -> Option<Counter> {
        let printable = !method.is_empty()
            && method.len() <= MAX_NAME
            && method.iter().all(|b| b.is_ascii_graphic())
            && method != b"other";
        if !printable {
            return None;
        }
        let mut count = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.labelled.load_full();
        if let Some(c) = current.get(method) {
            return Some(c.clone());
        }
        if learned && *count >= MAX_LEARNED {
            return None;
        }
        let counter = self
            .family
            .get_or_create(&MethodLabels {
                cluster: self.cluster.clone(),
                method: String::from_utf8_lossy(method).into_owned(),
            })
            .clone();
        let mut next = Labelled::clone(&current);
        next.insert(method.into(), counter.clone());
        self.labelled.store(Arc::new(next));
        if learned {
            *count += 1;
        }
        Some(counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_whatever_clients_send() {
        let family = Family::<MethodLabels, Counter>::default();
        let m = MethodCounters::new("c", &family);
        m.configure(b"add");
        for i in 0..10_000 {
            m.count(format!("junk{i}").as_bytes(), false);
            m.count(format!("real{i}").as_bytes(), true);
        }
        m.count(&[b'x'; 1000], true);
        m.count(b"add", false);
        let get = |method: &str| {
            family
                .get_or_create(&MethodLabels {
                    cluster: "c".into(),
                    method: method.into(),
                })
                .get()
        };
        assert_eq!(get("add"), 1);
        assert_eq!(get("real0"), 1);
        assert_eq!(get("real63"), 1);
        // 10,000 junk names, 9,936 answered names past the first 64, one too long.
        assert_eq!(get("other"), 10_000 + 9_936 + 1);
        // add, other and the 64 learned names: nothing else.
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("requests", "", family.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("requests_total"))
                .count(),
            66
        );
    }
}
