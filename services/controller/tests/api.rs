//! ControllerService input checks, and worker operations (licence registration) carried out on
//! the CML simulator.

mod common;

use ccm_cml_sim::FaultPatch;
use ccm_proto::v1 as pb;
use common::World;
use tonic_types::StatusExt;

fn field_of(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_controller_api_rejects_bad_input_and_standby_reconcile() {
    // Not running: this replica is a standby.
    let world = World::start(|_| {}, false).await;
    let mut api = world.api.clone();
    let standby = api
        .reconcile(pb::ReconcileRequest {
            scope: pb::ReconcileScope::Instances as i32,
            target_id: String::new(),
            reason: "now".into(),
        })
        .await
        .expect_err("a standby does not reconcile");
    assert_eq!(standby.code(), tonic::Code::Unavailable);

    let targeted = api
        .reconcile(pb::ReconcileRequest {
            scope: pb::ReconcileScope::Autoscaler as i32,
            target_id: "w-1".into(),
            reason: String::new(),
        })
        .await
        .expect_err("autoscaler takes no target");
    assert_eq!(field_of(&targeted), ["target_id"]);
    let unknown = api
        .reconcile(pb::ReconcileRequest {
            scope: 99,
            target_id: String::new(),
            reason: String::new(),
        })
        .await
        .expect_err("unknown scope");
    assert_eq!(field_of(&unknown), ["scope"]);
    let multiline = api
        .reconcile(pb::ReconcileRequest {
            scope: pb::ReconcileScope::Workers as i32,
            target_id: String::new(),
            reason: "one\ntwo".into(),
        })
        .await
        .expect_err("multi-line reason");
    assert_eq!(field_of(&multiline), ["reason"]);
    let page = api
        .list_scaling_decisions(pb::ListScalingDecisionsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect_err("page too big");
    assert_eq!(field_of(&page), ["page_size"]);

    let status = api
        .get_controller_status(pb::GetControllerStatusRequest {})
        .await
        .expect("status from a standby")
        .into_inner();
    assert!(!status.leader.expect("leader info").is_leader);
    world.stop().await;
}

async fn running_worker(world: &World) -> pb::CmlWorker {
    world.create_template(0).await;
    world
        .client
        .workers()
        .create_worker(pb::CreateWorkerRequest {
            template_name: common::TEMPLATE.into(),
            request_id: "licence".into(),
            ..Default::default()
        })
        .await
        .expect("worker created");
    world.wait_worker_running().await
}

async fn finished(world: &World, id: &str) -> pb::WorkerOperation {
    world
        .until("the operation finishes", || async {
            let op = world
                .client
                .workers()
                .get_worker_operation(pb::GetWorkerOperationRequest {
                    operation_id: id.into(),
                })
                .await
                .ok()?
                .into_inner()
                .operation?;
            matches!(
                op.status(),
                pb::OperationStatus::Succeeded | pb::OperationStatus::Failed
            )
            .then_some(op)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_licence_registration_runs_on_cml_and_failures_are_reported() {
    let world = World::start(|s| s.autoscaler_enabled = false, true).await;
    let worker = running_worker(&world).await;
    let aws = worker.ec2.clone().expect("ec2").instance_id;

    // A failing registration ends FAILED with the reason.
    world
        .sim
        .set_faults(
            &aws,
            &FaultPatch {
                fail_registration: Some(true),
                ..FaultPatch::default()
            },
        )
        .expect("fault");
    let op = world
        .client
        .workers()
        .register_worker_license(pb::RegisterWorkerLicenseRequest {
            worker_id: worker.id.clone(),
            license_token: "tok-123".into(),
            reregister: false,
        })
        .await
        .expect("accepted")
        .into_inner()
        .operation
        .expect("operation");
    let failed = finished(&world, &op.id).await;
    assert_eq!(failed.status(), pb::OperationStatus::Failed, "{failed:?}");
    assert!(failed.error.contains("FAILED"), "{}", failed.error);

    // Without the fault it registers.
    world
        .sim
        .set_faults(
            &aws,
            &FaultPatch {
                fail_registration: Some(false),
                ..FaultPatch::default()
            },
        )
        .expect("fault cleared");
    let op = world
        .client
        .workers()
        .register_worker_license(pb::RegisterWorkerLicenseRequest {
            worker_id: worker.id.clone(),
            license_token: "tok-123".into(),
            reregister: true,
        })
        .await
        .expect("accepted")
        .into_inner()
        .operation
        .expect("operation");
    let done = finished(&world, &op.id).await;
    assert_eq!(done.status(), pb::OperationStatus::Succeeded, "{done:?}");
    let state = world.sim_state(&aws).await;
    assert_eq!(state["registration_status"], "COMPLETED", "{state}");
    // The next poll reports the licence on the worker.
    world
        .until("the worker shows REGISTERED", || async {
            let w = world.worker(&worker.id).await;
            (w.license.as_ref().map(|l| l.status()) == Some(pb::LicenseStatus::Registered))
                .then_some(())
        })
        .await;
    world.stop().await;
}
