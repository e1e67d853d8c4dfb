//! Envoy's RBAC filters into tern's [`Rbac`](crate::config::rbac::Rbac): the network filter
//! (istiod's TCP `AuthorizationPolicy`) as it is, and the HTTP filter of a chain tern relays
//! as TCP with the semantics istiod itself uses when it builds a TCP policy from an
//! `AuthorizationPolicy` with HTTP fields (`pilot/pkg/security/authz/builder`): an ALLOW
//! policy that needs an HTTP attribute (header, path, method, JWT claim: anything tern
//! cannot see on a connection) never matches; in a DENY or LOG policy such a condition,
//! negated or not, is dropped, so it matches on its L4 parts alone (stricter, never looser).
//!
//! Principals: `authenticated`, istiod's `filter_state` `io.istio.peer_principal` (the same
//! peer identity), source, direct remote and remote IP, and/or/not, any. Permissions:
//! destination IP and port (or port range), SNI, and/or/not, any; and tern's Thrift method
//! matcher (`tern.thrift_method`, below). Anything else — headers, paths, metadata, CEL
//! conditions, the matcher API — cannot be decided on a connection: the filter is refused
//! (the listener is NACKed), never run without it.
//!
//! A Thrift method permission is a `matcher` extension named `tern.thrift_method` whose
//! `typed_config` is a `google.protobuf.Struct`: `{method: "<name>"}` (a trailing `*`
//! makes it a prefix), and optionally `{service: "<multiplexed service>"}`.
use tern_proto::{HttpRbac, NetworkRbac, core_types, decode, rbac_types, type_url, wkt};

use super::{Invalid, cidrs, string_match};
use crate::config::{
    matcher::StringMatch,
    rbac::{Action, Permission, Policy, Principal, Rbac, Rules},
};

/// The name of tern's Thrift method permission.
pub const THRIFT_METHOD: &str = "tern.thrift_method";
const PEER_PRINCIPAL: &str = "io.istio.peer_principal";
const STRUCT: &str = "type.googleapis.com/google.protobuf.Struct";
/// Nesting deeper than this is refused (a hostile configuration cannot exhaust the stack).
const MAX_DEPTH: usize = 32;

/// A network RBAC filter.
pub fn translate(any: &tern_proto::Any) -> Result<Rbac, Invalid> {
    let r: NetworkRbac = decode(any, type_url::NETWORK_RBAC)?;
    let matchers = r.matcher.is_some() || r.shadow_matcher.is_some();
    filter(
        Layer::Network,
        &r.stat_prefix,
        matchers,
        r.rules.as_ref(),
        r.shadow_rules.as_ref(),
    )
}

/// An HTTP RBAC filter, decided on the connection of a chain relayed as TCP (see the module
/// doc).
pub fn translate_http(any: &tern_proto::Any) -> Result<Rbac, Invalid> {
    let r: HttpRbac = decode(any, type_url::HTTP_RBAC)?;
    let matchers = r.matcher.is_some() || r.shadow_matcher.is_some();
    let prefix = Some(r.rules_stat_prefix.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("http.");
    filter(
        Layer::Http,
        prefix,
        matchers,
        r.rules.as_ref(),
        r.shadow_rules.as_ref(),
    )
}

/// Either filter's rules and shadow rules; the matcher API (`matchers`) is refused.
fn filter(
    layer: Layer,
    stat_prefix: &str,
    matchers: bool,
    enforced: Option<&rbac_types::Rbac>,
    shadow: Option<&rbac_types::Rbac>,
) -> Result<Rbac, Invalid> {
    if matchers {
        return Err(Invalid::RbacRule("the matcher API"));
    }
    Ok(Rbac {
        stat_prefix: stat_prefix.to_owned(),
        rules: enforced.map(|r| rules(r, layer)).transpose()?,
        shadow_rules: shadow.map(|r| rules(r, layer)).transpose()?,
    })
}

/// Which filter the rules come from: an HTTP filter's rules may name HTTP attributes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layer {
    Network,
    Http,
}

/// What an HTTP attribute becomes in a policy decided on a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HttpLeaves {
    /// It cannot occur (a network filter): refused.
    Refused,
    /// The condition is dropped: it holds (DENY and LOG policies).
    Hold,
}

fn rules(r: &rbac_types::Rbac, layer: Layer) -> Result<Rules, Invalid> {
    let action = match r.action {
        0 => Action::Allow,
        1 => Action::Deny,
        2 => Action::Log,
        _ => return Err(Invalid::RbacRule("an unknown action")),
    };
    let mut policies = Vec::with_capacity(r.policies.len());
    for (name, p) in &r.policies {
        if p.condition.is_some() || p.checked_condition.is_some() {
            return Err(Invalid::RbacRule("a CEL condition"));
        }
        let http = layer == Layer::Http
            && (p.permissions.iter().any(|x| permission_needs_http(x, 0))
                || p.principals.iter().any(|x| principal_needs_http(x, 0)));
        let leaves = match (http, action) {
            (false, _) => HttpLeaves::Refused,
            // istiod skips such an ALLOW rule whole: it never matches.
            (true, Action::Allow) => {
                tracing::debug!(policy = %name, "an ALLOW policy that needs HTTP attributes never matches on a connection");
                continue;
            }
            (true, Action::Deny | Action::Log) => HttpLeaves::Hold,
        };
        policies.push(Policy {
            name: name.clone(),
            permissions: p
                .permissions
                .iter()
                .map(|x| permission(x, 0, leaves))
                .collect::<Result<_, _>>()?,
            principals: p
                .principals
                .iter()
                .map(|x| principal(x, 0, leaves))
                .collect::<Result<_, _>>()?,
        });
    }
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Rules { action, policies })
}

/// Whether a permission names an HTTP attribute (a header, a path, request metadata, a path
/// template matcher), anywhere in it.
#[allow(deprecated)]
fn permission_needs_http(p: &rbac_types::Permission, depth: usize) -> bool {
    use rbac_types::permission::Rule;
    if depth > MAX_DEPTH {
        return false;
    }
    let any = |s: &rbac_types::permission::Set| {
        s.rules.iter().any(|r| permission_needs_http(r, depth + 1))
    };
    match &p.rule {
        Some(Rule::AndRules(s) | Rule::OrRules(s)) => any(s),
        Some(Rule::NotRule(r)) => permission_needs_http(r, depth + 1),
        Some(Rule::Header(_) | Rule::UrlPath(_) | Rule::Metadata(_)) => true,
        Some(Rule::Matcher(ext)) => ext.name != THRIFT_METHOD,
        _ => false,
    }
}

/// Whether a principal names an HTTP attribute (a header, a path, request metadata such as
/// JWT claims), anywhere in it.
#[allow(deprecated)]
fn principal_needs_http(p: &rbac_types::Principal, depth: usize) -> bool {
    use rbac_types::principal::Identifier;
    if depth > MAX_DEPTH {
        return false;
    }
    let any =
        |s: &rbac_types::principal::Set| s.ids.iter().any(|r| principal_needs_http(r, depth + 1));
    match &p.identifier {
        Some(Identifier::AndIds(s) | Identifier::OrIds(s)) => any(s),
        Some(Identifier::NotId(r)) => principal_needs_http(r, depth + 1),
        Some(
            Identifier::Header(_)
            | Identifier::UrlPath(_)
            | Identifier::Metadata(_)
            | Identifier::SourcedMetadata(_),
        ) => true,
        _ => false,
    }
}

fn cidr(r: &core_types::CidrRange) -> Result<ipnet::IpNet, Invalid> {
    cidrs(std::slice::from_ref(r))?
        .pop()
        .ok_or_else(|| Invalid::NotAnIp(r.address_prefix.clone()))
}

#[allow(deprecated)]
fn permission(
    p: &rbac_types::Permission,
    depth: usize,
    http: HttpLeaves,
) -> Result<Permission, Invalid> {
    use rbac_types::permission::Rule;
    if depth > MAX_DEPTH {
        return Err(Invalid::RbacRule("nesting deeper than 32"));
    }
    // A dropped HTTP condition holds, negated or not (istiod drops `not*` fields too).
    if http == HttpLeaves::Hold && permission_needs_http(p, depth) {
        match &p.rule {
            Some(Rule::AndRules(_) | Rule::OrRules(_)) => {}
            _ => return Ok(Permission::Any),
        }
    }
    let all = |s: &rbac_types::permission::Set| {
        s.rules
            .iter()
            .map(|r| permission(r, depth + 1, http))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &p.rule {
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::AndRules(s)) => Permission::And(all(s)?),
        Some(Rule::OrRules(s)) => Permission::Or(all(s)?),
        Some(Rule::NotRule(r)) => Permission::Not(Box::new(permission(r, depth + 1, http)?)),
        Some(Rule::DestinationIp(r)) => Permission::DestinationIp(cidr(r)?),
        Some(Rule::DestinationPort(port)) => Permission::DestinationPort(
            u16::try_from(*port).map_err(|_| Invalid::PortOutOfRange((*port).into()))?,
        ),
        Some(Rule::DestinationPortRange(r)) => Permission::DestinationPortRange {
            start: u32::try_from(r.start).unwrap_or(0),
            end: u32::try_from(r.end).unwrap_or(0),
        },
        Some(Rule::RequestedServerName(m)) => Permission::RequestedServerName(string_match(m)?),
        Some(Rule::Matcher(ext)) if ext.name == THRIFT_METHOD => thrift_method(ext)?,
        Some(Rule::Header(_)) => return Err(Invalid::RbacRule("a header permission")),
        Some(Rule::UrlPath(_)) => return Err(Invalid::RbacRule("a URL path permission")),
        Some(Rule::Metadata(_)) => return Err(Invalid::RbacRule("a metadata permission")),
        Some(Rule::Matcher(_)) => return Err(Invalid::RbacRule("a matcher extension")),
        _ => return Err(Invalid::RbacRule("an empty or unknown permission")),
    })
}

#[allow(deprecated)]
fn principal(
    p: &rbac_types::Principal,
    depth: usize,
    http: HttpLeaves,
) -> Result<Principal, Invalid> {
    use rbac_types::principal::Identifier;
    use tern_proto::matcher_types::filter_state_matcher::Matcher;
    if depth > MAX_DEPTH {
        return Err(Invalid::RbacRule("nesting deeper than 32"));
    }
    if http == HttpLeaves::Hold && principal_needs_http(p, depth) {
        match &p.identifier {
            Some(Identifier::AndIds(_) | Identifier::OrIds(_)) => {}
            _ => return Ok(Principal::Any),
        }
    }
    let all = |s: &rbac_types::principal::Set| {
        s.ids
            .iter()
            .map(|r| principal(r, depth + 1, http))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match &p.identifier {
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::AndIds(s)) => Principal::And(all(s)?),
        Some(Identifier::OrIds(s)) => Principal::Or(all(s)?),
        Some(Identifier::NotId(r)) => Principal::Not(Box::new(principal(r, depth + 1, http)?)),
        Some(Identifier::Authenticated(a)) => {
            Principal::Authenticated(a.principal_name.as_ref().map(string_match).transpose()?)
        }
        Some(Identifier::FilterState(f)) if f.key == PEER_PRINCIPAL => match &f.matcher {
            Some(Matcher::StringMatch(m)) => Principal::Authenticated(Some(string_match(m)?)),
            _ => {
                return Err(Invalid::RbacRule(
                    "a filter state match that is not a string",
                ));
            }
        },
        Some(Identifier::SourceIp(r)) => Principal::SourceIp(cidr(r)?),
        Some(Identifier::DirectRemoteIp(r)) => Principal::DirectRemoteIp(cidr(r)?),
        Some(Identifier::RemoteIp(r)) => Principal::RemoteIp(cidr(r)?),
        Some(Identifier::Header(_)) => return Err(Invalid::RbacRule("a header principal")),
        Some(Identifier::UrlPath(_)) => return Err(Invalid::RbacRule("a URL path principal")),
        Some(Identifier::Metadata(_) | Identifier::SourcedMetadata(_)) => {
            return Err(Invalid::RbacRule("a metadata principal"));
        }
        Some(Identifier::FilterState(_)) => {
            return Err(Invalid::RbacRule(
                "a filter state principal other than the peer's",
            ));
        }
        _ => return Err(Invalid::RbacRule("an empty or unknown principal")),
    })
}

/// `{method: "get*", service: "Calc"}` as a Struct.
fn thrift_method(ext: &core_types::TypedExtensionConfig) -> Result<Permission, Invalid> {
    let bad = || Invalid::RbacRule("a tern.thrift_method without a method string");
    let any = ext.typed_config.as_ref().ok_or_else(bad)?;
    let s: wkt::Struct = decode(any, STRUCT)?;
    let text = |k: &str| match s.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(wkt::Kind::StringValue(v)) => Some(v.as_str()),
        _ => None,
    };
    let glob = |v: &str| match v.strip_suffix('*') {
        Some(prefix) => StringMatch::Prefix(prefix.to_owned()),
        None => StringMatch::Exact(v.to_owned()),
    };
    Ok(Permission::ThriftMethod {
        service: text("service").map(glob),
        method: glob(text("method").ok_or_else(bad)?),
    })
}
