//! EventService: the change feed (`WatchEvents`), CloudEvents from the assessment and grading
//! platforms (`IngestEvent`) and the audit log (`ListAuditRecords`).
//!
//! # WatchEvents
//!
//! A watch reads the coordinator's change feed (`App::coord`, topic `AppSettings::feed_topic`),
//! which every control-plane replica publishes its commits to, so any replica serves every
//! replica's changes. Each feed entry is one commit ([`FeedBatch`]); its changes are filtered
//! (kinds, resource ids, owner — users limited to their own resources only see their own
//! instances) and sent in revision order.
//!
//! * `send_initial_state`: the current feed revision is read **before** the store is listed,
//!   every matching resource is sent as ADDED (stamped with that revision), then a bookmark with
//!   `initial_state_done`; the feed is then followed from that revision, so a change committed
//!   while listing is delivered (possibly after a listing that already shows it: changes are
//!   level-triggered, never lost).
//! * `since_revision > 0`: changes after it, nothing else.
//! * A worker (ADDED in the initial state, or ADDED / MODIFIED from the feed) carries the
//!   derived fields GetWorker computes — `allocated_capacity`, `available_capacity`,
//!   `port_allocations`, `available_ports`, `instance_ids` — computed from the instances it holds
//!   when the change is sent (`with_derived_fields`); a DELETED worker is sent as it was stored.
//! * When nothing was sent for `heartbeat_interval` (default [`DEFAULT_HEARTBEAT`], clamped to
//!   [`MIN_HEARTBEAT`]..=[`MAX_HEARTBEAT`]) a bookmark carries the last revision seen.
//! * When the feed lost events (compaction, a slow consumer, a broken entry) the stream sends a
//!   `WatchReset` with the current revision and ends; the client re-lists.
//! * On server shutdown the stream ends with `UNAVAILABLE` (reconnect, resuming from the last
//!   revision, to another replica).
//!
//! # IngestEvent and duplicates
//!
//! Events are deduplicated on `(source, id)`. The coordinator's dedup key
//! (`ce/<source>/<id>`, kept for `AppSettings::event_dedup_ttl`) is recorded when an event
//! arrives and is only a **hint**: a key that was already recorded means "maybe seen", and the
//! store decides — an event was applied iff the instance's audit trail holds the transition it
//! caused (actor `cloudevent:<source>`, detail `cloudevent_id`), which is written in the same
//! transaction as the transition itself. So
//!
//! * a duplicate of an applied event is a no-op answered `duplicate: true`, even when it arrives
//!   concurrently (the losing commit fails on the instance's resource version, re-reads and finds
//!   the audit record) or after the dedup key expired;
//! * an event whose processing failed (instance in the wrong state, not found, store down) leaves
//!   nothing in the audit trail, so a retry with the same id is processed normally although its
//!   dedup key is recorded.
//!
//! Unknown event types are accepted and logged, not acted on (`handled: false`); their duplicates
//! are recognised by the dedup key alone.

use std::collections::HashSet;
use std::time::Duration;

use ccm_coord::{FeedItem, ResetReason};
use ccm_core::model::InstanceState as CoreInstanceState;
use ccm_proto::v1 as pb;
use ccm_proto::v1::event_service_server::{EventService, EventServiceServer};
use ccm_store::{Filter, IndexField, LogEntry, LogKind, LogQuery, Query};
use chrono::DateTime;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::convert::{self, timestamp_from_proto, timestamp_to_proto};
use crate::error::ApiError;
use crate::paging::{self, PageKind};
use crate::record::{AuditFacts, FeedBatch, Mutation, Origin, audit_from_entry};
use crate::repo::{Entity, decode};
use crate::server::request_id;
use crate::services::caller_of;
use crate::services::internal::{
    actor_of, from_proto_value, instance_core, instance_event_data, to_struct, write_back_instance,
};
use crate::validate::{self, Violations, index_path, join_path};

/// Bookmark interval of an idle watch when the request gives none (event.proto: 30 s).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Shortest bookmark interval (event.proto: minimum 1 s); shorter requests are raised to it.
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest bookmark interval; longer requests are lowered to it (proxies drop silent streams).
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);
/// Watch items buffered per stream before the server waits for the client.
pub const WATCH_BUFFER: usize = 256;
/// Most resource ids one watch may filter on.
pub const MAX_WATCH_RESOURCE_IDS: usize = 1000;
/// Documents read per store page when sending the initial state.
pub const INITIAL_STATE_PAGE: u32 = 1000;
/// Times an ingested event is re-applied after a concurrent change of its instance.
pub const MAX_INGEST_ATTEMPTS: usize = 3;
/// Longest CloudEvent `id` accepted.
pub const MAX_EVENT_ID_LEN: usize = 128;
/// Longest CloudEvent `source` accepted (the dedup key `ce/<source>/<id>` must fit the
/// coordinator's 256-byte key limit).
pub const MAX_EVENT_SOURCE_LEN: usize = 120;
/// Longest CloudEvent `type` accepted.
pub const MAX_EVENT_TYPE_LEN: usize = 256;
/// Longest audit filter string (actor, action prefix).
pub const MAX_AUDIT_FILTER_LEN: usize = 256;
/// Most log entries one list call reads before it answers with what it found (and a token to
/// go on), so a filter that matches little cannot make one call scan a whole year of log.
pub const MAX_LOG_SCAN: usize = 10_000;
/// Log entries read per store page while scanning.
const LOG_SCAN_PAGE: u32 = 500;
/// The dedup key prefix of ingested CloudEvents.
pub const DEDUP_PREFIX: &str = "ce";
/// Audit detail naming the CloudEvent that caused a transition.
pub const DETAIL_CLOUDEVENT_ID: &str = "cloudevent_id";

const SERVICE: &str = "/ccm.v1.EventService/";

/// The EventService implementation.
#[derive(Debug, Clone)]
pub struct Events {
    app: App,
    shutdown: CancellationToken,
}

/// The tonic server for [`Events`]; watches end when `shutdown` is cancelled (the server's
/// [`crate::server::ServiceSet::shutdown_token`]).
pub fn server(app: App, shutdown: CancellationToken) -> EventServiceServer<Events> {
    EventServiceServer::new(Events { app, shutdown })
}

// ---------------------------------------------------------------------------------------------
// Log scanning (shared with InternalService.ListScalingDecisionHistory)
// ---------------------------------------------------------------------------------------------

/// A position in a log (its order is newest first by time, then id): a page resumes strictly
/// after it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogPosition {
    /// Time of the entry, Unix milliseconds.
    pub at_ms: i64,
    /// Id of the entry.
    pub id: String,
}

impl LogPosition {
    fn of(entry: &LogEntry) -> LogPosition {
        LogPosition {
            at_ms: entry.at.timestamp_millis(),
            id: entry.id.to_string(),
        }
    }

    /// Whether `entry` comes at or before this position in log order.
    fn covers(&self, entry: &LogEntry) -> bool {
        let at = entry.at.timestamp_millis();
        at > self.at_ms || (at == self.at_ms && entry.id.to_string() >= self.id)
    }
}

/// What [`scan_log`] found.
#[derive(Debug)]
pub(crate) struct LogScan<T> {
    /// The matching items, in log order.
    pub items: Vec<T>,
    /// Where to resume, when more entries may follow.
    pub next: Option<LogPosition>,
}

/// Reads `log` newest first from `after`, keeping what `pick` returns, until `limit` items are
/// found, the log ends or [`MAX_LOG_SCAN`] entries were read.
pub(crate) async fn scan_log<T>(
    app: &App,
    log: LogKind,
    base: LogQuery,
    after: Option<LogPosition>,
    limit: usize,
    mut pick: impl FnMut(&LogEntry) -> Result<Option<T>, ApiError>,
) -> Result<LogScan<T>, ApiError> {
    let mut query = base;
    if let Some(pos) = &after {
        // Entries at the position's millisecond are read again and skipped by id.
        let bound = DateTime::from_timestamp_millis(pos.at_ms.saturating_add(1));
        query.until = match (query.until, bound) {
            (Some(u), Some(b)) => Some(u.min(b)),
            (u, b) => u.or(b),
        };
    }
    query.page_size = LOG_SCAN_PAGE;
    query.page_token = None;
    let mut items = Vec::new();
    let mut scanned = 0usize;
    loop {
        let page = app.store.list_log(log, query.clone()).await?;
        let count = page.entries.len();
        for (i, entry) in page.entries.iter().enumerate() {
            if after.as_ref().is_some_and(|p| p.covers(entry)) {
                continue;
            }
            scanned += 1;
            if let Some(item) = pick(entry)? {
                items.push(item);
            }
            if items.len() >= limit || scanned >= MAX_LOG_SCAN {
                let more = i + 1 < count || page.next_page_token.is_some();
                return Ok(LogScan {
                    items,
                    next: more.then(|| LogPosition::of(entry)),
                });
            }
        }
        match page.next_page_token {
            Some(t) => query.page_token = Some(t),
            None => return Ok(LogScan { items, next: None }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------------------------

/// What a watch lets through.
#[derive(Debug, Clone, Default)]
struct WatchFilter {
    kinds: HashSet<i32>,
    ids: HashSet<String>,
    owner: Option<String>,
}

impl WatchFilter {
    fn wants_kind(&self, kind: pb::ResourceKind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&(kind as i32))
    }

    fn matches(&self, change: &pb::ChangeEvent) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&change.kind))
            && (self.ids.is_empty() || self.ids.contains(&change.resource_id))
            && match &self.owner {
                Some(owner) if change.kind == pb::ResourceKind::Instance as i32 => {
                    change.owner_id == *owner
                }
                _ => true,
            }
    }
}

type WatchItem = Result<pb::WatchEventsResponse, Status>;

/// Sends one item; `false` when the client is gone or the server shuts down.
async fn send(tx: &mpsc::Sender<WatchItem>, item: WatchItem, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        r = tx.send(item) => r.is_ok(),
        () = shutdown.cancelled() => false,
    }
}

fn change_item(change: pb::ChangeEvent) -> WatchItem {
    Ok(pb::WatchEventsResponse {
        item: Some(pb::watch_events_response::Item::Change(change)),
    })
}

fn bookmark(revision: u64, initial_state_done: bool) -> WatchItem {
    Ok(pb::WatchEventsResponse {
        item: Some(pb::watch_events_response::Item::Bookmark(
            pb::WatchBookmark {
                revision: i64::try_from(revision).unwrap_or(i64::MAX),
                initial_state_done,
            },
        )),
    })
}

fn reset(reason: pb::WatchResetReason, current: u64, message: String) -> WatchItem {
    Ok(pb::WatchEventsResponse {
        item: Some(pb::watch_events_response::Item::Reset(pb::WatchReset {
            reason: reason as i32,
            current_revision: i64::try_from(current).unwrap_or(i64::MAX),
            message,
        })),
    })
}

fn shutdown_status() -> Status {
    ApiError::unavailable(
        "the server is shutting down; watch again from the last revision",
        Some(Duration::from_secs(1)),
    )
    .into_status()
}

/// Fills the fields a resource's Get computes rather than stores: a worker gets the
/// `allocated_capacity`, `available_capacity`, `port_allocations`, `available_ports` and
/// `instance_ids` GetWorker answers (computed now, from the instances it holds). Other kinds
/// are sent as stored.
async fn with_derived_fields(app: &App, change: &mut pb::ChangeEvent) -> Result<(), ApiError> {
    if let Some(pb::change_event::Resource::Worker(worker)) = change.resource.as_mut() {
        *worker = super::workers::enriched_worker(app, std::mem::take(worker)).await?;
    }
    Ok(())
}

/// Sends every resource of kind `E` that matches `filter` as ADDED at `revision`; `false` when
/// the stream should stop.
async fn send_kind<E: Entity>(
    app: &App,
    filter: &WatchFilter,
    revision: u64,
    tx: &mpsc::Sender<WatchItem>,
    shutdown: &CancellationToken,
) -> Result<bool, ApiError> {
    if !filter.wants_kind(E::RESOURCE) {
        return Ok(true);
    }
    let rev = i64::try_from(revision).unwrap_or(i64::MAX);
    let emit = async |doc: &ccm_store::Document| -> Result<Option<pb::ChangeEvent>, ApiError> {
        let entity: E = decode(doc)?;
        let mut change = pb::ChangeEvent {
            revision: rev,
            kind: E::RESOURCE as i32,
            r#type: pb::ChangeType::Added as i32,
            resource_id: entity.doc_id(),
            owner_id: entity.owner_id().to_owned(),
            at: Some(timestamp_to_proto(doc.updated_at)),
            resource: Some(entity.into_resource()),
        };
        if !filter.matches(&change) {
            return Ok(None);
        }
        with_derived_fields(app, &mut change).await?;
        Ok(Some(change))
    };
    if !filter.ids.is_empty() {
        let ids: Vec<String> = filter.ids.iter().cloned().collect();
        for chunk in ids.chunks(ccm_store::MAX_GET_MANY) {
            for doc in app.store.get_many(E::KIND, chunk).await? {
                if let Some(change) = emit(&doc).await?
                    && !send(tx, change_item(change), shutdown).await
                {
                    return Ok(false);
                }
            }
        }
        return Ok(true);
    }
    let mut token = None;
    loop {
        let mut query = Query::new(E::KIND)
            .with_page_size(INITIAL_STATE_PAGE)
            .after(token);
        if let (Some(owner), pb::ResourceKind::Instance) = (&filter.owner, E::RESOURCE) {
            query = query.with_filter(Filter::eq(IndexField::OwnerId, owner.clone()));
        }
        let page = app.store.list(query).await?;
        for doc in &page.items {
            if let Some(change) = emit(doc).await?
                && !send(tx, change_item(change), shutdown).await
            {
                return Ok(false);
            }
        }
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => return Ok(true),
        }
    }
}

async fn send_initial_state(
    app: &App,
    filter: &WatchFilter,
    revision: u64,
    tx: &mpsc::Sender<WatchItem>,
    shutdown: &CancellationToken,
) -> Result<bool, ApiError> {
    Ok(
        send_kind::<pb::LabletDefinition>(app, filter, revision, tx, shutdown).await?
            && send_kind::<pb::WorkerTemplate>(app, filter, revision, tx, shutdown).await?
            && send_kind::<pb::CmlWorker>(app, filter, revision, tx, shutdown).await?
            && send_kind::<pb::LabletInstance>(app, filter, revision, tx, shutdown).await?
            && send_kind::<pb::WorkerOperation>(app, filter, revision, tx, shutdown).await?,
    )
}

/// The body of one watch, run in its own task; returning ends the stream.
async fn run_watch(
    app: App,
    shutdown: CancellationToken,
    filter: WatchFilter,
    start: u64,
    initial: bool,
    heartbeat: Duration,
    tx: mpsc::Sender<WatchItem>,
) {
    if initial {
        match send_initial_state(&app, &filter, start, &tx, &shutdown).await {
            Ok(true) => {}
            Ok(false) => {
                if shutdown.is_cancelled() {
                    let _ = tx.try_send(Err(shutdown_status()));
                }
                return;
            }
            Err(e) => {
                let _ = send(&tx, Err(e.into_status()), &shutdown).await;
                return;
            }
        }
        if !send(&tx, bookmark(start, true), &shutdown).await {
            return;
        }
    }
    let mut feed = match app.coord.watch(&app.settings.feed_topic, Some(start)).await {
        Ok(feed) => feed,
        Err(e) => {
            let _ = send(&tx, Err(ApiError::from(e).into_status()), &shutdown).await;
            return;
        }
    };
    let mut last = start;
    let idle = tokio::time::sleep(heartbeat);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                let _ = tx.try_send(Err(shutdown_status()));
                return;
            }
            () = tx.closed() => return,
            item = feed.next() => {
                match item {
                    Some(Ok(FeedItem::Event { revision, payload })) => {
                        last = last.max(revision);
                        match FeedBatch::decode(&payload, revision) {
                            Ok(batch) => {
                                let mut sent = false;
                                for mut change in batch.0 {
                                    if filter.matches(&change) {
                                        if change.r#type != pb::ChangeType::Deleted as i32
                                            && let Err(e) = with_derived_fields(&app, &mut change).await
                                        {
                                            let _ = send(&tx, Err(e.into_status()), &shutdown).await;
                                            return;
                                        }
                                        if !send(&tx, change_item(change), &shutdown).await {
                                            return;
                                        }
                                        sent = true;
                                    }
                                }
                                if sent {
                                    idle.as_mut().reset(tokio::time::Instant::now() + heartbeat);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(revision, error = %e, "unreadable change feed entry; resetting the watch");
                                let current = app.coord.feed_revision().await.unwrap_or(last);
                                let _ = send(&tx, reset(
                                    pb::WatchResetReason::Gap,
                                    current,
                                    format!("change feed entry {revision} is unreadable; re-list"),
                                ), &shutdown).await;
                                return;
                            }
                        }
                    }
                    Some(Ok(FeedItem::Reset { reason })) => {
                        let code = match &reason {
                            ResetReason::Compacted { .. } => pb::WatchResetReason::Compacted,
                            ResetReason::Lagged { .. } => pb::WatchResetReason::SlowConsumer,
                            ResetReason::Cancelled { .. } => pb::WatchResetReason::Gap,
                        };
                        let current = app.coord.feed_revision().await.unwrap_or(last);
                        let _ = send(&tx, reset(code, current, format!("{reason}; re-list and watch again")), &shutdown).await;
                        return;
                    }
                    Some(Err(e)) => {
                        let _ = send(&tx, Err(ApiError::from(e).into_status()), &shutdown).await;
                        return;
                    }
                    None => {
                        let current = app.coord.feed_revision().await.unwrap_or(last);
                        let _ = send(&tx, reset(
                            pb::WatchResetReason::Gap,
                            current,
                            "the change feed ended; re-list and watch again".to_owned(),
                        ), &shutdown).await;
                        return;
                    }
                }
            }
            () = &mut idle => {
                if !send(&tx, bookmark(last, false), &shutdown).await {
                    return;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + heartbeat);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ingest
// ---------------------------------------------------------------------------------------------

/// The payload of an ingested event as a JSON value (`json_data`, or `text_data` /
/// `binary_data` holding JSON).
fn event_payload(event: &pb::CloudEvent) -> Result<Value, ApiError> {
    use pb::cloud_event::Data;
    match &event.data {
        None => Ok(Value::Null),
        Some(Data::JsonData(v)) => Ok(from_proto_value(v)),
        Some(Data::TextData(t)) => serde_json::from_str(t).map_err(|e| {
            ApiError::invalid_argument("event.text_data", format!("is not JSON: {e}"))
        }),
        Some(Data::BinaryData(b)) => serde_json::from_slice(b).map_err(|e| {
            ApiError::invalid_argument("event.binary_data", format!("is not JSON: {e}"))
        }),
    }
}

fn data_field(event: &pb::CloudEvent) -> &'static str {
    use pb::cloud_event::Data;
    match &event.data {
        Some(Data::TextData(_)) => "event.text_data",
        Some(Data::BinaryData(_)) => "event.binary_data",
        _ => "event.json_data",
    }
}

/// What a handled event asks for.
enum Intent {
    CollectionCompleted {
        collection_id: String,
        artifacts_uri: String,
    },
    GradingCompleted {
        score: pb::GradingScore,
    },
}

fn string_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The instance id and intent of a handled event type; `None` for other types.
fn parse_intent(event: &pb::CloudEvent) -> Result<Option<(String, Intent)>, ApiError> {
    let handled = matches!(
        event.r#type.as_str(),
        ccm_cloudevents::catalog::ASSESSMENT_COLLECTION_COMPLETED
            | ccm_cloudevents::catalog::ASSESSMENT_GRADING_COMPLETED
    );
    if !handled {
        return Ok(None);
    }
    let field = data_field(event);
    let data = event_payload(event)?;
    let mut v = Violations::new();
    if !data.is_object() {
        return Err(ApiError::invalid_argument(
            field,
            "must be a JSON object with instance_id",
        ));
    }
    let payload_id = string_at(&data, "instance_id").unwrap_or_default();
    let instance_id = if payload_id.is_empty() {
        event.subject.as_str()
    } else {
        payload_id
    };
    if !payload_id.is_empty() && !event.subject.is_empty() && payload_id != event.subject {
        v.add(
            join_path(field, "instance_id"),
            format!(
                "names instance {payload_id:?} but the event subject is {:?}",
                event.subject
            ),
        );
    }
    validate::id(&mut v, &join_path(field, "instance_id"), instance_id);
    let intent = if event.r#type == ccm_cloudevents::catalog::ASSESSMENT_COLLECTION_COMPLETED {
        let collection_id = string_at(&data, "collection_id").unwrap_or_default();
        let artifacts_uri = string_at(&data, "artifacts_uri").unwrap_or_default();
        validate::free_text(
            &mut v,
            &join_path(field, "collection_id"),
            collection_id,
            validate::MAX_ID_LEN,
            false,
        );
        validate::free_text(
            &mut v,
            &join_path(field, "artifacts_uri"),
            artifacts_uri,
            validate::MAX_URI_LEN,
            false,
        );
        Some(Intent::CollectionCompleted {
            collection_id: collection_id.to_owned(),
            artifacts_uri: artifacts_uri.to_owned(),
        })
    } else {
        let score_field = join_path(field, "score");
        match data.get("score") {
            Some(score @ Value::Object(_)) => {
                let number = |v: &mut Violations, key: &str, at: &Value, path: &str| match at
                    .get(key)
                    .and_then(Value::as_f64)
                {
                    Some(n) => n,
                    None => {
                        v.add(join_path(path, key), "is required (a number)");
                        0.0
                    }
                };
                let total = number(&mut v, "total", score, &score_field);
                let max = number(&mut v, "max", score, &score_field);
                let passed = data
                    .get("passed")
                    .or_else(|| score.get("passed"))
                    .and_then(Value::as_bool);
                if passed.is_none() {
                    v.add(join_path(field, "passed"), "is required (a boolean)");
                }
                let mut breakdown = Vec::new();
                match score.get("breakdown") {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            let path = index_path(&join_path(&score_field, "breakdown"), i);
                            let criterion = string_at(item, "criterion").unwrap_or_default();
                            if criterion.trim().is_empty() {
                                v.add(join_path(&path, "criterion"), "is required");
                            }
                            validate::free_text(
                                &mut v,
                                &join_path(&path, "criterion"),
                                criterion,
                                validate::MAX_REASON_LEN,
                                false,
                            );
                            breakdown.push(pb::GradingCriterion {
                                criterion: criterion.to_owned(),
                                points: number(&mut v, "points", item, &path),
                                max: number(&mut v, "max", item, &path),
                            });
                        }
                    }
                    Some(_) => v.add(join_path(&score_field, "breakdown"), "must be a list"),
                }
                let score = pb::GradingScore {
                    total,
                    max,
                    passed: passed.unwrap_or(false),
                    breakdown,
                };
                v.absorb(convert::grading_score_from_proto(&score, &score_field));
                Some(Intent::GradingCompleted { score })
            }
            _ => {
                v.add(&score_field, "is required (an object with total and max)");
                None
            }
        }
    };
    v.into_result()?;
    match intent {
        Some(intent) => Ok(Some((instance_id.to_owned(), intent))),
        None => Err(ApiError::internal_msg("validated intent missing")),
    }
}

fn check_event(v: &mut Violations, event: &pb::CloudEvent) {
    let plain = |v: &mut Violations, field: &str, value: &str, max: usize| {
        if value.is_empty() {
            v.add(field, "is required");
        } else if value.chars().count() > max {
            v.add(field, format!("must be at most {max} characters"));
        } else if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            v.add(field, "must not contain spaces or control characters");
        }
    };
    plain(v, "event.id", &event.id, MAX_EVENT_ID_LEN);
    plain(v, "event.source", &event.source, MAX_EVENT_SOURCE_LEN);
    plain(v, "event.type", &event.r#type, MAX_EVENT_TYPE_LEN);
    if event.specversion != ccm_cloudevents::SPEC_VERSION {
        v.add(
            "event.specversion",
            format!(
                "must be \"{}\", got {:?}",
                ccm_cloudevents::SPEC_VERSION,
                event.specversion
            ),
        );
    }
    if !event.subject.is_empty() {
        validate::free_text(
            v,
            "event.subject",
            &event.subject,
            validate::MAX_ID_LEN,
            false,
        );
    }
    if let Some(t) = &event.time {
        v.absorb(timestamp_from_proto(t, "event.time"));
    }
    validate::free_text(
        v,
        "event.datacontenttype",
        &event.datacontenttype,
        MAX_EVENT_TYPE_LEN,
        false,
    );
    for name in event.extensions.keys() {
        if name.is_empty()
            || name.len() > 20
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            v.add(
                validate::key_path("event.extensions", name),
                "extension names are 1..=20 lower-case letters and digits",
            );
        }
    }
}

impl Events {
    /// Whether the instance's audit trail holds a transition caused by this event.
    async fn already_applied(
        &self,
        instance_id: &str,
        source: &str,
        event_id: &str,
    ) -> Result<bool, ApiError> {
        let actor = Origin::external(source).actor;
        let found = scan_log(
            &self.app,
            LogKind::Audit,
            LogQuery {
                resource_kind: Some(pb::ResourceKind::Instance.as_str_name().to_owned()),
                resource_id: Some(instance_id.to_owned()),
                ..Default::default()
            },
            None,
            1,
            |entry| {
                if entry.actor != actor {
                    return Ok(None);
                }
                let record = audit_from_entry(entry)?;
                let same = record
                    .details
                    .as_ref()
                    .and_then(|d| d.fields.get(DETAIL_CLOUDEVENT_ID))
                    .map(from_proto_value)
                    == Some(Value::String(event_id.to_owned()));
                Ok(same.then_some(()))
            },
        )
        .await?;
        Ok(!found.items.is_empty())
    }

    async fn ingest(
        &self,
        request: Request<pb::IngestEventRequest>,
    ) -> Result<pb::IngestEventResponse, ApiError> {
        let rid = request_id(&request).map(str::to_owned);
        let _scope = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let Some(event) = &req.event else {
            v.add("event", "is required");
            v.into_result()?;
            return Err(ApiError::internal_msg("unreachable: event missing"));
        };
        check_event(&mut v, event);
        v.into_result()?;
        let intent = parse_intent(event)?;
        tracing::Span::current().record("event_type", event.r#type.as_str());
        let key = format!("{DEDUP_PREFIX}/{}/{}", event.source, event.id);
        let fresh = self
            .app
            .coord
            .dedup(&key, self.app.settings.event_dedup_ttl)
            .await?;
        let Some((instance_id, intent)) = intent else {
            if !fresh {
                return Ok(pb::IngestEventResponse {
                    duplicate: true,
                    handled: false,
                    instance_id: String::new(),
                    message: "duplicate event; nothing done".to_owned(),
                });
            }
            tracing::info!(
                source = %event.source,
                id = %event.id,
                event_type = %event.r#type,
                "CloudEvent of a type ccm does not act on; accepted"
            );
            return Ok(pb::IngestEventResponse {
                duplicate: false,
                handled: false,
                instance_id: String::new(),
                message: format!("event type {:?} is not handled by ccm", event.r#type),
            });
        };
        let duplicate = || pb::IngestEventResponse {
            duplicate: true,
            handled: false,
            instance_id: instance_id.clone(),
            message: "duplicate event; nothing done".to_owned(),
        };
        if !fresh
            && self
                .already_applied(&instance_id, &event.source, &event.id)
                .await?
        {
            return Ok(duplicate());
        }
        let origin = Origin::external(&event.source)
            .in_call(&format!("{SERVICE}IngestEvent"), rid.as_deref());
        let actor = actor_of(&origin);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let now = self.app.now();
            let mut inst: pb::LabletInstance = self.app.get(&instance_id).await?;
            let before = inst.state();
            let mut core = instance_core(&inst)?;
            let grading_started = core.state_since();
            let applied = match &intent {
                Intent::CollectionCompleted { .. } => core.collection_completed(now, &actor),
                Intent::GradingCompleted { score } => {
                    let domain = convert::grading_score_from_proto(score, "score")?;
                    core.record_grading(domain, now, &actor)
                }
            };
            if let Err(e) = applied {
                if self
                    .already_applied(&instance_id, &event.source, &event.id)
                    .await?
                {
                    return Ok(duplicate());
                }
                return Err(ApiError::from(e).on_resource("instance", &instance_id));
            }
            write_back_instance(&mut inst, &core, now);
            let after = inst.state();
            let reason = inst
                .state_history
                .last()
                .map(|t| t.reason.clone())
                .unwrap_or_default();
            let mut details = json!({
                DETAIL_CLOUDEVENT_ID: event.id,
                "cloudevent_source": event.source,
                "cloudevent_type": event.r#type,
            });
            let mut m = Mutation::at(now);
            match &intent {
                Intent::CollectionCompleted {
                    collection_id,
                    artifacts_uri,
                } => {
                    if let Value::Object(map) = &mut details {
                        map.insert("collection_id".into(), json!(collection_id));
                        map.insert("artifacts_uri".into(), json!(artifacts_uri));
                    }
                    let mut data = instance_event_data(&inst, before, &reason, now);
                    if let Value::Object(map) = &mut data {
                        map.insert("collection_id".into(), json!(collection_id));
                        map.insert("artifacts_uri".into(), json!(artifacts_uri));
                    }
                    m.emit(self.app.factory.instance_state(
                        &inst.id,
                        CoreInstanceState::Grading,
                        data,
                        now,
                    ));
                }
                Intent::GradingCompleted { score } => {
                    let score_json = json!({
                        "total": score.total,
                        "max": score.max,
                        "passed": score.passed,
                        "breakdown": score.breakdown.iter().map(|c| json!({
                            "criterion": c.criterion, "points": c.points, "max": c.max,
                        })).collect::<Vec<_>>(),
                    });
                    if let Value::Object(map) = &mut details {
                        map.insert("score".into(), score_json.clone());
                    }
                    m.emit(self.app.factory.event(
                        ccm_cloudevents::catalog::INSTANCE_GRADING_COMPLETED,
                        &inst.id,
                        json!({
                            "instance_id": inst.id,
                            "score": score_json,
                            "grading_duration_seconds": (now - grading_started).num_seconds().max(0),
                        }),
                        now,
                    ));
                    m.emit(self.app.factory.instance_state(
                        &inst.id,
                        CoreInstanceState::Stopping,
                        instance_event_data(&inst, before, &reason, now),
                        now,
                    ));
                }
            }
            m.update(&mut inst, ccm_store::ClaimChange::Keep)?;
            m.audit(
                &inst,
                &origin,
                AuditFacts {
                    action: "instance.transition".to_owned(),
                    from_state: before.as_str_name().to_owned(),
                    to_state: after.as_str_name().to_owned(),
                    reason,
                    details: to_struct(details),
                },
            );
            match self.app.commit(m).await {
                Ok(_) => {
                    return Ok(pb::IngestEventResponse {
                        duplicate: false,
                        handled: true,
                        instance_id: inst.id.clone(),
                        message: format!("instance → {}", after.as_str_name()),
                    });
                }
                Err(ApiError::Aborted { .. }) if attempt < MAX_INGEST_ATTEMPTS => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<pb::ListAuditRecordsResponse, ApiError> {
        let _scope = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let kind: Option<pb::ResourceKind> =
            validate::enum_value(&mut v, "resource_kind", req.resource_kind, false);
        validate::free_text(
            &mut v,
            "resource_id",
            &req.resource_id,
            ccm_store::MAX_ID_BYTES,
            false,
        );
        validate::free_text(&mut v, "actor", &req.actor, MAX_AUDIT_FILTER_LEN, false);
        validate::free_text(
            &mut v,
            "action_prefix",
            &req.action_prefix,
            MAX_AUDIT_FILTER_LEN,
            false,
        );
        let since = req
            .since
            .as_ref()
            .and_then(|t| v.absorb(timestamp_from_proto(t, "since")));
        let until = req
            .until
            .as_ref()
            .and_then(|t| v.absorb(timestamp_from_proto(t, "until")));
        if let (Some(s), Some(u)) = (since, until)
            && u < s
        {
            v.add("until", "must not be before since");
        }
        let fingerprint = paging::filter_fingerprint(&pb::ListAuditRecordsRequest {
            page_size: 0,
            page_token: String::new(),
            ..req.clone()
        });
        let page = v.absorb(paging::page_request::<LogPosition>(
            PageKind::AuditRecords,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        v.into_result()?;
        let Some(page) = page else {
            return Err(ApiError::internal_msg("validated page missing"));
        };
        let query = LogQuery {
            resource_kind: kind
                .filter(|k| *k != pb::ResourceKind::Unspecified)
                .map(|k| k.as_str_name().to_owned()),
            resource_id: (!req.resource_id.is_empty()).then(|| req.resource_id.clone()),
            since,
            until,
            ..Default::default()
        };
        let scan = scan_log(
            &self.app,
            LogKind::Audit,
            query,
            page.cursor,
            page.page_size,
            |entry| {
                if !req.actor.is_empty() && entry.actor != req.actor {
                    return Ok(None);
                }
                if !entry.action.starts_with(&req.action_prefix) {
                    return Ok(None);
                }
                audit_from_entry(entry).map(Some)
            },
        )
        .await?;
        Ok(pb::ListAuditRecordsResponse {
            records: scan.items,
            next_page_token: scan.next.map_or_else(String::new, |pos| {
                paging::encode_page_token(PageKind::AuditRecords, fingerprint, &pos)
            }),
        })
    }

    async fn watch(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<ReceiverStream<WatchItem>, ApiError> {
        let scope = caller_of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let mut filter = WatchFilter::default();
        let mut all_kinds = false;
        for (i, k) in req.kinds.iter().enumerate() {
            match validate::enum_value::<pb::ResourceKind>(
                &mut v,
                &index_path("kinds", i),
                *k,
                false,
            ) {
                Some(pb::ResourceKind::Unspecified) => all_kinds = true,
                Some(kind) => {
                    filter.kinds.insert(kind as i32);
                }
                None => {}
            }
        }
        if all_kinds {
            filter.kinds.clear();
        }
        if req.resource_ids.len() > MAX_WATCH_RESOURCE_IDS {
            v.add(
                "resource_ids",
                format!("at most {MAX_WATCH_RESOURCE_IDS} ids"),
            );
        }
        for (i, id) in req.resource_ids.iter().enumerate() {
            let field = index_path("resource_ids", i);
            if id.is_empty() {
                v.add(&field, "must not be empty");
            } else if validate::free_text(&mut v, &field, id, ccm_store::MAX_ID_BYTES, false)
                .is_some()
            {
                filter.ids.insert(id.clone());
            }
        }
        validate::free_text(
            &mut v,
            "owner_id",
            &req.owner_id,
            MAX_AUDIT_FILTER_LEN,
            false,
        );
        if req.since_revision < 0 {
            v.add("since_revision", "must not be negative");
        }
        let heartbeat = match &req.heartbeat_interval {
            None => Some(DEFAULT_HEARTBEAT),
            Some(d) => v
                .absorb(convert::duration_from_proto(d, "heartbeat_interval"))
                .and_then(|d| {
                    if d < chrono::Duration::zero() {
                        v.add("heartbeat_interval", "must not be negative");
                        None
                    } else {
                        Some(
                            d.to_std()
                                .unwrap_or(DEFAULT_HEARTBEAT)
                                .clamp(MIN_HEARTBEAT, MAX_HEARTBEAT),
                        )
                    }
                }),
        };
        v.into_result()?;
        let heartbeat = heartbeat.unwrap_or(DEFAULT_HEARTBEAT);
        filter.owner = if scope.own_only {
            Some(scope.caller.subject.clone())
        } else {
            (!req.owner_id.is_empty()).then(|| req.owner_id.clone())
        };
        let (start, initial) = if req.since_revision > 0 {
            (u64::try_from(req.since_revision).unwrap_or(0), false)
        } else {
            (
                self.app.coord.feed_revision().await?,
                req.send_initial_state,
            )
        };
        tracing::debug!(
            start,
            initial,
            kinds = filter.kinds.len(),
            ids = filter.ids.len(),
            owner = filter.owner.as_deref().unwrap_or(""),
            "watch started"
        );
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(run_watch(
            self.app.clone(),
            self.shutdown.clone(),
            filter,
            start,
            initial,
            heartbeat,
            tx,
        ));
        Ok(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl EventService for Events {
    type WatchEventsStream =
        futures::stream::BoxStream<'static, Result<pb::WatchEventsResponse, Status>>;

    #[tracing::instrument(name = "EventService.WatchEvents", skip_all, fields(since = request.get_ref().since_revision))]
    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.watch(request)
            .await
            .map(|s| Response::new(s.boxed()))
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "EventService.IngestEvent", skip_all, fields(event_type = tracing::field::Empty))]
    async fn ingest_event(
        &self,
        request: Request<pb::IngestEventRequest>,
    ) -> Result<Response<pb::IngestEventResponse>, Status> {
        self.ingest(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }

    #[tracing::instrument(name = "EventService.ListAuditRecords", skip_all)]
    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        self.audit_records(request)
            .await
            .map(Response::new)
            .map_err(ApiError::into_status)
    }
}
