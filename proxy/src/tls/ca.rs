//! A workload certificate from Istio's CA, as istio-agent and ztunnel get one: a fresh
//! ECDSA P-256 key, a CSR whose only SAN is the SPIFFE identity, and `CreateCertificate`
//! over the control plane channel with the service-account token and the cluster id.
use std::time::Duration;

use tern_proto::istio_ca::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use tern_xds_client::{ChannelConfig, ChannelError};

use super::{
    certs::{CertError, PemFiles, WorkloadCert},
    identity::SpiffeId,
};

/// Why no certificate came from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("make the key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("CreateCertificate: {0}")]
    Call(#[from] tonic::Status),
    #[error("the CA answered with {0} certificate(s); a chain has a leaf and a root")]
    ShortChain(usize),
    #[error("the cluster id {0:?} is not a valid header value")]
    ClusterId(String),
    #[error("the issued certificate: {0}")]
    Cert(#[from] CertError),
    #[error("the issued certificate is for {got:?}, not {want}")]
    WrongIdentity { want: String, got: Vec<String> },
}

/// How to ask the CA.
#[derive(Clone, Debug)]
pub struct CaClient {
    pub channel: ChannelConfig,
    pub identity: SpiffeId,
    /// Sent as the `ClusterID` header (istiod's multi-cluster routing of the request).
    pub cluster_id: String,
    pub ttl: Duration,
    /// PEM roots trusted besides the root the CA returns (the mesh root file).
    pub extra_roots: Option<String>,
}

impl CaClient {
    /// A new key, and a certificate for it.
    pub async fn issue(&self) -> Result<WorkloadCert, CaError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::Ia5String::try_from(
            self.identity.to_string(),
        )?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let connected = tern_xds_client::channel::open(&self.channel).await?;
        let mut client = IstioCertificateServiceClient::new(connected.channel);
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            subject_id: String::new(),
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        if let Some(bearer) = connected.bearer {
            request.metadata_mut().insert("authorization", bearer);
        }
        request.metadata_mut().insert(
            "clusterid",
            self.cluster_id
                .parse()
                .map_err(|_| CaError::ClusterId(self.cluster_id.clone()))?,
        );
        let chain = client
            .create_certificate(request)
            .await?
            .into_inner()
            .cert_chain;
        if chain.len() < 2 {
            return Err(CaError::ShortChain(chain.len()));
        }
        let mut roots = chain.last().cloned().unwrap_or_default();
        if let Some(extra) = &self.extra_roots {
            roots.push('\n');
            roots.push_str(extra);
        }
        let cert = WorkloadCert::from_pem(PemFiles {
            chain: chain.join("\n"),
            key: key.serialize_pem(),
            roots,
        })?;
        let want = self.identity.to_string();
        if !cert.info.sans.contains(&want) {
            return Err(CaError::WrongIdentity {
                want,
                got: cert.info.sans.clone(),
            });
        }
        Ok(cert)
    }
}
