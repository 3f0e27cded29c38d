//! [`SimulatedCloud`]: an in-memory cloud for `ccm dev` and simulations.
//!
//! Instances move through EC2's states as the injected [`Clock`] advances: `pending` for
//! [`SimulatedConfig::boot_time`], then `running`; `stopping` for
//! [`SimulatedConfig::stop_time`], then `stopped`; `shutting-down` for
//! [`SimulatedConfig::terminate_time`], then `terminated`, and forgotten
//! [`SimulatedConfig::terminated_retention`] later (EC2 keeps terminated instances visible for
//! about an hour). Nothing runs in the background: each call first brings every instance up to
//! the clock's "now", so a [`ManualClock`](ccm_core::clock::ManualClock) drives it without
//! sleeping.
//!
//! Like EC2: ids are `i-` + 17 hex digits and `ami-` + 17 hex digits; a running instance has a
//! private IP (10.0.0.0/16, kept for its life) and a public IP (from 198.18.0.0/15, released on
//! stop, a new one on start); launches are idempotent on the worker id while the instance is not
//! terminated; the image must exist (catalog: [`default_images`] plus
//! [`SimulatedCloud::add_image`]).
//!
//! Failure injection: [`SimulatedCloud::fail_next`] (the next N calls of one operation fail with
//! a given error), [`SimulatedCloud::set_instance_limit`] (launches beyond N live instances fail
//! with [`CloudError::Quota`]) and [`SimulatedCloud::kill`] (an instance dies: shutting-down, then
//! terminated, as when AWS retires the host).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use ccm_core::clock::Clock;
use chrono::{DateTime, Duration, Utc};
use tracing::{debug, info};

use crate::error::CloudError;
use crate::provider::{
    CloudImage, CloudInstance, CloudProvider, InstanceState, LaunchRequest, ListFilter,
    MAX_TAGS_PER_RESOURCE, TAG_MANAGED, glob_matches, newest_image, validate_tag_key,
    validate_tags,
};

/// Time from launch or start to `running` (a real CML worker takes minutes; dev mode keeps it
/// short so the whole lifecycle is visible quickly).
pub const DEFAULT_BOOT_TIME: Duration = Duration::seconds(5);
/// Time from stop to `stopped`.
pub const DEFAULT_STOP_TIME: Duration = Duration::seconds(3);
/// Time from terminate to `terminated`.
pub const DEFAULT_TERMINATE_TIME: Duration = Duration::seconds(3);
/// How long a terminated instance stays visible (EC2: about an hour).
pub const DEFAULT_TERMINATED_RETENTION: Duration = Duration::hours(1);
/// Creation date of the images in [`default_images`].
pub const DEFAULT_IMAGE_CREATION_DATES: [&str; 3] = [
    "2025-06-01T00:00:00.000Z",
    "2025-09-01T00:00:00.000Z",
    "2026-01-10T00:00:00.000Z",
];
/// Root device of simulated images.
pub const SIMULATED_ROOT_DEVICE: &str = "/dev/xvda";

/// The images a new [`SimulatedCloud`] knows: CML 2.7, 2.8 and 2.9 lablet images, newest last.
pub fn default_images() -> Vec<CloudImage> {
    [
        "cml-2.7.0-lablet-v0.1.0",
        "cml-2.8.0-lablet-v0.1.0",
        "cml-2.9.0-lablet-v0.1.0",
    ]
    .iter()
    .zip(DEFAULT_IMAGE_CREATION_DATES)
    .enumerate()
    .map(|(i, (name, date))| CloudImage {
        image_id: format!("ami-{:017x}", 0xc3100 + i),
        name: (*name).to_owned(),
        description: format!("Cisco Modeling Labs {name} (simulated)"),
        creation_date: date.to_owned(),
        root_device_name: Some(SIMULATED_ROOT_DEVICE.to_owned()),
    })
    .collect()
}

/// Timings and limits of a [`SimulatedCloud`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedConfig {
    /// Launch or start → running.
    pub boot_time: Duration,
    /// Stop → stopped.
    pub stop_time: Duration,
    /// Terminate (or [`SimulatedCloud::kill`]) → terminated.
    pub terminate_time: Duration,
    /// Terminated → forgotten.
    pub terminated_retention: Duration,
    /// Most instances not terminated at once; more launches fail with
    /// [`CloudError::Quota`] (`InstanceLimitExceeded`). `None`: no limit.
    pub instance_limit: Option<usize>,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            boot_time: DEFAULT_BOOT_TIME,
            stop_time: DEFAULT_STOP_TIME,
            terminate_time: DEFAULT_TERMINATE_TIME,
            terminated_retention: DEFAULT_TERMINATED_RETENTION,
            instance_limit: None,
        }
    }
}

/// The calls failure injection can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// [`CloudProvider::launch`].
    Launch,
    /// [`CloudProvider::start`].
    Start,
    /// [`CloudProvider::stop`].
    Stop,
    /// [`CloudProvider::terminate`].
    Terminate,
    /// [`CloudProvider::describe`].
    Describe,
    /// [`CloudProvider::list`].
    List,
    /// [`CloudProvider::update_tags`].
    UpdateTags,
    /// [`CloudProvider::find_image`].
    FindImage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending { until: DateTime<Utc> },
    Running,
    Stopping { until: DateTime<Utc> },
    Stopped,
    ShuttingDown { until: DateTime<Utc> },
    Terminated { at: DateTime<Utc> },
}

#[derive(Debug, Clone)]
struct SimInstance {
    id: String,
    worker_id: String,
    instance_type: String,
    image_id: String,
    private_ip: String,
    public_ip: Option<String>,
    launch_time: DateTime<Utc>,
    tags: BTreeMap<String, String>,
    phase: Phase,
}

impl SimInstance {
    fn state(&self) -> InstanceState {
        match self.phase {
            Phase::Pending { .. } => InstanceState::Pending,
            Phase::Running => InstanceState::Running,
            Phase::Stopping { .. } => InstanceState::Stopping,
            Phase::Stopped => InstanceState::Stopped,
            Phase::ShuttingDown { .. } => InstanceState::ShuttingDown,
            Phase::Terminated { .. } => InstanceState::Terminated,
        }
    }

    fn to_cloud(&self) -> CloudInstance {
        CloudInstance {
            instance_id: self.id.clone(),
            state: self.state(),
            instance_type: self.instance_type.clone(),
            image_id: self.image_id.clone(),
            public_ip: self.public_ip.clone(),
            private_ip: Some(self.private_ip.clone()),
            launch_time: Some(self.launch_time),
            tags: self.tags.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<String, SimInstance>,
    images: Vec<CloudImage>,
    failures: HashMap<Operation, VecDeque<CloudError>>,
    instance_limit: Option<usize>,
    next_private: u32,
    next_public: u32,
    next_image: u64,
    launches: u64,
}

impl State {
    /// Brings every instance to `now`.
    fn settle(&mut self, now: DateTime<Utc>, retention: Duration) {
        let mut public_ips = Vec::new();
        for inst in self.instances.values_mut() {
            match inst.phase {
                Phase::Pending { until } if now >= until => {
                    inst.phase = Phase::Running;
                    public_ips.push(inst.id.clone());
                }
                Phase::Stopping { until } if now >= until => inst.phase = Phase::Stopped,
                Phase::ShuttingDown { until } if now >= until => {
                    inst.phase = Phase::Terminated { at: until };
                }
                _ => {}
            }
        }
        for id in public_ips {
            let ip = self.public_ip();
            if let Some(inst) = self.instances.get_mut(&id) {
                inst.public_ip = Some(ip);
            }
        }
        self.instances.retain(|_, inst| match inst.phase {
            Phase::Terminated { at } => now < at + retention,
            _ => true,
        });
    }

    fn take_failure(&mut self, op: Operation) -> Result<(), CloudError> {
        match self.failures.get_mut(&op).and_then(VecDeque::pop_front) {
            Some(err) => {
                debug!(?op, %err, "injected failure");
                Err(err)
            }
            None => Ok(()),
        }
    }

    fn private_ip(&mut self) -> String {
        let n = self.next_private;
        self.next_private = self.next_private.wrapping_add(1);
        // 10.0.0.0/16, skipping .0 and .255 host bytes.
        let host = n % 254 + 1;
        let subnet = (n / 254) % 256;
        format!("10.0.{subnet}.{host}")
    }

    fn public_ip(&mut self) -> String {
        let n = self.next_public;
        self.next_public = self.next_public.wrapping_add(1);
        // 198.18.0.0/15 (reserved for benchmarking, never routed).
        let host = n % 254 + 1;
        let third = (n / 254) % 512;
        format!("198.{}.{}.{host}", 18 + third / 256, third % 256)
    }

    fn live_count(&self) -> usize {
        self.instances
            .values()
            .filter(|i| !matches!(i.phase, Phase::Terminated { .. }))
            .count()
    }

    fn get_mut(&mut self, instance_id: &str) -> Result<&mut SimInstance, CloudError> {
        check_instance_id(instance_id)?;
        self.instances
            .get_mut(instance_id)
            .ok_or_else(|| not_found(instance_id))
    }
}

fn not_found(instance_id: &str) -> CloudError {
    CloudError::NotFound(format!(
        "InvalidInstanceID.NotFound: the instance ID '{instance_id}' does not exist"
    ))
}

fn incorrect_state(instance_id: &str, state: InstanceState, action: &str) -> CloudError {
    CloudError::InvalidRequest(format!(
        "IncorrectInstanceState: the instance '{instance_id}' is {} and cannot be {action}",
        state.as_str()
    ))
}

/// EC2's id shape: `i-` and 8 or 17 lowercase hex digits.
fn check_instance_id(instance_id: &str) -> Result<(), CloudError> {
    let ok = instance_id.strip_prefix("i-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    });
    if ok {
        Ok(())
    } else {
        Err(CloudError::InvalidRequest(format!(
            "InvalidInstanceID.Malformed: invalid id {instance_id:?} (expecting \"i-...\")"
        )))
    }
}

fn random_hex17() -> String {
    // A v4 UUID holds 122 random bits; 17 hex digits use 68 of them.
    let hex = uuid::Uuid::new_v4().simple().to_string();
    hex[hex.len() - 17..].to_owned()
}

/// An in-memory cloud whose instances move with a [`Clock`]. Clones share the cloud.
#[derive(Clone)]
pub struct SimulatedCloud {
    clock: Arc<dyn Clock>,
    config: SimulatedConfig,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimulatedCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedCloud")
            .field("config", &self.config)
            .field("instances", &self.lock().instances.len())
            .finish_non_exhaustive()
    }
}

impl SimulatedCloud {
    /// A cloud with [`default_images`], timed by `clock`.
    pub fn new(clock: Arc<dyn Clock>, config: SimulatedConfig) -> Self {
        let state = State {
            images: default_images(),
            instance_limit: config.instance_limit,
            ..State::default()
        };
        Self {
            clock,
            config,
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &SimulatedConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the state brought up to now, and consumes an injected failure of `op`.
    fn begin(&self, op: Operation) -> Result<(MutexGuard<'_, State>, DateTime<Utc>), CloudError> {
        let now = self.clock.now();
        let mut state = self.lock();
        state.settle(now, self.config.terminated_retention);
        state.take_failure(op)?;
        Ok((state, now))
    }

    /// Adds an image to the catalog, created now; returns it.
    pub fn add_image(&self, name: &str, description: &str) -> CloudImage {
        let now = self.clock.now();
        let mut state = self.lock();
        state.next_image += 1;
        let image = CloudImage {
            image_id: format!("ami-{:017x}", 0x5_0000_0000 + state.next_image),
            name: name.to_owned(),
            description: description.to_owned(),
            creation_date: now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            root_device_name: Some(SIMULATED_ROOT_DEVICE.to_owned()),
        };
        state.images.push(image.clone());
        image
    }

    /// Every image in the catalog.
    pub fn images(&self) -> Vec<CloudImage> {
        self.lock().images.clone()
    }

    /// The next `count` calls of `op` fail with `error` (added after failures already queued).
    pub fn fail_next(&self, op: Operation, count: usize, error: CloudError) {
        let mut state = self.lock();
        let queue = state.failures.entry(op).or_default();
        queue.extend(std::iter::repeat_n(error, count));
    }

    /// The next `count` launches fail with `error` (usually [`CloudError::Quota`] or
    /// [`CloudError::Unavailable`]).
    pub fn fail_next_launches(&self, count: usize, error: CloudError) {
        self.fail_next(Operation::Launch, count, error);
    }

    /// Drops every queued injected failure.
    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    /// Caps instances that are not terminated (`None`: no cap).
    pub fn set_instance_limit(&self, limit: Option<usize>) {
        self.lock().instance_limit = limit;
    }

    /// The instance dies as if AWS retired its host: `shutting-down` now, `terminated` after the
    /// terminate time. An instance already terminated is left alone.
    pub fn kill(&self, instance_id: &str) -> Result<(), CloudError> {
        let now = self.clock.now();
        let mut state = self.lock();
        state.settle(now, self.config.terminated_retention);
        let until = now + self.config.terminate_time;
        let inst = state.get_mut(instance_id)?;
        if !matches!(
            inst.phase,
            Phase::Terminated { .. } | Phase::ShuttingDown { .. }
        ) {
            info!(instance_id, "simulated instance dies");
            inst.phase = Phase::ShuttingDown { until };
            inst.public_ip = None;
        }
        Ok(())
    }

    /// How many launches created an instance so far (idempotent repeats not counted).
    pub fn launch_count(&self) -> u64 {
        self.lock().launches
    }
}

#[async_trait]
impl CloudProvider for SimulatedCloud {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<CloudInstance, CloudError> {
        request.validate()?;
        let (mut state, now) = self.begin(Operation::Launch)?;
        if let Some(existing) = state
            .instances
            .values()
            .filter(|i| i.worker_id == request.worker_id)
            .find(|i| !matches!(i.phase, Phase::Terminated { .. }))
        {
            return Ok(existing.to_cloud());
        }
        let image = if request.ami_id.trim().is_empty() {
            newest_image(
                state
                    .images
                    .iter()
                    .filter(|i| glob_matches(&request.ami_name_pattern, &i.name))
                    .cloned(),
            )
            .ok_or_else(|| {
                CloudError::InvalidRequest(format!(
                    "no image name matches {:?}",
                    request.ami_name_pattern
                ))
            })?
        } else {
            let id = request.ami_id.trim();
            state
                .images
                .iter()
                .find(|i| i.image_id == id)
                .cloned()
                .ok_or_else(|| {
                    CloudError::InvalidRequest(format!(
                        "InvalidAMIID.NotFound: the image id '[{id}]' does not exist"
                    ))
                })?
        };
        if let Some(limit) = state.instance_limit
            && state.live_count() >= limit
        {
            return Err(CloudError::Quota(format!(
                "InstanceLimitExceeded: the limit of {limit} instances is reached"
            )));
        }
        let id = loop {
            let id = format!("i-{}", random_hex17());
            if !state.instances.contains_key(&id) {
                break id;
            }
        };
        let private_ip = state.private_ip();
        let inst = SimInstance {
            id: id.clone(),
            worker_id: request.worker_id.clone(),
            instance_type: request.instance_type.trim().to_owned(),
            image_id: image.image_id,
            private_ip,
            public_ip: None,
            launch_time: now,
            tags: request.instance_tags(),
            phase: Phase::Pending {
                until: now + self.config.boot_time,
            },
        };
        let described = inst.to_cloud();
        state.instances.insert(id.clone(), inst);
        state.launches += 1;
        // A zero boot time means "running at once".
        state.settle(now, self.config.terminated_retention);
        info!(instance_id = %id, worker_id = %request.worker_id, "simulated launch");
        Ok(described)
    }

    async fn start(&self, instance_id: &str) -> Result<(), CloudError> {
        let (mut state, now) = self.begin(Operation::Start)?;
        let boot = self.config.boot_time;
        let inst = state.get_mut(instance_id)?;
        match inst.phase {
            Phase::Stopped => {
                inst.phase = Phase::Pending { until: now + boot };
                inst.launch_time = now;
            }
            Phase::Pending { .. } | Phase::Running => {}
            _ => return Err(incorrect_state(instance_id, inst.state(), "started")),
        }
        state.settle(now, self.config.terminated_retention);
        Ok(())
    }

    async fn stop(&self, instance_id: &str) -> Result<(), CloudError> {
        let (mut state, now) = self.begin(Operation::Stop)?;
        let stop = self.config.stop_time;
        let inst = state.get_mut(instance_id)?;
        match inst.phase {
            Phase::Pending { .. } | Phase::Running => {
                inst.phase = Phase::Stopping { until: now + stop };
                inst.public_ip = None;
            }
            Phase::Stopping { .. } | Phase::Stopped => {}
            _ => return Err(incorrect_state(instance_id, inst.state(), "stopped")),
        }
        state.settle(now, self.config.terminated_retention);
        Ok(())
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), CloudError> {
        let (mut state, now) = self.begin(Operation::Terminate)?;
        let until = now + self.config.terminate_time;
        match state.get_mut(instance_id) {
            Ok(inst) => {
                if !matches!(
                    inst.phase,
                    Phase::ShuttingDown { .. } | Phase::Terminated { .. }
                ) {
                    inst.phase = Phase::ShuttingDown { until };
                    inst.public_ip = None;
                }
            }
            Err(CloudError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        state.settle(now, self.config.terminated_retention);
        Ok(())
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<CloudInstance>, CloudError> {
        let (mut state, _) = self.begin(Operation::Describe)?;
        match state.get_mut(instance_id) {
            Ok(inst) => Ok(Some(inst.to_cloud())),
            Err(CloudError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<CloudInstance>, CloudError> {
        let (state, _) = self.begin(Operation::List)?;
        Ok(state
            .instances
            .values()
            .filter(|i| filter.include_terminated || !matches!(i.phase, Phase::Terminated { .. }))
            .filter(|i| {
                !filter.managed_only || i.tags.get(TAG_MANAGED).is_some_and(|v| v == "true")
            })
            .filter(|i| filter.instance_ids.is_empty() || filter.instance_ids.contains(&i.id))
            .filter(|i| filter.tags.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
            .map(SimInstance::to_cloud)
            .collect())
    }

    async fn update_tags(
        &self,
        instance_id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<(), CloudError> {
        validate_tags(set)?;
        for key in remove {
            validate_tag_key(key)?;
        }
        let (mut state, _) = self.begin(Operation::UpdateTags)?;
        let inst = state.get_mut(instance_id)?;
        let mut tags = inst.tags.clone();
        for (k, v) in set {
            tags.insert(k.clone(), v.clone());
        }
        for k in remove {
            if !set.contains_key(k) {
                tags.remove(k);
            }
        }
        if tags.len() > MAX_TAGS_PER_RESOURCE {
            return Err(CloudError::Quota(format!(
                "TagLimitExceeded: instance {instance_id} would have {} tags (at most \
                 {MAX_TAGS_PER_RESOURCE})",
                tags.len()
            )));
        }
        inst.tags = tags;
        Ok(())
    }

    async fn find_image(&self, name_pattern: &str) -> Result<Option<CloudImage>, CloudError> {
        if name_pattern.trim().is_empty() {
            return Err(CloudError::InvalidRequest(
                "image name pattern is empty".to_owned(),
            ));
        }
        let (state, _) = self.begin(Operation::FindImage)?;
        Ok(newest_image(
            state
                .images
                .iter()
                .filter(|i| glob_matches(name_pattern, &i.name))
                .cloned(),
        ))
    }
}
