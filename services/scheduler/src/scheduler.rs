//! The scheduler: leader election, the watch/re-list loop, scheduling cycles, fenced batch
//! commits and the "why pending" conditions.
//!
//! # Loop
//!
//! [`Scheduler::run`] campaigns in the election with [`ccm_coord::run_for_leadership`]; standbys
//! wait there. As leader it repeats:
//!
//! 1. open a `WatchEvents` stream on instances, workers and templates (the feed position is taken
//!    when the stream opens), then list templates, workers and every instance that is not
//!    TERMINATED ([`World::list`]) — a change committed while listing arrives on the stream and is
//!    applied by `resource_version`, so nothing is lost;
//! 2. run a cycle (trigger `startup`), then wait for the first of: watch events (trigger
//!    `watch`; every event already buffered is applied first), the next instance's lead-window
//!    start or [`SchedulerSettings::cycle_interval`] (trigger `lead_window`), or the re-list
//!    timer (back to 1, trigger `periodic`). A watch reset, a broken stream or a commit conflict
//!    on capacity or ports also goes back to 1.
//!
//! When leadership is lost the whole leader future is dropped at once: no call is started after
//! the loss, and a call in flight carries a fence the control plane refuses.
//!
//! # Cycle
//!
//! The queue is every PENDING instance, ordered by slot start, booking time, id. The instances
//! inside their lead window (`slot start − lookahead`, ASAP at once; not yet ended) are decided
//! in one [`place_batch`] over a snapshot of the fleet with every live booking, so the batch
//! never overcommits. The placements go to `InternalService.CommitPlacements` in batches of
//! [`SchedulerSettings::batch_size`] (one store transaction each), fenced with the leader epoch.
//! Committed placements update the view at once; refused ones are re-read (`STALE`, state
//! changed, not found) or trigger a re-list (capacity, ports, worker unavailable: the view was
//! behind). Instances that fit nowhere get the condition `Scheduled=False`, reason
//! `Unschedulable`, with the kube-scheduler style summary and a structured `PendingSummary`,
//! written only when it differs from what the instance already carries.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ccm_control_plane::convert::timestamp_to_proto;
use ccm_coord::{Coordinator, LeaderContext, LeaseOptions, run_for_leadership};
use ccm_core::clock::Clock;
use ccm_core::placement::{Decision, Unschedulable, place_batch};
use ccm_proto::v1 as pb;
use ccm_runtime::client::{PlaneClient, fence};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Result, SchedulerError};
use crate::settings::{MAX_CONDITION_BATCH, SchedulerSettings};
use crate::world::{Applied, World};

/// Condition type of the placement state (the control plane sets it TRUE when it commits).
pub const CONDITION_SCHEDULED: &str = "Scheduled";
/// Condition reason of an instance no worker can take.
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";
/// Condition reason of an instance whose request cannot be built or is refused by the domain.
pub const REASON_INVALID: &str = "InvalidPlacementRequest";

/// Why a cycle ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// First cycle after a (re-)list at the start of leadership or after an error.
    Startup,
    /// Change events arrived.
    Watch,
    /// The periodic re-list.
    Periodic,
    /// An instance entered its lead window (or the cycle interval elapsed).
    LeadWindow,
}

impl Trigger {
    /// The name in logs and `SchedulingCycleStats.trigger`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Watch => "watch",
            Trigger::Periodic => "periodic",
            Trigger::LeadWindow => "lead_window",
        }
    }
}

/// Statistics of one cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct CycleStats {
    /// When it started (scheduler clock).
    pub started_at: DateTime<Utc>,
    /// Decision plus commit.
    pub duration: Duration,
    /// Deciding (in memory).
    pub decide_duration: Duration,
    /// Committing.
    pub commit_duration: Duration,
    /// Pending instances considered (inside their lead window).
    pub considered: usize,
    /// Workers in the snapshot.
    pub workers: usize,
    /// Placements committed.
    pub placed: usize,
    /// Instances left pending for lack of a fit.
    pub unschedulable: usize,
    /// Placements refused at commit.
    pub commit_conflicts: usize,
    /// Commit calls sent.
    pub commit_batches: usize,
    /// Why it ran.
    pub trigger: Trigger,
}

/// What `GetSchedulerStatus` reports about this replica.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusSnapshot {
    /// Whether this replica leads.
    pub is_leader: bool,
    /// Its epoch while leading.
    pub epoch: i64,
    /// When it became leader.
    pub acquired_at: Option<DateTime<Utc>>,
    /// PENDING instances in the queue.
    pub queue_depth: usize,
    /// Of which inside their lead window.
    pub queue_due: usize,
    /// The last completed cycle that had instances to decide (a cycle that finds nothing due
    /// only counts in `cycles_total`).
    pub last_cycle: Option<CycleStats>,
    /// Cycles since it became leader (all of them).
    pub cycles_total: u64,
    /// Placements committed since it became leader.
    pub placements_total: u64,
    /// Feed revision processed.
    pub watch_revision: i64,
}

#[derive(Debug, Default)]
struct Shared {
    status: Mutex<StatusSnapshot>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    fn get(&self) -> StatusSnapshot {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Marks the replica leader while alive; resets the status when the leader future is dropped.
struct LeaderGuard(Arc<Shared>);

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.0.update(|s| {
            s.is_leader = false;
            s.queue_depth = 0;
            s.queue_due = 0;
        });
    }
}

/// A scheduler replica. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Scheduler {
    settings: Arc<SchedulerSettings>,
    plane: PlaneClient,
    coord: Arc<dyn Coordinator>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("settings", &self.settings)
            .field("status", &self.shared.get())
            .finish_non_exhaustive()
    }
}

/// Result of one cycle for the loop.
struct CycleOutcome {
    /// The view is behind (commit conflicts on capacity, ports or workers): re-list.
    relist: bool,
    /// When the next PENDING instance enters its lead window.
    next_due: Option<DateTime<Utc>>,
}

impl Scheduler {
    /// A scheduler with `settings`, talking to the control plane through `plane`, campaigning on
    /// `coord` (the coordinator the control plane checks fences against), reading time from
    /// `clock`. Fails on invalid settings.
    pub fn new(
        settings: SchedulerSettings,
        plane: PlaneClient,
        coord: Arc<dyn Coordinator>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        settings.validate()?;
        Ok(Scheduler {
            settings: Arc::new(settings),
            plane,
            coord,
            clock,
            shared: Arc::default(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &SchedulerSettings {
        &self.settings
    }

    /// The control-plane client.
    pub fn plane(&self) -> &PlaneClient {
        &self.plane
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &Arc<dyn Coordinator> {
        &self.coord
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// This replica's status now.
    pub fn status(&self) -> StatusSnapshot {
        self.shared.get()
    }

    /// Campaigns and schedules while leading, until `shutdown` is cancelled; then resigns (a
    /// standby takes over at once). Returns an error only for arguments the coordinator refuses.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let opts = LeaseOptions::with_ttl(self.settings.lease_ttl);
        let me = self.clone();
        run_for_leadership(
            self.coord.clone(),
            self.settings.election.clone(),
            self.settings.replica_id.clone(),
            opts,
            shutdown,
            move |ctx| me.clone().lead(ctx),
        )
        .await?;
        Ok(())
    }

    /// The work of one leadership; never returns (dropped when leadership ends).
    async fn lead(self, ctx: LeaderContext) {
        let acquired = self.clock.now();
        self.shared.update(|s| {
            *s = StatusSnapshot {
                is_leader: true,
                epoch: ctx.epoch(),
                acquired_at: Some(acquired),
                ..StatusSnapshot::default()
            };
        });
        let _guard = LeaderGuard(self.shared.clone());
        let fence = fence(
            &self.settings.election,
            ctx.epoch(),
            &self.settings.replica_id,
        );
        let mut trigger = Trigger::Startup;
        loop {
            match self.follow(&fence, trigger).await {
                Ok(next) => trigger = next,
                Err(SchedulerError::Deposed(why)) => {
                    tracing::warn!(%why, "the control plane refused this leader's fence; waiting for the election to notice");
                    tokio::time::sleep(self.settings.retry_backoff).await;
                    trigger = Trigger::Startup;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduling loop failed; re-listing after a pause");
                    tokio::time::sleep(self.settings.retry_backoff).await;
                    trigger = Trigger::Startup;
                }
            }
        }
    }

    /// Opens the watch, lists, and runs cycles until a re-list is due; returns the trigger of the
    /// first cycle after the re-list.
    async fn follow(&self, fence: &pb::LeaderFence, first: Trigger) -> Result<Trigger> {
        let mut watch = self
            .plane
            .events()
            .watch_events(pb::WatchEventsRequest {
                kinds: vec![
                    pb::ResourceKind::Instance as i32,
                    pb::ResourceKind::Worker as i32,
                    pb::ResourceKind::Template as i32,
                ],
                heartbeat_interval: Some(prost_types::Duration {
                    seconds: i64::try_from(self.settings.watch_heartbeat.as_secs())
                        .unwrap_or(i64::MAX)
                        .max(1),
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .map_err(|s| SchedulerError::plane("EventService.WatchEvents", s))?
            .into_inner();
        let mut world = World::list(&self.plane).await?;
        let relist_at = tokio::time::Instant::now() + self.settings.relist_interval;
        let mut trigger = first;
        loop {
            let outcome = self.cycle(&mut world, fence, trigger).await?;
            if outcome.relist {
                return Ok(Trigger::Startup);
            }
            let now = self.clock.now();
            let wait = outcome
                .next_due
                .map(|due| (due - now).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(self.settings.cycle_interval)
                .min(self.settings.cycle_interval)
                .max(Duration::from_millis(1));
            tokio::select! {
                biased;
                msg = watch.message() => {
                    let mut reset = !self.absorb(&mut world, msg)?;
                    // Apply everything already buffered before deciding again.
                    while !reset {
                        match watch.message().now_or_never() {
                            Some(msg) => reset = !self.absorb(&mut world, msg)?,
                            None => break,
                        }
                    }
                    if reset {
                        return Ok(Trigger::Startup);
                    }
                    world.fetch_definitions(&self.plane).await?;
                    trigger = Trigger::Watch;
                }
                () = tokio::time::sleep_until(relist_at) => return Ok(Trigger::Periodic),
                () = tokio::time::sleep(wait) => trigger = Trigger::LeadWindow,
            }
        }
    }

    /// Applies one watch message; `Ok(false)` when the stream must be re-opened (reset, end).
    fn absorb(
        &self,
        world: &mut World,
        msg: std::result::Result<Option<pb::WatchEventsResponse>, tonic::Status>,
    ) -> Result<bool> {
        use pb::watch_events_response::Item;
        match msg {
            Ok(Some(pb::WatchEventsResponse {
                item: Some(Item::Change(change)),
            })) => {
                if world.apply(change) == Applied::Changed {
                    tracing::trace!(revision = world.revision, "view changed");
                }
            }
            Ok(Some(pb::WatchEventsResponse {
                item: Some(Item::Bookmark(b)),
            })) => world.revision = world.revision.max(b.revision),
            Ok(Some(pb::WatchEventsResponse {
                item: Some(Item::Reset(r)),
            })) => {
                tracing::info!(reason = r.reason, current = r.current_revision, message = %r.message, "watch reset; re-listing");
                return Ok(false);
            }
            Ok(Some(pb::WatchEventsResponse { item: None })) => {}
            Ok(None) => {
                tracing::info!("watch ended; re-listing");
                return Ok(false);
            }
            Err(s) => {
                tracing::info!(status = %s, "watch failed; re-listing");
                return Ok(false);
            }
        }
        let revision = world.revision;
        self.shared.update(|s| s.watch_revision = revision);
        Ok(true)
    }

    /// One scheduling cycle, in its own span carrying the trigger.
    async fn cycle(
        &self,
        world: &mut World,
        fence: &pb::LeaderFence,
        trigger: Trigger,
    ) -> Result<CycleOutcome> {
        let span = tracing::info_span!(
            "scheduling_cycle",
            trigger = trigger.as_str(),
            epoch = fence.epoch,
            considered = tracing::field::Empty,
            placed = tracing::field::Empty,
            unschedulable = tracing::field::Empty,
            conflicts = tracing::field::Empty,
        );
        self.cycle_inner(world, fence, trigger)
            .instrument(span)
            .await
    }

    async fn cycle_inner(
        &self,
        world: &mut World,
        fence: &pb::LeaderFence,
        trigger: Trigger,
    ) -> Result<CycleOutcome> {
        let started = Instant::now();
        let now = self.clock.now();
        let lead = self.settings.instantiation_lead;
        let queue = world.queue(now, self.settings.lookahead);
        let depth = queue.len();
        let next_due = queue
            .iter()
            .filter(|e| !e.due && !e.expired)
            .map(|e| e.due_at)
            .min();
        let mut requests = Vec::new();
        let mut versions = std::collections::HashMap::new();
        let mut invalid: Vec<(String, String)> = Vec::new();
        for e in queue.iter().filter(|e| e.due) {
            match world.request_for(e.instance, lead) {
                Ok(r) => {
                    versions.insert(e.instance.id.clone(), e.instance.resource_version);
                    requests.push(r);
                }
                Err(why) => invalid.push((e.instance.id.clone(), why)),
            }
        }
        let due = requests.len() + invalid.len();
        self.shared.update(|s| {
            s.queue_depth = depth;
            s.queue_due = due;
            s.cycles_total += 1;
        });
        if due == 0 {
            return Ok(CycleOutcome {
                relist: false,
                next_due,
            });
        }

        // Decide, in memory.
        let mut fleet = world.fleet(lead);
        let workers = fleet.len();
        let outcome = place_batch(&mut fleet, &requests, self.settings.score_policy.scorer());
        let decide_duration = started.elapsed();

        // Commit, in batches.
        let commit_started = Instant::now();
        let mut placements = Vec::new();
        let mut pending: Vec<(String, Unschedulable)> = Vec::new();
        for entry in outcome.entries {
            match entry.decision {
                Decision::Placed {
                    worker_id,
                    ports,
                    score,
                    ..
                } => placements.push(pb::Placement {
                    instance_resource_version: versions
                        .get(&entry.instance_id)
                        .copied()
                        .unwrap_or(0),
                    instance_id: entry.instance_id,
                    worker_id,
                    allocated_ports: ports.into_iter().map(|(n, p)| (n, i32::from(p))).collect(),
                    worker_resource_version: 0,
                    score,
                }),
                Decision::Pending { summary } => pending.push((entry.instance_id, summary)),
                Decision::Invalid { error } => invalid.push((entry.instance_id, error.to_string())),
            }
        }
        let mut placed = 0usize;
        let mut conflicts = 0usize;
        let mut batches = 0usize;
        let mut relist = false;
        let mut reread = Vec::new();
        for chunk in placements.chunks(self.settings.batch_size) {
            batches += 1;
            let resp = self
                .plane
                .internal()
                .commit_placements(pb::CommitPlacementsRequest {
                    fence: Some(fence.clone()),
                    placements: chunk.to_vec(),
                })
                .await
                .map_err(|s| SchedulerError::plane("InternalService.CommitPlacements", s))?
                .into_inner();
            for (p, r) in chunk.iter().zip(resp.results) {
                use pb::PlacementOutcome as O;
                match r.outcome() {
                    O::Committed | O::AlreadyCommitted => {
                        placed += 1;
                        if let Some(inst) = world.instances.get_mut(&p.instance_id) {
                            inst.state = pb::InstanceState::Scheduled as i32;
                            inst.worker_id = p.worker_id.clone();
                            inst.allocated_ports = p.allocated_ports.clone();
                            inst.resource_version = inst.resource_version.max(r.resource_version);
                        }
                    }
                    O::Stale | O::InvalidState | O::NotFound => {
                        conflicts += 1;
                        tracing::debug!(instance = %p.instance_id, outcome = ?r.outcome(), message = %r.message, "placement refused; re-reading the instance");
                        reread.push(p.instance_id.clone());
                    }
                    other => {
                        conflicts += 1;
                        relist = true;
                        tracing::info!(instance = %p.instance_id, outcome = ?other, message = %r.message, "placement refused; the view is behind, re-listing");
                    }
                }
            }
        }
        let placed_u64 = u64::try_from(placed).unwrap_or(u64::MAX);
        self.shared.update(|s| s.placements_total += placed_u64);
        for id in reread {
            self.reread(world, &id).await?;
        }

        // Why pending.
        let unschedulable = pending.len();
        self.write_conditions(world, fence, workers, pending, invalid)
            .await?;
        let commit_duration = commit_started.elapsed();

        let span = tracing::Span::current();
        span.record("considered", due);
        span.record("placed", placed);
        span.record("unschedulable", unschedulable);
        span.record("conflicts", conflicts);
        tracing::debug!(due, placed, unschedulable, conflicts, batches, "cycle done");
        let stats = CycleStats {
            started_at: now,
            duration: started.elapsed(),
            decide_duration,
            commit_duration,
            considered: due,
            workers,
            placed,
            unschedulable,
            commit_conflicts: conflicts,
            commit_batches: batches,
            trigger,
        };
        self.shared.update(|s| s.last_cycle = Some(stats));
        Ok(CycleOutcome { relist, next_due })
    }

    /// Re-reads one instance after a refused placement.
    async fn reread(&self, world: &mut World, id: &str) -> Result<()> {
        match self
            .plane
            .instances()
            .get_instance(pb::GetInstanceRequest {
                instance_id: id.to_owned(),
            })
            .await
        {
            Ok(r) => {
                if let Some(i) = r.into_inner().instance {
                    world.upsert_instance(i);
                }
                Ok(())
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                world.instances.remove(id);
                Ok(())
            }
            Err(s) => Err(SchedulerError::plane("InstanceService.GetInstance", s)),
        }
    }

    /// Writes the "why pending" condition on every instance that could not be placed, where it
    /// differs from what the instance carries.
    async fn write_conditions(
        &self,
        world: &mut World,
        fence: &pb::LeaderFence,
        workers: usize,
        pending: Vec<(String, Unschedulable)>,
        invalid: Vec<(String, String)>,
    ) -> Result<()> {
        let mut updates = Vec::new();
        for (id, summary) in pending {
            let s = pending_summary(&summary);
            updates.push(pb::InstanceConditionUpdate {
                instance_id: id,
                condition: Some(pb::Condition {
                    r#type: CONDITION_SCHEDULED.to_owned(),
                    status: pb::ConditionStatus::False as i32,
                    reason: REASON_UNSCHEDULABLE.to_owned(),
                    message: s.message.clone(),
                    ..Default::default()
                }),
                pending_summary: Some(s),
            });
        }
        for (id, why) in invalid {
            let message = format!("cannot be placed: {why}");
            updates.push(pb::InstanceConditionUpdate {
                instance_id: id,
                condition: Some(pb::Condition {
                    r#type: CONDITION_SCHEDULED.to_owned(),
                    status: pb::ConditionStatus::False as i32,
                    reason: REASON_INVALID.to_owned(),
                    message: message.clone(),
                    ..Default::default()
                }),
                pending_summary: Some(pb::PendingSummary {
                    total_workers: i32::try_from(workers).unwrap_or(i32::MAX),
                    message,
                    ..Default::default()
                }),
            });
        }
        updates.retain(|u| {
            world
                .instances
                .get(&u.instance_id)
                .is_some_and(|i| condition_differs(i, u))
        });
        for chunk in updates.chunks(MAX_CONDITION_BATCH) {
            let resp = self
                .plane
                .internal()
                .set_instance_conditions(pb::SetInstanceConditionsRequest {
                    fence: Some(fence.clone()),
                    updates: chunk.to_vec(),
                })
                .await
                .map_err(|s| SchedulerError::plane("InternalService.SetInstanceConditions", s))?
                .into_inner();
            for (u, r) in chunk.iter().zip(resp.results) {
                if !r.updated {
                    tracing::debug!(instance = %u.instance_id, message = %r.message, "condition not stored");
                    continue;
                }
                if let Some(inst) = world.instances.get_mut(&u.instance_id) {
                    if let Some(c) = &u.condition {
                        let now = Some(timestamp_to_proto(self.clock.now()));
                        match inst.conditions.iter_mut().find(|x| x.r#type == c.r#type) {
                            Some(x) => {
                                x.status = c.status;
                                x.reason = c.reason.clone();
                                x.message = c.message.clone();
                            }
                            None => inst.conditions.push(pb::Condition {
                                last_transition_at: now,
                                ..c.clone()
                            }),
                        }
                    }
                    inst.pending_summary = u.pending_summary.clone();
                }
            }
        }
        Ok(())
    }
}

/// Whether `update` would change the instance's condition or pending summary.
fn condition_differs(inst: &pb::LabletInstance, update: &pb::InstanceConditionUpdate) -> bool {
    let Some(c) = &update.condition else {
        return false;
    };
    let same_condition = inst.conditions.iter().any(|x| {
        x.r#type == c.r#type
            && x.status == c.status
            && x.reason == c.reason
            && x.message == c.message
    });
    !same_condition || inst.pending_summary != update.pending_summary
}

/// The `ccm.v1.RejectionCode` of a core rejection reason.
pub fn rejection_code(reason: ccm_core::placement::RejectReason) -> pb::RejectionCode {
    pb::RejectionCode::from_str_name(&format!("REJECTION_CODE_{}", reason.code()))
        .unwrap_or(pb::RejectionCode::Unspecified)
}

/// The structured "why pending" of an unschedulable request.
pub fn pending_summary(u: &Unschedulable) -> pb::PendingSummary {
    pb::PendingSummary {
        total_workers: i32::try_from(u.total_workers).unwrap_or(i32::MAX),
        feasible_workers: 0,
        rejections: u
            .reasons
            .iter()
            .map(|c| pb::RejectionCount {
                code: rejection_code(c.reason) as i32,
                count: i32::try_from(c.count).unwrap_or(i32::MAX),
            })
            .collect(),
        message: u.summary(),
        scale_up_template: String::new(),
        scale_up_in_flight: false,
    }
}
