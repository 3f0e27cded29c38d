//! The scheduler's settings, their defaults, and the `ccm serve scheduler` flags.

use std::net::SocketAddr;
use std::time::Duration;

use ccm_control_plane::config::parse_duration;

use crate::error::SchedulerError;

/// Where the control plane listens by default.
pub const DEFAULT_CONTROL_PLANE_URL: &str = "http://127.0.0.1:50051";
/// Where the scheduler's own gRPC API (SchedulerService, health, reflection) listens by default.
pub const DEFAULT_LISTEN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50052);
/// The election the scheduler replicas campaign in; also the role of its fences.
pub const DEFAULT_ELECTION: &str = "scheduler";
/// Lease TTL of the leadership (ARCHITECTURE §4: "TTL ~10 s"); a standby takes over at most
/// about this long after a leader dies.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Placements per `CommitPlacements` call (the control plane accepts at most
/// [`MAX_BATCH_SIZE`]). One batch is one store transaction.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Most placements one `CommitPlacements` call may carry (internal.proto).
pub const MAX_BATCH_SIZE: usize = 1000;
/// Most condition updates one `SetInstanceConditions` call may carry (internal.proto).
pub const MAX_CONDITION_BATCH: usize = 1000;
/// Full re-list period (domain.md §5: "a 30 s periodic sweep"); watch events keep the view
/// current in between, the re-list repairs anything they missed.
pub const DEFAULT_RELIST_INTERVAL: Duration = Duration::from_secs(30);
/// Longest wait between two cycles while nothing happens: the lead-window timer fires at the
/// next instance's lead-window start or after this, whichever comes first (the clock may be
/// virtual).
pub const DEFAULT_CYCLE_INTERVAL: Duration = Duration::from_secs(5);
/// Minutes before its slot start at which an instance is placed: worker boot + instantiation
/// (`TIMESLOT_LEAD_TIME_MINUTES` = 35), so the autoscaler still has time to start a worker for
/// an instance that fits nowhere.
pub const DEFAULT_LOOKAHEAD_MINUTES: i64 = ccm_core::defaults::SCALE_UP_LOOKAHEAD_MINUTES;
/// Instantiation lead in minutes: a placed instance holds capacity from `slot start − lead`.
/// Must equal the control plane's (`AppSettings::instantiation_lead`).
pub const DEFAULT_INSTANTIATION_LEAD_MINUTES: i64 = ccm_core::defaults::INSTANTIATION_LEAD_MINUTES;
/// Bookmark interval asked of the change-feed watch: how often an idle watch reports the feed
/// revision (and proves the stream alive).
pub const DEFAULT_WATCH_HEARTBEAT: Duration = Duration::from_secs(5);
/// Wait before retrying after a failed list, watch or commit.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Etcd endpoint used when none is given.
pub const DEFAULT_ETCD_ENDPOINT: &str = "http://127.0.0.1:2379";
/// Etcd key prefix; must equal the control plane's, or fences never match.
pub const DEFAULT_ETCD_PREFIX: &str = "/ccm";
/// Environment variable prefix of the scheduler's flags (`CCM_SCHEDULER__LISTEN_ADDR`, …).
pub const ENV_PREFIX: &str = "CCM_SCHEDULER__";

/// How feasible workers are ranked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ScorePolicy {
    /// Fullest worker after placement (default): keeps other workers empty for scale-down.
    #[default]
    Binpack,
    /// Emptiest worker after placement.
    Spread,
}

impl ScorePolicy {
    /// The name reported by `GetSchedulerStatus`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScorePolicy::Binpack => "binpack",
            ScorePolicy::Spread => "spread",
        }
    }

    /// The scorer.
    pub fn scorer(self) -> &'static dyn ccm_core::placement::Scorer {
        match self {
            ScorePolicy::Binpack => &ccm_core::placement::BinPack,
            ScorePolicy::Spread => &ccm_core::placement::Spread,
        }
    }
}

/// Everything a [`Scheduler`](crate::Scheduler) runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerSettings {
    /// The control plane (`http://host:port`).
    pub control_plane_url: String,
    /// Where the scheduler's own gRPC API listens.
    pub listen_addr: SocketAddr,
    /// Election name, and the role its fences carry.
    pub election: String,
    /// This replica's id in the election (unique per process).
    pub replica_id: String,
    /// Lease TTL of the leadership.
    pub lease_ttl: Duration,
    /// Placements per commit call, 1..=[`MAX_BATCH_SIZE`].
    pub batch_size: usize,
    /// Full re-list period.
    pub relist_interval: Duration,
    /// Longest wait between two cycles.
    pub cycle_interval: Duration,
    /// Lead window: an instance is placed from `slot start − lookahead` on.
    pub lookahead: chrono::Duration,
    /// Instantiation lead of the booking window (must equal the control plane's).
    pub instantiation_lead: chrono::Duration,
    /// Bookmark interval of the watch.
    pub watch_heartbeat: Duration,
    /// Wait before retrying after a failure.
    pub retry_backoff: Duration,
    /// Scoring policy.
    pub score_policy: ScorePolicy,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            control_plane_url: DEFAULT_CONTROL_PLANE_URL.to_owned(),
            listen_addr: DEFAULT_LISTEN_ADDR,
            election: DEFAULT_ELECTION.to_owned(),
            replica_id: default_replica_id(),
            lease_ttl: DEFAULT_LEASE_TTL,
            batch_size: DEFAULT_BATCH_SIZE,
            relist_interval: DEFAULT_RELIST_INTERVAL,
            cycle_interval: DEFAULT_CYCLE_INTERVAL,
            lookahead: chrono::Duration::minutes(DEFAULT_LOOKAHEAD_MINUTES),
            instantiation_lead: chrono::Duration::minutes(DEFAULT_INSTANTIATION_LEAD_MINUTES),
            watch_heartbeat: DEFAULT_WATCH_HEARTBEAT,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            score_policy: ScorePolicy::default(),
        }
    }
}

/// A replica id unique per process: `scheduler-<host>-<random>`.
pub fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty() && h.len() <= 64)
        .unwrap_or_else(|| "local".to_owned());
    let short = uuid::Uuid::new_v4().simple().to_string();
    format!("scheduler-{host}-{}", &short[..8])
}

impl SchedulerSettings {
    /// Checks every value; all problems are reported together.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let mut problems = Vec::new();
        if !(self.control_plane_url.starts_with("http://")
            || self.control_plane_url.starts_with("https://"))
        {
            problems.push(format!(
                "control_plane_url must be an http:// or https:// URL, got {:?}",
                self.control_plane_url
            ));
        }
        if self.election.trim().is_empty() {
            problems.push("election must not be empty".to_owned());
        }
        if self.replica_id.trim().is_empty() {
            problems.push("replica_id must not be empty".to_owned());
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            problems.push(format!(
                "batch_size must be in 1..={MAX_BATCH_SIZE}, got {}",
                self.batch_size
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) {
            problems.push(format!(
                "lease_ttl must be at least 2s (etcd's minimum), got {:?}",
                self.lease_ttl
            ));
        }
        for (name, d) in [
            ("relist_interval", self.relist_interval),
            ("cycle_interval", self.cycle_interval),
            ("watch_heartbeat", self.watch_heartbeat),
            ("retry_backoff", self.retry_backoff),
        ] {
            if d.is_zero() {
                problems.push(format!("{name} must be positive"));
            }
        }
        if self.lookahead < chrono::Duration::zero() {
            problems.push("lookahead must not be negative".to_owned());
        }
        if self.instantiation_lead < chrono::Duration::zero() {
            problems.push("instantiation_lead must not be negative".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SchedulerError::Config(problems.join("; ")))
        }
    }
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text)
}

/// Command-line flags of `ccm serve scheduler`. Every flag can also be given in the environment
/// as `CCM_SCHEDULER__<NAME>` (flags win).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SchedulerArgs {
    /// The control plane's gRPC endpoint.
    #[arg(long = "control-plane-url", value_name = "URL", env = "CCM_SCHEDULER__CONTROL_PLANE_URL",
          default_value = DEFAULT_CONTROL_PLANE_URL)]
    pub control_plane_url: String,
    /// Where SchedulerService, health and reflection listen.
    #[arg(long = "listen-addr", value_name = "HOST:PORT", env = "CCM_SCHEDULER__LISTEN_ADDR",
          default_value_t = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,
    /// This replica's id in the election (default: `scheduler-<host>-<random>`).
    #[arg(
        long = "replica-id",
        value_name = "ID",
        env = "CCM_SCHEDULER__REPLICA_ID"
    )]
    pub replica_id: Option<String>,
    /// Etcd endpoints, comma-separated (the same etcd as the control plane).
    #[arg(long = "coordination-etcd-endpoints", value_name = "URLS", value_delimiter = ',',
          env = "CCM_SCHEDULER__COORDINATION__ETCD_ENDPOINTS", default_value = DEFAULT_ETCD_ENDPOINT)]
    pub etcd_endpoints: Vec<String>,
    /// Etcd key prefix (the same as the control plane's).
    #[arg(long = "coordination-etcd-prefix", value_name = "PREFIX",
          env = "CCM_SCHEDULER__COORDINATION__ETCD_PREFIX", default_value = DEFAULT_ETCD_PREFIX)]
    pub etcd_prefix: String,
    /// Lease TTL of the leadership.
    #[arg(long = "coordination-lease-ttl", value_name = "DURATION", value_parser = duration_arg,
          env = "CCM_SCHEDULER__COORDINATION__LEASE_TTL", default_value = "10s")]
    pub lease_ttl: Duration,
    /// Placements per commit call (1..=1000).
    #[arg(long = "batch-size", value_name = "N", env = "CCM_SCHEDULER__BATCH_SIZE",
          default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Full re-list period.
    #[arg(long = "relist-interval", value_name = "DURATION", value_parser = duration_arg,
          env = "CCM_SCHEDULER__RELIST_INTERVAL", default_value = "30s")]
    pub relist_interval: Duration,
    /// Longest wait between two cycles.
    #[arg(long = "cycle-interval", value_name = "DURATION", value_parser = duration_arg,
          env = "CCM_SCHEDULER__CYCLE_INTERVAL", default_value = "5s")]
    pub cycle_interval: Duration,
    /// Lead window: place instances this long before their slot starts.
    #[arg(long = "lookahead", value_name = "DURATION", value_parser = duration_arg,
          env = "CCM_SCHEDULER__LOOKAHEAD", default_value = "35m")]
    pub lookahead: Duration,
    /// Scoring policy.
    #[arg(long = "score-policy", value_enum, env = "CCM_SCHEDULER__SCORE_POLICY",
          default_value_t = ScorePolicy::Binpack)]
    pub score_policy: ScorePolicy,
    /// OIDC issuer whose tokens the scheduler's own API accepts.
    #[arg(
        long = "auth-issuer-url",
        value_name = "URL",
        env = "CCM_SCHEDULER__AUTH__ISSUER_URL"
    )]
    pub auth_issuer_url: Option<String>,
    /// Accepted token audiences, comma-separated.
    #[arg(
        long = "auth-audiences",
        value_name = "AUDIENCES",
        value_delimiter = ',',
        env = "CCM_SCHEDULER__AUTH__AUDIENCES",
        default_value = "ccm"
    )]
    pub auth_audiences: Vec<String>,
    /// OIDC token endpoint for the scheduler's service token (client credentials).
    #[arg(
        long = "auth-token-url",
        value_name = "URL",
        env = "CCM_SCHEDULER__AUTH__TOKEN_URL"
    )]
    pub auth_token_url: Option<String>,
    /// Client id of the service token.
    #[arg(
        long = "auth-client-id",
        value_name = "ID",
        env = "CCM_SCHEDULER__AUTH__CLIENT_ID"
    )]
    pub auth_client_id: Option<String>,
    /// Client secret of the service token (prefer the environment variable).
    #[arg(
        long = "auth-client-secret",
        value_name = "SECRET",
        hide_env_values = true,
        env = "CCM_SCHEDULER__AUTH__CLIENT_SECRET"
    )]
    pub auth_client_secret: Option<String>,
    /// Run without authentication: no service token towards the control plane and no token
    /// check on the scheduler's API. For development only.
    #[arg(long = "insecure-no-auth", env = "CCM_SCHEDULER__INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

impl SchedulerArgs {
    /// The settings these flags give.
    pub fn settings(&self) -> Result<SchedulerSettings, SchedulerError> {
        let lookahead = chrono::Duration::from_std(self.lookahead)
            .map_err(|e| SchedulerError::Config(format!("lookahead: {e}")))?;
        let settings = SchedulerSettings {
            control_plane_url: self.control_plane_url.clone(),
            listen_addr: self.listen_addr,
            replica_id: self.replica_id.clone().unwrap_or_else(default_replica_id),
            lease_ttl: self.lease_ttl,
            batch_size: self.batch_size,
            relist_interval: self.relist_interval,
            cycle_interval: self.cycle_interval,
            lookahead,
            score_policy: self.score_policy,
            ..SchedulerSettings::default()
        };
        settings.validate()?;
        Ok(settings)
    }

    /// The client credentials of the service token; `None` with `--insecure-no-auth`.
    pub fn credentials(&self) -> Result<Option<ccm_auth::ClientCredentials>, SchedulerError> {
        if self.insecure_no_auth {
            return Ok(None);
        }
        match (
            &self.auth_token_url,
            &self.auth_client_id,
            &self.auth_client_secret,
        ) {
            (Some(url), Some(id), Some(secret)) if !secret.is_empty() => {
                Ok(Some(ccm_auth::ClientCredentials {
                    token_url: url.clone(),
                    client_id: id.clone(),
                    client_secret: secret.clone(),
                    scope: None,
                }))
            }
            _ => Err(SchedulerError::Config(
                "--auth-token-url, --auth-client-id and --auth-client-secret \
                 (CCM_SCHEDULER__AUTH__CLIENT_SECRET) are required unless --insecure-no-auth"
                    .to_owned(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: SchedulerArgs,
    }

    #[test]
    fn defaults_are_the_documented_constants() {
        let cli = Cli::try_parse_from(["x", "--insecure-no-auth"]).expect("parses");
        let s = cli.args.settings().expect("valid");
        assert_eq!(s.listen_addr, DEFAULT_LISTEN_ADDR);
        assert_eq!(s.control_plane_url, DEFAULT_CONTROL_PLANE_URL);
        assert_eq!(s.batch_size, DEFAULT_BATCH_SIZE);
        assert_eq!(s.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(s.relist_interval, DEFAULT_RELIST_INTERVAL);
        assert_eq!(s.cycle_interval, DEFAULT_CYCLE_INTERVAL);
        assert_eq!(
            s.lookahead,
            chrono::Duration::minutes(DEFAULT_LOOKAHEAD_MINUTES)
        );
        assert_eq!(
            cli.args.etcd_endpoints,
            vec![DEFAULT_ETCD_ENDPOINT.to_owned()]
        );
        assert_eq!(cli.args.credentials().expect("no auth"), None);
    }

    #[test]
    fn bad_values_are_refused_with_every_problem() {
        let cli = Cli::try_parse_from([
            "x",
            "--insecure-no-auth",
            "--batch-size",
            "0",
            "--control-plane-url",
            "localhost:50051",
        ])
        .expect("parses");
        let err = cli.args.settings().expect_err("invalid").to_string();
        assert!(
            err.contains("batch_size must be in 1..=1000, got 0"),
            "{err}"
        );
        assert!(err.contains("control_plane_url must be an http"), "{err}");
        assert!(Cli::try_parse_from(["x", "--lookahead", "soon"]).is_err());
    }

    #[test]
    fn credentials_are_required_unless_insecure() {
        let cli =
            Cli::try_parse_from(["x", "--auth-token-url", "http://idp/token"]).expect("parses");
        let err = cli.args.credentials().expect_err("incomplete").to_string();
        assert!(err.contains("--auth-client-id"), "{err}");
        let cli = Cli::try_parse_from([
            "x",
            "--auth-token-url",
            "http://idp/token",
            "--auth-client-id",
            "ccm-scheduler",
            "--auth-client-secret",
            "s3cret",
        ])
        .expect("parses");
        let creds = cli.args.credentials().expect("complete").expect("some");
        assert_eq!(creds.client_id, "ccm-scheduler");
    }
}
