//! Checking a peer's certificate as Envoy does: it chains to the roots (the mesh roots, or
//! roots of a file), and one of its URI or DNS SANs matches one of the context's matchers
//! (`match_subject_alt_names`). The host name is never checked (Istio's certificates carry
//! only a SPIFFE URI); for the server it is the SAN matchers that say who it must be.
use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::{certs, store::CertStore};
use crate::config::tls::StringMatch;

/// The roots a peer's certificate must chain to.
#[derive(Debug)]
pub enum TrustedRoots {
    /// The workload certificate's roots, as they are at each handshake.
    Mesh(Arc<CertStore>),
    Fixed(Arc<RootCertStore>),
    /// Any certificate (a context with no validation, as Envoy allows).
    Unverified,
}

/// What a peer's certificate must satisfy.
#[derive(Debug)]
pub struct PeerCheck {
    pub roots: TrustedRoots,
    pub subject_alt_names: Vec<StringMatch>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// A SAN that no matcher accepts (a rustls "other" error, told apart when counting).
#[derive(Debug, thiserror::Error)]
#[error("no subject alternative name of the peer's certificate is one the configuration expects")]
pub struct SanMismatch;

impl PeerCheck {
    pub fn new(roots: TrustedRoots, subject_alt_names: Vec<StringMatch>) -> Self {
        Self {
            roots,
            subject_alt_names,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let mesh;
        let roots = match &self.roots {
            TrustedRoots::Unverified => return Ok(()),
            TrustedRoots::Fixed(r) => &**r,
            TrustedRoots::Mesh(store) => {
                mesh = store.current().ok_or_else(|| {
                    Error::General("no mesh roots yet (no workload certificate)".into())
                })?;
                &*mesh.roots
            }
        };
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &roots.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        if self.subject_alt_names.is_empty() {
            return Ok(());
        }
        let sans = certs::sans_of(end_entity.as_ref());
        if sans
            .iter()
            .any(|san| self.subject_alt_names.iter().any(|m| m.matches(san)))
        {
            Ok(())
        } else {
            Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(SanMismatch)),
            )))
        }
    }
}

fn pki_error(e: webpki::Error) -> Error {
    use webpki::Error as E;
    Error::InvalidCertificate(match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

/// The client's check of the server (outbound).
#[derive(Debug)]
pub struct ServerVerifier(pub PeerCheck);

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.0
            .check(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.0.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.0.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

/// The server's check of the client (inbound).
#[derive(Debug)]
pub struct ClientVerifier {
    pub check: PeerCheck,
    pub mandatory: bool,
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check
            .check(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
            )
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.check.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.check.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.check.algorithms.supported_schemes()
    }
}
