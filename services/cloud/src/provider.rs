//! The [`CloudProvider`] trait: everything the controller asks of a cloud (domain.md §6,
//! legacy-features.md §3). Implementations: [`crate::aws`] (EC2 via aws-sdk-ec2) and
//! [`crate::simulated`] (dev mode and simulations).

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::CloudError;

/// Tag every ccm-created instance carries (`"true"`); Describe filters on it.
pub const TAG_MANAGED: &str = "ccm:managed";
/// Tag naming the worker template an instance was launched from.
pub const TAG_TEMPLATE: &str = "ccm:template";
/// Tag carrying the ccm worker id (ties an EC2 instance back to its record).
pub const TAG_WORKER_ID: &str = "ccm:worker-id";
/// EC2's display-name tag.
pub const TAG_NAME: &str = "Name";

/// EC2's instance lifecycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// `pending`.
    Pending,
    /// `running`.
    Running,
    /// `stopping`.
    Stopping,
    /// `stopped`.
    Stopped,
    /// `shutting-down`.
    ShuttingDown,
    /// `terminated`.
    Terminated,
    /// Anything else the API returned.
    Unknown,
}

impl InstanceState {
    /// EC2's spelling (`running`, `shutting-down`, …); what `ccm_core` worker observations take.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Unknown => "unknown",
        }
    }

    /// Parses EC2's spelling; anything unknown is [`InstanceState::Unknown`].
    pub fn parse(text: &str) -> Self {
        match text {
            "pending" => InstanceState::Pending,
            "running" => InstanceState::Running,
            "stopping" => InstanceState::Stopping,
            "stopped" => InstanceState::Stopped,
            "shutting-down" => InstanceState::ShuttingDown,
            "terminated" => InstanceState::Terminated,
            _ => InstanceState::Unknown,
        }
    }
}

/// What to launch: one worker from a template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaunchRequest {
    /// The ccm worker id (tagged [`TAG_WORKER_ID`]; also the idempotency client token, so a
    /// retried launch never creates a second instance).
    pub worker_id: String,
    /// Display name (tag `Name`).
    pub name: String,
    /// The worker template (tag [`TAG_TEMPLATE`]).
    pub template_name: String,
    /// EC2 instance type, e.g. `m5zn.metal`.
    pub instance_type: String,
    /// The image: an explicit AMI id, or empty to look one up by `ami_name_pattern`.
    pub ami_id: String,
    /// Glob on AMI names (`cml-2.7.*`); the newest match wins.
    pub ami_name_pattern: String,
    /// Subnet (empty: the default VPC's).
    pub subnet_id: String,
    /// Security groups (`sg-…`).
    pub security_group_ids: Vec<String>,
    /// SSH key pair name (empty: none).
    pub key_name: String,
    /// Root volume size in GiB (0: the image's).
    pub volume_size_gib: u32,
    /// Extra tags (the template's); the ccm tags are added by the provider.
    pub tags: BTreeMap<String, String>,
}

/// One instance as the cloud describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInstance {
    /// `i-…`.
    pub instance_id: String,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Instance type.
    pub instance_type: String,
    /// AMI id.
    pub image_id: String,
    /// Public IPv4, if any.
    pub public_ip: Option<String>,
    /// Private IPv4, if any.
    pub private_ip: Option<String>,
    /// When it was (last) launched.
    pub launch_time: Option<DateTime<Utc>>,
    /// Every tag.
    pub tags: BTreeMap<String, String>,
}

impl CloudInstance {
    /// The `Name` tag, if any.
    pub fn name(&self) -> Option<&str> {
        self.tags.get(TAG_NAME).map(String::as_str)
    }
}

/// A machine image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudImage {
    /// `ami-…`.
    pub image_id: String,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Creation date as EC2 reports it (ISO 8601).
    pub creation_date: String,
}

/// Which instances to list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListFilter {
    /// Only instances tagged [`TAG_MANAGED`] = `true` (what the controller reconciles).
    pub managed_only: bool,
    /// Only these instance ids (empty: all).
    pub instance_ids: Vec<String>,
    /// Only instances with these tags (`key = value`).
    pub tags: BTreeMap<String, String>,
    /// Include terminated instances.
    pub include_terminated: bool,
}

/// A cloud the controller can run workers on.
#[async_trait]
pub trait CloudProvider: Send + Sync + std::fmt::Debug {
    /// `aws` or `simulated` (logs, metrics, `GetStatus`).
    fn kind(&self) -> &'static str;

    /// Launches one instance; returns it as first described (usually `pending`). Idempotent on
    /// [`LaunchRequest::worker_id`].
    async fn launch(&self, request: &LaunchRequest) -> Result<CloudInstance, CloudError>;

    /// Starts a stopped instance (no-op if running).
    async fn start(&self, instance_id: &str) -> Result<(), CloudError>;

    /// Stops a running instance (no-op if stopped).
    async fn stop(&self, instance_id: &str) -> Result<(), CloudError>;

    /// Terminates an instance; an instance that is already gone is not an error.
    async fn terminate(&self, instance_id: &str) -> Result<(), CloudError>;

    /// One instance, or `None` when the cloud does not know it.
    async fn describe(&self, instance_id: &str) -> Result<Option<CloudInstance>, CloudError>;

    /// Every instance matching `filter` (all pages).
    async fn list(&self, filter: &ListFilter) -> Result<Vec<CloudInstance>, CloudError>;

    /// Sets `set` and removes `remove` on an instance's tags.
    async fn update_tags(
        &self,
        instance_id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<(), CloudError>;

    /// The newest image whose name matches the glob `name_pattern`, if any.
    async fn find_image(&self, name_pattern: &str) -> Result<Option<CloudImage>, CloudError>;
}
