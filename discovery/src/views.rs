//! Which snapshot each client is served: proxyless gRPC clients get the gRPC shape, every
//! other client (tern, Envoy) the sidecar shape. Both are rebuilt from the services at once,
//! and published only when they changed, so an unchanged update wakes no stream.
use std::sync::Arc;

use tern_proto::{Node, wkt};
use tern_xds_server::{Snapshot, Views};
use tokio::sync::watch;

use crate::{
    generate::{self, grpc, sidecar},
    model::{Endpoint, Service},
};

/// Whether `node` is a proxyless gRPC client: its user agent is gRPC's (`gRPC C-core …`,
/// `gRPC Java`, `gRPC Go`), or its metadata says `GENERATOR: grpc` (Istio's convention).
pub fn is_grpc(node: &Node) -> bool {
    let generator = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("GENERATOR"))
        .and_then(|v| match &v.kind {
            Some(wkt::Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        });
    node.user_agent_name.starts_with("gRPC") || generator == Some("grpc")
}

/// The snapshots of both shapes.
#[derive(Debug)]
pub struct ClientViews {
    sidecar: watch::Sender<Arc<Snapshot>>,
    grpc: watch::Sender<Arc<Snapshot>>,
}

impl Default for ClientViews {
    fn default() -> Self {
        Self {
            sidecar: watch::Sender::new(Arc::new(Snapshot::default())),
            grpc: watch::Sender::new(Arc::new(Snapshot::default())),
        }
    }
}

impl ClientViews {
    /// Rebuilds both shapes from `services`, each endpoint with the health `health` gives.
    /// Returns whether either changed.
    pub fn publish(
        &self,
        services: &[Service],
        health: impl Fn(&Service, &Endpoint) -> i32,
    ) -> bool {
        let endpoints: Vec<_> = generate::endpoints(services, &health).collect();
        let sidecar = Snapshot::new(
            sidecar::listeners_and_clusters(services)
                .into_iter()
                .chain(endpoints.iter().cloned()),
        );
        let grpc = Snapshot::new(
            grpc::listeners_routes_and_clusters(services)
                .into_iter()
                .chain(endpoints),
        );
        let mut changed = false;
        for (tx, new) in [(&self.sidecar, sidecar), (&self.grpc, grpc)] {
            changed |= tx.send_if_modified(|current| {
                if **current == new {
                    return false;
                }
                *current = Arc::new(new);
                true
            });
        }
        changed
    }

    /// The snapshot of sidecars, as served now.
    pub fn sidecar(&self) -> Arc<Snapshot> {
        self.sidecar.borrow().clone()
    }

    /// The snapshot of gRPC clients, as served now.
    pub fn grpc(&self) -> Arc<Snapshot> {
        self.grpc.borrow().clone()
    }
}

impl Views for ClientViews {
    fn view(&self, node: &Node) -> watch::Receiver<Arc<Snapshot>> {
        if is_grpc(node) {
            self.grpc.subscribe()
        } else {
            self.sidecar.subscribe()
        }
    }
}

#[cfg(test)]
mod tests {
    use tern_proto::{
        ClusterLoadAssignment, HttpConnectionManager, Listener, RouteConfiguration, decode,
        hcm_types, type_url,
    };

    use super::*;
    use crate::config;

    fn services() -> Vec<Service> {
        config::parse(
            "services:
  - { name: echo, port: 50051, protocol: grpc, lb: least_request, endpoints: [\"127.0.0.1:50051\", { address: \"127.0.0.2:50051\", zone: b }] }
  - { name: calc, port: 9090, protocol: thrift, vip: 10.96.0.50, endpoints: [\"10.0.0.1:9090\"] }
",
        )
        .unwrap()
        .services
    }

    #[test]
    fn grpc_clients_get_api_listeners_and_sidecars_get_istiods_shape() {
        let views = ClientViews::default();
        assert!(views.publish(&services(), |_, e| e.health.eds()));
        assert!(
            !views.publish(&services(), |_, e| e.health.eds()),
            "unchanged: not published"
        );

        let g = views.grpc();
        let l: Listener = decode(
            &g.get(type_url::LISTENER, "echo").unwrap().body,
            type_url::LISTENER,
        )
        .unwrap();
        let hcm: HttpConnectionManager = decode(
            l.api_listener.unwrap().api_listener.as_ref().unwrap(),
            type_url::HTTP_CONNECTION_MANAGER,
        )
        .unwrap();
        let Some(hcm_types::http_connection_manager::RouteSpecifier::Rds(rds)) =
            hcm.route_specifier
        else {
            panic!("RDS expected");
        };
        assert_eq!(rds.route_config_name, "echo:50051");
        assert!(g.get(type_url::LISTENER, "echo:50051").is_some());
        let r: RouteConfiguration = decode(
            &g.get(type_url::ROUTE_CONFIGURATION, "echo:50051")
                .unwrap()
                .body,
            type_url::ROUTE_CONFIGURATION,
        )
        .unwrap();
        assert_eq!(r.virtual_hosts[0].domains, ["*"]);
        let c: tern_proto::Cluster = decode(
            &g.get(type_url::CLUSTER, "outbound|50051||echo")
                .unwrap()
                .body,
            type_url::CLUSTER,
        )
        .unwrap();
        assert_eq!(c.lb_policy, 0, "gRPC cannot do LEAST_REQUEST: ROUND_ROBIN");
        let cla: ClusterLoadAssignment = decode(
            &g.get(type_url::CLUSTER_LOAD_ASSIGNMENT, "outbound|50051||echo")
                .unwrap()
                .body,
            type_url::CLUSTER_LOAD_ASSIGNMENT,
        )
        .unwrap();
        assert_eq!(cla.endpoints.len(), 2, "one group per locality");
        assert!(
            cla.endpoints
                .iter()
                .all(|l| l.load_balancing_weight.is_some())
        );

        let s = views.sidecar();
        assert!(s.get(type_url::LISTENER, "10.96.0.50_9090").is_some());
        assert!(s.get(type_url::LISTENER, "virtualInbound").is_some());
        assert!(
            s.get(type_url::LISTENER, "echo").is_none(),
            "no API listener for sidecars"
        );
        let c: tern_proto::Cluster = decode(
            &s.get(type_url::CLUSTER, "outbound|50051||echo")
                .unwrap()
                .body,
            type_url::CLUSTER,
        )
        .unwrap();
        assert_eq!(c.lb_policy, 1, "sidecars get LEAST_REQUEST");
    }

    #[test]
    fn grpc_clients_are_told_by_user_agent_or_generator() {
        let mut node = Node {
            user_agent_name: "gRPC C-core linux Python".into(),
            ..Default::default()
        };
        assert!(is_grpc(&node));
        node.user_agent_name = "envoy".into();
        assert!(!is_grpc(&node));
        node.metadata = Some(wkt::Struct {
            fields: [(
                "GENERATOR".to_owned(),
                wkt::Value {
                    kind: Some(wkt::Kind::StringValue("grpc".into())),
                },
            )]
            .into(),
        });
        assert!(is_grpc(&node));
    }
}
