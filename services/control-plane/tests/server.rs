//! The gRPC server over real loopback connections: health, reflection (v1 and v1alpha), request
//! ids, deadlines, the concurrency limit, the extra layer, message limits and graceful shutdown.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ccm_control_plane::server::{
    BoxedGrpcService, GrpcRequest, REQUEST_ID_HEADER, Server, ServiceSet,
};
use ccm_proto::v1 as pb;
use ccm_proto::v1::definition_service_client::DefinitionServiceClient;
use ccm_proto::v1::definition_service_server::DefinitionServiceServer;
use ccm_proto::v1::instance_service_client::InstanceServiceClient;
use common::{TestDefinitions, TestServer, get, test_settings};
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;
use tower::ServiceExt as _;

const DEFINITIONS: &str = "ccm.v1.DefinitionService";

async fn health_status(server: &TestServer, service: &str) -> Result<i32, tonic::Status> {
    let mut client = HealthClient::new(server.channel().await);
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
}

#[tokio::test]
async fn health_reports_serving_overall_and_per_registered_service() {
    let server = TestServer::start().await;
    assert_eq!(
        health_status(&server, "").await.ok(),
        Some(ServingStatus::Serving as i32)
    );
    assert_eq!(
        health_status(&server, DEFINITIONS).await.ok(),
        Some(ServingStatus::Serving as i32)
    );
    // A service that was not registered has no entry.
    let missing = health_status(&server, "ccm.v1.InstanceService").await;
    assert_eq!(missing.err().map(|s| s.code()), Some(Code::NotFound));
    // A service can mark itself NOT_SERVING through the reporter.
    server
        .health
        .set_service_status(DEFINITIONS, tonic_health::ServingStatus::NotServing)
        .await;
    assert_eq!(
        health_status(&server, DEFINITIONS).await.ok(),
        Some(ServingStatus::NotServing as i32)
    );
    server.stop().await.expect("clean stop");
}

async fn reflection_v1_request(
    server: &TestServer,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let outbound = tokio_stream::iter(vec![ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut inbound = client
        .server_reflection_info(outbound)
        .await
        .expect("reflection v1 stream opens")
        .into_inner();
    inbound
        .next()
        .await
        .expect("one response")
        .expect("response ok")
        .message_response
        .expect("message response set")
}

async fn reflection_v1alpha_request(
    server: &TestServer,
    request: tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let outbound = tokio_stream::iter(vec![ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut inbound = client
        .server_reflection_info(outbound)
        .await
        .expect("reflection v1alpha stream opens")
        .into_inner();
    inbound
        .next()
        .await
        .expect("one response")
        .expect("response ok")
        .message_response
        .expect("message response set")
}

fn expected_services() -> BTreeSet<String> {
    [
        DEFINITIONS,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

fn file_names(raw_files: &[Vec<u8>]) -> Vec<String> {
    raw_files
        .iter()
        .map(|raw| {
            prost_types::FileDescriptorProto::decode(raw.as_slice())
                .expect("a FileDescriptorProto")
                .name
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn reflection_v1_lists_services_and_resolves_ccm_symbols() {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let server = TestServer::start().await;

    let MessageResponse::ListServicesResponse(list) =
        reflection_v1_request(&server, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a list of services");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert_eq!(names, expected_services());

    // Symbols of every ccm contract resolve, also of services this server does not run.
    let MessageResponse::FileDescriptorResponse(files) = reflection_v1_request(
        &server,
        MessageRequest::FileContainingSymbol("ccm.v1.WorkerService".into()),
    )
    .await
    else {
        panic!("expected a file descriptor");
    };
    assert!(
        file_names(&files.file_descriptor_proto).contains(&"ccm/v1/worker.proto".to_owned()),
        "{:?}",
        file_names(&files.file_descriptor_proto)
    );

    // An unknown symbol is NOT_FOUND.
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        let mut client = ServerReflectionClient::new(server.channel().await);
        let outbound = tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "ccm.v1.NoSuchThing".into(),
            )),
        }]);
        let mut inbound = client
            .server_reflection_info(outbound)
            .await
            .expect("stream opens")
            .into_inner();
        let reply = inbound.next().await.expect("one reply");
        match reply {
            Err(status) => assert_eq!(status.code(), Code::NotFound),
            Ok(r) => match r.message_response {
                Some(MessageResponse::ErrorResponse(e)) => {
                    assert_eq!(e.error_code, Code::NotFound as i32)
                }
                other => panic!("expected NOT_FOUND, got {other:?}"),
            },
        }
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reflection_v1alpha_lists_services_and_resolves_ccm_symbols() {
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let server = TestServer::start().await;

    let MessageResponse::ListServicesResponse(list) =
        reflection_v1alpha_request(&server, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a list of services");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert_eq!(names, expected_services());

    let MessageResponse::FileDescriptorResponse(files) = reflection_v1alpha_request(
        &server,
        MessageRequest::FileContainingSymbol("ccm.v1.LabletInstance".into()),
    )
    .await
    else {
        panic!("expected a file descriptor");
    };
    assert!(file_names(&files.file_descriptor_proto).contains(&"ccm/v1/instance.proto".to_owned()));
    server.stop().await.expect("clean stop");
}

fn with_request_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(REQUEST_ID_HEADER, id.parse().expect("ascii request id"));
    request
}

fn response_request_id(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test]
async fn request_id_from_the_client_reaches_the_handler_and_is_echoed() {
    let server = TestServer::start().await;
    let mut client = DefinitionServiceClient::new(server.channel().await);
    let response = client
        .get_definition(with_request_id(get("request-id"), "req-42.abc"))
        .await
        .expect("call succeeds");
    assert_eq!(
        response_request_id(response.metadata()).as_deref(),
        Some("req-42.abc")
    );
    let def = response.into_inner().definition.expect("definition");
    assert_eq!(
        def.name, "req-42.abc",
        "handler sees the RequestId extension"
    );
    assert_eq!(
        def.description, "req-42.abc",
        "handler sees the x-request-id metadata"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn request_id_is_generated_when_missing_or_unusable() {
    let server = TestServer::start().await;
    let mut client = DefinitionServiceClient::new(server.channel().await);

    let response = client
        .get_definition(get("request-id"))
        .await
        .expect("call");
    let echoed = response_request_id(response.metadata()).expect("an id is echoed");
    assert!(
        uuid::Uuid::parse_str(&echoed).is_ok(),
        "generated id {echoed:?} is a UUID"
    );
    assert_eq!(
        response.into_inner().definition.map(|d| d.name),
        Some(echoed)
    );

    let too_long = "x".repeat(200);
    let response = client
        .get_definition(with_request_id(get("request-id"), &too_long))
        .await
        .expect("call");
    let echoed = response_request_id(response.metadata()).expect("an id is echoed");
    assert_ne!(echoed, too_long);
    assert!(uuid::Uuid::parse_str(&echoed).is_ok());

    // Two calls without ids get different ids.
    let a = client.get_definition(get("x")).await.expect("call");
    let b = client.get_definition(get("x")).await.expect("call");
    assert_ne!(
        response_request_id(a.metadata()),
        response_request_id(b.metadata())
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn errors_carry_the_request_id_in_metadata_and_request_info() {
    let server = TestServer::start().await;
    let mut client = DefinitionServiceClient::new(server.channel().await);
    let status = client
        .get_definition(with_request_id(get("error:not_found"), "err-req-7"))
        .await
        .expect_err("not found");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        response_request_id(status.metadata()).as_deref(),
        Some("err-req-7")
    );
    let details = status.get_error_details();
    assert_eq!(
        details.request_info().map(|r| r.request_id.as_str()),
        Some("err-req-7")
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn server_request_timeout_gives_deadline_exceeded_and_drops_the_handler() {
    let mut settings = test_settings();
    settings.request_timeout = Duration::from_millis(200);
    let server = TestServer::start_with(settings, |s| s).await;
    let mut client = DefinitionServiceClient::new(server.channel().await);

    let started = Instant::now();
    let status = client
        .get_definition(get("sleep:1000"))
        .await
        .expect_err("the handler is slower than the timeout");
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("server's request timeout"),
        "{}",
        status.message()
    );
    assert!(
        elapsed < Duration::from_millis(900),
        "answered after {elapsed:?}"
    );

    // The handler was cancelled, not left running.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        server
            .counters
            .started
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        server
            .counters
            .completed
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // A fast call is unaffected.
    assert!(client.get_definition(get("sleep:10")).await.is_ok());
    server.stop().await.expect("clean stop");
}

/// Sends one unary gRPC call over a raw HTTP/2 connection (the tonic client would enforce a
/// `grpc-timeout` itself; this checks the server does). Returns the response headers and
/// trailers merged.
async fn raw_grpc_call(
    addr: std::net::SocketAddr,
    path: &str,
    message: &impl prost::Message,
    extra_headers: &[(&str, &str)],
) -> http::HeaderMap {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("tcp connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    let payload = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(0u8);
    frame.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&payload);
    let mut builder = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra_headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    let mut headers = parts.headers;
    let collected = body.collect().await.expect("body");
    if let Some(trailers) = collected.trailers() {
        headers.extend(trailers.clone());
    }
    headers
}

#[tokio::test]
async fn a_shorter_client_grpc_timeout_wins() {
    let server = TestServer::start().await; // server timeout 5 s
    let started = Instant::now();
    let headers = raw_grpc_call(
        server.addr,
        "/ccm.v1.DefinitionService/GetDefinition",
        &get("sleep:2000"),
        &[("grpc-timeout", "150m")],
    )
    .await;
    let elapsed = started.elapsed();
    let status = tonic::Status::from_header_map(&headers).expect("a grpc-status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("client's grpc-timeout"),
        "{}",
        status.message()
    );
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");

    // Without the header the same raw call completes (the 5 s server timeout is longer).
    let headers = raw_grpc_call(
        server.addr,
        "/ccm.v1.DefinitionService/GetDefinition",
        &get("sleep:50"),
        &[],
    )
    .await;
    let status = tonic::Status::from_header_map(&headers).expect("a grpc-status");
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn concurrency_limit_is_respected_and_health_is_not_limited() {
    let mut settings = test_settings();
    settings.concurrency_limit = 2;
    let server = TestServer::start_with(settings, |s| s).await;
    let channel = server.channel().await;

    let started = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut client = DefinitionServiceClient::new(channel.clone());
            tokio::spawn(async move { client.get_definition(get("sleep:300")).await })
        })
        .collect();

    // While the limit is saturated, health still answers at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let health_started = Instant::now();
    assert_eq!(
        health_status(&server, "").await.ok(),
        Some(ServingStatus::Serving as i32)
    );
    // Queued behind four 300 ms calls it would wait at least ~500 ms.
    assert!(health_started.elapsed() < Duration::from_millis(450));

    for call in calls {
        let response = call.await.expect("task").expect("call succeeds");
        assert_eq!(
            response.into_inner().definition.map(|d| d.id).as_deref(),
            Some("slept")
        );
    }
    let elapsed = started.elapsed();
    let counters = &server.counters;
    assert_eq!(
        counters.completed.load(std::sync::atomic::Ordering::SeqCst),
        6
    );
    assert_eq!(
        counters
            .max_running
            .load(std::sync::atomic::Ordering::SeqCst),
        2,
        "never more than the limit at once, and the limit was reached"
    );
    // Six 300 ms calls two at a time take at least three rounds.
    assert!(
        elapsed >= Duration::from_millis(850),
        "took only {elapsed:?}"
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn shutdown_sets_not_serving_and_lets_in_flight_calls_finish() {
    let mut server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut overall = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch opens")
        .into_inner();
    let mut per_service = health
        .watch(HealthCheckRequest {
            service: DEFINITIONS.to_owned(),
        })
        .await
        .expect("watch opens")
        .into_inner();
    let first = overall.next().await.expect("an item").expect("ok");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let first = per_service.next().await.expect("an item").expect("ok");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    // A call in flight when shutdown begins.
    let mut client = DefinitionServiceClient::new(server.channel().await);
    let in_flight = tokio::spawn(async move { client.get_definition(get("sleep:1000")).await });
    while server
        .counters
        .started
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shutdown_started = Instant::now();
    server.begin_shutdown();

    let next = tokio::time::timeout(Duration::from_secs(2), overall.next())
        .await
        .expect("health update arrives")
        .expect("an item")
        .expect("ok");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let next = tokio::time::timeout(Duration::from_secs(2), per_service.next())
        .await
        .expect("health update arrives")
        .expect("an item")
        .expect("ok");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // ... and then the watch streams end, so they do not hold the drain open.
    let end = tokio::time::timeout(Duration::from_secs(2), overall.next())
        .await
        .expect("watch stream ends");
    assert!(end.is_none(), "{end:?}");

    // No new connections are accepted.
    let mut refused = false;
    for _ in 0..50 {
        let attempt = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .expect("endpoint")
            .connect_timeout(Duration::from_millis(200))
            .connect()
            .await;
        if attempt.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the listener is closed during shutdown");

    // The in-flight call completes normally.
    let response = in_flight
        .await
        .expect("task")
        .expect("in-flight call completes");
    assert_eq!(
        response.into_inner().definition.map(|d| d.id).as_deref(),
        Some("slept")
    );
    assert_eq!(
        server
            .counters
            .completed
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    let handle = &mut server.handle;
    let result = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("server exits after draining")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
    // It exited because the drain finished, not because the 5 s grace period ran out.
    assert!(shutdown_started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn calls_still_running_at_the_end_of_the_grace_period_are_cut() {
    let mut settings = test_settings();
    settings.shutdown_grace_period = Duration::from_millis(300);
    settings.request_timeout = Duration::from_secs(30);
    let mut server = TestServer::start_with(settings, |s| s).await;
    let mut client = DefinitionServiceClient::new(server.channel().await);
    let in_flight = tokio::spawn(async move { client.get_definition(get("sleep:10000")).await });
    while server
        .counters
        .started
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    server.begin_shutdown();
    let result = tokio::time::timeout(Duration::from_secs(8), &mut server.handle)
        .await
        .expect("server exits after the grace period, not after the 10 s call")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let call = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the client learns the call is gone")
        .expect("task");
    assert!(call.is_err(), "the cut call fails: {call:?}");
    assert_eq!(
        server
            .counters
            .completed
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn services_shutdown_token_is_cancelled_when_shutdown_begins() {
    let settings = test_settings();
    let mut services = ServiceSet::new(&settings);
    services
        .add(DefinitionServiceServer::new(TestDefinitions::default()))
        .expect("add");
    let token = services.shutdown_token();
    let bound = Server::new(settings, services).bind().await.expect("bind");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(bound.run(async move {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!token.is_cancelled());
    tx.send(()).expect("server waits for the signal");
    tokio::time::timeout(Duration::from_secs(2), token.cancelled())
        .await
        .expect("token cancelled");
    let result = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("stops")
        .expect("no panic");
    assert!(result.is_ok());
}

#[tokio::test]
async fn extra_layer_wraps_application_services_but_not_health_or_reflection() {
    // A layer that refuses calls without an `authorization` header, as the auth layer will.
    let layer = tower::layer::layer_fn(|inner: BoxedGrpcService| {
        tower::service_fn(move |request: GrpcRequest| {
            let inner = inner.clone();
            async move {
                if request.headers().contains_key("authorization") {
                    inner.oneshot(request).await
                } else {
                    Ok(tonic::Status::unauthenticated("missing bearer token")
                        .into_http::<tonic::body::Body>())
                }
            }
        })
    });
    let server = TestServer::start_with(test_settings(), move |s| s.with_layer(layer)).await;

    // Health works without a token.
    assert_eq!(
        health_status(&server, "").await.ok(),
        Some(ServingStatus::Serving as i32)
    );
    // So does reflection.
    {
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let reply =
            reflection_v1_request(&server, MessageRequest::ListServices(String::new())).await;
        assert!(matches!(reply, MessageResponse::ListServicesResponse(_)));
    }

    let mut client = DefinitionServiceClient::new(server.channel().await);
    let refused = client
        .get_definition(with_request_id(get("x"), "layer-1"))
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(
        response_request_id(refused.metadata()).as_deref(),
        Some("layer-1"),
        "the layer runs inside the request-id middleware"
    );

    let mut request = tonic::Request::new(get("x"));
    request
        .metadata_mut()
        .insert("authorization", "Bearer t".parse().expect("ascii"));
    let ok = client.get_definition(request).await.expect("with a token");
    assert_eq!(
        ok.into_inner().definition.map(|d| d.id).as_deref(),
        Some("x")
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn max_message_size_is_enforced_on_requests() {
    let mut settings = test_settings();
    settings.max_message_size = 64 * 1024;
    let server = TestServer::start_with(settings, |s| s).await;
    let mut client = DefinitionServiceClient::new(server.channel().await);
    let request = |len: usize| pb::ValidateDefinitionRequest {
        source: Some(pb::validate_definition_request::Source::LabYaml(
            "n".repeat(len),
        )),
        ..Default::default()
    };
    let ok = client
        .validate_definition(request(10 * 1024))
        .await
        .expect("a small message passes");
    assert_eq!(ok.into_inner().detected_node_count, 10 * 1024);
    let too_big = client
        .validate_definition(request(100 * 1024))
        .await
        .expect_err("a message over the limit is refused");
    assert_eq!(too_big.code(), Code::OutOfRange, "{too_big:?}");
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_unregistered_service_is_unimplemented() {
    let server = TestServer::start().await;
    let mut client = InstanceServiceClient::new(server.channel().await);
    let status = client
        .get_instance(pb::GetInstanceRequest {
            instance_id: "x".into(),
        })
        .await
        .expect_err("not served here");
    assert_eq!(status.code(), Code::Unimplemented);
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn registering_a_service_twice_is_refused() {
    let settings = test_settings();
    let mut services = ServiceSet::new(&settings);
    services
        .add(DefinitionServiceServer::new(TestDefinitions::default()))
        .expect("first");
    let err = services
        .add(DefinitionServiceServer::new(TestDefinitions::default()))
        .expect_err("second");
    assert!(
        matches!(&err, ccm_runtime::RuntimeError::DuplicateService(name) if name == DEFINITIONS)
    );
    assert_eq!(services.names(), [DEFINITIONS]);
}

#[tokio::test]
async fn binding_a_busy_address_names_it() {
    let server = TestServer::start().await;
    let mut settings = test_settings();
    settings.listen_addr = server.addr;
    let err = Server::new(settings.clone(), ServiceSet::new(&settings))
        .bind()
        .await
        .expect_err("address in use");
    match &err {
        ccm_runtime::RuntimeError::Bind { addr, .. } => assert_eq!(*addr, server.addr),
        other => panic!("expected Bind, got {other:?}"),
    }
    assert!(err.to_string().contains(&server.addr.to_string()));
    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn serve_runs_from_a_configuration() {
    use ccm_control_plane::config::ConfigLoader;
    // Pick a free port, release it, and serve on it.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr").port()
    };
    let config = ConfigLoader::new()
        .env([
            ("CCM_LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("CCM_AUTH__INSECURE_NO_AUTH", "true".to_owned()),
            ("CCM_SHUTDOWN_GRACE_PERIOD", "1s".to_owned()),
        ])
        .load()
        .expect("valid configuration");
    let mut services = ServiceSet::new(&(&config).into());
    services
        .add(DefinitionServiceServer::new(TestDefinitions::default()))
        .expect("add");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        ccm_control_plane::server::Server::new((&config).into(), services)
            .bind()
            .await?
            .run(async move {
                let _ = rx.await;
            })
            .await
    });
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut channel = None;
    for _ in 0..100 {
        if let Ok(c) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
        {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = DefinitionServiceClient::new(channel.expect("server came up"));
    let reply = client.get_definition(get("cfg")).await.expect("call");
    assert_eq!(
        reply.into_inner().definition.map(|d| d.id).as_deref(),
        Some("cfg")
    );
    tx.send(()).expect("signal");
    let result = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("stops")
        .expect("no panic");
    assert!(result.is_ok());
}
