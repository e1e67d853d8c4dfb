//! The outbound (15001) and inbound (15006) listeners: accept, learn each connection's
//! original destination, and hand it to its filter chain ([`crate::filters`]).
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::{
    filters::{self, Ctx, Direction},
    refusal::Refusal,
    socket::{self, OriginalDstSource},
    workers::Workers,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

/// The listeners' metric families: connections accepted, and open, by listener.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    accepted: Family<ListenerLabel, Counter>,
    open: Family<ListenerLabel, Gauge>,
}

impl ListenerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "downstream_connections",
            "Connections accepted by listener",
            m.accepted.clone(),
        );
        registry.register(
            "downstream_connections_active",
            "Open downstream connections by listener",
            m.open.clone(),
        );
        m
    }
}

/// Open downstream connections, for draining.
#[derive(Debug, Default)]
pub struct OpenConnections(AtomicUsize);

impl OpenConnections {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

struct Open(Arc<OpenConnections>, Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
        self.1.dec();
    }
}

/// Accepts connections until tern exits and hands each to a worker ([`crate::workers`]);
/// past `max_connections` open ones (across listeners), a new connection is closed at once
/// and counted. The listeners stay open while tern drains: closing them would make capture
/// fail open, so the application's new outbound connections would
/// bypass tern and new inbound ones would reach the application without TLS or
/// authorization. Draining waits for the connections to close, up to the drain timeout (see
/// [`crate::run`]).
pub async fn serve(
    listener: TcpListener,
    direction: Direction,
    ctx: Arc<Ctx>,
    open: Arc<OpenConnections>,
    max_connections: usize,
    workers: Arc<Workers>,
    metrics: ListenerMetrics,
) {
    let listen_port = listener.local_addr().map_or(0, |a| a.port());
    let label = ListenerLabel {
        listener: direction.as_str().to_owned(),
    };
    let accepted = metrics.accepted.get_or_create(&label).clone();
    let active = metrics.open.get_or_create(&label).clone();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(port = listen_port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        accepted.inc();
        if open.count() >= max_connections {
            ctx.metrics
                .refusals
                .count(direction.as_str(), Refusal::Overloaded);
            debug!(%peer, open = open.count(), "too many connections: refused");
            drop(stream);
            continue;
        }
        active.inc();
        open.0.fetch_add(1, Ordering::Relaxed);
        let guard = Open(open.clone(), active.clone());
        let ctx = ctx.clone();
        // The socket leaves this thread's runtime for the worker's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, error = %e, "could not hand the connection to a worker");
                continue;
            }
        };
        let serve = move || {
            // At debug level: a span in force is entered and left on every poll of the
            // connection's task, and each time the log filter takes two locks that every
            // worker shares. Events logged at info and above name their connection
            // themselves.
            let span = debug_span!("conn", dir = direction.as_str(), %peer);
            async move {
                let _guard = guard;
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(s) => s,
                    Err(e) => return debug!(error = %e, "the worker could not take the connection"),
                };
                let (dst, learned) = match socket::original_dst(&stream) {
                    Ok(d) => d,
                    Err(e) => return debug!(error = %e, "no original destination"),
                };
                // A connection made straight to a listener has no original destination;
                // relaying it would connect tern to itself. (sk_lookup-steered inbound
                // connections keep their original local address, on another port.)
                let direct = direction == Direction::Outbound || dst.port() == listen_port;
                if learned == OriginalDstSource::LocalAddr && direct {
                    return debug!(%dst, "closing a connection that was not captured");
                }
                let started = ctx.access_log.then(Instant::now);
                let outcome = filters::handle(stream, direction, dst, peer, ctx).await;
                if let Some(started) = started {
                    info!(
                        target: "tern::access",
                        dir = direction.as_str(),
                        %peer,
                        %dst,
                        peer_identity = outcome.peer_identity.as_deref().unwrap_or("-"),
                        refused = outcome.refused.map_or("-", |r| r.as_str()),
                        denied_by = outcome.denied_by.as_deref().unwrap_or("-"),
                        handled = outcome.handled.as_str(),
                        duration_ms = started.elapsed().as_millis() as u64,
                        "connection closed"
                    );
                }
            }
            .instrument(span)
        };
        workers.hand_off(serve);
    }
}
