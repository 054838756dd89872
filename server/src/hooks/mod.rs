//! Asking the application: the connect hook (`--connect-hook`), asked before a connection
//! is welcomed, and the subscribe hook (`--subscribe-hook`), asked for each subscribe to a
//! topic matching `--subscribe-hook-topics`. Each is a JSON POST; the application answers
//! 200 to admit (the connect hook may name the uid, the topics, the member info and the
//! expiry), 401 or 403 with `{"error":..}` to refuse, which the client is told.
//!
//! A question is bounded: `--hook-timeout` for the answer, at most
//! `--hook-max-concurrency` questions out per hook on this node (past that: 503 with
//! Retry-After, counted, so a reconnect storm is not a storm at the application), and a
//! circuit breaker ([`breaker`]) that stops asking an application that keeps failing.
//! Whatever goes wrong, the answer is a refusal to retry later, never an admission that
//! skipped the question. Subscribe answers may be kept for `--hook-cache-ttl` by (uid,
//! topic).

pub mod breaker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use compact_str::CompactString;
use hyper::Uri;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use crate::application::Application;
use crate::config::Config;
use crate::error::{Error, Kind};
use crate::rights::Rights;
use crate::telemetry::logging::Throttle;
use crate::telemetry::{HookKind, HookOutcome, Metrics};
use breaker::{Breaker, Pass};

/// Largest answer read from a hook.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest refusal text passed on to a client.
const MAX_REFUSAL_CHARS: usize = 512;
/// Most subscribe answers kept in the cache.
const MAX_CACHED: usize = 100_000;

/// Both hooks, as configured.
pub struct Hooks {
    pub connect: Option<Hook>,
    pub subscribe: Option<Hook>,
    /// Topics whose subscribes the subscribe hook decides.
    subscribe_topics: Rights,
    /// Request headers passed to the connect hook, lower-case.
    pub forward_headers: Vec<String>,
    /// Subscribe answers by (uid, topic), and until when they hold.
    cache: Option<Cache>,
}

/// One hook: where it is, and what bounds asking it.
pub struct Hook {
    kind: HookKind,
    url: Uri,
    application: Arc<Application>,
    timeout: Duration,
    /// Questions out at once, at most `--hook-max-concurrency`.
    out: Semaphore,
    breaker: Breaker,
    metrics: Arc<Metrics>,
    /// One warning a second at most about its failures.
    log: Throttle,
}

/// What the connect hook is asked.
#[derive(Serialize)]
pub struct Connecting<'a> {
    /// The token's uid, or the `?uid=` named in open mode.
    pub uid: &'a str,
    /// The token's claims, as sent; none in open mode.
    pub claims: Option<&'a RawValue>,
    pub address: String,
    pub transport: &'static str,
    pub topics: &'a [String],
    pub headers: HashMap<&'a str, String>,
}

/// What the connect hook may answer with 200; whatever it leaves out stays as asked.
#[derive(Deserialize, Default)]
pub struct Admitted {
    /// The connection's uid instead.
    pub uid: Option<String>,
    /// The topics the connection subscribes to now, instead of those it asked for: granted
    /// by the application (no token right needed), held until unsubscribed.
    pub topics: Option<Vec<String>>,
    /// The member info presence shows.
    pub info: Option<Box<RawValue>>,
    /// Unix seconds when the connection must have refreshed its token (earlier than the
    /// token's own expiry only).
    pub expire_at: Option<u64>,
}

/// What the subscribe hook is asked.
#[derive(Serialize)]
pub struct Subscribing<'a> {
    pub uid: &'a str,
    pub topic: &'a str,
    pub session: String,
}

/// The subscribe hook's 200 answer: nothing needed.
#[derive(Deserialize)]
struct Allowed {}

/// A subscribe answer kept: admitted, or the refusal; and until when.
type Kept = (Result<(), Error>, Instant);

struct Cache {
    ttl: Duration,
    /// By (uid, topic).
    answers: Mutex<HashMap<(CompactString, Box<str>), Kept>>,
}

impl Hooks {
    /// The hooks the config names; None when it names none.
    pub fn from_config(config: &Config, application: Option<Arc<Application>>, metrics: &Arc<Metrics>) -> Result<Option<Hooks>, Error> {
        let Some(application) = application.filter(|_| config.connect_hook.is_some() || config.subscribe_hook.is_some()) else { return Ok(None) };
        let hook = |kind, url: &Option<String>, flag| -> Result<Option<Hook>, Error> {
            let Some(url) = url else { return Ok(None) };
            Ok(Some(Hook {
                kind,
                url: crate::application::parse_url(flag, url)?,
                application: application.clone(),
                timeout: config.hook_timeout,
                out: Semaphore::new(config.hook_max_concurrency),
                breaker: Breaker::new(config.hook_breaker_failures, config.hook_breaker_cooldown),
                metrics: metrics.clone(),
                log: Throttle::new(Duration::from_secs(1)),
            }))
        };
        let subscribe_topics = Rights::parse(&config.subscribe_hook_topics, "").map_err(|e| Error::config(format!("--subscribe-hook-topics: {e}")))?;
        let cache = (!config.hook_cache_ttl.is_zero()).then(|| Cache { ttl: config.hook_cache_ttl, answers: Mutex::default() });
        Ok(Some(Hooks {
            connect: hook(HookKind::Connect, &config.connect_hook, "--connect-hook")?,
            subscribe: hook(HookKind::Subscribe, &config.subscribe_hook, "--subscribe-hook")?,
            subscribe_topics,
            forward_headers: config.hook_forward_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            cache,
        }))
    }

    /// Whether the subscribe hook decides subscribes to `topic`.
    pub fn decides(&self, topic: &str) -> bool {
        self.subscribe.is_some() && self.subscribe_topics.allows(topic)
    }

    /// Asks the subscribe hook about each of `topics`, one at a time (a client holds one
    /// place among `--hook-max-concurrency` at most), stopping at the first that is not
    /// admitted: Err names it.
    pub async fn may_subscribe_all<'t>(&self, uid: &str, session: u64, topics: impl IntoIterator<Item = &'t String>) -> Result<(), (&'t String, Error)> {
        for topic in topics {
            self.may_subscribe(uid, session, topic).await.map_err(|e| (topic, e))?;
        }
        Ok(())
    }

    /// Asks the subscribe hook whether `uid` (on `session`) may subscribe to `topic`, or
    /// answers from the cache. Ok: admitted.
    pub async fn may_subscribe(&self, uid: &str, session: u64, topic: &str) -> Result<(), Error> {
        let Some(hook) = &self.subscribe else { return Ok(()) };
        if let Some(cache) = &self.cache {
            if let Some(answer) = cache.get(uid, topic) {
                hook.metrics.hook(hook.kind, HookOutcome::Cached, None);
                return answer;
            }
        }
        let question = Subscribing { uid, topic, session: crate::session::SessionId(session).to_string() };
        let answer = hook.ask::<Allowed>(&question).await.map(drop);
        if let Some(cache) = &self.cache {
            // Only the application's own word is kept: a failure is asked again.
            if matches!(&answer, Ok(()) | Err(Error { kind: Kind::Forbidden | Kind::Unauthorized, .. })) {
                cache.put(uid, topic, answer.clone());
            }
        }
        answer
    }
}

impl Cache {
    fn get(&self, uid: &str, topic: &str) -> Option<Result<(), Error>> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let (answer, until) = answers.get(&(CompactString::from(uid), Box::from(topic)))?;
        (Instant::now() < *until).then(|| answer.clone())
    }

    fn put(&self, uid: &str, topic: &str, answer: Result<(), Error>) {
        let now = Instant::now();
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if answers.len() >= MAX_CACHED {
            answers.retain(|_, (_, until)| *until > now);
            if answers.len() >= MAX_CACHED {
                return;
            }
        }
        answers.insert((CompactString::from(uid), Box::from(topic)), (answer, now + self.ttl));
    }
}

impl Hook {
    /// Asks the application; Ok with its 200 answer, Err with its refusal (401/403, the
    /// client is told its text) or with a 503 to retry later. What went wrong with the
    /// application is logged, not told to the client, who may be anyone.
    pub async fn ask<T: DeserializeOwned>(&self, question: &impl Serialize) -> Result<T, Error> {
        let what = <&str>::from(self.kind);
        let now = Instant::now();
        let pass = self.breaker.pass(now);
        if let Pass::Open(retry) = pass {
            self.metrics.hook(self.kind, HookOutcome::BreakerOpen, None);
            return Err(Error::unavailable(format!("the {what} hook is failing; not asked (circuit breaker open)")).with_retry_after(retry));
        }
        let Ok(_out) = self.out.try_acquire() else {
            if pass == Pass::Probe {
                self.breaker.failed(now);
            }
            self.metrics.hook(self.kind, HookOutcome::OverCapacity, None);
            return Err(Error::new(Kind::Overloaded, format!("the {what} hook has --hook-max-concurrency questions out; retry")).with_retry_after(1));
        };
        let body = Bytes::from(serde_json::to_vec(question).unwrap_or_default());
        // Given up at the timeout, the request is dropped and its connection closed.
        let asked = tokio::time::timeout(self.timeout, self.application.post(&self.url, &[], body, MAX_ANSWER_BYTES)).await;
        let answered = Some(now.elapsed().as_secs_f64());
        let failed = |outcome, seconds, told: String, detail: String| {
            let opened = self.breaker.failed(Instant::now());
            if let Some(held_back) = self.log.allow() {
                tracing::warn!(hook = what, held_back, breaker_opened = opened, "the {what} hook failed: {detail}");
            }
            self.metrics.hook_breaker(self.kind, self.breaker.is_open());
            self.metrics.hook(self.kind, outcome, seconds);
            Err(Error::unavailable(format!("the {what} hook {told}; retry later")))
        };
        let answer = match asked {
            Err(_) => {
                let told = format!("did not answer within {:?} (--hook-timeout)", self.timeout);
                return failed(HookOutcome::Timeout, None, told.clone(), told);
            }
            Ok(Err(e)) => return failed(HookOutcome::Failed, None, "could not be asked".into(), e),
            Ok(Ok(answer)) => answer,
        };
        match answer.status {
            // An object, whatever serde would read a struct from.
            200 if answer.body.trim_ascii_start().starts_with(b"{") => match serde_json::from_slice::<T>(&answer.body) {
                Ok(admitted) => {
                    self.breaker.succeeded();
                    self.metrics.hook_breaker(self.kind, false);
                    self.metrics.hook(self.kind, HookOutcome::Admitted, answered);
                    Ok(admitted)
                }
                Err(e) => failed(HookOutcome::Failed, answered, "gave an answer this server cannot use".into(), format!("answered 200 with a body that is not its answer: {e}")),
            },
            200 => failed(HookOutcome::Failed, answered, "gave an answer this server cannot use".into(), "answered 200 with a body that is not a JSON object".into()),
            401 | 403 => {
                self.breaker.succeeded();
                self.metrics.hook_breaker(self.kind, false);
                self.metrics.hook(self.kind, HookOutcome::Refused, answered);
                let kind = if answer.status == 401 { Kind::Unauthorized } else { Kind::Forbidden };
                Err(Error::new(kind, refusal(&answer.body)))
            }
            status => failed(HookOutcome::Failed, answered, format!("answered {status}"), format!("answered {status}")),
        }
    }
}

/// The application's `{"error":..}`, cut to a length a client is shown; a stock text
/// when it gave none.
fn refusal(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
    }
    match serde_json::from_slice::<Refusal>(body) {
        Ok(Refusal { error }) if !error.is_empty() => error.chars().take(MAX_REFUSAL_CHARS).collect(),
        _ => "refused by the application".to_owned(),
    }
}
