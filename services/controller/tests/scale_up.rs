//! Scale-up end to end: a pending booking with no worker → a SCALE_UP decision → a worker
//! launched on the simulated cloud → RUNNING once the CML simulator answers → placed (as the
//! scheduler commits it) → INSTANTIATING → RUNNING with the lab imported on the simulator with
//! the allocated ports.

mod common;

use ccm_proto::v1 as pb;
use common::{PORT_START, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_scale_up_from_pending_booking_runs_the_lab_with_its_ports() {
    let world = World::start(|_| {}, true).await;
    world.create_template(0).await;
    let def = world.create_definition("routing", None).await;
    let inst = world.book_asap(&def).await;
    assert_eq!(inst.state(), pb::InstanceState::Pending);

    // The autoscaler sees the unmet demand and records why it scales up.
    let decision = world
        .until("a SCALE_UP decision", || async {
            world
                .decisions()
                .await
                .into_iter()
                .find(|d| d.action() == pb::ScalingAction::ScaleUp)
        })
        .await;
    assert_eq!(decision.template_name, common::TEMPLATE);
    assert_eq!(decision.count, 1);
    assert_eq!(decision.reason_code, "scale_up_demand");
    assert!(decision.instance_ids.contains(&inst.id), "{decision:?}");
    assert!(!decision.reason.is_empty());

    // The worker is launched, boots, and is RUNNING once CML answers.
    let worker = world.wait_worker_running().await;
    assert_eq!(worker.template_name, common::TEMPLATE);
    assert_eq!(worker.service_status(), pb::CmlServiceStatus::Available);
    let ec2 = worker.ec2.clone().expect("ec2 facts");
    assert!(ec2.instance_id.starts_with("i-"), "{ec2:?}");
    assert_eq!(ec2.instance_state, "running");
    assert!(
        ec2.https_endpoint.ends_with(&ec2.instance_id),
        "endpoint from the template: {}",
        ec2.https_endpoint
    );
    assert_eq!(worker.cml.as_ref().map(|c| c.ready), Some(true));
    // Only one worker for one demand, even though the loop ran many times meanwhile.
    let managed: Vec<_> = world.workers().await;
    assert_eq!(managed.len(), 1, "{managed:?}");

    // The scheduler places the instance; the controller instantiates it.
    let serial = PORT_START + 41;
    let vnc = PORT_START + 44;
    world
        .place(
            &inst.id,
            &worker.id,
            &[("serial_1", serial), ("vnc_1", vnc)],
        )
        .await;
    let running = world
        .until("the instance is RUNNING", || async {
            let i = world.instance(&inst.id).await;
            (i.state() == pb::InstanceState::Running).then_some(i)
        })
        .await;
    assert!(!running.cml_lab_id.is_empty());
    assert!(running.started_at.is_some());
    let path: Vec<i32> = running.state_history.iter().map(|h| h.to).collect();
    assert!(
        path.ends_with(&[
            pb::InstanceState::Scheduled as i32,
            pb::InstanceState::Instantiating as i32,
            pb::InstanceState::Running as i32
        ]),
        "{path:?}"
    );

    // The lab on the simulated CML carries the allocated ports and runs.
    let state = world.sim_state(&ec2.instance_id).await;
    let labs = state["labs"].as_array().expect("labs");
    assert_eq!(labs.len(), 1, "{state}");
    let lab = &labs[0];
    assert_eq!(lab["id"], running.cml_lab_id.as_str());
    assert_eq!(lab["title"], format!("ccm-{}", inst.id).as_str());
    let yaml = lab["yaml"].as_str().expect("yaml");
    assert!(yaml.contains(&format!("serial:{serial}")), "{yaml}");
    assert!(yaml.contains(&format!("vnc:{vnc}")), "{yaml}");
    assert!(!yaml.contains("${PORT_"), "every placeholder replaced");
    let lab_state = lab["state"].as_str().expect("lab state");
    assert!(matches!(lab_state, "STARTED" | "BOOTED"), "{lab_state}");

    // The status API tells what ran and why.
    let status = world
        .api
        .clone()
        .get_controller_status(pb::GetControllerStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let leader = status.leader.expect("leader");
    assert!(leader.is_leader);
    assert_eq!(status.cloud_provider, "simulated");
    let instances = status
        .reconcilers
        .iter()
        .find(|r| r.name == "instances")
        .expect("instances reconciler");
    assert!(instances.runs_total > 0);
    assert!(!instances.last_reason.is_empty());
    let fleet = status.fleet.expect("fleet");
    assert!(
        fleet
            .workers
            .iter()
            .any(|c| c.state == pb::WorkerState::Running as i32 && c.count == 1),
        "{fleet:?}"
    );
    world.stop().await;
}
