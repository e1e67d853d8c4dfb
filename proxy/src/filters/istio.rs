//! Istio's metrics of a connection or a call: who is on each side, from the node metadata,
//! the cluster's service, the endpoint's workload metadata and the mTLS identities.
use std::sync::Arc;

use super::{Ctx, Direction};
use crate::{
    state::{ClusterState, EndpointHandle},
    stream::Stream,
    telemetry::{
        RequestSeries, TcpSeries, Workload,
        istio::{Peers, Reporter},
    },
    thrift::frame::ReplyResult,
};

/// tern's own identity: the SPIFFE URI of its workload certificate.
fn own_principal(ctx: &Ctx) -> Option<String> {
    let cert = ctx.state.tls.store.current()?;
    cert.info
        .sans
        .iter()
        .find(|s| s.starts_with("spiffe://"))
        .cloned()
}

fn endpoint_workload(ep: Option<&EndpointHandle>) -> Workload {
    ep.and_then(|e| e.config.metadata.as_ref()?.workload.as_deref())
        .map_or_else(Workload::default, Workload::from_istio_workload)
}

/// The TCP series of a relayed connection: `up` went to `endpoint` of `cluster` (or to the
/// original destination); `peer_identity` is the client's, when tern terminated mTLS.
pub fn tcp(
    ctx: &Ctx,
    direction: Direction,
    cluster: Option<&ClusterState>,
    endpoint: Option<usize>,
    up: Option<&Stream>,
    peer_identity: Option<&str>,
) -> TcpSeries {
    let istio = &ctx.metrics.istio;
    let own = own_principal(ctx);
    let service = cluster.and_then(|c| c.config.service.as_deref());
    match direction {
        Direction::Outbound => {
            let remote = endpoint_workload(cluster.zip(endpoint).map(|(c, i)| &c.endpoints[i]));
            let server = up.and_then(Stream::peer_identity);
            istio.tcp(
                &Peers {
                    reporter: Reporter::Source,
                    source: &istio.local,
                    source_principal: own.as_deref(),
                    destination: &remote,
                    destination_principal: server.as_deref(),
                    service,
                    mutual_tls: false,
                },
                "-",
            )
        }
        Direction::Inbound => {
            let remote = peer_identity.map_or_else(Workload::default, Workload::from_principal);
            istio.tcp(
                &Peers {
                    reporter: Reporter::Destination,
                    source: &remote,
                    source_principal: peer_identity,
                    destination: &istio.local,
                    destination_principal: own.as_deref(),
                    service,
                    mutual_tls: peer_identity.is_some(),
                },
                "-",
            )
        }
    }
}

/// The request series of calls to `ep` of `cluster`, one per reply result, made at the
/// first call and kept with the endpoint (counting a call then looks nothing up).
pub fn endpoint_requests<'a>(
    ctx: &Ctx,
    cluster: &ClusterState,
    ep: &'a EndpointHandle,
) -> &'a [RequestSeries; 3] {
    let traffic = ep.runtime.traffic();
    traffic.istio.get_or_init(|| {
        let remote = endpoint_workload(Some(ep));
        let istio = &ctx.metrics.istio;
        let own = own_principal(ctx);
        let server = traffic.server_identity.get().map(|s| &**s);
        let peers = Peers {
            reporter: Reporter::Source,
            source: &istio.local,
            source_principal: own.as_deref(),
            destination: &remote,
            destination_principal: server,
            service: cluster.config.service.as_deref(),
            mutual_tls: false,
        };
        ReplyResult::ALL.map(|r| istio.requests(&peers, r.as_str(), "-"))
    })
}

/// The series of a call tern answered itself (`cause`, as Envoy's response flags say it).
pub fn local_reply(ctx: &Ctx, cluster: Option<&Arc<ClusterState>>, cause: &str) -> RequestSeries {
    let istio = &ctx.metrics.istio;
    let own = own_principal(ctx);
    let unknown = Workload::default();
    let peers = Peers {
        reporter: Reporter::Source,
        source: &istio.local,
        source_principal: own.as_deref(),
        destination: &unknown,
        destination_principal: None,
        service: cluster.and_then(|c| c.config.service.as_deref()),
        mutual_tls: false,
    };
    istio.requests(&peers, "error", response_flags(cause))
}

/// Envoy's response flag for a local reply's cause.
fn response_flags(cause: &str) -> &'static str {
    match cause {
        "no_healthy_upstream" => "UH",
        "connect_failure" => "UF",
        "overflow" => "UO",
        "buffer_budget" => "OM",
        "upstream_reset" => "UC",
        "timeout" => "UT",
        "no_route" => "NR",
        "no_cluster" => "NC",
        "rbac_access_denied" => "RBAC",
        "invalid_message_type" => "DPE",
        _ => "-",
    }
}
