//! The HTTP client that calls the application: the connect and subscribe hooks
//! ([`crate::hooks`]) and the webhooks ([`crate::webhooks`]) share it, and its pool of
//! keep-alive connections. `https://` URLs are checked against the system's roots, or
//! against `--hook-ca` alone when it is set (an application behind an internal CA).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::error::Error;

/// How long an idle keep-alive connection to the application is kept.
const IDLE: Duration = Duration::from_secs(60);

const AGENT: &str = concat!("pushline/", env!("CARGO_PKG_VERSION"));

pub struct Application {
    client: hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// What the application answered: its status and body.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Application {
    /// A client whose pool keeps up to `idle_per_host` connections to each application
    /// host, whose connects give up after `connect_timeout`. Redirects are not followed: a
    /// hook's answer is its own.
    pub fn new(ca: Option<&Path>, idle_per_host: usize, connect_timeout: Duration) -> Result<Application, Error> {
        let roots = roots(ca)?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::config(format!("TLS for hooks: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE)
            .pool_max_idle_per_host(idle_per_host)
            .build(connector);
        Ok(Application { client })
    }

    /// POSTs `body` (JSON) to `uri` with `headers`; reads at most `max_answer` bytes of the
    /// answer. The caller bounds the time.
    pub async fn post(&self, uri: &Uri, headers: &[(HeaderName, HeaderValue)], body: Bytes, max_answer: usize) -> Result<Answer, String> {
        let mut request = Request::builder().method(Method::POST).uri(uri.clone()).header(CONTENT_TYPE, "application/json").header(USER_AGENT, AGENT);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| format!("{e}: {}", std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default()))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), max_answer)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e} (at most {max_answer} bytes)"))?
            .to_bytes();
        Ok(Answer { status, body })
    }
}

/// The certificates `https://` applications are checked against: `--hook-ca`'s alone
/// when set (at least one), else the system's.
pub fn roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| Error::config(format!("--hook-ca {}: {e}", path.display()));
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(bad(&"no PEM certificate in it"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(errors = ?found.errors, "no system root certificates found: https:// hooks and webhooks will fail (install ca-certificates, or set --hook-ca)");
            }
        }
    }
    Ok(roots)
}

/// An application URL, `http://` or `https://`.
pub fn parse_url(flag: &str, url: &str) -> Result<Uri, Error> {
    let uri: Uri = url.parse().map_err(|e| Error::config(format!("{flag} `{url}`: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(Error::config(format!("{flag} `{url}`: an http:// or https:// URL with a host"))),
    }
}
