//! tern's xDS client: the Aggregated Discovery Service protocol, handing resources to a
//! [`Handler`] and ACKing or NACKing by what it accepts. It knows Envoy's discovery
//! protocol and resource names, nothing of the proxy that uses it.
//!
//! - [`handler`]: what a user implements: it gets what changed and names what it refuses;
//! - [`resource`]: what the client keeps of resources (names, versions), and their names;
//! - [`sotw`]: the state-of-the-world protocol as a transport-free state machine;
//! - [`delta`]: the incremental protocol, likewise;
//! - [`channel`]: the gRPC channel to the control plane (also for Istio's CA);
//! - [`stream`]: the ADS stream, with reconnection and resubscription;
//! - `grpc`: one gRPC call of protobuf messages over the channel, read into a buffer that
//!   does not outlive a large message.
//!
//! TLS (`https` addresses: CA, optional client certificate) and a bearer token from a file
//! are read again at every connection, so rotated credentials are picked up.
#![forbid(unsafe_code)]
pub mod channel;
pub mod delta;
mod grpc;
pub mod handler;
pub mod resource;
pub mod sotw;
pub mod stream;

pub use channel::{ChannelConfig, ChannelError, TlsFiles};
pub use delta::Delta;
pub use handler::{Handler, Interest, RejectedConfig, Update};
pub use resource::{ResponseError, TypeState};
pub use sotw::{Sotw, SotwRequest};
pub use stream::{ClientStatus, Engine, StreamConfig, StreamError, run};
