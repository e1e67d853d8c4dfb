//! `tern discovery`: an xDS control plane for fleets without istiod. It reads services from
//! the registries Thrift fleets use and serves them to tern sidecars and Envoy (istiod's
//! shape) and to proxyless gRPC clients (gRPC's shape), over `tern_xds_server`.
//!
//! - [`model`]: services and endpoints, as sources give them;
//! - [`config`]: the services file;
//! - [`sources`]: where services come from (the file, watched);
//! - [`catalog`]: the sources' services merged, and each source's state;
//! - [`generate`]: resources from services, for sidecars and for gRPC;
//! - [`health`]: active health checks, and what their verdicts make of EDS health;
//! - [`views`]: which client gets which resources;
//! - [`memory`]: how the heap stays small;
//! - [`state`]: what it holds while it runs, and how events become published configuration;
//! - [`admin`]: the admin server (client sync status, sources, metrics);
//! - [`incoming`]: the xDS server's connections, within limits;
//! - [`run`](mod@run): the process and its flags.
pub mod admin;
pub mod catalog;
pub mod config;
pub mod generate;
pub mod health;
pub mod incoming;
#[allow(unsafe_code)] // mallopt, malloc_trim (FFI)
pub mod memory;
pub mod model;
pub mod run;
pub mod sources;
pub mod state;
pub mod views;

pub use run::{DiscoveryArgs, main, run};
