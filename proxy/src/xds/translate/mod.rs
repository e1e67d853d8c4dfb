//! Envoy resources (as istiod or any Envoy control plane sends them) into tern's model, one
//! resource at a time, so one bad resource is refused by name while the others apply.
//!
//! - [`listener`]: a `Listener` into a listener tern matches original destinations against,
//!   the inbound listener, the passthrough mode, or a listener set aside;
//! - [`cluster`]: a `Cluster` into a cluster without its endpoints, and where they come from;
//! - [`endpoints`]: a `ClusterLoadAssignment` into endpoints;
//! - [`tls`]: TLS transport sockets (towards endpoints, and on inbound chains);
//! - [`rbac`]: network RBAC filters (TCP `AuthorizationPolicy`), Thrift methods included.
//!
//! What tern knowingly does not run is set aside with a [`SetAsideReason`] (shown in
//! `/config_dump`, counted in `tern_xds_set_aside`); a chain that needs a filter tern cannot
//! run (ext_authz, jwt_authn, Wasm, an unknown filter) is set aside and refuses its
//! connections. What it cannot read safely (an RBAC rule it cannot decide, a TLS context it
//! cannot honour) is an error, so the resource is NACKed and never runs without its policy.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use tern_proto::{Any, DecodeError};

pub use crate::config::SetAsideReason;

pub mod cluster;
pub mod endpoints;
pub mod listener;
pub mod rbac;
pub mod tls;

/// Why a resource cannot be used; `context` says which part of it.
#[derive(Debug, thiserror::Error)]
#[error("{context}{}{kind}", if context.is_empty() { "" } else { ": " })]
pub struct TranslateError {
    pub context: String,
    pub kind: Invalid,
}

/// What is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("no socket address")]
    NoSocketAddress,
    #[error("{0:?} is not an IP address")]
    NotAnIp(String),
    #[error("port {0} out of range")]
    PortOutOfRange(u64),
    #[error("no port number")]
    NoPort,
    #[error("prefix {prefix}/{len}: length out of range")]
    PrefixOutOfRange { prefix: String, len: u32 },
    #[error("{0} cannot be enforced by tern; refused rather than skipped")]
    Unenforceable(&'static str),
    #[error("tcp_proxy without a cluster")]
    TcpProxyWithoutCluster,
    #[error("thrift_proxy without routes")]
    ThriftWithoutRoutes,
    #[error("the Twitter protocol is not supported")]
    TwitterProtocol,
    #[error("a route without a cluster")]
    RouteWithoutCluster,
    #[error("header {0} uses a match tern does not support (only exact)")]
    HeaderMatch(String),
    #[error("weighted clusters need a positive weight")]
    NoWeight,
    #[error("ring hash: minimum_ring_size ({min}) > maximum_ring_size ({max})")]
    RingSize { min: u64, max: u64 },
    #[error("maglev table size {0} is not a prime number")]
    MaglevTableSize(u64),
    #[error("tern's metadata: {0}")]
    TernMetadata(String),
    #[error("transport socket {0} is not supported (only TLS and raw buffer)")]
    TransportSocket(String),
    #[error("TLS versions tern cannot speak (only 1.2 and 1.3), or none at all")]
    TlsVersion,
    #[error("TLS 1.2 only, and none of its cipher suites ({0}) is one tern has")]
    CipherSuites(String),
    #[error("none of the ECDH curves {0} is one tern has (X25519, P-256, P-384)")]
    EcdhCurves(String),
    #[error("tls_params.signature_algorithms is not supported: tern cannot restrict them")]
    SignatureAlgorithms,
    #[error("a TLS server context without a certificate")]
    NoServerCertificate,
    #[error(
        "secret {0:?} is not available to tern (SDS default, ROOTCA, file-cert: and file-root: are)"
    )]
    Secret(String),
    #[error("{0}: only a filename data source is supported")]
    DataSource(&'static str),
    #[error(
        "certificate validation with {0} cannot be enforced by tern; refused rather than skipped"
    )]
    ValidationContext(&'static str),
    #[error("{0} is not supported")]
    Matcher(String),
    #[error("RBAC {0} cannot be enforced by tern on a connection; refused rather than skipped")]
    RbacRule(&'static str),
}

impl Invalid {
    /// This error, in `context`.
    pub fn at(self, context: impl Into<String>) -> TranslateError {
        TranslateError {
            context: context.into(),
            kind: self,
        }
    }
}

impl From<DecodeError> for TranslateError {
    fn from(e: DecodeError) -> Self {
        Invalid::Decode(e).at("")
    }
}

pub(crate) fn typed_config(f: &tern_proto::listener_types::Filter) -> Option<&Any> {
    match &f.config_type {
        Some(tern_proto::listener_types::filter::ConfigType::TypedConfig(any)) => Some(any),
        _ => None,
    }
}

/// A socket address; the port is range-checked, not cast.
pub(crate) fn socket_addr(a: Option<&tern_proto::Address>) -> Result<SocketAddr, Invalid> {
    use tern_proto::core_types::{address, socket_address::PortSpecifier};
    let Some(address::Address::SocketAddress(s)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(Invalid::NoSocketAddress);
    };
    let ip: IpAddr = s
        .address
        .parse()
        .map_err(|_| Invalid::NotAnIp(s.address.clone()))?;
    let port = match s.port_specifier {
        Some(PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| Invalid::PortOutOfRange(u64::from(p)))?
        }
        _ => return Err(Invalid::NoPort),
    };
    Ok(SocketAddr::new(ip, port))
}

/// CIDR ranges; a prefix length out of range is refused (264 must not become 8).
pub(crate) fn cidrs(ranges: &[tern_proto::core_types::CidrRange]) -> Result<Vec<IpNet>, Invalid> {
    ranges
        .iter()
        .map(|r| {
            let ip: IpAddr = r
                .address_prefix
                .parse()
                .map_err(|_| Invalid::NotAnIp(r.address_prefix.clone()))?;
            let len = r
                .prefix_len
                .map_or(if ip.is_ipv4() { 32 } else { 128 }, |l| l.value);
            u8::try_from(len)
                .ok()
                .and_then(|l| IpNet::new(ip, l).ok())
                .ok_or_else(|| Invalid::PrefixOutOfRange {
                    prefix: r.address_prefix.clone(),
                    len,
                })
        })
        .collect()
}

/// Envoy's `StringMatcher`; a case-insensitive match (which tern does not make) is refused.
pub(crate) fn string_match(
    m: &tern_proto::matcher_types::StringMatcher,
) -> Result<crate::config::matcher::StringMatch, Invalid> {
    use crate::config::matcher::{Regex, StringMatch};
    use tern_proto::matcher_types::string_matcher::MatchPattern;
    if m.ignore_case {
        return Err(Invalid::Matcher("a case-insensitive string match".into()));
    }
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => StringMatch::Exact(v.clone()),
        Some(MatchPattern::Prefix(v)) => StringMatch::Prefix(v.clone()),
        Some(MatchPattern::Suffix(v)) => StringMatch::Suffix(v.clone()),
        Some(MatchPattern::Contains(v)) => StringMatch::Contains(v.clone()),
        Some(MatchPattern::SafeRegex(r)) => StringMatch::Regex(
            Regex::new(&r.regex)
                .map_err(|e| Invalid::Matcher(format!("regex {:?}: {e}", r.regex)))?,
        ),
        _ => return Err(Invalid::Matcher("a custom or empty string match".into())),
    })
}

/// A protobuf duration; negative parts count as zero.
pub(crate) fn duration(d: &tern_proto::wkt::Duration) -> Duration {
    Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))
        .saturating_add(Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0)))
}

/// A count from the control plane (a threshold, a size).
pub(crate) fn count(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use tern_proto::{core_types, wkt};

    use super::*;

    #[test]
    fn numbers_out_of_range_are_refused_not_wrapped() {
        let range = |len: u32| core_types::CidrRange {
            address_prefix: "10.0.0.0".into(),
            prefix_len: Some(wkt::UInt32Value { value: len }),
        };
        assert!(cidrs(&[range(8)]).is_ok());
        let err = cidrs(&[range(264)]).unwrap_err().to_string();
        assert!(err.contains("10.0.0.0/264"), "{err}");
        assert!(cidrs(&[range(33)]).is_err());
        let huge = wkt::Duration {
            seconds: i64::MAX,
            nanos: i32::MAX,
        };
        assert!(duration(&huge) >= Duration::from_secs(i64::MAX as u64));
        let negative = wkt::Duration {
            seconds: -5,
            nanos: -1,
        };
        assert_eq!(duration(&negative), Duration::ZERO);
    }
}
