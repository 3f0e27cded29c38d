//! Scheduler throughput: bookings created → SCHEDULED committed, end to end.
//!
//! A whole control plane (TestPlane) on a temp-file SQLite store, 20 RUNNING workers, N ASAP
//! bookings made through InstanceService before the scheduler starts; then one scheduler
//! replica (in-process coordinator shared with the plane) is started and the time until every
//! booking is SCHEDULED is measured: the initial list, decisions and the fenced batch commits.
//! Prints one JSON line. `cargo bench -p ccm-scheduler --bench throughput [-- N [BATCH]]`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ccm_control_plane::testing::TestOptions;
use ccm_proto::v1 as pb;
use ccm_store::SqliteStore;
use common::*;

/// Bookings placed by default.
const DEFAULT_BOOKINGS: usize = 5000;
/// Workers in the fleet.
const WORKERS: usize = 20;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(DEFAULT_BOOKINGS);
    let batch: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(ccm_scheduler::settings::DEFAULT_BATCH_SIZE);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(n, batch));
}

async fn run(n: usize, batch: usize) {
    let dir = std::env::temp_dir().join(format!("ccm-sched-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = Arc::new(SqliteStore::open(dir.join("ccm.sqlite3")).expect("sqlite"));
    let env = Env::start_with(TestOptions {
        store: Some(store),
        ..TestOptions::default()
    })
    .await;
    // Large workers so that every booking fits at once (1 CPU, 1 GiB, 10 GiB, 5 nodes each).
    put(
        &env.plane,
        pb::WorkerTemplate {
            name: "bench-huge".into(),
            capacity: Some(pb::WorkerCapacity {
                cpu_cores: 1000,
                memory_gb: 4000,
                storage_gb: 100_000,
                max_nodes: 10_000,
            }),
            ..template()
        },
    )
    .await;
    for w in 0..WORKERS {
        env.running_worker_of(&format!("bench-{w:02}"), "bench-huge")
            .await;
    }
    let def = definition(&env, LAB, 1, 1).await;
    let booking_started = Instant::now();
    let end = env.now() + chrono::Duration::hours(2);
    // Bookings from 8 concurrent clients (booking speed is not what is measured).
    let per = n.div_ceil(8);
    let mut tasks = Vec::new();
    for c in 0..8 {
        let client = env.client.clone();
        let def = def.clone();
        let count = per.min(n.saturating_sub(c * per));
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                book_with(&client, &def, end).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("booking task");
    }
    let booked_in = booking_started.elapsed();

    let scheduler = env.scheduler(ccm_scheduler::SchedulerSettings {
        batch_size: batch,
        relist_interval: Duration::from_secs(600),
        ..env.settings("bench")
    });
    let started = Instant::now();
    let (stop, task) = spawn(&scheduler);
    loop {
        let s = scheduler.status();
        if usize::try_from(s.placements_total).unwrap_or(0) >= n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "placement stalled: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let status = scheduler.status();
    stop.cancel();
    task.await.expect("scheduler stops");
    let placed = check_no_overcommit_any(&env).await;
    let cycle = status.last_cycle.clone();
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "scheduler_created_to_scheduled",
            "store": "sqlite-file",
            "bookings": n,
            "workers": WORKERS,
            "batch_size": batch,
            "booking_seconds": booked_in.as_secs_f64(),
            "seconds": elapsed.as_secs_f64(),
            "placements_per_second": n as f64 / elapsed.as_secs_f64(),
            "cycles": status.cycles_total,
            "placed_verified": placed,
            "last_cycle": cycle.map(|c| serde_json::json!({
                "trigger": c.trigger.as_str(),
                "considered": c.considered,
                "placed": c.placed,
                "commit_batches": c.commit_batches,
                "decide_ms": c.decide_duration.as_secs_f64() * 1000.0,
                "commit_ms": c.commit_duration.as_secs_f64() * 1000.0,
            })),
        })
    );
    drop(env);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every booking SCHEDULED once, ports unique per worker.
async fn check_no_overcommit_any(env: &Env) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut placed = 0;
    for i in env.all_instances().await {
        assert_eq!(i.state(), pb::InstanceState::Scheduled, "{}", i.id);
        for p in i.allocated_ports.values() {
            assert!(
                seen.insert((i.worker_id.clone(), *p)),
                "port {p} twice on {}",
                i.worker_id
            );
        }
        placed += 1;
    }
    placed
}
