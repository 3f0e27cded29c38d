//! Gateway GET latency under an open-loop load: a real control plane (TestPlane, SQLite in
//! memory) behind a real gateway, both on loopback, and a load generator of our own that sends
//! `GET /v1/templates/{name}` at a fixed rate whatever the answers' latency (each request starts
//! at its scheduled time; latency is measured from that time, so a stall is not hidden by
//! coordinated omission). Prints one JSON object.
//!
//! ```sh
//! cargo bench -p ccm-gateway --bench gateway_get            # 1,000 req/s for 10 s
//! CCM_BENCH_RATE=2000 CCM_BENCH_SECS=5 cargo bench -p ccm-gateway --bench gateway_get
//! ```

use std::time::{Duration, Instant};

use ccm_control_plane::testing::TestPlane;
use ccm_gateway::{Gateway, GatewaySettings};

/// Target rate (requests per second) unless `CCM_BENCH_RATE` says otherwise.
const DEFAULT_RATE: u64 = 1_000;
/// Measured duration (seconds) unless `CCM_BENCH_SECS` says otherwise.
const DEFAULT_SECS: u64 = 10;
/// Warm-up requests before measuring (connections opened, caches filled).
const WARM_UP: usize = 500;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted[idx].as_secs_f64() * 1000.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let rate = env_u64("CCM_BENCH_RATE", DEFAULT_RATE).max(1);
    let secs = env_u64("CCM_BENCH_SECS", DEFAULT_SECS).max(1);
    let plane = TestPlane::start().await.expect("test plane");
    let bound = Gateway::bind(GatewaySettings::insecure(format!("http://{}", plane.addr)))
        .await
        .expect("gateway");
    let addr = bound.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(bound.run(async move {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let template = serde_json::json!({
        "name": "bench-small",
        "instanceType": "m5zn.metal",
        "licenseType": "LICENSE_TYPE_PERSONAL",
        "capacity": {"cpuCores": 48, "memoryGb": 192, "storageGb": 500, "maxNodes": 20},
        "amiPattern": "CML-2.9.*",
        "regions": ["us-east-1"],
        "portRange": {"start": 2000, "end": 9999}
    });
    let created = client
        .post(format!("http://{addr}/v1/templates"))
        .json(&template)
        .send()
        .await
        .expect("create template");
    assert!(created.status().is_success(), "seeding failed");
    let url = format!("http://{addr}/v1/templates/bench-small");
    for _ in 0..WARM_UP {
        let r = client.get(&url).send().await.expect("warm-up");
        let _ = r.bytes().await;
    }

    let total = rate * secs;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now() + Duration::from_millis(50);
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let client = client.clone();
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = match client.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            let done = Instant::now();
            (ok, done - scheduled, done - sent)
        }));
    }
    let mut from_schedule = Vec::with_capacity(handles.len());
    let mut service = Vec::with_capacity(handles.len());
    let mut errors = 0u64;
    for h in handles {
        match h.await {
            Ok((ok, a, b)) => {
                if !ok {
                    errors += 1;
                }
                from_schedule.push(a);
                service.push(b);
            }
            Err(_) => errors += 1,
        }
    }
    let elapsed = start.elapsed();
    from_schedule.sort();
    service.sort();
    let report = serde_json::json!({
        "benchmark": "gateway GET /v1/templates/{name} (control plane over gRPC, SQLite in memory, loopback)",
        "target_rate_per_s": rate,
        "duration_s": secs,
        "requests": total,
        "errors": errors,
        "achieved_rate_per_s": (total as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "latency_ms_from_schedule": {
            "p50": percentile(&from_schedule, 50.0),
            "p90": percentile(&from_schedule, 90.0),
            "p99": percentile(&from_schedule, 99.0),
            "p999": percentile(&from_schedule, 99.9),
            "max": percentile(&from_schedule, 100.0),
        },
        "latency_ms_service": {
            "p50": percentile(&service, 50.0),
            "p99": percentile(&service, 99.0),
            "max": percentile(&service, 100.0),
        },
        "target": "p99 <= 10 ms at 1,000 req/s",
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    let _ = stop_tx.send(());
    drop(plane);
}
