//! Routing one request: the connection's view of its chain across snapshots, the per-call
//! authorization, Envoy's thrift route match, the cluster and the hash key (a [`Plan`]).
use std::{net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::time::Instant;
use tracing::debug;

use super::{
    ChainRef,
    local::{self, Answered},
};
use crate::{
    balance::{cluster_of, hash_key, source_hash},
    config::{Filter, Route, RouteAction, RouteMatch, Target},
    filters::{Ctx, authz::Authz},
    state::{ClusterState, Snapshot},
    thrift::{Decoder, Message, MessageType, frame::Meta, reply::AppExceptionType},
};

/// A connection's own handle on a cluster of its snapshot, which a request holds while in
/// flight. Cloning it per request writes a count only this connection's task writes;
/// cloning the cluster itself would write the one count every worker's requests share.
pub(super) type ClusterRef = Arc<Arc<ClusterState>>;

/// Clusters a connection keeps handles on (most route to one or two); a request to another
/// makes a handle of its own.
const CLUSTERS_KEPT: usize = 8;

/// Per-connection routing state.
pub(super) struct Downstream {
    chain: ChainRef,
    ctx: Arc<Ctx>,
    pub(super) decoder: Decoder,
    /// The snapshot this connection routes with, and its chain's filter, resolved once per
    /// snapshot (finding a chain walks the listeners by name).
    snapshot: Arc<Snapshot>,
    filter: Option<Arc<Filter>>,
    /// The last snapshot looked at: a snapshot without this chain is looked at once, and the
    /// connection keeps routing with the one before.
    seen: Arc<Snapshot>,
    /// The clusters of `snapshot` this connection routed to, at most [`CLUSTERS_KEPT`].
    clusters: Vec<ClusterRef>,
    /// The hash key of the client's address, for ring hash and Maglev requests without a
    /// hash header.
    source_hash: Option<u64>,
    /// RBAC rules that name Thrift methods, decided per call.
    pub(super) authz: Option<Authz>,
    /// The policy in force no longer allows the connection: it takes no new requests.
    pub(super) revoked: bool,
}

impl Downstream {
    pub(super) fn new(chain: ChainRef, ctx: Arc<Ctx>, source: Option<IpAddr>) -> Self {
        let snapshot = ctx.state.load();
        let filter = snapshot
            .chain(&chain.listener, &chain.chain)
            .map(|c| Arc::new(c.filter.clone()));
        let format = match filter.as_deref() {
            Some(Filter::Thrift(t)) => t.transport.zip(t.protocol),
            _ => None,
        };
        let decoder = match format {
            Some((t, p)) => Decoder::configured(ctx.limits, t, p, false),
            None => Decoder::detecting(ctx.limits),
        };
        Self {
            chain,
            ctx,
            decoder,
            seen: snapshot.clone(),
            snapshot,
            clusters: Vec::new(),
            filter,
            source_hash: source.map(source_hash),
            authz: None,
            revoked: false,
        }
    }

    /// The chain the connection belongs to.
    pub(super) fn chain(&self) -> &ChainRef {
        &self.chain
    }

    /// What to do with one request: answer it here, or forward it to a cluster.
    pub(super) fn plan(&mut self, msg: Message) -> Plan {
        self.follow_snapshot();
        if !matches!(msg.kind(), MessageType::Call | MessageType::Oneway) {
            return Plan::Local(local_reply(
                &self.ctx,
                &msg,
                "invalid_message_type",
                AppExceptionType::ProtocolError,
                "tern accepts only calls and one-way calls from clients",
            ));
        }
        if let Some(a) = &mut self.authz
            && let Err(denied) = a.check_call(&msg)
        {
            self.revoked |= denied.connection;
            return Plan::Local(local_reply(
                &self.ctx,
                &msg,
                "rbac_access_denied",
                AppExceptionType::Unknown,
                "RBAC: access denied",
            ));
        }
        let (cluster, timeout) = match self.route(&msg) {
            Ok(routed) => routed,
            Err(reply) => return Plan::Local(reply),
        };
        debug!(method = %String::from_utf8_lossy(msg.name()), cluster = %cluster.config.name, "routed");
        let hash = if cluster.config.lb_policy.hashes() {
            cluster
                .config
                .hash_header
                .as_ref()
                .and_then(|h| msg.header(h.as_bytes()))
                .map(hash_key)
                .or(self.source_hash)
        } else {
            None
        };
        let timeout = timeout.unwrap_or(cluster.config.request_timeout);
        Plan::Forward(Forward {
            client_seq: msg.seq_id(),
            meta: msg.meta(),
            msg,
            cluster,
            timeout,
            hash,
        })
    }

    /// Takes up a new snapshot's version of this connection's chain; a snapshot without the
    /// chain is looked at once, and the connection keeps routing with the one before. A
    /// snapshot that shares the chain with the one before (an EDS push shares every
    /// listener) costs no copy of its filter.
    fn follow_snapshot(&mut self) {
        let current = self.ctx.state.load();
        if !Arc::ptr_eq(&current, &self.seen) {
            if let Some(c) = current.chain(&self.chain.listener, &self.chain.chain) {
                // Both snapshots are held, so the same address is the same chain.
                let shared = self
                    .snapshot
                    .chain(&self.chain.listener, &self.chain.chain)
                    .is_some_and(|before| std::ptr::eq(before, c));
                if !shared {
                    self.filter = Some(Arc::new(c.filter.clone()));
                }
                self.snapshot = current.clone();
                self.clusters.clear();
            }
            self.seen = current;
        }
    }

    /// The cluster a request goes to, with its route's timeout; or the local reply when no
    /// route or no such cluster.
    fn route(&mut self, msg: &Message) -> Result<(ClusterRef, Option<Duration>), Option<Bytes>> {
        let (routes, default): (&[Route], Option<&Target>) = match self.filter.as_deref() {
            Some(Filter::Thrift(t)) => (&t.routes, t.default_target.as_ref()),
            Some(Filter::TcpProxy { target, .. }) => (&[], Some(target)),
            // A chain that became a relay or refusal: nothing to route to.
            Some(Filter::Passthrough | Filter::Refuse) | None => (&[], None),
        };
        let routed = routes.iter().find(|r| matches(&r.matcher, msg));
        let (name, timeout): (Option<&str>, Option<Duration>) = match routed {
            Some(Route {
                action: RouteAction::Target(t),
                timeout,
                ..
            }) => (Some(cluster_of(t)), *timeout),
            Some(Route {
                action: RouteAction::ClusterHeader(h),
                timeout,
                ..
            }) => (
                msg.header(h.as_bytes())
                    .and_then(|v| std::str::from_utf8(v).ok()),
                *timeout,
            ),
            None => (default.map(cluster_of), None),
        };
        let Some(name) = name else {
            return Err(local_reply(
                &self.ctx,
                msg,
                "no_route",
                AppExceptionType::UnknownMethod,
                "no route for this method",
            ));
        };
        if let Some(kept) = self.clusters.iter().find(|c| c.config.name == name) {
            return Ok((kept.clone(), timeout));
        }
        let Some(cluster) = self.snapshot.clusters.get(name) else {
            // The name may come from a client's header: it is no label value.
            let why = format!("unknown cluster {name}");
            return Err(local_reply(
                &self.ctx,
                msg,
                "no_cluster",
                AppExceptionType::InternalError,
                &why,
            ));
        };
        let cluster = Arc::new(cluster.clone());
        if self.clusters.len() < CLUSTERS_KEPT {
            self.clusters.push(cluster.clone());
        }
        Ok((cluster, timeout))
    }
}

/// Envoy's thrift route match. `method` matches the full name or the part after a
/// multiplexed `Service:` prefix; `service` matches that prefix; headers match exactly.
fn matches(m: &RouteMatch, msg: &Message) -> bool {
    let method = m
        .method
        .as_deref()
        .is_none_or(|want| want.as_bytes() == msg.name() || want.as_bytes() == msg.method());
    let service = m
        .service
        .as_deref()
        .is_none_or(|want| msg.service() == Some(want.as_bytes()));
    let headers = m
        .headers
        .iter()
        .all(|(k, v)| msg.header(k.as_bytes()) == Some(v.as_bytes()));
    (method && service && headers) != m.invert
}

/// A local reply decided while routing (before any cluster), counted; nothing for a one-way
/// call.
fn local_reply(
    ctx: &Ctx,
    msg: &Message,
    cause: &'static str,
    kind: AppExceptionType,
    why: &str,
) -> Option<Bytes> {
    let request = Answered {
        cluster: None,
        meta: &msg.meta(),
        name: msg.name(),
        seq: msg.seq_id(),
        oneway: msg.kind() == MessageType::Oneway,
        len: msg.as_bytes().len(),
        elapsed_ms: 0.0,
    };
    local::reply(ctx, request, cause, kind, why)
}

/// What to do with one request.
#[expect(
    clippy::large_enum_variant,
    reason = "boxing the common variant would allocate once per request"
)]
pub(super) enum Plan {
    /// Answer at once (already encoded), or nothing for a one-way call.
    Local(Option<Bytes>),
    Forward(Forward),
}

pub(super) struct Forward {
    pub(super) msg: Message,
    pub(super) client_seq: i32,
    pub(super) meta: Meta,
    pub(super) cluster: ClusterRef,
    pub(super) timeout: Duration,
    pub(super) hash: Option<u64>,
}

impl Plan {
    pub(super) fn client_seq(&self) -> i32 {
        match self {
            Plan::Forward(f) => f.client_seq,
            Plan::Local(_) => 0,
        }
    }

    /// When the request, begun at `began`, times out (an answer given here has no deadline).
    pub(super) fn deadline(&self, began: Instant) -> Option<Instant> {
        match self {
            Plan::Forward(f) => Some(deadline_after(began, f.timeout)),
            Plan::Local(_) => None,
        }
    }
}

/// When a request that starts at `now` times out; a timeout too long to represent never does
/// (in practice: in a century).
fn deadline_after(now: Instant, timeout: Duration) -> Instant {
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;

    use super::*;
    use crate::{
        config::file::parse,
        filters::thrift::testing,
        thrift::{DecoderLimits, Protocol, Transport, frame::tests::framed_ping},
    };

    const CONFIG: &str = "listeners:\n  - address: 10.96.0.1:9090\n    filter_chains: [ { thrift_proxy: { default_cluster: a } } ]\n\
                          clusters:\n  - name: a\n    endpoints: [ { address: 127.0.0.1:1 } ]\n  - name: b\n    endpoints: [ { address: 127.0.0.1:2 } ]\n";

    /// A framed binary call `ping` with an empty body, decoded.
    fn ping() -> Message {
        let mut framed = BytesMut::from(&framed_ping()[..]);
        let limits = DecoderLimits::default();
        Decoder::configured(limits, Transport::Framed, Protocol::Binary, false)
            .decode(&mut framed)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_timeout_too_long_to_represent_never_fires() {
        let now = Instant::now();
        let far = deadline_after(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(50 * 365 * 24 * 3600));
        assert_eq!(
            deadline_after(now, Duration::from_millis(5)),
            now + Duration::from_millis(5)
        );
    }

    fn routed_to(conn: &mut Downstream) -> String {
        match conn.plan(ping()) {
            Plan::Forward(f) => f.cluster.config.name.clone(),
            Plan::Local(_) => panic!("answered locally"),
        }
    }

    #[test]
    fn a_connection_copies_its_filter_again_only_when_its_chain_changed() {
        let (ctx, chain, _) = testing::ctx(CONFIG, 1 << 20);
        let state = ctx.state.clone();
        let snapshot = state.load();
        let mut conn = Downstream::new(chain, ctx, None);
        assert_eq!(routed_to(&mut conn), "a");
        let filter = conn.filter.clone().unwrap();

        // An EDS push: the same listeners, a cluster's endpoints changed.
        let mut pushed = (*snapshot.config).clone();
        let mut a = (*pushed.clusters["a"]).clone();
        let mut endpoints = a.endpoints.to_vec();
        endpoints[0].address = "127.0.0.1:3".parse().unwrap();
        a.endpoints = endpoints.into();
        pushed.clusters.insert("a".into(), Arc::new(a));
        state.apply(pushed);
        assert_eq!(routed_to(&mut conn), "a");
        assert!(Arc::ptr_eq(&filter, conn.filter.as_ref().unwrap()));
        // The request holds the new snapshot's cluster, not the one kept before.
        match conn.plan(ping()) {
            Plan::Forward(f) => assert_eq!(
                f.cluster.endpoints[0].config.address,
                "127.0.0.1:3".parse().unwrap()
            ),
            Plan::Local(_) => panic!("answered locally"),
        }

        // The chain changed: the connection routes by the new one.
        state.apply(
            parse(
                &CONFIG.replace("default_cluster: a", "default_cluster: b"),
                "two",
            )
            .unwrap(),
        );
        assert_eq!(routed_to(&mut conn), "b");
        assert!(!Arc::ptr_eq(&filter, conn.filter.as_ref().unwrap()));
    }
}
