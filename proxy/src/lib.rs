//! tern: a Thrift-aware layer-4 sidecar with eBPF traffic capture.
//!
//! Data path: [`listener`] accepts captured connections and learns their original
//! destination ([`socket`]); [`filters`] picks the filter chain and runs it — the Thrift
//! proxy ([`thrift`] codec, [`balance`] per request weighing [`latency`], [`upstream`]
//! multiplexed pools) or a
//! TCP relay. Control path: [`config`] (the model and the static file) and [`xds`] (what a
//! control plane sends, through the `tern-xds-client` library) build snapshots that
//! [`state`] swaps atomically; [`admin`] and [`metrics`] show what happens.
//! [`capture`] puts a Pod's traffic through tern: eBPF hooks or iptables rules.
//! [`inject`] adds tern to Kubernetes workloads; [`webhook`] does it at admission.
//! [`cli`] and [`run`] are the command line and the `tern run` lifecycle.
pub mod admin;
pub mod balance;
pub mod budget;
pub mod capture;
pub mod cli;
pub mod config;
pub mod filters;
pub mod inject;
pub mod latency;
pub mod listener;
pub mod logging;
pub mod memory;
pub mod method_labels;
pub mod metrics;
pub mod privileges;
pub mod probe;
pub mod refusal;
pub mod run;
pub mod socket;
pub mod state;
pub mod stream;
pub mod telemetry;
pub mod thrift;
pub mod tls;
pub mod upstream;
pub mod webhook;
pub mod xds;
