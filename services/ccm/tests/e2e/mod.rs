//! The end-to-end world: real `ccm` processes (one control plane, two schedulers, two
//! controllers) on a real etcd, the moto EC2 emulator and a multi-host CML simulator in the test
//! process. Every process writes its output to a file in the test's temporary directory; every
//! wait is bounded and its failure message carries the tail of every process's output.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ccm_cloud::{AwsCredentials, AwsSettings, Ec2Provider};
use ccm_cml_sim::{CmlSim, HostSnapshot, SimHandle, SimOptions};
use ccm_proto::v1 as pb;
use ccm_proto::v1::controller_service_client::ControllerServiceClient;
use ccm_proto::v1::scheduler_service_client::SchedulerServiceClient;
use ccm_runtime::client::PlaneClient;
use ccm_testkit::etcd::EtcdServer;
use ccm_testkit::moto::{MotoServer, TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY};
use ccm_testkit::ports::{free_port, wait_for_port};

/// Name of the worker template in `templates.yaml`.
pub const TEMPLATE: &str = "e2e-small";
/// Name of the AMI registered on moto; matches the template's `ami_pattern` (`cml-e2e-2.9.*`).
pub const AMI_NAME: &str = "cml-e2e-2.9.0";
/// First and last port of the template's range.
pub const PORT_RANGE: (i32, i32) = (4000, 4099);
/// Lease TTL of the scheduler and controller leaderships, seconds.
pub const LEASE_TTL_SECS: u64 = 2;
/// The etcd key prefix every process shares.
pub const ETCD_PREFIX: &str = "/ccm-e2e";
/// Bound on waiting for a process to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on waiting for the system to do something (scale up, place, instantiate, …).
pub const PATIENCE: Duration = Duration::from_secs(90);
/// Lines of each process's output shown when a wait fails.
pub const TAIL_LINES: usize = 30;

/// One test at a time: each world runs seven processes on a 2-core machine.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// A `ccm` process, killed (and reaped) on drop.
pub struct Proc {
    /// Short name for messages, e.g. `scheduler-1`.
    pub name: String,
    /// Its gRPC port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, dir: &Path, port: u16, args: &[String], env: &[(&str, &str)]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("process log file");
        let err = out.try_clone().expect("log handle");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ccm"));
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: ccm does not start: {e}"));
        Proc {
            name: name.to_owned(),
            port,
            child: Some(child),
            log,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last [`TAIL_LINES`] lines of its output.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILL and reap: a crash, no resignation.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if wait_for_port(self.port, Duration::from_millis(200)) {
                return;
            }
            assert!(
                self.is_running(),
                "{} exited during start-up\n--- {} ---\n{}",
                self.name,
                self.log.display(),
                self.tail()
            );
        }
        panic!(
            "{} did not listen on {} within {START_TIMEOUT:?}\n--- {} ---\n{}",
            self.name,
            self.port,
            self.log.display(),
            self.tail()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// How a world is started.
#[derive(Default)]
pub struct WorldOptions {
    /// Options of the CML simulator (its `faults` apply to every simulated CML from the start).
    pub sim: SimOptions,
}

/// Everything an end-to-end test runs against. Processes are declared first, so they are
/// killed before the servers they talk to.
pub struct World {
    pub plane: Proc,
    pub schedulers: Vec<Proc>,
    pub controllers: Vec<Proc>,
    pub client: PlaneClient,
    pub ec2: Ec2Provider,
    pub sim: SimHandle,
    pub moto: MotoServer,
    pub etcd: EtcdServer,
    pub dir: PathBuf,
}

impl World {
    /// Starts etcd, moto (with the AMI registered), the simulator and the five processes, and
    /// waits until each listens.
    pub async fn start(options: WorldOptions) -> World {
        let dir = std::env::temp_dir().join(format!(
            "ccm-e2e-{}-{}",
            std::process::id(),
            free_port().expect("a free port")
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let etcd = EtcdServer::start().expect("etcd starts");
        let moto = MotoServer::start().expect("moto starts");
        let ec2 = Ec2Provider::new(AwsSettings {
            endpoint_url: Some(moto.endpoint().to_owned()),
            credentials: AwsCredentials::Static {
                access_key_id: TEST_ACCESS_KEY_ID.to_owned(),
                secret_access_key: TEST_SECRET_ACCESS_KEY.to_owned(),
                session_token: None,
            },
            ..AwsSettings::new(TEST_REGION)
        })
        .await
        .expect("EC2 client");
        register_image(&ec2, AMI_NAME).await;
        let sim = CmlSim::start(options.sim)
            .await
            .expect("CML simulator starts");

        let seed = dir.join("templates.yaml");
        std::fs::write(&seed, include_str!("templates.yaml")).expect("templates seed");
        let plane_port = free_port().expect("port");
        let mut plane = Proc::spawn(
            "control-plane",
            &dir,
            plane_port,
            &args(&[
                "serve",
                "control-plane",
                "--insecure-no-auth",
                "--listen-addr",
                &format!("127.0.0.1:{plane_port}"),
                "--data-dir",
                &dir.join("plane").display().to_string(),
                "--templates-seed-file",
                &seed.display().to_string(),
                "--coordination-backend",
                "etcd",
                "--coordination-etcd-endpoints",
                &etcd.endpoint(),
                "--coordination-etcd-prefix",
                ETCD_PREFIX,
                "--coordination-lease-ttl",
                &format!("{LEASE_TTL_SECS}s"),
                "--metrics-addr",
                "none",
                "--shutdown-grace-period",
                "1s",
            ]),
            &[],
        );
        plane.wait_listening();
        let plane_url = plane.url();

        let mut schedulers = Vec::new();
        for n in 1..=2 {
            let port = free_port().expect("port");
            let name = format!("scheduler-{n}");
            schedulers.push(Proc::spawn(
                &name,
                &dir,
                port,
                &args(&[
                    "serve",
                    "scheduler",
                    "--insecure-no-auth",
                    "--control-plane-url",
                    &plane_url,
                    "--listen-addr",
                    &format!("127.0.0.1:{port}"),
                    "--replica-id",
                    &name,
                    "--coordination-etcd-endpoints",
                    &etcd.endpoint(),
                    "--coordination-etcd-prefix",
                    ETCD_PREFIX,
                    "--coordination-lease-ttl",
                    &format!("{LEASE_TTL_SECS}s"),
                    "--cycle-interval",
                    "1s",
                    "--relist-interval",
                    "5s",
                ]),
                &[],
            ));
        }
        let cml_template = format!("{}/{{instance_id}}", sim.base_url());
        let mut controllers = Vec::new();
        for n in 1..=2 {
            let port = free_port().expect("port");
            let name = format!("controller-{n}");
            controllers.push(Proc::spawn(
                &name,
                &dir,
                port,
                &args(&[
                    "serve",
                    "controller",
                    "--insecure-no-auth",
                    "--control-plane-url",
                    &plane_url,
                    "--listen-addr",
                    &format!("127.0.0.1:{port}"),
                    "--replica-id",
                    &name,
                    "--etcd-endpoints",
                    &etcd.endpoint(),
                    "--etcd-prefix",
                    ETCD_PREFIX,
                    "--lease-ttl-seconds",
                    &LEASE_TTL_SECS.to_string(),
                    "--cloud",
                    "aws",
                    "--aws-region",
                    TEST_REGION,
                    "--aws-endpoint-url",
                    moto.endpoint(),
                    "--cml-endpoint-template",
                    &cml_template,
                    "--instances-interval-seconds",
                    "1",
                    "--workers-interval-seconds",
                    "1",
                    "--autoscaler-interval-seconds",
                    "1",
                    "--worker-poll-interval-seconds",
                    "1",
                ]),
                &[
                    ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID),
                    ("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY),
                    ("AWS_EC2_METADATA_DISABLED", "true"),
                ],
            ));
        }
        for p in schedulers.iter_mut().chain(controllers.iter_mut()) {
            p.wait_listening();
        }
        let client = PlaneClient::connect(&plane_url, None)
            .await
            .expect("plane client");
        World {
            plane,
            schedulers,
            controllers,
            client,
            ec2,
            sim,
            moto,
            etcd,
            dir,
        }
    }

    /// The tail of every process's output (for failure messages).
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for p in std::iter::once(&self.plane)
            .chain(&self.schedulers)
            .chain(&self.controllers)
        {
            out.push_str(&format!(
                "\n--- {} ({}) ---\n{}\n",
                p.name,
                p.log.display(),
                p.tail()
            ));
        }
        out
    }

    /// Waits until `check` returns `Some`, at most `timeout`; panics naming `what`, with the
    /// processes' output.
    pub async fn until_within<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "gave up after {timeout:?} waiting for: {what}{}",
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`World::until_within`] with [`PATIENCE`].
    pub async fn until<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        self.until_within(what, PATIENCE, check).await
    }

    /// Creates a definition whose artifact is `lab.yaml` written into the temp dir (ports
    /// `serial_1` and `vnc_1`).
    pub async fn create_definition(&self, name: &str) -> pb::LabletDefinition {
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, include_str!("lab.yaml")).expect("lab written");
        self.client
            .definitions()
            .create_definition(pb::CreateDefinitionRequest {
                definition: Some(pb::LabletDefinition {
                    name: name.into(),
                    description: "e2e".into(),
                    lab_artifact_uri: format!("file://{}", path.display()),
                    resource_requirements: Some(pb::ResourceRequirements {
                        cpu_cores: 4,
                        memory_gb: 8,
                        storage_gb: 20,
                        nested_virt: false,
                        ami_requirements: vec![],
                    }),
                    license_affinity: vec![pb::LicenseType::Personal as i32],
                    node_count: 2,
                    port_template: Some(pb::PortTemplate {
                        ports: vec![port_def("serial_1"), port_def("vnc_1")],
                    }),
                    max_duration: Some(prost_types::Duration {
                        seconds: 120 * 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("definition created: {e:?}{}", self.diagnostics()))
            .into_inner()
            .definition
            .expect("definition")
    }

    /// Books an ASAP instance of `def` for one hour.
    pub async fn book_asap(&self, def: &pb::LabletDefinition, owner: &str) -> pb::LabletInstance {
        let end = chrono::Utc::now() + chrono::Duration::hours(1);
        self.client
            .instances()
            .create_instance(pb::CreateInstanceRequest {
                definition_id: def.id.clone(),
                definition_version: def.version.clone(),
                time_slot: Some(pb::TimeSlot {
                    start: None,
                    end: Some(prost_types::Timestamp {
                        seconds: end.timestamp(),
                        nanos: 0,
                    }),
                    asap: true,
                }),
                owner_id: owner.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("instance created: {e:?}{}", self.diagnostics()))
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
            .unwrap_or_else(|e| panic!("GetInstance {id}: {e:?}{}", self.diagnostics()))
            .into_inner()
            .instance
            .expect("instance")
    }

    /// Waits until instance `id` is in `state`; panics early if it ends TERMINATED instead.
    pub async fn wait_state(&self, id: &str, state: pb::InstanceState) -> pb::LabletInstance {
        self.until(
            &format!("instance {id} {}", state.as_str_name()),
            || async {
                let i = self.instance(id).await;
                if i.state() == pb::InstanceState::Terminated
                    && state != pb::InstanceState::Terminated
                {
                    panic!(
                        "instance {id} ended TERMINATED ({}) while waiting for {}: {:?}{}",
                        i.termination_reason,
                        state.as_str_name(),
                        i.state_history,
                        self.diagnostics()
                    );
                }
                (i.state() == state).then_some(i)
            },
        )
        .await
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
            .unwrap_or_else(|e| panic!("ListWorkers: {e:?}{}", self.diagnostics()))
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
            .unwrap_or_else(|e| panic!("GetWorker {id}: {e:?}{}", self.diagnostics()))
            .into_inner()
            .worker
            .expect("worker")
    }

    pub async fn capacity(&self, worker_id: &str) -> pb::GetWorkerCapacityResponse {
        self.client
            .workers()
            .get_worker_capacity(pb::GetWorkerCapacityRequest {
                worker_id: worker_id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("GetWorkerCapacity: {e:?}{}", self.diagnostics()))
            .into_inner()
    }

    /// Waits for a worker in RUNNING and returns it.
    pub async fn wait_worker_running(&self) -> pb::CmlWorker {
        self.until("a RUNNING worker", || async {
            self.workers()
                .await
                .into_iter()
                .find(|w| w.state() == pb::WorkerState::Running)
        })
        .await
    }

    /// The EC2 instances moto holds with the `ccm:managed` tag: (instance id, tags).
    pub async fn managed_ec2_instances(&self) -> Vec<(String, BTreeMap<String, String>)> {
        let out = self
            .ec2
            .client()
            .describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag-key")
                    .values(ccm_cloud::provider::TAG_MANAGED)
                    .build(),
            )
            .send()
            .await
            .expect("DescribeInstances on moto");
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                let tags = i
                    .tags()
                    .iter()
                    .map(|t| {
                        (
                            t.key().unwrap_or_default().to_owned(),
                            t.value().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect();
                (i.instance_id().unwrap_or_default().to_owned(), tags)
            })
            .collect()
    }

    /// The simulator's view of the CML of EC2 instance `aws_id`.
    pub fn sim_state(&self, aws_id: &str) -> HostSnapshot {
        self.sim.state(aws_id).expect("simulated host")
    }

    /// GetSchedulerStatus of scheduler replica `n` (`None` if it does not answer).
    pub async fn scheduler_status(&self, n: usize) -> Option<pb::GetSchedulerStatusResponse> {
        let channel = tonic::transport::Endpoint::from_shared(self.schedulers[n].url())
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
            .ok()?;
        SchedulerServiceClient::new(channel)
            .get_scheduler_status(pb::GetSchedulerStatusRequest::default())
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    /// GetControllerStatus of controller replica `n` (`None` if it does not answer).
    pub async fn controller_status(&self, n: usize) -> Option<pb::GetControllerStatusResponse> {
        let channel = tonic::transport::Endpoint::from_shared(self.controllers[n].url())
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
            .ok()?;
        ControllerServiceClient::new(channel)
            .get_controller_status(pb::GetControllerStatusRequest::default())
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    /// Ingests a CloudEvent from the assessment platform (JSON data as text).
    pub async fn ingest(
        &self,
        id: &str,
        event_type: &str,
        data: serde_json::Value,
    ) -> pb::IngestEventResponse {
        self.client
            .events()
            .ingest_event(pb::IngestEventRequest {
                event: Some(pb::CloudEvent {
                    id: id.into(),
                    source: "assessment/e2e".into(),
                    specversion: "1.0".into(),
                    r#type: event_type.into(),
                    datacontenttype: "application/json".into(),
                    data: Some(pb::cloud_event::Data::TextData(data.to_string())),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_or_else(|e| panic!("IngestEvent {event_type}: {e:?}{}", self.diagnostics()))
            .into_inner()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Processes are killed by their own Drop; keep the directory when the test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

pub fn port_def(name: &str) -> pb::PortDefinition {
    pb::PortDefinition {
        name: name.into(),
        protocol: pb::PortProtocol::Tcp as i32,
    }
}

async fn register_image(ec2: &Ec2Provider, name: &str) -> String {
    use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice};
    ec2.client()
        .register_image()
        .name(name)
        .description("CML e2e image")
        .root_device_name("/dev/sda1")
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name("/dev/sda1")
                .ebs(EbsBlockDevice::builder().volume_size(8).build())
                .build(),
        )
        .send()
        .await
        .expect("RegisterImage on moto")
        .image_id()
        .expect("image id")
        .to_owned()
}
