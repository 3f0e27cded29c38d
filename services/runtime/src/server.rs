//! The gRPC server every ccm service runs on: health, reflection, per-call middleware, an extra
//! layer slot for authentication, and graceful shutdown.
//!
//! # Registering services
//!
//! ```no_run
//! use ccm_runtime::error::RuntimeError;
//! use ccm_runtime::server::{Server, ServerSettings, ServiceSet};
//! use ccm_proto::v1::definition_service_server::{DefinitionService, DefinitionServiceServer};
//!
//! async fn run(
//!     definitions: impl DefinitionService,
//! ) -> Result<(), RuntimeError> {
//!     let settings = ServerSettings::default();
//!     let mut services = ServiceSet::new(&settings);
//!     services.add(DefinitionServiceServer::new(definitions))?;
//!     // services.add(InstanceServiceServer::new(instances))?;  — one line per service
//!
//!     let server = Server::new(settings, services) /* .with_layer(auth_layer) */
//!         .bind()
//!         .await?;
//!     server
//!         .run(async {
//!             let _ = tokio::signal::ctrl_c().await;
//!         })
//!         .await
//! }
//! ```
//!
//! [`ServiceSet::add`] applies the configured message size limit, registers the service's routes
//! and gives it a `grpc.health.v1.Health` entry under its full name (e.g.
//! `ccm.v1.DefinitionService`), `SERVING` once the server is bound. The overall entry (`""`) is
//! `SERVING` too. Reflection (v1 and v1alpha) advertises every registered service plus health
//! and reflection, and resolves every symbol of the ccm contracts and the `google.rpc` error
//! detail types (`google.rpc.BadRequest`, `ErrorInfo`, …), so `grpcurl` prints error details.
//!
//! # Metrics and tracing
//!
//! Every call is counted in the gRPC server metrics of [`Metrics::global`] (or the registry
//! given to [`Server::with_metrics`]) and traced in an `rpc` span that continues the caller's
//! W3C trace (see [`middleware`], [`crate::metrics`], [`crate::telemetry`]). Serving `/metrics`
//! is up to the service: [`crate::metrics::MetricsServer`].
//!
//! # The extra layer
//!
//! [`Server::with_layer`] takes any `tower::Layer` over [`BoxedGrpcService`] (the auth crate's
//! RBAC layer). It wraps the application services only: health and reflection are served without
//! it, so probes and `grpcurl list` work without a token. It runs inside the request-id, tracing,
//! deadline and concurrency middleware (see [`middleware`]), so it sees the `x-request-id` header
//! and the [`RequestId`] extension, and its rejections are logged with the call.
//!
//! # Shutdown
//!
//! When the shutdown future given to [`BoundServer::run`] completes:
//!
//! 1. health reports `NOT_SERVING` for `""` and every service (health `Watch` streams receive it
//!    and then end);
//! 2. the services' shutdown token ([`ServiceSet::shutdown_token`]) is cancelled — long-lived
//!    streams (EventService.WatchEvents) must end when it is;
//! 3. the listener is closed and every connection gets an HTTP/2 GOAWAY: no new calls, calls in
//!    flight continue;
//! 4. `run` returns once every connection has drained, or when the grace period
//!    ([`ServerSettings::shutdown_grace_period`]) runs out — then the remaining connections are
//!    closed by force and their calls fail.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

use crate::error::{BoxError, RuntimeError};
use crate::metrics::Metrics;

mod io;
pub mod middleware;

pub use middleware::{
    BoxedGrpcService, GrpcRequest, GrpcResponse, REQUEST_ID_HEADER, RequestId, current_request_id,
    current_trace_id, request_id,
};

/// How long `run` waits for connections to close after forcing them, before giving up on them.
pub const FORCE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Default gRPC listen address (the control plane's; other services set their own).
pub const DEFAULT_LISTEN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051);
/// Default time until a call's response starts.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of application calls whose handlers run at once.
pub const DEFAULT_CONCURRENCY_LIMIT: usize = 256;
/// Default largest gRPC message, both directions (8 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 8 * 1024 * 1024;
/// Default time in-flight calls get to finish once shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(30);

/// The server-side settings, taken from [`ControlPlaneConfig`] (or built directly in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Address to listen on (port 0 picks a free port; see [`BoundServer::local_addr`]).
    pub listen_addr: SocketAddr,
    /// Longest time until a call's response starts (a client's shorter `grpc-timeout` wins).
    pub request_timeout: Duration,
    /// Most application calls whose handlers run at once; more wait.
    pub concurrency_limit: usize,
    /// Largest request or response message, in bytes (both directions).
    pub max_message_size: usize,
    /// How long in-flight calls may take to finish after shutdown begins.
    pub shutdown_grace_period: Duration,
}

impl Default for ServerSettings {
    /// The configuration defaults.
    fn default() -> Self {
        ServerSettings {
            listen_addr: DEFAULT_LISTEN_ADDR,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            concurrency_limit: DEFAULT_CONCURRENCY_LIMIT,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            shutdown_grace_period: DEFAULT_SHUTDOWN_GRACE_PERIOD,
        }
    }
}

/// A tonic server type whose message size limits can be set: every generated ccm server
/// (`DefinitionServiceServer<T>`, …) implements it. A non-ccm service implements it in one line
/// with its own `max_decoding_message_size` / `max_encoding_message_size`.
pub trait MessageLimits: Sized {
    /// The service with `bytes` as its largest accepted and sent message.
    fn with_max_message_size(self, bytes: usize) -> Self;
}

macro_rules! ccm_message_limits {
    ($($module:ident :: $server:ident < $svc:ident >),+ $(,)?) => {$(
        impl<T: ccm_proto::v1::$module::$svc> MessageLimits for ccm_proto::v1::$module::$server<T> {
            fn with_max_message_size(self, bytes: usize) -> Self {
                self.max_decoding_message_size(bytes).max_encoding_message_size(bytes)
            }
        }
    )+};
}

ccm_message_limits!(
    definition_service_server::DefinitionServiceServer<DefinitionService>,
    instance_service_server::InstanceServiceServer<InstanceService>,
    worker_service_server::WorkerServiceServer<WorkerService>,
    template_service_server::TemplateServiceServer<TemplateService>,
    event_service_server::EventServiceServer<EventService>,
    internal_service_server::InternalServiceServer<InternalService>,
    scheduler_service_server::SchedulerServiceServer<SchedulerService>,
    controller_service_server::ControllerServiceServer<ControllerService>,
);

/// The application services a server runs. Adding one is one line: `set.add(XServer::new(x))?`.
pub struct ServiceSet {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    max_message_size: usize,
    shutdown: CancellationToken,
    health: HealthReporter,
}

impl std::fmt::Debug for ServiceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSet")
            .field("names", &self.names)
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

impl ServiceSet {
    /// An empty set whose services get `settings.max_message_size`.
    pub fn new(settings: &ServerSettings) -> Self {
        ServiceSet {
            routes: RoutesBuilder::default(),
            names: Vec::new(),
            max_message_size: settings.max_message_size,
            shutdown: CancellationToken::new(),
            health: HealthReporter::new(),
        }
    }

    /// Registers a service: its routes, its message size limit and its health entry. Fails if a
    /// service of the same name is already registered.
    pub fn add<S>(&mut self, service: S) -> Result<&mut Self, RuntimeError>
    where
        S: MessageLimits
            + Service<GrpcRequest, Response = GrpcResponse, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        if self.names.contains(&S::NAME) || middleware::is_public_path(&format!("/{}/", S::NAME)) {
            return Err(RuntimeError::DuplicateService(S::NAME.to_owned()));
        }
        self.routes
            .add_service(service.with_max_message_size(self.max_message_size));
        self.names.push(S::NAME);
        Ok(self)
    }

    /// Full names of the registered services, in registration order.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// Cancelled when the server starts shutting down: long-lived streams must end then. Take it
    /// before moving the set into [`Server::new`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The health reporter (a service can mark itself `NOT_SERVING`, e.g. while its store is
    /// down).
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }
}

type LayerFn = Box<dyn FnOnce(BoxedGrpcService) -> BoxedGrpcService + Send>;

/// A server being assembled: settings, services, the optional extra layer and the metrics
/// registry.
pub struct Server {
    settings: ServerSettings,
    services: ServiceSet,
    layer: Option<LayerFn>,
    metrics: Metrics,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("settings", &self.settings)
            .field("services", &self.services)
            .field("extra_layer", &self.layer.is_some())
            .finish()
    }
}

impl Server {
    /// A server for `services` with `settings`.
    pub fn new(settings: ServerSettings, services: ServiceSet) -> Self {
        Server {
            settings,
            services,
            layer: None,
            metrics: Metrics::global().clone(),
        }
    }

    /// Records the gRPC server metrics in `metrics` instead of [`Metrics::global`] (tests, or a
    /// process serving a registry of its own).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Wraps the application services in `layer` (authentication / authorisation). Health and
    /// reflection are not wrapped. Calling it again adds another layer inside the previous one.
    #[must_use]
    pub fn with_layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<BoxedGrpcService> + Send + 'static,
        L::Service: Service<GrpcRequest, Response = GrpcResponse> + Clone + Send + 'static,
        <L::Service as Service<GrpcRequest>>::Error: Into<BoxError>,
        <L::Service as Service<GrpcRequest>>::Future: Send + 'static,
    {
        let previous = self.layer.take();
        self.layer = Some(Box::new(move |inner: BoxedGrpcService| {
            let wrapped = BoxCloneService::new(layer.layer(inner).map_err(Into::into));
            match previous {
                Some(outer) => outer(wrapped),
                None => wrapped,
            }
        }));
        self
    }

    /// Binds the listen address and assembles the services; health entries become `SERVING`.
    pub async fn bind(self) -> Result<BoundServer, RuntimeError> {
        let Server {
            settings,
            services,
            layer,
            metrics,
        } = self;
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .map_err(|source| RuntimeError::Bind {
                addr: settings.listen_addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| RuntimeError::Bind {
            addr: settings.listen_addr,
            source,
        })?;

        let ServiceSet {
            routes,
            names,
            max_message_size: _,
            shutdown,
            health,
        } = services;

        // Health: the overall entry and one per service.
        health.set_service_status("", ServingStatus::Serving).await;
        for name in &names {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let health_server = HealthServer::new(HealthService::from_health_reporter(health.clone()));

        // Reflection, v1 and v1alpha, over the ccm contracts, the health protocol and the
        // google.rpc error details.
        let google_rpc = google_rpc_descriptors()?;
        let reflection_v1 = reflection_builder(&names, google_rpc.clone())
            .build_v1()
            .map_err(|e| RuntimeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection_builder(&names, google_rpc)
            .build_v1alpha()
            .map_err(|e| RuntimeError::Reflection(e.to_string()))?;

        let public_routes = Routes::builder()
            .add_service(health_server)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .clone()
            .routes()
            .prepare();
        let public = boxed_routes(public_routes);
        let mut app = boxed_routes(routes.routes().prepare());
        if let Some(layer) = layer {
            app = layer(app);
        }

        let grpc_metrics = middleware::GrpcMetrics::register(
            &metrics,
            names
                .iter()
                .map(|n| (*n).to_owned())
                .chain(PUBLIC_SERVICE_NAMES.iter().map(|n| (*n).to_owned())),
            known_methods(&names),
        )?;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let rpc = middleware::RpcService::new(
            app,
            public,
            middleware::MiddlewareSettings {
                request_timeout: settings.request_timeout,
                concurrency: Arc::new(Semaphore::new(settings.concurrency_limit.max(1))),
                in_flight: in_flight.clone(),
                metrics: grpc_metrics,
            },
        );

        tracing::info!(
            addr = %local_addr,
            services = ?names,
            "gRPC server bound"
        );
        Ok(BoundServer {
            listener,
            local_addr,
            settings,
            names,
            health,
            shutdown,
            in_flight,
            rpc,
        })
    }
}

/// Routes as a [`BoxedGrpcService`] (their error type is `Infallible`).
fn boxed_routes(routes: Routes) -> BoxedGrpcService {
    BoxCloneService::new(ServiceExt::<GrpcRequest>::map_err(
        routes,
        |never: std::convert::Infallible| -> BoxError { match never {} },
    ))
}

/// The service names reflection advertises besides the application's.
const HEALTH_SERVICE_NAME: &str = "grpc.health.v1.Health";
const REFLECTION_V1_NAME: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA_NAME: &str = "grpc.reflection.v1alpha.ServerReflection";
const PUBLIC_SERVICE_NAMES: &[&str] = &[
    HEALTH_SERVICE_NAME,
    REFLECTION_V1_NAME,
    REFLECTION_V1ALPHA_NAME,
];
/// Methods of the public services, by full path (the labels of their metrics).
const PUBLIC_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Full paths of every method the server answers: those of the registered ccm services (from
/// the contracts' descriptors) and of health and reflection.
fn known_methods(names: &[&'static str]) -> Vec<String> {
    let pool = ccm_proto::descriptor_pool();
    let mut out: Vec<String> = PUBLIC_METHODS.iter().map(|m| (*m).to_owned()).collect();
    for name in names {
        if let Some(service) = pool.get_service_by_name(name) {
            out.extend(
                service
                    .methods()
                    .map(|m| format!("/{}/{}", service.full_name(), m.name())),
            );
        }
    }
    out
}

/// The descriptors reflection serves: the ccm contracts, the health protocol and the
/// `google.rpc` error details (`google/rpc/error_details.proto`, `google/rpc/status.proto`:
/// `BadRequest`, `ErrorInfo`, `PreconditionFailure`, `RequestInfo`, `ResourceInfo`,
/// `RetryInfo`, …), so `grpcurl` decodes the details of every error.
fn reflection_builder(
    names: &[&'static str],
    google_rpc: prost_types::FileDescriptorSet,
) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ccm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_file_descriptor_set(google_rpc);
    for name in names.iter().copied().chain([
        HEALTH_SERVICE_NAME,
        REFLECTION_V1_NAME,
        REFLECTION_V1ALPHA_NAME,
    ]) {
        builder = builder.with_service_name(name);
    }
    builder
}

/// The `google.rpc` descriptors tonic-types ships, under their canonical file names
/// (`google/rpc/error_details.proto`, `google/rpc/status.proto`; tonic-types names them
/// without the directory), so clients that resolve imports by path find them.
fn google_rpc_descriptors() -> Result<prost_types::FileDescriptorSet, RuntimeError> {
    use prost::Message as _;
    let mut set = prost_types::FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .map_err(|e| RuntimeError::Reflection(format!("google.rpc descriptors: {e}")))?;
    let mut renamed = std::collections::HashMap::new();
    for file in &mut set.file {
        if file.package.as_deref() == Some("google.rpc")
            && let Some(name) = &file.name
            && !name.contains('/')
        {
            let canonical = format!("google/rpc/{name}");
            renamed.insert(name.clone(), canonical.clone());
            file.name = Some(canonical);
        }
    }
    for file in &mut set.file {
        for dependency in &mut file.dependency {
            if let Some(canonical) = renamed.get(dependency) {
                dependency.clone_from(canonical);
            }
        }
    }
    Ok(set)
}

/// A bound server, ready to [`run`](BoundServer::run).
pub struct BoundServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    settings: ServerSettings,
    names: Vec<&'static str>,
    health: HealthReporter,
    shutdown: CancellationToken,
    in_flight: Arc<AtomicUsize>,
    rpc: middleware::RpcService,
}

impl std::fmt::Debug for BoundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundServer")
            .field("local_addr", &self.local_addr)
            .field("services", &self.names)
            .finish_non_exhaustive()
    }
}

impl BoundServer {
    /// The address actually bound (the real port when the settings said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The health reporter.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Calls currently in flight (started, response not finished).
    pub fn in_flight(&self) -> Arc<AtomicUsize> {
        self.in_flight.clone()
    }

    /// Serves until `shutdown` completes, then shuts down gracefully (see the module docs).
    pub async fn run<F>(self, shutdown: F) -> Result<(), RuntimeError>
    where
        F: Future<Output = ()>,
    {
        let BoundServer {
            listener,
            local_addr,
            settings,
            names,
            health,
            shutdown: services_shutdown,
            in_flight,
            rpc,
        } = self;

        let force_close = CancellationToken::new();
        let incoming = {
            let force_close = force_close.clone();
            TcpListenerStream::new(listener).map(move |accepted| {
                accepted.map(|stream| {
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!(error = %err, "cannot set TCP_NODELAY");
                    }
                    io::GuardedIo::new(stream, &force_close)
                })
            })
        };

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
            rpc,
            incoming,
            async {
                let _ = stop_rx.await;
            },
        );
        tokio::pin!(server);
        tokio::pin!(shutdown);

        tracing::info!(addr = %local_addr, "gRPC server serving");
        tokio::select! {
            result = &mut server => {
                return result.map_err(RuntimeError::Serve);
            }
            () = &mut shutdown => {}
        }

        let grace = settings.shutdown_grace_period;
        tracing::info!(
            addr = %local_addr,
            in_flight = in_flight.load(Ordering::SeqCst),
            grace_ms = grace.as_millis() as u64,
            "shutting down: health NOT_SERVING, draining in-flight calls"
        );
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for name in &names {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        services_shutdown.cancel();
        let _ = stop_tx.send(());
        // Health watchers have been told NOT_SERVING; dropping the entries ends their streams
        // so they do not hold the drain open.
        let mut clearing = health.clone();
        clearing.clear_service_status("").await;
        for name in &names {
            clearing.clear_service_status(name).await;
        }

        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => {
                tracing::info!(addr = %local_addr, "gRPC server stopped");
                result.map_err(RuntimeError::Serve)
            }
            Err(_) => {
                tracing::warn!(
                    addr = %local_addr,
                    in_flight = in_flight.load(Ordering::SeqCst),
                    "shutdown grace period elapsed; closing the remaining connections"
                );
                force_close.cancel();
                match tokio::time::timeout(FORCE_CLOSE_TIMEOUT, &mut server).await {
                    Ok(result) => result.map_err(RuntimeError::Serve),
                    Err(_) => {
                        tracing::error!(
                            addr = %local_addr,
                            "connections did not close after being forced; abandoning them"
                        );
                        Ok(())
                    }
                }
            }
        }
    }
}
