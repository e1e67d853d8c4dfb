//! A test CA standing in for istiod's: it signs workload CSRs (the control plane's
//! `CreateCertificate`) and issues certificates to test peers. Its files live in a
//! temporary directory removed on drop.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::unique;

/// The CA: its certificate and key, and the directory of the files it wrote.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
}

/// PEM files of an issued certificate.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    pub fn cert_str(&self) -> &str {
        self.cert.to_str().expect("UTF-8 path")
    }
    pub fn key_str(&self) -> &str {
        self.key.to_str().expect("UTF-8 path")
    }
}

impl TestCa {
    /// A new self-signed root, written as `ca.pem` and `ca-key.pem`.
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("pki"));
        fs::create_dir_all(&dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "cluster.local");
        dn.push(DnType::CommonName, "tern test root CA");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        fs::write(dir.join("ca.pem"), cert.pem())?;
        fs::write(dir.join("ca-key.pem"), key.serialize_pem())?;
        Ok(Self { cert, key, dir })
    }

    /// The CA whose files `new` wrote (for the control plane process); it signs CSRs
    /// ([`TestCa::sign_csr`]) but writes no files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let key = KeyPair::from_pem(&fs::read_to_string(key)?)?;
        let params = CertificateParams::from_ca_cert_pem(&fs::read_to_string(cert)?)?;
        // Re-signed with the same key and subject: what issuing needs.
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            dir: PathBuf::new(),
        })
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    pub fn ca_str(&self) -> String {
        self.cert_path().to_str().expect("UTF-8 path").to_owned()
    }

    /// A certificate with these SANs (`spiffe://…` URIs, IP addresses, else DNS names), valid for `ttl`,
    /// for server and client use, written as `<name>.pem` and `<name>-key.pem`.
    pub fn issue(&self, name: &str, sans: &[&str], ttl: Duration) -> Result<Issued> {
        anyhow::ensure!(
            !self.dir.as_os_str().is_empty(),
            "a loaded CA only signs CSRs; issue() writes files and needs TestCa::new"
        );
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_>>()?;
        workload(&mut params, ttl);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let issued = Issued {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        fs::write(&issued.cert, cert.pem())?;
        fs::write(&issued.key, key.serialize_pem())?;
        Ok(issued)
    }

    /// Signs a CSR for `ttl` (the control plane's CA); the SANs are the CSR's.
    pub fn sign_csr(&self, csr: &str, ttl: Duration) -> Result<(String, Vec<String>)> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr).context("parse the CSR")?;
        workload(&mut csr.params, ttl);
        let sans = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_owned(),
                SanType::DnsName(d) => d.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        let cert = csr.signed_by(&self.cert, &self.key)?;
        Ok((cert.pem(), sans))
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn san(s: &str) -> Result<SanType> {
    Ok(if s.contains("://") {
        SanType::URI(s.try_into()?)
    } else if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        SanType::IpAddress(ip)
    } else {
        SanType::DnsName(s.try_into()?)
    })
}

/// What Istio's CA puts in a workload certificate: both usages, valid from a second ago
/// (clock skew) for `ttl`.
fn workload(params: &mut CertificateParams, ttl: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::seconds(1);
    params.not_after = now + ttl;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.distinguished_name = DistinguishedName::new();
    params.serial_number = Some(rand_serial().into());
}

fn rand_serial() -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut serial = nanos.to_be_bytes().to_vec();
    serial[0] &= 0x7f;
    serial
}

/// A mesh's trust, as istiod holds it: the CA, istiod's serving certificate (for
/// `istiod.istio-system.svc`) and a service-account token file; the token is removed on drop.
pub struct MeshTrust {
    pub ca: TestCa,
    pub istiod: Issued,
    token: PathBuf,
}

/// Where istiod's stand-in listens in a Pod (istiod's TLS port).
pub const ISTIOD: &str = "127.0.0.1:15012";

impl MeshTrust {
    pub fn new() -> Result<Self> {
        let ca = TestCa::new()?;
        let istiod = ca.issue(
            "istiod",
            &["istiod.istio-system.svc"],
            Duration::from_secs(3600),
        )?;
        let token = ca.dir.join("istio-token");
        fs::write(&token, "a-service-account-jwt\n")?;
        Ok(Self { ca, istiod, token })
    }

    fn token_str(&self) -> String {
        self.token.to_str().expect("UTF-8 path").to_owned()
    }

    /// A token for the workload `spiffe://cluster.local/ns/<namespace>/sa/<service_account>`,
    /// in a file of its own (the Pod's `istio-token`); the control plane's token file learns
    /// whose it is, so its CA issues that identity. Made before the control plane starts.
    pub fn workload_token(&self, namespace: &str, service_account: &str) -> Result<PathBuf> {
        let token = format!("jwt-{namespace}-{service_account}");
        let identity = format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}");
        let mut all = fs::read_to_string(&self.token)?;
        all.push_str(&format!("{token} {identity}\n"));
        fs::write(&self.token, all)?;
        let file = self.ca.dir.join(format!("{token}.token"));
        fs::write(&file, format!("{token}\n"))?;
        Ok(file)
    }

    /// istiod's stand-in's arguments: xDS and Istio's CA over TLS, the token checked,
    /// certificates issued for `identity`.
    pub fn control_plane_args(&self, identity: &str) -> Vec<String> {
        vec![
            "--tls".into(),
            self.istiod.cert_str().into(),
            self.istiod.key_str().into(),
            "--token".into(),
            self.token_str(),
            "--ca".into(),
            self.ca.ca_str(),
            self.ca.key_path().to_str().expect("UTF-8 path").into(),
            identity.into(),
        ]
    }

    /// `tern run`'s arguments to reach that control plane at [`ISTIOD`] as istio-agent
    /// would, for the identity of `namespace`/`service_account`.
    pub fn tern_args(&self, namespace: &str, service_account: &str) -> Vec<String> {
        self.tern_args_at(ISTIOD, &self.token, namespace, service_account)
    }

    /// The same for a control plane at `istiod` (`ip:port`), with the token in `token`.
    pub fn tern_args_at(
        &self,
        istiod: &str,
        token: &Path,
        namespace: &str,
        service_account: &str,
    ) -> Vec<String> {
        [
            "--xds-address",
            &format!("https://{istiod}"),
            "--xds-ca",
            &self.ca.ca_str(),
            "--xds-server-name",
            "istiod.istio-system.svc",
            "--xds-token-file",
            token.to_str().expect("UTF-8 path"),
            "--namespace",
            namespace,
            "--service-account",
            service_account,
        ]
        .map(str::to_owned)
        .to_vec()
    }
}
