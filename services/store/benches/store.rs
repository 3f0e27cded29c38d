//! Store benchmarks (SQLite; MongoDB cannot run here).
//!
//! Run: `cargo bench -p ccm-store --bench store`.
//!
//! Targets (2 cores, file-backed store in a temp dir):
//! - `create_one`: single-document creates, each its own transaction: ≥ 5,000/s.
//! - `apply_each_1000_placements`: one `apply_each` of 1,000 items, each = update an instance
//!   (conditional on its version) + replace its 3 port claims + append an audit entry: ≤ 100 ms.
//!
//! `get_one` and `list_page_100` are there for reference.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ccm_store::conformance::TempDir;
use ccm_store::{
    Body, Claim, ClaimChange, DocumentData, IndexFields, Kind, LogEntry, LogKind, Query,
    SqliteStore, Store, Write,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use tokio::runtime::Runtime;

/// Items per placement batch.
const BATCH: usize = 1000;

fn instance_body(i: usize, round: u64) -> Body {
    // About 1 KiB, the size of an instance's canonical JSON.
    Body::from_serialize(&json!({
        "id": format!("inst-{i:05}"),
        "definitionId": "def-lab-1",
        "ownerId": "user-42",
        "state": "LABLET_INSTANCE_STATE_SCHEDULED",
        "workerId": format!("w-{}", i % 50),
        "timeslot": {"start": "2026-05-01T10:00:00Z", "end": "2026-05-01T12:00:00Z"},
        "ports": {"serial": 2000 + (i % 300), "vnc": 5900 + (i % 300), "http": 8000 + (i % 300)},
        "round": round,
        "conditions": [{"type": "Scheduled", "status": "True", "reason": "Placed",
                        "message": "placed by the scheduler on the best-fitting worker"}],
        "padding": "x".repeat(600),
    }))
    .expect("bench body")
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
    // Every round moves the instance to three other ports, so claims really change.
    let base = 2000 + (i % 50) * 10 + (round as usize % 2) * 3;
    (0..3)
        .map(|k| Claim::new("port", format!("w-{}/{}/{}", i % 50, i / 50, base + k)))
        .collect()
}

struct Fixture {
    store: Arc<dyn Store>,
    _dir: Option<TempDir>,
}

fn file_store() -> Fixture {
    let dir = TempDir::new("ccm-store-bench");
    let store = SqliteStore::open_in_dir(dir.path()).expect("open sqlite file");
    Fixture {
        store: Arc::new(store),
        _dir: Some(dir),
    }
}

fn memory_store() -> Fixture {
    Fixture {
        store: Arc::new(SqliteStore::open_in_memory().expect("open sqlite memory")),
        _dir: None,
    }
}

fn bench_backend(c: &mut Criterion, name: &str, open: fn() -> Fixture) {
    let rt = Runtime::new().expect("tokio runtime");
    let mut group = c.benchmark_group(name);

    // Single-document creates.
    {
        let fx = open();
        let store = fx.store.clone();
        let mut next = 0_usize;
        group.throughput(Throughput::Elements(1));
        group.measurement_time(Duration::from_secs(5));
        group.bench_function("create_one", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        next += 1;
                        let doc = DocumentData::new(
                            Kind::Instance,
                            format!("c-{next:08}"),
                            instance_body(next, 0),
                        )
                        .with_index(index(next));
                        store.apply(vec![Write::create(doc)]).await.expect("create");
                    }
                    start.elapsed()
                })
            })
        });
    }

    // Batches of 1,000 placements.
    {
        let fx = open();
        let store = fx.store.clone();
        let creates: Vec<Write> = (0..BATCH)
            .map(|i| Write::Create {
                doc: DocumentData::new(Kind::Instance, format!("inst-{i:05}"), instance_body(i, 0))
                    .with_index(index(i)),
                claims: ports(i, 0),
            })
            .collect();
        rt.block_on(store.apply(creates)).expect("seed instances");
        let mut versions = vec![1_i64; BATCH];
        let mut round = 0_u64;
        group.throughput(Throughput::Elements(BATCH as u64));
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(10));
        group.bench_function("apply_each_1000_placements", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    round += 1;
                    let items: Vec<Vec<Write>> = (0..BATCH)
                        .map(|i| {
                            vec![
                                Write::Update {
                                    doc: DocumentData::new(
                                        Kind::Instance,
                                        format!("inst-{i:05}"),
                                        instance_body(i, round),
                                    )
                                    .with_index(index(i)),
                                    expected_version: versions[i],
                                    claims: ClaimChange::Replace(ports(i, round)),
                                },
                                Write::append(
                                    LogKind::Audit,
                                    LogEntry::new(
                                        "instance",
                                        format!("inst-{i:05}"),
                                        "scheduler",
                                        "instance.placed",
                                        Body::from_serialize(
                                            &json!({"round": round, "worker": i % 50}),
                                        )
                                        .expect("audit body"),
                                    ),
                                ),
                            ]
                        })
                        .collect();
                    let start = Instant::now();
                    let results = rt.block_on(store.apply_each(items)).expect("apply_each");
                    total += start.elapsed();
                    for (i, r) in results.iter().enumerate() {
                        assert!(r.is_ok(), "item {i}: {r:?}");
                        versions[i] += 1;
                    }
                }
                total
            })
        });
    }

    // Reads, for reference.
    {
        let fx = open();
        let store = fx.store.clone();
        let creates: Vec<Write> = (0..BATCH)
            .map(|i| {
                Write::create(
                    DocumentData::new(Kind::Instance, format!("r-{i:05}"), instance_body(i, 0))
                        .with_index(index(i)),
                )
            })
            .collect();
        rt.block_on(store.apply(creates)).expect("seed");
        group.throughput(Throughput::Elements(1));
        group.sample_size(50);
        group.measurement_time(Duration::from_secs(3));
        let mut i = 0_usize;
        group.bench_function("get_one", |b| {
            b.iter(|| {
                i = (i + 7) % BATCH;
                black_box(
                    rt.block_on(store.get(Kind::Instance, &format!("r-{i:05}")))
                        .expect("get"),
                )
            })
        });
        group.throughput(Throughput::Elements(100));
        group.bench_function("list_page_100", |b| {
            b.iter(|| {
                black_box(
                    rt.block_on(store.list(Query::new(Kind::Instance).with_page_size(100)))
                        .expect("list"),
                )
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_backend(c, "sqlite_file", file_store);
    bench_backend(c, "sqlite_memory", memory_store);
}

criterion_group!(store_benches, benches);
criterion_main!(store_benches);
