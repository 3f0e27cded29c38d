//! Configuration: the `ccm serve controller` flags ([`ControllerArgs`], every flag also an
//! environment variable `CCM_CONTROLLER__…`) and the settings the library runs on
//! ([`ControllerSettings`]). Every default is a named constant below.

use std::net::SocketAddr;
use std::time::Duration;

use ccm_core::autoscale::AutoscalePolicy;

use crate::error::ControllerError;

/// Default control-plane gRPC endpoint.
pub const DEFAULT_CONTROL_PLANE_URL: &str = "http://127.0.0.1:50051";
/// Default listen address of the ControllerService.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50053";
/// Election the controller replicas campaign in (the control plane fences on it).
pub const ELECTION: &str = "controller";
/// Default etcd key prefix (shared with the control plane).
pub const DEFAULT_ETCD_PREFIX: &str = "/ccm/";
/// Default leader lease TTL, seconds.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 10;
/// Default CML endpoint template: a worker's CML base URL (placeholders `{public_ip}`,
/// `{private_ip}`, `{instance_id}`).
pub const DEFAULT_CML_ENDPOINT_TEMPLATE: &str = "https://{public_ip}";
/// Default CML API user (legacy default).
pub const DEFAULT_CML_USERNAME: &str = "admin";
/// Default CML API password (legacy default; set your own).
pub const DEFAULT_CML_PASSWORD: &str = "admin";
/// Default: CML workers use self-signed certificates (legacy `verify=False`).
pub const DEFAULT_CML_ACCEPT_INVALID_CERTS: bool = true;
/// Default time a simulated worker takes to boot, seconds.
pub const DEFAULT_SIMULATED_BOOT_SECS: u64 = 5;
/// How often the instance reconciler looks at every live instance at the latest.
pub const DEFAULT_INSTANCES_INTERVAL: Duration = Duration::from_secs(5);
/// How often the worker reconciler looks at every worker at the latest.
pub const DEFAULT_WORKERS_INTERVAL: Duration = Duration::from_secs(15);
/// How often the autoscaler runs at the latest.
pub const DEFAULT_AUTOSCALER_INTERVAL: Duration = Duration::from_secs(30);
/// How often a RUNNING worker's CML (health, stats, licence, labs) is polled.
pub const DEFAULT_WORKER_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// How often a booting worker (PENDING … STARTING, UNKNOWN) is looked at.
pub const DEFAULT_BOOTING_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Objects reconciled at once within one pass.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// First retry delay after a failed instantiation attempt (doubles per attempt).
pub const INSTANTIATION_BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay between instantiation attempts.
pub const INSTANTIATION_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// First retry delay after a failed cloud or CML action on a worker (doubles per attempt).
pub const ACTION_BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay of a worker or teardown action.
pub const ACTION_BACKOFF_MAX: Duration = Duration::from_secs(120);
/// A COLLECTING instance whose collection did not complete in this long is stopped
/// (reason `collection_timeout`).
pub const DEFAULT_COLLECTION_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A GRADING instance whose grading did not complete in this long is stopped
/// (reason `grading_timeout`).
pub const DEFAULT_GRADING_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Failed collection requests before the instance is stopped (reason `collection_failed`).
pub const MAX_COLLECTION_ATTEMPTS: u32 = 5;
/// Timeout of one HTTP call to the assessment platform.
pub const ASSESSMENT_HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// Licence registration: polls of `GET /licensing` after the registration was accepted.
pub const LICENSE_POLL_ATTEMPTS: u32 = 18;
/// Licence registration: time between polls (18 × 5 s = the legacy 90 s).
pub const LICENSE_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Default listen address as a socket address.
pub fn default_listen_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50053))
}

/// Which cloud the workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CloudKind {
    /// AWS EC2.
    #[default]
    Aws,
    /// The simulated cloud (dev mode, simulations).
    Simulated,
}

/// Command-line flags of `ccm serve controller`. Every flag can also be set through the
/// environment variable named in its help (`CCM_CONTROLLER__…`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ControllerArgs {
    /// The control plane's gRPC endpoint.
    #[arg(long, env = "CCM_CONTROLLER__CONTROL_PLANE_URL", default_value = DEFAULT_CONTROL_PLANE_URL)]
    pub control_plane_url: String,
    /// Where the ControllerService listens.
    #[arg(long, env = "CCM_CONTROLLER__LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,
    /// This replica's id in the election (default: `controller-<random>`).
    #[arg(long, env = "CCM_CONTROLLER__REPLICA_ID")]
    pub replica_id: Option<String>,
    /// etcd endpoints, comma-separated (required: the control plane fences on the same etcd).
    #[arg(long, env = "CCM_CONTROLLER__ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix, the control plane's.
    #[arg(long, env = "CCM_CONTROLLER__ETCD_PREFIX", default_value = DEFAULT_ETCD_PREFIX)]
    pub etcd_prefix: String,
    /// Leader lease TTL in seconds.
    #[arg(long, env = "CCM_CONTROLLER__LEASE_TTL_SECONDS", default_value_t = DEFAULT_LEASE_TTL_SECS)]
    pub lease_ttl_seconds: u64,
    /// The cloud: `aws` or `simulated`.
    #[arg(long, env = "CCM_CONTROLLER__CLOUD", value_enum, default_value_t = CloudKind::Aws)]
    pub cloud: CloudKind,
    /// AWS region of the workers.
    #[arg(long, env = "CCM_CONTROLLER__AWS_REGION")]
    pub aws_region: Option<String>,
    /// Custom EC2 endpoint (e.g. an emulator).
    #[arg(long, env = "CCM_CONTROLLER__AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// Subnet new workers are launched in.
    #[arg(long, env = "CCM_CONTROLLER__AWS_SUBNET_ID", default_value = "")]
    pub aws_subnet_id: String,
    /// Security groups of new workers, comma-separated (`sg-…`).
    #[arg(
        long,
        env = "CCM_CONTROLLER__AWS_SECURITY_GROUP_IDS",
        value_delimiter = ','
    )]
    pub aws_security_group_ids: Vec<String>,
    /// SSH key pair of new workers.
    #[arg(long, env = "CCM_CONTROLLER__AWS_KEY_NAME", default_value = "")]
    pub aws_key_name: String,
    /// Root volume size of new workers in GiB (0: the template's, else the image's).
    #[arg(long, env = "CCM_CONTROLLER__AWS_VOLUME_SIZE_GIB", default_value_t = 0)]
    pub aws_volume_size_gib: u32,
    /// Boot time of a simulated worker, seconds.
    #[arg(long, env = "CCM_CONTROLLER__SIMULATED_BOOT_SECONDS", default_value_t = DEFAULT_SIMULATED_BOOT_SECS)]
    pub simulated_boot_seconds: u64,
    /// CML API user on the workers.
    #[arg(long, env = "CCM_CONTROLLER__CML_USERNAME", default_value = DEFAULT_CML_USERNAME)]
    pub cml_username: String,
    /// CML API password on the workers.
    #[arg(long, env = "CCM_CONTROLLER__CML_PASSWORD", default_value = DEFAULT_CML_PASSWORD, hide_env_values = true)]
    pub cml_password: String,
    /// A worker's CML base URL, from `{public_ip}`, `{private_ip}` and `{instance_id}`.
    #[arg(long, env = "CCM_CONTROLLER__CML_ENDPOINT_TEMPLATE", default_value = DEFAULT_CML_ENDPOINT_TEMPLATE)]
    pub cml_endpoint_template: String,
    /// Verify the workers' TLS certificates (off by default: CML ships self-signed ones).
    #[arg(long, env = "CCM_CONTROLLER__CML_VERIFY_TLS")]
    pub cml_verify_tls: bool,
    /// URL the assessment platform takes collection requests at
    /// (`POST {instance_id, cml_lab_id, worker_hostname, …}`).
    #[arg(long, env = "CCM_CONTROLLER__ASSESSMENT_COLLECTION_URL")]
    pub assessment_collection_url: Option<String>,
    /// Accept `http://` lab artifact URIs.
    #[arg(long, env = "CCM_CONTROLLER__ARTIFACTS_ALLOW_HTTP")]
    pub artifacts_allow_http: bool,
    /// OAuth2 token endpoint for the service token (client credentials).
    #[arg(long, env = "CCM_CONTROLLER__AUTH_TOKEN_URL")]
    pub auth_token_url: Option<String>,
    /// OAuth2 client id.
    #[arg(long, env = "CCM_CONTROLLER__AUTH_CLIENT_ID")]
    pub auth_client_id: Option<String>,
    /// OAuth2 client secret.
    #[arg(
        long,
        env = "CCM_CONTROLLER__AUTH_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub auth_client_secret: Option<String>,
    /// Run without a service token (only against a control plane run with --insecure-no-auth).
    #[arg(long, env = "CCM_CONTROLLER__INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Instance reconciler interval, seconds.
    #[arg(long, env = "CCM_CONTROLLER__INSTANCES_INTERVAL_SECONDS", default_value_t = DEFAULT_INSTANCES_INTERVAL.as_secs())]
    pub instances_interval_seconds: u64,
    /// Worker reconciler interval, seconds.
    #[arg(long, env = "CCM_CONTROLLER__WORKERS_INTERVAL_SECONDS", default_value_t = DEFAULT_WORKERS_INTERVAL.as_secs())]
    pub workers_interval_seconds: u64,
    /// Autoscaler interval, seconds.
    #[arg(long, env = "CCM_CONTROLLER__AUTOSCALER_INTERVAL_SECONDS", default_value_t = DEFAULT_AUTOSCALER_INTERVAL.as_secs())]
    pub autoscaler_interval_seconds: u64,
    /// CML poll interval of a RUNNING worker, seconds.
    #[arg(long, env = "CCM_CONTROLLER__WORKER_POLL_INTERVAL_SECONDS", default_value_t = DEFAULT_WORKER_POLL_INTERVAL.as_secs())]
    pub worker_poll_interval_seconds: u64,
}

/// Intervals and policies the library runs on (built from [`ControllerArgs`], or directly by
/// `ccm dev` and tests).
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// This replica's id in the election.
    pub replica_id: String,
    /// Leader lease TTL.
    pub lease_ttl: Duration,
    /// Instance reconciler interval.
    pub instances_interval: Duration,
    /// Worker reconciler interval.
    pub workers_interval: Duration,
    /// Autoscaler interval.
    pub autoscaler_interval: Duration,
    /// CML poll interval of a RUNNING worker.
    pub worker_poll_interval: Duration,
    /// Poll interval of a booting worker.
    pub booting_poll_interval: Duration,
    /// Objects reconciled at once.
    pub concurrency: usize,
    /// A worker's CML base URL template.
    pub cml_endpoint_template: String,
    /// Where collection requests go (`None`: COLLECTING instances wait for the CloudEvents the
    /// platform sends on its own, until the collection timeout).
    pub assessment_collection_url: Option<String>,
    /// Collection timeout.
    pub collection_timeout: Duration,
    /// Grading timeout.
    pub grading_timeout: Duration,
    /// Launch settings of new workers.
    pub launch: LaunchSettings,
    /// The autoscaler's knobs.
    pub policy: AutoscalePolicy,
    /// Run the autoscaler (tests of single reconcilers turn it off).
    pub autoscaler_enabled: bool,
    /// Time between licence-registration polls (default [`LICENSE_POLL_INTERVAL`]).
    pub license_poll_interval: Duration,
}

/// Cloud settings for launching workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchSettings {
    /// Subnet.
    pub subnet_id: String,
    /// Security groups.
    pub security_group_ids: Vec<String>,
    /// SSH key pair.
    pub key_name: String,
    /// Root volume GiB (0: the template's, else the image's).
    pub volume_size_gib: u32,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        ControllerSettings {
            replica_id: format!("controller-{}", uuid::Uuid::new_v4().simple()),
            lease_ttl: Duration::from_secs(DEFAULT_LEASE_TTL_SECS),
            instances_interval: DEFAULT_INSTANCES_INTERVAL,
            workers_interval: DEFAULT_WORKERS_INTERVAL,
            autoscaler_interval: DEFAULT_AUTOSCALER_INTERVAL,
            worker_poll_interval: DEFAULT_WORKER_POLL_INTERVAL,
            booting_poll_interval: DEFAULT_BOOTING_POLL_INTERVAL,
            concurrency: DEFAULT_CONCURRENCY,
            cml_endpoint_template: DEFAULT_CML_ENDPOINT_TEMPLATE.to_owned(),
            assessment_collection_url: None,
            collection_timeout: DEFAULT_COLLECTION_TIMEOUT,
            grading_timeout: DEFAULT_GRADING_TIMEOUT,
            launch: LaunchSettings::default(),
            policy: AutoscalePolicy::default(),
            autoscaler_enabled: true,
            license_poll_interval: LICENSE_POLL_INTERVAL,
        }
    }
}

impl ControllerArgs {
    /// The library settings these flags describe; refuses nonsense (zero intervals, a bad
    /// endpoint template or URL).
    pub fn settings(&self) -> Result<ControllerSettings, ControllerError> {
        let secs = |name: &str, v: u64| {
            if v == 0 {
                Err(ControllerError::Config(format!(
                    "{name} must be at least 1 second"
                )))
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        crate::cml::EndpointTemplate::parse(&self.cml_endpoint_template)?;
        if let Some(url) = &self.assessment_collection_url {
            check_http_url("assessment_collection_url", url)?;
        }
        check_http_url("control_plane_url", &self.control_plane_url)?;
        Ok(ControllerSettings {
            replica_id: self
                .replica_id
                .clone()
                .unwrap_or_else(|| ControllerSettings::default().replica_id),
            lease_ttl: secs("lease_ttl_seconds", self.lease_ttl_seconds)?,
            instances_interval: secs(
                "instances_interval_seconds",
                self.instances_interval_seconds,
            )?,
            workers_interval: secs("workers_interval_seconds", self.workers_interval_seconds)?,
            autoscaler_interval: secs(
                "autoscaler_interval_seconds",
                self.autoscaler_interval_seconds,
            )?,
            worker_poll_interval: secs(
                "worker_poll_interval_seconds",
                self.worker_poll_interval_seconds,
            )?,
            cml_endpoint_template: self.cml_endpoint_template.clone(),
            assessment_collection_url: self.assessment_collection_url.clone(),
            launch: LaunchSettings {
                subnet_id: self.aws_subnet_id.clone(),
                security_group_ids: self.aws_security_group_ids.clone(),
                key_name: self.aws_key_name.clone(),
                volume_size_gib: self.aws_volume_size_gib,
            },
            ..ControllerSettings::default()
        })
    }
}

/// Refuses anything but an absolute `http(s)://` URL.
pub fn check_http_url(name: &str, url: &str) -> Result<(), ControllerError> {
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && url
            .split_once("://")
            .is_some_and(|(_, rest)| !rest.is_empty());
    if ok {
        Ok(())
    } else {
        Err(ControllerError::Config(format!(
            "{name} must be an http:// or https:// URL, got {url:?}"
        )))
    }
}
