//! Fencing with a real etcd (acceptance scenario 16): two scheduler contenders campaign on one
//! etcd, the control plane checks their fences through another etcd client; after a hand-over the
//! deposed leader's placement commit is refused with FAILED_PRECONDITION and writes nothing, and
//! the new leader's commit goes through. Both ways of losing leadership are covered: resigning,
//! and a leader cut off from etcd (renewals suspended) whose lease expires.

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_coord::{Coordinator, EtcdConfig, EtcdCoordinator, LeaseOptions, LossReason};
use ccm_proto::v1 as pb;
use ccm_proto::v1::internal_service_client::InternalServiceClient;
use ccm_store::Kind;
use ccm_testkit::etcd::EtcdServer;
use fixtures::*;

/// Lease TTL of the contenders: short, so an abandoned lease expires quickly.
const TTL: Duration = Duration::from_secs(2);

fn fence_of(l: &ccm_coord::Leadership) -> pb::LeaderFence {
    pb::LeaderFence {
        role: "scheduler".into(),
        epoch: l.epoch(),
        holder_id: l.holder().to_owned(),
    }
}

fn placement(instance: &str, port: i32) -> pb::Placement {
    pb::Placement {
        instance_id: instance.into(),
        worker_id: "w-1".into(),
        allocated_ports: ports(&[("serial_1", port), ("vnc_1", port + 1)]),
        ..Default::default()
    }
}

/// Waits until `coord` sees `epoch` as the scheduler's current epoch.
async fn sees(coord: &dyn Coordinator, epoch: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if coord
            .leader("scheduler")
            .await
            .expect("leader")
            .is_some_and(|l| l.epoch == epoch)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control plane never saw epoch {epoch}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Commits with a stale fence must fail with the FENCE violation and leave `instance` untouched.
async fn refused_without_a_trace(
    plane: &TestPlane,
    client: &mut InternalServiceClient<tonic::transport::Channel>,
    fence: pb::LeaderFence,
    instance: &str,
    port: i32,
) {
    let app = &plane.app;
    let audits = audit_records(app).await.len();
    let events = plane.sink.events().len();
    let revision = app.coord.feed_revision().await.expect("revision");
    let err = client
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(fence),
            placements: vec![placement(instance, port)],
        })
        .await
        .expect_err("the deposed leader is refused");
    assert_eq!(precondition_types(&err), vec!["FENCE"]);
    assert_eq!(reason(&err), "STALE_LEADER_EPOCH");
    let i: pb::LabletInstance = get(app, instance).await;
    assert_eq!(i.state(), pb::InstanceState::Pending);
    assert_eq!(i.resource_version, 1);
    assert!(
        app.store
            .claims_of(Kind::Instance, instance)
            .await
            .expect("claims")
            .is_empty(),
        "no port was taken"
    );
    assert_eq!(audit_records(app).await.len(), audits, "nothing audited");
    assert_eq!(plane.sink.events().len(), events, "nothing emitted");
    assert_eq!(
        app.coord.feed_revision().await.expect("revision"),
        revision,
        "nothing announced"
    );
}

async fn committed(
    client: &mut InternalServiceClient<tonic::transport::Channel>,
    fence: pb::LeaderFence,
    instance: &str,
    port: i32,
) {
    let resp = client
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(fence),
            placements: vec![placement(instance, port)],
        })
        .await
        .expect("the leader commits")
        .into_inner();
    assert_eq!(
        resp.results[0].outcome(),
        pb::PlacementOutcome::Committed,
        "{resp:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_leader_election_a_deposed_scheduler_cannot_commit_through_etcd() {
    let etcd = EtcdServer::start().unwrap_or_else(|e| {
        panic!("{e} (scripts/test installs etcd; or apt-get install etcd-server)")
    });
    let connect = || async {
        EtcdCoordinator::connect(EtcdConfig::new([etcd.endpoint()]))
            .await
            .expect("connect to etcd")
    };
    let plane_coord = Arc::new(connect().await);
    let contenders = Arc::new(connect().await);
    let plane = TestPlane::start_with(TestOptions {
        coord: Some(plane_coord.clone()),
        ..Default::default()
    })
    .await
    .expect("plane");
    let app = plane.app.clone();
    let mut def = definition("d-1", 4, 16, 5, &["serial_1", "vnc_1"]);
    put(&app, &mut def).await;
    put(
        &app,
        &mut worker("w-1", pb::WorkerState::Running, 48, 192, (2000, 2999)),
    )
    .await;
    for id in ["i-1", "i-2", "i-3"] {
        put(&app, &mut instance(id, &def, "alice", at(1), at(3))).await;
    }
    let mut client = InternalServiceClient::new(plane.channel().await.expect("channel"));

    // Two contenders: exactly one leads.
    let opts = LeaseOptions::with_ttl(TTL);
    let a = contenders
        .campaign("scheduler", "scheduler-a", opts)
        .await
        .expect("a leads");
    let standby = {
        let c = contenders.clone();
        tokio::spawn(async move { c.campaign("scheduler", "scheduler-b", opts).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!standby.is_finished(), "b must wait while a leads");
    let fence_a = fence_of(&a);
    sees(plane_coord.as_ref(), fence_a.epoch).await;
    committed(&mut client, fence_a.clone(), "i-1", 2000).await;

    // a resigns; b takes over with a greater epoch.
    a.resign().await.expect("resign");
    let b = tokio::time::timeout(Duration::from_secs(20), standby)
        .await
        .expect("b takes over in time")
        .expect("join")
        .expect("b leads");
    let fence_b = fence_of(&b);
    assert!(fence_b.epoch > fence_a.epoch);
    sees(plane_coord.as_ref(), fence_b.epoch).await;
    refused_without_a_trace(&plane, &mut client, fence_a.clone(), "i-2", 2010).await;
    committed(&mut client, fence_b.clone(), "i-2", 2010).await;

    // b is cut off from etcd: it stops renewing, steps down on its own, and c takes over once
    // the lease expires.
    let standby = {
        let c = contenders.clone();
        tokio::spawn(async move { c.campaign("scheduler", "scheduler-c", opts).await })
    };
    b.suspend_renewals();
    let why = tokio::time::timeout(Duration::from_secs(10), b.lost())
        .await
        .expect("b notices");
    assert_eq!(why, LossReason::RenewDeadlineMissed);
    let c = tokio::time::timeout(Duration::from_secs(20), standby)
        .await
        .expect("c takes over in time")
        .expect("join")
        .expect("c leads");
    let fence_c = fence_of(&c);
    assert!(fence_c.epoch > fence_b.epoch);
    sees(plane_coord.as_ref(), fence_c.epoch).await;
    refused_without_a_trace(&plane, &mut client, fence_b, "i-3", 2020).await;
    refused_without_a_trace(&plane, &mut client, fence_a, "i-3", 2020).await;
    // The new leader's epoch with a forged holder id is refused too.
    let err = client
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(pb::LeaderFence {
                holder_id: "scheduler-a".into(),
                ..fence_c.clone()
            }),
            placements: vec![placement("i-3", 2020)],
        })
        .await
        .expect_err("wrong holder");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    committed(&mut client, fence_c, "i-3", 2020).await;

    // No instance was placed twice.
    for (id, port) in [("i-1", 2000), ("i-2", 2010), ("i-3", 2020)] {
        let i: pb::LabletInstance = get(&app, id).await;
        assert_eq!(i.state(), pb::InstanceState::Scheduled, "{id}");
        assert_eq!(i.allocated_ports["serial_1"], port, "{id}");
        assert_eq!(i.state_history.len(), 2, "{id} scheduled once");
    }
    c.resign().await.expect("resign");
    plane.stop().await.expect("stop");
}
