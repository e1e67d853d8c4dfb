//! The proxy's side of xDS: turning what a control plane sends into tern's configuration.
//!
//! - [`translate`]: Envoy resources (istiod-shaped) into tern's model, one at a time;
//! - [`store`]: the translated resources held, warming per cluster, and the configuration
//!   they make;
//! - [`handler`]: the xDS client's handler: refuses what cannot be used by name, applies
//!   the rest, publishes;
//! - [`metrics`]: what the configuration path counts;
//! - [`node`]: the node identity istiod expects.
pub mod handler;
pub mod metrics;
pub mod node;
pub mod store;
pub mod translate;

#[cfg(test)]
mod tests;
