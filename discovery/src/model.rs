//! The services tern discovery serves, as the sources describe them and the generators read
//! them: a name, a port, a protocol, an optional virtual IP, a balancing policy, how Thrift
//! sidecars connect, endpoints.
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::health::HealthCheck;

/// How clients speak to a service (what a sidecar may do with it; gRPC clients need `grpc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Thrift,
    Grpc,
    #[default]
    Tcp,
}

/// The balancing policy of a service's cluster (Envoy's `lb_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    RingHash,
    Random,
}

/// How tern sidecars connect to a Thrift service's servers (tern's `thrift_upstream`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ThriftUpstream {
    /// A connection per request until its reply: what Apache Thrift's servers need.
    #[default]
    Exclusive,
    /// Requests share connections, sequence ids rewritten: for servers that answer out of
    /// order.
    Multiplexed,
}

/// An endpoint's health as served in EDS (`envoy.config.core.v3.HealthStatus`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Nobody checked: clients use it (Envoy and gRPC alike).
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
}

impl Health {
    /// The `HealthStatus` number.
    pub fn eds(self) -> i32 {
        match self {
            Self::Unknown => 0,
            Self::Healthy => 1,
            Self::Unhealthy => 2,
            Self::Draining => 3,
        }
    }
}

/// Where an endpoint runs, for locality-aware balancing.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub sub_zone: String,
}

/// One instance of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// An IP address: host names are resolved by the source that reads them.
    pub address: SocketAddr,
    /// Relative weight, at least 1.
    pub weight: u32,
    pub locality: Locality,
    /// What the registry says (a serverset member that is not ALIVE is not listed at all).
    pub health: Health,
}

/// A service and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// The name clients use: gRPC dials `xds:///<name>`; sidecars' clusters are
    /// `outbound|<port>||<name>`.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The virtual IP sidecars capture for it (a `<vip>_<port>` listener); none: reached by
    /// name only (gRPC).
    pub vip: Option<IpAddr>,
    pub lb: LbPolicy,
    /// How tern sidecars connect to its servers (a Thrift service's).
    pub thrift_upstream: ThriftUpstream,
    /// Multiplexed connections per endpoint, if not the sidecars' default.
    pub connections_per_endpoint: Option<u32>,
    pub endpoints: Vec<Endpoint>,
    /// Its active health check, if it has one.
    pub health_check: Option<HealthCheck>,
}

impl Service {
    /// A service only a registry knows, with its defaults: Thrift, round robin, the port of its
    /// first endpoint, no virtual IP, no health check.
    pub fn registered(name: String, endpoints: Vec<Endpoint>) -> Self {
        Self {
            port: endpoints.first().map_or(0, |e| e.address.port()),
            name,
            protocol: Protocol::Thrift,
            vip: None,
            lb: LbPolicy::RoundRobin,
            thrift_upstream: ThriftUpstream::Exclusive,
            connections_per_endpoint: None,
            endpoints,
            health_check: None,
        }
    }

    /// Its cluster's name, as istiod names outbound clusters.
    pub fn cluster(&self) -> String {
        format!("outbound|{}||{}", self.port, self.name)
    }
}
