//! Instance lifecycle end to end on real components: the assessment hand-off (a collection
//! request over real HTTP, the platform's CloudEvents through EventService.IngestEvent) down to
//! TERMINATED with the lab gone from the simulator and the ports released; and an import
//! failure injected on the simulator, retried with backoff, then TERMINATED with the reason.

mod common;

use std::sync::{Arc, Mutex};

use ccm_cml_sim::FaultPatch;
use ccm_proto::v1 as pb;
use common::{PORT_START, World};

/// A stand-in assessment platform: records every collection request.
async fn assessment_platform() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/api/v1/collections",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let record = record.clone();
            async move {
                record.lock().expect("lock").push(body);
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/api/v1/collections"), seen)
}

async fn ingest(
    world: &World,
    id: &str,
    event_type: &str,
    data: serde_json::Value,
) -> pb::IngestEventResponse {
    let fields = ccm_control_plane::services::internal::to_struct(data).expect("an object");
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(fields)),
    };
    world
        .client
        .events()
        .ingest_event(pb::IngestEventRequest {
            event: Some(pb::CloudEvent {
                id: id.into(),
                source: "assessment/test".into(),
                specversion: "1.0".into(),
                r#type: event_type.into(),
                datacontenttype: "application/json".into(),
                data: Some(pb::cloud_event::Data::JsonData(value)),
                ..Default::default()
            }),
        })
        .await
        .expect("event ingested")
        .into_inner()
}

/// A RUNNING instance of `def` on a RUNNING worker (placed as the scheduler would).
async fn running_instance(
    world: &World,
    def: &pb::LabletDefinition,
) -> (pb::LabletInstance, pb::CmlWorker) {
    let inst = world.book_asap(def).await;
    let worker = world.wait_worker_running().await;
    world
        .place(
            &inst.id,
            &worker.id,
            &[("serial_1", PORT_START), ("vnc_1", PORT_START + 1)],
        )
        .await;
    let running = world
        .until("the instance is RUNNING", || async {
            let i = world.instance(&inst.id).await;
            (i.state() == pb::InstanceState::Running).then_some(i)
        })
        .await;
    (running, worker)
}

async fn wait_state(world: &World, id: &str, state: pb::InstanceState) -> pb::LabletInstance {
    world
        .until(&format!("instance {}", state.as_str_name()), || async {
            let i = world.instance(id).await;
            (i.state() == state).then_some(i)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_full_lifecycle_with_assessment_events_ends_terminated_with_ports_released() {
    let (url, collections) = assessment_platform().await;
    let world = World::start(|_| {}, true).await;
    world.create_template(0).await;
    let def = world.create_definition("graded", Some(&url)).await;
    let (inst, worker) = running_instance(&world, &def).await;
    let aws = worker.ec2.clone().expect("ec2").instance_id;
    assert_eq!(
        world.sim_state(&aws).await["labs"].as_array().map(Vec::len),
        Some(1)
    );

    // Slot end: the definition has grading rules, so the lab is collected.
    world.plane.clock.advance(chrono::Duration::minutes(61));
    let collecting = wait_state(&world, &inst.id, pb::InstanceState::Collecting).await;
    assert_eq!(
        collecting.state_history.last().map(|h| h.reason.as_str()),
        Some("timeslot_end")
    );
    let request = world
        .until("the collection request", || async {
            collections.lock().expect("lock").first().cloned()
        })
        .await;
    assert_eq!(request["instance_id"], inst.id.as_str());
    assert_eq!(request["cml_lab_id"], inst.cml_lab_id.as_str());
    assert_eq!(request["worker_id"], worker.id.as_str());
    assert_eq!(request["collection_reason"], "timeslot_end");

    // The platform reports collection, then grading.
    let done = ingest(
        &world,
        "evt-collect-1",
        "assessment.collection.completed",
        serde_json::json!({
            "instance_id": inst.id, "collection_id": "c-1", "artifacts_uri": "s3://results/c-1"
        }),
    )
    .await;
    assert!(done.handled, "{done:?}");
    wait_state(&world, &inst.id, pb::InstanceState::Grading).await;
    let graded = ingest(&world, "evt-grade-1", "assessment.grading.completed", serde_json::json!({
        "instance_id": inst.id,
        "score": {"total": 8, "max": 10, "breakdown": [{"criterion": "ospf", "points": 8, "max": 10}]},
        "passed": true
    }))
    .await;
    assert!(graded.handled, "{graded:?}");

    // Teardown: STOPPING → STOPPED → ARCHIVED → TERMINATED, lab stopped, wiped and deleted.
    let done = wait_state(&world, &inst.id, pb::InstanceState::Terminated).await;
    assert_eq!(done.termination_reason, "cleanup");
    let score = done.grading_score.clone().expect("score kept");
    assert_eq!((score.total, score.max), (8.0, 10.0));
    let path: Vec<i32> = done.state_history.iter().map(|h| h.to).collect();
    use pb::InstanceState as S;
    assert!(
        path.ends_with(&[
            S::Running as i32,
            S::Collecting as i32,
            S::Grading as i32,
            S::Stopping as i32,
            S::Stopped as i32,
            S::Archived as i32,
            S::Terminated as i32
        ]),
        "{path:?}"
    );
    assert_eq!(
        collections.lock().expect("lock").len(),
        1,
        "one collection request"
    );
    let labs = world.sim_state(&aws).await["labs"].as_array().map(Vec::len);
    assert_eq!(labs, Some(0), "the lab is deleted on CML");
    let after = world.worker(&worker.id).await;
    assert!(
        after.port_allocations.is_empty(),
        "{:?}",
        after.port_allocations
    );
    assert!(after.instance_ids.is_empty(), "{:?}", after.instance_ids);
    assert_eq!(after.available_ports, 1000);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_user_stop_is_honoured_and_the_lab_stopped_on_cml() {
    let world = World::start(|_| {}, true).await;
    world.create_template(0).await;
    let def = world.create_definition("ungraded", None).await;
    let (inst, worker) = running_instance(&world, &def).await;
    let aws = worker.ec2.clone().expect("ec2").instance_id;
    world
        .client
        .instances()
        .stop_instance(pb::StopInstanceRequest {
            instance_id: inst.id.clone(),
            reason: "done early".into(),
            resource_version: 0,
        })
        .await
        .expect("stop accepted");
    wait_state(&world, &inst.id, pb::InstanceState::Stopped).await;
    let state = world.sim_state(&aws).await;
    assert_eq!(state["labs"][0]["state"], "STOPPED", "{state}");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_import_failure_is_retried_then_terminated_with_the_reason() {
    let world = World::start(|_| {}, true).await;
    world.create_template(0).await;
    let def = world.create_definition("flaky", None).await;
    let inst = world.book_asap(&def).await;
    let worker = world.wait_worker_running().await;
    let aws = worker.ec2.clone().expect("ec2").instance_id;
    world
        .sim
        .set_faults(
            &aws,
            &FaultPatch {
                fail_imports: Some(10),
                ..FaultPatch::default()
            },
        )
        .expect("faults set");
    world
        .place(
            &inst.id,
            &worker.id,
            &[("serial_1", PORT_START), ("vnc_1", PORT_START + 1)],
        )
        .await;
    // Each failure backs off in controller time; move the clock along while waiting.
    let done = world
        .until("the instance is TERMINATED", || async {
            world.plane.clock.advance(chrono::Duration::seconds(20));
            let i = world.instance(&inst.id).await;
            (i.state() == pb::InstanceState::Terminated).then_some(i)
        })
        .await;
    assert_eq!(done.termination_reason, "max_retries_exceeded");
    assert_eq!(done.retry_count, 3);
    let retries: Vec<&str> = done
        .state_history
        .iter()
        .filter(|h| h.reason.starts_with("instantiation_retry"))
        .map(|h| h.reason.as_str())
        .collect();
    assert_eq!(retries.len(), 2, "{retries:?}");
    assert!(retries[0].contains("attempt 1/3"), "{retries:?}");
    assert!(
        retries[0].contains("import"),
        "the CML error is kept: {retries:?}"
    );
    let cond = done
        .conditions
        .iter()
        .find(|c| c.r#type == "Instantiated")
        .expect("Instantiated condition");
    assert_eq!(cond.status(), pb::ConditionStatus::False);
    // Nothing is left on CML and the ports are free again.
    let state = world.sim_state(&aws).await;
    assert_eq!(state["labs"].as_array().map(Vec::len), Some(0), "{state}");
    assert_eq!(
        state["faults"]["fail_imports"], 7,
        "three imports were attempted"
    );
    let after = world.worker(&worker.id).await;
    assert!(after.port_allocations.is_empty());
    world.stop().await;
}
