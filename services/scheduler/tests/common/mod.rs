//! Test support: a real control plane (TestPlane), workers brought to RUNNING through the
//! internal API the way the controller does it, bookings through InstanceService, and
//! scheduler replicas on the plane's coordinator and clock.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ccm_control_plane::convert::timestamp_to_proto;
use ccm_control_plane::record::Mutation;
use ccm_control_plane::repo::Entity;
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_coord::{Coordinator, Leadership, LeaseOptions};
use ccm_core::capacity::CapacityTimeline;
use ccm_core::model::Capacity;
use ccm_proto::v1 as pb;
use ccm_runtime::client::PlaneClient;
use ccm_scheduler::{Scheduler, SchedulerSettings};
use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The template every test worker is made from: 48 CPU, 192 GiB, 1000 GiB, 100 nodes.
pub const TEMPLATE: &str = "enterprise-large";
/// The definition lineage of the standard lab.
pub const LAB: &str = "7d1e5c3a-0b2f-4c6d-8e9f-1a2b3c4d5e6f";

/// A running plane plus a controller leadership to create workers with.
pub struct Env {
    pub plane: TestPlane,
    pub client: PlaneClient,
    pub ctrl: pb::LeaderFence,
    _ctrl_leadership: Leadership,
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(TestOptions::default()).await
    }

    pub async fn start_with(options: TestOptions) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let plane = TestPlane::start_with(options).await.expect("test plane");
        let l = tokio::time::timeout(
            Duration::from_secs(20),
            plane
                .coord
                .campaign("controller", "controller-test", LeaseOptions::default()),
        )
        .await
        .expect("campaign in time")
        .expect("controller leadership");
        let ctrl = pb::LeaderFence {
            role: "controller".into(),
            epoch: l.epoch(),
            holder_id: "controller-test".into(),
        };
        let client = PlaneClient::from_channel(plane.channel().await.expect("channel"), None);
        let env = Env {
            plane,
            client,
            ctrl,
            _ctrl_leadership: l,
        };
        put(&env.plane, template()).await;
        env
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.plane.app.now()
    }

    /// Scheduler settings for tests: fast timers, the plane's address.
    pub fn settings(&self, replica: &str) -> SchedulerSettings {
        SchedulerSettings {
            control_plane_url: format!("http://{}", self.plane.addr),
            replica_id: replica.into(),
            lease_ttl: Duration::from_secs(2),
            cycle_interval: Duration::from_millis(100),
            relist_interval: Duration::from_secs(5),
            watch_heartbeat: Duration::from_secs(1),
            retry_backoff: Duration::from_millis(100),
            ..SchedulerSettings::default()
        }
    }

    /// A scheduler on the plane's coordinator and clock.
    pub fn scheduler(&self, settings: SchedulerSettings) -> Scheduler {
        self.scheduler_on(settings, self.plane.coord.clone())
    }

    pub fn scheduler_on(
        &self,
        settings: SchedulerSettings,
        coord: Arc<dyn Coordinator>,
    ) -> Scheduler {
        Scheduler::new(
            settings,
            self.client.clone(),
            coord,
            self.plane.clock.clone(),
        )
        .expect("valid settings")
    }

    /// Creates a worker record and brings it to RUNNING like the controller does.
    pub async fn running_worker(&self, name: &str) -> pb::CmlWorker {
        self.running_worker_of(name, TEMPLATE).await
    }

    /// Like [`Env::running_worker`], from `template`.
    pub async fn running_worker_of(&self, name: &str, template: &str) -> pb::CmlWorker {
        let w = self.worker_record_of(name, template).await;
        let mut internal = self.client.internal();
        internal
            .transition_worker(pb::TransitionWorkerRequest {
                fence: Some(self.ctrl.clone()),
                worker_id: w.id.clone(),
                from: pb::WorkerState::Pending as i32,
                to: pb::WorkerState::Provisioning as i32,
                reason: "instance_launched".into(),
                aws_instance_id: format!("i-{:0>17}", &w.id.replace('-', "")[..12]),
                ..Default::default()
            })
            .await
            .expect("provisioning");
        internal
            .report_worker(pb::ReportWorkerRequest {
                fence: Some(self.ctrl.clone()),
                worker_id: w.id.clone(),
                observation: Some(pb::WorkerObservation {
                    observed_at: Some(timestamp_to_proto(self.now())),
                    service_status: pb::CmlServiceStatus::Available as i32,
                    cml: Some(pb::CmlInfo {
                        version: "2.9.0".into(),
                        ready: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                resource_version: 0,
            })
            .await
            .expect("report");
        internal
            .transition_worker(pb::TransitionWorkerRequest {
                fence: Some(self.ctrl.clone()),
                worker_id: w.id.clone(),
                from: pb::WorkerState::Provisioning as i32,
                to: pb::WorkerState::Running as i32,
                reason: "cml_available".into(),
                ..Default::default()
            })
            .await
            .expect("running")
            .into_inner()
            .worker
            .expect("worker")
    }

    /// A worker record in PENDING (scale-up, not booted).
    pub async fn worker_record(&self, name: &str) -> pb::CmlWorker {
        self.worker_record_of(name, TEMPLATE).await
    }

    /// A worker record of `template` in PENDING.
    pub async fn worker_record_of(&self, name: &str, template: &str) -> pb::CmlWorker {
        self.client
            .internal()
            .create_worker_record(pb::CreateWorkerRecordRequest {
                fence: Some(self.ctrl.clone()),
                template_name: template.into(),
                name: name.into(),
                reason: "test".into(),
                request_id: format!("req-{name}"),
                ..Default::default()
            })
            .await
            .expect("worker record")
            .into_inner()
            .worker
            .expect("worker")
    }

    /// Books `def` for `[start, end)`, or ASAP when `start` is `None`.
    pub async fn book(
        &self,
        def: &pb::LabletDefinition,
        start: Option<DateTime<Utc>>,
        end: DateTime<Utc>,
    ) -> pb::LabletInstance {
        book_at(&self.client, def, start, end).await
    }

    pub async fn instance(&self, id: &str) -> pb::LabletInstance {
        self.client
            .instances()
            .get_instance(pb::GetInstanceRequest {
                instance_id: id.into(),
            })
            .await
            .expect("get instance")
            .into_inner()
            .instance
            .expect("instance")
    }

    /// Every instance, all states.
    pub async fn all_instances(&self) -> Vec<pb::LabletInstance> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .client
                .instances()
                .list_instances(pb::ListInstancesRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_inner();
            out.extend(page.instances);
            if page.next_page_token.is_empty() {
                return out;
            }
            token = page.next_page_token;
        }
    }

    /// Waits (polling the API) until `check` holds for the instance, at most `secs` seconds.
    pub async fn until_instance(
        &self,
        id: &str,
        secs: u64,
        check: impl Fn(&pb::LabletInstance) -> bool,
    ) -> pb::LabletInstance {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let i = self.instance(id).await;
            if check(&i) {
                return i;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {id} never reached the expected state; last: state {:?}, conditions {:?}",
                i.state(),
                i.conditions
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Books `def` ASAP until `end` through `client`.
pub async fn book_with(
    client: &PlaneClient,
    def: &pb::LabletDefinition,
    end: DateTime<Utc>,
) -> pb::LabletInstance {
    book_at(client, def, None, end).await
}

/// Books `def` for `[start, end)`, or ASAP when `start` is `None`.
pub async fn book_at(
    client: &PlaneClient,
    def: &pb::LabletDefinition,
    start: Option<DateTime<Utc>>,
    end: DateTime<Utc>,
) -> pb::LabletInstance {
    client
        .instances()
        .create_instance(pb::CreateInstanceRequest {
            definition_id: def.id.clone(),
            definition_version: def.version.clone(),
            time_slot: Some(pb::TimeSlot {
                start: start.map(timestamp_to_proto),
                end: Some(timestamp_to_proto(end)),
                asap: start.is_none(),
            }),
            owner_id: "alice".into(),
            ..Default::default()
        })
        .await
        .expect("booking")
        .into_inner()
        .instance
        .expect("instance")
}

/// Polls `f` until it returns `Some`, at most `secs` seconds.
pub async fn eventually<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> Fut,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `scheduler` until the returned token is cancelled.
pub fn spawn(scheduler: &Scheduler) -> (CancellationToken, JoinHandle<()>) {
    let stop = CancellationToken::new();
    let s = scheduler.clone();
    let t = stop.clone();
    let handle = tokio::spawn(async move {
        s.run(t).await.expect("scheduler runs");
    });
    (stop, handle)
}

/// Stores `entity` straight into the plane's store (definitions and templates have no
/// artifact-free public create path).
pub async fn put<E: Entity>(plane: &TestPlane, mut entity: E) -> E {
    let mut m = Mutation::at(plane.app.now());
    m.create(&mut entity, Vec::new()).expect("encodes");
    plane.app.commit(m).await.expect("stored");
    entity
}

pub fn template() -> pb::WorkerTemplate {
    pb::WorkerTemplate {
        id: uuid::Uuid::new_v4().to_string(),
        name: TEMPLATE.into(),
        instance_type: "m5zn.metal".into(),
        capacity: Some(pb::WorkerCapacity {
            cpu_cores: 48,
            memory_gb: 192,
            storage_gb: 1000,
            max_nodes: 100,
        }),
        license_type: pb::LicenseType::Enterprise as i32,
        ami_pattern: "CML-2.9.*".into(),
        regions: vec!["us-east-1".into()],
        port_range: Some(pb::PortRange {
            start: 2000,
            end: 9999,
        }),
        drain_timeout: Some(prost_types::Duration {
            seconds: 2 * 3600,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// An ACTIVE definition version needing `cpu` cores, `memory` GiB, 10 GiB storage, 5 nodes and
/// two ports, stored in the plane.
pub async fn definition(env: &Env, id: &str, cpu: i32, memory: i32) -> pb::LabletDefinition {
    let def = pb::LabletDefinition {
        id: id.into(),
        version: "1.0.0".into(),
        name: format!("lab-{}", &id[..8]),
        lab_artifact_uri: "s3://labs/lab.yaml".into(),
        lab_yaml_hash: format!("sha256:{}", "0".repeat(64)),
        resource_requirements: Some(pb::ResourceRequirements {
            cpu_cores: cpu,
            memory_gb: memory,
            storage_gb: 10,
            ..Default::default()
        }),
        license_affinity: vec![pb::LicenseType::Enterprise as i32],
        node_count: 5,
        port_template: Some(pb::PortTemplate {
            ports: ["serial_1", "vnc_1"]
                .iter()
                .map(|p| pb::PortDefinition {
                    name: (*p).into(),
                    protocol: pb::PortProtocol::Tcp as i32,
                })
                .collect(),
        }),
        max_duration: Some(prost_types::Duration {
            seconds: 8 * 3600,
            nanos: 0,
        }),
        status: pb::DefinitionStatus::Active as i32,
        created_at: Some(timestamp_to_proto(env.now())),
        created_by: "user:author".into(),
        ..Default::default()
    };
    put(&env.plane, def).await
}

/// Checks the invariants over every live (non-TERMINATED, placed) instance: ports unique per
/// worker, capacity within the worker's declared capacity at every moment, and each instance
/// scheduled exactly once in its history. Returns the number of placed instances.
pub async fn check_no_overcommit(env: &Env, def: &pb::LabletDefinition) -> usize {
    let lead = chrono::Duration::minutes(ccm_core::defaults::INSTANTIATION_LEAD_MINUTES);
    let demand = Capacity::new(
        u32::try_from(def.resource_requirements.as_ref().expect("req").cpu_cores).expect("cpu"),
        u32::try_from(def.resource_requirements.as_ref().expect("req").memory_gb).expect("mem"),
        10,
        5,
    );
    let mut ports: HashMap<String, HashSet<i32>> = HashMap::new();
    let mut timelines: HashMap<String, CapacityTimeline> = HashMap::new();
    let mut placed = 0;
    for i in env.all_instances().await {
        let scheduled_entries = i
            .state_history
            .iter()
            .filter(|h| h.to == pb::InstanceState::Scheduled as i32)
            .count();
        if i.worker_id.is_empty() {
            assert_eq!(scheduled_entries, 0, "{} scheduled without a worker", i.id);
            continue;
        }
        placed += 1;
        assert_eq!(
            scheduled_entries, 1,
            "instance {} scheduled {scheduled_entries} times",
            i.id
        );
        assert_eq!(i.allocated_ports.len(), 2, "instance {} ports", i.id);
        let taken = ports.entry(i.worker_id.clone()).or_default();
        for p in i.allocated_ports.values() {
            assert!(taken.insert(*p), "port {p} on {} given twice", i.worker_id);
        }
        let slot = ccm_control_plane::convert::time_slot_from_proto(i.time_slot.as_ref(), "slot")
            .expect("slot");
        let window = slot.booking_window(lead);
        let tl = timelines
            .entry(i.worker_id.clone())
            .or_insert_with(|| CapacityTimeline::new(Capacity::new(48, 192, 1000, 100)));
        tl.check(&demand, &window)
            .unwrap_or_else(|s| panic!("worker {} overcommitted: {s:?}", i.worker_id));
        tl.insert(i.id.clone(), window, demand);
    }
    placed
}
