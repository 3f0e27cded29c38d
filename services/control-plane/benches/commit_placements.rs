//! The placement commit: one `InternalService.CommitPlacements` batch of 1,000 placements onto
//! 50 RUNNING workers (each already holding 10 bookings), on the in-memory SQLite store, called
//! over real gRPC on loopback. Prints one JSON object.
//!
//! Run: `cargo bench -p ccm-control-plane --bench commit_placements`.
//! Target (2 cores): a 1,000-placement batch ≤ 100 ms.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ccm_control_plane::convert::timestamp_to_proto;
use ccm_control_plane::record::Mutation;
use ccm_control_plane::testing::{TestPlane, test_epoch};
use ccm_coord::LeaseOptions;
use ccm_proto::v1 as pb;
use ccm_proto::v1::internal_service_client::InternalServiceClient;

/// Placements per batch.
const BATCH: usize = 1000;
/// RUNNING workers the batch spreads over.
const WORKERS: usize = 50;
/// Bookings each worker already holds before the batch.
const EXISTING_PER_WORKER: usize = 10;
/// Measured batches (each on a fresh plane).
const RUNS: usize = 7;
/// Unmeasured batches first.
const WARMUP: usize = 1;

fn definition() -> pb::LabletDefinition {
    pb::LabletDefinition {
        id: "d-1".into(),
        version: "1.0.0".into(),
        name: "lab".into(),
        lab_artifact_uri: "s3://labs/lab.yaml".into(),
        resource_requirements: Some(pb::ResourceRequirements {
            cpu_cores: 1,
            memory_gb: 2,
            storage_gb: 5,
            ..Default::default()
        }),
        license_affinity: vec![pb::LicenseType::Enterprise as i32],
        node_count: 2,
        port_template: Some(pb::PortTemplate {
            ports: ["serial_1", "vnc_1"]
                .iter()
                .map(|n| pb::PortDefinition {
                    name: (*n).into(),
                    protocol: pb::PortProtocol::Tcp as i32,
                })
                .collect(),
        }),
        status: pb::DefinitionStatus::Active as i32,
        created_at: Some(timestamp_to_proto(test_epoch())),
        ..Default::default()
    }
}

fn instance(id: String, state: pb::InstanceState, hour: i64) -> pb::LabletInstance {
    let start = test_epoch() + chrono::Duration::hours(hour);
    pb::LabletInstance {
        id,
        definition_id: "d-1".into(),
        definition_version: "1.0.0".into(),
        state: state as i32,
        state_history: vec![pb::StateTransition {
            from: 0,
            to: pb::InstanceState::Pending as i32,
            at: Some(timestamp_to_proto(test_epoch())),
            reason: "created".into(),
            actor: "user:bench".into(),
        }],
        time_slot: Some(pb::TimeSlot {
            start: Some(timestamp_to_proto(start)),
            end: Some(timestamp_to_proto(start + chrono::Duration::hours(2))),
            asap: false,
        }),
        owner_id: "bench".into(),
        created_at: Some(timestamp_to_proto(test_epoch())),
        ..Default::default()
    }
}

fn ports(base: i32) -> HashMap<String, i32> {
    HashMap::from([
        ("serial_1".to_owned(), base),
        ("vnc_1".to_owned(), base + 1),
    ])
}

/// A plane with the fleet and the pending batch; returns the plane, the fence and the batch.
async fn setup() -> (
    TestPlane,
    pb::LeaderFence,
    Vec<pb::Placement>,
    ccm_coord::Leadership,
) {
    let plane = TestPlane::start().await.expect("plane");
    let app = plane.app.clone();
    let mut m = Mutation::at(app.now());
    m.create(&mut definition(), vec![]).expect("def");
    for w in 0..WORKERS {
        let mut worker = pb::CmlWorker {
            id: format!("w-{w}"),
            name: format!("w-{w}"),
            state: pb::WorkerState::Running as i32,
            service_status: pb::CmlServiceStatus::Available as i32,
            template_name: "bench".into(),
            license_type: pb::LicenseType::Enterprise as i32,
            declared_capacity: Some(pb::WorkerCapacity {
                cpu_cores: 96,
                memory_gb: 768,
                storage_gb: 4000,
                max_nodes: 500,
            }),
            port_range: Some(pb::PortRange {
                start: 2000,
                end: 9999,
            }),
            created_at: Some(timestamp_to_proto(test_epoch())),
            ..Default::default()
        };
        m.create(&mut worker, vec![]).expect("worker");
        for k in 0..EXISTING_PER_WORKER {
            let mut i = instance(format!("x-{w}-{k}"), pb::InstanceState::Scheduled, 1);
            i.worker_id = format!("w-{w}");
            let base = 9000 + 2 * i32::try_from(k).unwrap_or(0);
            i.allocated_ports = ports(base);
            let claims = [base, base + 1]
                .iter()
                .map(|p| ccm_store::Claim::new("port", format!("w-{w}/{p}")))
                .collect();
            m.create(&mut i, claims).expect("booked");
        }
    }
    let mut batch = Vec::with_capacity(BATCH);
    for n in 0..BATCH {
        let id = format!("i-{n}");
        let mut i = instance(id.clone(), pb::InstanceState::Pending, 1 + (n % 5) as i64);
        m.create(&mut i, vec![]).expect("pending");
        let w = n % WORKERS;
        let slot = i32::try_from(n / WORKERS).unwrap_or(0);
        batch.push(pb::Placement {
            instance_id: id,
            worker_id: format!("w-{w}"),
            allocated_ports: ports(2000 + 2 * slot),
            instance_resource_version: 1,
            ..Default::default()
        });
    }
    app.commit(m).await.expect("fleet stored");
    let leader = app
        .coord
        .campaign("scheduler", "bench", LeaseOptions::default())
        .await
        .expect("leader");
    let fence = pb::LeaderFence {
        role: "scheduler".into(),
        epoch: leader.epoch(),
        holder_id: "bench".into(),
    };
    (plane, fence, batch, leader)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut times: Vec<Duration> = Vec::new();
    runtime.block_on(async {
        for run in 0..(WARMUP + RUNS) {
            let (plane, fence, batch, _leader) = setup().await;
            let mut client = InternalServiceClient::new(plane.channel().await.expect("channel"));
            let started = Instant::now();
            let resp = client
                .commit_placements(pb::CommitPlacementsRequest {
                    fence: Some(fence),
                    placements: batch,
                })
                .await
                .expect("commit")
                .into_inner();
            let took = started.elapsed();
            let committed = resp
                .results
                .iter()
                .filter(|r| r.outcome() == pb::PlacementOutcome::Committed)
                .count();
            assert_eq!(
                committed,
                BATCH,
                "every placement commits: {:?}",
                resp.results.first()
            );
            if run >= WARMUP {
                times.push(took);
            }
            plane.stop().await.expect("stop");
        }
    });
    times.sort();
    let ms: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    let median = ms[ms.len() / 2];
    let report = serde_json::json!({
        "bench": "commit_placements",
        "store": "sqlite (in-memory)",
        "transport": "gRPC over loopback",
        "placements": BATCH,
        "workers": WORKERS,
        "existing_bookings": WORKERS * EXISTING_PER_WORKER,
        "runs": ms.len(),
        "min_ms": ms[0],
        "median_ms": median,
        "max_ms": ms[ms.len() - 1],
        "target_ms": 100,
        "within_target": median <= 100.0,
    });
    println!("{report}");
}
