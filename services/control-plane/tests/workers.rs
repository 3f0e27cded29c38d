//! WorkerService over real gRPC on a test plane: worker records from templates and imports,
//! drain / cancel-drain, stop / terminate refused with live instances unless forced, tags,
//! the capacity view with overlapping bookings, operations for the controller (licence,
//! refresh, lab control) and the labs snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};

use ccm_auth::{AuthConfig, AuthLayer, Authenticator};
use ccm_cloudevents::{CloudEvent, Data};
use ccm_control_plane::error::REASON_INVALID_STATE_TRANSITION;
use ccm_control_plane::record::{Mutation, audit_from_entry};
use ccm_control_plane::repo::Entity;
use ccm_control_plane::services::instances::port_claim;
use ccm_control_plane::services::internal::license_token_of;
use ccm_control_plane::services::workers::labs_snapshot;
use ccm_control_plane::testing::{TestOptions, TestPlane, test_epoch};
use ccm_proto::v1 as pb;
use ccm_proto::v1::worker_service_client::WorkerServiceClient;
use ccm_store::{Claim, ClaimChange, Kind, LogKind, LogQuery};
use ccm_testkit::oidc::OidcIssuer;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

const LINEAGE: &str = "3f2b8c1e-5d7a-4e1b-9c0d-2a6f4b8e1c3d";
const TEMPLATE: &str = "personal-small";

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).expect("nanos"),
    }
}

async fn put<E: Entity>(plane: &TestPlane, mut entity: E, claims: Vec<Claim>) -> E {
    let mut m = Mutation::at(plane.app.now());
    m.create(&mut entity, claims).expect("encodes");
    plane.app.commit(m).await.expect("fixture commits");
    entity
}

async fn update<E: Entity>(plane: &TestPlane, mut entity: E, claims: ClaimChange) -> E {
    let mut m = Mutation::at(plane.app.now());
    m.update(&mut entity, claims).expect("encodes");
    plane.app.commit(m).await.expect("fixture update commits");
    entity
}

fn template() -> pb::WorkerTemplate {
    pb::WorkerTemplate {
        name: TEMPLATE.into(),
        description: "PERSONAL workers".into(),
        instance_type: "m5zn.metal".into(),
        capacity: Some(pb::WorkerCapacity {
            cpu_cores: 48,
            memory_gb: 192,
            storage_gb: 500,
            max_nodes: 50,
        }),
        license_type: pb::LicenseType::Personal as i32,
        ami_pattern: "CML-2.9.*".into(),
        regions: vec!["us-east-1".into(), "us-west-2".into()],
        startup_time: Some(prost_types::Duration {
            seconds: 20 * 60,
            nanos: 0,
        }),
        port_range: Some(pb::PortRange {
            start: 3000,
            end: 3999,
        }),
        drain_timeout: Some(prost_types::Duration {
            seconds: 6 * 3600,
            nanos: 0,
        }),
        tags: HashMap::from([
            ("Environment".to_owned(), "test".to_owned()),
            ("Team".to_owned(), "labs".to_owned()),
        ]),
        ..Default::default()
    }
}

fn definition() -> pb::LabletDefinition {
    pb::LabletDefinition {
        id: LINEAGE.into(),
        version: "1.0.0".into(),
        name: "ccna-lab".into(),
        lab_artifact_uri: "s3://labs/ccna.yaml".into(),
        resource_requirements: Some(pb::ResourceRequirements {
            cpu_cores: 4,
            memory_gb: 16,
            storage_gb: 20,
            ..Default::default()
        }),
        license_affinity: vec![pb::LicenseType::Personal as i32],
        node_count: 5,
        max_duration: Some(prost_types::Duration {
            seconds: 4 * 3600,
            nanos: 0,
        }),
        status: pb::DefinitionStatus::Active as i32,
        created_at: Some(ts(test_epoch())),
        ..Default::default()
    }
}

fn worker(name: &str, state: pb::WorkerState) -> pb::CmlWorker {
    pb::CmlWorker {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.into(),
        state: state as i32,
        template_name: TEMPLATE.into(),
        license_type: pb::LicenseType::Personal as i32,
        declared_capacity: Some(pb::WorkerCapacity {
            cpu_cores: 48,
            memory_gb: 192,
            storage_gb: 500,
            max_nodes: 20,
        }),
        port_range: Some(pb::PortRange {
            start: 2000,
            end: 2999,
        }),
        ec2: Some(pb::Ec2Info {
            instance_id: "i-0abc0000000000001".into(),
            region: "us-east-1".into(),
            public_ip: "203.0.113.9".into(),
            ..Default::default()
        }),
        created_at: Some(ts(test_epoch() - Duration::days(1))),
        ..Default::default()
    }
}

static NEXT_PORT: AtomicI32 = AtomicI32::new(2100);

/// An instance of the fixture definition on `worker_id` in `state` with a 90-minute slot from
/// `slot_start`, holding two fresh ports (and their claims) unless PENDING or TERMINATED.
async fn put_instance(
    plane: &TestPlane,
    worker_id: &str,
    state: pb::InstanceState,
    slot_start: DateTime<Utc>,
) -> pb::LabletInstance {
    let placed = state != pb::InstanceState::Pending;
    let holds = placed && state != pb::InstanceState::Terminated;
    let p = NEXT_PORT.fetch_add(2, Ordering::Relaxed);
    let now = plane.app.now();
    let instance = pb::LabletInstance {
        id: uuid::Uuid::new_v4().to_string(),
        definition_id: LINEAGE.into(),
        definition_version: "1.0.0".into(),
        definition_name: "ccna-lab".into(),
        state: state as i32,
        state_history: vec![pb::StateTransition {
            from: pb::InstanceState::Unspecified as i32,
            to: pb::InstanceState::Pending as i32,
            at: Some(ts(now)),
            reason: "created".into(),
            actor: "user:alice".into(),
        }],
        worker_id: if placed {
            worker_id.into()
        } else {
            String::new()
        },
        allocated_ports: if placed {
            HashMap::from([("serial_1".to_owned(), p), ("vnc_1".to_owned(), p + 1)])
        } else {
            HashMap::new()
        },
        time_slot: Some(pb::TimeSlot {
            start: Some(ts(slot_start)),
            end: Some(ts(slot_start + Duration::minutes(90))),
            asap: false,
        }),
        owner_id: "alice".into(),
        created_at: Some(ts(now)),
        scheduled_at: placed.then(|| ts(now)),
        ..Default::default()
    };
    let port = |n: i32| u16::try_from(n).expect("port");
    let claims = if holds {
        vec![
            port_claim(worker_id, port(p)),
            port_claim(worker_id, port(p + 1)),
        ]
    } else {
        Vec::new()
    };
    put(plane, instance, claims).await
}

async fn client(plane: &TestPlane) -> WorkerServiceClient<Channel> {
    WorkerServiceClient::new(plane.channel().await.expect("connects"))
}

fn details(status: &Status) -> ErrorDetails {
    status
        .check_error_details()
        .expect("google.rpc details decode")
}

fn violation_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    details(status)
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

fn precondition_type(status: &Status) -> String {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    details(status)
        .precondition_failure()
        .expect("PreconditionFailure")
        .violations[0]
        .r#type
        .clone()
}

fn assert_illegal(status: &Status, from: &str, to: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let d = details(status);
    let info = d.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, REASON_INVALID_STATE_TRANSITION);
    assert_eq!(info.metadata.get("from").map(String::as_str), Some(from));
    assert_eq!(info.metadata.get("to").map(String::as_str), Some(to));
}

fn data_of(event: &CloudEvent) -> &serde_json::Map<String, Value> {
    match &event.data {
        Some(Data::Json(Value::Object(map))) => map,
        other => panic!("JSON object data expected, got {other:?}"),
    }
}

fn events_of_type(plane: &TestPlane, event_type: &str) -> Vec<CloudEvent> {
    plane
        .sink
        .events()
        .into_iter()
        .filter(|e| e.event_type == event_type)
        .collect()
}

async fn audit_actions(plane: &TestPlane, id: &str) -> Vec<String> {
    let page = plane
        .app
        .store
        .list_log(
            LogKind::Audit,
            LogQuery {
                resource_id: Some(id.to_owned()),
                ..Default::default()
            },
        )
        .await
        .expect("audit log reads");
    let mut out: Vec<String> = page
        .entries
        .iter()
        .map(|e| audit_from_entry(e).expect("record").action)
        .collect();
    out.reverse();
    out
}

fn cap(cpu: i32, mem: i32, disk: i32, nodes: i32) -> Option<pb::WorkerCapacity> {
    Some(pb::WorkerCapacity {
        cpu_cores: cpu,
        memory_gb: mem,
        storage_gb: disk,
        max_nodes: nodes,
    })
}

// ---------------------------------------------------------------------------------------------
// CreateWorker / ImportWorkers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_create_worker_from_a_template_records_a_pending_worker() {
    let plane = TestPlane::start().await.expect("plane");
    put(&plane, template(), Vec::new()).await;
    let mut c = client(&plane).await;
    let w = c
        .create_worker(pb::CreateWorkerRequest {
            template_name: TEMPLATE.into(),
            tags: HashMap::from([
                ("Team".to_owned(), "exams".to_owned()),
                ("CostCenter".to_owned(), "<b>42</b>".to_owned()),
            ]),
            ..Default::default()
        })
        .await
        .expect("creates")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(w.state(), pb::WorkerState::Pending);
    assert_eq!(w.state_reason, "created");
    assert_eq!(w.template_name, TEMPLATE);
    assert_eq!(w.license_type(), pb::LicenseType::Personal);
    assert_eq!(
        w.declared_capacity,
        cap(48, 192, 500, 20),
        "PERSONAL caps the template's 50 nodes at 20"
    );
    assert_eq!(w.available_capacity, cap(48, 192, 500, 20));
    assert_eq!(w.allocated_capacity, cap(0, 0, 0, 0));
    assert_eq!(
        w.port_range,
        Some(pb::PortRange {
            start: 3000,
            end: 3999
        })
    );
    assert_eq!(w.available_ports, 1000);
    assert!(
        w.name.starts_with("cml-worker-personal-small-"),
        "{}",
        w.name
    );
    assert_eq!(w.created_by, "user:anonymous");
    let ec2 = w.ec2.clone().expect("ec2 facts");
    assert_eq!(ec2.instance_type, "m5zn.metal");
    assert_eq!(ec2.region, "us-east-1", "the template's first region");
    assert!(ec2.instance_id.is_empty(), "the controller launches it");
    assert_eq!(ec2.tags.get("Team").map(String::as_str), Some("exams"));
    assert_eq!(
        ec2.tags.get("Environment").map(String::as_str),
        Some("test")
    );
    assert_eq!(
        ec2.tags.get("CostCenter").map(String::as_str),
        Some("<b>42</b>")
    );
    assert_eq!(
        ec2.tags.get("ccm:template").map(String::as_str),
        Some(TEMPLATE)
    );
    assert_eq!(
        ec2.tags.get("ccm:managed").map(String::as_str),
        Some("true")
    );
    assert_eq!(ec2.tags.get("ManagedBy").map(String::as_str), Some("ccm"));
    assert_eq!(ec2.tags.get("Name"), Some(&w.name));
    let stored: pb::CmlWorker = plane.app.get(&w.id).await.expect("stored");
    assert_eq!(stored.resource_version, 1);
    let events = events_of_type(&plane, "ccm.worker.pending");
    assert_eq!(events.len(), 1);
    let d = data_of(&events[0]);
    assert_eq!(d["worker_id"], json!(w.id));
    assert_eq!(d["template_name"], json!(TEMPLATE));
    assert_eq!(d["new_state"], json!("pending"));
    assert_eq!(audit_actions(&plane, &w.id).await, ["worker.create"]);

    // Named, in the second region, with an AMI override; idempotent with a request id.
    let req = pb::CreateWorkerRequest {
        template_name: TEMPLATE.into(),
        name: "exam-worker-1".into(),
        region: "us-west-2".into(),
        ami_id: "ami-0abcdef1234567890".into(),
        request_id: "create-1".into(),
        ..Default::default()
    };
    let first = c
        .create_worker(req.clone())
        .await
        .expect("creates")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(first.name, "exam-worker-1");
    let e = first.ec2.clone().expect("ec2");
    assert_eq!(
        (e.region.as_str(), e.ami_id.as_str()),
        ("us-west-2", "ami-0abcdef1234567890")
    );
    let again = c
        .create_worker(req)
        .await
        .expect("retry")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(again.id, first.id);
    assert_eq!(
        plane
            .app
            .store
            .count(Kind::Worker, &[])
            .await
            .expect("count"),
        2
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_worker_refuses_bad_input() {
    let plane = TestPlane::start().await.expect("plane");
    put(&plane, template(), Vec::new()).await;
    let mut c = client(&plane).await;
    let s = c
        .create_worker(pb::CreateWorkerRequest {
            template_name: "Bad_Template".into(),
            name: "<script>".into(),
            region: "US EAST".into(),
            ami_id: "ami-zzz".into(),
            tags: HashMap::from([
                ("aws:cloudformation".to_owned(), "x".to_owned()),
                ("ccm:managed".to_owned(), "false".to_owned()),
                ("k".to_owned(), "v".repeat(300)),
            ]),
            request_id: "x".repeat(65),
        })
        .await
        .expect_err("refused");
    let fields = violation_fields(&s);
    for f in [
        "template_name",
        "name",
        "region",
        "ami_id",
        "tags[\"aws:cloudformation\"]",
        "tags[\"ccm:managed\"]",
        "tags[\"k\"]",
        "request_id",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} missing in {fields:?}");
    }
    let s = c
        .create_worker(pb::CreateWorkerRequest {
            template_name: "no-such-template".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown template");
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .create_worker(pb::CreateWorkerRequest {
            template_name: TEMPLATE.into(),
            region: "eu-central-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("region not in the template");
    assert_eq!(violation_fields(&s), ["region"]);
    assert_eq!(
        plane
            .app
            .store
            .count(Kind::Worker, &[])
            .await
            .expect("count"),
        0
    );
    assert!(plane.sink.events().is_empty());
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_import_adopts_an_instance_id_once_and_refuses_ami_selectors() {
    use pb::import_workers_request::Selector;
    let plane = TestPlane::start().await.expect("plane");
    put(&plane, template(), Vec::new()).await;
    let mut c = client(&plane).await;
    let import = |selector: Selector, template: &str| pb::ImportWorkersRequest {
        selector: Some(selector),
        template_name: template.into(),
        ..Default::default()
    };
    let r = c
        .import_workers(import(
            Selector::AwsInstanceId("i-0123456789abcdef0".into()),
            TEMPLATE,
        ))
        .await
        .expect("imports")
        .into_inner();
    assert_eq!(r.total_found, 1);
    assert!(r.skipped.is_empty());
    let w = r.imported.into_iter().next().expect("one worker");
    assert_eq!(w.state(), pb::WorkerState::Unknown);
    assert_eq!(w.state_reason, "imported");
    assert_eq!(w.name, "worker-i-0123456789abcdef0");
    assert_eq!(
        w.ec2.as_ref().map(|e| e.instance_id.as_str()),
        Some("i-0123456789abcdef0")
    );
    assert_eq!(w.declared_capacity, cap(48, 192, 500, 20));
    assert_eq!(events_of_type(&plane, "ccm.worker.unknown").len(), 1);
    // The controller is asked to look at it at once.
    let ops = c
        .list_worker_operations(pb::ListWorkerOperationsRequest {
            worker_id: w.id.clone(),
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner()
        .operations;
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].kind(), pb::WorkerOperationKind::Refresh);
    assert!(ops[0].include_labs);

    // The same EC2 instance again: skipped.
    let again = c
        .import_workers(import(
            Selector::AwsInstanceId("i-0123456789abcdef0".into()),
            "",
        ))
        .await
        .expect("answers")
        .into_inner();
    assert!(again.imported.is_empty());
    assert_eq!(again.skipped.len(), 1);
    assert!(
        again.skipped[0].reason.contains(&w.id),
        "{:?}",
        again.skipped
    );
    // A legacy import of another instance gets the legacy capacity and a custom name.
    let mut legacy = import(Selector::AwsInstanceId("i-0badc0de".into()), "");
    legacy.name = "old-lab-box".into();
    let l = c
        .import_workers(legacy)
        .await
        .expect("imports")
        .into_inner()
        .imported
        .into_iter()
        .next()
        .expect("worker");
    assert_eq!(l.name, "old-lab-box");
    assert!(l.template_name.is_empty());
    assert_eq!(l.declared_capacity, cap(48, 192, 500, 20));

    // AMI selectors need an EC2 search: refused with the reason.
    let s = c
        .import_workers(import(Selector::AmiName("CML-2.9".into()), ""))
        .await
        .expect_err("unsupported");
    assert_eq!(precondition_type(&s), "UNSUPPORTED");
    // Bad input.
    let s = c
        .import_workers(import(Selector::AwsInstanceId("i-XYZ".into()), "Bad!"))
        .await
        .expect_err("bad");
    assert_eq!(violation_fields(&s), ["aws_instance_id", "template_name"]);
    let s = c
        .import_workers(pb::ImportWorkersRequest::default())
        .await
        .expect_err("no selector");
    assert_eq!(violation_fields(&s), ["selector"]);
    let s = c
        .import_workers(import(
            Selector::AwsInstanceId("i-0123456789abcdef1".into()),
            "no-such-template",
        ))
        .await
        .expect_err("unknown template");
    assert_eq!(s.code(), Code::NotFound);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Drain, stop, start, terminate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_drain_and_cancel_drain_go_through_the_worker_state_machine() {
    let plane = TestPlane::start().await.expect("plane");
    put(&plane, template(), Vec::new()).await;
    put(&plane, definition(), Vec::new()).await;
    let w = put(
        &plane,
        worker("w-drain", pb::WorkerState::Running),
        Vec::new(),
    )
    .await;
    let running = put_instance(&plane, &w.id, pb::InstanceState::Running, test_epoch()).await;
    let mut c = client(&plane).await;
    let now = test_epoch();

    let s = c
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: w.id.clone(),
            resource_version: 9,
            ..Default::default()
        })
        .await
        .expect_err("stale");
    assert_eq!(s.code(), Code::Aborted);

    let drained = c
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: w.id.clone(),
            resource_version: w.resource_version,
            ..Default::default()
        })
        .await
        .expect("drains")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(drained.state(), pb::WorkerState::Draining);
    assert_eq!(drained.state_reason, "admin");
    let drain = drained.drain.clone().expect("drain info");
    assert_eq!(drain.drain_started_at, Some(ts(now)));
    assert_eq!(drain.reason, "admin");
    assert_eq!(
        drain.deadline,
        Some(ts(now + Duration::hours(6))),
        "the template's drain timeout"
    );
    assert_eq!(drain.requested_by, "user:anonymous");
    assert_eq!(drain.instances_at_start, 1);
    assert_eq!(drained.instance_ids, std::slice::from_ref(&running.id));
    let events = events_of_type(&plane, "ccm.worker.draining");
    assert_eq!(events.len(), 1);
    let d = data_of(&events[0]);
    assert_eq!(d["running_instances_count"], json!(1));
    assert_eq!(d["previous_state"], json!("running"));
    assert_eq!(
        d["estimated_drain_completion"],
        json!("2030-01-15T10:30:00.000Z"),
        "the running lab's slot end, before the deadline"
    );

    // Draining twice is illegal.
    let s = c
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: w.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("already draining");
    assert_illegal(&s, "WORKER_STATE_DRAINING", "WORKER_STATE_DRAINING");

    // Cancel: back to RUNNING, drain info gone.
    let back = c
        .cancel_worker_drain(pb::CancelWorkerDrainRequest {
            worker_id: w.id.clone(),
            reason: "exam week".into(),
            ..Default::default()
        })
        .await
        .expect("cancels")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(back.state(), pb::WorkerState::Running);
    assert_eq!(back.state_reason, "admin_action");
    assert!(back.drain.is_none());
    let events = events_of_type(&plane, "ccm.worker.drain.cancelled");
    assert_eq!(events.len(), 1);
    assert_eq!(data_of(&events[0])["cancelled_by"], json!("user:anonymous"));
    let s = c
        .cancel_worker_drain(pb::CancelWorkerDrainRequest {
            worker_id: w.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("not draining");
    assert_illegal(&s, "WORKER_STATE_RUNNING", "WORKER_STATE_RUNNING");

    // A drain timeout in the request wins; a bad one is refused.
    let again = c
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: w.id.clone(),
            reason: "consolidation".into(),
            timeout: Some(prost_types::Duration {
                seconds: 1800,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("drains")
        .into_inner()
        .worker
        .expect("worker");
    let drain = again.drain.expect("drain info");
    assert_eq!(drain.reason, "consolidation");
    assert_eq!(drain.deadline, Some(ts(now + Duration::minutes(30))));
    for (secs, why) in [(0, "zero"), (-5, "negative"), (8 * 86400, "too long")] {
        let s = c
            .drain_worker(pb::DrainWorkerRequest {
                worker_id: w.id.clone(),
                timeout: Some(prost_types::Duration {
                    seconds: secs,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .expect_err(why);
        assert_eq!(violation_fields(&s), ["timeout"], "{why}");
    }
    // Only RUNNING workers drain.
    let stopped = put(
        &plane,
        worker("w-stopped", pb::WorkerState::Stopped),
        Vec::new(),
    )
    .await;
    let s = c
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: stopped.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("stopped");
    assert_illegal(&s, "WORKER_STATE_STOPPED", "WORKER_STATE_DRAINING");
    // Same instant, so compare as a set of actions.
    let mut actions = audit_actions(&plane, &w.id).await;
    actions.sort();
    assert_eq!(
        actions,
        ["worker.cancel_drain", "worker.drain", "worker.drain"]
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_stop_and_terminate_are_refused_with_live_instances_unless_forced() {
    let plane = TestPlane::start().await.expect("plane");
    put(&plane, definition(), Vec::new()).await;
    let mut c = client(&plane).await;

    // Stop.
    let a = put(&plane, worker("w-a", pb::WorkerState::Running), Vec::new()).await;
    let live = put_instance(&plane, &a.id, pb::InstanceState::Running, test_epoch()).await;
    let s = c
        .stop_worker(pb::StopWorkerRequest {
            worker_id: a.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("in use");
    assert_eq!(precondition_type(&s), "IN_USE");
    assert!(s.message().contains(&live.id), "{}", s.message());
    let stopped = c
        .stop_worker(pb::StopWorkerRequest {
            worker_id: a.id.clone(),
            force: true,
            reason: "hardware fault".into(),
            ..Default::default()
        })
        .await
        .expect("forced")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(stopped.state(), pb::WorkerState::Stopping);
    assert_eq!(stopped.desired_state(), pb::WorkerDesiredState::Stopped);
    assert_eq!(stopped.stop_initiated_at, Some(ts(test_epoch())));
    assert!(
        stopped.instance_ids.is_empty(),
        "its instance was terminated"
    );
    let ended: pb::LabletInstance = plane.app.get(&live.id).await.expect("instance");
    assert_eq!(ended.state(), pb::InstanceState::Terminated);
    assert_eq!(ended.termination_reason, "worker_stopped");
    assert!(
        plane
            .app
            .store
            .claims_of(Kind::Instance, &live.id)
            .await
            .expect("claims")
            .is_empty(),
        "its ports are released"
    );
    assert_eq!(events_of_type(&plane, "ccm.worker.stopping").len(), 1);
    let terminated = events_of_type(&plane, "ccm.lablet.instance.terminated");
    assert_eq!(terminated.len(), 1);
    assert_eq!(data_of(&terminated[0])["final_state"], json!("running"));
    // Stopping again changes nothing.
    let again = c
        .stop_worker(pb::StopWorkerRequest {
            worker_id: a.id.clone(),
            ..Default::default()
        })
        .await
        .expect("idempotent")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(again.resource_version, stopped.resource_version);

    // Start: desired RUNNING recorded, the controller does the rest.
    let b = put(&plane, worker("w-b", pb::WorkerState::Stopped), Vec::new()).await;
    let started = c
        .start_worker(pb::StartWorkerRequest {
            worker_id: b.id.clone(),
            ..Default::default()
        })
        .await
        .expect("starts")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(started.state(), pb::WorkerState::Stopped);
    assert_eq!(started.desired_state(), pb::WorkerDesiredState::Running);
    assert_eq!(started.start_initiated_at, Some(ts(test_epoch())));
    assert_eq!(started.resource_version, 2);
    let again = c
        .start_worker(pb::StartWorkerRequest {
            worker_id: b.id.clone(),
            ..Default::default()
        })
        .await
        .expect("idempotent")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(again.resource_version, 2, "nothing written");

    // Terminate.
    let t = put(&plane, worker("w-t", pb::WorkerState::Running), Vec::new()).await;
    let scheduled = put_instance(
        &plane,
        &t.id,
        pb::InstanceState::Scheduled,
        test_epoch() + Duration::hours(3),
    )
    .await;
    let archived = put_instance(&plane, &t.id, pb::InstanceState::Archived, test_epoch()).await;
    let s = c
        .terminate_worker(pb::TerminateWorkerRequest {
            worker_id: t.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("in use");
    assert_eq!(precondition_type(&s), "IN_USE");
    assert!(s.message().contains("1 active instance"), "{}", s.message());
    let gone = c
        .terminate_worker(pb::TerminateWorkerRequest {
            worker_id: t.id.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .expect("forced")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(gone.state(), pb::WorkerState::ShuttingDown);
    assert_eq!(gone.desired_state(), pb::WorkerDesiredState::Terminated);
    assert_eq!(gone.terminated_by, "user:anonymous");
    for id in [&scheduled.id, &archived.id] {
        let i: pb::LabletInstance = plane.app.get(id).await.expect("instance");
        assert_eq!(i.state(), pb::InstanceState::Terminated);
        assert_eq!(i.termination_reason, "worker_terminated");
    }
    assert_eq!(events_of_type(&plane, "ccm.worker.shutting_down").len(), 1);
    let s = c
        .start_worker(pb::StartWorkerRequest {
            worker_id: t.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("terminating");
    assert_illegal(&s, "WORKER_STATE_SHUTTING_DOWN", "WORKER_STATE_RUNNING");
    let s = c
        .stop_worker(pb::StopWorkerRequest {
            worker_id: t.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("terminating");
    assert_illegal(&s, "WORKER_STATE_SHUTTING_DOWN", "WORKER_STATE_STOPPED");

    // forget_only removes the record and leaves EC2 alone; archived instances do not block.
    let f = put(&plane, worker("w-f", pb::WorkerState::Running), Vec::new()).await;
    put_instance(&plane, &f.id, pb::InstanceState::Archived, test_epoch()).await;
    let r = c
        .terminate_worker(pb::TerminateWorkerRequest {
            worker_id: f.id.clone(),
            forget_only: true,
            ..Default::default()
        })
        .await
        .expect("forgets")
        .into_inner();
    assert!(r.worker.is_none());
    let s = c
        .get_worker(pb::GetWorkerRequest {
            worker_id: f.id.clone(),
        })
        .await
        .expect_err("gone");
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(audit_actions(&plane, &f.id).await, ["worker.forget"]);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Tags
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_tags_replace_by_default_merge_on_request_and_keep_ccm_keys() {
    let plane = TestPlane::start().await.expect("plane");
    let mut w = worker("w-tags", pb::WorkerState::Running);
    if let Some(e) = w.ec2.as_mut() {
        e.tags = HashMap::from([
            ("Name".to_owned(), "w-tags".to_owned()),
            ("ccm:template".to_owned(), TEMPLATE.to_owned()),
            ("Owner".to_owned(), "alice".to_owned()),
        ]);
    }
    let w = put(&plane, w, Vec::new()).await;
    let mut c = client(&plane).await;
    let tags = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let r = c
        .update_worker_tags(pb::UpdateWorkerTagsRequest {
            worker_id: w.id.clone(),
            tags: tags(&[("Env", "prod")]),
            ..Default::default()
        })
        .await
        .expect("replaces")
        .into_inner();
    assert_eq!(
        r.tags,
        tags(&[("Env", "prod"), ("ccm:template", TEMPLATE)]),
        "keys not given are deleted, ccm's own are kept"
    );
    let worker = r.worker.expect("worker");
    assert_eq!(
        worker.ec2.as_ref().map(|e| e.tags.clone()),
        Some(r.tags.clone())
    );
    let cond = worker
        .conditions
        .iter()
        .find(|c| c.r#type == "TagsSynced")
        .expect("condition for the controller");
    assert_eq!(cond.status(), pb::ConditionStatus::False);
    assert_eq!(cond.reason, "TagsUpdated");

    let merged = c
        .update_worker_tags(pb::UpdateWorkerTagsRequest {
            worker_id: w.id.clone(),
            tags: tags(&[("Team", "labs <&>")]),
            merge: true,
            ..Default::default()
        })
        .await
        .expect("merges")
        .into_inner();
    assert_eq!(
        merged.tags,
        tags(&[
            ("Env", "prod"),
            ("Team", "labs <&>"),
            ("ccm:template", TEMPLATE)
        ])
    );
    let version = merged.worker.expect("worker").resource_version;
    // The same set again writes nothing.
    let same = c
        .update_worker_tags(pb::UpdateWorkerTagsRequest {
            worker_id: w.id.clone(),
            tags: tags(&[("Team", "labs <&>")]),
            merge: true,
            ..Default::default()
        })
        .await
        .expect("no-op")
        .into_inner();
    assert_eq!(same.worker.expect("worker").resource_version, version);

    // Refusals: empty (legacy 400), reserved prefixes, oversize, stale version.
    let s = c
        .update_worker_tags(pb::UpdateWorkerTagsRequest {
            worker_id: w.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("empty");
    assert_eq!(violation_fields(&s), ["tags"]);
    let s = c
        .update_worker_tags(pb::UpdateWorkerTagsRequest {
            worker_id: w.id.clone(),
            tags: tags(&[("aws:foo", "x"), ("CCM:Template", "y"), ("", "z")]),
            ..Default::default()
        })
        .await
        .expect_err("reserved");
    let fields = violation_fields(&s);
    for f in ["tags[\"aws:foo\"]", "tags[\"CCM:Template\"]", "tags[\"\"]"] {
        assert!(fields.iter().any(|x| x == f), "{f} missing in {fields:?}");
    }
    let s = c
        .update_worker_tags(pb::UpdateWorkerTagsRequest {
            worker_id: w.id.clone(),
            tags: tags(&[("Env", "x")]),
            resource_version: 1,
            ..Default::default()
        })
        .await
        .expect_err("stale");
    assert_eq!(s.code(), Code::Aborted);
    let s = c
        .update_worker_tags(pb::UpdateWorkerTagsRequest {
            worker_id: uuid::Uuid::new_v4().to_string(),
            tags: tags(&[("Env", "x")]),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(
        audit_actions(&plane, &w.id).await,
        ["worker.tags", "worker.tags"]
    );
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Capacity and reads
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_capacity_view_with_two_overlapping_bookings() {
    let plane = TestPlane::start().await.expect("plane");
    put(&plane, definition(), Vec::new()).await;
    let w = put(
        &plane,
        worker("w-cap", pb::WorkerState::Running),
        Vec::new(),
    )
    .await;
    let now = test_epoch(); // 09:00
    // B runs 09:00–10:30 (booked from 08:45); A is scheduled 10:00–11:30 (booked from 09:45).
    let b = put_instance(&plane, &w.id, pb::InstanceState::Running, now).await;
    let a = put_instance(
        &plane,
        &w.id,
        pb::InstanceState::Scheduled,
        now + Duration::hours(1),
    )
    .await;
    // Neither a pending booking nor a terminated one counts.
    put_instance(&plane, &w.id, pb::InstanceState::Pending, now).await;
    put_instance(&plane, &w.id, pb::InstanceState::Terminated, now).await;
    let mut c = client(&plane).await;
    let r = c
        .get_worker_capacity(pb::GetWorkerCapacityRequest {
            worker_id: w.id.clone(),
            window_start: None,
            window_end: Some(ts(now + Duration::hours(3))),
        })
        .await
        .expect("capacity")
        .into_inner();
    assert_eq!(r.worker_id, w.id);
    assert_eq!(r.declared, cap(48, 192, 500, 20));
    assert_eq!(r.allocated, cap(4, 16, 20, 5), "only B's booking has begun");
    assert_eq!(r.available, cap(44, 176, 480, 15));
    let ports = r.ports.expect("ports");
    assert_eq!((ports.total, ports.used, ports.free), (1000, 4, 996));
    assert_eq!(ports.allocations.len(), 2);
    let booked: Vec<(String, i32)> = r
        .bookings
        .iter()
        .map(|x| (x.instance_id.clone(), x.state))
        .collect();
    assert_eq!(
        booked,
        [
            (b.id.clone(), pb::InstanceState::Running as i32),
            (a.id.clone(), pb::InstanceState::Scheduled as i32)
        ]
    );
    assert_eq!(
        r.bookings[1].reserved_window.as_ref().and_then(|s| s.start),
        Some(ts(now + Duration::minutes(45))),
        "slot start − 15 min lead"
    );
    assert_eq!(r.bookings[1].reserved, cap(4, 16, 20, 5));
    assert_eq!(r.bookings[1].ports, a.allocated_ports);
    let steps: Vec<(DateTime<Utc>, DateTime<Utc>, i32, i32)> = r
        .time_line
        .iter()
        .map(|s| {
            let t = |x: &Option<prost_types::Timestamp>| {
                let x = x.expect("set");
                DateTime::from_timestamp(x.seconds, 0).expect("instant")
            };
            (
                t(&s.start),
                t(&s.end),
                s.allocated.expect("allocated").cpu_cores,
                s.instance_count,
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            (now, now + Duration::minutes(45), 4, 1),
            (
                now + Duration::minutes(45),
                now + Duration::minutes(90),
                8,
                2
            ),
            (
                now + Duration::minutes(90),
                now + Duration::minutes(150),
                4,
                1
            ),
            (now + Duration::minutes(150), now + Duration::hours(3), 0, 0),
        ]
    );
    assert_eq!(
        r.time_line[1].available,
        cap(40, 160, 460, 10),
        "the overlap peak"
    );
    assert_eq!(
        r.window,
        Some(pb::TimeSlot {
            start: Some(ts(now)),
            end: Some(ts(now + Duration::hours(3))),
            asap: false
        })
    );

    // Once A's window has begun, it is allocated too.
    plane.clock.advance(Duration::minutes(50));
    let got = c
        .get_worker(pb::GetWorkerRequest {
            worker_id: w.id.clone(),
        })
        .await
        .expect("reads")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(got.allocated_capacity, cap(8, 32, 40, 10));
    assert_eq!(got.available_capacity, cap(40, 160, 460, 10));
    assert_eq!(got.available_ports, 996);
    let mut ids = got.instance_ids.clone();
    ids.sort();
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort();
    assert_eq!(ids, want);

    // Bad windows.
    let s = c
        .get_worker_capacity(pb::GetWorkerCapacityRequest {
            worker_id: w.id.clone(),
            window_start: Some(ts(now)),
            window_end: Some(ts(now)),
        })
        .await
        .expect_err("empty window");
    assert_eq!(violation_fields(&s), ["window_end"]);
    let s = c
        .get_worker_capacity(pb::GetWorkerCapacityRequest {
            worker_id: w.id.clone(),
            window_start: Some(ts(now)),
            window_end: Some(ts(now + Duration::days(15))),
        })
        .await
        .expect_err("too long");
    assert_eq!(violation_fields(&s), ["window_end"]);
    let s = c
        .get_worker_capacity(pb::GetWorkerCapacityRequest {
            worker_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown worker");
    assert_eq!(s.code(), Code::NotFound);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_list_workers_filters_searches_orders_by_name_and_pages() {
    let plane = TestPlane::start().await.expect("plane");
    let mut c = client(&plane).await;
    let mut ids = HashMap::new();
    for (name, state, license, template, ec2_id) in [
        (
            "delta",
            pb::WorkerState::Running,
            pb::LicenseType::Personal,
            TEMPLATE,
            "i-0abc000000000000d",
        ),
        (
            "alpha",
            pb::WorkerState::Stopped,
            pb::LicenseType::Enterprise,
            "enterprise",
            "i-0abc000000000000a",
        ),
        (
            "charlie",
            pb::WorkerState::Terminated,
            pb::LicenseType::Personal,
            TEMPLATE,
            "i-0abc000000000000c",
        ),
        (
            "bravo",
            pb::WorkerState::Running,
            pb::LicenseType::Personal,
            "",
            "i-0def000000000000b",
        ),
    ] {
        let mut w = worker(name, state);
        w.license_type = license as i32;
        w.template_name = template.into();
        if let Some(e) = w.ec2.as_mut() {
            e.instance_id = ec2_id.into();
        }
        let w = put(&plane, w, Vec::new()).await;
        ids.insert(name, w.id);
    }
    let names = |r: pb::ListWorkersResponse| -> Vec<String> {
        r.workers.into_iter().map(|w| w.name).collect()
    };
    let list = |req: pb::ListWorkersRequest| {
        let mut c = c.clone();
        async move { c.list_workers(req).await.expect("lists").into_inner() }
    };
    assert_eq!(
        names(list(pb::ListWorkersRequest::default()).await),
        ["alpha", "bravo", "delta"],
        "by name, TERMINATED hidden"
    );
    assert_eq!(
        names(
            list(pb::ListWorkersRequest {
                include_terminated: true,
                ..Default::default()
            })
            .await
        ),
        ["alpha", "bravo", "charlie", "delta"]
    );
    assert_eq!(
        names(
            list(pb::ListWorkersRequest {
                states: vec![pb::WorkerState::Running as i32],
                ..Default::default()
            })
            .await
        ),
        ["bravo", "delta"]
    );
    assert_eq!(
        names(
            list(pb::ListWorkersRequest {
                template_name: TEMPLATE.into(),
                ..Default::default()
            })
            .await
        ),
        ["delta"]
    );
    assert_eq!(
        names(
            list(pb::ListWorkersRequest {
                license_type: pb::LicenseType::Enterprise as i32,
                ..Default::default()
            })
            .await
        ),
        ["alpha"]
    );
    assert_eq!(
        names(
            list(pb::ListWorkersRequest {
                search: "I-0DEF".into(),
                ..Default::default()
            })
            .await
        ),
        ["bravo"],
        "case-insensitive on the EC2 id"
    );
    assert_eq!(
        names(
            list(pb::ListWorkersRequest {
                search: "us-east".into(),
                ..Default::default()
            })
            .await
        )
        .len(),
        3
    );
    // Pages of two.
    let first = list(pb::ListWorkersRequest {
        page_size: 2,
        include_terminated: true,
        ..Default::default()
    })
    .await;
    assert_eq!(first.total_size, 4);
    let token = first.next_page_token.clone();
    assert_eq!(names(first), ["alpha", "bravo"]);
    let second = list(pb::ListWorkersRequest {
        page_size: 2,
        include_terminated: true,
        page_token: token,
        ..Default::default()
    })
    .await;
    assert!(second.next_page_token.is_empty());
    assert_eq!(names(second), ["charlie", "delta"]);
    // Bad requests.
    let s = c
        .list_workers(pb::ListWorkersRequest {
            states: vec![77],
            license_type: 9,
            template_name: "Bad Name".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad");
    assert_eq!(
        violation_fields(&s),
        ["states[0]", "license_type", "template_name"]
    );
    let got = c
        .get_worker(pb::GetWorkerRequest {
            worker_id: ids["delta"].clone(),
        })
        .await
        .expect("reads")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(got.name, "delta");
    assert_eq!(got.available_capacity, cap(48, 192, 500, 20));
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

async fn complete(plane: &TestPlane, id: &str) {
    let mut op: pb::WorkerOperation = plane.app.get(id).await.expect("operation");
    op.status = pb::OperationStatus::Succeeded as i32;
    update(plane, op, ClaimChange::Replace(Vec::new())).await;
}

#[tokio::test]
async fn test_licence_operations_keep_the_token_out_of_public_reads() {
    let plane = TestPlane::start().await.expect("plane");
    let w = put(
        &plane,
        worker("w-lic", pb::WorkerState::Running),
        Vec::new(),
    )
    .await;
    let mut c = client(&plane).await;
    let token = "SLR-TOKEN-9f8e7d6c5b4a3f2e1d0c";
    let op = c
        .register_worker_license(pb::RegisterWorkerLicenseRequest {
            worker_id: w.id.clone(),
            license_token: token.into(),
            reregister: false,
        })
        .await
        .expect("queued")
        .into_inner()
        .operation
        .expect("operation");
    assert_eq!(op.kind(), pb::WorkerOperationKind::RegisterLicense);
    assert_eq!(op.status(), pb::OperationStatus::Pending);
    assert_eq!(op.worker_id, w.id);
    assert_eq!(op.requested_by, "user:anonymous");
    assert_eq!(op.created_at, Some(ts(test_epoch())));
    assert!(!format!("{op:?}").contains(token), "not in the response");
    let read = c
        .get_worker_operation(pb::GetWorkerOperationRequest {
            operation_id: op.id.clone(),
        })
        .await
        .expect("reads")
        .into_inner()
        .operation
        .expect("operation");
    assert_eq!(read, op);
    // Only the internal path finds it.
    assert_eq!(
        license_token_of(&plane.app, &op.id).await.expect("reads"),
        Some(token.to_owned())
    );
    let stored = plane
        .app
        .store
        .get(Kind::WorkerOperation, &op.id)
        .await
        .expect("reads")
        .expect("stored");
    assert!(
        !stored.body.as_str().contains(token),
        "not in the document body"
    );
    let audit = plane
        .app
        .store
        .list_log(LogKind::Audit, LogQuery::default())
        .await
        .expect("audit");
    assert!(
        audit
            .entries
            .iter()
            .all(|e| !e.body.as_str().contains(token)),
        "not in the audit log"
    );

    // One licence operation at a time.
    let s = c
        .register_worker_license(pb::RegisterWorkerLicenseRequest {
            worker_id: w.id.clone(),
            license_token: token.into(),
            reregister: true,
        })
        .await
        .expect_err("busy");
    assert_eq!(precondition_type(&s), "IN_PROGRESS");
    let s = c
        .deregister_worker_license(pb::DeregisterWorkerLicenseRequest {
            worker_id: w.id.clone(),
        })
        .await
        .expect_err("busy");
    assert_eq!(precondition_type(&s), "IN_PROGRESS");
    complete(&plane, &op.id).await;
    assert_eq!(
        license_token_of(&plane.app, &op.id).await.expect("reads"),
        None,
        "released with the completion"
    );
    let dereg = c
        .deregister_worker_license(pb::DeregisterWorkerLicenseRequest {
            worker_id: w.id.clone(),
        })
        .await
        .expect("queued")
        .into_inner()
        .operation
        .expect("operation");
    assert_eq!(dereg.kind(), pb::WorkerOperationKind::DeregisterLicense);
    complete(&plane, &dereg.id).await;

    // Already registered: only with reregister.
    let mut registered: pb::CmlWorker = plane.app.get(&w.id).await.expect("worker");
    registered.license = Some(pb::CmlLicense {
        status: pb::LicenseStatus::Registered as i32,
        ..Default::default()
    });
    update(&plane, registered, ClaimChange::Keep).await;
    let s = c
        .register_worker_license(pb::RegisterWorkerLicenseRequest {
            worker_id: w.id.clone(),
            license_token: token.into(),
            reregister: false,
        })
        .await
        .expect_err("registered");
    assert_eq!(precondition_type(&s), "LICENSE");
    c.register_worker_license(pb::RegisterWorkerLicenseRequest {
        worker_id: w.id.clone(),
        license_token: token.into(),
        reregister: true,
    })
    .await
    .expect("re-registers");

    // Bad tokens never come back in the error.
    for bad in ["", "has space", "tab\there", &"x".repeat(513)] {
        let s = c
            .register_worker_license(pb::RegisterWorkerLicenseRequest {
                worker_id: w.id.clone(),
                license_token: bad.into(),
                reregister: true,
            })
            .await
            .expect_err("bad token");
        assert_eq!(violation_fields(&s), ["license_token"]);
        if !bad.is_empty() {
            assert!(!s.message().contains(bad));
        }
    }
    // A stopped worker takes no licence operation.
    let stopped = put(
        &plane,
        worker("w-off", pb::WorkerState::Stopped),
        Vec::new(),
    )
    .await;
    let s = c
        .register_worker_license(pb::RegisterWorkerLicenseRequest {
            worker_id: stopped.id.clone(),
            license_token: token.into(),
            reregister: false,
        })
        .await
        .expect_err("not running");
    assert_eq!(precondition_type(&s), "STATE");
    assert!(
        plane.sink.events().is_empty(),
        "operations emit no CloudEvent"
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_refresh_is_queued_once_rate_limited_and_skipped_when_pointless() {
    let plane = TestPlane::start().await.expect("plane");
    let w = put(
        &plane,
        worker("w-ref", pb::WorkerState::Running),
        Vec::new(),
    )
    .await;
    let mut c = client(&plane).await;
    let refresh = |id: &str| pb::RefreshWorkerRequest {
        worker_id: id.to_owned(),
        include_labs: true,
    };
    let first = c
        .refresh_worker(refresh(&w.id))
        .await
        .expect("queued")
        .into_inner();
    assert!(first.scheduled);
    let op = first.operation.expect("operation");
    assert_eq!(op.kind(), pb::WorkerOperationKind::Refresh);
    assert!(op.include_labs);
    let second = c
        .refresh_worker(refresh(&w.id))
        .await
        .expect("answers")
        .into_inner();
    assert!(!second.scheduled);
    assert_eq!(
        second.skip_reason(),
        pb::RefreshSkipReason::AlreadyScheduled
    );
    assert_eq!(second.operation.map(|o| o.id), Some(op.id.clone()));
    complete(&plane, &op.id).await;
    plane.clock.advance(Duration::seconds(4));
    let third = c
        .refresh_worker(refresh(&w.id))
        .await
        .expect("answers")
        .into_inner();
    assert_eq!(third.skip_reason(), pb::RefreshSkipReason::RateLimited);
    assert_eq!(
        third.retry_after,
        Some(prost_types::Duration {
            seconds: 6,
            nanos: 0
        })
    );
    plane.clock.advance(Duration::seconds(7));
    // The controller's own poll is due in 5 s: pointless.
    let mut polled: pb::CmlWorker = plane.app.get(&w.id).await.expect("worker");
    polled.next_refresh_at = Some(ts(plane.app.now() + Duration::seconds(5)));
    let polled = update(&plane, polled, ClaimChange::Keep).await;
    let fourth = c
        .refresh_worker(refresh(&w.id))
        .await
        .expect("answers")
        .into_inner();
    assert_eq!(fourth.skip_reason(), pb::RefreshSkipReason::PollImminent);
    let mut later = polled;
    later.next_refresh_at = Some(ts(plane.app.now() + Duration::minutes(5)));
    update(&plane, later, ClaimChange::Keep).await;
    let fifth = c
        .refresh_worker(refresh(&w.id))
        .await
        .expect("queued")
        .into_inner();
    assert!(fifth.scheduled);

    let stopped = put(
        &plane,
        worker("w-off", pb::WorkerState::Stopped),
        Vec::new(),
    )
    .await;
    let r = c
        .refresh_worker(refresh(&stopped.id))
        .await
        .expect("answers")
        .into_inner();
    assert_eq!(r.skip_reason(), pb::RefreshSkipReason::NotRunning);
    assert!(r.operation.is_none());
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_lab_control_operations_are_listed_newest_first() {
    let plane = TestPlane::start().await.expect("plane");
    let w = put(
        &plane,
        worker("w-labs", pb::WorkerState::Running),
        Vec::new(),
    )
    .await;
    let other = put(
        &plane,
        worker("w-other", pb::WorkerState::Draining),
        Vec::new(),
    )
    .await;
    let mut c = client(&plane).await;
    let mut ids = Vec::new();
    for (lab, action) in [
        ("a1b2c3", pb::LabAction::Start),
        ("a1b2c3", pb::LabAction::Stop),
        ("9f8e-7d6c", pb::LabAction::Wipe),
    ] {
        let op = c
            .control_worker_lab(pb::ControlWorkerLabRequest {
                worker_id: w.id.clone(),
                lab_id: lab.into(),
                action: action as i32,
            })
            .await
            .expect("queued")
            .into_inner()
            .operation
            .expect("operation");
        assert_eq!(op.kind(), pb::WorkerOperationKind::ControlLab);
        assert_eq!(op.lab_id, lab);
        assert_eq!(op.lab_action(), action);
        ids.push(op.id);
        plane.clock.advance(Duration::seconds(1));
    }
    let on_other = c
        .control_worker_lab(pb::ControlWorkerLabRequest {
            worker_id: other.id.clone(),
            lab_id: "b00b".into(),
            action: pb::LabAction::Delete as i32,
        })
        .await
        .expect("a draining worker still runs its labs")
        .into_inner()
        .operation
        .expect("operation");
    complete(&plane, &ids[0]).await;

    let listed: Vec<String> = c
        .list_worker_operations(pb::ListWorkerOperationsRequest {
            worker_id: w.id.clone(),
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner()
        .operations
        .into_iter()
        .map(|o| o.id)
        .collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    let pending: Vec<String> = c
        .list_worker_operations(pb::ListWorkerOperationsRequest {
            worker_id: w.id.clone(),
            statuses: vec![pb::OperationStatus::Pending as i32],
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner()
        .operations
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(pending, [ids[2].clone(), ids[1].clone()]);
    // Every worker, paged by two.
    let page = c
        .list_worker_operations(pb::ListWorkerOperationsRequest {
            worker_id: "-".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(
        page.operations
            .iter()
            .map(|o| o.id.clone())
            .collect::<Vec<_>>(),
        [on_other.id.clone(), ids[2].clone()]
    );
    let rest = c
        .list_worker_operations(pb::ListWorkerOperationsRequest {
            worker_id: "-".into(),
            page_size: 2,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(
        rest.operations
            .iter()
            .map(|o| o.id.clone())
            .collect::<Vec<_>>(),
        [ids[1].clone(), ids[0].clone()]
    );

    // Refusals.
    let s = c
        .control_worker_lab(pb::ControlWorkerLabRequest {
            worker_id: w.id.clone(),
            lab_id: "<img src=x>".into(),
            action: 0,
        })
        .await
        .expect_err("bad");
    assert_eq!(violation_fields(&s), ["lab_id", "action"]);
    let s = c
        .control_worker_lab(pb::ControlWorkerLabRequest {
            worker_id: w.id.clone(),
            lab_id: "a1".into(),
            action: 42,
        })
        .await
        .expect_err("unknown action");
    assert_eq!(violation_fields(&s), ["action"]);
    let stopped = put(
        &plane,
        worker("w-off", pb::WorkerState::Stopped),
        Vec::new(),
    )
    .await;
    let s = c
        .control_worker_lab(pb::ControlWorkerLabRequest {
            worker_id: stopped.id.clone(),
            lab_id: "a1".into(),
            action: pb::LabAction::Start as i32,
        })
        .await
        .expect_err("not running");
    assert_eq!(precondition_type(&s), "STATE");
    let s = c
        .list_worker_operations(pb::ListWorkerOperationsRequest {
            worker_id: w.id.clone(),
            statuses: vec![42],
            ..Default::default()
        })
        .await
        .expect_err("unknown status");
    assert_eq!(violation_fields(&s), ["statuses[0]"]);
    let s = c
        .list_worker_operations(pb::ListWorkerOperationsRequest {
            worker_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown worker");
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .get_worker_operation(pb::GetWorkerOperationRequest {
            operation_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(s.code(), Code::NotFound);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_worker_labs_come_from_the_last_snapshot() {
    let plane = TestPlane::start().await.expect("plane");
    let w = put(
        &plane,
        worker("w-snap", pb::WorkerState::Running),
        Vec::new(),
    )
    .await;
    let mut c = client(&plane).await;
    let list = |token: String| pb::ListWorkerLabsRequest {
        worker_id: w.id.clone(),
        page_size: 2,
        page_token: token,
    };
    let empty = c
        .list_worker_labs(list(String::new()))
        .await
        .expect("lists")
        .into_inner();
    assert!(empty.labs.is_empty() && empty.last_synced_at.is_none());

    let lab = |id: &str, title: &str| pb::CmlLab {
        lab_id: id.into(),
        worker_id: w.id.clone(),
        title: title.into(),
        state: pb::CmlLabState::Started as i32,
        node_count: 3,
        ..Default::default()
    };
    let synced = test_epoch() - Duration::minutes(2);
    let snapshot = labs_snapshot(
        &w.id,
        &[
            lab("c3", "Zeta <lab>"),
            lab("a1", "Alpha"),
            lab("b2", "Beta \"quoted\""),
        ],
        synced,
    )
    .expect("snapshot");
    put(&plane, snapshot.clone(), Vec::new()).await;
    let first = c
        .list_worker_labs(list(String::new()))
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(
        first
            .labs
            .iter()
            .map(|l| l.lab_id.as_str())
            .collect::<Vec<_>>(),
        ["a1", "b2"]
    );
    assert_eq!(first.last_synced_at, Some(ts(synced)));
    let second = c
        .list_worker_labs(list(first.next_page_token))
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(second.labs.len(), 1);
    assert_eq!(second.labs[0].title, "Zeta <lab>");
    assert!(second.next_page_token.is_empty());

    // The snapshot is not an operation: its id is not even a valid operation id.
    let s = c
        .get_worker_operation(pb::GetWorkerOperationRequest {
            operation_id: snapshot.id.clone(),
        })
        .await
        .expect_err("not an operation");
    assert_eq!(violation_fields(&s), ["operation_id"]);
    let ops = c
        .list_worker_operations(pb::ListWorkerOperationsRequest {
            worker_id: "-".into(),
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    assert!(ops.operations.is_empty());
    let s = c
        .list_worker_labs(pb::ListWorkerLabsRequest {
            worker_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown worker");
    assert_eq!(s.code(), Code::NotFound);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------------------

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).expect("ascii"),
    );
    request
}

#[tokio::test]
async fn test_fleet_actions_are_for_admins_and_reads_for_everyone() {
    let issuer = OidcIssuer::start("ccm-workers")
        .await
        .unwrap_or_else(|e| panic!("the OIDC issuer must start (run scripts/test): {e}"));
    let auth = AuthLayer::new(
        Authenticator::new(AuthConfig::new(issuer.issuer(), [issuer.audience()]))
            .expect("authenticator"),
    );
    let plane = TestPlane::start_with(TestOptions {
        auth: Some(auth),
        ..Default::default()
    })
    .await
    .expect("plane");
    let w = put(
        &plane,
        worker("w-roles", pb::WorkerState::Running),
        Vec::new(),
    )
    .await;
    let admin = issuer.token_for("admin").await.expect("token");
    let admin_sub = issuer.subject_of("admin").expect("subject").to_owned();
    let manager = issuer.token_for("manager").await.expect("token");
    let user = issuer.token_for("user").await.expect("token");
    let viewer = issuer.token_for("viewer").await.expect("token");
    let mut c = client(&plane).await;
    let drain = || pb::DrainWorkerRequest {
        worker_id: w.id.clone(),
        ..Default::default()
    };
    for token in [&manager, &user, &viewer] {
        let s = c
            .drain_worker(with_token(drain(), token))
            .await
            .expect_err("admins only");
        assert_eq!(s.code(), Code::PermissionDenied);
    }
    let drained = c
        .drain_worker(with_token(drain(), &admin))
        .await
        .expect("admin drains")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(
        drained.drain.map(|d| d.requested_by),
        Some(format!("user:{admin_sub}"))
    );
    let s = c
        .cancel_worker_drain(with_token(
            pb::CancelWorkerDrainRequest {
                worker_id: w.id.clone(),
                ..Default::default()
            },
            &manager,
        ))
        .await
        .expect_err("admins only");
    assert_eq!(s.code(), Code::PermissionDenied);
    // Reads for every role; refresh for users too; lab control for managers.
    for token in [&manager, &user, &viewer] {
        c.get_worker(with_token(
            pb::GetWorkerRequest {
                worker_id: w.id.clone(),
            },
            token,
        ))
        .await
        .expect("reads");
    }
    c.refresh_worker(with_token(
        pb::RefreshWorkerRequest {
            worker_id: w.id.clone(),
            include_labs: false,
        },
        &user,
    ))
    .await
    .expect("users may ask for a refresh");
    let s = c
        .control_worker_lab(with_token(
            pb::ControlWorkerLabRequest {
                worker_id: w.id.clone(),
                lab_id: "a1".into(),
                action: pb::LabAction::Stop as i32,
            },
            &user,
        ))
        .await
        .expect_err("managers and admins only");
    assert_eq!(s.code(), Code::PermissionDenied);
    c.control_worker_lab(with_token(
        pb::ControlWorkerLabRequest {
            worker_id: w.id.clone(),
            lab_id: "a1".into(),
            action: pb::LabAction::Stop as i32,
        },
        &manager,
    ))
    .await
    .expect("managers control labs");
    plane.stop().await.expect("stops");
}
