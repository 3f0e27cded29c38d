//! A connection to the control plane, as the scheduler, the controller and the gateway hold
//! one: a tonic [`Channel`] plus, when the deployment has an identity provider, the service
//! token added to every call. Every call also carries the W3C `traceparent` of the current span
//! (see [`crate::telemetry::current_trace_headers`]), so the control plane's `rpc` span — and
//! the audit records the call writes — belong to the caller's trace.
//!
//! ```no_run
//! # async fn example() -> Result<(), ccm_runtime::RuntimeError> {
//! use ccm_runtime::client::PlaneClient;
//! let plane = PlaneClient::connect("http://127.0.0.1:50051", None).await?;
//! let mut internal = plane.internal();
//! # let _ = &mut internal;
//! # Ok(()) }
//! ```

use std::time::Duration;

use ccm_auth::ServiceTokenSource;
use ccm_proto::v1::definition_service_client::DefinitionServiceClient;
use ccm_proto::v1::event_service_client::EventServiceClient;
use ccm_proto::v1::instance_service_client::InstanceServiceClient;
use ccm_proto::v1::internal_service_client::InternalServiceClient;
use ccm_proto::v1::template_service_client::TemplateServiceClient;
use ccm_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::RuntimeError;

/// Time allowed to open the TCP/HTTP2 connection to the control plane.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive ping interval on the control-plane channel (detects a dead peer).
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// Largest message the clients accept or send (a full worker or instance list can be big).
pub const DEFAULT_CLIENT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Adds the service token (when there is one) and the current trace context to every call.
#[derive(Debug, Clone, Default)]
pub struct MaybeToken(Option<ccm_auth::ServiceTokenInterceptor>);

impl Interceptor for MaybeToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        crate::telemetry::inject_current_metadata(request.metadata_mut());
        match &mut self.0 {
            Some(inner) => inner.call(request),
            None => Ok(request),
        }
    }
}

/// A channel carrying the service token and the trace context.
pub type AuthedChannel = InterceptedService<Channel, MaybeToken>;

/// A connection to the control plane. Cloning is cheap (the channel is shared).
#[derive(Debug, Clone)]
pub struct PlaneClient {
    channel: Channel,
    interceptor: MaybeToken,
}

impl PlaneClient {
    /// Connects lazily to `endpoint` (`http://host:port`): the first call opens the connection
    /// and a broken connection is re-opened by the next call. `tokens` adds a bearer service
    /// token to every call (none: the control plane runs `--insecure-no-auth`).
    pub async fn connect(
        endpoint: &str,
        tokens: Option<ServiceTokenSource>,
    ) -> Result<Self, RuntimeError> {
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| {
                RuntimeError::Client(format!("bad control-plane endpoint {endpoint:?}: {e}"))
            })?
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
            .http2_keep_alive_interval(DEFAULT_KEEPALIVE_INTERVAL)
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Self::from_channel(channel, tokens))
    }

    /// Wraps an existing channel (tests, in-process wiring).
    pub fn from_channel(channel: Channel, tokens: Option<ServiceTokenSource>) -> Self {
        PlaneClient {
            channel,
            interceptor: MaybeToken(tokens.map(|t| t.interceptor())),
        }
    }

    /// The raw channel (no token).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The channel with the service token and trace context added to every call: build any
    /// generated client on it (`SchedulerServiceClient::new(plane.authed())`).
    pub fn authed(&self) -> AuthedChannel {
        InterceptedService::new(self.channel.clone(), self.interceptor.clone())
    }

    /// InternalService (fenced writes of the scheduler and controller).
    pub fn internal(&self) -> InternalServiceClient<AuthedChannel> {
        InternalServiceClient::new(self.authed())
            .max_decoding_message_size(DEFAULT_CLIENT_MAX_MESSAGE_SIZE)
            .max_encoding_message_size(DEFAULT_CLIENT_MAX_MESSAGE_SIZE)
    }

    /// EventService (Watch).
    pub fn events(&self) -> EventServiceClient<AuthedChannel> {
        EventServiceClient::new(self.authed())
            .max_decoding_message_size(DEFAULT_CLIENT_MAX_MESSAGE_SIZE)
    }

    /// InstanceService.
    pub fn instances(&self) -> InstanceServiceClient<AuthedChannel> {
        InstanceServiceClient::new(self.authed())
            .max_decoding_message_size(DEFAULT_CLIENT_MAX_MESSAGE_SIZE)
    }

    /// WorkerService.
    pub fn workers(&self) -> WorkerServiceClient<AuthedChannel> {
        WorkerServiceClient::new(self.authed())
            .max_decoding_message_size(DEFAULT_CLIENT_MAX_MESSAGE_SIZE)
    }

    /// DefinitionService.
    pub fn definitions(&self) -> DefinitionServiceClient<AuthedChannel> {
        DefinitionServiceClient::new(self.authed())
            .max_decoding_message_size(DEFAULT_CLIENT_MAX_MESSAGE_SIZE)
    }

    /// TemplateService.
    pub fn templates(&self) -> TemplateServiceClient<AuthedChannel> {
        TemplateServiceClient::new(self.authed())
            .max_decoding_message_size(DEFAULT_CLIENT_MAX_MESSAGE_SIZE)
    }
}

/// The fence a leader puts on every InternalService call: its role, its epoch and its id.
pub fn fence(role: &str, epoch: i64, holder_id: &str) -> ccm_proto::v1::LeaderFence {
    ccm_proto::v1::LeaderFence {
        role: role.to_owned(),
        epoch,
        holder_id: holder_id.to_owned(),
    }
}
