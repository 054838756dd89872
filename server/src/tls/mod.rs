//! TLS on the client listener: the certificate and key (`--tls-cert`, `--tls-key`),
//! reloaded on SIGHUP without dropping a connection; session tickets so a reconnect storm
//! costs resumed handshakes, with a key shared by every process that reads the same
//! `--tls-ticket-key` file; and each connection's session ([`session`]).
//!
//! The crypto provider is *ring*: it allocates through Rust's allocator, so TLS memory
//! lands in the `tls` allocation site like everything else (aws-lc-rs allocates in C,
//! where the site table cannot see it), and it has every suite needed here: TLS 1.3 and
//! 1.2 with AES-GCM and ChaCha20-Poly1305, ECDSA, RSA and Ed25519 certificates.

pub mod session;
mod tickets;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::error::Error;

/// A certificate this close to expiry is warned about at start and on reload.
const EXPIRY_WARNING_S: u64 = 30 * 24 * 3600;

/// The certificate chain and key the listener presents, and when the leaf expires.
struct Identity {
    key: Arc<CertifiedKey>,
    /// Unix seconds.
    not_after: u64,
}

/// Serves whichever certificate was loaded last.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The files the listener's TLS comes from.
#[derive(Clone)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Session ticket key shared by processes on one port; None: a random key per process.
    pub ticket_key: Option<PathBuf>,
}

/// TLS for the client listener.
pub struct Tls {
    files: Files,
    config: Arc<ServerConfig>,
    current: Arc<Current>,
    tickets: Option<Arc<tickets::SharedKey>>,
    /// Unix seconds when the certificate in use expires.
    not_after: std::sync::atomic::AtomicU64,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::config(format!("{what} {}: cannot read it: {e}", path.display())))
}

fn load_identity(files: &Files) -> Result<Identity, Error> {
    let cert_pem = read(&files.cert, "--tls-cert")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::config(format!("--tls-cert {}: not a PEM certificate chain: {e}", files.cert.display())))?;
    let leaf = chain.first().ok_or_else(|| Error::config(format!("--tls-cert {}: holds no certificate", files.cert.display())))?;
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| Error::config(format!("--tls-cert {}: the first certificate does not parse: {e}", files.cert.display())))?
        .1
        .validity()
        .not_after
        .timestamp()
        .max(0) as u64;
    let key_pem = read(&files.key, "--tls-key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| Error::config(format!("--tls-key {}: not a PEM private key: {e}", files.key.display())))?;
    let signing = provider::sign::any_supported_type(&key)
        .map_err(|e| Error::config(format!("--tls-key {}: not a key this server can sign with: {e}", files.key.display())))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        Error::config(format!("--tls-key {} does not belong to the certificate in --tls-cert {}: {e}", files.key.display(), files.cert.display()))
    })?;
    Ok(Identity { key: Arc::new(certified), not_after })
}

impl Tls {
    pub fn load(files: Files) -> Result<Tls, Error> {
        let identity = load_identity(&files)?;
        let current = Arc::new(Current(ArcSwap::new(identity.key)));
        let tickets = match &files.ticket_key {
            Some(path) => Some(Arc::new(tickets::SharedKey::load(path)?)),
            None => None,
        };
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::config(format!("TLS: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.ticketer = match &tickets {
            Some(shared) => shared.clone(),
            None => provider::Ticketer::new().map_err(|e| Error::config(format!("TLS session tickets: {e}")))?,
        };
        let tls = Tls { files, config: Arc::new(config), current, tickets, not_after: identity.not_after.into() };
        tls.warn_if_expiring();
        Ok(tls)
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Reads the certificate, key and ticket key again (SIGHUP). A pair that does not load
    /// leaves the one in use in place, and says why.
    pub fn reload(&self) -> Result<(), Error> {
        let identity = load_identity(&self.files)?;
        if let (Some(shared), Some(path)) = (&self.tickets, &self.files.ticket_key) {
            shared.reload(path)?;
        }
        self.current.0.store(identity.key);
        self.not_after.store(identity.not_after, std::sync::atomic::Ordering::Relaxed);
        self.warn_if_expiring();
        tracing::info!(cert = %self.files.cert.display(), "reloaded the TLS certificate and key");
        Ok(())
    }

    /// Unix seconds when the certificate in use expires.
    pub fn not_after(&self) -> u64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seconds until the certificate in use expires (negative once it has).
    pub fn expires_in_s(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed) as i64 - (crate::clock::wall_ms() / 1000) as i64
    }

    fn warn_if_expiring(&self) {
        let left = self.expires_in_s();
        if left < EXPIRY_WARNING_S as i64 {
            tracing::warn!(cert = %self.files.cert.display(), days_left = left / 86_400, "the TLS certificate expires soon (or has expired)");
        }
    }
}
