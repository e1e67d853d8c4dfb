//! tern: a Thrift-aware layer-4 sidecar with eBPF traffic capture.
//!
//! Data path: [`listener`] accepts captured connections and learns their original
//! destination ([`socket`]); [`filters`] picks the filter chain and runs it — the Thrift
//! proxy ([`thrift`] codec, [`balance`] per request weighing [`latency`], [`upstream`]
//! live state and pools) or a TCP relay. Control path: [`config`] (the model and the static file) and [`xds`] (what a
//! control plane sends, through the `tern-xds-client` library) build snapshots that
//! [`state`] swaps atomically; [`admin`] and [`metrics`] show what happens.
//! [`capture`] puts a Pod's traffic through tern: eBPF hooks or iptables rules.
//! [`inject`] adds tern to Kubernetes workloads; [`webhook`] does it at admission.
//! [`cli`] and [`run`] are the command line and the `tern run` lifecycle; nothing imports
//! `cli`, and `cargo xtask cycles` fails on an import cycle between these modules.

// The data path: accept, choose a chain, relay or balance each request.
pub mod balance;
pub mod budget;
pub mod filters;
pub mod latency;
pub mod listener;
pub mod method_labels;
pub mod notice;
pub mod refusal;
pub mod sharded;
pub mod socket;
pub mod stream;
pub mod thrift;
pub mod upstream;
pub mod workers;

// The control path: configuration, snapshots, identity, what tern shows.
pub mod admin;
pub mod config;
#[allow(unsafe_code)] // malloc_trim (FFI)
pub mod memory;
pub mod metrics;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod xds;

// The Pod: capture, privileges, the application's probes.
pub mod capture;
#[allow(unsafe_code)] // prctl (FFI)
pub mod privileges;
pub mod probe;

// Kubernetes tooling.
pub mod inject;
pub mod webhook;

// The process: command line, `tern run`'s lifecycle, logging, signals, durations.
pub mod cli;
pub mod duration;
pub mod logging;
pub mod run;
pub mod signal;
