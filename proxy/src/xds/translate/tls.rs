//! Envoy's TLS transport sockets into tern's TLS descriptions: `UpstreamTlsContext` (and the
//! `transport_socket_matches` that choose it per endpoint), `DownstreamTlsContext`.
//!
//! Certificates and roots come from the secrets istiod names — SDS `default` (the workload
//! certificate) and `ROOTCA` (the mesh roots) — or from files (`file-cert:`/`file-root:`
//! names, or `filename` data sources). `tls_params` are honoured within what rustls
//! speaks: TLS 1.2 and 1.3, and the ECDHE AEAD suites among those listed. A check tern cannot make (certificate pins, CRLs) or a secret it
//! cannot get refuses the resource: a peer is never accepted unchecked because of it.
use std::{path::PathBuf, sync::Arc};

use tern_proto::{Any, Cluster as XdsCluster, core_types, decode, tls_types, type_url, wkt};

use super::Invalid;
use crate::config::tls::{
    CertSource, DownstreamTls, Roots, SocketMatch, TlsParams, TlsVersion, TransportSockets,
    UpstreamTls, Validation,
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
    let params = params(&common)?;
    let client_cert = certificate(&common)?;
    Ok(UpstreamTls {
        sni: Some(t.sni.clone()).filter(|s| !s.is_empty()),
        alpn: without_peer_exchange(&common.alpn_protocols),
        client_cert,
        validation: validation(&common)?,
        params,
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
            let params = params(&common)?;
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
                params,
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

/// `tls_params` as tern can honour them: versions within TLS 1.2–1.3 (a minimum below 1.2
/// is met by 1.2; a context that allows neither, or no version at all, is refused) and the
/// TLS 1.2 cipher suites rustls has among those listed. A context whose list leaves TLS 1.2
/// no suite keeps TLS 1.3 only, or is refused when it allows nothing else: never a suite
/// the configuration did not name. `ecdh_curves` limit the key exchange to the curves tern has
/// among them (none: refused); `signature_algorithms`, which tern cannot limit, refuse the
/// context.
fn params(common: &tls_types::CommonTlsContext) -> Result<TlsParams, Invalid> {
    let Some(p) = common.tls_params.as_ref() else {
        return Ok(TlsParams::default());
    };
    // TLS_AUTO 0, TLSv1_0 1, TLSv1_1 2, TLSv1_2 3, TLSv1_3 4.
    let min_version = match p.tls_minimum_protocol_version {
        0..=3 => TlsVersion::Tls12,
        4 => TlsVersion::Tls13,
        _ => return Err(Invalid::TlsVersion),
    };
    let max_version = match p.tls_maximum_protocol_version {
        0 | 4 => TlsVersion::Tls13,
        3 => TlsVersion::Tls12,
        _ => return Err(Invalid::TlsVersion),
    };
    if min_version > max_version {
        return Err(Invalid::TlsVersion);
    }
    if !p.signature_algorithms.is_empty() {
        return Err(Invalid::SignatureAlgorithms);
    }
    let mut params = TlsParams {
        min_version,
        max_version,
        tls12_cipher_suites: Vec::new(),
        key_exchange_groups: Vec::new(),
    };
    if !p.ecdh_curves.is_empty() {
        // Envoy's (BoringSSL's) names, and rustls'.
        for curve in &p.ecdh_curves {
            let group = match curve.as_str() {
                "X25519" => "X25519",
                "P-256" | "prime256v1" => "secp256r1",
                "P-384" | "secp384r1" => "secp384r1",
                _ => continue,
            };
            if !params.key_exchange_groups.iter().any(|g| g == group) {
                params.key_exchange_groups.push(group.to_owned());
            }
        }
        if params.key_exchange_groups.is_empty() {
            return Err(Invalid::EcdhCurves(p.ecdh_curves.join(":")));
        }
    }
    if p.cipher_suites.is_empty() || min_version == TlsVersion::Tls13 {
        return Ok(params);
    }
    // OpenSSL names, and BoringSSL's `[a|b]` equal-preference groups.
    for name in p
        .cipher_suites
        .iter()
        .flat_map(|c| c.trim_matches(|c| c == '[' || c == ']').split('|'))
    {
        if let Some(iana) = tls12_suite(name)
            && !params.tls12_cipher_suites.iter().any(|s| s == iana)
        {
            params.tls12_cipher_suites.push(iana.to_owned());
        }
    }
    if params.tls12_cipher_suites.is_empty() {
        if max_version == TlsVersion::Tls12 {
            return Err(Invalid::CipherSuites(p.cipher_suites.join(":")));
        }
        params.min_version = TlsVersion::Tls13;
    }
    Ok(params)
}

/// The IANA name of a TLS 1.2 suite rustls has, by its OpenSSL name.
fn tls12_suite(openssl: &str) -> Option<&'static str> {
    Some(match openssl {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384" => "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305" => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256" => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384" => "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305" => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        _ => return None,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with(min: i32, max: i32, ciphers: &[&str]) -> Result<TlsParams, Invalid> {
        params(&tls_types::CommonTlsContext {
            tls_params: Some(tls_types::TlsParameters {
                tls_minimum_protocol_version: min,
                tls_maximum_protocol_version: max,
                cipher_suites: ciphers.iter().map(|c| (*c).to_owned()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn tls_params_are_honoured_or_refused() {
        // meshMTLS.minProtocolVersion: TLSV1_3.
        let p = with(4, 0, &[]).unwrap();
        assert_eq!(
            (p.min_version, p.max_version),
            (TlsVersion::Tls13, TlsVersion::Tls13)
        );
        // A minimum below 1.2 is met by 1.2; a maximum below it cannot be.
        assert_eq!(with(1, 0, &[]).unwrap().min_version, TlsVersion::Tls12);
        assert!(with(0, 2, &[]).is_err());
        assert!(with(4, 3, &[]).is_err(), "minimum above maximum");
        // Istio's default list: the ECDHE suites rustls has; the RSA key exchange ones
        // (which rustls lacks) are never added.
        let p = with(
            0,
            0,
            &[
                "ECDHE-ECDSA-AES256-GCM-SHA384",
                "ECDHE-RSA-AES256-GCM-SHA384",
                "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]",
                "AES256-GCM-SHA384",
            ],
        )
        .unwrap();
        assert_eq!(
            p.tls12_cipher_suites,
            [
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            ]
        );
        // Nothing tern has for TLS 1.2: TLS 1.3 only, or refused when 1.2 is all.
        assert_eq!(
            with(0, 0, &["AES128-SHA"]).unwrap().min_version,
            TlsVersion::Tls13
        );
        assert!(with(0, 3, &["AES128-SHA"]).is_err());
        // ECDH curves: those tern has, in order; none of them, or signature algorithms: refused.
        let curves = |c: &[&str], sig: &[&str]| {
            params(&tls_types::CommonTlsContext {
                tls_params: Some(tls_types::TlsParameters {
                    ecdh_curves: c.iter().map(|c| (*c).to_owned()).collect(),
                    signature_algorithms: sig.iter().map(|c| (*c).to_owned()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        assert_eq!(
            curves(&["P-256", "X448", "X25519"], &[])
                .unwrap()
                .key_exchange_groups,
            ["secp256r1", "X25519"]
        );
        assert!(matches!(
            curves(&["X448"], &[]),
            Err(Invalid::EcdhCurves(_))
        ));
        assert!(matches!(
            curves(&[], &["ecdsa_secp256r1_sha256"]),
            Err(Invalid::SignatureAlgorithms)
        ));
    }
}
