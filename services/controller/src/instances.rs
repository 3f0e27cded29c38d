//! The instance reconciler: one look at every live instance per pass.
//!
//! | state | what the reconciler does |
//! |---|---|
//! | any placed state, worker gone / TERMINATED / FAILED | → TERMINATED, reason `worker_gone` (orphan) |
//! | PENDING / SCHEDULED past slot end | → TERMINATED, reason `expired` |
//! | SCHEDULED at `slot start − lead` (ASAP: at once) | → INSTANTIATING (`instantiation_due`), then instantiates in the same run |
//! | INSTANTIATING | fetch the artifact (hash checked against the version; the cached YAML if the source changed), rewrite ports, import on the worker's CML, start → RUNNING (`lab_started`, `cml_lab_id`). A failure is recorded as a retry (`increment_retry_count`, condition `Instantiated=False` with the error); the next attempt waits [`INSTANTIATION_BACKOFF_BASE`]·2ⁿ; the third failure terminates (`max_retries_exceeded`) |
//! | RUNNING at slot end | → COLLECTING (`timeslot_end`) when the definition has grading rules, else → STOPPING |
//! | RUNNING after a user restart | starts the lab on CML again |
//! | COLLECTING | POSTs the collection request once; after [`MAX_COLLECTION_ATTEMPTS`] failures → STOPPING (`collection_failed`); after the collection timeout → STOPPING (`collection_timeout`) |
//! | GRADING | waits for `assessment.grading.completed`; after the grading timeout → STOPPING (`grading_timeout`) |
//! | STOPPING | stops the lab on CML (skipped if the worker is not running) → STOPPED (`lab_stopped`) |
//! | STOPPED at slot end or after a delete | → ARCHIVED |
//! | ARCHIVED | stops, wipes and deletes the lab on CML → TERMINATED (`cleanup`); the control plane releases ports and capacity in the same commit |
//!
//! User Stop / Collect / Terminate are recorded by InstanceService as transitions (RUNNING →
//! STOPPING, → COLLECTING, the STOPPING chain with `delete_requested`); the reconciler carries
//! them out like any other state.

use std::collections::BTreeMap;
use std::sync::Arc;

use ccm_cml::client::LabAction;
use ccm_cml::{CmlClient, CmlError};
use ccm_core::instance::{self as ci, DueAction};
use ccm_core::labyaml::PreparedLab;
use ccm_proto::v1 as pb;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;
use tracing::Instrument;

use crate::config::{
    ACTION_BACKOFF_BASE, ACTION_BACKOFF_MAX, INSTANTIATION_BACKOFF_BASE, INSTANTIATION_BACKOFF_MAX,
    MAX_COLLECTION_ATTEMPTS,
};
use crate::controller::{BoxedRun, Controller, Scope, Snapshot, backoff, short_reason};
use crate::error::{ControllerError, Result};
use crate::plane::Fence;

/// Reason recorded when an instance's worker is gone.
pub const REASON_WORKER_GONE: &str = ci::REASON_WORKER_GONE;
/// Condition type set on an instance after a failed instantiation attempt.
pub const CONDITION_INSTANTIATED: &str = "Instantiated";
/// Reason: the collection request could not be delivered.
pub const REASON_COLLECTION_FAILED: &str = "collection_failed";
/// Reason: the collection did not complete in time.
pub const REASON_COLLECTION_TIMEOUT: &str = "collection_timeout";
/// Reason: grading did not complete in time.
pub const REASON_GRADING_TIMEOUT: &str = "grading_timeout";
/// Prefix of the CML lab title of an instance (`ccm-<instance id>`).
pub const LAB_TITLE_PREFIX: &str = "ccm-";

/// What one instance's reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Nothing,
    Acted,
}

fn state_since(inst: &pb::LabletInstance) -> Option<DateTime<Utc>> {
    let t = inst
        .state_history
        .last()
        .and_then(|h| h.at.as_ref())
        .or(inst.created_at.as_ref())?;
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
}

fn core_instance(inst: &pb::LabletInstance) -> Result<ccm_core::model::LabletInstance> {
    ccm_control_plane::convert::instance_from_proto(inst, "instance")
        .map_err(|e| ControllerError::Domain(format!("instance {}: {e}", inst.id)))
}

impl Controller {
    pub(crate) async fn reconcile_instances(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        scope: &Scope,
    ) -> Result<(usize, usize)> {
        let targets: Vec<&pb::LabletInstance> = snap
            .instances
            .iter()
            .filter(|i| scope.target.as_deref().is_none_or(|t| t == i.id))
            .collect();
        let futures: Vec<BoxedRun<'_, pb::LabletInstance, Step>> = targets
            .into_iter()
            .map(|inst| {
                let span = tracing::debug_span!("reconcile_instance", instance = %inst.id, state = inst.state().as_str_name());
                Box::pin(async move {
                    (inst, self.reconcile_instance(fence, snap, inst).instrument(span).await)
                }) as BoxedRun<'_, pb::LabletInstance, Step>
            })
            .collect();
        let mut results =
            futures::stream::iter(futures).buffer_unordered(self.inner.settings.concurrency.max(1));
        let (mut acted, mut errors) = (0, 0);
        let mut not_leader = None;
        while let Some((inst, r)) = results.next().await {
            match r {
                Ok(Step::Acted) => acted += 1,
                Ok(Step::Nothing) => {}
                Err(e @ ControllerError::NotLeader(_)) => not_leader = Some(e),
                Err(e) if e.is_conflict() => {
                    tracing::debug!(instance = %inst.id, error = %e, "changed meanwhile; next pass looks again");
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(instance = %inst.id, error = %e, "instance reconcile failed");
                }
            }
        }
        if let Some(e) = not_leader {
            return Err(e);
        }
        Ok((acted, errors))
    }

    async fn transition(
        &self,
        fence: &Fence,
        inst: &pb::LabletInstance,
        to: pb::InstanceState,
        reason: &str,
    ) -> Result<pb::LabletInstance> {
        tracing::info!(instance = %inst.id, from = inst.state().as_str_name(), to = to.as_str_name(), reason, "instance transition");
        self.inner
            .plane
            .transition_instance(
                fence,
                pb::TransitionInstanceRequest {
                    instance_id: inst.id.clone(),
                    from: inst.state,
                    to: to as i32,
                    reason: short_reason(reason),
                    resource_version: inst.resource_version,
                    ..Default::default()
                },
            )
            .await
    }

    fn backing_off(&self, id: &str, now: DateTime<Utc>) -> bool {
        self.memory()
            .instance_backoff
            .get(id)
            .is_some_and(|(_, until)| *until > now)
    }

    fn fail_step(&self, id: &str, now: DateTime<Utc>) {
        let mut m = self.memory();
        let entry = m.instance_backoff.entry(id.to_owned()).or_insert((0, now));
        entry.0 += 1;
        entry.1 = now + backoff(entry.0, ACTION_BACKOFF_BASE, ACTION_BACKOFF_MAX);
    }

    fn clear_step(&self, id: &str) {
        self.memory().instance_backoff.remove(id);
    }

    async fn reconcile_instance(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        inst: &pb::LabletInstance,
    ) -> Result<Step> {
        use pb::InstanceState as S;
        let now = snap.now;
        let state = inst.state();
        let worker = (!inst.worker_id.is_empty())
            .then(|| snap.worker(&inst.worker_id))
            .flatten();
        // Orphans: placed on a worker that is gone.
        if state != S::Pending && !inst.worker_id.is_empty() {
            let gone = match worker {
                None => true,
                Some(w) => matches!(
                    w.state(),
                    pb::WorkerState::Terminated | pb::WorkerState::Failed
                ),
            };
            if gone {
                self.transition(fence, inst, S::Terminated, REASON_WORKER_GONE)
                    .await?;
                return Ok(Step::Acted);
            }
        }
        let Some(def) = snap.definition(inst).cloned() else {
            return Err(ControllerError::Domain(format!(
                "definition {}@{} of instance {} is unreadable",
                inst.definition_id, inst.definition_version, inst.id
            )));
        };
        let core = core_instance(inst)?;
        let has_grading = !def.grading_rules_uri.is_empty();
        let due = ci::due_actions(
            &core,
            now,
            self.inner.settings.policy.instantiation_lead,
            has_grading,
        );
        match (state, due) {
            (_, Some(DueAction::Expire)) => {
                self.transition(fence, inst, S::Terminated, ci::REASON_EXPIRED)
                    .await?;
                Ok(Step::Acted)
            }
            (S::Scheduled, Some(DueAction::Instantiate)) => {
                let moved = self
                    .transition(fence, inst, S::Instantiating, ci::REASON_INSTANTIATION_DUE)
                    .await?;
                self.instantiate(fence, snap, &moved, &def).await?;
                Ok(Step::Acted)
            }
            (S::Instantiating, _) => self.instantiate(fence, snap, inst, &def).await,
            (S::Running, Some(DueAction::Collect)) => {
                self.transition(fence, inst, S::Collecting, ci::REASON_TIMESLOT_END)
                    .await?;
                Ok(Step::Acted)
            }
            (S::Running, Some(DueAction::Stop)) => {
                self.transition(fence, inst, S::Stopping, ci::REASON_TIMESLOT_END)
                    .await?;
                Ok(Step::Acted)
            }
            (S::Running, _) => self.ensure_restarted(snap, inst).await,
            (S::Collecting, _) => self.collect(fence, snap, inst, &def).await,
            (S::Grading, _) => {
                let since = state_since(inst).unwrap_or(now);
                if now - since >= to_chrono(self.inner.settings.grading_timeout) {
                    self.transition(fence, inst, S::Stopping, REASON_GRADING_TIMEOUT)
                        .await?;
                    return Ok(Step::Acted);
                }
                Ok(Step::Nothing)
            }
            (S::Stopping, _) => {
                if self.backing_off(&inst.id, now) {
                    return Ok(Step::Nothing);
                }
                if let Err(e) = self.lab_calls(snap, inst, &[LabAction::Stop], false).await {
                    self.fail_step(&inst.id, now);
                    return Err(e);
                }
                self.clear_step(&inst.id);
                self.transition(fence, inst, S::Stopped, ci::REASON_LAB_STOPPED)
                    .await?;
                Ok(Step::Acted)
            }
            (S::Stopped, Some(DueAction::Archive)) => {
                let reason = if core.deletion_requested() {
                    ci::REASON_DELETE_REQUESTED
                } else {
                    ci::REASON_TIMESLOT_END
                };
                self.transition(fence, inst, S::Archived, reason).await?;
                Ok(Step::Acted)
            }
            (S::Archived, _) => {
                if self.backing_off(&inst.id, now) {
                    return Ok(Step::Nothing);
                }
                if let Err(e) = self
                    .lab_calls(snap, inst, &[LabAction::Stop, LabAction::Wipe], true)
                    .await
                {
                    self.fail_step(&inst.id, now);
                    return Err(e);
                }
                self.clear_step(&inst.id);
                self.transition(fence, inst, S::Terminated, ci::REASON_CLEANUP)
                    .await?;
                self.forget_instance(&inst.id);
                Ok(Step::Acted)
            }
            _ => Ok(Step::Nothing),
        }
    }

    fn forget_instance(&self, id: &str) {
        let mut m = self.memory();
        m.instance_backoff.remove(id);
        m.collection_sent.remove(id);
        m.collection_attempts.remove(id);
    }

    /// Runs `actions` (then, when `delete`, deletes the lab) on the instance's lab. A lab CML
    /// no longer knows is fine; a worker that is not running has no lab running either.
    async fn lab_calls(
        &self,
        snap: &Snapshot,
        inst: &pb::LabletInstance,
        actions: &[LabAction],
        delete: bool,
    ) -> Result<()> {
        if inst.cml_lab_id.is_empty() {
            return Ok(());
        }
        let Some(worker) = snap.worker(&inst.worker_id) else {
            return Ok(());
        };
        if !matches!(
            worker.state(),
            pb::WorkerState::Running | pb::WorkerState::Draining
        ) {
            return Ok(());
        }
        let Some(client) = self.cml_for(worker)? else {
            return Ok(());
        };
        for action in actions {
            match client.lab_action(&inst.cml_lab_id, *action).await {
                Ok(()) | Err(CmlError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if delete {
            match client.delete_lab(&inst.cml_lab_id).await {
                Ok(()) | Err(CmlError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// A RUNNING instance whose last move was a restart from STOPPED: start its lab again (once
    /// per restart).
    async fn ensure_restarted(&self, snap: &Snapshot, inst: &pb::LabletInstance) -> Result<Step> {
        let Some(last) = inst.state_history.last() else {
            return Ok(Step::Nothing);
        };
        if last.from != pb::InstanceState::Stopped as i32 {
            return Ok(Step::Nothing);
        }
        let key = (inst.id.clone(), state_since(inst).unwrap_or(snap.now));
        if self.memory().restarted.contains(&key) {
            return Ok(Step::Nothing);
        }
        self.lab_calls(snap, inst, &[LabAction::Start], false)
            .await?;
        self.memory().restarted.insert(key);
        Ok(Step::Acted)
    }

    /// The lab YAML of a definition version, prepared for port rewriting.
    async fn prepared_lab(&self, def: &pb::LabletDefinition) -> Result<Arc<PreparedLab>> {
        let key = (def.id.clone(), def.version.clone());
        if let Some(p) = self
            .inner
            .prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return Ok(p.clone());
        }
        let yaml = match self.inner.deps.fetcher.fetch(&def.lab_artifact_uri).await {
            Ok(artifact)
                if def.lab_yaml_hash.is_empty() || artifact.content_hash == def.lab_yaml_hash =>
            {
                artifact
                    .text()
                    .ok_or_else(|| {
                        ControllerError::Artifact(format!(
                            "{} is not UTF-8 text",
                            def.lab_artifact_uri
                        ))
                    })?
                    .to_owned()
            }
            Ok(artifact) if !def.lab_yaml.is_empty() => {
                tracing::warn!(definition = %def.id, version = %def.version, pinned = %def.lab_yaml_hash, found = %artifact.content_hash, "artifact changed since the version was pinned; using the pinned YAML");
                def.lab_yaml.clone()
            }
            Ok(artifact) => {
                return Err(ControllerError::Artifact(format!(
                    "{} now hashes to {}, but version {} pinned {}",
                    ccm_artifacts::redact_uri(&def.lab_artifact_uri),
                    artifact.content_hash,
                    def.version,
                    def.lab_yaml_hash
                )));
            }
            Err(e) if !def.lab_yaml.is_empty() => {
                tracing::warn!(definition = %def.id, error = %e, "artifact fetch failed; using the pinned YAML");
                def.lab_yaml.clone()
            }
            Err(e) => return Err(ControllerError::Artifact(e.to_string())),
        };
        let names: Vec<&str> = def
            .port_template
            .as_ref()
            .map(|t| t.ports.iter().map(|p| p.name.as_str()).collect())
            .unwrap_or_default();
        let prepared = Arc::new(
            PreparedLab::new(&yaml, &names).map_err(|e| ControllerError::Domain(e.to_string()))?,
        );
        self.inner
            .prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, prepared.clone());
        Ok(prepared)
    }

    async fn import_and_start(
        &self,
        client: &Arc<dyn CmlClient>,
        inst: &pb::LabletInstance,
        def: &pb::LabletDefinition,
    ) -> Result<String> {
        let prepared = self.prepared_lab(def).await?;
        let mut ports = BTreeMap::new();
        for (name, port) in &inst.allocated_ports {
            let p = u16::try_from(*port).map_err(|_| {
                ControllerError::Domain(format!("port {name}={port} is out of range"))
            })?;
            ports.insert(name.clone(), p);
        }
        let yaml = prepared
            .render(&ports)
            .map_err(|e| ControllerError::Domain(e.to_string()))?;
        let title = format!("{LAB_TITLE_PREFIX}{}", inst.id);
        let imported = client.import_lab(&yaml, Some(&title)).await?;
        if let Err(e) = client.lab_action(&imported.id, LabAction::Start).await {
            if let Err(cleanup) = client.delete_lab(&imported.id).await {
                tracing::warn!(lab = %imported.id, error = %cleanup, "could not delete the lab of a failed start");
            }
            return Err(e.into());
        }
        Ok(imported.id)
    }

    async fn instantiate(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        inst: &pb::LabletInstance,
        def: &pb::LabletDefinition,
    ) -> Result<Step> {
        let now = snap.now;
        if self.backing_off(&inst.id, now) {
            return Ok(Step::Nothing);
        }
        let Some(worker) = snap.worker(&inst.worker_id) else {
            return Ok(Step::Nothing);
        };
        let attempt = async {
            let client = self.cml_for(worker)?.ok_or_else(|| {
                ControllerError::Cml(CmlError::Unavailable(format!(
                    "worker {} has no CML endpoint yet",
                    worker.id
                )))
            })?;
            self.import_and_start(&client, inst, def).await
        }
        .await;
        match attempt {
            Ok(lab_id) => {
                self.clear_step(&inst.id);
                tracing::info!(instance = %inst.id, lab = %lab_id, "lab imported and started");
                let req = pb::TransitionInstanceRequest {
                    instance_id: inst.id.clone(),
                    from: pb::InstanceState::Instantiating as i32,
                    to: pb::InstanceState::Running as i32,
                    reason: ci::REASON_LAB_STARTED.to_owned(),
                    resource_version: 0,
                    cml_lab_id: lab_id.clone(),
                    condition: Some(condition(true, "LabStarted", &format!("CML lab {lab_id}"))),
                    ..Default::default()
                };
                match self.inner.plane.transition_instance(fence, req).await {
                    Ok(_) => Ok(Step::Acted),
                    Err(e) => {
                        // The lab runs but ccm could not record it: remove it so a retry
                        // does not leave two.
                        if let Ok(Some(client)) = self.cml_for(worker) {
                            let _ = client.lab_action(&lab_id, LabAction::Stop).await;
                            let _ = client.delete_lab(&lab_id).await;
                        }
                        Err(e)
                    }
                }
            }
            Err(e @ ControllerError::NotLeader(_)) => Err(e),
            Err(e) => {
                let message = short_reason(&format!("instantiation failed: {e}"));
                tracing::warn!(instance = %inst.id, attempt = inst.retry_count + 1, error = %e, "instantiation attempt failed");
                let after = self
                    .inner
                    .plane
                    .transition_instance(
                        fence,
                        pb::TransitionInstanceRequest {
                            instance_id: inst.id.clone(),
                            from: pb::InstanceState::Instantiating as i32,
                            to: pb::InstanceState::Instantiating as i32,
                            reason: message.clone(),
                            increment_retry_count: true,
                            condition: Some(condition(false, "InstantiationFailed", &message)),
                            ..Default::default()
                        },
                    )
                    .await?;
                let attempts = u32::try_from(after.retry_count).unwrap_or(u32::MAX);
                if after.state() == pb::InstanceState::Terminated {
                    self.forget_instance(&inst.id);
                } else {
                    self.memory().instance_backoff.insert(
                        inst.id.clone(),
                        (
                            attempts,
                            now + backoff(
                                attempts,
                                INSTANTIATION_BACKOFF_BASE,
                                INSTANTIATION_BACKOFF_MAX,
                            ),
                        ),
                    );
                }
                Ok(Step::Acted)
            }
        }
    }

    /// COLLECTING: send the collection request once, stop on repeated failure or timeout.
    async fn collect(
        &self,
        fence: &Fence,
        snap: &Snapshot,
        inst: &pb::LabletInstance,
        def: &pb::LabletDefinition,
    ) -> Result<Step> {
        use pb::InstanceState as S;
        let now = snap.now;
        let since = state_since(inst).unwrap_or(now);
        if now - since >= to_chrono(self.inner.settings.collection_timeout) {
            self.transition(fence, inst, S::Stopping, REASON_COLLECTION_TIMEOUT)
                .await?;
            self.forget_instance(&inst.id);
            return Ok(Step::Acted);
        }
        if self.memory().collection_sent.get(&inst.id) == Some(&since) {
            return Ok(Step::Nothing);
        }
        let Some(url) = collection_url(
            def,
            self.inner.settings.assessment_collection_url.as_deref(),
        ) else {
            return Ok(Step::Nothing);
        };
        if self.backing_off(&inst.id, now) {
            return Ok(Step::Nothing);
        }
        let worker = snap.worker(&inst.worker_id);
        let host = worker
            .and_then(|w| w.ec2.as_ref())
            .map(|e| {
                if e.public_ip.is_empty() {
                    e.private_ip.clone()
                } else {
                    e.public_ip.clone()
                }
            })
            .unwrap_or_default();
        let body = json!({
            "instance_id": inst.id,
            "cml_lab_id": inst.cml_lab_id,
            "worker_hostname": host,
            "worker_id": inst.worker_id,
            "definition_id": inst.definition_id,
            "definition_version": inst.definition_version,
            "grading_rules_uri": def.grading_rules_uri,
            "assessment_session_id": inst.assessment_session_id,
            "assessment_part_id": inst.assessment_part_id,
            "collection_reason": inst.state_history.last().map(|h| h.reason.clone()).unwrap_or_default(),
            "allocated_ports": inst.allocated_ports,
        });
        let sent = self
            .inner
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| ControllerError::Assessment(format!("POST {url}: {e}")))
            .and_then(|r| {
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(ControllerError::Assessment(format!(
                        "POST {url} answered {}",
                        r.status()
                    )))
                }
            });
        match sent {
            Ok(()) => {
                tracing::info!(instance = %inst.id, url = %url, "collection requested");
                let mut m = self.memory();
                m.collection_sent.insert(inst.id.clone(), since);
                m.collection_attempts.remove(&inst.id);
                m.instance_backoff.remove(&inst.id);
                Ok(Step::Acted)
            }
            Err(e) => {
                let attempts = {
                    let mut m = self.memory();
                    let a = m.collection_attempts.entry(inst.id.clone()).or_insert(0);
                    *a += 1;
                    *a
                };
                tracing::warn!(instance = %inst.id, attempts, error = %e, "collection request failed");
                if attempts >= MAX_COLLECTION_ATTEMPTS {
                    self.transition(
                        fence,
                        inst,
                        S::Stopping,
                        &format!("{REASON_COLLECTION_FAILED}: {e}"),
                    )
                    .await?;
                    self.forget_instance(&inst.id);
                    return Ok(Step::Acted);
                }
                self.fail_step(&inst.id, now);
                Err(e)
            }
        }
    }
}

/// Where the collection request of an instance of `def` goes: the definition's
/// `grading_rules_uri` when it is an `http(s)` URL (the definition's own assessment endpoint),
/// else the controller's `assessment_collection_url`.
pub fn collection_url(def: &pb::LabletDefinition, configured: Option<&str>) -> Option<String> {
    let own = def.grading_rules_uri.trim();
    if own.starts_with("http://") || own.starts_with("https://") {
        return Some(own.to_owned());
    }
    configured.map(str::to_owned)
}

fn condition(ok: bool, reason: &str, message: &str) -> pb::Condition {
    pb::Condition {
        r#type: CONDITION_INSTANTIATED.to_owned(),
        status: if ok {
            pb::ConditionStatus::True
        } else {
            pb::ConditionStatus::False
        } as i32,
        reason: reason.to_owned(),
        message: message.to_owned(),
        ..Default::default()
    }
}

fn to_chrono(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
