//! The etcd coordinator (production).
//!
//! ## Keys (under the configurable prefix, default [`DEFAULT_KEY_PREFIX`])
//!
//! | key | value | lease |
//! |---|---|---|
//! | `{prefix}{election}/leader` | the leader's candidate id | the leader's lease |
//! | `{prefix}feed/{topic}` | the latest event's payload (etcd's MVCC history is the feed) | none |
//! | `{prefix}dedup/{key}` | empty | one lease per key, with the dedup TTL |
//!
//! **Election.** A candidate grants a lease and puts the election key in a transaction that
//! succeeds only if the key does not exist (`create_revision == 0`); the key's create revision is
//! the epoch, so epochs strictly increase across leaders. A candidate that loses revokes its lease
//! and watches the key until it is deleted, then tries again. The leader renews the lease every
//! keep-alive interval over etcd's keep-alive stream and watches its own key: if the key is
//! deleted or replaced (lease revoked or expired) it declares the loss at once; if no renewal
//! succeeds before the renew deadline it steps down and tries to revoke the lease.
//!
//! **Fencing.** `leader` and `check_fence` are answered from a per-election cache kept up to date
//! by a watch on the election key. An epoch older than the cached one is stale without any I/O;
//! an epoch the cache has not seen, or any check while the cache is not in sync (watch broken,
//! etcd down), is answered by a linearizable read. A campaign won through this coordinator and a
//! resignation update the cache at once.
//!
//! **Feed.** Publishing puts the topic's key; watching is an etcd watch on it from
//! `from_revision + 1`. A compacted start revision yields [`FeedItem::Reset`]. A broken watch
//! stream is re-established from the last delivered revision (no gap, no duplicate) for up to
//! [`EtcdConfig::watch_reconnect_timeout`], then the stream yields `Unavailable`.
//!
//! Payloads are limited by etcd's `--max-request-bytes` (1.5 MiB by default); the feed is meant
//! for change notifications, not for bulk data.
//!
//! ## Timeouts and reconnection
//!
//! Every unary request runs under [`EtcdConfig::request_timeout`] and fails with `Unavailable`
//! when it passes, so nothing hangs while etcd is down. The gRPC channel reconnects by itself on
//! the next request once etcd is back (same endpoint); long-lived streams (watches, keep-alive)
//! are re-established by their tasks. HTTP/2 keep-alive pings detect dead connections while a
//! stream is open ([`DEFAULT_HTTP2_KEEPALIVE_INTERVAL`] must stay at or above etcd's
//! `--grpc-keepalive-min-time`, 5 s by default).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
    WatchStream,
};
use futures::StreamExt;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::error::{CoordError, Result};
use crate::leadership::{Leadership, LeaseControl, LeaseShared};
use crate::types::{
    FeedItem, FenceCheck, LeaderInfo, LeaseOptions, LossReason, ResetReason, validate_candidate,
    validate_dedup, validate_election, validate_topic,
};
use crate::{Coordinator, FeedStream};

/// Default key prefix (domain.md §7: `/ccm/...`).
pub const DEFAULT_KEY_PREFIX: &str = "/ccm/";
/// Default time allowed to connect and get a first answer from etcd.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default timeout of every unary etcd request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a broken feed watch keeps trying to reconnect before yielding `Unavailable`.
pub const DEFAULT_WATCH_RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default pause between attempts to re-establish a watch.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Default HTTP/2 keep-alive ping interval (etcd rejects pings more often than every 5 s).
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default time to wait for a ping answer before the connection is considered dead.
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Key segment of the feed topics.
const FEED_SEGMENT: &str = "feed/";
/// Key segment of the dedup keys.
const DEDUP_SEGMENT: &str = "dedup/";
/// Key suffix of an election key.
const LEADER_SUFFIX: &str = "/leader";

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of every key this coordinator reads or writes; a trailing `/` is added if missing.
    pub key_prefix: String,
    /// Time allowed to connect and get a first answer ([`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// Timeout of every unary request ([`DEFAULT_REQUEST_TIMEOUT`]).
    pub request_timeout: Duration,
    /// How long a broken feed watch tries to reconnect ([`DEFAULT_WATCH_RECONNECT_TIMEOUT`]).
    pub watch_reconnect_timeout: Duration,
    /// Pause between reconnection attempts ([`DEFAULT_RETRY_BACKOFF`]).
    pub retry_backoff: Duration,
    /// HTTP/2 keep-alive ping interval ([`DEFAULT_HTTP2_KEEPALIVE_INTERVAL`]).
    pub http2_keepalive_interval: Duration,
    /// HTTP/2 keep-alive ping timeout ([`DEFAULT_HTTP2_KEEPALIVE_TIMEOUT`]).
    pub http2_keepalive_timeout: Duration,
}

impl EtcdConfig {
    /// A configuration for `endpoints` with every other setting at its default.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            watch_reconnect_timeout: DEFAULT_WATCH_RECONNECT_TIMEOUT,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            http2_keepalive_interval: DEFAULT_HTTP2_KEEPALIVE_INTERVAL,
            http2_keepalive_timeout: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT,
        }
    }

    /// Replaces the key prefix.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Replaces the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Replaces the request timeout.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Replaces the watch reconnect timeout.
    pub fn watch_reconnect_timeout(mut self, timeout: Duration) -> Self {
        self.watch_reconnect_timeout = timeout;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(CoordError::InvalidArgument("no etcd endpoints".into()));
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("watch_reconnect_timeout", self.watch_reconnect_timeout),
            ("retry_backoff", self.retry_backoff),
            ("http2_keepalive_interval", self.http2_keepalive_interval),
            ("http2_keepalive_timeout", self.http2_keepalive_timeout),
        ] {
            if value.is_zero() {
                return Err(CoordError::InvalidArgument(format!(
                    "{name} must be positive"
                )));
            }
        }
        Ok(())
    }
}

/// A [`Coordinator`] backed by etcd (v3 API). Cheap to clone; clones share one connection and
/// one fencing cache. See the module documentation of the key layout and the reconnection rules.
#[derive(Debug, Clone)]
pub struct EtcdCoordinator {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: EtcdConfig,
    prefix: String,
    caches: Mutex<HashMap<String, Arc<ElectionCache>>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCoordinator")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Maps an etcd client error to a [`CoordError`].
fn map_err(context: &str, err: etcd_client::Error) -> CoordError {
    use etcd_client::Error as E;
    match err {
        E::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown => {
                CoordError::Unavailable(format!("{context}: {}", status.message()))
            }
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                CoordError::InvalidArgument(format!("{context}: {}", status.message()))
            }
            code => CoordError::Internal(format!("{context}: {code:?}: {}", status.message())),
        },
        E::TransportError(e) => CoordError::Unavailable(format!("{context}: {e}")),
        E::IoError(e) => CoordError::Unavailable(format!("{context}: {e}")),
        E::WatchError(e) | E::LeaseKeepAliveError(e) => {
            CoordError::Unavailable(format!("{context}: {e}"))
        }
        E::InvalidArgs(e) => CoordError::InvalidArgument(format!("{context}: {e}")),
        E::InvalidUri(e) => CoordError::InvalidArgument(format!("{context}: {e}")),
        other => CoordError::Internal(format!("{context}: {other}")),
    }
}

/// Runs one etcd request under `timeout`; a timeout is `Unavailable`.
async fn timed<T, F>(timeout: Duration, context: &str, request: F) -> Result<T>
where
    F: Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(map_err(context, err)),
        Err(_) => Err(CoordError::Unavailable(format!(
            "{context}: no answer from etcd within {timeout:?}"
        ))),
    }
}

fn to_u64(revision: i64) -> Result<u64> {
    u64::try_from(revision)
        .map_err(|_| CoordError::Internal(format!("negative revision {revision} from etcd")))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| CoordError::Internal("etcd response without a header".into()))
}

fn leader_of(kv: &KeyValue) -> LeaderInfo {
    LeaderInfo {
        holder: String::from_utf8_lossy(kv.value()).into_owned(),
        epoch: kv.create_revision(),
    }
}

/// Whole seconds for an etcd lease TTL (rounded up, at least 1).
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Opens a watch on `key` from `start_revision` (0 = from now) and waits for etcd's "created"
/// answer, which etcd-client returns as the stream's first message. Returns the stream and the
/// revision the watch was created at.
async fn open_watch(
    client: &Client,
    key: &str,
    start_revision: i64,
    timeout: Duration,
) -> Result<(WatchStream, i64)> {
    let mut options = WatchOptions::new();
    if start_revision > 0 {
        options = options.with_start_revision(start_revision);
    }
    let mut watch_client = client.watch_client();
    let open = async {
        let mut stream = watch_client.watch(key, Some(options)).await?;
        let created = stream.message().await?;
        Ok::<_, etcd_client::Error>((stream, created))
    };
    let (stream, created) = timed(timeout, "opening a watch", open).await?;
    match created {
        Some(resp) if resp.created() => Ok((stream, header_revision(resp.header())?)),
        Some(_) => Err(CoordError::Internal(
            "etcd watch: first message is not the created response".into(),
        )),
        None => Err(CoordError::Unavailable(
            "etcd closed the watch stream before creating it".into(),
        )),
    }
}

impl EtcdCoordinator {
    /// Connects to etcd and checks that it answers within the connect timeout (`Unavailable` if it
    /// does not, `InvalidArgument` for a bad configuration).
    #[tracing::instrument(level = "info", skip(config), fields(endpoints = ?config.endpoints, prefix = %config.key_prefix))]
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        config.validate()?;
        let mut prefix = config.key_prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        // No per-request gRPC timeout here: it would also cut long-lived watch and keep-alive
        // streams. Unary requests get `request_timeout` from `timed` instead.
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(
                config.http2_keepalive_interval,
                config.http2_keepalive_timeout,
            );
        let client = timed(
            config.connect_timeout,
            "connecting to etcd",
            Client::connect(config.endpoints.clone(), Some(options)),
        )
        .await?;
        let mut probe = client.clone();
        timed(
            config.connect_timeout,
            "first request to etcd",
            probe.status(),
        )
        .await?;
        Ok(EtcdCoordinator {
            inner: Arc::new(Inner {
                client,
                config,
                prefix,
                caches: Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// The key prefix in use (always ends with `/`).
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The etcd key of `election`.
    pub fn election_key(&self, election: &str) -> String {
        format!("{}{election}{LEADER_SUFFIX}", self.inner.prefix)
    }

    /// The etcd key of `topic`'s feed.
    pub fn feed_key(&self, topic: &str) -> String {
        format!("{}{FEED_SEGMENT}{topic}", self.inner.prefix)
    }

    /// The etcd key of a dedup key.
    pub fn dedup_key(&self, key: &str) -> String {
        format!("{}{DEDUP_SEGMENT}{key}", self.inner.prefix)
    }

    fn timeout(&self) -> Duration {
        self.inner.config.request_timeout
    }

    /// The election's cache, starting its watcher on first use.
    fn cache(&self, election: &str) -> Arc<ElectionCache> {
        let mut caches = self.inner.caches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cache) = caches.get(election) {
            return cache.clone();
        }
        let cache = Arc::new(ElectionCache::default());
        caches.insert(election.to_owned(), cache.clone());
        tokio::spawn(cache_watcher(
            self.inner.client.clone(),
            self.election_key(election),
            cache.clone(),
            self.inner.config.clone(),
            self.inner.shutdown.child_token(),
        ));
        cache
    }

    /// Linearizable read of the election key; updates the cache.
    async fn read_leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        let key = self.election_key(election);
        let mut client = self.inner.client.clone();
        let resp = timed(self.timeout(), "reading the leader", client.get(key, None)).await?;
        let revision = header_revision(resp.header())?;
        let leader = resp.kvs().first().map(leader_of);
        self.cache(election).apply(revision, leader.clone());
        Ok(leader)
    }

    async fn revoke(&self, lease: i64) -> Result<i64> {
        let mut client = self.inner.client.clone();
        let resp = timed(
            self.timeout(),
            "revoking a lease",
            client.lease_revoke(lease),
        )
        .await?;
        header_revision(resp.header())
    }

    /// Waits until `key` is deleted (watching from `after + 1`), re-reading it every `recheck` in
    /// case a watch event was missed.
    async fn wait_for_delete(&self, key: &str, after: i64, recheck: Duration) -> Result<()> {
        let (mut stream, _) =
            open_watch(&self.inner.client, key, after + 1, self.timeout()).await?;
        let mut tick = tokio::time::interval_at(Instant::now() + recheck, recheck);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let msg = msg.map_err(|e| map_err("watching the election", e))?;
                    let Some(resp) = msg else {
                        return Err(CoordError::Unavailable("election watch closed".into()));
                    };
                    if resp.canceled() || resp.compact_revision() > 0 {
                        // Start over with a fresh read: the caller retries the transaction.
                        return Ok(());
                    }
                    if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    let mut client = self.inner.client.clone();
                    let resp = timed(self.timeout(), "re-reading the election", client.get(key, Some(GetOptions::new().with_keys_only()))).await?;
                    if resp.kvs().is_empty() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Revokes a granted lease when dropped while armed (a cancelled campaign must not leave a
/// candidacy or a leadership behind).
struct LeaseGuard {
    client: Client,
    lease: i64,
    timeout: Duration,
    armed: bool,
}

impl LeaseGuard {
    fn disarm(mut self) -> i64 {
        self.armed = false;
        self.lease
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut client = self.client.clone();
        let lease = self.lease;
        let timeout = self.timeout;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(err) = timed(timeout, "revoking a withdrawn lease", client.lease_revoke(lease)).await {
                    tracing::debug!(error = %err, lease, "revoking a withdrawn lease failed; it expires after its TTL");
                }
            });
        }
    }
}

#[derive(Debug, Default)]
struct ElectionCache {
    state: RwLock<CacheState>,
}

#[derive(Debug, Default, Clone)]
struct CacheState {
    /// Whether the watch is established and every change after `revision` will be applied.
    synced: bool,
    /// The revision at which `leader` was known.
    revision: i64,
    leader: Option<LeaderInfo>,
}

impl ElectionCache {
    /// Records that `leader` was the leader at `revision` (ignored if older than what is known).
    fn apply(&self, revision: i64, leader: Option<LeaderInfo>) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if revision > state.revision {
            state.revision = revision;
            state.leader = leader;
        }
    }

    fn set_synced(&self, synced: bool) {
        self.state.write().unwrap_or_else(|p| p.into_inner()).synced = synced;
    }

    fn snapshot(&self) -> CacheState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Keeps an election cache in sync: read, then watch from the read revision; on any failure mark
/// it out of sync (readers fall back to etcd) and start over.
async fn cache_watcher(
    client: Client,
    key: String,
    cache: Arc<ElectionCache>,
    config: EtcdConfig,
    shutdown: CancellationToken,
) {
    loop {
        let synced_run = async {
            let mut kv = client.clone();
            let resp = timed(
                config.request_timeout,
                "reading the leader",
                kv.get(key.as_str(), None),
            )
            .await?;
            let revision = header_revision(resp.header())?;
            cache.apply(revision, resp.kvs().first().map(leader_of));
            let (mut stream, _) =
                open_watch(&client, &key, revision + 1, config.request_timeout).await?;
            cache.set_synced(true);
            loop {
                let Some(resp) = stream
                    .message()
                    .await
                    .map_err(|e| map_err("watching the leader", e))?
                else {
                    return Err::<(), _>(CoordError::Unavailable("leader watch closed".into()));
                };
                if resp.canceled() || resp.compact_revision() > 0 {
                    return Err(CoordError::Unavailable(format!(
                        "leader watch cancelled: {}",
                        resp.cancel_reason()
                    )));
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => cache.apply(kv.mod_revision(), Some(leader_of(kv))),
                        EventType::Delete => cache.apply(kv.mod_revision(), None),
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = synced_run => {
                cache.set_synced(false);
                if let Err(err) = result {
                    tracing::debug!(error = %err, %key, "leader cache out of sync; retrying");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.retry_backoff) => {}
        }
    }
}

struct EtcdLease {
    client: Client,
    lease: i64,
    stop: CancellationToken,
    timeout: Duration,
    cache: Arc<ElectionCache>,
    epoch: i64,
}

impl std::fmt::Debug for EtcdLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLease")
            .field("lease", &self.lease)
            .field("epoch", &self.epoch)
            .finish()
    }
}

#[async_trait]
impl LeaseControl for EtcdLease {
    async fn release(&self) -> Result<()> {
        self.stop.cancel();
        let mut client = self.client.clone();
        let revoke = client.lease_revoke(self.lease);
        let resp = match tokio::time::timeout(self.timeout, revoke).await {
            Ok(Ok(resp)) => resp,
            // The lease already expired or was revoked: nothing left to release.
            Ok(Err(etcd_client::Error::GRpcStatus(status)))
                if status.code() == tonic::Code::NotFound =>
            {
                return Ok(());
            }
            Ok(Err(err)) => return Err(map_err("revoking the leader lease", err)),
            Err(_) => {
                return Err(CoordError::Unavailable(format!(
                    "revoking the leader lease: no answer from etcd within {:?}",
                    self.timeout
                )));
            }
        };
        let revision = header_revision(resp.header())?;
        // Our key is gone as of `revision` (a newer leader has a greater revision and wins).
        let ours = self
            .cache
            .snapshot()
            .leader
            .is_some_and(|l| l.epoch == self.epoch);
        if ours {
            self.cache.apply(revision, None);
        }
        Ok(())
    }

    fn stop_renewing(&self) {
        self.stop.cancel();
    }
}

/// Everything the keep-alive task of one leadership needs.
struct KeepAlive {
    client: Client,
    key: String,
    lease: i64,
    epoch: i64,
    opts: LeaseOptions,
    shared: Arc<LeaseShared>,
    stop: CancellationToken,
    /// When the last successful renewal (here: the grant) was sent.
    last_renewal: Instant,
    timeout: Duration,
}

async fn next_keepalive(
    keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> std::result::Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error> {
    match keeper {
        Some((_, stream)) => stream.message().await,
        None => std::future::pending().await,
    }
}

async fn next_watch(
    watch: &mut Option<WatchStream>,
) -> std::result::Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match watch {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// Outcome of looking at the leader key's watch.
enum KeyState {
    Ours,
    Gone,
}

fn key_state(resp: &etcd_client::WatchResponse, epoch: i64) -> KeyState {
    for event in resp.events() {
        match (event.event_type(), event.kv()) {
            (EventType::Delete, _) => return KeyState::Gone,
            (EventType::Put, Some(kv)) if kv.create_revision() != epoch => return KeyState::Gone,
            _ => {}
        }
    }
    KeyState::Ours
}

impl KeepAlive {
    #[tracing::instrument(level = "debug", skip(self), fields(key = %self.key, epoch = self.epoch, lease = self.lease))]
    async fn run(self) {
        let KeepAlive {
            client,
            key,
            lease,
            epoch,
            opts,
            shared,
            stop,
            mut last_renewal,
            timeout,
        } = self;
        let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        let mut in_flight: VecDeque<Instant> = VecDeque::new();
        // Bounded by the renew deadline like every other wait in this task.
        let first_deadline = last_renewal + opts.renew_deadline;
        let mut key_watch: Option<WatchStream> = match tokio::time::timeout_at(
            first_deadline,
            open_watch(&client, &key, epoch + 1, timeout),
        )
        .await
        {
            Ok(Ok((stream, _))) => Some(stream),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot watch the leader key yet");
                None
            }
            Err(_) => None,
        };
        let mut tick = tokio::time::interval_at(
            Instant::now() + opts.keepalive_interval,
            opts.keepalive_interval,
        );
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let lose = |reason: LossReason| {
            if shared.declare_lost(reason) {
                tracing::warn!(%reason, "leadership lost");
            }
        };
        loop {
            let deadline = last_renewal + opts.renew_deadline;
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    lose(LossReason::RenewDeadlineMissed);
                    if !shared.is_suspended() {
                        let mut c = client.clone();
                        if let Err(err) = timed(timeout, "revoking a lapsed lease", c.lease_revoke(lease)).await {
                            tracing::debug!(error = %err, "revoking the lapsed lease failed; it expires after its TTL");
                        }
                    }
                    return;
                }
                msg = next_watch(&mut key_watch) => match msg {
                    Ok(Some(resp)) if resp.canceled() || resp.compact_revision() > 0 => key_watch = None,
                    Ok(Some(resp)) => {
                        if let KeyState::Gone = key_state(&resp, epoch) {
                            lose(LossReason::LeaseLost);
                            return;
                        }
                    }
                    Ok(None) | Err(_) => key_watch = None,
                },
                msg = next_keepalive(&mut keeper) => match msg {
                    Ok(Some(resp)) if resp.ttl() > 0 => {
                        if let Some(sent) = in_flight.pop_front() {
                            last_renewal = last_renewal.max(sent);
                        }
                    }
                    Ok(Some(_)) => {
                        lose(LossReason::LeaseLost);
                        return;
                    }
                    Ok(None) | Err(_) => {
                        keeper = None;
                        in_flight.clear();
                    }
                },
                _ = tick.tick() => {
                    if shared.is_suspended() {
                        continue;
                    }
                    if key_watch.is_none() {
                        let reopen = reopen_key_watch(&client, &key, epoch, timeout);
                        match tokio::time::timeout_at(deadline, reopen).await {
                            Ok(Ok(Some(stream))) => key_watch = Some(stream),
                            Ok(Ok(None)) => {
                                lose(LossReason::LeaseLost);
                                return;
                            }
                            Ok(Err(err)) => tracing::debug!(error = %err, "re-watching the leader key failed"),
                            Err(_) => continue,
                        }
                    }
                    let sent = Instant::now();
                    match keeper.as_mut() {
                        Some((k, _)) => {
                            match tokio::time::timeout_at(deadline, k.keep_alive()).await {
                                Ok(Ok(())) => in_flight.push_back(sent),
                                _ => {
                                    keeper = None;
                                    in_flight.clear();
                                }
                            }
                        }
                        None => {
                            let mut lease_client = client.lease_client();
                            let open = tokio::time::timeout_at(deadline, lease_client.keep_alive(lease)).await;
                            match open {
                                // Opening the stream sends one renewal and waits for its answer.
                                Ok(Ok(pair)) => {
                                    keeper = Some(pair);
                                    last_renewal = last_renewal.max(sent);
                                }
                                Ok(Err(etcd_client::Error::LeaseKeepAliveError(msg))) if msg.contains("not found") => {
                                    lose(LossReason::LeaseLost);
                                    return;
                                }
                                Ok(Err(err)) => tracing::debug!(error = %err, "lease keep-alive failed"),
                                Err(_) => tracing::debug!("lease keep-alive timed out"),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Reads the leader key: `Some(watch)` if it is still ours (watching from the read revision),
/// `None` if it is gone or belongs to someone else.
async fn reopen_key_watch(
    client: &Client,
    key: &str,
    epoch: i64,
    timeout: Duration,
) -> Result<Option<WatchStream>> {
    let mut kv = client.clone();
    let resp = timed(timeout, "re-reading the leader key", kv.get(key, None)).await?;
    let revision = header_revision(resp.header())?;
    if resp.kvs().first().map(KeyValue::create_revision) != Some(epoch) {
        return Ok(None);
    }
    let (stream, _) = open_watch(client, key, revision + 1, timeout).await?;
    Ok(Some(stream))
}

/// State of one feed watch stream.
struct FeedWatch {
    client: Client,
    key: String,
    config: EtcdConfig,
    /// The last revision delivered (or the creation revision for a watch "from now").
    last: i64,
    stream: Option<WatchStream>,
    pending: VecDeque<Result<FeedItem>>,
    done: bool,
}

impl FeedWatch {
    /// Turns one watch response into items; returns false when the stream must end.
    fn absorb(&mut self, resp: &etcd_client::WatchResponse) -> bool {
        if resp.compact_revision() > 0 {
            let item = FeedItem::Reset {
                reason: ResetReason::Compacted {
                    compact_revision: u64::try_from(resp.compact_revision()).unwrap_or_default(),
                },
            };
            self.pending.push_back(Ok(item));
            return false;
        }
        if resp.canceled() {
            let item = FeedItem::Reset {
                reason: ResetReason::Cancelled {
                    reason: resp.cancel_reason().to_owned(),
                },
            };
            self.pending.push_back(Ok(item));
            return false;
        }
        for event in resp.events() {
            if event.event_type() != EventType::Put {
                continue;
            }
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            if revision <= self.last {
                continue;
            }
            self.last = revision;
            match to_u64(revision) {
                Ok(revision) => self.pending.push_back(Ok(FeedItem::Event {
                    revision,
                    payload: Bytes::copy_from_slice(kv.value()),
                })),
                Err(err) => {
                    self.pending.push_back(Err(err));
                    return false;
                }
            }
        }
        true
    }

    /// Re-establishes the watch from `last + 1`, retrying until the reconnect timeout.
    async fn reconnect(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.config.watch_reconnect_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt_timeout = remaining.min(self.config.request_timeout);
            let err = if attempt_timeout.is_zero() {
                CoordError::Unavailable("feed watch could not reconnect in time".into())
            } else {
                match open_watch(&self.client, &self.key, self.last + 1, attempt_timeout).await {
                    Ok((stream, _)) => {
                        self.stream = Some(stream);
                        return Ok(());
                    }
                    Err(err) => err,
                }
            };
            if Instant::now() + self.config.retry_backoff >= deadline {
                return Err(CoordError::Unavailable(format!(
                    "feed watch lost and not re-established within {:?}: {err}",
                    self.config.watch_reconnect_timeout
                )));
            }
            tokio::time::sleep(self.config.retry_backoff).await;
        }
    }

    async fn next_item(mut self) -> Option<(Result<FeedItem>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                if let Err(err) = self.reconnect().await {
                    self.done = true;
                    return Some((Err(err), self));
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    if !self.absorb(&resp) {
                        self.done = true;
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::debug!(key = %self.key, last = self.last, "feed watch broken; reconnecting");
                    self.stream = None;
                }
            }
        }
    }
}

#[async_trait]
impl Coordinator for EtcdCoordinator {
    #[tracing::instrument(level = "debug", skip(self, opts))]
    async fn campaign(
        &self,
        election: &str,
        candidate_id: &str,
        opts: LeaseOptions,
    ) -> Result<Leadership> {
        validate_election(election)?;
        validate_candidate(candidate_id)?;
        opts.validate()?;
        let key = self.election_key(election);
        let timeout = self.timeout();
        loop {
            let granted_at = Instant::now();
            let mut client = self.inner.client.clone();
            let grant = timed(
                timeout,
                "granting a lease",
                client.lease_grant(ttl_secs(opts.ttl), None),
            )
            .await?;
            let guard = LeaseGuard {
                client: self.inner.client.clone(),
                lease: grant.id(),
                timeout,
                armed: true,
            };
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    candidate_id,
                    Some(PutOptions::new().with_lease(guard.lease)),
                )])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = timed(timeout, "putting the election key", client.txn(txn)).await?;
            let revision = header_revision(resp.header())?;
            if resp.succeeded() {
                let info = LeaderInfo {
                    holder: candidate_id.to_owned(),
                    epoch: revision,
                };
                let cache = self.cache(election);
                cache.apply(revision, Some(info.clone()));
                let lease = guard.disarm();
                let shared = LeaseShared::new();
                let stop = CancellationToken::new();
                tokio::spawn(
                    KeepAlive {
                        client: self.inner.client.clone(),
                        key: key.clone(),
                        lease,
                        epoch: revision,
                        opts,
                        shared: shared.clone(),
                        stop: stop.clone(),
                        last_renewal: granted_at,
                        timeout,
                    }
                    .run(),
                );
                let control = EtcdLease {
                    client: self.inner.client.clone(),
                    lease,
                    stop,
                    timeout,
                    cache,
                    epoch: revision,
                };
                tracing::info!(epoch = revision, "won the election");
                return Ok(Leadership::new(
                    election.to_owned(),
                    info,
                    shared,
                    Box::new(control),
                ));
            }
            let holder = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(leader_of),
                _ => None,
            });
            // Lost: withdraw this attempt's lease, then wait for the key to go.
            let lease = guard.disarm();
            if let Err(err) = self.revoke(lease).await {
                tracing::debug!(error = %err, lease, "revoking a losing lease failed; it expires after its TTL");
            }
            if let Some(holder) = holder {
                self.cache(election).apply(revision, Some(holder));
                self.wait_for_delete(&key, revision, opts.ttl).await?;
            }
        }
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        validate_election(election)?;
        let cached = self.cache(election).snapshot();
        if cached.synced {
            return Ok(cached.leader);
        }
        self.read_leader(election).await
    }

    async fn check_fence(&self, election: &str, epoch: i64) -> Result<FenceCheck> {
        validate_election(election)?;
        let cached = self.cache(election).snapshot();
        if cached.synced {
            match &cached.leader {
                Some(l) if l.epoch == epoch => return Ok(FenceCheck::Current),
                Some(l) if l.epoch > epoch => {
                    return Ok(FenceCheck::Stale {
                        current: cached.leader,
                    });
                }
                None if cached.revision >= epoch => {
                    return Ok(FenceCheck::Stale { current: None });
                }
                // An epoch newer than the cache: ask etcd.
                _ => {}
            }
        }
        Ok(match self.read_leader(election).await? {
            Some(l) if l.epoch == epoch => FenceCheck::Current,
            current => FenceCheck::Stale { current },
        })
    }

    async fn publish(&self, topic: &str, payload: Bytes) -> Result<u64> {
        validate_topic(topic)?;
        let mut client = self.inner.client.clone();
        let resp = timed(
            self.timeout(),
            "publishing",
            client.put(self.feed_key(topic), payload.to_vec(), None),
        )
        .await?;
        to_u64(header_revision(resp.header())?)
    }

    async fn watch(&self, topic: &str, from_revision: Option<u64>) -> Result<FeedStream> {
        validate_topic(topic)?;
        let key = self.feed_key(topic);
        let start = match from_revision {
            Some(from) => i64::try_from(from)
                .ok()
                .and_then(|f| f.checked_add(1))
                .ok_or_else(|| {
                    CoordError::InvalidArgument(format!("revision {from} out of range"))
                })?,
            None => 0,
        };
        let (stream, created_at) =
            open_watch(&self.inner.client, &key, start, self.timeout()).await?;
        let state = FeedWatch {
            client: self.inner.client.clone(),
            key,
            config: self.inner.config.clone(),
            last: if start > 0 { start - 1 } else { created_at },
            stream: Some(stream),
            pending: VecDeque::new(),
            done: false,
        };
        Ok(futures::stream::unfold(state, FeedWatch::next_item).boxed())
    }

    async fn feed_revision(&self) -> Result<u64> {
        let mut client = self.inner.client.clone();
        let resp = timed(
            self.timeout(),
            "reading the revision",
            client.get(
                self.inner.prefix.as_str(),
                Some(GetOptions::new().with_count_only()),
            ),
        )
        .await?;
        to_u64(header_revision(resp.header())?)
    }

    async fn compact_feed(&self, revision: u64) -> Result<()> {
        let rev = i64::try_from(revision).map_err(|_| {
            CoordError::InvalidArgument(format!("revision {revision} out of range"))
        })?;
        let mut client = self.inner.client.clone();
        match timed(self.timeout(), "compacting", client.compact(rev, None)).await {
            Ok(_) => Ok(()),
            Err(CoordError::InvalidArgument(msg)) if msg.contains("compacted") => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn dedup(&self, key: &str, ttl: Duration) -> Result<bool> {
        validate_dedup(key, ttl)?;
        let key = self.dedup_key(key);
        let mut client = self.inner.client.clone();
        let grant = timed(
            self.timeout(),
            "granting a dedup lease",
            client.lease_grant(ttl_secs(ttl), None),
        )
        .await?;
        let guard = LeaseGuard {
            client: self.inner.client.clone(),
            lease: grant.id(),
            timeout: self.timeout(),
            armed: true,
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                Vec::<u8>::new(),
                Some(PutOptions::new().with_lease(guard.lease)),
            )]);
        let resp = timed(self.timeout(), "recording a dedup key", client.txn(txn)).await?;
        if resp.succeeded() {
            guard.disarm();
            Ok(true)
        } else {
            // Drop the unused lease now rather than letting it live for the TTL.
            let lease = guard.disarm();
            if let Err(err) = self.revoke(lease).await {
                tracing::debug!(error = %err, "revoking an unused dedup lease failed");
            }
            Ok(false)
        }
    }

    async fn ping(&self) -> Result<()> {
        let mut client = self.inner.client.clone();
        timed(self.timeout(), "ping", client.status())
            .await
            .map(|_| ())
    }
}
