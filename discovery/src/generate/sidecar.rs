//! What sidecars (tern, Envoy) are served, in istiod's shape: `virtualOutbound` on 15001
//! (anything unknown passes through), a `<vip>_<port>` listener per service with a virtual IP
//! whose `tcp_proxy` names `outbound|<port>||<name>` (tern finds Thrift from the bytes, as
//! with istiod), EDS clusters over ADS (a service's `thrift_upstream: multiplexed` as the
//! cluster's `filter_metadata.tern`), and a plaintext `virtualInbound` on 15006 that hands
//! connections to the application (tern discovery issues no certificates: this is a mesh
//! without mTLS, which tern's inbound refuses until it is served).
use tern_proto::{
    Any, Cluster, Listener, build, cluster_types, core_types, listener_types, type_url, wkt,
};

use super::{eds_cluster, named};
use crate::model::{Service, ThriftUpstream};

const PASSTHROUGH: &str = "PassthroughCluster";
const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";

fn chain(filters: Vec<listener_types::Filter>) -> listener_types::FilterChain {
    listener_types::FilterChain {
        filters,
        ..Default::default()
    }
}

fn original_dst(name: &str) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster_types::ClusterDiscoveryType::Type(
            cluster_types::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster_types::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(wkt::Duration {
            seconds: 10,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// What every sidecar is served whatever the services: the catch-all listeners and their
/// pass-through clusters.
pub fn fixed() -> Vec<(String, Any)> {
    let listeners = [
        Listener {
            name: "virtualOutbound".into(),
            address: Some(build::address("0.0.0.0", 15001)),
            use_original_dst: Some(wkt::BoolValue { value: true }),
            default_filter_chain: Some(chain(vec![build::tcp_proxy(PASSTHROUGH)])),
            ..Default::default()
        },
        Listener {
            name: "virtualInbound".into(),
            address: Some(build::address("0.0.0.0", 15006)),
            filter_chains: vec![listener_types::FilterChain {
                name: "virtualInbound".into(),
                filter_chain_match: Some(listener_types::FilterChainMatch {
                    transport_protocol: "raw_buffer".into(),
                    ..Default::default()
                }),
                filters: vec![build::tcp_proxy(INBOUND_PASSTHROUGH)],
                ..Default::default()
            }],
            ..Default::default()
        },
    ];
    let clusters = [original_dst(PASSTHROUGH), original_dst(INBOUND_PASSTHROUGH)];
    listeners
        .iter()
        .map(|l| named(&l.name, l, type_url::LISTENER))
        .chain(
            clusters
                .iter()
                .map(|c| named(&c.name, c, type_url::CLUSTER)),
        )
        .collect()
}

/// One service's cluster, and its `<vip>_<port>` listener when it has a virtual IP.
pub fn service(s: &Service) -> Vec<(String, Any)> {
    let mut cluster = eds_cluster(s, s.lb);
    if s.thrift_upstream == ThriftUpstream::Multiplexed {
        // What tern reads; Envoy ignores it.
        let mut tern =
            |key, value| build::filter_metadata(&mut cluster.metadata, "tern", key, value);
        tern(
            "thrift_upstream",
            wkt::Kind::StringValue("multiplexed".into()),
        );
        if let Some(n) = s.connections_per_endpoint {
            tern("connections_per_endpoint", wkt::Kind::NumberValue(n.into()));
        }
    }
    let mut out = vec![named(&s.cluster(), &cluster, type_url::CLUSTER)];
    if let Some(vip) = s.vip {
        let listener = Listener {
            name: format!("{vip}_{}", s.port),
            address: Some(build::address(&vip.to_string(), s.port.into())),
            filter_chains: vec![chain(vec![build::tcp_proxy(&s.cluster())])],
            bind_to_port: Some(wkt::BoolValue { value: false }),
            traffic_direction: core_types::TrafficDirection::Outbound as i32,
            ..Default::default()
        };
        out.push(named(&listener.name, &listener, type_url::LISTENER));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multiplexed_service_says_so_in_its_clusters_tern_metadata_with_its_connections() {
        let mut s = Service::registered("calc".into(), Vec::new());
        let cluster = |s: &Service| -> Cluster {
            tern_proto::decode(&service(s)[0].1, type_url::CLUSTER).unwrap()
        };
        assert_eq!(cluster(&s).metadata, None);
        s.thrift_upstream = ThriftUpstream::Multiplexed;
        s.connections_per_endpoint = Some(8);
        let md = cluster(&s).metadata.unwrap();
        let tern = &md.filter_metadata["tern"].fields;
        assert_eq!(
            tern["thrift_upstream"].kind,
            Some(wkt::Kind::StringValue("multiplexed".into()))
        );
        assert_eq!(
            tern["connections_per_endpoint"].kind,
            Some(wkt::Kind::NumberValue(8.0))
        );
    }
}
