//! A `Cluster` into tern's model, without its endpoints (EDS sends those separately).
//!
//! EDS clusters take their endpoints from the `ClusterLoadAssignment` named by
//! `service_name` (else the cluster name), STATIC ones carry them inline, ORIGINAL_DST ones
//! relay to the original destination. Load-balancing policy with Envoy's ring hash and
//! Maglev sizes, connect timeout, default-priority circuit breakers, outlier detection only
//! where the cluster asks for it, with Envoy's defaults for what it leaves out, and how Thrift
//! requests use upstream connections from tern's own metadata.
use std::time::Duration;

use tern_proto::{Cluster as XdsCluster, cluster_types};

use super::{
    Invalid, SetAsideReason, TranslateError, count, duration,
    endpoints::{self, LoadAssignment},
};
use crate::config::{
    CircuitBreakers, Cluster, DEFAULT_CONNECTIONS_PER_ENDPOINT, HashTable, LbPolicy,
    OutlierDetection, ServiceRef, UpstreamMode,
};

/// Where a cluster's endpoints come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Endpoints {
    /// The `ClusterLoadAssignment` of this name, waited for at most this long before the
    /// cluster is used without endpoints (`initial_fetch_timeout`; `None`: forever).
    Eds {
        name: String,
        initial_fetch_timeout: Option<Duration>,
    },
    /// Inline (STATIC), or none at all.
    Fixed(LoadAssignment),
}

/// A translated cluster: its configuration (endpoints empty), where its endpoints come
/// from, and what of it is set aside.
#[derive(Clone, Debug, PartialEq)]
pub struct Translated {
    pub cluster: Cluster,
    pub endpoints: Endpoints,
    pub set_aside: Option<SetAsideReason>,
}

/// Envoy's `initial_fetch_timeout` default.
const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's largest `maximum_ring_size`.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

pub fn translate(c: &XdsCluster) -> Result<Translated, TranslateError> {
    use cluster_types::ClusterDiscoveryType;
    let mut set_aside = None;
    let mut original_dst = false;
    let endpoints = match c.cluster_discovery_type {
        None | Some(ClusterDiscoveryType::Type(0)) => Endpoints::Fixed(match &c.load_assignment {
            Some(cla) => endpoints::translate(cla).map_err(|e| e.at("load_assignment"))?,
            None => LoadAssignment::default(),
        }),
        Some(ClusterDiscoveryType::Type(3)) => {
            let eds = c.eds_cluster_config.as_ref();
            let name = eds
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| c.name.clone());
            let timeout = eds
                .and_then(|e| e.eds_config.as_ref())
                .and_then(|s| s.initial_fetch_timeout.as_ref())
                .map_or(Some(INITIAL_FETCH_TIMEOUT), |d| {
                    Some(duration(d)).filter(|d| !d.is_zero())
                });
            Endpoints::Eds {
                name,
                initial_fetch_timeout: timeout,
            }
        }
        Some(ClusterDiscoveryType::Type(4)) => {
            original_dst = true;
            Endpoints::Fixed(LoadAssignment::default())
        }
        // DNS clusters (ServiceEntries with DNS resolution) stay, without endpoints:
        // requests to them get a local reply rather than the resource being refused.
        Some(ClusterDiscoveryType::Type(_)) => {
            set_aside = Some(SetAsideReason::DnsCluster);
            Endpoints::Fixed(LoadAssignment::default())
        }
        Some(ClusterDiscoveryType::ClusterType(_)) => {
            set_aside = Some(SetAsideReason::CustomCluster);
            Endpoints::Fixed(LoadAssignment::default())
        }
    };
    let transport = super::tls::transport_sockets(c).map_err(|e| e.at("transport_socket"))?;
    let (upstream, connections_per_endpoint) = upstream(c)?;
    let lb_policy = match c.lb_policy {
        0 => LbPolicy::RoundRobin,
        1 => LbPolicy::LeastRequest,
        2 => LbPolicy::RingHash,
        3 => LbPolicy::Random,
        5 => LbPolicy::Maglev,
        // CLUSTER_PROVIDED (istiod's PassthroughCluster) and policies tern lacks: round robin.
        _ => LbPolicy::RoundRobin,
    };
    let defaults = CircuitBreakers::default();
    let thresholds = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.iter().find(|t| t.priority == 0));
    let threshold = |get: fn(&cluster_types::circuit_breakers::Thresholds) -> Option<u32>,
                     default: usize| {
        thresholds.and_then(get).map_or(default, count)
    };
    let cluster = Cluster {
        name: c.name.clone(),
        lb_policy,
        hash_header: None,
        hash_table: hash_table(c)?,
        endpoints: std::sync::Arc::new([]),
        locality_weights: Default::default(),
        request_timeout: Duration::from_secs(15),
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map_or(Duration::from_secs(10), duration),
        circuit_breakers: CircuitBreakers {
            max_connections: threshold(
                |t| t.max_connections.map(|v| v.value),
                defaults.max_connections,
            ),
            max_pending_requests: threshold(
                |t| t.max_pending_requests.map(|v| v.value),
                defaults.max_pending_requests,
            ),
            max_requests: threshold(|t| t.max_requests.map(|v| v.value), defaults.max_requests),
        },
        outlier: c.outlier_detection.as_ref().map(outlier),
        upstream,
        connections_per_endpoint,
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
        original_dst,
        transport,
        service: service(c).map(std::sync::Arc::new),
    };
    Ok(Translated {
        cluster,
        endpoints,
        set_aside,
    })
}

/// Ring hash and Maglev sizes, checked as Envoy checks them.
fn hash_table(c: &XdsCluster) -> Result<HashTable, TranslateError> {
    use cluster_types::LbConfig;
    let mut table = HashTable::default();
    match &c.lb_config {
        Some(LbConfig::RingHashLbConfig(r)) => {
            if let Some(v) = r.minimum_ring_size {
                table.minimum_ring_size = v.value.max(1);
            }
            if let Some(v) = r.maximum_ring_size {
                table.maximum_ring_size = v.value.clamp(1, MAX_RING_SIZE);
            }
            table.minimum_ring_size = table.minimum_ring_size.min(MAX_RING_SIZE);
            if table.minimum_ring_size > table.maximum_ring_size {
                return Err(Invalid::RingSize {
                    min: table.minimum_ring_size,
                    max: table.maximum_ring_size,
                }
                .at("ring_hash_lb_config"));
            }
        }
        Some(LbConfig::MaglevLbConfig(m)) => {
            if let Some(v) = m.table_size {
                // Envoy allows up to 5,000,011; a prime keeps every permutation complete.
                if v.value > 5_000_011 || !is_prime(v.value) {
                    return Err(Invalid::MaglevTableSize(v.value).at("maglev_lb_config"));
                }
                table.maglev_table_size = v.value;
            }
        }
        _ => {}
    }
    Ok(table)
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// Envoy's outlier detection settings, with its defaults for what is left out.
fn outlier(o: &cluster_types::OutlierDetection) -> OutlierDetection {
    let d = OutlierDetection::default();
    let percent = |v: Option<tern_proto::wkt::UInt32Value>, default: u32| {
        v.map_or(default, |v| v.value.min(100))
    };
    OutlierDetection {
        consecutive_5xx: o.consecutive_5xx.map_or(d.consecutive_5xx, |v| v.value),
        enforcing_consecutive_5xx: percent(
            o.enforcing_consecutive_5xx,
            d.enforcing_consecutive_5xx,
        ),
        consecutive_gateway_failure: o
            .consecutive_gateway_failure
            .map_or(d.consecutive_gateway_failure, |v| v.value),
        enforcing_consecutive_gateway_failure: percent(
            o.enforcing_consecutive_gateway_failure,
            d.enforcing_consecutive_gateway_failure,
        ),
        base_ejection: o
            .base_ejection_time
            .as_ref()
            .map_or(d.base_ejection, duration),
        max_ejection: o
            .max_ejection_time
            .as_ref()
            .map_or(d.max_ejection, duration),
        max_ejection_percent: percent(o.max_ejection_percent, d.max_ejection_percent),
    }
}

/// The service from istiod's `istio.services` metadata, else from the cluster's name.
fn service(c: &XdsCluster) -> Option<ServiceRef> {
    use tern_proto::wkt::Kind;
    let first = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("istio"))
        .and_then(|s| s.fields.get("services"))
        .and_then(|v| match &v.kind {
            Some(Kind::ListValue(l)) => l.values.first(),
            _ => None,
        })
        .and_then(|v| match &v.kind {
            Some(Kind::StructValue(s)) => Some(s),
            _ => None,
        });
    let text = |s: &tern_proto::wkt::Struct, k: &str| match s
        .fields
        .get(k)
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(v)) => Some(v.clone()),
        _ => None,
    };
    match first {
        Some(s) => Some(ServiceRef {
            host: text(s, "host")?,
            name: text(s, "name").unwrap_or_default(),
            namespace: text(s, "namespace").unwrap_or_default(),
        }),
        None => ServiceRef::from_cluster_name(&c.name),
    }
}

/// How the cluster's Thrift requests use upstream connections, from tern's own metadata (a
/// DestinationRule cannot say it; an EnvoyFilter, `tern discovery` or another control plane
/// can): `filter_metadata: { tern: { thrift_upstream: multiplexed, connections_per_endpoint: 8 } }`.
/// Exclusive connections, 4 per endpoint when multiplexed, unless it says otherwise; a value
/// tern cannot read refuses the cluster, rather than serve it some other way than asked.
fn upstream(c: &XdsCluster) -> Result<(UpstreamMode, usize), TranslateError> {
    use tern_proto::wkt::Kind;
    let Some(tern) = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("tern"))
    else {
        return Ok((UpstreamMode::Exclusive, DEFAULT_CONNECTIONS_PER_ENDPOINT));
    };
    let at = |key: &str| format!("metadata.filter_metadata.tern.{key}");
    let mode = match tern.fields.get("thrift_upstream").map(|v| &v.kind) {
        None => UpstreamMode::Exclusive,
        Some(Some(Kind::StringValue(s))) if s == "exclusive" => UpstreamMode::Exclusive,
        Some(Some(Kind::StringValue(s))) if s == "multiplexed" => UpstreamMode::Multiplexed,
        Some(other) => {
            return Err(Invalid::TernMetadata(format!(
                "{other:?} is neither \"exclusive\" nor \"multiplexed\""
            ))
            .at(at("thrift_upstream")));
        }
    };
    let per_endpoint = match tern.fields.get("connections_per_endpoint").map(|v| &v.kind) {
        None => DEFAULT_CONNECTIONS_PER_ENDPOINT,
        Some(Some(Kind::NumberValue(n)))
            if n.fract() == 0.0 && (1.0..=f64::from(u32::MAX)).contains(n) =>
        {
            *n as usize
        }
        Some(other) => {
            return Err(Invalid::TernMetadata(format!(
                "{other:?} is not a whole number of at least 1"
            ))
            .at(at("connections_per_endpoint")));
        }
    };
    Ok((mode, per_endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terns_metadata_chooses_upstream_connections_and_what_it_cannot_read_is_refused() {
        use tern_proto::wkt::{Kind, Value};
        let with = |fields: &[(&str, Kind)]| {
            let mut c = XdsCluster {
                name: "c".into(),
                ..Default::default()
            };
            let md = c.metadata.get_or_insert_with(Default::default);
            let tern = md.filter_metadata.entry("tern".into()).or_default();
            for (k, v) in fields {
                tern.fields.insert(
                    (*k).into(),
                    Value {
                        kind: Some(v.clone()),
                    },
                );
            }
            translate(&c).map(|t| (t.cluster.upstream, t.cluster.connections_per_endpoint))
        };
        let text = |s: &str| Kind::StringValue(s.into());
        assert_eq!(with(&[]).unwrap(), (UpstreamMode::Exclusive, 4));
        assert_eq!(
            with(&[("thrift_upstream", text("multiplexed"))]).unwrap(),
            (UpstreamMode::Multiplexed, 4)
        );
        assert_eq!(
            with(&[
                ("thrift_upstream", text("multiplexed")),
                ("connections_per_endpoint", Kind::NumberValue(8.0))
            ])
            .unwrap(),
            (UpstreamMode::Multiplexed, 8)
        );
        for (key, bad) in [
            ("thrift_upstream", text("multiplex")),
            ("thrift_upstream", Kind::BoolValue(true)),
            ("connections_per_endpoint", Kind::NumberValue(0.0)),
            ("connections_per_endpoint", Kind::NumberValue(2.5)),
            ("connections_per_endpoint", Kind::NumberValue(f64::NAN)),
            ("connections_per_endpoint", text("8")),
        ] {
            let e = with(&[(key, bad.clone())]).unwrap_err().to_string();
            assert!(e.contains(key), "{key} {bad:?}: {e}");
        }
    }

    #[test]
    fn outlier_detection_only_where_asked_with_envoys_defaults() {
        let plain = XdsCluster {
            name: "c".into(),
            ..Default::default()
        };
        assert_eq!(translate(&plain).unwrap().cluster.outlier, None);
        let asked = XdsCluster {
            outlier_detection: Some(cluster_types::OutlierDetection {
                consecutive_5xx: Some(tern_proto::wkt::UInt32Value { value: 3 }),
                max_ejection_percent: Some(tern_proto::wkt::UInt32Value { value: 250 }),
                ..Default::default()
            }),
            ..plain
        };
        let o = translate(&asked).unwrap().cluster.outlier.unwrap();
        assert_eq!(o.consecutive_5xx, 3);
        assert_eq!(o.max_ejection_percent, 100, "a percentage is at most 100");
        assert_eq!(o.enforcing_consecutive_gateway_failure, 0);
        assert_eq!(o.base_ejection, Duration::from_secs(30));
    }

    #[test]
    fn hash_sizes_are_checked_and_only_that_cluster_is_refused() {
        use tern_proto::wkt::UInt64Value;
        let ring = |min: u64, max: u64| XdsCluster {
            name: "ring".into(),
            lb_policy: 2,
            lb_config: Some(cluster_types::LbConfig::RingHashLbConfig(
                cluster_types::RingHashLbConfig {
                    minimum_ring_size: Some(UInt64Value { value: min }),
                    maximum_ring_size: Some(UInt64Value { value: max }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let t = translate(&ring(12, 100)).unwrap();
        assert_eq!(t.cluster.lb_policy, LbPolicy::RingHash);
        assert_eq!(t.cluster.hash_table.minimum_ring_size, 12);
        let err = translate(&ring(20, 10)).unwrap_err().to_string();
        assert!(
            err.contains("minimum_ring_size (20) > maximum_ring_size (10)"),
            "{err}"
        );
        let huge = translate(&ring(u64::MAX, u64::MAX)).unwrap();
        assert_eq!(huge.cluster.hash_table.maximum_ring_size, MAX_RING_SIZE);
        let maglev = |size: u64| XdsCluster {
            name: "maglev".into(),
            lb_policy: 5,
            lb_config: Some(cluster_types::LbConfig::MaglevLbConfig(
                cluster_types::MaglevLbConfig {
                    table_size: Some(UInt64Value { value: size }),
                },
            )),
            ..Default::default()
        };
        assert_eq!(
            translate(&maglev(17))
                .unwrap()
                .cluster
                .hash_table
                .maglev_table_size,
            17
        );
        assert!(translate(&maglev(8)).is_err());
        assert!(translate(&maglev(u64::MAX)).is_err());
    }
}
