//! Envoy's TLS transport sockets into tern's TLS descriptions: `UpstreamTlsContext` (and the
//! `transport_socket_matches` that choose it per endpoint), `DownstreamTlsContext`.
//!
//! Certificates and roots come from the secrets istiod names — SDS `default` (the workload
//! certificate) and `ROOTCA` (the mesh roots) — or from files (`file-cert:`/`file-root:`
//! names, or `filename` data sources). TLS 1.2 and 1.3 only, with rustls' cipher suites (a
//! subset of Istio's list). A check tern cannot make (certificate pins, CRLs) or a secret it
//! cannot get refuses the resource: a peer is never accepted unchecked because of it.
use std::{path::PathBuf, sync::Arc};

use tern_proto::{Any, Cluster as XdsCluster, core_types, decode, tls_types, type_url, wkt};

use super::Invalid;
use crate::config::tls::{
    CertSource, DownstreamTls, Roots, SocketMatch, TransportSockets, UpstreamTls, Validation,
};

/// The ALPN value that commits both ends to Istio's metadata-exchange preamble; tern never
/// offers or selects it.
const PEER_EXCHANGE: &str = "istio-peer-exchange";
/// What an Envoy peer offers alongside it, with no preamble.
const ISTIO: &str = "istio";
/// The metadata namespace `transport_socket_matches` look at.
pub const SOCKET_MATCH_METADATA: &str = "envoy.transport_socket_match";

/// A cluster's `transport_socket_matches` and `transport_socket`.
pub fn transport_sockets(c: &XdsCluster) -> Result<TransportSockets, Invalid> {
    let matches = c
        .transport_socket_matches
        .iter()
        .map(|m| {
            Ok(SocketMatch {
                name: m.name.clone(),
                criteria: m
                    .r#match
                    .as_ref()
                    .map(|s| string_fields(s).collect())
                    .unwrap_or_default(),
                tls: upstream_socket(m.transport_socket.as_ref())?,
            })
        })
        .collect::<Result<Vec<_>, Invalid>>()?;
    Ok(TransportSockets {
        matches,
        default: upstream_socket(c.transport_socket.as_ref())?,
    })
}

/// The string fields of a `Struct` (what socket matches compare).
pub fn string_fields(s: &wkt::Struct) -> impl Iterator<Item = (String, String)> + '_ {
    s.fields.iter().filter_map(|(k, v)| match &v.kind {
        Some(wkt::Kind::StringValue(v)) => Some((k.clone(), v.clone())),
        _ => None,
    })
}

fn socket_config(ts: Option<&core_types::TransportSocket>) -> Option<&Any> {
    match ts?.config_type.as_ref()? {
        core_types::transport_socket::ConfigType::TypedConfig(any) => Some(any),
    }
}

/// A transport socket towards endpoints: TLS, or raw buffer (`None`).
fn upstream_socket(
    ts: Option<&core_types::TransportSocket>,
) -> Result<Option<Arc<UpstreamTls>>, Invalid> {
    let Some(any) = socket_config(ts) else {
        return Ok(None);
    };
    match any.type_url.as_str() {
        type_url::UPSTREAM_TLS_CONTEXT => {
            let t: tls_types::UpstreamTlsContext = decode(any, type_url::UPSTREAM_TLS_CONTEXT)?;
            upstream(&t).map(|t| Some(Arc::new(t)))
        }
        type_url::RAW_BUFFER => Ok(None),
        other => Err(Invalid::TransportSocket(other.to_owned())),
    }
}

fn upstream(t: &tls_types::UpstreamTlsContext) -> Result<UpstreamTls, Invalid> {
    let common = t.common_tls_context.clone().unwrap_or_default();
    check_versions(&common)?;
    let client_cert = certificate(&common)?;
    Ok(UpstreamTls {
        sni: Some(t.sni.clone()).filter(|s| !s.is_empty()),
        alpn: without_peer_exchange(&common.alpn_protocols),
        client_cert,
        validation: validation(&common)?,
    })
}

/// A chain's transport socket: TLS terminated there, or none.
pub fn downstream_socket(
    ts: Option<&core_types::TransportSocket>,
) -> Result<Option<Arc<DownstreamTls>>, Invalid> {
    let Some(any) = socket_config(ts) else {
        return Ok(None);
    };
    match any.type_url.as_str() {
        type_url::DOWNSTREAM_TLS_CONTEXT => {
            let t: tls_types::DownstreamTlsContext = decode(any, type_url::DOWNSTREAM_TLS_CONTEXT)?;
            let common = t.common_tls_context.clone().unwrap_or_default();
            check_versions(&common)?;
            let cert = certificate(&common)?.ok_or(Invalid::NoServerCertificate)?;
            let mut alpn = without_peer_exchange(&common.alpn_protocols);
            // An Envoy client offers `istio-peer-exchange, istio`: selecting `istio` keeps
            // the handshake (rustls refuses one with no protocol in common) and carries no
            // preamble.
            if common.alpn_protocols.iter().any(|p| p == PEER_EXCHANGE)
                && !alpn.iter().any(|p| p == ISTIO)
            {
                alpn.insert(0, ISTIO.to_owned());
            }
            Ok(Some(Arc::new(DownstreamTls {
                alpn,
                cert,
                require_client_certificate: t.require_client_certificate.is_some_and(|b| b.value),
                validation: validation(&common)?,
            })))
        }
        type_url::RAW_BUFFER => Ok(None),
        other => Err(Invalid::TransportSocket(other.to_owned())),
    }
}

fn without_peer_exchange(alpn: &[String]) -> Vec<String> {
    alpn.iter()
        .filter(|p| *p != PEER_EXCHANGE)
        .cloned()
        .collect()
}

/// rustls speaks TLS 1.2 and 1.3: a context that allows neither is refused.
fn check_versions(common: &tls_types::CommonTlsContext) -> Result<(), Invalid> {
    let max = common
        .tls_params
        .as_ref()
        .map_or(0, |p| p.tls_maximum_protocol_version);
    // TLS_AUTO is 0; TLSv1_0 and TLSv1_1 are 1 and 2.
    if max == 1 || max == 2 {
        return Err(Invalid::TlsVersion);
    }
    Ok(())
}

/// The certificate a context presents.
fn certificate(common: &tls_types::CommonTlsContext) -> Result<Option<CertSource>, Invalid> {
    if let Some(sds) = common.tls_certificate_sds_secret_configs.first() {
        return cert_secret(&sds.name).map(Some);
    }
    let Some(c) = common.tls_certificates.first() else {
        return Ok(None);
    };
    Ok(Some(CertSource::Files {
        chain: filename(c.certificate_chain.as_ref(), "certificate_chain")?,
        key: filename(c.private_key.as_ref(), "private_key")?,
    }))
}

/// istio-agent's secret names: `default`, and `file-cert:<chain>~<key>`.
fn cert_secret(name: &str) -> Result<CertSource, Invalid> {
    if name == "default" {
        return Ok(CertSource::Workload);
    }
    if let Some((chain, key)) = name
        .strip_prefix("file-cert:")
        .and_then(|f| f.split_once('~'))
    {
        return Ok(CertSource::Files {
            chain: chain.into(),
            key: key.into(),
        });
    }
    Err(Invalid::Secret(name.to_owned()))
}

/// istio-agent's root names: `ROOTCA`, and `file-root:<path>`.
fn roots_secret(name: &str) -> Result<Roots, Invalid> {
    if name == "ROOTCA" {
        return Ok(Roots::Mesh);
    }
    if let Some(path) = name.strip_prefix("file-root:") {
        return Ok(Roots::File(path.into()));
    }
    Err(Invalid::Secret(name.to_owned()))
}

fn filename(d: Option<&core_types::DataSource>, what: &'static str) -> Result<PathBuf, Invalid> {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(core_types::data_source::Specifier::Filename(f)) => Ok(f.into()),
        _ => Err(Invalid::DataSource(what)),
    }
}

/// How the peer's certificate is checked.
fn validation(common: &tls_types::CommonTlsContext) -> Result<Validation, Invalid> {
    use tls_types::common_tls_context::ValidationContextType as V;
    let (context, sds) = match &common.validation_context_type {
        None => (None, None),
        Some(V::ValidationContext(v)) => (Some(v), None),
        Some(V::ValidationContextSdsSecretConfig(s)) => (None, Some(s)),
        Some(V::CombinedValidationContext(c)) => (
            c.default_validation_context.as_ref(),
            c.validation_context_sds_secret_config.as_ref(),
        ),
        Some(_) => return Err(Invalid::ValidationContext("a certificate provider")),
    };
    let mut roots = match sds {
        Some(s) => roots_secret(&s.name)?,
        None => Roots::Unverified,
    };
    let mut subject_alt_names = Vec::new();
    if let Some(v) = context {
        if !v.verify_certificate_spki.is_empty() || !v.verify_certificate_hash.is_empty() {
            return Err(Invalid::ValidationContext("certificate pins"));
        }
        if v.crl.is_some() {
            return Err(Invalid::ValidationContext("a CRL"));
        }
        if let Some(ca) = &v.trusted_ca {
            roots = Roots::File(filename(Some(ca), "trusted_ca")?);
        }
        // Deprecated in Envoy, and still what istiod writes.
        #[allow(deprecated)]
        for m in &v.match_subject_alt_names {
            subject_alt_names.push(super::string_match(m)?);
        }
        for m in &v.match_typed_subject_alt_names {
            // URI and DNS names are matched; other kinds would be skipped, so refused.
            if !matches!(m.san_type, 2 | 3) {
                return Err(Invalid::ValidationContext(
                    "a SAN matcher other than DNS or URI",
                ));
            }
            subject_alt_names.push(super::string_match(&m.matcher.clone().unwrap_or_default())?);
        }
    }
    if roots == Roots::Unverified && !subject_alt_names.is_empty() {
        // SANs of a certificate nobody vouches for prove nothing.
        return Err(Invalid::ValidationContext(
            "SAN matchers without trusted roots",
        ));
    }
    Ok(Validation {
        roots,
        subject_alt_names,
    })
}
