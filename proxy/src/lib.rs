//! tern: a Thrift-aware layer-4 sidecar with eBPF traffic capture.
//!
//! - [`capture`] puts a Pod's TCP traffic through the proxy: eBPF hooks (cgroup connect,
//!   sock_ops, getsockopt, getpeername, sk_lookup) or, for kernels without them, Istio-style
//!   iptables REDIRECT rules.
//! - [`relay`] runs the outbound (15001) and inbound (15006) listeners and relays each
//!   connection to its original destination.
//! - [`socket`] gathers the socket options and kernel calls the data path needs.
//! - [`cli`] is the command line: `tern run`, `tern capture …`, `tern check`.
pub mod balance;
pub mod capture;
pub mod cli;
pub mod config;
pub mod relay;
pub mod run;
pub mod socket;
pub mod thrift;
