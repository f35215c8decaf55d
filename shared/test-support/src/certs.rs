//! A local certificate authority and certificates for its services and callers, as PEM files:
//! for the mutual TLS tests and for `scripts/certs.sh` (the `mall-certs` tool), which makes
//! the set `scripts/dev.sh --tls` runs with.
//!
//! Every certificate carries both the server and the client extended key usage, its SPIFFE ID
//! as a URI SAN, and `localhost` / `127.0.0.1` so it can serve locally.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The trust domain of the local and default identities.
pub const TRUST_DOMAIN: &str = "mall.internal";

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The PEM certificate.
    pub cert: PathBuf,
    /// The PEM private key.
    pub key: PathBuf,
}

/// How long a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From 2020 to 2100: valid for any test or local run.
    Current,
    /// From 2020 to 2021: expired.
    Expired,
}

/// A CA that writes its certificate and the ones it issues into one directory.
#[derive(Debug)]
pub struct Authority {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    ca_file: PathBuf,
}

impl Authority {
    /// A new CA named `name`, its certificate written to `<dir>/<name>-ca.crt`.
    ///
    /// # Errors
    /// When the key cannot be generated or the files cannot be written.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} local CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, Validity::Current);
        let cert = params.self_signed(&key)?;
        let ca_file = dir.join(format!("{name}-ca.crt"));
        write(&ca_file, &cert.pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
            issuer: Issuer::new(params, key),
            ca_file,
        })
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The SPIFFE ID of service account `account` in `namespace`.
    pub fn spiffe_id(namespace: &str, account: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}")
    }

    /// Issues a certificate for `file_name` (`<dir>/<file_name>.crt` and `.key`) naming
    /// `spiffe_id` (if any) and `dns_names`, valid for `localhost` and `127.0.0.1` too.
    ///
    /// # Errors
    /// When the key cannot be generated or the files cannot be written.
    pub fn issue(
        &self,
        file_name: &str,
        spiffe_id: Option<&str>,
        dns_names: &[&str],
        validity: Validity,
    ) -> anyhow::Result<CertFiles> {
        let key = KeyPair::generate()?;
        let mut names: Vec<String> = dns_names.iter().map(|&n| n.to_owned()).collect();
        names.extend(["localhost".to_owned(), "127.0.0.1".to_owned()]);
        let mut params = CertificateParams::new(names)?;
        if let Some(id) = spiffe_id {
            // First, so it is the identity (see mall_grpc::tls::identity_of).
            params
                .subject_alt_names
                .insert(0, SanType::URI(id.try_into()?));
        }
        params
            .distinguished_name
            .push(DnType::CommonName, file_name.to_owned());
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file_name}.crt")),
            key: self.dir.join(format!("{file_name}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write_private(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// The CA's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let (from, to) = match validity {
        Validity::Current => (2020, 2100),
        Validity::Expired => (2020, 2021),
    };
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(to, 1, 1);
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("failed to write {}", path.display()))
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("failed to write {}", path.display()))
}
