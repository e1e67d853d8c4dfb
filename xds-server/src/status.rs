//! What the server knows of each connected client, per type: what it subscribed to, the last
//! version sent, the last it ACKed, and its last NACK with the message and when. The engines
//! keep it; the transport lists it (admin, CSDS).
use std::time::SystemTime;

use serde::Serialize;

/// What a request was, for the server's log and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// The first request of a type on the stream, or one changing only the subscription.
    Request,
    Ack,
    Nack,
    /// A nonce that is not the type's latest: superseded (its ACK or NACK does not count).
    Stale,
}

/// A NACK: the version refused, the client's message, when.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Nack {
    /// The version of the response the client refused.
    pub version: String,
    pub message: String,
    #[serde(serialize_with = "unix_seconds")]
    pub at: SystemTime,
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// What one client has of one type.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TypeStatus {
    /// Every resource of the type (`*`), and how many names besides.
    pub wildcard: bool,
    pub subscribed: usize,
    /// The version of the last response sent (state of the world: the type's version; delta:
    /// the snapshot's).
    pub sent_version: Option<String>,
    /// The last version the client ACKed. A NACKed version never counts as applied.
    pub acked_version: Option<String>,
    /// The client's last NACK, kept after later ACKs so an operator sees what went wrong.
    pub last_nack: Option<Nack>,
    /// Answers sent (one answer may go in several responses: see `delta`), ACKs and NACKs
    /// received.
    pub responses: u64,
    pub acks: u64,
    pub nacks: u64,
}

impl TypeStatus {
    /// Whether the client applied what was last sent.
    pub fn in_sync(&self) -> bool {
        self.sent_version.is_some() && self.sent_version == self.acked_version
    }

    /// Tells a request by its nonce (`latest`: that of the type's last response;
    /// `earlier_parts`: those of the earlier parts of the same answer) and records an ACK or a
    /// NACK (it carries an `error`) of the version that answer carried. A part's NACK counts;
    /// its ACK waits for the last part's.
    pub(crate) fn receive(
        &mut self,
        latest: Option<&str>,
        earlier_parts: &[String],
        response_nonce: &str,
        error: Option<&str>,
    ) -> Received {
        if response_nonce.is_empty() {
            return Received::Request;
        }
        let part = earlier_parts.iter().any(|n| n == response_nonce);
        if latest != Some(response_nonce) && !part {
            return Received::Stale;
        }
        let sent = self.sent_version.clone().unwrap_or_default();
        match error {
            None if part => Received::Ack,
            Some(message) => {
                self.nack(&sent, message);
                Received::Nack
            }
            None => {
                self.ack(&sent);
                Received::Ack
            }
        }
    }

    pub(crate) fn ack(&mut self, version: &str) {
        self.acks += 1;
        self.acked_version = Some(version.to_owned());
    }

    pub(crate) fn nack(&mut self, version: &str, message: &str) {
        self.nacks += 1;
        self.last_nack = Some(Nack {
            version: version.to_owned(),
            // A client's message is bounded like everything kept per client.
            message: message.chars().take(1024).collect(),
            at: SystemTime::now(),
        });
    }
}
