//! Placement benchmarks: one decision over 100 / 1,000 / 5,000 workers holding 10,000 bookings,
//! and a batch of 1,000 pending requests onto 1,000 workers.
//!
//! Run: `cargo bench -p ccm-core --bench placement -- --warm-up-time 1 --measurement-time 4`.
//! Targets (2 cores): one decision over 1,000 workers ≤ 20 µs median; the batch ≤ 50 ms.
//!
//! `parts_1000/*` runs `CapacityTimeline::check` (and the bin-packing score) alone on every
//! worker of the same 1,000-worker fleet, so the cost of a decision can be split between the
//! capacity check and the rest of the filter loop.

use std::hint::black_box;

use ccm_core::capacity::{CapacityTimeline, millis};
use ccm_core::fleet::{FleetSnapshot, PlacementRequest, WorkerSnapshot};
use ccm_core::model::{AmiRequirement, Capacity, LicenseType, PortRange, TimeSlot, WorkerState};
use ccm_core::placement::{BinPack, place, place_batch};
use ccm_core::ports::PortAllocator;
use ccm_core::version::Version;
use chrono::{DateTime, Duration, Utc};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};

/// xorshift64*: a fixed-seed generator, so every run measures the same fleet.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// "Now": the week of bookings starts here.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
}

const AMIS: [(&str, &str); 3] = [
    ("CML-2.9.1-x86_64-20260110", "2.9.1"),
    ("CML-2.9.0-x86_64-20251201", "2.9.0"),
    ("CML-2.8.2-x86_64-20250915", "2.8.2"),
];

/// `n` RUNNING m5zn.metal-like workers with `bookings` bookings spread over a week of 1–4 h
/// slots (15 min lead), each holding 1–4 ports.
fn fleet(n: usize, bookings: usize, rng: &mut Rng) -> FleetSnapshot {
    let mut workers: Vec<WorkerSnapshot> = (0..n)
        .map(|i| {
            let licence = if rng.range(0, 2) == 0 {
                LicenseType::Personal
            } else {
                LicenseType::Enterprise
            };
            let nodes = match licence {
                LicenseType::Personal => 20,
                _ => rng.range(20, 500) as u32,
            };
            let (ami, cml) = AMIS[rng.range(0, 9) as usize % 3];
            WorkerSnapshot {
                id: format!("worker-{i:05}"),
                template_name: Some(format!("{}-metal", licence.as_str().to_lowercase())),
                state: WorkerState::Running,
                state_since: now(),
                license_type: licence,
                node_limit: nodes,
                nested_virt: true,
                ami_name: Some(ami.to_string()),
                cml_version: Some(cml.to_string()),
                timeline: CapacityTimeline::new(Capacity::new(48, 192, 500, nodes)),
                ports: PortAllocator::new(PortRange::default()).expect("valid range"),
                live_instances: 0,
                drain_started_at: None,
            }
        })
        .collect();
    let week_minutes = 7 * 24 * 60;
    let mut placed = 0;
    let mut attempts = 0;
    while placed < bookings && attempts < bookings * 20 {
        attempts += 1;
        let w = &mut workers[rng.range(0, n as u64 - 1) as usize];
        let start = now() + Duration::minutes(rng.range(0, week_minutes) as i64);
        let slot = TimeSlot {
            start,
            end: start + Duration::minutes(rng.range(60, 240) as i64),
            asap: false,
        };
        let window = slot.booking_window(Duration::minutes(15));
        let usage = Capacity::new(
            rng.range(2, 12) as u32,
            rng.range(8, 48) as u32,
            rng.range(10, 80) as u32,
            rng.range(1, 10) as u32,
        );
        let id = format!("booked-{placed:06}");
        if w.timeline.try_book(id.clone(), window, usage).is_ok() {
            let names: Vec<String> = (0..rng.range(1, 4)).map(|k| format!("p{k}")).collect();
            w.ports.allocate(&id, &names).expect("plenty of ports");
            w.live_instances += 1;
            placed += 1;
        }
    }
    assert_eq!(placed, bookings, "the fleet could not hold the bookings");
    FleetSnapshot::new(workers)
}

/// A request for `slot` with the given demand and ports.
fn request(id: String, slot: TimeSlot, demand: Capacity, ports: usize) -> PlacementRequest {
    PlacementRequest {
        instance_id: id,
        definition_id: "ccna-lab-1".into(),
        demand,
        port_names: (1..=ports).map(|i| format!("serial_{i}")).collect(),
        license_affinity: vec![LicenseType::Personal, LicenseType::Enterprise],
        ami_requirements: vec![AmiRequirement {
            name_pattern: "CML-2.9.*".into(),
            min_version: Some(Version::new(2, 9, 0)),
        }],
        nested_virt: true,
        slot,
        window: slot.booking_window(Duration::minutes(15)),
        created_at: now(),
    }
}

/// The typical request: a 2 h slot tomorrow at 10:00, 4 CPU / 16 GB / 30 GB / 5 nodes, 3 ports.
fn typical() -> PlacementRequest {
    let start = now() + Duration::hours(24 + 10);
    let slot = TimeSlot {
        start,
        end: start + Duration::hours(2),
        asap: false,
    };
    request("i-typical".into(), slot, Capacity::new(4, 16, 30, 5), 3)
}

/// `n` pending requests with slots over the week.
fn pending(n: usize, rng: &mut Rng) -> Vec<PlacementRequest> {
    (0..n)
        .map(|i| {
            let start = now() + Duration::minutes(rng.range(30, 7 * 24 * 60) as i64);
            let slot = TimeSlot {
                start,
                end: start + Duration::minutes(rng.range(60, 240) as i64),
                asap: false,
            };
            let demand = Capacity::new(
                rng.range(2, 12) as u32,
                rng.range(8, 48) as u32,
                rng.range(10, 80) as u32,
                rng.range(1, 10) as u32,
            );
            let mut r = request(
                format!("pending-{i:05}"),
                slot,
                demand,
                rng.range(1, 4) as usize,
            );
            r.created_at = now() - Duration::minutes(rng.range(0, 600) as i64);
            r
        })
        .collect()
}

fn bench_place(c: &mut Criterion) {
    let mut group = c.benchmark_group("place");
    let req = typical();
    for n in [100usize, 1_000, 5_000] {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let fleet = fleet(n, 10_000, &mut rng);
        // Sanity: the decision is a real one (found a worker).
        assert!(place(&fleet, &req, &BinPack).is_ok());
        group.bench_with_input(BenchmarkId::new("one_decision", n), &fleet, |b, fleet| {
            b.iter(|| place(black_box(fleet), black_box(&req), &BinPack))
        });
    }
    group.finish();
}

fn bench_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("place_batch");
    group.sample_size(20);
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let base = fleet(1_000, 10_000, &mut rng);
    let reqs = pending(1_000, &mut rng);
    {
        let mut f = base.clone();
        let out = place_batch(&mut f, &reqs, &BinPack);
        eprintln!(
            "place_batch 1000 onto 1000: {} placed, {} pending",
            out.placed_count(),
            out.pending_count()
        );
    }
    group.bench_function(BenchmarkId::new("1000_requests", 1_000), |b| {
        b.iter_batched(
            || base.clone(),
            |mut f| {
                let out = place_batch(&mut f, black_box(&reqs), &BinPack);
                (f, out)
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// The parts of one decision over 1,000 workers, to see where the time goes: the capacity
/// check alone (`CapacityTimeline::check` on every worker, converting the window each time, and
/// `check_ms` with the window converted once) and the check plus the score.
fn bench_parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("parts_1000");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let fleet = fleet(1_000, 10_000, &mut rng);
    let req = typical();
    group.bench_function("timeline_check_only", |b| {
        b.iter(|| {
            let mut ok = 0u32;
            for w in black_box(&fleet).workers() {
                ok += u32::from(w.timeline.check(&req.demand, &req.window).is_ok());
            }
            ok
        })
    });
    group.bench_function("timeline_check_ms_only", |b| {
        b.iter(|| {
            let window = black_box(&req.window);
            let (start, end) = (millis(window.start), millis(window.end));
            let mut ok = 0u32;
            for w in black_box(&fleet).workers() {
                ok += u32::from(w.timeline.check_ms(&req.demand, start, end).is_ok());
            }
            ok
        })
    });
    group.bench_function("timeline_check_and_score", |b| {
        b.iter(|| {
            let fleet = black_box(&fleet);
            let mut best = 0.0f64;
            for (s, w) in fleet.summaries().iter().zip(fleet.workers()) {
                if let Ok(peak) = w.timeline.check(&req.demand, &req.window) {
                    best = best.max(ccm_core::placement::Scorer::score(&BinPack, s, &peak));
                }
            }
            best
        })
    });
    group.finish();
}

criterion_group!(benches, bench_place, bench_batch, bench_parts);
criterion_main!(benches);
