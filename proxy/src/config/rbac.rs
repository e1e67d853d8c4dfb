//! Authorization as Envoy's RBAC network filter has it (what istiod writes for a TCP
//! `AuthorizationPolicy`), with one addition: Thrift methods, which Envoy cannot see.
//!
//! A policy matches when one of its permissions and one of its principals match. ALLOW
//! lets a connection through only if a policy matches; DENY refuses it if one does; LOG
//! lets everything through. Shadow rules are evaluated and counted, never enforced.
//!
//! A permission on Thrift methods (`tern.thrift_method`) is decided per request: chains
//! whose rules name methods are checked for every Thrift call, and a connection that turns
//! out not to be Thrift is checked once, with no method (such a permission then does not
//! match).
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::matcher::StringMatch;

/// One RBAC filter of a chain.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Rbac {
    /// Its `stat_prefix` (Envoy counts under it).
    pub stat_prefix: String,
    pub rules: Option<Rules>,
    pub shadow_rules: Option<Rules>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Rules {
    pub action: Action,
    /// By name, in name order (Envoy's map, made deterministic).
    pub policies: Vec<Policy>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
    Log,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Policy {
    pub name: String,
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

/// What is being accessed.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    DestinationIp(IpNet),
    DestinationPort(u16),
    /// `[start, end)`, as Envoy's `Int32Range`.
    DestinationPortRange {
        start: u32,
        end: u32,
    },
    /// The TLS SNI.
    RequestedServerName(StringMatch),
    /// A Thrift call: its method name (without the multiplexed service prefix), and the
    /// service when one is given.
    ThriftMethod {
        service: Option<StringMatch>,
        method: StringMatch,
    },
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A peer authenticated by mTLS, whose identity (SPIFFE URI) matches; `None`: any.
    Authenticated(Option<StringMatch>),
    /// The connection's source address (tern has no PROXY protocol: all three are it).
    SourceIp(IpNet),
    DirectRemoteIp(IpNet),
    RemoteIp(IpNet),
}

/// What a decision is made on.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// The peer's identity from mTLS.
    pub principal: Option<&'a str>,
    pub server_name: Option<&'a str>,
    /// A Thrift call's service (multiplexed, else none) and method.
    pub thrift: Option<(Option<&'a str>, &'a str)>,
}

/// The outcome of one filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided (matched), if any.
    pub policy: Option<String>,
    /// What the shadow rules would have decided.
    pub shadow_allowed: Option<bool>,
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Permission {
    fn matches(&self, a: &Attributes) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(all) => all.iter().all(|p| p.matches(a)),
            Permission::Or(any) => any.iter().any(|p| p.matches(a)),
            Permission::Not(p) => !p.matches(a),
            Permission::DestinationIp(net) => net.contains(&unmap(a.destination.ip())),
            Permission::DestinationPort(port) => a.destination.port() == *port,
            Permission::DestinationPortRange { start, end } => {
                (*start..*end).contains(&u32::from(a.destination.port()))
            }
            Permission::RequestedServerName(m) => m.matches(a.server_name.unwrap_or("")),
            Permission::ThriftMethod { service, method } => match a.thrift {
                Some((s, m)) => {
                    method.matches(m)
                        && service
                            .as_ref()
                            .is_none_or(|want| s.is_some_and(|s| want.matches(s)))
                }
                None => false,
            },
        }
    }

    fn names_thrift_methods(&self) -> bool {
        match self {
            Permission::And(p) | Permission::Or(p) => p.iter().any(Self::names_thrift_methods),
            Permission::Not(p) => p.names_thrift_methods(),
            Permission::ThriftMethod { .. } => true,
            _ => false,
        }
    }
}

impl Principal {
    fn matches(&self, a: &Attributes) -> bool {
        let source = unmap(a.source.ip());
        match self {
            Principal::Any => true,
            Principal::And(all) => all.iter().all(|p| p.matches(a)),
            Principal::Or(any) => any.iter().any(|p| p.matches(a)),
            Principal::Not(p) => !p.matches(a),
            Principal::Authenticated(m) => match (a.principal, m) {
                (Some(_), None) => true,
                (Some(id), Some(m)) => m.matches(id),
                (None, _) => false,
            },
            Principal::SourceIp(net)
            | Principal::DirectRemoteIp(net)
            | Principal::RemoteIp(net) => net.contains(&source),
        }
    }
}

impl Rules {
    /// The first policy (by name) that matches.
    fn matched(&self, a: &Attributes) -> Option<&Policy> {
        self.policies.iter().find(|p| {
            p.permissions.iter().any(|x| x.matches(a)) && p.principals.iter().any(|x| x.matches(a))
        })
    }

    /// Whether these rules allow `a`, and the policy that matched.
    fn decide(&self, a: &Attributes) -> (bool, Option<&Policy>) {
        let matched = self.matched(a);
        let allowed = match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        };
        (allowed, matched)
    }

    fn names_thrift_methods(&self) -> bool {
        self.policies
            .iter()
            .flat_map(|p| &p.permissions)
            .any(Permission::names_thrift_methods)
    }
}

impl Rbac {
    pub fn decide(&self, a: &Attributes) -> Decision {
        let (allowed, policy) = match &self.rules {
            Some(r) => {
                let (allowed, p) = r.decide(a);
                (allowed, p.map(|p| p.name.clone()))
            }
            // No rules: the filter enforces nothing.
            None => (true, None),
        };
        Decision {
            allowed,
            policy,
            shadow_allowed: self.shadow_rules.as_ref().map(|r| r.decide(a).0),
        }
    }

    /// Whether a rule names Thrift methods (then it is decided per request on Thrift
    /// connections).
    pub fn names_thrift_methods(&self) -> bool {
        self.rules
            .iter()
            .chain(&self.shadow_rules)
            .any(Rules::names_thrift_methods)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs<'a>(principal: Option<&'a str>, port: u16) -> Attributes<'a> {
        Attributes {
            source: "10.66.1.2:40000".parse().unwrap(),
            destination: SocketAddr::from(([10, 66, 1, 1], port)),
            principal,
            server_name: None,
            thrift: None,
        }
    }

    fn policy(name: &str, permissions: Vec<Permission>, principals: Vec<Principal>) -> Policy {
        Policy {
            name: name.into(),
            permissions,
            principals,
        }
    }

    fn rbac(action: Action, policies: Vec<Policy>) -> Rbac {
        Rbac {
            stat_prefix: "tcp.".into(),
            rules: Some(Rules { action, policies }),
            shadow_rules: None,
        }
    }

    const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";

    #[test]
    fn allow_deny_and_log_as_envoy_decides() {
        let by_principal = policy(
            "ns[default]-policy[allow-frontend]-rule[0]",
            vec![Permission::DestinationPort(8080)],
            vec![Principal::Authenticated(Some(StringMatch::Exact(
                FRONTEND.into(),
            )))],
        );
        let allow = rbac(Action::Allow, vec![by_principal.clone()]);
        assert!(allow.decide(&attrs(Some(FRONTEND), 8080)).allowed);
        assert!(
            !allow
                .decide(&attrs(Some("spiffe://cluster.local/ns/x/sa/y"), 8080))
                .allowed
        );
        assert!(
            !allow.decide(&attrs(None, 8080)).allowed,
            "plaintext is nobody"
        );
        assert!(
            !allow.decide(&attrs(Some(FRONTEND), 9090)).allowed,
            "another port"
        );
        // An empty ALLOW (istiod's `spec: {}`, or HTTP-only rules on a TCP port) denies all.
        assert!(
            !rbac(Action::Allow, vec![])
                .decide(&attrs(Some(FRONTEND), 8080))
                .allowed
        );
        let deny = rbac(Action::Deny, vec![by_principal]);
        let d = deny.decide(&attrs(Some(FRONTEND), 8080));
        assert!(!d.allowed);
        assert_eq!(
            d.policy.as_deref(),
            Some("ns[default]-policy[allow-frontend]-rule[0]")
        );
        assert!(deny.decide(&attrs(Some(FRONTEND), 9090)).allowed);
        assert!(rbac(Action::Log, vec![]).decide(&attrs(None, 1)).allowed);
    }

    #[test]
    fn combinators_and_addresses() {
        let p = policy(
            "p",
            vec![Permission::And(vec![
                Permission::DestinationIp("10.66.1.0/24".parse().unwrap()),
                Permission::Not(Box::new(Permission::DestinationPortRange {
                    start: 9000,
                    end: 9100,
                })),
            ])],
            vec![Principal::Or(vec![
                Principal::SourceIp("10.0.0.0/8".parse().unwrap()),
                Principal::Authenticated(None),
            ])],
        );
        let allow = rbac(Action::Allow, vec![p]);
        assert!(allow.decide(&attrs(None, 8080)).allowed);
        assert!(!allow.decide(&attrs(None, 9000)).allowed);
        assert!(
            allow.decide(&attrs(None, 9100)).allowed,
            "the range's end is excluded"
        );
    }

    #[test]
    fn thrift_methods_are_decided_per_call() {
        let p = policy(
            "reads",
            vec![Permission::ThriftMethod {
                service: None,
                method: StringMatch::Prefix("get".into()),
            }],
            vec![Principal::Any],
        );
        let allow = rbac(Action::Allow, vec![p]);
        assert!(allow.names_thrift_methods());
        let call = |m| Attributes {
            thrift: Some((None, m)),
            ..attrs(None, 9090)
        };
        assert!(allow.decide(&call("getUser")).allowed);
        assert!(!allow.decide(&call("deleteUser")).allowed);
        assert!(
            !allow.decide(&attrs(None, 9090)).allowed,
            "not a Thrift call"
        );
    }

    #[test]
    fn shadow_rules_are_reported_not_enforced() {
        let r = Rbac {
            stat_prefix: String::new(),
            rules: None,
            shadow_rules: Some(Rules {
                action: Action::Allow,
                policies: vec![],
            }),
        };
        let d = r.decide(&attrs(None, 1));
        assert!(d.allowed);
        assert_eq!(d.shadow_allowed, Some(false));
    }
}
