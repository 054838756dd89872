//! A real HTTP application for the hooks and webhooks to call: it records every request
//! and answers as the test says, with how many requests it had in flight at most.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One request the application received.
#[derive(Debug, Clone)]
pub struct Asked {
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Asked {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the application was sent JSON")
    }
}

/// What the application answers a request with.
pub enum Reply {
    Json(u16, Value),
    /// Never answers.
    Hang,
    /// Answers after a delay.
    Later(Duration, u16, Value),
}

type Behaviour = Box<dyn Fn(&Asked) -> Reply + Send + Sync>;

pub struct App {
    pub addr: SocketAddr,
    pub asked: mpsc::UnboundedReceiver<Asked>,
    behaviour: Arc<Mutex<Behaviour>>,
    in_flight: Arc<AtomicUsize>,
    pub most_in_flight: Arc<AtomicUsize>,
    pub count: Arc<AtomicUsize>,
    /// `https://` with this CA's certificate, when serving TLS.
    pub ca: Option<std::path::PathBuf>,
}

impl App {
    pub async fn start(behaviour: impl Fn(&Asked) -> Reply + Send + Sync + 'static) -> App {
        App::serve(Box::new(behaviour), None).await
    }

    /// The same over TLS, its certificate signed by a CA written to `dir/ca.pem`.
    pub async fn start_tls(dir: &Path, behaviour: impl Fn(&Asked) -> Reply + Send + Sync + 'static) -> App {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "pushline test application CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca).unwrap();
        let chain = vec![cert.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let mut app = App::serve(Box::new(behaviour), Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
        app.ca = Some(dir.join("ca.pem"));
        app
    }

    async fn serve(behaviour: Behaviour, tls: Option<tokio_rustls::TlsAcceptor>) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, asked) = mpsc::unbounded_channel();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let (in_flight, most_in_flight, count) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let app = App { addr, asked, behaviour: behaviour.clone(), in_flight: in_flight.clone(), most_in_flight: most_in_flight.clone(), count: count.clone(), ca: None };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (tx, behaviour, in_flight, most, count, tls) = (tx.clone(), behaviour.clone(), in_flight.clone(), most_in_flight.clone(), count.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (tx, behaviour, in_flight, most, count) = (tx.clone(), behaviour.clone(), in_flight.clone(), most.clone(), count.clone());
                        async move {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            count.fetch_add(1, Ordering::SeqCst);
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let asked = Asked { path: parts.uri.path().to_owned(), headers: parts.headers, body };
                            let reply = (behaviour.lock().unwrap())(&asked);
                            let _ = tx.send(asked);
                            let (status, body) = match reply {
                                Reply::Json(status, body) => (status, body),
                                Reply::Later(delay, status, body) => {
                                    tokio::time::sleep(delay).await;
                                    (status, body)
                                }
                                Reply::Hang => std::future::pending().await,
                            };
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
                            *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => drop(http.serve_connection(TokioIo::new(stream), service).await),
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                drop(http.serve_connection(TokioIo::new(stream), service).await);
                            }
                        }
                    }
                });
            }
        });
        app
    }

    /// Answers from now on as `behaviour` says.
    pub fn answer(&self, behaviour: impl Fn(&Asked) -> Reply + Send + Sync + 'static) {
        *self.behaviour.lock().unwrap() = Box::new(behaviour);
    }

    pub fn url(&self, path: &str) -> String {
        match self.ca {
            Some(_) => format!("https://localhost:{}{path}", self.addr.port()),
            None => format!("http://{}{path}", self.addr),
        }
    }

    /// The next request it received.
    pub async fn next(&mut self) -> Asked {
        tokio::time::timeout(super::WAIT, self.asked.recv()).await.expect("the application is asked in time").expect("the application runs")
    }
}
