//! A workload certificate as tern holds it: the chain it presents, its key, the roots it
//! trusts, and what it says (subject, SANs, validity) for `/config_dump` and metrics.
use std::sync::Arc;

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

/// Why certificates could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what}: no PEM certificate")]
    NoCertificate { what: &'static str },
    #[error("{what}: {source}")]
    Pem {
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the private key: {0}")]
    Key(rustls::Error),
    #[error("the certificate does not parse: {0}")]
    Parse(String),
    #[error("a root certificate is not usable as a trust anchor: {0}")]
    Root(rustls::Error),
    #[error("the key does not belong to the certificate: {0}")]
    KeyMismatch(rustls::Error),
}

/// What a certificate says, for `/config_dump` and the expiry gauge.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    pub subject: String,
    /// URI and DNS subject alternative names.
    pub sans: Vec<String>,
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// A certificate chain, its key, and the roots peers' certificates must chain to.
#[derive(Debug)]
pub struct WorkloadCert {
    pub certified: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub info: CertInfo,
    /// The chain and key as PEM, for `OUTPUT_CERTS` (key.pem is written only there).
    pub pem: PemFiles,
}

/// PEM texts of the three files Istio writes (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
#[derive(Clone, Debug, Default)]
pub struct PemFiles {
    pub chain: String,
    pub key: String,
    pub roots: String,
}

impl WorkloadCert {
    /// From PEM: the chain (leaf first), its key, and the roots (mesh root, or several).
    pub fn from_pem(pem: PemFiles) -> Result<Self, CertError> {
        let certified = certified_key(&pem.chain, &pem.key)?;
        let roots_der = certificates(pem.roots.as_bytes(), "root certificates")?;
        let leaf = certified.cert.first().ok_or(CertError::NoCertificate {
            what: "certificate chain",
        })?;
        let info = describe(leaf)?;
        let mut roots = RootCertStore::empty();
        for root in roots_der {
            roots.add(root).map_err(CertError::Root)?;
        }
        Ok(Self {
            certified: Arc::new(certified),
            roots: Arc::new(roots),
            info,
            pem,
        })
    }

    /// Seconds until the certificate expires (negative once it has).
    pub fn expires_in(&self) -> i64 {
        self.info.not_after - unix_now()
    }
}

/// A chain (leaf first) and its private key, both PEM, checked to belong together.
pub fn certified_key(chain: &str, key: &str) -> Result<CertifiedKey, CertError> {
    let chain = certificates(chain.as_bytes(), "certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|source| CertError::Pem {
        what: "private key",
        source,
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(CertError::Key)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(CertError::KeyMismatch)?;
    Ok(certified)
}

/// Every certificate in a PEM text; none is an error.
pub fn certificates(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate { what });
    }
    Ok(certs)
}

/// A root store from PEM roots.
pub fn root_store(pem: &[u8], what: &'static str) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for root in certificates(pem, what)? {
        roots.add(root).map_err(CertError::Root)?;
    }
    Ok(roots)
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The subject, SANs, serial and validity of a DER certificate.
pub fn describe(der: &CertificateDer<'_>) -> Result<CertInfo, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        sans: subject_alt_names(&cert),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// URI and DNS subject alternative names of a DER certificate (none if it does not parse:
/// it then matches no SAN matcher).
pub fn sans_of(der: &[u8]) -> Vec<String> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| subject_alt_names(&cert))
        .unwrap_or_default()
}

fn subject_alt_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}
