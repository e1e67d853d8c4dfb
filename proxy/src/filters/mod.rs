//! What happens to an accepted connection: its original destination selects a filter chain
//! (Envoy's rules, see [`crate::state::Snapshot::select`]), whose filter handles it.
//!
//! - [`thrift`]: per-request routing and balancing for Thrift;
//! - [`tcp`]: a byte relay to a cluster, or to the original destination (passthrough);
//! - [`inspect`]: TLS ClientHello and HTTP detection, for chains that match on them;
//! - [`authz`]: the chain's RBAC filters, on the connection and on Thrift calls;
//! - [`metrics`]: what they count;
//! - [`detect`]: what a TCP proxy chain does first — it finds out from the first bytes
//!   whether the client speaks Thrift, and then balances it per request. Istio sends Thrift
//!   services as plain `tcp_proxy`, so this is how tern balances them with no configuration.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::net::TcpStream;
use tracing::debug;

use self::authz::Authz;
use crate::{
    config::{Filter, UpstreamMode},
    refusal::Refusal,
    state::{ClusterState, Selection, State},
    stream::Stream,
    thrift::DecoderLimits,
    tls::ServerTls,
};

pub mod authz;
pub mod detect;
mod guarded;
pub mod inspect;
mod istio;
pub mod metrics;
mod ordered;
pub mod tcp;
pub mod thrift;

/// Which side of the Pod a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What every connection handler needs.
pub struct Ctx {
    pub state: Arc<State>,
    pub metrics: Arc<metrics::FilterMetrics>,
    /// `SO_MARK` on upstream sockets, so capture skips them.
    pub mark: u32,
    pub limits: DecoderLimits,
    /// Posted once, when the drain's time is up: Thrift connections take no new requests,
    /// finish the replies in flight and close; those accepted later close at once.
    pub closing: crate::notice::Notice,
    /// Connect timeout for passthrough connections (clusters have their own).
    pub connect_timeout: Duration,
    /// Log one line per connection when it closes (target `tern::access`).
    pub access_log: bool,
    /// Destination ports where TCP proxy chains do not look for Thrift, or take it for granted.
    pub thrift_ports: ThriftPorts,
    /// What downstream read buffers may hold together.
    pub budget: Arc<crate::budget::BufferBudget>,
    /// From a message's first byte to its last.
    pub message_timeout: Duration,
}

/// Per destination port, how a TCP proxy chain treats Thrift.
#[derive(Clone, Debug, Default)]
pub struct ThriftPorts {
    /// Never detected: always relayed as TCP.
    pub relay: Vec<u16>,
    /// Always Thrift: balanced per request without detection.
    pub forced: Vec<u16>,
}

/// What a TCP proxy chain does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TcpMode {
    Relay,
    Detect,
    Thrift,
}

impl ThriftPorts {
    /// The mode for a chain to `port`; `detect` is the chain's own setting.
    fn mode(&self, port: u16, detect: bool) -> TcpMode {
        if self.forced.contains(&port) {
            TcpMode::Thrift
        } else if !detect || self.relay.contains(&port) {
            TcpMode::Relay
        } else {
            TcpMode::Detect
        }
    }
}

/// What handled a connection, for the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// The Thrift proxy, per request.
    Thrift,
    /// A TCP proxy chain's byte relay.
    Tcp,
    /// No listener: relayed to the original destination.
    Passthrough,
    /// No listener, and passthrough is denied: closed.
    Denied,
}

impl Handled {
    pub fn as_str(self) -> &'static str {
        match self {
            Handled::Thrift => "thrift",
            Handled::Tcp => "tcp",
            Handled::Passthrough => "passthrough",
            Handled::Denied => "denied",
        }
    }
}

/// What became of a connection, for the access log.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub handled: Handled,
    /// The client's identity (its certificate's SPIFFE URI), when tern terminated mTLS.
    pub peer_identity: Option<String>,
    /// Why tern refused it, if it did.
    pub refused: Option<Refusal>,
    /// The RBAC policy that refused the connection (`none`: no ALLOW policy matched).
    pub denied_by: Option<String>,
}

impl From<Handled> for Outcome {
    fn from(handled: Handled) -> Self {
        Outcome {
            handled,
            peer_identity: None,
            refused: None,
            denied_by: None,
        }
    }
}

impl Outcome {
    /// A connection refused for `why` (counted).
    fn refused(why: Refusal, direction: Direction, ctx: &Ctx) -> Self {
        ctx.metrics.refusals.count(direction.as_str(), why);
        Outcome {
            handled: Handled::Denied,
            peer_identity: None,
            refused: Some(why),
            denied_by: None,
        }
    }
}

/// A connection as its filter sees it: where it goes, from where, and its authorization.
pub struct Conn {
    pub direction: Direction,
    pub dst: SocketAddr,
    pub peer: SocketAddr,
    /// The client's identity, when tern terminated mTLS.
    pub peer_identity: Option<String>,
    /// The chain's RBAC filters, kept to the policy in force.
    pub authz: Authz,
}

impl Conn {
    /// Refuses a connection that is not Thrift when the chain's rules name Thrift methods
    /// (they could not be enforced on it).
    fn refuse_if_rules_need_thrift(&self) -> Result<(), Refusal> {
        if self.authz.defers() {
            debug!(dst = %self.dst, "rules name Thrift methods and the client did not send a Thrift call: closing");
            return Err(Refusal::NotAThriftCall);
        }
        Ok(())
    }
}

/// Handles one accepted connection whose original destination is `dst`.
pub async fn handle(
    down: TcpStream,
    direction: Direction,
    dst: SocketAddr,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
) -> Outcome {
    // Subscribed before the configuration is read: a policy change from here on reaches
    // the connection.
    let policy = ctx.state.policy_changes();
    let mut snap = ctx.state.load();
    let inbound = direction == Direction::Inbound;
    // Chains that match on TLS, ALPN or HTTP need the first bytes (peeked, not consumed).
    let inspected = if snap.needs_inspection(dst, inbound) {
        drop(snap);
        let found = inspect::inspect(&down).await;
        debug!(%dst, ?found, "inspected");
        snap = ctx.state.load();
        found
    } else {
        inspect::Inspected::default()
    };
    let peeked = inspected.peeked();
    let selection = match direction {
        Direction::Outbound => snap.select(dst, peer, &peeked),
        Direction::Inbound => snap.select_inbound(dst, peer, &peeked),
    };
    let (chain, filter, tls, rbac) = match selection {
        Selection::Chain(l, c) => (
            thrift::ChainRef {
                listener: l.name.clone(),
                chain: c.name.clone(),
            },
            c.filter.clone(),
            c.tls
                .as_ref()
                .map(|_| snap.server_tls(&l.name, &c.name).map(|t| t.server.clone())),
            c.rbac.clone(),
        ),
        Selection::Passthrough => {
            drop(snap);
            debug!(%dst, "no listener: passthrough");
            // No chain, so no policy to change: the result is always Ok.
            let _ = tcp::passthrough(down.into(), dst, direction, None, None, &ctx).await;
            return Handled::Passthrough.into();
        }
        Selection::Refused(why) => {
            debug!(%dst, reason = why.as_str(), "refused");
            return Outcome::refused(why, direction, &ctx);
        }
    };
    drop(snap);
    debug!(%dst, listener = %chain.listener, chain = %chain.chain, "filter chain");
    if filter == Filter::Refuse {
        debug!(%dst, chain = %chain.chain, "a chain tern cannot enforce: closing");
        return Outcome::refused(Refusal::ChainNotEnforceable, direction, &ctx);
    }
    let (down, peer_identity) = match tls {
        None => (Stream::Plain(down), None),
        Some(Some(Ok(server))) => {
            match terminate(down, &server, peeked.application_protocols, &ctx).await {
                Some(terminated) => terminated,
                None => return Outcome::refused(Refusal::TlsHandshake, direction, &ctx),
            }
        }
        Some(_) => {
            debug!(chain = %chain.chain, "the chain's TLS server is unusable: closing");
            return Outcome::refused(Refusal::TlsUnusable, direction, &ctx);
        }
    };
    let mut authz = Authz::new(
        chain.clone(),
        rbac,
        ctx.state.clone(),
        ctx.metrics.clone(),
        policy,
        peer,
        dst,
        peer_identity.clone(),
        inspected.server_name.clone(),
    );
    if let Err(denied) = authz.check_connection() {
        return Outcome {
            peer_identity,
            denied_by: Some(denied.policy),
            ..Outcome::refused(denied.reason, direction, &ctx)
        };
    }
    let conn = Conn {
        direction,
        dst,
        peer,
        peer_identity: peer_identity.clone(),
        authz,
    };
    match run_filter(down, filter, chain, conn, ctx.clone()).await {
        Ok(handled) => Outcome {
            peer_identity,
            ..handled.into()
        },
        Err(why) => Outcome {
            peer_identity,
            ..Outcome::refused(why, direction, &ctx)
        },
    }
}

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Terminates TLS; the stream and the client's identity, or `None` when the handshake
/// failed (counted by reason).
async fn terminate(
    down: TcpStream,
    server: &ServerTls,
    offered: &[String],
    ctx: &Ctx,
) -> Option<(Stream, Option<String>)> {
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, server.accept(down, offered))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    ctx.metrics
        .handshakes
        .count("inbound", handshake.as_ref().map(|_| ()));
    match handshake {
        Ok(tls) => {
            let identity = crate::tls::peer_identity(tls.get_ref().1.peer_certificates());
            debug!(peer_identity = ?identity, "TLS terminated");
            Some((Stream::Tls(Box::new(tls.into())), identity))
        }
        Err(e) => {
            debug!(error = %e, "TLS handshake failed: closing");
            None
        }
    }
}

/// Runs a chain's filter on a connection. A chain whose rules name Thrift methods takes
/// nothing but Thrift calls tern fully understands: anything else is refused, so a client
/// cannot slip a method past a rule by framing it in a way tern does not decode.
async fn run_filter(
    down: Stream,
    filter: Filter,
    chain: thrift::ChainRef,
    conn: Conn,
    ctx: Arc<Ctx>,
) -> Result<Handled, Refusal> {
    let (direction, dst, peer) = (conn.direction, conn.dst, conn.peer);
    let snap = ctx.state.load();
    let (target, detect, idle) = match filter {
        Filter::Thrift(_) => {
            drop(snap);
            let held = ctx.budget.hold();
            thrift::serve(down, BytesMut::new(), held, chain, conn.authz, ctx).await;
            return Ok(Handled::Thrift);
        }
        Filter::Passthrough => {
            drop(snap);
            conn.refuse_if_rules_need_thrift()?;
            let identity = conn.peer_identity.as_deref();
            tcp::passthrough(down, dst, direction, identity, Some(conn.authz), &ctx)
                .await
                .map_err(|d| d.reason)?;
            return Ok(Handled::Passthrough);
        }
        Filter::Refuse => return Err(Refusal::ChainNotEnforceable),
        Filter::TcpProxy {
            target,
            sniff_thrift,
            idle_timeout,
        } => (target, sniff_thrift, idle_timeout),
    };
    let name = crate::balance::cluster_of(&target);
    let Some(cluster) = snap.clusters.get(name).cloned() else {
        debug!(cluster = %name, "unknown cluster: closing");
        return Ok(Handled::Tcp);
    };
    drop(snap);
    // An original-destination cluster has one destination and no endpoints: nothing to
    // balance, whatever the port; Thrift is looked for only when rules name its methods.
    let guarded = cluster.config.original_dst && conn.authz.defers();
    let mode = if guarded {
        TcpMode::Detect
    } else if cluster.config.original_dst {
        TcpMode::Relay
    } else {
        ctx.thrift_ports.mode(dst.port(), detect)
    };
    let handled = match mode {
        TcpMode::Thrift => {
            let held = ctx.budget.hold();
            thrift::serve(down, BytesMut::new(), held, chain, conn.authz, ctx).await;
            Handled::Thrift
        }
        TcpMode::Relay => {
            conn.refuse_if_rules_need_thrift()?;
            if let Some(up) = tcp::connect(&cluster, dst, peer, direction, &ctx).await {
                let early = (BytesMut::new(), BytesMut::new());
                relay(down, early, up, &cluster, conn, idle, &ctx).await?;
            }
            Handled::Tcp
        }
        TcpMode::Detect => {
            return detect_first_speaker(down, cluster, chain, conn, guarded, idle, ctx).await;
        }
    };
    Ok(handled)
}

/// A `tcp_proxy` connection its first bytes decide, while the upstream connection opens:
/// Thrift calls are balanced per request (or, where rules name methods on an
/// original-destination cluster, authorized call by call); anything else is relayed.
async fn detect_first_speaker(
    mut down: Stream,
    cluster: Arc<ClusterState>,
    chain: thrift::ChainRef,
    conn: Conn,
    guarded: bool,
    idle: Option<Duration>,
    ctx: Arc<Ctx>,
) -> Result<Handled, Refusal> {
    let (direction, dst, peer) = (conn.direction, conn.dst, conn.peer);
    let defers = conn.authz.defers();
    let connect = tcp::connect(&cluster, dst, peer, direction, &ctx);
    let mut held = ctx.budget.hold();
    let first = detect::first_speaker(
        &mut down,
        connect,
        ctx.limits,
        &mut held,
        ctx.message_timeout,
    );
    Ok(match first.await {
        detect::Outcome::Thrift {
            first,
            format,
            upstream,
        } if guarded => {
            let up = match upstream {
                Some(up) => Some(up),
                None => tcp::connect(&cluster, dst, peer, direction, &ctx).await,
            };
            let Some(up) = up else {
                return Ok(Handled::Tcp);
            };
            debug!("the client speaks Thrift: authorizing each call");
            guarded::serve(down, first, held, up.stream, format, conn.authz, ctx).await;
            Handled::Thrift
        }
        detect::Outcome::Thrift {
            first,
            format,
            upstream,
        } => {
            debug!("the client speaks Thrift: balancing per request");
            // The connection opened meanwhile serves the pool (one-request-at-a-time
            // connections are interchangeable); a multiplexed pool opens its own.
            if let Some(tcp::Connected {
                stream,
                endpoint: Some(i),
            }) = upstream
                && cluster.config.upstream == UpstreamMode::Exclusive
            {
                let settings = thrift::pool_settings(&cluster.config, &ctx);
                cluster.endpoints[i].runtime.traffic().pool().adopt(
                    stream,
                    format,
                    (&settings, &ctx.budget),
                    &cluster.runtime,
                );
            }
            thrift::serve(down, first, held, chain, conn.authz, ctx).await;
            Handled::Thrift
        }
        detect::Outcome::Relay {
            from_client,
            from_server,
            upstream,
            stalled,
        } => {
            // Nothing of the client's has been sent yet.
            if stalled && defers {
                return Err(Refusal::FirstBytesTimeout);
            }
            conn.refuse_if_rules_need_thrift()?;
            let early = (from_client, from_server);
            relay(down, early, upstream, &cluster, conn, idle, &ctx).await?;
            Handled::Tcp
        }
        detect::Outcome::Unreachable => Handled::Tcp,
        detect::Outcome::Overloaded => return Err(Refusal::Overloaded),
    })
}

/// Relays a connection to an endpoint of `cluster` (or its original destination), counted
/// in Istio's TCP metrics; `early` is what each side sent before the relay began.
async fn relay(
    down: Stream,
    early: (BytesMut, BytesMut),
    up: tcp::Connected,
    cluster: &ClusterState,
    conn: Conn,
    idle: Option<Duration>,
    ctx: &Ctx,
) -> Result<(), Refusal> {
    let series = istio::tcp(
        ctx,
        conn.direction,
        Some(cluster),
        up.endpoint,
        Some(&up.stream),
        conn.peer_identity.as_deref(),
    );
    tcp::relay(down, early, up.stream, series, Some(conn.authz), idle)
        .await
        .map_err(|d| d.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_flags_override_a_chains_own_setting() {
        let ports = ThriftPorts {
            relay: vec![5432],
            forced: vec![9090],
        };
        assert_eq!(ports.mode(8080, true), TcpMode::Detect);
        assert_eq!(ports.mode(8080, false), TcpMode::Relay);
        assert_eq!(ports.mode(5432, true), TcpMode::Relay);
        assert_eq!(ports.mode(9090, false), TcpMode::Thrift);
    }
}
