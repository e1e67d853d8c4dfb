//! A `ClusterLoadAssignment` into endpoints: address, health, weight, priority, locality.
use std::{collections::BTreeMap, sync::Arc};

use tern_proto::ClusterLoadAssignment;

use super::{Invalid, TranslateError, socket_addr};
use crate::config::{Endpoint, Health, SocketLabels};

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
    let mut labels_seen: Vec<SocketLabels> = Vec::new();
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
                socket_labels: socket_labels(e, &mut labels_seen),
            });
        }
    }
    Ok(LoadAssignment {
        endpoints: endpoints.into(),
        locality_weights: Arc::new(locality_weights),
    })
}

/// An endpoint's `envoy.transport_socket_match` metadata, shared with the endpoints before
/// it that have the same (a cluster's endpoints have one or two kinds).
fn socket_labels(
    e: &tern_proto::endpoint_types::LbEndpoint,
    seen: &mut Vec<SocketLabels>,
) -> Option<SocketLabels> {
    let s = e
        .metadata
        .as_ref()?
        .filter_metadata
        .get(super::tls::SOCKET_MATCH_METADATA)?;
    let mut labels: Vec<(String, String)> = super::tls::string_fields(s).collect();
    labels.sort();
    if let Some(known) = seen.iter().find(|k| ***k == labels[..]) {
        return Some(known.clone());
    }
    let labels: SocketLabels = labels.into();
    // A bound on the search: a cluster whose endpoints all differ shares nothing.
    if seen.len() < 8 {
        seen.push(labels.clone());
    }
    Some(labels)
}

/// Translates a `ClusterLoadAssignment` received by itself (EDS).
pub fn translate_resource(cla: &ClusterLoadAssignment) -> Result<LoadAssignment, TranslateError> {
    translate(cla).map_err(|e| e.at("endpoint"))
}
