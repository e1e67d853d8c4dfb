//! rustls clients and servers built from the configuration's TLS descriptions. They read
//! the workload certificate and mesh roots from the [`CertStore`] at every handshake, so a
//! renewal needs no rebuild.
use std::{io, net::IpAddr, path::Path, sync::Arc};

use rustls::{
    ClientConfig, ServerConfig, SignatureScheme,
    client::ResolvesClientCert,
    pki_types::{PrivateKeyDer, ServerName, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpStream;

use super::{
    certs::{self, CertError},
    store::CertStore,
    verify::{ClientVerifier, PeerCheck, ServerVerifier, TrustedRoots},
};
use crate::config::tls::{
    CertSource, DownstreamTls, Roots, TlsParams, TlsVersion, UpstreamTls, Validation,
};

/// Why a TLS context could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("SNI {0:?} is not a valid name")]
    Sni(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error(
        "a client certificate is required but no validation context says whom to trust: refused rather than accepting any certificate"
    )]
    ClientCertificateUnverifiable,
}

/// Builds TLS clients and servers that use the workload certificate of `store`.
#[derive(Debug, Clone)]
pub struct TlsContexts {
    pub store: Arc<CertStore>,
}

/// A TLS client for one `UpstreamTlsContext`.
#[derive(Debug)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// `None`: no SNI (the endpoint's IP names it, which sends none).
    sni: Option<ServerName<'static>>,
}

/// A TLS server for one `DownstreamTlsContext`: one configuration with its ALPN list, and
/// one without for clients that offer none of it (rustls would refuse those; Envoy carries
/// on without ALPN).
#[derive(Debug)]
pub struct ServerTls {
    with_alpn: Arc<ServerConfig>,
    without_alpn: Arc<ServerConfig>,
    alpn: Vec<String>,
}

impl TlsContexts {
    pub fn new(store: Arc<CertStore>) -> Self {
        Self { store }
    }

    /// rustls' ring provider with only the TLS 1.2 suites and key exchange groups `params` allow.
    fn provider(params: &TlsParams) -> Arc<rustls::crypto::CryptoProvider> {
        let mut provider = rustls::crypto::ring::default_provider();
        if !params.tls12_cipher_suites.is_empty() {
            provider.cipher_suites.retain(|s| match s {
                rustls::SupportedCipherSuite::Tls12(_) => params
                    .tls12_cipher_suites
                    .iter()
                    .any(|name| Some(name.as_str()) == s.suite().as_str()),
                rustls::SupportedCipherSuite::Tls13(_) => true,
            });
        }
        if !params.key_exchange_groups.is_empty() {
            provider.kx_groups.retain(|g| {
                params
                    .key_exchange_groups
                    .iter()
                    .any(|name| Some(name.as_str()) == g.name().as_str())
            });
        }
        Arc::new(provider)
    }

    /// The protocol versions `params` allow.
    fn versions(params: &TlsParams) -> Vec<&'static rustls::SupportedProtocolVersion> {
        [
            (TlsVersion::Tls12, &rustls::version::TLS12),
            (TlsVersion::Tls13, &rustls::version::TLS13),
        ]
        .into_iter()
        .filter(|(v, _)| (params.min_version..=params.max_version).contains(v))
        .map(|(_, v)| v)
        .collect()
    }

    fn check(&self, v: &Validation) -> Result<PeerCheck, ContextError> {
        let roots = match &v.roots {
            Roots::Mesh => TrustedRoots::Mesh(self.store.clone()),
            Roots::File(path) => {
                TrustedRoots::Fixed(Arc::new(certs::root_store(&read(path)?, "trusted CA")?))
            }
            Roots::Unverified => TrustedRoots::Unverified,
        };
        Ok(PeerCheck::new(roots, v.subject_alt_names.clone()))
    }

    fn cert(&self, source: &CertSource) -> Result<CertResolver, ContextError> {
        Ok(match source {
            CertSource::Workload => CertResolver::Workload(self.store.clone()),
            CertSource::Files { chain, key } => {
                let chain = certs::certificates(&read(chain)?, "certificate chain")?;
                let key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|source| {
                    CertError::Pem {
                        what: "private key",
                        source,
                    }
                })?;
                let signing =
                    rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertError::Key)?;
                CertResolver::Fixed(Arc::new(CertifiedKey::new(chain, signing)))
            }
        })
    }

    pub fn client(&self, t: &UpstreamTls) -> Result<ClientTls, ContextError> {
        let verifier = Arc::new(ServerVerifier(self.check(&t.validation)?));
        let builder = ClientConfig::builder_with_provider(Self::provider(&t.params))
            .with_protocol_versions(&Self::versions(&t.params))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &t.client_cert {
            Some(source) => builder.with_client_cert_resolver(Arc::new(self.cert(source)?)),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = t.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let sni = t
            .sni
            .as_ref()
            .map(|s| {
                ServerName::try_from(s.as_str())
                    .map(|n| n.to_owned())
                    .map_err(|_| ContextError::Sni(s.clone()))
            })
            .transpose()?;
        Ok(ClientTls {
            config: Arc::new(config),
            sni,
        })
    }

    /// A TLS server. Without trusted roots no client certificate is asked for, so no peer
    /// gets an identity nobody vouched for; one that requires a certificate is refused.
    pub fn server(&self, t: &DownstreamTls) -> Result<ServerTls, ContextError> {
        let builder = ServerConfig::builder_with_provider(Self::provider(&t.params))
            .with_protocol_versions(&Self::versions(&t.params))?;
        let builder = match (&t.validation.roots, t.require_client_certificate) {
            (Roots::Unverified, true) => return Err(ContextError::ClientCertificateUnverifiable),
            (Roots::Unverified, false) => builder.with_no_client_auth(),
            _ => builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                check: self.check(&t.validation)?,
                mandatory: t.require_client_certificate,
            })),
        };
        let config = builder.with_cert_resolver(Arc::new(self.cert(&t.cert)?));
        let mut with_alpn = config.clone();
        with_alpn.alpn_protocols = t.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(ServerTls {
            with_alpn: Arc::new(with_alpn),
            without_alpn: Arc::new(config),
            alpn: t.alpn.clone(),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ContextError> {
    std::fs::read(path).map_err(|source| ContextError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl ClientTls {
    /// The TLS handshake over a connected socket to `ip`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        ip: IpAddr,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self.sni.clone().unwrap_or(ServerName::IpAddress(ip.into()));
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }
}

impl ServerTls {
    /// The TLS handshake of an accepted socket whose ClientHello offered `offered` ALPN.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        offered: &[String],
    ) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        let config = if self.alpn.iter().any(|p| offered.contains(p)) {
            &self.with_alpn
        } else {
            &self.without_alpn
        };
        tokio_rustls::TlsAcceptor::from(config.clone())
            .accept(tcp)
            .await
    }
}

/// The certificate presented: the workload's as it is now, or fixed files.
#[derive(Debug)]
enum CertResolver {
    Workload(Arc<CertStore>),
    Fixed(Arc<CertifiedKey>),
}

impl CertResolver {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        match self {
            CertResolver::Workload(store) => store.current().map(|c| c.certified.clone()),
            CertResolver::Fixed(c) => Some(c.clone()),
        }
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_keeps_only_what_the_params_allow() {
        let params = TlsParams {
            tls12_cipher_suites: vec!["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()],
            key_exchange_groups: vec!["secp256r1".into(), "X25519".into()],
            ..TlsParams::default()
        };
        let p = TlsContexts::provider(&params);
        let groups: Vec<_> = p
            .kx_groups
            .iter()
            .filter_map(|g| g.name().as_str())
            .collect();
        assert_eq!(groups, ["X25519", "secp256r1"], "rustls' order, P-384 gone");
        let tls12: Vec<_> = p
            .cipher_suites
            .iter()
            .filter(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_)))
            .filter_map(|s| s.suite().as_str())
            .collect();
        assert_eq!(tls12, ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]);
        let all = TlsContexts::provider(&TlsParams::default());
        assert_eq!(all.kx_groups.len(), 3);
    }
}
