//! The scheduler's view of the fleet and the bookings: workers, templates, definitions and every
//! instance that is not TERMINATED, read through the control plane's public API and kept current
//! by its change feed.
//!
//! Updates are level-triggered and ordered by `resource_version`: an event older than what the
//! view holds is ignored, so a watch event that arrives after a list that already showed it
//! changes nothing. Definition versions are immutable, so they are fetched once
//! (`GetDefinition`) and kept.

use std::collections::{BTreeMap, HashMap};

use ccm_control_plane::convert::{
    self, definition_from_proto, time_slot_from_proto, timestamp_from_proto,
};
use ccm_control_plane::repo::definition_doc_id;
use ccm_core::fleet::{FleetSnapshot, PlacementRequest, WorkerSnapshot};
use ccm_core::model::{LabletDefinition, instance_type_has_nested_virt};
use ccm_proto::v1 as pb;
use ccm_runtime::client::PlaneClient;
use chrono::{DateTime, Utc};

use crate::error::{Result, SchedulerError};

/// Page size of the lists the scheduler reads (the API's maximum).
pub const LIST_PAGE_SIZE: i32 = 1000;

/// Every instance state but TERMINATED: what the view keeps (PENDING is the queue, the rest hold
/// capacity and ports on their worker).
pub fn tracked_states() -> Vec<i32> {
    use pb::InstanceState as S;
    [
        S::Pending,
        S::Scheduled,
        S::Instantiating,
        S::Running,
        S::Collecting,
        S::Grading,
        S::Stopping,
        S::Stopped,
        S::Archived,
    ]
    .into_iter()
    .map(|s| s as i32)
    .collect()
}

/// The scheduler's view.
#[derive(Debug, Default, Clone)]
pub struct World {
    /// Workers by id (not TERMINATED).
    pub workers: HashMap<String, pb::CmlWorker>,
    /// Template instance types by template name (for nested virtualisation).
    pub template_types: HashMap<String, String>,
    /// Definition versions by document id (`<id>@<version>`), decoded.
    pub definitions: HashMap<String, LabletDefinition>,
    /// Instances that are not TERMINATED, by id.
    pub instances: HashMap<String, pb::LabletInstance>,
    /// Highest feed revision applied (0 before the first event or bookmark).
    pub revision: i64,
}

/// What one change event did to the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Nothing changed (older than the view, or a kind the scheduler ignores).
    Nothing,
    /// The view changed.
    Changed,
}

fn plane_err(call: &'static str) -> impl Fn(tonic::Status) -> SchedulerError {
    move |s| SchedulerError::plane(call, s)
}

/// [`Applied::Changed`] when a removal took something out, [`Applied::Nothing`] otherwise.
fn removed<T>(taken: Option<T>) -> Applied {
    match taken {
        Some(_) => Applied::Changed,
        None => Applied::Nothing,
    }
}

/// Inserts or replaces `item` under `id` unless `map` holds a newer version (per `version_of`);
/// a `terminated` item is removed instead.
fn upsert<T>(
    map: &mut HashMap<String, T>,
    id: String,
    version: i64,
    terminated: bool,
    item: T,
    version_of: impl Fn(&T) -> i64,
) -> Applied {
    if let Some(old) = map.get(&id)
        && version_of(old) > version
    {
        return Applied::Nothing;
    }
    if terminated {
        return removed(map.remove(&id));
    }
    map.insert(id, item);
    Applied::Changed
}

impl World {
    /// Reads everything from the control plane: templates, workers, the instances that are not
    /// TERMINATED and the definition versions they name.
    pub async fn list(plane: &PlaneClient) -> Result<World> {
        let mut world = World::default();
        let mut token = String::new();
        loop {
            let page = plane
                .templates()
                .list_templates(pb::ListTemplatesRequest {
                    page_size: LIST_PAGE_SIZE,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .map_err(plane_err("TemplateService.ListTemplates"))?
                .into_inner();
            for t in page.templates {
                world.template_types.insert(t.name, t.instance_type);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        token.clear();
        loop {
            let page = plane
                .workers()
                .list_workers(pb::ListWorkersRequest {
                    page_size: LIST_PAGE_SIZE,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .map_err(plane_err("WorkerService.ListWorkers"))?
                .into_inner();
            for w in page.workers {
                world.upsert_worker(w);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        token.clear();
        loop {
            let page = plane
                .instances()
                .list_instances(pb::ListInstancesRequest {
                    page_size: LIST_PAGE_SIZE,
                    page_token: token.clone(),
                    states: tracked_states(),
                    ..Default::default()
                })
                .await
                .map_err(plane_err("InstanceService.ListInstances"))?
                .into_inner();
            for i in page.instances {
                world.upsert_instance(i);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        world.fetch_definitions(plane).await?;
        Ok(world)
    }

    /// Fetches the definition versions named by instances of the view that it does not hold yet.
    /// A version that no longer exists is skipped (its instances cannot be placed; logged).
    pub async fn fetch_definitions(&mut self, plane: &PlaneClient) -> Result<()> {
        let mut missing: Vec<(String, String)> = self
            .instances
            .values()
            .filter(|i| {
                !self
                    .definitions
                    .contains_key(&definition_doc_id(&i.definition_id, &i.definition_version))
            })
            .map(|i| (i.definition_id.clone(), i.definition_version.clone()))
            .collect();
        missing.sort();
        missing.dedup();
        for (id, version) in missing {
            let answer = plane
                .definitions()
                .get_definition(pb::GetDefinitionRequest {
                    definition_id: id.clone(),
                    version: version.clone(),
                    include_lab_yaml: false,
                })
                .await;
            let def = match answer {
                Ok(r) => r.into_inner().definition,
                Err(s) if s.code() == tonic::Code::NotFound => {
                    tracing::warn!(definition = %id, %version, "definition version not found; its instances cannot be placed");
                    continue;
                }
                Err(s) => return Err(SchedulerError::plane("DefinitionService.GetDefinition", s)),
            };
            let Some(def) = def else { continue };
            match definition_from_proto(&def, "definition") {
                Ok(core) => {
                    self.definitions
                        .insert(definition_doc_id(&id, &version), core);
                }
                Err(e) => {
                    tracing::warn!(definition = %id, %version, error = %e, "unreadable definition; its instances cannot be placed")
                }
            }
        }
        Ok(())
    }

    /// Inserts or replaces a worker unless the view holds a newer version; TERMINATED workers
    /// are removed.
    pub fn upsert_worker(&mut self, w: pb::CmlWorker) -> Applied {
        let (id, version) = (w.id.clone(), w.resource_version);
        let terminated = w.state() == pb::WorkerState::Terminated;
        upsert(&mut self.workers, id, version, terminated, w, |old| {
            old.resource_version
        })
    }

    /// Inserts or replaces an instance unless the view holds a newer version; TERMINATED
    /// instances are removed (their capacity and ports are free).
    pub fn upsert_instance(&mut self, i: pb::LabletInstance) -> Applied {
        let (id, version) = (i.id.clone(), i.resource_version);
        let terminated = i.state() == pb::InstanceState::Terminated;
        upsert(&mut self.instances, id, version, terminated, i, |old| {
            old.resource_version
        })
    }

    /// Applies one change of the feed.
    pub fn apply(&mut self, change: pb::ChangeEvent) -> Applied {
        self.revision = self.revision.max(change.revision);
        let deleted = change.r#type == pb::ChangeType::Deleted as i32;
        use pb::change_event::Resource;
        match change.resource {
            Some(Resource::Instance(i)) if deleted => removed(self.instances.remove(&i.id)),
            Some(Resource::Instance(i)) => self.upsert_instance(i),
            Some(Resource::Worker(w)) if deleted => removed(self.workers.remove(&w.id)),
            Some(Resource::Worker(w)) => self.upsert_worker(w),
            Some(Resource::Template(t)) if deleted => {
                self.template_types.remove(&t.name);
                Applied::Changed
            }
            Some(Resource::Template(t)) => {
                self.template_types.insert(t.name, t.instance_type);
                Applied::Changed
            }
            _ => Applied::Nothing,
        }
    }

    /// The decoded definition version `instance` names, if the view holds it.
    pub fn definition_of(&self, instance: &pb::LabletInstance) -> Option<&LabletDefinition> {
        self.definitions.get(&definition_doc_id(
            &instance.definition_id,
            &instance.definition_version,
        ))
    }

    /// The placement request of a PENDING instance.
    pub fn request_for(
        &self,
        instance: &pb::LabletInstance,
        instantiation_lead: chrono::Duration,
    ) -> std::result::Result<PlacementRequest, String> {
        let def = self.definition_of(instance).ok_or_else(|| {
            format!(
                "definition {} version {} is not available",
                instance.definition_id, instance.definition_version
            )
        })?;
        let slot = time_slot_from_proto(instance.time_slot.as_ref(), "time_slot")
            .map_err(|e| e.to_string())?;
        let created_at = instance
            .created_at
            .as_ref()
            .map(|t| timestamp_from_proto(t, "created_at"))
            .transpose()
            .map_err(|e| e.to_string())?
            .unwrap_or(slot.start);
        Ok(PlacementRequest::for_definition(
            instance.id.clone(),
            def,
            slot,
            instantiation_lead,
            created_at,
        ))
    }

    /// The fleet snapshot decisions are made on: every worker of the view (sorted by id), with
    /// the capacity and ports of every instance that holds resources on it.
    pub fn fleet(&self, instantiation_lead: chrono::Duration) -> FleetSnapshot {
        let mut ids: Vec<&String> = self.workers.keys().collect();
        ids.sort();
        let mut snapshots: Vec<WorkerSnapshot> = Vec::with_capacity(ids.len());
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(ids.len());
        for id in ids {
            let w = &self.workers[id];
            let mut core = match convert::worker_from_proto(w, "worker") {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(worker = %w.id, error = %e, "unreadable worker left out of the fleet");
                    continue;
                }
            };
            core.declared.nodes = core.license_type.node_limit(core.declared.nodes);
            let instance_type = w
                .ec2
                .as_ref()
                .map(|e| e.instance_type.as_str())
                .filter(|t| !t.is_empty())
                .or_else(|| {
                    self.template_types
                        .get(&w.template_name)
                        .map(String::as_str)
                })
                .unwrap_or_default();
            match WorkerSnapshot::from_worker(&core, instance_type_has_nested_virt(instance_type)) {
                Ok(s) => {
                    index.insert(w.id.as_str(), snapshots.len());
                    snapshots.push(s);
                }
                Err(e) => {
                    tracing::warn!(worker = %w.id, error = %e, "worker left out of the fleet")
                }
            }
        }
        for inst in self.instances.values() {
            if inst.state() == pb::InstanceState::Pending || inst.worker_id.is_empty() {
                continue;
            }
            let Some(&i) = index.get(inst.worker_id.as_str()) else {
                continue;
            };
            let (Some(def), Ok(slot)) = (
                self.definition_of(inst),
                time_slot_from_proto(inst.time_slot.as_ref(), "time_slot"),
            ) else {
                tracing::warn!(instance = %inst.id, "placed instance without a known definition or slot; its capacity is not counted");
                continue;
            };
            let ports: BTreeMap<String, u16> = inst
                .allocated_ports
                .iter()
                .filter_map(|(n, p)| u16::try_from(*p).ok().map(|p| (n.clone(), p)))
                .collect();
            if let Err(e) = snapshots[i].add_booking(
                &inst.id,
                slot.booking_window(instantiation_lead),
                def.demand(),
                &ports,
            ) {
                tracing::warn!(instance = %inst.id, worker = %inst.worker_id, error = %e, "booking not counted");
            }
        }
        FleetSnapshot::new(snapshots)
    }

    /// The queue: PENDING instances ordered by slot start, then booking time, then id, with
    /// whether each is inside its lead window at `now` (ASAP: always).
    pub fn queue(&self, now: DateTime<Utc>, lookahead: chrono::Duration) -> Vec<QueueEntry<'_>> {
        let mut q: Vec<QueueEntry<'_>> = self
            .instances
            .values()
            .filter(|i| i.state() == pb::InstanceState::Pending)
            .map(|i| {
                let slot = i.time_slot.as_ref();
                let start = slot
                    .and_then(|s| s.start.as_ref())
                    .and_then(|t| timestamp_from_proto(t, "start").ok())
                    .unwrap_or(DateTime::<Utc>::MIN_UTC);
                let end = slot
                    .and_then(|s| s.end.as_ref())
                    .and_then(|t| timestamp_from_proto(t, "end").ok())
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                let created = i
                    .created_at
                    .as_ref()
                    .and_then(|t| timestamp_from_proto(t, "created_at").ok())
                    .unwrap_or(start);
                let asap = slot.is_some_and(|s| s.asap);
                let due_at = if asap {
                    created.min(start)
                } else {
                    start - lookahead
                };
                QueueEntry {
                    instance: i,
                    start,
                    created,
                    due_at,
                    due: due_at <= now && end > now,
                    expired: end <= now,
                }
            })
            .collect();
        q.sort_by(|a, b| {
            (a.start, a.created, a.instance.id.as_str()).cmp(&(
                b.start,
                b.created,
                b.instance.id.as_str(),
            ))
        });
        q
    }
}

/// One PENDING instance in the queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueEntry<'a> {
    /// The instance.
    pub instance: &'a pb::LabletInstance,
    /// Slot start.
    pub start: DateTime<Utc>,
    /// Booking time.
    pub created: DateTime<Utc>,
    /// When it enters its lead window.
    pub due_at: DateTime<Utc>,
    /// Inside the lead window now, and the slot has not ended.
    pub due: bool,
    /// The slot has ended (the controller expires it; the scheduler leaves it alone).
    pub expired: bool,
}
