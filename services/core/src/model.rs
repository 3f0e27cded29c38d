//! Entities and value types of the domain (domain.md §1).
//!
//! These are plain data: the rules that change them live in [`crate::instance`],
//! [`crate::worker`], [`crate::placement`] and [`crate::autoscale`].

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, Sub};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::defaults::{
    DEFAULT_PORT_RANGE_END, DEFAULT_PORT_RANGE_START, ENTERPRISE_DEFAULT_MAX_NODES,
    PERSONAL_LICENSE_MAX_NODES,
};
use crate::version::Version;

// ---------------------------------------------------------------------------------------------
// Licences
// ---------------------------------------------------------------------------------------------

/// The CML licence a worker runs under (FR-2.1.4a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LicenseType {
    /// At most [`PERSONAL_LICENSE_MAX_NODES`] nodes on the worker.
    Personal,
    /// "Unlimited": the template's `max_nodes` is the practical limit.
    Enterprise,
    /// Evaluation licence: the template's `max_nodes` is the limit.
    Evaluation,
}

impl LicenseType {
    /// Every licence type, in preference order for template selection (PERSONAL first).
    pub const ALL: [LicenseType; 3] = [
        LicenseType::Personal,
        LicenseType::Enterprise,
        LicenseType::Evaluation,
    ];

    /// The node limit this licence imposes, given the template's own `max_nodes`.
    ///
    /// PERSONAL caps at 20 whatever the template says; the others take the template's limit.
    pub fn node_limit(self, template_max_nodes: u32) -> u32 {
        match self {
            LicenseType::Personal => template_max_nodes.min(PERSONAL_LICENSE_MAX_NODES),
            LicenseType::Enterprise | LicenseType::Evaluation => template_max_nodes,
        }
    }

    /// The node limit used when a template gives none.
    pub fn default_max_nodes(self) -> u32 {
        match self {
            LicenseType::Personal => PERSONAL_LICENSE_MAX_NODES,
            LicenseType::Enterprise | LicenseType::Evaluation => ENTERPRISE_DEFAULT_MAX_NODES,
        }
    }

    /// Upper-case name as in the contracts (`PERSONAL`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            LicenseType::Personal => "PERSONAL",
            LicenseType::Enterprise => "ENTERPRISE",
            LicenseType::Evaluation => "EVALUATION",
        }
    }
}

/// Licence types as operators read them in reasons: `[PERSONAL, ENTERPRISE]`.
pub fn licence_list(licences: &[LicenseType]) -> String {
    let names: Vec<&str> = licences.iter().map(|l| l.as_str()).collect();
    format!("[{}]", names.join(", "))
}

/// `n` as a `u32`, `u32::MAX` when it does not fit (counts of ports, workers, images).
pub(crate) fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl fmt::Display for LicenseType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Capacity
// ---------------------------------------------------------------------------------------------

/// One capacity dimension, for reason codes and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// vCPU cores.
    Cpu,
    /// Memory in GiB.
    Memory,
    /// Disk in GiB.
    Storage,
    /// CML nodes.
    Nodes,
}

impl Dimension {
    /// The four dimensions, in the order of [`Capacity::as_array`].
    pub const ALL: [Dimension; 4] = [
        Dimension::Cpu,
        Dimension::Memory,
        Dimension::Storage,
        Dimension::Nodes,
    ];
}

impl Dimension {
    /// The unit an amount of this dimension is written in: `CPU cores`, `GiB memory`,
    /// `GiB storage`, `nodes` (as in "needs 4 CPU cores").
    pub fn unit(self) -> &'static str {
        match self {
            Dimension::Cpu => "CPU cores",
            Dimension::Memory => "GiB memory",
            Dimension::Storage => "GiB storage",
            Dimension::Nodes => "nodes",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dimension::Cpu => "cpu",
            Dimension::Memory => "memory",
            Dimension::Storage => "storage",
            Dimension::Nodes => "nodes",
        })
    }
}

/// An amount of worker capacity: CPU cores, memory GiB, storage GiB and CML nodes.
///
/// Used for what a worker declares (from its template), what a booking uses, and what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// vCPU cores.
    pub cpu_cores: u32,
    /// Memory in GiB.
    pub memory_gb: u32,
    /// Disk in GiB.
    pub storage_gb: u32,
    /// CML nodes.
    pub nodes: u32,
}

impl Capacity {
    /// Nothing.
    pub const ZERO: Capacity = Capacity {
        cpu_cores: 0,
        memory_gb: 0,
        storage_gb: 0,
        nodes: 0,
    };

    /// A capacity from its four dimensions.
    pub const fn new(cpu_cores: u32, memory_gb: u32, storage_gb: u32, nodes: u32) -> Self {
        Capacity {
            cpu_cores,
            memory_gb,
            storage_gb,
            nodes,
        }
    }

    /// The dimensions as an array, in [`Dimension::ALL`] order.
    pub const fn as_array(&self) -> [u32; 4] {
        [self.cpu_cores, self.memory_gb, self.storage_gb, self.nodes]
    }

    /// The inverse of [`Capacity::as_array`].
    pub const fn from_array(a: [u32; 4]) -> Self {
        Capacity::new(a[0], a[1], a[2], a[3])
    }

    /// One dimension.
    pub const fn get(&self, d: Dimension) -> u32 {
        match d {
            Dimension::Cpu => self.cpu_cores,
            Dimension::Memory => self.memory_gb,
            Dimension::Storage => self.storage_gb,
            Dimension::Nodes => self.nodes,
        }
    }

    /// `true` when every dimension of `self` is ≤ the same dimension of `limit`.
    pub fn fits_within(&self, limit: &Capacity) -> bool {
        self.cpu_cores <= limit.cpu_cores
            && self.memory_gb <= limit.memory_gb
            && self.storage_gb <= limit.storage_gb
            && self.nodes <= limit.nodes
    }

    /// The first dimension (in [`Dimension::ALL`] order) where `self` exceeds `limit`.
    pub fn first_excess(&self, limit: &Capacity) -> Option<Dimension> {
        Dimension::ALL
            .into_iter()
            .find(|d| self.get(*d) > limit.get(*d))
    }

    /// Per-dimension maximum.
    pub fn max(&self, other: &Capacity) -> Capacity {
        Capacity::new(
            self.cpu_cores.max(other.cpu_cores),
            self.memory_gb.max(other.memory_gb),
            self.storage_gb.max(other.storage_gb),
            self.nodes.max(other.nodes),
        )
    }

    /// Per-dimension subtraction, stopping at zero.
    pub fn saturating_sub(&self, other: &Capacity) -> Capacity {
        Capacity::new(
            self.cpu_cores.saturating_sub(other.cpu_cores),
            self.memory_gb.saturating_sub(other.memory_gb),
            self.storage_gb.saturating_sub(other.storage_gb),
            self.nodes.saturating_sub(other.nodes),
        )
    }

    /// Mean of `self / of` over the dimensions where `of` is non-zero, in 0.0..=1.0 when
    /// `self ≤ of`. The bin-packing score uses it as "how full".
    pub fn utilisation_of(&self, of: &Capacity) -> f64 {
        let (mut sum, mut n) = (0.0, 0u32);
        for d in Dimension::ALL {
            let total = of.get(d);
            if total > 0 {
                sum += f64::from(self.get(d)) / f64::from(total);
                n += 1;
            }
        }
        if n == 0 { 0.0 } else { sum / f64::from(n) }
    }
}

impl Add for Capacity {
    type Output = Capacity;
    fn add(self, o: Capacity) -> Capacity {
        Capacity::new(
            self.cpu_cores.saturating_add(o.cpu_cores),
            self.memory_gb.saturating_add(o.memory_gb),
            self.storage_gb.saturating_add(o.storage_gb),
            self.nodes.saturating_add(o.nodes),
        )
    }
}

impl Sub for Capacity {
    type Output = Capacity;
    /// Saturating, like [`Capacity::saturating_sub`].
    fn sub(self, o: Capacity) -> Capacity {
        self.saturating_sub(&o)
    }
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

/// A half-open interval of time `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimeWindow {
    /// First instant inside the window.
    pub start: DateTime<Utc>,
    /// First instant after the window.
    pub end: DateTime<Utc>,
}

impl TimeWindow {
    /// A window; `end` before `start` is clamped to an empty window at `start`.
    pub fn new(start: DateTime<Utc>, end: DateTime<Utc>) -> Self {
        TimeWindow {
            start,
            end: end.max(start),
        }
    }

    /// Length of the window.
    pub fn duration(&self) -> Duration {
        self.end - self.start
    }

    /// `true` when the two windows share at least one instant.
    pub fn overlaps(&self, other: &TimeWindow) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// `true` when `t` is inside the window.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }
}

/// The time slot a user booked (FR-2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimeSlot {
    /// Requested start. For ASAP bookings, the moment the booking was made.
    pub start: DateTime<Utc>,
    /// Latest end: the lab is collected or stopped here.
    pub end: DateTime<Utc>,
    /// "As soon as possible": place and instantiate at once, no lead window.
    pub asap: bool,
}

impl TimeSlot {
    /// The interval the booking holds a worker's capacity: `[start − lead, end)`.
    ///
    /// The lead is the instantiation lead: the lab is imported and started before the slot
    /// begins, so the worker must have room from then. ASAP slots have no lead.
    pub fn booking_window(&self, instantiation_lead: Duration) -> TimeWindow {
        let start = if self.asap {
            self.start
        } else {
            self.start - instantiation_lead
        };
        TimeWindow::new(start, self.end)
    }

    /// Length of the slot in whole minutes.
    pub fn duration_minutes(&self) -> i64 {
        (self.end - self.start).num_minutes()
    }
}

// ---------------------------------------------------------------------------------------------
// Who did it
// ---------------------------------------------------------------------------------------------

/// Who caused a transition: recorded in every state history entry and audit record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Actor(pub String);

impl Actor {
    /// The scheduler leader.
    pub fn scheduler() -> Self {
        Actor("system:scheduler".into())
    }
    /// The controller leader.
    pub fn controller() -> Self {
        Actor("system:controller".into())
    }
    /// The control plane itself (e.g. expiry, event ingestion).
    pub fn control_plane() -> Self {
        Actor("system:control-plane".into())
    }
    /// A person or API client, by subject (JWT `sub`).
    pub fn user(subject: impl Into<String>) -> Self {
        Actor(format!("user:{}", subject.into()))
    }
    /// The assessment/grading platform (CloudEvents).
    pub fn assessment() -> Self {
        Actor("system:assessment".into())
    }
    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One recorded state change: `from` → `to` at `at`, why, and by whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTransition<S> {
    /// State before; `None` for the creation of the entity.
    pub from: Option<S>,
    /// State after.
    pub to: S,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Why, in words an operator understands (e.g. `timeslot_end`, `max_retries_exceeded`).
    pub reason: String,
    /// Who did it.
    pub actor: Actor,
}

// ---------------------------------------------------------------------------------------------
// States
// ---------------------------------------------------------------------------------------------

/// The ten states of a lablet instance (domain.md §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceState {
    /// Booked, not yet placed on a worker.
    Pending,
    /// Placed: worker chosen, ports allocated, capacity reserved.
    Scheduled,
    /// The controller is fetching, rewriting, importing and starting the lab.
    Instantiating,
    /// The lab runs on CML.
    Running,
    /// The assessment platform is collecting results.
    Collecting,
    /// The grading engine is grading.
    Grading,
    /// The lab is being stopped.
    Stopping,
    /// The lab is stopped; resources are still held (it may be restarted).
    Stopped,
    /// Results are stored; the lab is about to be wiped.
    Archived,
    /// Gone: lab deleted, ports and capacity released. Terminal.
    Terminated,
}

impl InstanceState {
    /// All states in lifecycle order.
    pub const ALL: [InstanceState; 10] = [
        InstanceState::Pending,
        InstanceState::Scheduled,
        InstanceState::Instantiating,
        InstanceState::Running,
        InstanceState::Collecting,
        InstanceState::Grading,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::Archived,
        InstanceState::Terminated,
    ];

    /// Upper-case name as in the contracts.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "PENDING",
            InstanceState::Scheduled => "SCHEDULED",
            InstanceState::Instantiating => "INSTANTIATING",
            InstanceState::Running => "RUNNING",
            InstanceState::Collecting => "COLLECTING",
            InstanceState::Grading => "GRADING",
            InstanceState::Stopping => "STOPPING",
            InstanceState::Stopped => "STOPPED",
            InstanceState::Archived => "ARCHIVED",
            InstanceState::Terminated => "TERMINATED",
        }
    }

    /// `true` only for TERMINATED.
    pub fn is_terminal(self) -> bool {
        self == InstanceState::Terminated
    }

    /// Holds a worker's ports and capacity: placed and not yet terminated (FR-2.2.4d).
    pub fn holds_resources(self) -> bool {
        !matches!(self, InstanceState::Pending | InstanceState::Terminated)
    }

    /// Keeps its worker from being stopped (domain.md §11.10: all but ARCHIVED and TERMINATED).
    pub fn blocks_worker_stop(self) -> bool {
        !matches!(self, InstanceState::Archived | InstanceState::Terminated)
            && self != InstanceState::Pending
    }

    /// A lab is (or is being) live on CML: RUNNING, COLLECTING or GRADING.
    pub fn is_active_lab(self) -> bool {
        matches!(
            self,
            InstanceState::Running | InstanceState::Collecting | InstanceState::Grading
        )
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The states of a CML worker (domain.md §2.2: the union of the documents' enums).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerState {
    /// Record created; no EC2 instance yet (or EC2 reports `pending`).
    Pending,
    /// EC2 instance requested and booting; CML not ready yet.
    Provisioning,
    /// A stopped instance is starting again.
    Starting,
    /// EC2 running and CML available: the only state that accepts placements.
    Running,
    /// Taking no new placements; existing labs keep running until drained or timed out.
    Draining,
    /// EC2 is stopping.
    Stopping,
    /// EC2 stopped: no cost but storage; can be started again.
    Stopped,
    /// EC2 is terminating.
    ShuttingDown,
    /// EC2 terminated. Terminal.
    Terminated,
    /// Provisioning failed or the instance is broken.
    Failed,
    /// EC2 reported something ccm does not know.
    Unknown,
}

impl WorkerState {
    /// All states.
    pub const ALL: [WorkerState; 11] = [
        WorkerState::Pending,
        WorkerState::Provisioning,
        WorkerState::Starting,
        WorkerState::Running,
        WorkerState::Draining,
        WorkerState::Stopping,
        WorkerState::Stopped,
        WorkerState::ShuttingDown,
        WorkerState::Terminated,
        WorkerState::Failed,
        WorkerState::Unknown,
    ];

    /// Upper-case name as in the contracts.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Pending => "PENDING",
            WorkerState::Provisioning => "PROVISIONING",
            WorkerState::Starting => "STARTING",
            WorkerState::Running => "RUNNING",
            WorkerState::Draining => "DRAINING",
            WorkerState::Stopping => "STOPPING",
            WorkerState::Stopped => "STOPPED",
            WorkerState::ShuttingDown => "SHUTTING_DOWN",
            WorkerState::Terminated => "TERMINATED",
            WorkerState::Failed => "FAILED",
            WorkerState::Unknown => "UNKNOWN",
        }
    }

    /// Capacity that is coming: the worker will be RUNNING soon without a new decision.
    pub fn is_booting(self) -> bool {
        matches!(
            self,
            WorkerState::Pending | WorkerState::Provisioning | WorkerState::Starting
        )
    }

    /// `true` only for TERMINATED.
    pub fn is_terminal(self) -> bool {
        self == WorkerState::Terminated
    }

    /// The EC2 `State.Name` mapping of the legacy service (legacy-features.md §2).
    pub fn from_ec2_state(name: &str) -> WorkerState {
        match name {
            "running" => WorkerState::Running,
            "stopped" => WorkerState::Stopped,
            "pending" => WorkerState::Pending,
            "stopping" => WorkerState::Stopping,
            "shutting-down" => WorkerState::ShuttingDown,
            "terminated" => WorkerState::Terminated,
            _ => WorkerState::Unknown,
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether CML on a worker answers (legacy `CMLServiceStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServiceStatus {
    /// Nothing answered.
    #[default]
    Unavailable,
    /// Booting.
    Starting,
    /// CML answered.
    Available,
    /// CML answered with an error.
    Error,
}

/// Lifecycle of a definition version (domain.md §1.1 resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DefinitionStatus {
    /// Usable for new bookings.
    #[default]
    Active,
    /// Existing instances go on; new bookings are refused.
    Deprecated,
    /// Soft-deleted.
    Deleted,
}

// ---------------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------------

/// An AMI constraint of a definition: a glob on the worker's AMI name and a minimum CML version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AmiRequirement {
    /// Glob on the AMI name, `*` and `?` wildcards (e.g. `CML-2.9.*`). Empty matches any.
    pub name_pattern: String,
    /// Lowest CML version accepted, if any.
    pub min_version: Option<Version>,
}

/// What one instance of a definition needs from a worker (FR-2.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ResourceRequirements {
    /// vCPU cores.
    pub cpu_cores: u32,
    /// Memory in GiB.
    pub memory_gb: u32,
    /// Disk in GiB.
    pub storage_gb: u32,
    /// Needs nested virtualisation (metal instance types).
    pub nested_virt: bool,
    /// AMI constraints; a worker must satisfy all of them.
    pub ami_requirements: Vec<AmiRequirement>,
}

/// One port a lab exposes, by name (e.g. `serial_1`) and protocol (e.g. `tcp`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortDefinition {
    /// Name; `${PORT_<NAME upper-cased>}` refers to it in the lab YAML.
    pub name: String,
    /// Transport protocol, `tcp` by default.
    pub protocol: String,
}

/// A version of a lablet definition (domain.md §1.1). Immutable once created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabletDefinition {
    /// Stable lineage id across versions (§11.14).
    pub id: String,
    /// Human name; unique together with the version.
    pub name: String,
    /// This version.
    pub version: Version,
    /// Where the CML lab YAML lives (`s3://`, `file://`, `https://`).
    pub lab_artifact_uri: String,
    /// `sha256:<hex>` of the lab YAML.
    pub lab_yaml_hash: String,
    /// What one instance needs.
    pub resource_requirements: ResourceRequirements,
    /// Licence types it may run under.
    pub license_affinity: Vec<LicenseType>,
    /// Nodes in the topology.
    pub node_count: u32,
    /// Ports every instance gets.
    pub port_template: Vec<PortDefinition>,
    /// Grading rules; when set, the slot end triggers collection instead of a plain stop.
    pub grading_rules_uri: Option<String>,
    /// Longest slot a booking may ask for.
    pub max_duration_minutes: u32,
    /// Lifecycle.
    pub status: DefinitionStatus,
    /// Creation time of this version.
    pub created_at: DateTime<Utc>,
    /// Who created this version.
    pub created_by: String,
}

impl LabletDefinition {
    /// The capacity one instance takes: requirements plus the node count.
    pub fn demand(&self) -> Capacity {
        let r = &self.resource_requirements;
        Capacity::new(r.cpu_cores, r.memory_gb, r.storage_gb, self.node_count)
    }
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

/// An inclusive port range `start..=end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (inclusive).
    pub end: u16,
}

impl PortRange {
    /// How many ports the range holds.
    pub fn len(&self) -> usize {
        if self.end < self.start {
            0
        } else {
            usize::from(self.end - self.start) + 1
        }
    }

    /// `true` when the range holds no port.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            start: DEFAULT_PORT_RANGE_START,
            end: DEFAULT_PORT_RANGE_END,
        }
    }
}

/// A worker template: what kind of EC2 worker the autoscaler can create (domain.md §1.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerTemplate {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// EC2 instance type, e.g. `m5zn.metal`.
    pub instance_type: String,
    /// Whether the instance type can run nested virtualisation (the metal types, constraint
    /// C-1). Definitions with `nested_virt` only go to workers of such templates. Sources that do
    /// not say can take [`instance_type_has_nested_virt`] as the default.
    pub nested_virt: bool,
    /// Capacity of one worker; `nodes` is the template's `max_nodes`.
    pub capacity: Capacity,
    /// Licence its workers run under.
    pub license_type: LicenseType,
    /// Glob on AMI names used to find the image.
    pub ami_pattern: String,
    /// Regions it may be provisioned in.
    pub regions: Vec<String>,
    /// Minutes from launch to CML ready.
    pub startup_minutes: u32,
    /// Port range of its workers.
    pub port_range: PortRange,
    /// Hours a DRAINING worker may keep instances before force stop.
    pub drain_timeout_hours: u32,
    /// Workers of this template the autoscaler keeps RUNNING even when idle.
    pub min_warm: u32,
    /// Most workers of this template that may exist (not TERMINATED) at once.
    pub max_workers: u32,
    /// Extra EC2 tags.
    pub tags: BTreeMap<String, String>,
}

/// Whether an EC2 instance type is a metal type (`m5zn.metal`, `c7i.metal-24xl`), the ones with
/// nested virtualisation (constraint C-1): a default for [`WorkerTemplate::nested_virt`].
pub fn instance_type_has_nested_virt(instance_type: &str) -> bool {
    instance_type
        .rsplit_once('.')
        .is_some_and(|(_, size)| size.starts_with("metal"))
}

impl WorkerTemplate {
    /// Node limit of its workers, after the licence cap.
    pub fn node_limit(&self) -> u32 {
        self.license_type.node_limit(self.capacity.nodes)
    }

    /// Declared capacity of one of its workers, with the node dimension licence-capped.
    pub fn declared_capacity(&self) -> Capacity {
        Capacity {
            nodes: self.node_limit(),
            ..self.capacity
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Instances and workers
// ---------------------------------------------------------------------------------------------

/// A grading result (`{total, max, passed, breakdown}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradingScore {
    /// Points scored.
    pub total: f64,
    /// Points possible.
    pub max: f64,
    /// Pass or fail.
    pub passed: bool,
    /// Per-criterion points.
    pub breakdown: Vec<CriterionScore>,
}

/// Points for one grading criterion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriterionScore {
    /// Criterion name.
    pub criterion: String,
    /// Points scored.
    pub points: f64,
    /// Points possible.
    pub max: f64,
}

/// A lablet instance: one booking and its lab (domain.md §1.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabletInstance {
    /// Id.
    pub id: String,
    /// Definition lineage id.
    pub definition_id: String,
    /// Definition version pinned at creation.
    pub definition_version: Version,
    /// Worker it is placed on; `None` while PENDING.
    pub worker_id: Option<String>,
    /// Current state.
    pub state: InstanceState,
    /// Every transition so far, oldest first.
    pub state_history: Vec<StateTransition<InstanceState>>,
    /// Port name → port number on the worker.
    pub allocated_ports: BTreeMap<String, u16>,
    /// CML lab id once imported.
    pub cml_lab_id: Option<String>,
    /// Booked slot.
    pub timeslot: TimeSlot,
    /// Who booked it (JWT `sub`).
    pub owner_id: String,
    /// External reservation reference.
    pub reservation_id: Option<String>,
    /// Grading result, once graded.
    pub grading_score: Option<GradingScore>,
    /// Failed instantiation attempts so far.
    pub retry_count: u32,
    /// When it was booked.
    pub created_at: DateTime<Utc>,
    /// When it was placed.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// When the lab first reached RUNNING.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached TERMINATED.
    pub terminated_at: Option<DateTime<Utc>>,
}

/// A CML worker (domain.md §1.3), the parts the domain rules need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CmlWorker {
    /// Id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Template it was made from; `None` = a legacy worker the scheduler and autoscaler never touch.
    pub template_name: Option<String>,
    /// Current state.
    pub state: WorkerState,
    /// Every transition so far, oldest first.
    pub state_history: Vec<StateTransition<WorkerState>>,
    /// CML service status.
    pub service_status: ServiceStatus,
    /// Licence type (from the template).
    pub license_type: LicenseType,
    /// Declared capacity, nodes licence-capped.
    pub declared: Capacity,
    /// Port range.
    pub port_range: PortRange,
    /// AMI name, for AMI requirements.
    pub ami_name: Option<String>,
    /// CML version reported by the worker, e.g. `2.9.0`.
    pub cml_version: Option<String>,
    /// EC2 instance id once provisioned.
    pub aws_instance_id: Option<String>,
    /// When draining began.
    pub drain_started_at: Option<DateTime<Utc>>,
    /// Why it is draining.
    pub drain_reason: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl CmlWorker {
    /// When the worker entered its current state (creation time if never transitioned).
    pub fn state_since(&self) -> DateTime<Utc> {
        self.state_history
            .last()
            .map(|t| t.at)
            .unwrap_or(self.created_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personal_licence_caps_nodes_at_twenty() {
        assert_eq!(LicenseType::Personal.node_limit(500), 20);
        assert_eq!(LicenseType::Personal.node_limit(10), 10);
        assert_eq!(LicenseType::Enterprise.node_limit(500), 500);
        assert_eq!(LicenseType::Evaluation.node_limit(50), 50);
    }

    #[test]
    fn only_metal_instance_types_nest() {
        assert!(instance_type_has_nested_virt("m5zn.metal"));
        assert!(instance_type_has_nested_virt("c7i.metal-24xl"));
        assert!(!instance_type_has_nested_virt("m5.24xlarge"));
        assert!(!instance_type_has_nested_virt("metal"));
    }

    #[test]
    fn capacity_arithmetic_and_fit() {
        let a = Capacity::new(4, 8, 10, 2);
        let b = Capacity::new(1, 1, 1, 1);
        assert_eq!(a + b, Capacity::new(5, 9, 11, 3));
        assert_eq!(b - a, Capacity::ZERO);
        assert!(b.fits_within(&a));
        assert!(!a.fits_within(&b));
        assert_eq!(
            a.first_excess(&Capacity::new(4, 7, 10, 2)),
            Some(Dimension::Memory)
        );
        assert_eq!(Capacity::from_array(a.as_array()), a);
        let half = Capacity::new(24, 96, 250, 10).utilisation_of(&Capacity::new(48, 192, 500, 20));
        assert!((half - 0.5).abs() < 1e-9);
    }

    #[test]
    fn booking_window_includes_lead_except_for_asap() {
        let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let slot = TimeSlot {
            start,
            end: start + Duration::hours(2),
            asap: false,
        };
        let w = slot.booking_window(Duration::minutes(15));
        assert_eq!(w.start, start - Duration::minutes(15));
        assert_eq!(w.end, slot.end);
        let asap = TimeSlot { asap: true, ..slot };
        assert_eq!(asap.booking_window(Duration::minutes(15)).start, start);
        assert_eq!(slot.duration_minutes(), 120);
    }

    #[test]
    fn windows_are_half_open() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let a = TimeWindow::new(t, t + Duration::hours(1));
        let b = TimeWindow::new(t + Duration::hours(1), t + Duration::hours(2));
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&TimeWindow::new(
            t + Duration::minutes(59),
            t + Duration::hours(3)
        )));
        assert!(a.contains(t) && !a.contains(t + Duration::hours(1)));
        assert_eq!(
            TimeWindow::new(t, t - Duration::hours(1)).duration(),
            Duration::zero()
        );
    }

    #[test]
    fn state_predicates_follow_the_resolutions() {
        use InstanceState::*;
        assert!(!Pending.holds_resources() && Scheduled.holds_resources());
        assert!(Archived.holds_resources() && !Terminated.holds_resources());
        assert!(Stopped.blocks_worker_stop() && !Archived.blocks_worker_stop());
        assert!(Running.is_active_lab() && !Stopped.is_active_lab());
        assert_eq!(
            WorkerState::from_ec2_state("shutting-down"),
            WorkerState::ShuttingDown
        );
        assert_eq!(WorkerState::from_ec2_state("weird"), WorkerState::Unknown);
    }
}
