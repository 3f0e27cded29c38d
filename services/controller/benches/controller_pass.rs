//! One controller pass over 100 workers and 1,000 instances, on real components: the control
//! plane on loopback (SQLite in memory), the CML simulator over HTTP, the simulated cloud.
//!
//! Measures (JSON on stdout):
//! - `instantiate_pass_ms`: the passes that import and start all 1,000 labs (first one, and how
//!   many passes it took);
//! - `steady_pass_ms`: a full pass once everything runs — 100 workers polled (EC2 describe, CML
//!   system information, health, stats, licensing, one ReportWorker each), 1,000 instances
//!   looked at, the autoscaler planned — median, p90 and max over `PASSES` passes.
//!
//! Run: `cargo bench -p ccm-controller --bench controller_pass`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ccm_artifacts::{DefaultFetcher, FetcherConfig};
use ccm_cloud::simulated::{SimulatedCloud, SimulatedConfig};
use ccm_cml::http::{CmlEndpoint, HttpCmlClientFactory};
use ccm_cml_sim::{CmlSim, SimOptions};
use ccm_control_plane::app::AppSettings;
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_controller::{Controller, ControllerDeps, ControllerSettings, Fence};
use ccm_coord::LeaseOptions;
use ccm_proto::v1 as pb;
use ccm_runtime::client::PlaneClient;

const WORKERS: usize = 100;
const PER_WORKER: usize = 10;
const PASSES: usize = 9;
const TEMPLATE: &str = "bench-enterprise";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let plane = TestPlane::start_with(TestOptions {
        settings: Some(AppSettings {
            allow_http_artifacts: true,
            ..AppSettings::default()
        }),
        ..TestOptions::default()
    })
    .await
    .expect("plane");
    let sim = CmlSim::start(SimOptions::default()).await.expect("sim");
    let client = PlaneClient::connect(&format!("http://{}", plane.addr), None)
        .await
        .expect("client");
    let settings = ControllerSettings {
        worker_poll_interval: Duration::ZERO,
        booting_poll_interval: Duration::ZERO,
        cml_endpoint_template: format!("{}/{{instance_id}}", sim.base_url()),
        autoscaler_enabled: true,
        ..ControllerSettings::default()
    };
    let controller = Controller::new(
        settings,
        ControllerDeps {
            cloud: Arc::new(SimulatedCloud::new(
                plane.clock.clone(),
                SimulatedConfig::default(),
            )),
            cml: Arc::new(
                HttpCmlClientFactory::new(CmlEndpoint::new("http://127.0.0.1", "admin", "admin"))
                    .expect("factory"),
            ),
            coordinator: plane.coord.clone(),
            plane: client.clone(),
            clock: plane.clock.clone(),
            fetcher: Arc::new(
                DefaultFetcher::new(FetcherConfig {
                    allow_http: true,
                    ..FetcherConfig::default()
                })
                .expect("fetcher"),
            ),
        },
    )
    .expect("controller");
    let leadership = plane
        .coord
        .campaign(
            "controller",
            "bench",
            LeaseOptions::with_ttl(Duration::from_secs(60)),
        )
        .await
        .expect("leadership");
    let fence = Fence {
        epoch: leadership.epoch(),
        holder: "bench".into(),
    };

    // The fleet: 100 workers, RUNNING.
    create_template(&client).await;
    let def = create_definition(&client).await;
    for i in 0..WORKERS {
        client
            .workers()
            .create_worker(pb::CreateWorkerRequest {
                template_name: TEMPLATE.into(),
                request_id: format!("bench-{i}"),
                ..Default::default()
            })
            .await
            .expect("worker");
    }
    controller
        .pass(&fence, "bench_setup")
        .await
        .expect("launch pass");
    plane.clock.advance(chrono::Duration::seconds(6));
    controller
        .pass(&fence, "bench_setup")
        .await
        .expect("observe pass");
    let workers = list_workers(&client).await;
    let running = workers
        .iter()
        .filter(|w| w.state() == pb::WorkerState::Running)
        .count();
    assert_eq!(running, WORKERS, "every worker RUNNING");

    // 1,000 instances, placed 10 per worker.
    let mut placements = Vec::new();
    for (wi, w) in workers.iter().enumerate() {
        for k in 0..PER_WORKER {
            let inst = client
                .instances()
                .create_instance(pb::CreateInstanceRequest {
                    definition_id: def.id.clone(),
                    definition_version: def.version.clone(),
                    time_slot: Some(pb::TimeSlot {
                        start: None,
                        end: Some(ts(plane_now(&plane) + chrono::Duration::hours(2))),
                        asap: true,
                    }),
                    owner_id: format!("student-{wi}-{k}"),
                    ..Default::default()
                })
                .await
                .expect("instance")
                .into_inner()
                .instance
                .expect("instance");
            let base = 3000 + 2 * i32::try_from(k).expect("small");
            placements.push(pb::Placement {
                instance_id: inst.id,
                worker_id: w.id.clone(),
                allocated_ports: HashMap::from([
                    ("serial_1".to_owned(), base),
                    ("vnc_1".to_owned(), base + 1),
                ]),
                ..Default::default()
            });
        }
    }
    let scheduler = plane
        .coord
        .campaign(
            "scheduler",
            "bench-scheduler",
            LeaseOptions::with_ttl(Duration::from_secs(60)),
        )
        .await
        .expect("scheduler leadership");
    let committed = client
        .internal()
        .commit_placements(pb::CommitPlacementsRequest {
            fence: Some(ccm_runtime::client::fence(
                "scheduler",
                scheduler.epoch(),
                "bench-scheduler",
            )),
            placements,
        })
        .await
        .expect("commit")
        .into_inner();
    let ok = committed
        .results
        .iter()
        .filter(|r| r.outcome() == pb::PlacementOutcome::Committed)
        .count();
    assert_eq!(ok, WORKERS * PER_WORKER, "every placement committed");

    // Instantiation passes.
    let mut instantiate = Vec::new();
    loop {
        let t = Instant::now();
        let report = controller
            .pass(&fence, "bench_instantiate")
            .await
            .expect("pass");
        instantiate.push(t.elapsed());
        if report.actions == 0 || instantiate.len() > 10 {
            break;
        }
    }
    let running_instances = count_running(&client).await;
    assert_eq!(running_instances, WORKERS * PER_WORKER, "every lab RUNNING");

    // Steady state.
    let mut steady = Vec::new();
    for _ in 0..PASSES {
        let t = Instant::now();
        let report = controller.pass(&fence, "bench_steady").await.expect("pass");
        steady.push(t.elapsed());
        assert_eq!(report.workers, WORKERS);
        assert_eq!(report.instances, WORKERS * PER_WORKER);
        assert_eq!(report.errors, 0);
    }
    steady.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
    let out = serde_json::json!({
        "bench": "controller_pass",
        "workers": WORKERS,
        "instances": WORKERS * PER_WORKER,
        "instantiate_passes": instantiate.len(),
        "instantiate_first_pass_ms": ms(instantiate[0]),
        "instantiate_total_ms": ms(instantiate.iter().sum()),
        "steady_passes": PASSES,
        "steady_pass_ms": {
            "median": ms(steady[PASSES / 2]),
            "p90": ms(steady[(PASSES * 9) / 10]),
            "max": ms(steady[PASSES - 1]),
        },
        "budget_ms": 1000,
    });
    println!("{out}");
    leadership.resign().await.ok();
    scheduler.resign().await.ok();
    sim.shutdown().await;
    plane.stop().await.expect("plane stops");
}

fn plane_now(plane: &TestPlane) -> chrono::DateTime<chrono::Utc> {
    use ccm_core::clock::Clock;
    plane.clock.now()
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

async fn list_workers(client: &PlaneClient) -> Vec<pb::CmlWorker> {
    client
        .workers()
        .list_workers(pb::ListWorkersRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("workers")
        .into_inner()
        .workers
}

async fn count_running(client: &PlaneClient) -> usize {
    client
        .instances()
        .list_instances(pb::ListInstancesRequest {
            page_size: 1000,
            states: vec![pb::InstanceState::Running as i32],
            ..Default::default()
        })
        .await
        .expect("instances")
        .into_inner()
        .instances
        .len()
}

async fn create_template(client: &PlaneClient) {
    client
        .templates()
        .create_template(pb::CreateTemplateRequest {
            template: Some(pb::WorkerTemplate {
                name: TEMPLATE.into(),
                instance_type: "m5zn.metal".into(),
                capacity: Some(pb::WorkerCapacity {
                    cpu_cores: 48,
                    memory_gb: 192,
                    storage_gb: 1000,
                    max_nodes: 500,
                }),
                license_type: pb::LicenseType::Enterprise as i32,
                ami_pattern: "cml-2.9.*".into(),
                regions: vec!["us-east-1".into()],
                port_range: Some(pb::PortRange {
                    start: 3000,
                    end: 3999,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("template");
}

async fn create_definition(client: &PlaneClient) -> pb::LabletDefinition {
    let dir = std::env::temp_dir().join(format!("ccm-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("lab.yaml");
    std::fs::write(&path, include_str!("../tests/fixtures/lab-ports.yaml")).expect("fixture");
    client
        .definitions()
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(pb::LabletDefinition {
                name: "bench-lab".into(),
                lab_artifact_uri: format!("file://{}", path.display()),
                resource_requirements: Some(pb::ResourceRequirements {
                    cpu_cores: 2,
                    memory_gb: 4,
                    storage_gb: 10,
                    ..Default::default()
                }),
                license_affinity: vec![pb::LicenseType::Enterprise as i32],
                node_count: 3,
                port_template: Some(pb::PortTemplate {
                    ports: ["serial_1", "vnc_1"]
                        .iter()
                        .map(|n| pb::PortDefinition {
                            name: (*n).into(),
                            protocol: pb::PortProtocol::Tcp as i32,
                        })
                        .collect(),
                }),
                max_duration: Some(prost_types::Duration {
                    seconds: 4 * 3600,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("definition")
        .into_inner()
        .definition
        .expect("definition")
}
