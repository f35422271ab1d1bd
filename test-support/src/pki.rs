//! A throwaway certificate authority for TLS tests (rcgen): server and client certificates
//! written as PEM files into a temp dir.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A CA plus the directory its files are written to.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    dir: TempDir,
    ca_pem: String,
}

/// A certificate and key issued by a [`TestCa`], as files and as PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The key, PEM.
    pub key_pem: String,
}

impl TestCa {
    /// A new CA.
    ///
    /// # Panics
    /// When key generation or signing fails.
    #[must_use]
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("failed to generate ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("failed to self-sign ca");
        let dir = tempfile::Builder::new()
            .prefix("test-ca-")
            .tempdir()
            .expect("failed to create ca dir");
        let ca_pem = cert.pem();
        std::fs::write(dir.path().join("ca.crt"), &ca_pem).expect("failed to write ca");
        Self {
            issuer: Issuer::new(params, key),
            dir,
            ca_pem,
        }
    }

    /// The CA certificate file.
    #[must_use]
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The CA certificate, PEM.
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    #[must_use]
    pub fn server(&self, name: &str) -> Issued {
        self.issue(
            name,
            vec!["127.0.0.1".into(), "localhost".into()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A client certificate whose common name is `cn` (etcd's user under CN auth).
    #[must_use]
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(cn, Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn issue(&self, cn: &str, sans: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>) -> Issued {
        let key = KeyPair::generate().expect("failed to generate key");
        let mut params = CertificateParams::new(sans).expect("cert params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = usages;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("failed to sign cert");
        let write = |suffix: &str, body: &str| -> PathBuf {
            let path = self.dir.path().join(format!("{cn}.{suffix}"));
            std::fs::write(&path, body).expect("failed to write pem");
            path
        };
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Issued {
            cert: write("crt", &cert_pem),
            key: write("key", &key_pem),
            cert_pem,
            key_pem,
        }
    }

    /// The directory holding every file.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
