//! The fleet as the scheduler and the autoscaler see it: a snapshot of workers with their
//! capacity time lines and ports, and the requests waiting for room.
//!
//! The services build a [`FleetSnapshot`] from the store; the domain decides on it and may update
//! it in place as it decides (batch placement accounts for the placements it just made).

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};

use crate::capacity::CapacityTimeline;
use crate::error::CoreResult;
use crate::model::{
    AmiRequirement, Capacity, CmlWorker, LabletDefinition, LicenseType, PortRange, TimeSlot,
    TimeWindow, WorkerState, WorkerTemplate,
};
use crate::ports::PortAllocator;

/// One worker, with everything placement and scaling look at.
#[derive(Debug, Clone)]
pub struct WorkerSnapshot {
    /// Worker id.
    pub id: String,
    /// Template it was made from; `None` = legacy worker, never placed on or scaled.
    pub template_name: Option<String>,
    /// Current state; only RUNNING takes placements.
    pub state: WorkerState,
    /// When it entered `state`.
    pub state_since: DateTime<Utc>,
    /// Licence it runs under.
    pub license_type: LicenseType,
    /// Node limit after the licence cap (PERSONAL 20, otherwise the template's `max_nodes`).
    pub node_limit: u32,
    /// Whether it can run nested virtualisation (metal instance types).
    pub nested_virt: bool,
    /// AMI name, for `ami_requirements` name patterns.
    pub ami_name: Option<String>,
    /// CML version it reports (e.g. `2.9.0`), for `min_version`.
    pub cml_version: Option<String>,
    /// Declared capacity and bookings over time.
    pub timeline: CapacityTimeline,
    /// Port allocations.
    pub ports: PortAllocator,
    /// Instances on it that keep it from being stopped (every state but ARCHIVED/TERMINATED).
    pub live_instances: u32,
    /// When draining began, if DRAINING.
    pub drain_started_at: Option<DateTime<Utc>>,
}

impl WorkerSnapshot {
    /// A snapshot of `worker` with nothing booked yet: add bookings with
    /// [`WorkerSnapshot::add_booking`].
    pub fn from_worker(worker: &CmlWorker, nested_virt: bool) -> CoreResult<Self> {
        let node_limit = worker.declared.nodes;
        Ok(WorkerSnapshot {
            id: worker.id.clone(),
            template_name: worker.template_name.clone(),
            state: worker.state,
            state_since: worker.state_since(),
            license_type: worker.license_type,
            node_limit,
            nested_virt,
            ami_name: worker.ami_name.clone(),
            cml_version: worker.cml_version.clone(),
            timeline: CapacityTimeline::new(worker.declared),
            ports: PortAllocator::new(worker.port_range)?,
            live_instances: 0,
            drain_started_at: worker.drain_started_at,
        })
    }

    /// A worker that does not exist yet, as `template` would make it: used to ask "would a new
    /// worker of this template fit this demand?".
    pub fn hypothetical(
        id: impl Into<String>,
        template: &WorkerTemplate,
        state: WorkerState,
        at: DateTime<Utc>,
    ) -> CoreResult<Self> {
        Ok(WorkerSnapshot {
            id: id.into(),
            template_name: Some(template.name.clone()),
            state,
            state_since: at,
            license_type: template.license_type,
            node_limit: template.node_limit(),
            nested_virt: true,
            ami_name: None,
            cml_version: None,
            timeline: CapacityTimeline::new(template.declared_capacity()),
            ports: PortAllocator::new(template.port_range)?,
            live_instances: 0,
            drain_started_at: None,
        })
    }

    /// Records a placed instance: its capacity over `window` and its ports.
    ///
    /// Used when loading from the store; conflicting ports are an error.
    pub fn add_booking(
        &mut self,
        instance_id: &str,
        window: TimeWindow,
        usage: Capacity,
        ports: &std::collections::BTreeMap<String, u16>,
    ) -> CoreResult<()> {
        self.ports.restore(instance_id, ports)?;
        self.timeline.insert(instance_id, window, usage);
        self.live_instances += 1;
        Ok(())
    }

    /// Forgets a placed instance (terminated): frees its capacity and ports.
    pub fn remove_booking(&mut self, instance_id: &str) -> bool {
        let had = self.timeline.release(instance_id).is_some();
        let had_ports = self.ports.release(instance_id).is_some();
        if had || had_ports {
            self.live_instances = self.live_instances.saturating_sub(1);
        }
        had || had_ports
    }

    /// Declared capacity.
    pub fn declared(&self) -> Capacity {
        self.timeline.declared()
    }

    /// Port range.
    pub fn port_range(&self) -> PortRange {
        self.ports.range()
    }
}

/// An instance waiting to be placed, with what it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementRequest {
    /// Instance id.
    pub instance_id: String,
    /// Definition lineage id (for reports).
    pub definition_id: String,
    /// CPU, memory, storage and nodes one instance takes.
    pub demand: Capacity,
    /// Port names of the definition's port template, in order.
    pub port_names: Vec<String>,
    /// Licence types the definition accepts.
    pub license_affinity: Vec<LicenseType>,
    /// AMI constraints.
    pub ami_requirements: Vec<AmiRequirement>,
    /// Needs nested virtualisation.
    pub nested_virt: bool,
    /// The booked slot.
    pub slot: TimeSlot,
    /// The interval it will hold capacity: `[slot start − lead, slot end)`.
    pub window: TimeWindow,
    /// When it was booked: ties in the queue go to the earlier booking.
    pub created_at: DateTime<Utc>,
}

impl PlacementRequest {
    /// The request for one instance of `definition` booked for `slot`.
    pub fn for_definition(
        instance_id: impl Into<String>,
        definition: &LabletDefinition,
        slot: TimeSlot,
        instantiation_lead: Duration,
        created_at: DateTime<Utc>,
    ) -> Self {
        PlacementRequest {
            instance_id: instance_id.into(),
            definition_id: definition.id.clone(),
            demand: definition.demand(),
            port_names: definition
                .port_template
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            license_affinity: definition.license_affinity.clone(),
            ami_requirements: definition.resource_requirements.ami_requirements.clone(),
            nested_virt: definition.resource_requirements.nested_virt,
            slot,
            window: slot.booking_window(instantiation_lead),
            created_at,
        }
    }

    /// Queue order: slot start, then booking time, then id (domain.md §5).
    pub fn queue_key(&self) -> (DateTime<Utc>, DateTime<Utc>, &str) {
        (self.slot.start, self.created_at, self.instance_id.as_str())
    }
}

/// The fleet at one moment.
#[derive(Debug, Clone, Default)]
pub struct FleetSnapshot {
    /// Every known worker (any state).
    pub workers: Vec<WorkerSnapshot>,
    index: HashMap<String, usize>,
}

impl FleetSnapshot {
    /// A snapshot of `workers`.
    pub fn new(workers: Vec<WorkerSnapshot>) -> Self {
        let index = workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.id.clone(), i))
            .collect();
        FleetSnapshot { workers, index }
    }

    /// Adds a worker (or replaces the one with the same id).
    pub fn upsert(&mut self, worker: WorkerSnapshot) {
        if let Some(&i) = self.index.get(&worker.id) {
            self.workers[i] = worker;
        } else {
            self.index.insert(worker.id.clone(), self.workers.len());
            self.workers.push(worker);
        }
    }

    /// The worker with `id`.
    pub fn get(&self, id: &str) -> Option<&WorkerSnapshot> {
        self.index.get(id).map(|&i| &self.workers[i])
    }

    /// The worker with `id`, mutable.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut WorkerSnapshot> {
        self.index.get(id).map(|&i| &mut self.workers[i])
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// `true` when there are no workers.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn template() -> WorkerTemplate {
        WorkerTemplate {
            name: "personal-metal".into(),
            description: String::new(),
            instance_type: "m5zn.metal".into(),
            capacity: Capacity::new(48, 192, 500, 500),
            license_type: LicenseType::Personal,
            ami_pattern: "CML-2.9.*".into(),
            regions: vec!["us-east-1".into()],
            startup_minutes: 20,
            port_range: PortRange::default(),
            drain_timeout_hours: 4,
            min_warm: 0,
            max_workers: 10,
            tags: BTreeMap::new(),
        }
    }

    #[test]
    fn hypothetical_worker_takes_the_licence_capped_capacity() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let w = WorkerSnapshot::hypothetical("new", &template(), WorkerState::Pending, at)
            .expect("valid template");
        assert_eq!(w.node_limit, 20);
        assert_eq!(w.declared(), Capacity::new(48, 192, 500, 20));
        assert_eq!(w.ports.free_count(), 8000);
    }

    #[test]
    fn bookings_hold_capacity_and_ports_until_removed() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let mut w = WorkerSnapshot::hypothetical("w", &template(), WorkerState::Running, at)
            .expect("valid template");
        let window = TimeWindow::new(at, at + Duration::hours(1));
        let ports = BTreeMap::from([("serial_1".to_string(), 2000u16)]);
        w.add_booking("i1", window, Capacity::new(4, 8, 10, 5), &ports)
            .expect("free");
        assert_eq!(w.live_instances, 1);
        assert!(w.add_booking("i2", window, Capacity::ZERO, &ports).is_err());
        assert_eq!(w.timeline.peak(&window), Capacity::new(4, 8, 10, 5));
        assert!(w.remove_booking("i1"));
        assert!(!w.remove_booking("i1"));
        assert_eq!(w.live_instances, 0);
        assert!(w.ports.is_free(2000));
    }

    #[test]
    fn snapshot_indexes_by_id() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let mk = |id: &str| {
            WorkerSnapshot::hypothetical(id, &template(), WorkerState::Running, at)
                .expect("valid template")
        };
        let mut fleet = FleetSnapshot::new(vec![mk("a"), mk("b")]);
        assert_eq!(fleet.get("b").map(|w| w.id.as_str()), Some("b"));
        fleet.upsert(mk("c"));
        let mut replaced = mk("a");
        replaced.state = WorkerState::Draining;
        fleet.upsert(replaced);
        assert_eq!(fleet.len(), 3);
        assert_eq!(fleet.get("a").map(|w| w.state), Some(WorkerState::Draining));
        assert!(fleet.get("zz").is_none());
    }
}
