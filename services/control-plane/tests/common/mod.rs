//! Shared test support: a small DefinitionService whose handlers sleep, fail or echo on
//! request, and a real server on a free loopback port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ccm_control_plane::error::ApiError;
use ccm_control_plane::server::{self, Server, ServerSettings, ServiceSet};
use ccm_proto::v1 as pb;
use ccm_proto::v1::definition_service_server::{DefinitionService, DefinitionServiceServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Counters a [`TestDefinitions`] keeps.
#[derive(Debug, Default)]
pub struct Counters {
    /// Handlers running now.
    pub running: AtomicUsize,
    /// Most handlers that ever ran at once.
    pub max_running: AtomicUsize,
    /// Handlers that ran to completion.
    pub completed: AtomicUsize,
    /// Handlers started.
    pub started: AtomicUsize,
}

/// One value of every `CoreError` variant, by name. The `match` in `variant_name` has no
/// wildcard, so a new variant breaks the build here until it is covered.
pub fn core_errors() -> Vec<(&'static str, ccm_core::CoreError)> {
    use ccm_core::CoreError;
    use ccm_core::model::{InstanceState, WorkerState};
    let all = vec![
        CoreError::InvalidInstanceTransition {
            from: InstanceState::Terminated,
            to: InstanceState::Running,
            why: "TERMINATED is terminal".into(),
        },
        CoreError::InvalidWorkerTransition {
            from: WorkerState::Stopped,
            to: WorkerState::Draining,
            why: "only RUNNING workers drain".into(),
        },
        CoreError::PortsExhausted {
            range_start: 2000,
            range_end: 2009,
            requested: 12,
            free: 10,
        },
        CoreError::InvalidPortRange {
            start: 9000,
            end: 100,
            why: "end before start".into(),
        },
        CoreError::InvalidLabYaml("line 3 column 1: mapping values are not allowed".into()),
        CoreError::UnknownPlaceholder {
            placeholder: "${PORT_SERIAL_9}".into(),
            location: "nodes[1].tags[0]".into(),
        },
        CoreError::PortWithoutPlaceholder {
            port_name: "vnc_1".into(),
        },
        CoreError::PortNotAllocated {
            port_name: "serial_1".into(),
        },
        CoreError::InvalidVersion {
            input: "v1.2".into(),
            why: "a leading 'v' is not accepted".into(),
        },
        CoreError::Invalid {
            field: "resource_requirements.cpu_cores".into(),
            message: "must be at least 1".into(),
        },
    ];
    all.into_iter().map(|e| (variant_name(&e), e)).collect()
}

fn variant_name(e: &ccm_core::CoreError) -> &'static str {
    use ccm_core::CoreError;
    match e {
        CoreError::InvalidInstanceTransition { .. } => "InvalidInstanceTransition",
        CoreError::InvalidWorkerTransition { .. } => "InvalidWorkerTransition",
        CoreError::PortsExhausted { .. } => "PortsExhausted",
        CoreError::InvalidPortRange { .. } => "InvalidPortRange",
        CoreError::InvalidLabYaml(_) => "InvalidLabYaml",
        CoreError::UnknownPlaceholder { .. } => "UnknownPlaceholder",
        CoreError::PortWithoutPlaceholder { .. } => "PortWithoutPlaceholder",
        CoreError::PortNotAllocated { .. } => "PortNotAllocated",
        CoreError::InvalidVersion { .. } => "InvalidVersion",
        CoreError::Invalid { .. } => "Invalid",
    }
}

/// The errors `get_definition("error:<kind>")` returns (`error:core:<Variant>` for the
/// `CoreError` of [`core_errors`]).
pub fn error_for(kind: &str) -> ApiError {
    if let Some(variant) = kind.strip_prefix("core:") {
        return match core_errors().into_iter().find(|(name, _)| *name == variant) {
            Some((_, e)) => e.into(),
            None => ApiError::internal_msg(format!("no CoreError variant {variant}")),
        };
    }
    match kind {
        "invalid" => ApiError::invalid_arguments(vec![
            ccm_control_plane::error::FieldViolation::new("definition.name", "must not be empty"),
            ccm_control_plane::error::FieldViolation::new(
                "definition.resource_requirements.cpu_cores",
                "must be at least 1, got 0",
            ),
        ]),
        "not_found" => ApiError::not_found("instance", "i-123"),
        "already_exists" => ApiError::already_exists("template", "metal-personal"),
        "stale" => ApiError::stale_version("worker", "w-1", 3, 5),
        "transition" => ccm_core::CoreError::InvalidInstanceTransition {
            from: ccm_core::model::InstanceState::Running,
            to: ccm_core::model::InstanceState::Pending,
            why: "not an edge of the state machine".into(),
        }
        .into(),
        "fence" => ApiError::stale_fence("scheduler", 4, 7),
        "ports" => ccm_core::CoreError::PortsExhausted {
            range_start: 2000,
            range_end: 2001,
            requested: 3,
            free: 2,
        }
        .into(),
        "denied" => ApiError::permission_denied("requires one of roles: admin"),
        "unauthenticated" => ApiError::unauthenticated(
            "token expired",
            Some(r#"Bearer error="invalid_token", error_description="expired""#.into()),
        ),
        "not_leader" => ApiError::not_leader(
            "scheduler",
            Some("replica-b".into()),
            Some(Duration::from_millis(1500)),
        ),
        "internal" => ApiError::internal(
            "reading the store",
            std::io::Error::other("disk on fire: /var/lib/ccm/secret-path"),
        ),
        other => ApiError::internal_msg(format!("unknown test error kind {other}")),
    }
}

/// A DefinitionService for tests. `get_definition` interprets `definition_id`:
///
/// * `sleep:<ms>` — sleeps, counting concurrency, then answers;
/// * `error:<kind>` — fails with [`error_for`];
/// * `request-id` — answers with the request id (extension and metadata) in `name` /
///   `description`;
/// * anything else — answers with the id.
///
/// `validate_definition` answers with the lab YAML's length in `detected_node_count`.
#[derive(Debug, Default, Clone)]
pub struct TestDefinitions {
    pub counters: Arc<Counters>,
}

fn definition(id: &str) -> pb::LabletDefinition {
    pb::LabletDefinition {
        id: id.to_owned(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl DefinitionService for TestDefinitions {
    async fn create_definition(
        &self,
        _request: Request<pb::CreateDefinitionRequest>,
    ) -> Result<Response<pb::CreateDefinitionResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn get_definition(
        &self,
        request: Request<pb::GetDefinitionRequest>,
    ) -> Result<Response<pb::GetDefinitionResponse>, Status> {
        let id = request.get_ref().definition_id.clone();
        if let Some(ms) = id.strip_prefix("sleep:") {
            let ms: u64 = ms.parse().map_err(|_| Status::invalid_argument("ms"))?;
            let c = &self.counters;
            c.started.fetch_add(1, Ordering::SeqCst);
            let now = c.running.fetch_add(1, Ordering::SeqCst) + 1;
            c.max_running.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            c.running.fetch_sub(1, Ordering::SeqCst);
            c.completed.fetch_add(1, Ordering::SeqCst);
            return Ok(Response::new(pb::GetDefinitionResponse {
                definition: Some(definition("slept")),
            }));
        }
        if let Some(kind) = id.strip_prefix("error:") {
            return Err(error_for(kind).into());
        }
        if id == "request-id" {
            let from_extension = server::request_id(&request).unwrap_or_default().to_owned();
            let from_metadata = request
                .metadata()
                .get(server::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            return Ok(Response::new(pb::GetDefinitionResponse {
                definition: Some(pb::LabletDefinition {
                    id,
                    name: from_extension,
                    description: from_metadata,
                    ..Default::default()
                }),
            }));
        }
        Ok(Response::new(pb::GetDefinitionResponse {
            definition: Some(definition(&id)),
        }))
    }

    async fn list_definitions(
        &self,
        _request: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn list_definition_versions(
        &self,
        _request: Request<pb::ListDefinitionVersionsRequest>,
    ) -> Result<Response<pb::ListDefinitionVersionsResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn sync_definition(
        &self,
        _request: Request<pb::SyncDefinitionRequest>,
    ) -> Result<Response<pb::SyncDefinitionResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn deprecate_definition(
        &self,
        _request: Request<pb::DeprecateDefinitionRequest>,
    ) -> Result<Response<pb::DeprecateDefinitionResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn delete_definition(
        &self,
        _request: Request<pb::DeleteDefinitionRequest>,
    ) -> Result<Response<pb::DeleteDefinitionResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn validate_definition(
        &self,
        request: Request<pb::ValidateDefinitionRequest>,
    ) -> Result<Response<pb::ValidateDefinitionResponse>, Status> {
        let len = match &request.get_ref().source {
            Some(pb::validate_definition_request::Source::LabYaml(yaml)) => yaml.len(),
            _ => 0,
        };
        Ok(Response::new(pb::ValidateDefinitionResponse {
            detected_node_count: i32::try_from(len).unwrap_or(i32::MAX),
            ..Default::default()
        }))
    }
}

/// Settings for tests: loopback, port 0, short timeouts.
pub fn test_settings() -> ServerSettings {
    ServerSettings {
        listen_addr: "127.0.0.1:0".parse().expect("literal address"),
        request_timeout: Duration::from_secs(5),
        concurrency_limit: 64,
        max_message_size: 1024 * 1024,
        shutdown_grace_period: Duration::from_secs(5),
    }
}

/// A running test server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    pub health: tonic_health::server::HealthReporter,
    shutdown: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<Result<(), ccm_runtime::RuntimeError>>,
}

impl TestServer {
    /// Starts a server with a [`TestDefinitions`] registered; `customize` may change the server
    /// (e.g. add a layer).
    pub async fn start_with(
        settings: ServerSettings,
        customize: impl FnOnce(Server) -> Server,
    ) -> Self {
        let defs = TestDefinitions::default();
        let counters = defs.counters.clone();
        let mut services = ServiceSet::new(&settings);
        services
            .add(DefinitionServiceServer::new(defs))
            .expect("first registration");
        let bound = customize(Server::new(settings, services))
            .bind()
            .await
            .expect("bind 127.0.0.1:0");
        let addr = bound.local_addr();
        let health = bound.health();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(bound.run(async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            counters,
            health,
            shutdown: Some(tx),
            handle,
        }
    }

    /// Starts a server with default test settings.
    pub async fn start() -> Self {
        Self::start_with(test_settings(), |s| s).await
    }

    /// Begins the graceful shutdown.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down and waits for `run` to return (at most 20 s).
    pub async fn stop(mut self) -> Result<(), ccm_runtime::RuntimeError> {
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(20), &mut self.handle)
            .await
            .expect("server stops within 20 s")
            .expect("server task did not panic")
    }

    /// A new connection to the server.
    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }
}

/// Connects to `addr` over plaintext HTTP/2.
pub async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the test server")
}

/// A `GetDefinition` request for `id`.
pub fn get(id: &str) -> pb::GetDefinitionRequest {
    pb::GetDefinitionRequest {
        definition_id: id.to_owned(),
        ..Default::default()
    }
}
