//! The Pod annotations Istio's injector reads that mean something to tern, turned into tern's
//! environment; a value tern cannot honour is refused, never dropped.
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

use super::InjectError;
use crate::capture::{InboundPorts, parse_cidrs, parse_ports};

pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Istio's per-Pod opt-in and opt-out (label or annotation).
pub const ISTIO_INJECT: &str = "sidecar.istio.io/inject";
/// tern's own per-Pod opt-in and opt-out (label or annotation).
pub const TERN_INJECT: &str = "tern.io/inject";
/// What injection added, so that it is done once.
pub const STATUS: &str = "tern.io/status";

/// The most data-plane workers a Pod may ask for (each is a thread with its own runtime and
/// its own slice of every endpoint's pool).
const MAX_CONCURRENCY: u32 = 256;

/// The part of Istio's `ProxyConfig` tern honours (`proxy.istio.io/config`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfig {
    /// `host:port` of istiod.
    discovery_address: Option<String>,
    /// A Go duration.
    termination_drain_duration: Option<String>,
    /// Data-plane worker threads; 0 for one per core available to tern's container.
    concurrency: Option<u32>,
    /// Extra environment for the proxy.
    #[serde(default)]
    proxy_metadata: BTreeMap<String, String>,
}

/// Environment for the sidecar from the Pod's annotations, in a fixed order.
pub fn environment(annotations: &Value) -> Result<Vec<(String, String)>, InjectError> {
    let get = |key: &str| annotations.get(key).and_then(Value::as_str).map(str::trim);
    let bad = |annotation: &str, why: String| InjectError::Annotation {
        annotation: annotation.to_owned(),
        why,
    };
    let mut env = Vec::new();
    if let Some(v) = get(EXCLUDE_OUTBOUND_PORTS) {
        parse_ports(v).map_err(|e| bad(EXCLUDE_OUTBOUND_PORTS, e))?;
        env.push(("OUTBOUND_PORTS_EXCLUDE".into(), v.to_owned()));
    }
    if let Some(v) = get(EXCLUDE_OUTBOUND_IP_RANGES) {
        parse_cidrs(v).map_err(|e| bad(EXCLUDE_OUTBOUND_IP_RANGES, e))?;
        env.push(("OUTBOUND_IP_RANGES_EXCLUDE".into(), v.to_owned()));
    }
    if let Some(v) = get(INCLUDE_INBOUND_PORTS) {
        v.parse::<InboundPorts>()
            .map_err(|e| bad(INCLUDE_INBOUND_PORTS, e))?;
        env.push(("INBOUND_PORTS_INCLUDE".into(), v.to_owned()));
    }
    if let Some(v) = get(EXCLUDE_INBOUND_PORTS) {
        parse_ports(v).map_err(|e| bad(EXCLUDE_INBOUND_PORTS, e))?;
        env.push(("INBOUND_PORTS_EXCLUDE".into(), v.to_owned()));
    }
    if let Some(v) = get(INCLUDE_OUTBOUND_IP_RANGES)
        && v != "*"
    {
        return Err(bad(
            INCLUDE_OUTBOUND_IP_RANGES,
            "tern captures every outbound range but those excluded; use excludeOutboundIPRanges"
                .into(),
        ));
    }
    if let Some(v) = get(PROXY_CONFIG) {
        let config: ProxyConfig = serde_yaml::from_str(v)
            .map_err(|e| bad(PROXY_CONFIG, format!("not a ProxyConfig: {e}")))?;
        if let Some(address) = config.discovery_address {
            if address.is_empty() || address.contains('/') {
                return Err(bad(
                    PROXY_CONFIG,
                    format!("discoveryAddress {address:?}: expected host:port"),
                ));
            }
            env.push(("XDS_ADDRESS".into(), format!("https://{address}")));
        }
        if let Some(drain) = config.termination_drain_duration {
            let duration = crate::duration::parse_go_duration(&drain)
                .map_err(|e| bad(PROXY_CONFIG, format!("terminationDrainDuration: {e}")))?;
            env.push((
                "TERMINATION_DRAIN_DURATION_SECONDS".into(),
                duration.as_secs().max(1).to_string(),
            ));
        }
        if let Some(workers) = config.concurrency {
            if workers > MAX_CONCURRENCY {
                return Err(bad(
                    PROXY_CONFIG,
                    format!("concurrency {workers}: at most {MAX_CONCURRENCY} workers"),
                ));
            }
            env.push(("TERN_CONCURRENCY".into(), workers.to_string()));
        }
        let read_by_tern = crate::run::args::env_names();
        for (name, value) in config.proxy_metadata {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
            if !valid {
                return Err(bad(
                    PROXY_CONFIG,
                    format!("proxyMetadata {name:?} is not an environment variable name"),
                ));
            }
            if reserved(&name, &read_by_tern) {
                return Err(bad(
                    PROXY_CONFIG,
                    format!(
                        "proxyMetadata {name:?} would set one of tern's own capture, identity or \
                         security settings, which a Pod's annotation may not change"
                    ),
                ));
            }
            env.push((name, value));
        }
    }
    Ok(env)
}

/// Whether a Pod's `proxyMetadata` may not set `name`: what tern reads for its capture,
/// identity and security (every flag's environment fallback, and any `TERN_` name to come),
/// and the dynamic loader's. Istio's `ISTIO_META_*` node metadata, and tern's logging and
/// Thrift port settings, stay open to it.
fn reserved(name: &str, read_by_tern: &std::collections::BTreeSet<String>) -> bool {
    const OPEN: [&str; 5] = [
        "TERN_LOG",
        "TERN_ACCESS_LOG",
        "TERN_THRIFT_PORTS",
        "TERN_THRIFT_DETECT_EXCLUDE_PORTS",
        "TERN_XDS_DELTA",
    ];
    if OPEN.contains(&name)
        || name.starts_with("ISTIO_META_")
        || name.starts_with("ISTIO_METAJSON_")
    {
        return false;
    }
    name.starts_with("TERN_") || name.starts_with("LD_") || read_by_tern.contains(name)
}

/// An explicit `"true"`/`"false"` for `key` in the labels or annotations (labels first).
pub fn opt(labels: &Value, annotations: &Value, key: &str) -> Option<bool> {
    [labels, annotations]
        .into_iter()
        .find_map(|m| m.get(key).and_then(Value::as_str))
        .map(|v| matches!(v.trim(), "true" | "enabled" | "yes" | "y"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> Value {
        let mut m = serde_yaml::Mapping::new();
        for (k, v) in pairs {
            m.insert((*k).into(), (*v).into());
        }
        Value::Mapping(m)
    }

    #[test]
    fn proxy_metadata_cannot_set_terns_own_settings() {
        for name in [
            "TERN_CGROUP",
            "TERN_UNSAFE_NODE_BYPASS",
            "TERN_OUTBOUND_FAIL_OPEN",
            "XDS_ADDRESS",
            "CA_ADDR",
            "POD_UID",
            "INBOUND_PORTS_INCLUDE",
            "TERN_SOMETHING_NEW",
            "LD_PRELOAD",
        ] {
            let config = format!("proxyMetadata:\n  {name}: x\n");
            let err = environment(&annotations(&[(PROXY_CONFIG, &config)])).unwrap_err();
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
        let config = "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  TERN_LOG: debug\n";
        assert!(environment(&annotations(&[(PROXY_CONFIG, config)])).is_ok());
    }

    #[test]
    fn istio_annotations_become_environment() {
        let env = environment(&annotations(&[
            (EXCLUDE_OUTBOUND_PORTS, "22, 9090"),
            (EXCLUDE_INBOUND_PORTS, "8081"),
            (
                PROXY_CONFIG,
                "discoveryAddress: istiod-canary.istio-system.svc:15012\nterminationDrainDuration: 30s\nconcurrency: 4\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
            ),
        ]))
        .unwrap();
        assert_eq!(
            env,
            [
                ("OUTBOUND_PORTS_EXCLUDE", "22, 9090"),
                ("INBOUND_PORTS_EXCLUDE", "8081"),
                (
                    "XDS_ADDRESS",
                    "https://istiod-canary.istio-system.svc:15012"
                ),
                ("TERMINATION_DRAIN_DURATION_SECONDS", "30"),
                ("TERN_CONCURRENCY", "4"),
                ("ISTIO_META_DNS_CAPTURE", "true"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn values_tern_cannot_honour_are_refused_by_name() {
        for (key, value, says) in [
            (EXCLUDE_OUTBOUND_PORTS, "22,ssh", "\"ssh\""),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33", "10.0.0.0/33"),
            (
                INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8",
                "excludeOutboundIPRanges",
            ),
            (PROXY_CONFIG, "terminationDrainDuration: soon", "soon"),
            (PROXY_CONFIG, "concurrency: 100000", "at most 256"),
            (PROXY_CONFIG, "concurrency: -1", "not a ProxyConfig"),
            (PROXY_CONFIG, "[1, 2]", "not a ProxyConfig"),
        ] {
            let err = environment(&annotations(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(says), "{err}");
        }
    }
}
