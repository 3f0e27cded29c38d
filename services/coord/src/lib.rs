//! # ccm-coord — coordination between ccm's replicas
//!
//! The [`Coordinator`] trait gives ccm's services three things (ARCHITECTURE §4):
//!
//! 1. **Leader election with fencing.** [`Coordinator::campaign`] waits until the candidate leads
//!    and returns a [`Leadership`] whose [`epoch`](Leadership::epoch) is the fencing token,
//!    strictly increasing across successive leaders of an election. The lease is renewed in the
//!    background; a leader that cannot renew before its renew deadline declares the loss itself,
//!    before the lease can expire on the backend, so it has stopped before anyone else is elected.
//!    The control plane calls [`Coordinator::check_fence`] on every internal call, so a deposed
//!    leader can never commit. [`run_for_leadership`] is the campaign loop services use: it runs
//!    the work only while leading and campaigns again after every loss.
//! 2. **A change feed** ([`Coordinator::publish`], [`Coordinator::watch`]) that backs
//!    `EventService.Watch` across control-plane replicas: events in revision order, resumable from
//!    a revision, and a [`FeedItem::Reset`] when events were lost (the client re-lists).
//! 3. **Dedup keys with a TTL** ([`Coordinator::dedup`]) for incoming CloudEvents.
//!
//! Two implementations pass the same [`conformance`] suite (feature `conformance`):
//! [`EtcdCoordinator`] (production; etcd 3.4+) and [`InProcessCoordinator`] (single-node `ccm dev`
//! and simulations; it uses tokio's clock, so it also runs on a paused/virtual clock).
//!
//! Errors are [`CoordError`]s; each documents the gRPC code it maps to.

#![warn(missing_docs)]

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

mod error;
mod etcd;
mod in_process;
mod leadership;
mod types;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use error::{CoordError, Result};
pub use etcd::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_HTTP2_KEEPALIVE_INTERVAL, DEFAULT_HTTP2_KEEPALIVE_TIMEOUT,
    DEFAULT_KEY_PREFIX, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RETRY_BACKOFF,
    DEFAULT_WATCH_RECONNECT_TIMEOUT, EtcdConfig, EtcdCoordinator,
};
pub use in_process::{
    DEFAULT_FEED_HISTORY, DEFAULT_WATCH_BUFFER, InProcessConfig, InProcessCoordinator,
};
pub use leadership::{CAMPAIGN_RETRY_BACKOFF, LeaderContext, Leadership, run_for_leadership};
pub use types::{
    DEFAULT_LEASE_TTL, FeedItem, FenceCheck, KEEPALIVE_DIVISOR, LeaderInfo, LeaseOptions,
    LossReason, MAX_NAME_LEN, RENEW_MARGIN_DIVISOR, RESERVED_ELECTION_NAMES, ResetReason,
};

/// A stream of change-feed items; see [`Coordinator::watch`].
pub type FeedStream = BoxStream<'static, Result<FeedItem>>;

/// Leader election with fencing, a change feed and dedup keys. Object-safe: services hold an
/// `Arc<dyn Coordinator>`.
///
/// Names: elections and topics are 1..=[`MAX_NAME_LEN`] characters of `[A-Za-z0-9._:-]`
/// (elections `feed` and `dedup` are reserved); candidate ids and dedup keys are any text of that
/// length without control characters. Anything else is `InvalidArgument`.
#[async_trait]
pub trait Coordinator: Send + Sync + std::fmt::Debug {
    /// Waits until `candidate_id` leads `election`, then returns the leadership (whose lease is
    /// renewed in the background until it is resigned, dropped or lost).
    ///
    /// Cancel-safe: dropping the future withdraws the candidacy (if leadership was won in the
    /// meantime it is released). Errors: `InvalidArgument` for bad names or lease options,
    /// `Unavailable` when the backend cannot be reached (the caller retries; see
    /// [`run_for_leadership`]).
    async fn campaign(
        &self,
        election: &str,
        candidate_id: &str,
        opts: LeaseOptions,
    ) -> Result<Leadership>;

    /// The current leader of `election`, if any.
    async fn leader(&self, election: &str) -> Result<Option<LeaderInfo>>;

    /// Whether `epoch` is the current leader's fencing token. Called on every fenced internal
    /// call, so it is answered from a watched cache where possible; an epoch the cache has not
    /// seen yet is checked against the backend.
    async fn check_fence(&self, election: &str, epoch: i64) -> Result<FenceCheck>;

    /// Appends `payload` to `topic`'s feed and returns its revision.
    async fn publish(&self, topic: &str, payload: Bytes) -> Result<u64>;

    /// Watches `topic`'s feed. With `from_revision = Some(r)` the stream delivers every event with
    /// a revision greater than `r` (resume without gaps or duplicates), then new ones; with `None`
    /// only events published after the watch is established (when this returns).
    ///
    /// Events come in strictly increasing revision order. If events were lost (history compacted,
    /// buffer overflow, slow consumer) the stream yields [`FeedItem::Reset`] and ends. If the
    /// backend stays unreachable the stream yields an `Unavailable` error and ends; resume with
    /// the last revision seen.
    async fn watch(&self, topic: &str, from_revision: Option<u64>) -> Result<FeedStream>;

    /// The backend's current revision: list the store, then watch from this revision to re-sync
    /// after a [`FeedItem::Reset`] without a gap.
    async fn feed_revision(&self) -> Result<u64>;

    /// Discards feed history below `revision`: a watch that resumes from an earlier revision gets
    /// [`FeedItem::Reset`]. Compacting to an already compacted revision is a no-op; a revision in
    /// the future is `InvalidArgument`.
    ///
    /// On etcd this is etcd's (global) compaction; production clusters normally compact on their
    /// own (`--auto-compaction-mode=periodic --auto-compaction-retention=1h`), and this call is for
    /// operators and tests.
    async fn compact_feed(&self, revision: u64) -> Result<()>;

    /// Records `key` for `ttl`: returns true the first time, false while it is still recorded,
    /// and true again once the TTL has passed.
    async fn dedup(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// Checks that the backend answers (for readiness probes). `Unavailable` if it does not.
    async fn ping(&self) -> Result<()>;
}
