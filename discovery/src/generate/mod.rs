//! Resources from services, in the two shapes clients need: [`sidecar`] (tern and Envoy, as
//! istiod writes them) and [`grpc`] (proxyless gRPC, as gRPC's xDS client validates them).
//! Both share the clusters' EDS source and the endpoints' shape, here.
pub mod grpc;
pub mod sidecar;

use tern_proto::{
    Any, Cluster, ClusterLoadAssignment, build, cluster_types, core_types, encode, endpoint_types,
    type_url, wkt,
};

use crate::model::{Endpoint, LbPolicy, Service};

/// `ads: {}` with API v3: where EDS and RDS come from (gRPC accepts only `ads` or `self`).
pub fn ads() -> core_types::ConfigSource {
    core_types::ConfigSource {
        resource_api_version: core_types::ApiVersion::V3 as i32,
        config_source_specifier: Some(core_types::config_source::ConfigSourceSpecifier::Ads(
            core_types::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// The service's EDS cluster with this balancing policy.
pub fn eds_cluster(service: &Service, lb: LbPolicy) -> Cluster {
    let mut c = build::eds_cluster(&service.cluster());
    if let Some(eds) = c.eds_cluster_config.as_mut() {
        eds.eds_config = Some(ads());
    }
    c.lb_policy = match lb {
        LbPolicy::RoundRobin => cluster_types::LbPolicy::RoundRobin,
        LbPolicy::LeastRequest => cluster_types::LbPolicy::LeastRequest,
        LbPolicy::RingHash => cluster_types::LbPolicy::RingHash,
        LbPolicy::Random => cluster_types::LbPolicy::Random,
    } as i32;
    c
}

/// The service's endpoints, one group per locality (each weighted by the sum of its
/// endpoints' weights: gRPC drops a locality without a weight).
pub fn load_assignment(
    service: &Service,
    mut health: impl FnMut(&Endpoint) -> i32,
) -> ClusterLoadAssignment {
    let mut localities: Vec<endpoint_types::LocalityLbEndpoints> = Vec::new();
    let mut keys = Vec::new();
    for e in &service.endpoints {
        let mut lb = build::endpoint(
            &e.address.ip().to_string(),
            e.address.port().into(),
            e.weight,
        );
        lb.health_status = health(e);
        match keys.iter().position(|k| *k == &e.locality) {
            Some(i) => localities[i].lb_endpoints.push(lb),
            None => {
                keys.push(&e.locality);
                localities.push(endpoint_types::LocalityLbEndpoints {
                    locality: Some(core_types::Locality {
                        region: e.locality.region.clone(),
                        zone: e.locality.zone.clone(),
                        sub_zone: e.locality.sub_zone.clone(),
                    }),
                    lb_endpoints: vec![lb],
                    ..Default::default()
                });
            }
        }
    }
    for l in &mut localities {
        let weight = l
            .lb_endpoints
            .iter()
            .filter_map(|e| e.load_balancing_weight.as_ref())
            .fold(0u32, |sum, w| sum.saturating_add(w.value));
        l.load_balancing_weight = Some(wkt::UInt32Value {
            value: weight.max(1),
        });
    }
    ClusterLoadAssignment {
        cluster_name: service.cluster(),
        endpoints: localities,
        ..Default::default()
    }
}

/// A resource with its name, encoded as its type.
pub fn named<T: prost::Message>(name: &str, message: &T, type_url: &str) -> (String, Any) {
    (name.to_owned(), encode(message, type_url))
}

/// A service's endpoints, as both shapes serve them.
pub fn endpoints(service: &Service, health: impl FnMut(&Endpoint) -> i32) -> (String, Any) {
    let cla = load_assignment(service, health);
    named(&cla.cluster_name, &cla, type_url::CLUSTER_LOAD_ASSIGNMENT)
}
