//! SPIFFE identities as Istio writes them:
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
use std::fmt;

/// A workload's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a URI is not an Istio SPIFFE identity.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>")]
pub struct NotSpiffe {
    uri: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    pub fn parse(uri: &str) -> Result<Self, NotSpiffe> {
        let not = || NotSpiffe {
            uri: uri.chars().take(256).collect(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(not)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
            {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(not()),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_identities_round_trip_and_others_are_refused() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/foo/sa/bar").unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "foo", "bar"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/foo/sa/bar");
        for bad in [
            "https://cluster.local/ns/foo/sa/bar",
            "spiffe://cluster.local/ns/foo",
            "spiffe://cluster.local/ns//sa/bar",
            "spiffe://cluster.local/ns/foo/sa/bar/extra",
            "spiffe:///ns/foo/sa/bar",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
