//! tern's xDS client: the Aggregated Discovery Service protocol, handing resources to a
//! [`sotw::Handler`] and ACKing or NACKing by what it accepts. It knows Envoy's discovery
//! protocol and resource names, nothing of the proxy that uses it.
//!
//! - [`sotw`]: the state-of-the-world protocol as a transport-free state machine;
//! - [`delta`]: the incremental protocol, likewise;
//! - [`stream`]: the gRPC stream over `tonic`, with reconnection and resubscription.
//!
//! TLS (`https` addresses: CA, optional client certificate) and a bearer token from a file
//! are read again at every connection, so rotated credentials are picked up.
pub mod delta;
pub mod sotw;
pub mod stream;

pub use delta::Delta;
pub use sotw::{Handler, Interest, Sotw, TypeState};
pub use stream::{ClientStatus, Engine, StreamConfig, TlsFiles, run};
