//! EventService over real gRPC on loopback: CloudEvent intake (acceptance scenario 11,
//! duplicates, retries after failures, validation), the audit log, and the change feed watch
//! (initial state, live changes, resume, filters, owner scoping with real tokens, resets,
//! bookmarks, shutdown, two control-plane replicas on one coordinator and store).

mod fixtures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ccm_auth::{AuthConfig, AuthLayer, Authenticator};
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_coord::{Coordinator, InProcessConfig, InProcessCoordinator, Leadership};
use ccm_proto::v1 as pb;
use ccm_proto::v1::event_service_client::EventServiceClient;
use ccm_proto::v1::internal_service_client::InternalServiceClient;
use ccm_proto::v1::watch_events_response::Item;
use ccm_store::{SqliteStore, Store};
use fixtures::*;
use tonic::Streaming;
use tonic::transport::Channel;

const ASSESSMENT: &str = "assessment/collector";
const GRADER: &str = "grading/engine";

struct Env {
    plane: TestPlane,
    events: EventServiceClient<Channel>,
    internal: InternalServiceClient<Channel>,
    sched: pb::LeaderFence,
    ctrl: pb::LeaderFence,
    _leaders: Vec<Leadership>,
}

async fn env_with(options: TestOptions) -> Env {
    let plane = TestPlane::start_with(options).await.expect("plane");
    let (ls, sched) = lead(plane.coord.as_ref(), "scheduler", "scheduler-1").await;
    let (lc, ctrl) = lead(plane.coord.as_ref(), "controller", "controller-1").await;
    let channel = plane.channel().await.expect("channel");
    Env {
        events: EventServiceClient::new(channel.clone()),
        internal: InternalServiceClient::new(channel),
        plane,
        sched,
        ctrl,
        _leaders: vec![ls, lc],
    }
}

async fn env() -> Env {
    env_with(TestOptions::default()).await
}

async fn world(app: &ccm_control_plane::app::App) -> pb::LabletDefinition {
    let mut def = definition("d-1", 4, 16, 5, &["serial_1", "vnc_1"]);
    put(app, &mut def).await;
    put(app, &mut template()).await;
    put(
        app,
        &mut worker("w-1", pb::WorkerState::Running, 48, 192, (2000, 2999)),
    )
    .await;
    def
}

/// Places `id` on w-1 and moves it to `to` along the lifecycle (up to COLLECTING).
async fn drive(env: &mut Env, id: &str, port: i32, to: pb::InstanceState) {
    use pb::InstanceState as S;
    let resp = env
        .internal
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(env.sched.clone()),
            placements: vec![pb::Placement {
                instance_id: id.into(),
                worker_id: "w-1".into(),
                allocated_ports: ports(&[("serial_1", port), ("vnc_1", port + 1)]),
                ..Default::default()
            }],
        })
        .await
        .expect("commit")
        .into_inner();
    assert_eq!(resp.results[0].outcome(), pb::PlacementOutcome::Committed);
    let steps = [
        (S::Scheduled, S::Instantiating, ""),
        (S::Instantiating, S::Running, ""),
        (S::Running, S::Collecting, "assessment_request"),
    ];
    for (from, next, reason) in steps {
        if from == to {
            break;
        }
        env.internal
            .transition_instance(pb::TransitionInstanceRequest {
                fence: Some(env.ctrl.clone()),
                instance_id: id.into(),
                from: from as i32,
                to: next as i32,
                reason: reason.into(),
                cml_lab_id: "lab-7".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{from:?} → {next:?}: {e:?}"));
        if next == to {
            break;
        }
    }
}

fn json(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.into_iter().map(|(k, v)| (k, json(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

fn cloud_event(source: &str, id: &str, ty: &str, data: serde_json::Value) -> pb::CloudEvent {
    pb::CloudEvent {
        id: id.into(),
        source: source.into(),
        specversion: "1.0".into(),
        r#type: ty.into(),
        datacontenttype: "application/json".into(),
        data: Some(pb::cloud_event::Data::JsonData(json(data))),
        ..Default::default()
    }
}

fn collected(instance: &str, id: &str) -> pb::CloudEvent {
    cloud_event(
        ASSESSMENT,
        id,
        "assessment.collection.completed",
        serde_json::json!({
            "instance_id": instance,
            "collection_id": "col-1",
            "artifacts_uri": "s3://results/col-1/",
        }),
    )
}

fn graded(instance: &str, id: &str) -> pb::CloudEvent {
    cloud_event(
        GRADER,
        id,
        "assessment.grading.completed",
        serde_json::json!({
            "instance_id": instance,
            "score": {
                "total": 42.5,
                "max": 50,
                "breakdown": [
                    {"criterion": "ospf", "points": 30, "max": 30},
                    {"criterion": "acl <b>", "points": 12.5, "max": 20},
                ],
            },
            "passed": true,
        }),
    )
}

async fn ingest(
    env: &mut Env,
    event: pb::CloudEvent,
) -> Result<pb::IngestEventResponse, tonic::Status> {
    env.events
        .ingest_event(pb::IngestEventRequest { event: Some(event) })
        .await
        .map(tonic::Response::into_inner)
}

// ---------------------------------------------------------------------------------------------
// IngestEvent
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_assessment_flow_grades_stores_the_score_and_ignores_duplicates() {
    use pb::InstanceState as S;
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    put(
        &env.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;
    drive(&mut env, "i-1", 2000, S::Collecting).await;

    let r = ingest(&mut env, collected("i-1", "c-1"))
        .await
        .expect("collected");
    assert!(r.handled && !r.duplicate, "{r:?}");
    assert_eq!(r.instance_id, "i-1");
    assert_eq!(r.message, "instance → INSTANCE_STATE_GRADING");
    let i: pb::LabletInstance = get(&env.plane.app, "i-1").await;
    assert_eq!(i.state(), S::Grading);
    let last = i.state_history.last().expect("history");
    assert_eq!(last.actor, format!("cloudevent:{ASSESSMENT}"));
    assert_eq!(last.reason, "collection_completed");
    let started: Vec<_> = env
        .plane
        .sink
        .events()
        .into_iter()
        .filter(|e| e.event_type == "ccm.lablet.instance.grading.started")
        .collect();
    assert_eq!(started.len(), 1);

    env.plane.clock.advance(chrono::Duration::seconds(90));
    let r = ingest(&mut env, graded("i-1", "g-1"))
        .await
        .expect("graded");
    assert!(r.handled && !r.duplicate);
    let i: pb::LabletInstance = get(&env.plane.app, "i-1").await;
    assert_eq!(i.state(), S::Stopping);
    let score = i.grading_score.clone().expect("score stored");
    assert_eq!((score.total, score.max, score.passed), (42.5, 50.0, true));
    assert_eq!(score.breakdown.len(), 2);
    assert_eq!(score.breakdown[1].criterion, "acl <b>", "stored inert");
    let completed: Vec<_> = env
        .plane
        .sink
        .events()
        .into_iter()
        .filter(|e| e.event_type == "ccm.lablet.instance.grading.completed")
        .collect();
    assert_eq!(completed.len(), 1);
    let Some(ccm_cloudevents::Data::Json(data)) = &completed[0].data else {
        panic!("json data");
    };
    assert_eq!(data["score"]["total"], 42.5);
    assert_eq!(data["grading_duration_seconds"], 90);

    // The same events again: no-ops.
    let version = i.resource_version;
    let events_before = env.plane.sink.events().len();
    let audits_before = audit_records(&env.plane.app).await.len();
    for event in [graded("i-1", "g-1"), collected("i-1", "c-1")] {
        let r = ingest(&mut env, event).await.expect("duplicate");
        assert!(r.duplicate && !r.handled, "{r:?}");
    }
    let i: pb::LabletInstance = get(&env.plane.app, "i-1").await;
    assert_eq!(i.resource_version, version);
    assert_eq!(env.plane.sink.events().len(), events_before);
    assert_eq!(audit_records(&env.plane.app).await.len(), audits_before);

    // The controller finishes the teardown; the final event carries the score.
    for (from, to, reason) in [
        (S::Stopping, S::Stopped, ""),
        (S::Stopped, S::Archived, "timeslot_end"),
        (S::Archived, S::Terminated, "cleanup"),
    ] {
        env.internal
            .transition_instance(pb::TransitionInstanceRequest {
                fence: Some(env.ctrl.clone()),
                instance_id: "i-1".into(),
                from: from as i32,
                to: to as i32,
                reason: reason.into(),
                ..Default::default()
            })
            .await
            .expect("teardown");
    }
    let terminated: Vec<_> = env
        .plane
        .sink
        .events()
        .into_iter()
        .filter(|e| e.event_type == "ccm.lablet.instance.terminated")
        .collect();
    let Some(ccm_cloudevents::Data::Json(data)) = &terminated[0].data else {
        panic!("json data");
    };
    assert_eq!(data["grading_score"]["total"], 42.5);
    // Audited as the external systems.
    let audits = audit_records(&env.plane.app).await;
    assert!(
        audits
            .iter()
            .any(|a| a.actor == format!("cloudevent:{ASSESSMENT}")
                && a.to_state == "INSTANCE_STATE_GRADING"
                && a.actor_kind() == pb::ActorKind::External)
    );
    assert!(
        audits
            .iter()
            .any(|a| a.actor == format!("cloudevent:{GRADER}")
                && a.to_state == "INSTANCE_STATE_STOPPING")
    );
}

#[tokio::test]
async fn an_event_refused_in_the_wrong_state_can_be_retried_with_the_same_id() {
    use pb::InstanceState as S;
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    put(
        &env.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;
    drive(&mut env, "i-1", 2000, S::Collecting).await;
    // The grade arrives before the collection result.
    let err = ingest(&mut env, graded("i-1", "g-1"))
        .await
        .expect_err("COLLECTING");
    assert_eq!(precondition_types(&err), vec!["STATE"]);
    let i: pb::LabletInstance = get(&env.plane.app, "i-1").await;
    assert_eq!(i.state(), S::Collecting);
    assert!(i.grading_score.is_none());
    ingest(&mut env, collected("i-1", "c-1"))
        .await
        .expect("collected");
    // The retry of g-1 is processed although its dedup key was recorded.
    let r = ingest(&mut env, graded("i-1", "g-1")).await.expect("retry");
    assert!(r.handled && !r.duplicate, "{r:?}");
    let i: pb::LabletInstance = get(&env.plane.app, "i-1").await;
    assert_eq!(i.state(), S::Stopping);
    // An unknown instance is NOT_FOUND, and stays retryable.
    let err = ingest(&mut env, collected("i-ghost", "c-9"))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = ingest(&mut env, collected("i-ghost", "c-9"))
        .await
        .expect_err("still unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn concurrent_copies_of_one_event_apply_once() {
    use pb::InstanceState as S;
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    put(
        &env.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;
    drive(&mut env, "i-1", 2000, S::Collecting).await;
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut client = env.events.clone();
        calls.push(tokio::spawn(async move {
            client
                .ingest_event(pb::IngestEventRequest {
                    event: Some(collected("i-1", "c-1")),
                })
                .await
                .map(tonic::Response::into_inner)
        }));
    }
    let mut handled = 0;
    let mut duplicates = 0;
    for c in calls {
        let r = c.await.expect("join").expect("ingest");
        handled += usize::from(r.handled);
        duplicates += usize::from(r.duplicate);
    }
    assert_eq!((handled, duplicates), (1, 3));
    let transitions = audit_records(&env.plane.app)
        .await
        .into_iter()
        .filter(|a| a.to_state == "INSTANCE_STATE_GRADING")
        .count();
    assert_eq!(transitions, 1);
}

#[tokio::test]
async fn malformed_events_are_refused_and_unknown_types_are_accepted_once() {
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    put(
        &env.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;

    let err = env
        .events
        .ingest_event(pb::IngestEventRequest { event: None })
        .await
        .expect_err("no event");
    assert_eq!(bad_fields(&err), vec!["event"]);
    let err = ingest(
        &mut env,
        pb::CloudEvent {
            id: String::new(),
            source: "has space".into(),
            specversion: "0.3".into(),
            r#type: String::new(),
            ..Default::default()
        },
    )
    .await
    .expect_err("envelope");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(
        f,
        vec![
            "event.id",
            "event.source",
            "event.specversion",
            "event.type"
        ]
    );
    // Scores out of bounds, a missing verdict, a subject that names another instance.
    let mut bad_score = cloud_event(
        GRADER,
        "g-bad",
        "assessment.grading.completed",
        serde_json::json!({
            "instance_id": "i-1",
            "score": {"total": 60, "max": 50, "breakdown": [{"criterion": "", "points": -1, "max": 5}]},
        }),
    );
    bad_score.subject = "i-2".into();
    let err = ingest(&mut env, bad_score).await.expect_err("score");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(
        f,
        vec![
            "event.json_data.instance_id",
            "event.json_data.passed",
            "event.json_data.score.breakdown[0].criterion",
            "event.json_data.score.breakdown[0].points",
            "event.json_data.score.max",
        ]
    );
    let err = ingest(
        &mut env,
        cloud_event(
            GRADER,
            "g-2",
            "assessment.grading.completed",
            serde_json::json!([1, 2]),
        ),
    )
    .await
    .expect_err("not an object");
    assert_eq!(bad_fields(&err), vec!["event.json_data"]);
    let err = ingest(
        &mut env,
        pb::CloudEvent {
            data: Some(pb::cloud_event::Data::TextData("{not json".into())),
            ..collected("i-1", "c-2")
        },
    )
    .await
    .expect_err("text not JSON");
    assert_eq!(bad_fields(&err), vec!["event.text_data"]);
    // The instance id may come from the subject alone, and the payload as binary JSON.
    let mut by_subject = collected("i-1", "c-3");
    by_subject.subject = "i-1".into();
    by_subject.data = Some(pb::cloud_event::Data::BinaryData(
        br#"{"collection_id":"c"}"#.to_vec(),
    ));
    let err = ingest(&mut env, by_subject)
        .await
        .expect_err("PENDING instance");
    assert_eq!(precondition_types(&err), vec!["STATE"]);

    // Unknown types: accepted, not handled, then recognised as duplicates.
    let other = cloud_event(
        ASSESSMENT,
        "x-1",
        "assessment.session.opened",
        serde_json::json!({}),
    );
    let r = ingest(&mut env, other.clone()).await.expect("accepted");
    assert!(!r.handled && !r.duplicate);
    let r = ingest(&mut env, other).await.expect("duplicate");
    assert!(r.duplicate);
    assert!(
        audit_records(&env.plane.app).await.is_empty(),
        "nothing acted on"
    );
}

// ---------------------------------------------------------------------------------------------
// ListAuditRecords
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn audit_records_are_listed_newest_first_with_filters_and_pages() {
    use pb::InstanceState as S;
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    put(
        &env.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;
    put(
        &env.plane.app,
        &mut instance("i-2", &def, "bob", at(1), at(3)),
    )
    .await;
    drive(&mut env, "i-1", 2000, S::Collecting).await;
    env.plane.clock.advance(chrono::Duration::minutes(5));
    drive(&mut env, "i-2", 2010, S::Running).await;
    ingest(&mut env, collected("i-1", "c-1"))
        .await
        .expect("collected");

    let list = |f: &dyn Fn(&mut pb::ListAuditRecordsRequest)| {
        let mut r = pb::ListAuditRecordsRequest::default();
        f(&mut r);
        r
    };
    let all = env
        .events
        .list_audit_records(list(&|_| {}))
        .await
        .expect("list")
        .into_inner();
    // i-1: schedule + 3 transitions + ingest; i-2: schedule + 2 transitions.
    assert_eq!(all.records.len(), 8);
    assert!(all.next_page_token.is_empty());
    let times: Vec<_> = all
        .records
        .iter()
        .map(|r| r.at.expect("at").seconds)
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    let i1 = env
        .events
        .list_audit_records(list(&|r| {
            r.resource_kind = pb::ResourceKind::Instance as i32;
            r.resource_id = "i-1".into();
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(i1.records.len(), 5);
    assert_eq!(i1.records[0].actor, format!("cloudevent:{ASSESSMENT}"));
    let by_actor = env
        .events
        .list_audit_records(list(&|r| r.actor = format!("cloudevent:{ASSESSMENT}")))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(by_actor.records.len(), 1);
    let schedules = env
        .events
        .list_audit_records(list(&|r| r.action_prefix = "instance.sched".into()))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(schedules.records.len(), 2);
    let since = ccm_control_plane::convert::timestamp_to_proto(
        ccm_control_plane::testing::test_epoch() + chrono::Duration::minutes(1),
    );
    let later = env
        .events
        .list_audit_records(list(&|r| r.since = Some(since)))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(later.records.len(), 4, "i-2's three and the ingest");
    let earlier = env
        .events
        .list_audit_records(list(&|r| r.until = Some(since)))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(earlier.records.len(), 4);
    // Pages of 3: every record once, in order.
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = env
            .events
            .list_audit_records(list(&|r| {
                r.page_size = 3;
                r.page_token = token.clone();
            }))
            .await
            .expect("page")
            .into_inner();
        assert!(page.records.len() <= 3);
        seen.extend(page.records.into_iter().map(|r| r.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        all.records.iter().map(|r| r.id.clone()).collect::<Vec<_>>()
    );
    // Bad requests.
    let err = env
        .events
        .list_audit_records(list(&|r| {
            r.page_size = -1;
            r.page_token = "garbage".into();
            r.resource_kind = 42;
            r.since = Some(prost_types::Timestamp {
                seconds: 100,
                nanos: 0,
            });
            r.until = Some(prost_types::Timestamp {
                seconds: 50,
                nanos: 0,
            });
        }))
        .await
        .expect_err("bad");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(f, vec!["page_size", "page_token", "resource_kind", "until"]);
}

// ---------------------------------------------------------------------------------------------
// WatchEvents
// ---------------------------------------------------------------------------------------------

async fn watch(
    client: &mut EventServiceClient<Channel>,
    req: pb::WatchEventsRequest,
) -> Streaming<pb::WatchEventsResponse> {
    client.watch_events(req).await.expect("watch").into_inner()
}

async fn next(stream: &mut Streaming<pb::WatchEventsResponse>) -> Item {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an item in time")
        .expect("no error")
        .expect("stream open")
        .item
        .expect("item")
}

async fn next_change(stream: &mut Streaming<pb::WatchEventsResponse>) -> pb::ChangeEvent {
    loop {
        match next(stream).await {
            Item::Change(c) => return c,
            Item::Bookmark(_) => continue,
            Item::Reset(r) => panic!("unexpected reset {r:?}"),
        }
    }
}

/// Nothing (but bookmarks) arrives within `wait`.
async fn quiet(stream: &mut Streaming<pb::WatchEventsResponse>, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return,
            Ok(Ok(Some(pb::WatchEventsResponse {
                item: Some(Item::Bookmark(_)),
            }))) => continue,
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

fn instance_of(c: &pb::ChangeEvent) -> &pb::LabletInstance {
    match &c.resource {
        Some(pb::change_event::Resource::Instance(i)) => i,
        other => panic!("expected an instance, got {other:?}"),
    }
}

#[tokio::test]
async fn a_watch_sends_the_initial_state_then_live_changes_in_revision_order() {
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    put(
        &env.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;
    put(
        &env.plane.app,
        &mut instance("i-2", &def, "bob", at(1), at(3)),
    )
    .await;
    let before = env.plane.coord.feed_revision().await.expect("rev");
    let mut stream = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await;
    let mut initial = Vec::new();
    let done = loop {
        match next(&mut stream).await {
            Item::Change(c) => initial.push(c),
            Item::Bookmark(b) => break b,
            Item::Reset(r) => panic!("reset {r:?}"),
        }
    };
    assert!(done.initial_state_done);
    assert_eq!(done.revision, i64::try_from(before).expect("rev"));
    let mut ids: Vec<_> = initial
        .iter()
        .map(|c| (c.kind(), c.resource_id.clone()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            (pb::ResourceKind::Definition, "d-1@1.0.0".to_owned()),
            (pb::ResourceKind::Instance, "i-1".to_owned()),
            (pb::ResourceKind::Instance, "i-2".to_owned()),
            (pb::ResourceKind::Worker, "w-1".to_owned()),
            (pb::ResourceKind::Template, TEMPLATE.to_owned()),
        ]
    );
    assert!(
        initial
            .iter()
            .all(|c| c.r#type() == pb::ChangeType::Added && c.revision == done.revision)
    );
    assert_eq!(
        initial
            .iter()
            .find(|c| c.resource_id == "i-2")
            .map(|c| c.owner_id.as_str()),
        Some("bob")
    );
    // Live: a placement, then a transition.
    drive(&mut env, "i-1", 2000, pb::InstanceState::Instantiating).await;
    let placed = next_change(&mut stream).await;
    assert_eq!(placed.r#type(), pb::ChangeType::Modified);
    assert_eq!(instance_of(&placed).state(), pb::InstanceState::Scheduled);
    assert!(placed.revision > done.revision);
    let moved = next_change(&mut stream).await;
    assert_eq!(
        instance_of(&moved).state(),
        pb::InstanceState::Instantiating
    );
    assert!(moved.revision > placed.revision);
    quiet(&mut stream, Duration::from_millis(200)).await;
}

fn worker_of(c: &pb::ChangeEvent) -> &pb::CmlWorker {
    match &c.resource {
        Some(pb::change_event::Resource::Worker(w)) => w,
        other => panic!("expected a worker, got {other:?}"),
    }
}

/// The fields of a worker GetWorker computes rather than stores.
type Derived = (
    Option<pb::WorkerCapacity>,
    Option<pb::WorkerCapacity>,
    i32,
    Vec<String>,
);

fn derived(w: &pb::CmlWorker) -> Derived {
    (
        w.allocated_capacity,
        w.available_capacity,
        w.available_ports,
        w.instance_ids.clone(),
    )
}

#[tokio::test]
async fn watched_workers_carry_the_capacity_and_ports_get_worker_computes() {
    use ccm_proto::v1::worker_service_client::WorkerServiceClient;
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    put(
        &env.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;
    // Placed and instantiating: it holds 4 cpu / 16 GiB and two of w-1's 1,000 ports.
    drive(&mut env, "i-1", 2000, pb::InstanceState::Instantiating).await;
    let mut workers = WorkerServiceClient::new(env.plane.channel().await.expect("channel"));
    let got = workers
        .get_worker(pb::GetWorkerRequest {
            worker_id: "w-1".into(),
        })
        .await
        .expect("GetWorker")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(got.allocated_capacity.map(|c| c.cpu_cores), Some(4));
    assert_eq!(got.available_capacity.map(|c| c.cpu_cores), Some(44));
    assert_eq!(got.available_ports, 998);
    assert_eq!(got.instance_ids, ["i-1"]);

    let mut stream = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            kinds: vec![pb::ResourceKind::Worker as i32],
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await;
    // The initial state.
    let initial = next_change(&mut stream).await;
    assert_eq!(initial.r#type(), pb::ChangeType::Added);
    assert_eq!(derived(worker_of(&initial)), derived(&got));

    // A live change of the worker (a drain) carries them too.
    let drained = workers
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: "w-1".into(),
            ..Default::default()
        })
        .await
        .expect("DrainWorker")
        .into_inner()
        .worker
        .expect("worker");
    let live = next_change(&mut stream).await;
    assert_eq!(live.r#type(), pb::ChangeType::Modified);
    let w = worker_of(&live);
    assert_eq!(w.state(), pb::WorkerState::Draining);
    assert_eq!(derived(w), derived(&drained));
    assert_eq!(derived(w), derived(&got));
}

#[tokio::test]
async fn a_watch_resumes_after_a_revision_without_gaps_or_duplicates() {
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    for i in 1..=3 {
        put(
            &env.plane.app,
            &mut instance(&format!("i-{i}"), &def, "alice", at(1), at(3)),
        )
        .await;
    }
    let mut first = watch(&mut env.events, pb::WatchEventsRequest::default()).await;
    drive(&mut env, "i-1", 2000, pb::InstanceState::Scheduled).await;
    drive(&mut env, "i-2", 2010, pb::InstanceState::Scheduled).await;
    drive(&mut env, "i-3", 2020, pb::InstanceState::Scheduled).await;
    let seen: Vec<_> = [
        next_change(&mut first).await,
        next_change(&mut first).await,
        next_change(&mut first).await,
    ]
    .into();
    assert_eq!(
        seen.iter()
            .map(|c| c.resource_id.as_str())
            .collect::<Vec<_>>(),
        vec!["i-1", "i-2", "i-3"]
    );
    // Resume after the first: exactly the other two, then live ones.
    let mut resumed = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            since_revision: seen[0].revision,
            send_initial_state: true, // ignored when resuming
            ..Default::default()
        },
    )
    .await;
    let again = [
        next_change(&mut resumed).await,
        next_change(&mut resumed).await,
    ];
    assert_eq!(again[0], seen[1]);
    assert_eq!(again[1], seen[2]);
    put(
        &env.plane.app,
        &mut instance("i-4", &def, "alice", at(1), at(3)),
    )
    .await;
    let live = next_change(&mut resumed).await;
    assert_eq!(live.resource_id, "i-4");
    assert_eq!(live.r#type(), pb::ChangeType::Added);
    assert_eq!(next_change(&mut first).await, live);
    quiet(&mut resumed, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn watch_filters_select_kinds_ids_and_owners() {
    let mut env = env().await;
    let def = world(&env.plane.app).await;
    let mut workers_only = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            kinds: vec![pb::ResourceKind::Worker as i32],
            ..Default::default()
        },
    )
    .await;
    let mut one = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            resource_ids: vec!["i-2".into()],
            ..Default::default()
        },
    )
    .await;
    let mut bobs = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            owner_id: "bob".into(),
            ..Default::default()
        },
    )
    .await;
    put(
        &env.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;
    put(
        &env.plane.app,
        &mut instance("i-2", &def, "bob", at(1), at(3)),
    )
    .await;
    put(
        &env.plane.app,
        &mut worker("w-2", pb::WorkerState::Pending, 8, 8, (2000, 2100)),
    )
    .await;

    let w = next_change(&mut workers_only).await;
    assert_eq!(
        (w.kind(), w.resource_id.as_str()),
        (pb::ResourceKind::Worker, "w-2")
    );
    quiet(&mut workers_only, Duration::from_millis(200)).await;
    assert_eq!(next_change(&mut one).await.resource_id, "i-2");
    quiet(&mut one, Duration::from_millis(200)).await;
    // The owner filter applies to instances only.
    assert_eq!(next_change(&mut bobs).await.resource_id, "i-2");
    assert_eq!(next_change(&mut bobs).await.resource_id, "w-2");
    quiet(&mut bobs, Duration::from_millis(200)).await;

    // Bad filters.
    let err = env
        .events
        .watch_events(pb::WatchEventsRequest {
            kinds: vec![99],
            resource_ids: vec![String::new()],
            since_revision: -1,
            heartbeat_interval: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect_err("bad");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(
        f,
        vec![
            "heartbeat_interval",
            "kinds[0]",
            "resource_ids[0]",
            "since_revision"
        ]
    );
}

#[tokio::test]
async fn idle_watches_get_bookmarks_at_the_clamped_heartbeat() {
    let mut env = env().await;
    world(&env.plane.app).await;
    let start = env.plane.coord.feed_revision().await.expect("rev");
    let began = Instant::now();
    let mut stream = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            heartbeat_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
            ..Default::default()
        },
    )
    .await;
    let Item::Bookmark(b) = next(&mut stream).await else {
        panic!("a bookmark");
    };
    let waited = began.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "100 ms is raised to the 1 s minimum, got a bookmark after {waited:?}"
    );
    assert_eq!(b.revision, i64::try_from(start).expect("rev"));
    assert!(!b.initial_state_done);
}

#[tokio::test]
async fn a_watch_behind_compacted_history_is_reset_and_ended() {
    let coord = Arc::new(InProcessCoordinator::new(InProcessConfig {
        feed_history: 2,
        ..InProcessConfig::default()
    }));
    let mut env = env_with(TestOptions {
        coord: Some(coord.clone()),
        ..Default::default()
    })
    .await;
    let def = world(&env.plane.app).await;
    let first = coord.feed_revision().await.expect("rev");
    for i in 1..=5 {
        put(
            &env.plane.app,
            &mut instance(&format!("i-{i}"), &def, "alice", at(1), at(3)),
        )
        .await;
    }
    let current = coord.feed_revision().await.expect("rev");
    let mut stream = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            since_revision: i64::try_from(first).expect("rev"),
            ..Default::default()
        },
    )
    .await;
    let Item::Reset(reset) = next(&mut stream).await else {
        panic!("a reset");
    };
    assert_eq!(reset.reason(), pb::WatchResetReason::Compacted);
    assert_eq!(reset.current_revision, i64::try_from(current).expect("rev"));
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("ends in time");
    assert!(
        matches!(end, Ok(None)),
        "the stream ends after a reset: {end:?}"
    );
    // Recent history still resumes.
    let mut recent = watch(
        &mut env.events,
        pb::WatchEventsRequest {
            since_revision: i64::try_from(current - 1).expect("rev"),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next_change(&mut recent).await.resource_id, "i-5");
}

#[tokio::test]
async fn a_watch_that_cannot_keep_up_is_reset_as_a_slow_consumer() {
    let coord = Arc::new(InProcessCoordinator::new(InProcessConfig {
        watch_buffer: 4,
        ..InProcessConfig::default()
    }));
    let mut env = env_with(TestOptions {
        coord: Some(coord),
        ..Default::default()
    })
    .await;
    let def = world(&env.plane.app).await;
    let mut stream = watch(&mut env.events, pb::WatchEventsRequest::default()).await;
    // The client reads nothing while far more changes than every buffer holds are committed.
    for i in 0..1200 {
        put(
            &env.plane.app,
            &mut instance(&format!("i-{i}"), &def, "alice", at(1), at(3)),
        )
        .await;
    }
    let mut changes = 0;
    let reset = loop {
        match next(&mut stream).await {
            Item::Change(_) => changes += 1,
            Item::Bookmark(_) => {}
            Item::Reset(r) => break r,
        }
    };
    assert_eq!(reset.reason(), pb::WatchResetReason::SlowConsumer);
    assert!(changes < 1200, "{changes} changes before the reset");
}

#[tokio::test]
async fn server_shutdown_ends_open_watches() {
    let mut env = env().await;
    let mut stream = watch(&mut env.events, pb::WatchEventsRequest::default()).await;
    let plane = env.plane;
    let stopping = tokio::spawn(async move { plane.stop().await });
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends in time");
    match end {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(None) => {}
        Ok(Some(item)) => panic!("unexpected item {item:?}"),
    }
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the server stops in time")
        .expect("join")
        .expect("clean stop");
}

#[tokio::test]
async fn two_control_plane_replicas_serve_the_same_events() {
    let coord: Arc<dyn Coordinator> = Arc::new(InProcessCoordinator::default());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().expect("sqlite"));
    let mut a = env_with(TestOptions {
        coord: Some(coord.clone()),
        store: Some(store.clone()),
        ..Default::default()
    })
    .await;
    let b_plane = TestPlane::start_with(TestOptions {
        coord: Some(coord.clone()),
        store: Some(store),
        ..Default::default()
    })
    .await
    .expect("plane b");
    let mut b_events = EventServiceClient::new(b_plane.channel().await.expect("channel"));
    let def = world(&a.plane.app).await;
    put(
        &a.plane.app,
        &mut instance("i-1", &def, "alice", at(1), at(3)),
    )
    .await;
    let mut on_a = watch(&mut a.events, pb::WatchEventsRequest::default()).await;
    let mut on_b = watch(&mut b_events, pb::WatchEventsRequest::default()).await;
    // Changes committed through replica A and through replica B.
    drive(&mut a, "i-1", 2000, pb::InstanceState::Running).await;
    put(
        &b_plane.app,
        &mut instance("i-2", &def, "bob", at(1), at(3)),
    )
    .await;
    let mut from_a = Vec::new();
    let mut from_b = Vec::new();
    for _ in 0..4 {
        from_a.push(next_change(&mut on_a).await);
        from_b.push(next_change(&mut on_b).await);
    }
    assert_eq!(from_a, from_b, "both replicas serve the same feed");
    assert_eq!(
        from_a
            .iter()
            .map(|c| c.resource_id.as_str())
            .collect::<Vec<_>>(),
        vec!["i-1", "i-1", "i-1", "i-2"]
    );
    // B lists the initial state A wrote.
    let mut initial = watch(
        &mut b_events,
        pb::WatchEventsRequest {
            kinds: vec![pb::ResourceKind::Instance as i32],
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await;
    let c = next_change(&mut initial).await;
    assert_eq!(instance_of(&c).state(), pb::InstanceState::Running);
}

#[tokio::test]
async fn users_watch_only_their_own_instances() {
    let issuer = ccm_testkit::oidc::OidcIssuer::start("ccm-test")
        .await
        .unwrap_or_else(|e| panic!("cannot start the OIDC issuer: {e}"));
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
    let me = issuer.subject_of("user").expect("user subject").to_owned();
    let def = world(&plane.app).await;
    let mut client = EventServiceClient::new(plane.channel().await.expect("channel"));
    let with_token = |token: &str, msg: pb::WatchEventsRequest| {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        req
    };
    let user_token = issuer.token_for("user").await.expect("token");
    let admin_token = issuer.token_for("admin").await.expect("token");
    // A user asking for someone else's instances still gets only their own.
    let mut mine = client
        .watch_events(with_token(
            &user_token,
            pb::WatchEventsRequest {
                owner_id: "someone-else".into(),
                kinds: vec![pb::ResourceKind::Instance as i32],
                ..Default::default()
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut everything = client
        .watch_events(with_token(
            &admin_token,
            pb::WatchEventsRequest {
                kinds: vec![pb::ResourceKind::Instance as i32],
                ..Default::default()
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    put(
        &plane.app,
        &mut instance("i-other", &def, "someone-else", at(1), at(3)),
    )
    .await;
    put(&plane.app, &mut instance("i-mine", &def, &me, at(1), at(3))).await;
    assert_eq!(next_change(&mut mine).await.resource_id, "i-mine");
    quiet(&mut mine, Duration::from_millis(200)).await;
    assert_eq!(next_change(&mut everything).await.resource_id, "i-other");
    assert_eq!(next_change(&mut everything).await.resource_id, "i-mine");
    // The initial state is scoped the same way.
    let mut initial = client
        .watch_events(with_token(
            &user_token,
            pb::WatchEventsRequest {
                kinds: vec![pb::ResourceKind::Instance as i32],
                send_initial_state: true,
                ..Default::default()
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next_change(&mut initial).await.resource_id, "i-mine");
    let Item::Bookmark(b) = next(&mut initial).await else {
        panic!("the end of the initial state");
    };
    assert!(b.initial_state_done);
    // Watching needs a token.
    let err = client
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .expect_err("anonymous");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}
