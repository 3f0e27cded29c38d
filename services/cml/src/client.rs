//! The [`CmlClient`] trait: the CML REST API v0 calls ccm makes (legacy-features.md §4).
//! [`crate::http::HttpCmlClient`] speaks it over HTTPS to a real CML (or to `ccm-cml-sim`).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::CmlError;

/// `GET /api/v0/system_information` (no authentication).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SystemInformation {
    /// CML version, e.g. `2.7.0`.
    pub version: String,
    /// Whether the controller is ready to serve.
    pub ready: bool,
    /// Whether SSH public-key auth is allowed.
    pub allow_ssh_pubkey_auth: bool,
    /// Vendor OUI.
    pub oui: Option<String>,
}

/// One compute's health in `system_health`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ComputeHealth {
    /// Overall validity.
    pub valid: bool,
    /// Registered with the controller.
    pub is_registered: bool,
    /// Connected.
    pub is_connected: bool,
    /// Ready for nodes.
    pub is_ready: bool,
}

/// `GET /api/v0/system_health`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SystemHealth {
    /// Whole-system validity.
    pub valid: bool,
    /// Licensed.
    pub is_licensed: bool,
    /// Enterprise licence.
    pub is_enterprise: bool,
    /// Computes by id.
    pub computes: std::collections::BTreeMap<String, ComputeHealth>,
}

/// Used/free/total of one resource, in bytes (memory, disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Total bytes.
    pub total: u64,
    /// Free bytes.
    pub free: u64,
    /// Used bytes.
    pub used: u64,
}

/// CPU of the whole system.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuStats {
    /// Cores.
    pub count: u32,
    /// Utilisation, percent.
    pub percent: f64,
}

/// `all` of `system_stats`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AllStats {
    /// CPU.
    pub cpu: CpuStats,
    /// Memory.
    pub memory: Usage,
    /// Disk.
    pub disk: Usage,
}

/// Node counts of one compute (`dominfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DomInfo {
    /// vCPUs allocated to nodes.
    pub allocated_cpus: u64,
    /// Memory allocated to nodes (MiB).
    pub allocated_memory: u64,
    /// Nodes defined.
    pub total_nodes: u64,
    /// Nodes running.
    pub running_nodes: u64,
}

/// `GET /api/v0/system_stats`, with the per-compute `dominfo` summed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SystemStats {
    /// Whole-system CPU, memory and disk.
    pub all: AllStats,
    /// `dominfo` summed over the computes.
    pub dominfo: DomInfo,
    /// The raw document (kept for the UI's compute table).
    pub raw: serde_json::Value,
}

/// `GET /api/v0/licensing`: the registration status plus the raw document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Licensing {
    /// `registration.status`, e.g. `COMPLETED`, `REGISTERED`, `EVALUATION`, `FAILED`.
    pub registration_status: String,
    /// `authorization.status`, e.g. `AUTHORIZED`, `EVAL`.
    pub authorization_status: String,
    /// `product_license.is_enterprise`.
    pub is_enterprise: bool,
    /// The raw document.
    pub raw: serde_json::Value,
}

/// `GET /api/v0/labs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LabInfo {
    /// Lab id.
    pub id: String,
    /// Title.
    pub lab_title: String,
    /// Description.
    pub lab_description: String,
    /// Notes.
    pub lab_notes: String,
    /// `DEFINED_ON_CORE`, `STARTED`, `STOPPED`, `BOOTED`, `QUEUED`.
    pub state: String,
    /// Owner's user name.
    pub owner_username: String,
    /// Nodes.
    pub node_count: u32,
    /// Links.
    pub link_count: u32,
    /// Created (ISO 8601).
    pub created: String,
    /// Modified (ISO 8601).
    pub modified: String,
}

/// The result of `POST /api/v0/import`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ImportedLab {
    /// The new lab's id.
    pub id: String,
    /// Its title, when CML returns one.
    pub title: Option<String>,
}

/// What a licence deregistration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deregistration {
    /// 204: deregistered.
    Done,
    /// 202: deregistered locally only.
    LocalOnly,
    /// The call timed out (treated as done, as the legacy service does).
    TimedOut,
}

/// One telemetry event (`GET /api/v0/telemetry/events`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetryEvent {
    /// Category, e.g. `start_lab`, `user_activity`.
    pub category: String,
    /// Timestamp as CML writes it (`YYYY-MM-DDTHH:MM:SS[.f][Z]`, maybe naive).
    pub timestamp: String,
    /// Payload.
    pub data: serde_json::Value,
}

/// A lab operation (`PUT /api/v0/labs/{id}/{op}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabAction {
    /// Start every node.
    Start,
    /// Stop every node.
    Stop,
    /// Wipe node disks (must be stopped).
    Wipe,
}

impl LabAction {
    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            LabAction::Start => "start",
            LabAction::Stop => "stop",
            LabAction::Wipe => "wipe",
        }
    }
}

/// The CML REST API of one worker.
#[async_trait]
pub trait CmlClient: Send + Sync + std::fmt::Debug {
    /// `GET /api/v0/system_information` — alone decides whether CML is reachable.
    async fn system_information(&self) -> Result<SystemInformation, CmlError>;
    /// `GET /api/v0/system_health`.
    async fn system_health(&self) -> Result<SystemHealth, CmlError>;
    /// `GET /api/v0/system_stats`.
    async fn system_stats(&self) -> Result<SystemStats, CmlError>;
    /// `GET /api/v0/licensing`.
    async fn licensing(&self) -> Result<Licensing, CmlError>;
    /// `POST /api/v0/licensing/registration`.
    async fn register_license(&self, token: &str, reregister: bool) -> Result<(), CmlError>;
    /// `DELETE /api/v0/licensing/deregistration`.
    async fn deregister_license(&self) -> Result<Deregistration, CmlError>;
    /// `GET /api/v0/labs?show_all=true`: every lab id.
    async fn list_labs(&self) -> Result<Vec<String>, CmlError>;
    /// `GET /api/v0/labs/{id}`.
    async fn get_lab(&self, lab_id: &str) -> Result<LabInfo, CmlError>;
    /// `POST /api/v0/import[?title=]` with the lab YAML.
    async fn import_lab(&self, yaml: &str, title: Option<&str>) -> Result<ImportedLab, CmlError>;
    /// `PUT /api/v0/labs/{id}/start|stop|wipe`.
    async fn lab_action(&self, lab_id: &str, action: LabAction) -> Result<(), CmlError>;
    /// `DELETE /api/v0/labs/{id}`.
    async fn delete_lab(&self, lab_id: &str) -> Result<(), CmlError>;
    /// `GET /api/v0/labs/{id}/download`: the lab YAML.
    async fn download_lab(&self, lab_id: &str) -> Result<String, CmlError>;
    /// `GET /api/v0/telemetry/events`.
    async fn telemetry_events(&self) -> Result<Vec<TelemetryEvent>, CmlError>;
}
