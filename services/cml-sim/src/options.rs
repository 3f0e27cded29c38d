//! [`SimOptions`]: what every simulated CML looks like, and the [`Faults`] it starts with.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default API user.
pub const DEFAULT_USERNAME: &str = "admin";
/// Default API password (CML's factory default, as the legacy service assumes).
pub const DEFAULT_PASSWORD: &str = "admin";
/// Default reported CML version.
pub const DEFAULT_VERSION: &str = "2.9.0";
/// Default lifetime of an API token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);
/// Default number of computes (the all-in-one controller only).
pub const DEFAULT_COMPUTES: u32 = 1;
/// Default vCPUs of the host (an m5zn.metal).
pub const DEFAULT_CPU_CORES: u32 = 48;
/// Default memory of the host, bytes (192 GiB).
pub const DEFAULT_MEMORY_BYTES: u64 = 192 * GIB;
/// Default disk of the host, bytes (500 GiB).
pub const DEFAULT_DISK_BYTES: u64 = 500 * GIB;
/// vCPUs of a node whose YAML says `cpus: null`.
pub const DEFAULT_NODE_CPUS: u32 = 1;
/// Memory of a node whose YAML says `ram: null`, MiB.
pub const DEFAULT_NODE_MEMORY_MIB: u64 = 2048;
/// Disk taken by each defined node, bytes (4 GiB).
pub const DEFAULT_NODE_DISK_BYTES: u64 = 4 * GIB;
/// CPU utilisation of an idle host, percent.
pub const DEFAULT_BASE_CPU_PERCENT: f64 = 2.0;
/// Share of each running node's vCPUs that is busy (0..=1).
pub const DEFAULT_NODE_CPU_LOAD: f64 = 0.25;
/// Memory used by CML itself, bytes (8 GiB).
pub const DEFAULT_BASE_MEMORY_BYTES: u64 = 8 * GIB;
/// Disk used by CML itself and its images, bytes (40 GiB).
pub const DEFAULT_BASE_DISK_BYTES: u64 = 40 * GIB;
/// Time from `POST /licensing/registration` until the registration is COMPLETED (or FAILED).
pub const DEFAULT_REGISTRATION_DELAY: Duration = Duration::from_secs(2);
/// The licence token that CML rejects as invalid (400).
pub const INVALID_LICENCE_TOKEN: &str = "invalid";
/// The user id of the API user (CML's built-in admin; the `00000000-0000-` prefix marks a
/// system user, which idle detection ignores for `user_activity`).
pub const ADMIN_USER_ID: &str = "00000000-0000-4000-a000-000000000000";
/// The simulated CML that `/api/v0/...` (no host prefix) addresses.
pub const DEFAULT_HOST: &str = "default";
/// Most simulated CMLs one server creates in multi-host mode (a guard against runaway clients).
pub const MAX_HOSTS: usize = 10_000;

const GIB: u64 = 1024 * 1024 * 1024;

/// The licence state a simulated CML starts in (and returns to after a deregistration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LicenceMode {
    /// Not registered and not in evaluation: `NOT_REGISTERED` / `NOT_AUTHORIZED`, not licensed.
    Unregistered,
    /// The evaluation period of a fresh CML: `EVALUATION` / `EVAL`, licensed.
    #[default]
    Evaluation,
    /// Registered: `COMPLETED` / `AUTHORIZED`, licensed. Deregistration returns to
    /// [`LicenceMode::Unregistered`].
    Registered,
}

/// Failures to inject. Counters are consumed one per matching call.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fail the next N imports with 500.
    pub fail_imports: u32,
    /// Fail the next N lab starts with 500.
    pub fail_starts: u32,
    /// Fail the next N lab stops with 500.
    pub fail_stops: u32,
    /// Answer every `/api/v0` call with 503 (CML down).
    pub unreachable: bool,
    /// Report `ready: false` and answer every other `/api/v0` call with 503 (CML booting).
    pub unready: bool,
    /// Delay every `/api/v0` call by this many milliseconds.
    pub latency_ms: u64,
    /// Registrations end in `FAILED` instead of `COMPLETED`.
    pub fail_registration: bool,
    /// Deregistrations answer 202 (deregistered locally only) instead of 204.
    pub deregistration_local_only: bool,
}

/// A change to [`Faults`] (`POST /_sim/faults`): only the given fields change.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPatch {
    /// See [`Faults::fail_imports`].
    pub fail_imports: Option<u32>,
    /// See [`Faults::fail_starts`].
    pub fail_starts: Option<u32>,
    /// See [`Faults::fail_stops`].
    pub fail_stops: Option<u32>,
    /// See [`Faults::unreachable`].
    pub unreachable: Option<bool>,
    /// See [`Faults::unready`].
    pub unready: Option<bool>,
    /// See [`Faults::latency_ms`].
    pub latency_ms: Option<u64>,
    /// See [`Faults::fail_registration`].
    pub fail_registration: Option<bool>,
    /// See [`Faults::deregistration_local_only`].
    pub deregistration_local_only: Option<bool>,
    /// Invalidate every issued token now (the next authenticated call gets 401).
    pub expire_tokens: bool,
}

impl Faults {
    /// Applies `patch` (its `expire_tokens` is an action, handled by the caller).
    pub fn apply(&mut self, patch: &FaultPatch) {
        if let Some(v) = patch.fail_imports {
            self.fail_imports = v;
        }
        if let Some(v) = patch.fail_starts {
            self.fail_starts = v;
        }
        if let Some(v) = patch.fail_stops {
            self.fail_stops = v;
        }
        if let Some(v) = patch.unreachable {
            self.unreachable = v;
        }
        if let Some(v) = patch.unready {
            self.unready = v;
        }
        if let Some(v) = patch.latency_ms {
            self.latency_ms = v;
        }
        if let Some(v) = patch.fail_registration {
            self.fail_registration = v;
        }
        if let Some(v) = patch.deregistration_local_only {
            self.deregistration_local_only = v;
        }
    }
}

/// How the simulator and every CML it simulates behave. `Default` gives a ready, evaluation-
/// licensed m5zn.metal-sized CML on a free loopback port with no delays.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Address to listen on (loopback by default).
    pub listen: IpAddr,
    /// Port; 0 picks a free one.
    pub port: u16,
    /// API user.
    pub username: String,
    /// API password.
    pub password: String,
    /// Reported version.
    pub version: String,
    /// Time from a simulated CML's creation until it reports `ready` (and serves calls).
    pub ready_after: Duration,
    /// Lifetime of an API token; an expired token gets 401.
    pub token_ttl: Duration,
    /// Number of computes nodes are spread over (round robin).
    pub computes: u32,
    /// vCPUs of the host.
    pub cpu_cores: u32,
    /// Memory of the host, bytes.
    pub memory_bytes: u64,
    /// Disk of the host, bytes.
    pub disk_bytes: u64,
    /// Most nodes that may run at once (the licence's node limit); `None` = no limit.
    pub node_limit: Option<u32>,
    /// vCPUs of a node without `cpus`.
    pub default_node_cpus: u32,
    /// Memory of a node without `ram`, MiB.
    pub default_node_memory_mib: u64,
    /// Disk per defined node, bytes.
    pub node_disk_bytes: u64,
    /// Idle CPU utilisation, percent.
    pub base_cpu_percent: f64,
    /// Busy share of a running node's vCPUs.
    pub node_cpu_load: f64,
    /// Memory used with no node running, bytes.
    pub base_memory_bytes: u64,
    /// Disk used with no lab defined, bytes.
    pub base_disk_bytes: u64,
    /// Initial licence state.
    pub licence: LicenceMode,
    /// Whether the licence is an enterprise one.
    pub enterprise: bool,
    /// Registration duration.
    pub registration_delay: Duration,
    /// Time an import takes before it answers.
    pub import_duration: Duration,
    /// Time a lab start takes before it answers (the lab is then `STARTED`).
    pub start_duration: Duration,
    /// Time from `STARTED` until the lab reports `BOOTED`.
    pub boot_duration: Duration,
    /// Faults every simulated CML starts with.
    pub faults: Faults,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            username: DEFAULT_USERNAME.into(),
            password: DEFAULT_PASSWORD.into(),
            version: DEFAULT_VERSION.into(),
            ready_after: Duration::ZERO,
            token_ttl: DEFAULT_TOKEN_TTL,
            computes: DEFAULT_COMPUTES,
            cpu_cores: DEFAULT_CPU_CORES,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            disk_bytes: DEFAULT_DISK_BYTES,
            node_limit: None,
            default_node_cpus: DEFAULT_NODE_CPUS,
            default_node_memory_mib: DEFAULT_NODE_MEMORY_MIB,
            node_disk_bytes: DEFAULT_NODE_DISK_BYTES,
            base_cpu_percent: DEFAULT_BASE_CPU_PERCENT,
            node_cpu_load: DEFAULT_NODE_CPU_LOAD,
            base_memory_bytes: DEFAULT_BASE_MEMORY_BYTES,
            base_disk_bytes: DEFAULT_BASE_DISK_BYTES,
            licence: LicenceMode::default(),
            enterprise: false,
            registration_delay: DEFAULT_REGISTRATION_DELAY,
            import_duration: Duration::ZERO,
            start_duration: Duration::ZERO,
            boot_duration: Duration::ZERO,
            faults: Faults::default(),
        }
    }
}
