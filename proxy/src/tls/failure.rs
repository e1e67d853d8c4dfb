//! Why a TLS handshake failed, as a short metric label.
use std::io;

use rustls::{CertificateError, Error};

use super::verify::SanMismatch;

/// The label for a failed handshake (`tern_tls_handshakes_total{result}`).
pub fn reason(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            CertificateError::Other(o) if o.0.downcast_ref::<SanMismatch>().is_some() => {
                "san_mismatch"
            }
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_peer_certificate",
        Error::AlertReceived(_) => "alert_received",
        Error::NoApplicationProtocol => "no_alpn",
        Error::PeerIncompatible(_) => "incompatible",
        Error::General(_) => "no_certificate",
        _ => "protocol",
    }
}
