//! Client status discovery (`envoy.service.status.v3.ClientStatusDiscoveryService`): what the
//! server knows of each connected client, per type — the version it ACKed, or why it refused
//! the last one — as tools that speak CSDS read it. One entry per type (the server keeps
//! subscriptions and versions, not every resource's name per client), named by the type.
use std::{pin::Pin, sync::Arc, time::SystemTime};

use tern_proto::{
    Node,
    csds_types::{
        ClientConfig, ClientResourceStatus, ClientStatusRequest, ClientStatusResponse,
        ConfigStatus, GenericXdsConfig, UpdateFailureState,
        client_status_discovery_service_server::{
            ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
        },
    },
    matcher_types::string_matcher::MatchPattern,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    server::{ClientInfo, Clients},
    status::TypeStatus,
};

fn timestamp(t: SystemTime) -> tern_proto::wkt::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    tern_proto::wkt::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A type's state, as CSDS names it.
fn generic(type_url: &str, s: &TypeStatus) -> GenericXdsConfig {
    let nacked = s
        .last_nack
        .as_ref()
        .filter(|n| Some(&n.version) == s.sent_version.as_ref());
    let (config_status, client_status) = match (&s.sent_version, nacked) {
        (None, _) => (ConfigStatus::NotSent, ClientResourceStatus::Requested),
        (Some(_), Some(_)) => (ConfigStatus::Error, ClientResourceStatus::Nacked),
        (Some(sent), None) if s.acked_version.as_ref() == Some(sent) => {
            (ConfigStatus::Synced, ClientResourceStatus::Acked)
        }
        (Some(_), None) => (ConfigStatus::Stale, ClientResourceStatus::Unknown),
    };
    GenericXdsConfig {
        type_url: type_url.to_owned(),
        name: if s.wildcard {
            "*".into()
        } else {
            String::new()
        },
        version_info: s.acked_version.clone().unwrap_or_default(),
        config_status: config_status as i32,
        client_status: client_status as i32,
        error_state: s.last_nack.as_ref().map(|n| UpdateFailureState {
            last_update_attempt: Some(timestamp(n.at)),
            details: n.message.clone(),
            version_info: n.version.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn config(c: &ClientInfo) -> ClientConfig {
    ClientConfig {
        node: Some(Node {
            id: c.node_id.clone(),
            cluster: c.cluster.clone(),
            user_agent_name: c.user_agent.clone(),
            ..Default::default()
        }),
        generic_xds_configs: c.types.iter().map(|(t, s)| generic(t, s)).collect(),
        ..Default::default()
    }
}

/// Whether `node_id` matches the request's node matchers (none: every client).
fn wanted(request: &ClientStatusRequest, node_id: &str) -> bool {
    request.node_matchers.is_empty()
        || request.node_matchers.iter().any(|m| {
            m.node_id
                .as_ref()
                .and_then(|s| s.match_pattern.as_ref())
                .is_none_or(|p| match p {
                    MatchPattern::Exact(e) => node_id == e,
                    MatchPattern::Prefix(p) => node_id.starts_with(p.as_str()),
                    MatchPattern::Suffix(s) => node_id.ends_with(s.as_str()),
                    MatchPattern::Contains(c) => node_id.contains(c.as_str()),
                    _ => false,
                })
        })
}

/// The CSDS service over the server's client registry.
#[derive(Clone)]
pub struct Csds {
    clients: Arc<Clients>,
}

impl Csds {
    pub fn new(clients: Arc<Clients>) -> ClientStatusDiscoveryServiceServer<Self> {
        ClientStatusDiscoveryServiceServer::new(Self { clients })
    }

    fn answer(&self, request: &ClientStatusRequest) -> ClientStatusResponse {
        ClientStatusResponse {
            config: self
                .clients
                .list()
                .iter()
                .filter(|c| wanted(request, &c.node_id))
                .map(config)
                .collect(),
        }
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = Responses;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        let this = self.clone();
        let answers = request
            .into_inner()
            .map(move |r| r.map(|r| this.answer(&r)));
        Ok(Response::new(Box::pin(answers)))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        Ok(Response::new(self.answer(request.get_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_report_synced_stale_nacked_or_not_sent() {
        let mut s = TypeStatus::default();
        assert_eq!(generic("t", &s).config_status, ConfigStatus::NotSent as i32);
        s.sent_version = Some("v1".into());
        assert_eq!(generic("t", &s).config_status, ConfigStatus::Stale as i32);
        s.ack("v1");
        let g = generic("t", &s);
        assert_eq!(
            (g.config_status, g.version_info.as_str()),
            (ConfigStatus::Synced as i32, "v1")
        );
        s.sent_version = Some("v2".into());
        s.nack("v2", "bad cluster");
        let g = generic("t", &s);
        assert_eq!(g.client_status, ClientResourceStatus::Nacked as i32);
        assert_eq!(g.version_info, "v1", "still running what it applied");
        assert_eq!(g.error_state.unwrap().details, "bad cluster");
    }
}
