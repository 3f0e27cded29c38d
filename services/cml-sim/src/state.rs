//! The state of one simulated CML and the rules of its API (independent of HTTP).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::options::{ADMIN_USER_ID, Faults, INVALID_LICENCE_TOKEN, LicenceMode, SimOptions};
use crate::topology::{self, Topology};

/// An API error: the HTTP status and CML's `description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `description` of the JSON body.
    pub description: String,
}

impl ApiError {
    pub(crate) fn new(status: u16, description: impl Into<String>) -> Self {
        ApiError {
            status,
            description: description.into(),
        }
    }
}

/// A lab's state as CML reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LabState {
    /// Imported or wiped; nothing allocated.
    DefinedOnCore,
    /// Started; nodes booting.
    Started,
    /// Started and every node booted.
    Booted,
    /// Stopped (disks kept).
    Stopped,
}

impl LabState {
    /// CML's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LabState::DefinedOnCore => "DEFINED_ON_CORE",
            LabState::Started => "STARTED",
            LabState::Booted => "BOOTED",
            LabState::Stopped => "STOPPED",
        }
    }

    /// Whether the lab's nodes run (and count against resources).
    pub fn is_running(self) -> bool {
        matches!(self, LabState::Started | LabState::Booted)
    }
}

/// One node in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    /// `id` from the YAML.
    pub id: String,
    /// `label`.
    pub label: String,
    /// `node_definition`.
    pub node_definition: String,
    /// vCPUs (after defaults).
    pub cpus: u32,
    /// Memory, MiB (after defaults).
    pub ram_mib: u64,
    /// `tags`.
    pub tags: Vec<String>,
    /// Index of the compute it runs on.
    pub compute: usize,
}

/// One lab in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSnapshot {
    /// Lab id.
    pub id: String,
    /// Title.
    pub title: String,
    /// State.
    pub state: LabState,
    /// The YAML as imported.
    pub yaml: String,
    /// Nodes.
    pub nodes: Vec<NodeSnapshot>,
    /// Links.
    pub link_count: usize,
}

/// `GET /_sim/state`: everything a test may want to check about one simulated CML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSnapshot {
    /// Host name (`default` or the path prefix).
    pub host: String,
    /// Whether it reports ready.
    pub ready: bool,
    /// `registration.status`.
    pub registration_status: String,
    /// `authorization.status`.
    pub authorization_status: String,
    /// Active faults.
    pub faults: Faults,
    /// Labs, oldest first.
    pub labs: Vec<LabSnapshot>,
    /// Nodes defined.
    pub total_nodes: u64,
    /// Nodes running.
    pub running_nodes: u64,
    /// Telemetry events recorded.
    pub telemetry_events: usize,
    /// Tokens currently valid.
    pub valid_tokens: usize,
    /// Successful authentications so far.
    pub authentications: u64,
}

#[derive(Debug, Clone)]
struct Node {
    topo: topology::TopologyNode,
    cpus: u32,
    ram_mib: u64,
    compute: usize,
}

#[derive(Debug, Clone)]
struct Lab {
    id: String,
    title: String,
    description: String,
    notes: String,
    state: LabState,
    yaml: String,
    nodes: Vec<Node>,
    link_count: usize,
    created: String,
    modified: String,
    started_at: Option<Instant>,
}

#[derive(Debug, Clone)]
enum Registration {
    /// Per [`LicenceMode`] (never `Registered`).
    Unregistered(LicenceMode),
    InProgress {
        until: Instant,
        fails: bool,
        /// Whether the licence held before the attempt licensed the CML.
        licensed: bool,
        /// `authorization.status` before the attempt (it holds meanwhile).
        authorization: &'static str,
    },
    Completed,
    /// A registration attempt failed; the previous mode still applies.
    Failed(LicenceMode),
}

#[derive(Debug, Clone)]
struct TelemetryRecord {
    category: String,
    timestamp: String,
    data: serde_json::Value,
}

struct HostState {
    labs: Vec<Lab>,
    tokens: HashMap<String, Instant>,
    authentications: u64,
    telemetry: Vec<TelemetryRecord>,
    registration: Registration,
    register_attempted: Option<String>,
    register_succeeded: Option<String>,
    faults: Faults,
    next_compute: usize,
}

/// One simulated CML.
pub struct Host {
    name: String,
    opts: Arc<SimOptions>,
    created: Instant,
    product_uuid: String,
    state: Mutex<HostState>,
}

fn now_text() -> String {
    // CML writes naive UTC timestamps with microseconds.
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6f")
        .to_string()
}

fn iso_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn not_found(lab_id: &str) -> ApiError {
    ApiError::new(404, format!("Lab not found: {lab_id}"))
}

fn initial_registration(mode: LicenceMode) -> Registration {
    match mode {
        LicenceMode::Registered => Registration::Completed,
        other => Registration::Unregistered(other),
    }
}

impl Host {
    pub(crate) fn new(name: String, opts: Arc<SimOptions>) -> Self {
        let state = HostState {
            labs: Vec::new(),
            tokens: HashMap::new(),
            authentications: 0,
            telemetry: Vec::new(),
            registration: initial_registration(opts.licence),
            register_attempted: None,
            register_succeeded: None,
            faults: opts.faults.clone(),
            next_compute: 0,
        };
        Host {
            name,
            opts,
            created: Instant::now(),
            product_uuid: uuid::Uuid::new_v4().to_string(),
            state: Mutex::new(state),
        }
    }

    /// The host's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, HostState> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.advance(&mut state, Instant::now());
        state
    }

    /// Moves time-driven state forward: BOOTED labs, finished registrations.
    fn advance(&self, state: &mut HostState, now: Instant) {
        for lab in &mut state.labs {
            if lab.state == LabState::Started
                && lab
                    .started_at
                    .is_some_and(|at| now >= at + self.opts.boot_duration)
            {
                lab.state = LabState::Booted;
            }
        }
        if let Registration::InProgress { until, fails, .. } = state.registration
            && now >= until
        {
            if fails {
                let mode = match self.opts.licence {
                    LicenceMode::Registered => LicenceMode::Unregistered,
                    mode => mode,
                };
                state.registration = Registration::Failed(mode);
            } else {
                state.registration = Registration::Completed;
                state.register_succeeded = Some(iso_now());
            }
        }
    }

    /// The faults now in force.
    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Changes the faults; `expire_tokens` drops every token.
    pub fn patch_faults(&self, patch: &crate::options::FaultPatch) -> Faults {
        let mut state = self.lock();
        state.faults.apply(patch);
        if patch.expire_tokens {
            state.tokens.clear();
        }
        state.faults.clone()
    }

    /// Clears every fault.
    pub fn clear_faults(&self) -> Faults {
        let mut state = self.lock();
        state.faults = Faults::default();
        state.faults.clone()
    }

    /// Back to a fresh CML (labs, licence, tokens, telemetry, faults from the options).
    pub fn reset(&self) {
        let mut state = self.lock();
        *state = HostState {
            labs: Vec::new(),
            tokens: HashMap::new(),
            authentications: 0,
            telemetry: Vec::new(),
            registration: initial_registration(self.opts.licence),
            register_attempted: None,
            register_succeeded: None,
            faults: self.opts.faults.clone(),
            next_compute: 0,
        };
    }

    /// Whether the CML reports ready.
    pub fn is_ready(&self) -> bool {
        let faults_unready = self.lock().faults.unready;
        !faults_unready && self.created.elapsed() >= self.opts.ready_after
    }

    fn record(state: &mut HostState, category: &str, data: serde_json::Value) {
        state.telemetry.push(TelemetryRecord {
            category: category.to_owned(),
            timestamp: now_text(),
            data,
        });
    }

    /// Appends a telemetry event (admin API).
    pub fn push_telemetry(&self, category: &str, data: serde_json::Value) {
        let mut state = self.lock();
        Self::record(&mut state, category, data);
    }

    // ---- auth ----

    /// `POST /authenticate`.
    pub fn authenticate(&self, username: &str, password: &str) -> Result<String, ApiError> {
        if username != self.opts.username || password != self.opts.password {
            return Err(ApiError::new(403, "Authentication failed!"));
        }
        let token = format!("sim-{}", uuid::Uuid::new_v4().simple());
        let mut state = self.lock();
        state.tokens.insert(token.clone(), Instant::now());
        state.authentications += 1;
        Ok(token)
    }

    /// Checks a bearer token.
    pub fn authorize(&self, token: Option<&str>) -> Result<(), ApiError> {
        let Some(token) = token else {
            return Err(ApiError::new(401, "No authorization token provided."));
        };
        let mut state = self.lock();
        match state.tokens.get(token) {
            Some(issued) if issued.elapsed() < self.opts.token_ttl => Ok(()),
            Some(_) => {
                state.tokens.remove(token);
                Err(ApiError::new(401, "Token has expired."))
            }
            None => Err(ApiError::new(401, "Invalid token.")),
        }
    }

    // ---- system ----

    /// `GET /system_information`.
    pub fn system_information(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.opts.version,
            "ready": self.is_ready(),
            "allow_ssh_pubkey_auth": true,
            "oui": "52:54:00",
        })
    }

    fn is_licensed(registration: &Registration) -> bool {
        match registration {
            Registration::Completed => true,
            Registration::Unregistered(mode) | Registration::Failed(mode) => {
                *mode == LicenceMode::Evaluation
            }
            // Whatever held before the attempt still holds.
            Registration::InProgress { licensed, .. } => *licensed,
        }
    }

    /// `GET /system_health`.
    pub fn system_health(&self) -> serde_json::Value {
        let ready = self.is_ready();
        let state = self.lock();
        let computes: serde_json::Map<String, serde_json::Value> = (0..self.computes())
            .map(|i| {
                (
                    compute_id(i),
                    serde_json::json!({
                        "valid": ready,
                        "is_registered": true,
                        "is_connected": true,
                        "is_ready": ready,
                        "cpu_usage": 0, "memory_usage": 0, "disk_usage": 0,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "valid": ready,
            "is_licensed": Self::is_licensed(&state.registration),
            "is_enterprise": self.opts.enterprise,
            "computes": computes,
            "controller": {"valid": ready, "is_primary": true, "is_active": true, "has_quorum": true},
        })
    }

    fn computes(&self) -> usize {
        self.opts.computes.max(1) as usize
    }

    /// `GET /system_stats`: resources move with the running nodes.
    pub fn system_stats(&self) -> serde_json::Value {
        const MIB: u64 = 1024 * 1024;
        let state = self.lock();
        let n = self.computes();
        let opts = &self.opts;
        let mut per = vec![(0u64, 0u64, 0u64, 0u64); n]; // cpus, mem MiB, total, running
        for lab in &state.labs {
            for node in &lab.nodes {
                let slot = &mut per[node.compute % n];
                slot.2 += 1;
                if lab.state.is_running() {
                    slot.0 += u64::from(node.cpus);
                    slot.1 += node.ram_mib;
                    slot.3 += 1;
                }
            }
        }
        let share =
            |total: u64, i: usize| total / n as u64 + u64::from(i == 0) * (total % n as u64);
        let usage = |total: u64, used: u64| {
            let used = used.min(total);
            serde_json::json!({"total": total, "free": total - used, "used": used})
        };
        let percent = |cores: u64, cpus: u64| {
            if cores == 0 {
                return 100.0;
            }
            (opts.base_cpu_percent + 100.0 * cpus as f64 * opts.node_cpu_load / cores as f64)
                .clamp(0.0, 100.0)
        };
        let mut computes = serde_json::Map::new();
        for (i, (cpus, mem, total, running)) in per.iter().enumerate() {
            let cores = share(u64::from(opts.cpu_cores), i);
            let memory = share(opts.memory_bytes, i);
            let disk = share(opts.disk_bytes, i);
            let pct = percent(cores, *cpus);
            let load = pct / 100.0 * cores as f64;
            computes.insert(
                compute_id(i),
                serde_json::json!({
                    "hostname": if i == 0 { "cml-controller".to_owned() } else { format!("cml-compute-{i}") },
                    "is_controller": i == 0,
                    "stats": {
                        "cpu": {"load": [load, load, load], "count": cores, "percent": pct,
                                "model": "Simulated CPU", "predicted": *cpus},
                        "memory": usage(memory, share(opts.base_memory_bytes, i) + mem * MIB),
                        "disk": usage(disk, share(opts.base_disk_bytes, i) + total * opts.node_disk_bytes),
                        "dominfo": {"allocated_cpus": cpus, "allocated_memory": mem,
                                    "total_nodes": total, "total_orphans": 0,
                                    "running_nodes": running, "running_orphans": 0},
                    }
                }),
            );
        }
        let cpus: u64 = per.iter().map(|p| p.0).sum();
        let mem: u64 = per.iter().map(|p| p.1).sum();
        let total: u64 = per.iter().map(|p| p.2).sum();
        let disk_used = opts.base_disk_bytes + total * opts.node_disk_bytes;
        serde_json::json!({
            "all": {
                "cpu": {"count": opts.cpu_cores, "percent": percent(u64::from(opts.cpu_cores), cpus)},
                "memory": usage(opts.memory_bytes, opts.base_memory_bytes + mem * MIB),
                "disk": usage(opts.disk_bytes, disk_used),
            },
            "controller": {"disk": usage(opts.disk_bytes, disk_used)},
            "computes": computes,
        })
    }

    // ---- licensing ----

    fn statuses(registration: &Registration) -> (&'static str, &'static str) {
        let auth = |mode: &LicenceMode| match mode {
            LicenceMode::Evaluation => "EVAL",
            _ => "NOT_AUTHORIZED",
        };
        match registration {
            Registration::Unregistered(LicenceMode::Evaluation) => ("EVALUATION", "EVAL"),
            Registration::Unregistered(_) => ("NOT_REGISTERED", "NOT_AUTHORIZED"),
            Registration::InProgress { authorization, .. } => ("IN_PROGRESS", authorization),
            Registration::Completed => ("COMPLETED", "AUTHORIZED"),
            Registration::Failed(mode) => ("FAILED", auth(mode)),
        }
    }

    /// `GET /licensing`.
    pub fn licensing(&self) -> serde_json::Value {
        let state = self.lock();
        let (registration, authorization) = Self::statuses(&state.registration);
        let registered = matches!(state.registration, Registration::Completed);
        serde_json::json!({
            "registration": {
                "status": registration,
                "smart_account": if registered { "Simulated Account" } else { "" },
                "virtual_account": if registered { "Simulated VA" } else { "" },
                "expires": serde_json::Value::Null,
                "register_time": {"attempted": state.register_attempted, "succeeded": state.register_succeeded},
                "renew_time": {"attempted": null, "scheduled": null},
            },
            "authorization": {"status": authorization, "expires": null, "renew_time": {"attempted": null, "scheduled": null}},
            "product_license": {"active": if self.opts.enterprise { "CML_Enterprise" } else { "CML_Personal" },
                                "is_enterprise": self.opts.enterprise},
            "features": [{"name": "CML - Base", "description": "Simulated base licence", "status": authorization,
                          "in_use": 1, "min": 0, "max": 1, "version": "1.0"},
                         {"name": "CML - Expansion Nodes", "description": "Simulated node licence", "status": authorization,
                          "in_use": state.labs.iter().filter(|l| l.state.is_running()).map(|l| l.nodes.len()).sum::<usize>(),
                          "min": 0, "max": self.opts.node_limit, "version": "1.0"}],
            "udi": {"hostname": self.name, "product_uuid": self.product_uuid},
            "transport": {"ssms": "https://smartreceiver.cisco.com/licservice/license",
                          "default_ssms": "https://smartreceiver.cisco.com/licservice/license",
                          "proxy": {"server": null, "port": null}},
        })
    }

    /// `POST /licensing/registration`.
    pub fn register(&self, token: &str, reregister: bool) -> Result<(), ApiError> {
        let mut state = self.lock();
        match state.registration {
            Registration::InProgress { .. } => {
                return Err(ApiError::new(409, "A registration is already in progress."));
            }
            Registration::Completed if !reregister => {
                return Err(ApiError::new(
                    400,
                    "The product is already registered; set reregister to register again.",
                ));
            }
            _ => {}
        }
        if token.trim().is_empty() || token == INVALID_LICENCE_TOKEN {
            return Err(ApiError::new(400, "Invalid token."));
        }
        state.registration = Registration::InProgress {
            until: Instant::now() + self.opts.registration_delay,
            fails: state.faults.fail_registration,
            licensed: Self::is_licensed(&state.registration),
            authorization: Self::statuses(&state.registration).1,
        };
        state.register_attempted = Some(iso_now());
        Ok(())
    }

    /// `DELETE /licensing/deregistration` → 204 or 202 (local only).
    pub fn deregister(&self) -> Result<u16, ApiError> {
        let mut state = self.lock();
        match state.registration {
            Registration::InProgress { .. } => Err(ApiError::new(
                409,
                "A registration is in progress; deregister when it is done.",
            )),
            Registration::Completed => {
                state.registration = Registration::Unregistered(match self.opts.licence {
                    LicenceMode::Registered => LicenceMode::Unregistered,
                    mode => mode,
                });
                state.register_succeeded = None;
                Ok(if state.faults.deregistration_local_only {
                    202
                } else {
                    204
                })
            }
            _ => Err(ApiError::new(400, "Already deregistered")),
        }
    }

    // ---- labs ----

    fn lab_json(lab: &Lab) -> serde_json::Value {
        serde_json::json!({
            "id": lab.id,
            "lab_title": lab.title,
            "lab_description": lab.description,
            "lab_notes": lab.notes,
            "state": lab.state.as_str(),
            "owner": ADMIN_USER_ID,
            "owner_username": "admin",
            "owner_fullname": "Administrator",
            "node_count": lab.nodes.len(),
            "link_count": lab.link_count,
            "created": lab.created,
            "modified": lab.modified,
            "groups": [],
            "effective_permissions": ["lab_admin", "lab_edit", "lab_exec", "lab_view"],
        })
    }

    /// `GET /labs`: lab ids, oldest first.
    pub fn list_labs(&self) -> Vec<String> {
        self.lock().labs.iter().map(|l| l.id.clone()).collect()
    }

    /// `GET /labs/{id}`.
    pub fn get_lab(&self, lab_id: &str) -> Result<serde_json::Value, ApiError> {
        let state = self.lock();
        state
            .labs
            .iter()
            .find(|l| l.id == lab_id)
            .map(Self::lab_json)
            .ok_or_else(|| not_found(lab_id))
    }

    /// `GET /labs/{id}/download`.
    pub fn download(&self, lab_id: &str) -> Result<String, ApiError> {
        let state = self.lock();
        state
            .labs
            .iter()
            .find(|l| l.id == lab_id)
            .map(|l| l.yaml.clone())
            .ok_or_else(|| not_found(lab_id))
    }

    /// Consumes one injected import failure, if any.
    pub fn take_import_fault(&self) -> bool {
        take(&mut self.lock().faults.fail_imports)
    }

    /// `POST /import`: checks the YAML, stores the lab as `DEFINED_ON_CORE`, returns its id.
    pub fn import(&self, yaml: String, title: Option<String>) -> Result<String, ApiError> {
        let Topology {
            title: yaml_title,
            description,
            notes,
            nodes,
            link_count,
        } = topology::parse(&yaml).map_err(|e| ApiError::new(400, e))?;
        let mut state = self.lock();
        let computes = self.computes();
        let mut next = state.next_compute;
        let nodes = nodes
            .into_iter()
            .map(|topo| {
                let compute = next % computes;
                next += 1;
                Node {
                    cpus: topo.cpus.unwrap_or(self.opts.default_node_cpus),
                    ram_mib: topo.ram_mib.unwrap_or(self.opts.default_node_memory_mib),
                    compute,
                    topo,
                }
            })
            .collect();
        state.next_compute = next;
        let id = uuid::Uuid::new_v4().to_string();
        let now = iso_now();
        let title = title
            .filter(|t| !t.is_empty())
            .or(yaml_title)
            .unwrap_or_else(|| format!("Lab at {now}"));
        state.labs.push(Lab {
            id: id.clone(),
            title,
            description,
            notes,
            state: LabState::DefinedOnCore,
            yaml,
            nodes,
            link_count,
            created: now.clone(),
            modified: now,
            started_at: None,
        });
        Self::record(
            &mut state,
            "import_lab",
            serde_json::json!({"lab_id": id, "user_id": ADMIN_USER_ID}),
        );
        Ok(id)
    }

    /// Checks that the lab exists; consumes a start/stop fault when one is armed.
    pub fn pre_action(&self, lab_id: &str, action: LabAction) -> Result<(), ApiError> {
        let mut state = self.lock();
        if !state.labs.iter().any(|l| l.id == lab_id) {
            return Err(not_found(lab_id));
        }
        let fault = match action {
            LabAction::Start => take(&mut state.faults.fail_starts),
            LabAction::Stop => take(&mut state.faults.fail_stops),
            LabAction::Wipe => false,
        };
        if fault {
            return Err(ApiError::new(
                500,
                format!(
                    "The API at /api/v0/labs/{lab_id}/{} encountered an unexpected error (simulated).",
                    action.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// `PUT /labs/{id}/start|stop|wipe`.
    pub fn lab_action(&self, lab_id: &str, action: LabAction) -> Result<(), ApiError> {
        let mut state = self.lock();
        let running_elsewhere: usize = state
            .labs
            .iter()
            .filter(|l| l.id != lab_id && l.state.is_running())
            .map(|l| l.nodes.len())
            .sum();
        let lab = state
            .labs
            .iter_mut()
            .find(|l| l.id == lab_id)
            .ok_or_else(|| not_found(lab_id))?;
        let category = match action {
            LabAction::Start => {
                if lab.state.is_running() {
                    return Ok(());
                }
                if let Some(limit) = self.opts.node_limit
                    && running_elsewhere + lab.nodes.len() > limit as usize
                {
                    return Err(ApiError::new(
                        400,
                        format!(
                            "Starting {} nodes would exceed the licensed node limit of {limit} ({running_elsewhere} running).",
                            lab.nodes.len()
                        ),
                    ));
                }
                lab.state = if self.opts.boot_duration.is_zero() {
                    LabState::Booted
                } else {
                    LabState::Started
                };
                lab.started_at = Some(Instant::now());
                "start_lab"
            }
            LabAction::Stop => {
                if !lab.state.is_running() {
                    return Ok(());
                }
                lab.state = LabState::Stopped;
                lab.started_at = None;
                "stop_lab"
            }
            LabAction::Wipe => {
                if lab.state.is_running() {
                    return Err(ApiError::new(
                        400,
                        format!("Lab {lab_id} has running nodes: stop it before wiping it."),
                    ));
                }
                lab.state = LabState::DefinedOnCore;
                "wipe_lab"
            }
        };
        lab.modified = iso_now();
        let data = serde_json::json!({"lab_id": lab_id, "user_id": ADMIN_USER_ID});
        Self::record(&mut state, category, data);
        Ok(())
    }

    /// `DELETE /labs/{id}`: only a lab whose nodes do not run.
    pub fn delete_lab(&self, lab_id: &str) -> Result<(), ApiError> {
        let mut state = self.lock();
        let index = state
            .labs
            .iter()
            .position(|l| l.id == lab_id)
            .ok_or_else(|| not_found(lab_id))?;
        if state.labs[index].state.is_running() {
            return Err(ApiError::new(
                400,
                format!("Lab {lab_id} has running nodes: stop it before deleting it."),
            ));
        }
        state.labs.remove(index);
        let data = serde_json::json!({"lab_id": lab_id, "user_id": ADMIN_USER_ID});
        Self::record(&mut state, "delete_lab", data);
        Ok(())
    }

    /// `GET /telemetry/events`.
    pub fn telemetry(&self) -> serde_json::Value {
        let state = self.lock();
        serde_json::Value::Array(
            state
                .telemetry
                .iter()
                .map(|e| {
                    serde_json::json!({"category": e.category, "timestamp": e.timestamp, "data": e.data})
                })
                .collect(),
        )
    }

    /// The admin snapshot.
    pub fn snapshot(&self) -> HostSnapshot {
        let ready = self.is_ready();
        let state = self.lock();
        let (registration, authorization) = Self::statuses(&state.registration);
        let labs: Vec<LabSnapshot> = state
            .labs
            .iter()
            .map(|l| LabSnapshot {
                id: l.id.clone(),
                title: l.title.clone(),
                state: l.state,
                yaml: l.yaml.clone(),
                nodes: l
                    .nodes
                    .iter()
                    .map(|n| NodeSnapshot {
                        id: n.topo.id.clone(),
                        label: n.topo.label.clone(),
                        node_definition: n.topo.node_definition.clone(),
                        cpus: n.cpus,
                        ram_mib: n.ram_mib,
                        tags: n.topo.tags.clone(),
                        compute: n.compute,
                    })
                    .collect(),
                link_count: l.link_count,
            })
            .collect();
        let total_nodes = labs.iter().map(|l| l.nodes.len() as u64).sum();
        let running_nodes = labs
            .iter()
            .filter(|l| l.state.is_running())
            .map(|l| l.nodes.len() as u64)
            .sum();
        let ttl = self.opts.token_ttl;
        HostSnapshot {
            host: self.name.clone(),
            ready,
            registration_status: registration.into(),
            authorization_status: authorization.into(),
            faults: state.faults.clone(),
            labs,
            total_nodes,
            running_nodes,
            telemetry_events: state.telemetry.len(),
            valid_tokens: state.tokens.values().filter(|t| t.elapsed() < ttl).count(),
            authentications: state.authentications,
        }
    }

    /// Latency to add to the next call, and whether the CML is down.
    pub fn gate(&self) -> (Duration, bool) {
        let state = self.lock();
        (
            Duration::from_millis(state.faults.latency_ms),
            state.faults.unreachable,
        )
    }
}

fn take(counter: &mut u32) -> bool {
    if *counter > 0 {
        *counter -= 1;
        true
    } else {
        false
    }
}

fn compute_id(index: usize) -> String {
    format!("99c887f5-052e-4864-a583-49fa7c4b68{index:02x}")
}

/// A lab operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabAction {
    /// Start.
    Start,
    /// Stop.
    Stop,
    /// Wipe.
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
