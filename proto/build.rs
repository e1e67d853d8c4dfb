//! Generates the client and server of Istio's CA service (`istio.v1.auth`
//! `IstioCertificateService`) from the hand-written messages in `src/istio_ca.rs`: no
//! `protoc`, no `.proto` file.
fn main() {
    let create = tonic_build::manual::Method::builder()
        .name("create_certificate")
        .route_name("CreateCertificate")
        .input_type("crate::istio_ca::IstioCertificateRequest")
        .output_type("crate::istio_ca::IstioCertificateResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("IstioCertificateService")
        .package("istio.v1.auth")
        .method(create)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
