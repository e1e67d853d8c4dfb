//! Enforcing a chain's RBAC filters on a connection: once when it is accepted (after TLS,
//! so the peer's identity is known, and before any byte reaches the upstream), and — for
//! rules that name Thrift methods — on every Thrift call. A connection on such a chain that
//! is not Thrift is refused by the filter (see `filters::run_filter`), never relayed.
use std::{net::SocketAddr, sync::Arc};

use tracing::{debug, info};

use crate::{
    config::rbac::{Attributes, Rbac},
    metrics::Metrics,
    thrift::Message,
};

/// What a connection is authorized on, and by which filters.
#[derive(Debug)]
pub struct Authz {
    pub filters: Vec<Arc<Rbac>>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// The peer's identity from mTLS.
    pub principal: Option<String>,
    pub server_name: Option<String>,
}

/// A refusal, and the policy that decided it (`none`: no ALLOW policy matched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub policy: String,
}

impl Authz {
    /// Whether some rule waits for the Thrift method.
    pub fn defers(&self) -> bool {
        self.filters.iter().any(|f| f.names_thrift_methods())
    }

    /// The check when a connection is accepted: the filters that do not name methods.
    pub fn check_connection(&self, metrics: &Metrics) -> Result<(), Denied> {
        self.check(metrics, None, |f| !f.names_thrift_methods())
    }

    /// The check of one Thrift call.
    pub fn check_call(&self, metrics: &Metrics, call: &Message) -> Result<(), Denied> {
        let method = String::from_utf8_lossy(call.method());
        let service = call.service().map(String::from_utf8_lossy);
        self.check(metrics, Some((service.as_deref(), method.as_ref())), |f| {
            f.names_thrift_methods()
        })
    }

    fn check(
        &self,
        metrics: &Metrics,
        thrift: Option<(Option<&str>, &str)>,
        which: impl Fn(&Rbac) -> bool,
    ) -> Result<(), Denied> {
        let attrs = Attributes {
            source: self.source,
            destination: self.destination,
            principal: self.principal.as_deref(),
            server_name: self.server_name.as_deref(),
            thrift,
        };
        for f in self.filters.iter().filter(|f| which(f)) {
            let d = f.decide(&attrs);
            if let Some(shadow) = d.shadow_allowed {
                metrics.rbac(if shadow {
                    "shadow_allowed"
                } else {
                    "shadow_denied"
                });
                if !shadow {
                    debug!(principal = ?attrs.principal, "RBAC shadow rules would deny");
                }
            }
            metrics.rbac(if d.allowed { "allowed" } else { "denied" });
            if !d.allowed {
                let policy = d.policy.unwrap_or_else(|| "none".to_owned());
                info!(
                    principal = attrs.principal.unwrap_or("-"),
                    source = %self.source,
                    destination = %self.destination,
                    method = thrift.map_or("-", |(_, m)| m),
                    %policy,
                    "RBAC: access denied"
                );
                return Err(Denied { policy });
            }
        }
        Ok(())
    }
}
