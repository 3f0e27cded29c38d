//! Observability of the gRPC server over real loopback connections: the gRPC metrics scraped
//! from `/metrics` over real HTTP, trace ids from `traceparent` carried into handlers and on
//! through `PlaneClient`, and the `google.rpc` error detail types in reflection.
//!
//! These tests install no global subscriber (tests/otlp.rs does): trace ids come from the
//! middleware's own propagation.

mod common;

use std::collections::BTreeMap;

use ccm_proto::v1 as pb;
use ccm_proto::v1::definition_service_client::DefinitionServiceClient;
use ccm_proto::v1::scheduler_service_client::SchedulerServiceClient;
use ccm_runtime::metrics::{Metrics, MetricsServer};
use common::{Probe, TestServer, with_traceparent};
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::Code;

const SCHEDULER: &str = "ccm.v1.SchedulerService";

/// The value of the sample `name{labels…}` (labels in any order, all given ones must match
/// and no others may exist).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.strip_suffix('}').unwrap_or(rest)),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let got: BTreeMap<&str, &str> = label_text
            .split("\",")
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once("=\"")?;
                Some((k, v.trim_end_matches('"')))
            })
            .collect();
        if got == wanted {
            return value.parse().ok();
        }
    }
    None
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.expect("body")
}

#[tokio::test]
async fn grpc_calls_are_counted_and_scraped_over_http() {
    let metrics = Metrics::new();
    let server = TestServer::start(Probe::new(None), metrics.clone()).await;
    let listener = MetricsServer::bind("127.0.0.1:0".parse().expect("addr"), metrics.clone())
        .await
        .expect("bind metrics");
    let metrics_addr = listener.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = tokio::spawn(listener.run(async move {
        let _ = stop_rx.await;
    }));

    // A metric of the service's own, registered through the same handle.
    let placements = metrics
        .counter(
            "ccm_test_placements_total",
            "Placements, by outcome.",
            &["outcome"],
        )
        .expect("register");
    placements.inc_by(&["placed"], 4);

    let mut client = SchedulerServiceClient::new(server.channel().await);
    for _ in 0..2 {
        client
            .get_scheduler_status(pb::GetSchedulerStatusRequest {})
            .await
            .expect("status");
    }
    let err = client
        .plan(pb::PlanRequest::default())
        .await
        .expect_err("plan fails");
    assert_eq!(err.code(), Code::InvalidArgument);
    // A service this server does not run: its path must not become a label.
    let err = DefinitionServiceClient::new(server.channel().await)
        .get_definition(pb::GetDefinitionRequest::default())
        .await
        .expect_err("not served");
    assert_eq!(err.code(), Code::Unimplemented);

    let text = scrape(metrics_addr).await;
    let requests = "ccm_grpc_server_requests_total";
    assert_eq!(
        sample(
            &text,
            requests,
            &[
                ("service", SCHEDULER),
                ("method", "GetSchedulerStatus"),
                ("code", "OK")
            ]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            requests,
            &[
                ("service", SCHEDULER),
                ("method", "Plan"),
                ("code", "INVALID_ARGUMENT")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            requests,
            &[
                ("service", "unknown"),
                ("method", "unknown"),
                ("code", "UNIMPLEMENTED")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        !text.contains("DefinitionService"),
        "unknown paths are not labels: {text}"
    );
    assert_eq!(
        sample(
            &text,
            "ccm_grpc_server_request_duration_seconds_count",
            &[("service", SCHEDULER), ("method", "GetSchedulerStatus")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "ccm_grpc_server_in_flight_requests",
            &[("service", SCHEDULER), ("method", "GetSchedulerStatus")]
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ccm_test_placements_total", &[("outcome", "placed")]),
        Some(4.0),
        "{text}"
    );

    // The counters move between scrapes.
    client
        .get_scheduler_status(pb::GetSchedulerStatusRequest {})
        .await
        .expect("status");
    let text = scrape(metrics_addr).await;
    assert_eq!(
        sample(
            &text,
            requests,
            &[
                ("service", SCHEDULER),
                ("method", "GetSchedulerStatus"),
                ("code", "OK")
            ]
        ),
        Some(3.0),
        "{text}"
    );

    // Only GET /metrics is served.
    let other = reqwest::get(format!("http://{metrics_addr}/other"))
        .await
        .expect("request");
    assert_eq!(other.status(), 404);
    let post = reqwest::Client::new()
        .post(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .expect("request");
    assert_eq!(post.status(), 405);

    let _ = stop_tx.send(());
    metrics_task.await.expect("join").expect("clean stop");
    server.stop().await;
}

#[tokio::test]
async fn a_call_in_flight_is_seen_in_the_gauge() {
    let metrics = Metrics::new();
    let server = TestServer::start(Probe::new(None), metrics.clone()).await;
    let gauge_labels = [("service", SCHEDULER), ("method", "GetSchedulerStatus")];
    let mut client = SchedulerServiceClient::new(server.channel().await);
    let held = tokio::spawn(async move {
        let mut request = tonic::Request::new(pb::GetSchedulerStatusRequest {});
        request
            .metadata_mut()
            .insert("hold", "1".parse().expect("ascii"));
        client.get_scheduler_status(request).await
    });
    // Wait (boundedly) until the call is in its handler.
    let mut seen = None;
    for _ in 0..500 {
        seen = sample(
            &metrics.encode().expect("encode"),
            "ccm_grpc_server_in_flight_requests",
            &gauge_labels,
        );
        if seen == Some(1.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(seen, Some(1.0));
    server.probe.gate.notify_one();
    held.await.expect("join").expect("status");
    let text = metrics.encode().expect("encode");
    assert_eq!(
        sample(&text, "ccm_grpc_server_in_flight_requests", &gauge_labels),
        Some(0.0),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_bad_metrics_address_is_a_clear_error() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = MetricsServer::bind(addr, Metrics::new())
        .await
        .expect_err("address in use");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn the_trace_id_of_a_traceparent_reaches_handlers_and_the_next_hop() {
    let leaf = TestServer::start(Probe::new(None), Metrics::new()).await;
    let relay =
        TestServer::start(Probe::new(Some(leaf.plane_client().await)), Metrics::new()).await;
    let mut client = SchedulerServiceClient::new(relay.channel().await);

    let reply = client
        .get_scheduler_status(with_traceparent(
            pb::GetSchedulerStatusRequest {},
            &format!("00-{TRACE}-00f067aa0ba902b7-01"),
        ))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(reply.score_policy, TRACE);
    let relay_seen = relay.probe.seen.lock().expect("lock").clone();
    let leaf_seen = leaf.probe.seen.lock().expect("lock").clone();
    assert_eq!(relay_seen.len(), 1);
    assert_eq!(leaf_seen.len(), 1);
    assert_eq!(relay_seen[0].1, TRACE);
    assert_eq!(leaf_seen[0].1, TRACE, "PlaneClient carried the trace on");
    assert_ne!(
        relay_seen[0].0, leaf_seen[0].0,
        "each hop has its own request id"
    );

    // No traceparent: the relay starts a trace, the leaf joins it.
    let reply = client
        .get_scheduler_status(pb::GetSchedulerStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let started = reply.score_policy;
    assert_eq!(started.len(), 32, "{started}");
    assert!(started.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(started, TRACE);
    assert_eq!(leaf.probe.seen.lock().expect("lock")[1].1, started);

    // A malformed traceparent is ignored: a fresh trace, not an error.
    let reply = client
        .get_scheduler_status(with_traceparent(
            pb::GetSchedulerStatusRequest {},
            "00-not-a-trace-01",
        ))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(reply.score_policy.len(), 32);
    assert_ne!(reply.score_policy, started);
    assert_ne!(reply.score_policy, TRACE);

    relay.stop().await;
    leaf.stop().await;
}

fn file_names(raw_files: &[Vec<u8>]) -> Vec<(String, Vec<String>)> {
    raw_files
        .iter()
        .map(|raw| {
            let file = prost_types::FileDescriptorProto::decode(raw.as_slice())
                .expect("a FileDescriptorProto");
            (
                file.name.clone().unwrap_or_default(),
                file.message_type
                    .iter()
                    .map(|m| m.name.clone().unwrap_or_default())
                    .collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn reflection_resolves_the_google_rpc_error_detail_types() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let server = TestServer::start(Probe::new(None), Metrics::new()).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let symbols = [
        "google.rpc.BadRequest",
        "google.rpc.ErrorInfo",
        "google.rpc.PreconditionFailure",
        "google.rpc.RequestInfo",
        "google.rpc.ResourceInfo",
        "google.rpc.RetryInfo",
        "google.rpc.QuotaFailure",
        "google.rpc.Status",
        "ccm.v1.SchedulerService",
    ];
    let requests: Vec<ServerReflectionRequest> = symbols
        .iter()
        .map(|s| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol((*s).to_owned())),
        })
        .collect();
    let outbound = tokio_stream::iter(requests);
    let mut inbound = client
        .server_reflection_info(outbound)
        .await
        .expect("stream opens")
        .into_inner();
    for symbol in symbols {
        let response = inbound
            .next()
            .await
            .expect("a reply")
            .expect("reply ok")
            .message_response
            .expect("set");
        let MessageResponse::FileDescriptorResponse(files) = response else {
            panic!("{symbol}: expected a file descriptor, got {response:?}");
        };
        let files = file_names(&files.file_descriptor_proto);
        let short = symbol.rsplit('.').next().unwrap_or(symbol);
        assert!(
            files
                .iter()
                .any(|(_, messages)| messages.iter().any(|m| m == short))
                || symbol.starts_with("ccm."),
            "{symbol}: {files:?}"
        );
        if symbol == "google.rpc.BadRequest" {
            assert!(
                files
                    .iter()
                    .any(|(name, _)| name == "google/rpc/error_details.proto"),
                "{files:?}"
            );
        }
        if symbol == "google.rpc.Status" {
            assert!(
                files
                    .iter()
                    .any(|(name, _)| name == "google/rpc/status.proto"),
                "{files:?}"
            );
        }
    }
    drop(inbound);

    // The imports of the detail types resolve by file name (what grpcurl does next).
    for dependency in [
        "google/protobuf/duration.proto",
        "google/protobuf/any.proto",
    ] {
        let outbound = tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileByFilename(dependency.to_owned())),
        }]);
        let mut inbound = client
            .server_reflection_info(outbound)
            .await
            .expect("stream opens")
            .into_inner();
        let response = inbound
            .next()
            .await
            .expect("a reply")
            .expect("reply ok")
            .message_response
            .expect("set");
        let MessageResponse::FileDescriptorResponse(files) = response else {
            panic!("{dependency}: expected a file descriptor, got {response:?}");
        };
        assert!(
            file_names(&files.file_descriptor_proto)
                .iter()
                .any(|(name, _)| name == dependency),
            "{dependency}"
        );
    }
    server.stop().await;
}
