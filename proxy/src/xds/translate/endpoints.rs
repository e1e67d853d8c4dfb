//! A `ClusterLoadAssignment` into endpoints: address, health, weight, priority, locality.
use std::{collections::BTreeMap, sync::Arc};

use tern_proto::ClusterLoadAssignment;

use super::{Invalid, TranslateError, socket_addr};
use crate::config::{Endpoint, EndpointMetadata, Health};

/// A cluster's endpoints and the weight of each locality (shared with the clusters built
/// from them).
#[derive(Clone, Debug, PartialEq)]
pub struct LoadAssignment {
    pub endpoints: Arc<[Endpoint]>,
    pub locality_weights: Arc<BTreeMap<Arc<str>, u32>>,
}

impl Default for LoadAssignment {
    fn default() -> Self {
        Self {
            endpoints: Arc::new([]),
            locality_weights: Arc::default(),
        }
    }
}

pub fn translate(cla: &ClusterLoadAssignment) -> Result<LoadAssignment, Invalid> {
    use tern_proto::endpoint_types::lb_endpoint::HostIdentifier;
    let mut endpoints = Vec::new();
    let mut locality_weights = BTreeMap::new();
    let mut seen: Vec<Arc<EndpointMetadata>> = Vec::new();
    for group in &cla.endpoints {
        let locality: Arc<str> = group
            .locality
            .as_ref()
            .map(|l| [l.region.as_str(), l.zone.as_str(), l.sub_zone.as_str()].join("/"))
            .unwrap_or_default()
            .into();
        if let Some(w) = group.load_balancing_weight {
            locality_weights.insert(locality.clone(), w.value);
        }
        for e in &group.lb_endpoints {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let address = socket_addr(ep.address.as_ref())?;
            let health = match e.health_status {
                1 => Health::Healthy,
                2 => Health::Unhealthy,
                3 => Health::Draining,
                4 => Health::Timeout,
                5 => Health::Degraded,
                _ => Health::Unknown,
            };
            endpoints.push(Endpoint {
                address,
                weight: e.load_balancing_weight.map_or(1, |w| w.value.max(1)),
                priority: group.priority,
                locality: locality.clone(),
                health,
                metadata: metadata(e, &mut seen),
            });
        }
    }
    Ok(LoadAssignment {
        endpoints: endpoints.into(),
        locality_weights: Arc::new(locality_weights),
    })
}

/// An endpoint's metadata (`envoy.transport_socket_match`, `istio.workload`), shared with
/// the endpoints before it that have the same (a deployment's endpoints do).
fn metadata(
    e: &tern_proto::endpoint_types::LbEndpoint,
    seen: &mut Vec<Arc<EndpointMetadata>>,
) -> Option<Arc<EndpointMetadata>> {
    let md = &e.metadata.as_ref()?.filter_metadata;
    let mut socket_match: Vec<(String, String)> = md
        .get(super::tls::SOCKET_MATCH_METADATA)
        .map(|s| super::tls::string_fields(s).collect())
        .unwrap_or_default();
    socket_match.sort();
    let workload = md
        .get("istio")
        .and_then(|s| s.fields.get("workload"))
        .and_then(|v| match &v.kind {
            Some(tern_proto::wkt::Kind::StringValue(w)) => Some(w.clone()),
            _ => None,
        });
    if socket_match.is_empty() && workload.is_none() {
        return None;
    }
    let found = EndpointMetadata {
        socket_match,
        workload,
    };
    if let Some(known) = seen.iter().find(|k| ***k == found) {
        return Some(known.clone());
    }
    let found = Arc::new(found);
    // A bound on the search: a cluster whose endpoints all differ shares nothing.
    if seen.len() < 8 {
        seen.push(found.clone());
    }
    Some(found)
}

/// Translates a `ClusterLoadAssignment` received by itself (EDS).
pub fn translate_resource(cla: &ClusterLoadAssignment) -> Result<LoadAssignment, TranslateError> {
    translate(cla).map_err(|e| e.at("endpoint"))
}
