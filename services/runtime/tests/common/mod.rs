//! Shared test support: a small SchedulerService that records the ids it runs under (and can
//! relay the call to another server through a `PlaneClient`), and a real server on a free
//! loopback port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ccm_proto::v1 as pb;
use ccm_proto::v1::scheduler_service_client::SchedulerServiceClient;
use ccm_proto::v1::scheduler_service_server::{SchedulerService, SchedulerServiceServer};
use ccm_runtime::client::PlaneClient;
use ccm_runtime::metrics::Metrics;
use ccm_runtime::server::{Server, ServerSettings, ServiceSet, current_request_id};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// What a handler saw: (request id, trace id) of the call it ran in.
pub type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// GetSchedulerStatus answers with the call's trace id in `score_policy` (after asking the
/// downstream server the same, when there is one; metadata `hold` makes it wait for `gate`);
/// Plan always fails with INVALID_ARGUMENT.
#[derive(Clone)]
pub struct Probe {
    pub seen: Seen,
    pub downstream: Option<PlaneClient>,
    pub gate: Arc<Notify>,
}

impl Probe {
    pub fn new(downstream: Option<PlaneClient>) -> Self {
        Probe {
            seen: Arc::default(),
            downstream,
            gate: Arc::new(Notify::new()),
        }
    }
}

#[tonic::async_trait]
impl SchedulerService for Probe {
    async fn get_scheduler_status(
        &self,
        request: Request<pb::GetSchedulerStatusRequest>,
    ) -> Result<Response<pb::GetSchedulerStatusResponse>, Status> {
        if request.metadata().contains_key("hold") {
            self.gate.notified().await;
        }
        let trace_id = ccm_runtime::server::current_trace_id().unwrap_or_default();
        self.seen
            .lock()
            .expect("lock")
            .push((current_request_id().unwrap_or_default(), trace_id.clone()));
        if let Some(plane) = &self.downstream {
            let mut client = SchedulerServiceClient::new(plane.authed());
            client
                .get_scheduler_status(pb::GetSchedulerStatusRequest {})
                .await?;
        }
        Ok(Response::new(pb::GetSchedulerStatusResponse {
            score_policy: trace_id,
            ..Default::default()
        }))
    }

    async fn plan(
        &self,
        _request: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        Err(Status::invalid_argument("the probe plans nothing"))
    }
}

/// Settings for tests: loopback, port 0.
pub fn test_settings() -> ServerSettings {
    ServerSettings {
        listen_addr: "127.0.0.1:0".parse().expect("literal address"),
        request_timeout: Duration::from_secs(10),
        concurrency_limit: 64,
        max_message_size: 1024 * 1024,
        shutdown_grace_period: Duration::from_secs(5),
    }
}

/// A running probe server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub probe: Probe,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ccm_runtime::RuntimeError>>>,
}

impl TestServer {
    /// Starts a probe server recording into `metrics`.
    pub async fn start(probe: Probe, metrics: Metrics) -> TestServer {
        let settings = test_settings();
        let mut set = ServiceSet::new(&settings);
        set.add(SchedulerServiceServer::new(probe.clone()))
            .expect("register");
        let bound = Server::new(settings, set)
            .with_metrics(metrics)
            .bind()
            .await
            .expect("bind");
        let addr = bound.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            probe,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn plane_client(&self) -> PlaneClient {
        PlaneClient::connect(&self.url(), None)
            .await
            .expect("plane client")
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("clean stop");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A request carrying `traceparent`.
pub fn with_traceparent<T>(message: T, traceparent: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        traceparent.parse().expect("ascii traceparent"),
    );
    request
}
