//! Mutual TLS: the certificate files of servers and clients, reloaded when they change, and
//! the caller's identity read from its certificate.
//!
//! Certificates are files (cert-manager writes them into a mounted secret and rotates them
//! before they expire). A [`Reloading`] configuration re-reads its files every
//! `reload_interval` and swaps a new rustls configuration in when their contents changed; a
//! handshake takes whichever configuration is current, so rotation needs no restart and
//! connections already open keep going. A file that fails to load (a half-written rotation)
//! keeps the previous configuration and is tried again at the next interval; at the first
//! load (a start, a new client), files that fail and are changing are read again shortly.
//!
//! A caller's identity is its certificate's first `spiffe://` URI SAN
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`), or failing that its first
//! DNS SAN.

use std::{
    path::PathBuf,
    sync::{Arc, Weak},
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig, server::WebPkiClientVerifier, sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};

/// Installs rustls' ring crypto provider for the whole process. The dependency graph holds
/// both ring and aws-lc-rs, and rustls refuses to pick one itself; every service calls this
/// first thing in `main`, and [`crate::GrpcServer::bind`] and the client builders call it
/// too, so tests and tools cannot forget. Calling it again does nothing.
pub fn install_crypto_provider() {
    // Err means a provider is installed already: ours, by an earlier call.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

/// `[server.tls]`: the server's certificate and the CA its callers' certificates must chain to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain of this server (leaf first), such as a mounted secret's `tls.crt`.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file` (`tls.key`).
    pub key_file: PathBuf,
    /// PEM CA certificate(s) that callers' certificates must chain to (`ca.crt`). A caller
    /// without a certificate still completes the handshake and may check health; every other
    /// method needs one. A certificate from another CA, or an expired one, fails the handshake.
    pub client_ca_file: PathBuf,
    /// How often the three files are re-read; changed contents take effect for new
    /// connections. Default 10s.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

/// TLS of a gRPC client inside the platform (the relay calling the catalog, the admin CLIs).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA certificate(s) the server's certificate must chain to.
    pub ca_file: PathBuf,
    /// PEM certificate chain this client presents; with `key_file`. Without it the client
    /// reaches only what needs no identity (health checks).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name the server's certificate must carry; default: the host of the URL called.
    #[serde(default)]
    pub server_name: Option<String>,
    /// How often the files are re-read (for new connections). Default 10s.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl ClientTls {
    /// A client trusting `ca_file` and presenting `cert_file`/`key_file`.
    pub fn new(ca_file: impl Into<PathBuf>, cert_and_key: Option<(PathBuf, PathBuf)>) -> Self {
        let (cert_file, key_file) = cert_and_key.unzip();
        Self {
            ca_file: ca_file.into(),
            cert_file,
            key_file,
            server_name: None,
            reload_interval: default_reload_interval(),
        }
    }
}

/// A rustls configuration built from files and rebuilt when they change; see the module docs.
#[derive(Debug)]
pub struct Reloading<T> {
    current: Arc<ArcSwap<T>>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Loads `files` and builds the first configuration with `build`, then re-reads them every
    /// `interval` on a task that ends when the last clone of the result is dropped. Must be
    /// called inside a tokio runtime.
    ///
    /// # Errors
    /// When a file cannot be read or the configuration cannot be built from it: a service
    /// does not start with certificates it cannot use.
    pub fn load(
        what: &'static str,
        files: Vec<PathBuf>,
        interval: Duration,
        build: impl Fn(&[Vec<u8>]) -> anyhow::Result<T> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        install_crypto_provider();
        let (contents, first) = first_load(what, &files, &build)?;
        let current = Arc::new(ArcSwap::from_pointee(first));
        tokio::spawn(watch(
            what,
            files,
            contents,
            interval,
            Arc::downgrade(&current),
            build,
        ));
        Ok(Self { current })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }
}

/// Reads `files` and builds a configuration from them. Files that do not build are read
/// again after [`SETTLE`], while they keep changing (at most [`SETTLE_TRIES`] times): a
/// rotation replaces them one by one, and a read between two replacements sees a new key
/// beside an old certificate. Files that do not build and stay as they are fail after one
/// more look, [`SETTLE`] later.
fn first_load<T>(
    what: &'static str,
    files: &[PathBuf],
    build: &impl Fn(&[Vec<u8>]) -> anyhow::Result<T>,
) -> anyhow::Result<(Vec<Vec<u8>>, T)> {
    let mut contents = read_all(files)?;
    let mut tries = 1;
    loop {
        let error = match build(&contents) {
            Ok(config) => return Ok((contents, config)),
            Err(error) => error.context(format!("failed to load the {what}")),
        };
        if tries == SETTLE_TRIES {
            return Err(error);
        }
        // A blocking pause, on this rare path only (a start or a new channel during a
        // rotation): loading is synchronous for its callers, which build clients in
        // constructors. A fixed pause, not mall-retry's backoff: this waits for a writer to
        // finish, and stops as soon as the files stop changing.
        std::thread::sleep(SETTLE);
        let again = read_all(files)?;
        if again == contents {
            return Err(error);
        }
        contents = again;
        tries += 1;
    }
}

/// How long a rotation may take to replace every file.
const SETTLE: Duration = Duration::from_millis(50);

/// How many times files that keep changing are read before their error stands.
const SETTLE_TRIES: u32 = 5;

fn read_all(files: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    files
        .iter()
        .map(|path| {
            std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))
        })
        .collect()
}

async fn watch<T>(
    what: &'static str,
    files: Vec<PathBuf>,
    mut loaded: Vec<Vec<u8>>,
    interval: Duration,
    current: Weak<ArcSwap<T>>,
    build: impl Fn(&[Vec<u8>]) -> anyhow::Result<T>,
) {
    let mut failing = false;
    loop {
        tokio::time::sleep(interval).await;
        let Some(current) = current.upgrade() else {
            return;
        };
        // A few small files every few seconds: read them on the blocking pool all the same,
        // as a slow volume must not stall a runtime worker.
        let paths = files.clone();
        let read = tokio::task::spawn_blocking(move || read_all(&paths)).await;
        let contents = match read {
            Ok(Ok(contents)) => contents,
            Ok(Err(error)) => {
                if !failing {
                    tracing::warn!(what, error = ?error, "cannot re-read certificate files; keeping the loaded ones");
                    failing = true;
                }
                continue;
            }
            Err(_) => return,
        };
        if contents == loaded {
            // Readable again and unchanged: a later failure is worth a line of its own.
            failing = false;
            continue;
        }
        match build(&contents) {
            Ok(config) => {
                current.store(Arc::new(config));
                loaded = contents;
                failing = false;
                tracing::info!(what, "certificate files changed; new connections use them");
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(what, error = ?error, "changed certificate files do not load; keeping the loaded ones");
                    failing = true;
                }
            }
        }
    }
}

/// The reloading server configuration of `[server.tls]`.
///
/// # Errors
/// When the files cannot be read or do not form a usable certificate, key and CA.
pub fn server_config(tls: &ServerTls) -> anyhow::Result<Reloading<ServerConfig>> {
    Reloading::load(
        "server certificate",
        vec![
            tls.cert_file.clone(),
            tls.key_file.clone(),
            tls.client_ca_file.clone(),
        ],
        tls.reload_interval,
        |files| build_server_config(&files[0], &files[1], &files[2]),
    )
}

/// The reloading configuration of a client.
///
/// # Errors
/// When the files cannot be read or do not form a usable CA (and certificate and key).
pub fn client_config(tls: &ClientTls) -> anyhow::Result<Reloading<ClientConfig>> {
    let mut files = vec![tls.ca_file.clone()];
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => files.extend([cert.clone(), key.clone()]),
        (None, None) => {}
        _ => anyhow::bail!("a client certificate needs both cert_file and key_file"),
    }
    Reloading::load(
        "client certificate",
        files,
        tls.reload_interval,
        |files| match files {
            [ca] => build_client_config(ca, None),
            [ca, cert, key] => build_client_config(ca, Some((cert, key))),
            _ => unreachable!("one or three files"),
        },
    )
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("the certificate file is not PEM")?;
    anyhow::ensure!(
        !certs.is_empty(),
        "the certificate file holds no certificate"
    );
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("the key file holds no PEM key")?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(certs, key, &provider)
        .context("the key does not match the certificate or is not supported")?;
    Ok(Arc::new(key))
}

fn roots(ca_pem: &[u8]) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.context("the CA file is not PEM")?)
            .context("the CA file holds an unusable certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "the CA file holds no certificate");
    Ok(Arc::new(roots))
}

fn build_server_config(cert: &[u8], key: &[u8], ca: &[u8]) -> anyhow::Result<ServerConfig> {
    let key = certified_key(cert, key)?;
    // Optional at the TLS layer, required per method (see crate::authz): a caller without a
    // certificate may still check health. One that presents a certificate must present a
    // valid one from our CA, or the handshake fails.
    let verifier = WebPkiClientVerifier::builder(roots(ca)?)
        .allow_unauthenticated()
        .build()
        .context("failed to build the client certificate verifier")?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn build_client_config(
    ca: &[u8],
    cert_and_key: Option<(&[u8], &[u8])>,
) -> anyhow::Result<ClientConfig> {
    let builder = ClientConfig::builder().with_root_certificates(roots(ca)?);
    let mut config = match cert_and_key {
        Some((cert, key)) => {
            let key = certified_key(cert, key)?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The identity in a verified end-entity certificate: its first `spiffe://` URI SAN, else its
/// first DNS SAN; `None` when it has neither (such a caller is treated as unauthenticated).
pub fn identity_of(certificate: &[u8]) -> Option<Arc<str>> {
    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(certificate).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(Arc::from(*uri)),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|name| match name {
                GeneralName::DNSName(dns) => Some(Arc::from(*dns)),
                _ => None,
            })
        })
}

/// The TLS files of a command line tool (`relayctl`, `memberctl`), from its flags or the
/// environment (`MALL_TLS_CA`, `MALL_TLS_CERT`, `MALL_TLS_KEY`, `MALL_TLS_SERVER_NAME`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPaths {
    /// CA certificate the server's certificate must chain to; TLS is on when set.
    pub ca: Option<PathBuf>,
    /// The caller's certificate.
    pub cert: Option<PathBuf>,
    /// The caller's key.
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry, when the address does not say it (a
    /// `kubectl port-forward` to `localhost`).
    pub server_name: Option<String>,
}

impl TlsPaths {
    /// The files named by `MALL_TLS_CA`, `MALL_TLS_CERT`, `MALL_TLS_KEY` and
    /// `MALL_TLS_SERVER_NAME`: a command line tool's defaults for its flags.
    pub fn from_env() -> Self {
        Self {
            ca: std::env::var_os("MALL_TLS_CA").map(Into::into),
            cert: std::env::var_os("MALL_TLS_CERT").map(Into::into),
            key: std::env::var_os("MALL_TLS_KEY").map(Into::into),
            server_name: std::env::var("MALL_TLS_SERVER_NAME").ok(),
        }
    }

    /// Each file from `self`, else from `fallback` (flags over the environment).
    #[must_use]
    pub fn or(self, fallback: Self) -> Self {
        Self {
            ca: self.ca.or(fallback.ca),
            cert: self.cert.or(fallback.cert),
            key: self.key.or(fallback.key),
            server_name: self.server_name.or(fallback.server_name),
        }
    }

    /// The client TLS these files make; `None` without a CA (plaintext).
    ///
    /// # Errors
    /// A certificate without a key or the other way round, or either without a CA.
    pub fn client_tls(&self) -> anyhow::Result<Option<ClientTls>> {
        let pair = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        match &self.ca {
            Some(ca) => Ok(Some(ClientTls {
                server_name: self.server_name.clone(),
                ..ClientTls::new(ca.clone(), pair)
            })),
            None if pair.is_some() => anyhow::bail!("--tls-cert needs --tls-ca as well"),
            None => Ok(None),
        }
    }
}

/// The CA certificates in `ca_file` (PEM), for an outbound HTTPS client (the partner, Loki)
/// that trusts them in addition to the system's roots: a private CA in front of an internal
/// endpoint.
///
/// # Errors
/// When the file cannot be read or holds no PEM certificate.
pub fn extra_roots(ca_file: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(ca_file).with_context(|| format!("failed to read {}", ca_file.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM", ca_file.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no certificate",
        ca_file.display()
    );
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn certificate(sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("a key");
        params.self_signed(&key).expect("signed").der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("ia5"))
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().expect("ia5"))
    }

    #[test]
    fn the_identity_is_the_spiffe_uri_else_the_first_dns_name() {
        let spiffe = "spiffe://mall.internal/ns/mall-platform/sa/sync-relay";
        // The SPIFFE id wins wherever it stands among the names.
        let cert = certificate(vec![dns("relay.internal"), uri(spiffe)]);
        assert_eq!(identity_of(&cert).as_deref(), Some(spiffe));
        // Without one, the first DNS name; a URI of another scheme is not an identity.
        let cert = certificate(vec![
            uri("https://example.org/x"),
            dns("a.internal"),
            dns("b.internal"),
        ]);
        assert_eq!(identity_of(&cert).as_deref(), Some("a.internal"));
        // No name at all: no identity (the caller is unauthenticated).
        assert_eq!(identity_of(&certificate(Vec::new())), None);
        assert_eq!(identity_of(b"not a certificate"), None);
    }

    /// Two files that build only when they match, as a certificate and its key; the first
    /// build also replaces the second file, as a rotation's next rename would.
    #[test]
    fn a_first_load_during_a_rotation_waits_for_the_files_to_settle() {
        let dir = tempfile::tempdir().expect("a directory");
        let files = vec![dir.path().join("tls.key"), dir.path().join("tls.crt")];
        // Read between the two replacements: a new key, an old certificate.
        std::fs::write(&files[0], "new").expect("written");
        std::fs::write(&files[1], "old").expect("written");
        let builds = std::cell::Cell::new(0);
        let rotating = |contents: &[Vec<u8>]| {
            builds.set(builds.get() + 1);
            if builds.get() == 1 {
                std::fs::write(&files[1], "new").expect("written");
            }
            anyhow::ensure!(contents[0] == contents[1], "the key does not match");
            Ok(())
        };
        let (contents, ()) = first_load("certificate", &files, &rotating).expect("settles");
        assert_eq!(contents, [b"new".to_vec(), b"new".to_vec()]);
        assert_eq!(builds.get(), 2);

        // Files that do not build and do not change fail after one more look, naming what.
        std::fs::write(&files[1], "other").expect("written");
        builds.set(0);
        let stuck = |contents: &[Vec<u8>]| {
            builds.set(builds.get() + 1);
            anyhow::ensure!(contents[0] == contents[1], "the key does not match");
            Ok(())
        };
        let error = first_load("certificate", &files, &stuck).expect_err("mismatched");
        assert_eq!(builds.get(), 1);
        assert!(
            format!("{error:#}").contains("failed to load the certificate"),
            "{error:#}"
        );

        // Files that keep changing and never build: five reads, then the error.
        builds.set(0);
        let churning = |_: &[Vec<u8>]| -> anyhow::Result<()> {
            builds.set(builds.get() + 1);
            std::fs::write(&files[1], builds.get().to_string()).expect("written");
            anyhow::bail!("never builds")
        };
        first_load("certificate", &files, &churning).expect_err("never builds");
        assert_eq!(builds.get(), SETTLE_TRIES);
    }
}
