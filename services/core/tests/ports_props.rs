//! Property tests: the port allocator against a plain model, and batch placement against a
//! brute-force check of capacity over time and of port ownership.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ccm_core::capacity::CapacityTimeline;
use ccm_core::fleet::{FleetSnapshot, PlacementRequest, WorkerSnapshot, WorkerSummary};
use ccm_core::model::{
    AmiRequirement, Capacity, LicenseType, PortRange, TimeSlot, TimeWindow, WorkerState,
};
use ccm_core::placement::{BinPack, Decision, Scorer, Spread, place, place_batch};
use ccm_core::ports::PortAllocator;
use ccm_core::version::Version;
use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// PortAllocator vs a model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Allocate `count` ports (names p0..) for instance `k`.
    Allocate { k: u8, count: usize },
    /// Release instance `k`.
    Release { k: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..12, 0usize..=8).prop_map(|(k, count)| Op::Allocate { k, count }),
        1 => (0u8..12).prop_map(|k| Op::Release { k }),
    ]
}

fn names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("p{i}")).collect()
}

/// Checks every observable of the allocator against the model.
fn assert_matches_model(
    a: &PortAllocator,
    range: PortRange,
    used: &BTreeSet<u16>,
    holders: &BTreeMap<String, BTreeMap<String, u16>>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.free_count(), range.len() - used.len());
    prop_assert_eq!(a.used_count(), used.len());
    for port in range.start..=range.end {
        prop_assert_eq!(a.is_free(port), !used.contains(&port), "port {}", port);
    }
    // No port outside the range is ever reported free.
    prop_assert!(!a.is_free(range.start.saturating_sub(1)) || range.start == 1);
    prop_assert!(range.end == u16::MAX || !a.is_free(range.end + 1));
    let live: BTreeMap<String, BTreeMap<String, u16>> = a
        .allocations()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    prop_assert_eq!(&live, holders);
    // No two live instances share a port, and every port is inside the range.
    let mut owner: HashMap<u16, &str> = HashMap::new();
    for (id, ports) in &live {
        for p in ports.values() {
            prop_assert!((range.start..=range.end).contains(p), "{} outside range", p);
            if let Some(other) = owner.insert(*p, id) {
                prop_assert!(false, "port {} held by {} and {}", p, other, id);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn allocator_matches_a_model_and_never_shares_a_port(
        start in 1u16..3000,
        len in prop_oneof![1u16..6, 6u16..40, 60u16..200],
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let range = PortRange { start, end: start + len - 1 };
        let mut a = PortAllocator::new(range).expect("valid range");
        let mut used: BTreeSet<u16> = BTreeSet::new();
        let mut holders: BTreeMap<String, BTreeMap<String, u16>> = BTreeMap::new();

        for op in ops {
            match op {
                Op::Allocate { k, count } => {
                    let id = format!("i{k}");
                    let want = names(count);
                    let res = a.allocate(&id, &want);
                    if let Some(held) = holders.get(&id) {
                        // Idempotent for the same names; otherwise refused. Nothing changes.
                        if held.len() == count {
                            prop_assert_eq!(res.as_ref().ok(), Some(held));
                        } else {
                            prop_assert!(res.is_err());
                        }
                    } else if count > range.len() - used.len() {
                        // Exhaustion: an error, and nothing changes (checked below).
                        let err = res.expect_err("too few free ports");
                        prop_assert!(
                            matches!(err, ccm_core::CoreError::PortsExhausted { requested, free, .. }
                                if requested == count && free == range.len() - used.len()),
                            "unexpected error {:?}", err
                        );
                    } else {
                        let got = res.expect("enough free ports");
                        // The lowest free ports, assigned in the order of the names.
                        let lowest: Vec<u16> = (range.start..=range.end)
                            .filter(|p| !used.contains(p))
                            .take(count)
                            .collect();
                        let in_name_order: Vec<u16> = want.iter().map(|n| got[n]).collect();
                        prop_assert_eq!(&in_name_order, &lowest);
                        used.extend(lowest);
                        holders.insert(id, got);
                    }
                }
                Op::Release { k } => {
                    let id = format!("i{k}");
                    let res = a.release(&id);
                    match holders.remove(&id) {
                        Some(held) => {
                            prop_assert_eq!(res.as_ref(), Some(&held));
                            for p in held.values() {
                                used.remove(p);
                            }
                        }
                        None => prop_assert!(res.is_none()),
                    }
                }
            }
            assert_matches_model(&a, range, &used, &holders)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Batch placement vs brute force
// ---------------------------------------------------------------------------------------------

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
}

fn at(min: i64) -> DateTime<Utc> {
    t0() + Duration::minutes(min)
}

#[derive(Debug, Clone)]
struct WorkerSpec {
    cap: [u32; 4],
    state: WorkerState,
    licence: LicenseType,
    legacy: bool,
    ports: u16,
    /// Index into [`IMAGES`].
    image: usize,
    /// Existing bookings: (start, minutes, usage, port count).
    existing: Vec<(i64, i64, [u32; 4], usize)>,
}

/// (AMI name, CML version) of the workers: a few images, one unknown, one unreadable version.
const IMAGES: [(Option<&str>, Option<&str>); 5] = [
    (Some("CML-2.9.1-x86_64"), Some("2.9.1")),
    (Some("CML-2.8.0-x86_64"), Some("2.8.0")),
    (Some("CML-3.0.0-arm64"), Some("v3.0")),
    (None, None),
    (Some("CML-2.9.0-x86_64"), Some("unknown")),
];

/// An AMI requirement: name pattern, minimum (major, minor, patch).
type Need = (&'static str, Option<(u64, u64, u64)>);

/// AMI requirements of the requests.
const NEEDS: [Need; 5] = [
    ("", None),
    ("CML-2.*", None),
    ("CML-*-x86_64", Some((2, 9, 0))),
    ("", Some((3, 0, 0))),
    ("*-arm64", None),
];

/// The AMI filters, written independently of the crate: the patterns above are a prefix and a
/// suffix around one `*`.
fn image_ok(image: usize, need: usize) -> bool {
    let (name, version) = IMAGES[image];
    let (pattern, min) = NEEDS[need];
    let name_ok = pattern.is_empty()
        || name.is_some_and(|n| {
            let (pre, post) = pattern.split_once('*').unwrap_or((pattern, ""));
            n.len() >= pre.len() + post.len() && n.starts_with(pre) && n.ends_with(post)
        });
    let version_ok = match min {
        None => true,
        Some(m) => version
            .and_then(|v| {
                let v = v.trim_start_matches('v');
                let mut parts = v.split('.').map(|p| p.parse::<u64>().ok());
                let major = parts.next().flatten()?;
                let minor = parts.next().flatten().unwrap_or(0);
                let patch = parts.next().flatten().unwrap_or(0);
                Some((major, minor, patch))
            })
            .is_some_and(|v| v >= m),
    };
    name_ok && version_ok
}

#[derive(Debug, Clone)]
struct RequestSpec {
    /// Index into [`NEEDS`].
    need: usize,
    start: i64,
    minutes: i64,
    asap: bool,
    demand: [u32; 4],
    ports: usize,
    created: i64,
    affinity: u8,
}

fn state() -> impl Strategy<Value = WorkerState> {
    prop_oneof![
        6 => Just(WorkerState::Running),
        1 => Just(WorkerState::Draining),
        1 => Just(WorkerState::Provisioning),
        1 => Just(WorkerState::Stopped),
    ]
}

fn licence() -> impl Strategy<Value = LicenseType> {
    prop_oneof![
        Just(LicenseType::Personal),
        Just(LicenseType::Enterprise),
        Just(LicenseType::Evaluation),
    ]
}

fn usage(max: [u32; 4]) -> impl Strategy<Value = [u32; 4]> {
    (0..=max[0], 0..=max[1], 0..=max[2], 0..=max[3]).prop_map(|(a, b, c, d)| [a, b, c, d])
}

fn worker_spec() -> impl Strategy<Value = WorkerSpec> {
    (
        (1u32..48, 1u32..64, 1u32..200, 1u32..40),
        (state(), licence(), proptest::bool::weighted(0.1)),
        1u16..16,
        0..IMAGES.len(),
        proptest::collection::vec(
            (0i64..600, 10i64..240, usage([16, 32, 80, 10]), 0usize..3),
            0..5,
        ),
    )
        .prop_map(
            |((c, m, s, n), (state, licence, legacy), ports, image, existing)| WorkerSpec {
                cap: [c, m, s, n],
                state,
                licence,
                legacy,
                ports,
                image,
                existing,
            },
        )
}

fn request_spec() -> impl Strategy<Value = RequestSpec> {
    (
        (0i64..600, 10i64..240, proptest::bool::weighted(0.2)),
        usage([16, 32, 80, 12]),
        0usize..=8,
        0i64..50,
        0u8..8,
        0..NEEDS.len(),
    )
        .prop_map(
            |((start, minutes, asap), demand, ports, created, affinity, need)| RequestSpec {
                need,
                start,
                minutes,
                asap,
                demand,
                ports,
                created,
                affinity,
            },
        )
}

fn licence_bit(l: LicenseType) -> u8 {
    match l {
        LicenseType::Personal => 1,
        LicenseType::Enterprise => 2,
        LicenseType::Evaluation => 4,
    }
}

/// Builds the fleet; returns it with the bookings that were accepted (per worker:
/// (instance, window, usage)) and the ports they hold.
#[allow(clippy::type_complexity)]
fn build_fleet(
    specs: &[WorkerSpec],
) -> (
    FleetSnapshot,
    Vec<Vec<(String, TimeWindow, Capacity)>>,
    Vec<BTreeMap<String, BTreeMap<String, u16>>>,
) {
    let mut workers = Vec::new();
    let mut bookings = Vec::new();
    let mut ports = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let declared = Capacity::from_array(s.cap);
        let mut w = WorkerSnapshot {
            id: format!("w{i:02}"),
            template_name: (!s.legacy).then(|| "t".to_string()),
            state: s.state,
            state_since: t0(),
            license_type: s.licence,
            node_limit: s.licence.node_limit(s.cap[3]),
            nested_virt: true,
            ami_name: IMAGES[s.image].0.map(str::to_string),
            cml_version: IMAGES[s.image].1.map(str::to_string),
            timeline: CapacityTimeline::new(declared),
            ports: PortAllocator::new(PortRange {
                start: 3000,
                end: 3000 + s.ports - 1,
            })
            .expect("valid"),
            live_instances: 0,
            drain_started_at: None,
        };
        let mut accepted = Vec::new();
        let mut held = BTreeMap::new();
        for (j, (start, minutes, u, n)) in s.existing.iter().enumerate() {
            let id = format!("old-{i}-{j}");
            let window = TimeWindow::new(at(*start), at(start + minutes));
            let usage = Capacity::from_array(*u);
            // Only bookings that fit (in capacity and ports) are loaded: the fleet starts valid.
            if w.ports.free_count() >= *n && w.timeline.try_book(id.clone(), window, usage).is_ok()
            {
                let names: Vec<String> = (0..*n).map(|k| format!("x{k}")).collect();
                let p = w.ports.allocate(&id, &names).expect("free ports checked");
                w.live_instances += 1;
                accepted.push((id.clone(), window, usage));
                held.insert(id, p);
            }
        }
        workers.push(w);
        bookings.push(accepted);
        ports.push(held);
    }
    (FleetSnapshot::new(workers), bookings, ports)
}

fn build_requests(specs: &[RequestSpec]) -> Vec<PlacementRequest> {
    specs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let slot = TimeSlot {
                start: at(r.start),
                end: at(r.start + r.minutes),
                asap: r.asap,
            };
            let affinity = LicenseType::ALL
                .into_iter()
                .filter(|l| r.affinity & licence_bit(*l) != 0)
                .collect();
            PlacementRequest {
                instance_id: format!("r{i:03}"),
                definition_id: "d".into(),
                demand: Capacity::from_array(r.demand),
                port_names: (0..r.ports).map(|k| format!("port_{k}")).collect(),
                license_affinity: affinity,
                ami_requirements: {
                    let (pattern, min) = NEEDS[r.need];
                    vec![AmiRequirement {
                        name_pattern: pattern.to_string(),
                        min_version: min.map(|(a, b, c)| Version::new(a, b, c)),
                    }]
                },
                nested_virt: false,
                slot,
                window: slot.booking_window(Duration::minutes(15)),
                created_at: at(r.created),
            }
        })
        .collect()
}

/// Largest use at any instant, per dimension, by brute force over every booking start (use is a
/// step function that only rises at a start).
fn brute_peak(bookings: &[(String, TimeWindow, Capacity)]) -> [u32; 4] {
    let mut peak = [0u32; 4];
    for (_, probe, _) in bookings {
        let t = probe.start;
        let mut sum = [0u32; 4];
        for (_, w, u) in bookings {
            if w.start <= t && t < w.end {
                for (s, x) in sum.iter_mut().zip(u.as_array()) {
                    *s += x;
                }
            }
        }
        for (p, s) in peak.iter_mut().zip(sum) {
            *p = (*p).max(s);
        }
    }
    peak
}

fn run_batch(
    worker_specs: Vec<WorkerSpec>,
    request_specs: Vec<RequestSpec>,
    scorer: &dyn Scorer,
) -> Result<(), TestCaseError> {
    let (mut fleet, mut bookings, mut held) = build_fleet(&worker_specs);
    let mut replay = fleet.clone();
    let requests = build_requests(&request_specs);
    let out = place_batch(&mut fleet, &requests, scorer);
    prop_assert_eq!(out.entries.len(), requests.len());

    // The batch decides exactly as one `place` after another on a snapshot updated by hand
    // (the batch books through `FleetSnapshot::book`, the replay through the `worker_mut` guard:
    // both must keep the worker summaries the filters read in step).
    for e in &out.entries {
        let req = &requests[e.request_index];
        match (place(&replay, req, scorer), &e.decision) {
            (
                Ok(choice),
                Decision::Placed {
                    worker_id,
                    ports,
                    score,
                    ..
                },
            ) => {
                prop_assert_eq!(&choice.worker_id, worker_id);
                prop_assert_eq!(choice.score.to_bits(), score.to_bits());
                let mut w = replay.worker_mut(choice.worker_index).expect("in range");
                let p = w
                    .ports
                    .allocate(&req.instance_id, &req.port_names)
                    .expect("free");
                prop_assert_eq!(&p, ports);
                w.timeline
                    .insert(req.instance_id.clone(), req.window, req.demand);
            }
            (Err(why), Decision::Pending { summary }) => prop_assert_eq!(&why, summary),
            (got, want) => prop_assert!(false, "place {:?} vs batch {:?}", got, want),
        }
    }

    // Queue order.
    let keys: Vec<_> = out
        .entries
        .iter()
        .map(|e| requests[e.request_index].queue_key())
        .collect();
    prop_assert!(keys.windows(2).all(|k| k[0] <= k[1]), "not in queue order");

    for e in &out.entries {
        let req = &requests[e.request_index];
        prop_assert_eq!(&e.instance_id, &req.instance_id);
        match &e.decision {
            Decision::Placed {
                worker_id,
                worker_index,
                ports,
                peak_after,
                ..
            } => {
                let spec = &worker_specs[*worker_index];
                prop_assert_eq!(worker_id, &fleet.workers()[*worker_index].id);
                // Only eligible workers take placements.
                prop_assert_eq!(spec.state, WorkerState::Running);
                prop_assert!(!spec.legacy);
                prop_assert!(
                    req.license_affinity.is_empty() || req.license_affinity.contains(&spec.licence)
                );
                prop_assert!(req.demand.nodes <= spec.licence.node_limit(spec.cap[3]));
                prop_assert!(
                    image_ok(spec.image, request_specs[e.request_index].need),
                    "image {} does not meet need {}",
                    spec.image,
                    request_specs[e.request_index].need
                );
                prop_assert!(peak_after.fits_within(&Capacity::from_array(spec.cap)));
                // One port per name.
                let names: BTreeSet<&String> = ports.keys().collect();
                let want: BTreeSet<&String> = req.port_names.iter().collect();
                prop_assert_eq!(names, want);
                bookings[*worker_index].push((req.instance_id.clone(), req.window, req.demand));
                held[*worker_index].insert(req.instance_id.clone(), ports.clone());
            }
            Decision::Pending { summary } => {
                let total: usize = summary.reasons.iter().map(|c| c.count).sum();
                prop_assert_eq!(total, fleet.len());
                prop_assert_eq!(summary.total_workers, fleet.len());
            }
            Decision::Invalid { error } => {
                prop_assert!(false, "unexpected invalid request: {}", error);
            }
        }
    }

    for (i, w) in fleet.workers().iter().enumerate() {
        // The summaries the filters read are in step with the workers after the batch.
        let s = fleet.summaries()[i];
        prop_assert_eq!(s, WorkerSummary::of(w, s.image));
        // Never over capacity at any instant (independent of CapacityTimeline).
        let peak = brute_peak(&bookings[i]);
        let cap = worker_specs[i].cap;
        for d in 0..4 {
            prop_assert!(
                peak[d] <= cap[d],
                "worker {} dim {}: {} > {}",
                w.id,
                d,
                peak[d],
                cap[d]
            );
        }
        // The snapshot holds exactly the expected bookings.
        let ids: BTreeSet<String> = w.timeline.bookings().map(|b| b.instance_id).collect();
        let want: BTreeSet<String> = bookings[i].iter().map(|b| b.0.clone()).collect();
        prop_assert_eq!(ids, want);
        prop_assert_eq!(w.live_instances as usize, bookings[i].len());
        // No port shared between two instances of a worker; all inside the range.
        let range = w.port_range();
        let mut owner: HashMap<u16, &str> = HashMap::new();
        for (id, ports) in &held[i] {
            for p in ports.values() {
                prop_assert!((range.start..=range.end).contains(p));
                if let Some(other) = owner.insert(*p, id) {
                    prop_assert!(false, "{}: port {} held by {} and {}", w.id, p, other, id);
                }
            }
        }
        let live: BTreeMap<String, BTreeMap<String, u16>> = w
            .ports
            .allocations()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        prop_assert_eq!(&live, &held[i]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn batch_placement_never_overcommits_capacity_or_ports(
        workers in proptest::collection::vec(worker_spec(), 1..=20),
        requests in proptest::collection::vec(request_spec(), 0..60),
        spread in any::<bool>(),
    ) {
        let scorer: &dyn Scorer = if spread { &Spread } else { &BinPack };
        run_batch(workers, requests, scorer)?;
    }
}
