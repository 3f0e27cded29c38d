//! Shared by the integration tests: a real issuer, an authenticator for it, and real tonic
//! servers on loopback behind the auth layer.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use ccm_auth::{AuthConfig, AuthLayer, Authenticator, access_from_request, caller_from_request};
use ccm_proto::v1::template_service_server::{TemplateService, TemplateServiceServer};
use ccm_proto::v1::{
    CreateTemplateRequest, CreateTemplateResponse, DeleteTemplateRequest, DeleteTemplateResponse,
    GetTemplateRequest, GetTemplateResponse, ListTemplatesRequest, ListTemplatesResponse,
    UpdateTemplateRequest, UpdateTemplateResponse, WorkerTemplate,
};
use ccm_testkit::oidc::OidcIssuer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

/// The realm of the test issuers.
pub const REALM: &str = "ccm-test";

/// Response metadata of the echo service.
pub const ECHO_SUBJECT: &str = "x-echo-subject";
/// Response metadata of the echo service: "true" / "false" / "-" (no Access extension).
pub const ECHO_OWN_ONLY: &str = "x-echo-own-only";
/// Response metadata of the echo service: the caller's roles, comma-separated.
pub const ECHO_ROLES: &str = "x-echo-roles";

pub async fn issuer() -> OidcIssuer {
    match OidcIssuer::start(REALM).await {
        Ok(issuer) => issuer,
        Err(err) => panic!("cannot start the OIDC issuer: {err}"),
    }
}

pub fn config_for(issuer: &OidcIssuer) -> AuthConfig {
    AuthConfig::new(issuer.issuer(), [issuer.audience()])
}

pub fn authenticator(issuer: &OidcIssuer) -> Authenticator {
    Authenticator::new(config_for(issuer)).expect("authenticator")
}

/// A running server; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    _shutdown: oneshot::Sender<()>,
}

impl TestServer {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the test server")
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// TemplateService answering fixed data; GetTemplate names the caller it saw in the description.
#[derive(Clone, Default)]
pub struct FixedTemplates;

fn template(name: &str, description: String) -> WorkerTemplate {
    WorkerTemplate {
        name: name.to_owned(),
        description,
        instance_type: "m5zn.metal".into(),
        ..Default::default()
    }
}

fn seen_by<T>(request: &Request<T>) -> String {
    match (caller_from_request(request), access_from_request(request)) {
        (Some(caller), Some(access)) => format!(
            "seen by {} ({}) own_only={}",
            caller.subject,
            caller.display_name(),
            access.own_only
        ),
        _ => "seen by nobody".into(),
    }
}

#[tonic::async_trait]
impl TemplateService for FixedTemplates {
    async fn create_template(
        &self,
        request: Request<CreateTemplateRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let name = request
            .get_ref()
            .template
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        Ok(Response::new(CreateTemplateResponse {
            template: Some(template(&name, seen_by(&request))),
        }))
    }

    async fn get_template(
        &self,
        request: Request<GetTemplateRequest>,
    ) -> Result<Response<GetTemplateResponse>, Status> {
        let name = request.get_ref().template_name.clone();
        Ok(Response::new(GetTemplateResponse {
            template: Some(template(&name, seen_by(&request))),
        }))
    }

    async fn list_templates(
        &self,
        request: Request<ListTemplatesRequest>,
    ) -> Result<Response<ListTemplatesResponse>, Status> {
        Ok(Response::new(ListTemplatesResponse {
            templates: vec![
                template("small", seen_by(&request)),
                template("large", seen_by(&request)),
            ],
            next_page_token: String::new(),
        }))
    }

    async fn update_template(
        &self,
        request: Request<UpdateTemplateRequest>,
    ) -> Result<Response<UpdateTemplateResponse>, Status> {
        let name = request
            .get_ref()
            .template
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        Ok(Response::new(UpdateTemplateResponse {
            template: Some(template(&name, seen_by(&request))),
        }))
    }

    async fn delete_template(
        &self,
        request: Request<DeleteTemplateRequest>,
    ) -> Result<Response<DeleteTemplateResponse>, Status> {
        let name = request.get_ref().template_name.clone();
        Ok(Response::new(DeleteTemplateResponse {
            template: Some(template(&name, seen_by(&request))),
        }))
    }
}

/// TemplateService, gRPC health and reflection (v1 and v1alpha) behind `layer`.
pub async fn serve_templates(layer: AuthLayer) -> TestServer {
    let (listener, addr) = listener().await;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<TemplateServiceServer<FixedTemplates>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ccm_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("reflection v1");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ccm_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("reflection v1alpha");
    let (tx, rx) = oneshot::channel::<()>();
    let router = Server::builder()
        .layer(layer)
        .add_service(TemplateServiceServer::new(FixedTemplates))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    tokio::spawn(async move {
        // Keep the reporter alive as long as the server.
        let _reporter = reporter;
        let _ = router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await;
    });
    TestServer {
        addr,
        _shutdown: tx,
    }
}

/// Answers every gRPC path with an empty message, echoing in response metadata what the auth
/// layer put in the request's extensions (through tonic's own request handling).
async fn echo_unary(request: Request<()>) -> Result<Response<()>, Status> {
    let mut response = Response::new(());
    let caller = caller_from_request(&request);
    let subject = caller.map_or("-".to_owned(), |c| c.subject.clone());
    let roles = caller.map_or(String::new(), |c| {
        c.roles
            .iter()
            .map(|r| r.claim())
            .collect::<Vec<_>>()
            .join(",")
    });
    let own_only = access_from_request(&request).map_or("-".to_owned(), |a| a.own_only.to_string());
    let metadata = response.metadata_mut();
    for (key, value) in [
        (ECHO_SUBJECT, subject),
        (ECHO_OWN_ONLY, own_only),
        (ECHO_ROLES, roles),
    ] {
        metadata.insert(key, MetadataValue::try_from(value).expect("ascii"));
    }
    Ok(response)
}

/// The echo service behind `layer`, on every path.
pub async fn serve_echo(layer: AuthLayer) -> TestServer {
    let (listener, addr) = listener().await;
    let (tx, rx) = oneshot::channel::<()>();
    let echo = tower::service_fn(|request: http::Request<tonic::body::Body>| async move {
        let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<(), ()>::default());
        let unary = tower::service_fn(echo_unary);
        Ok::<_, Infallible>(grpc.unary(unary, request).await)
    });
    tokio::spawn(async move {
        let _ = Server::builder()
            .layer(layer)
            .serve_with_incoming_shutdown(echo, TcpListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await;
    });
    TestServer {
        addr,
        _shutdown: tx,
    }
}

/// Calls `path` with an empty message and optional bearer `token` through a real tonic client.
pub async fn call_path(
    channel: Channel,
    path: &str,
    token: Option<&str>,
) -> Result<Response<()>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("not ready: {e}")))?;
    let mut request = Request::new(());
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).expect("ascii"),
        );
    }
    let path = http::uri::PathAndQuery::try_from(path.to_owned()).expect("path");
    grpc.unary(request, path, tonic_prost::ProstCodec::<(), ()>::default())
        .await
}

/// The text of response metadata `key`.
pub fn meta<T>(response: &Response<T>, key: &str) -> String {
    response
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<absent>")
        .to_owned()
}
