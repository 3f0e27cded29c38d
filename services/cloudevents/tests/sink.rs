//! The HTTP sink against real HTTP servers on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use ccm_cloudevents::{
    CloudEvent, DeadLetterFn, EventSink, HttpSink, MemorySink, PublishOutcome, SinkConfig,
    SinkHandle, SinkStats,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// a real sink server
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Behaviour {
    /// The first N requests fail with 500 / 503 alternately.
    fail_first: usize,
    /// Every request answers this status (after `fail_first`).
    always: Option<StatusCode>,
    /// `Retry-After` seconds on failures.
    retry_after: Option<u64>,
    /// Delay before a successful answer.
    delay: Duration,
}

#[derive(Default)]
struct SinkState {
    behaviour: Behaviour,
    requests: AtomicUsize,
    times: Mutex<Vec<Instant>>,
    received: Mutex<Vec<CloudEvent>>,
    content_types: Mutex<Vec<String>>,
}

struct SinkServer {
    addr: SocketAddr,
    state: Arc<SinkState>,
    task: tokio::task::JoinHandle<()>,
}

impl SinkServer {
    async fn start(behaviour: Behaviour) -> SinkServer {
        let state = Arc::new(SinkState {
            behaviour,
            ..SinkState::default()
        });
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        SinkServer { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn received_ids(&self) -> Vec<String> {
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.id.clone())
            .collect()
    }
}

impl Drop for SinkServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(state): State<Arc<SinkState>>, headers: HeaderMap, body: Bytes) -> Response {
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    state.times.lock().unwrap().push(Instant::now());
    let b = &state.behaviour;
    let failure = if n < b.fail_first {
        Some(if n % 2 == 0 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        })
    } else {
        b.always
    };
    if let Some(status) = failure {
        let mut response = (status, "no").into_response();
        if let Some(secs) = b.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
        }
        return response;
    }
    tokio::time::sleep(b.delay).await;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    state.content_types.lock().unwrap().push(content_type);
    match CloudEvent::from_json(&body) {
        Ok(event) => {
            state.received.lock().unwrap().push(event);
            StatusCode::ACCEPTED.into_response()
        }
        Err(err) => (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    }
}

/// A server that accepts connections and never answers.
struct StalledServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl StalledServer {
    async fn start() -> StalledServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        StalledServer { addr, task }
    }
}

impl Drop for StalledServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn event(i: usize) -> CloudEvent {
    CloudEvent::new(
        format!("evt-{i:05}"),
        "ccm/control-plane",
        "ccm.lablet.instance.running",
    )
    .with_subject(format!("inst-{i}"))
    .with_json(json!({ "instance_id": format!("inst-{i}"), "seq": i }))
}

fn config(url: String) -> SinkConfig {
    SinkConfig {
        url: Some(url),
        timeout: Duration::from_secs(5),
        max_attempts: 10,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        queue_capacity: 1024,
    }
}

/// Waits until `done(stats)` holds, failing after `timeout`.
async fn wait_for(
    handle: &SinkHandle,
    timeout: Duration,
    done: impl Fn(&SinkStats) -> bool,
) -> SinkStats {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = handle.stats();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "timed out; stats now {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn retries_then_delivers_every_event_once_in_order() {
    let server = SinkServer::start(Behaviour {
        fail_first: 5,
        ..Behaviour::default()
    })
    .await;
    let (sink, task) = HttpSink::spawn(config(server.url())).unwrap();
    let events: Vec<_> = (0..20).map(event).collect();
    for e in &events {
        assert_eq!(sink.publish(e.clone()), PublishOutcome::Queued);
    }
    let stats = wait_for(&sink, Duration::from_secs(20), |s| s.published == 20).await;

    let want: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        server.received_ids(),
        want,
        "exactly once, in publish order"
    );
    assert_eq!(
        server.state.received.lock().unwrap().clone(),
        events,
        "content intact"
    );
    assert_eq!(stats.retried, 5);
    assert_eq!(stats.enqueued, 20);
    assert_eq!((stats.failed, stats.dropped, stats.invalid), (0, 0, 0));
    assert_eq!(server.requests(), 25);
    assert!(
        server
            .state
            .content_types
            .lock()
            .unwrap()
            .iter()
            .all(|ct| ct == "application/cloudevents+json")
    );

    // Backoff was respected: the 5 retries of the first event waited at least the fixed half
    // of 10, 20, 40, 40, 40 ms.
    let times = server.state.times.lock().unwrap().clone();
    let waited = times[5] - times[0];
    assert!(
        waited >= Duration::from_millis(75),
        "retries came too fast: {waited:?}"
    );

    let final_stats = sink.shutdown(Duration::from_secs(2)).await;
    assert_eq!(final_stats.published, 20);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let server = SinkServer::start(Behaviour {
        fail_first: 1,
        retry_after: Some(1),
        ..Behaviour::default()
    })
    .await;
    let (sink, _task) = HttpSink::spawn(SinkConfig {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_secs(2),
        ..config(server.url())
    })
    .unwrap();
    sink.publish(event(1));
    wait_for(&sink, Duration::from_secs(10), |s| s.published == 1).await;
    let times = server.state.times.lock().unwrap().clone();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= Duration::from_millis(950),
        "{:?}",
        times[1] - times[0]
    );
}

#[tokio::test]
async fn sink_down_publish_returns_at_once_and_events_fail_after_max_attempts() {
    let dead: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let dead_clone = Arc::clone(&dead);
    let callback: DeadLetterFn = Arc::new(move |e: &CloudEvent, reason: &str| {
        dead_clone
            .lock()
            .unwrap()
            .push((e.id.clone(), reason.to_owned()));
    });
    let (sink, _task) = HttpSink::spawn_with_dead_letters(
        SinkConfig {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            ..config(format!("http://127.0.0.1:{}/events", closed_port()))
        },
        Some(callback),
    )
    .unwrap();

    let started = Instant::now();
    for i in 0..5 {
        assert_eq!(sink.publish(event(i)), PublishOutcome::Queued);
    }
    let publishing = started.elapsed();
    assert!(
        publishing < Duration::from_millis(200),
        "publish blocked: {publishing:?}"
    );

    let stats = wait_for(&sink, Duration::from_secs(20), |s| s.failed == 5).await;
    assert_eq!(stats.published, 0);
    assert_eq!(stats.retried, 5 * 2, "3 attempts each = 2 retries each");
    assert_eq!(stats.dropped, 0);
    let dead = dead.lock().unwrap().clone();
    let ids: Vec<_> = dead.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "evt-00000",
            "evt-00001",
            "evt-00002",
            "evt-00003",
            "evt-00004"
        ]
    );
    assert!(
        dead.iter()
            .all(|(_, reason)| reason.contains("after 3 attempts")),
        "{dead:?}"
    );
}

#[tokio::test]
async fn permanent_errors_are_not_retried() {
    let server = SinkServer::start(Behaviour {
        always: Some(StatusCode::BAD_REQUEST),
        ..Behaviour::default()
    })
    .await;
    let (sink, _task) = HttpSink::spawn(config(server.url())).unwrap();
    sink.publish(event(1));
    sink.publish(event(2));
    let stats = wait_for(&sink, Duration::from_secs(10), |s| s.failed == 2).await;
    assert_eq!(stats.retried, 0);
    assert_eq!(stats.published, 0);
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn full_queue_drops_without_blocking() {
    let stalled = StalledServer::start().await;
    let (sink, task) = HttpSink::spawn(SinkConfig {
        queue_capacity: 16,
        timeout: Duration::from_secs(30),
        ..config(format!("http://{}/events", stalled.addr))
    })
    .unwrap();

    let started = Instant::now();
    let mut queued = 0u64;
    let mut dropped = 0u64;
    for i in 0..10_000 {
        match sink.publish(event(i)) {
            PublishOutcome::Queued => queued += 1,
            PublishOutcome::Dropped => dropped += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "publishing 10 000 events took {elapsed:?}"
    );
    assert_eq!(queued + dropped, 10_000);
    // 16 in the queue, plus at most one the delivery task already took out.
    assert!((16..=17).contains(&queued), "queued {queued}");
    let stats = sink.stats();
    assert_eq!(stats.enqueued, queued);
    assert_eq!(stats.dropped, dropped);
    assert!(stats.queue_depth <= 16);

    // The stalled sink never answers: shutdown gives up at the deadline and drops the rest.
    let started = Instant::now();
    let stats = sink.shutdown(Duration::from_millis(200)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stats.published, 0);
    assert_eq!(stats.failed, 0);
    assert_eq!(
        stats.dropped, 10_000,
        "everything is accounted for: {stats:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sink.publish(event(1)), PublishOutcome::Dropped);
}

#[tokio::test]
async fn shutdown_flushes_the_queue() {
    let server = SinkServer::start(Behaviour {
        delay: Duration::from_millis(20),
        ..Behaviour::default()
    })
    .await;
    let (sink, task) = HttpSink::spawn(config(server.url())).unwrap();
    for i in 0..10 {
        sink.publish(event(i));
    }
    let stats = sink.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.published, 10, "{stats:?}");
    assert_eq!(stats.dropped, 0);
    assert_eq!(server.received_ids().len(), 10);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    // Closed for new events.
    assert_eq!(sink.publish(event(99)), PublishOutcome::Dropped);
    assert_eq!(sink.stats().dropped, 1);
}

#[tokio::test]
async fn shutdown_deadline_cuts_retries_short() {
    let server = SinkServer::start(Behaviour {
        always: Some(StatusCode::SERVICE_UNAVAILABLE),
        ..Behaviour::default()
    })
    .await;
    let (sink, task) = HttpSink::spawn(SinkConfig {
        max_attempts: 1000,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(50),
        ..config(server.url())
    })
    .unwrap();
    for i in 0..3 {
        sink.publish(event(i));
    }
    wait_for(&sink, Duration::from_secs(5), |s| s.retried >= 1).await;
    let started = Instant::now();
    let stats = sink.shutdown(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stats.published, 0);
    assert_eq!(stats.failed, 0);
    assert_eq!(
        stats.dropped, 3,
        "the event in flight and the 2 queued: {stats:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn dropping_every_handle_delivers_the_rest_and_ends_the_task() {
    let server = SinkServer::start(Behaviour {
        fail_first: 2,
        ..Behaviour::default()
    })
    .await;
    let (sink, task) = HttpSink::spawn(config(server.url())).unwrap();
    let clone = sink.clone();
    for i in 0..5 {
        clone.publish(event(i));
    }
    drop(clone);
    drop(sink);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.received_ids().len(), 5);
}

#[tokio::test]
async fn no_url_is_a_no_op_sink() {
    let (sink, task) = HttpSink::spawn(SinkConfig::default()).unwrap();
    assert!(!sink.is_enabled());
    assert_eq!(sink.publish(event(1)), PublishOutcome::Skipped);
    assert_eq!(sink.publish(event(2)), PublishOutcome::Skipped);
    let stats = sink.stats();
    assert_eq!(stats.skipped, 2);
    assert_eq!((stats.enqueued, stats.published, stats.dropped), (0, 0, 0));
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    sink.shutdown(Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn invalid_events_are_rejected_not_sent() {
    let server = SinkServer::start(Behaviour::default()).await;
    let (sink, _task) = HttpSink::spawn(config(server.url())).unwrap();
    let mut bad = event(1);
    bad.id.clear();
    assert_eq!(sink.publish(bad), PublishOutcome::Rejected);
    let mut bad = event(2);
    bad.specversion = "0.3".into();
    assert_eq!(sink.publish(bad), PublishOutcome::Rejected);
    sink.publish(event(3));
    let stats = wait_for(&sink, Duration::from_secs(10), |s| s.published == 1).await;
    assert_eq!(stats.invalid, 2);
    assert_eq!(server.received_ids(), ["evt-00003"]);
}

#[tokio::test]
async fn bad_configurations_are_refused() {
    for bad in [
        SinkConfig {
            max_attempts: 0,
            ..SinkConfig::with_url("http://127.0.0.1:1/")
        },
        SinkConfig {
            queue_capacity: 0,
            ..SinkConfig::with_url("http://127.0.0.1:1/")
        },
        SinkConfig::with_url("mailto:ops@example.com"),
    ] {
        assert!(HttpSink::spawn(bad).is_err());
    }
}

#[test]
fn memory_sink_keeps_valid_events_in_order() {
    let sink = MemorySink::new();
    let as_dyn: &dyn EventSink = &sink;
    assert_eq!(as_dyn.publish(event(1)), PublishOutcome::Queued);
    let mut bad = event(2);
    bad.source.clear();
    assert_eq!(as_dyn.publish(bad), PublishOutcome::Rejected);
    assert_eq!(as_dyn.publish(event(3)), PublishOutcome::Queued);
    let ids: Vec<_> = sink.events().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["evt-00001", "evt-00003"]);
    assert_eq!(sink.take().len(), 2);
    assert!(sink.events().is_empty());
}
