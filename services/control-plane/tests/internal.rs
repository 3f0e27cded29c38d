//! InternalService over real gRPC on loopback: fencing of every RPC, the placement commit (every
//! outcome, atomicity, idempotent retries), instance and worker transitions, conditions, worker
//! observations, scale-up records, scaling decisions (acceptance scenario 17) and worker
//! operations.

mod fixtures;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use ccm_control_plane::services::internal::{
    CONDITION_EC2_IN_SYNC, CONDITION_SCHEDULED, LICENSE_TOKEN_CLAIM, license_token_claim,
};
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_coord::Leadership;
use ccm_proto::v1 as pb;
use ccm_proto::v1::internal_service_client::InternalServiceClient;
use ccm_store::{
    Applied, Claim, ClaimHolder, Document, Filter, Kind, LogKind, LogPage, LogQuery, Page, Query,
    SqliteStore, Store, StoreError, StoreResult, Write,
};
use chrono::{DateTime, Utc};
use fixtures::*;
use tonic::transport::Channel;

type Client = InternalServiceClient<Channel>;

struct Env {
    plane: TestPlane,
    client: Client,
    sched: pb::LeaderFence,
    ctrl: pb::LeaderFence,
    _leaders: Vec<Leadership>,
}

async fn env_with(options: TestOptions) -> Env {
    let plane = TestPlane::start_with(options).await.expect("plane");
    let (ls, sched) = lead(plane.coord.as_ref(), "scheduler", "scheduler-1").await;
    let (lc, ctrl) = lead(plane.coord.as_ref(), "controller", "controller-1").await;
    let client = InternalServiceClient::new(plane.channel().await.expect("channel"));
    Env {
        plane,
        client,
        sched,
        ctrl,
        _leaders: vec![ls, lc],
    }
}

async fn env() -> Env {
    env_with(TestOptions::default()).await
}

fn placement(instance: &str, worker: &str, p: &[(&str, i32)]) -> pb::Placement {
    pb::Placement {
        instance_id: instance.to_owned(),
        worker_id: worker.to_owned(),
        allocated_ports: ports(p),
        score: 0.5,
        ..Default::default()
    }
}

async fn commit(env: &mut Env, placements: Vec<pb::Placement>) -> pb::CommitPlacementsResponse {
    env.client
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(env.sched.clone()),
            placements,
        })
        .await
        .expect("CommitPlacements")
        .into_inner()
}

fn outcomes(resp: &pb::CommitPlacementsResponse) -> HashMap<String, pb::PlacementOutcome> {
    resp.results
        .iter()
        .map(|r| (r.instance_id.clone(), r.outcome()))
        .collect()
}

fn events_of(plane: &TestPlane, ty: &str) -> Vec<ccm_cloudevents::CloudEvent> {
    plane
        .sink
        .events()
        .into_iter()
        .filter(|e| e.event_type == ty)
        .collect()
}

fn json_of(e: &ccm_cloudevents::CloudEvent) -> serde_json::Value {
    match &e.data {
        Some(ccm_cloudevents::Data::Json(v)) => v.clone(),
        other => panic!("expected JSON data, got {other:?}"),
    }
}

/// The standard world: definition `d-1` (4 cpu, 16 GiB, 5 nodes, ports serial_1 and vnc_1),
/// RUNNING worker `w-1` (8 cpu, 64 GiB, ports 2000-2099).
async fn world(env: &Env) -> pb::LabletDefinition {
    let app = &env.plane.app;
    let mut def = definition("d-1", 4, 16, 5, &["serial_1", "vnc_1"]);
    put(app, &mut def).await;
    let mut t = template();
    put(app, &mut t).await;
    put(
        app,
        &mut worker("w-1", pb::WorkerState::Running, 8, 64, (2000, 2099)),
    )
    .await;
    def
}

async fn pending(env: &Env, id: &str, def: &pb::LabletDefinition, from_h: i64, to_h: i64) {
    put(
        &env.plane.app,
        &mut instance(id, def, "alice", at(from_h), at(to_h)),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Fencing
// ---------------------------------------------------------------------------------------------

/// One call of every RPC with `fence` (role-appropriate payloads; the fence is checked first).
async fn call_all(
    c: &mut Client,
    fence: Option<pb::LeaderFence>,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let f = || fence.clone();
    vec![
        (
            "CommitPlacements",
            c.commit_placements(pb::CommitPlacementsRequest {
                fence: f(),
                placements: vec![placement("i-x", "w-x", &[])],
            })
            .await
            .map(|_| ()),
        ),
        (
            "TransitionInstance",
            c.transition_instance(pb::TransitionInstanceRequest {
                fence: f(),
                instance_id: "i-x".into(),
                from: pb::InstanceState::Running as i32,
                to: pb::InstanceState::Stopping as i32,
                reason: "manual".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "SetInstanceConditions",
            c.set_instance_conditions(pb::SetInstanceConditionsRequest {
                fence: f(),
                updates: vec![],
            })
            .await
            .map(|_| ()),
        ),
        (
            "ReportWorker",
            c.report_worker(pb::ReportWorkerRequest {
                fence: f(),
                worker_id: "w-x".into(),
                observation: Some(pb::WorkerObservation::default()),
                resource_version: 0,
            })
            .await
            .map(|_| ()),
        ),
        (
            "TransitionWorker",
            c.transition_worker(pb::TransitionWorkerRequest {
                fence: f(),
                worker_id: "w-x".into(),
                from: pb::WorkerState::Running as i32,
                to: pb::WorkerState::Draining as i32,
                reason: "scale_down_idle".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "CreateWorkerRecord",
            c.create_worker_record(pb::CreateWorkerRecordRequest {
                fence: f(),
                template_name: TEMPLATE.into(),
                request_id: "req-1".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "RecordScalingDecision",
            c.record_scaling_decision(pb::RecordScalingDecisionRequest {
                fence: f(),
                decision: Some(pb::ScalingDecision {
                    action: pb::ScalingAction::Wait as i32,
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "ClaimWorkerOperation",
            c.claim_worker_operation(pb::ClaimWorkerOperationRequest {
                fence: f(),
                operation_id: "op-x".into(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "CompleteWorkerOperation",
            c.complete_worker_operation(pb::CompleteWorkerOperationRequest {
                fence: f(),
                operation_id: "op-x".into(),
                status: pb::OperationStatus::Succeeded as i32,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "ListScalingDecisionHistory",
            c.list_scaling_decision_history(pb::ListScalingDecisionHistoryRequest {
                fence: f(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
    ]
}

fn allowed(rpc: &str, role: &str) -> bool {
    match rpc {
        "CommitPlacements" => role == "scheduler",
        "TransitionInstance" | "SetInstanceConditions" => true,
        _ => role == "controller",
    }
}

#[tokio::test]
async fn every_rpc_rejects_missing_unknown_role_stale_and_foreign_fences_and_writes_nothing() {
    let mut env = env().await;
    let coord = env.plane.coord.clone();
    // Deposed leaders of both roles: they led, resigned, and someone else took over.
    let old_sched = env.sched.clone();
    let old_ctrl = env.ctrl.clone();
    for l in env._leaders.drain(..) {
        l.resign().await.expect("resign");
    }
    let (ls, sched) = lead(coord.as_ref(), "scheduler", "scheduler-2").await;
    let (lc, ctrl) = lead(coord.as_ref(), "controller", "controller-2").await;
    assert!(sched.epoch > old_sched.epoch && ctrl.epoch > old_ctrl.epoch);
    env.sched = sched.clone();
    env.ctrl = ctrl.clone();
    env._leaders = vec![ls, lc];
    let revision_before = coord.feed_revision().await.expect("revision");

    // Missing fence.
    for (rpc, r) in call_all(&mut env.client, None).await {
        let status = r.expect_err(rpc);
        assert_eq!(bad_fields(&status), vec!["fence"], "{rpc}");
    }
    // Unknown role, zero epoch, no holder: every problem at once.
    let bogus = pb::LeaderFence {
        role: "janitor".into(),
        epoch: 0,
        holder_id: String::new(),
    };
    for (rpc, r) in call_all(&mut env.client, Some(bogus)).await {
        let status = r.expect_err(rpc);
        let mut fields = bad_fields(&status);
        fields.sort();
        assert_eq!(
            fields,
            vec!["fence.epoch", "fence.holder_id", "fence.role"],
            "{rpc}"
        );
    }
    // Deposed leaders, and epochs that never existed.
    let never = |f: &pb::LeaderFence| pb::LeaderFence {
        epoch: f.epoch + 1000,
        ..f.clone()
    };
    for stale in [
        old_sched.clone(),
        old_ctrl.clone(),
        never(&sched),
        never(&ctrl),
    ] {
        for (rpc, r) in call_all(&mut env.client, Some(stale.clone())).await {
            if !allowed(rpc, &stale.role) {
                assert_eq!(
                    r.expect_err(rpc).code(),
                    tonic::Code::PermissionDenied,
                    "{rpc} with a {} fence",
                    stale.role
                );
                continue;
            }
            if rpc == "ListScalingDecisionHistory" {
                // Reads are served to standbys too.
                r.unwrap_or_else(|e| panic!("{rpc}: {e:?}"));
                continue;
            }
            let status = r.expect_err(rpc);
            assert_eq!(precondition_types(&status), vec!["FENCE"], "{rpc}");
            assert_eq!(reason(&status), "STALE_LEADER_EPOCH", "{rpc}");
        }
    }
    // The current leaders of the wrong role.
    for (rpc, r) in call_all(&mut env.client, Some(sched.clone())).await {
        if !allowed(rpc, "scheduler") {
            assert_eq!(
                r.expect_err(rpc).code(),
                tonic::Code::PermissionDenied,
                "{rpc}"
            );
        }
    }
    // The current epoch with somebody else's holder id.
    let impostor = pb::LeaderFence {
        holder_id: "impostor".into(),
        ..env.ctrl.clone()
    };
    for (rpc, r) in call_all(&mut env.client, Some(impostor)).await {
        if rpc == "ListScalingDecisionHistory" {
            continue;
        }
        assert_eq!(
            r.expect_err(rpc).code(),
            tonic::Code::PermissionDenied,
            "{rpc}"
        );
    }
    // Nothing was written, announced or emitted.
    assert!(audit_records(&env.plane.app).await.is_empty());
    assert!(env.plane.sink.events().is_empty());
    assert_eq!(
        coord.feed_revision().await.expect("revision"),
        revision_before
    );
}

// ---------------------------------------------------------------------------------------------
// CommitPlacements
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_fence_before_any_election_says_no_leader_was_elected() {
    // No election has been held: the current epoch of both roles is 0.
    let plane = TestPlane::start().await.expect("plane");
    let mut client = InternalServiceClient::new(plane.channel().await.expect("channel"));
    for role in ["scheduler", "controller"] {
        let fence = pb::LeaderFence {
            role: role.to_owned(),
            epoch: 1,
            holder_id: format!("{role}-1"),
        };
        for (rpc, r) in call_all(&mut client, Some(fence.clone())).await {
            if !allowed(rpc, role) || rpc == "ListScalingDecisionHistory" {
                continue;
            }
            let status = r.expect_err(rpc);
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{rpc}");
            assert_eq!(reason(&status), "STALE_LEADER_EPOCH", "{rpc}");
            assert!(
                status
                    .message()
                    .contains(&format!("no {role} leader has been elected")),
                "{rpc}: {}",
                status.message()
            );
            assert!(
                !status.message().contains("no longer the leader"),
                "{rpc}: {}",
                status.message()
            );
        }
    }
    // After an election, a wrong epoch is reported against the current one.
    let (_l, current) = lead(plane.coord.as_ref(), "scheduler", "scheduler-2").await;
    let stale = pb::LeaderFence {
        epoch: current.epoch + 1,
        ..current.clone()
    };
    let status = client
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(stale),
            placements: vec![placement("i-x", "w-x", &[])],
        })
        .await
        .expect_err("stale");
    assert!(
        status.message().contains("no longer the leader"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn commit_placements_reports_every_outcome_and_commits_the_valid_items_only() {
    let mut env = env().await;
    let def = world(&env).await;
    let app = env.plane.app.clone();
    put(
        &app,
        &mut worker("w-drain", pb::WorkerState::Draining, 64, 256, (2000, 2099)),
    )
    .await;
    let mut legacy = worker("w-legacy", pb::WorkerState::Running, 64, 256, (2000, 2099));
    legacy.template_name.clear();
    put(&app, &mut legacy).await;
    for (id, from, to) in [
        ("i-ok", 2, 4),
        ("i-stale", 2, 4),
        ("i-drain", 2, 4),
        ("i-legacy", 2, 4),
        ("i-range", 2, 4),
        ("i-names", 2, 4),
        ("i-taken", 2, 4),
        // Passes every check but the store's claim; its capacity is held for the rest of the
        // batch (conservative), so it is booked away from the others.
        ("i-claimed", 30, 32),
        ("i-fits", 3, 5),
        ("i-over", 3, 4),
        ("i-later", 6, 8),
        ("i-dupport", 6, 8),
        ("i-noworker", 2, 4),
    ] {
        pending(&env, id, &def, from, to).await;
    }
    // Already placed elsewhere in time, holding ports 2090/2091.
    let mut placed = instance("i-placed", &def, "bob", at(50), at(52));
    placed.state = pb::InstanceState::Scheduled as i32;
    placed.worker_id = "w-1".into();
    placed.allocated_ports = ports(&[("serial_1", 2090), ("vnc_1", 2091)]);
    put_with(
        &app,
        &mut placed,
        vec![
            Claim::new("port", "w-1/2090"),
            Claim::new("port", "w-1/2091"),
        ],
    )
    .await;
    // A PENDING document that (wrongly) holds port 2050: only the store's claim knows it.
    let mut squatter = instance("i-squatter", &def, "bob", at(2), at(4));
    put_with(&app, &mut squatter, vec![Claim::new("port", "w-1/2050")]).await;

    let batch = vec![
        placement("i-ok", "w-1", &[("serial_1", 2000), ("vnc_1", 2001)]),
        pb::Placement {
            instance_resource_version: 99,
            ..placement("i-stale", "w-1", &[("serial_1", 2020), ("vnc_1", 2021)])
        },
        placement("i-placed", "w-1", &[("serial_1", 2030), ("vnc_1", 2031)]),
        placement("i-drain", "w-drain", &[("serial_1", 2000), ("vnc_1", 2001)]),
        placement(
            "i-legacy",
            "w-legacy",
            &[("serial_1", 2000), ("vnc_1", 2001)],
        ),
        placement("i-range", "w-1", &[("serial_1", 3000), ("vnc_1", 2041)]),
        placement("i-names", "w-1", &[("serial_1", 2042)]),
        placement("i-taken", "w-1", &[("serial_1", 2090), ("vnc_1", 2043)]),
        placement("i-claimed", "w-1", &[("serial_1", 2050), ("vnc_1", 2051)]),
        placement("i-fits", "w-1", &[("serial_1", 2002), ("vnc_1", 2003)]),
        placement("i-over", "w-1", &[("serial_1", 2060), ("vnc_1", 2061)]),
        placement("i-later", "w-1", &[("serial_1", 2004), ("vnc_1", 2005)]),
        placement("i-dupport", "w-1", &[("serial_1", 2002), ("vnc_1", 2006)]),
        placement("i-ghost", "w-1", &[("serial_1", 2070), ("vnc_1", 2071)]),
        placement(
            "i-noworker",
            "w-ghost",
            &[("serial_1", 2000), ("vnc_1", 2001)],
        ),
    ];
    let resp = commit(&mut env, batch).await;
    use pb::PlacementOutcome as O;
    let got = outcomes(&resp);
    let expected = [
        ("i-ok", O::Committed),
        ("i-stale", O::Stale),
        ("i-placed", O::InvalidState),
        ("i-drain", O::WorkerUnavailable),
        ("i-legacy", O::WorkerUnavailable),
        ("i-range", O::PortConflict),
        ("i-names", O::PortConflict),
        ("i-taken", O::PortConflict),
        ("i-claimed", O::PortConflict),
        ("i-fits", O::Committed),
        ("i-over", O::InsufficientCapacity),
        ("i-later", O::Committed),
        ("i-dupport", O::PortConflict),
        ("i-ghost", O::NotFound),
        ("i-noworker", O::NotFound),
    ];
    for (id, outcome) in expected {
        assert_eq!(got.get(id), Some(&outcome), "{id}: {:?}", resp.results);
    }
    assert_eq!(
        resp.results.len(),
        expected.len(),
        "one result per placement"
    );
    assert_eq!(
        resp.results
            .iter()
            .map(|r| r.instance_id.as_str())
            .collect::<Vec<_>>(),
        expected.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "results in request order"
    );
    assert!(resp.revision > 0, "a feed revision for the commit");
    let over = resp
        .results
        .iter()
        .find(|r| r.instance_id == "i-over")
        .expect("i-over");
    assert!(over.message.contains("cpu"), "{}", over.message);
    let claimed = resp
        .results
        .iter()
        .find(|r| r.instance_id == "i-claimed")
        .expect("claimed");
    assert!(claimed.message.contains("w-1/2050"), "{}", claimed.message);

    // The committed instance, as stored.
    let ok: pb::LabletInstance = get(&app, "i-ok").await;
    assert_eq!(ok.state(), pb::InstanceState::Scheduled);
    assert_eq!(ok.worker_id, "w-1");
    assert_eq!(
        ok.allocated_ports,
        ports(&[("serial_1", 2000), ("vnc_1", 2001)])
    );
    assert_eq!(
        ok.scheduled_at,
        Some(ccm_control_plane::convert::timestamp_to_proto(
            env.plane.app.now()
        ))
    );
    let last = ok.state_history.last().expect("history");
    assert_eq!(
        (
            last.from(),
            last.to(),
            last.reason.as_str(),
            last.actor.as_str()
        ),
        (
            pb::InstanceState::Pending,
            pb::InstanceState::Scheduled,
            "scheduled",
            "service:scheduler"
        )
    );
    let cond = ok
        .conditions
        .iter()
        .find(|c| c.r#type == CONDITION_SCHEDULED)
        .expect("Scheduled condition");
    assert_eq!(cond.status(), pb::ConditionStatus::True);
    let ok_result = resp
        .results
        .iter()
        .find(|r| r.instance_id == "i-ok")
        .expect("ok");
    assert_eq!(ok_result.resource_version, ok.resource_version);
    assert_eq!(
        app.store
            .claims_of(Kind::Instance, "i-ok")
            .await
            .expect("claims"),
        vec![
            Claim::new("port", "w-1/2000"),
            Claim::new("port", "w-1/2001")
        ]
    );
    // Failed items left no trace.
    for id in ["i-stale", "i-claimed", "i-over", "i-dupport", "i-range"] {
        let i: pb::LabletInstance = get(&app, id).await;
        assert_eq!(i.state(), pb::InstanceState::Pending, "{id}");
        assert_eq!(i.resource_version, 1, "{id}");
        assert!(
            app.store
                .claims_of(Kind::Instance, id)
                .await
                .expect("claims")
                .is_empty(),
            "{id}"
        );
    }
    assert_eq!(
        app.store
            .claim_holder(&Claim::new("port", "w-1/2050"))
            .await
            .expect("holder")
            .map(|h| h.id),
        Some("i-squatter".to_owned())
    );
    // Audit and events for exactly the committed ones.
    let audits: Vec<_> = audit_records(&app)
        .await
        .into_iter()
        .filter(|a| a.action == "instance.schedule")
        .collect();
    let mut audited: Vec<_> = audits.iter().map(|a| a.resource_id.clone()).collect();
    audited.sort();
    assert_eq!(audited, vec!["i-fits", "i-later", "i-ok"]);
    assert!(audits.iter().all(|a| a.actor == "service:scheduler"
        && a.from_state == "INSTANCE_STATE_PENDING"
        && a.to_state == "INSTANCE_STATE_SCHEDULED"));
    let events = events_of(&env.plane, "ccm.lablet.instance.scheduled");
    assert_eq!(events.len(), 3);
    let ok_event = events
        .iter()
        .find(|e| e.subject.as_deref() == Some("i-ok"))
        .expect("event for i-ok");
    assert_eq!(
        json_of(ok_event),
        serde_json::json!({
            "instance_id": "i-ok",
            "worker_id": "w-1",
            "allocated_ports": {"serial_1": 2000, "vnc_1": 2001},
        })
    );
}

#[tokio::test]
async fn a_retried_batch_is_already_committed_and_changes_nothing() {
    let mut env = env().await;
    let def = world(&env).await;
    pending(&env, "i-1", &def, 2, 4).await;
    pending(&env, "i-2", &def, 2, 4).await;
    let batch = vec![
        placement("i-1", "w-1", &[("serial_1", 2000), ("vnc_1", 2001)]),
        placement("i-2", "w-1", &[("serial_1", 2002), ("vnc_1", 2003)]),
    ];
    let first = commit(&mut env, batch.clone()).await;
    assert!(
        first
            .results
            .iter()
            .all(|r| r.outcome() == pb::PlacementOutcome::Committed)
    );
    let events = env.plane.sink.events().len();
    let audits = audit_records(&env.plane.app).await.len();
    let revision = env.plane.coord.feed_revision().await.expect("rev");

    let again = commit(&mut env, batch).await;
    for (a, b) in first.results.iter().zip(&again.results) {
        assert_eq!(b.outcome(), pb::PlacementOutcome::AlreadyCommitted, "{b:?}");
        assert_eq!(a.resource_version, b.resource_version);
    }
    assert_eq!(again.revision, 0, "nothing committed");
    assert_eq!(env.plane.sink.events().len(), events);
    assert_eq!(audit_records(&env.plane.app).await.len(), audits);
    assert_eq!(
        env.plane.coord.feed_revision().await.expect("rev"),
        revision
    );

    // The same instance on other ports is not a retry.
    let moved = commit(
        &mut env,
        vec![placement(
            "i-1",
            "w-1",
            &[("serial_1", 2010), ("vnc_1", 2011)],
        )],
    )
    .await;
    assert_eq!(
        moved.results[0].outcome(),
        pb::PlacementOutcome::InvalidState
    );
}

#[tokio::test]
async fn capacity_is_checked_over_time_against_bookings_and_earlier_items_of_the_batch() {
    let mut env = env().await;
    let def = world(&env).await; // w-1: 8 cpu; each instance takes 4.
    for (id, from, to) in [
        ("a", 10, 12),
        ("b", 11, 13),
        ("c", 11, 12),
        ("d", 13, 15),
        ("e", 9, 10),
    ] {
        pending(&env, id, &def, from, to).await;
    }
    // a is booked first, in its own batch.
    let first = commit(
        &mut env,
        vec![placement(
            "a",
            "w-1",
            &[("serial_1", 2000), ("vnc_1", 2001)],
        )],
    )
    .await;
    assert_eq!(first.results[0].outcome(), pb::PlacementOutcome::Committed);
    let resp = commit(
        &mut env,
        vec![
            // Overlaps a: 8 of 8 cores at the peak. Fits.
            placement("b", "w-1", &[("serial_1", 2002), ("vnc_1", 2003)]),
            // Overlaps a and b: 12 of 8. Refused.
            placement("c", "w-1", &[("serial_1", 2004), ("vnc_1", 2005)]),
            // Starts (minus the 15 min lead) before b ends: 12:45–15:00 overlaps 10:45–13:00.
            placement("d", "w-1", &[("serial_1", 2006), ("vnc_1", 2007)]),
            // Ends when a's lead window begins... 08:45–10:00 overlaps a's 09:45–12:00.
            placement("e", "w-1", &[("serial_1", 2008), ("vnc_1", 2009)]),
        ],
    )
    .await;
    use pb::PlacementOutcome as O;
    assert_eq!(
        resp.results.iter().map(|r| r.outcome()).collect::<Vec<_>>(),
        vec![
            O::Committed,
            O::InsufficientCapacity,
            O::Committed,
            O::Committed
        ],
        "{:?}",
        resp.results
    );
    // A fifth booking overlapping b and d at 12:45–13:00 (b 4 + d 4 = 8) is refused; one after
    // everything fits.
    pending(&env, "f", &def, 13, 14).await;
    pending(&env, "g", &def, 20, 22).await;
    let resp = commit(
        &mut env,
        vec![
            placement("f", "w-1", &[("serial_1", 2010), ("vnc_1", 2011)]),
            placement("g", "w-1", &[("serial_1", 2012), ("vnc_1", 2013)]),
        ],
    )
    .await;
    assert_eq!(
        resp.results.iter().map(|r| r.outcome()).collect::<Vec<_>>(),
        vec![O::InsufficientCapacity, O::Committed]
    );
}

/// A store that fails every `apply_each` when told to (the whole transaction, as a backend
/// outage does), delegating everything else to SQLite.
struct FailingStore {
    inner: SqliteStore,
    fail: AtomicBool,
}

#[async_trait]
impl Store for FailingStore {
    fn backend(&self) -> &'static str {
        "failing-sqlite"
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn get(&self, kind: Kind, id: &str) -> StoreResult<Option<Document>> {
        self.inner.get(kind, id).await
    }
    async fn get_many(&self, kind: Kind, ids: &[String]) -> StoreResult<Vec<Document>> {
        self.inner.get_many(kind, ids).await
    }
    async fn list(&self, query: Query) -> StoreResult<Page> {
        self.inner.list(query).await
    }
    async fn count(&self, kind: Kind, filters: &[Filter]) -> StoreResult<u64> {
        self.inner.count(kind, filters).await
    }
    async fn claims_of(&self, kind: Kind, id: &str) -> StoreResult<Vec<Claim>> {
        self.inner.claims_of(kind, id).await
    }
    async fn claim_holder(&self, claim: &Claim) -> StoreResult<Option<ClaimHolder>> {
        self.inner.claim_holder(claim).await
    }
    async fn apply(&self, writes: Vec<Write>) -> StoreResult<Vec<Applied>> {
        self.inner.apply(writes).await
    }
    async fn apply_each(
        &self,
        items: Vec<Vec<Write>>,
    ) -> StoreResult<Vec<StoreResult<Vec<Applied>>>> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        self.inner.apply_each(items).await
    }
    async fn list_log(&self, log: LogKind, query: LogQuery) -> StoreResult<LogPage> {
        self.inner.list_log(log, query).await
    }
    async fn purge_log(&self, log: LogKind, older_than: DateTime<Utc>) -> StoreResult<u64> {
        self.inner.purge_log(log, older_than).await
    }
}

#[tokio::test]
async fn a_store_failure_during_the_commit_writes_nothing() {
    let store = Arc::new(FailingStore {
        inner: SqliteStore::open_in_memory().expect("sqlite"),
        fail: AtomicBool::new(false),
    });
    let mut env = env_with(TestOptions {
        store: Some(store.clone()),
        ..Default::default()
    })
    .await;
    let def = world(&env).await;
    pending(&env, "i-1", &def, 2, 4).await;
    pending(&env, "i-2", &def, 2, 4).await;
    let audits = audit_records(&env.plane.app).await.len();
    let revision = env.plane.coord.feed_revision().await.expect("rev");
    store.fail.store(true, Ordering::SeqCst);
    let err = env
        .client
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(env.sched.clone()),
            placements: vec![
                placement("i-1", "w-1", &[("serial_1", 2000), ("vnc_1", 2001)]),
                placement("i-2", "w-1", &[("serial_1", 2002), ("vnc_1", 2003)]),
            ],
        })
        .await
        .expect_err("the store is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    store.fail.store(false, Ordering::SeqCst);
    for id in ["i-1", "i-2"] {
        let i: pb::LabletInstance = get(&env.plane.app, id).await;
        assert_eq!(i.state(), pb::InstanceState::Pending);
        assert!(
            env.plane
                .app
                .store
                .claims_of(Kind::Instance, id)
                .await
                .expect("claims")
                .is_empty()
        );
    }
    assert_eq!(audit_records(&env.plane.app).await.len(), audits);
    assert!(env.plane.sink.events().is_empty());
    assert_eq!(
        env.plane.coord.feed_revision().await.expect("rev"),
        revision
    );
    // Once the store is back the same batch commits.
    let resp = commit(
        &mut env,
        vec![placement(
            "i-1",
            "w-1",
            &[("serial_1", 2000), ("vnc_1", 2001)],
        )],
    )
    .await;
    assert_eq!(resp.results[0].outcome(), pb::PlacementOutcome::Committed);
}

#[tokio::test]
async fn malformed_batches_are_refused_with_every_field_violation() {
    let mut env = env().await;
    let bad = vec![
        pb::Placement {
            instance_resource_version: -1,
            worker_resource_version: -2,
            score: f64::NAN,
            ..placement("", "Not An Id!", &[("serial_1", 0), ("vnc_1", 70000)])
        },
        placement("i-1", "w-1", &[]),
        placement("i-1", "w-1", &[("", 2000)]),
    ];
    let err = env
        .client
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(env.sched.clone()),
            placements: bad,
        })
        .await
        .expect_err("invalid");
    let mut fields = bad_fields(&err);
    fields.sort();
    assert_eq!(
        fields,
        vec![
            "placements[0].allocated_ports[\"serial_1\"]",
            "placements[0].allocated_ports[\"vnc_1\"]",
            "placements[0].instance_id",
            "placements[0].instance_resource_version",
            "placements[0].score",
            "placements[0].worker_id",
            "placements[0].worker_resource_version",
            "placements[2].allocated_ports[\"\"]",
            "placements[2].instance_id",
        ]
    );
    let too_many: Vec<_> = (0..1001)
        .map(|i| placement(&format!("i-{i}"), "w-1", &[]))
        .collect();
    let err = env
        .client
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(env.sched.clone()),
            placements: too_many,
        })
        .await
        .expect_err("too many");
    assert_eq!(bad_fields(&err), vec!["placements"]);
    // An empty batch commits nothing.
    let empty = commit(&mut env, vec![]).await;
    assert!(empty.results.is_empty());
    assert_eq!(empty.revision, 0);
    assert!(audit_records(&env.plane.app).await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// TransitionInstance
// ---------------------------------------------------------------------------------------------

async fn transition(
    env: &mut Env,
    fence: &pb::LeaderFence,
    id: &str,
    from: pb::InstanceState,
    to: pb::InstanceState,
    f: impl FnOnce(&mut pb::TransitionInstanceRequest),
) -> Result<pb::LabletInstance, tonic::Status> {
    let mut req = pb::TransitionInstanceRequest {
        fence: Some(fence.clone()),
        instance_id: id.into(),
        from: from as i32,
        to: to as i32,
        reason: String::new(),
        ..Default::default()
    };
    f(&mut req);
    env.client
        .transition_instance(req)
        .await
        .map(|r| r.into_inner().instance.expect("instance"))
}

#[tokio::test]
async fn instances_move_through_their_lifecycle_with_history_audit_events_and_port_release() {
    use pb::InstanceState as S;
    let mut env = env().await;
    let def = world(&env).await;
    pending(&env, "i-1", &def, 2, 4).await;
    commit(
        &mut env,
        vec![placement(
            "i-1",
            "w-1",
            &[("serial_1", 2000), ("vnc_1", 2001)],
        )],
    )
    .await;
    let (sched, ctrl) = (env.sched.clone(), env.ctrl.clone());

    // from must match.
    let err = transition(
        &mut env,
        &sched,
        "i-1",
        S::Pending,
        S::Instantiating,
        |_| {},
    )
    .await
    .expect_err("not PENDING");
    assert_eq!(precondition_types(&err), vec!["STATE"]);
    // A stale resource version.
    let err = transition(
        &mut env,
        &sched,
        "i-1",
        S::Scheduled,
        S::Instantiating,
        |r| r.resource_version = 1,
    )
    .await
    .expect_err("stale");
    assert_eq!(err.code(), tonic::Code::Aborted);
    // An edge that does not exist.
    let err = transition(&mut env, &ctrl, "i-1", S::Scheduled, S::Archived, |r| {
        r.reason = "x".into()
    })
    .await
    .expect_err("illegal");
    assert_eq!(precondition_types(&err), vec!["STATE"]);
    assert_eq!(reason(&err), "INVALID_STATE_TRANSITION");
    // SCHEDULED is reached only by placement; unknown enum numbers are refused.
    let err = transition(&mut env, &ctrl, "i-1", S::Pending, S::Scheduled, |r| {
        r.from = 99
    })
    .await
    .expect_err("bad");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(f, vec!["from", "to"]);

    let i = transition(
        &mut env,
        &sched,
        "i-1",
        S::Scheduled,
        S::Instantiating,
        |_| {},
    )
    .await
    .expect("instantiating");
    assert_eq!(i.state(), S::Instantiating);
    // RUNNING needs the lab id.
    let err = transition(&mut env, &ctrl, "i-1", S::Instantiating, S::Running, |_| {})
        .await
        .expect_err("no lab id");
    assert_eq!(bad_fields(&err), vec!["cml_lab_id"]);
    let i = transition(&mut env, &ctrl, "i-1", S::Instantiating, S::Running, |r| {
        r.cml_lab_id = "lab-42".into();
        r.condition = Some(pb::Condition {
            r#type: "Ready".into(),
            status: pb::ConditionStatus::True as i32,
            reason: "LabStarted".into(),
            ..Default::default()
        });
    })
    .await
    .expect("running");
    assert_eq!(i.cml_lab_id, "lab-42");
    assert!(i.started_at.is_some());
    assert!(i.conditions.iter().any(|c| c.r#type == "Ready"));
    let running = events_of(&env.plane, "ccm.lablet.instance.running");
    assert_eq!(running.len(), 1);
    let data = json_of(&running[0]);
    assert_eq!(data["cml_lab_id"], "lab-42");
    assert_eq!(data["worker_hostname"], "203.0.113.7");
    assert_eq!(data["previous_state"], "INSTANCE_STATE_INSTANTIATING");

    for (from, to, why) in [
        (S::Running, S::Stopping, "manual"),
        (S::Stopping, S::Stopped, ""),
        (S::Stopped, S::Archived, "timeslot_end"),
        (S::Archived, S::Terminated, "cleanup"),
    ] {
        let i = transition(&mut env, &ctrl, "i-1", from, to, |r| r.reason = why.into())
            .await
            .unwrap_or_else(|e| panic!("{from:?} → {to:?}: {e:?}"));
        assert_eq!(i.state(), to);
    }
    let done: pb::LabletInstance = get(&env.plane.app, "i-1").await;
    assert_eq!(done.termination_reason, "cleanup");
    assert!(done.terminated_at.is_some());
    assert!(
        env.plane
            .app
            .store
            .claims_of(Kind::Instance, "i-1")
            .await
            .expect("claims")
            .is_empty(),
        "ports released at TERMINATED"
    );
    let terminated = events_of(&env.plane, "ccm.lablet.instance.terminated");
    assert_eq!(
        json_of(&terminated[0])["final_state"],
        "INSTANCE_STATE_ARCHIVED"
    );
    let history: Vec<_> = done.state_history.iter().map(|t| t.to()).collect();
    assert_eq!(
        history,
        vec![
            S::Pending,
            S::Scheduled,
            S::Instantiating,
            S::Running,
            S::Stopping,
            S::Stopped,
            S::Archived,
            S::Terminated
        ]
    );
    let audited = audit_records(&env.plane.app)
        .await
        .into_iter()
        .filter(|a| a.action == "instance.transition" && a.resource_id == "i-1")
        .count();
    assert_eq!(audited, 6);
    // The freed ports can be placed again.
    pending(&env, "i-2", &def, 2, 4).await;
    let resp = commit(
        &mut env,
        vec![placement(
            "i-2",
            "w-1",
            &[("serial_1", 2000), ("vnc_1", 2001)],
        )],
    )
    .await;
    assert_eq!(resp.results[0].outcome(), pb::PlacementOutcome::Committed);
}

#[tokio::test]
async fn failed_instantiations_are_retried_then_terminated_after_three() {
    use pb::InstanceState as S;
    let mut env = env().await;
    let def = world(&env).await;
    pending(&env, "i-1", &def, 2, 4).await;
    commit(
        &mut env,
        vec![placement(
            "i-1",
            "w-1",
            &[("serial_1", 2000), ("vnc_1", 2001)],
        )],
    )
    .await;
    let (sched, ctrl) = (env.sched.clone(), env.ctrl.clone());
    transition(
        &mut env,
        &sched,
        "i-1",
        S::Scheduled,
        S::Instantiating,
        |_| {},
    )
    .await
    .expect("instantiating");
    let err = transition(&mut env, &ctrl, "i-1", S::Instantiating, S::Running, |r| {
        r.increment_retry_count = true
    })
    .await
    .expect_err("retry into RUNNING");
    assert_eq!(bad_fields(&err), vec!["increment_retry_count"]);
    for attempt in 1..=2 {
        let i = transition(
            &mut env,
            &ctrl,
            "i-1",
            S::Instantiating,
            S::Instantiating,
            |r| {
                r.increment_retry_count = true;
                r.reason = "import_failed".into();
            },
        )
        .await
        .expect("retry");
        assert_eq!(i.state(), S::Instantiating);
        assert_eq!(i.retry_count, attempt);
    }
    let i = transition(
        &mut env,
        &ctrl,
        "i-1",
        S::Instantiating,
        S::Instantiating,
        |r| {
            r.increment_retry_count = true;
            r.reason = "import_failed".into();
        },
    )
    .await
    .expect("third failure");
    assert_eq!(i.state(), S::Terminated);
    assert_eq!(i.retry_count, 3);
    assert_eq!(i.termination_reason, "max_retries_exceeded");
    assert!(
        env.plane
            .app
            .store
            .claims_of(Kind::Instance, "i-1")
            .await
            .expect("claims")
            .is_empty()
    );
    let retries = audit_records(&env.plane.app)
        .await
        .into_iter()
        .filter(|a| a.action == "instance.retry")
        .count();
    assert_eq!(retries, 2);
}

// ---------------------------------------------------------------------------------------------
// SetInstanceConditions
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn pending_conditions_are_stored_and_unchanged_ones_are_not_rewritten() {
    let mut env = env().await;
    let def = world(&env).await;
    pending(&env, "i-1", &def, 2, 4).await;
    pending(&env, "i-2", &def, 2, 4).await;
    commit(
        &mut env,
        vec![placement(
            "i-2",
            "w-1",
            &[("serial_1", 2000), ("vnc_1", 2001)],
        )],
    )
    .await;
    let cond = pb::Condition {
        r#type: "Scheduled".into(),
        status: pb::ConditionStatus::False as i32,
        reason: "Unschedulable".into(),
        message: "0/1 workers fit: 1 insufficient memory <script>".into(),
        ..Default::default()
    };
    let summary = pb::PendingSummary {
        total_workers: 1,
        feasible_workers: 0,
        message: "0/1 workers fit: 1 insufficient memory".into(),
        ..Default::default()
    };
    let update = |id: &str| pb::InstanceConditionUpdate {
        instance_id: id.into(),
        condition: Some(cond.clone()),
        pending_summary: Some(summary.clone()),
    };
    let req = pb::SetInstanceConditionsRequest {
        fence: Some(env.sched.clone()),
        updates: vec![update("i-1"), update("i-2"), update("i-ghost")],
    };
    let resp = env
        .client
        .set_instance_conditions(req.clone())
        .await
        .expect("set")
        .into_inner();
    assert_eq!(
        resp.results.iter().map(|r| r.updated).collect::<Vec<_>>(),
        vec![true, false, false]
    );
    assert!(resp.results[1].message.contains("no longer PENDING"));
    let i: pb::LabletInstance = get(&env.plane.app, "i-1").await;
    assert_eq!(i.resource_version, 2);
    assert_eq!(i.pending_summary, Some(summary.clone()));
    assert_eq!(i.conditions[0].message, cond.message, "stored inert");
    let revision = env.plane.coord.feed_revision().await.expect("rev");
    // The same again: nothing written, nothing announced.
    let resp = env
        .client
        .set_instance_conditions(req)
        .await
        .expect("set")
        .into_inner();
    assert!(resp.results[0].updated);
    assert_eq!(resp.results[0].message, "unchanged");
    let i: pb::LabletInstance = get(&env.plane.app, "i-1").await;
    assert_eq!(i.resource_version, 2);
    assert_eq!(
        env.plane.coord.feed_revision().await.expect("rev"),
        revision
    );
    // Bad input.
    let err = env
        .client
        .set_instance_conditions(pb::SetInstanceConditionsRequest {
            fence: Some(env.sched.clone()),
            updates: vec![
                pb::InstanceConditionUpdate {
                    instance_id: "i-1".into(),
                    condition: Some(pb::Condition {
                        r#type: "not camel".into(),
                        status: 17,
                        ..Default::default()
                    }),
                    pending_summary: None,
                },
                pb::InstanceConditionUpdate {
                    instance_id: "i-1".into(),
                    condition: None,
                    pending_summary: None,
                },
            ],
        })
        .await
        .expect_err("bad");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(
        f,
        vec![
            "updates[0].condition.status",
            "updates[0].condition.type",
            "updates[1].condition",
            "updates[1].instance_id",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn worker_reports_keep_desired_tags_until_the_controller_applies_them() {
    let mut env = env().await;
    world(&env).await;
    // An admin sets tags: they are desired (TagsSynced FALSE) until the controller applies them.
    let mut w: pb::CmlWorker = env.plane.app.get("w-1").await.expect("worker");
    let mut ec2 = w.ec2.clone().unwrap_or_default();
    ec2.tags = [("team".to_string(), "exams".to_string())].into();
    w.ec2 = Some(ec2);
    w.conditions.push(pb::Condition {
        r#type: "TagsSynced".into(),
        status: pb::ConditionStatus::False as i32,
        reason: "TagsUpdated".into(),
        ..Default::default()
    });
    let mut m = ccm_control_plane::record::Mutation::at(env.plane.app.now());
    m.update(&mut w, ccm_store::ClaimChange::Keep)
        .expect("encodes");
    env.plane.app.commit(m).await.expect("commits");
    let ctrl = env.ctrl.clone();
    let report = |tags: &[(&str, &str)], applied: bool| pb::ReportWorkerRequest {
        fence: Some(ctrl.clone()),
        worker_id: "w-1".into(),
        observation: Some(pb::WorkerObservation {
            ec2: Some(pb::Ec2Info {
                instance_state: "running".into(),
                tags: tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            conditions: if applied {
                vec![pb::Condition {
                    r#type: "TagsSynced".into(),
                    status: pb::ConditionStatus::True as i32,
                    reason: "TagsApplied".into(),
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            ..Default::default()
        }),
        resource_version: 0,
    };
    // EC2 still shows the old tags: the desired ones stay.
    let w = env
        .client
        .report_worker(report(&[("old", "tag")], false))
        .await
        .expect("report")
        .into_inner()
        .worker
        .expect("worker");
    let tags = w.ec2.expect("ec2").tags;
    assert_eq!(tags.get("team").map(String::as_str), Some("exams"));
    assert!(!tags.contains_key("old"), "{tags:?}");
    // The controller applied them and says so: the observation is taken as it is.
    let w = env
        .client
        .report_worker(report(&[("team", "exams"), ("aws:owner", "x")], true))
        .await
        .expect("report")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(w.ec2.expect("ec2").tags.len(), 2);
    let synced = w
        .conditions
        .iter()
        .find(|c| c.r#type == "TagsSynced")
        .expect("condition");
    assert_eq!(synced.status(), pb::ConditionStatus::True);
}

#[tokio::test]
async fn worker_reports_merge_observations_and_map_ec2_states_through_the_state_machine() {
    let mut env = env().await;
    world(&env).await;
    let ctrl = env.ctrl.clone();
    let report = |obs: pb::WorkerObservation, rv: i64| pb::ReportWorkerRequest {
        fence: Some(ctrl.clone()),
        worker_id: "w-1".into(),
        observation: Some(obs),
        resource_version: rv,
    };
    // CML facts and utilisation; EC2 says running (in sync).
    let w = env
        .client
        .report_worker(report(
            pb::WorkerObservation {
                cml: Some(pb::CmlInfo {
                    version: "2.9.0".into(),
                    ready: true,
                    ..Default::default()
                }),
                utilization: Some(pb::Utilization {
                    cpu_percent: 42.0,
                    ..Default::default()
                }),
                ec2: Some(pb::Ec2Info {
                    instance_state: "running".into(),
                    public_ip: "198.51.100.9".into(),
                    ..Default::default()
                }),
                labs: vec![pb::CmlLab {
                    lab_id: "lab-1".into(),
                    ..Default::default()
                }],
                labs_synced: true,
                ..Default::default()
            },
            0,
        ))
        .await
        .expect("report")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(w.state(), pb::WorkerState::Running);
    let cml = w.cml.as_ref().expect("cml");
    assert_eq!((cml.version.as_str(), cml.labs_count), ("2.9.0", 1));
    // The synced labs are kept in the worker's labs snapshot (WorkerService reads it).
    use ccm_control_plane::services::workers::{labs_from_snapshot, labs_snapshot_id};
    let snapshot: pb::WorkerOperation = get(&env.plane.app, &labs_snapshot_id("w-1")).await;
    let (labs, synced) = labs_from_snapshot(&snapshot).expect("labs");
    assert_eq!(labs.len(), 1);
    assert_eq!(
        (labs[0].lab_id.as_str(), labs[0].worker_id.as_str()),
        ("lab-1", "w-1")
    );
    assert!(synced.is_some());
    assert_eq!(w.ec2.as_ref().expect("ec2").public_ip, "198.51.100.9");
    assert!(!w.ec2.as_ref().expect("ec2").instance_id.is_empty(), "kept");
    assert_eq!(
        w.service_status(),
        pb::CmlServiceStatus::Available,
        "unchanged"
    );
    // Absent parts stay.
    let w = env
        .client
        .report_worker(report(
            pb::WorkerObservation {
                service_status: pb::CmlServiceStatus::Error as i32,
                ..Default::default()
            },
            w.resource_version,
        ))
        .await
        .expect("report")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(w.service_status(), pb::CmlServiceStatus::Error);
    assert_eq!(w.cml.as_ref().expect("cml").version, "2.9.0");
    let snapshot: pb::WorkerOperation = get(&env.plane.app, &labs_snapshot_id("w-1")).await;
    assert_eq!(
        labs_from_snapshot(&snapshot).expect("labs").0.len(),
        1,
        "not a sync: kept"
    );
    // A full sync with no labs empties it.
    let w = env
        .client
        .report_worker(report(
            pb::WorkerObservation {
                labs_synced: true,
                ..Default::default()
            },
            0,
        ))
        .await
        .expect("report")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(w.cml.as_ref().expect("cml").labs_count, 0);
    let snapshot: pb::WorkerOperation = get(&env.plane.app, &labs_snapshot_id("w-1")).await;
    assert!(labs_from_snapshot(&snapshot).expect("labs").0.is_empty());
    assert_eq!(w.utilization.as_ref().expect("u").cpu_percent, 42.0);
    // Stale version.
    let err = env
        .client
        .report_worker(report(pb::WorkerObservation::default(), 1))
        .await
        .expect_err("stale");
    assert_eq!(err.code(), tonic::Code::Aborted);
    // EC2 "stopped" while RUNNING cannot be applied: a divergence condition, state kept.
    let w = env
        .client
        .report_worker(report(
            pb::WorkerObservation {
                ec2: Some(pb::Ec2Info {
                    instance_state: "stopped".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            0,
        ))
        .await
        .expect("report")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(w.state(), pb::WorkerState::Running);
    let c = w
        .conditions
        .iter()
        .find(|c| c.r#type == CONDITION_EC2_IN_SYNC)
        .expect("condition");
    assert_eq!(c.status(), pb::ConditionStatus::False);
    assert!(events_of(&env.plane, "ccm.worker.stopped").is_empty());
    // EC2 "stopping" while RUNNING is an edge: STOPPING, audited, announced.
    let w = env
        .client
        .report_worker(report(
            pb::WorkerObservation {
                ec2: Some(pb::Ec2Info {
                    instance_state: "stopping".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            0,
        ))
        .await
        .expect("report")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(w.state(), pb::WorkerState::Stopping);
    assert_eq!(w.state_reason, "ec2_stopping");
    assert_eq!(events_of(&env.plane, "ccm.worker.stopping").len(), 1);
    assert!(
        audit_records(&env.plane.app)
            .await
            .iter()
            .any(|a| a.action == "worker.transition" && a.to_state == "WORKER_STATE_STOPPING")
    );
    // Bad observations.
    let err = env
        .client
        .report_worker(report(
            pb::WorkerObservation {
                service_status: 99,
                utilization: Some(pb::Utilization {
                    cpu_percent: 140.0,
                    ..Default::default()
                }),
                labs: vec![pb::CmlLab::default()],
                ..Default::default()
            },
            0,
        ))
        .await
        .expect_err("bad");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(
        f,
        vec![
            "observation.labs[0].lab_id",
            "observation.service_status",
            "observation.utilization.cpu_percent",
        ]
    );
    let err = env
        .client
        .report_worker(pb::ReportWorkerRequest {
            fence: Some(env.ctrl.clone()),
            worker_id: "w-1".into(),
            observation: None,
            resource_version: 0,
        })
        .await
        .expect_err("no observation");
    assert_eq!(bad_fields(&err), vec!["observation"]);
}

#[tokio::test]
async fn workers_transition_through_the_state_machine_and_drains_record_their_deadline() {
    let mut env = env().await;
    world(&env).await;
    put(
        &env.plane.app,
        &mut worker("w-new", pb::WorkerState::Pending, 48, 192, (2000, 9999)),
    )
    .await;
    let ctrl = env.ctrl.clone();
    let req = |id: &str, from: pb::WorkerState, to: pb::WorkerState| pb::TransitionWorkerRequest {
        fence: Some(ctrl.clone()),
        worker_id: id.into(),
        from: from as i32,
        to: to as i32,
        ..Default::default()
    };
    use pb::WorkerState as W;
    let err = env
        .client
        .transition_worker(req("w-new", W::Pending, W::Provisioning))
        .await
        .expect_err("needs the EC2 id");
    assert_eq!(bad_fields(&err), vec!["aws_instance_id"]);
    let w = env
        .client
        .transition_worker(pb::TransitionWorkerRequest {
            aws_instance_id: "i-0123456789abcdef0".into(),
            ..req("w-new", W::Pending, W::Provisioning)
        })
        .await
        .expect("provisioning")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(w.state(), W::Provisioning);
    assert_eq!(
        w.ec2.as_ref().expect("ec2").instance_id,
        "i-0123456789abcdef0"
    );
    let aws = ccm_control_plane::services::workers::aws_instance_claim("i-0123456789abcdef0");
    let holder = env
        .plane
        .app
        .store
        .claim_holder(&aws)
        .await
        .expect("holder");
    assert_eq!(holder.map(|h| h.id), Some("w-new".to_owned()));
    // One EC2 instance backs one worker.
    put(
        &env.plane.app,
        &mut worker("w-twin", pb::WorkerState::Pending, 48, 192, (2000, 9999)),
    )
    .await;
    let err = env
        .client
        .transition_worker(pb::TransitionWorkerRequest {
            aws_instance_id: "i-0123456789abcdef0".into(),
            ..req("w-twin", W::Pending, W::Provisioning)
        })
        .await
        .expect_err("instance taken");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let twin: pb::CmlWorker = get(&env.plane.app, "w-twin").await;
    assert_eq!(twin.state(), W::Pending);
    assert_eq!(
        events_of(&env.plane, "ccm.worker.provisioning.started").len(),
        1
    );

    let w = env
        .client
        .transition_worker(pb::TransitionWorkerRequest {
            reason: "scale_down_idle".into(),
            scaling_decision_id: "3f2b8c1e-5d7a-4e1b-9c0d-2a6f4b8e1c3d".into(),
            ..req("w-1", W::Running, W::Draining)
        })
        .await
        .expect("draining")
        .into_inner()
        .worker
        .expect("worker");
    let drain = w.drain.as_ref().expect("drain info");
    assert_eq!(drain.reason, "scale_down_idle");
    assert_eq!(drain.requested_by, "service:controller");
    let started = drain.drain_started_at.expect("start").seconds;
    assert_eq!(
        drain.deadline.expect("deadline").seconds - started,
        2 * 3600,
        "template's 2 h"
    );
    let draining = events_of(&env.plane, "ccm.worker.draining");
    assert_eq!(json_of(&draining[0])["running_instances_count"], 0);
    // The controller cannot cancel a drain (admins do, through WorkerService).
    let err = env
        .client
        .transition_worker(req("w-1", W::Draining, W::Running))
        .await
        .expect_err("admin only");
    assert_eq!(precondition_types(&err), vec!["STATE"]);
    // from must match.
    let err = env
        .client
        .transition_worker(req("w-1", W::Running, W::Stopping))
        .await
        .expect_err("not RUNNING");
    assert_eq!(precondition_types(&err), vec!["STATE"]);
    let w = env
        .client
        .transition_worker(pb::TransitionWorkerRequest {
            reason: "drained".into(),
            ..req("w-1", W::Draining, W::Stopping)
        })
        .await
        .expect("stopping")
        .into_inner()
        .worker
        .expect("worker");
    assert!(w.drain.is_none(), "drain info cleared");
    assert!(w.stop_initiated_at.is_some());
    let err = env
        .client
        .transition_worker(req("w-1", W::Stopping, W::Pending))
        .await
        .expect_err("never back to PENDING");
    assert_eq!(precondition_types(&err), vec!["STATE"]);
    let err = env
        .client
        .transition_worker(req("w-ghost", W::Stopping, W::Stopped))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn scale_up_creates_a_pending_worker_once_per_request_id() {
    let mut env = env().await;
    world(&env).await;
    let req = |request_id: &str| pb::CreateWorkerRecordRequest {
        fence: Some(env.ctrl.clone()),
        template_name: TEMPLATE.into(),
        reason: "3 pending instances".into(),
        scaling_decision_id: "3f2b8c1e-5d7a-4e1b-9c0d-2a6f4b8e1c3d".into(),
        request_id: request_id.into(),
        ..Default::default()
    };
    let first = env
        .client
        .create_worker_record(req("dec-1/0"))
        .await
        .expect("create")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(first.state(), pb::WorkerState::Pending);
    assert_eq!(first.template_name, TEMPLATE);
    assert!(
        first.name.starts_with("cml-worker-enterprise-large-"),
        "{}",
        first.name
    );
    assert_eq!(
        first
            .declared_capacity
            .as_ref()
            .expect("capacity")
            .max_nodes,
        500
    );
    assert_eq!(first.ec2.as_ref().expect("ec2").region, "us-east-1");
    assert_eq!(first.created_by, "service:controller");
    let again = env
        .client
        .create_worker_record(req("dec-1/0"))
        .await
        .expect("retry")
        .into_inner()
        .worker
        .expect("worker");
    assert_eq!(again.id, first.id, "the retry returns the first record");
    let second = env
        .client
        .create_worker_record(req("dec-1/1"))
        .await
        .expect("second")
        .into_inner()
        .worker
        .expect("worker");
    assert_ne!(second.id, first.id);
    assert_eq!(events_of(&env.plane, "ccm.worker.pending").len(), 2);
    let creates = audit_records(&env.plane.app)
        .await
        .into_iter()
        .filter(|a| a.action == "worker.create")
        .count();
    assert_eq!(creates, 2);

    let err = env
        .client
        .create_worker_record(pb::CreateWorkerRecordRequest {
            template_name: "missing-template".into(),
            ..req("dec-2/0")
        })
        .await
        .expect_err("unknown template");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = env
        .client
        .create_worker_record(pb::CreateWorkerRecordRequest {
            region: "ap-south-1".into(),
            ..req("dec-3/0")
        })
        .await
        .expect_err("region");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = env
        .client
        .create_worker_record(pb::CreateWorkerRecordRequest {
            template_name: "Bad Name".into(),
            ..req("")
        })
        .await
        .expect_err("invalid");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(f, vec!["request_id", "template_name"]);
}

// ---------------------------------------------------------------------------------------------
// Scaling decisions (acceptance scenario 17)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_scaling_decision_is_logged_audited_and_emitted() {
    let mut env = env().await;
    let decision = pb::ScalingDecision {
        action: pb::ScalingAction::ScaleUp as i32,
        template_name: TEMPLATE.into(),
        count: 2,
        reason: "3 pending instances need 96 GiB within 35 min; no RUNNING worker fits".into(),
        reason_code: "unmet_demand".into(),
        instance_ids: vec!["i-1".into(), "i-2".into()],
        context: ccm_control_plane::services::internal::to_struct(serde_json::json!({
            "pending": 3
        })),
        ..Default::default()
    };
    let stored = env
        .client
        .record_scaling_decision(pb::RecordScalingDecisionRequest {
            fence: Some(env.ctrl.clone()),
            decision: Some(decision.clone()),
            request_id: "cycle-7/up".into(),
        })
        .await
        .expect("record")
        .into_inner()
        .decision
        .expect("decision");
    assert!(!stored.id.is_empty());
    assert_eq!(stored.leader_epoch, env.ctrl.epoch);
    assert_eq!(stored.triggered_by(), pb::ScalingTrigger::System);
    assert!(stored.at.is_some());
    // Audited.
    let audit: Vec<_> = audit_records(&env.plane.app)
        .await
        .into_iter()
        .filter(|a| a.action == "scaling.decision")
        .collect();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].resource_id, stored.id);
    assert_eq!(audit[0].resource_kind(), pb::ResourceKind::ScalingDecision);
    assert_eq!(audit[0].actor, "service:controller");
    // Emitted.
    let events = events_of(&env.plane, "ccm.scaling.up.requested");
    assert_eq!(events.len(), 1);
    let data = json_of(&events[0]);
    assert_eq!(data["decision_id"], stored.id.as_str());
    assert_eq!(data["count"], 2);
    assert_eq!(data["context"]["pending"], 3);
    // Idempotent by request id.
    let again = env
        .client
        .record_scaling_decision(pb::RecordScalingDecisionRequest {
            fence: Some(env.ctrl.clone()),
            decision: Some(decision.clone()),
            request_id: "cycle-7/up".into(),
        })
        .await
        .expect("retry")
        .into_inner()
        .decision
        .expect("decision");
    assert_eq!(again, stored);
    assert_eq!(events_of(&env.plane, "ccm.scaling.up.requested").len(), 1);
    // More decisions, one per action kind that has its own event.
    for (action, worker_id, event) in [
        (
            pb::ScalingAction::Drain,
            "w-1",
            "ccm.scaling.down.requested",
        ),
        (pb::ScalingAction::Wait, "", "ccm.scaling.wait"),
        (pb::ScalingAction::Halt, "", "ccm.scaling.halted"),
    ] {
        env.plane.clock.advance(chrono::Duration::seconds(1));
        env.client
            .record_scaling_decision(pb::RecordScalingDecisionRequest {
                fence: Some(env.ctrl.clone()),
                decision: Some(pb::ScalingDecision {
                    action: action as i32,
                    worker_id: worker_id.into(),
                    reason_code: "test".into(),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .expect("record");
        assert_eq!(events_of(&env.plane, event).len(), 1, "{event}");
    }
    // History: newest first, filters, paging.
    let list = |f: &dyn Fn(&mut pb::ListScalingDecisionHistoryRequest)| {
        let mut req = pb::ListScalingDecisionHistoryRequest {
            fence: Some(env.ctrl.clone()),
            ..Default::default()
        };
        f(&mut req);
        req
    };
    let all = env
        .client
        .list_scaling_decision_history(list(&|_| {}))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        all.decisions.iter().map(|d| d.action()).collect::<Vec<_>>(),
        vec![
            pb::ScalingAction::Halt,
            pb::ScalingAction::Wait,
            pb::ScalingAction::Drain,
            pb::ScalingAction::ScaleUp
        ]
    );
    assert!(all.next_page_token.is_empty());
    assert_eq!(all.decisions[3], stored);
    let ups = env
        .client
        .list_scaling_decision_history(list(&|r| {
            r.actions = vec![
                pb::ScalingAction::ScaleUp as i32,
                pb::ScalingAction::Drain as i32,
            ]
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(ups.decisions.len(), 2);
    let on_w1 = env
        .client
        .list_scaling_decision_history(list(&|r| r.worker_id = "w-1".into()))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(on_w1.decisions.len(), 1);
    let by_template = env
        .client
        .list_scaling_decision_history(list(&|r| r.template_name = TEMPLATE.into()))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(by_template.decisions, vec![stored.clone()]);
    // Two per page.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = env
            .client
            .list_scaling_decision_history(list(&|r| {
                r.page_size = 2;
                r.page_token = token.clone();
            }))
            .await
            .expect("page")
            .into_inner();
        assert!(page.decisions.len() <= 2);
        seen.extend(page.decisions.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        all.decisions
            .iter()
            .map(|d| d.id.clone())
            .collect::<Vec<_>>()
    );
    // A token with other filters is refused.
    let page = env
        .client
        .list_scaling_decision_history(list(&|r| r.page_size = 1))
        .await
        .expect("page")
        .into_inner();
    let err = env
        .client
        .list_scaling_decision_history(list(&|r| {
            r.page_size = 1;
            r.worker_id = "w-1".into();
            r.page_token = page.next_page_token.clone();
        }))
        .await
        .expect_err("changed filters");
    assert_eq!(bad_fields(&err), vec!["page_token"]);
    // Invalid decisions.
    let err = env
        .client
        .record_scaling_decision(pb::RecordScalingDecisionRequest {
            fence: Some(env.ctrl.clone()),
            decision: Some(pb::ScalingDecision {
                action: 0,
                count: -1,
                reason_code: "Not Snake".into(),
                template_name: "UPPER".into(),
                ..Default::default()
            }),
            request_id: "x".repeat(65),
        })
        .await
        .expect_err("invalid");
    let mut f = bad_fields(&err);
    f.sort();
    assert_eq!(
        f,
        vec![
            "decision.action",
            "decision.count",
            "decision.reason_code",
            "decision.template_name",
            "request_id"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Worker operations
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn worker_operations_are_claimed_with_their_token_and_completed_once() {
    let mut env = env().await;
    world(&env).await;
    let app = env.plane.app.clone();
    let mut op = pb::WorkerOperation {
        id: "op-1".into(),
        worker_id: "w-1".into(),
        kind: pb::WorkerOperationKind::RegisterLicense as i32,
        status: pb::OperationStatus::Pending as i32,
        requested_by: "user:admin".into(),
        ..Default::default()
    };
    put_with(
        &app,
        &mut op,
        vec![license_token_claim("op-1", "SECRET-TOKEN-123")],
    )
    .await;
    let mut refresh = pb::WorkerOperation {
        id: "op-2".into(),
        worker_id: "w-1".into(),
        kind: pb::WorkerOperationKind::Refresh as i32,
        status: pb::OperationStatus::Pending as i32,
        ..Default::default()
    };
    put(&app, &mut refresh).await;

    let claimed = env
        .client
        .claim_worker_operation(pb::ClaimWorkerOperationRequest {
            fence: Some(env.ctrl.clone()),
            operation_id: "op-1".into(),
        })
        .await
        .expect("claim")
        .into_inner();
    assert_eq!(claimed.license_token, "SECRET-TOKEN-123");
    assert_eq!(
        claimed.operation.expect("op").status(),
        pb::OperationStatus::Running
    );
    let err = env
        .client
        .claim_worker_operation(pb::ClaimWorkerOperationRequest {
            fence: Some(env.ctrl.clone()),
            operation_id: "op-1".into(),
        })
        .await
        .expect_err("claimed twice");
    assert_eq!(precondition_types(&err), vec!["STATE"]);
    // Audit records never carry the token.
    for a in audit_records(&app).await {
        assert!(!format!("{a:?}").contains("SECRET-TOKEN-123"));
    }
    let done = env
        .client
        .complete_worker_operation(pb::CompleteWorkerOperationRequest {
            fence: Some(env.ctrl.clone()),
            operation_id: "op-1".into(),
            status: pb::OperationStatus::Succeeded as i32,
            result: ccm_control_plane::services::internal::to_struct(
                serde_json::json!({"registered": true}),
            ),
            error: String::new(),
        })
        .await
        .expect("complete")
        .into_inner()
        .operation
        .expect("op");
    assert_eq!(done.status(), pb::OperationStatus::Succeeded);
    assert!(done.completed_at.is_some());
    assert!(done.result.is_some());
    assert!(
        !app.store
            .claims_of(Kind::WorkerOperation, "op-1")
            .await
            .expect("claims")
            .iter()
            .any(|c| c.namespace == LICENSE_TOKEN_CLAIM),
        "the token left the store"
    );
    // A retried completion answers the same; a different final status is refused.
    let again = env
        .client
        .complete_worker_operation(pb::CompleteWorkerOperationRequest {
            fence: Some(env.ctrl.clone()),
            operation_id: "op-1".into(),
            status: pb::OperationStatus::Succeeded as i32,
            ..Default::default()
        })
        .await
        .expect("retry")
        .into_inner()
        .operation
        .expect("op");
    assert_eq!(again.resource_version, done.resource_version);
    let err = env
        .client
        .complete_worker_operation(pb::CompleteWorkerOperationRequest {
            fence: Some(env.ctrl.clone()),
            operation_id: "op-1".into(),
            status: pb::OperationStatus::Failed as i32,
            error: "late".into(),
            ..Default::default()
        })
        .await
        .expect_err("already final");
    assert_eq!(precondition_types(&err), vec!["STATE"]);
    // A PENDING operation may be completed directly (e.g. cancelled); no token for REFRESH.
    let cancelled = env
        .client
        .complete_worker_operation(pb::CompleteWorkerOperationRequest {
            fence: Some(env.ctrl.clone()),
            operation_id: "op-2".into(),
            status: pb::OperationStatus::Cancelled as i32,
            error: "worker stopped".into(),
            ..Default::default()
        })
        .await
        .expect("cancel")
        .into_inner()
        .operation
        .expect("op");
    assert_eq!(cancelled.error, "worker stopped");
    let err = env
        .client
        .complete_worker_operation(pb::CompleteWorkerOperationRequest {
            fence: Some(env.ctrl.clone()),
            operation_id: "op-2".into(),
            status: pb::OperationStatus::Running as i32,
            ..Default::default()
        })
        .await
        .expect_err("not final");
    assert_eq!(bad_fields(&err), vec!["status"]);
}
