//! The in-process coordinator for single-node `ccm dev` and simulations.
//!
//! Same semantics as etcd inside one process: leases expire on a timer when their holder stops
//! renewing them (a [`Leadership`] dropped without resigning frees the election after the TTL),
//! epochs and feed revisions come from one global revision counter, and the feed keeps a bounded
//! history per topic for resumption. All timing uses tokio's clock, so it also works on a paused
//! (virtual) clock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::error::{CoordError, Result};
use crate::leadership::{Leadership, LeaseControl, LeaseShared};
use crate::types::{
    FeedItem, FenceCheck, LeaderInfo, LeaseOptions, LossReason, ResetReason, validate_candidate,
    validate_dedup, validate_election, validate_topic,
};
use crate::{Coordinator, FeedStream};

/// Default capacity of a topic's live-event buffer: a watcher that falls this many events behind
/// gets [`FeedItem::Reset`] with [`ResetReason::Lagged`].
pub const DEFAULT_WATCH_BUFFER: usize = 1024;
/// Default number of past events kept per topic for watches that resume from a revision.
pub const DEFAULT_FEED_HISTORY: usize = 10_000;
/// Expired dedup keys are purged once the map has grown by this factor since the last purge.
const DEDUP_PURGE_GROWTH: usize = 2;
/// Smallest dedup map size that triggers a purge of expired keys.
const DEDUP_PURGE_MIN: usize = 1024;

/// Tuning of an [`InProcessCoordinator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InProcessConfig {
    /// Live-event buffer per topic (see [`DEFAULT_WATCH_BUFFER`]).
    pub watch_buffer: usize,
    /// Past events kept per topic (see [`DEFAULT_FEED_HISTORY`]).
    pub feed_history: usize,
}

impl Default for InProcessConfig {
    fn default() -> Self {
        InProcessConfig {
            watch_buffer: DEFAULT_WATCH_BUFFER,
            feed_history: DEFAULT_FEED_HISTORY,
        }
    }
}

/// A [`Coordinator`] inside one process. Clones share the same state (they behave like several
/// replicas on one backend).
#[derive(Debug, Clone)]
pub struct InProcessCoordinator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: InProcessConfig,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Global revision: bumped by every election change and every published event.
    revision: u64,
    /// Feed history below this revision has been discarded by `compact_feed`.
    compact_revision: u64,
    next_lease: u64,
    elections: HashMap<String, Election>,
    topics: HashMap<String, Topic>,
    dedup: HashMap<String, Instant>,
    dedup_purged_at_len: usize,
}

#[derive(Debug)]
struct Election {
    holder: Option<Holder>,
    /// Bumped (to the global revision) on every change of `holder`.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Clone)]
struct Holder {
    info: LeaderInfo,
    lease: u64,
    expires_at: Instant,
}

#[derive(Debug)]
struct Topic {
    history: VecDeque<(u64, Bytes)>,
    /// Highest revision of an event dropped from `history` (0 if none).
    dropped_through: u64,
    live: broadcast::Sender<(u64, Bytes)>,
}

impl Default for InProcessCoordinator {
    fn default() -> Self {
        Self::new(InProcessConfig::default())
    }
}

impl InProcessCoordinator {
    /// A new, empty coordinator.
    pub fn new(config: InProcessConfig) -> Self {
        let config = InProcessConfig {
            watch_buffer: config.watch_buffer.max(1),
            feed_history: config.feed_history.max(1),
        };
        InProcessCoordinator {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State::default()),
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is updated with plain assignments only; a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn election(&mut self, name: &str) -> &mut Election {
        self.elections
            .entry(name.to_owned())
            .or_insert_with(|| Election {
                holder: None,
                changed: watch::channel(0).0,
            })
    }

    fn bump(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Removes the holder of `election` if it still holds `lease`. Returns whether it did.
    fn release(&mut self, election: &str, lease: u64) -> bool {
        let held = matches!(
            self.elections.get(election).and_then(|e| e.holder.as_ref()),
            Some(h) if h.lease == lease
        );
        if held {
            let revision = self.bump();
            let e = self.election(election);
            e.holder = None;
            e.changed.send_replace(revision);
        }
        held
    }

    fn holds(&self, election: &str, lease: u64) -> Option<&Holder> {
        self.elections
            .get(election)
            .and_then(|e| e.holder.as_ref())
            .filter(|h| h.lease == lease)
    }

    fn topic(&mut self, name: &str, buffer: usize) -> &mut Topic {
        self.topics.entry(name.to_owned()).or_insert_with(|| Topic {
            history: VecDeque::new(),
            dropped_through: 0,
            live: broadcast::channel(buffer).0,
        })
    }
}

#[derive(Debug)]
struct InProcessLease {
    inner: Arc<Inner>,
    election: String,
    lease: u64,
    stop: CancellationToken,
}

#[async_trait]
impl LeaseControl for InProcessLease {
    async fn release(&self) -> Result<()> {
        self.stop.cancel();
        self.inner.lock().release(&self.election, self.lease);
        Ok(())
    }

    fn stop_renewing(&self) {
        self.stop.cancel();
    }
}

/// Renews the lease every keep-alive interval and declares the loss when the renew deadline
/// passes without a renewal or when the election no longer belongs to this lease.
async fn keepalive_task(
    inner: Arc<Inner>,
    election: String,
    lease: u64,
    opts: LeaseOptions,
    shared: Arc<LeaseShared>,
    stop: CancellationToken,
    mut changed: watch::Receiver<u64>,
) {
    let mut last_renewal = Instant::now();
    let mut tick = tokio::time::interval_at(
        Instant::now() + opts.keepalive_interval,
        opts.keepalive_interval,
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(last_renewal + opts.renew_deadline) => {
                tracing::warn!(%election, "renew deadline missed; stepping down");
                shared.declare_lost(LossReason::RenewDeadlineMissed);
                return;
            }
            res = changed.changed() => {
                let still_held = res.is_ok() && inner.lock().holds(&election, lease).is_some();
                if !still_held {
                    tracing::warn!(%election, "lease gone; stepping down");
                    shared.declare_lost(LossReason::LeaseLost);
                    return;
                }
            }
            _ = tick.tick() => {
                if shared.is_suspended() {
                    continue;
                }
                let now = Instant::now();
                let renewed = {
                    let mut state = inner.lock();
                    match state
                        .elections
                        .get_mut(&election)
                        .and_then(|e| e.holder.as_mut())
                        .filter(|h| h.lease == lease)
                    {
                        Some(holder) => {
                            holder.expires_at = now + opts.ttl;
                            true
                        }
                        None => false,
                    }
                };
                if renewed {
                    last_renewal = now;
                } else {
                    shared.declare_lost(LossReason::LeaseLost);
                    return;
                }
            }
        }
    }
}

/// Expires the lease when it has not been renewed for its TTL (runs even after the holder's
/// handle was dropped; ends when the lease no longer holds the election).
async fn expiry_task(inner: Arc<Inner>, election: String, lease: u64) {
    loop {
        let Some(expires_at) = inner.lock().holds(&election, lease).map(|h| h.expires_at) else {
            return;
        };
        tokio::time::sleep_until(expires_at).await;
        let mut state = inner.lock();
        match state.holds(&election, lease) {
            Some(h) if h.expires_at <= Instant::now() => {
                state.release(&election, lease);
                tracing::info!(%election, lease, "lease expired");
                return;
            }
            Some(_) => continue,
            None => return,
        }
    }
}

#[async_trait]
impl Coordinator for InProcessCoordinator {
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
        loop {
            let mut changed = {
                let mut state = self.inner.lock();
                if state.election(election).holder.is_none() {
                    let epoch = state.bump();
                    state.next_lease += 1;
                    let lease = state.next_lease;
                    let info = LeaderInfo {
                        holder: candidate_id.to_owned(),
                        epoch: i64::try_from(epoch).map_err(|_| {
                            CoordError::Internal("revision counter overflow".into())
                        })?,
                    };
                    let e = state.election(election);
                    e.holder = Some(Holder {
                        info: info.clone(),
                        lease,
                        expires_at: Instant::now() + opts.ttl,
                    });
                    e.changed.send_replace(epoch);
                    let changed = e.changed.subscribe();
                    drop(state);
                    return Ok(self.grant(election, info, lease, opts, changed));
                }
                state.election(election).changed.subscribe()
            };
            // The receiver was created under the lock, so no change after the check is missed.
            if changed.changed().await.is_err() {
                return Err(CoordError::Internal("election state dropped".into()));
            }
        }
    }

    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>> {
        validate_election(election)?;
        let state = self.inner.lock();
        Ok(state
            .elections
            .get(election)
            .and_then(|e| e.holder.as_ref())
            .map(|h| h.info.clone()))
    }

    async fn check_fence(&self, election: &str, epoch: i64) -> Result<FenceCheck> {
        let current = self.leader(election).await?;
        Ok(match current {
            Some(info) if info.epoch == epoch => FenceCheck::Current,
            current => FenceCheck::Stale { current },
        })
    }

    async fn publish(&self, topic: &str, payload: Bytes) -> Result<u64> {
        validate_topic(topic)?;
        let history_cap = self.inner.config.feed_history;
        let buffer = self.inner.config.watch_buffer;
        let mut state = self.inner.lock();
        let revision = state.bump();
        let t = state.topic(topic, buffer);
        t.history.push_back((revision, payload.clone()));
        while t.history.len() > history_cap {
            if let Some((dropped, _)) = t.history.pop_front() {
                t.dropped_through = dropped;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = t.live.send((revision, payload));
        Ok(revision)
    }

    async fn watch(&self, topic: &str, from_revision: Option<u64>) -> Result<FeedStream> {
        validate_topic(topic)?;
        let buffer = self.inner.config.watch_buffer;
        let mut state = self.inner.lock();
        let compact_revision = state.compact_revision;
        let t = state.topic(topic, buffer);
        let receiver = t.live.subscribe();
        let (backlog, after) = match from_revision {
            Some(from) => {
                let lost = t.dropped_through > from || from.saturating_add(1) < compact_revision;
                if lost {
                    let floor = compact_revision.max(t.dropped_through.saturating_add(1));
                    let reset = FeedItem::Reset {
                        reason: ResetReason::Compacted {
                            compact_revision: floor,
                        },
                    };
                    return Ok(futures::stream::iter([Ok(reset)]).boxed());
                }
                let backlog: Vec<FeedItem> = t
                    .history
                    .iter()
                    .filter(|(rev, _)| *rev > from)
                    .map(|(revision, payload)| FeedItem::Event {
                        revision: *revision,
                        payload: payload.clone(),
                    })
                    .collect();
                (backlog, from)
            }
            None => (Vec::new(), state.revision),
        };
        drop(state);
        let last = backlog
            .iter()
            .filter_map(|item| match item {
                FeedItem::Event { revision, .. } => Some(*revision),
                FeedItem::Reset { .. } => None,
            })
            .max()
            .unwrap_or(after);
        let live = futures::stream::unfold(
            (receiver, last, false),
            |(mut receiver, mut last, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match receiver.recv().await {
                        Ok((revision, payload)) if revision > last => {
                            last = revision;
                            let item = FeedItem::Event { revision, payload };
                            return Some((Ok(item), (receiver, last, false)));
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let item = FeedItem::Reset {
                                reason: ResetReason::Lagged { missed },
                            };
                            return Some((Ok(item), (receiver, last, true)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        Ok(futures::stream::iter(backlog.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }

    async fn feed_revision(&self) -> Result<u64> {
        Ok(self.inner.lock().revision)
    }

    async fn compact_feed(&self, revision: u64) -> Result<()> {
        let mut state = self.inner.lock();
        if revision > state.revision {
            return Err(CoordError::InvalidArgument(format!(
                "cannot compact to future revision {revision} (current {})",
                state.revision
            )));
        }
        if revision <= state.compact_revision {
            return Ok(());
        }
        state.compact_revision = revision;
        for t in state.topics.values_mut() {
            while t.history.front().is_some_and(|(rev, _)| *rev < revision) {
                if let Some((dropped, _)) = t.history.pop_front() {
                    t.dropped_through = dropped;
                }
            }
        }
        Ok(())
    }

    async fn dedup(&self, key: &str, ttl: Duration) -> Result<bool> {
        validate_dedup(key, ttl)?;
        let now = Instant::now();
        let mut state = self.inner.lock();
        let len = state.dedup.len();
        if len >= DEDUP_PURGE_MIN && len >= state.dedup_purged_at_len * DEDUP_PURGE_GROWTH {
            state.dedup.retain(|_, expires| *expires > now);
            state.dedup_purged_at_len = state.dedup.len();
        }
        match state.dedup.get(key) {
            Some(expires) if *expires > now => Ok(false),
            _ => {
                state.dedup.insert(key.to_owned(), now + ttl);
                Ok(true)
            }
        }
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

impl InProcessCoordinator {
    fn grant(
        &self,
        election: &str,
        info: LeaderInfo,
        lease: u64,
        opts: LeaseOptions,
        changed: watch::Receiver<u64>,
    ) -> Leadership {
        let shared = LeaseShared::new();
        let stop = CancellationToken::new();
        tokio::spawn(keepalive_task(
            self.inner.clone(),
            election.to_owned(),
            lease,
            opts,
            shared.clone(),
            stop.clone(),
            changed,
        ));
        tokio::spawn(expiry_task(self.inner.clone(), election.to_owned(), lease));
        let control = InProcessLease {
            inner: self.inner.clone(),
            election: election.to_owned(),
            lease,
            stop,
        };
        Leadership::new(election.to_owned(), info, shared, Box::new(control))
    }
}
