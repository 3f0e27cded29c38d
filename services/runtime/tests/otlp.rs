//! OTLP export and JSON logs, end to end: `telemetry::init` with an OTLP endpoint pointing at
//! an in-process OTLP/gRPC TraceService receiver (no collector can be installed here), a relay
//! server calling a leaf server through `PlaneClient`, a client sending a `traceparent`.
//!
//! The spans must arrive with the client's trace id, the relay's span a child of the client's
//! span and the leaf's a child of the relay's; JSON log lines must carry `trace_id` and
//! `span_id`. One test only: `init` installs the process-wide subscriber.

mod common;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ccm_proto::v1 as pb;
use ccm_proto::v1::scheduler_service_client::SchedulerServiceClient;
use ccm_runtime::metrics::Metrics;
use ccm_runtime::telemetry::{self, LogFormat, TelemetrySettings};
use common::{Probe, TestServer, with_traceparent};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;

/// The receiver: keeps every exported span with its resource's `service.name`.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Log lines, shared with the subscriber.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const METHOD_SPAN_NAME: &str = "ccm.v1.SchedulerService/GetSchedulerStatus";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_with_the_callers_trace_and_logs_carry_the_ids() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector_addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let logs = Logs::default();
    let guard = telemetry::init_with_writer(
        &TelemetrySettings {
            service_name: "ccm-otlp-test".into(),
            log_format: LogFormat::Json,
            log_filter: Some("info".into()),
            otlp_endpoint: Some(format!("http://{collector_addr}")),
            ..TelemetrySettings::default()
        },
        logs.clone(),
    )
    .expect("telemetry init");
    assert!(guard.is_exporting());
    assert!(
        telemetry::init(&TelemetrySettings::default()).is_err(),
        "a second init is refused"
    );

    let leaf = TestServer::start(Probe::new(None), Metrics::new()).await;
    let relay =
        TestServer::start(Probe::new(Some(leaf.plane_client().await)), Metrics::new()).await;
    let mut client = SchedulerServiceClient::new(relay.channel().await);
    let reply = client
        .get_scheduler_status(with_traceparent(
            pb::GetSchedulerStatusRequest {},
            &format!("00-{TRACE}-{CLIENT_SPAN}-01"),
        ))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        reply.score_policy, TRACE,
        "the handler saw the caller's trace"
    );
    // A call without traceparent starts its own trace; its id is the exported one.
    let own = client
        .get_scheduler_status(pb::GetSchedulerStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .score_policy;
    assert_ne!(own, TRACE);

    // Spans end when the response bodies are done; flush until all four arrived (bounded).
    let mut spans = Vec::new();
    for _ in 0..100 {
        guard.flush().expect("flush");
        spans = receiver.spans.lock().expect("lock").clone();
        if spans
            .iter()
            .filter(|(_, s)| s.name == METHOD_SPAN_NAME)
            .count()
            >= 4
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rpc_spans: Vec<&Span> = spans
        .iter()
        .filter(|(service, s)| s.name == METHOD_SPAN_NAME && service == "ccm-otlp-test")
        .map(|(_, s)| s)
        .collect();
    let in_trace: Vec<&&Span> = rpc_spans
        .iter()
        .filter(|s| hex(&s.trace_id) == TRACE)
        .collect();
    assert_eq!(in_trace.len(), 2, "relay and leaf spans: {rpc_spans:#?}");
    let relay_span = in_trace
        .iter()
        .find(|s| hex(&s.parent_span_id) == CLIENT_SPAN)
        .expect("the relay's span is a child of the client's span");
    let leaf_span = in_trace
        .iter()
        .find(|s| s.parent_span_id == relay_span.span_id)
        .expect("the leaf's span is a child of the relay's span");
    assert_eq!(
        relay_span.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32
    );
    assert_eq!(
        rpc_spans.iter().filter(|s| hex(&s.trace_id) == own).count(),
        2,
        "the started trace is exported under the id the handler saw"
    );

    // JSON logs: the `rpc finished` lines carry the trace id and their span's id.
    let text = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf-8");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let finished: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "rpc finished" && l["trace_id"] == TRACE)
        .collect();
    assert_eq!(finished.len(), 2, "{text}");
    let span_ids: Vec<&str> = finished
        .iter()
        .filter_map(|l| l["span_id"].as_str())
        .collect();
    assert!(
        span_ids.contains(&hex(&relay_span.span_id).as_str()),
        "{text}"
    );
    assert!(
        span_ids.contains(&hex(&leaf_span.span_id).as_str()),
        "{text}"
    );
    assert!(
        finished.iter().all(|l| l["span"]["name"] == "rpc"),
        "{text}"
    );

    relay.stop().await;
    leaf.stop().await;
    drop(guard);
    let _ = std::io::stderr().flush();
}
