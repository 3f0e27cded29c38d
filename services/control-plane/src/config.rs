//! Configuration of the control plane, layered
//! **defaults → TOML file → `CCM_*` environment variables → command-line flags**
//! (each layer overrides the previous one, key by key).
//!
//! Every key has one dotted name (its TOML path), one environment variable and one flag, derived
//! the same way (the full table, with defaults, is in `docs/configuration.md` and in [`KEYS`]):
//!
//! | TOML key | environment | flag |
//! |---|---|---|
//! | `listen_addr` | `CCM_LISTEN_ADDR` | `--listen-addr` |
//! | `store.sqlite_path` | `CCM_STORE__SQLITE_PATH` | `--store-sqlite-path` |
//! | `auth.insecure_no_auth` | `CCM_AUTH__INSECURE_NO_AUTH` | `--insecure-no-auth` |
//!
//! i.e. environment = `CCM_` + the key upper-cased with `.` → `__`; flag = `--` + the key with
//! `.` and `_` → `-` (one exception: `--insecure-no-auth`, the spelling ARCHITECTURE.md uses).
//! Lists in the environment are comma-separated. The file comes from `--config PATH`, else
//! `CCM_CONFIG`, else none.
//!
//! Errors name the key and where its value came from: an unknown key in the file (every unknown
//! key is listed), a value of the wrong type, a bad duration (`30s`, `500ms`, `1m30s`), a bad
//! address. Unknown `CCM_<SECTION>__*` variables of a known section are errors too (typos);
//! other `CCM_*` variables belong to other tools and are ignored.
//!
//! [`ControlPlaneConfig::effective_toml`] prints the result (`ccm config print`) with the source
//! of every value and secrets redacted.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::ControlPlaneError;

pub use ccm_runtime::metrics::DEFAULT_METRICS_ADDR;
pub use ccm_runtime::server::{
    DEFAULT_CONCURRENCY_LIMIT, DEFAULT_LISTEN_ADDR, DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_SHUTDOWN_GRACE_PERIOD,
};

// ---------------------------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------------------------

/// Default data directory (relative to the working directory): holds the SQLite file.
pub const DEFAULT_DATA_DIR: &str = "ccm-data";
/// File name of the SQLite database inside the data directory, when `store.sqlite_path` is unset.
pub const DEFAULT_SQLITE_FILE: &str = "ccm.sqlite3";
/// Default MongoDB database name.
pub const DEFAULT_MONGODB_DATABASE: &str = "ccm";
/// Default etcd endpoint.
pub const DEFAULT_ETCD_ENDPOINT: &str = "http://127.0.0.1:2379";
/// Default etcd key prefix of ccm's coordination keys.
pub const DEFAULT_ETCD_PREFIX: &str = "/ccm";
/// Default leader lease TTL (ARCHITECTURE.md §4: ~10 s, keep-alive every TTL/3).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Shortest accepted lease TTL.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// Longest accepted lease TTL.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(300);
/// Default accepted token audience.
pub const DEFAULT_AUDIENCE: &str = "ccm";
/// Default CloudEvents `source` attribute of the events ccm emits.
pub const DEFAULT_CLOUDEVENTS_SOURCE: &str = "ccm/control-plane";
/// Longest accepted request timeout.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest accepted concurrency limit.
pub const MAX_CONCURRENCY_LIMIT: usize = 100_000;
/// Smallest accepted message size limit.
pub const MIN_MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Largest accepted message size limit.
pub const MAX_MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;
/// Longest accepted shutdown grace period.
pub const MAX_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(600);
/// Default retention of audit records (`audit.retention`): 365 days, the store's
/// `AUDIT_RETENTION_DEFAULT` (domain.md §7: 3 to 12 months).
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Shortest audit retention accepted: 90 days (the store refuses to purge younger entries).
pub const MIN_AUDIT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
/// Longest audit retention accepted: 365 days (MongoDB's TTL index expires older entries).
pub const MAX_AUDIT_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default retention of scaling decisions (`audit.scaling_retention`): 365 days.
pub const DEFAULT_SCALING_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Shortest scaling-decision retention accepted: 90 days.
pub const MIN_SCALING_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
/// Longest scaling-decision retention accepted: 365 days.
pub const MAX_SCALING_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default time between two purges of the audit and scaling logs (`audit.purge_interval`).
pub const DEFAULT_AUDIT_PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// Shortest purge interval accepted.
pub const MIN_AUDIT_PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Longest purge interval accepted.
pub const MAX_AUDIT_PURGE_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Values of `metrics_addr` that turn the `/metrics` listener off.
pub const METRICS_ADDR_OFF: &[&str] = &["", "0", "none", "off"];
/// Environment variable naming the configuration file when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "CCM_CONFIG";
/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "CCM_";
/// Text written in place of a secret by [`ControlPlaneConfig::effective_toml`] and `Debug`.
pub const REDACTED: &str = "REDACTED";

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

/// A secret string (a URI with a password): `Debug` and `Display` print [`REDACTED`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the code that needs it (the MongoDB driver).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", redact_url(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// Where the state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// SQLite, one file (the embedded default); `:memory:` for tests.
    Sqlite {
        /// Database file (`store.sqlite_path`; default `<data_dir>/ccm.sqlite3`).
        path: PathBuf,
    },
    /// MongoDB (production; a replica set for several control-plane replicas).
    MongoDb {
        /// Connection string `mongodb://…` or `mongodb+srv://…` (`store.mongodb_uri`; secret).
        uri: Secret,
        /// Database name (`store.mongodb_database`).
        database: String,
    },
}

/// Which coordinator provides leader election, fencing, the change feed and dedup keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinationBackend {
    /// In this process (single node, `ccm dev`).
    InProcess,
    /// etcd (production).
    Etcd {
        /// Client URLs (`coordination.etcd_endpoints`).
        endpoints: Vec<String>,
        /// Key prefix of ccm's keys (`coordination.etcd_prefix`).
        prefix: String,
    },
}

/// Coordination settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinationConfig {
    /// The backend (`coordination.backend`).
    pub backend: CoordinationBackend,
    /// Leader lease TTL (`coordination.lease_ttl`); keep-alive runs every TTL/3.
    pub lease_ttl: Duration,
}

/// Authentication of callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// OIDC issuer URL (`auth.issuer_url`), checked against `iss`; its discovery document gives
    /// the JWKS URL unless `jwks_url` is set. Required unless `insecure_no_auth`.
    pub issuer_url: Option<String>,
    /// Accepted `aud` values (`auth.audiences`); a token must carry at least one.
    pub audiences: Vec<String>,
    /// JWKS URL overriding discovery (`auth.jwks_url`).
    pub jwks_url: Option<String>,
    /// Serve without authentication (`auth.insecure_no_auth`): every call is anonymous admin.
    /// For `ccm dev` and tests only.
    pub insecure_no_auth: bool,
}

/// Outgoing CloudEvents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEventsConfig {
    /// HTTP endpoint events are POSTed to (`cloudevents.sink_url`); none disables emission.
    pub sink_url: Option<String>,
    /// `source` attribute of emitted events (`cloudevents.source`).
    pub source: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (with trace ids).
    Json,
}

impl LogFormat {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Retention of the audit and scaling-decision logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Audit records older than this are purged (`audit.retention`).
    pub retention: Duration,
    /// Scaling decisions older than this are purged (`audit.scaling_retention`).
    pub scaling_retention: Duration,
    /// Time between two purges (`audit.purge_interval`); the first runs at start-up.
    pub purge_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention: DEFAULT_AUDIT_RETENTION,
            scaling_retention: DEFAULT_SCALING_RETENTION,
            purge_interval: DEFAULT_AUDIT_PURGE_INTERVAL,
        }
    }
}

/// Logs and traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Log format (`telemetry.log_format`).
    pub log_format: LogFormat,
    /// OTLP endpoint traces are exported to (`telemetry.otlp_endpoint`); none disables export.
    pub otlp_endpoint: Option<String>,
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The built-in default.
    Default,
    /// The TOML file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Default => f.write_str("default"),
            ConfigSource::File(path) => write!(f, "file {}", path.display()),
            ConfigSource::Env(var) => write!(f, "environment variable {var}"),
            ConfigSource::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// The control plane's configuration (see the module docs for how it is loaded). Two
/// configurations are equal when their values are, wherever the values came from.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// gRPC listen address (`listen_addr`).
    pub listen_addr: SocketAddr,
    /// Data directory (`data_dir`).
    pub data_dir: PathBuf,
    /// State store (`store.*`).
    pub store: StoreConfig,
    /// Coordination (`coordination.*`).
    pub coordination: CoordinationConfig,
    /// Authentication (`auth.*`).
    pub auth: AuthConfig,
    /// Outgoing CloudEvents (`cloudevents.*`).
    pub cloudevents: CloudEventsConfig,
    /// Time until a call's response starts (`request_timeout`).
    pub request_timeout: Duration,
    /// Application calls handled at once (`concurrency_limit`).
    pub concurrency_limit: usize,
    /// Largest gRPC message in bytes, both directions (`max_message_size`).
    pub max_message_size: usize,
    /// Time in-flight calls get to finish at shutdown (`shutdown_grace_period`).
    pub shutdown_grace_period: Duration,
    /// Worker templates to create at startup when missing (`templates_seed_file`; YAML, see
    /// docs/templates.md). Existing templates are never changed. None: no seeding.
    pub templates_seed_file: Option<PathBuf>,
    /// Logs and traces (`telemetry.*`).
    pub telemetry: TelemetryConfig,
    /// Where `/metrics` is served (`metrics_addr`); `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Retention of the audit and scaling logs (`audit.*`).
    pub audit: AuditConfig,
    sources: BTreeMap<&'static str, ConfigSource>,
}

impl PartialEq for ControlPlaneConfig {
    fn eq(&self, other: &Self) -> bool {
        self.listen_addr == other.listen_addr
            && self.data_dir == other.data_dir
            && self.store == other.store
            && self.coordination == other.coordination
            && self.auth == other.auth
            && self.cloudevents == other.cloudevents
            && self.request_timeout == other.request_timeout
            && self.concurrency_limit == other.concurrency_limit
            && self.max_message_size == other.max_message_size
            && self.shutdown_grace_period == other.shutdown_grace_period
            && self.templates_seed_file == other.templates_seed_file
            && self.telemetry == other.telemetry
            && self.metrics_addr == other.metrics_addr
            && self.audit == other.audit
    }
}

impl Eq for ControlPlaneConfig {}

impl Default for ControlPlaneConfig {
    /// The built-in defaults (not valid to serve as they are: no issuer and auth not disabled).
    fn default() -> Self {
        ControlPlaneConfig {
            listen_addr: DEFAULT_LISTEN_ADDR,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            store: StoreConfig::Sqlite {
                path: Path::new(DEFAULT_DATA_DIR).join(DEFAULT_SQLITE_FILE),
            },
            coordination: CoordinationConfig {
                backend: CoordinationBackend::InProcess,
                lease_ttl: DEFAULT_LEASE_TTL,
            },
            auth: AuthConfig {
                issuer_url: None,
                audiences: vec![DEFAULT_AUDIENCE.to_owned()],
                jwks_url: None,
                insecure_no_auth: false,
            },
            cloudevents: CloudEventsConfig {
                sink_url: None,
                source: DEFAULT_CLOUDEVENTS_SOURCE.to_owned(),
            },
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            concurrency_limit: DEFAULT_CONCURRENCY_LIMIT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            shutdown_grace_period: DEFAULT_SHUTDOWN_GRACE_PERIOD,
            templates_seed_file: None,
            telemetry: TelemetryConfig {
                log_format: LogFormat::Text,
                otlp_endpoint: None,
            },
            metrics_addr: Some(DEFAULT_METRICS_ADDR),
            audit: AuditConfig::default(),
            sources: BTreeMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// The type of a key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `host:port`.
    Address,
    /// A filesystem path.
    Path,
    /// A duration string: `30s`, `500ms`, `5m`, `1h30m`.
    Duration,
    /// A non-negative integer.
    Count,
    /// A byte size: an integer, or with `KiB`, `MiB`, `GiB`.
    Size,
    /// A string.
    Text,
    /// A string that is a secret (redacted when printed).
    Secret,
    /// `true` / `false`.
    Bool,
    /// A list of strings (comma-separated in the environment).
    List,
    /// One of the listed words.
    Choice(&'static [&'static str]),
}

/// One configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    /// Dotted TOML path.
    pub key: &'static str,
    /// Environment variable.
    pub env: &'static str,
    /// Command-line flag.
    pub flag: &'static str,
    /// Value type.
    pub kind: KeyKind,
}

const STORE_BACKENDS: &[&str] = &["sqlite", "mongodb"];
const COORDINATION_BACKENDS: &[&str] = &["in-process", "etcd"];
const LOG_FORMATS: &[&str] = &["text", "json"];

/// Every configuration key, in the order `effective_toml` prints them.
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "listen_addr",
        env: "CCM_LISTEN_ADDR",
        flag: "--listen-addr",
        kind: KeyKind::Address,
    },
    KeySpec {
        key: "data_dir",
        env: "CCM_DATA_DIR",
        flag: "--data-dir",
        kind: KeyKind::Path,
    },
    KeySpec {
        key: "request_timeout",
        env: "CCM_REQUEST_TIMEOUT",
        flag: "--request-timeout",
        kind: KeyKind::Duration,
    },
    KeySpec {
        key: "concurrency_limit",
        env: "CCM_CONCURRENCY_LIMIT",
        flag: "--concurrency-limit",
        kind: KeyKind::Count,
    },
    KeySpec {
        key: "max_message_size",
        env: "CCM_MAX_MESSAGE_SIZE",
        flag: "--max-message-size",
        kind: KeyKind::Size,
    },
    KeySpec {
        key: "shutdown_grace_period",
        env: "CCM_SHUTDOWN_GRACE_PERIOD",
        flag: "--shutdown-grace-period",
        kind: KeyKind::Duration,
    },
    KeySpec {
        key: "templates_seed_file",
        env: "CCM_TEMPLATES_SEED_FILE",
        flag: "--templates-seed-file",
        kind: KeyKind::Text,
    },
    KeySpec {
        key: "metrics_addr",
        env: "CCM_METRICS_ADDR",
        flag: "--metrics-addr",
        kind: KeyKind::Address,
    },
    KeySpec {
        key: "store.backend",
        env: "CCM_STORE__BACKEND",
        flag: "--store-backend",
        kind: KeyKind::Choice(STORE_BACKENDS),
    },
    KeySpec {
        key: "store.sqlite_path",
        env: "CCM_STORE__SQLITE_PATH",
        flag: "--store-sqlite-path",
        kind: KeyKind::Path,
    },
    KeySpec {
        key: "store.mongodb_uri",
        env: "CCM_STORE__MONGODB_URI",
        flag: "--store-mongodb-uri",
        kind: KeyKind::Secret,
    },
    KeySpec {
        key: "store.mongodb_database",
        env: "CCM_STORE__MONGODB_DATABASE",
        flag: "--store-mongodb-database",
        kind: KeyKind::Text,
    },
    KeySpec {
        key: "coordination.backend",
        env: "CCM_COORDINATION__BACKEND",
        flag: "--coordination-backend",
        kind: KeyKind::Choice(COORDINATION_BACKENDS),
    },
    KeySpec {
        key: "coordination.etcd_endpoints",
        env: "CCM_COORDINATION__ETCD_ENDPOINTS",
        flag: "--coordination-etcd-endpoints",
        kind: KeyKind::List,
    },
    KeySpec {
        key: "coordination.etcd_prefix",
        env: "CCM_COORDINATION__ETCD_PREFIX",
        flag: "--coordination-etcd-prefix",
        kind: KeyKind::Text,
    },
    KeySpec {
        key: "coordination.lease_ttl",
        env: "CCM_COORDINATION__LEASE_TTL",
        flag: "--coordination-lease-ttl",
        kind: KeyKind::Duration,
    },
    KeySpec {
        key: "auth.issuer_url",
        env: "CCM_AUTH__ISSUER_URL",
        flag: "--auth-issuer-url",
        kind: KeyKind::Text,
    },
    KeySpec {
        key: "auth.audiences",
        env: "CCM_AUTH__AUDIENCES",
        flag: "--auth-audiences",
        kind: KeyKind::List,
    },
    KeySpec {
        key: "auth.jwks_url",
        env: "CCM_AUTH__JWKS_URL",
        flag: "--auth-jwks-url",
        kind: KeyKind::Text,
    },
    KeySpec {
        key: "auth.insecure_no_auth",
        env: "CCM_AUTH__INSECURE_NO_AUTH",
        flag: "--insecure-no-auth",
        kind: KeyKind::Bool,
    },
    KeySpec {
        key: "cloudevents.sink_url",
        env: "CCM_CLOUDEVENTS__SINK_URL",
        flag: "--cloudevents-sink-url",
        kind: KeyKind::Text,
    },
    KeySpec {
        key: "cloudevents.source",
        env: "CCM_CLOUDEVENTS__SOURCE",
        flag: "--cloudevents-source",
        kind: KeyKind::Text,
    },
    KeySpec {
        key: "telemetry.log_format",
        env: "CCM_TELEMETRY__LOG_FORMAT",
        flag: "--telemetry-log-format",
        kind: KeyKind::Choice(LOG_FORMATS),
    },
    KeySpec {
        key: "telemetry.otlp_endpoint",
        env: "CCM_TELEMETRY__OTLP_ENDPOINT",
        flag: "--telemetry-otlp-endpoint",
        kind: KeyKind::Text,
    },
    KeySpec {
        key: "audit.retention",
        env: "CCM_AUDIT__RETENTION",
        flag: "--audit-retention",
        kind: KeyKind::Duration,
    },
    KeySpec {
        key: "audit.scaling_retention",
        env: "CCM_AUDIT__SCALING_RETENTION",
        flag: "--audit-scaling-retention",
        kind: KeyKind::Duration,
    },
    KeySpec {
        key: "audit.purge_interval",
        env: "CCM_AUDIT__PURGE_INTERVAL",
        flag: "--audit-purge-interval",
        kind: KeyKind::Duration,
    },
];

/// The sections (TOML tables) of the configuration.
pub const SECTIONS: &[&str] = &[
    "store",
    "coordination",
    "auth",
    "cloudevents",
    "telemetry",
    "audit",
];

fn spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.key == key)
}

// ---------------------------------------------------------------------------------------------
// Command-line flags
// ---------------------------------------------------------------------------------------------

/// The control plane's command-line flags, for `ccm serve control-plane` to flatten
/// (`#[command(flatten)]`). Every flag overrides the file and the environment; see
/// `docs/configuration.md`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ControlPlaneArgs {
    /// Configuration file (TOML); default: $CCM_CONFIG, else none.
    #[arg(long = "config", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long = "listen-addr", value_name = "HOST:PORT")]
    pub listen_addr: Option<String>,
    /// Data directory [default: ccm-data].
    #[arg(long = "data-dir", value_name = "DIR")]
    pub data_dir: Option<String>,
    /// Time until a call's response starts, e.g. 30s [default: 30s].
    #[arg(long = "request-timeout", value_name = "DURATION")]
    pub request_timeout: Option<String>,
    /// Application calls handled at once [default: 256].
    #[arg(long = "concurrency-limit", value_name = "N")]
    pub concurrency_limit: Option<String>,
    /// Largest gRPC message, e.g. 8MiB [default: 8MiB].
    #[arg(long = "max-message-size", value_name = "SIZE")]
    pub max_message_size: Option<String>,
    /// Time in-flight calls get at shutdown [default: 30s].
    #[arg(long = "shutdown-grace-period", value_name = "DURATION")]
    pub shutdown_grace_period: Option<String>,
    /// Worker templates YAML to seed at startup (missing ones are created, none changed).
    #[arg(long = "templates-seed-file", value_name = "PATH")]
    pub templates_seed_file: Option<String>,
    /// State store: sqlite or mongodb [default: sqlite].
    #[arg(long = "store-backend", value_name = "BACKEND")]
    pub store_backend: Option<String>,
    /// SQLite database file [default: DATA_DIR/ccm.sqlite3].
    #[arg(long = "store-sqlite-path", value_name = "PATH")]
    pub store_sqlite_path: Option<String>,
    /// MongoDB connection string (secret; prefer the environment).
    #[arg(long = "store-mongodb-uri", value_name = "URI")]
    pub store_mongodb_uri: Option<String>,
    /// MongoDB database [default: ccm].
    #[arg(long = "store-mongodb-database", value_name = "NAME")]
    pub store_mongodb_database: Option<String>,
    /// Coordination: in-process or etcd [default: in-process].
    #[arg(long = "coordination-backend", value_name = "BACKEND")]
    pub coordination_backend: Option<String>,
    /// etcd endpoints, comma-separated [default: http://127.0.0.1:2379].
    #[arg(long = "coordination-etcd-endpoints", value_name = "URLS")]
    pub coordination_etcd_endpoints: Option<String>,
    /// etcd key prefix [default: /ccm].
    #[arg(long = "coordination-etcd-prefix", value_name = "PREFIX")]
    pub coordination_etcd_prefix: Option<String>,
    /// Leader lease TTL [default: 10s].
    #[arg(long = "coordination-lease-ttl", value_name = "DURATION")]
    pub coordination_lease_ttl: Option<String>,
    /// OIDC issuer URL (required unless --insecure-no-auth).
    #[arg(long = "auth-issuer-url", value_name = "URL")]
    pub auth_issuer_url: Option<String>,
    /// Accepted token audiences, comma-separated [default: ccm].
    #[arg(long = "auth-audiences", value_name = "AUDIENCES")]
    pub auth_audiences: Option<String>,
    /// JWKS URL overriding OIDC discovery.
    #[arg(long = "auth-jwks-url", value_name = "URL")]
    pub auth_jwks_url: Option<String>,
    /// Serve WITHOUT authentication (development and tests only).
    #[arg(long = "insecure-no-auth")]
    pub insecure_no_auth: bool,
    /// CloudEvents sink URL (none: no events are emitted).
    #[arg(long = "cloudevents-sink-url", value_name = "URL")]
    pub cloudevents_sink_url: Option<String>,
    /// CloudEvents source attribute [default: ccm/control-plane].
    #[arg(long = "cloudevents-source", value_name = "SOURCE")]
    pub cloudevents_source: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long = "telemetry-log-format", value_name = "FORMAT")]
    pub telemetry_log_format: Option<String>,
    /// OTLP endpoint for traces (none: no export).
    #[arg(long = "telemetry-otlp-endpoint", value_name = "URL")]
    pub telemetry_otlp_endpoint: Option<String>,
    /// Address of the /metrics listener, or none [default: 127.0.0.1:9464].
    #[arg(long = "metrics-addr", value_name = "HOST:PORT|none")]
    pub metrics_addr: Option<String>,
    /// Audit records older than this are purged, e.g. 2160h [default: 8760h = 365 days].
    #[arg(long = "audit-retention", value_name = "DURATION")]
    pub audit_retention: Option<String>,
    /// Scaling decisions older than this are purged [default: 8760h = 365 days].
    #[arg(long = "audit-scaling-retention", value_name = "DURATION")]
    pub audit_scaling_retention: Option<String>,
    /// Time between two purges of the audit and scaling logs [default: 1h].
    #[arg(long = "audit-purge-interval", value_name = "DURATION")]
    pub audit_purge_interval: Option<String>,
}

impl ControlPlaneArgs {
    /// The flags that were given, as `(key, value)` pairs.
    fn values(&self) -> Vec<(&'static str, String)> {
        let text = [
            ("listen_addr", &self.listen_addr),
            ("data_dir", &self.data_dir),
            ("request_timeout", &self.request_timeout),
            ("concurrency_limit", &self.concurrency_limit),
            ("max_message_size", &self.max_message_size),
            ("shutdown_grace_period", &self.shutdown_grace_period),
            ("templates_seed_file", &self.templates_seed_file),
            ("store.backend", &self.store_backend),
            ("store.sqlite_path", &self.store_sqlite_path),
            ("store.mongodb_uri", &self.store_mongodb_uri),
            ("store.mongodb_database", &self.store_mongodb_database),
            ("coordination.backend", &self.coordination_backend),
            (
                "coordination.etcd_endpoints",
                &self.coordination_etcd_endpoints,
            ),
            ("coordination.etcd_prefix", &self.coordination_etcd_prefix),
            ("coordination.lease_ttl", &self.coordination_lease_ttl),
            ("auth.issuer_url", &self.auth_issuer_url),
            ("auth.audiences", &self.auth_audiences),
            ("auth.jwks_url", &self.auth_jwks_url),
            ("cloudevents.sink_url", &self.cloudevents_sink_url),
            ("cloudevents.source", &self.cloudevents_source),
            ("telemetry.log_format", &self.telemetry_log_format),
            ("telemetry.otlp_endpoint", &self.telemetry_otlp_endpoint),
            ("metrics_addr", &self.metrics_addr),
            ("audit.retention", &self.audit_retention),
            ("audit.scaling_retention", &self.audit_scaling_retention),
            ("audit.purge_interval", &self.audit_purge_interval),
        ];
        let mut out: Vec<(&'static str, String)> = text
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
            .collect();
        if self.insecure_no_auth {
            out.push(("auth.insecure_no_auth", "true".to_owned()));
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// A raw value before it is parsed for its key.
#[derive(Debug, Clone)]
enum Raw {
    /// From the TOML file, typed.
    Toml(toml::Value),
    /// From the environment or a flag, text.
    Text(String),
}

/// Builds a [`ControlPlaneConfig`] from its layers.
#[derive(Debug, Clone, Default)]
pub struct ConfigLoader {
    file: Option<PathBuf>,
    file_text: Option<(PathBuf, String)>,
    env: Vec<(String, String)>,
    args: ControlPlaneArgs,
}

impl ConfigLoader {
    /// No file, no environment, no flags: the defaults.
    pub fn new() -> Self {
        ConfigLoader::default()
    }

    /// Reads the TOML file at `path`.
    #[must_use]
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// Uses `text` as the TOML file, reported as `path` in errors (tests, embedded configs).
    #[must_use]
    pub fn file_text(mut self, path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        self.file_text = Some((path.into(), text.into()));
        self
    }

    /// Uses these environment variables (only `CCM_*` ones are read).
    #[must_use]
    pub fn env<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.env = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// Uses the process environment.
    #[must_use]
    pub fn process_env(self) -> Self {
        let vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        self.env(vars)
    }

    /// Uses these flags (and their `--config`, which wins over [`ConfigLoader::file`] and
    /// `CCM_CONFIG`).
    #[must_use]
    pub fn args(mut self, args: &ControlPlaneArgs) -> Self {
        self.args = args.clone();
        self
    }

    /// Merges the layers, parses and validates every value.
    pub fn load(self) -> Result<ControlPlaneConfig, ControlPlaneError> {
        let mut values: BTreeMap<&'static str, (Raw, ConfigSource)> = BTreeMap::new();

        // Layer 2: the file.
        let file = self.args.config.clone().or(self.file.clone()).or_else(|| {
            self.env
                .iter()
                .find(|(k, _)| k == CONFIG_FILE_ENV)
                .map(|(_, v)| PathBuf::from(v))
        });
        let file_text = match (self.args.config.is_some(), &self.file_text, file) {
            (false, Some((path, text)), _) => Some((path.clone(), text.clone())),
            (_, _, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|source| {
                    ControlPlaneError::ConfigRead {
                        path: path.clone(),
                        source,
                    }
                })?;
                Some((path, text))
            }
            _ => None,
        };
        if let Some((path, text)) = file_text {
            read_toml(&path, &text, &mut values)?;
        }

        // Layer 3: the environment.
        let sections: Vec<String> = SECTIONS
            .iter()
            .map(|s| format!("{ENV_PREFIX}{}__", s.to_ascii_uppercase()))
            .collect();
        for (name, value) in &self.env {
            if let Some(spec) = KEYS.iter().find(|k| k.env == name) {
                values.insert(
                    spec.key,
                    (Raw::Text(value.clone()), ConfigSource::Env(name.clone())),
                );
            } else if sections.iter().any(|s| name.starts_with(s.as_str())) {
                return Err(ControlPlaneError::InvalidConfig {
                    key: name.clone(),
                    source_name: format!("environment variable {name}"),
                    message: format!(
                        "unknown configuration variable; known ones are: {}",
                        KEYS.iter().map(|k| k.env).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }

        // Layer 4: the flags.
        for (key, value) in self.args.values() {
            let flag = spec(key).map_or(key, |s| s.flag);
            values.insert(key, (Raw::Text(value), ConfigSource::Flag(flag.to_owned())));
        }

        let config = resolve(&values)?;
        config.validate()?;
        Ok(config)
    }
}

fn read_toml(
    path: &Path,
    text: &str,
    values: &mut BTreeMap<&'static str, (Raw, ConfigSource)>,
) -> Result<(), ControlPlaneError> {
    let table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ControlPlaneError::ConfigSyntax {
                path: path.to_owned(),
                message: e.to_string().trim().to_owned(),
            })?;
    let mut unknown = Vec::new();
    let mut found = Vec::new();
    for (name, value) in &table {
        match value {
            toml::Value::Table(section) if SECTIONS.contains(&name.as_str()) => {
                for (inner, value) in section {
                    let dotted = format!("{name}.{inner}");
                    match spec(&dotted) {
                        Some(s) => found.push((s.key, value.clone())),
                        None => unknown.push(dotted),
                    }
                }
            }
            _ => match spec(name) {
                Some(s) => found.push((s.key, value.clone())),
                None => unknown.push(name.clone()),
            },
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(ControlPlaneError::UnknownConfigKeys {
            path: path.to_owned(),
            keys: unknown,
        });
    }
    for (key, value) in found {
        values.insert(key, (Raw::Toml(value), ConfigSource::File(path.to_owned())));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parsing values
// ---------------------------------------------------------------------------------------------

/// Parses a duration: one or more `<integer><unit>` with units `h`, `m`, `s`, `ms`
/// (`30s`, `500ms`, `1m30s`, `2h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; write e.g. 30s, 500ms, 5m or 1h30m".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}: expected a number at {rest:?}; write e.g. 30s, 500ms, \
                 5m or 1h30m"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "s" => Some(Duration::from_secs(n)),
            "ms" => Some(Duration::from_millis(n)),
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: missing unit after {n} (use h, m, s or ms)"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use h, m, s or ms)"
                ));
            }
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| format!("invalid duration {text:?}: too large"))?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it (`1h30m`, `500ms`, `0s`).
pub fn format_duration(d: Duration) -> String {
    let mut out = String::new();
    let total_ms = d.as_millis();
    let (h, rem) = (total_ms / 3_600_000, total_ms % 3_600_000);
    let (m, rem) = (rem / 60_000, rem % 60_000);
    let (s, ms) = (rem / 1000, rem % 1000);
    for (value, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
        if value > 0 {
            out.push_str(&format!("{value}{unit}"));
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// Parses a byte size: an integer (bytes) or an integer with `KiB`, `MiB` or `GiB`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let s = text.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!(
            "invalid size {text:?}: write a number of bytes or e.g. 512KiB, 8MiB, 1GiB"
        ));
    }
    let n: usize = s[..digits]
        .parse()
        .map_err(|_| format!("invalid size {text:?}: number too large"))?;
    let factor: usize = match s[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        "GiB" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {other:?} (use KiB, MiB or GiB)"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

/// Formats a byte size the way [`parse_size`] reads it (`8MiB`, `1000`).
pub fn format_size(n: usize) -> String {
    const GIB: usize = 1024 * 1024 * 1024;
    const MIB: usize = 1024 * 1024;
    const KIB: usize = 1024;
    if n > 0 && n.is_multiple_of(GIB) {
        format!("{}GiB", n / GIB)
    } else if n > 0 && n.is_multiple_of(MIB) {
        format!("{}MiB", n / MIB)
    } else if n > 0 && n.is_multiple_of(KIB) {
        format!("{}KiB", n / KIB)
    } else {
        n.to_string()
    }
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("invalid boolean {text:?}: use true or false")),
    }
}

fn toml_type(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// The string form of a raw value of a string-typed key.
fn raw_text(raw: &Raw, what: &str) -> Result<String, String> {
    match raw {
        Raw::Text(s) => Ok(s.clone()),
        Raw::Toml(toml::Value::String(s)) => Ok(s.clone()),
        Raw::Toml(other) => Err(format!("expected {what}, found {}", toml_type(other))),
    }
}

/// The values parsed from the layers, with errors that name key and source.
struct Resolver<'a> {
    values: &'a BTreeMap<&'static str, (Raw, ConfigSource)>,
    sources: BTreeMap<&'static str, ConfigSource>,
}

impl Resolver<'_> {
    /// The value of `key` parsed with `parse`, or `None` when no layer set it.
    fn get<T>(
        &mut self,
        key: &'static str,
        parse: impl FnOnce(&Raw) -> Result<T, String>,
    ) -> Result<Option<T>, ControlPlaneError> {
        match self.values.get(key) {
            None => Ok(None),
            Some((raw, source)) => match parse(raw) {
                Ok(value) => {
                    self.sources.insert(key, source.clone());
                    Ok(Some(value))
                }
                Err(message) => Err(ControlPlaneError::InvalidConfig {
                    key: key.to_owned(),
                    source_name: source.to_string(),
                    message,
                }),
            },
        }
    }

    fn text(&mut self, key: &'static str) -> Result<Option<String>, ControlPlaneError> {
        self.get(key, |raw| raw_text(raw, "a string"))
    }

    fn duration(&mut self, key: &'static str) -> Result<Option<Duration>, ControlPlaneError> {
        self.get(key, |raw| {
            parse_duration(&raw_text(raw, "a duration string such as \"30s\"")?)
        })
    }

    fn count(&mut self, key: &'static str) -> Result<Option<usize>, ControlPlaneError> {
        self.get(key, |raw| match raw {
            Raw::Toml(toml::Value::Integer(n)) => {
                usize::try_from(*n).map_err(|_| format!("must not be negative, got {n}"))
            }
            Raw::Toml(other) => Err(format!("expected an integer, found {}", toml_type(other))),
            Raw::Text(s) => s
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("invalid count {s:?}: expected a non-negative integer")),
        })
    }

    fn size(&mut self, key: &'static str) -> Result<Option<usize>, ControlPlaneError> {
        self.get(key, |raw| match raw {
            Raw::Toml(toml::Value::Integer(n)) => {
                usize::try_from(*n).map_err(|_| format!("must not be negative, got {n}"))
            }
            Raw::Toml(toml::Value::String(s)) | Raw::Text(s) => parse_size(s),
            Raw::Toml(other) => Err(format!(
                "expected a size (integer or \"8MiB\"), found {}",
                toml_type(other)
            )),
        })
    }

    fn boolean(&mut self, key: &'static str) -> Result<Option<bool>, ControlPlaneError> {
        self.get(key, |raw| match raw {
            Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Raw::Toml(other) => Err(format!("expected a boolean, found {}", toml_type(other))),
            Raw::Text(s) => parse_bool(s),
        })
    }

    fn list(&mut self, key: &'static str) -> Result<Option<Vec<String>>, ControlPlaneError> {
        self.get(key, |raw| match raw {
            Raw::Toml(toml::Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(format!(
                        "expected an array of strings, found {} in it",
                        toml_type(other)
                    )),
                })
                .collect(),
            Raw::Toml(other) => Err(format!(
                "expected an array of strings, found {}",
                toml_type(other)
            )),
            Raw::Text(s) => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()),
        })
    }

    fn choice(
        &mut self,
        key: &'static str,
        choices: &'static [&'static str],
    ) -> Result<Option<&'static str>, ControlPlaneError> {
        self.get(key, |raw| {
            let text = raw_text(raw, "a string")?;
            choices
                .iter()
                .copied()
                .find(|c| *c == text.trim())
                .ok_or_else(|| format!("{text:?} is not one of: {}", choices.join(", ")))
        })
    }

    fn source(&self, key: &str) -> String {
        self.values
            .get(key)
            .map_or_else(|| ConfigSource::Default.to_string(), |(_, s)| s.to_string())
    }

    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ControlPlaneError {
        ControlPlaneError::InvalidConfig {
            key: key.to_owned(),
            source_name: self.source(key),
            message: message.into(),
        }
    }
}

fn resolve(
    values: &BTreeMap<&'static str, (Raw, ConfigSource)>,
) -> Result<ControlPlaneConfig, ControlPlaneError> {
    let mut r = Resolver {
        values,
        sources: BTreeMap::new(),
    };
    let d = ControlPlaneConfig::default();

    let listen_addr = match r.get("listen_addr", |raw| {
        let text = raw_text(raw, "an address such as \"127.0.0.1:50051\"")?;
        text.trim().parse::<SocketAddr>().map_err(|_| {
            format!("invalid address {text:?}: expected host:port with an IP, e.g. 0.0.0.0:50051")
        })
    })? {
        Some(a) => a,
        None => d.listen_addr,
    };
    let data_dir = r.text("data_dir")?.map(PathBuf::from).unwrap_or(d.data_dir);
    let request_timeout = r.duration("request_timeout")?.unwrap_or(d.request_timeout);
    let concurrency_limit = r.count("concurrency_limit")?.unwrap_or(d.concurrency_limit);
    let max_message_size = r.size("max_message_size")?.unwrap_or(d.max_message_size);
    let shutdown_grace_period = r
        .duration("shutdown_grace_period")?
        .unwrap_or(d.shutdown_grace_period);
    let templates_seed_file = r
        .text("templates_seed_file")?
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);

    let store_backend = r
        .choice("store.backend", STORE_BACKENDS)?
        .unwrap_or("sqlite");
    let sqlite_path = r.text("store.sqlite_path")?;
    let mongodb_uri = r.text("store.mongodb_uri")?;
    let mongodb_database = r.text("store.mongodb_database")?;
    let store = match store_backend {
        "mongodb" => StoreConfig::MongoDb {
            uri: Secret::new(mongodb_uri.ok_or_else(|| {
                r.invalid(
                    "store.mongodb_uri",
                    "is required when store.backend is \"mongodb\" \
                     (set CCM_STORE__MONGODB_URI)",
                )
            })?),
            database: mongodb_database.unwrap_or_else(|| DEFAULT_MONGODB_DATABASE.to_owned()),
        },
        _ => StoreConfig::Sqlite {
            path: sqlite_path
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join(DEFAULT_SQLITE_FILE)),
        },
    };

    let coordination_backend = r
        .choice("coordination.backend", COORDINATION_BACKENDS)?
        .unwrap_or("in-process");
    let endpoints = r.list("coordination.etcd_endpoints")?;
    let prefix = r.text("coordination.etcd_prefix")?;
    let lease_ttl = r
        .duration("coordination.lease_ttl")?
        .unwrap_or(DEFAULT_LEASE_TTL);
    let backend = match coordination_backend {
        "etcd" => CoordinationBackend::Etcd {
            endpoints: endpoints.unwrap_or_else(|| vec![DEFAULT_ETCD_ENDPOINT.to_owned()]),
            prefix: prefix.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_owned()),
        },
        _ => CoordinationBackend::InProcess,
    };

    let auth = AuthConfig {
        issuer_url: r.text("auth.issuer_url")?.filter(|s| !s.is_empty()),
        audiences: r.list("auth.audiences")?.unwrap_or(d.auth.audiences),
        jwks_url: r.text("auth.jwks_url")?.filter(|s| !s.is_empty()),
        insecure_no_auth: r.boolean("auth.insecure_no_auth")?.unwrap_or(false),
    };
    let cloudevents = CloudEventsConfig {
        sink_url: r.text("cloudevents.sink_url")?.filter(|s| !s.is_empty()),
        source: r
            .text("cloudevents.source")?
            .unwrap_or(d.cloudevents.source),
    };
    let telemetry = TelemetryConfig {
        log_format: match r.choice("telemetry.log_format", LOG_FORMATS)? {
            Some("json") => LogFormat::Json,
            _ => LogFormat::Text,
        },
        otlp_endpoint: r.text("telemetry.otlp_endpoint")?.filter(|s| !s.is_empty()),
    };
    let metrics_addr = match r.get("metrics_addr", |raw| {
        let text = raw_text(raw, "an address such as \"127.0.0.1:9464\", or \"none\"")?;
        let trimmed = text.trim();
        if METRICS_ADDR_OFF.contains(&trimmed.to_ascii_lowercase().as_str()) {
            return Ok(None);
        }
        trimmed.parse::<SocketAddr>().map(Some).map_err(|_| {
            format!(
                "invalid address {text:?}: expected host:port with an IP, e.g. 0.0.0.0:9464, \
                 or \"none\" to serve no metrics"
            )
        })
    })? {
        Some(a) => a,
        None => d.metrics_addr,
    };
    let audit = AuditConfig {
        retention: r.duration("audit.retention")?.unwrap_or(d.audit.retention),
        scaling_retention: r
            .duration("audit.scaling_retention")?
            .unwrap_or(d.audit.scaling_retention),
        purge_interval: r
            .duration("audit.purge_interval")?
            .unwrap_or(d.audit.purge_interval),
    };

    Ok(ControlPlaneConfig {
        listen_addr,
        data_dir,
        store,
        coordination: CoordinationConfig { backend, lease_ttl },
        auth,
        cloudevents,
        request_timeout,
        concurrency_limit,
        max_message_size,
        shutdown_grace_period,
        templates_seed_file,
        telemetry,
        metrics_addr,
        audit,
        sources: r.sources,
    })
}

// ---------------------------------------------------------------------------------------------
// Validation and printing
// ---------------------------------------------------------------------------------------------

fn url_problem(url: &str, allow_http: bool) -> Option<String> {
    let policy = if allow_http {
        crate::validate::UriPolicy::HTTP_OR_HTTPS
    } else {
        crate::validate::UriPolicy::HTTPS_ONLY
    };
    crate::validate::uri_check(url, policy).err()
}

fn is_loopback_url(url: &str) -> bool {
    let Some(rest) = url.split_once("://").map(|(_, r)| r) else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Replaces the password of `scheme://user:password@host/…` with [`REDACTED`].
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:{REDACTED}@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_owned(),
    }
}

impl ControlPlaneConfig {
    /// Loads the configuration for `ccm serve control-plane`: the file from `--config` or
    /// `CCM_CONFIG`, the process environment, and `args`.
    pub fn load(args: &ControlPlaneArgs) -> Result<Self, ControlPlaneError> {
        ConfigLoader::new().process_env().args(args).load()
    }

    /// Where the value of `key` came from (dotted key, e.g. `store.sqlite_path`).
    pub fn source_of(&self, key: &str) -> ConfigSource {
        self.sources
            .get(key)
            .cloned()
            .unwrap_or(ConfigSource::Default)
    }

    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ControlPlaneError {
        ControlPlaneError::InvalidConfig {
            key: key.to_owned(),
            source_name: self.source_of(key).to_string(),
            message: message.into(),
        }
    }

    /// Checks every value and the rules between them. [`ConfigLoader::load`] calls it; call it
    /// yourself on a configuration built in code.
    pub fn validate(&self) -> Result<(), ControlPlaneError> {
        if self.request_timeout.is_zero() || self.request_timeout > MAX_REQUEST_TIMEOUT {
            return Err(self.invalid(
                "request_timeout",
                format!(
                    "must be more than 0 and at most {}",
                    format_duration(MAX_REQUEST_TIMEOUT)
                ),
            ));
        }
        if self.concurrency_limit == 0 || self.concurrency_limit > MAX_CONCURRENCY_LIMIT {
            return Err(self.invalid(
                "concurrency_limit",
                format!("must be in 1..={MAX_CONCURRENCY_LIMIT}"),
            ));
        }
        if !(MIN_MAX_MESSAGE_SIZE..=MAX_MAX_MESSAGE_SIZE).contains(&self.max_message_size) {
            return Err(self.invalid(
                "max_message_size",
                format!(
                    "must be between {} and {}",
                    format_size(MIN_MAX_MESSAGE_SIZE),
                    format_size(MAX_MAX_MESSAGE_SIZE)
                ),
            ));
        }
        if self.shutdown_grace_period > MAX_SHUTDOWN_GRACE_PERIOD {
            return Err(self.invalid(
                "shutdown_grace_period",
                format!(
                    "must be at most {}",
                    format_duration(MAX_SHUTDOWN_GRACE_PERIOD)
                ),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(self.invalid("data_dir", "must not be empty"));
        }
        match &self.store {
            StoreConfig::Sqlite { path } => {
                if path.as_os_str().is_empty() {
                    return Err(self.invalid("store.sqlite_path", "must not be empty"));
                }
            }
            StoreConfig::MongoDb { uri, database } => {
                let text = uri.expose();
                if !(text.starts_with("mongodb://") || text.starts_with("mongodb+srv://")) {
                    return Err(self.invalid(
                        "store.mongodb_uri",
                        format!(
                            "must start with mongodb:// or mongodb+srv://, got {}",
                            redact_url(text)
                        ),
                    ));
                }
                if database.is_empty()
                    || database.len() > 63
                    || database
                        .chars()
                        .any(|c| "/\\. \"$".contains(c) || c.is_control())
                {
                    return Err(self.invalid(
                        "store.mongodb_database",
                        "must be 1..63 characters without / \\ . space \" $",
                    ));
                }
            }
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.coordination.lease_ttl) {
            return Err(self.invalid(
                "coordination.lease_ttl",
                format!(
                    "must be between {} and {}",
                    format_duration(MIN_LEASE_TTL),
                    format_duration(MAX_LEASE_TTL)
                ),
            ));
        }
        if let CoordinationBackend::Etcd { endpoints, prefix } = &self.coordination.backend {
            if endpoints.is_empty() {
                return Err(self.invalid(
                    "coordination.etcd_endpoints",
                    "must list at least one endpoint when coordination.backend is \"etcd\"",
                ));
            }
            for endpoint in endpoints {
                if let Some(why) = url_problem(endpoint, true) {
                    return Err(self.invalid(
                        "coordination.etcd_endpoints",
                        format!("endpoint {endpoint:?} {why}"),
                    ));
                }
            }
            if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
                return Err(self.invalid(
                    "coordination.etcd_prefix",
                    format!("must look like /ccm (leading '/', no trailing '/'), got {prefix:?}"),
                ));
            }
        }
        match (&self.auth.issuer_url, self.auth.insecure_no_auth) {
            (None, false) => {
                return Err(ControlPlaneError::ConfigConflict {
                    message: "auth.issuer_url is not set: set it to your OIDC issuer (e.g. \
                              CCM_AUTH__ISSUER_URL=https://keycloak.example/realms/ccm), or \
                              serve without authentication with --insecure-no-auth \
                              (development only)"
                        .into(),
                });
            }
            (Some(_), true) => {
                return Err(ControlPlaneError::ConfigConflict {
                    message: format!(
                        "auth.insecure_no_auth (from {}) and auth.issuer_url (from {}) are both \
                         set; choose one",
                        self.source_of("auth.insecure_no_auth"),
                        self.source_of("auth.issuer_url")
                    ),
                });
            }
            (Some(issuer), false) => {
                let allow_http = is_loopback_url(issuer);
                if let Some(why) = url_problem(issuer, allow_http) {
                    return Err(self.invalid(
                        "auth.issuer_url",
                        format!("{why} (plain http is accepted for loopback issuers only)"),
                    ));
                }
                if self.auth.audiences.is_empty() {
                    return Err(self.invalid("auth.audiences", "must list at least one audience"));
                }
            }
            (None, true) => {}
        }
        if let Some(jwks) = &self.auth.jwks_url
            && let Some(why) = url_problem(jwks, is_loopback_url(jwks))
        {
            return Err(self.invalid(
                "auth.jwks_url",
                format!("{why} (plain http is accepted for loopback URLs only)"),
            ));
        }
        if let Some(sink) = &self.cloudevents.sink_url
            && let Some(why) = url_problem(sink, true)
        {
            return Err(self.invalid("cloudevents.sink_url", why));
        }
        if self.cloudevents.source.trim().is_empty() {
            return Err(self.invalid("cloudevents.source", "must not be empty"));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && let Some(why) = url_problem(endpoint, true)
        {
            return Err(self.invalid("telemetry.otlp_endpoint", why));
        }
        if let Some(metrics) = self.metrics_addr
            && metrics == self.listen_addr
            && metrics.port() != 0
        {
            return Err(ControlPlaneError::ConfigConflict {
                message: format!(
                    "metrics_addr (from {}) and listen_addr (from {}) are both {metrics}; give \
                     /metrics its own port",
                    self.source_of("metrics_addr"),
                    self.source_of("listen_addr")
                ),
            });
        }
        for (key, value, min, max) in [
            (
                "audit.retention",
                self.audit.retention,
                MIN_AUDIT_RETENTION,
                MAX_AUDIT_RETENTION,
            ),
            (
                "audit.scaling_retention",
                self.audit.scaling_retention,
                MIN_SCALING_RETENTION,
                MAX_SCALING_RETENTION,
            ),
            (
                "audit.purge_interval",
                self.audit.purge_interval,
                MIN_AUDIT_PURGE_INTERVAL,
                MAX_AUDIT_PURGE_INTERVAL,
            ),
        ] {
            if !(min..=max).contains(&value) {
                return Err(self.invalid(
                    key,
                    format!(
                        "must be between {} and {}, got {}",
                        format_duration(min),
                        format_duration(max),
                        format_duration(value)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Things an operator must hear about loudly (log them at start-up): running without
    /// authentication, especially on a non-loopback address.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.auth.insecure_no_auth {
            if self.listen_addr.ip().is_loopback() {
                out.push(format!(
                    "AUTHENTICATION IS DISABLED (auth.insecure_no_auth from {}): every caller \
                     is an anonymous admin; listening on loopback {} only",
                    self.source_of("auth.insecure_no_auth"),
                    self.listen_addr
                ));
            } else {
                out.push(format!(
                    "AUTHENTICATION IS DISABLED (auth.insecure_no_auth from {}) AND THE SERVER \
                     LISTENS ON {}, WHICH IS NOT LOOPBACK: anyone who can reach it is admin",
                    self.source_of("auth.insecure_no_auth"),
                    self.listen_addr
                ));
            }
        }
        out
    }

    /// The effective configuration as TOML, each value commented with its source; secrets
    /// (passwords in URLs) are redacted. Keys of the backends not in use are omitted. Reading
    /// the output back gives the same configuration (apart from redacted secrets).
    pub fn effective_toml(&self) -> String {
        let mut lines: Vec<(&'static str, toml::Value)> = vec![
            (
                "listen_addr",
                toml::Value::String(self.listen_addr.to_string()),
            ),
            ("data_dir", path_value(&self.data_dir)),
            (
                "request_timeout",
                toml::Value::String(format_duration(self.request_timeout)),
            ),
            (
                "concurrency_limit",
                toml::Value::Integer(i64::try_from(self.concurrency_limit).unwrap_or(i64::MAX)),
            ),
            (
                "max_message_size",
                toml::Value::String(format_size(self.max_message_size)),
            ),
            (
                "shutdown_grace_period",
                toml::Value::String(format_duration(self.shutdown_grace_period)),
            ),
        ];
        if let Some(path) = &self.templates_seed_file {
            lines.push((
                "templates_seed_file",
                toml::Value::String(path.display().to_string()),
            ));
        }
        lines.push((
            "metrics_addr",
            toml::Value::String(
                self.metrics_addr
                    .map_or_else(|| "none".to_owned(), |a| a.to_string()),
            ),
        ));
        match &self.store {
            StoreConfig::Sqlite { path } => {
                lines.push(("store.backend", toml::Value::String("sqlite".into())));
                lines.push(("store.sqlite_path", path_value(path)));
            }
            StoreConfig::MongoDb { uri, database } => {
                lines.push(("store.backend", toml::Value::String("mongodb".into())));
                lines.push((
                    "store.mongodb_uri",
                    toml::Value::String(redact_url(uri.expose())),
                ));
                lines.push((
                    "store.mongodb_database",
                    toml::Value::String(database.clone()),
                ));
            }
        }
        match &self.coordination.backend {
            CoordinationBackend::InProcess => {
                lines.push((
                    "coordination.backend",
                    toml::Value::String("in-process".into()),
                ));
            }
            CoordinationBackend::Etcd { endpoints, prefix } => {
                lines.push(("coordination.backend", toml::Value::String("etcd".into())));
                lines.push(("coordination.etcd_endpoints", string_array(endpoints)));
                lines.push((
                    "coordination.etcd_prefix",
                    toml::Value::String(prefix.clone()),
                ));
            }
        }
        lines.push((
            "coordination.lease_ttl",
            toml::Value::String(format_duration(self.coordination.lease_ttl)),
        ));
        if let Some(issuer) = &self.auth.issuer_url {
            lines.push(("auth.issuer_url", toml::Value::String(redact_url(issuer))));
        }
        lines.push(("auth.audiences", string_array(&self.auth.audiences)));
        if let Some(jwks) = &self.auth.jwks_url {
            lines.push(("auth.jwks_url", toml::Value::String(redact_url(jwks))));
        }
        lines.push((
            "auth.insecure_no_auth",
            toml::Value::Boolean(self.auth.insecure_no_auth),
        ));
        if let Some(sink) = &self.cloudevents.sink_url {
            lines.push((
                "cloudevents.sink_url",
                toml::Value::String(redact_url(sink)),
            ));
        }
        lines.push((
            "cloudevents.source",
            toml::Value::String(self.cloudevents.source.clone()),
        ));
        lines.push((
            "telemetry.log_format",
            toml::Value::String(self.telemetry.log_format.as_str().into()),
        ));
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            lines.push((
                "telemetry.otlp_endpoint",
                toml::Value::String(redact_url(endpoint)),
            ));
        }
        for (key, value) in [
            ("audit.retention", self.audit.retention),
            ("audit.scaling_retention", self.audit.scaling_retention),
            ("audit.purge_interval", self.audit.purge_interval),
        ] {
            lines.push((key, toml::Value::String(format_duration(value))));
        }

        let mut out = String::from(
            "# ccm control-plane: effective configuration (secrets redacted).\n\
             # Each value is followed by where it came from.\n",
        );
        let mut section = "";
        for (key, value) in lines {
            let (sec, name) = key.split_once('.').unwrap_or(("", key));
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            }
            out.push_str(&format!("{name} = {value}  # {}\n", self.source_of(key)));
        }
        out
    }
}

fn path_value(path: &Path) -> toml::Value {
    toml::Value::String(path.to_string_lossy().into_owned())
}

fn string_array(items: &[String]) -> toml::Value {
    toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect())
}

impl From<&ControlPlaneConfig> for ccm_runtime::ServerSettings {
    fn from(c: &ControlPlaneConfig) -> Self {
        ccm_runtime::ServerSettings {
            listen_addr: c.listen_addr,
            request_timeout: c.request_timeout,
            concurrency_limit: c.concurrency_limit,
            max_message_size: c.max_message_size,
            shutdown_grace_period: c.shutdown_grace_period,
        }
    }
}
