//! TLS as the configuration asks for it: towards endpoints (Envoy's `UpstreamTlsContext`,
//! chosen per endpoint by `transport_socket_matches`) and on inbound chains
//! (`DownstreamTlsContext`). Descriptions only; `crate::tls` builds the TLS stacks from them.
use std::{path::PathBuf, sync::Arc};

pub use super::matcher::StringMatch;

/// Where a certificate to present comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertSource {
    /// The workload certificate (Istio's SDS secret `default`).
    Workload,
    /// PEM files (a DestinationRule's `clientCertificate` / `privateKey`).
    Files { chain: PathBuf, key: PathBuf },
}

/// What a peer's certificate must chain to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Roots {
    /// The mesh roots (Istio's SDS secret `ROOTCA`).
    Mesh,
    /// A PEM file (`file-root:<path>`, a DestinationRule's `caCertificates`).
    File(PathBuf),
    /// No validation context: any certificate is accepted, as Envoy does.
    Unverified,
}

/// How a peer's certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Validation {
    pub roots: Roots,
    /// One of the certificate's URI or DNS SANs must match one of these (none: any).
    pub subject_alt_names: Vec<StringMatch>,
}

/// A TLS protocol version tern speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum TlsVersion {
    #[serde(rename = "TLSv1_2")]
    Tls12,
    #[serde(rename = "TLSv1_3")]
    Tls13,
}

/// Envoy's `tls_params`, as tern honours them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct TlsParams {
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
    /// TLS 1.2 cipher suites allowed, as IANA names (none listed: rustls' defaults). TLS 1.3
    /// suites are not configurable, as in Envoy.
    pub tls12_cipher_suites: Vec<String>,
    /// Key exchange groups allowed, as rustls names them (`X25519`, `secp256r1`, `secp384r1`;
    /// none listed: rustls' defaults).
    pub key_exchange_groups: Vec<String>,
}

impl Default for TlsParams {
    fn default() -> Self {
        Self {
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
            tls12_cipher_suites: Vec::new(),
            key_exchange_groups: Vec::new(),
        }
    }
}

/// TLS towards an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct UpstreamTls {
    /// The SNI sent (none: no SNI).
    pub sni: Option<String>,
    /// ALPN offered. Istio's `istio-peer-exchange` is never offered: it commits both sides
    /// to Istio's metadata-exchange preamble, which tern does not speak.
    pub alpn: Vec<String>,
    /// The certificate presented, if any.
    pub client_cert: Option<CertSource>,
    pub validation: Validation,
    pub params: TlsParams,
}

/// TLS terminated on an inbound chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DownstreamTls {
    /// ALPN the server selects from; `istio-peer-exchange` is never among them.
    pub alpn: Vec<String>,
    pub cert: CertSource,
    /// Ignored without trusted roots: no client certificate is asked for then.
    pub require_client_certificate: bool,
    /// No trusted roots: no client certificate is asked for, and the peer has no identity.
    pub validation: Validation,
    pub params: TlsParams,
}

/// Envoy's `transport_socket_matches` with the cluster's own `transport_socket`: an
/// endpoint gets the first match whose criteria its `envoy.transport_socket_match` metadata
/// has, else the default. `None` is plaintext.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct TransportSockets {
    pub matches: Vec<SocketMatch>,
    pub default: Option<Arc<UpstreamTls>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SocketMatch {
    pub name: String,
    /// Metadata keys and values an endpoint must have (none: every endpoint).
    pub criteria: Vec<(String, String)>,
    pub tls: Option<Arc<UpstreamTls>>,
}

impl TransportSockets {
    /// The TLS contexts endpoints can get, each once.
    pub fn contexts(&self) -> Vec<&Arc<UpstreamTls>> {
        let mut all: Vec<&Arc<UpstreamTls>> = Vec::new();
        for t in self
            .matches
            .iter()
            .filter_map(|m| m.tls.as_ref())
            .chain(&self.default)
        {
            if !all.iter().any(|a| Arc::ptr_eq(a, t)) {
                all.push(t);
            }
        }
        all
    }

    /// The TLS an endpoint with these `envoy.transport_socket_match` labels gets (`None`:
    /// plaintext).
    pub fn for_endpoint(&self, labels: &[(String, String)]) -> Option<&Arc<UpstreamTls>> {
        let has = |(k, v): &(String, String)| labels.iter().any(|(lk, lv)| lk == k && lv == v);
        match self.matches.iter().find(|m| m.criteria.iter().all(has)) {
            Some(m) => m.tls.as_ref(),
            None => self.default.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> Arc<UpstreamTls> {
        Arc::new(UpstreamTls {
            sni: None,
            alpn: vec!["istio".into()],
            client_cert: Some(CertSource::Workload),
            validation: Validation {
                roots: Roots::Mesh,
                subject_alt_names: vec![],
            },
            params: Default::default(),
        })
    }

    #[test]
    fn istio_auto_mtls_picks_tls_by_the_endpoints_tls_mode() {
        // As istiod writes it: tlsMode-istio, then tlsMode-disabled with an empty match.
        let sockets = TransportSockets {
            matches: vec![
                SocketMatch {
                    name: "tlsMode-istio".into(),
                    criteria: vec![("tlsMode".into(), "istio".into())],
                    tls: Some(tls()),
                },
                SocketMatch {
                    name: "tlsMode-disabled".into(),
                    criteria: vec![],
                    tls: None,
                },
            ],
            default: None,
        };
        let istio = [("tlsMode".to_owned(), "istio".to_owned())];
        let disabled = [("tlsMode".to_owned(), "disabled".to_owned())];
        assert!(sockets.for_endpoint(&istio).is_some());
        assert!(sockets.for_endpoint(&disabled).is_none());
        assert!(sockets.for_endpoint(&[]).is_none());
        assert_eq!(sockets.contexts().len(), 1);
        let always = TransportSockets {
            matches: vec![],
            default: Some(tls()),
        };
        assert!(always.for_endpoint(&[]).is_some());
    }
}
