//! The services file (`tern discovery --config`): services with their endpoints, in YAML.
//!
//! ```yaml
//! services:
//!   - name: calc              # gRPC dials xds:///calc; sidecars get outbound|9090||calc
//!     port: 9090
//!     protocol: thrift        # thrift | grpc | tcp (default)
//!     vip: 10.96.0.50         # optional: the address sidecars capture (<vip>_<port>)
//!     lb: round_robin         # round_robin (default) | least_request | ring_hash | random
//!     thrift_upstream: exclusive  # exclusive (default): a connection per request until its
//!                             # reply; multiplexed: tern sidecars share connections (servers
//!                             # that answer out of order); thrift services only
//!     connections_per_endpoint: 4 # multiplexed only: connections per endpoint (default 4)
//!     endpoints:
//!       - 10.0.0.1:9090
//!       - { address: 10.0.0.2:9090, weight: 3, region: eu, zone: eu-1, health: healthy }
//!     health_check:           # Envoy's HealthCheck fields (durations as in Envoy's JSON)
//!       interval: 1s
//!       timeout: 500ms
//!       interval_jitter: 100ms  # optional
//!       healthy_threshold: 2
//!       unhealthy_threshold: 2
//!       panic_threshold: 50     # optional (Envoy's default): see crate::health
//!       thrift_health_check: { method_name: ping, transport: FRAMED, protocol: BINARY }
//!       # or tcp_health_check: {}
//! ```
//!
//! A file that is not this shape is refused whole (the last good one stays in force). Within
//! it, a service or an endpoint that does not parse, a duplicate, a weight of 0 or an endpoint
//! that is not an IP address is skipped with its reason, and the rest is served.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use serde::Deserialize;

use crate::{
    health::{Check, HealthCheck, ThriftProtocol, ThriftTransport},
    model::{Endpoint, Health, LbPolicy, Locality, Protocol, Service, ThriftUpstream},
};

/// Why a services file was refused whole.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the services file is not YAML of the expected shape: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// An entry left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub entry: String,
    pub reason: String,
}

/// What a services file gives.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub services: Vec<Service>,
    pub skipped: Vec<Skipped>,
}

/// The file: its services as `S` (each a YAML value, so that a bad one can be skipped; or
/// typed at once, the fast way for a file without a bad entry).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml<S> {
    #[serde(default = "Vec::new")]
    services: Vec<S>,
}

/// A service, with its endpoints as `E` (YAML values or typed).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceYaml<E> {
    name: String,
    port: u16,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    vip: Option<IpAddr>,
    #[serde(default)]
    lb: LbPolicy,
    #[serde(default)]
    thrift_upstream: ThriftUpstream,
    #[serde(default)]
    connections_per_endpoint: Option<u32>,
    #[serde(default = "Vec::new")]
    endpoints: Vec<E>,
    #[serde(default)]
    health_check: Option<HealthCheckYaml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckYaml {
    interval: String,
    timeout: String,
    #[serde(default)]
    interval_jitter: Option<String>,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    #[serde(default = "fifty")]
    panic_threshold: u8,
    #[serde(default)]
    tcp_health_check: Option<serde_yaml::Mapping>,
    #[serde(default)]
    thrift_health_check: Option<ThriftCheckYaml>,
}

fn fifty() -> u8 {
    50
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThriftCheckYaml {
    method_name: String,
    #[serde(default)]
    transport: ThriftTransport,
    #[serde(default)]
    protocol: ThriftProtocol,
    #[serde(default)]
    exception_is_healthy: bool,
}

/// A duration as Envoy's JSON writes them (`1s`, `0.5s`) or with `ms`.
fn duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        return Err(format!("{text:?} is not a duration (1s, 0.5s, 500ms)"));
    };
    let seconds = number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0 && *v <= 86_400.0)
        .ok_or_else(|| format!("{text:?} is not a duration (1s, 0.5s, 500ms)"))?;
    Ok(std::time::Duration::from_secs_f64(seconds * scale))
}

impl HealthCheckYaml {
    fn check(self) -> Result<HealthCheck, String> {
        let check = match (self.tcp_health_check, self.thrift_health_check) {
            (Some(_), None) => Check::Tcp,
            (None, Some(t)) if !t.method_name.is_empty() => Check::Thrift {
                method: t.method_name,
                transport: t.transport,
                protocol: t.protocol,
                exception_is_healthy: t.exception_is_healthy,
            },
            _ => {
                return Err(
                    "a health check needs exactly one of tcp_health_check and thrift_health_check (with a method_name)".into(),
                );
            }
        };
        let interval = duration(&self.interval)?;
        let timeout = duration(&self.timeout)?;
        if interval < std::time::Duration::from_millis(10) || timeout.is_zero() {
            return Err(
                "a health check's interval must be at least 10ms and its timeout above 0".into(),
            );
        }
        if self.healthy_threshold == 0
            || self.unhealthy_threshold == 0
            || self.panic_threshold > 100
        {
            return Err(
                "thresholds must be at least 1, and the panic threshold at most 100".into(),
            );
        }
        Ok(HealthCheck {
            interval,
            timeout,
            interval_jitter: self
                .interval_jitter
                .as_deref()
                .map(duration)
                .transpose()?
                .unwrap_or_default(),
            healthy_threshold: self.healthy_threshold,
            unhealthy_threshold: self.unhealthy_threshold,
            panic_threshold: self.panic_threshold,
            check,
        })
    }
}

/// An endpoint: an address alone, or a map with an address.
enum EndpointYaml {
    Address(String),
    Full(FullEndpointYaml),
}

impl<'de> Deserialize<'de> for EndpointYaml {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = EndpointYaml;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address, or a map with an address")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<EndpointYaml, E> {
                Ok(EndpointYaml::Address(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<EndpointYaml, A::Error> {
                FullEndpointYaml::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(EndpointYaml::Full)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullEndpointYaml {
    address: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    sub_zone: String,
    #[serde(default)]
    health: Health,
}

fn one() -> u32 {
    1
}

/// A short form of a YAML value, to name a skipped entry.
fn describe(value: &serde_yaml::Value) -> String {
    let text = serde_yaml::to_string(value).unwrap_or_default();
    let line = text.trim().replace('\n', " ");
    line.chars().take(120).collect()
}

/// Parses a services file.
pub fn parse(text: &str) -> Result<Parsed, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Parsed::default());
    }
    // Typed at once when every entry is well formed (about twice as fast as building YAML
    // values first); otherwise entry by entry, to skip the bad ones with their reasons.
    if let Ok(file) = serde_yaml::from_str::<FileYaml<ServiceYaml<EndpointYaml>>>(text) {
        let parsed = services(file.services.into_iter().map(Ok), endpoint, |_| {
            String::new()
        });
        if parsed.skipped.is_empty() {
            return Ok(parsed);
        }
    }
    let file: FileYaml<serde_yaml::Value> = serde_yaml::from_str(text)?;
    Ok(services(
        file.services
            .iter()
            .map(|v| ServiceYaml::<serde_yaml::Value>::deserialize(v).map_err(|e| (v, e))),
        |v| {
            EndpointYaml::deserialize(v)
                .map_err(|e| format!("not an endpoint: {e}"))
                .and_then(|e| endpoint(&e))
        },
        describe,
    ))
}

/// The services of a file, each read by `endpoint` and named by `describe` when skipped.
fn services<'a, E>(
    entries: impl Iterator<Item = Result<ServiceYaml<E>, (&'a serde_yaml::Value, serde_yaml::Error)>>,
    endpoint: impl Fn(&E) -> Result<Endpoint, String>,
    describe_endpoint: impl Fn(&E) -> String,
) -> Parsed {
    let mut out = Parsed::default();
    let mut seen = BTreeSet::new();
    for entry in entries {
        let s = match entry {
            Ok(s) => s,
            Err((value, e)) => {
                out.skipped.push(Skipped {
                    entry: describe(value),
                    reason: format!("not a service: {e}"),
                });
                continue;
            }
        };
        if s.name.is_empty() || s.name.contains(['/', ' ']) {
            out.skipped.push(Skipped {
                entry: s.name.clone(),
                reason: "a service name must be non-empty, without '/' or spaces".into(),
            });
            continue;
        }
        let upstream =
            if s.thrift_upstream != ThriftUpstream::Exclusive && s.protocol != Protocol::Thrift {
                Err("thrift_upstream is for thrift services")
            } else if s.connections_per_endpoint.is_some()
                && s.thrift_upstream != ThriftUpstream::Multiplexed
            {
                Err("connections_per_endpoint is for thrift_upstream: multiplexed")
            } else if s.connections_per_endpoint == Some(0) {
                Err("connections_per_endpoint must be at least 1")
            } else {
                Ok(())
            };
        if let Err(reason) = upstream {
            out.skipped.push(Skipped {
                entry: s.name.clone(),
                reason: reason.into(),
            });
            continue;
        }
        let health_check = match s.health_check.map(HealthCheckYaml::check).transpose() {
            Ok(hc) => hc,
            Err(reason) => {
                out.skipped.push(Skipped {
                    entry: s.name.clone(),
                    reason: format!("its health check: {reason}"),
                });
                continue;
            }
        };
        if !seen.insert((s.name.clone(), s.port)) {
            out.skipped.push(Skipped {
                entry: format!("{}:{}", s.name, s.port),
                reason: "the same service and port twice: the first is kept".into(),
            });
            continue;
        }
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(s.endpoints.len());
        for value in &s.endpoints {
            match endpoint(value) {
                Ok(e) if endpoints.iter().any(|x| x.address == e.address) => {
                    out.skipped.push(Skipped {
                        entry: format!("{} {}", s.name, e.address),
                        reason: "the same address twice in a service".into(),
                    })
                }
                Ok(e) => endpoints.push(e),
                Err(reason) => out.skipped.push(Skipped {
                    entry: format!("{} {}", s.name, describe_endpoint(value)),
                    reason,
                }),
            }
        }
        out.services.push(Service {
            name: s.name,
            port: s.port,
            protocol: s.protocol,
            vip: s.vip,
            lb: s.lb,
            thrift_upstream: s.thrift_upstream,
            connections_per_endpoint: s.connections_per_endpoint,
            endpoints,
            health_check,
        });
    }
    out
}

fn endpoint(e: &EndpointYaml) -> Result<Endpoint, String> {
    let (address, weight, locality, health) = match e {
        EndpointYaml::Address(a) => (a, 1, Locality::default(), Health::Unknown),
        EndpointYaml::Full(f) => (
            &f.address,
            f.weight,
            Locality {
                region: f.region.clone(),
                zone: f.zone.clone(),
                sub_zone: f.sub_zone.clone(),
            },
            f.health,
        ),
    };
    let address: SocketAddr = address
        .parse()
        .map_err(|_| format!("{address:?} is not an IP address and port"))?;
    if weight == 0 {
        return Err("a weight must be at least 1".into());
    }
    Ok(Endpoint {
        address,
        weight,
        locality,
        health,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_file_parses_and_bad_entries_are_skipped_with_reasons() {
        let parsed = parse(
            r#"
services:
  - name: calc
    port: 9090
    protocol: thrift
    vip: 10.96.0.50
    endpoints:
      - 10.0.0.1:9090
      - { address: "10.0.0.2:9090", weight: 3, zone: z1 }
      - 10.0.0.1:9090
      - db-1.example:9090
      - { address: "10.0.0.3:9090", weight: 0 }
      - [1, 2]
  - name: echo
    port: 50051
    protocol: grpc
    lb: ring_hash
  - name: calc
    port: 9090
  - { name: broken }
"#,
        )
        .unwrap();
        assert_eq!(parsed.services.len(), 2);
        let calc = &parsed.services[0];
        assert_eq!(calc.cluster(), "outbound|9090||calc");
        assert_eq!(calc.protocol, Protocol::Thrift);
        assert_eq!(calc.endpoints.len(), 2);
        assert_eq!(calc.endpoints[1].weight, 3);
        assert_eq!(calc.endpoints[1].locality.zone, "z1");
        assert_eq!(parsed.services[1].lb, LbPolicy::RingHash);
        let reasons: Vec<&str> = parsed.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(reasons.len(), 6, "{:#?}", parsed.skipped);
        assert!(reasons[0].contains("twice"));
        assert!(reasons[1].contains("not an IP address"));
        assert!(reasons[2].contains("at least 1"));
        assert!(reasons[3].contains("not an endpoint"));
        assert!(reasons[4].contains("first is kept"));
        assert!(reasons[5].contains("not a service"));
    }

    #[test]
    fn only_thrift_services_choose_how_sidecars_connect() {
        let parsed = parse(
            r#"
services:
  - { name: calc, port: 9090, protocol: thrift, thrift_upstream: multiplexed, connections_per_endpoint: 8 }
  - { name: plain, port: 9091, protocol: thrift }
  - { name: echo, port: 50051, protocol: grpc, thrift_upstream: multiplexed }
  - { name: more, port: 9092, protocol: thrift, connections_per_endpoint: 8 }
  - { name: none, port: 9093, protocol: thrift, thrift_upstream: multiplexed, connections_per_endpoint: 0 }
"#,
        )
        .unwrap();
        let modes: Vec<_> = parsed
            .services
            .iter()
            .map(|s| (s.thrift_upstream, s.connections_per_endpoint))
            .collect();
        assert_eq!(
            modes,
            [
                (ThriftUpstream::Multiplexed, Some(8)),
                (ThriftUpstream::Exclusive, None)
            ]
        );
        let skipped: Vec<_> = parsed
            .skipped
            .iter()
            .map(|s| (s.entry.as_str(), s.reason.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                ("echo", "thrift_upstream is for thrift services"),
                (
                    "more",
                    "connections_per_endpoint is for thrift_upstream: multiplexed"
                ),
                ("none", "connections_per_endpoint must be at least 1"),
            ]
        );
    }

    #[test]
    fn health_checks_parse_as_envoy_writes_them() {
        let parsed = parse(
            "services:
  - name: calc
    port: 9090
    health_check:
      interval: 0.5s
      timeout: 200ms
      healthy_threshold: 1
      unhealthy_threshold: 2
      thrift_health_check: { method_name: whoami, transport: UNFRAMED, protocol: COMPACT }
  - { name: a, port: 1, health_check: { interval: 1s, timeout: 1s, healthy_threshold: 1, unhealthy_threshold: 1 } }
  - { name: b, port: 1, health_check: { interval: soon, timeout: 1s, healthy_threshold: 1, unhealthy_threshold: 1, tcp_health_check: {} } }
",
        )
        .unwrap();
        let hc = parsed.services[0].health_check.as_ref().unwrap();
        assert_eq!(hc.interval, std::time::Duration::from_millis(500));
        assert_eq!(hc.timeout, std::time::Duration::from_millis(200));
        assert_eq!(hc.panic_threshold, 50);
        assert_eq!(
            hc.check,
            Check::Thrift {
                method: "whoami".into(),
                transport: ThriftTransport::Unframed,
                protocol: ThriftProtocol::Compact,
                exception_is_healthy: false
            }
        );
        assert_eq!(parsed.skipped.len(), 2, "{:?}", parsed.skipped);
        assert!(parsed.skipped[0].reason.contains("exactly one"));
        assert!(parsed.skipped[1].reason.contains("not a duration"));
    }

    #[test]
    fn a_file_of_another_shape_is_refused_whole() {
        assert!(parse("services: 3").is_err());
        assert!(parse("servics: []").is_err());
        assert!(parse("").unwrap().services.is_empty());
    }
}
