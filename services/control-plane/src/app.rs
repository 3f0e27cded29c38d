//! The control plane's shared state: the store, the coordinator, the event sink, the clock and
//! the artifact fetcher, and the few operations every service uses — read an entity, commit a
//! [`Mutation`], check a leader fence.

use std::sync::Arc;
use std::time::Duration;

use ccm_artifacts::ArtifactFetcher;
use ccm_cloudevents::{EventFactory, EventSink};
use ccm_coord::{Coordinator, FenceCheck};
use ccm_core::clock::Clock;
use ccm_proto::v1::LeaderFence;
use ccm_store::{Applied, Store, StoreError};
use chrono::{DateTime, Utc};

use crate::error::ApiError;
use crate::record::Mutation;
use crate::repo::{Entity, decode};

/// Feed topic of the change events behind `EventService.WatchEvents`.
pub const DEFAULT_FEED_TOPIC: &str = "changes";
/// Election the scheduler leader holds (its epoch fences `InternalService` calls).
pub const SCHEDULER_ELECTION: &str = "scheduler";
/// Election the controller leader holds.
pub const CONTROLLER_ELECTION: &str = "controller";
/// How long an ingested CloudEvent id is remembered for deduplication (domain.md §8: 24 h).
pub const DEFAULT_EVENT_DEDUP_TTL: Duration = Duration::from_secs(24 * 3600);

/// Settings of the application layer (the server's own settings live in [`crate::config`]).
#[derive(Debug, Clone)]
pub struct AppSettings {
    /// Feed topic for change events.
    pub feed_topic: String,
    /// Instantiation lead before a slot (domain.md §5).
    pub instantiation_lead: chrono::Duration,
    /// Dedup window for ingested CloudEvents.
    pub event_dedup_ttl: Duration,
    /// `http://` artifact URIs are accepted (tests and dev only).
    pub allow_http_artifacts: bool,
}

impl Default for AppSettings {
    fn default() -> Self {
        AppSettings {
            feed_topic: DEFAULT_FEED_TOPIC.to_string(),
            instantiation_lead: chrono::Duration::minutes(
                ccm_core::defaults::INSTANTIATION_LEAD_MINUTES,
            ),
            event_dedup_ttl: DEFAULT_EVENT_DEDUP_TTL,
            allow_http_artifacts: false,
        }
    }
}

/// Everything a service handler needs; cheap to clone.
#[derive(Clone)]
pub struct App {
    /// The source of truth.
    pub store: Arc<dyn Store>,
    /// Leader fences, the change feed, dedup keys.
    pub coord: Arc<dyn Coordinator>,
    /// Where CloudEvents go (never blocks).
    pub events: Arc<dyn EventSink>,
    /// Builds CloudEvents with this deployment's `source`.
    pub factory: EventFactory,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Reads lab artifacts (definition create and sync).
    pub fetcher: Arc<dyn ArtifactFetcher>,
    /// Settings.
    pub settings: AppSettings,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("store", &self.store.backend())
            .field("settings", &self.settings)
            .finish()
    }
}

impl App {
    /// Now, by the application clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Reads an entity by document id; `NOT_FOUND` when it does not exist.
    pub async fn get<E: Entity>(&self, id: &str) -> Result<E, ApiError> {
        self.find(id)
            .await?
            .ok_or_else(|| ApiError::not_found(E::TYPE_NAME, id))
    }

    /// Reads an entity by document id, if it exists.
    pub async fn find<E: Entity>(&self, id: &str) -> Result<Option<E>, ApiError> {
        match self.store.get(E::KIND, id).await? {
            Some(doc) => Ok(Some(decode(&doc)?)),
            None => Ok(None),
        }
    }

    /// Applies `mutation` in one transaction, then announces its changes and events.
    pub async fn commit(&self, mutation: Mutation) -> Result<Vec<Applied>, ApiError> {
        let (writes, batch, events) = mutation.into_parts();
        let applied = self.store.apply(writes).await?;
        self.announce(vec![batch], events).await;
        Ok(applied)
    }

    /// Applies each mutation all-or-nothing, all successful ones in one transaction (the batch
    /// placement commit); returns one result per mutation and announces the successful ones.
    pub async fn commit_each(
        &self,
        mutations: Vec<Mutation>,
    ) -> Result<Vec<Result<Vec<Applied>, StoreError>>, ApiError> {
        Ok(self.commit_each_at_revision(mutations).await?.0)
    }

    /// [`App::commit_each`], also returning the feed revision the successful items were
    /// announced at (`None` when nothing committed or the feed publish failed).
    pub async fn commit_each_at_revision(
        &self,
        mutations: Vec<Mutation>,
    ) -> Result<(Vec<Result<Vec<Applied>, StoreError>>, Option<u64>), ApiError> {
        let mut writes = Vec::with_capacity(mutations.len());
        let mut announcements = Vec::with_capacity(mutations.len());
        for m in mutations {
            let (w, batch, events) = m.into_parts();
            writes.push(w);
            announcements.push((batch, events));
        }
        let results = self.store.apply_each(writes).await?;
        let mut batches = Vec::new();
        let mut events = Vec::new();
        for (result, (batch, ev)) in results.iter().zip(announcements) {
            if result.is_ok() {
                batches.push(batch);
                events.extend(ev);
            }
        }
        let revision = self.announce(batches, events).await;
        Ok((results, revision))
    }

    /// Publishes committed changes as ONE feed entry and hands the events to the sink.
    async fn announce(
        &self,
        batches: Vec<crate::record::FeedBatch>,
        events: Vec<ccm_cloudevents::CloudEvent>,
    ) -> Option<u64> {
        let merged = crate::record::FeedBatch(batches.into_iter().flat_map(|b| b.0).collect());
        let mut revision = None;
        if !merged.is_empty() {
            match self
                .coord
                .publish(&self.settings.feed_topic, merged.encode())
                .await
            {
                Ok(r) => revision = Some(r),
                // Committed but not announced: watchers notice the missing revision on their
                // next re-list; the state itself is safe in the store.
                Err(e) => {
                    tracing::warn!(error = %e, changes = merged.0.len(), "change feed publish failed")
                }
            }
        }
        for event in events {
            self.events.publish(event);
        }
        revision
    }

    /// Checks a leader fence: the caller must be the current leader of its role.
    ///
    /// A missing fence is `INVALID_ARGUMENT`; a stale epoch is `FAILED_PRECONDITION` (the
    /// caller is a deposed leader and must stop); a coordinator that cannot answer is
    /// `UNAVAILABLE`.
    pub async fn check_fence(&self, fence: Option<&LeaderFence>) -> Result<(), ApiError> {
        let fence = fence.ok_or_else(|| {
            ApiError::invalid_argument("fence", "internal calls must carry the leader fence")
        })?;
        let election = match fence.role.as_str() {
            SCHEDULER_ELECTION => SCHEDULER_ELECTION,
            CONTROLLER_ELECTION => CONTROLLER_ELECTION,
            other => {
                return Err(ApiError::invalid_argument(
                    "fence.role",
                    format!("unknown role {other:?}: expected \"scheduler\" or \"controller\""),
                ));
            }
        };
        if fence.epoch <= 0 {
            return Err(ApiError::invalid_argument(
                "fence.epoch",
                "the leader epoch must be positive",
            ));
        }
        match self.coord.check_fence(election, fence.epoch).await? {
            FenceCheck::Current => Ok(()),
            FenceCheck::Stale { current } => Err(ApiError::stale_fence(
                election,
                fence.epoch,
                current.map(|c| c.epoch).unwrap_or(0),
            )),
        }
    }
}
