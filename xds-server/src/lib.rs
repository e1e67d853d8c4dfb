//! tern's xDS server: the Aggregated Discovery Service protocol as Envoy and go-control-plane
//! define it, serving [`Snapshot`]s to Envoy, tern sidecars and proxyless gRPC. It knows the
//! protocol, nothing of where resources come from. The mirror of `tern_xds_client`:
//!
//! - [`snapshot`]: what is served, with versions derived from the bytes;
//! - [`sotw`]: the state-of-the-world protocol of one stream, without a transport;
//! - [`delta`]: the incremental protocol, likewise;
//! - [`status`]: what each client subscribed, was sent, ACKed and NACKed;
//! - [`limits`]: what one stream may hold;
//! - `sorted`: the compact map of names each stream keeps;
//! - [`server`]: the gRPC services over `tonic`, one task per stream, and the client registry;
//! - [`csds`]: the client registry as Envoy's client status discovery service.
#![forbid(unsafe_code)]
pub mod csds;
pub mod delta;
pub mod limits;
pub mod server;
pub mod snapshot;
mod sorted;
pub mod sotw;
pub mod status;

pub use csds::Csds;
pub use delta::{DeltaResponse, DeltaStream};
pub use limits::Refused;
pub use server::{ClientInfo, Clients, Server, Views};
pub use snapshot::{Resource, Snapshot};
pub use sotw::SotwStream;
pub use status::{Nack, Received, TypeStatus};
