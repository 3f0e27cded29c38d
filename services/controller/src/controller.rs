//! The controller: leader election, the reconcile loop and the pass that runs every reconciler
//! over one snapshot of the fleet.
//!
//! # The loop
//!
//! [`Controller::run`] campaigns in the election [`ELECTION`] through
//! [`ccm_coord::run_for_leadership`]. While leading it runs passes ([`Controller::pass`]) until
//! leadership is lost or shutdown is asked for. A pass is level-triggered: it re-reads the whole
//! fleet from the control plane (workers, live instances, templates, the definition versions
//! they use, pending worker operations), compares desired and actual state, acts, and sets
//! when each object wants to be looked at again (per-object backoff timers after failures,
//! per-worker poll times); objects not due are skipped. The next pass starts after the shortest
//! reconciler interval (at least [`MIN_PASS_GAP`]), or at once on a manual `Reconcile`. Every run is a `tracing` span carrying its reason (`periodic`, `requeue`,
//! `leader_elected`, `manual: …`) and is counted in the [`StatusBoard`].
//!
//! # Memory
//!
//! What the controller remembers between passes is only an optimisation or a courtesy
//! (backoff timers, which collection requests were sent, when a worker was polled, the cached
//! CML clients, the last scale-up per template); it is dropped when leadership ends, and a new
//! leader rebuilds it from the store (the cooldowns from the recorded scaling decisions).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ccm_artifacts::ArtifactFetcher;
use ccm_cloud::CloudProvider;
use ccm_cml::CmlClient;
use ccm_coord::{Coordinator, LeaderContext, LeaseOptions};
use ccm_core::clock::Clock;
use ccm_core::labyaml::PreparedLab;
use ccm_proto::v1 as pb;
use ccm_runtime::client::PlaneClient;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cml::{CmlClientFactory, EndpointFacts, EndpointTemplate};
use crate::config::{ControllerSettings, ELECTION};
use crate::error::{ControllerError, Result};
use crate::plane::{Fence, Plane};
use crate::status::{self, Outcome, Run, StatusBoard};

/// Shortest pause between two passes (a requeue in the past does not spin the loop).
pub const MIN_PASS_GAP: Duration = Duration::from_millis(100);
/// Pause after a pass failed as a whole (control plane unreachable), before the next one.
pub const PASS_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// What the controller is built from: every dependency injected, so `ccm dev` and tests wire
/// the simulated cloud and the CML simulator, production EC2 and real CML.
#[derive(Clone)]
pub struct ControllerDeps {
    /// The cloud workers run on.
    pub cloud: Arc<dyn CloudProvider>,
    /// Makes (and caches) CML clients for worker endpoints.
    pub cml: Arc<dyn CmlClientFactory>,
    /// Leader election (etcd in production; the control plane's in-process one in `ccm dev`).
    pub coordinator: Arc<dyn Coordinator>,
    /// The connection to the control plane.
    pub plane: PlaneClient,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Lab artifact fetcher (file, https, s3).
    pub fetcher: Arc<dyn ArtifactFetcher>,
}

impl std::fmt::Debug for ControllerDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerDeps")
            .field("cloud", &self.cloud.kind())
            .field("cml", &self.cml)
            .finish_non_exhaustive()
    }
}

/// A manual reconcile request (ControllerService.Reconcile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualRequest {
    /// Scope.
    pub scope: pb::ReconcileScope,
    /// One target, or empty for all.
    pub target_id: String,
    /// Why.
    pub reason: String,
}

/// What one pass did (for tests, the benchmark and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Workers looked at.
    pub workers: usize,
    /// Instances looked at.
    pub instances: usize,
    /// Actions taken (transitions, cloud and CML calls that changed something, decisions).
    pub actions: usize,
    /// Objects whose reconcile failed (retried later).
    pub errors: usize,
    /// Scaling decisions recorded.
    pub decisions: usize,
}

/// One object's reconcile, boxed so a pass can run many at once.
pub(crate) type BoxedRun<'a, T, R> =
    std::pin::Pin<Box<dyn std::future::Future<Output = (&'a T, Result<R>)> + Send + 'a>>;

/// Per-leadership memory (see the module docs).
#[derive(Default)]
pub(crate) struct Memory {
    /// Instance id → (failed attempts of the current step, not before).
    pub instance_backoff: HashMap<String, (u32, DateTime<Utc>)>,
    /// Instance id → the COLLECTING entry time its collection request was sent for.
    pub collection_sent: HashMap<String, DateTime<Utc>>,
    /// Instance id → failed collection requests.
    pub collection_attempts: HashMap<String, u32>,
    /// (instance id, RUNNING entry time) of restarted instances whose lab was started.
    pub restarted: HashSet<(String, DateTime<Utc>)>,
    /// Worker id → next full poll.
    pub worker_next_poll: HashMap<String, DateTime<Utc>>,
    /// Worker id → last labs sync.
    pub worker_labs_synced: HashMap<String, DateTime<Utc>>,
    /// Worker id → (failed attempts, not before) of its current cloud action.
    pub worker_backoff: HashMap<String, (u32, DateTime<Utc>)>,
    /// Template → last scale-up (cooldowns).
    pub last_scale_up: BTreeMap<String, DateTime<Utc>>,
    /// Whether the cooldowns were loaded from the recorded decisions.
    pub scale_ups_loaded: bool,
    /// Decision key → fingerprint of the WAIT last recorded for it.
    pub recorded_waits: HashMap<String, String>,
    /// Halt reason last recorded.
    pub halted: Option<String>,
    /// Operations being carried out by a background task.
    pub operations_in_flight: HashSet<String>,
}

pub(crate) struct Inner {
    pub settings: ControllerSettings,
    pub endpoint: EndpointTemplate,
    pub deps: ControllerDeps,
    pub plane: Plane,
    pub status: StatusBoard,
    pub leader: Mutex<Option<Fence>>,
    pub wake: Notify,
    pub manual: Mutex<Vec<ManualRequest>>,
    pub memory: Mutex<Memory>,
    pub http: reqwest::Client,
    pub prepared: Mutex<HashMap<(String, String), Arc<PreparedLab>>>,
}

/// The controller. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Controller {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("replica_id", &self.inner.settings.replica_id)
            .finish_non_exhaustive()
    }
}

/// The snapshot one pass decides on.
pub(crate) struct Snapshot {
    pub now: DateTime<Utc>,
    pub workers: Vec<pb::CmlWorker>,
    pub instances: Vec<pb::LabletInstance>,
    pub templates: Vec<pb::WorkerTemplate>,
    pub definitions: HashMap<(String, String), Arc<pb::LabletDefinition>>,
    pub operations: Vec<pb::WorkerOperation>,
}

impl Snapshot {
    pub fn worker(&self, id: &str) -> Option<&pb::CmlWorker> {
        self.workers.iter().find(|w| w.id == id)
    }

    pub fn definition(&self, inst: &pb::LabletInstance) -> Option<&Arc<pb::LabletDefinition>> {
        self.definitions
            .get(&(inst.definition_id.clone(), inst.definition_version.clone()))
    }

    pub fn template(&self, name: &str) -> Option<&pb::WorkerTemplate> {
        self.templates.iter().find(|t| t.name == name)
    }
}

/// Which parts of a pass run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scope {
    pub instances: bool,
    pub workers: bool,
    pub autoscaler: bool,
    /// Only this object (instance or worker id).
    pub target: Option<String>,
    /// Poll workers even if their poll is not due.
    pub force_poll: bool,
}

impl Scope {
    fn all() -> Self {
        Scope {
            instances: true,
            workers: true,
            autoscaler: true,
            target: None,
            force_poll: false,
        }
    }
}

impl Controller {
    /// A controller with `settings` over `deps`. Fails on an invalid endpoint template.
    pub fn new(settings: ControllerSettings, deps: ControllerDeps) -> Result<Self> {
        let endpoint = EndpointTemplate::parse(&settings.cml_endpoint_template)?;
        let http = reqwest::Client::builder()
            .timeout(crate::config::ASSESSMENT_HTTP_TIMEOUT)
            .build()
            .map_err(|e| ControllerError::Config(format!("HTTP client: {e}")))?;
        Ok(Controller {
            inner: Arc::new(Inner {
                plane: Plane::new(deps.plane.clone()),
                settings,
                endpoint,
                deps,
                status: StatusBoard::default(),
                leader: Mutex::new(None),
                wake: Notify::new(),
                manual: Mutex::new(Vec::new()),
                memory: Mutex::new(Memory::default()),
                http,
                prepared: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &ControllerSettings {
        &self.inner.settings
    }

    /// The status board (GetControllerStatus).
    pub fn status(&self) -> &StatusBoard {
        &self.inner.status
    }

    /// The fence this replica holds, while it leads.
    pub fn leader_fence(&self) -> Option<Fence> {
        self.inner
            .leader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether this replica leads.
    pub fn is_leader(&self) -> bool {
        self.leader_fence().is_some()
    }

    pub(crate) fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.inner.deps.clock.now()
    }

    /// Queues a manual reconcile and wakes the loop. Refused (`NotLeader`) on a standby.
    pub fn request_reconcile(&self, request: ManualRequest) -> Result<()> {
        if !self.is_leader() {
            return Err(ControllerError::NotLeader(
                "this replica is a standby; ask the leader".into(),
            ));
        }
        self.inner
            .manual
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Campaigns for leadership and reconciles while leading, until `shutdown` is cancelled
    /// (then leadership is resigned for a fast hand-over).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let opts = LeaseOptions::with_ttl(self.inner.settings.lease_ttl);
        let this = self.clone();
        ccm_coord::run_for_leadership(
            self.inner.deps.coordinator.clone(),
            ELECTION.to_owned(),
            self.inner.settings.replica_id.clone(),
            opts,
            shutdown,
            move |ctx: LeaderContext| {
                let this = this.clone();
                async move { this.lead(ctx).await }
            },
        )
        .await?;
        self.set_leader(None);
        Ok(())
    }

    fn set_leader(&self, fence: Option<Fence>) {
        *self
            .inner
            .leader
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fence;
    }

    /// The work while leading: passes until leadership ends (this future is then dropped).
    async fn lead(&self, ctx: LeaderContext) {
        let fence = Fence {
            epoch: ctx.epoch(),
            holder: ctx.info().holder.clone(),
        };
        *self.memory() = Memory::default();
        self.inner.status.reset();
        self.set_leader(Some(fence.clone()));
        let lost = ctx.lost_token();
        let _clear = ClearOnDrop(self.clone());
        let mut reason = "leader_elected".to_owned();
        loop {
            if lost.is_cancelled() {
                return;
            }
            let manual: Vec<ManualRequest> = std::mem::take(
                &mut *self
                    .inner
                    .manual
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            let wait = if manual.is_empty() {
                self.pass_with(&fence, &reason, Scope::all()).await
            } else {
                let mut wait = None;
                for m in manual {
                    let scope = scope_of(&m);
                    let why = format!("manual: {}", m.reason);
                    wait = self.pass_with(&fence, &why, scope).await;
                }
                wait
            };
            let sleep = match wait {
                Some(d) => d,
                None => {
                    if lost.is_cancelled() {
                        return;
                    }
                    PASS_ERROR_BACKOFF
                }
            };
            reason = "periodic".to_owned();
            tokio::select! {
                () = lost.cancelled() => return,
                () = self.inner.wake.notified() => { reason = "manual".to_owned(); }
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Runs one full pass under `fence` (as the loop does); `reason` is recorded. Public for
    /// tests, `ccm simulate` and the benchmark.
    pub async fn pass(&self, fence: &Fence, reason: &str) -> Result<PassReport> {
        self.pass_inner(fence, reason, Scope::all()).await
    }

    /// A pass that logs its failure; returns how long to sleep, `None` if it failed.
    async fn pass_with(&self, fence: &Fence, reason: &str, scope: Scope) -> Option<Duration> {
        match self.pass_inner(fence, reason, scope).await {
            Ok(_) => Some(self.next_gap()),
            Err(e) => {
                tracing::warn!(error = %e, reason, "controller pass failed");
                None
            }
        }
    }

    fn next_gap(&self) -> Duration {
        let s = &self.inner.settings;
        s.instances_interval
            .min(s.workers_interval)
            .min(s.autoscaler_interval)
            .max(MIN_PASS_GAP)
    }

    async fn pass_inner(&self, fence: &Fence, reason: &str, scope: Scope) -> Result<PassReport> {
        let span = tracing::info_span!("controller_pass", reason, epoch = fence.epoch);
        async move {
            let started = Instant::now();
            let snapshot = self.snapshot().await?;
            let mut report = PassReport {
                workers: snapshot.workers.len(),
                instances: snapshot.instances.len(),
                ..PassReport::default()
            };
            if scope.workers {
                let t = Instant::now();
                let outcome = self.reconcile_workers(fence, &snapshot, &scope).await?;
                self.tally(
                    &mut report,
                    status::WORKERS,
                    reason,
                    &scope,
                    t,
                    outcome,
                    snapshot.workers.len(),
                );
                let t = Instant::now();
                let outcome = self.reconcile_operations(fence, &snapshot, &scope).await?;
                self.tally(
                    &mut report,
                    status::OPERATIONS,
                    reason,
                    &scope,
                    t,
                    outcome,
                    snapshot.operations.len(),
                );
            }
            if scope.instances {
                let t = Instant::now();
                let outcome = self.reconcile_instances(fence, &snapshot, &scope).await?;
                self.tally(
                    &mut report,
                    status::INSTANCES,
                    reason,
                    &scope,
                    t,
                    outcome,
                    snapshot.instances.len(),
                );
            }
            let summary = crate::autoscaler::fleet_summary(&snapshot, &self.inner.settings.policy);
            if scope.autoscaler && self.inner.settings.autoscaler_enabled {
                let t = Instant::now();
                match self.autoscale(fence, &snapshot, reason).await {
                    Ok(n) => {
                        self.record(
                            status::AUTOSCALER,
                            reason,
                            &scope,
                            t,
                            n,
                            0,
                            snapshot.workers.len(),
                        );
                        report.actions += n;
                        report.decisions += n;
                    }
                    Err(e @ ControllerError::NotLeader(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "autoscaler failed");
                        self.record_error(status::AUTOSCALER, reason, t, &e);
                        report.errors += 1;
                    }
                }
            }
            let mut summary = summary;
            {
                let memory = self.memory();
                summary.scaling_halted = memory.halted.is_some();
                summary.halt_reason = memory.halted.clone().unwrap_or_default();
            }
            self.inner.status.set_fleet(summary);
            tracing::debug!(
                took_ms = started.elapsed().as_millis() as u64,
                actions = report.actions,
                errors = report.errors,
                "pass done"
            );
            Ok(report)
        }
        .instrument(span)
        .await
    }

    /// Records one reconciler's run (its `(acted, errors)` outcome) and adds it to the pass report.
    #[allow(clippy::too_many_arguments)]
    fn tally(
        &self,
        report: &mut PassReport,
        name: &'static str,
        reason: &str,
        scope: &Scope,
        started: Instant,
        (acted, errors): (usize, usize),
        depth: usize,
    ) {
        self.record(name, reason, scope, started, acted, errors, depth);
        report.actions += acted;
        report.errors += errors;
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        name: &'static str,
        reason: &str,
        scope: &Scope,
        started: Instant,
        acted: usize,
        errors: usize,
        depth: usize,
    ) {
        let interval = match name {
            status::INSTANCES => self.inner.settings.instances_interval,
            status::AUTOSCALER => self.inner.settings.autoscaler_interval,
            _ => self.inner.settings.workers_interval,
        };
        let now = self.now();
        self.inner.status.record(Run {
            name,
            reason,
            target: scope.target.as_deref().unwrap_or(""),
            at: now,
            took: started.elapsed(),
            outcome: if errors > 0 {
                Outcome::Error
            } else if acted > 0 {
                Outcome::Acted
            } else {
                Outcome::Noop
            },
            error: (errors > 0).then(|| format!("{errors} object(s) failed; retried with backoff")),
            queue_depth: depth,
            next_run_at: chrono::Duration::from_std(interval).ok().map(|d| now + d),
        });
    }

    fn record_error(
        &self,
        name: &'static str,
        reason: &str,
        started: Instant,
        e: &ControllerError,
    ) {
        self.inner.status.record(Run {
            name,
            reason,
            target: "",
            at: self.now(),
            took: started.elapsed(),
            outcome: Outcome::Error,
            error: Some(e.to_string()),
            queue_depth: 0,
            next_run_at: None,
        });
    }

    /// Reads the fleet.
    pub(crate) async fn snapshot(&self) -> Result<Snapshot> {
        let plane = &self.inner.plane;
        let (workers, instances, templates, operations) = tokio::try_join!(
            plane.workers(),
            plane.live_instances(),
            plane.templates(),
            plane.pending_operations(),
        )?;
        let keys: HashSet<(String, String)> = instances
            .iter()
            .map(|i| (i.definition_id.clone(), i.definition_version.clone()))
            .collect();
        let mut definitions = HashMap::new();
        let mut fetched = futures::stream::iter(keys.into_iter().map(|k| async move {
            let d = plane.definition(&k.0, &k.1).await;
            (k, d)
        }))
        .buffer_unordered(self.inner.settings.concurrency.max(1));
        while let Some((k, d)) = fetched.next().await {
            match d {
                Ok(d) => {
                    definitions.insert(k, d);
                }
                Err(e) => {
                    tracing::warn!(definition = %k.0, version = %k.1, error = %e, "definition unreadable")
                }
            }
        }
        Ok(Snapshot {
            now: self.now(),
            workers,
            instances,
            templates,
            definitions,
            operations,
        })
    }

    /// The CML client of a worker, when its endpoint is known.
    pub(crate) fn cml_for(&self, worker: &pb::CmlWorker) -> Result<Option<Arc<dyn CmlClient>>> {
        let Some(ec2) = worker.ec2.as_ref() else {
            return Ok(None);
        };
        let Some(url) = self.inner.endpoint.render(EndpointFacts {
            public_ip: &ec2.public_ip,
            private_ip: &ec2.private_ip,
            instance_id: &ec2.instance_id,
        }) else {
            return Ok(None);
        };
        Ok(Some(self.inner.deps.cml.client(&url)?))
    }

    /// The worker's CML endpoint URL, when known.
    pub(crate) fn endpoint_of(&self, ec2: &pb::Ec2Info) -> Option<String> {
        self.inner.endpoint.render(EndpointFacts {
            public_ip: &ec2.public_ip,
            private_ip: &ec2.private_ip,
            instance_id: &ec2.instance_id,
        })
    }
}

/// Exponential backoff: `base · 2^(attempt − 1)`, capped.
pub(crate) fn backoff(attempt: u32, base: Duration, max: Duration) -> chrono::Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1).min(16))
        .unwrap_or(u32::MAX);
    let d = base.saturating_mul(factor).min(max);
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Trims a reason to what the control plane accepts (single line, bounded).
pub(crate) fn short_reason(text: &str) -> String {
    const MAX: usize = 500;
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= MAX {
        one_line
    } else {
        let mut s: String = one_line.chars().take(MAX - 1).collect();
        s.push('…');
        s
    }
}

fn scope_of(m: &ManualRequest) -> Scope {
    let target = (!m.target_id.is_empty()).then(|| m.target_id.clone());
    match m.scope {
        pb::ReconcileScope::Instances => Scope {
            instances: true,
            target,
            ..Scope::default()
        },
        pb::ReconcileScope::Workers => Scope {
            workers: true,
            target,
            force_poll: true,
            ..Scope::default()
        },
        pb::ReconcileScope::Autoscaler => Scope {
            autoscaler: true,
            ..Scope::default()
        },
        pb::ReconcileScope::Unspecified => Scope {
            force_poll: true,
            ..Scope::all()
        },
    }
}

struct ClearOnDrop(Controller);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.set_leader(None);
    }
}
