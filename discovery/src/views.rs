//! Which snapshot each client is served: proxyless gRPC clients get the gRPC shape, every
//! other client (tern, Envoy) the sidecar shape. Both are rebuilt from the services at once
//! (only the services that changed are generated again), and published only when they
//! changed, so an unchanged update wakes no stream.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use tern_proto::{Any, Node, wkt};
use tern_xds_server::{Resource, Snapshot, Views};
use tokio::sync::watch;

use crate::{
    generate::{self, grpc, sidecar},
    model::Service,
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
    /// What sidecars are served whatever the services.
    fixed: Vec<Arc<Resource>>,
    /// What each service generated last, in the services' order, kept while it and its
    /// endpoints' health stay the same: a change regenerates only the services it touched.
    generated: Mutex<Vec<Generated>>,
}

/// One service's resources in both shapes, and what they were generated from.
#[derive(Debug)]
struct Generated {
    service: Service,
    first_of_name: bool,
    health: Vec<i32>,
    sidecar: Vec<Arc<Resource>>,
    grpc: Vec<Arc<Resource>>,
    /// Its endpoints, the same in both shapes.
    endpoints: Arc<Resource>,
}

impl Generated {
    fn new(service: &Service, first_of_name: bool, health: Vec<i32>) -> Self {
        let mut statuses = health.iter().copied();
        // An endpoint without a status (none given) is served as its registry says.
        let endpoints = generate::endpoints(service, |e| {
            statuses.next().unwrap_or_else(|| e.health.eds())
        });
        Self {
            sidecar: versioned(sidecar::service(service)),
            grpc: versioned(grpc::service(service, first_of_name)),
            endpoints: versioned(vec![endpoints]).remove(0),
            service: service.clone(),
            first_of_name,
            health,
        }
    }

    fn generated_from(&self, service: &Service, first_of_name: bool, health: &[i32]) -> bool {
        self.first_of_name == first_of_name && self.health == health && self.service == *service
    }
}

/// Resources as served: each with the version of its bytes.
fn versioned(items: Vec<(String, Any)>) -> Vec<Arc<Resource>> {
    items
        .into_iter()
        .map(|(name, body)| Arc::new(Resource::new(name, body)))
        .collect()
}

impl Default for ClientViews {
    fn default() -> Self {
        Self {
            sidecar: watch::Sender::new(Arc::new(Snapshot::default())),
            grpc: watch::Sender::new(Arc::new(Snapshot::default())),
            fixed: versioned(sidecar::fixed()),
            generated: Mutex::default(),
        }
    }
}

impl ClientViews {
    /// Rebuilds both shapes from `services`, their endpoints with the EDS health in `health`
    /// (by service, in the same order), regenerating only the services that changed. Returns
    /// whether either shape changed.
    pub fn publish(&self, services: &[Service], health: &[Vec<i32>]) -> bool {
        let mut generated = self
            .generated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut previous: HashMap<(String, u16), Generated> = std::mem::take(&mut *generated)
            .into_iter()
            .map(|g| ((g.service.name.clone(), g.service.port), g))
            .collect();
        let mut named_once = BTreeSet::new();
        for (i, s) in services.iter().enumerate() {
            let first_of_name = named_once.insert(s.name.as_str());
            let statuses = health.get(i).cloned().unwrap_or_default();
            generated.push(match previous.remove(&(s.name.clone(), s.port)) {
                Some(g) if g.generated_from(s, first_of_name, &statuses) => g,
                _ => Generated::new(s, first_of_name, statuses),
            });
        }
        // In the services' order: where two services make a resource of the same name, the
        // later one's is served, the same at every publication.
        let sidecar = Snapshot::of(
            self.fixed.iter().cloned().chain(
                generated
                    .iter()
                    .flat_map(|g| g.sidecar.iter().chain([&g.endpoints]).cloned()),
            ),
        );
        let grpc = Snapshot::of(
            generated
                .iter()
                .flat_map(|g| g.grpc.iter().chain([&g.endpoints]).cloned()),
        );
        drop(generated);
        let mut changed = false;
        for (tx, new) in [(&self.sidecar, sidecar), (&self.grpc, grpc)] {
            changed |= tx.send_if_modified(|current| {
                if current.same_as(&new) {
                    return false;
                }
                *current = Arc::new(new.since(current));
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
        assert!(views.publish(&services(), &[]));
        assert!(!views.publish(&services(), &[]), "unchanged: not published");

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
