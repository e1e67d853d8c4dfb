//! The snapshot the data path reads: built from a configuration, swapped atomically,
//! selected per connection ([`snapshot`]: one immutable configuration, indexed for the data
//! path). The live state snapshots share (counters, pools, breakers, outlier state) is
//! [`crate::upstream`]'s.
//!
//! The control path (file reload, xDS) builds a new [`Snapshot`] from a `Config` and stores
//! it with `arc-swap`; requests load the current one without a lock. An update costs what
//! changed: a cluster whose configuration is the same `Arc` as before keeps its whole
//! [`ClusterState`] (endpoints, picker, pools, outlier state); a changed one is rebuilt,
//! keeping the runtime of every endpoint it still has.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Instant, SystemTime},
};

use arc_swap::ArcSwap;

pub mod snapshot;

use snapshot::ListenerIndex;
pub use snapshot::{
    ChainTls, ClusterState, ClusterStates, EndpointHandle, Peeked, Selection, Snapshot,
};

use crate::{
    balance::EndpointPicker,
    config::{Cluster, ClusterMap, Config, Filter, RouteAction},
    tls::{CertStore, TlsContexts},
    upstream::{ClusterRuntime, metrics::UpstreamMetrics},
};

/// At most one `malloc_trim` this often (it walks the heap; pushes can come 100 times a
/// second).
const TRIM_INTERVAL_MS: u64 = 2_000;
/// A trim is worth it once updates rebuilt this many endpoints (or clusters) since the last.
const TRIM_AFTER_FREED: usize = 10_000;
/// Replaced snapshots are kept this long (and at most this many), then freed on the control
/// thread.
const RETIRE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
const RETIRED_MAX: usize = 8;

/// The current snapshot and the live state snapshots share.
pub struct State {
    current: ArcSwap<Snapshot>,
    /// Live cluster state by name; touched only when applying a snapshot (one writer: the
    /// lock only orders appliers, the data path never takes it).
    clusters: Mutex<HashMap<Arc<str>, Arc<ClusterRuntime>>>,
    ready: AtomicBool,
    /// When memory was last given back to the system (ms since `born`), and whether an
    /// apply since has freed enough to be worth it.
    born: Instant,
    trimmed_ms: AtomicU64,
    /// Endpoints (or clusters) rebuilt or removed since the last trim.
    freed: AtomicUsize,
    retired: Mutex<VecDeque<(Instant, Arc<Snapshot>)>>,
    /// Posted whenever listeners (and so filter chains and their policy) change, so open
    /// connections check themselves against the policy in force.
    policy: crate::notice::Notice,
    /// What every cluster's ring hash and Maglev tables may hold together.
    tables: Arc<crate::budget::BufferBudget>,
    /// The families clusters count in.
    metrics: Arc<UpstreamMetrics>,
    /// The workload certificate, and TLS clients and servers that use it.
    pub tls: TlsContexts,
}

/// Ring hash and Maglev tables of all clusters together, by default (`--max-hash-table-bytes`).
pub const DEFAULT_TABLE_BUDGET: usize = 64 << 20;

impl State {
    pub fn new(metrics: Arc<UpstreamMetrics>) -> Arc<Self> {
        Self::with_table_budget(metrics, DEFAULT_TABLE_BUDGET)
    }

    /// A state whose clusters' hash tables hold at most `table_bytes` together.
    pub fn with_table_budget(metrics: Arc<UpstreamMetrics>, table_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(Snapshot::empty()),
            clusters: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            born: Instant::now(),
            trimmed_ms: AtomicU64::new(0),
            freed: AtomicUsize::new(usize::MAX / 2),
            retired: Mutex::new(VecDeque::new()),
            policy: Default::default(),
            tables: crate::budget::BufferBudget::new(table_bytes),
            metrics,
            tls: TlsContexts::new(Arc::new(CertStore::default())),
        })
    }

    /// The snapshot in force now; cheap, lock-free.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A watcher that sees every change of listeners (see [`crate::filters::authz`]).
    pub fn policy_changes(&self) -> crate::notice::Watcher {
        self.policy.watch()
    }

    /// Whether a complete configuration has been applied (the admin server's `/ready`).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn mark_ready(&self) {
        self.set_ready(true);
    }

    /// Sets readiness; what it was before.
    pub fn set_ready(&self, ready: bool) -> bool {
        self.ready.swap(ready, Ordering::Relaxed)
    }

    /// Replaces the snapshot with one built from a validated `config`, which is complete:
    /// tern is ready.
    pub fn apply(&self, config: Config) {
        let version = config.version.clone();
        self.update(config);
        self.mark_ready();
        tracing::info!(%version, "configuration applied");
    }

    /// Replaces the snapshot with one built from `config`, rebuilding only the clusters
    /// whose configuration changed.
    pub fn update(&self, config: Config) {
        let previous = self.load();
        let mut runtimes = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        let mut rebuilt = 0usize;
        let mut rebuilt_endpoints = 0usize;
        let mut new_runtimes = false;
        // The previous snapshot's clusters, patched with what changed.
        let mut clusters = previous.clusters.clone();
        for change in changed_clusters(&previous.config.clusters, &config.clusters) {
            let (name, c) = match change {
                Change::Gone(name) => {
                    clusters.remove(name);
                    continue;
                }
                Change::New(name, c) => (name, c),
            };
            rebuilt += 1;
            rebuilt_endpoints += c.endpoints.len();
            let runtime = runtimes
                .entry(name.clone())
                .or_insert_with(|| {
                    new_runtimes = true;
                    Arc::new(ClusterRuntime::new(name, &self.metrics, &self.tls))
                })
                .clone();
            let state = Arc::new(build_cluster(c.clone(), runtime, &self.tables));
            clusters.insert(name.clone(), state);
        }
        // Clusters that left: their connections close once their requests are done.
        if runtimes.len() > config.clusters.len() {
            runtimes.retain(|name, rt| {
                if config.clusters.contains_key(name) {
                    return true;
                }
                rt.retire();
                rebuilt += 1;
                false
            });
        }
        drop(runtimes);
        let listeners_changed = listeners_changed(&previous.config, &config);
        // An update that changed no listener (an EDS push) keeps the listener index, the
        // chains' TLS servers and the method labels as they are.
        let listeners = if listeners_changed {
            Arc::new(self.index_listeners(&config, &previous))
        } else {
            previous.listeners.clone()
        };
        if listeners_changed || new_runtimes {
            configure_method_labels(&config, &clusters);
        }
        let version = config.version.clone();
        let replaced = self.current.swap(Arc::new(Snapshot {
            config: Arc::new(config),
            clusters,
            applied_at: SystemTime::now(),
            listeners,
        }));
        drop(previous);
        self.retire(replaced);
        if listeners_changed {
            self.policy.post();
        }
        tracing::debug!(%version, clusters_rebuilt = rebuilt, "snapshot swapped");
        self.freed
            .fetch_add(rebuilt_endpoints.max(rebuilt), Ordering::Relaxed);
        self.release_memory();
    }

    /// The listeners indexed by address and name, with their chains' TLS servers.
    fn index_listeners(&self, config: &Config, previous: &Snapshot) -> ListenerIndex {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut by_name = HashMap::with_capacity(config.listeners.len());
        for (i, l) in config.listeners.iter().enumerate() {
            if l.address.ip().is_unspecified() {
                wildcard.insert(l.address.port(), i);
            } else {
                exact.insert(l.address, i);
            }
            by_name.insert(l.name.clone(), i);
        }
        ListenerIndex {
            exact,
            wildcard,
            by_name,
            server_tls: self.server_tls(config, previous),
        }
    }

    /// The TLS servers of the chains that terminate TLS; a chain whose TLS configuration did
    /// not change keeps its server (and its session cache).
    fn server_tls(&self, config: &Config, previous: &Snapshot) -> HashMap<String, Vec<ChainTls>> {
        let mut out = HashMap::new();
        for l in config
            .listeners
            .iter()
            .map(|l| &**l)
            .chain(config.inbound.as_deref())
        {
            let chains: Vec<ChainTls> = l
                .filter_chains
                .iter()
                .filter_map(|c| {
                    let tls = c.tls.as_ref()?;
                    if let Some(kept) = previous
                        .server_tls(&l.name, &c.name)
                        .filter(|k| k.config == *tls)
                    {
                        return Some(kept.clone());
                    }
                    let server = self.tls.server(tls).map(Arc::new).map_err(|e| {
                        tracing::warn!(listener = %l.name, chain = %c.name, error = %e, "TLS server unusable: the chain refuses its connections");
                        e.to_string()
                    });
                    Some(ChainTls {
                        chain: c.name.clone(),
                        config: tls.clone(),
                        server,
                    })
                })
                .collect();
            if !chains.is_empty() {
                out.insert(l.name.clone(), chains);
            }
        }
        out
    }

    /// Keeps a replaced snapshot for a while, so that it is freed here, on the control
    /// thread, rather than by whichever data-plane worker lets go of it last (freeing a
    /// large snapshot is thousands of deallocations).
    fn retire(&self, snapshot: Arc<Snapshot>) {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        retired.push_back((now, snapshot));
        while retired
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= RETIRE_AFTER)
            || retired.len() > RETIRED_MAX
        {
            retired.pop_front();
        }
    }

    /// Frees retired snapshots that aged, and gives freed memory back to the system when
    /// updates have freed enough since the last time and that was long enough ago (called
    /// after updates and once a second).
    pub fn release_memory(&self) {
        {
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            while retired
                .front()
                .is_some_and(|(at, _)| at.elapsed() >= RETIRE_AFTER)
            {
                retired.pop_front();
            }
        }
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        if self.freed.load(Ordering::Relaxed) >= TRIM_AFTER_FREED
            && now.saturating_sub(self.trimmed_ms.load(Ordering::Relaxed)) >= TRIM_INTERVAL_MS
        {
            self.freed.store(0, Ordering::Relaxed);
            self.trimmed_ms.store(now, Ordering::Relaxed);
            // The previous snapshot (unless a connection still holds it) and the
            // translation's decoded resources are free now: without this glibc keeps them
            // (37 MiB instead of 25 MiB idle with 1,000 clusters / 10,000 endpoints).
            crate::memory::release_free_memory();
        }
    }
}

/// How a cluster of a new configuration differs from the one before.
enum Change<'a> {
    /// New, or changed.
    New(&'a Arc<str>, &'a Arc<Cluster>),
    Gone(&'a Arc<str>),
}

/// The clusters `new` adds, changes or removes relative to `old`. The maps share every part
/// of their trees a change did not touch, and the diff skips those parts whole; in the rest,
/// a cluster that is the same `Arc` in both is unchanged without being read (`Cluster` is
/// `Eq`), and one rebuilt equal to the old is unchanged too. So an EDS push to one cluster of
/// 10,000 compares one leaf of the tree, not 10,000 entries.
fn changed_clusters<'a>(old: &'a ClusterMap, new: &'a ClusterMap) -> Vec<Change<'a>> {
    old.diff(new)
        .map(|d| match d {
            imbl::ordmap::DiffItem::Add(name, c)
            | imbl::ordmap::DiffItem::Update { new: (name, c), .. } => Change::New(name, c),
            imbl::ordmap::DiffItem::Remove(name, _) => Change::Gone(name),
        })
        .collect()
}

/// Whether `new` changes any listener of `old`: listeners are shared while unchanged, so a
/// pointer comparison tells (an EDS push compares a few pointers, never a listener).
fn listeners_changed(old: &Config, new: &Config) -> bool {
    let inbound_changed = match (&old.inbound, &new.inbound) {
        (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
        (None, None) => false,
        _ => true,
    };
    let same_list = Arc::ptr_eq(&old.listeners, &new.listeners)
        || (old.listeners.len() == new.listeners.len()
            && old
                .listeners
                .iter()
                .zip(new.listeners.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b)));
    !same_list || inbound_changed || old.no_inbound != new.no_inbound
}

/// A cluster's state for a new or changed configuration: endpoints it keeps keep their
/// runtime; endpoints that left have their connections closed after their requests.
fn build_cluster(
    config: Arc<Cluster>,
    runtime: Arc<ClusterRuntime>,
    tables: &Arc<crate::budget::BufferBudget>,
) -> ClusterState {
    let endpoints: Vec<EndpointHandle> = config
        .endpoints
        .iter()
        .zip(runtime.endpoints_for(&config))
        .map(|(e, rt)| EndpointHandle {
            config: e.clone(),
            runtime: rt,
        })
        .collect();
    let picker = EndpointPicker::within(
        config.lb_policy,
        &config.endpoints,
        &config.locality_weights,
        &config.hash_table,
        tables,
    );
    ClusterState {
        config,
        endpoints,
        picker,
        runtime,
    }
}

/// Methods the configuration routes on keep labels of their own in the clusters they route
/// to.
fn configure_method_labels(config: &Config, clusters: &ClusterStates) {
    for l in config
        .listeners
        .iter()
        .map(|l| &**l)
        .chain(config.inbound.as_deref())
    {
        for chain in &l.filter_chains {
            let Filter::Thrift(t) = &chain.filter else {
                continue;
            };
            for route in &t.routes {
                let (Some(method), RouteAction::Target(target)) =
                    (&route.matcher.method, &route.action)
                else {
                    continue;
                };
                for name in target.clusters() {
                    if let Some(c) = clusters.get(name) {
                        c.runtime.metrics().methods.configure(method.as_bytes());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::parse;

    const CONFIG: &str = r#"
passthrough: deny
listeners:
  - address: 10.96.0.10:9090
    filter_chains:
      - { name: exact, tcp_proxy: { cluster: a } }
  - address: 0.0.0.0:9090
    filter_chains:
      - { name: any, tcp_proxy: { cluster: a } }
      - { name: pod-range, match: { destination_prefixes: [10.1.0.0/16] }, tcp_proxy: { cluster: a } }
      - { name: pod-range-from-us, match: { destination_prefixes: [10.1.0.0/16], source_prefixes: [10.9.0.0/16] }, tcp_proxy: { cluster: a } }
      - { name: host, match: { destination_prefixes: [10.1.2.3/32] }, tcp_proxy: { cluster: a } }
clusters:
  - name: a
    endpoints: [ { address: 10.0.0.1:9090 } ]
"#;

    fn chain_for(s: &Snapshot, dst: &str, src: &str) -> String {
        match s.select(
            dst.parse().unwrap(),
            src.parse().unwrap(),
            &Peeked::default(),
        ) {
            Selection::Chain(_, c) => c.name.clone(),
            Selection::Passthrough => "passthrough".into(),
            Selection::Refused(r) => r.as_str().into(),
        }
    }

    #[test]
    fn selects_listeners_and_chains_as_envoy_does() {
        let state = State::new(Default::default());
        state.apply(parse(CONFIG, "test").unwrap());
        let s = state.load();
        assert_eq!(chain_for(&s, "10.96.0.10:9090", "10.9.0.1:1"), "exact");
        assert_eq!(chain_for(&s, "10.2.0.1:9090", "10.9.0.1:1"), "any");
        assert_eq!(chain_for(&s, "10.1.0.1:9090", "10.8.0.1:1"), "pod-range");
        assert_eq!(
            chain_for(&s, "10.1.0.1:9090", "10.9.0.1:1"),
            "pod-range-from-us"
        );
        assert_eq!(chain_for(&s, "10.1.2.3:9090", "10.9.0.1:1"), "host");
        assert_eq!(
            chain_for(&s, "[::ffff:10.1.2.3]:9090", "10.9.0.1:1"),
            "host"
        );
        assert_eq!(
            chain_for(&s, "10.96.0.10:8080", "10.9.0.1:1"),
            "registry_only"
        );
    }

    #[test]
    fn endpoints_keep_their_state_across_snapshots() {
        let state = State::new(Default::default());
        state.apply(parse(CONFIG, "test").unwrap());
        let before = state.load().clusters["a"].endpoints[0].runtime.clone();
        before
            .traffic()
            .pool()
            .requests
            .fetch_add(7, Ordering::Relaxed);
        state.apply(
            parse(
                &CONFIG.replace("passthrough: deny", "passthrough: allow"),
                "test",
            )
            .unwrap(),
        );
        let after = state.load().clusters["a"].endpoints[0].runtime.clone();
        assert!(Arc::ptr_eq(&before, &after));
        assert_eq!(
            chain_for(&state.load(), "10.96.0.10:8080", "10.9.0.1:1"),
            "passthrough"
        );
    }

    #[test]
    fn changes_between_configurations_are_found_by_diffing_the_maps() {
        let config = parse(CONFIG, "test").unwrap();
        let a = config.clusters.values().next().unwrap().clone();
        let map = |entries: &[(&str, &Arc<Cluster>)]| -> ClusterMap {
            entries
                .iter()
                .map(|(n, c)| (Arc::from(*n), Arc::clone(c)))
                .collect()
        };
        let changed = Arc::new(Cluster {
            request_timeout: a.request_timeout * 2,
            ..(*a).clone()
        });
        // Names are other `Arc`s with the same text: compared by content.
        let old = map(&[("a", &a), ("b", &a), ("c", &a)]);
        let new = map(&[("a", &a), ("b", &changed), ("d", &a)]);
        let seen: Vec<String> = changed_clusters(&old, &new)
            .into_iter()
            .map(|c| match c {
                Change::New(n, c) if Arc::ptr_eq(c, &changed) => format!("changed {n}"),
                Change::New(n, _) => format!("new {n}"),
                Change::Gone(n) => format!("gone {n}"),
            })
            .collect();
        assert_eq!(seen, ["changed b", "gone c", "new d"]);
        assert!(changed_clusters(&new, &new).is_empty());
        // A cluster rebuilt equal to the one in force is no change.
        let rebuilt = map(&[("a", &a), ("b", &Arc::new((*changed).clone())), ("d", &a)]);
        assert!(changed_clusters(&new, &rebuilt).is_empty());
        // One change among 10,000 clusters sharing the rest of the tree.
        let big: ClusterMap = (0..10_000)
            .map(|i| (Arc::from(format!("c{i:05}").as_str()), a.clone()))
            .collect();
        let mut pushed = big.clone();
        pushed.insert("c04321".into(), changed.clone());
        let seen: Vec<&str> = changed_clusters(&big, &pushed)
            .into_iter()
            .map(|c| match c {
                Change::New(n, _) | Change::Gone(n) => &**n,
            })
            .collect();
        assert_eq!(seen, ["c04321"]);
    }

    #[test]
    fn an_update_that_keeps_the_listeners_keeps_their_index() {
        let state = State::new(Default::default());
        let config = parse(CONFIG, "test").unwrap();
        state.apply(config.clone());
        let first = state.load();
        // An EDS push: the same listeners (shared), one cluster changed (its endpoint gone).
        let mut eds = config.clone();
        let mut a = (*eds.clusters["a"]).clone();
        a.endpoints = Arc::from([]);
        eds.clusters.insert("a".into(), Arc::new(a));
        state.apply(eds);
        let second = state.load();
        assert!(Arc::ptr_eq(&first.listeners, &second.listeners));
        assert!(!Arc::ptr_eq(&first.clusters["a"], &second.clusters["a"]));
        assert_eq!(chain_for(&second, "10.96.0.10:9090", "10.9.0.1:1"), "exact");
        // New listeners: a new index, which selects as before.
        state.apply(parse(CONFIG, "test").unwrap());
        let third = state.load();
        assert!(!Arc::ptr_eq(&second.listeners, &third.listeners));
        assert_eq!(chain_for(&third, "10.96.0.10:9090", "10.9.0.1:1"), "exact");
    }

    #[test]
    fn an_endpoint_that_changes_between_tls_and_plaintext_gets_a_new_pool() {
        use crate::config::{
            EndpointMetadata,
            tls::{CertSource, Roots, SocketMatch, TransportSockets, UpstreamTls, Validation},
        };
        let state = State::new(Default::default());
        let mtls = |san: &str| {
            Arc::new(UpstreamTls {
                sni: None,
                alpn: vec!["istio".into()],
                client_cert: Some(CertSource::Workload),
                validation: Validation {
                    roots: Roots::Mesh,
                    subject_alt_names: vec![crate::config::matcher::StringMatch::Exact(san.into())],
                },
                params: Default::default(),
            })
        };
        let with = |tls: Arc<UpstreamTls>, tls_mode: &str| {
            let mut config = parse(CONFIG, "test").unwrap();
            let mut c = (*config.clusters["a"]).clone();
            c.transport = TransportSockets {
                matches: vec![SocketMatch {
                    name: "tlsMode-istio".into(),
                    criteria: vec![("tlsMode".into(), "istio".into())],
                    tls: Some(tls),
                }],
                default: None,
            };
            let mut endpoints = c.endpoints.to_vec();
            endpoints[0].metadata = Some(Arc::new(EndpointMetadata {
                socket_match: vec![("tlsMode".into(), tls_mode.into())],
                workload: None,
            }));
            c.endpoints = endpoints.into();
            config.clusters.insert("a".into(), Arc::new(c));
            config
        };
        let runtime = |state: &State| state.load().clusters["a"].endpoints[0].runtime.clone();
        // Readiness waits for the workload certificate only where it is presented.
        assert!(!parse(CONFIG, "test").unwrap().needs_workload_certificate());
        assert!(with(mtls("spiffe://td/ns/a/sa/b"), "istio").needs_workload_certificate());
        state.apply(with(mtls("spiffe://td/ns/a/sa/b"), "istio"));
        let first = runtime(&state);
        assert!(first.tls.is_some());
        // The same context again (another Arc, equal): the same runtime and pool.
        state.apply(with(mtls("spiffe://td/ns/a/sa/b"), "istio"));
        assert!(Arc::ptr_eq(&first, &runtime(&state)));
        // Another SAN to verify: connections made under the old check are not reused.
        state.apply(with(mtls("spiffe://td/ns/a/sa/c"), "istio"));
        let second = runtime(&state);
        assert!(!Arc::ptr_eq(&first, &second));
        // The Pod lost its sidecar: plaintext, and a new pool again.
        state.apply(with(mtls("spiffe://td/ns/a/sa/c"), "disabled"));
        let third = runtime(&state);
        assert!(third.tls.is_none());
        assert!(!Arc::ptr_eq(&second, &third));
    }
}
