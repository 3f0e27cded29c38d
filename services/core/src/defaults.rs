//! Every default number of the domain, named and documented in one place (domain.md §4–§6, §11).
//!
//! Services expose most of these as configuration; these are the values used when nothing is set.

/// First port of a worker's port range (ADR-004, constraint C-4).
pub const DEFAULT_PORT_RANGE_START: u16 = 2000;
/// Last port (inclusive) of a worker's port range.
pub const DEFAULT_PORT_RANGE_END: u16 = 9999;

/// Node limit of a PERSONAL CML licence (FR-2.1.4c).
pub const PERSONAL_LICENSE_MAX_NODES: u32 = 20;
/// Practical node limit templates use for ENTERPRISE ("unlimited") licences.
pub const ENTERPRISE_DEFAULT_MAX_NODES: u32 = 500;

/// Minutes before `timeslot_start` at which instantiation begins (LABLET_INSTANTIATION_DELAY).
pub const INSTANTIATION_LEAD_MINUTES: i64 = 15;
/// Minutes a new worker needs from EC2 launch to CML ready (WORKER_BOOTUP_DELAY, template default).
pub const WORKER_STARTUP_MINUTES: i64 = 20;
/// Minutes a STOPPED worker needs to come back (domain.md §4 "restart ~5 min").
pub const WORKER_RESTART_MINUTES: i64 = 5;
/// Scale-up lookahead: boot + instantiation (TIMESLOT_LEAD_TIME_MINUTES = 20 + 15).
pub const SCALE_UP_LOOKAHEAD_MINUTES: i64 = WORKER_STARTUP_MINUTES + INSTANTIATION_LEAD_MINUTES;
/// A worker with a booking starting within this many minutes is never drained.
pub const SCALE_DOWN_GRACE_MINUTES: i64 = 30;
/// Hours a DRAINING worker may keep instances before it is force-stopped (template default).
pub const DRAIN_TIMEOUT_HOURS: i64 = 4;
/// Instantiation attempts before an instance is terminated (ADR-008).
pub const MAX_INSTANTIATION_RETRIES: u32 = 3;
/// Hours a STOPPED worker is kept before the autoscaler terminates it (domain.md §6 resolution).
pub const STOPPED_WORKER_RETENTION_HOURS: i64 = 72;

/// Workers that may be DRAINING at once because of the autoscaler (disruption budget).
pub const DEFAULT_MAX_CONCURRENT_DRAINS: usize = 1;
/// RUNNING workers the autoscaler keeps even when idle (minimum warm capacity).
pub const DEFAULT_MIN_WARM_WORKERS: usize = 0;
/// Upper bound on workers in one deployment (domain.md §6 resolution: ≥100 per region must fit).
pub const DEFAULT_MAX_WORKERS: usize = 200;
/// Fraction of unready (booting too long / failed) workers above which scaling halts.
pub const DEFAULT_MAX_UNREADY_FRACTION: f64 = 0.5;
/// Minutes after which a booting worker that is still not RUNNING counts as unready.
pub const UNREADY_AFTER_MINUTES: i64 = 45;
/// Fewest unready managed workers that can halt scaling: one broken worker in a fleet of one or
/// two is a worker problem (the worker reconciler's), not a fleet-wide one.
pub const MIN_UNREADY_WORKERS_TO_HALT: usize = 2;

/// Declared capacity given to legacy workers that have no template (migration default).
pub const LEGACY_CPU_CORES: u32 = 48;
/// See [`LEGACY_CPU_CORES`].
pub const LEGACY_MEMORY_GB: u32 = 192;
/// See [`LEGACY_CPU_CORES`].
pub const LEGACY_STORAGE_GB: u32 = 500;
/// See [`LEGACY_CPU_CORES`].
pub const LEGACY_MAX_NODES: u32 = 20;

/// Longest accepted resource or definition name, in characters.
pub const MAX_NAME_LEN: usize = 128;
