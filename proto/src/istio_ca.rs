//! Istio's CA API (istio/api `security/v1alpha1/ca.proto`): `CreateCertificate` signs a
//! workload's CSR. Served by istiod on 15012, next to xDS.

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Unused by istiod (the identity comes from the caller's token).
    #[prost(string, tag = "2")]
    pub subject_id: String,
    /// Requested validity, in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Impersonation by node agents (newer istiod); tern leaves it out.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<crate::wkt::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`: PEM certificates, the leaf first and the root
/// last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

include!(concat!(
    env!("OUT_DIR"),
    "/istio.v1.auth.IstioCertificateService.rs"
));
