//! Active health checks, configured per service as Envoy's `HealthCheck`: TCP connect, or a
//! Thrift call of a named method as Envoy's Thrift health checker makes it. Their verdicts
//! become the endpoints' EDS `health_status`, so tern sidecars, Envoy and gRPC clients stop
//! sending to an endpoint that fails, within one interval of the verdict.
//!
//! - [`state`]: one endpoint's verdict from consecutive results (thresholds), without I/O;
//! - [`probe`]: one check over the network;
//! - [`checker`]: a task per endpoint, jittered and bounded in how many run at once; verdicts
//!   survive source updates that keep the endpoint.
//!
//! **What is served.** An endpoint not yet checked is served with what its registry says
//! (UNKNOWN: used). One success marks a new endpoint HEALTHY; after that it takes
//! `unhealthy_threshold` failures in a row to become UNHEALTHY, and `healthy_threshold`
//! successes to come back. When fewer than `panic_threshold` percent (Envoy's default, 50) of a
//! service's endpoints pass, the checks' verdicts are set aside for that service and every
//! endpoint is served as its registry says: a check that fails everywhere (a wrong method
//! name, a check port closed by a firewall) is more likely wrong than every server at once,
//! and gRPC clients, which have no panic mode, would otherwise fail every call. This is
//! Envoy's panic mode, decided once at the server for every client.
pub mod checker;
pub mod probe;
pub mod state;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A Thrift transport, as Envoy's Thrift health checker names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ThriftTransport {
    #[default]
    Framed,
    Unframed,
}

/// A Thrift protocol, as Envoy's Thrift health checker names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ThriftProtocol {
    #[default]
    Binary,
    Compact,
}

/// What a check does.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Check {
    /// A TCP connection is accepted.
    Tcp,
    /// A Thrift CALL of `method` with no arguments gets a REPLY with a success result (an
    /// EXCEPTION, a declared exception or a close fails, unless `exception_is_healthy` and the
    /// server answered a `TApplicationException`: it is alive, just without that method).
    Thrift {
        method: String,
        transport: ThriftTransport,
        protocol: ThriftProtocol,
        exception_is_healthy: bool,
    },
}

/// A service's health check (Envoy's `HealthCheck` fields tern discovery honours).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// Random 0..this added to every wait.
    pub interval_jitter: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Below this percentage of passing endpoints, verdicts are set aside (0: never).
    pub panic_threshold: u8,
    pub check: Check,
}
