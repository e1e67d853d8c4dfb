//! Authorization as Envoy's RBAC network filter has it (what istiod writes for a TCP
//! `AuthorizationPolicy`), with one addition: Thrift methods, which Envoy cannot see.
//!
//! A policy matches when one of its permissions and one of its principals match. ALLOW
//! lets a connection through only if a policy matches; DENY refuses it if one does; LOG
//! lets everything through. Shadow rules are evaluated and counted, never enforced.
//!
//! A permission on Thrift methods (`tern.thrift_method`) is decided per request. On a
//! connection, before its calls, such a permission is unknown (three-valued logic): where the
//! outcome depends on it, the connection is authorized call by call, and a connection that is
//! not Thrift cannot be decided and is refused.
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
    /// Without a Thrift method (a connection, before its calls), whether the outcome
    /// depends on the method: then `allowed` is false, and only calls can be decided.
    pub undecided: bool,
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

/// Kleene's three-valued `and` over `items` (`None`: unknown).
fn all3<T>(items: &[T], f: impl Fn(&T) -> Option<bool>) -> Option<bool> {
    let mut unknown = false;
    for x in items {
        match f(x) {
            Some(false) => return Some(false),
            None => unknown = true,
            Some(true) => {}
        }
    }
    (!unknown).then_some(true)
}

/// Kleene's three-valued `or` over `items` (`None`: unknown).
fn any3<T>(items: &[T], f: impl Fn(&T) -> Option<bool>) -> Option<bool> {
    let mut unknown = false;
    for x in items {
        match f(x) {
            Some(true) => return Some(true),
            None => unknown = true,
            Some(false) => {}
        }
    }
    (!unknown).then_some(false)
}

impl Permission {
    /// Whether the permission matches; `None` when it depends on a Thrift method and there
    /// is none (a connection before its calls).
    fn eval(&self, a: &Attributes) -> Option<bool> {
        Some(match self {
            Permission::Any => true,
            Permission::And(all) => return all3(all, |p| p.eval(a)),
            Permission::Or(any) => return any3(any, |p| p.eval(a)),
            Permission::Not(p) => return p.eval(a).map(|m| !m),
            Permission::DestinationIp(net) => net.contains(&unmap(a.destination.ip())),
            Permission::DestinationPort(port) => a.destination.port() == *port,
            Permission::DestinationPortRange { start, end } => {
                (*start..*end).contains(&u32::from(a.destination.port()))
            }
            Permission::RequestedServerName(m) => m.matches(a.server_name.unwrap_or("")),
            Permission::ThriftMethod { service, method } => {
                let (s, m) = a.thrift?;
                method.matches(m)
                    && service
                        .as_ref()
                        .is_none_or(|want| s.is_some_and(|s| want.matches(s)))
            }
        })
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

impl Policy {
    fn eval(&self, a: &Attributes) -> Option<bool> {
        let principal = self.principals.iter().any(|x| x.matches(a));
        if !principal {
            return Some(false);
        }
        any3(&self.permissions, |x| x.eval(a))
    }
}

impl Rules {
    /// Whether these rules allow `a`, the policy that matched, and whether, without a
    /// Thrift method, the outcome depends on it (then not allowed).
    fn decide(&self, a: &Attributes) -> (bool, Option<&Policy>, bool) {
        let mut undecided = false;
        let mut matched = None;
        for p in &self.policies {
            match p.eval(a) {
                Some(true) => {
                    matched = Some(p);
                    break;
                }
                None => undecided = true,
                Some(false) => {}
            }
        }
        match self.action {
            Action::Allow if matched.is_some() => (true, matched, false),
            Action::Allow => (false, None, undecided),
            Action::Deny if matched.is_some() => (false, matched, false),
            Action::Deny => (!undecided, None, undecided),
            Action::Log => (true, matched, false),
        }
    }
}

impl Rbac {
    pub fn decide(&self, a: &Attributes) -> Decision {
        let (allowed, policy, undecided) = match &self.rules {
            Some(r) => {
                let (allowed, p, undecided) = r.decide(a);
                (allowed, p.map(|p| p.name.clone()), undecided)
            }
            // No rules: the filter enforces nothing.
            None => (true, None, false),
        };
        Decision {
            allowed,
            undecided,
            policy,
            shadow_allowed: self.shadow_rules.as_ref().map(|r| r.decide(a).0),
        }
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
    fn without_a_method_only_what_depends_on_it_is_undecided() {
        let deny_echo = policy(
            "deny-echo",
            vec![Permission::And(vec![
                Permission::DestinationPort(9090),
                Permission::ThriftMethod {
                    service: None,
                    method: StringMatch::Exact("echo".into()),
                },
            ])],
            vec![Principal::Any],
        );
        let deny_admin = policy(
            "deny-admin",
            vec![Permission::DestinationPort(8080)],
            vec![Principal::Any],
        );
        let deny = rbac(Action::Deny, vec![deny_admin, deny_echo]);
        // Another port: the method rule cannot match, the port rule decides.
        let d = deny.decide(&attrs(None, 8080));
        assert!(!d.allowed && !d.undecided);
        assert_eq!(d.policy.as_deref(), Some("deny-admin"));
        let d = deny.decide(&attrs(None, 7070));
        assert!(d.allowed && !d.undecided);
        // The method rule's port: only a call decides.
        let d = deny.decide(&attrs(None, 9090));
        assert!(!d.allowed && d.undecided);
        let mut call = attrs(None, 9090);
        call.thrift = Some((None, "echo"));
        assert!(!deny.decide(&call).allowed);
        call.thrift = Some((None, "whoami"));
        assert!(deny.decide(&call).allowed);
        // ALLOW: a rule that needs no method allows without one; one that does, undecided.
        let allow_reads = policy(
            "reads",
            vec![Permission::ThriftMethod {
                service: None,
                method: StringMatch::Prefix("get".into()),
            }],
            vec![Principal::Any],
        );
        let allow = rbac(Action::Allow, vec![allow_reads.clone()]);
        assert!(allow.decide(&attrs(None, 9090)).undecided);
        let allow_port = policy(
            "port",
            vec![Permission::DestinationPort(9090)],
            vec![Principal::Any],
        );
        let allow = rbac(Action::Allow, vec![allow_reads, allow_port]);
        let d = allow.decide(&attrs(None, 9090));
        assert!(d.allowed && !d.undecided);
        // `not method`: still unknown without one.
        let not_echo = policy(
            "not-echo",
            vec![Permission::Not(Box::new(Permission::ThriftMethod {
                service: None,
                method: StringMatch::Exact("echo".into()),
            }))],
            vec![Principal::Any],
        );
        assert!(
            rbac(Action::Deny, vec![not_echo])
                .decide(&attrs(None, 1))
                .undecided
        );
    }

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
        assert!(allow.decide(&attrs(None, 9090)).undecided);
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
