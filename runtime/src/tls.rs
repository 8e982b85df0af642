//! TLS for both binaries, with rustls on aws-lc-rs (the provider reqwest uses too):
//!
//! - the server side of the node's registry port and of the control plane's port: a certificate
//!   and key from PEM files, reloaded when the files change ([`ReloadingCert`], polled on an
//!   interval and at once on SIGHUP) without touching open connections, an optional client CA
//!   (mTLS), ALPN h2 and http/1.1;
//! - the node's side of its control-plane stream ([`ClientTlsFiles`]): a CA to trust, an optional
//!   client certificate;
//! - the roots that upstream connections trust ([`system_roots_available`], [`builtin_roots`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the {what} {path} holds no PEM {expected}")]
    Empty { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("the {what} {path}: {message}")]
    Invalid { what: &'static str, path: PathBuf, message: String },
    #[error("the certificate {cert} and the key {key} do not belong together: {message}")]
    Mismatch { cert: PathBuf, key: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The one crypto provider of the process: aws-lc-rs, as reqwest's rustls uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.into(), source })
}

/// Every certificate of a PEM bundle (at least one).
pub fn parse_certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Invalid {
        what,
        path: path.into(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.into(), expected: "certificate (-----BEGIN CERTIFICATE-----)" });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "key file",
            path: path.into(),
            expected: "private key (-----BEGIN PRIVATE KEY-----)",
        },
        e => TlsError::Invalid { what: "key file", path: path.into(), message: e.to_string() },
    })
}

/// A certificate chain and its key, checked to belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = parse_certs("certificate file", cert, &read("certificate file", cert)?)?;
    let der = parse_key(key, &read("key file", key)?)?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|e| TlsError::Mismatch {
        cert: cert.into(),
        key: key.into(),
        message: e.to_string(),
    })
}

/// A root store of the CA certificates in a PEM file.
pub fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(what, path, &read(what, path)?)? {
        roots.add(cert).map_err(|e| TlsError::Invalid { what, path: path.into(), message: e.to_string() })?;
    }
    Ok(roots)
}

/// What identifies a version of a file: modification time, size, inode.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    // `metadata` follows symlinks: a Kubernetes secret volume swaps a symlink, the target changes.
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The server certificate of a port: a [`ResolvesServerCert`] over the current certificate, which
/// [`ReloadingCert::reload_if_changed`] swaps when the files change. A handshake takes the
/// certificate current when it starts; open connections are never touched. A new pair that does not
/// load (unreadable, not PEM, key and certificate that do not match, half written) is logged and the
/// old one stays.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The stamps of the pair last tried (loaded or refused), so a bad pair is reported once.
    tried: Mutex<(Stamp, Stamp)>,
}

impl ReloadingCert {
    /// Loads the pair; fails when it does not load (at start-up, a bad file is an error).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let stamps = (stamp(cert), stamp(key));
        let loaded = load_certified_key(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.into(),
            key: key.into(),
            current: ArcSwap::from_pointee(loaded),
            tried: Mutex::new(stamps),
        }))
    }

    /// The certificate served to new handshakes.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Reloads when either file changed since the last attempt (or always, with `force`).
    /// Returns whether a new certificate is now served.
    pub fn reload_if_changed(&self, force: bool) -> bool {
        let stamps = (stamp(&self.cert), stamp(&self.key));
        {
            let mut tried = self.tried.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *tried == stamps {
                return false;
            }
            *tried = stamps;
        }
        match load_certified_key(&self.cert, &self.key) {
            Ok(new) => {
                let same = self.current.load().cert == new.cert;
                if !same {
                    self.current.store(Arc::new(new));
                    tracing::info!(cert = %self.cert.display(), key = %self.key.display(), "TLS certificate reloaded");
                }
                !same
            }
            Err(error) => {
                tracing::error!(%error, cert = %self.cert.display(), key = %self.key.display(),
                    "TLS certificate not reloaded; still serving the previous one");
                false
            }
        }
    }

    /// Checks the files every `interval` and at once on SIGHUP, until `cancel`.
    pub fn watch(self: Arc<Self>, interval: Duration, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                let force = tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                        tracing::info!(cert = %self.cert.display(), "SIGHUP: reloading the TLS certificate");
                        true
                    }
                };
                let this = self.clone();
                // File reads and key parsing off the runtime's threads.
                let _ = tokio::task::spawn_blocking(move || this.reload_if_changed(force)).await;
            }
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The TLS flags of a server port (both binaries).
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM, leaf first). Reloaded when the file changes.
    #[arg(long, env = "WHARF_TLS_CERT", requires = "tls_key", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "WHARF_TLS_KEY", requires = "tls_cert", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// How often the certificate and key files are checked for a change (SIGHUP checks at once).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub tls_reload_interval: Duration,
}

impl TlsArgs {
    /// The server TLS of these flags (`None` without `--tls-cert`); `client_ca` requires client
    /// certificates signed by it.
    pub fn server_tls(&self, client_ca: Option<&Path>) -> Result<Option<ServerTls>, TlsError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        ServerTls::load(cert, key, client_ca, self.tls_reload_interval).map(Some)
    }
}

/// A server port's TLS: the config every handshake uses and the certificate it reloads.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub cert: Arc<ReloadingCert>,
    pub reload_interval: Duration,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("cert", &self.cert.cert).field("key", &self.cert.key).finish()
    }
}

impl ServerTls {
    /// Loads the certificate and key (and the client CA): errors here stop the start-up.
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        reload_interval: Duration,
    ) -> Result<Self, TlsError> {
        let cert = ReloadingCert::load(cert, key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match client_ca {
            Some(ca) => {
                let roots = load_roots("client CA file", ca)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { config: Arc::new(config), cert, reload_interval })
    }

    /// Starts reloading the certificate when its files change, until `cancel`.
    pub fn watch(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        self.cert.clone().watch(self.reload_interval, cancel)
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// How a node reaches its control planes over TLS (`https://` endpoints): the CA that signed
/// their certificates (else the system roots), and a client certificate for mTLS. The files are
/// read at every connection attempt, so replacing them needs no restart.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// tonic's TLS configuration from the files (read and checked now).
    pub fn tonic_config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => {
                let pem = read("CA file", ca)?;
                parse_certs("CA file", ca, &pem)?;
                config.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read("client certificate file", cert)?;
                parse_certs("client certificate file", cert, &cert_pem)?;
                let key_pem = read("client key file", key)?;
                parse_key(key, &key_pem)?;
                config = config.identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
            }
            (None, None) => {}
            _ => return Err(TlsError::Config("a client certificate needs both a certificate and a key".into())),
        }
        Ok(config)
    }
}

/// Whether the system has CA certificates (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`),
/// which the platform verifier of reqwest needs. Looked at once per process.
pub fn system_roots_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let n = found.certs.len();
        if n == 0 {
            tracing::warn!(errors = ?found.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "no CA certificates on this system (install ca-certificates); upstreams are verified against the Mozilla roots built into Wharf");
        } else {
            tracing::debug!(roots = n, "system CA certificates");
        }
        n > 0
    })
}

/// The Mozilla roots built in, for a system without CA certificates.
pub fn builtin_roots() -> &'static [CertificateDer<'static>] {
    webpki_root_certs::TLS_SERVER_ROOT_CERTS
}
