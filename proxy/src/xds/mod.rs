//! The proxy's side of xDS: turning what a control plane sends into tern's configuration.
//!
//! - [`translate`]: Envoy resources (istiod-shaped) into a [`crate::config::Config`];
//! - [`handler`]: the xDS client's handler: NACKs what cannot be used, publishes what is warm;
//! - [`node`]: the node identity istiod expects.
pub mod handler;
pub mod node;
pub mod translate;
