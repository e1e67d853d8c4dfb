//! Enforcing a chain's RBAC filters on a connection, always with the policy in force now:
//! once when it is accepted (after TLS, so the peer's identity is known, and before any byte
//! reaches the upstream); for rules that name Thrift methods, on every Thrift call; and again
//! whenever the control plane changes listeners, so a policy pushed mid-connection reaches
//! connections already open — a relayed connection the new policy denies is closed, a call
//! is decided by the policy of the moment it arrives. A connection on a chain whose rules
//! name methods that is not Thrift is refused by the filter (see `filters::run_filter`).
use std::{net::SocketAddr, sync::Arc};

use tracing::{debug, info};

use super::thrift::ChainRef;
use crate::{
    config::{
        Filter,
        rbac::{Attributes, Rbac},
    },
    notice::Watcher,
    refusal::Refusal,
    state::State,
    thrift::Message,
};

/// What a connection is authorized on, by which filters, and where they come from.
pub struct Authz {
    /// The chain's RBAC filters as last resolved.
    filters: Vec<Arc<Rbac>>,
    /// The chain, found again in each new configuration.
    chain: ChainRef,
    state: Arc<State>,
    metrics: Arc<super::metrics::FilterMetrics>,
    /// Changes when listeners change.
    policy: Watcher,
    /// Set once the policy in force no longer allows the connection: it stays so.
    revoked: Option<Denied>,
    /// The connection's fate depends on the Thrift methods it calls: only calls can be
    /// decided, so it must be Thrift tern fully decodes.
    needs_method: bool,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// The peer's identity from mTLS.
    pub principal: Option<String>,
    pub server_name: Option<String>,
}

/// A refusal: why, and the policy that decided it (`none`: no ALLOW policy matched; `-`:
/// no policy, the chain itself went away).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub policy: String,
    pub reason: Refusal,
    /// The whole connection is no longer allowed (not only this call).
    pub connection: bool,
}

impl Authz {
    /// The authorization of a connection on `chain`, whose filters are `filters` in the
    /// configuration it was selected from; `policy` was subscribed before that configuration
    /// was read, so no change after it is missed.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        chain: ChainRef,
        filters: Vec<Arc<Rbac>>,
        state: Arc<State>,
        metrics: Arc<super::metrics::FilterMetrics>,
        policy: Watcher,
        source: SocketAddr,
        destination: SocketAddr,
        principal: Option<String>,
        server_name: Option<String>,
    ) -> Self {
        Self {
            filters,
            chain,
            state,
            metrics,
            policy,
            revoked: None,
            needs_method: false,
            source,
            destination,
            principal,
            server_name,
        }
    }

    /// Whether the connection's fate depends on the Thrift methods it calls (known once
    /// [`Authz::check_connection`] ran): then it is authorized call by call, and anything
    /// but Thrift calls is refused.
    pub fn defers(&self) -> bool {
        self.needs_method
    }

    /// The check when a connection is accepted, with the policy in force now: every filter,
    /// a permission on Thrift methods unknown (see [`crate::config::rbac`]); where the outcome
    /// depends on the method, the connection is left to [`Authz::check_call`].
    pub fn check_connection(&mut self) -> Result<(), Denied> {
        self.refresh()?;
        self.connection_filters()
    }

    fn connection_filters(&mut self) -> Result<(), Denied> {
        self.needs_method = self.check(None).map_err(|policy| Denied {
            policy,
            reason: Refusal::Rbac,
            connection: true,
        })?;
        Ok(())
    }

    /// The check of one Thrift call, with the policy in force now. A connection whose fate
    /// does not depend on the method was decided whole (and is checked again when the policy
    /// changes): its calls cost no evaluation.
    pub fn check_call(&mut self, call: &Message) -> Result<(), Denied> {
        self.refresh()?;
        if !self.needs_method {
            return Ok(());
        }
        let method = String::from_utf8_lossy(call.method());
        let service = call.service().map(String::from_utf8_lossy);
        self.check(Some((service.as_deref(), method.as_ref())))
            .map(drop)
            .map_err(|policy| Denied {
                policy,
                reason: Refusal::Rbac,
                connection: false,
            })
    }

    /// Resolves once the policy in force no longer allows the connection (for relays, which
    /// see no calls); never while it does. A relay sees bytes, not calls: rules that come to
    /// depend on the Thrift method revoke it too (the client's next connection is authorized
    /// call by call).
    pub async fn revoked(&mut self) -> Denied {
        let mut checked = self.refresh();
        loop {
            if checked.is_ok() && self.defers() {
                checked = Err(Denied {
                    policy: "-".to_owned(),
                    reason: Refusal::PolicyChanged,
                    connection: true,
                });
                info!(chain = %self.chain.chain, source = %self.source, destination = %self.destination, "rules now name Thrift methods, which a relayed connection cannot be held to: closing it");
                self.revoked = checked.clone().err();
            }
            if let Err(denied) = checked {
                return denied;
            }
            self.policy.changed().await;
            checked = self.settle();
        }
    }

    /// Brings the filters up to the configuration in force, if listeners changed since the
    /// last look: the connection's chain must still be there and runnable, and a chain whose
    /// filters changed is checked again.
    fn refresh(&mut self) -> Result<(), Denied> {
        if let Some(denied) = &self.revoked {
            return Err(denied.clone());
        }
        if !self.policy.has_changed() {
            return Ok(());
        }
        self.settle()
    }

    /// Checks the connection against the configuration in force; a refusal stays.
    fn settle(&mut self) -> Result<(), Denied> {
        let checked = self.recheck();
        if let Err(denied) = &checked {
            self.revoked = Some(denied.clone());
        }
        checked
    }

    fn recheck(&mut self) -> Result<(), Denied> {
        self.policy.mark_seen();
        let snapshot = self.state.load();
        let gone = |what: &str| {
            info!(listener = %self.chain.listener, chain = %self.chain.chain, source = %self.source, destination = %self.destination, "{what}: closing the connection");
            Denied {
                policy: "-".to_owned(),
                reason: Refusal::PolicyChanged,
                connection: true,
            }
        };
        let Some(chain) = snapshot.chain(&self.chain.listener, &self.chain.chain) else {
            return Err(gone("the connection's filter chain is no longer in force"));
        };
        if chain.filter == Filter::Refuse {
            return Err(gone(
                "the connection's filter chain now refuses connections",
            ));
        }
        let same = chain.rbac.len() == self.filters.len()
            && chain
                .rbac
                .iter()
                .zip(&self.filters)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b);
        if !same {
            debug!(chain = %self.chain.chain, "the chain's policy changed: checking the connection again");
            self.filters = chain.rbac.clone();
            drop(snapshot);
            self.connection_filters()?;
        }
        Ok(())
    }

    /// Every filter, in order: the deciding policy of a refusal, or whether some filter
    /// could not decide without a Thrift method (`thrift` is none).
    fn check(&self, thrift: Option<(Option<&str>, &str)>) -> Result<bool, String> {
        let metrics = &self.metrics;
        let attrs = Attributes {
            source: self.source,
            destination: self.destination,
            principal: self.principal.as_deref(),
            server_name: self.server_name.as_deref(),
            thrift,
        };
        let mut undecided = false;
        for f in &self.filters {
            let d = f.decide(&attrs);
            if d.undecided {
                undecided = true;
                continue;
            }
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
                return Err(policy);
            }
        }
        Ok(undecided)
    }
}
