//! What the client keeps of a type's resources (names and versions, never a second copy of
//! their bodies), how it reads a resource's name, and why it refuses a whole response.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use tern_proto::type_url;

use crate::handler::{Handler, RejectedConfig, Update};

/// What changed in one response, as an engine worked it out.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    /// What the handler gets.
    pub update: Update,
    /// What the client will hold of each changed resource, if the handler accepts it.
    pub held: Vec<(String, Held)>,
    /// Resources the client itself refuses (the handler never sees them).
    pub malformed: Vec<RejectedConfig>,
}

/// A response the client refuses as a whole (before any resource reaches the handler).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("a resource of type {found} in a response of type {expected}")]
    WrongType { expected: String, found: String },
    #[error("resource #{index} of type {type_url} has no readable name")]
    Unnamed { type_url: String, index: usize },
    #[error("resource {0} appears twice")]
    Duplicate(String),
}

/// Whether a type's state-of-the-world responses carry the whole set (absence means removal).
pub fn is_full_state(type_url: &str) -> bool {
    type_url == type_url::LISTENER || type_url == type_url::CLUSTER
}

/// The name of a resource: field 1 of every type tern reads (`Listener.name`,
/// `Cluster.name`, `ClusterLoadAssignment.cluster_name`, the route configurations' `name`).
///
/// Read leniently, without decoding the rest: a resource whose body is corrupt further on
/// still has a name, so it is refused by name and the others in its response still apply.
pub fn resource_name(body: &[u8]) -> Option<String> {
    let mut rest = body;
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut rest)?;
            }
            1 => rest = rest.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut rest)?).ok()?;
                let value = rest.get(..len)?;
                if field == 1 {
                    return String::from_utf8(value.to_vec()).ok();
                }
                rest = &rest[len..];
            }
            5 => rest = rest.get(4..)?,
            _ => return None,
        }
    }
    None
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// A resource held: the version it arrived with, and (state of the world) a hash of its
/// body, so an unchanged resource is not handed to the handler again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub version: String,
    pub hash: u64,
}

/// What the client holds for one type, as `/config_dump` and `tern xds status` show it.
#[derive(Clone, Debug, Default)]
pub struct TypeState {
    /// Version of the last response accepted whole ("" before the first).
    pub version: String,
    /// Nonce of the last response, accepted or not.
    pub nonce: String,
    /// The resources in force, by name.
    pub resources: BTreeMap<String, Held>,
    /// Resources the handler refused, with the reason (a held one keeps its last version).
    pub rejected: BTreeMap<String, String>,
    /// The names last subscribed to (`None` for a wildcard).
    pub subscribed: Option<Arc<BTreeSet<String>>>,
    pub last_update: Option<SystemTime>,
    /// The reason of the last NACK, cleared by the next ACK.
    pub last_error: Option<String>,
    pub acks: u64,
    pub nacks: u64,
    /// Whether this type was requested on the current stream.
    pub(crate) requested: bool,
    /// A subscription everything held or refused is known to be within (checked when a
    /// response or a change of interest last compared them): a response under the same
    /// subscription compares no held names (an EDS push to one of 1,000 clusters).
    pub(crate) within: Option<Arc<BTreeSet<String>>>,
    /// The names in force, listed once for status pages until the set changes (a response
    /// that changes one resource of 1,000 lists none).
    names: OnceLock<Arc<[String]>>,
}

impl TypeState {
    /// The names of the resources in force, in order.
    pub fn names(&self) -> Arc<[String]> {
        self.names
            .get_or_init(|| self.resources.keys().cloned().collect())
            .clone()
    }

    /// Removes a resource (and any refusal of it).
    pub(crate) fn forget(&mut self, name: &str) {
        if self.resources.remove(name).is_some() {
            self.names = OnceLock::new();
        }
        self.rejected.remove(name);
    }

    /// Hands `changes` to the handler and records the outcome: the response's `version` if
    /// everything was accepted, else the NACK reason, which it returns.
    pub(crate) fn apply(
        &mut self,
        type_url: &'static str,
        changes: Changes,
        version: String,
        handler: &mut impl Handler,
    ) -> Option<String> {
        let Changes {
            update,
            held,
            mut malformed,
        } = changes;
        let removed = update.removed.clone();
        let mut rejected = handler.apply(type_url, update).err().unwrap_or_default();
        rejected.append(&mut malformed);
        let nack = self.record(held, &removed, rejected);
        if nack.is_none() {
            self.version = version;
        }
        nack
    }

    /// Records what the handler did with an update: `changed` (name, held) went in unless
    /// rejected, `removed` went out. Returns the NACK reason when something was rejected.
    fn record(
        &mut self,
        changed: Vec<(String, Held)>,
        removed: &[String],
        rejected: Vec<RejectedConfig>,
    ) -> Option<String> {
        let refused: BTreeSet<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        for name in removed {
            self.forget(name);
        }
        for (name, held) in changed {
            if !refused.contains(name.as_str()) {
                self.rejected.remove(&name);
                if self.resources.insert(name, held).is_none() {
                    self.names = OnceLock::new();
                }
            }
        }
        for r in &rejected {
            self.rejected.insert(r.name.clone(), r.reason.to_string());
        }
        self.last_update = Some(SystemTime::now());
        if rejected.is_empty() {
            self.last_error = None;
            self.acks += 1;
            None
        } else {
            let reason = nack_message(&rejected);
            self.last_error = Some(reason.clone());
            self.nacks += 1;
            Some(reason)
        }
    }

    /// A response refused whole.
    pub(crate) fn refuse(&mut self, error: &ResponseError) -> String {
        self.last_update = Some(SystemTime::now());
        self.last_error = Some(error.to_string());
        self.nacks += 1;
        error.to_string()
    }
}

/// At most this many rejections are spelled out in a NACK (its size stays bounded).
const NACK_DETAILS: usize = 16;

/// The `error_detail` message of a NACK: every refused resource by name, with its reason.
fn nack_message(rejected: &[RejectedConfig]) -> String {
    let mut parts: Vec<String> = rejected
        .iter()
        .take(NACK_DETAILS)
        .map(|r| {
            let mut s = r.to_string();
            s.truncate(s.floor_char_boundary(512));
            s
        })
        .collect();
    if rejected.len() > NACK_DETAILS {
        parts.push(format!("and {} more", rejected.len() - NACK_DETAILS));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tern_proto::{Cluster, ClusterLoadAssignment, Listener};

    use super::*;

    #[test]
    fn names_are_read_without_decoding_the_rest() {
        let cluster = Cluster {
            name: "outbound|9090||calc".into(),
            connect_timeout: Some(Default::default()),
            ..Default::default()
        };
        let mut bytes = cluster.encode_to_vec();
        assert_eq!(
            resource_name(&bytes).as_deref(),
            Some("outbound|9090||calc")
        );
        // Corrupt after the name: still named, though it no longer decodes.
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(Cluster::decode(bytes.as_slice()).is_err());
        assert_eq!(
            resource_name(&bytes).as_deref(),
            Some("outbound|9090||calc")
        );
        let cla = ClusterLoadAssignment {
            cluster_name: "c".into(),
            ..Default::default()
        };
        assert_eq!(resource_name(&cla.encode_to_vec()).as_deref(), Some("c"));
        let unnamed = Listener::default().encode_to_vec();
        assert_eq!(resource_name(&unnamed), None);
        assert_eq!(resource_name(&[0x0a, 0x7f]), None, "a length past the end");
        assert_eq!(resource_name(&[0xff; 11]), None, "a varint too long");
    }

    #[test]
    fn a_nack_names_the_refused_resources_and_stays_bounded() {
        #[derive(Debug, thiserror::Error)]
        #[error("bad")]
        struct Bad;
        let rejected: Vec<_> = (0..40)
            .map(|i| RejectedConfig::new(format!("c{i}"), Bad))
            .collect();
        let message = nack_message(&rejected);
        assert!(message.starts_with("c0: bad; c1: bad"), "{message}");
        assert!(message.ends_with("and 24 more"), "{message}");
    }
}
