//! InstanceService over real gRPC on a test plane: bookings (domain.md §10 scenario 2), bad
//! input, owner scoping with real tokens, every user action's legal and illegal transitions
//! (scenario 10), the terminate paths, optimistic concurrency, lists and access.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration as StdDuration;

use ccm_auth::{AuthConfig, AuthLayer, Authenticator};
use ccm_cloudevents::{CloudEvent, Data};
use ccm_control_plane::error::{PRECONDITION_STATE, REASON_INVALID_STATE_TRANSITION};
use ccm_control_plane::record::{FeedBatch, Mutation, audit_from_entry};
use ccm_control_plane::repo::Entity;
use ccm_control_plane::services::instances::{idempotent_instance_id, port_claim};
use ccm_control_plane::testing::{TestOptions, TestPlane, test_epoch};
use ccm_coord::FeedItem;
use ccm_proto::v1 as pb;
use ccm_proto::v1::instance_service_client::InstanceServiceClient;
use ccm_store::{Claim, Kind, LogKind, LogQuery};
use ccm_testkit::oidc::OidcIssuer;
use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

const LINEAGE: &str = "3f2b8c1e-5d7a-4e1b-9c0d-2a6f4b8e1c3d";
const WORKER: &str = "9a1c2b3d-0000-4000-8000-00000000000a";

// ---------------------------------------------------------------------------------------------
// Fixtures: documents written straight into the plane's store
// ---------------------------------------------------------------------------------------------

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).expect("nanos"),
    }
}

fn time_of(t: &prost_types::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).expect("nanos")).expect("instant")
}

async fn put<E: Entity>(plane: &TestPlane, mut entity: E, claims: Vec<Claim>) -> E {
    let mut m = Mutation::at(plane.app.now());
    m.create(&mut entity, claims).expect("encodes");
    plane.app.commit(m).await.expect("fixture commits");
    entity
}

fn definition(version: &str, status: pb::DefinitionStatus) -> pb::LabletDefinition {
    pb::LabletDefinition {
        id: LINEAGE.into(),
        version: version.into(),
        name: "ccna-lab".into(),
        lab_artifact_uri: "s3://labs/ccna.yaml".into(),
        lab_yaml_hash: format!("sha256:{}", "a".repeat(64)),
        resource_requirements: Some(pb::ResourceRequirements {
            cpu_cores: 4,
            memory_gb: 16,
            storage_gb: 20,
            ..Default::default()
        }),
        license_affinity: vec![pb::LicenseType::Personal as i32],
        node_count: 5,
        port_template: Some(pb::PortTemplate {
            ports: vec![
                pb::PortDefinition {
                    name: "serial_1".into(),
                    protocol: pb::PortProtocol::Tcp as i32,
                },
                pb::PortDefinition {
                    name: "vnc_1".into(),
                    protocol: pb::PortProtocol::Tcp as i32,
                },
            ],
        }),
        max_duration: Some(prost_types::Duration {
            seconds: 120 * 60,
            nanos: 0,
        }),
        status: status as i32,
        created_at: Some(ts(test_epoch())),
        created_by: "admin".into(),
        ..Default::default()
    }
}

async fn seed_definition(plane: &TestPlane) -> pb::LabletDefinition {
    put(
        plane,
        definition("1.0.0", pb::DefinitionStatus::Active),
        Vec::new(),
    )
    .await
}

fn worker(public_ip: &str) -> pb::CmlWorker {
    pb::CmlWorker {
        id: WORKER.into(),
        name: "worker-a".into(),
        state: pb::WorkerState::Running as i32,
        template_name: "personal".into(),
        license_type: pb::LicenseType::Personal as i32,
        declared_capacity: Some(pb::WorkerCapacity {
            cpu_cores: 48,
            memory_gb: 192,
            storage_gb: 500,
            max_nodes: 20,
        }),
        port_range: Some(pb::PortRange {
            start: 2000,
            end: 9999,
        }),
        ec2: Some(pb::Ec2Info {
            instance_id: "i-0123456789abcdef0".into(),
            public_ip: public_ip.into(),
            ..Default::default()
        }),
        created_at: Some(ts(test_epoch())),
        ..Default::default()
    }
}

/// Next free pair of fixture ports (each seeded instance gets its own two).
static NEXT_PORT: AtomicI32 = AtomicI32::new(2001);

/// The two ports of a seeded instance.
fn ports_of(i: &pb::LabletInstance) -> (i32, i32) {
    (i.allocated_ports["serial_1"], i.allocated_ports["vnc_1"])
}

/// An instance of the fixture definition in `state`, owned by `owner`, on the fixture worker
/// with two fresh ports when placed (holding their claims unless TERMINATED).
async fn seed_instance(
    plane: &TestPlane,
    state: pb::InstanceState,
    owner: &str,
    slot_start: DateTime<Utc>,
) -> pb::LabletInstance {
    let now = plane.app.now();
    let placed = !matches!(state, pb::InstanceState::Pending);
    let p = NEXT_PORT.fetch_add(2, Ordering::Relaxed);
    let mut history = vec![pb::StateTransition {
        from: pb::InstanceState::Unspecified as i32,
        to: pb::InstanceState::Pending as i32,
        at: Some(ts(now)),
        reason: "created".into(),
        actor: format!("user:{owner}"),
    }];
    if state != pb::InstanceState::Pending {
        history.push(pb::StateTransition {
            from: pb::InstanceState::Pending as i32,
            to: state as i32,
            at: Some(ts(now)),
            reason: "fixture".into(),
            actor: "system:test".into(),
        });
    }
    let instance = pb::LabletInstance {
        id: uuid::Uuid::new_v4().to_string(),
        definition_id: LINEAGE.into(),
        definition_version: "1.0.0".into(),
        definition_name: "ccna-lab".into(),
        state: state as i32,
        state_history: history,
        worker_id: if placed { WORKER.into() } else { String::new() },
        allocated_ports: if placed {
            HashMap::from([("serial_1".to_owned(), p), ("vnc_1".to_owned(), p + 1)])
        } else {
            HashMap::new()
        },
        cml_lab_id: if placed {
            "lab-7".into()
        } else {
            String::new()
        },
        time_slot: Some(pb::TimeSlot {
            start: Some(ts(slot_start)),
            end: Some(ts(slot_start + Duration::minutes(90))),
            asap: false,
        }),
        owner_id: owner.into(),
        created_at: Some(ts(now)),
        scheduled_at: placed.then(|| ts(now)),
        started_at: matches!(
            state,
            pb::InstanceState::Running
                | pb::InstanceState::Collecting
                | pb::InstanceState::Grading
                | pb::InstanceState::Stopping
                | pb::InstanceState::Stopped
                | pb::InstanceState::Archived
        )
        .then(|| ts(now)),
        created_by: owner.into(),
        ..Default::default()
    };
    let holds = placed && state != pb::InstanceState::Terminated;
    let claims = if holds {
        let port = |n: i32| u16::try_from(n).expect("port");
        vec![port_claim(WORKER, port(p)), port_claim(WORKER, port(p + 1))]
    } else {
        Vec::new()
    };
    put(plane, instance, claims).await
}

async fn client(plane: &TestPlane) -> InstanceServiceClient<Channel> {
    InstanceServiceClient::new(plane.channel().await.expect("connects"))
}

fn slot(start: DateTime<Utc>, minutes: i64) -> pb::TimeSlot {
    pb::TimeSlot {
        start: Some(ts(start)),
        end: Some(ts(start + Duration::minutes(minutes))),
        asap: false,
    }
}

fn booking(start: DateTime<Utc>, minutes: i64) -> pb::CreateInstanceRequest {
    pb::CreateInstanceRequest {
        definition_id: LINEAGE.into(),
        time_slot: Some(slot(start, minutes)),
        ..Default::default()
    }
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

fn assert_illegal(status: &Status, from: &str, to: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let d = details(status);
    let info = d.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, REASON_INVALID_STATE_TRANSITION);
    assert_eq!(info.metadata.get("from").map(String::as_str), Some(from));
    assert_eq!(info.metadata.get("to").map(String::as_str), Some(to));
    let pf = d.precondition_failure().expect("PreconditionFailure");
    assert_eq!(pf.violations[0].r#type, PRECONDITION_STATE);
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

async fn audit_actions(plane: &TestPlane, id: &str) -> Vec<(String, String, String)> {
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
    let mut out: Vec<(String, String, String)> = page
        .entries
        .iter()
        .map(|e| {
            let r = audit_from_entry(e).expect("audit record");
            (r.action, r.from_state, r.to_state)
        })
        .collect();
    out.reverse();
    out
}

async fn stored(plane: &TestPlane, id: &str) -> pb::LabletInstance {
    plane.app.get(id).await.expect("instance stored")
}

// ---------------------------------------------------------------------------------------------
// CreateInstance
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_create_instance_is_pending_with_its_cloudevent_change_event_and_audit() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut feed = plane.coord.watch("changes", None).await.expect("watch");
    let mut c = client(&plane).await;
    let start = test_epoch() + Duration::hours(2);
    let mut req = booking(start, 60);
    req.reservation_id = "exam-42".into();
    req.assessment_session_id = "sess-1".into();
    req.assessment_part_id = "part-2".into();
    let created = c
        .create_instance(req)
        .await
        .expect("books")
        .into_inner()
        .instance
        .expect("instance");

    assert_eq!(created.state(), pb::InstanceState::Pending);
    assert_eq!(created.resource_version, 1);
    assert_eq!(created.definition_version, "1.0.0");
    assert_eq!(created.definition_name, "ccna-lab");
    assert_eq!(
        created.owner_id, "anonymous",
        "auth off: the anonymous admin books"
    );
    assert_eq!(created.created_by, "user:anonymous");
    assert_eq!(created.created_at, Some(ts(test_epoch())));
    assert_eq!(created.time_slot, Some(slot(start, 60)));
    assert!(created.worker_id.is_empty() && created.allocated_ports.is_empty());
    assert_eq!(created.state_history.len(), 1);
    let first = &created.state_history[0];
    assert_eq!(first.from, pb::InstanceState::Unspecified as i32);
    assert_eq!(first.to, pb::InstanceState::Pending as i32);
    assert_eq!(first.reason, "created");
    assert_eq!(first.actor, "user:anonymous");
    assert_eq!(
        stored(&plane, &created.id).await,
        created,
        "the stored document is the answer"
    );

    // CloudEvent ccm.lablet.instance.pending with the fields of domain.md §8.
    let events = plane.sink.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.event_type, "ccm.lablet.instance.pending");
    assert_eq!(e.subject.as_deref(), Some(created.id.as_str()));
    assert_eq!(e.time, Some(test_epoch()));
    assert!(e.validate().is_ok());
    let d = data_of(e);
    assert_eq!(d["instance_id"], json!(created.id));
    assert_eq!(d["definition_id"], json!(LINEAGE));
    assert_eq!(d["definition_version"], json!("1.0.0"));
    assert_eq!(d["owner_id"], json!("anonymous"));
    assert_eq!(d["reservation_id"], json!("exam-42"));
    assert_eq!(d["timeslot_start"], json!("2030-01-15T11:00:00.000Z"));
    assert_eq!(d["timeslot_end"], json!("2030-01-15T12:00:00.000Z"));
    assert_eq!(d["created_at"], json!("2030-01-15T09:00:00.000Z"));
    assert_eq!(d["new_state"], json!("pending"));
    assert_eq!(d["previous_state"], Value::Null);

    // One change event on the feed, carrying the instance.
    let item = tokio::time::timeout(StdDuration::from_secs(5), feed.next())
        .await
        .expect("a feed entry within 5 s")
        .expect("stream open")
        .expect("no feed error");
    let FeedItem::Event { revision, payload } = item else {
        panic!("an event, not {item:?}");
    };
    let batch = FeedBatch::decode(&payload, revision).expect("decodes");
    assert_eq!(batch.0.len(), 1);
    let change = &batch.0[0];
    assert_eq!(change.kind, pb::ResourceKind::Instance as i32);
    assert_eq!(change.r#type, pb::ChangeType::Added as i32);
    assert_eq!(change.resource_id, created.id);
    assert_eq!(change.owner_id, "anonymous");
    assert_eq!(
        change.resource,
        Some(pb::change_event::Resource::Instance(created.clone()))
    );

    assert_eq!(
        audit_actions(&plane, &created.id).await,
        [(
            "instance.create".to_owned(),
            String::new(),
            "INSTANCE_STATE_PENDING".to_owned()
        )]
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_books_the_latest_active_version_or_the_pinned_one() {
    let plane = TestPlane::start().await.expect("plane");
    put(
        &plane,
        definition("1.0.0", pb::DefinitionStatus::Active),
        Vec::new(),
    )
    .await;
    put(
        &plane,
        definition("1.10.0", pb::DefinitionStatus::Active),
        Vec::new(),
    )
    .await;
    put(
        &plane,
        definition("1.9.0", pb::DefinitionStatus::Active),
        Vec::new(),
    )
    .await;
    put(
        &plane,
        definition("2.0.0", pb::DefinitionStatus::Deprecated),
        Vec::new(),
    )
    .await;
    let mut c = client(&plane).await;
    let start = test_epoch() + Duration::hours(1);
    let latest = c.create_instance(booking(start, 30)).await.expect("books");
    assert_eq!(
        latest
            .into_inner()
            .instance
            .expect("instance")
            .definition_version,
        "1.10.0",
        "numeric semver order, DEPRECATED skipped"
    );
    let mut pinned = booking(start, 30);
    pinned.definition_version = "1.0.0".into();
    let pinned = c.create_instance(pinned).await.expect("books");
    assert_eq!(
        pinned
            .into_inner()
            .instance
            .expect("instance")
            .definition_version,
        "1.0.0"
    );
    // An admin (auth off: the anonymous admin) may pin a DEPRECATED version explicitly.
    let mut deprecated = booking(start, 30);
    deprecated.definition_version = "2.0.0".into();
    let d = c
        .create_instance(deprecated)
        .await
        .expect("admin pins a deprecated version");
    assert_eq!(
        d.into_inner()
            .instance
            .expect("instance")
            .definition_version,
        "2.0.0"
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_asap_starts_now_and_defaults_the_end_to_the_max_duration() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    plane.clock.advance(Duration::minutes(7));
    let now = plane.app.now();
    let asap = c
        .create_instance(pb::CreateInstanceRequest {
            definition_id: LINEAGE.into(),
            time_slot: Some(pb::TimeSlot {
                // Ignored on input for ASAP.
                start: Some(ts(now - Duration::days(3))),
                end: None,
                asap: true,
            }),
            ..Default::default()
        })
        .await
        .expect("books ASAP")
        .into_inner()
        .instance
        .expect("instance");
    let s = asap.time_slot.expect("slot");
    assert!(s.asap);
    assert_eq!(s.start, Some(ts(now)));
    assert_eq!(s.end, Some(ts(now + Duration::minutes(120))));
    // ASAP with an explicit end keeps it.
    let short = c
        .create_instance(pb::CreateInstanceRequest {
            definition_id: LINEAGE.into(),
            time_slot: Some(pb::TimeSlot {
                start: None,
                end: Some(ts(now + Duration::minutes(45))),
                asap: true,
            }),
            ..Default::default()
        })
        .await
        .expect("books")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(
        short.time_slot.and_then(|s| s.end),
        Some(ts(now + Duration::minutes(45)))
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_refuses_bad_input_with_every_violation_and_writes_nothing() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    let start = test_epoch() + Duration::hours(1);

    // Everything wrong at once.
    let s = c
        .create_instance(pb::CreateInstanceRequest {
            definition_id: "Not An Id!".into(),
            definition_version: "v1.2".into(),
            time_slot: Some(pb::TimeSlot {
                start: Some(ts(start)),
                end: Some(ts(start - Duration::minutes(5))),
                asap: false,
            }),
            owner_id: "bad\u{0007}owner".into(),
            reservation_id: "x".repeat(300),
            assessment_session_id: "line\nbreak".into(),
            assessment_part_id: "\u{202E}evil".into(),
            request_id: "has space".into(),
        })
        .await
        .expect_err("refused");
    let fields = violation_fields(&s);
    for f in [
        "definition_id",
        "definition_version",
        "owner_id",
        "reservation_id",
        "assessment_session_id",
        "assessment_part_id",
        "request_id",
        "time_slot.end",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} missing in {fields:?}");
    }

    // Slot problems against the definition's maximum (120 min).
    let cases: Vec<(pb::TimeSlot, &str)> = vec![
        (slot(start, 0), "time_slot.end"),
        (slot(start, -30), "time_slot.end"),
        (slot(start, 121), "time_slot.end"),
        (
            pb::TimeSlot {
                start: None,
                end: Some(ts(start)),
                asap: false,
            },
            "time_slot.start",
        ),
        (
            slot(test_epoch() - Duration::days(1), 60),
            "time_slot.start",
        ),
        (
            slot(test_epoch() + Duration::days(400), 60),
            "time_slot.start",
        ),
        (
            pb::TimeSlot {
                start: Some(prost_types::Timestamp {
                    seconds: start.timestamp(),
                    nanos: -1,
                }),
                end: None,
                asap: false,
            },
            "time_slot.start.nanos",
        ),
    ];
    for (bad, field) in cases {
        let mut req = booking(start, 60);
        req.time_slot = Some(bad);
        let s = c.create_instance(req).await.expect_err("refused");
        assert_eq!(violation_fields(&s), [field], "{bad:?}");
    }
    let mut missing = booking(start, 60);
    missing.time_slot = None;
    let s = c.create_instance(missing).await.expect_err("refused");
    assert_eq!(violation_fields(&s), ["time_slot"]);

    // A slot that started within the clock-skew allowance but already ended.
    let mut ended = booking(test_epoch() - Duration::seconds(50), 0);
    ended.time_slot = Some(pb::TimeSlot {
        start: Some(ts(test_epoch() - Duration::seconds(50))),
        end: Some(ts(test_epoch() - Duration::seconds(10))),
        asap: false,
    });
    let s = c.create_instance(ended).await.expect_err("refused");
    assert_eq!(violation_fields(&s), ["time_slot.end"]);

    assert!(
        plane.sink.events().is_empty(),
        "no event for a refused booking"
    );
    assert_eq!(
        plane
            .app
            .store
            .count(Kind::Instance, &[])
            .await
            .expect("count"),
        0,
        "nothing written"
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_refuses_unknown_deprecated_and_deleted_definitions() {
    let plane = TestPlane::start().await.expect("plane");
    let mut c = client(&plane).await;
    let start = test_epoch() + Duration::hours(1);
    // Unknown lineage.
    let s = c
        .create_instance(booking(start, 60))
        .await
        .expect_err("unknown");
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(
        details(&s).resource_info().map(|r| r.resource_name.clone()),
        Some(LINEAGE.to_owned())
    );
    // Known lineage, unknown version.
    put(
        &plane,
        definition("1.0.0", pb::DefinitionStatus::Deprecated),
        Vec::new(),
    )
    .await;
    put(
        &plane,
        definition("1.1.0", pb::DefinitionStatus::Deleted),
        Vec::new(),
    )
    .await;
    let mut req = booking(start, 60);
    req.definition_version = "9.9.9".into();
    assert_eq!(
        c.create_instance(req)
            .await
            .expect_err("unknown version")
            .code(),
        Code::NotFound
    );
    // No ACTIVE version left.
    let s = c
        .create_instance(booking(start, 60))
        .await
        .expect_err("no active");
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("no ACTIVE version"), "{}", s.message());
    // A DELETED version is refused even when pinned by an admin.
    let mut req = booking(start, 60);
    req.definition_version = "1.1.0".into();
    let s = c.create_instance(req).await.expect_err("deleted");
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("DELETED"), "{}", s.message());
    assert_eq!(
        plane
            .app
            .store
            .count(Kind::Instance, &[])
            .await
            .expect("count"),
        0
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_hostile_strings_are_stored_inert_and_read_back_identical() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    let hostile = [
        "<script>alert('x')</script>",
        "'; DROP TABLE lablet_instances; --",
        "{\"$where\": \"sleep(1000)\"}",
        "ünïcødé ✓ 試験 🧪",
        "${PORT_SERIAL_1} {{template}} %s %n",
    ];
    for h in hostile {
        let mut req = booking(test_epoch() + Duration::hours(1), 30);
        req.reservation_id = h.into();
        req.assessment_session_id = h.into();
        req.assessment_part_id = h.into();
        let created = c
            .create_instance(req)
            .await
            .expect("accepted as data")
            .into_inner()
            .instance
            .expect("instance");
        let back = c
            .get_instance(pb::GetInstanceRequest {
                instance_id: created.id.clone(),
            })
            .await
            .expect("reads")
            .into_inner()
            .instance
            .expect("instance");
        assert_eq!(back.reservation_id, h);
        assert_eq!(back.assessment_session_id, h);
        assert_eq!(back.assessment_part_id, h);
        // The list filter on reservation_id finds it byte for byte.
        let listed = c
            .list_instances(pb::ListInstancesRequest {
                reservation_id: h.into(),
                ..Default::default()
            })
            .await
            .expect("lists")
            .into_inner();
        assert_eq!(listed.instances.len(), 1, "{h}");
        assert_eq!(listed.instances[0].id, created.id);
    }
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_with_a_request_id_is_idempotent() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    let mut req = booking(test_epoch() + Duration::hours(1), 30);
    req.request_id = "booking-7f3a".into();
    let first = c
        .create_instance(req.clone())
        .await
        .expect("books")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(
        first.id,
        idempotent_instance_id("anonymous", "booking-7f3a")
    );
    // A retry, even with a changed body, returns what the first call created.
    req.reservation_id = "changed".into();
    let again = c
        .create_instance(req)
        .await
        .expect("retry answers")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(again, first);
    assert_eq!(plane.sink.events().len(), 1, "one booking, one event");
    assert_eq!(
        plane
            .app
            .store
            .count(Kind::Instance, &[])
            .await
            .expect("count"),
        1
    );
    // Another key books another instance.
    let mut other = booking(test_epoch() + Duration::hours(1), 30);
    other.request_id = "booking-other".into();
    let other = c.create_instance(other).await.expect("books");
    assert_ne!(other.into_inner().instance.expect("instance").id, first.id);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Owner scoping with real tokens
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
async fn test_users_see_and_act_on_their_own_instances_only() {
    let issuer = OidcIssuer::start("ccm-instances")
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
    seed_definition(&plane).await;
    let alice = issuer.token_for("user").await.expect("token");
    let alice_sub = issuer.subject_of("user").expect("subject").to_owned();
    let bob_sub = "7d9e2f10-0b0b-4b0b-8b0b-0000000000b0";
    let bob = issuer
        .sign(
            "user",
            json!({"sub": bob_sub, "preferred_username": "bob"}),
            None,
        )
        .await
        .expect("bob's token");
    let manager = issuer.token_for("manager").await.expect("token");
    let manager_sub = issuer.subject_of("manager").expect("subject").to_owned();
    let admin = issuer.token_for("admin").await.expect("token");
    let mut c = client(&plane).await;
    let start = test_epoch() + Duration::hours(1);

    // Alice books for herself; booking for Bob is not hers to do.
    let mine = c
        .create_instance(with_token(booking(start, 30), &alice))
        .await
        .expect("books")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(mine.owner_id, alice_sub);
    assert_eq!(mine.state_history[0].actor, format!("user:{alice_sub}"));
    let mut for_bob = booking(start, 30);
    for_bob.owner_id = bob_sub.into();
    let s = c
        .create_instance(with_token(for_bob.clone(), &alice))
        .await
        .expect_err("users book for themselves only");
    assert_eq!(s.code(), Code::PermissionDenied);
    // Naming herself explicitly is fine.
    let mut explicit = booking(start, 30);
    explicit.owner_id = alice_sub.clone();
    c.create_instance(with_token(explicit, &alice))
        .await
        .expect("own subject is allowed");

    // A manager books for Bob.
    let bobs = c
        .create_instance(with_token(for_bob, &manager))
        .await
        .expect("managers book for others")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(bobs.owner_id, bob_sub);
    assert_eq!(bobs.created_by, format!("user:{manager_sub}"));

    // Bob sees his own instance, not Alice's: NOT_FOUND, never PERMISSION_DENIED.
    let get = |id: &str| pb::GetInstanceRequest {
        instance_id: id.to_owned(),
    };
    let s = c
        .get_instance(with_token(get(&mine.id), &bob))
        .await
        .expect_err("hidden");
    assert_eq!(s.code(), Code::NotFound);
    c.get_instance(with_token(get(&bobs.id), &bob))
        .await
        .expect("his own");
    for s in [
        c.stop_instance(with_token(
            pb::StopInstanceRequest {
                instance_id: mine.id.clone(),
                ..Default::default()
            },
            &bob,
        ))
        .await
        .expect_err("not his"),
        c.terminate_instance(with_token(
            pb::TerminateInstanceRequest {
                instance_id: mine.id.clone(),
                ..Default::default()
            },
            &bob,
        ))
        .await
        .expect_err("not his"),
        c.get_instance_access(with_token(
            pb::GetInstanceAccessRequest {
                instance_id: mine.id.clone(),
            },
            &bob,
        ))
        .await
        .expect_err("not his"),
    ] {
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
    }
    assert_eq!(
        stored(&plane, &mine.id).await.state(),
        pb::InstanceState::Pending,
        "Bob changed nothing"
    );

    // Lists are forced to the caller, whatever owner filter is asked for.
    let list = |owner: &str| pb::ListInstancesRequest {
        owner_id: owner.to_owned(),
        ..Default::default()
    };
    let bob_list = c
        .list_instances(with_token(list(&alice_sub), &bob))
        .await
        .expect("lists")
        .into_inner();
    let bob_sees: Vec<&str> = bob_list.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(bob_sees, [bobs.id.as_str()]);
    let alice_list = c
        .list_instances(with_token(list(""), &alice))
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(alice_list.instances.len(), 2);
    assert!(alice_list.instances.iter().all(|i| i.owner_id == alice_sub));

    // Managers see everyone's; a manager's owner filter is honoured.
    let all = c
        .list_instances(with_token(list(""), &manager))
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(all.instances.len(), 3);
    assert_eq!(all.total_size, 3);
    let only_bob = c
        .list_instances(with_token(list(bob_sub), &manager))
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(only_bob.instances.len(), 1);
    c.get_instance(with_token(get(&mine.id), &manager))
        .await
        .expect("managers read any instance");

    // force is for admins: a user and a manager are refused, an admin is not.
    for token in [&alice, &manager] {
        let s = c
            .terminate_instance(with_token(
                pb::TerminateInstanceRequest {
                    instance_id: mine.id.clone(),
                    force: true,
                    ..Default::default()
                },
                token,
            ))
            .await
            .expect_err("force is admin only");
        assert_eq!(s.code(), Code::PermissionDenied);
    }
    // Alice cancels her own booking.
    let cancelled = c
        .terminate_instance(with_token(
            pb::TerminateInstanceRequest {
                instance_id: mine.id.clone(),
                reason: "changed my mind".into(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .expect("own instance")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(cancelled.state(), pb::InstanceState::Terminated);
    assert_eq!(cancelled.termination_reason, "changed my mind");
    let forced = c
        .terminate_instance(with_token(
            pb::TerminateInstanceRequest {
                instance_id: bobs.id.clone(),
                force: true,
                reason: "exam cancelled".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("admins force")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(forced.state(), pb::InstanceState::Terminated);

    // Without a token nothing is answered.
    let s = c
        .get_instance(Request::new(get(&mine.id)))
        .await
        .expect_err("no token");
    assert_eq!(s.code(), Code::Unauthenticated);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// User actions (scenario 10)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_collect_is_only_legal_from_running() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    put(&plane, worker("203.0.113.7"), Vec::new()).await;
    let mut c = client(&plane).await;
    let start = test_epoch();
    for (state, name) in [
        (pb::InstanceState::Pending, "INSTANCE_STATE_PENDING"),
        (pb::InstanceState::Scheduled, "INSTANCE_STATE_SCHEDULED"),
        (pb::InstanceState::Collecting, "INSTANCE_STATE_COLLECTING"),
        (pb::InstanceState::Stopped, "INSTANCE_STATE_STOPPED"),
    ] {
        let i = seed_instance(&plane, state, "anonymous", start).await;
        let s = c
            .collect_instance(pb::CollectInstanceRequest {
                instance_id: i.id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("illegal");
        assert_illegal(&s, name, "INSTANCE_STATE_COLLECTING");
        assert_eq!(stored(&plane, &i.id).await, i, "unchanged");
    }
    assert!(plane.sink.events().is_empty());

    let running = seed_instance(&plane, pb::InstanceState::Running, "anonymous", start).await;
    let collected = c
        .collect_instance(pb::CollectInstanceRequest {
            instance_id: running.id.clone(),
            resource_version: running.resource_version,
            reason: "candidate finished early".into(),
        })
        .await
        .expect("legal")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(collected.state(), pb::InstanceState::Collecting);
    assert_eq!(collected.resource_version, running.resource_version + 1);
    let last = collected.state_history.last().expect("entry");
    assert_eq!(last.from, pb::InstanceState::Running as i32);
    assert_eq!(last.reason, "manual");
    assert_eq!(last.actor, "user:anonymous");
    let events = events_of_type(&plane, "ccm.lablet.instance.collecting.started");
    assert_eq!(events.len(), 1);
    let d = data_of(&events[0]);
    assert_eq!(d["collection_reason"], json!("manual"));
    assert_eq!(d["triggered_by"], json!("user:anonymous"));
    assert_eq!(d["previous_state"], json!("running"));
    let audit = audit_actions(&plane, &running.id).await;
    assert_eq!(
        audit.last(),
        Some(&(
            "instance.collect".to_owned(),
            "INSTANCE_STATE_RUNNING".to_owned(),
            "INSTANCE_STATE_COLLECTING".to_owned()
        ))
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_stop_is_legal_from_running_and_collecting_only() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    let start = test_epoch();
    for state in [pb::InstanceState::Running, pb::InstanceState::Collecting] {
        let i = seed_instance(&plane, state, "anonymous", start).await;
        let stopped = c
            .stop_instance(pb::StopInstanceRequest {
                instance_id: i.id.clone(),
                ..Default::default()
            })
            .await
            .expect("legal")
            .into_inner()
            .instance
            .expect("instance");
        assert_eq!(stopped.state(), pb::InstanceState::Stopping);
        assert_eq!(
            stopped.allocated_ports, i.allocated_ports,
            "ports still held"
        );
        let claims = plane
            .app
            .store
            .claims_of(Kind::Instance, &i.id)
            .await
            .expect("claims");
        assert_eq!(claims.len(), 2, "STOPPING keeps its ports");
    }
    assert_eq!(
        events_of_type(&plane, "ccm.lablet.instance.stopping").len(),
        2
    );
    for (state, name) in [
        (pb::InstanceState::Pending, "INSTANCE_STATE_PENDING"),
        (pb::InstanceState::Grading, "INSTANCE_STATE_GRADING"),
        (pb::InstanceState::Stopped, "INSTANCE_STATE_STOPPED"),
        (pb::InstanceState::Terminated, "INSTANCE_STATE_TERMINATED"),
    ] {
        let i = seed_instance(&plane, state, "anonymous", start).await;
        let s = c
            .stop_instance(pb::StopInstanceRequest {
                instance_id: i.id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("illegal");
        assert_illegal(&s, name, "INSTANCE_STATE_STOPPING");
    }
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_start_restarts_a_stopped_instance_within_its_slot() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    put(&plane, worker("203.0.113.7"), Vec::new()).await;
    let mut c = client(&plane).await;
    let start = test_epoch();
    let stopped = seed_instance(&plane, pb::InstanceState::Stopped, "anonymous", start).await;
    let running = c
        .start_instance(pb::StartInstanceRequest {
            instance_id: stopped.id.clone(),
            ..Default::default()
        })
        .await
        .expect("legal")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(running.state(), pb::InstanceState::Running);
    assert_eq!(
        running.state_history.last().map(|t| t.reason.as_str()),
        Some("restarted")
    );
    assert_eq!(
        running.started_at, stopped.started_at,
        "the first start is kept"
    );
    let events = events_of_type(&plane, "ccm.lablet.instance.running");
    assert_eq!(events.len(), 1);
    let d = data_of(&events[0]);
    assert_eq!(d["worker_hostname"], json!("203.0.113.7"));
    assert_eq!(d["cml_lab_id"], json!("lab-7"));
    let (a, b) = ports_of(&stopped);
    assert_eq!(d["allocated_ports"], json!({"serial_1": a, "vnc_1": b}));

    // Not from RUNNING, PENDING or ARCHIVED.
    for (state, name) in [
        (pb::InstanceState::Running, "INSTANCE_STATE_RUNNING"),
        (pb::InstanceState::Pending, "INSTANCE_STATE_PENDING"),
        (pb::InstanceState::Archived, "INSTANCE_STATE_ARCHIVED"),
    ] {
        let i = seed_instance(&plane, state, "anonymous", start).await;
        let s = c
            .start_instance(pb::StartInstanceRequest {
                instance_id: i.id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("illegal");
        assert_illegal(&s, name, "INSTANCE_STATE_RUNNING");
    }
    // Not once the slot is over (90 min slots).
    let late = seed_instance(&plane, pb::InstanceState::Stopped, "anonymous", start).await;
    plane.clock.advance(Duration::minutes(91));
    let s = c
        .start_instance(pb::StartInstanceRequest {
            instance_id: late.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("slot over");
    assert_illegal(&s, "INSTANCE_STATE_STOPPED", "INSTANCE_STATE_RUNNING");
    assert!(s.message().contains("time slot ended"), "{}", s.message());
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_terminate_follows_the_plan_of_each_state() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    let start = test_epoch() + Duration::hours(1);
    let terminate = |id: &str| pb::TerminateInstanceRequest {
        instance_id: id.to_owned(),
        ..Default::default()
    };

    // Before the lab ran: TERMINATED at once, reason "cancelled", ports released.
    for state in [
        pb::InstanceState::Pending,
        pb::InstanceState::Scheduled,
        pb::InstanceState::Instantiating,
    ] {
        let i = seed_instance(&plane, state, "anonymous", start).await;
        let t = c
            .terminate_instance(terminate(&i.id))
            .await
            .expect("terminates")
            .into_inner()
            .instance
            .expect("instance");
        assert_eq!(t.state(), pb::InstanceState::Terminated, "{state:?}");
        assert_eq!(
            t.state_history.last().map(|h| h.reason.as_str()),
            Some("cancelled")
        );
        assert_eq!(t.termination_reason, "cancelled");
        assert_eq!(t.terminated_at, Some(ts(test_epoch())));
        assert!(
            plane
                .app
                .store
                .claims_of(Kind::Instance, &i.id)
                .await
                .expect("claims")
                .is_empty(),
            "ports released"
        );
    }

    // A live lab: STOPPING with reason delete_requested; the ports stay.
    for state in [
        pb::InstanceState::Running,
        pb::InstanceState::Collecting,
        pb::InstanceState::Grading,
    ] {
        let i = seed_instance(&plane, state, "anonymous", start).await;
        let t = c
            .terminate_instance(terminate(&i.id))
            .await
            .expect("starts the teardown")
            .into_inner()
            .instance
            .expect("instance");
        assert_eq!(t.state(), pb::InstanceState::Stopping, "{state:?}");
        assert_eq!(
            t.state_history.last().map(|h| h.reason.as_str()),
            Some("delete_requested")
        );
        assert_eq!(
            plane
                .app
                .store
                .claims_of(Kind::Instance, &i.id)
                .await
                .expect("claims")
                .len(),
            2
        );
        // Asking again while it is stopping for the delete is a no-op.
        let again = c
            .terminate_instance(terminate(&i.id))
            .await
            .expect("no-op")
            .into_inner()
            .instance
            .expect("instance");
        assert_eq!(again, t);
    }
    // STOPPED → ARCHIVED (delete_requested); ARCHIVED → TERMINATED.
    let stopped = seed_instance(&plane, pb::InstanceState::Stopped, "anonymous", start).await;
    let archived = c
        .terminate_instance(terminate(&stopped.id))
        .await
        .expect("archives")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(archived.state(), pb::InstanceState::Archived);
    let done = c
        .terminate_instance(terminate(&stopped.id))
        .await
        .expect("cleans up")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(done.state(), pb::InstanceState::Terminated);
    assert!(
        plane
            .app
            .store
            .claims_of(Kind::Instance, &stopped.id)
            .await
            .expect("claims")
            .is_empty()
    );
    let events = events_of_type(&plane, "ccm.lablet.instance.terminated");
    let d = data_of(events.last().expect("terminated event"));
    assert_eq!(d["final_state"], json!("archived"));
    assert_eq!(d["instance_id"], json!(stopped.id));
    assert!(d.contains_key("duration_minutes") && d.contains_key("grading_score"));

    // STOPPING (a plain stop): refused, with the way forward in the message.
    let stopping = seed_instance(&plane, pb::InstanceState::Stopping, "anonymous", start).await;
    let s = c
        .terminate_instance(terminate(&stopping.id))
        .await
        .expect_err("wait for STOPPED");
    assert_illegal(&s, "INSTANCE_STATE_STOPPING", "INSTANCE_STATE_TERMINATED");
    // TERMINATED: idempotent, nothing written or emitted.
    let before = plane.sink.events().len();
    let again = c
        .terminate_instance(terminate(&done.id))
        .await
        .expect("idempotent")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(again, done);
    assert_eq!(plane.sink.events().len(), before);

    // force (auth off: an admin) ends a RUNNING lab at once and frees its ports.
    let running = seed_instance(&plane, pb::InstanceState::Running, "anonymous", start).await;
    let forced = c
        .terminate_instance(pb::TerminateInstanceRequest {
            instance_id: running.id.clone(),
            force: true,
            reason: "exam revoked".into(),
            ..Default::default()
        })
        .await
        .expect("forced")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(forced.state(), pb::InstanceState::Terminated);
    assert_eq!(forced.termination_reason, "exam revoked");
    assert_eq!(
        forced.allocated_ports, running.allocated_ports,
        "kept for history"
    );
    let (a, _) = ports_of(&running);
    let port = port_claim(WORKER, u16::try_from(a).expect("port"));
    assert_eq!(
        plane.app.store.claim_holder(&port).await.expect("holder"),
        None,
        "the port is free again"
    );
    let audit = audit_actions(&plane, &running.id).await;
    assert_eq!(
        audit.last(),
        Some(&(
            "instance.terminate".to_owned(),
            "INSTANCE_STATE_RUNNING".to_owned(),
            "INSTANCE_STATE_TERMINATED".to_owned()
        ))
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_a_stale_resource_version_is_aborted_and_changes_nothing() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    let i = seed_instance(
        &plane,
        pb::InstanceState::Running,
        "anonymous",
        test_epoch(),
    )
    .await;
    assert_eq!(i.resource_version, 1);
    let s = c
        .stop_instance(pb::StopInstanceRequest {
            instance_id: i.id.clone(),
            resource_version: 7,
            ..Default::default()
        })
        .await
        .expect_err("stale");
    assert_eq!(s.code(), Code::Aborted);
    let info = details(&s).error_info().cloned().expect("ErrorInfo");
    assert_eq!(
        info.metadata
            .get("current_resource_version")
            .map(String::as_str),
        Some("1")
    );
    assert_eq!(stored(&plane, &i.id).await, i);
    let s = c
        .stop_instance(pb::StopInstanceRequest {
            instance_id: i.id.clone(),
            resource_version: -1,
            ..Default::default()
        })
        .await
        .expect_err("negative");
    assert_eq!(violation_fields(&s), ["resource_version"]);
    // The right version passes; reusing it afterwards is stale.
    c.stop_instance(pb::StopInstanceRequest {
        instance_id: i.id.clone(),
        resource_version: 1,
        ..Default::default()
    })
    .await
    .expect("current version");
    let s = c
        .terminate_instance(pb::TerminateInstanceRequest {
            instance_id: i.id.clone(),
            resource_version: 1,
            ..Default::default()
        })
        .await
        .expect_err("stale now");
    assert_eq!(s.code(), Code::Aborted);
    // Unknown ids and bad ids.
    let s = c
        .get_instance(pb::GetInstanceRequest {
            instance_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .get_instance(pb::GetInstanceRequest {
            instance_id: "<script>".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(violation_fields(&s), ["instance_id"]);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Lists and access
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_list_filters_orders_by_slot_and_pages() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    let base = test_epoch() + Duration::hours(1);
    // Created in reverse slot order.
    let mut ids = Vec::new();
    for k in (0..5).rev() {
        let mut req = booking(base + Duration::hours(k), 30);
        req.reservation_id = if k % 2 == 0 { "even" } else { "odd" }.into();
        let i = c
            .create_instance(req)
            .await
            .expect("books")
            .into_inner()
            .instance
            .expect("instance");
        ids.push((k, i.id));
    }
    ids.sort();
    let in_slot_order: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
    let placed = seed_instance(
        &plane,
        pb::InstanceState::Running,
        "anonymous",
        test_epoch(),
    )
    .await;

    // Pages of two, in slot order.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_instances(pb::ListInstancesRequest {
                page_size: 2,
                page_token: token.clone(),
                states: vec![pb::InstanceState::Pending as i32],
                ..Default::default()
            })
            .await
            .expect("lists")
            .into_inner();
        assert!(page.instances.len() <= 2);
        assert_eq!(page.total_size, 5);
        seen.extend(page.instances.into_iter().map(|i| i.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, in_slot_order);

    // Filters.
    let by_state = c
        .list_instances(pb::ListInstancesRequest {
            states: vec![pb::InstanceState::Running as i32],
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(by_state.instances.len(), 1);
    assert_eq!(by_state.instances[0].id, placed.id);
    let by_worker = c
        .list_instances(pb::ListInstancesRequest {
            worker_id: WORKER.into(),
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(by_worker.instances.len(), 1);
    let odd = c
        .list_instances(pb::ListInstancesRequest {
            reservation_id: "odd".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(odd.instances.len(), 1);
    assert_eq!(odd.instances[0].id, in_slot_order[1]);
    let odd2 = c
        .list_instances(pb::ListInstancesRequest {
            reservation_id: "odd".into(),
            page_size: 1,
            page_token: odd.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(odd2.instances[0].id, in_slot_order[3]);
    let window = c
        .list_instances(pb::ListInstancesRequest {
            slot_start_before: Some(ts(base + Duration::minutes(90))),
            slot_end_after: Some(ts(base + Duration::minutes(10))),
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    let got: Vec<String> = window.instances.into_iter().map(|i| i.id).collect();
    // The running fixture (09:00–10:30) overlaps too, and comes first by slot start.
    assert_eq!(
        got,
        [
            placed.id.clone(),
            in_slot_order[0].clone(),
            in_slot_order[1].clone()
        ]
    );
    let by_def = c
        .list_instances(pb::ListInstancesRequest {
            definition_id: "0f0f0f0f-0000-4000-8000-000000000000".into(),
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    assert!(by_def.instances.is_empty());

    // Bad requests.
    let s = c
        .list_instances(pb::ListInstancesRequest {
            states: vec![pb::InstanceState::Running as i32, 99, 0],
            page_size: -1,
            ..Default::default()
        })
        .await
        .expect_err("bad");
    assert_eq!(
        violation_fields(&s),
        ["states[1]", "states[2]", "page_size"]
    );
    let s = c
        .list_instances(pb::ListInstancesRequest {
            page_token: "bm90LWEtdG9rZW4".into(),
            ..Default::default()
        })
        .await
        .expect_err("forged token");
    assert_eq!(violation_fields(&s), ["page_token"]);
    // A token is bound to its filters.
    let first = c
        .list_instances(pb::ListInstancesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("lists")
        .into_inner();
    let s = c
        .list_instances(pb::ListInstancesRequest {
            page_size: 1,
            page_token: first.next_page_token,
            states: vec![pb::InstanceState::Pending as i32],
            ..Default::default()
        })
        .await
        .expect_err("other filters");
    assert_eq!(violation_fields(&s), ["page_token"]);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_access_is_given_for_a_running_instance_on_a_reachable_worker() {
    let plane = TestPlane::start().await.expect("plane");
    seed_definition(&plane).await;
    let mut c = client(&plane).await;
    let running = seed_instance(
        &plane,
        pb::InstanceState::Running,
        "anonymous",
        test_epoch(),
    )
    .await;
    // No worker record yet → no address.
    let s = c
        .get_instance_access(pb::GetInstanceAccessRequest {
            instance_id: running.id.clone(),
        })
        .await
        .expect_err("no worker");
    assert_eq!(s.code(), Code::FailedPrecondition);
    // A worker without any address.
    put(&plane, worker(""), Vec::new()).await;
    let s = c
        .get_instance_access(pb::GetInstanceAccessRequest {
            instance_id: running.id.clone(),
        })
        .await
        .expect_err("no address");
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("no known address"), "{}", s.message());
    // Give it a public IP.
    let mut w: pb::CmlWorker = plane.app.get(WORKER).await.expect("worker");
    if let Some(e) = w.ec2.as_mut() {
        e.public_ip = "203.0.113.7".into();
    }
    let mut m = Mutation::at(plane.app.now());
    m.update(&mut w, ccm_store::ClaimChange::Keep)
        .expect("encodes");
    plane.app.commit(m).await.expect("updates");
    let access = c
        .get_instance_access(pb::GetInstanceAccessRequest {
            instance_id: running.id.clone(),
        })
        .await
        .expect("access")
        .into_inner()
        .access
        .expect("access");
    assert_eq!(access.host, "203.0.113.7");
    assert_eq!(access.cml_lab_id, "lab-7");
    assert_eq!(
        access.valid_until.as_ref().map(time_of),
        Some(test_epoch() + Duration::minutes(90))
    );
    let ports: Vec<(String, i32, String)> = access
        .ports
        .iter()
        .map(|p| (p.name.clone(), p.port, p.uri.clone()))
        .collect();
    let (a, b) = ports_of(&running);
    assert_eq!(
        ports,
        [
            (
                "serial_1".to_owned(),
                a,
                format!("telnet://203.0.113.7:{a}")
            ),
            ("vnc_1".to_owned(), b, format!("vnc://203.0.113.7:{b}")),
        ]
    );
    // Not for a PENDING or STOPPED instance.
    for state in [pb::InstanceState::Pending, pb::InstanceState::Stopped] {
        let i = seed_instance(&plane, state, "anonymous", test_epoch()).await;
        let s = c
            .get_instance_access(pb::GetInstanceAccessRequest {
                instance_id: i.id.clone(),
            })
            .await
            .expect_err("not running");
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("RUNNING"), "{}", s.message());
    }
    plane.stop().await.expect("stops");
}
