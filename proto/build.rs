//! Generates the client and server of Istio's CA service (`istio.v1.auth`
//! `IstioCertificateService`) from the hand-written messages in `src/istio_ca.rs`, and the
//! clients of etcd's `KV` and `Watch` services from `src/etcd.rs`: no `protoc`, no `.proto`
//! file.
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
    // etcd's v3 API, as tern discovery reads a registry: `KV/Range` and the `Watch` stream.
    let range = tonic_build::manual::Method::builder()
        .name("range")
        .route_name("Range")
        .input_type("crate::etcd::RangeRequest")
        .output_type("crate::etcd::RangeResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let kv = tonic_build::manual::Service::builder()
        .name("KV")
        .package("etcdserverpb")
        .method(range)
        .build();
    let watch_method = tonic_build::manual::Method::builder()
        .name("watch")
        .route_name("Watch")
        .input_type("crate::etcd::WatchRequest")
        .output_type("crate::etcd::WatchResponse")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let watch = tonic_build::manual::Service::builder()
        .name("Watch")
        .package("etcdserverpb")
        .method(watch_method)
        .build();
    tonic_build::manual::Builder::new()
        .build_server(false)
        .compile(&[kv, watch]);
    tonic_build::manual::Builder::new().compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
