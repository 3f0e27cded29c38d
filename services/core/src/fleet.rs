//! The fleet as the scheduler and the autoscaler see it: a snapshot of workers with their
//! capacity time lines and ports, and the requests waiting for room.
//!
//! The services build a [`FleetSnapshot`] from the store; the domain decides on it and may update
//! it in place as it decides (batch placement accounts for the placements it just made).
//!
//! Next to the workers the snapshot keeps a [`WorkerSummary`] per worker: the few fields the
//! placement filters read, 32 bytes, in one array, so a decision over a thousand workers walks
//! 32 KiB instead of a thousand large structs. AMI images are interned: each distinct (AMI name,
//! CML version) pair gets an [`ImageId`], so a request's AMI requirements are evaluated once per
//! image, not once per worker. The workers are private to keep the summaries exact: read them with
//! [`FleetSnapshot::workers`] / [`FleetSnapshot::get`], change them through
//! [`FleetSnapshot::get_mut`] / [`FleetSnapshot::worker_mut`] (a guard that re-summarises the
//! worker when dropped), [`FleetSnapshot::upsert`] or [`FleetSnapshot::book`].

use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, DerefMut};

use chrono::{DateTime, Duration, Utc};

use crate::capacity::CapacityTimeline;
use crate::error::{CoreError, CoreResult};
use crate::model::{
    AmiRequirement, Capacity, CmlWorker, LabletDefinition, LicenseType, PortRange, TimeSlot,
    TimeWindow, WorkerState, WorkerTemplate, saturating_u32,
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
            nested_virt: template.nested_virt,
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
        ports: &BTreeMap<String, u16>,
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

/// Number of an interned AMI image in a [`FleetSnapshot`]: an index into
/// [`FleetSnapshot::images`].
pub type ImageId = u32;

/// The AMI of a worker as the AMI requirements see it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AmiImage {
    /// AMI name, if known.
    pub ami_name: Option<String>,
    /// CML version, if known.
    pub cml_version: Option<String>,
}

/// The fields of a worker the placement filters and the score read, in 32 bytes.
///
/// [`FleetSnapshot`] keeps one per worker, in step with the worker ([`FleetSnapshot::summaries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Current state.
    pub state: WorkerState,
    /// Made from a template (`false` = legacy worker, never placed on).
    pub managed: bool,
    /// Licence it runs under.
    pub license: LicenseType,
    /// Whether it can run nested virtualisation.
    pub nested_virt: bool,
    /// Node limit after the licence cap.
    pub node_limit: u32,
    /// Declared capacity.
    pub declared: Capacity,
    /// Ports free now.
    pub free_ports: u32,
    /// Its (AMI name, CML version) in the snapshot's image table; 0 outside a snapshot.
    pub image: ImageId,
}

impl WorkerSummary {
    /// The summary of `worker`, whose image is `image`.
    pub fn of(worker: &WorkerSnapshot, image: ImageId) -> Self {
        WorkerSummary {
            state: worker.state,
            managed: worker.template_name.is_some(),
            license: worker.license_type,
            nested_virt: worker.nested_virt,
            node_limit: worker.node_limit,
            declared: worker.timeline.declared(),
            free_ports: saturating_u32(worker.ports.free_count()),
            image,
        }
    }

    /// A worker that does not exist yet, as `template` would make it, in `state`: what
    /// [`WorkerSnapshot::hypothetical`] would summarise to, without building the worker.
    pub fn of_template(template: &WorkerTemplate, state: WorkerState) -> Self {
        WorkerSummary {
            state,
            managed: true,
            license: template.license_type,
            nested_virt: template.nested_virt,
            node_limit: template.node_limit(),
            declared: template.declared_capacity(),
            free_ports: saturating_u32(template.port_range.len()),
            image: 0,
        }
    }
}

/// Distinct (AMI name, CML version) pairs, interned. Images are never removed: a stale one only
/// costs one more AMI verdict per request.
#[derive(Debug, Clone, Default)]
struct ImageTable {
    images: Vec<AmiImage>,
    /// AMI name → (CML version, id) of the images with that name.
    by_name: HashMap<String, Vec<(Option<String>, ImageId)>>,
    /// The same for workers whose AMI name is unknown.
    unnamed: Vec<(Option<String>, ImageId)>,
}

impl ImageTable {
    fn intern(&mut self, ami_name: Option<&str>, cml_version: Option<&str>) -> ImageId {
        let versions = match ami_name {
            Some(name) => self.by_name.get(name),
            None => Some(&self.unnamed),
        };
        if let Some(&(_, id)) =
            versions.and_then(|v| v.iter().find(|(ver, _)| ver.as_deref() == cml_version))
        {
            return id;
        }
        let id = saturating_u32(self.images.len());
        self.images.push(AmiImage {
            ami_name: ami_name.map(str::to_string),
            cml_version: cml_version.map(str::to_string),
        });
        let versions = match ami_name {
            Some(name) => self.by_name.entry(name.to_string()).or_default(),
            None => &mut self.unnamed,
        };
        versions.push((cml_version.map(str::to_string), id));
        id
    }
}

/// The fleet at one moment.
#[derive(Debug, Clone, Default)]
pub struct FleetSnapshot {
    /// Every known worker (any state).
    workers: Vec<WorkerSnapshot>,
    /// `summaries[i]` summarises `workers[i]`.
    summaries: Vec<WorkerSummary>,
    images: ImageTable,
    index: HashMap<String, usize>,
}

impl FleetSnapshot {
    /// A snapshot of `workers`.
    pub fn new(workers: Vec<WorkerSnapshot>) -> Self {
        let mut fleet = FleetSnapshot {
            summaries: Vec::with_capacity(workers.len()),
            index: HashMap::with_capacity(workers.len()),
            images: ImageTable::default(),
            workers,
        };
        for i in 0..fleet.workers.len() {
            if let Some(s) = fleet.summarise(i) {
                fleet.summaries.push(s);
                fleet.index.insert(fleet.workers[i].id.clone(), i);
            }
        }
        fleet
    }

    /// Every known worker (any state), in snapshot order.
    pub fn workers(&self) -> &[WorkerSnapshot] {
        &self.workers
    }

    /// The summary of every worker: `summaries()[i]` is that of `workers()[i]`.
    pub fn summaries(&self) -> &[WorkerSummary] {
        &self.summaries
    }

    /// The interned AMI images: [`WorkerSummary::image`] indexes it.
    pub fn images(&self) -> &[AmiImage] {
        &self.images.images
    }

    /// Adds a worker (or replaces the one with the same id).
    pub fn upsert(&mut self, worker: WorkerSnapshot) {
        let i = match self.index.get(&worker.id) {
            Some(&i) => {
                self.workers[i] = worker;
                i
            }
            None => {
                let i = self.workers.len();
                self.index.insert(worker.id.clone(), i);
                self.workers.push(worker);
                self.summaries.push(WorkerSummary::of(&self.workers[i], 0));
                i
            }
        };
        self.refresh(i);
    }

    /// The worker with `id`.
    pub fn get(&self, id: &str) -> Option<&WorkerSnapshot> {
        self.index.get(id).map(|&i| &self.workers[i])
    }

    /// Index of the worker with `id` in [`FleetSnapshot::workers`].
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The worker with `id`, mutable: its summary is brought up to date when the guard drops.
    pub fn get_mut(&mut self, id: &str) -> Option<WorkerMut<'_>> {
        let index = self.index_of(id)?;
        self.worker_mut(index)
    }

    /// Worker number `index`, mutable: its summary is brought up to date when the guard drops.
    pub fn worker_mut(&mut self, index: usize) -> Option<WorkerMut<'_>> {
        // Not `then_some`: it would build (and drop, re-summarising) a guard out of range.
        if index < self.workers.len() {
            Some(WorkerMut { fleet: self, index })
        } else {
            None
        }
    }

    /// Books a placement on worker number `index`: the lowest free ports, one per name in
    /// `port_names`, and `usage` over `window`; returns the ports.
    ///
    /// Does not check capacity (placement did). Refuses, changing nothing, an index out of range,
    /// an instance the worker already holds, and port names that are duplicate or too many.
    pub fn book(
        &mut self,
        index: usize,
        instance_id: &str,
        window: TimeWindow,
        usage: Capacity,
        port_names: &[String],
    ) -> CoreResult<BTreeMap<String, u16>> {
        let (Some(w), Some(summary)) = (self.workers.get_mut(index), self.summaries.get_mut(index))
        else {
            return Err(CoreError::invalid(
                "worker_index",
                format!(
                    "no worker number {index} in a fleet of {}",
                    self.workers.len()
                ),
            ));
        };
        if w.ports.ports_of(instance_id).is_some() || w.timeline.contains(instance_id) {
            return Err(CoreError::invalid(
                "instance_id",
                format!(
                    "instance {instance_id} is already placed on worker {}",
                    w.id
                ),
            ));
        }
        let ports = w.ports.allocate(instance_id, port_names)?;
        w.timeline.insert(instance_id, window, usage);
        w.live_instances += 1;
        summary.free_ports = saturating_u32(w.ports.free_count());
        Ok(ports)
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// `true` when there are no workers.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    fn summarise(&mut self, i: usize) -> Option<WorkerSummary> {
        let w = self.workers.get(i)?;
        let image = self
            .images
            .intern(w.ami_name.as_deref(), w.cml_version.as_deref());
        Some(WorkerSummary::of(w, image))
    }

    /// Re-summarises worker `i` and re-indexes the fleet if its id changed.
    fn refresh(&mut self, i: usize) {
        let (Some(s), Some(w)) = (self.summarise(i), self.workers.get(i)) else {
            return;
        };
        if let Some(slot) = self.summaries.get_mut(i) {
            *slot = s;
        }
        if self.index.get(&w.id) != Some(&i) {
            self.index = self
                .workers
                .iter()
                .enumerate()
                .map(|(i, w)| (w.id.clone(), i))
                .collect();
        }
    }
}

/// A worker of a [`FleetSnapshot`] borrowed mutably ([`FleetSnapshot::get_mut`],
/// [`FleetSnapshot::worker_mut`]); dereferences to the [`WorkerSnapshot`]. When it drops, the
/// worker's [`WorkerSummary`] is recomputed (and the id index rebuilt if the id changed; ids must
/// stay unique).
#[derive(Debug)]
pub struct WorkerMut<'a> {
    fleet: &'a mut FleetSnapshot,
    index: usize,
}

impl WorkerMut<'_> {
    /// Index of the worker in [`FleetSnapshot::workers`].
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Deref for WorkerMut<'_> {
    type Target = WorkerSnapshot;
    fn deref(&self) -> &WorkerSnapshot {
        &self.fleet.workers[self.index]
    }
}

impl DerefMut for WorkerMut<'_> {
    fn deref_mut(&mut self) -> &mut WorkerSnapshot {
        &mut self.fleet.workers[self.index]
    }
}

impl Drop for WorkerMut<'_> {
    fn drop(&mut self) {
        self.fleet.refresh(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> WorkerTemplate {
        WorkerTemplate {
            name: "personal-metal".into(),
            description: String::new(),
            instance_type: "m5zn.metal".into(),
            nested_virt: true,
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
    fn hypothetical_worker_nests_only_if_the_template_does() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let mut t = template();
        assert!(
            WorkerSnapshot::hypothetical("a", &t, WorkerState::Pending, at)
                .expect("valid template")
                .nested_virt
        );
        t.nested_virt = false;
        let w = WorkerSnapshot::hypothetical("b", &t, WorkerState::Pending, at)
            .expect("valid template");
        assert!(!w.nested_virt);
        assert_eq!(
            WorkerSummary::of_template(&t, WorkerState::Pending),
            WorkerSummary::of(&w, 0)
        );
    }

    /// Every summary equals a fresh summary of its worker, and images are interned.
    fn assert_in_step(fleet: &FleetSnapshot) {
        assert_eq!(fleet.summaries().len(), fleet.len());
        for (w, s) in fleet.workers().iter().zip(fleet.summaries()) {
            assert_eq!(*s, WorkerSummary::of(w, s.image), "{}", w.id);
            let image = &fleet.images()[s.image as usize];
            assert_eq!(image.ami_name, w.ami_name, "{}", w.id);
            assert_eq!(image.cml_version, w.cml_version, "{}", w.id);
        }
        for (i, w) in fleet.workers().iter().enumerate() {
            assert_eq!(fleet.index_of(&w.id), Some(i));
        }
    }

    #[test]
    fn summaries_follow_every_change() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let mk = |id: &str, ami: Option<&str>, cml: Option<&str>| {
            let mut w = WorkerSnapshot::hypothetical(id, &template(), WorkerState::Running, at)
                .expect("valid template");
            w.ami_name = ami.map(str::to_string);
            w.cml_version = cml.map(str::to_string);
            w
        };
        let mut fleet = FleetSnapshot::new(vec![
            mk("a", Some("CML-2.9.0"), Some("2.9.0")),
            mk("b", Some("CML-2.9.0"), Some("2.9.0")),
            mk("c", None, None),
            mk("d", Some("CML-2.9.0"), None),
        ]);
        assert_in_step(&fleet);
        let image = |f: &FleetSnapshot, i: usize| f.summaries()[i].image;
        assert_eq!(image(&fleet, 0), image(&fleet, 1), "same image, same id");
        assert_eq!(fleet.images().len(), 3);

        // Through the guard: state, template, licence, ports, image.
        {
            let mut b = fleet.get_mut("b").expect("exists");
            b.state = WorkerState::Draining;
            b.template_name = None;
            b.cml_version = Some("2.9.1".into());
            b.ports = PortAllocator::new(PortRange {
                start: 2000,
                end: 2009,
            })
            .expect("valid");
            assert_eq!(b.index(), 1);
        }
        assert_in_step(&fleet);
        let s = fleet.summaries()[1];
        assert_eq!(
            (s.state, s.managed, s.free_ports),
            (WorkerState::Draining, false, 10)
        );
        assert_ne!(image(&fleet, 1), image(&fleet, 0));
        {
            let mut c = fleet.worker_mut(2).expect("in range");
            c.add_booking(
                "i1",
                TimeWindow::new(at, at + Duration::hours(1)),
                Capacity::new(1, 1, 1, 1),
                &BTreeMap::from([("p".to_string(), 2000u16)]),
            )
            .expect("free");
        }
        assert_eq!(fleet.summaries()[2].free_ports, 7999);
        assert!(fleet.worker_mut(4).is_none());
        assert!(fleet.get_mut("zz").is_none());

        // Upsert: replace and add.
        let mut replaced = mk("a", Some("CML-3.0"), Some("3.0"));
        replaced.license_type = LicenseType::Enterprise;
        fleet.upsert(replaced);
        fleet.upsert(mk("e", None, None));
        assert_in_step(&fleet);
        assert_eq!(fleet.summaries()[0].license, LicenseType::Enterprise);
        assert_eq!(image(&fleet, 4), image(&fleet, 2));

        // A changed id is re-indexed.
        fleet.get_mut("e").expect("exists").id = "e2".into();
        assert!(fleet.get("e").is_none());
        assert_eq!(fleet.get("e2").map(|w| w.id.as_str()), Some("e2"));
        assert_in_step(&fleet);
    }

    #[test]
    fn book_allocates_ports_and_capacity_and_refuses_without_changing_anything() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let mut t = template();
        t.port_range = PortRange {
            start: 2000,
            end: 2002,
        };
        let w = WorkerSnapshot::hypothetical("w", &t, WorkerState::Running, at)
            .expect("valid template");
        let mut fleet = FleetSnapshot::new(vec![w]);
        let window = TimeWindow::new(at, at + Duration::hours(1));
        let names = ["a".to_string(), "b".to_string()];
        let ports = fleet
            .book(0, "i1", window, Capacity::new(2, 2, 2, 2), &names)
            .expect("free");
        assert_eq!(ports.values().copied().collect::<Vec<_>>(), [2000, 2001]);
        let w = fleet.get("w").expect("exists");
        assert_eq!(w.live_instances, 1);
        assert_eq!(w.timeline.peak(&window), Capacity::new(2, 2, 2, 2));
        assert_eq!(fleet.summaries()[0].free_ports, 1);
        assert_in_step(&fleet);

        let before = (
            fleet.workers()[0].timeline.clone(),
            fleet.workers()[0].ports.clone(),
            fleet.summaries()[0],
        );
        // Already placed, too many ports, duplicate names, no such worker.
        assert!(fleet.book(0, "i1", window, Capacity::ZERO, &[]).is_err());
        assert!(fleet.book(0, "i2", window, Capacity::ZERO, &names).is_err());
        let dup = ["x".to_string(), "x".to_string()];
        assert!(fleet.book(0, "i3", window, Capacity::ZERO, &dup).is_err());
        assert!(fleet.book(1, "i4", window, Capacity::ZERO, &[]).is_err());
        let after = (
            fleet.workers()[0].timeline.clone(),
            fleet.workers()[0].ports.clone(),
            fleet.summaries()[0],
        );
        assert_eq!(before, after);
        assert_eq!(fleet.workers()[0].live_instances, 1);
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
