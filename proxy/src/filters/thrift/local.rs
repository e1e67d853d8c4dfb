//! Requests tern answers itself with a `TApplicationException` (no route, no healthy
//! endpoint, overflow, timeout, …): the reply in the request's own encoding, counted in
//! tern's and Istio's metrics.
use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;

use crate::{
    filters::{Ctx, istio},
    state::ClusterState,
    thrift::{
        frame::Meta,
        reply::{AppExceptionType, application_exception},
    },
};

/// The request a local reply answers.
pub(super) struct Answered<'a> {
    /// Its cluster, once routing found one.
    pub(super) cluster: Option<&'a Arc<ClusterState>>,
    pub(super) meta: &'a Meta,
    pub(super) name: &'a [u8],
    /// The sequence id the client sent.
    pub(super) seq: i32,
    pub(super) oneway: bool,
    pub(super) len: usize,
    /// Since the request was read.
    pub(super) elapsed_ms: f64,
}

/// Answers `request` with a `TApplicationException` of `kind` saying `why` (nothing for a
/// one-way call), counted under `cause`.
pub(super) fn reply(
    ctx: &Ctx,
    request: Answered<'_>,
    cause: &'static str,
    kind: AppExceptionType,
    why: &str,
) -> Option<Bytes> {
    let cluster_name = request.cluster.map_or("", |c| c.config.name.as_str());
    ctx.metrics.local_reply(cluster_name, cause);
    debug!(cause, "local reply");
    let reply = (!request.oneway)
        .then(|| application_exception(request.meta, request.name, request.seq, kind, why));
    istio::local_reply(ctx, request.cluster, cause).observe(
        request.elapsed_ms,
        request.len,
        reply.as_ref().map_or(0, Bytes::len),
    );
    reply
}
