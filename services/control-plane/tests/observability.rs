//! Observability of the control plane: audit records carry the W3C trace id of the call that
//! wrote them; the retention job purges old audit and scaling entries (real SQLite store) and
//! counts them; `run` serves `/metrics` (real HTTP) with the gRPC and purge metrics; the
//! configuration keys of both.

use std::sync::Arc;
use std::time::Duration;

use ccm_control_plane::config::{self, AuditConfig, ConfigLoader, ControlPlaneConfig};
use ccm_control_plane::error::ControlPlaneError;
use ccm_control_plane::run::{METRIC_LOG_PURGED, METRIC_LOG_PURGES, Retention};
use ccm_control_plane::testing::TestPlane;
use ccm_proto::v1 as pb;
use ccm_proto::v1::event_service_client::EventServiceClient;
use ccm_proto::v1::template_service_client::TemplateServiceClient;
use ccm_runtime::metrics::Metrics;
use ccm_store::{LogEntry, LogKind, LogQuery, SqliteStore, Store, Write};
use chrono::Utc;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

fn template(name: &str) -> pb::WorkerTemplate {
    pb::WorkerTemplate {
        name: name.into(),
        description: "Metal worker".into(),
        instance_type: "m5zn.metal".into(),
        capacity: Some(pb::WorkerCapacity {
            cpu_cores: 48,
            memory_gb: 192,
            storage_gb: 500,
            max_nodes: 20,
        }),
        license_type: pb::LicenseType::Enterprise as i32,
        ami_pattern: "CML-2.9.*".into(),
        regions: vec!["us-east-1".into()],
        ..Default::default()
    }
}

async fn audit_of(plane: &TestPlane, resource_id: &str) -> pb::AuditRecord {
    let mut events = EventServiceClient::new(plane.channel().await.expect("connects"));
    let records = events
        .list_audit_records(pb::ListAuditRecordsRequest {
            resource_id: resource_id.into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .records;
    assert_eq!(records.len(), 1, "{records:?}");
    records.into_iter().next().expect("one")
}

#[tokio::test]
async fn audit_records_carry_the_w3c_trace_id_of_the_call() {
    let plane = TestPlane::start().await.expect("plane starts");
    let mut templates = TemplateServiceClient::new(plane.channel().await.expect("connects"));

    let mut request = tonic::Request::new(pb::CreateTemplateRequest {
        template: Some(template("traced")),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-b7ad6b7169203331-01")
            .parse()
            .expect("ascii"),
    );
    request
        .metadata_mut()
        .insert("x-request-id", "req-traced".parse().expect("ascii"));
    templates.create_template(request).await.expect("created");
    let record = audit_of(&plane, "traced").await;
    assert_eq!(record.trace_id, TRACE, "{record:?}");
    assert_eq!(record.method, "/ccm.v1.TemplateService/CreateTemplate");

    // Without traceparent: the trace the call started, not the request id.
    let response = templates
        .create_template(pb::CreateTemplateRequest {
            template: Some(template("untraced")),
        })
        .await
        .expect("created");
    let request_id = response
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("request id echoed")
        .to_owned();
    let record = audit_of(&plane, "untraced").await;
    assert_eq!(record.trace_id.len(), 32, "{record:?}");
    assert!(record.trace_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(record.trace_id, TRACE);
    assert_ne!(record.trace_id, request_id);
    plane.stop().await.expect("stops");
}

fn entry(id: &str, days_ago: i64) -> LogEntry {
    let mut e = LogEntry::new(
        "instance",
        id,
        "user:alice",
        "instance.create",
        ccm_store::Body::from_json_text("{}").expect("json"),
    );
    e.at = Utc::now() - chrono::Duration::days(days_ago);
    e
}

async fn ids(store: &Arc<dyn Store>, log: LogKind) -> Vec<String> {
    let mut out: Vec<String> = store
        .list_log(
            log,
            LogQuery {
                page_size: 100,
                ..Default::default()
            },
        )
        .await
        .expect("list")
        .entries
        .into_iter()
        .map(|e| e.resource_id)
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn the_retention_job_purges_old_entries_of_both_logs_and_counts_them() {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().expect("store"));
    for (log, id, days) in [
        (LogKind::Audit, "a-old", 200),
        (LogKind::Audit, "a-mid", 120),
        (LogKind::Audit, "a-new", 1),
        (LogKind::ScalingDecision, "s-old", 300),
        (LogKind::ScalingDecision, "s-mid", 120),
    ] {
        store
            .apply(vec![Write::append(log, entry(id, days))])
            .await
            .expect("append");
    }
    let metrics = Metrics::new();
    let retention = Retention::new(
        store.clone(),
        &AuditConfig {
            retention: Duration::from_secs(100 * 24 * 3600),
            scaling_retention: Duration::from_secs(200 * 24 * 3600),
            purge_interval: Duration::from_secs(3600),
        },
        &metrics,
    )
    .expect("retention");

    let report = retention.purge_once(Utc::now()).await;
    assert_eq!(report.deleted(LogKind::Audit), 2, "{report:?}");
    assert_eq!(report.deleted(LogKind::ScalingDecision), 1, "{report:?}");
    assert_eq!(ids(&store, LogKind::Audit).await, ["a-new"]);
    assert_eq!(ids(&store, LogKind::ScalingDecision).await, ["s-mid"]);

    let purged = metrics
        .counter(
            METRIC_LOG_PURGED,
            "Audit and scaling-log entries deleted past their retention, by log.",
            &["log"],
        )
        .expect("same series");
    assert_eq!(purged.get(&["audit"]), 2);
    assert_eq!(purged.get(&["scaling_decision"]), 1);

    // Nothing left to purge: zero, and another successful run.
    let report = retention.purge_once(Utc::now()).await;
    assert_eq!(report.deleted(LogKind::Audit), 0);
    let runs = metrics
        .counter(
            METRIC_LOG_PURGES,
            "Retention purges run, by log and outcome (ok, error).",
            &["log", "outcome"],
        )
        .expect("same series");
    assert_eq!(runs.get(&["audit", "ok"]), 2);

    // A retention under the store's floor (only possible when built in code, the
    // configuration refuses it) fails, deletes nothing and is counted as an error.
    let reckless = Retention::new(
        store.clone(),
        &AuditConfig {
            retention: Duration::from_secs(24 * 3600),
            ..AuditConfig::default()
        },
        &metrics,
    )
    .expect("retention");
    let report = reckless.purge_once(Utc::now()).await;
    assert!(
        report
            .logs
            .iter()
            .any(|(log, r)| *log == LogKind::Audit && r.is_err()),
        "{report:?}"
    );
    assert_eq!(ids(&store, LogKind::Audit).await, ["a-new"]);
    assert_eq!(runs.get(&["audit", "error"]), 1);
}

#[tokio::test]
async fn the_retention_job_stops_when_told() {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().expect("store"));
    store
        .apply(vec![Write::append(LogKind::Audit, entry("old", 200))])
        .await
        .expect("append");
    let metrics = Metrics::new();
    let retention =
        Retention::new(store.clone(), &AuditConfig::default(), &metrics).expect("retention");
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(retention.run(Duration::from_secs(3600), stop.clone()));
    // The first purge runs at once.
    let runs = metrics
        .counter(
            METRIC_LOG_PURGES,
            "Retention purges run, by log and outcome (ok, error).",
            &["log", "outcome"],
        )
        .expect("same series");
    for _ in 0..500 {
        if runs.get(&["scaling_decision", "ok"]) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(runs.get(&["audit", "ok"]), 1);
    // 200 days is younger than the default retention (365 days): kept.
    assert_eq!(ids(&store, LogKind::Audit).await, ["old"]);
    stop.cancel();
    task.await.expect("the job ends when cancelled");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

fn free_port() -> u16 {
    ccm_testkit::ports::free_port().expect("a free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_metrics_with_grpc_and_purge_series() {
    let (grpc, metrics_port) = (free_port(), free_port());
    let config = ConfigLoader::new()
        .env([
            ("CCM_LISTEN_ADDR", format!("127.0.0.1:{grpc}")),
            ("CCM_METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
            ("CCM_AUTH__INSECURE_NO_AUTH", "true".to_owned()),
            ("CCM_STORE__SQLITE_PATH", ":memory:".to_owned()),
            ("CCM_SHUTDOWN_GRACE_PERIOD", "1s".to_owned()),
        ])
        .load()
        .expect("valid");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        ccm_control_plane::run::run(&config, async move {
            let _ = rx.await;
        })
        .await
    });
    assert!(
        ccm_testkit::ports::wait_for_port(grpc, Duration::from_secs(20)),
        "gRPC came up"
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    TemplateServiceClient::new(channel)
        .list_templates(pb::ListTemplatesRequest::default())
        .await
        .expect("listed");

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let mut body = String::new();
    for _ in 0..200 {
        body = http_get(addr, "/metrics").await;
        if body
            .contains("ccm_control_plane_log_purges_total{log=\"scaling_decision\",outcome=\"ok\"}")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(
            "ccm_grpc_server_requests_total{service=\"ccm.v1.TemplateService\",method=\"ListTemplates\",code=\"OK\"}"
        ),
        "{body}"
    );
    assert!(
        body.contains("ccm_control_plane_log_purges_total{log=\"audit\",outcome=\"ok\"}"),
        "{body}"
    );
    let _ = tx.send(());
    task.await.expect("join").expect("clean stop");
    // Stopped: the metrics port is closed too.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_busy_metrics_address_stops_start_up_with_the_key_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr");
    let config = ConfigLoader::new()
        .env([
            ("CCM_LISTEN_ADDR", format!("127.0.0.1:{}", free_port())),
            ("CCM_METRICS_ADDR", busy.to_string()),
            ("CCM_AUTH__INSECURE_NO_AUTH", "true".to_owned()),
            ("CCM_STORE__SQLITE_PATH", ":memory:".to_owned()),
        ])
        .load()
        .expect("valid");
    let err = ccm_control_plane::run::run(&config, std::future::pending())
        .await
        .expect_err("metrics address in use");
    assert!(
        err.to_string().contains("metrics_addr") && err.to_string().contains(&busy.to_string()),
        "{err}"
    );
}

fn load(vars: &[(&str, &str)]) -> Result<ControlPlaneConfig, ControlPlaneError> {
    let mut env: Vec<(String, String)> = vec![("CCM_AUTH__INSECURE_NO_AUTH".into(), "true".into())];
    env.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    ConfigLoader::new().env(env).load()
}

#[test]
fn observability_keys_have_defaults_and_are_validated() {
    let d = load(&[]).expect("defaults");
    assert_eq!(d.metrics_addr, Some(config::DEFAULT_METRICS_ADDR));
    assert_eq!(d.audit, AuditConfig::default());
    assert_eq!(d.audit.retention, config::DEFAULT_AUDIT_RETENTION);
    // The configuration's bounds are the store's.
    assert_eq!(
        chrono::Duration::from_std(config::MIN_AUDIT_RETENTION).expect("fits"),
        LogKind::Audit.min_retention()
    );
    assert_eq!(
        chrono::Duration::from_std(config::MAX_AUDIT_RETENTION).expect("fits"),
        LogKind::Audit.max_retention()
    );
    assert_eq!(
        chrono::Duration::from_std(config::DEFAULT_AUDIT_RETENTION).expect("fits"),
        LogKind::Audit.default_retention()
    );
    assert_eq!(
        chrono::Duration::from_std(config::MIN_SCALING_RETENTION).expect("fits"),
        LogKind::ScalingDecision.min_retention()
    );
    assert_eq!(
        chrono::Duration::from_std(config::MAX_SCALING_RETENTION).expect("fits"),
        LogKind::ScalingDecision.max_retention()
    );

    for off in ["none", "off", "0", ""] {
        assert_eq!(
            load(&[("CCM_METRICS_ADDR", off)]).expect(off).metrics_addr,
            None
        );
    }
    let c = load(&[
        ("CCM_METRICS_ADDR", "0.0.0.0:9100"),
        ("CCM_AUDIT__RETENTION", "2160h"),
        ("CCM_AUDIT__SCALING_RETENTION", "4000h"),
        ("CCM_AUDIT__PURGE_INTERVAL", "10m"),
    ])
    .expect("valid");
    assert_eq!(c.metrics_addr, Some("0.0.0.0:9100".parse().expect("addr")));
    assert_eq!(c.audit.retention, Duration::from_secs(90 * 24 * 3600));
    assert_eq!(c.audit.purge_interval, Duration::from_secs(600));
    // The printed configuration reads back the same.
    let again = ConfigLoader::new()
        .file_text("/printed.toml", c.effective_toml())
        .load()
        .expect("valid");
    assert_eq!(again, c);
    assert!(c.effective_toml().contains("[audit]"));
    let off = load(&[("CCM_METRICS_ADDR", "none")]).expect("valid");
    let again = ConfigLoader::new()
        .file_text("/printed.toml", off.effective_toml())
        .load()
        .expect("valid");
    assert_eq!(again.metrics_addr, None);

    for (var, value, key) in [
        ("CCM_METRICS_ADDR", "localhost:9464", "metrics_addr"),
        ("CCM_AUDIT__RETENTION", "24h", "audit.retention"),
        ("CCM_AUDIT__RETENTION", "9000h", "audit.retention"),
        (
            "CCM_AUDIT__SCALING_RETENTION",
            "1h",
            "audit.scaling_retention",
        ),
        ("CCM_AUDIT__PURGE_INTERVAL", "10s", "audit.purge_interval"),
        ("CCM_AUDIT__PURGE_INTERVAL", "48h", "audit.purge_interval"),
        ("CCM_AUDIT__PURGE_INTERVAL", "soon", "audit.purge_interval"),
    ] {
        match load(&[(var, value)]) {
            Err(ControlPlaneError::InvalidConfig {
                key: k,
                source_name,
                ..
            }) => {
                assert_eq!(k, key, "{var}={value}");
                assert!(source_name.contains(var), "{source_name}");
            }
            other => panic!("{var}={value}: expected an invalid value, got {other:?}"),
        }
    }
    assert!(
        matches!(
            load(&[("CCM_AUDIT__RETENTON", "2160h")]),
            Err(ControlPlaneError::InvalidConfig { .. })
        ),
        "a typo in the [audit] section is an error"
    );
    match load(&[
        ("CCM_LISTEN_ADDR", "127.0.0.1:7000"),
        ("CCM_METRICS_ADDR", "127.0.0.1:7000"),
    ]) {
        Err(ControlPlaneError::ConfigConflict { message }) => {
            assert!(message.contains("metrics_addr"), "{message}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}
