//! Two controllers on a real etcd: only the leader acts and answers Reconcile; when the leader
//! dies without resigning, the standby takes over once the lease expires (TTL + 2 s at most),
//! and acts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ccm_cloud::simulated::{SimulatedCloud, SimulatedConfig};
use ccm_control_plane::app::AppSettings;
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_controller::{Controller, ControllerDeps};
use ccm_coord::{Coordinator, EtcdConfig, EtcdCoordinator};
use ccm_proto::v1 as pb;
use ccm_runtime::client::PlaneClient;
use ccm_testkit::etcd::EtcdServer;
use tokio_util::sync::CancellationToken;

const TTL: Duration = Duration::from_secs(2);

async fn etcd_coord(etcd: &EtcdServer) -> Arc<dyn Coordinator> {
    Arc::new(
        EtcdCoordinator::connect(EtcdConfig::new([etcd.endpoint()]).key_prefix("/ccm-test/"))
            .await
            .expect("etcd connects"),
    )
}

async fn wait<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_only_the_leader_acts_and_the_standby_takes_over_within_ttl() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let plane = TestPlane::start_with(TestOptions {
        coord: Some(etcd_coord(&etcd).await),
        settings: Some(AppSettings {
            allow_http_artifacts: true,
            ..AppSettings::default()
        }),
        ..TestOptions::default()
    })
    .await
    .expect("plane starts");
    let sim = ccm_cml_sim::CmlSim::start(ccm_cml_sim::SimOptions::default())
        .await
        .expect("sim");
    let cloud = Arc::new(SimulatedCloud::new(
        plane.clock.clone(),
        SimulatedConfig::default(),
    ));
    let client = PlaneClient::connect(&format!("http://{}", plane.addr), None)
        .await
        .expect("client");
    let mut replicas = Vec::new();
    for name in ["ctl-a", "ctl-b"] {
        let mut settings = common::fast_settings(&sim);
        settings.replica_id = name.into();
        settings.lease_ttl = TTL;
        let controller = Controller::new(
            settings,
            ControllerDeps {
                cloud: cloud.clone(),
                cml: common::cml_factory(),
                coordinator: etcd_coord(&etcd).await,
                plane: client.clone(),
                clock: plane.clock.clone(),
                fetcher: common::fetcher(),
            },
        )
        .expect("controller");
        let (api, _task) = common::serve_api(&controller).await;
        let stop = CancellationToken::new();
        let c = controller.clone();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let _ = c.run(s).await;
        });
        replicas.push((controller, api, stop, task));
    }
    let leader = wait("one leader", Duration::from_secs(10), || async {
        let leading: Vec<usize> = (0..2).filter(|i| replicas[*i].0.is_leader()).collect();
        (leading.len() == 1).then(|| leading[0])
    })
    .await;
    let standby = 1 - leader;

    // Only the leader accepts Reconcile; the standby says UNAVAILABLE.
    let refused = replicas[standby]
        .1
        .clone()
        .reconcile(pb::ReconcileRequest {
            scope: pb::ReconcileScope::Workers as i32,
            target_id: String::new(),
            reason: "test".into(),
        })
        .await
        .expect_err("standby refuses");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let accepted = replicas[leader]
        .1
        .clone()
        .reconcile(pb::ReconcileRequest {
            scope: pb::ReconcileScope::Workers as i32,
            target_id: String::new(),
            reason: "test".into(),
        })
        .await
        .expect("leader accepts")
        .into_inner();
    assert!(accepted.accepted);

    // A worker record is launched by the leader, and only by it.
    let create = |key: &'static str| {
        let client = client.clone();
        async move {
            client
                .templates()
                .create_template(pb::CreateTemplateRequest {
                    template: Some(pb::WorkerTemplate {
                        name: common::TEMPLATE.into(),
                        instance_type: "m5zn.metal".into(),
                        capacity: Some(pb::WorkerCapacity {
                            cpu_cores: 48,
                            memory_gb: 192,
                            storage_gb: 500,
                            max_nodes: 20,
                        }),
                        license_type: pb::LicenseType::Personal as i32,
                        ami_pattern: "cml-2.9.*".into(),
                        regions: vec!["us-east-1".into()],
                        ..Default::default()
                    }),
                })
                .await
                .ok();
            client
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
    };
    let first = create("w-1").await;
    let launched = wait(
        "the leader launches it",
        Duration::from_secs(20),
        || async {
            let w = client
                .workers()
                .get_worker(pb::GetWorkerRequest {
                    worker_id: first.id.clone(),
                })
                .await
                .ok()?
                .into_inner()
                .worker?;
            (w.state() == pb::WorkerState::Provisioning).then_some(w)
        },
    )
    .await;
    assert_eq!(cloud.launch_count(), 1);
    assert_eq!(launched.state_reason, "provisioning_started");
    let (runs_standby, _) = replicas[standby].0.status().counts("workers");
    assert_eq!(runs_standby, 0, "the standby never reconciled");

    // The leader dies without resigning (its lease is left to expire).
    let (dead, _api, _stop, task) = replicas.remove(leader);
    task.abort();
    let _ = task.await;
    drop(dead);
    let survivor = &replicas[0].0;
    wait(
        "the standby leads within TTL + 2 s",
        TTL + Duration::from_secs(2),
        || async { survivor.is_leader().then_some(()) },
    )
    .await;
    let second = create("w-2").await;
    wait(
        "the new leader launches",
        Duration::from_secs(20),
        || async {
            let w = client
                .workers()
                .get_worker(pb::GetWorkerRequest {
                    worker_id: second.id.clone(),
                })
                .await
                .ok()?
                .into_inner()
                .worker?;
            (w.state() == pb::WorkerState::Provisioning).then_some(())
        },
    )
    .await;
    assert_eq!(cloud.launch_count(), 2);
    let fence = survivor.leader_fence().expect("fence");
    assert!(fence.epoch > 0);
    replicas[0].2.cancel();
    sim.shutdown().await;
    plane.stop().await.expect("plane stops");
}
