//! `ccm dev`: the whole system in one process on this machine.
//!
//! - the control plane on SQLite in the data directory, with in-process coordination;
//! - the scheduler and the controller, campaigning on that same in-process coordinator (so the
//!   control plane's fence checks see their epochs);
//! - a simulated cloud whose workers boot in seconds, and one CML simulator standing in for the
//!   CML of every worker (multi-host mode: `http://127.0.0.1:PORT/{instance_id}`);
//! - the gateway (HTTP/JSON, SSE, OpenAPI) serving the built web UI;
//! - demo worker templates, definitions and bookings, seeded on the first start.
//!
//! Everything listens on loopback only and runs WITHOUT authentication: every caller is an
//! admin. The banner says so.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ccm_artifacts::{DefaultFetcher, FetcherConfig};
use ccm_cloud::{SimulatedCloud, SimulatedConfig};
use ccm_cml::http::{CmlEndpoint, HttpCmlClientFactory};
use ccm_cml_sim::{CmlSim, SimOptions};
use ccm_control_plane::config::{ControlPlaneConfig, CoordinationBackend, LogFormat, StoreConfig};
use ccm_controller::{Controller, ControllerDeps, ControllerSettings};
use ccm_core::clock::{Clock, SystemClock};
use ccm_gateway::{Gateway, GatewaySettings};
use ccm_proto::v1 as pb;
use ccm_runtime::client::PlaneClient;
use ccm_runtime::server::{Server, ServerSettings, ServiceSet};
use ccm_scheduler::{Scheduler, SchedulerSettings};
use tokio_util::sync::CancellationToken;

use crate::cli::DevArgs;
use crate::error::CliError;

/// Demo worker templates (simulated workers that boot in seconds).
const DEMO_TEMPLATES: &str = include_str!("../../../../config/demo/worker-templates.yaml");
/// Demo definitions (proto3 JSON field names, as YAML; `lab_file` names a lab below).
const DEMO_DEFINITIONS: &str = include_str!("../../../../config/demo/definitions.yaml");
/// Demo labs, by file name.
const DEMO_LABS: &[(&str, &str)] = &[
    (
        "ospf-basics.yaml",
        include_str!("../../../../config/demo/labs/ospf-basics.yaml"),
    ),
    (
        "vlan-trunking.yaml",
        include_str!("../../../../config/demo/labs/vlan-trunking.yaml"),
    ),
    (
        "single-router.yaml",
        include_str!("../../../../config/demo/labs/single-router.yaml"),
    ),
];

/// Time a simulated worker takes from launch to running.
pub const DEV_BOOT_TIME: chrono::Duration = chrono::Duration::seconds(5);
/// How long `ccm dev` waits for the control plane to answer after starting it.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Demo bookings made on the first start: (definition name, start offset in minutes or `None`
/// for ASAP, duration in minutes).
pub const DEMO_BOOKINGS: &[(&str, Option<i64>, i64)] = &[
    ("ospf-basics", None, 60),
    ("vlan-trunking", None, 90),
    ("single-router", None, 30),
    ("ospf-basics", Some(90), 60),
    ("vlan-trunking", Some(180), 120),
];
/// Marker file in the data directory: the demo data was seeded.
pub const SEEDED_MARKER: &str = "demo-seeded";

/// Runs `ccm dev` until interrupted.
pub fn run(args: &DevArgs) -> Result<(), CliError> {
    crate::logging::init(&LogFormat::Text);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(dev(args, super::shutdown_signal()))
}

fn setup(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Failed(format!("ccm dev: {what}: {e}"))
}

/// The port `offset` above `base`, or 0 (any free port) when `base` is 0.
fn port_after(base: u16, offset: u16) -> u16 {
    if base == 0 {
        0
    } else {
        base.saturating_add(offset)
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Writes the demo files into `dir/demo` and returns that directory.
fn write_demo_files(dir: &Path) -> Result<PathBuf, CliError> {
    let demo = dir.join("demo");
    let labs = demo.join("labs");
    std::fs::create_dir_all(&labs).map_err(|e| setup("creating the data directory", e))?;
    std::fs::write(demo.join("worker-templates.yaml"), DEMO_TEMPLATES)
        .map_err(|e| setup("writing demo templates", e))?;
    for (name, text) in DEMO_LABS {
        std::fs::write(labs.join(name), text).map_err(|e| setup("writing demo labs", e))?;
    }
    Ok(demo)
}

async fn dev(
    args: &DevArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CliError> {
    let data_dir = std::path::absolute(&args.data_dir)
        .map_err(|e| setup("resolving the data directory", e))?;
    let demo = write_demo_files(&data_dir)?;
    let stop = CancellationToken::new();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    // 1. The control plane.
    let mut config = ControlPlaneConfig::default();
    config.listen_addr = loopback(args.grpc_port);
    config.data_dir = data_dir.clone();
    config.store = StoreConfig::Sqlite {
        path: data_dir.join(ccm_control_plane::config::DEFAULT_SQLITE_FILE),
    };
    config.coordination.backend = CoordinationBackend::InProcess;
    config.auth.insecure_no_auth = true;
    config.templates_seed_file = Some(demo.join("worker-templates.yaml"));
    // One process: the gateway's /metrics serves the process-wide registry.
    config.metrics_addr = None;
    let assembly = ccm_control_plane::run::assemble(&config)
        .await
        .map_err(|e| setup("control plane", e))?;
    let coordinator = assembly.app.coord.clone();
    let plane_server = ccm_control_plane::run::bind(&config, assembly)
        .await
        .map_err(|e| setup("control plane", e))?;
    let plane_addr = plane_server.local_addr();
    let plane_url = format!("http://{plane_addr}");
    let mut tasks = tokio::task::JoinSet::new();
    {
        let stop = stop.clone();
        tasks.spawn(async move {
            plane_server
                .run(async move { stop.cancelled().await })
                .await
                .map_err(|e| format!("control plane: {e}"))
        });
    }
    let plane = PlaneClient::connect(&plane_url, None)
        .await
        .map_err(|e| setup("control-plane client", e))?;
    wait_for_plane(&plane).await?;

    // 2. One CML simulator for every worker.
    let sim = CmlSim::start(SimOptions {
        listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        ..SimOptions::default()
    })
    .await
    .map_err(|e| setup("CML simulator", e))?;

    // 3. The scheduler.
    let scheduler_settings = SchedulerSettings {
        control_plane_url: plane_url.clone(),
        listen_addr: loopback(port_after(args.grpc_port, 1)),
        ..SchedulerSettings::default()
    };
    let scheduler = Scheduler::new(
        scheduler_settings.clone(),
        plane.clone(),
        coordinator.clone(),
        clock.clone(),
    )
    .map_err(|e| setup("scheduler", e))?;
    let scheduler_addr = serve_grpc(
        scheduler_settings.listen_addr,
        |set| {
            set.add(ccm_scheduler::service::server(scheduler.clone()))
                .map(|_| ())
        },
        &stop,
        &mut tasks,
        "scheduler",
    )
    .await?;
    {
        let scheduler = scheduler.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            scheduler
                .run(stop)
                .await
                .map_err(|e| format!("scheduler: {e}"))
        });
    }

    // 4. The controller, on the simulated cloud and the CML simulator.
    let controller_settings = ControllerSettings {
        cml_endpoint_template: format!("{}/{{instance_id}}", sim.base_url()),
        ..ControllerSettings::default()
    };
    let cloud = Arc::new(SimulatedCloud::new(
        clock.clone(),
        SimulatedConfig {
            boot_time: DEV_BOOT_TIME,
            ..SimulatedConfig::default()
        },
    ));
    let cml = Arc::new(
        HttpCmlClientFactory::new(CmlEndpoint::new(
            sim.base_url(),
            ccm_cml_sim::options::DEFAULT_USERNAME,
            ccm_cml_sim::options::DEFAULT_PASSWORD,
        ))
        .map_err(|e| setup("CML client", e))?,
    );
    let fetcher = Arc::new(
        DefaultFetcher::new(FetcherConfig::default()).map_err(|e| setup("artifact fetcher", e))?,
    );
    let controller = Controller::new(
        controller_settings,
        ControllerDeps {
            cloud,
            cml,
            coordinator: coordinator.clone(),
            plane: plane.clone(),
            clock: clock.clone(),
            fetcher,
        },
    )
    .map_err(|e| setup("controller", e))?;
    let controller_addr = serve_grpc(
        loopback(port_after(args.grpc_port, 2)),
        |set| {
            set.add(ccm_controller::service::server(controller.clone()))
                .map(|_| ())
        },
        &stop,
        &mut tasks,
        "controller",
    )
    .await?;
    {
        let controller = controller.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            controller
                .run(stop)
                .await
                .map_err(|e| format!("controller: {e}"))
        });
    }

    // 5. The gateway and the UI.
    let mut gateway_settings = GatewaySettings::insecure(plane_url.clone());
    gateway_settings.listen_addr = loopback(args.http_port);
    gateway_settings.scheduler_url = Some(format!("http://{scheduler_addr}"));
    gateway_settings.controller_url = Some(format!("http://{controller_addr}"));
    gateway_settings.ui_dir = args.ui_dir.clone();
    let gateway = Gateway::bind(gateway_settings)
        .await
        .map_err(|e| setup("gateway", e))?;
    let http_addr = gateway.local_addr();
    {
        let stop = stop.clone();
        tasks.spawn(async move {
            gateway
                .run(async move { stop.cancelled().await })
                .await
                .map_err(|e| format!("gateway: {e}"))
        });
    }

    // 6. Demo data, once.
    if !args.no_seed {
        seed_demo(&plane, &data_dir, &demo).await?;
    }

    print_banner(
        &data_dir,
        http_addr,
        plane_addr,
        scheduler_addr,
        controller_addr,
        &sim,
        &args.ui_dir,
    );

    tokio::select! {
        () = shutdown => {}
        Some(result) = tasks.join_next() => {
            // A component stopped on its own: stop the rest and report it.
            stop.cancel();
            let message = match result {
                Ok(Ok(())) => "a component stopped unexpectedly".to_owned(),
                Ok(Err(e)) => e,
                Err(e) => format!("a component panicked: {e}"),
            };
            while tasks.join_next().await.is_some() {}
            sim.shutdown().await;
            return Err(CliError::Failed(message));
        }
    }
    eprintln!("ccm dev: shutting down…");
    stop.cancel();
    let mut failure = None;
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(format!("a component panicked: {e}")),
        }
    }
    sim.shutdown().await;
    match failure {
        None => Ok(()),
        Some(e) => Err(CliError::Failed(e)),
    }
}

/// Binds a gRPC server for one service on `addr` and runs it until `stop`.
async fn serve_grpc(
    addr: SocketAddr,
    register: impl FnOnce(&mut ServiceSet) -> Result<(), ccm_runtime::RuntimeError>,
    stop: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<Result<(), String>>,
    name: &'static str,
) -> Result<SocketAddr, CliError> {
    let settings = ServerSettings {
        listen_addr: addr,
        shutdown_grace_period: Duration::from_secs(2),
        ..ServerSettings::default()
    };
    let mut set = ServiceSet::new(&settings);
    register(&mut set).map_err(|e| setup(name, e))?;
    let bound = Server::new(settings, set)
        .bind()
        .await
        .map_err(|e| setup(name, e))?;
    let local = bound.local_addr();
    let stop = stop.clone();
    tasks.spawn(async move {
        bound
            .run(async move { stop.cancelled().await })
            .await
            .map_err(|e| format!("{name}: {e}"))
    });
    Ok(local)
}

/// Waits until the control plane answers a list call.
async fn wait_for_plane(plane: &PlaneClient) -> Result<(), CliError> {
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    loop {
        let result = plane
            .templates()
            .list_templates(pb::ListTemplatesRequest::default())
            .await;
        match result {
            Ok(_) => return Ok(()),
            Err(status) if tokio::time::Instant::now() >= deadline => {
                return Err(setup("the control plane did not come up", status.message()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Creates the demo definitions and bookings unless they were created before.
async fn seed_demo(plane: &PlaneClient, data_dir: &Path, demo: &Path) -> Result<(), CliError> {
    let marker = data_dir.join(SEEDED_MARKER);
    if marker.exists() {
        return Ok(());
    }
    let definitions: Vec<serde_json::Value> = serde_yaml_ng::from_str(DEMO_DEFINITIONS)
        .map_err(|e| setup("reading the demo definitions", e))?;
    let pool = ccm_proto::descriptor_pool();
    let descriptor = pool
        .get_message_by_name("ccm.v1.LabletDefinition")
        .ok_or_else(|| setup("descriptors", "ccm.v1.LabletDefinition is missing"))?;
    let mut ids = std::collections::BTreeMap::new();
    for mut value in definitions {
        let lab_file = value
            .as_object_mut()
            .and_then(|o| o.remove("lab_file"))
            .and_then(|v| v.as_str().map(str::to_owned))
            .ok_or_else(|| setup("demo definitions", "every entry needs a lab_file"))?;
        let uri = format!("file://{}", demo.join("labs").join(&lab_file).display());
        if let Some(object) = value.as_object_mut() {
            object.insert("labArtifactUri".into(), serde_json::Value::String(uri));
        }
        let message = prost_reflect::DynamicMessage::deserialize(descriptor.clone(), value)
            .map_err(|e| setup("demo definitions", e))?;
        let definition: pb::LabletDefinition = message
            .transcode_to()
            .map_err(|e| setup("demo definitions", e))?;
        let name = definition.name.clone();
        let created = plane
            .definitions()
            .create_definition(pb::CreateDefinitionRequest {
                definition: Some(definition),
                request_id: format!("ccm-dev-seed-{name}"),
            })
            .await
            .map_err(|s| setup(&format!("creating demo definition {name}"), s.message()))?
            .into_inner();
        if let Some(d) = created.definition {
            ids.insert(name, d.id);
        }
    }
    let now = chrono::Utc::now();
    for (index, (name, start, minutes)) in DEMO_BOOKINGS.iter().enumerate() {
        let Some(id) = ids.get(*name) else { continue };
        let slot = match start {
            None => pb::TimeSlot {
                asap: true,
                end: Some(timestamp(now + chrono::Duration::minutes(*minutes))),
                ..pb::TimeSlot::default()
            },
            Some(offset) => {
                let begin = now + chrono::Duration::minutes(*offset);
                let end = begin + chrono::Duration::minutes(*minutes);
                pb::TimeSlot {
                    start: Some(timestamp(begin)),
                    end: Some(timestamp(end)),
                    ..pb::TimeSlot::default()
                }
            }
        };
        plane
            .instances()
            .create_instance(pb::CreateInstanceRequest {
                definition_id: id.clone(),
                time_slot: Some(slot),
                owner_id: format!("demo-student-{}", index + 1),
                reservation_id: format!("demo-{}", index + 1),
                request_id: format!("ccm-dev-seed-booking-{}", index + 1),
                ..pb::CreateInstanceRequest::default()
            })
            .await
            .map_err(|s| setup(&format!("creating demo booking of {name}"), s.message()))?;
    }
    std::fs::write(&marker, "the demo definitions and bookings were created\n")
        .map_err(|e| setup("writing the seed marker", e))?;
    Ok(())
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn print_banner(
    data_dir: &Path,
    http: SocketAddr,
    plane: SocketAddr,
    scheduler: SocketAddr,
    controller: SocketAddr,
    sim: &ccm_cml_sim::SimHandle,
    ui_dir: &Path,
) {
    let ui_note = if ui_dir.join("index.html").exists() {
        String::new()
    } else {
        format!(
            "\n                 (the UI is not built in {}: run `npm --prefix web ci && npm --prefix web run build`)",
            ui_dir.display()
        )
    };
    let lines = [
        String::new(),
        "=".repeat(78),
        " ccm dev is running — everything on this machine, for development only.".to_owned(),
        " !! NO AUTHENTICATION: every caller is an admin. Bound to loopback only. !!".to_owned(),
        "=".repeat(78),
        format!("  Web UI         http://{http}/{ui_note}"),
        format!(
            "  HTTP API       http://{http}/v1/…  (OpenAPI: /openapi.json, browsable: /api/docs)"
        ),
        format!("  Live events    http://{http}/v1/events:stream"),
        format!(
            "  gRPC           control plane {plane}, scheduler {scheduler}, controller {controller}"
        ),
        format!("                 (try: grpcurl -plaintext {plane} list)"),
        format!("  CML simulator  {}", sim.base_url()),
        format!("  Data           {}", data_dir.display()),
        "  Stop with Ctrl-C.".to_owned(),
        String::new(),
    ];
    eprintln!("{}", lines.join("\n"));
    // The first line on standard output is machine-readable, for scripts and tests.
    println!("ccm dev ready: http://{http}/");
}
