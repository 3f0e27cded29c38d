//! The test world: a real control plane on loopback (TestPlane, its in-process coordinator and
//! ManualClock), the simulated cloud on that clock, one multi-host CML simulator over real HTTP,
//! and a controller (plus its ControllerService on loopback) wired to them.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ccm_artifacts::{DefaultFetcher, FetcherConfig};
use ccm_cloud::CloudProvider;
use ccm_cloud::simulated::{SimulatedCloud, SimulatedConfig};
use ccm_cml::http::{CmlEndpoint, HttpCmlClientFactory};
use ccm_cml_sim::{CmlSim, SimHandle, SimOptions};
use ccm_control_plane::app::AppSettings;
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_controller::{Controller, ControllerDeps, ControllerSettings};
use ccm_coord::Coordinator;
use ccm_proto::v1 as pb;
use ccm_proto::v1::controller_service_client::ControllerServiceClient;
use ccm_runtime::client::PlaneClient;
use ccm_runtime::server::{Server, ServerSettings, ServiceSet};
use tokio_util::sync::CancellationToken;

/// Name of the test template.
pub const TEMPLATE: &str = "personal-small";
/// First port of the test template's range.
pub const PORT_START: i32 = 3000;
/// How long a test waits for something the controller should do (a bound, not a timing
/// assertion: the loop runs every 100 ms).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Everything a controller test runs against.
pub struct World {
    pub plane: TestPlane,
    pub sim: SimHandle,
    pub cloud: Arc<SimulatedCloud>,
    pub client: PlaneClient,
    pub controller: Controller,
    pub api: ControllerServiceClient<tonic::transport::Channel>,
    pub shutdown: CancellationToken,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub dir: PathBuf,
}

/// Settings for tests: every loop short, every poll due each pass.
pub fn fast_settings(sim: &SimHandle) -> ControllerSettings {
    ControllerSettings {
        instances_interval: Duration::from_millis(100),
        workers_interval: Duration::from_millis(100),
        autoscaler_interval: Duration::from_millis(100),
        worker_poll_interval: Duration::ZERO,
        booting_poll_interval: Duration::ZERO,
        lease_ttl: Duration::from_secs(2),
        license_poll_interval: Duration::from_millis(200),
        cml_endpoint_template: format!("{}/{{instance_id}}", sim.base_url()),
        ..ControllerSettings::default()
    }
}

pub fn cml_factory() -> Arc<HttpCmlClientFactory> {
    Arc::new(
        HttpCmlClientFactory::new(CmlEndpoint::new("http://127.0.0.1", "admin", "admin"))
            .expect("CML client factory"),
    )
}

pub fn fetcher() -> Arc<DefaultFetcher> {
    Arc::new(
        DefaultFetcher::new(FetcherConfig {
            allow_http: true,
            ..FetcherConfig::default()
        })
        .expect("fetcher"),
    )
}

impl World {
    /// Starts the world with `tweak` applied to the fast settings; the controller runs when
    /// `run` is true.
    pub async fn start(tweak: impl FnOnce(&mut ControllerSettings), run: bool) -> World {
        Self::start_with_cloud(tweak, run, None).await
    }

    pub async fn start_with_cloud(
        tweak: impl FnOnce(&mut ControllerSettings),
        run: bool,
        cloud_override: Option<Arc<dyn CloudProvider>>,
    ) -> World {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let plane = TestPlane::start_with(TestOptions {
            settings: Some(AppSettings {
                allow_http_artifacts: true,
                ..AppSettings::default()
            }),
            ..TestOptions::default()
        })
        .await
        .expect("plane starts");
        let sim = CmlSim::start(SimOptions::default())
            .await
            .expect("sim starts");
        let cloud = Arc::new(SimulatedCloud::new(
            plane.clock.clone(),
            SimulatedConfig::default(),
        ));
        let client = PlaneClient::connect(&format!("http://{}", plane.addr), None)
            .await
            .expect("plane client");
        let mut settings = fast_settings(&sim);
        tweak(&mut settings);
        let deps = ControllerDeps {
            cloud: cloud_override.unwrap_or_else(|| cloud.clone()),
            cml: cml_factory(),
            coordinator: plane.coord.clone(),
            plane: client.clone(),
            clock: plane.clock.clone(),
            fetcher: fetcher(),
        };
        let controller = Controller::new(settings, deps).expect("controller");
        let (api, api_task) = serve_api(&controller).await;
        let shutdown = CancellationToken::new();
        let mut tasks = vec![api_task];
        if run {
            tasks.push(spawn_run(&controller, &shutdown));
        }
        let dir =
            std::env::temp_dir().join(format!("ccm-controller-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        World {
            plane,
            sim,
            cloud,
            client,
            controller,
            api,
            shutdown,
            tasks,
            dir,
        }
    }

    pub fn coord(&self) -> Arc<dyn Coordinator> {
        self.plane.coord.clone()
    }

    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        use ccm_core::clock::Clock;
        self.plane.clock.now()
    }

    /// Creates the test template (PERSONAL, 48 cores / 192 GiB / 500 GiB / 20 nodes).
    pub async fn create_template(&self, min_workers: i32) {
        self.client
            .templates()
            .create_template(pb::CreateTemplateRequest {
                template: Some(pb::WorkerTemplate {
                    name: TEMPLATE.into(),
                    description: "test workers".into(),
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
                    startup_time: Some(prost_types::Duration {
                        seconds: 20 * 60,
                        nanos: 0,
                    }),
                    port_range: Some(pb::PortRange {
                        start: PORT_START,
                        end: PORT_START + 999,
                    }),
                    drain_timeout: Some(prost_types::Duration {
                        seconds: 4 * 3600,
                        nanos: 0,
                    }),
                    min_workers,
                    tags: HashMap::from([("Environment".to_owned(), "test".to_owned())]),
                    ..Default::default()
                }),
            })
            .await
            .expect("template created");
    }

    /// Creates a definition whose artifact is the fixture lab (ports serial_1 and vnc_1);
    /// `grading_url` becomes its grading_rules_uri.
    pub async fn create_definition(
        &self,
        name: &str,
        grading_url: Option<&str>,
    ) -> pb::LabletDefinition {
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, include_str!("../fixtures/lab-ports.yaml")).expect("fixture written");
        let uri = format!("file://{}", path.display());
        self.client
            .definitions()
            .create_definition(pb::CreateDefinitionRequest {
                definition: Some(pb::LabletDefinition {
                    name: name.into(),
                    description: "routing".into(),
                    lab_artifact_uri: uri,
                    resource_requirements: Some(pb::ResourceRequirements {
                        cpu_cores: 4,
                        memory_gb: 8,
                        storage_gb: 20,
                        nested_virt: false,
                        ami_requirements: vec![],
                    }),
                    license_affinity: vec![pb::LicenseType::Personal as i32],
                    node_count: 3,
                    port_template: Some(pb::PortTemplate {
                        ports: vec![port("serial_1"), port("vnc_1")],
                    }),
                    grading_rules_uri: grading_url.unwrap_or_default().into(),
                    max_duration: Some(prost_types::Duration {
                        seconds: 120 * 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .expect("definition created")
            .into_inner()
            .definition
            .expect("definition")
    }

    /// Books an ASAP instance of `def` for one hour.
    pub async fn book_asap(&self, def: &pb::LabletDefinition) -> pb::LabletInstance {
        let now = self.now();
        self.client
            .instances()
            .create_instance(pb::CreateInstanceRequest {
                definition_id: def.id.clone(),
                definition_version: def.version.clone(),
                time_slot: Some(pb::TimeSlot {
                    start: None,
                    end: Some(ts(now + chrono::Duration::hours(1))),
                    asap: true,
                }),
                owner_id: "student-1".into(),
                ..Default::default()
            })
            .await
            .expect("instance created")
            .into_inner()
            .instance
            .expect("instance")
    }

    pub async fn instance(&self, id: &str) -> pb::LabletInstance {
        self.client
            .instances()
            .get_instance(pb::GetInstanceRequest {
                instance_id: id.into(),
            })
            .await
            .expect("get instance")
            .into_inner()
            .instance
            .expect("instance")
    }

    pub async fn workers(&self) -> Vec<pb::CmlWorker> {
        self.client
            .workers()
            .list_workers(pb::ListWorkersRequest {
                page_size: 1000,
                include_terminated: true,
                ..Default::default()
            })
            .await
            .expect("list workers")
            .into_inner()
            .workers
    }

    pub async fn worker(&self, id: &str) -> pb::CmlWorker {
        self.client
            .workers()
            .get_worker(pb::GetWorkerRequest {
                worker_id: id.into(),
            })
            .await
            .expect("get worker")
            .into_inner()
            .worker
            .expect("worker")
    }

    pub async fn decisions(&self) -> Vec<pb::ScalingDecision> {
        self.api
            .clone()
            .list_scaling_decisions(pb::ListScalingDecisionsRequest::default())
            .await
            .expect("list decisions")
            .into_inner()
            .decisions
    }

    /// Waits until `check` returns `Some`, advancing nothing; panics with `what` after PATIENCE.
    pub async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A running worker: waits for one to be created and launched, lets the simulated EC2
    /// boot (moves the clock past the boot time) and waits until the controller reports it
    /// RUNNING.
    pub async fn wait_worker_running(&self) -> pb::CmlWorker {
        let id = self
            .until("a worker is launched", || async {
                self.workers()
                    .await
                    .into_iter()
                    .find(|w| w.state() == pb::WorkerState::Provisioning)
                    .map(|w| w.id)
            })
            .await;
        self.plane.clock.advance(chrono::Duration::seconds(6));
        self.until("the worker is RUNNING", || async {
            let w = self.worker(&id).await;
            (w.state() == pb::WorkerState::Running).then_some(w)
        })
        .await
    }

    /// Commits a placement as the scheduler would (its own leadership on the shared
    /// coordinator).
    pub async fn place(&self, instance_id: &str, worker_id: &str, ports: &[(&str, i32)]) {
        let leadership = self
            .coord()
            .campaign(
                "scheduler",
                "test-scheduler",
                ccm_coord::LeaseOptions::with_ttl(Duration::from_secs(30)),
            )
            .await
            .expect("scheduler leadership");
        let res = self
            .client
            .internal()
            .commit_placements(pb::CommitPlacementsRequest {
                fence: Some(ccm_runtime::client::fence(
                    "scheduler",
                    leadership.epoch(),
                    "test-scheduler",
                )),
                placements: vec![pb::Placement {
                    instance_id: instance_id.into(),
                    worker_id: worker_id.into(),
                    allocated_ports: ports.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
                    ..Default::default()
                }],
            })
            .await
            .expect("commit placements")
            .into_inner();
        assert_eq!(
            res.results[0].outcome(),
            pb::PlacementOutcome::Committed,
            "{:?}",
            res.results[0]
        );
        leadership.resign().await.expect("resign");
    }

    /// The simulator's view of the CML of EC2 instance `instance_id`.
    pub async fn sim_state(&self, aws_instance_id: &str) -> serde_json::Value {
        reqwest::get(format!("{}/_sim/state", self.sim.host_url(aws_instance_id)))
            .await
            .expect("sim state")
            .json()
            .await
            .expect("sim state JSON")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let mut tasks = self.tasks.into_iter();
        // The API server runs until dropped; the controller resigns on the shutdown token.
        if let Some(api) = tasks.next() {
            api.abort();
        }
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        self.sim.shutdown().await;
        self.plane.stop().await.expect("plane stops");
    }
}

pub fn spawn_run(
    controller: &Controller,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let c = controller.clone();
    let s = shutdown.clone();
    tokio::spawn(async move {
        c.run(s).await.expect("controller runs");
    })
}

pub async fn serve_api(
    controller: &Controller,
) -> (
    ControllerServiceClient<tonic::transport::Channel>,
    tokio::task::JoinHandle<()>,
) {
    let settings = ServerSettings {
        listen_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ServerSettings::default()
    };
    let mut set = ServiceSet::new(&settings);
    set.add(ccm_controller::service::server(controller.clone()))
        .expect("service added");
    let bound = Server::new(settings, set).bind().await.expect("bound");
    let addr = bound.local_addr();
    let task = tokio::spawn(async move {
        let _ = bound.run(std::future::pending::<()>()).await;
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connects");
    (ControllerServiceClient::new(channel), task)
}

pub fn port(name: &str) -> pb::PortDefinition {
    pb::PortDefinition {
        name: name.into(),
        protocol: pb::PortProtocol::Tcp as i32,
    }
}

pub fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}
