//! Scale-up and scale-down decisions (domain.md §6, ARCHITECTURE.md §6).
//!
//! [`plan`] is a pure function of the fleet snapshot, the unplaced demand, the templates, the
//! time, the recent scale-ups and the [`AutoscalePolicy`]. It returns a [`ScalingPlan`]: a sorted
//! list of [`ScalingDecision`]s, each with an operator-readable reason (they are recorded through
//! `RecordScalingDecision` and shown to operators, domain.md §10.17), or a halt.
//!
//! ## Rules, in the order they are applied
//!
//! **Halt** ([`halt_reason`]). When more than `max_unready_fraction` of the managed
//! (templated, not TERMINATED) workers are unready — booting for longer than `unready_after`, or
//! FAILED / UNKNOWN — and at least `min_unready_to_halt` of them are, the plan is halted: no
//! scale-up, no restart, no drain, no terminate and no Wait for demand. Stop and ForceStop of
//! workers that are *already* DRAINING still proceed: they finish a decision taken earlier, add
//! no capacity, and the drain timeout is a promise to operators.
//!
//! **Drain lifecycle** (always). A DRAINING worker with no live instances → [`ScalingAction::Stop`]
//! (stop is preferred to terminate, FR-2.5.2c). A DRAINING worker with live instances that has
//! been draining longer than its template's `drain_timeout_hours` → [`ScalingAction::ForceStop`].
//!
//! **Scale-up.** Only demand whose slot starts by `now + lookahead` counts (ASAP demand always;
//! demand whose window has already ended is left to the control plane's expiry). It is sorted
//! first-fit-decreasing (largest first, by the sum over dimensions of demand / the largest template
//! capacity in that dimension) and then:
//! 0. packed onto **RUNNING** managed workers: demand that fits one is not unmet, the scheduler
//!    (which may simply not have run since) will place it → a Wait per such worker, which also keeps
//!    that worker from being drained. The input is normally what the scheduler could not place, so
//!    this only catches races; if it persists, the fit check here and placement's disagree;
//! 1. packed onto capacity that is **already booting** (PENDING / PROVISIONING / STARTING managed
//!    workers) → one [`ScalingAction::Wait`] per booting worker, naming what it will take;
//! 2. packed onto **STOPPED** managed workers, restarted in template preference order →
//!    [`ScalingAction::RestartStopped`] (~5 min instead of ~20 for a new worker);
//! 3. packed into **new** workers: each request first tries the new workers already opened in this
//!    plan (any template it fits), else opens one of the template [`select_template`] picks for it.
//!    Packing is over time ([`CapacityTimeline`]), so demands in disjoint windows share a worker.
//!    → one [`ScalingAction::ScaleUp`] per template with the number of workers.
//!    A template in its scale-up cooldown, at its `max_workers`, or a fleet at the global
//!    `max_workers` does not get the workers: what they would have served becomes a Wait saying
//!    why and how many workers are held back (the capped ScaleUp says so too). Held-back demand
//!    does **not** spill over to a less preferred template.
//!    Demand no template can serve → a Wait with template `None` explaining each template's refusal.
//! 4. **Minimum warm**: a template whose RUNNING + booting + just-restarted + just-created workers
//!    are fewer than its `min_warm` gets the difference, restarting STOPPED workers first.
//!
//! **Scale-down.** A RUNNING managed worker is idle when it has no live instances, no booking that
//! overlaps `[now, now + scale_down_grace)`, and no unplaced demand was packed onto it in step 0. Idle workers are drained
//! ([`ScalingAction::Drain`], code [`codes::SCALE_DOWN_IDLE`]) oldest activity first (latest
//! booking end, else the time it became RUNNING; then id), as long as (a) the template keeps at
//! least `min_warm` RUNNING workers, (b) the fleet keeps at least the global `min_warm_workers`
//! RUNNING managed workers, and (c) no more than `max_concurrent_drains` workers are DRAINING
//! (counting those already DRAINING that this plan does not stop). A worker with live instances is
//! never drained here (domain.md §11.5).
//!
//! **Retention.** A STOPPED managed worker with no live instances that has been stopped for longer
//! than `stopped_retention` → [`ScalingAction::Terminate`], unless this plan restarts it.
//!
//! Legacy workers (`template_name == None`) are invisible to every rule: never counted as
//! capacity, never counted for caps or the halt, never drained, stopped, restarted or terminated.
//!
//! ## Fit checks
//!
//! "Does this demand fit that worker" is placement's own check, [`check_fit`]: every placement
//! filter but the worker's state (licence ∈ affinity, node limit, AMI requirements, nested
//! virtualisation, capacity over the request's window — clamped to start at `now` — and free
//! ports), on the worker's [`WorkerSummary`] with the free ports left after what this plan already
//! packed onto it. A worker to be created is a [`WorkerSummary::of_template`] with an empty
//! timeline; [`template_rejection`] is the same check, explained.
//!
//! Only the AMI part differs, because a worker that is not RUNNING may not know its image yet. A
//! RUNNING worker gets placement's AMI filters exactly ([`ami_check`]). Otherwise a known AMI name
//! is matched by the requirement's glob and a known CML version against its `min_version`; an
//! unknown name is judged by comparing the requirement's glob with the template's `ami_pattern`
//! ([`ami_pattern_compatible`]), and an unknown version passes (a template's version is only known
//! once a worker boots; placement checks it then).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Duration, Utc};

use crate::capacity::CapacityTimeline;
use crate::defaults::{
    DEFAULT_MAX_CONCURRENT_DRAINS, DEFAULT_MAX_UNREADY_FRACTION, DEFAULT_MAX_WORKERS,
    DEFAULT_MIN_WARM_WORKERS, DRAIN_TIMEOUT_HOURS, INSTANTIATION_LEAD_MINUTES,
    MIN_UNREADY_WORKERS_TO_HALT, SCALE_DOWN_GRACE_MINUTES, SCALE_UP_LOOKAHEAD_MINUTES,
    STOPPED_WORKER_RETENTION_HOURS, UNREADY_AFTER_MINUTES, WORKER_RESTART_MINUTES,
};
use crate::fleet::{FleetSnapshot, PlacementRequest, WorkerSnapshot, WorkerSummary};
use crate::model::{
    Capacity, LicenseType, TimeWindow, WorkerState, WorkerTemplate, licence_list, saturating_u32,
};
use crate::placement::{
    RejectReason, ami_check, ami_name_check, ami_version_check, check_fit, glob_match,
};

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

/// The knobs of the autoscaler. [`Default`] takes every value from [`crate::defaults`].
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalePolicy {
    /// Demand whose slot starts within `now + lookahead` is considered for scale-up; ASAP demand
    /// always is. Default [`SCALE_UP_LOOKAHEAD_MINUTES`] (worker boot 20 + instantiation lead 15).
    pub lookahead: Duration,
    /// Instantiation starts this long before a slot (default [`INSTANTIATION_LEAD_MINUTES`]);
    /// used to say in reasons when the capacity is first needed.
    pub instantiation_lead: Duration,
    /// A worker with a booking overlapping `[now, now + grace)` is not idle. Default
    /// [`SCALE_DOWN_GRACE_MINUTES`].
    pub scale_down_grace: Duration,
    /// Disruption budget: at most this many managed workers DRAINING at once. Default
    /// [`DEFAULT_MAX_CONCURRENT_DRAINS`].
    pub max_concurrent_drains: usize,
    /// RUNNING managed workers kept fleet-wide even when idle (templates add their own `min_warm`).
    /// Default [`DEFAULT_MIN_WARM_WORKERS`].
    pub min_warm_workers: usize,
    /// Most managed (not TERMINATED) workers fleet-wide (templates add their own `max_workers`).
    /// Default [`DEFAULT_MAX_WORKERS`].
    pub max_workers: usize,
    /// Scaling halts when more than this fraction of managed workers is unready. Default
    /// [`DEFAULT_MAX_UNREADY_FRACTION`].
    pub max_unready_fraction: f64,
    /// A worker booting for longer than this counts as unready. Default [`UNREADY_AFTER_MINUTES`].
    pub unready_after: Duration,
    /// Fewest unready workers that can halt scaling. Default [`MIN_UNREADY_WORKERS_TO_HALT`].
    pub min_unready_to_halt: usize,
    /// A STOPPED worker is terminated after this long. Default [`STOPPED_WORKER_RETENTION_HOURS`].
    pub stopped_retention: Duration,
    /// No new worker of a template within this long after its last scale-up; `None` (the default)
    /// means the template's own `startup_minutes` (domain.md §6 resolution). Restarts of STOPPED
    /// workers are not subject to it: they name an existing worker, so repeating one is harmless.
    pub scale_up_cooldown: Option<Duration>,
    /// Drain timeout for a DRAINING worker whose template is no longer known. Default
    /// [`DRAIN_TIMEOUT_HOURS`].
    pub default_drain_timeout: Duration,
}

impl Default for AutoscalePolicy {
    fn default() -> Self {
        AutoscalePolicy {
            lookahead: Duration::minutes(SCALE_UP_LOOKAHEAD_MINUTES),
            instantiation_lead: Duration::minutes(INSTANTIATION_LEAD_MINUTES),
            scale_down_grace: Duration::minutes(SCALE_DOWN_GRACE_MINUTES),
            max_concurrent_drains: DEFAULT_MAX_CONCURRENT_DRAINS,
            min_warm_workers: DEFAULT_MIN_WARM_WORKERS,
            max_workers: DEFAULT_MAX_WORKERS,
            max_unready_fraction: DEFAULT_MAX_UNREADY_FRACTION,
            unready_after: Duration::minutes(UNREADY_AFTER_MINUTES),
            min_unready_to_halt: MIN_UNREADY_WORKERS_TO_HALT,
            stopped_retention: Duration::hours(STOPPED_WORKER_RETENTION_HOURS),
            scale_up_cooldown: None,
            default_drain_timeout: Duration::hours(DRAIN_TIMEOUT_HOURS),
        }
    }
}

impl AutoscalePolicy {
    /// The scale-up cooldown of `template`: the policy's, else the template's startup time.
    pub fn cooldown_for(&self, template: &WorkerTemplate) -> Duration {
        self.scale_up_cooldown
            .unwrap_or_else(|| Duration::minutes(i64::from(template.startup_minutes)))
    }
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// What the controller should do. The declaration order is the order of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ScalingAction {
    /// Create `count` new workers of `template`.
    ScaleUp,
    /// Start the STOPPED worker `worker_id` again.
    RestartStopped,
    /// Move the RUNNING worker `worker_id` to DRAINING (no new placements).
    Drain,
    /// The DRAINING worker `worker_id` is empty: stop it (EC2 stop; preferred to terminate).
    Stop,
    /// The DRAINING worker `worker_id` passed its drain timeout: terminate its remaining
    /// instances (`instances`), then stop it.
    ForceStop,
    /// The STOPPED worker `worker_id` outlived the retention: terminate it.
    Terminate,
    /// Nothing to do yet for `instances`: capacity is booting, a cooldown or cap holds, or no
    /// template fits. Recorded so operators see why demand waits.
    Wait,
}

impl ScalingAction {
    /// Upper snake-case name, as in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            ScalingAction::ScaleUp => "SCALE_UP",
            ScalingAction::RestartStopped => "RESTART_STOPPED",
            ScalingAction::Drain => "DRAIN",
            ScalingAction::Stop => "STOP",
            ScalingAction::ForceStop => "FORCE_STOP",
            ScalingAction::Terminate => "TERMINATE",
            ScalingAction::Wait => "WAIT",
        }
    }
}

impl fmt::Display for ScalingAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Machine-readable reason codes carried by [`ScalingDecision::code`].
pub mod codes {
    /// ScaleUp: unmet demand needs new workers.
    pub const SCALE_UP_DEMAND: &str = "scale_up_demand";
    /// ScaleUp: a template is below its `min_warm`.
    pub const SCALE_UP_MIN_WARM: &str = "scale_up_min_warm";
    /// RestartStopped: unmet demand fits a STOPPED worker.
    pub const RESTART_FOR_DEMAND: &str = "restart_for_demand";
    /// RestartStopped: a template is below its `min_warm`.
    pub const RESTART_FOR_MIN_WARM: &str = "restart_for_min_warm";
    /// Wait: the demand fits a RUNNING worker; the scheduler will place it there.
    pub const WAIT_FITS_RUNNING: &str = "wait_fits_running";
    /// Wait: the demand fits a worker that is already booting.
    pub const WAIT_BOOTING: &str = "wait_booting";
    /// Wait: the template is in its scale-up cooldown.
    pub const WAIT_COOLDOWN: &str = "wait_cooldown";
    /// Wait: the template's `max_workers` is reached.
    pub const WAIT_TEMPLATE_MAX: &str = "wait_template_max_workers";
    /// Wait: the global `max_workers` is reached.
    pub const WAIT_GLOBAL_MAX: &str = "wait_global_max_workers";
    /// Wait: no template can serve the demand.
    pub const WAIT_NO_TEMPLATE: &str = "wait_no_template";
    /// Drain: idle worker (domain.md §6 "No running or scheduled instances").
    pub const SCALE_DOWN_IDLE: &str = "scale_down_idle";
    /// Stop: a DRAINING worker has no instances left.
    pub const DRAIN_COMPLETE: &str = "drain_complete";
    /// ForceStop: a DRAINING worker passed its drain timeout.
    pub const DRAIN_TIMEOUT: &str = "drain_timeout";
    /// Terminate: STOPPED longer than the retention.
    pub const STOPPED_RETENTION: &str = "stopped_retention";
}

/// One decision, with the reason an operator reads in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingDecision {
    /// What to do.
    pub action: ScalingAction,
    /// The template concerned (`None` only for a Wait no template can serve).
    pub template: Option<String>,
    /// The worker concerned, for worker actions and a Wait on a booting worker.
    pub worker_id: Option<String>,
    /// Workers concerned: new workers for ScaleUp, 1 for worker actions and a Wait on a booting
    /// worker, workers held back for a cooldown/cap Wait, 0 for a no-template Wait.
    pub count: u32,
    /// Why, with the numbers, for operators. Never empty.
    pub reason: String,
    /// Machine-readable reason, one of [`codes`].
    pub code: &'static str,
    /// Instances concerned, sorted: the demand served or waiting, or for ForceStop the instances
    /// that will be terminated.
    pub instances: Vec<String>,
}

/// What the autoscaler decided in one pass.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScalingPlan {
    /// Decisions, sorted by action, then template, then worker id (then reason and instances).
    pub decisions: Vec<ScalingDecision>,
    /// `Some(reason)` when scaling is halted because too many workers are unready.
    pub halted: Option<String>,
}

impl ScalingPlan {
    /// The decisions with `action`.
    pub fn with_action(&self, action: ScalingAction) -> impl Iterator<Item = &ScalingDecision> {
        self.decisions.iter().filter(move |d| d.action == action)
    }

    /// Total workers asked for by ScaleUp decisions.
    pub fn new_workers(&self) -> u32 {
        self.with_action(ScalingAction::ScaleUp)
            .map(|d| d.count)
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------------

/// Everything one autoscaling pass looks at.
#[derive(Debug, Clone, Copy)]
pub struct AutoscaleInput<'a> {
    /// Every known worker (legacy ones are ignored).
    pub fleet: &'a FleetSnapshot,
    /// PENDING instances the scheduler could not place.
    pub demand: &'a [PlacementRequest],
    /// The worker templates.
    pub templates: &'a [WorkerTemplate],
    /// The time of the pass.
    pub now: DateTime<Utc>,
    /// Template name → time of its most recent ScaleUp (for the cooldown).
    pub last_scale_up: &'a BTreeMap<String, DateTime<Utc>>,
}

// ---------------------------------------------------------------------------------------------
// Template selection
// ---------------------------------------------------------------------------------------------

/// Why no template can serve a request: each template's first refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoTemplateFits {
    /// `(template name, refusal)`, by template name.
    pub rejections: Vec<(String, String)>,
}

impl fmt::Display for NoTemplateFits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rejections.is_empty() {
            return f.write_str("no worker templates are configured");
        }
        for (i, (name, why)) in self.rejections.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{name}: {why}")?;
        }
        Ok(())
    }
}

/// The template new workers for `request` should be made from (domain.md §5 `select_template`).
///
/// A template qualifies when [`template_rejection`] finds nothing wrong. Among those: PERSONAL
/// before ENTERPRISE before EVALUATION, then the smallest capacity (cpu, memory, storage, nodes
/// compared in that order), then the name.
pub fn select_template<'t>(
    request: &PlacementRequest,
    templates: &'t [WorkerTemplate],
) -> Result<&'t WorkerTemplate, NoTemplateFits> {
    let mut ok: Vec<&WorkerTemplate> = Vec::new();
    let mut rejections = Vec::new();
    for t in templates {
        match template_rejection(t, request) {
            None => ok.push(t),
            Some(why) => rejections.push((t.name.clone(), why)),
        }
    }
    ok.sort_by(|a, b| template_preference(a).cmp(&template_preference(b)));
    match ok.first() {
        Some(t) => Ok(t),
        None => {
            rejections.sort();
            Err(NoTemplateFits { rejections })
        }
    }
}

/// Why a new worker of `template` could not serve `request`, or `None` when it could.
///
/// The placement filters ([`check_fit`]) on an empty worker as the template would make it
/// ([`WorkerSummary::of_template`]), so the rules are placement's, in placement's order: licence
/// ∈ affinity (empty = any), node limit (licence-capped) ≥ node count, every AMI requirement
/// compatible with the template's `ami_pattern` ([`ami_pattern_compatible`]), nested
/// virtualisation ([`WorkerTemplate::nested_virt`]), capacity ≥ demand, and enough ports in the
/// range.
pub fn template_rejection(template: &WorkerTemplate, request: &PlacementRequest) -> Option<String> {
    let worker = WorkerSummary::of_template(template, WorkerState::Pending);
    let empty = CapacityTimeline::new(worker.declared);
    let ami = template_ami_check(template, request);
    let reason = check_fit(&worker, &empty, ami, request, &request.window).err()?;
    Some(match reason {
        RejectReason::LicenceAffinity { licence } => format!(
            "licence {licence} not in the affinity {}",
            licence_list(&request.license_affinity)
        ),
        RejectReason::LicenceNodeLimit { licence, limit } => format!(
            "needs {} nodes, node limit {limit} ({licence})",
            request.demand.nodes
        ),
        RejectReason::Insufficient { dimension } => format!(
            "needs {} {}, a worker has {}",
            request.demand.get(dimension),
            dimension.unit(),
            worker.declared.get(dimension)
        ),
        RejectReason::NestedVirt => format!(
            "needs nested virtualisation, instance type {} has none",
            template.instance_type
        ),
        RejectReason::InsufficientPorts => format!(
            "needs {} ports, the port range {}-{} holds {}",
            request.port_names.len(),
            template.port_range.start,
            template.port_range.end,
            template.port_range.len()
        ),
        RejectReason::AmiPattern | RejectReason::AmiVersion => {
            let pattern = request
                .ami_requirements
                .iter()
                .find(|r| !ami_pattern_compatible(&r.name_pattern, &template.ami_pattern))
                .map_or("", |r| r.name_pattern.as_str());
            format!(
                "AMI requirement {pattern:?} is not compatible with ami_pattern {:?}",
                template.ami_pattern
            )
        }
        other => other.to_string(),
    })
}

/// The AMI filters for a worker of `template` whose image is not known yet: every requirement's
/// name pattern must be compatible with the template's `ami_pattern`; minimum versions cannot be
/// judged before the worker runs and are left to placement.
fn template_ami_check(
    template: &WorkerTemplate,
    request: &PlacementRequest,
) -> Result<(), RejectReason> {
    if request
        .ami_requirements
        .iter()
        .all(|r| ami_pattern_compatible(&r.name_pattern, &template.ami_pattern))
    {
        Ok(())
    } else {
        Err(RejectReason::AmiPattern)
    }
}

/// Whether a definition's AMI name glob can be satisfied by a template's AMI glob.
///
/// Two globs cannot be compared exactly, so: compatible when the requirement is empty or `*`,
/// when the template pattern is `*`, or when the requirement glob matches the template pattern
/// *as a literal string* (`CML-2.*` accepts `CML-2.9.*`; `CML-2.9.*` does not accept `CML-2.*`,
/// which could also pick a 2.8 image).
pub fn ami_pattern_compatible(requirement_pattern: &str, template_pattern: &str) -> bool {
    requirement_pattern.is_empty()
        || requirement_pattern == "*"
        || template_pattern == "*"
        || glob_match(requirement_pattern, template_pattern)
}

fn template_preference(t: &WorkerTemplate) -> (LicenseType, [u32; 4], &str) {
    (
        t.license_type,
        t.declared_capacity().as_array(),
        t.name.as_str(),
    )
}

// ---------------------------------------------------------------------------------------------
// Halt
// ---------------------------------------------------------------------------------------------

/// `Some(reason)` when too many managed workers are unready for scaling to go on.
///
/// Managed = templated and not TERMINATED (legacy workers are not counted). Unready = booting
/// (PENDING / PROVISIONING / STARTING) for longer than `unready_after`, or FAILED / UNKNOWN.
/// Halts when at least `min_unready_to_halt` workers are unready **and** their fraction exceeds
/// `max_unready_fraction`.
pub fn halt_reason(
    fleet: &FleetSnapshot,
    now: DateTime<Utc>,
    policy: &AutoscalePolicy,
) -> Option<String> {
    let mut managed: Vec<&WorkerSnapshot> = fleet
        .workers()
        .iter()
        .filter(|w| w.template_name.is_some() && w.state != WorkerState::Terminated)
        .collect();
    managed.sort_by(|a, b| a.id.cmp(&b.id));
    let unready: Vec<&WorkerSnapshot> = managed
        .iter()
        .copied()
        .filter(|w| is_unready(w, now, policy))
        .collect();
    if unready.is_empty() || unready.len() < policy.min_unready_to_halt {
        return None;
    }
    let fraction = unready.len() as f64 / managed.len() as f64;
    if fraction <= policy.max_unready_fraction {
        return None;
    }
    let listed: Vec<String> = unready
        .iter()
        .map(|w| {
            if w.state.is_booting() {
                format!("{} {} for {}", w.id, w.state, fmt_dur(now - w.state_since))
            } else {
                format!("{} {}", w.id, w.state)
            }
        })
        .collect();
    Some(format!(
        "scaling halted: {} of {} managed workers ({:.0}%) are unready, more than the {:.0}% allowed \
         (booting longer than {} counts as unready): {}; scale-up, restarts, drains and terminations \
         wait until they recover or are removed",
        unready.len(),
        managed.len(),
        fraction * 100.0,
        policy.max_unready_fraction * 100.0,
        fmt_dur(policy.unready_after),
        listed.join(", ")
    ))
}

fn is_unready(w: &WorkerSnapshot, now: DateTime<Utc>, policy: &AutoscalePolicy) -> bool {
    match w.state {
        WorkerState::Failed | WorkerState::Unknown => true,
        s if s.is_booting() => now - w.state_since > policy.unready_after,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------

/// Decides one autoscaling pass. See the module documentation for the rules.
pub fn plan(input: &AutoscaleInput<'_>, policy: &AutoscalePolicy) -> ScalingPlan {
    let ctx = Ctx::new(input, policy);
    let halted = halt_reason(input.fleet, input.now, policy);
    let mut out = Vec::new();

    let finishing = ctx.drain_lifecycle(&mut out);
    if halted.is_none() {
        let relevant = ctx.relevant_demand();
        let up = ctx.scale_up(&relevant, &mut out);
        ctx.scale_down(&up.running_with_demand, &finishing, &mut out);
        ctx.retention(&up.restarted, &mut out);
    }

    out.sort_by(|a, b| {
        (a.action, &a.template, &a.worker_id, &a.reason, &a.instances).cmp(&(
            b.action,
            &b.template,
            &b.worker_id,
            &b.reason,
            &b.instances,
        ))
    });
    ScalingPlan {
        decisions: out,
        halted,
    }
}

struct Ctx<'a> {
    policy: &'a AutoscalePolicy,
    now: DateTime<Utc>,
    demand: &'a [PlacementRequest],
    templates: &'a [WorkerTemplate],
    by_name: BTreeMap<&'a str, &'a WorkerTemplate>,
    last_scale_up: &'a BTreeMap<String, DateTime<Utc>>,
    /// Templated workers, sorted by id.
    managed: Vec<&'a WorkerSnapshot>,
}

/// One unplaced request considered for scale-up.
struct Demand<'a> {
    req: &'a PlacementRequest,
    /// Its window, clamped to start no earlier than now.
    window: TimeWindow,
}

/// What the scale-up side tells the others.
struct ScaleUpOutcome {
    /// STOPPED workers it restarts: not to be terminated.
    restarted: BTreeSet<String>,
    /// RUNNING workers that pending demand fits: not idle.
    running_with_demand: BTreeSet<String>,
}

/// Why a new worker of a template cannot be created now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Block {
    Cooldown {
        last: DateTime<Utc>,
        until: DateTime<Utc>,
    },
    TemplateMax {
        max: u32,
        existing: usize,
    },
    GlobalMax {
        max: usize,
        existing: usize,
    },
}

impl Block {
    fn code(self) -> &'static str {
        match self {
            Block::Cooldown { .. } => codes::WAIT_COOLDOWN,
            Block::TemplateMax { .. } => codes::WAIT_TEMPLATE_MAX,
            Block::GlobalMax { .. } => codes::WAIT_GLOBAL_MAX,
        }
    }

    fn describe(self, template: &str) -> String {
        match self {
            Block::Cooldown { last, until } => format!(
                "template {template} is in its scale-up cooldown (last scale-up {}, next allowed {})",
                fmt_time(last),
                fmt_time(until)
            ),
            Block::TemplateMax { max, existing } => format!(
                "template {template} is at its max_workers {max} ({existing} existing or requested)"
            ),
            Block::GlobalMax { max, existing } => format!(
                "the fleet is at the global max_workers {max} ({existing} managed workers existing or requested)"
            ),
        }
    }
}

/// A worker (real or to be created) being filled with demand.
struct Bin<'a> {
    worker_id: Option<&'a str>,
    template: &'a str,
    template_ref: Option<&'a WorkerTemplate>,
    /// What the placement filters read; `free_ports` goes down as demand is taken.
    summary: WorkerSummary,
    ami_name: Option<&'a str>,
    cml_version: Option<&'a str>,
    timeline: CapacityTimeline,
    served: Vec<&'a PlacementRequest>,
    state: Option<WorkerState>,
    state_since: DateTime<Utc>,
    blocked: Option<Block>,
}

impl<'a> Bin<'a> {
    fn for_worker(w: &'a WorkerSnapshot, template: &'a str, t: Option<&'a WorkerTemplate>) -> Self {
        Bin {
            worker_id: Some(w.id.as_str()),
            template,
            template_ref: t,
            summary: WorkerSummary::of(w, 0),
            ami_name: w.ami_name.as_deref(),
            cml_version: w.cml_version.as_deref(),
            timeline: w.timeline.clone(),
            served: Vec::new(),
            state: Some(w.state),
            state_since: w.state_since,
            blocked: None,
        }
    }

    fn for_template(t: &'a WorkerTemplate, now: DateTime<Utc>, blocked: Option<Block>) -> Self {
        Bin {
            worker_id: None,
            template: t.name.as_str(),
            template_ref: Some(t),
            summary: WorkerSummary::of_template(t, WorkerState::Pending),
            ami_name: None,
            cml_version: None,
            timeline: CapacityTimeline::new(t.declared_capacity()),
            served: Vec::new(),
            state: None,
            state_since: now,
            blocked,
        }
    }

    /// The AMI filters. A RUNNING worker gets exactly placement's ([`ami_check`]): the scheduler
    /// will apply them. A worker still to boot may not report its image yet: an unknown AMI name
    /// is judged by its template's `ami_pattern` ([`template_ami_check`]; refused without a
    /// template) and an unknown CML version passes, to be checked by placement once it runs.
    fn ami_check(&self, req: &PlacementRequest) -> Result<(), RejectReason> {
        let reqs = &req.ami_requirements;
        if self.state == Some(WorkerState::Running) {
            return ami_check(reqs, self.ami_name, self.cml_version);
        }
        match (self.ami_name, self.template_ref) {
            (None, Some(t)) => template_ami_check(t, req)?,
            (name, _) => ami_name_check(reqs, name)?,
        }
        match self.cml_version {
            Some(v) => ami_version_check(reqs, Some(v)),
            None => Ok(()),
        }
    }

    /// Placement's filters but the state ([`check_fit`]), over the demand's clamped window.
    fn accepts(&self, d: &Demand<'_>) -> bool {
        check_fit(
            &self.summary,
            &self.timeline,
            self.ami_check(d.req),
            d.req,
            &d.window,
        )
        .is_ok()
    }

    fn take(&mut self, d: &Demand<'a>) {
        self.timeline
            .insert(d.req.instance_id.clone(), d.window, d.req.demand);
        let ports = saturating_u32(d.req.port_names.len());
        self.summary.free_ports = self.summary.free_ports.saturating_sub(ports);
        self.served.push(d.req);
    }

    fn instance_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.served.iter().map(|r| r.instance_id.clone()).collect();
        ids.sort();
        ids
    }
}

impl<'a> Ctx<'a> {
    fn new(input: &AutoscaleInput<'a>, policy: &'a AutoscalePolicy) -> Self {
        let mut by_name: BTreeMap<&'a str, &'a WorkerTemplate> = BTreeMap::new();
        for t in input.templates {
            by_name.entry(t.name.as_str()).or_insert(t);
        }
        let mut managed: Vec<&'a WorkerSnapshot> = input
            .fleet
            .workers()
            .iter()
            .filter(|w| w.template_name.is_some())
            .collect();
        managed.sort_by(|a, b| a.id.cmp(&b.id));
        Ctx {
            policy,
            now: input.now,
            demand: input.demand,
            templates: input.templates,
            by_name,
            last_scale_up: input.last_scale_up,
            managed,
        }
    }

    fn template_of(&self, w: &WorkerSnapshot) -> Option<&'a WorkerTemplate> {
        w.template_name
            .as_deref()
            .and_then(|n| self.by_name.get(n).copied())
    }

    fn bin_for(&self, w: &'a WorkerSnapshot) -> Option<Bin<'a>> {
        let name = w.template_name.as_deref()?;
        Some(Bin::for_worker(w, name, self.by_name.get(name).copied()))
    }

    // ---- drain lifecycle -------------------------------------------------------------------

    /// Stop / ForceStop of DRAINING workers; returns the ids that leave DRAINING.
    fn drain_lifecycle(&self, out: &mut Vec<ScalingDecision>) -> BTreeSet<&'a str> {
        let mut finishing = BTreeSet::new();
        for w in self
            .managed
            .iter()
            .filter(|w| w.state == WorkerState::Draining)
        {
            let template = w.template_name.clone();
            let started = w.drain_started_at.unwrap_or(w.state_since);
            let draining_for = self.now - started;
            if w.live_instances == 0 {
                finishing.insert(w.id.as_str());
                out.push(ScalingDecision {
                    action: ScalingAction::Stop,
                    template,
                    worker_id: Some(w.id.clone()),
                    count: 1,
                    reason: format!(
                        "Drain complete: worker {} has no active instances after draining for {}; \
                         stopping it (stop is preferred to terminate)",
                        w.id,
                        fmt_dur(draining_for)
                    ),
                    code: codes::DRAIN_COMPLETE,
                    instances: Vec::new(),
                });
                continue;
            }
            let (timeout, source) = match self.template_of(w) {
                Some(t) => (
                    Duration::hours(i64::from(t.drain_timeout_hours)),
                    format!("template {}", t.name),
                ),
                None => (
                    self.policy.default_drain_timeout,
                    "the default (template unknown)".to_string(),
                ),
            };
            if draining_for > timeout {
                finishing.insert(w.id.as_str());
                let mut instances: Vec<String> =
                    w.timeline.bookings().map(|b| b.instance_id).collect();
                instances.sort();
                instances.dedup();
                out.push(ScalingDecision {
                    action: ScalingAction::ForceStop,
                    template,
                    worker_id: Some(w.id.clone()),
                    count: 1,
                    reason: format!(
                        "Drain timeout: worker {} has been draining for {} (since {}), longer than the \
                         {} h drain timeout of {}; force stop terminates its {} remaining instance(s), \
                         then stops it",
                        w.id,
                        fmt_dur(draining_for),
                        fmt_time(started),
                        timeout.num_hours(),
                        source,
                        w.live_instances
                    ),
                    code: codes::DRAIN_TIMEOUT,
                    instances,
                });
            }
        }
        finishing
    }

    // ---- scale-up --------------------------------------------------------------------------

    /// Unplaced demand that counts now, in first-fit-decreasing order.
    fn relevant_demand(&self) -> Vec<Demand<'a>> {
        let horizon = self.now + self.policy.lookahead;
        let mut seen = BTreeSet::new();
        let mut out: Vec<Demand<'a>> = self
            .demand
            .iter()
            .filter(|r| r.slot.asap || r.slot.start <= horizon)
            .filter(|r| r.window.end > self.now)
            .filter(|r| seen.insert(r.instance_id.as_str()))
            .map(|r| Demand {
                req: r,
                window: TimeWindow::new(r.window.start.max(self.now), r.window.end),
            })
            .collect();
        let norm = self.normaliser();
        out.sort_by(|a, b| {
            size(&b.req.demand, &norm)
                .total_cmp(&size(&a.req.demand, &norm))
                .then(a.window.start.cmp(&b.window.start))
                .then(a.req.queue_key().cmp(&b.req.queue_key()))
        });
        out
    }

    /// Per dimension, the largest template capacity (1 when none), to compare demands.
    fn normaliser(&self) -> [u32; 4] {
        let mut n = [1u32; 4];
        for t in self.templates {
            let c = t.declared_capacity().as_array();
            for d in 0..4 {
                n[d] = n[d].max(c[d]);
            }
        }
        n
    }

    fn count_existing(&self, template: Option<&str>) -> usize {
        self.managed
            .iter()
            .filter(|w| w.state != WorkerState::Terminated)
            .filter(|w| template.is_none() || w.template_name.as_deref() == template)
            .count()
    }

    fn cooldown_block(&self, t: &WorkerTemplate) -> Option<Block> {
        let last = *self.last_scale_up.get(&t.name)?;
        let until = last + self.policy.cooldown_for(t);
        (self.now < until).then_some(Block::Cooldown { last, until })
    }

    fn scale_up(&self, demand: &[Demand<'a>], out: &mut Vec<ScalingDecision>) -> ScaleUpOutcome {
        // 0. RUNNING workers: the scheduler will place what fits.
        let mut running: Vec<Bin<'a>> = self
            .managed
            .iter()
            .filter(|w| w.state == WorkerState::Running)
            .filter_map(|w| self.bin_for(w))
            .collect();
        let mut unmet: Vec<&Demand<'a>> = Vec::new();
        for d in demand {
            match running.iter_mut().find(|b| b.accepts(d)) {
                Some(b) => b.take(d),
                None => unmet.push(d),
            }
        }
        let mut running_with_demand = BTreeSet::new();
        for b in running.iter().filter(|b| !b.served.is_empty()) {
            let id = b.worker_id.unwrap_or_default();
            running_with_demand.insert(id.to_string());
            out.push(ScalingDecision {
                action: ScalingAction::Wait,
                template: Some(b.template.to_string()),
                worker_id: Some(id.to_string()),
                count: 1,
                reason: format!(
                    "{} pending instance(s) fit on RUNNING worker {} of template {}; the scheduler will \
                     place them there, no scale-up (if this persists, placement refuses what this check \
                     accepts)",
                    b.served.len(),
                    id,
                    b.template
                ),
                code: codes::WAIT_FITS_RUNNING,
                instances: b.instance_ids(),
            });
        }

        // 1. Capacity already booting.
        let mut booting: Vec<Bin<'a>> = self
            .managed
            .iter()
            .filter(|w| w.state.is_booting())
            .filter_map(|w| self.bin_for(w))
            .collect();
        booting.sort_by(|a, b| (a.state_since, a.worker_id).cmp(&(b.state_since, b.worker_id)));
        let mut rest: Vec<&Demand<'a>> = Vec::new();
        for d in unmet {
            match booting.iter_mut().find(|b| b.accepts(d)) {
                Some(b) => b.take(d),
                None => rest.push(d),
            }
        }
        for b in booting.iter().filter(|b| !b.served.is_empty()) {
            let state = b.state.map_or("booting", WorkerState::as_str);
            let ready = b
                .template_ref
                .map(|t| b.state_since + Duration::minutes(i64::from(t.startup_minutes)));
            out.push(ScalingDecision {
                action: ScalingAction::Wait,
                template: Some(b.template.to_string()),
                worker_id: b.worker_id.map(str::to_string),
                count: 1,
                reason: format!(
                    "{} pending instance(s) fit on worker {} of template {}, already booting ({} for {}{}); \
                     no new worker needed",
                    b.served.len(),
                    b.worker_id.unwrap_or("?"),
                    b.template,
                    state,
                    fmt_dur(self.now - b.state_since),
                    ready.map_or(String::new(), |r| format!(", ready ≈ {}", fmt_time(r)))
                ),
                code: codes::WAIT_BOOTING,
                instances: b.instance_ids(),
            });
        }

        // 2. STOPPED workers, in template preference order.
        let mut stopped: Vec<Option<Bin<'a>>> = {
            let mut v: Vec<&'a WorkerSnapshot> = self
                .managed
                .iter()
                .copied()
                .filter(|w| w.state == WorkerState::Stopped)
                .collect();
            v.sort_by(|a, b| stopped_key(a).cmp(&stopped_key(b)));
            v.into_iter().map(|w| self.bin_for(w)).collect()
        };
        let mut restarting: Vec<Bin<'a>> = Vec::new();
        let mut rest2: Vec<&Demand<'a>> = Vec::new();
        for d in rest {
            if let Some(b) = restarting.iter_mut().find(|b| b.accepts(d)) {
                b.take(d);
                continue;
            }
            let slot = stopped
                .iter_mut()
                .find(|s| s.as_ref().is_some_and(|b| b.accepts(d)));
            match slot.and_then(Option::take) {
                Some(mut b) => {
                    b.take(d);
                    restarting.push(b);
                }
                None => rest2.push(d),
            }
        }
        let mut restarted = BTreeSet::new();
        for b in &restarting {
            restarted.insert(b.worker_id.unwrap_or_default().to_string());
            out.push(self.restart_decision(
                b,
                format!("for {} pending instance(s)", b.served.len()),
                codes::RESTART_FOR_DEMAND,
            ));
        }

        // 3. New workers.
        let mut global_existing = self.count_existing(None);
        let mut per_template: BTreeMap<&str, usize> = BTreeMap::new();
        let mut new_bins: Vec<Bin<'a>> = Vec::new();
        let mut no_fit: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for d in rest2 {
            if let Some(b) = new_bins
                .iter_mut()
                .find(|b| b.blocked.is_none() && b.accepts(d))
            {
                b.take(d);
                continue;
            }
            let t = match select_template(d.req, self.templates) {
                Ok(t) => t,
                Err(why) => {
                    no_fit
                        .entry((d.req.definition_id.clone(), why.to_string()))
                        .or_default()
                        .push(d.req.instance_id.clone());
                    continue;
                }
            };
            let existing = *per_template
                .entry(t.name.as_str())
                .or_insert_with(|| self.count_existing(Some(&t.name)));
            let block = self.new_worker_block(t, existing, global_existing);
            if block.is_none() {
                let mut b = Bin::for_template(t, self.now, None);
                b.take(d);
                new_bins.push(b);
                per_template.insert(t.name.as_str(), existing + 1);
                global_existing += 1;
                continue;
            }
            match new_bins
                .iter_mut()
                .find(|b| b.blocked.is_some() && b.template == t.name && b.accepts(d))
            {
                Some(b) => b.take(d),
                None => {
                    let mut b = Bin::for_template(t, self.now, block);
                    b.take(d);
                    new_bins.push(b);
                }
            }
        }
        self.emit_new_workers(&new_bins, out);
        for ((definition, why), mut ids) in no_fit {
            ids.sort();
            out.push(ScalingDecision {
                action: ScalingAction::Wait,
                template: None,
                worker_id: None,
                count: 0,
                reason: format!(
                    "no template fits {} pending instance(s) of definition {}: {}",
                    ids.len(),
                    definition,
                    why
                ),
                code: codes::WAIT_NO_TEMPLATE,
                instances: ids,
            });
        }

        // 4. Minimum warm per template.
        self.min_warm(
            &restarting,
            &new_bins,
            &mut stopped,
            &mut per_template,
            &mut global_existing,
            &mut restarted,
            out,
        );
        ScaleUpOutcome {
            restarted,
            running_with_demand,
        }
    }

    fn new_worker_block(
        &self,
        t: &WorkerTemplate,
        existing: usize,
        global_existing: usize,
    ) -> Option<Block> {
        if let Some(b) = self.cooldown_block(t) {
            return Some(b);
        }
        if existing >= t.max_workers as usize {
            return Some(Block::TemplateMax {
                max: t.max_workers,
                existing,
            });
        }
        if global_existing >= self.policy.max_workers {
            return Some(Block::GlobalMax {
                max: self.policy.max_workers,
                existing: global_existing,
            });
        }
        None
    }

    fn restart_decision(&self, b: &Bin<'a>, what: String, code: &'static str) -> ScalingDecision {
        let new_boot = b.template_ref.map_or(String::new(), |t| {
            format!(", a new worker ~{} min", t.startup_minutes)
        });
        ScalingDecision {
            action: ScalingAction::RestartStopped,
            template: Some(b.template.to_string()),
            worker_id: b.worker_id.map(str::to_string),
            count: 1,
            reason: format!(
                "Restart STOPPED worker {} of template {} (stopped for {}) {}: a restart takes ~{} min{}",
                b.worker_id.unwrap_or("?"),
                b.template,
                fmt_dur(self.now - b.state_since),
                what,
                WORKER_RESTART_MINUTES,
                new_boot
            ),
            code,
            instances: b.instance_ids(),
        }
    }

    fn emit_new_workers(&self, bins: &[Bin<'a>], out: &mut Vec<ScalingDecision>) {
        let mut by_template: BTreeMap<&str, Vec<&Bin<'a>>> = BTreeMap::new();
        for b in bins {
            by_template.entry(b.template).or_default().push(b);
        }
        for (name, bins) in by_template {
            let Some(t) = bins.first().and_then(|b| b.template_ref) else {
                continue;
            };
            let real: Vec<&&Bin<'a>> = bins.iter().filter(|b| b.blocked.is_none()).collect();
            let mut held: BTreeMap<Block, Vec<&&Bin<'a>>> = BTreeMap::new();
            for b in bins.iter().filter(|b| b.blocked.is_some()) {
                if let Some(k) = b.blocked {
                    held.entry(k).or_default().push(b);
                }
            }
            let held_workers: usize = held.values().map(Vec::len).sum();
            if !real.is_empty() {
                let mut ids: Vec<String> = real.iter().flat_map(|b| b.instance_ids()).collect();
                ids.sort();
                let first_needed = real
                    .iter()
                    .flat_map(|b| b.served.iter())
                    .map(|r| {
                        if r.slot.asap {
                            self.now
                        } else {
                            (r.slot.start - self.policy.instantiation_lead).max(self.now)
                        }
                    })
                    .min()
                    .unwrap_or(self.now);
                let ready = self.now + Duration::minutes(i64::from(t.startup_minutes));
                let c = t.declared_capacity();
                let mut reason = format!(
                    "{} pending instance(s) need capacity from {} and no RUNNING, booting or STOPPED \
                     worker has room: {} new worker(s) of template {} ({}, {} CPU / {} GiB / {} GiB / \
                     {} nodes), ready ≈ {} (startup {} min)",
                    ids.len(),
                    fmt_time(first_needed),
                    real.len(),
                    name,
                    t.license_type,
                    c.cpu_cores,
                    c.memory_gb,
                    c.storage_gb,
                    c.nodes,
                    fmt_time(ready),
                    t.startup_minutes
                );
                if held_workers > 0 {
                    let why: Vec<String> = held.keys().map(|k| k.describe(name)).collect();
                    reason.push_str(&format!(
                        "; capped from {} to {}: {}",
                        real.len() + held_workers,
                        real.len(),
                        why.join("; ")
                    ));
                }
                out.push(ScalingDecision {
                    action: ScalingAction::ScaleUp,
                    template: Some(name.to_string()),
                    worker_id: None,
                    count: saturating_u32(real.len()),
                    reason,
                    code: codes::SCALE_UP_DEMAND,
                    instances: ids,
                });
            }
            for (block, bins) in held {
                let mut ids: Vec<String> = bins.iter().flat_map(|b| b.instance_ids()).collect();
                ids.sort();
                out.push(ScalingDecision {
                    action: ScalingAction::Wait,
                    template: Some(name.to_string()),
                    worker_id: None,
                    count: saturating_u32(bins.len()),
                    reason: format!(
                        "{} pending instance(s) need {} more worker(s) of template {}, not requested: {}",
                        ids.len(),
                        bins.len(),
                        name,
                        block.describe(name)
                    ),
                    code: block.code(),
                    instances: ids,
                });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn min_warm(
        &self,
        restarting: &[Bin<'a>],
        new_bins: &[Bin<'a>],
        stopped: &mut [Option<Bin<'a>>],
        per_template: &mut BTreeMap<&'a str, usize>,
        global_existing: &mut usize,
        restarted: &mut BTreeSet<String>,
        out: &mut Vec<ScalingDecision>,
    ) {
        for t in self.by_name.values().copied() {
            if t.min_warm == 0 {
                continue;
            }
            let name = t.name.as_str();
            let live = self
                .managed
                .iter()
                .filter(|w| w.template_name.as_deref() == Some(name))
                .filter(|w| w.state == WorkerState::Running || w.state.is_booting())
                .count();
            let restarted_here = restarting.iter().filter(|b| b.template == name).count();
            let created_here = new_bins
                .iter()
                .filter(|b| b.template == name && b.blocked.is_none())
                .count();
            let warm = live + restarted_here + created_here;
            let mut deficit = (t.min_warm as usize).saturating_sub(warm);
            if deficit == 0 {
                continue;
            }
            for slot in stopped.iter_mut() {
                if deficit == 0 {
                    break;
                }
                if slot.as_ref().is_some_and(|b| b.template == name)
                    && let Some(b) = slot.take()
                {
                    restarted.insert(b.worker_id.unwrap_or_default().to_string());
                    out.push(self.restart_decision(
                        &b,
                        format!(
                            "to keep min_warm {} (RUNNING or booting: {})",
                            t.min_warm, warm
                        ),
                        codes::RESTART_FOR_MIN_WARM,
                    ));
                    deficit -= 1;
                }
            }
            if deficit == 0 {
                continue;
            }
            let mut existing = per_template
                .get(name)
                .copied()
                .unwrap_or_else(|| self.count_existing(Some(name)));
            let mut allowed = 0usize;
            let mut block = None;
            while allowed < deficit {
                match self.new_worker_block(t, existing, *global_existing) {
                    None => {
                        allowed += 1;
                        existing += 1;
                        *global_existing += 1;
                    }
                    Some(b) => {
                        block = Some(b);
                        break;
                    }
                }
            }
            per_template.insert(name, existing);
            let warm_text = format!(
                "template {name} keeps min_warm {} RUNNING workers and has {warm} RUNNING or booting",
                t.min_warm
            );
            if allowed > 0 {
                let mut reason = format!(
                    "{warm_text}: {allowed} new worker(s), ready ≈ {} (startup {} min)",
                    fmt_time(self.now + Duration::minutes(i64::from(t.startup_minutes))),
                    t.startup_minutes
                );
                if let Some(b) = block {
                    reason.push_str(&format!(
                        "; capped from {deficit} to {allowed}: {}",
                        b.describe(name)
                    ));
                }
                out.push(ScalingDecision {
                    action: ScalingAction::ScaleUp,
                    template: Some(name.to_string()),
                    worker_id: None,
                    count: saturating_u32(allowed),
                    reason,
                    code: codes::SCALE_UP_MIN_WARM,
                    instances: Vec::new(),
                });
            }
            if let Some(b) = block {
                out.push(ScalingDecision {
                    action: ScalingAction::Wait,
                    template: Some(name.to_string()),
                    worker_id: None,
                    count: saturating_u32(deficit - allowed),
                    reason: format!(
                        "{warm_text}; {} more worker(s) not requested: {}",
                        deficit - allowed,
                        b.describe(name)
                    ),
                    code: b.code(),
                    instances: Vec::new(),
                });
            }
        }
    }

    // ---- scale-down ------------------------------------------------------------------------

    fn scale_down(
        &self,
        running_with_demand: &BTreeSet<String>,
        finishing: &BTreeSet<&str>,
        out: &mut Vec<ScalingDecision>,
    ) {
        let grace_end = self.now + self.policy.scale_down_grace;
        let grace = TimeWindow::new(self.now, grace_end);
        let running: Vec<&'a WorkerSnapshot> = self
            .managed
            .iter()
            .copied()
            .filter(|w| w.state == WorkerState::Running)
            .collect();
        let mut candidates: Vec<(DateTime<Utc>, &'a WorkerSnapshot)> = running
            .iter()
            .copied()
            .filter(|w| w.live_instances == 0)
            .filter(|w| w.timeline.overlapping(&grace).next().is_none())
            .filter(|w| !running_with_demand.contains(&w.id))
            .map(|w| (last_activity(w), w))
            .collect();
        candidates.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));

        let in_flight = self
            .managed
            .iter()
            .filter(|w| w.state == WorkerState::Draining && !finishing.contains(w.id.as_str()))
            .count();
        let mut budget = self.policy.max_concurrent_drains.saturating_sub(in_flight);
        let mut running_total = running.len();
        let mut running_by_template: BTreeMap<&str, usize> = BTreeMap::new();
        for w in &running {
            *running_by_template
                .entry(w.template_name.as_deref().unwrap_or_default())
                .or_default() += 1;
        }
        for (activity, w) in candidates {
            if budget == 0 {
                break;
            }
            let name = w.template_name.as_deref().unwrap_or_default();
            let min_warm = self.template_of(w).map_or(0, |t| t.min_warm as usize);
            let here = running_by_template.get(name).copied().unwrap_or(0);
            if here <= min_warm || running_total <= self.policy.min_warm_workers {
                continue;
            }
            running_by_template.insert(name, here - 1);
            running_total -= 1;
            budget -= 1;
            let next = w
                .timeline
                .next_start_at_or_after(grace_end)
                .map_or("none".to_string(), fmt_time);
            out.push(ScalingDecision {
                action: ScalingAction::Drain,
                template: w.template_name.clone(),
                worker_id: Some(w.id.clone()),
                count: 1,
                reason: format!(
                    "No running or scheduled instances (scale_down_idle): worker {} of template {} has 0 \
                     live instances and no booking before {} (grace {}); last activity {}, next booking {}; \
                     {} RUNNING worker(s) of the template remain (min_warm {})",
                    w.id,
                    name,
                    fmt_time(grace_end),
                    fmt_dur(self.policy.scale_down_grace),
                    fmt_time(activity),
                    next,
                    here - 1,
                    min_warm
                ),
                code: codes::SCALE_DOWN_IDLE,
                instances: Vec::new(),
            });
        }
    }

    // ---- retention -------------------------------------------------------------------------

    fn retention(&self, restarted: &BTreeSet<String>, out: &mut Vec<ScalingDecision>) {
        for w in self.managed.iter().filter(|w| {
            w.state == WorkerState::Stopped
                && w.live_instances == 0
                && !restarted.contains(&w.id)
                && self.now - w.state_since > self.policy.stopped_retention
        }) {
            out.push(ScalingDecision {
                action: ScalingAction::Terminate,
                template: w.template_name.clone(),
                worker_id: Some(w.id.clone()),
                count: 1,
                reason: format!(
                    "Worker {} has been STOPPED for {} (since {}), longer than the {} retention; \
                     terminating it",
                    w.id,
                    fmt_dur(self.now - w.state_since),
                    fmt_time(w.state_since),
                    fmt_dur(self.policy.stopped_retention)
                ),
                code: codes::STOPPED_RETENTION,
                instances: Vec::new(),
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Restart order of STOPPED workers: template preference (licence, capacity, name), then the most
/// recently stopped, then id.
fn stopped_key(w: &WorkerSnapshot) -> (LicenseType, [u32; 4], &str, i64, &str) {
    (
        w.license_type,
        w.declared().as_array(),
        w.template_name.as_deref().unwrap_or_default(),
        -w.state_since.timestamp_millis(),
        w.id.as_str(),
    )
}

/// The latest booking end, or when the worker entered its state, whichever is later.
fn last_activity(w: &WorkerSnapshot) -> DateTime<Utc> {
    w.timeline
        .bookings()
        .map(|b| b.window.end)
        .max()
        .map_or(w.state_since, |end| end.max(w.state_since))
}

fn size(c: &Capacity, norm: &[u32; 4]) -> f64 {
    c.as_array()
        .iter()
        .zip(norm)
        .map(|(v, n)| f64::from(*v) / f64::from((*n).max(1)))
        .sum()
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%MZ").to_string()
}

fn fmt_dur(d: Duration) -> String {
    let m = d.num_minutes();
    if m.abs() < 120 {
        format!("{m} min")
    } else if m % 60 == 0 {
        format!("{} h", m / 60)
    } else {
        format!("{} h {} min", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ami_globs_compare_as_documented() {
        assert!(ami_pattern_compatible("CML-2.*", "CML-2.9.*"));
        assert!(ami_pattern_compatible("CML-2.9.*", "CML-2.9.*"));
        assert!(ami_pattern_compatible("*", "anything"));
        assert!(ami_pattern_compatible("CML-3.*", "*"));
        assert!(ami_pattern_compatible("", "CML-2.9.*"));
        assert!(!ami_pattern_compatible("CML-2.9.*", "CML-2.*"));
        assert!(!ami_pattern_compatible("CML-2.8.*", "CML-2.9.*"));
    }

    #[test]
    fn durations_read_like_an_operator_writes_them() {
        assert_eq!(fmt_dur(Duration::minutes(30)), "30 min");
        assert_eq!(fmt_dur(Duration::hours(4)), "4 h");
        assert_eq!(fmt_dur(Duration::minutes(252)), "4 h 12 min");
    }

    #[test]
    fn default_policy_uses_the_named_defaults() {
        let p = AutoscalePolicy::default();
        assert_eq!(p.lookahead, Duration::minutes(35));
        assert_eq!(p.scale_down_grace, Duration::minutes(30));
        assert_eq!(p.max_concurrent_drains, DEFAULT_MAX_CONCURRENT_DRAINS);
        assert_eq!(p.scale_up_cooldown, None);
        assert_eq!(p.min_unready_to_halt, 2);
    }

    #[test]
    fn actions_sort_in_plan_order() {
        assert!(ScalingAction::ScaleUp < ScalingAction::RestartStopped);
        assert!(ScalingAction::Terminate < ScalingAction::Wait);
        assert_eq!(ScalingAction::ForceStop.to_string(), "FORCE_STOP");
    }
}
