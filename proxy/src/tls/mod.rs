//! Workload identity and mutual TLS, as Istio's sidecars do it.
//!
//! - [`identity`]: SPIFFE identities;
//! - [`certs`]: a workload certificate, its key and roots, and what they say;
//! - [`store`]: the certificate in force, swapped atomically on renewal;
//! - [`source`]: where it comes from (Istio's CA, or files) and keeping it fresh;
//! - [`ca`]: Istio's `CreateCertificate`;
//! - [`verify`]: checking a peer's certificate (roots and SAN matchers);
//! - [`context`]: rustls clients and servers for the configuration's TLS contexts;
//! - [`failure`]: why a handshake failed, as a metric label;
//! - [`metrics`]: handshakes and the workload certificate's updates, counted.
pub mod ca;
pub mod certs;
pub mod context;
pub mod failure;
pub mod identity;
pub mod metrics;
pub mod source;
pub mod store;
pub mod verify;

pub use certs::{CertInfo, WorkloadCert};
pub use context::{ClientTls, ContextError, ServerTls, TlsContexts};
pub use identity::SpiffeId;
pub use store::CertStore;

/// A peer's identity: the SPIFFE URI (else the first URI or DNS SAN) of its certificate.
pub fn peer_identity(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Option<String> {
    let sans = certs::sans_of(certs?.first()?.as_ref());
    sans.iter()
        .find(|s| s.starts_with("spiffe://"))
        .or(sans.first())
        .cloned()
}
