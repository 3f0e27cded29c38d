//! Publishing events without ever holding up the caller.
//!
//! [`HttpSink::spawn`] starts one background task and returns a [`SinkHandle`].
//! [`SinkHandle::publish`] validates the event and puts it in a bounded queue with `try_send`:
//! it never waits and never fails the caller (domain.md §4: "CloudEvent publish is
//! non-blocking"). The task POSTs the events one by one in structured mode
//! (`application/cloudevents+json`).
//!
//! Guarantees and choices:
//!
//! - **Order**: one delivery at a time, in publish order. An event being retried holds back
//!   the ones behind it (they wait in the queue), so a receiver sees each resource's
//!   transitions in order.
//! - **At least once** per event that is not dropped: a request that reached the sink but whose
//!   answer was lost is sent again; receivers de-duplicate by `id` (ccm's own ingest does).
//! - **Full queue → the new event is dropped** (drop-newest): the queue keeps the oldest
//!   undelivered events, publishing stays a lock-free `try_send`, and drops are counted
//!   ([`SinkStats::dropped`]) and logged at `warn` (the first, then every
//!   [`DROP_LOG_EVERY`]th). The store's audit log, not the sink, is the record of what happened.
//! - **Retries**: connection errors, timeouts, 408, 429 and 5xx are retried with exponential
//!   backoff (`initial_backoff · 2^(n-1)`, capped at `max_backoff`, "equal jitter": half fixed,
//!   half random; a longer `Retry-After` in seconds is honoured up to `max_backoff`) until
//!   `max_attempts` attempts were made. Any other status (400, 401, 403, 404, 413, 3xx…) is
//!   permanent and not retried. An event given up on is a dead letter: counted in
//!   [`SinkStats::failed`], logged at `warn`, and handed to the optional dead-letter callback.
//! - **No URL → no-op sink**: publishing is skipped (domain.md §8) and counted in
//!   [`SinkStats::skipped`].
//! - **Shutdown**: [`SinkHandle::shutdown`] stops accepting events and delivers what is queued
//!   until the deadline (retrying as usual); what is left at the deadline, including an event
//!   in flight, is counted as dropped. Dropping every handle without shutdown lets the task
//!   deliver the rest of the queue and end.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::http::STRUCTURED_CONTENT_TYPE;
use crate::{CloudEvent, CloudEventError};

/// Default bound on one POST to the sink.
pub const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default attempts per event, the first included (the legacy service retried 5 times).
pub const DEFAULT_SINK_MAX_ATTEMPTS: u32 = 5;
/// Default delay before the first retry (the legacy service waited 1 s).
pub const DEFAULT_SINK_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Default upper bound of one retry delay.
pub const DEFAULT_SINK_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default number of events waiting for delivery before new ones are dropped.
pub const DEFAULT_SINK_QUEUE_CAPACITY: usize = 1024;
/// A drop is logged the first time and then once every this many drops.
pub const DROP_LOG_EVERY: u64 = 1000;
/// Extra time [`SinkHandle::shutdown`] waits for the task after the deadline before returning.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Where and how to deliver events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// The sink's URL (`http://` or `https://`). `None`: publishing is skipped.
    pub url: Option<String>,
    /// Bound on one POST. Default [`DEFAULT_SINK_TIMEOUT`].
    pub timeout: Duration,
    /// Attempts per event, at least 1. Default [`DEFAULT_SINK_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// Delay before the first retry. Default [`DEFAULT_SINK_INITIAL_BACKOFF`].
    pub initial_backoff: Duration,
    /// Upper bound of one retry delay. Default [`DEFAULT_SINK_MAX_BACKOFF`].
    pub max_backoff: Duration,
    /// Queue length, at least 1. Default [`DEFAULT_SINK_QUEUE_CAPACITY`].
    pub queue_capacity: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            url: None,
            timeout: DEFAULT_SINK_TIMEOUT,
            max_attempts: DEFAULT_SINK_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_SINK_INITIAL_BACKOFF,
            max_backoff: DEFAULT_SINK_MAX_BACKOFF,
            queue_capacity: DEFAULT_SINK_QUEUE_CAPACITY,
        }
    }
}

impl SinkConfig {
    /// The defaults with `url` set.
    pub fn with_url(url: impl Into<String>) -> SinkConfig {
        SinkConfig {
            url: Some(url.into()),
            ..SinkConfig::default()
        }
    }

    fn check(&self) -> Result<Option<reqwest::Url>, CloudEventError> {
        if self.max_attempts == 0 {
            return Err(CloudEventError::Config(
                "max_attempts must be at least 1".into(),
            ));
        }
        if self.queue_capacity == 0 {
            return Err(CloudEventError::Config(
                "queue_capacity must be at least 1".into(),
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(CloudEventError::Config(
                "initial_backoff must not exceed max_backoff".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(CloudEventError::Config("timeout must be positive".into()));
        }
        let Some(url) = self.url.as_deref().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| CloudEventError::Config(format!("sink URL {url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
            return Err(CloudEventError::Config(format!(
                "sink URL {url:?} must be an http:// or https:// URL"
            )));
        }
        Ok(Some(parsed))
    }
}

/// What [`SinkHandle::publish`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Queued for delivery.
    Queued,
    /// No sink is configured: nothing to do.
    Skipped,
    /// The queue was full or the sink is shut down: the event is lost.
    Dropped,
    /// The event is not a valid CloudEvent: not sent.
    Rejected,
}

/// Counters of a sink, for metrics and tests. Each is a running total except `queue_depth`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Events accepted into the queue.
    pub enqueued: u64,
    /// Events the sink acknowledged with a 2xx.
    pub published: u64,
    /// Retry attempts (attempts beyond each event's first).
    pub retried: u64,
    /// Events lost without an attempt to completion: queue full, published after shutdown, or
    /// still queued (or in flight) at the shutdown deadline.
    pub dropped: u64,
    /// Dead letters: events given up on after `max_attempts` or a permanent error.
    pub failed: u64,
    /// Events refused by validation.
    pub invalid: u64,
    /// Events not sent because no sink is configured.
    pub skipped: u64,
    /// Events waiting in the queue now.
    pub queue_depth: u64,
}

/// Called for each dead letter with the event and the reason it was given up on.
pub type DeadLetterFn = Arc<dyn Fn(&CloudEvent, &str) + Send + Sync>;

/// Anything events can be published to.
pub trait EventSink: Send + Sync + fmt::Debug {
    /// Hands `event` over. Never blocks, never fails the caller.
    fn publish(&self, event: CloudEvent) -> PublishOutcome;
}

#[derive(Debug, Default)]
struct Counters {
    enqueued: AtomicU64,
    published: AtomicU64,
    retried: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    skipped: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed) + n
    }
}

#[derive(Debug)]
struct Shared {
    counters: Counters,
    closed: AtomicBool,
    /// `Some(deadline)` once shutdown was asked for.
    shutdown: watch::Sender<Option<Instant>>,
    /// Becomes `true` when the delivery task ends.
    done: watch::Receiver<bool>,
}

/// The publishing side of a sink; cheap to clone, all clones feed the same queue.
#[derive(Clone)]
pub struct SinkHandle {
    shared: Arc<Shared>,
    /// `None` for the no-op sink.
    tx: Option<mpsc::Sender<CloudEvent>>,
}

impl fmt::Debug for SinkHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkHandle")
            .field("enabled", &self.tx.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

impl SinkHandle {
    /// Validates `event` and queues it; see [`PublishOutcome`]. Never blocks.
    pub fn publish(&self, event: CloudEvent) -> PublishOutcome {
        let counters = &self.shared.counters;
        let Some(tx) = &self.tx else {
            Counters::add(&counters.skipped, 1);
            return PublishOutcome::Skipped;
        };
        if let Err(err) = event.validate() {
            Counters::add(&counters.invalid, 1);
            tracing::warn!(id = %event.id, r#type = %event.event_type, error = %err, "invalid CloudEvent not published");
            return PublishOutcome::Rejected;
        }
        if self.shared.closed.load(Ordering::Acquire) {
            self.count_drop(&event, "sink is shut down");
            return PublishOutcome::Dropped;
        }
        match tx.try_send(event) {
            Ok(()) => {
                Counters::add(&counters.enqueued, 1);
                PublishOutcome::Queued
            }
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.count_drop(&event, "queue full");
                PublishOutcome::Dropped
            }
            Err(mpsc::error::TrySendError::Closed(event)) => {
                self.count_drop(&event, "delivery task ended");
                PublishOutcome::Dropped
            }
        }
    }

    fn count_drop(&self, event: &CloudEvent, why: &str) {
        let n = Counters::add(&self.shared.counters.dropped, 1);
        if n == 1 || n.is_multiple_of(DROP_LOG_EVERY) {
            tracing::warn!(id = %event.id, r#type = %event.event_type, dropped_total = n, "CloudEvent dropped: {why}");
        }
    }

    /// `false` for the no-op sink (no URL configured).
    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// The counters now.
    pub fn stats(&self) -> SinkStats {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let queue_depth = self
            .tx
            .as_ref()
            .map(|tx| (tx.max_capacity() - tx.capacity()) as u64)
            .unwrap_or(0);
        SinkStats {
            enqueued: load(&c.enqueued),
            published: load(&c.published),
            retried: load(&c.retried),
            dropped: load(&c.dropped),
            failed: load(&c.failed),
            invalid: load(&c.invalid),
            skipped: load(&c.skipped),
            queue_depth,
        }
    }

    /// Stops accepting events, delivers what is queued until `deadline` from now, counts the
    /// rest as dropped, and returns the final counters. Safe to call more than once (a later
    /// call does not extend an earlier deadline).
    pub async fn shutdown(&self, deadline: Duration) -> SinkStats {
        self.shared.closed.store(true, Ordering::Release);
        let at = Instant::now() + deadline;
        self.shared
            .shutdown
            .send_if_modified(|current| match current {
                Some(_) => false,
                None => {
                    *current = Some(at);
                    true
                }
            });
        let mut done = self.shared.done.clone();
        // The task ends by the deadline; the grace covers scheduling. Err: the task is gone.
        let _ = tokio::time::timeout_at(at + SHUTDOWN_GRACE, done.wait_for(|d| *d)).await;
        self.stats()
    }
}

impl EventSink for SinkHandle {
    fn publish(&self, event: CloudEvent) -> PublishOutcome {
        SinkHandle::publish(self, event)
    }
}

/// Starts HTTP sinks.
#[derive(Debug)]
pub struct HttpSink;

impl HttpSink {
    /// Starts the delivery task for `config` (see the module docs) and returns the handle to
    /// publish with and the task. With no URL the handle is a no-op and the task ends at once.
    ///
    /// Must be called inside a Tokio runtime; errors with [`CloudEventError::Config`] otherwise,
    /// and for an unusable configuration.
    pub fn spawn(config: SinkConfig) -> Result<(SinkHandle, JoinHandle<()>), CloudEventError> {
        Self::spawn_with_dead_letters(config, None)
    }

    /// Like [`HttpSink::spawn`], calling `on_dead_letter` for each event given up on.
    pub fn spawn_with_dead_letters(
        config: SinkConfig,
        on_dead_letter: Option<DeadLetterFn>,
    ) -> Result<(SinkHandle, JoinHandle<()>), CloudEventError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            CloudEventError::Config("HttpSink::spawn must be called inside a Tokio runtime".into())
        })?;
        let url = config.check()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(None);
        let (done_tx, done_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            closed: AtomicBool::new(false),
            shutdown: shutdown_tx,
            done: done_rx,
        });
        let Some(url) = url else {
            tracing::info!("no CloudEvents sink URL configured: publishing is skipped");
            // Nothing to deliver: the task ends at once.
            let _ = done_tx.send(true);
            let handle = SinkHandle { shared, tx: None };
            return Ok((handle, runtime.spawn(async {})));
        };
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ccm-cloudevents/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CloudEventError::Config(format!("cannot build the HTTP client: {e}")))?;
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let span = tracing::info_span!("cloudevents.sink", url = %redact(&url));
        let worker = Worker {
            client,
            url,
            config,
            shared: Arc::clone(&shared),
            shutdown: shutdown_rx,
            on_dead_letter,
            jitter: Jitter::default(),
        };
        let task = runtime.spawn(
            async move {
                worker.run(rx).await;
                let _ = done_tx.send(true);
            }
            .instrument(span),
        );
        Ok((
            SinkHandle {
                shared,
                tx: Some(tx),
            },
            task,
        ))
    }
}

/// Keeps every published event in memory: for tests of code that publishes, and for `ccm dev`
/// without a sink when events should be inspectable. Validates like [`SinkHandle`].
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<CloudEvent>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> MemorySink {
        MemorySink::default()
    }

    /// A copy of the events published so far, in order.
    pub fn events(&self) -> Vec<CloudEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Removes and returns the events published so far.
    pub fn take(&self) -> Vec<CloudEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl EventSink for MemorySink {
    fn publish(&self, event: CloudEvent) -> PublishOutcome {
        if event.validate().is_err() {
            return PublishOutcome::Rejected;
        }
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
        PublishOutcome::Queued
    }
}

/// How one event's delivery ended.
enum Delivery {
    Delivered,
    /// Given up: the reason.
    GaveUp(String),
    /// The shutdown deadline passed first.
    Abandoned,
}

/// What one attempt said.
enum Attempt {
    Ok,
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    Permanent(String),
}

struct Worker {
    client: reqwest::Client,
    url: reqwest::Url,
    config: SinkConfig,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<Option<Instant>>,
    on_dead_letter: Option<DeadLetterFn>,
    jitter: Jitter,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<CloudEvent>) {
        let mut shutdown_sender_gone = false;
        loop {
            let deadline = *self.shutdown.borrow();
            let event = if deadline.is_some() {
                // Draining: deliver what is queued, do not wait for more.
                match rx.try_recv() {
                    Ok(event) => event,
                    Err(_) => break,
                }
            } else {
                tokio::select! {
                    event = rx.recv() => match event {
                        Some(event) => event,
                        // Every handle is gone and the queue is empty.
                        None => break,
                    },
                    changed = self.shutdown.changed(), if !shutdown_sender_gone => {
                        if changed.is_err() {
                            shutdown_sender_gone = true;
                        }
                        continue;
                    }
                }
            };
            match self.deliver(&event).await {
                Delivery::Delivered => {
                    Counters::add(&self.shared.counters.published, 1);
                }
                Delivery::GaveUp(reason) => {
                    let n = Counters::add(&self.shared.counters.failed, 1);
                    tracing::warn!(id = %event.id, r#type = %event.event_type, failed_total = n, "CloudEvent given up (dead letter): {reason}");
                    if let Some(callback) = &self.on_dead_letter {
                        callback(&event, &reason);
                    }
                }
                Delivery::Abandoned => {
                    Counters::add(&self.shared.counters.dropped, 1);
                    break;
                }
            }
        }
        // Shutdown deadline reached (or the queue is closed): whatever is left is dropped.
        rx.close();
        let mut left = 0u64;
        while rx.try_recv().is_ok() {
            left += 1;
        }
        if left > 0 {
            Counters::add(&self.shared.counters.dropped, left);
            tracing::warn!(
                left,
                "CloudEvents sink stopped with events still queued; they are dropped"
            );
        }
        let c = &self.shared.counters;
        tracing::info!(
            published = c.published.load(Ordering::Relaxed),
            failed = c.failed.load(Ordering::Relaxed),
            dropped = c.dropped.load(Ordering::Relaxed),
            "CloudEvents sink stopped"
        );
    }

    async fn deliver(&mut self, event: &CloudEvent) -> Delivery {
        let body = match event.to_json() {
            Ok(body) => bytes::Bytes::from(body),
            Err(err) => return Delivery::GaveUp(format!("cannot encode: {err}")),
        };
        let mut attempt = 1u32;
        loop {
            let request = self
                .client
                .post(self.url.clone())
                .header(CONTENT_TYPE, STRUCTURED_CONTENT_TYPE)
                .body(body.clone())
                .send();
            let Some(result) = self.until_deadline(request).await else {
                return Delivery::Abandoned;
            };
            let (reason, retry_after) = match classify(result) {
                Attempt::Ok => return Delivery::Delivered,
                Attempt::Permanent(reason) => return Delivery::GaveUp(reason),
                Attempt::Retry {
                    reason,
                    retry_after,
                } => (reason, retry_after),
            };
            if attempt >= self.config.max_attempts {
                return Delivery::GaveUp(format!("{reason} (after {attempt} attempts)"));
            }
            let delay = self.backoff(attempt, retry_after);
            tracing::debug!(id = %event.id, attempt, delay_ms = delay.as_millis() as u64, "CloudEvent delivery failed, retrying: {reason}");
            if self
                .until_deadline(tokio::time::sleep(delay))
                .await
                .is_none()
            {
                return Delivery::Abandoned;
            }
            attempt += 1;
            Counters::add(&self.shared.counters.retried, 1);
        }
    }

    /// The delay after failed attempt `attempt` (1-based).
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .config
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.config.max_backoff);
        // Equal jitter: half fixed, half random.
        let half = exp / 2;
        let jittered = half + self.jitter.up_to(exp - half);
        match retry_after {
            Some(wanted) if wanted > jittered => wanted.min(self.config.max_backoff),
            _ => jittered,
        }
    }

    /// Runs `fut` unless the shutdown deadline passes first (`None` then).
    async fn until_deadline<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        let mut sender_gone = false;
        loop {
            let deadline = *self.shutdown.borrow();
            tokio::select! {
                out = &mut fut => return Some(out),
                _ = sleep_until_opt(deadline) => return None,
                changed = self.shutdown.changed(), if !sender_gone => {
                    if changed.is_err() {
                        sender_gone = true;
                    }
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn classify(result: Result<reqwest::Response, reqwest::Error>) -> Attempt {
    match result {
        Ok(response) => {
            let status = response.status();
            if status.is_success() {
                return Attempt::Ok;
            }
            let reason = format!("sink answered HTTP {status}");
            if status.is_server_error()
                || status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS
            {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Attempt::Retry {
                    reason,
                    retry_after,
                }
            } else {
                Attempt::Permanent(reason)
            }
        }
        Err(err) => {
            let mut reason = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                reason.push_str(": ");
                reason.push_str(&s.to_string());
                source = s.source();
            }
            Attempt::Retry {
                reason,
                retry_after: None,
            }
        }
    }
}

/// The URL without user-info and query, for logs.
fn redact(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.to_string()
}

/// Uniform random durations from the standard library's randomly keyed hasher (no RNG crate
/// needed for jitter).
#[derive(Debug, Default)]
struct Jitter {
    counter: AtomicU64,
}

impl Jitter {
    fn up_to(&self, max: Duration) -> Duration {
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        Duration::from_nanos(hasher.finish() % nanos.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(initial: Duration, max: Duration) -> Worker {
        let (shutdown_tx, shutdown_rx) = watch::channel(None);
        let (_done_tx, done_rx) = watch::channel(false);
        Worker {
            client: reqwest::Client::new(),
            url: reqwest::Url::parse("http://127.0.0.1:1/").unwrap(),
            config: SinkConfig {
                initial_backoff: initial,
                max_backoff: max,
                ..SinkConfig::default()
            },
            shared: Arc::new(Shared {
                counters: Counters::default(),
                closed: AtomicBool::new(false),
                shutdown: shutdown_tx,
                done: done_rx,
            }),
            shutdown: shutdown_rx,
            on_dead_letter: None,
            jitter: Jitter::default(),
        }
    }

    #[test]
    fn backoff_grows_exponentially_with_equal_jitter_and_cap() {
        let w = worker(Duration::from_millis(100), Duration::from_millis(1000));
        for _ in 0..200 {
            for (attempt, full) in [
                (1, 100),
                (2, 200),
                (3, 400),
                (4, 800),
                (5, 1000),
                (30, 1000),
            ] {
                let d = w.backoff(attempt, None);
                let full = Duration::from_millis(full);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: {d:?} vs {full:?}"
                );
            }
        }
        // Retry-After wins when longer, capped at max_backoff.
        assert_eq!(
            w.backoff(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            w.backoff(1, Some(Duration::from_secs(60))),
            Duration::from_millis(1000)
        );
    }

    #[test]
    fn jitter_varies() {
        let j = Jitter::default();
        let values: std::collections::BTreeSet<_> =
            (0..50).map(|_| j.up_to(Duration::from_secs(1))).collect();
        assert!(values.len() > 40, "{} distinct values", values.len());
        assert_eq!(j.up_to(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn config_checks() {
        let ok = SinkConfig::with_url("http://127.0.0.1:9/events");
        assert!(ok.check().unwrap().is_some());
        assert!(SinkConfig::default().check().unwrap().is_none());
        let blank = SinkConfig::with_url("  ");
        assert!(blank.check().unwrap().is_none());
        for bad in [
            SinkConfig {
                max_attempts: 0,
                ..ok.clone()
            },
            SinkConfig {
                queue_capacity: 0,
                ..ok.clone()
            },
            SinkConfig {
                timeout: Duration::ZERO,
                ..ok.clone()
            },
            SinkConfig {
                initial_backoff: Duration::from_secs(5),
                max_backoff: Duration::from_secs(1),
                ..ok.clone()
            },
            SinkConfig::with_url("ftp://127.0.0.1/x"),
            SinkConfig::with_url("not a url"),
        ] {
            assert!(
                matches!(bad.check(), Err(CloudEventError::Config(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn spawn_outside_a_runtime_is_an_error() {
        let err = HttpSink::spawn(SinkConfig::with_url("http://127.0.0.1:9/")).unwrap_err();
        assert!(matches!(err, CloudEventError::Config(_)), "{err:?}");
    }
}
