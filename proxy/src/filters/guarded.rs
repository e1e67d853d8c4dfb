//! Thrift to an original destination (the local application, inbound) when the chain's
//! RBAC names Thrift methods: one call at a time over the connection tern opened, each call
//! authorized before it is sent. A refused call is answered with a `TApplicationException`
//! and never reaches the application. Calls are handled in order (a Thrift server answers a
//! connection's calls in order anyway), so every reply reaches the call it answers; a reply
//! that does not answer its call closes the connection.
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::{Ctx, authz::Authz};
use crate::budget::{Exhausted, Held};
use crate::{
    stream::Stream,
    thrift::{
        Decoder, Message, MessageType, Protocol, ThriftError, Transport,
        reply::{AppExceptionType, application_exception},
    },
    upstream::answers,
};

/// Relays calls from `down` (which sent `buf` already) to `up`, authorizing each.
pub async fn serve(
    mut down: Stream,
    mut buf: BytesMut,
    mut held: Held,
    mut up: Stream,
    format: (Transport, Protocol),
    mut authz: Authz,
    ctx: Arc<Ctx>,
) {
    let mut requests = Decoder::configured(ctx.limits, format.0, format.1, false);
    let mut replies = Decoder::configured(ctx.limits, format.0, format.1, false);
    let mut from_up = BytesMut::with_capacity(16 * 1024);
    loop {
        let call = match next(
            &mut requests,
            &mut down,
            &mut buf,
            Side::Client(&mut held),
            ctx.message_timeout,
        )
        .await
        {
            Ok(Some(call)) => call,
            Ok(None) => break,
            Err(why) => {
                debug!(%why, "Thrift connection ended");
                break;
            }
        };
        if let Err(denied) = authz.check_call(&call) {
            if denied.connection {
                // The policy in force no longer allows the connection at all.
                break;
            }
            ctx.metrics.local_reply("", "rbac_access_denied");
            if call.kind() == MessageType::Call {
                let reply = application_exception(
                    &call.meta(),
                    call.name(),
                    call.seq_id(),
                    AppExceptionType::Unknown,
                    "RBAC: access denied",
                );
                if down.write_all(&reply).await.is_err() {
                    break;
                }
            }
            continue;
        }
        if up.write_all(call.as_bytes()).await.is_err() {
            break;
        }
        if call.kind() == MessageType::Oneway {
            continue;
        }
        let reply = match next(
            &mut replies,
            &mut up,
            &mut from_up,
            Side::Application,
            ctx.message_timeout,
        )
        .await
        {
            Ok(Some(reply)) => reply,
            _ => break,
        };
        if let Err(why) = answers(&call, &reply) {
            debug!(%why, "the application's reply does not answer the call: closing");
            break;
        }
        if down.write_all(reply.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = down.shutdown().await;
}

/// Whose messages are read.
enum Side<'a> {
    /// The client: only calls, its buffer within its budget.
    Client(&'a mut Held),
    /// The application: its replies.
    Application,
}

/// Why a side's next message did not come.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Malformed(#[from] ThriftError),
    #[error("no buffer left: {0}")]
    Budget(#[from] Exhausted),
    #[error("a message took longer than its time")]
    Stalled,
    #[error("closed inside a message")]
    Truncated,
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
}

/// The next whole message from `stream` (bytes already read in `buf`); `None` at a clean
/// end between messages. A message must arrive whole within `timeout` of its first byte.
async fn next(
    decoder: &mut Decoder,
    stream: &mut Stream,
    buf: &mut BytesMut,
    mut side: Side<'_>,
    timeout: std::time::Duration,
) -> Result<Option<Message>, ReadError> {
    let mut deadline = None;
    loop {
        let decoded = match side {
            Side::Client(_) => decoder.decode_call(buf),
            Side::Application => decoder.decode(buf),
        };
        if let Some(m) = decoded? {
            return Ok(Some(m));
        }
        if buf.capacity() - buf.len() < 4096 {
            let more = buf.len().max(16 * 1024);
            match &mut side {
                Side::Client(held) => held.reserve(buf, more)?,
                Side::Application => buf.reserve(more),
            }
        }
        let read = if buf.is_empty() {
            stream.read_buf(buf).await
        } else {
            let at = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
            tokio::time::timeout_at(at, stream.read_buf(buf))
                .await
                .map_err(|_| ReadError::Stalled)?
        };
        match read? {
            0 if buf.is_empty() => return Ok(None),
            0 => return Err(ReadError::Truncated),
            _ => {}
        }
    }
}
