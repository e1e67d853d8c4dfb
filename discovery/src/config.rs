//! The services file (`tern discovery --config`): services with their endpoints, in YAML.
//!
//! ```yaml
//! services:
//!   - name: calc              # gRPC dials xds:///calc; sidecars get outbound|9090||calc
//!     port: 9090
//!     protocol: thrift        # thrift | grpc | tcp (default)
//!     vip: 10.96.0.50         # optional: the address sidecars capture (<vip>_<port>)
//!     lb: round_robin         # round_robin (default) | least_request | ring_hash | random
//!     endpoints:
//!       - 10.0.0.1:9090
//!       - { address: 10.0.0.2:9090, weight: 3, region: eu, zone: eu-1, health: healthy }
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

use crate::model::{Endpoint, Health, LbPolicy, Locality, Protocol, Service};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    #[serde(default)]
    services: Vec<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceYaml {
    name: String,
    port: u16,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    vip: Option<IpAddr>,
    #[serde(default)]
    lb: LbPolicy,
    #[serde(default)]
    endpoints: Vec<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EndpointYaml {
    Address(String),
    Full(FullEndpointYaml),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullEndpointYaml {
    address: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(flatten)]
    locality: Locality,
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
    let file: FileYaml = if text.trim().is_empty() {
        FileYaml {
            services: Vec::new(),
        }
    } else {
        serde_yaml::from_str(text)?
    };
    let mut out = Parsed::default();
    let mut seen = BTreeSet::new();
    for value in file.services {
        let s: ServiceYaml = match serde_yaml::from_value(value.clone()) {
            Ok(s) => s,
            Err(e) => {
                out.skipped.push(Skipped {
                    entry: describe(&value),
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
        if !seen.insert((s.name.clone(), s.port)) {
            out.skipped.push(Skipped {
                entry: format!("{}:{}", s.name, s.port),
                reason: "the same service and port twice: the first is kept".into(),
            });
            continue;
        }
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(s.endpoints.len());
        for value in s.endpoints {
            match endpoint(&value) {
                Ok(e) if endpoints.iter().any(|x| x.address == e.address) => {
                    out.skipped.push(Skipped {
                        entry: format!("{} {}", s.name, e.address),
                        reason: "the same address twice in a service".into(),
                    })
                }
                Ok(e) => endpoints.push(e),
                Err(reason) => out.skipped.push(Skipped {
                    entry: format!("{} {}", s.name, describe(&value)),
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
            endpoints,
        });
    }
    Ok(out)
}

fn endpoint(value: &serde_yaml::Value) -> Result<Endpoint, String> {
    let e: EndpointYaml =
        serde_yaml::from_value(value.clone()).map_err(|e| format!("not an endpoint: {e}"))?;
    let (address, weight, locality, health) = match e {
        EndpointYaml::Address(a) => (a, 1, Locality::default(), Health::Unknown),
        EndpointYaml::Full(f) => (f.address, f.weight, f.locality, f.health),
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
    fn a_file_of_another_shape_is_refused_whole() {
        assert!(parse("services: 3").is_err());
        assert!(parse("servics: []").is_err());
        assert!(parse("").unwrap().services.is_empty());
    }
}
