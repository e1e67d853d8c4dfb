//! Istio's standard metrics, so Kiali and Istio's dashboards see tern's traffic as they
//! see Envoy's.
//!
//! - [`workload`]: who a workload is (the local one from the node metadata, a remote one
//!   from endpoint metadata or its SPIFFE identity);
//! - [`istio`]: the metrics and their labels, with a bounded number of series.
pub mod istio;
pub mod workload;

pub use istio::{IstioMetrics, Reporter, RequestSeries, TcpSeries};
pub use workload::Workload;
