//! Every call gets an `rpc` span with the method and request id, closed by an `rpc finished`
//! event with the gRPC code and latency; internal errors are logged with their cause inside it.
//!
//! The tests run on a current-thread runtime, so the server's tasks run on the test's thread
//! and see the thread-local subscriber installed with `set_default`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ccm_proto::v1::definition_service_client::DefinitionServiceClient;
use common::{TestServer, get};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

type Fields = HashMap<String, String>;

#[derive(Default)]
struct FieldVisitor(Fields);

impl Visit for FieldVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
}

/// What the capture saw: each event with its own fields and those of its `rpc` span.
#[derive(Clone, Default)]
struct Captured {
    events: Arc<Mutex<Vec<(Fields, Fields)>>>,
    spans: Arc<Mutex<HashMap<u64, Fields>>>,
}

impl<S> Layer<S> for Captured
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        if attrs.metadata().name() == "rpc" {
            let mut v = FieldVisitor::default();
            attrs.record(&mut v);
            if let Ok(mut spans) = self.spans.lock() {
                spans.insert(id.into_u64(), v.0);
            }
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut v = FieldVisitor::default();
        values.record(&mut v);
        if let Ok(mut spans) = self.spans.lock()
            && let Some(fields) = spans.get_mut(&id.into_u64())
        {
            fields.extend(v.0);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut v = FieldVisitor::default();
        event.record(&mut v);
        let span_fields = ctx
            .event_scope(event)
            .and_then(|scope| {
                scope
                    .into_iter()
                    .find(|s| s.name() == "rpc")
                    .and_then(|s| self.spans.lock().ok()?.get(&s.id().into_u64()).cloned())
            })
            .unwrap_or_default();
        if let Ok(mut events) = self.events.lock() {
            events.push((v.0, span_fields));
        }
    }
}

impl Captured {
    fn finished(&self, request_id: &str) -> Vec<(Fields, Fields)> {
        self.events
            .lock()
            .map(|events| {
                events
                    .iter()
                    .filter(|(e, s)| {
                        e.get("message").map(String::as_str) == Some("rpc finished")
                            && s.get("request_id").map(String::as_str) == Some(request_id)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn with_id(id: &str, definition: &str) -> tonic::Request<ccm_proto::v1::GetDefinitionRequest> {
    let mut request = tonic::Request::new(get(definition));
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii"));
    request
}

#[tokio::test(flavor = "current_thread")]
async fn each_call_is_traced_with_method_request_id_code_and_latency() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = TestServer::start().await;
    let mut client = DefinitionServiceClient::new(server.channel().await);
    client
        .get_definition(with_id("trace-ok", "sleep:30"))
        .await
        .expect("ok");
    let _ = client
        .get_definition(with_id("trace-nf", "error:not_found"))
        .await
        .expect_err("not found");
    let _ = client
        .get_definition(with_id("trace-int", "error:internal"))
        .await
        .expect_err("internal");

    let ok = captured.finished("trace-ok");
    assert_eq!(ok.len(), 1, "exactly one end event per call");
    let (event, span) = &ok[0];
    assert_eq!(event.get("grpc.code").map(String::as_str), Some("OK"));
    let latency: f64 = event
        .get("latency_ms")
        .and_then(|l| l.parse().ok())
        .expect("latency recorded");
    assert!(
        latency >= 30.0,
        "latency covers the 30 ms handler: {latency}"
    );
    assert_eq!(
        span.get("rpc.method").map(String::as_str),
        Some("/ccm.v1.DefinitionService/GetDefinition")
    );
    assert_eq!(
        span.get("grpc.code").map(String::as_str),
        Some("OK"),
        "recorded on the span"
    );

    let nf = captured.finished("trace-nf");
    assert_eq!(nf.len(), 1);
    assert_eq!(
        nf[0].0.get("grpc.code").map(String::as_str),
        Some("NOT_FOUND")
    );

    // The internal error is logged inside the call's span, with its cause; the end event says
    // INTERNAL.
    let events = captured.events.lock().expect("lock").clone();
    let logged = events
        .iter()
        .find(|(e, s)| {
            e.get("message").map(String::as_str) == Some("internal error")
                && s.get("request_id").map(String::as_str) == Some("trace-int")
        })
        .expect("the internal error is logged in the call's span");
    assert!(
        logged
            .0
            .get("cause")
            .is_some_and(|c| c.contains("disk on fire"))
    );
    assert_eq!(
        captured.finished("trace-int")[0]
            .0
            .get("grpc.code")
            .map(String::as_str),
        Some("INTERNAL")
    );
    server.stop().await.expect("clean stop");
}
