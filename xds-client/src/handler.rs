//! What a user of the client implements: it receives what changed, per type, and says which
//! resources it refused. The client ACKs an update whose resources were all accepted, and
//! NACKs one naming the refused ones; the accepted ones are in force either way (Envoy's
//! per-resource acceptance, ztunnel's `RejectedConfig`).
use std::{collections::BTreeSet, sync::Arc};

use tern_proto::Any;

/// Which resources of a type a handler wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Everything the server has (Envoy's wildcard for listeners and clusters).
    Wildcard,
    /// These names; shared, so a handler whose interest did not change hands over the same
    /// set and the client compares two pointers (an EDS push to 1,000 clusters compares no
    /// names).
    Names(Arc<BTreeSet<String>>),
}

impl Interest {
    /// No names at all (a type nobody wants yet).
    pub(crate) fn is_nothing(&self) -> bool {
        matches!(self, Interest::Names(n) if n.is_empty())
    }

    pub(crate) fn names(&self) -> Vec<String> {
        match self {
            Interest::Wildcard => Vec::new(),
            Interest::Names(n) => n.iter().cloned().collect(),
        }
    }

    pub(crate) fn wants(&self, name: &str) -> bool {
        match self {
            Interest::Wildcard => true,
            Interest::Names(n) => n.contains(name),
        }
    }

    /// The names subscribed to, `None` for a wildcard.
    pub(crate) fn subscribed(&self) -> Option<Arc<BTreeSet<String>>> {
        match self {
            Interest::Wildcard => None,
            Interest::Names(n) => Some(n.clone()),
        }
    }
}

/// The resources of one type that changed in a response.
#[derive(Debug, Default)]
pub struct Update {
    /// New or changed resources, by name, still encoded (the handler decodes each once).
    pub changed: Vec<(String, Any)>,
    /// Resources that are gone (removed by the server, or no longer wanted).
    pub removed: Vec<String>,
}

/// A resource the handler refused, and why; the rest of its update is in force.
#[derive(Debug)]
pub struct RejectedConfig {
    pub name: String,
    pub reason: Box<dyn std::error::Error + Send + Sync>,
}

impl RejectedConfig {
    pub fn new(
        name: impl Into<String>,
        reason: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            reason: Box::new(reason),
        }
    }
}

impl std::fmt::Display for RejectedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// What a user of the client does with resources.
pub trait Handler {
    /// Applies what changed in one response of `type_url`. Every resource not returned as
    /// rejected is in force afterwards; a rejected one keeps its previous version, if any.
    fn apply(&mut self, type_url: &'static str, update: Update) -> Result<(), Vec<RejectedConfig>>;

    /// Which resources of each subscribed type the handler wants now.
    fn interest(&self, type_url: &str) -> Interest;

    /// Called about once a second while a stream is open (for timeouts such as warming).
    fn tick(&mut self) {}
}
