//! The worker reconciler and the worker operations.
//!
//! # Workers
//!
//! Per worker, when due (booting and transitional states every pass up to the booting poll
//! interval, RUNNING / DRAINING every worker poll interval, at once on a manual reconcile):
//!
//! | state | action |
//! |---|---|
//! | PENDING without an EC2 instance | launch from the template (`CloudProvider::launch`, idempotent on the worker id) → PROVISIONING (`provisioning_started`). A launch the cloud refuses for good (bad AMI, subnet, credentials) → FAILED with the cloud's message; a retryable one backs off |
//! | STOPPED with desired RUNNING (admin Start) | → STARTING, `start` |
//! | STARTING | `start` (idempotent) |
//! | STOPPING | `stop` (idempotent) |
//! | SHUTTING_DOWN | `terminate`; never launched → TERMINATED (`never_launched`) |
//! | every worker with an EC2 instance | describe it and poll CML when EC2 runs: `system_information` decides the service status (AVAILABLE when ready, STARTING when it answers but is not ready, UNAVAILABLE when nothing answers), then health, stats, licensing and (every [`LABS_SYNC_INTERVAL`]) the labs; all reported in one `ReportWorker`, which maps the EC2 state through `ccm_core::worker::observe_ec2_state` (PROVISIONING / STARTING → RUNNING once CML is AVAILABLE; STOPPING → STOPPED; → TERMINATED when the instance vanished) |
//! | condition `TagsSynced=False` (admin UpdateWorkerTags) | applies the desired tag set to EC2 (sets changed keys, removes missing ones except `aws:`), then reports `TagsSynced=True` |
//!
//! # Operations
//!
//! PENDING WorkerOperations (RegisterWorkerLicense, DeregisterWorkerLicense, RefreshWorker,
//! ControlWorkerLab) are claimed (→ RUNNING; the licence token comes with the claim), carried
//! out in a background task, and completed SUCCEEDED or FAILED with the error. Registration polls
//! `GET /licensing` up to [`LICENSE_POLL_ATTEMPTS`] × `license_poll_interval` for `COMPLETED` /
//! `REGISTERED`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ccm_cloud::{CloudError, CloudInstance, LaunchRequest};
use ccm_cml::client::LabAction;
use ccm_cml::{CmlClient, CmlError};
use ccm_proto::v1 as pb;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;
use tracing::Instrument;

use crate::config::{ACTION_BACKOFF_BASE, ACTION_BACKOFF_MAX, LICENSE_POLL_ATTEMPTS};
use crate::controller::{BoxedRun, Controller, Scope, Snapshot, backoff, short_reason};
use crate::error::{ControllerError, Result};
use crate::plane::Fence;
use crate::status::ts;

/// How often a RUNNING worker's labs are re-synced (labs are also synced on a REFRESH with
/// `include_labs` and right after the worker became RUNNING).
pub const LABS_SYNC_INTERVAL: Duration = Duration::from_secs(300);
/// Condition type of the tag sync (set by the control plane on UpdateWorkerTags).
pub const TAGS_CONDITION: &str = "TagsSynced";
/// Reason recorded when a worker record never got an EC2 instance and is terminated.
pub const REASON_NEVER_LAUNCHED: &str = "never_launched";
/// Reason prefix of a launch the cloud refused for good.
pub const REASON_LAUNCH_FAILED: &str = "launch_failed";

impl Controller {
    pub(crate) async fn reconcile_workers(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        scope: &Scope,
    ) -> Result<(usize, usize)> {
        let targets: Vec<&pb::CmlWorker> = snap
            .workers
            .iter()
            .filter(|w| scope.target.as_deref().is_none_or(|t| t == w.id))
            .filter(|w| scope.force_poll || scope.target.is_some() || self.worker_due(w, snap.now))
            .collect();
        let force = scope.force_poll;
        let futures: Vec<BoxedRun<'_, pb::CmlWorker, bool>> = targets
            .into_iter()
            .map(|w| {
                let span = tracing::debug_span!("reconcile_worker", worker = %w.id, state = w.state().as_str_name());
                Box::pin(async move {
                    (w, self.reconcile_worker(fence, snap, w, force).instrument(span).await)
                }) as BoxedRun<'_, pb::CmlWorker, bool>
            })
            .collect();
        let mut results =
            futures::stream::iter(futures).buffer_unordered(self.inner.settings.concurrency.max(1));
        let (mut acted, mut errors) = (0, 0);
        let mut not_leader = None;
        while let Some((w, r)) = results.next().await {
            match r {
                Ok(true) => acted += 1,
                Ok(false) => {}
                Err(e @ ControllerError::NotLeader(_)) => not_leader = Some(e),
                Err(e) if e.is_conflict() => {
                    tracing::debug!(worker = %w.id, error = %e, "changed meanwhile; next pass looks again");
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(worker = %w.id, error = %e, "worker reconcile failed");
                }
            }
        }
        if let Some(e) = not_leader {
            return Err(e);
        }
        Ok((acted, errors))
    }

    fn worker_due(&self, w: &pb::CmlWorker, now: DateTime<Utc>) -> bool {
        if tags_pending(w) {
            return true;
        }
        let m = self.memory();
        if let Some((_, until)) = m.worker_backoff.get(&w.id)
            && *until > now
        {
            return false;
        }
        m.worker_next_poll
            .get(&w.id)
            .is_none_or(|next| *next <= now)
    }

    fn schedule_poll(&self, w: &pb::CmlWorker, now: DateTime<Utc>) {
        let s = &self.inner.settings;
        let every = match w.state() {
            pb::WorkerState::Running | pb::WorkerState::Draining | pb::WorkerState::Stopped => {
                s.worker_poll_interval
            }
            _ => s.booting_poll_interval,
        };
        let next = now + chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX);
        self.memory().worker_next_poll.insert(w.id.clone(), next);
    }

    fn worker_failed(&self, id: &str, now: DateTime<Utc>) {
        let mut m = self.memory();
        let e = m.worker_backoff.entry(id.to_owned()).or_insert((0, now));
        e.0 += 1;
        e.1 = now + backoff(e.0, ACTION_BACKOFF_BASE, ACTION_BACKOFF_MAX);
    }

    async fn move_worker(
        &self,
        fence: &Fence,
        w: &pb::CmlWorker,
        to: pb::WorkerState,
        reason: &str,
        aws_instance_id: &str,
    ) -> Result<pb::CmlWorker> {
        tracing::info!(worker = %w.id, from = w.state().as_str_name(), to = to.as_str_name(), reason, "worker transition");
        self.inner
            .plane
            .transition_worker(
                fence,
                pb::TransitionWorkerRequest {
                    worker_id: w.id.clone(),
                    from: w.state,
                    to: to as i32,
                    reason: short_reason(reason),
                    aws_instance_id: aws_instance_id.to_owned(),
                    ..Default::default()
                },
            )
            .await
    }

    /// One worker: the cloud action its state asks for, then an observation. Returns whether
    /// it changed anything.
    async fn reconcile_worker(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        w: &pb::CmlWorker,
        force: bool,
    ) -> Result<bool> {
        use pb::WorkerState as S;
        let now = snap.now;
        let cloud = &self.inner.deps.cloud;
        let aws_id = w
            .ec2
            .as_ref()
            .map(|e| e.instance_id.clone())
            .unwrap_or_default();
        let mut acted = false;
        let mut current = w.clone();
        let result: Result<()> = async {
            match (w.state(), aws_id.is_empty()) {
                (S::Pending, true) => {
                    let Some(template) = snap.template(&w.template_name) else {
                        return Err(ControllerError::Domain(format!(
                            "worker {} names template {:?}, which does not exist",
                            w.id, w.template_name
                        )));
                    };
                    let req = self.launch_request(w, template);
                    match cloud.launch(&req).await {
                        Ok(instance) => {
                            current = self
                                .move_worker(fence, w, S::Provisioning, ccm_core::worker::REASON_PROVISIONING_STARTED, &instance.instance_id)
                                .await?;
                            acted = true;
                        }
                        Err(e) if !e.is_retryable() => {
                            self.move_worker(fence, w, S::Failed, &format!("{REASON_LAUNCH_FAILED}: {e}"), "")
                                .await?;
                            return Ok(());
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                (S::ShuttingDown, true) => {
                    self.move_worker(fence, w, S::Terminated, REASON_NEVER_LAUNCHED, "")
                        .await?;
                    return Ok(());
                }
                (S::ShuttingDown, false) => {
                    cloud.terminate(&aws_id).await?;
                    acted = true;
                }
                (S::Stopped, false) if w.desired_state() == pb::WorkerDesiredState::Running => {
                    current = self
                        .move_worker(fence, w, S::Starting, ccm_core::worker::REASON_RESTART_REQUESTED, "")
                        .await?;
                    cloud.start(&aws_id).await?;
                    acted = true;
                }
                (S::Starting, false) => cloud.start(&aws_id).await?,
                (S::Stopping, false) => cloud.stop(&aws_id).await?,
                (S::Terminated, _) => return Ok(()),
                _ => {}
            }
            let current_aws = current
                .ec2
                .as_ref()
                .map(|e| e.instance_id.clone())
                .unwrap_or_default();
            if current_aws.is_empty() {
                return Ok(());
            }
            let described = cloud.describe(&current_aws).await?;
            let observation = self
                .observe(&current, described.as_ref(), force, now)
                .await?;
            let before = current.state;
            let after = self
                .inner
                .plane
                .report_worker(fence, &current.id, observation)
                .await?;
            if after.state != before {
                acted = true;
                tracing::info!(worker = %after.id, to = after.state().as_str_name(), reason = %after.state_reason, "worker moved by observation");
            }
            current = after;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                self.memory().worker_backoff.remove(&w.id);
                self.schedule_poll(&current, now);
                Ok(acted)
            }
            Err(e @ ControllerError::NotLeader(_)) => Err(e),
            Err(e) => {
                self.worker_failed(&w.id, now);
                Err(e)
            }
        }
    }

    fn launch_request(&self, w: &pb::CmlWorker, t: &pb::WorkerTemplate) -> LaunchRequest {
        let launch = &self.inner.settings.launch;
        let ec2 = w.ec2.clone().unwrap_or_default();
        LaunchRequest {
            worker_id: w.id.clone(),
            name: w.name.clone(),
            template_name: w.template_name.clone(),
            instance_type: if ec2.instance_type.is_empty() {
                t.instance_type.clone()
            } else {
                ec2.instance_type.clone()
            },
            ami_id: ec2.ami_id.clone(),
            ami_name_pattern: t.ami_pattern.clone(),
            subnet_id: launch.subnet_id.clone(),
            security_group_ids: launch.security_group_ids.clone(),
            key_name: launch.key_name.clone(),
            volume_size_gib: if launch.volume_size_gib > 0 {
                launch.volume_size_gib
            } else {
                u32::try_from(t.volume_size_gb).unwrap_or(0)
            },
            tags: ec2.tags.into_iter().collect(),
        }
    }

    /// What the cloud and CML say about `w` now, as an observation.
    async fn observe(
        &self,
        w: &pb::CmlWorker,
        described: Option<&CloudInstance>,
        force: bool,
        now: DateTime<Utc>,
    ) -> Result<pb::WorkerObservation> {
        let mut obs = pb::WorkerObservation {
            observed_at: Some(ts(now)),
            ..Default::default()
        };
        let Some(inst) = described else {
            // The cloud no longer knows the instance: it vanished.
            obs.ec2 = Some(pb::Ec2Info {
                instance_id: w
                    .ec2
                    .as_ref()
                    .map(|e| e.instance_id.clone())
                    .unwrap_or_default(),
                instance_state: "terminated".into(),
                last_checked_at: Some(ts(now)),
                ..w.ec2.clone().unwrap_or_default()
            });
            obs.service_status = pb::CmlServiceStatus::Unavailable as i32;
            return Ok(obs);
        };
        let mut tags = inst.tags.clone();
        if tags_pending(w) {
            let desired: BTreeMap<String, String> = w
                .ec2
                .as_ref()
                .map(|e| e.tags.clone().into_iter().collect())
                .unwrap_or_default();
            let set: BTreeMap<String, String> = desired
                .iter()
                .filter(|(k, v)| inst.tags.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let remove: Vec<String> = inst
                .tags
                .keys()
                .filter(|k| !desired.contains_key(*k) && !k.starts_with("aws:"))
                .cloned()
                .collect();
            self.inner
                .deps
                .cloud
                .update_tags(&inst.instance_id, &set, &remove)
                .await?;
            tags = desired;
            for (k, v) in inst.tags.iter().filter(|(k, _)| k.starts_with("aws:")) {
                tags.insert(k.clone(), v.clone());
            }
            obs.conditions.push(pb::Condition {
                r#type: TAGS_CONDITION.into(),
                status: pb::ConditionStatus::True as i32,
                reason: "Applied".into(),
                message: format!("{} tag(s) set, {} removed on EC2", set.len(), remove.len()),
                ..Default::default()
            });
        }
        let mut ec2 = pb::Ec2Info {
            instance_id: inst.instance_id.clone(),
            instance_type: inst.instance_type.clone(),
            ami_id: inst.image_id.clone(),
            region: w.ec2.as_ref().map(|e| e.region.clone()).unwrap_or_default(),
            public_ip: inst.public_ip.clone().unwrap_or_default(),
            private_ip: inst.private_ip.clone().unwrap_or_default(),
            tags: tags.into_iter().collect(),
            instance_state: inst.state.as_str().to_owned(),
            launch_time: inst.launch_time.map(ts),
            last_checked_at: Some(ts(now)),
            ..w.ec2.clone().unwrap_or_default()
        };
        ec2.https_endpoint = self.endpoint_of(&ec2).unwrap_or_default();
        let running = inst.state == ccm_cloud::InstanceState::Running;
        obs.ec2 = Some(ec2.clone());
        if !running {
            obs.service_status = pb::CmlServiceStatus::Unavailable as i32;
            return Ok(obs);
        }
        let mut probe = w.clone();
        probe.ec2 = Some(ec2);
        let Some(client) = self.cml_for(&probe)? else {
            obs.service_status = pb::CmlServiceStatus::Unavailable as i32;
            return Ok(obs);
        };
        let info = match client.system_information().await {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(worker = %w.id, error = %e, "CML does not answer");
                obs.service_status = pb::CmlServiceStatus::Unavailable as i32;
                return Ok(obs);
            }
        };
        obs.service_status = if info.ready {
            pb::CmlServiceStatus::Available
        } else {
            pb::CmlServiceStatus::Starting
        } as i32;
        let mut cml = pb::CmlInfo {
            version: info.version.clone(),
            ready: info.ready,
            last_synced_at: Some(ts(now)),
            ..Default::default()
        };
        if info.ready {
            self.poll_cml(w, &client, &mut cml, &mut obs, force, now)
                .await;
        }
        obs.cml = Some(cml);
        obs.next_refresh_at = Some(ts(now
            + chrono::Duration::from_std(self.inner.settings.worker_poll_interval)
                .unwrap_or(chrono::Duration::MAX)));
        Ok(obs)
    }

    async fn poll_cml(
        &self,
        w: &pb::CmlWorker,
        client: &Arc<dyn CmlClient>,
        cml: &mut pb::CmlInfo,
        obs: &mut pb::WorkerObservation,
        force: bool,
        now: DateTime<Utc>,
    ) {
        let (health, stats, licensing) = tokio::join!(
            client.system_health(),
            client.system_stats(),
            client.licensing()
        );
        let mut issues = Vec::new();
        match health {
            Ok(h) => {
                let ready = h
                    .computes
                    .values()
                    .filter(|c| c.is_registered && c.is_connected && c.is_ready)
                    .count();
                if !h.valid {
                    issues.push("system_health reports invalid".to_owned());
                }
                cml.health = Some(pb::CmlHealth {
                    valid: h.valid,
                    is_licensed: h.is_licensed,
                    is_enterprise: h.is_enterprise,
                    computes_total: i32::try_from(h.computes.len()).unwrap_or(i32::MAX),
                    computes_ready: i32::try_from(ready).unwrap_or(i32::MAX),
                    controller_active: h.valid,
                    controller_has_quorum: h.valid,
                    issues: issues.clone(),
                });
                let license = obs.license.get_or_insert_with(Default::default);
                license.is_licensed = h.is_licensed;
                license.is_enterprise = h.is_enterprise;
            }
            Err(e) => issues.push(format!("system_health: {e}")),
        }
        match stats {
            Ok(s) => {
                let pct = |used: u64, total: u64| {
                    if total == 0 {
                        0.0
                    } else {
                        (used as f64 / total as f64 * 100.0).clamp(0.0, 100.0)
                    }
                };
                let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                cml.stats = Some(pb::CmlSystemStats {
                    cpu_count: i32::try_from(s.all.cpu.count).unwrap_or(i32::MAX),
                    cpu_percent: s.all.cpu.percent.clamp(0.0, 100.0),
                    memory_total_bytes: to_i64(s.all.memory.total),
                    memory_used_bytes: to_i64(s.all.memory.used),
                    disk_total_bytes: to_i64(s.all.disk.total),
                    disk_used_bytes: to_i64(s.all.disk.used),
                    allocated_cpus: i32::try_from(s.dominfo.allocated_cpus).unwrap_or(i32::MAX),
                    allocated_memory_bytes: to_i64(
                        s.dominfo.allocated_memory.saturating_mul(1024 * 1024),
                    ),
                    total_nodes: i32::try_from(s.dominfo.total_nodes).unwrap_or(i32::MAX),
                    running_nodes: i32::try_from(s.dominfo.running_nodes).unwrap_or(i32::MAX),
                    ..Default::default()
                });
                obs.utilization = Some(pb::Utilization {
                    cpu_percent: s.all.cpu.percent.clamp(0.0, 100.0),
                    memory_percent: pct(s.all.memory.used, s.all.memory.total),
                    storage_percent: pct(s.all.disk.used, s.all.disk.total),
                    source: pb::UtilizationSource::Cml as i32,
                    collected_at: Some(ts(now)),
                    ..Default::default()
                });
            }
            Err(e) => issues.push(format!("system_stats: {e}")),
        }
        match licensing {
            Ok(l) => {
                let status = match l.registration_status.to_ascii_uppercase().as_str() {
                    "COMPLETED" | "REGISTERED" => pb::LicenseStatus::Registered,
                    "EVALUATION" | "EVAL" => pb::LicenseStatus::Evaluation,
                    "EXPIRED" => pb::LicenseStatus::Expired,
                    "FAILED" | "INVALID" => pb::LicenseStatus::Invalid,
                    _ => pb::LicenseStatus::Unregistered,
                };
                let license = obs.license.get_or_insert_with(Default::default);
                license.status = status as i32;
                license.authorization_status = l.authorization_status.clone();
                license.is_enterprise = license.is_enterprise || l.is_enterprise;
                license.raw_info = json_struct(&l.raw);
            }
            Err(e) => issues.push(format!("licensing: {e}")),
        }
        if !issues.is_empty() {
            obs.service_status = pb::CmlServiceStatus::Error as i32;
            if let Some(h) = cml.health.as_mut() {
                h.issues = issues;
            }
        }
        let labs_due = force
            || w.state() != pb::WorkerState::Running
            || self
                .memory()
                .worker_labs_synced
                .get(&w.id)
                .is_none_or(|at| {
                    now - *at
                        >= chrono::Duration::from_std(LABS_SYNC_INTERVAL)
                            .unwrap_or(chrono::Duration::MAX)
                });
        if labs_due {
            match self.sync_labs(w, client, now).await {
                Ok(labs) => {
                    cml.labs_count = i32::try_from(labs.len()).unwrap_or(i32::MAX);
                    obs.labs = labs;
                    obs.labs_synced = true;
                    self.memory().worker_labs_synced.insert(w.id.clone(), now);
                }
                Err(e) => tracing::debug!(worker = %w.id, error = %e, "labs sync failed"),
            }
        } else if let Some(c) = &w.cml {
            cml.labs_count = c.labs_count;
        }
    }

    async fn sync_labs(
        &self,
        w: &pb::CmlWorker,
        client: &Arc<dyn CmlClient>,
        now: DateTime<Utc>,
    ) -> Result<Vec<pb::CmlLab>> {
        let ids = client.list_labs().await?;
        let mut labs = Vec::with_capacity(ids.len());
        for id in ids {
            let info = match client.get_lab(&id).await {
                Ok(i) => i,
                Err(CmlError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            let instance_id = info
                .lab_title
                .strip_prefix(crate::instances::LAB_TITLE_PREFIX)
                .unwrap_or_default()
                .to_owned();
            labs.push(pb::CmlLab {
                lab_id: id,
                worker_id: w.id.clone(),
                title: info.lab_title,
                description: info.lab_description,
                notes: info.lab_notes,
                state: lab_state(&info.state) as i32,
                owner_username: info.owner_username,
                node_count: i32::try_from(info.node_count).unwrap_or(i32::MAX),
                link_count: i32::try_from(info.link_count).unwrap_or(i32::MAX),
                instance_id,
                last_synced_at: Some(ts(now)),
                ..Default::default()
            });
        }
        Ok(labs)
    }

    // -----------------------------------------------------------------------------------------
    // Operations
    // -----------------------------------------------------------------------------------------

    pub(crate) async fn reconcile_operations(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        scope: &Scope,
    ) -> Result<(usize, usize)> {
        let mut acted = 0;
        for op in &snap.operations {
            if scope.target.as_deref().is_some_and(|t| t != op.worker_id) {
                continue;
            }
            if self.memory().operations_in_flight.contains(&op.id) {
                continue;
            }
            let claimed = match self.inner.plane.claim_operation(fence, &op.id).await {
                Ok(c) => c,
                Err(e @ ControllerError::NotLeader(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(operation = %op.id, error = %e, "operation not claimed");
                    continue;
                }
            };
            acted += 1;
            let worker = snap.worker(&op.worker_id).cloned();
            self.memory().operations_in_flight.insert(op.id.clone());
            let this = self.clone();
            let fence = fence.clone();
            let op = claimed.operation.clone().unwrap_or_else(|| op.clone());
            let token = claimed.license_token;
            let span = tracing::info_span!("worker_operation", operation = %op.id, kind = op.kind().as_str_name(), worker = %op.worker_id);
            tokio::spawn(
                async move {
                    let outcome = match worker {
                        Some(w) => this.run_operation(&fence, &w, &op, &token).await,
                        None => Err(ControllerError::Domain(format!(
                            "worker {} is gone",
                            op.worker_id
                        ))),
                    };
                    let (status, result, error) = match outcome {
                        Ok(result) => (
                            pb::OperationStatus::Succeeded,
                            json_struct(&result),
                            String::new(),
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "operation failed");
                            (
                                pb::OperationStatus::Failed,
                                None,
                                short_reason(&e.to_string()),
                            )
                        }
                    };
                    if let Err(e) = this
                        .inner
                        .plane
                        .complete_operation(&fence, &op.id, status, result, error)
                        .await
                    {
                        tracing::warn!(error = %e, "could not complete the operation");
                    }
                    this.memory().operations_in_flight.remove(&op.id);
                }
                .instrument(span),
            );
        }
        Ok((acted, 0))
    }

    async fn run_operation(
        &self,
        fence: &Fence,
        w: &pb::CmlWorker,
        op: &pb::WorkerOperation,
        token: &str,
    ) -> Result<serde_json::Value> {
        use pb::WorkerOperationKind as K;
        let client = || {
            self.cml_for(w)?.ok_or_else(|| {
                ControllerError::Cml(CmlError::Unavailable(format!(
                    "worker {} has no CML endpoint",
                    w.id
                )))
            })
        };
        match op.kind() {
            K::Refresh => {
                let described = match w.ec2.as_ref().map(|e| e.instance_id.as_str()) {
                    Some(id) if !id.is_empty() => self.inner.deps.cloud.describe(id).await?,
                    _ => None,
                };
                let now = self.now();
                let obs = self
                    .observe(w, described.as_ref(), op.include_labs, now)
                    .await?;
                let labs = obs.labs.len();
                let synced = obs.labs_synced;
                let after = self.inner.plane.report_worker(fence, &w.id, obs).await?;
                self.schedule_poll(&after, now);
                Ok(
                    json!({"state": after.state().as_str_name(), "labs_synced": if synced { labs } else { 0 }}),
                )
            }
            K::RegisterLicense => {
                let c = client()?;
                c.register_license(token, op.reregister).await?;
                for attempt in 0..LICENSE_POLL_ATTEMPTS {
                    if attempt > 0 {
                        tokio::time::sleep(self.inner.settings.license_poll_interval).await;
                    }
                    let l = c.licensing().await?;
                    match l.registration_status.to_ascii_uppercase().as_str() {
                        "COMPLETED" | "REGISTERED" => {
                            return Ok(json!({"registration_status": l.registration_status}));
                        }
                        "FAILED" | "EXPIRED" | "RETRY_FAILED" => {
                            return Err(ControllerError::Cml(CmlError::Rejected {
                                status: 200,
                                message: format!("registration ended {}", l.registration_status),
                            }));
                        }
                        _ => {}
                    }
                }
                Err(ControllerError::Cml(CmlError::Timeout(format!(
                    "registration not completed after {LICENSE_POLL_ATTEMPTS} polls"
                ))))
            }
            K::DeregisterLicense => {
                let outcome = client()?.deregister_license().await?;
                Ok(json!({"deregistration": format!("{outcome:?}")}))
            }
            K::ControlLab => {
                let c = client()?;
                let action = match op.lab_action() {
                    pb::LabAction::Start => Some(LabAction::Start),
                    pb::LabAction::Stop => Some(LabAction::Stop),
                    pb::LabAction::Wipe => Some(LabAction::Wipe),
                    pb::LabAction::Delete => None,
                    pb::LabAction::Unspecified => {
                        return Err(ControllerError::Domain("no lab action given".into()));
                    }
                };
                match action {
                    Some(a) => c.lab_action(&op.lab_id, a).await?,
                    None => {
                        for a in [LabAction::Stop, LabAction::Wipe] {
                            match c.lab_action(&op.lab_id, a).await {
                                Ok(()) | Err(CmlError::Rejected { .. }) => {}
                                Err(e) => return Err(e.into()),
                            }
                        }
                        c.delete_lab(&op.lab_id).await?;
                    }
                }
                Ok(json!({"lab_id": op.lab_id, "action": op.lab_action().as_str_name()}))
            }
            K::Unspecified => Err(ControllerError::Domain("operation without a kind".into())),
        }
    }
}

fn tags_pending(w: &pb::CmlWorker) -> bool {
    w.conditions
        .iter()
        .any(|c| c.r#type == TAGS_CONDITION && c.status == pb::ConditionStatus::False as i32)
}

fn lab_state(s: &str) -> pb::CmlLabState {
    match s.to_ascii_uppercase().as_str() {
        "DEFINED_ON_CORE" => pb::CmlLabState::DefinedOnCore,
        "STOPPED" => pb::CmlLabState::Stopped,
        "STARTED" => pb::CmlLabState::Started,
        "QUEUED" => pb::CmlLabState::Queued,
        "BOOTED" => pb::CmlLabState::Booted,
        _ => pb::CmlLabState::Unspecified,
    }
}

/// A JSON object as a `google.protobuf.Struct` (other values: `None`).
pub(crate) fn json_struct(value: &serde_json::Value) -> Option<prost_types::Struct> {
    ccm_control_plane::services::internal::to_struct(value.clone())
}

/// Whether a cloud error means the instance is gone for good.
pub fn is_gone(e: &CloudError) -> bool {
    matches!(e, CloudError::NotFound(_))
}
