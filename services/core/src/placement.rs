//! Placement: which worker an instance goes to, or why it has to wait (domain.md §5,
//! ARCHITECTURE.md §5).
//!
//! A decision has three steps, the same for one request ([`place`]), for an explanation
//! ([`plan`]) and for a queue of requests ([`place_batch`]):
//!
//! 1. **Filters.** Every worker of the [`FleetSnapshot`] is run through the filters below, in
//!    this order (cheapest and most permanent first, the order of `ccm.v1.RejectionCode`). The
//!    first filter a worker fails is its [`RejectReason`]; the rest are not evaluated.
//!
//!    | # | filter | reason |
//!    |---|---|---|
//!    | 1 | worker state is RUNNING | [`RejectReason::NotRunning`], [`RejectReason::Draining`] |
//!    | 2 | worker has a template (not legacy) | [`RejectReason::Legacy`] |
//!    | 3 | licence type ∈ definition's affinity (empty = any) | [`RejectReason::LicenceAffinity`] |
//!    | 4 | node_count ≤ the licence's node limit | [`RejectReason::LicenceNodeLimit`] |
//!    | 5 | AMI name matches every non-empty `name_pattern` ([`glob_match`]) | [`RejectReason::AmiPattern`] |
//!    | 6 | CML version ≥ every `min_version` ([`Version::is_satisfied_by`](crate::version::Version::is_satisfied_by)) | [`RejectReason::AmiVersion`] |
//!    | 7 | nested virtualisation if needed | [`RejectReason::NestedVirt`] |
//!    | 8 | declared capacity ≥ demand (static) | [`RejectReason::Insufficient`] |
//!    | 9 | free capacity over the whole booked window | [`RejectReason::Insufficient`] |
//!    | 10 | free ports ≥ the port template's length | [`RejectReason::InsufficientPorts`] |
//!
//!    Filter 9 is [`CapacityTimeline::check`](crate::capacity::CapacityTimeline::check): the peak
//!    use across `[slot start − lead, slot end)`, so bookings that never overlap share a worker.
//!    An unknown AMI name fails a non-empty pattern and an unknown or unreadable CML version
//!    fails a minimum: placement does not bet on an image it cannot identify.
//!
//! 2. **Score.** Each feasible worker is scored by a [`Scorer`] from the peak use it would have
//!    across the window after the placement. The default, [`BinPack`], prefers the fullest worker
//!    (mean of peak/declared over CPU, memory, storage and nodes); [`Spread`] prefers the
//!    emptiest. The highest score wins; ties go to the worker with the fewest free ports, then to
//!    the smallest worker id, so decisions are deterministic.
//!
//! 3. **Commit.** [`place`] and [`plan`] change nothing. [`place_batch`] takes requests in queue
//!    order ([`PlacementRequest::queue_key`]: slot start, booking time, id) and applies every
//!    placement to the snapshot (capacity booking and the lowest free ports) before deciding the
//!    next one, so a batch never overcommits capacity or ports. The control plane then commits
//!    the batch's placements, ports included, in one fenced store transaction.
//!
//! When no worker fits, the result is [`Unschedulable`]: counts per reason and the
//! kube-scheduler style line `0/12 workers fit: 5 insufficient memory, 4 licence PERSONAL allows
//! 20 nodes, 3 draining`.
//!
//! ## Cost
//!
//! The filter loop allocates nothing per worker and reads the fleet's compact
//! [`WorkerSummary`] array ([`FleetSnapshot::summaries`]) for filters 1–8 and 10 and for the score;
//! only a worker that passes the static filters has its [`CapacityTimeline`] read (filter 9, with
//! the window converted to milliseconds once per request, [`CapacityTimeline::check_ms`]). AMI
//! requirements are evaluated once per request and distinct image of the fleet
//! ([`FleetSnapshot::images`]), not per worker. Reasons are counted as small `Copy` values and only
//! turned into text for the summary (or by [`plan`], which is allowed to be slower). The entry
//! points are generic over the [`Scorer`], so the built-in scorers are inlined (a `&dyn Scorer`
//! works too). See `benches/placement.rs` for the numbers.
//!
//! ## Reuse
//!
//! [`check_fit`] runs filters 2–10 on a worker described by a [`WorkerSummary`] whatever its
//! state, with the free ports and the AMI verdict the caller gives: the autoscaler packs demand
//! onto booting, stopped and not-yet-created workers with it, so it never disagrees with
//! placement about what fits.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use crate::capacity::{CapacityTimeline, millis};
use crate::error::CoreError;
use crate::fleet::{
    AmiImage, FleetSnapshot, ImageId, PlacementRequest, WorkerSnapshot, WorkerSummary,
};
use crate::model::{
    AmiRequirement, Capacity, Dimension, LicenseType, TimeWindow, WorkerState, licence_list,
    saturating_u32,
};

// ---------------------------------------------------------------------------------------------
// Reasons
// ---------------------------------------------------------------------------------------------

/// Why a worker cannot take a request: the first placement filter it fails.
///
/// Each reason has a stable machine code ([`RejectReason::code`], the suffix of
/// `ccm.v1.RejectionCode`) and a short human phrase (its [`Display`](fmt::Display)) used in the
/// "why pending" summary. Reasons that print the same phrase are equal, so grouping by reason is
/// grouping by phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The worker is in a state other than RUNNING and DRAINING (booting, stopped, failed, …).
    NotRunning {
        /// The state it is in.
        state: WorkerState,
    },
    /// The worker is DRAINING: it keeps its instances but takes no new ones.
    Draining,
    /// A legacy worker (no template): the scheduler never places on it.
    Legacy,
    /// The worker's licence type is not in the definition's licence affinity.
    LicenceAffinity {
        /// The worker's licence.
        licence: LicenseType,
    },
    /// The definition has more nodes than the worker's licence allows.
    LicenceNodeLimit {
        /// The worker's licence.
        licence: LicenseType,
        /// Its node limit.
        limit: u32,
    },
    /// The worker's AMI name does not match a required name pattern (or is unknown).
    AmiPattern,
    /// The worker's CML version is below a required minimum (or is unknown).
    AmiVersion,
    /// The definition needs nested virtualisation and the worker has none.
    NestedVirt,
    /// Not enough of one capacity dimension: declared capacity below the demand, or not enough
    /// free at the busiest moment of the booked window.
    Insufficient {
        /// The first dimension (CPU, memory, storage, nodes order) that does not fit.
        dimension: Dimension,
    },
    /// Fewer free ports than the port template needs.
    InsufficientPorts,
}

impl RejectReason {
    /// The stable machine code, upper snake case; `ccm.v1.RejectionCode` is `REJECTION_CODE_` +
    /// this code.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::NotRunning { .. } => "WORKER_NOT_RUNNING",
            RejectReason::Draining => "WORKER_DRAINING",
            RejectReason::Legacy => "WORKER_UNMANAGED",
            RejectReason::LicenceAffinity { .. } => "LICENSE_AFFINITY",
            RejectReason::LicenceNodeLimit { .. } => "LICENSE_NODE_LIMIT",
            RejectReason::AmiPattern => "AMI_PATTERN",
            RejectReason::AmiVersion => "AMI_VERSION",
            RejectReason::NestedVirt => "NESTED_VIRT",
            RejectReason::Insufficient {
                dimension: Dimension::Cpu,
            } => "INSUFFICIENT_CPU",
            RejectReason::Insufficient {
                dimension: Dimension::Memory,
            } => "INSUFFICIENT_MEMORY",
            RejectReason::Insufficient {
                dimension: Dimension::Storage,
            } => "INSUFFICIENT_STORAGE",
            RejectReason::Insufficient {
                dimension: Dimension::Nodes,
            } => "INSUFFICIENT_NODES",
            RejectReason::InsufficientPorts => "INSUFFICIENT_PORTS",
        }
    }

    /// The human phrase, as in the summary (`insufficient memory`, `draining`, …).
    pub fn phrase(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::NotRunning { state } => write!(f, "not running ({state})"),
            RejectReason::Draining => f.write_str("draining"),
            RejectReason::Legacy => f.write_str("legacy worker"),
            RejectReason::LicenceAffinity { licence } => {
                write!(f, "licence {licence} not in affinity")
            }
            RejectReason::LicenceNodeLimit { licence, limit } => {
                write!(f, "licence {licence} allows {limit} nodes")
            }
            RejectReason::AmiPattern => f.write_str("AMI name mismatch"),
            RejectReason::AmiVersion => f.write_str("CML version too low"),
            RejectReason::NestedVirt => f.write_str("no nested virtualisation"),
            RejectReason::Insufficient { dimension } => write!(f, "insufficient {dimension}"),
            RejectReason::InsufficientPorts => f.write_str("insufficient ports"),
        }
    }
}

/// How many workers one reason excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReasonCount {
    /// The reason.
    pub reason: RejectReason,
    /// Workers whose first failing filter it was.
    pub count: usize,
}

/// No worker can take the request: the counts behind "why pending".
///
/// Its [`Display`](fmt::Display) is the one-line summary, kube-scheduler style:
/// `0/12 workers fit: 5 insufficient memory, 4 licence PERSONAL allows 20 nodes, 3 draining`,
/// or `0/0 workers fit: no workers` for an empty fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    /// Workers considered (the whole snapshot).
    pub total_workers: usize,
    /// Rejections grouped by reason, by count descending then phrase ascending. The counts add
    /// up to `total_workers`.
    pub reasons: Vec<ReasonCount>,
}

impl Unschedulable {
    /// The summary line (same as `to_string()`).
    pub fn summary(&self) -> String {
        self.to_string()
    }

    /// How many workers `reason` excluded (0 if none).
    pub fn count_of(&self, reason: RejectReason) -> usize {
        self.reasons
            .iter()
            .find(|c| c.reason == reason)
            .map_or(0, |c| c.count)
    }

    fn from_tally(total_workers: usize, tally: &ReasonTally) -> Self {
        Unschedulable {
            total_workers,
            reasons: tally.sorted(),
        }
    }
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_summary(f, 0, self.total_workers, &self.reasons)
    }
}

impl std::error::Error for Unschedulable {}

fn write_summary(
    f: &mut impl fmt::Write,
    feasible: usize,
    total: usize,
    reasons: &[ReasonCount],
) -> fmt::Result {
    write!(f, "{feasible}/{total} workers fit")?;
    if total == 0 {
        return f.write_str(": no workers");
    }
    for (i, c) in reasons.iter().enumerate() {
        f.write_str(if i == 0 { ": " } else { ", " })?;
        write!(f, "{} {}", c.count, c.reason)?;
    }
    Ok(())
}

/// Counts of reasons, without allocating per worker: a handful of distinct reasons per decision.
#[derive(Debug, Default)]
struct ReasonTally {
    counts: Vec<(RejectReason, usize)>,
    last: usize,
}

impl ReasonTally {
    #[inline]
    fn add(&mut self, reason: RejectReason) {
        if let Some(c) = self.counts.get_mut(self.last)
            && c.0 == reason
        {
            c.1 += 1;
            return;
        }
        if let Some(i) = self.counts.iter().position(|c| c.0 == reason) {
            self.counts[i].1 += 1;
            self.last = i;
        } else {
            self.last = self.counts.len();
            self.counts.push((reason, 1));
        }
    }

    /// Count descending, then phrase ascending.
    fn sorted(&self) -> Vec<ReasonCount> {
        let mut v: Vec<(String, ReasonCount)> = self
            .counts
            .iter()
            .map(|&(reason, count)| (reason.to_string(), ReasonCount { reason, count }))
            .collect();
        v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
        v.into_iter().map(|(_, c)| c).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Scoring
// ---------------------------------------------------------------------------------------------

/// Ranks the workers that passed every filter: the highest score wins.
///
/// Ties (equal scores) go to the worker with the fewest free ports, then the smallest id. A NaN
/// score counts as the lowest possible. Implementations must be deterministic.
pub trait Scorer {
    /// Score of placing the request on the worker summarised by `worker` (its declared capacity,
    /// free ports, licence, …), given the peak use across the booked window after the placement
    /// (`peak_after ≤ worker.declared` in every dimension).
    fn score(&self, worker: &WorkerSummary, peak_after: &Capacity) -> f64;
}

/// Bin-packing (the default): prefer the fullest worker after the placement.
///
/// Score = mean over CPU, memory, storage and nodes of `peak_after / declared` (dimensions a
/// worker declares as 0 are skipped), in `0.0..=1.0`. Filling workers up keeps others empty, so
/// the autoscaler can drain and stop them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BinPack;

impl Scorer for BinPack {
    #[inline]
    fn score(&self, worker: &WorkerSummary, peak_after: &Capacity) -> f64 {
        fill(peak_after, &worker.declared)
    }
}

/// Mean of `used / of` over the dimensions where `of` is non-zero: the same value as
/// [`Capacity::utilisation_of`], with the four divisions side by side (the score is computed for
/// every feasible worker of every decision). Divisions, not multiplications by precomputed
/// reciprocals: those round differently and would break ties between workers of different sizes
/// that divide exactly (and, measured, the divisions are not what a decision waits for).
#[inline]
fn fill(used: &Capacity, of: &Capacity) -> f64 {
    let (u, o) = (used.as_array(), of.as_array());
    let num = u.map(f64::from);
    let den = o.map(|x| f64::from(x.max(1)));
    let ratio = [
        num[0] / den[0],
        num[1] / den[1],
        num[2] / den[2],
        num[3] / den[3],
    ];
    if o.iter().all(|&x| x > 0) {
        // Every dimension counts (the usual worker): the same sum, in the same order, as below.
        // `sum * 0.25` is `sum / 4.0` (a power of two) without a division.
        return (((ratio[0] + ratio[1]) + ratio[2]) + ratio[3]) * 0.25;
    }
    let mut sum = 0.0;
    let mut n = 0u32;
    for d in 0..4 {
        let counted = o[d] > 0;
        sum += if counted { ratio[d] } else { 0.0 };
        n += u32::from(counted);
    }
    match n {
        0 => 0.0,
        4 => sum * 0.25,
        n => sum / f64::from(n),
    }
}

/// Spreading: prefer the emptiest worker after the placement (score = 1 − the [`BinPack`] score).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spread;

impl Scorer for Spread {
    #[inline]
    fn score(&self, worker: &WorkerSummary, peak_after: &Capacity) -> f64 {
        1.0 - fill(peak_after, &worker.declared)
    }
}

#[inline]
fn sane(score: f64) -> f64 {
    if score.is_nan() {
        f64::NEG_INFINITY
    } else {
        score
    }
}

// ---------------------------------------------------------------------------------------------
// AMI globs
// ---------------------------------------------------------------------------------------------

/// Glob match of `text` against `pattern`: `*` matches any run of characters (also none), `?`
/// exactly one character, everything else itself (case-sensitive, like AMI names).
///
/// An empty pattern matches only the empty text; the AMI filter treats an empty pattern as "no
/// constraint" before calling this.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position after the last `*` in the pattern, and the text position it is matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                pi += 1;
                if pi == p.len() {
                    // A trailing `*` matches whatever is left.
                    return true;
                }
                star = Some((pi, ti));
                continue;
            }
            Some(b'?') => {
                pi += 1;
                ti += utf8_len(t[ti]);
                continue;
            }
            Some(&c) if c == t[ti] => {
                pi += 1;
                ti += 1;
                continue;
            }
            _ => {}
        }
        // Mismatch: let the last `*` swallow one more character, or fail.
        match star {
            Some((sp, st)) => {
                let next = st + utf8_len(t[st]);
                star = Some((sp, next));
                pi = sp;
                ti = next;
            }
            None => return false,
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*')
}

/// Length of the UTF-8 character starting with byte `b` (1 for continuation bytes, which only
/// occur after a `?` split a character, and then matching fails anyway).
#[inline]
fn utf8_len(b: u8) -> usize {
    match b {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Outcome of the AMI filters for one (AMI name, CML version) pair: `Ok` or the failing
/// requirement's index.
type AmiVerdict = Result<(), (RejectReason, u32)>;

fn ami_verdict(
    reqs: &[AmiRequirement],
    ami_name: Option<&str>,
    cml_version: Option<&str>,
) -> AmiVerdict {
    if let Some(i) = name_mismatch(reqs, ami_name) {
        return Err((RejectReason::AmiPattern, i));
    }
    if let Some(i) = version_shortfall(reqs, cml_version) {
        return Err((RejectReason::AmiVersion, i));
    }
    Ok(())
}

/// Index of the first requirement whose non-empty name pattern `ami_name` does not match.
fn name_mismatch(reqs: &[AmiRequirement], ami_name: Option<&str>) -> Option<u32> {
    let i = reqs.iter().position(|r| {
        !r.name_pattern.is_empty() && !ami_name.is_some_and(|n| glob_match(&r.name_pattern, n))
    })?;
    Some(saturating_u32(i))
}

/// Index of the first requirement whose minimum version `cml_version` does not meet.
fn version_shortfall(reqs: &[AmiRequirement], cml_version: Option<&str>) -> Option<u32> {
    let i = reqs.iter().position(|r| {
        r.min_version
            .as_ref()
            .is_some_and(|min| !cml_version.is_some_and(|v| min.is_satisfied_by(v)))
    })?;
    Some(saturating_u32(i))
}

/// The AMI filters (5 and 6): [`ami_name_check`], then [`ami_version_check`].
pub fn ami_check(
    reqs: &[AmiRequirement],
    ami_name: Option<&str>,
    cml_version: Option<&str>,
) -> Result<(), RejectReason> {
    ami_verdict(reqs, ami_name, cml_version).map_err(|(reason, _)| reason)
}

/// Filter 5: every non-empty name pattern must match `ami_name` ([`glob_match`]); an unknown name
/// fails a non-empty pattern.
pub fn ami_name_check(reqs: &[AmiRequirement], ami_name: Option<&str>) -> Result<(), RejectReason> {
    match name_mismatch(reqs, ami_name) {
        Some(_) => Err(RejectReason::AmiPattern),
        None => Ok(()),
    }
}

/// Filter 6: every minimum version must be met by `cml_version`
/// ([`Version::is_satisfied_by`](crate::version::Version::is_satisfied_by)); an unknown or
/// unreadable version fails a minimum.
pub fn ami_version_check(
    reqs: &[AmiRequirement],
    cml_version: Option<&str>,
) -> Result<(), RejectReason> {
    match version_shortfall(reqs, cml_version) {
        Some(_) => Err(RejectReason::AmiVersion),
        None => Ok(()),
    }
}

/// For one request: the AMI verdict of every image of the fleet, computed once per request
/// instead of once per worker. A batch reuses the buffer from request to request.
#[derive(Debug, Default)]
struct AmiVerdicts {
    by_image: Vec<AmiVerdict>,
}

impl AmiVerdicts {
    fn prepare(&mut self, reqs: &[AmiRequirement], images: &[AmiImage]) {
        self.by_image.clear();
        if reqs.is_empty() {
            return;
        }
        self.by_image.extend(
            images
                .iter()
                .map(|i| ami_verdict(reqs, i.ami_name.as_deref(), i.cml_version.as_deref())),
        );
    }

    /// The verdict for worker `w`, whose image is `image`.
    #[inline(always)]
    fn get(&self, reqs: &[AmiRequirement], image: ImageId, w: &WorkerSnapshot) -> AmiVerdict {
        match self.by_image.get(image as usize) {
            Some(v) => *v,
            // Not prepared for this image (cannot happen within a decision): compute directly.
            None => ami_verdict(reqs, w.ami_name.as_deref(), w.cml_version.as_deref()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------------------------

/// A request reduced to what the hot loop reads.
struct Prepared<'r> {
    demand: Capacity,
    /// Bit `licence as u8` set for each accepted licence; 0 = any licence.
    affinity: u8,
    nested_virt: bool,
    ports: u32,
    ami: &'r [AmiRequirement],
    /// The window in Unix milliseconds, converted once per request.
    start_ms: i64,
    end_ms: i64,
}

#[inline]
fn licence_bit(l: LicenseType) -> u8 {
    match l {
        LicenseType::Personal => 1,
        LicenseType::Enterprise => 2,
        LicenseType::Evaluation => 4,
    }
}

impl<'r> Prepared<'r> {
    fn new(req: &'r PlacementRequest, window: &TimeWindow) -> Self {
        Prepared {
            demand: req.demand,
            affinity: req
                .license_affinity
                .iter()
                .fold(0, |m, l| m | licence_bit(*l)),
            nested_virt: req.nested_virt,
            ports: saturating_u32(req.port_names.len()),
            ami: &req.ami_requirements,
            start_ms: millis(window.start),
            end_ms: millis(window.end),
        }
    }
}

/// A rejection with the numbers behind it (for [`plan`]'s details). `a`/`b` depend on the
/// reason: needed/available for capacity and ports, the requirement index for AMI reasons.
#[derive(Debug, Clone, Copy)]
struct Rejection {
    reason: RejectReason,
    window: bool,
    a: u32,
    b: u32,
}

impl Rejection {
    #[inline]
    fn plain(reason: RejectReason) -> Self {
        Rejection {
            reason,
            window: false,
            a: 0,
            b: 0,
        }
    }
}

/// Filter 1, the worker's state.
#[inline(always)]
fn state_filter(s: &WorkerSummary) -> Result<(), Rejection> {
    match s.state {
        WorkerState::Running => Ok(()),
        WorkerState::Draining => Err(Rejection::plain(RejectReason::Draining)),
        state => Err(Rejection::plain(RejectReason::NotRunning { state })),
    }
}

/// Filters 2 to 10, in order: the peak use after placing, or the first failure. The AMI verdict
/// is asked for only when the filters before it pass; the timeline is read only when every
/// static filter passes.
///
/// Always inlined: as a call it costs a return through memory per worker.
#[inline(always)]
fn fit(
    s: &WorkerSummary,
    timeline: &CapacityTimeline,
    ami: impl FnOnce() -> AmiVerdict,
    p: &Prepared<'_>,
) -> Result<Capacity, Rejection> {
    if !s.managed {
        return Err(Rejection::plain(RejectReason::Legacy));
    }
    if p.affinity != 0 && p.affinity & licence_bit(s.license) == 0 {
        return Err(Rejection::plain(RejectReason::LicenceAffinity {
            licence: s.license,
        }));
    }
    if p.demand.nodes > s.node_limit {
        return Err(Rejection::plain(RejectReason::LicenceNodeLimit {
            licence: s.license,
            limit: s.node_limit,
        }));
    }
    if !p.ami.is_empty()
        && let Err((reason, requirement)) = ami()
    {
        return Err(Rejection {
            reason,
            window: false,
            a: requirement,
            b: 0,
        });
    }
    if p.nested_virt && !s.nested_virt {
        return Err(Rejection::plain(RejectReason::NestedVirt));
    }
    if !p.demand.fits_within(&s.declared)
        && let Some(dimension) = p.demand.first_excess(&s.declared)
    {
        return Err(Rejection {
            reason: RejectReason::Insufficient { dimension },
            window: false,
            a: p.demand.get(dimension),
            b: s.declared.get(dimension),
        });
    }
    let peak_after = timeline
        .check_ms(&p.demand, p.start_ms, p.end_ms)
        .map_err(|s| Rejection {
            reason: RejectReason::Insufficient {
                dimension: s.dimension,
            },
            window: true,
            a: s.needed,
            b: s.available,
        })?;
    if s.free_ports < p.ports {
        return Err(Rejection {
            reason: RejectReason::InsufficientPorts,
            window: false,
            a: p.ports,
            b: s.free_ports,
        });
    }
    Ok(peak_after)
}

/// Runs every filter, in order, on the worker `w` summarised by `s`.
#[inline(always)]
fn evaluate(
    s: &WorkerSummary,
    w: &WorkerSnapshot,
    p: &Prepared<'_>,
    verdicts: &AmiVerdicts,
) -> Result<Capacity, Rejection> {
    state_filter(s)?;
    fit(s, &w.timeline, || verdicts.get(p.ami, s.image, w), p)
}

/// Runs every placement filter on one worker, in order: the peak use across the request's
/// window after placing it there, or the first filter it fails.
///
/// Useful on its own for "would a new worker of this template take it?" with
/// [`WorkerSnapshot::hypothetical`] (in a RUNNING state).
pub fn check_worker(
    worker: &WorkerSnapshot,
    req: &PlacementRequest,
) -> Result<Capacity, RejectReason> {
    let s = WorkerSummary::of(worker, 0);
    let p = Prepared::new(req, &req.window);
    state_filter(&s).map_err(|r| r.reason)?;
    fit(
        &s,
        &worker.timeline,
        || {
            ami_verdict(
                p.ami,
                worker.ami_name.as_deref(),
                worker.cml_version.as_deref(),
            )
        },
        &p,
    )
    .map_err(|r| r.reason)
}

/// Would `req` fit this worker, whatever state it is in now? Filters 2 to 10 (every filter but
/// the state), in order, on a worker described by `worker` (its licence, node limit, nested
/// virtualisation, declared capacity and **free ports**; the state is not read), holding the
/// bookings `timeline`, with `ami` the outcome of the AMI filters for it (see [`ami_check`]), over
/// `window` (normally `req.window`; a caller may clamp it).
///
/// For the autoscaler, which fills workers that are booting or stopped, and workers to be
/// created ([`WorkerSummary::of_template`]), with the same rules placement will apply.
pub fn check_fit(
    worker: &WorkerSummary,
    timeline: &CapacityTimeline,
    ami: Result<(), RejectReason>,
    req: &PlacementRequest,
    window: &TimeWindow,
) -> Result<Capacity, RejectReason> {
    let p = Prepared::new(req, window);
    fit(worker, timeline, || ami.map_err(|r| (r, 0)), &p).map_err(|r| r.reason)
}

// ---------------------------------------------------------------------------------------------
// One decision
// ---------------------------------------------------------------------------------------------

/// The worker chosen for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Index of the worker in [`FleetSnapshot::workers`].
    pub worker_index: usize,
    /// Worker id.
    pub worker_id: String,
    /// Its score.
    pub score: f64,
    /// Peak use across the request's window on that worker, the request included.
    pub peak_after: Capacity,
}

/// The best so far in [`decide`].
#[derive(Clone, Copy)]
struct Best {
    index: usize,
    score: f64,
    free_ports: u32,
    peak_after: Capacity,
}

/// Best worker: (index, score, peak after). `verdicts` must be prepared for `req`.
fn decide<S: Scorer + ?Sized>(
    fleet: &FleetSnapshot,
    req: &PlacementRequest,
    scorer: &S,
    verdicts: &AmiVerdicts,
) -> Result<(usize, f64, Capacity), Unschedulable> {
    let p = Prepared::new(req, &req.window);
    let workers = fleet.workers();
    let mut tally = ReasonTally::default();
    let mut best: Option<Best> = None;
    for (i, (s, w)) in fleet.summaries().iter().zip(workers).enumerate() {
        match evaluate(s, w, &p, verdicts) {
            Ok(peak_after) => {
                let score = sane(scorer.score(s, &peak_after));
                // Highest score, then fewest free ports, then smallest id.
                let better = match &best {
                    None => true,
                    Some(b) if score != b.score => score > b.score,
                    Some(b) if s.free_ports != b.free_ports => s.free_ports < b.free_ports,
                    Some(b) => w.id < workers[b.index].id,
                };
                if better {
                    best = Some(Best {
                        index: i,
                        score,
                        free_ports: s.free_ports,
                        peak_after,
                    });
                }
            }
            Err(r) => tally.add(r.reason),
        }
    }
    best.map(|b| (b.index, b.score, b.peak_after))
        .ok_or_else(|| Unschedulable::from_tally(workers.len(), &tally))
}

/// Chooses the worker for one request, without changing anything.
///
/// `Err` carries the "why pending" counts when no worker passes every filter.
pub fn place<S: Scorer + ?Sized>(
    fleet: &FleetSnapshot,
    req: &PlacementRequest,
    scorer: &S,
) -> Result<Choice, Unschedulable> {
    let mut verdicts = AmiVerdicts::default();
    verdicts.prepare(&req.ami_requirements, fleet.images());
    decide(fleet, req, scorer, &verdicts).map(|(i, score, peak_after)| Choice {
        worker_index: i,
        worker_id: fleet.workers()[i].id.clone(),
        score,
        peak_after,
    })
}

// ---------------------------------------------------------------------------------------------
// Plan / explain
// ---------------------------------------------------------------------------------------------

/// A worker that passed every filter, as [`plan`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Index of the worker in [`FleetSnapshot::workers`].
    pub worker_index: usize,
    /// Worker id.
    pub worker_id: String,
    /// Its score (higher ranks first).
    pub score: f64,
    /// Peak use across the window after placing the request there.
    pub peak_after: Capacity,
    /// `peak_after / declared` per dimension, in [`Dimension::ALL`] order (0 where the worker
    /// declares 0).
    pub utilisation_after: [f64; 4],
    /// Ports free on the worker now (the first tie-break).
    pub free_ports: usize,
}

/// A worker that failed a filter, as [`plan`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedWorker {
    /// Index of the worker in [`FleetSnapshot::workers`].
    pub worker_index: usize,
    /// Worker id.
    pub worker_id: String,
    /// The first filter it failed.
    pub reason: RejectReason,
    /// The numbers behind it, e.g. `needs 32 GiB memory, 24 free at the peak of the window`.
    pub detail: String,
}

/// Everything a placement decision looked at, for `SchedulerService.Plan` and debugging.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Workers considered.
    pub total_workers: usize,
    /// Feasible workers, best first: the first is what [`place`] chooses.
    pub candidates: Vec<Candidate>,
    /// Every other worker with its reason, in snapshot order.
    pub rejected: Vec<RejectedWorker>,
}

impl Plan {
    /// The worker [`place`] would choose.
    pub fn best(&self) -> Option<&Candidate> {
        self.candidates.first()
    }

    /// Rejections grouped by reason, by count descending then phrase.
    pub fn rejection_counts(&self) -> Vec<ReasonCount> {
        let mut tally = ReasonTally::default();
        for r in &self.rejected {
            tally.add(r.reason);
        }
        tally.sorted()
    }

    /// The "why pending" counts when nothing fits, `None` when a candidate exists.
    pub fn why_pending(&self) -> Option<Unschedulable> {
        self.candidates.is_empty().then(|| Unschedulable {
            total_workers: self.total_workers,
            reasons: self.rejection_counts(),
        })
    }

    /// The summary line, feasible count included: `2/12 workers fit: 6 draining, 4 …`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = write_summary(
            &mut s,
            self.candidates.len(),
            self.total_workers,
            &self.rejection_counts(),
        );
        s
    }
}

fn detail(r: &Rejection, w: &WorkerSnapshot, req: &PlacementRequest) -> String {
    match r.reason {
        RejectReason::NotRunning { state } => format!("worker is {state}"),
        RejectReason::Draining => "worker is DRAINING and takes no new instances".into(),
        RejectReason::Legacy => "legacy worker (no template); never scheduled on".into(),
        RejectReason::LicenceAffinity { licence } => format!(
            "worker licence {licence}, definition accepts {}",
            licence_list(&req.license_affinity)
        ),
        RejectReason::LicenceNodeLimit { licence, limit } => format!(
            "definition has {} nodes, licence {licence} allows {limit}",
            req.demand.nodes
        ),
        RejectReason::AmiPattern => {
            let pattern = req
                .ami_requirements
                .get(r.a as usize)
                .map_or("", |a| a.name_pattern.as_str());
            match &w.ami_name {
                Some(name) => format!("AMI {name:?} does not match {pattern:?}"),
                None => format!("AMI name unknown; required {pattern:?}"),
            }
        }
        RejectReason::AmiVersion => {
            let min = req
                .ami_requirements
                .get(r.a as usize)
                .and_then(|a| a.min_version)
                .map(|v| v.to_string())
                .unwrap_or_default();
            match &w.cml_version {
                Some(v) => format!("CML version {v:?} is below {min}"),
                None => format!("CML version unknown; required {min}"),
            }
        }
        RejectReason::NestedVirt => {
            "definition needs nested virtualisation; worker has none".into()
        }
        RejectReason::Insufficient { dimension } if r.window => format!(
            "needs {} {}, {} free at the peak of {} – {}",
            r.a,
            dimension.unit(),
            r.b,
            req.window.start.to_rfc3339(),
            req.window.end.to_rfc3339()
        ),
        RejectReason::Insufficient { dimension } => {
            format!(
                "needs {} {}, worker declares {}",
                r.a,
                dimension.unit(),
                r.b
            )
        }
        RejectReason::InsufficientPorts => format!("needs {} ports, {} free", r.a, r.b),
    }
}

/// Explains a decision: every feasible worker ranked as [`place`] ranks them, and every other
/// worker with the first filter it fails. Changes nothing; slower than [`place`] (it reports
/// everything).
pub fn plan<S: Scorer + ?Sized>(fleet: &FleetSnapshot, req: &PlacementRequest, scorer: &S) -> Plan {
    let p = Prepared::new(req, &req.window);
    let mut verdicts = AmiVerdicts::default();
    verdicts.prepare(&req.ami_requirements, fleet.images());
    let mut candidates = Vec::new();
    let mut rejected = Vec::new();
    for (i, (s, w)) in fleet.summaries().iter().zip(fleet.workers()).enumerate() {
        match evaluate(s, w, &p, &verdicts) {
            Ok(peak_after) => {
                let declared = s.declared;
                let mut utilisation_after = [0.0; 4];
                for (u, d) in utilisation_after.iter_mut().zip(Dimension::ALL) {
                    if declared.get(d) > 0 {
                        *u = f64::from(peak_after.get(d)) / f64::from(declared.get(d));
                    }
                }
                candidates.push(Candidate {
                    worker_index: i,
                    worker_id: w.id.clone(),
                    score: sane(scorer.score(s, &peak_after)),
                    peak_after,
                    utilisation_after,
                    free_ports: s.free_ports as usize,
                });
            }
            Err(r) => rejected.push(RejectedWorker {
                worker_index: i,
                worker_id: w.id.clone(),
                reason: r.reason,
                detail: detail(&r, w, req),
            }),
        }
    }
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.free_ports.cmp(&b.free_ports))
            .then_with(|| a.worker_id.cmp(&b.worker_id))
    });
    Plan {
        total_workers: fleet.len(),
        candidates,
        rejected,
    }
}

// ---------------------------------------------------------------------------------------------
// Batch
// ---------------------------------------------------------------------------------------------

/// What [`place_batch`] decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Placed: capacity booked and ports allocated in the snapshot; commit both together.
    Placed {
        /// Worker id.
        worker_id: String,
        /// Index of the worker in [`FleetSnapshot::workers`].
        worker_index: usize,
        /// Port name → port, the lowest free ports of the worker.
        ports: BTreeMap<String, u16>,
        /// The worker's score.
        score: f64,
        /// Peak use across the window on that worker, the request included.
        peak_after: Capacity,
    },
    /// No worker fits: the instance stays PENDING with this summary as its condition.
    Pending {
        /// Why.
        summary: Unschedulable,
    },
    /// The request itself is malformed (duplicate or empty port names, an instance id twice in
    /// the batch or already holding ports on the chosen worker); nothing was changed for it.
    Invalid {
        /// What is wrong.
        error: CoreError,
    },
}

/// One request's outcome in a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchEntry {
    /// The instance.
    pub instance_id: String,
    /// Index of the request in the slice given to [`place_batch`].
    pub request_index: usize,
    /// What happened.
    pub decision: Decision,
}

/// The outcome of [`place_batch`]: one entry per request, in queue order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchOutcome {
    /// Entries in the order the requests were decided.
    pub entries: Vec<BatchEntry>,
}

impl BatchOutcome {
    /// The entry of `instance_id`.
    pub fn get(&self, instance_id: &str) -> Option<&BatchEntry> {
        self.entries.iter().find(|e| e.instance_id == instance_id)
    }

    /// The worker `instance_id` was placed on, if it was.
    pub fn worker_of(&self, instance_id: &str) -> Option<&str> {
        match &self.get(instance_id)?.decision {
            Decision::Placed { worker_id, .. } => Some(worker_id),
            _ => None,
        }
    }

    /// Entries that were placed.
    pub fn placed(&self) -> impl Iterator<Item = &BatchEntry> {
        self.entries
            .iter()
            .filter(|e| matches!(e.decision, Decision::Placed { .. }))
    }

    /// Entries that stay pending.
    pub fn pending(&self) -> impl Iterator<Item = &BatchEntry> {
        self.entries
            .iter()
            .filter(|e| matches!(e.decision, Decision::Pending { .. }))
    }

    /// Number of placed requests.
    pub fn placed_count(&self) -> usize {
        self.placed().count()
    }

    /// Number of pending requests.
    pub fn pending_count(&self) -> usize {
        self.pending().count()
    }
}

fn validate_port_names(req: &PlacementRequest) -> Result<(), CoreError> {
    for (i, n) in req.port_names.iter().enumerate() {
        if n.is_empty() || req.port_names[..i].contains(n) {
            return Err(CoreError::invalid(
                "port_template",
                format!(
                    "instance {}: port names must be unique and non-empty, got {n:?}",
                    req.instance_id
                ),
            ));
        }
    }
    Ok(())
}

/// Places a batch of pending requests in queue order ([`PlacementRequest::queue_key`]: slot
/// start, booking time, id), applying each placement to `fleet` before deciding the next one.
///
/// Each placed request books its capacity over its window and gets the lowest free ports of its
/// worker, in the snapshot; the returned ports are what the control plane commits. Later
/// requests see earlier ones, so the batch never overcommits capacity at any instant nor hands
/// out a port twice. Requests that fit nowhere are [`Decision::Pending`] with their summary.
///
/// The requests are PENDING instances: an instance the snapshot already holds on some worker must
/// not be in the batch (only its own worker is checked, and refuses it as [`Decision::Invalid`]).
/// The slice itself is not reordered; each entry records its request's index.
pub fn place_batch<S: Scorer + ?Sized>(
    fleet: &mut FleetSnapshot,
    requests: &[PlacementRequest],
    scorer: &S,
) -> BatchOutcome {
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by(|&a, &b| requests[a].queue_key().cmp(&requests[b].queue_key()));
    let mut seen: HashSet<&str> = HashSet::with_capacity(requests.len());
    let mut verdicts = AmiVerdicts::default();
    let mut entries = Vec::with_capacity(requests.len());
    for i in order {
        let req = &requests[i];
        let decision = if !seen.insert(req.instance_id.as_str()) {
            Decision::Invalid {
                error: CoreError::invalid(
                    "instance_id",
                    format!("instance {} appears twice in the batch", req.instance_id),
                ),
            }
        } else if let Err(error) = validate_port_names(req) {
            Decision::Invalid { error }
        } else {
            verdicts.prepare(&req.ami_requirements, fleet.images());
            match decide(fleet, req, scorer, &verdicts) {
                Ok((wi, score, peak_after)) => {
                    // Ports first (the only step that can refuse), then capacity.
                    match fleet.book(
                        wi,
                        &req.instance_id,
                        req.window,
                        req.demand,
                        &req.port_names,
                    ) {
                        Ok(ports) => Decision::Placed {
                            worker_id: fleet.workers()[wi].id.clone(),
                            worker_index: wi,
                            ports,
                            score,
                            peak_after,
                        },
                        Err(error) => Decision::Invalid { error },
                    }
                }
                Err(summary) => Decision::Pending { summary },
            }
        };
        entries.push(BatchEntry {
            instance_id: req.instance_id.clone(),
            request_index: i,
            decision,
        });
    }
    BatchOutcome { entries }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_handles_star_question_and_literals() {
        assert!(glob_match("CML-2.9.*", "CML-2.9.1-x86_64"));
        assert!(glob_match("CML-2.9.*", "CML-2.9."));
        assert!(!glob_match("CML-2.9.*", "CML-2.8.0"));
        assert!(glob_match("CML-?.?.*", "CML-2.9.0"));
        assert!(!glob_match("CML-?.?.*", "CML-22.9.0"));
        assert!(glob_match("*", ""));
        assert!(glob_match("**a*", "bab"));
        assert!(glob_match("*-2.9.*-prod", "CML-2.9.0-x-prod"));
        assert!(!glob_match("*-2.9.*-prod", "CML-2.9.0-x-prod2"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("caf?", "café"));
        assert!(!glob_match("", "x"));
        assert!(glob_match("", ""));
        // Formerly the autoscaler's own copy of the glob, now this one.
        assert!(glob_match("CML-2.9.*", "CML-2.9.1-ami"));
        assert!(glob_match("CML-?.9*", "CML-2.9"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b", "axxbc"));
        assert!(!glob_match("cml-2.9.*", "CML-2.9.0"), "case-sensitive");
    }

    #[test]
    fn reason_codes_are_distinct_and_phrases_injective() {
        let mut all = vec![
            RejectReason::Draining,
            RejectReason::Legacy,
            RejectReason::AmiPattern,
            RejectReason::AmiVersion,
            RejectReason::NestedVirt,
            RejectReason::InsufficientPorts,
        ];
        all.extend(Dimension::ALL.map(|dimension| RejectReason::Insufficient { dimension }));
        let codes: HashSet<&str> = all.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), all.len());
        all.extend(
            WorkerState::ALL
                .into_iter()
                .filter(|s| !matches!(s, WorkerState::Running | WorkerState::Draining))
                .map(|state| RejectReason::NotRunning { state }),
        );
        all.extend(LicenseType::ALL.map(|licence| RejectReason::LicenceAffinity { licence }));
        let phrases: HashSet<String> = all.iter().map(|r| r.phrase()).collect();
        assert_eq!(phrases.len(), all.len());
    }

    #[test]
    fn tally_sorts_by_count_then_phrase() {
        let mut t = ReasonTally::default();
        for r in [
            RejectReason::Draining,
            RejectReason::NestedVirt,
            RejectReason::Draining,
            RejectReason::AmiPattern,
        ] {
            t.add(r);
        }
        let s = Unschedulable::from_tally(4, &t);
        assert_eq!(
            s.to_string(),
            "0/4 workers fit: 2 draining, 1 AMI name mismatch, 1 no nested virtualisation"
        );
    }
}
