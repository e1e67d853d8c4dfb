//! What the configuration path counts: updates applied or refused (from the file or by xDS
//! type), the ADS stream's state, what is set aside or refused, and how long applying takes.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigLabels {
    /// `file`, or the xDS resource type (`Listener`, `Cluster`, `ClusterLoadAssignment`, …).
    source: &'static str,
    /// `applied` or `rejected` (an xDS NACK).
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SetAsideLabels {
    /// `listener`, `filter_chain` or `cluster`.
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    /// The xDS resource type (`Listener`, `Cluster`, …).
    resource: &'static str,
}

/// The configuration path's metric families.
#[derive(Clone, Debug)]
pub struct ConfigMetrics {
    updates: Family<ConfigLabels, Counter>,
    connected: Gauge,
    reconnects: Counter,
    pub set_aside: Family<SetAsideLabels, Gauge>,
    rejected: Family<TypeLabel, Gauge>,
    apply_seconds: Family<TypeLabel, Histogram, fn() -> Histogram>,
}

impl ConfigMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "config_updates",
            "Configuration updates by source (file, or xDS type) and result (applied, rejected)",
            m.updates.clone(),
        );
        registry.register(
            "xds_connected",
            "1 while the ADS stream to the control plane is open",
            m.connected.clone(),
        );
        registry.register(
            "xds_reconnects",
            "Times the ADS stream was reopened",
            m.reconnects.clone(),
        );
        registry.register(
            "xds_set_aside",
            "Resources (or filter chains) from the control plane tern knowingly does not run, by kind and reason",
            m.set_aside.clone(),
        );
        registry.register(
            "xds_rejected",
            "Resources refused (NACKed) and not in force, by type",
            m.rejected.clone(),
        );
        registry.register(
            "xds_apply_seconds",
            "Time to apply one xDS response (decode, translate, build and swap the snapshot), by type",
            m.apply_seconds.clone(),
        );
        m
    }

    /// Counts an update from `source` (`file`, or an xDS type's short name) as `applied` or
    /// `rejected`.
    pub fn update(&self, source: &'static str, result: &'static str) {
        self.updates
            .get_or_create(&ConfigLabels { source, result })
            .inc();
    }

    /// The ADS stream's state: open or not, and how many times it reopened in all.
    pub fn stream(&self, connected: bool, reopened_since_last: u64) {
        self.connected.set(i64::from(connected));
        self.reconnects.inc_by(reopened_since_last);
    }

    /// Resources of `resource` type refused and not in force.
    pub fn rejected(&self, resource: &'static str, count: usize) {
        self.rejected
            .get_or_create(&TypeLabel { resource })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// How long applying a response of `resource` type took.
    pub fn applied_in(&self, resource: &'static str, seconds: f64) {
        self.apply_seconds
            .get_or_create(&TypeLabel { resource })
            .observe(seconds);
    }
}

/// Families no registry exports (for tests of the parts that count).
impl Default for ConfigMetrics {
    fn default() -> Self {
        Self {
            updates: Family::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            set_aside: Family::default(),
            rejected: Family::default(),
            apply_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00005, 1.5, 28))
            }),
        }
    }
}
