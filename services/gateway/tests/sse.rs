//! The change feed as Server-Sent Events, against a real control plane.

mod common;

use std::time::Duration;

use common::{call, http, plane_and_gateway, template_json};
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;

/// One parsed SSE event (comments are kept as event "comment").
#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: String,
}

/// Reads SSE events from a response until `until` accepts one or `limit` passes.
struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            stream: resp.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut only_comment = true;
                let mut only_retry = true;
                for line in block.lines().filter(|l| !l.is_empty()) {
                    if let Some(c) = line.strip_prefix(':') {
                        ev.data = c.trim().to_owned();
                        ev.event = "comment".into();
                        continue;
                    }
                    only_comment = false;
                    if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_owned();
                        only_retry = false;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        ev.data.push_str(v.trim_start());
                        only_retry = false;
                    }
                }
                if !only_comment && only_retry {
                    continue; // the `retry:` line
                }
                return Some(ev);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(15), self.stream.next())
                .await
                .ok()??
                .ok()?;
            self.buffer
                .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
        }
    }

    async fn next_matching(&mut self, pred: impl Fn(&SseEvent) -> bool) -> SseEvent {
        for _ in 0..200 {
            let ev = self.next_event().await.expect("the stream ended early");
            if pred(&ev) {
                return ev;
            }
        }
        panic!("no matching event in 200 events");
    }
}

fn template_change(ev: &SseEvent, name: &str) -> bool {
    if ev.event != "change" {
        return false;
    }
    let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
    v["template"]["name"] == name
}

#[tokio::test]
async fn events_arrive_resume_from_last_event_id_and_heartbeats_flow() {
    let (_plane, gw) = plane_and_gateway().await;
    let client = http();
    let resp = client
        .get(gw.url("/v1/events:stream?kinds=RESOURCE_KIND_TEMPLATE"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let mut reader = SseReader::new(resp);

    let (status, _, _) = call(
        &client,
        Method::POST,
        &gw.url("/v1/templates"),
        Some(template_json("sse-one")),
    )
    .await;
    assert_eq!(status, 200);
    let first = reader
        .next_matching(|e| template_change(e, "sse-one"))
        .await;
    let data: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(data["kind"], "RESOURCE_KIND_TEMPLATE");
    assert_eq!(data["type"], "CHANGE_TYPE_ADDED");
    let id = first
        .id
        .clone()
        .expect("a change carries its revision as id");
    assert_eq!(data["revision"].as_str(), Some(id.as_str()));

    // Heartbeat comments on an idle stream (1 s in these tests).
    let beat = reader.next_matching(|e| e.event == "comment").await;
    assert_eq!(beat.data, ccm_gateway::sse::HEARTBEAT_TEXT);
    drop(reader);

    // While disconnected, a second template is created; resuming from the last id delivers it
    // and not the first one again.
    let (status, _, _) = call(
        &client,
        Method::POST,
        &gw.url("/v1/templates"),
        Some(template_json("sse-two")),
    )
    .await;
    assert_eq!(status, 200);
    let resp = client
        .get(gw.url("/v1/events:stream?kinds=RESOURCE_KIND_TEMPLATE"))
        .header("last-event-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = SseReader::new(resp);
    let next = reader.next_matching(|e| e.event == "change").await;
    assert!(template_change(&next, "sse-two"), "{next:?}");
    let next_id: i64 = next.id.unwrap().parse().unwrap();
    assert!(next_id > id.parse::<i64>().unwrap());
}

#[tokio::test]
async fn the_contract_route_streams_too_and_bad_resume_ids_are_refused() {
    let (_plane, gw) = plane_and_gateway().await;
    let client = http();
    // The contract's own route of WatchEvents, with the initial state.
    let (status, _, _) = call(
        &client,
        Method::POST,
        &gw.url("/v1/templates"),
        Some(template_json("sse-initial")),
    )
    .await;
    assert_eq!(status, 200);
    let resp = client
        .get(gw.url("/v1/events:watch?kinds=RESOURCE_KIND_TEMPLATE&sendInitialState=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = SseReader::new(resp);
    reader
        .next_matching(|e| template_change(e, "sse-initial"))
        .await;
    let done = reader.next_matching(|e| e.event == "bookmark").await;
    let v: Value = serde_json::from_str(&done.data).unwrap();
    assert_eq!(v["initialStateDone"], true, "{v}");

    let (status, _, p) = {
        let resp = client
            .get(gw.url("/v1/events:stream"))
            .header("last-event-id", "not-a-number")
            .send()
            .await
            .unwrap();
        let s = resp.status().as_u16();
        (s, (), resp.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 400);
    assert_eq!(p["fieldViolations"][0]["field"], "Last-Event-ID");
    let (status, _, p) = call(
        &client,
        Method::GET,
        &gw.url("/v1/events:stream?kinds=NOT_A_KIND"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(p["fieldViolations"][0]["field"], "kinds");
}
