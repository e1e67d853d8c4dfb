//! Istio's CA (`IstioCertificateService`): certificates for the identity a caller's token
//! stands for.
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::say;

/// Istio's CA: signs a CSR when the caller's token is valid (the interceptor checks it)
/// and the CSR asks for the identity the token stands for, as istiod does.
pub(crate) struct Ca {
    pub(crate) ca: tern_tests::pki::TestCa,
    pub(crate) identity: String,
}

/// The identity the caller's token stands for, when the token file names one.
#[derive(Clone)]
pub(crate) struct TokenIdentity(pub(crate) String);

#[tonic::async_trait]
impl tern_proto::istio_ca::istio_certificate_service_server::IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        request: Request<tern_proto::istio_ca::IstioCertificateRequest>,
    ) -> Result<Response<tern_proto::istio_ca::IstioCertificateResponse>, Status> {
        let cluster = request
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let identity = request
            .extensions()
            .get::<TokenIdentity>()
            .map_or_else(|| self.identity.clone(), |t| t.0.clone());
        let r = request.into_inner();
        let ttl = Duration::from_secs(u64::try_from(r.validity_duration).unwrap_or(0).max(1));
        let (cert, sans) = self
            .ca
            .sign_csr(&r.csr, ttl)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        if sans != [identity.clone()] {
            say(format!("DENY {sans:?}"));
            return Err(Status::permission_denied(format!(
                "the token is for {identity}, not {sans:?}"
            )));
        }
        say(format!(
            "ISSUE {identity} ttl={}s cluster={cluster}",
            ttl.as_secs()
        ));
        Ok(Response::new(
            tern_proto::istio_ca::IstioCertificateResponse {
                cert_chain: vec![cert, self.ca.pem()],
            },
        ))
    }
}
