//! Thrift detection on a TCP proxy chain, at no cost to other protocols.
//!
//! istiod sends every Thrift service as a plain `tcp_proxy`, with names that never say
//! Thrift, so the bytes must. The upstream connection is opened at once, as a TCP proxy
//! would, and whichever side speaks first decides:
//! - the server (MySQL, SMTP, SSH greetings): relay, with no delay at all;
//! - the client, with a whole first message that is a valid Thrift call or one-way call
//!   within the frame limit: per-request balancing, and the connection opened meanwhile goes
//!   to the endpoint's pool;
//! - the client, with anything else (a TLS ClientHello, an HTTP request, a frame that is too
//!   long, a header that does not decode): relay, every byte read so far included;
//! - nobody, before the first message's time is up: relay what there is (a chain whose
//!   rules need Thrift refuses it instead).
use std::{future::Future, time::Duration};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::tcp::Connected;
use crate::{
    budget::Held,
    stream::Stream,
    thrift::{Decoder, DecoderLimits, Protocol, Transport, frame::sniff},
};

/// What a chain's first bytes decided.
pub enum Outcome {
    /// The client spoke Thrift first; `first` holds what it sent so far (its first message
    /// whole). `upstream` is the connection opened meanwhile, when it opened.
    Thrift {
        first: BytesMut,
        format: (Transport, Protocol),
        upstream: Option<Connected>,
    },
    /// Anything else: relay, starting with the bytes each side sent already. `stalled`:
    /// neither side had said anything decisive when the first message's time was up.
    Relay {
        from_client: BytesMut,
        from_server: BytesMut,
        upstream: Connected,
        stalled: bool,
    },
    /// The client is not speaking Thrift and no upstream connection could be opened.
    Unreachable,
    /// The client's first message would take the read buffers over their budget.
    Overloaded,
}

/// Reads both sides until one decides (see the module doc); `connect` opens the upstream.
/// The client's first message must arrive within `timeout` (or the connection is relayed as
/// it is, `stalled`), and its buffer grows within `held`'s budget.
pub async fn first_speaker(
    down: &mut Stream,
    connect: impl Future<Output = Option<Connected>>,
    limits: DecoderLimits,
    held: &mut Held,
    timeout: Duration,
) -> Outcome {
    let mut decoder = Decoder::detecting(limits);
    let mut from_client = BytesMut::with_capacity(4096);
    let mut from_server = BytesMut::new();
    let mut connect = std::pin::pin!(connect);
    let mut connecting = true;
    let mut upstream: Option<Connected> = None;
    let deadline = tokio::time::sleep(timeout);
    let mut deadline = std::pin::pin!(deadline);
    let mut stalled = false;
    let relay = loop {
        tokio::select! {
            read = down.read_buf(&mut from_client) => match read {
                Ok(n) if n > 0 => match sniff(&mut decoder, &from_client) {
                    Ok(Some(format)) => {
                        return Outcome::Thrift { first: from_client, format, upstream };
                    }
                    Ok(None) => {
                        let more = from_client.len().max(4096);
                        if from_client.capacity() - from_client.len() < 1024
                            && held.reserve(&mut from_client, more).is_err()
                        {
                            return Outcome::Overloaded;
                        }
                    }
                    Err(_) => break true,
                },
                // The client closed its side (or failed) before it said anything that is
                // Thrift: the relay forwards that.
                _ => break true,
            },
            opened = &mut connect, if connecting => {
                connecting = false;
                match opened {
                    Some(u) => upstream = Some(u),
                    None => break false,
                }
            },
            read = async {
                match upstream.as_mut() {
                    Some(u) => u.stream.read_buf(&mut from_server).await,
                    None => std::future::pending().await,
                }
            } => {
                // The server spoke first (or closed): relay.
                let _ = read;
                break true;
            },
            () = &mut deadline => {
                stalled = true;
                break true;
            },
        }
    };
    if !relay {
        return Outcome::Unreachable;
    }
    let upstream = match upstream {
        Some(u) => Some(u),
        None if connecting => connect.await,
        None => None,
    };
    match upstream {
        Some(upstream) => Outcome::Relay {
            from_client,
            from_server,
            upstream,
            stalled,
        },
        None => Outcome::Unreachable,
    }
}
