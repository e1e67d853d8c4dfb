//! The eBPF hooks' decisions, read from their per-CPU counters when scraped.
use std::path::PathBuf;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CaptureLabels {
    hook: &'static str,
    decision: &'static str,
}

/// Reads the per-CPU counters of tern's eBPF hooks when scraped.
#[derive(Debug)]
pub struct CaptureCollector {
    /// The pin directory of the capture this proxy serves, if it runs with eBPF capture.
    pub pins: Option<PathBuf>,
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(dir) = &self.pins else {
            return Ok(());
        };
        let Ok(counters) = super::ebpf::counters(dir) else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "capture_decisions",
            "Decisions of tern's eBPF capture hooks",
            None,
            MetricType::Counter,
        )?;
        for (hook, decision, value) in counters {
            let labels = CaptureLabels { hook, decision };
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
