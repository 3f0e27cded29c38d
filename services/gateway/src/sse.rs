//! Server-streaming RPCs as Server-Sent Events (the change feed: `EventService.WatchEvents`).
//!
//! Each stream item becomes one SSE event: the `event:` name is the JSON name of the item's
//! set oneof field (`change`, `bookmark`, `reset`), `data:` is that field as canonical proto3
//! JSON, and `id:` is its `revision` (not for `reset`). A browser that reconnects sends the last
//! id as `Last-Event-ID`, which becomes the watch's `since_revision`, so it resumes without a
//! gap. A `reset` event means events were lost: re-list, then watch again from its
//! `currentRevision`; the stream ends after it. The gateway sends a comment line every
//! [`DEFAULT_HEARTBEAT`] so that proxies keep the connection open. A gRPC error after the
//! stream started is sent as an `error` event carrying a problem document, then the stream
//! ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, header};
use prost_reflect::{DynamicMessage, ReflectMessage, Value};
use tonic::client::Grpc;
use tonic::metadata::{Ascii, MetadataKey, MetadataValue};
use tonic::transport::Channel;

use crate::codec::DynamicCodec;
use crate::problem::Problem;
use crate::routes::Route;
use crate::server::{grpc_path, grpc_request};
use crate::transcode::serialize_options;

/// Interval of the heartbeat comments (`: heartbeat`) on an idle stream.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// The reconnection delay suggested to browsers (`retry:`).
pub const RECONNECT_DELAY: Duration = Duration::from_secs(3);
/// The RPC relayed at `/v1/events:stream`.
pub const WATCH_METHOD: &str = "ccm.v1.EventService.WatchEvents";
/// The request field `Last-Event-ID` sets.
pub const RESUME_FIELD: &str = "since_revision";
/// The item field that becomes the SSE `id:`.
pub const ID_FIELD: &str = "revision";
/// The SSE event that tells the client to re-list (no `id:`; the stream ends after it).
pub const RESET_EVENT: &str = "reset";
/// The SSE event of an error after the stream started (a problem document).
pub const ERROR_EVENT: &str = "error";
/// The text of the heartbeat comment.
pub const HEARTBEAT_TEXT: &str = "heartbeat";

/// Sets the request's [`RESUME_FIELD`] from a `Last-Event-ID` header, when both exist.
pub fn apply_last_event_id(
    message: &mut DynamicMessage,
    headers: &HeaderMap,
) -> Result<(), Problem> {
    let Some(raw) = headers.get("last-event-id") else {
        return Ok(());
    };
    let raw = raw.to_str().unwrap_or("").trim();
    if raw.is_empty() {
        return Ok(());
    }
    let Some(field) = message.descriptor().get_field_by_name(RESUME_FIELD) else {
        return Ok(());
    };
    let revision: i64 = raw.parse().map_err(|_| {
        Problem::field(
            "Last-Event-ID",
            format!("{raw:?} is not a revision (an integer)"),
        )
    })?;
    message.set_field(&field, Value::I64(revision));
    Ok(())
}

/// Turns one stream item into an SSE event; `true` when the stream must end after it.
fn to_event(item: &DynamicMessage) -> (Event, bool) {
    let set = item
        .descriptor()
        .oneofs()
        .flat_map(|o| o.fields().collect::<Vec<_>>())
        .find(|f| item.has_field(f));
    let Some(field) = set else {
        let data = json_of(item);
        return (Event::default().event("message").data(data), false);
    };
    let name = field.json_name().to_owned();
    let value = item.get_field(&field);
    let (data, id) = match value.as_ref() {
        Value::Message(inner) => {
            let id = inner
                .descriptor()
                .get_field_by_name(ID_FIELD)
                .map(|f| inner.get_field(&f).as_i64().unwrap_or_default());
            (json_of(inner), id)
        }
        other => (
            serde_json::to_string(&format!("{other:?}")).unwrap_or_default(),
            None,
        ),
    };
    let reset = name == RESET_EVENT;
    let mut event = Event::default().event(&name).data(data);
    if let Some(id) = id.filter(|_| !reset) {
        event = event.id(id.to_string());
    }
    (event, reset)
}

fn json_of(message: &DynamicMessage) -> String {
    message
        .serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .ok()
        .and_then(|v| serde_json::to_string(&v).ok())
        .unwrap_or_else(|| "{}".to_owned())
}

fn error_event(status: &tonic::Status) -> Event {
    let problem = Problem::from_status(status);
    Event::default()
        .event(ERROR_EVENT)
        .data(serde_json::to_string(&problem).unwrap_or_default())
}

/// Opens the server stream of `route` and answers with an SSE response. An error before the
/// first item is answered as a problem document with its HTTP status.
pub async fn relay(
    channel: Channel,
    route: &Route,
    message: DynamicMessage,
    metadata: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
    heartbeat: Duration,
) -> Result<Response, Problem> {
    let path = grpc_path(route)?;
    let request = grpc_request(message, metadata);
    let mut grpc = Grpc::new(channel);
    grpc.ready().await.map_err(|e| {
        Problem::from_status(&tonic::Status::unavailable(format!(
            "backend not reachable: {e}"
        )))
    })?;
    let codec = DynamicCodec::new(route.rpc.output());
    let stream = grpc
        .server_streaming(request, path, codec)
        .await
        .map_err(|s| Problem::from_status(&s))?
        .into_inner();
    // The call returns once the backend answered with headers: a refusal (trailers-only
    // answer: unauthenticated, permission denied, bad request) is an error here and gets its
    // HTTP status; later errors travel as `error` events.
    let retry = futures::stream::iter(vec![Ok::<_, Infallible>(
        Event::default().retry(RECONNECT_DELAY),
    )]);
    let events = retry.chain(items(stream, false));
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(heartbeat).text(HEARTBEAT_TEXT))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn items(
    stream: tonic::Streaming<DynamicMessage>,
    done: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((stream, done), |(mut stream, done)| async move {
        if done {
            return None;
        }
        match stream.message().await {
            Ok(Some(item)) => {
                let (event, last) = to_event(&item);
                Some((Ok(event), (stream, last)))
            }
            Ok(None) => None,
            Err(status) => Some((Ok(error_event(&status)), (stream, true))),
        }
    })
}
