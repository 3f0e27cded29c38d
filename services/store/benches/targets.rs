//! The two performance targets of the SQLite store, measured directly with min / median / p95
//! (robust on a shared machine, where criterion's mean moves with other people's builds).
//!
//! Run: `cargo bench -p ccm-store --bench targets`.
//!
//! - single-document creates, one transaction each, sequential, through `Arc<dyn Store>`:
//!   target ≥ 5,000/s;
//! - `apply_each` of 1,000 placements (update an instance at its version + replace its 3 port
//!   claims + append an audit entry, each item all-or-nothing): target ≤ 100 ms.
//!
//! Both on a file-backed store (the embedded default) and, for reference, in memory. The
//! process CPU time (all threads, including the checkpointer) is printed next to the wall time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ccm_store::conformance::TempDir;
use ccm_store::{
    Body, Claim, ClaimChange, DocumentData, IndexFields, Kind, LogEntry, LogKind, SqliteStore,
    Store, Write,
};
use serde_json::json;

const CREATES: usize = 20_000;
const BATCH: usize = 1000;
const BATCHES: usize = 30;
const CREATE_TARGET_PER_S: f64 = 5000.0;
const BATCH_TARGET: Duration = Duration::from_millis(100);

fn body(i: usize, round: u64) -> Body {
    Body::from_serialize(&json!({
        "id": format!("inst-{i:05}"),
        "definitionId": "def-lab-1",
        "ownerId": "user-42",
        "state": "LABLET_INSTANCE_STATE_SCHEDULED",
        "workerId": format!("w-{}", i % 50),
        "timeslot": {"start": "2026-05-01T10:00:00Z", "end": "2026-05-01T12:00:00Z"},
        "round": round,
        "conditions": [{"type": "Scheduled", "status": "True", "reason": "Placed",
                        "message": "placed by the scheduler on the best-fitting worker"}],
        "padding": "x".repeat(600),
    }))
    .expect("body")
}

fn index(i: usize) -> IndexFields {
    IndexFields {
        state: Some("scheduled".into()),
        worker_id: Some(format!("w-{}", i % 50)),
        owner_id: Some("user-42".into()),
        definition_id: Some("def-lab-1".into()),
        sort_key: Some(1_777_000_000_000 + i as i64),
        ..IndexFields::default()
    }
}

fn ports(i: usize, round: u64) -> Vec<Claim> {
    let base = 2000 + (round as usize % 2) * 3;
    (0..3)
        .map(|k| Claim::new("port", format!("w-{}/{}/{}", i % 50, i / 50, base + k)))
        .collect()
}

/// CPU time of the whole process so far.
fn cpu_time() -> Duration {
    // /proc/self/stat fields 14 and 15: utime and stime in clock ticks (100 Hz here).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration, Duration) {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (v[0], p(0.5), p(0.95), v[v.len() - 1])
}

async fn run(name: &str, store: Arc<dyn Store>) {
    // Creates.
    let cpu0 = cpu_time();
    let start = Instant::now();
    for i in 0..CREATES {
        let doc =
            DocumentData::new(Kind::Instance, format!("c-{i:06}"), body(i, 0)).with_index(index(i));
        store.apply(vec![Write::create(doc)]).await.expect("create");
    }
    let wall = start.elapsed();
    let cpu = cpu_time() - cpu0;
    let rate = CREATES as f64 / wall.as_secs_f64();
    println!(
        "{name:<8} create_one        {rate:>8.0}/s  ({:>5.1} µs each, cpu {:>5.1} µs each)  target ≥ {CREATE_TARGET_PER_S:.0}/s: {}",
        wall.as_secs_f64() * 1e6 / CREATES as f64,
        cpu.as_secs_f64() * 1e6 / CREATES as f64,
        if rate >= CREATE_TARGET_PER_S {
            "met"
        } else {
            "MISSED"
        }
    );

    // Placement batches.
    let seed: Vec<Write> = (0..BATCH)
        .map(|i| Write::Create {
            doc: DocumentData::new(Kind::Instance, format!("inst-{i:05}"), body(i, 0))
                .with_index(index(i)),
            claims: ports(i, 0),
        })
        .collect();
    store.apply(seed).await.expect("seed");
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for round in 1..=BATCHES as u64 {
        let items: Vec<Vec<Write>> = (0..BATCH)
            .map(|i| {
                vec![
                    Write::Update {
                        doc: DocumentData::new(
                            Kind::Instance,
                            format!("inst-{i:05}"),
                            body(i, round),
                        )
                        .with_index(index(i)),
                        expected_version: round as i64,
                        claims: ClaimChange::Replace(ports(i, round)),
                    },
                    Write::append(
                        LogKind::Audit,
                        LogEntry::new(
                            "instance",
                            format!("inst-{i:05}"),
                            "scheduler",
                            "instance.placed",
                            Body::from_serialize(&json!({"round": round})).expect("audit body"),
                        ),
                    ),
                ]
            })
            .collect();
        let cpu0 = cpu_time();
        let start = Instant::now();
        let results = store.apply_each(items).await.expect("apply_each");
        walls.push(start.elapsed());
        cpus.push(cpu_time() - cpu0);
        assert!(results.iter().all(Result::is_ok), "every placement commits");
    }
    let (min, median, p95, max) = stats(walls);
    let (_, cpu_median, _, _) = stats(cpus);
    println!(
        "{name:<8} apply_each 1000   min {:>5.1} ms  median {:>5.1} ms  p95 {:>5.1} ms  max {:>5.1} ms  (cpu median {:>5.1} ms)  target ≤ {} ms: {}",
        ms(min),
        ms(median),
        ms(p95),
        ms(max),
        ms(cpu_median),
        BATCH_TARGET.as_millis(),
        if median <= BATCH_TARGET {
            "met"
        } else {
            "MISSED"
        }
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = TempDir::new("ccm-store-targets");
        let file: Arc<dyn Store> =
            Arc::new(SqliteStore::open_in_dir(dir.path()).expect("open file"));
        run("file", file).await;
        let memory: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().expect("open memory"));
        run("memory", memory).await;
    });
}
