//! Scale-down end to end: an idle worker is drained, then stopped on the simulated cloud; a
//! worker with a live lab is never drained.

mod common;

use ccm_proto::v1 as pb;
use common::{PORT_START, World};

async fn create_worker(world: &World, key: &str) -> pb::CmlWorker {
    world
        .client
        .workers()
        .create_worker(pb::CreateWorkerRequest {
            template_name: common::TEMPLATE.into(),
            request_id: key.into(),
            ..Default::default()
        })
        .await
        .expect("worker created")
        .into_inner()
        .worker
        .expect("worker")
}

async fn wait_worker(world: &World, id: &str, state: pb::WorkerState) -> pb::CmlWorker {
    world
        .until(&format!("worker {}", state.as_str_name()), || async {
            let w = world.worker(id).await;
            (w.state() == state).then_some(w)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_idle_worker_is_drained_then_stopped_and_a_busy_one_never() {
    let world = World::start(|_| {}, true).await;
    world.create_template(0).await;
    let def = world.create_definition("routing", None).await;

    // Worker A gets a lab.
    let a = create_worker(&world, "worker-a").await;
    let inst = world.book_asap(&def).await;
    wait_worker(&world, &a.id, pb::WorkerState::Provisioning).await;
    world.plane.clock.advance(chrono::Duration::seconds(6));
    wait_worker(&world, &a.id, pb::WorkerState::Running).await;
    world
        .place(
            &inst.id,
            &a.id,
            &[("serial_1", PORT_START), ("vnc_1", PORT_START + 1)],
        )
        .await;
    world
        .until("the lab runs on A", || async {
            (world.instance(&inst.id).await.state() == pb::InstanceState::Running).then_some(())
        })
        .await;

    // Worker B has nothing to do.
    let b = create_worker(&world, "worker-b").await;
    wait_worker(&world, &b.id, pb::WorkerState::Provisioning).await;
    world.plane.clock.advance(chrono::Duration::seconds(6));
    let stopping = world
        .until("B is drained and stopping", || async {
            let w = world.worker(&b.id).await;
            matches!(
                w.state(),
                pb::WorkerState::Stopping | pb::WorkerState::Stopped
            )
            .then_some(w)
        })
        .await;
    assert_eq!(
        stopping.desired_state(),
        pb::WorkerDesiredState::Unspecified
    );
    // The simulated EC2 takes its stop time.
    world.plane.clock.advance(chrono::Duration::seconds(4));
    let stopped = wait_worker(&world, &b.id, pb::WorkerState::Stopped).await;
    assert_eq!(stopped.service_status(), pb::CmlServiceStatus::Unavailable);

    let decisions = world.decisions().await;
    let drain = decisions
        .iter()
        .find(|d| d.action() == pb::ScalingAction::Drain)
        .expect("a DRAIN decision");
    assert_eq!(drain.worker_id, b.id);
    assert_eq!(drain.reason_code, "scale_down_idle");
    let stop = decisions
        .iter()
        .find(|d| d.action() == pb::ScalingAction::Stop)
        .expect("a STOP decision");
    assert_eq!(stop.worker_id, b.id);
    assert_eq!(stop.reason_code, "drain_complete");
    assert!(
        !decisions.iter().any(|d| d.worker_id == a.id
            && matches!(
                d.action(),
                pb::ScalingAction::Drain | pb::ScalingAction::Stop
            )),
        "the worker with a live lab is never drained: {decisions:?}"
    );
    assert!(
        !decisions
            .iter()
            .any(|d| d.action() == pb::ScalingAction::Terminate),
        "stop, not terminate"
    );
    assert_eq!(world.worker(&a.id).await.state(), pb::WorkerState::Running);
    assert_eq!(
        world.instance(&inst.id).await.state(),
        pb::InstanceState::Running
    );
    world.stop().await;
}
