//! Cross-service end-to-end tests: the real `ccm` binary as separate processes — `ccm serve
//! control-plane` (SQLite, etcd coordination), two `ccm serve scheduler` and two `ccm serve
//! controller` replicas (cloud `aws` against the moto EC2 emulator) — with a real etcd and a
//! multi-host CML simulator, driven over gRPC. See `tests/e2e/mod.rs` for the world.

#[path = "e2e/mod.rs"]
mod e2e;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use ccm_cml_sim::{Faults, SimOptions};
use ccm_proto::v1 as pb;
use e2e::{LEASE_TTL_SECS, PORT_RANGE, TEMPLATE, World, WorldOptions};

use pb::InstanceState as S;

/// Waits for the instance to be RUNNING on a RUNNING worker and returns both.
async fn running(world: &World, id: &str) -> (pb::LabletInstance, pb::CmlWorker) {
    let inst = world.wait_state(id, S::Running).await;
    let worker = world.worker(&inst.worker_id).await;
    (inst, worker)
}

/// The EC2 instance id of a worker.
fn aws_id(worker: &pb::CmlWorker) -> String {
    worker
        .ec2
        .as_ref()
        .map(|e| e.instance_id.clone())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("worker {} has no EC2 instance: {worker:?}", worker.id))
}

/// The states an instance went through, in order.
fn path(inst: &pb::LabletInstance) -> Vec<S> {
    inst.state_history
        .iter()
        .map(|h| S::try_from(h.to).unwrap_or(S::Unspecified))
        .collect()
}

/// Checks that the lab imported for `inst` on the worker's simulated CML carries its allocated
/// ports and no placeholder.
fn assert_lab_has_ports(world: &World, aws: &str, inst: &pb::LabletInstance) {
    let state = world.sim_state(aws);
    let lab = state
        .labs
        .iter()
        .find(|l| l.id == inst.cml_lab_id)
        .unwrap_or_else(|| panic!("lab {} not on CML {aws}: {state:?}", inst.cml_lab_id));
    assert_eq!(lab.title, format!("ccm-{}", inst.id));
    assert!(
        !lab.yaml.contains("${PORT_"),
        "placeholders left: {}",
        lab.yaml
    );
    let serial = inst.allocated_ports["serial_1"];
    let vnc = inst.allocated_ports["vnc_1"];
    assert!(
        lab.yaml.contains(&format!("serial:{serial}")),
        "serial port {serial} not in the lab: {}",
        lab.yaml
    );
    assert!(
        lab.yaml.contains(&format!("vnc:{vnc}")),
        "vnc port {vnc} not in the lab: {}",
        lab.yaml
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_places_and_runs_with_allocated_ports() {
    let _serial = e2e::serial().await;
    let world = World::start(WorldOptions::default()).await;
    assert!(world.workers().await.is_empty(), "no workers at the start");
    assert!(world.managed_ec2_instances().await.is_empty());

    let def = world.create_definition("routing").await;
    let booked = world.book_asap(&def, "student-1").await;
    assert_eq!(booked.state(), S::Pending);

    // The autoscaler creates a worker and the controller launches it on EC2 (moto).
    let launched = world
        .until("a managed EC2 instance on moto", || async {
            let found = world.managed_ec2_instances().await;
            (!found.is_empty()).then_some(found)
        })
        .await;
    assert_eq!(launched.len(), 1, "one worker launched: {launched:?}");
    let worker = world.wait_worker_running().await;
    assert_eq!(worker.template_name, TEMPLATE);
    assert_eq!(
        aws_id(&worker),
        launched[0].0,
        "the worker is the EC2 instance"
    );

    // Placed by the scheduler, instantiated by the controller.
    let (inst, on) = running(&world, &booked.id).await;
    assert_eq!(on.id, worker.id);
    let states = path(&inst);
    assert!(
        states.ends_with(&[S::Scheduled, S::Instantiating, S::Running]),
        "placed once, then instantiated: {states:?}"
    );
    assert_eq!(
        states.iter().filter(|s| **s == S::Scheduled).count(),
        1,
        "{states:?}"
    );
    let ports: BTreeSet<i32> = inst.allocated_ports.values().copied().collect();
    assert_eq!(ports.len(), 2, "{:?}", inst.allocated_ports);
    assert!(
        ports
            .iter()
            .all(|p| (PORT_RANGE.0..=PORT_RANGE.1).contains(p)),
        "{ports:?}"
    );
    assert!(!inst.cml_lab_id.is_empty());
    assert_lab_has_ports(&world, &aws_id(&worker), &inst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_through_grading() {
    let _serial = e2e::serial().await;
    let world = World::start(WorldOptions::default()).await;
    let def = world.create_definition("graded").await;
    let booked = world.book_asap(&def, "student-2").await;
    let (inst, worker) = running(&world, &booked.id).await;
    let aws = aws_id(&worker);
    let held = world.capacity(&worker.id).await;
    assert!(
        held.ports
            .as_ref()
            .is_some_and(|p| p.allocations.iter().any(|a| a.instance_id == inst.id)),
        "the instance holds ports while running: {held:?}"
    );

    // The user hands the lab in; the platform reports collection, then grading.
    world
        .client
        .instances()
        .collect_instance(pb::CollectInstanceRequest {
            instance_id: inst.id.clone(),
            resource_version: 0,
            reason: "hand-in".into(),
        })
        .await
        .expect("CollectInstance");
    world.wait_state(&inst.id, S::Collecting).await;
    let done = world
        .ingest(
            "evt-collect-1",
            "assessment.collection.completed",
            serde_json::json!({
                "instance_id": inst.id, "collection_id": "c-1", "artifacts_uri": "s3://results/c-1"
            }),
        )
        .await;
    assert!(done.handled, "{done:?}");
    world.wait_state(&inst.id, S::Grading).await;
    let graded = world
        .ingest(
            "evt-grade-1",
            "assessment.grading.completed",
            serde_json::json!({
                "instance_id": inst.id,
                "score": {"total": 7, "max": 10, "breakdown": [{"criterion": "ospf", "points": 7, "max": 10}]},
                "passed": true
            }),
        )
        .await;
    assert!(graded.handled, "{graded:?}");

    // The controller stops the lab; the user then deletes the instance (the slot is an hour).
    let stopped = world.wait_state(&inst.id, S::Stopped).await;
    let score = stopped.grading_score.clone().expect("score stored");
    assert_eq!((score.total, score.max, score.passed), (7.0, 10.0, true));
    let lab_state = world.sim_state(&aws);
    assert_eq!(
        lab_state
            .labs
            .iter()
            .find(|l| l.id == inst.cml_lab_id)
            .map(|l| l.state),
        Some(ccm_cml_sim::LabState::Stopped),
        "{lab_state:?}"
    );
    world
        .client
        .instances()
        .terminate_instance(pb::TerminateInstanceRequest {
            instance_id: inst.id.clone(),
            resource_version: 0,
            reason: String::new(),
            force: false,
        })
        .await
        .expect("TerminateInstance");
    let ended = world.wait_state(&inst.id, S::Terminated).await;
    let states = path(&ended);
    assert!(
        states.ends_with(&[
            S::Running,
            S::Collecting,
            S::Grading,
            S::Stopping,
            S::Stopped,
            S::Archived,
            S::Terminated
        ]),
        "{states:?}"
    );
    assert_eq!(
        ended.grading_score.as_ref().map(|s| s.total),
        Some(7.0),
        "the score is kept"
    );

    // Its ports are released and the lab is gone from CML.
    let after = world.capacity(&worker.id).await;
    let ports = after.ports.clone().expect("port usage");
    assert!(
        ports.allocations.iter().all(|a| a.instance_id != inst.id),
        "ports still held: {ports:?}"
    );
    assert_eq!(ports.used, 0, "{ports:?}");
    let lab_state = world.sim_state(&aws);
    assert!(
        lab_state.labs.iter().all(|l| l.id != inst.cml_lab_id),
        "lab left on CML: {lab_state:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_and_controller_failover() {
    let _serial = e2e::serial().await;
    let mut world = World::start(WorldOptions::default()).await;
    let ttl_plus = Duration::from_secs(LEASE_TTL_SECS + 2);
    let def = world.create_definition("failover").await;
    // A first booking brings up the worker.
    let first = world.book_asap(&def, "student-0").await;
    let (_, worker) = running(&world, &first.id).await;

    // --- the scheduler: kill -9 the leader with bookings queued.
    let leader = world
        .until("a scheduler leader", || async {
            for n in 0..2 {
                if let Some(s) = world.scheduler_status(n).await
                    && s.leader.as_ref().is_some_and(|l| l.is_leader)
                {
                    return Some(n);
                }
            }
            None
        })
        .await;
    let standby = 1 - leader;
    let old_epoch = world
        .scheduler_status(standby)
        .await
        .and_then(|s| s.leader)
        .map(|l| l.epoch)
        .unwrap_or_default();
    // Two bookings reach the leader; it dies at once; two more are booked while no scheduler
    // leads (the dead leader's lease still holds the election), so they wait in the queue.
    let mut queued = Vec::new();
    for n in 1..=2 {
        queued.push(world.book_asap(&def, &format!("student-{n}")).await);
    }
    world.schedulers[leader].kill9();
    for n in 3..=4 {
        let inst = world.book_asap(&def, &format!("student-{n}")).await;
        assert_eq!(inst.state(), S::Pending);
        queued.push(inst);
    }
    let took_over = world
        .until_within("the standby scheduler leads", ttl_plus, || async {
            world
                .scheduler_status(standby)
                .await
                .and_then(|s| s.leader)
                .filter(|l| l.is_leader)
        })
        .await;
    assert!(
        took_over.epoch > old_epoch,
        "{took_over:?} after epoch {old_epoch}"
    );
    for inst in &queued {
        world
            .until(&format!("instance {} placed", inst.id), || async {
                let i = world.instance(&inst.id).await;
                (!i.worker_id.is_empty()).then_some(())
            })
            .await;
    }
    // Every instance placed exactly once, and the worker's port claims unique.
    for inst in std::iter::once(&first).chain(&queued) {
        let i = world.instance(&inst.id).await;
        let placements = path(&i).iter().filter(|s| **s == S::Scheduled).count();
        assert_eq!(placements, 1, "{}: {:?}", i.id, i.state_history);
    }
    let cap = world.capacity(&worker.id).await;
    let usage = cap.ports.expect("port usage");
    let mut seen_ports = HashMap::new();
    let mut seen_instances = BTreeSet::new();
    for a in &usage.allocations {
        assert!(
            seen_instances.insert(a.instance_id.clone()),
            "{} twice: {usage:?}",
            a.instance_id
        );
        for p in a.ports.values() {
            if let Some(other) = seen_ports.insert(*p, a.instance_id.clone()) {
                panic!("port {p} held by {other} and {}: {usage:?}", a.instance_id);
            }
        }
    }
    for inst in std::iter::once(&first).chain(&queued) {
        assert!(
            seen_instances.contains(&inst.id),
            "{} holds no ports: {usage:?}",
            inst.id
        );
    }

    // --- the controller: kill -9 the leader; the standby leads and work continues.
    let leader = world
        .until("a controller leader", || async {
            for n in 0..2 {
                if let Some(s) = world.controller_status(n).await
                    && s.leader.as_ref().is_some_and(|l| l.is_leader)
                {
                    return Some(n);
                }
            }
            None
        })
        .await;
    let standby = 1 - leader;
    world.controllers[leader].kill9();
    world
        .until_within("the standby controller leads", ttl_plus, || async {
            world
                .controller_status(standby)
                .await
                .and_then(|s| s.leader)
                .filter(|l| l.is_leader)
        })
        .await;
    let next = world.book_asap(&def, "student-9").await;
    let (inst, _) = running(&world, &next.id).await;
    assert_lab_has_ports(&world, &aws_id(&worker), &inst);
    for q in &queued {
        world.wait_state(&q.id, S::Running).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cml_import_failure_is_retried_then_terminated() {
    let _serial = e2e::serial().await;
    // Every simulated CML fails its next 5 imports: more than the 3 attempts the controller makes.
    let world = World::start(WorldOptions {
        sim: SimOptions {
            faults: Faults {
                fail_imports: 5,
                ..Faults::default()
            },
            ..SimOptions::default()
        },
    })
    .await;
    let def = world.create_definition("flaky").await;
    let booked = world.book_asap(&def, "student-3").await;
    let worker = world.wait_worker_running().await;
    let aws = aws_id(&worker);
    let done = world.wait_state(&booked.id, S::Terminated).await;
    assert_eq!(done.termination_reason, "max_retries_exceeded", "{done:?}");
    assert_eq!(done.retry_count, 3);
    let retries: Vec<&str> = done
        .state_history
        .iter()
        .filter(|h| h.reason.starts_with("instantiation_retry"))
        .map(|h| h.reason.as_str())
        .collect();
    assert_eq!(retries.len(), 2, "{retries:?}");
    assert!(retries[0].contains("attempt 1/3"), "{retries:?}");
    let cond = done
        .conditions
        .iter()
        .find(|c| c.r#type == "Instantiated")
        .expect("Instantiated condition");
    assert_eq!(cond.status(), pb::ConditionStatus::False);
    let state = world.sim_state(&aws);
    assert_eq!(state.faults.fail_imports, 2, "three imports were attempted");
    assert!(state.labs.is_empty(), "{state:?}");
    let cap = world.capacity(&worker.id).await;
    assert!(
        cap.ports
            .is_some_and(|p| p.allocations.iter().all(|a| a.instance_id != booked.id)),
        "ports released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_idle_worker_but_not_busy_one() {
    let _serial = e2e::serial().await;
    let world = World::start(WorldOptions::default()).await;
    let def = world.create_definition("busy").await;
    let booked = world.book_asap(&def, "student-5").await;
    let (_, busy) = running(&world, &booked.id).await;

    // An admin adds a second worker; nothing is booked on it.
    let idle = world
        .client
        .workers()
        .create_worker(pb::CreateWorkerRequest {
            template_name: TEMPLATE.into(),
            name: "e2e-idle".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateWorker: {e:?}{}", world.diagnostics()))
        .into_inner()
        .worker
        .expect("worker");
    // The autoscaler drains it and, once empty, stops it (stop before terminate).
    let stopped = world
        .until("the idle worker STOPPED", || async {
            let w = world.worker(&idle.id).await;
            (w.state() == pb::WorkerState::Stopped).then_some(w)
        })
        .await;
    let aws = aws_id(&stopped);
    let ec2_state = world
        .ec2
        .client()
        .describe_instances()
        .instance_ids(&aws)
        .send()
        .await
        .expect("DescribeInstances")
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| {
            i.state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
        })
        .next();
    assert_eq!(ec2_state.as_deref(), Some("stopped"), "EC2 instance {aws}");

    let leader = world
        .until("a controller leader", || async {
            for n in 0..2 {
                if let Some(s) = world.controller_status(n).await
                    && s.leader.as_ref().is_some_and(|l| l.is_leader)
                {
                    return Some(n);
                }
            }
            None
        })
        .await;
    let channel = tonic::transport::Endpoint::from_shared(world.controllers[leader].url())
        .expect("uri")
        .connect()
        .await
        .expect("controller connects");
    let decisions = pb::controller_service_client::ControllerServiceClient::new(channel)
        .list_scaling_decisions(pb::ListScalingDecisionsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListScalingDecisions")
        .into_inner()
        .decisions;
    let about = |id: &str, action: pb::ScalingAction| {
        decisions
            .iter()
            .filter(|d| d.worker_id == id && d.action() == action)
            .count()
    };
    assert_eq!(
        about(&idle.id, pb::ScalingAction::Drain),
        1,
        "{decisions:?}"
    );
    assert_eq!(about(&idle.id, pb::ScalingAction::Stop), 1, "{decisions:?}");
    assert_eq!(
        about(&busy.id, pb::ScalingAction::Drain),
        0,
        "{decisions:?}"
    );

    // The busy worker and its lab are untouched.
    let busy_now = world.worker(&busy.id).await;
    assert_eq!(busy_now.state(), pb::WorkerState::Running);
    assert_eq!(world.instance(&booked.id).await.state(), S::Running);
}
