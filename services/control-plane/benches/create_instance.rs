//! Load benchmark of `InstanceService.CreateInstance` over loopback gRPC on a file-backed
//! SQLite store: CONCURRENCY clients book instances for DURATION; prints one JSON object with
//! the sustained rate and the latency percentiles.
//!
//! Target (issue "Control plane"): ≥ 2,000 bookings/s sustained with p99 ≤ 5 ms.
//! Run: `cargo bench -p ccm-control-plane --bench create_instance`
//! (env `CCM_BENCH_SECONDS`, `CCM_BENCH_CONCURRENCY` to change the defaults).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ccm_control_plane::record::Mutation;
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_proto::v1 as pb;
use ccm_proto::v1::instance_service_client::InstanceServiceClient;
use ccm_store::SqliteStore;

/// Default measuring time.
const DEFAULT_SECONDS: u64 = 10;
/// Default number of concurrent clients.
const DEFAULT_CONCURRENCY: usize = 16;
/// Requests before measuring starts (connection setup, caches).
const WARM_UP_REQUESTS: usize = 200;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn definition(now: chrono::DateTime<chrono::Utc>) -> pb::LabletDefinition {
    let mut d = pb::LabletDefinition {
        id: "bench-definition".into(),
        version: "1.0.0".into(),
        name: "bench-lab".into(),
        lab_artifact_uri: "file:///dev/null".into(),
        lab_yaml_hash: format!("sha256:{}", "0".repeat(64)),
        resource_requirements: Some(pb::ResourceRequirements {
            cpu_cores: 4,
            memory_gb: 16,
            storage_gb: 30,
            ..Default::default()
        }),
        license_affinity: vec![pb::LicenseType::Personal as i32],
        node_count: 5,
        port_template: Some(pb::PortTemplate {
            ports: vec![pb::PortDefinition {
                name: "serial_1".into(),
                protocol: pb::PortProtocol::Tcp as i32,
            }],
        }),
        max_duration: Some(prost_types::Duration {
            seconds: 8 * 3600,
            nanos: 0,
        }),
        created_at: Some(ccm_control_plane::convert::timestamp_to_proto(now)),
        created_by: "bench".into(),
        ..Default::default()
    };
    d.set_status(pb::DefinitionStatus::Active);
    d
}

fn request(now: chrono::DateTime<chrono::Utc>, n: u64) -> pb::CreateInstanceRequest {
    let start = now + chrono::Duration::hours(1) + chrono::Duration::seconds((n % 3600) as i64);
    pb::CreateInstanceRequest {
        definition_id: "bench-definition".into(),
        time_slot: Some(pb::TimeSlot {
            start: Some(ccm_control_plane::convert::timestamp_to_proto(start)),
            end: Some(ccm_control_plane::convert::timestamp_to_proto(
                start + chrono::Duration::hours(2),
            )),
            asap: false,
        }),
        reservation_id: format!("bench-{n}"),
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds = env_or("CCM_BENCH_SECONDS", DEFAULT_SECONDS);
    let concurrency = env_or("CCM_BENCH_CONCURRENCY", DEFAULT_CONCURRENCY);
    let dir = std::env::temp_dir().join(format!("ccm-bench-create-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(SqliteStore::open(dir.join("bench.sqlite3"))?);
    let plane = TestPlane::start_with(TestOptions {
        store: Some(store),
        ..Default::default()
    })
    .await?;
    let now = plane.app.now();
    let mut m = Mutation::at(now);
    let mut def = definition(now);
    m.create(&mut def, vec![])?;
    plane.app.commit(m).await?;

    let channel = plane.channel().await?;
    let mut warm = InstanceServiceClient::new(channel.clone());
    for n in 0..WARM_UP_REQUESTS as u64 {
        warm.create_instance(request(now, n)).await?;
    }

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let mut client = InstanceServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut n = 1_000_000 * (c as u64 + 1);
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.create_instance(request(now, n)).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                n += 1;
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "create_instance",
            "store": "sqlite (file, WAL)",
            "concurrency": concurrency,
            "seconds": elapsed,
            "requests": latencies.len(),
            "errors": errors,
            "rate_per_s": latencies.len() as f64 / elapsed,
            "p50_ms": percentile(&latencies, 0.50),
            "p99_ms": percentile(&latencies, 0.99),
            "max_ms": percentile(&latencies, 1.0),
        })
    );
    plane.stop().await?;
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
