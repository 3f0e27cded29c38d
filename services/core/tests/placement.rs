//! Placement: filters with reason codes, scoring, plan, why-pending and batch placement
//! (domain.md §5, §10 scenarios 3–7, §11 items 9, 11, 16).

use std::collections::{BTreeMap, BTreeSet};

use ccm_core::capacity::CapacityTimeline;
use ccm_core::fleet::{FleetSnapshot, PlacementRequest, WorkerSnapshot, WorkerSummary};
use ccm_core::model::{
    AmiRequirement, Capacity, Dimension, LicenseType, PortRange, TimeSlot, TimeWindow, WorkerState,
};
use ccm_core::placement::{
    BinPack, Decision, RejectReason, Spread, ami_check, ami_name_check, ami_version_check,
    check_fit, check_worker, place, place_batch, plan,
};
use ccm_core::ports::PortAllocator;
use ccm_core::version::Version;
use chrono::{DateTime, Duration, Utc};

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

/// 2027-01-15 00:00 UTC.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
}

/// `t0` + `m` minutes.
fn at(m: i64) -> DateTime<Utc> {
    t0() + Duration::minutes(m)
}

const METAL: Capacity = Capacity::new(48, 192, 500, 20);
const LEAD: i64 = 15;

fn worker_with(
    id: &str,
    licence: LicenseType,
    declared: Capacity,
    range: PortRange,
) -> WorkerSnapshot {
    WorkerSnapshot {
        id: id.into(),
        template_name: Some(format!("{}-metal", licence.as_str().to_lowercase())),
        state: WorkerState::Running,
        state_since: t0(),
        license_type: licence,
        node_limit: licence.node_limit(declared.nodes),
        nested_virt: true,
        ami_name: Some("CML-2.9.1-x86_64-20260101".into()),
        cml_version: Some("2.9.1".into()),
        timeline: CapacityTimeline::new(Capacity {
            nodes: licence.node_limit(declared.nodes),
            ..declared
        }),
        ports: PortAllocator::new(range).expect("valid range"),
        live_instances: 0,
        drain_started_at: None,
    }
}

fn worker(id: &str, licence: LicenseType, declared: Capacity) -> WorkerSnapshot {
    worker_with(id, licence, declared, PortRange::default())
}

fn personal(id: &str) -> WorkerSnapshot {
    worker(id, LicenseType::Personal, METAL)
}

fn enterprise(id: &str) -> WorkerSnapshot {
    worker(
        id,
        LicenseType::Enterprise,
        Capacity {
            nodes: 500,
            ..METAL
        },
    )
}

/// A request for a slot `[start_min, start_min + minutes)`, booked at `t0 + created_min`.
fn request_at(
    id: &str,
    demand: Capacity,
    ports: usize,
    start_min: i64,
    minutes: i64,
    created_min: i64,
) -> PlacementRequest {
    let slot = TimeSlot {
        start: at(start_min),
        end: at(start_min + minutes),
        asap: false,
    };
    PlacementRequest {
        instance_id: id.into(),
        definition_id: "def-1".into(),
        demand,
        port_names: (1..=ports).map(|i| format!("serial_{i}")).collect(),
        license_affinity: vec![LicenseType::Personal, LicenseType::Enterprise],
        ami_requirements: vec![],
        nested_virt: false,
        slot,
        window: slot.booking_window(Duration::minutes(LEAD)),
        created_at: at(created_min),
    }
}

/// A typical request: 4 CPU / 16 GB / 30 GB / 5 nodes, 3 ports, 10:00–12:00 tomorrow.
fn request(id: &str) -> PlacementRequest {
    request_at(id, Capacity::new(4, 16, 30, 5), 3, 24 * 60 + 600, 120, 0)
}

/// The PERSONAL m5zn.metal template (500 nodes, capped to 20 by the licence).
fn personal_metal() -> ccm_core::model::WorkerTemplate {
    ccm_core::model::WorkerTemplate {
        name: "personal-metal".into(),
        description: String::new(),
        instance_type: "m5zn.metal".into(),
        nested_virt: true,
        capacity: Capacity::new(48, 192, 500, 500),
        license_type: LicenseType::Personal,
        ami_pattern: "CML-2.9.*".into(),
        regions: vec![],
        startup_minutes: 20,
        port_range: PortRange::default(),
        drain_timeout_hours: 4,
        min_warm: 0,
        max_workers: 10,
        tags: BTreeMap::new(),
    }
}

fn book(w: &mut WorkerSnapshot, id: &str, window: TimeWindow, usage: Capacity) {
    w.timeline.insert(id, window, usage);
    w.live_instances += 1;
}

/// Every worker's bookings and ports, to prove a call changed nothing.
fn fingerprint(fleet: &FleetSnapshot) -> Vec<(CapacityTimeline, PortAllocator, u32)> {
    fleet
        .workers()
        .iter()
        .map(|w| (w.timeline.clone(), w.ports.clone(), w.live_instances))
        .collect()
}

fn only_reason(fleet: &FleetSnapshot, req: &PlacementRequest) -> RejectReason {
    let err = place(fleet, req, &BinPack).expect_err("must not fit");
    assert_eq!(err.total_workers, fleet.len());
    assert_eq!(err.reasons.len(), 1, "one reason expected, got {err}");
    assert_eq!(err.reasons[0].count, fleet.len());
    err.reasons[0].reason
}

// ---------------------------------------------------------------------------------------------
// Scenario 3: licence node limit
// ---------------------------------------------------------------------------------------------

#[test]
fn test_scenario3_thirty_nodes_land_on_enterprise_not_personal() {
    // The PERSONAL worker comes first and is fuller, so only the filter keeps it out.
    let mut p = personal("w-personal");
    book(
        &mut p,
        "old",
        TimeWindow::new(at(0), at(60 * 48)),
        Capacity::new(20, 40, 40, 0),
    );
    let fleet = FleetSnapshot::new(vec![p, enterprise("w-enterprise")]);
    let req = request_at("i-30", Capacity::new(8, 32, 60, 30), 2, 24 * 60, 120, 0);

    let choice = place(&fleet, &req, &BinPack).expect("enterprise fits");
    assert_eq!(choice.worker_id, "w-enterprise");
    assert_eq!(choice.worker_index, 1);
    assert_eq!(choice.peak_after, Capacity::new(8, 32, 60, 30));

    let explained = plan(&fleet, &req, &BinPack);
    assert_eq!(explained.candidates.len(), 1);
    assert_eq!(explained.rejected.len(), 1);
    let r = &explained.rejected[0];
    assert_eq!(r.worker_id, "w-personal");
    assert_eq!(
        r.reason,
        RejectReason::LicenceNodeLimit {
            licence: LicenseType::Personal,
            limit: 20
        }
    );
    assert_eq!(r.reason.code(), "LICENSE_NODE_LIMIT");
    assert_eq!(r.reason.phrase(), "licence PERSONAL allows 20 nodes");
    assert_eq!(
        r.detail,
        "definition has 30 nodes, licence PERSONAL allows 20"
    );

    // Exactly 20 nodes is allowed on PERSONAL (and bin-packing then prefers the fuller one).
    let twenty = request_at("i-20", Capacity::new(8, 32, 60, 20), 2, 24 * 60, 120, 0);
    assert_eq!(
        place(&fleet, &twenty, &BinPack).map(|c| c.worker_id),
        Ok("w-personal".to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// Scenario 4: each filter alone excludes a worker
// ---------------------------------------------------------------------------------------------

fn ami_request(id: &str) -> PlacementRequest {
    PlacementRequest {
        ami_requirements: vec![AmiRequirement {
            name_pattern: "CML-2.9.*".into(),
            min_version: Some(Version::new(2, 9, 0)),
        }],
        ..request(id)
    }
}

type Case = (
    &'static str,
    fn(&mut WorkerSnapshot, &mut PlacementRequest),
    RejectReason,
    &'static str,
);

#[test]
fn test_scenario4_each_filter_alone_excludes_a_worker_with_its_code() {
    let cases: Vec<Case> = vec![
        (
            "AMI name mismatch",
            |w, _| w.ami_name = Some("CML-2.8.0-x86_64".into()),
            RejectReason::AmiPattern,
            "AMI_PATTERN",
        ),
        (
            "AMI name unknown",
            |w, _| w.ami_name = None,
            RejectReason::AmiPattern,
            "AMI_PATTERN",
        ),
        (
            "CML version too low",
            |w, _| w.cml_version = Some("2.8.9".into()),
            RejectReason::AmiVersion,
            "AMI_VERSION",
        ),
        (
            "CML version unknown",
            |w, _| w.cml_version = None,
            RejectReason::AmiVersion,
            "AMI_VERSION",
        ),
        (
            "CPU declared too small",
            |w, _| w.timeline = CapacityTimeline::new(Capacity::new(2, 192, 500, 20)),
            RejectReason::Insufficient {
                dimension: Dimension::Cpu,
            },
            "INSUFFICIENT_CPU",
        ),
        (
            "CPU booked over the window",
            |w, r| book(w, "x", r.window, Capacity::new(45, 0, 0, 0)),
            RejectReason::Insufficient {
                dimension: Dimension::Cpu,
            },
            "INSUFFICIENT_CPU",
        ),
        (
            "memory booked over the window",
            |w, r| book(w, "x", r.window, Capacity::new(0, 180, 0, 0)),
            RejectReason::Insufficient {
                dimension: Dimension::Memory,
            },
            "INSUFFICIENT_MEMORY",
        ),
        (
            "storage booked over the window",
            |w, r| book(w, "x", r.window, Capacity::new(0, 0, 480, 0)),
            RejectReason::Insufficient {
                dimension: Dimension::Storage,
            },
            "INSUFFICIENT_STORAGE",
        ),
        (
            "nodes booked over the window",
            |w, r| book(w, "x", r.window, Capacity::new(0, 0, 0, 16)),
            RejectReason::Insufficient {
                dimension: Dimension::Nodes,
            },
            "INSUFFICIENT_NODES",
        ),
        (
            "not enough ports",
            |w, _| {
                w.ports = PortAllocator::new(PortRange {
                    start: 2000,
                    end: 2001,
                })
                .expect("valid")
            },
            RejectReason::InsufficientPorts,
            "INSUFFICIENT_PORTS",
        ),
        (
            "DRAINING",
            |w, _| w.state = WorkerState::Draining,
            RejectReason::Draining,
            "WORKER_DRAINING",
        ),
        (
            "PROVISIONING",
            |w, _| w.state = WorkerState::Provisioning,
            RejectReason::NotRunning {
                state: WorkerState::Provisioning,
            },
            "WORKER_NOT_RUNNING",
        ),
        (
            "STOPPED",
            |w, _| w.state = WorkerState::Stopped,
            RejectReason::NotRunning {
                state: WorkerState::Stopped,
            },
            "WORKER_NOT_RUNNING",
        ),
        (
            "legacy worker",
            |w, _| w.template_name = None,
            RejectReason::Legacy,
            "WORKER_UNMANAGED",
        ),
        (
            "licence affinity",
            |_, r| r.license_affinity = vec![LicenseType::Enterprise],
            RejectReason::LicenceAffinity {
                licence: LicenseType::Personal,
            },
            "LICENSE_AFFINITY",
        ),
        (
            "nested virtualisation",
            |w, r| {
                w.nested_virt = false;
                r.nested_virt = true;
            },
            RejectReason::NestedVirt,
            "NESTED_VIRT",
        ),
    ];

    for (name, mutate, reason, code) in cases {
        let base_req = ami_request("i-1");
        // The unmodified worker fits: the mutation alone is what excludes it.
        let base = FleetSnapshot::new(vec![personal("w-1")]);
        assert!(
            place(&base, &base_req, &BinPack).is_ok(),
            "{name}: base must fit"
        );

        let mut w = personal("w-1");
        let mut req = base_req.clone();
        mutate(&mut w, &mut req);
        let excluded = FleetSnapshot::new(vec![w.clone()]);
        let got = only_reason(&excluded, &req);
        assert_eq!(got, reason, "{name}");
        assert_eq!(got.code(), code, "{name}");
        assert_eq!(check_worker(&w, &req), Err(reason), "{name}");

        // Next to a healthy worker the request goes there instead.
        let ok = enterprise("w-2");
        let both = FleetSnapshot::new(vec![w, ok]);
        assert_eq!(
            place(&both, &req, &BinPack).map(|c| c.worker_id),
            Ok("w-2".to_string()),
            "{name}"
        );
    }
}

#[test]
fn ami_filters_use_globs_and_lenient_versions() {
    let mut req = ami_request("i-1");
    req.ami_requirements[0].name_pattern = "CML-2.?.*-x86_64-*".into();
    let mut w = personal("w-1");
    w.cml_version = Some("v2.9.0+build7".into());
    assert!(check_worker(&w, &req).is_ok());
    w.ami_name = Some("CML-2.10.0-x86_64-20260101".into());
    assert_eq!(check_worker(&w, &req), Err(RejectReason::AmiPattern));
    // An empty pattern accepts any AMI, even an unknown one; no minimum accepts any version.
    req.ami_requirements[0].name_pattern = String::new();
    w.ami_name = None;
    assert!(check_worker(&w, &req).is_ok());
    req.ami_requirements[0].min_version = None;
    w.cml_version = None;
    assert!(check_worker(&w, &req).is_ok());
    // Every requirement must hold; the pattern filter runs before the version filter.
    req.ami_requirements = vec![
        AmiRequirement {
            name_pattern: String::new(),
            min_version: Some(Version::new(3, 0, 0)),
        },
        AmiRequirement {
            name_pattern: "CML-3.*".into(),
            min_version: None,
        },
    ];
    w.ami_name = Some("CML-2.9.1".into());
    w.cml_version = Some("2.9.1".into());
    assert_eq!(check_worker(&w, &req), Err(RejectReason::AmiPattern));
    w.ami_name = Some("CML-3.0".into());
    assert_eq!(check_worker(&w, &req), Err(RejectReason::AmiVersion));
    w.cml_version = Some("3.0".into());
    assert!(check_worker(&w, &req).is_ok());
}

#[test]
fn the_first_failing_filter_is_the_reason() {
    // DRAINING, legacy, wrong licence and full all at once: the state filter runs first.
    let mut w = personal("w-1");
    w.state = WorkerState::Draining;
    w.template_name = None;
    book(&mut w, "x", request("i").window, METAL);
    let mut req = request("i-1");
    req.license_affinity = vec![LicenseType::Enterprise];
    assert_eq!(check_worker(&w, &req), Err(RejectReason::Draining));
    w.state = WorkerState::Running;
    assert_eq!(check_worker(&w, &req), Err(RejectReason::Legacy));
    w.template_name = Some("t".into());
    assert_eq!(
        check_worker(&w, &req),
        Err(RejectReason::LicenceAffinity {
            licence: LicenseType::Personal
        })
    );
    req.license_affinity.push(LicenseType::Personal);
    assert_eq!(
        check_worker(&w, &req),
        Err(RejectReason::Insufficient {
            dimension: Dimension::Cpu
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Scenario 5: bin-packing and spread
// ---------------------------------------------------------------------------------------------

#[test]
fn test_scenario5_binpack_picks_the_fuller_worker_spread_the_emptier() {
    let cap = Capacity::new(100, 100, 100, 100);
    let req = request_at("i-1", Capacity::new(5, 5, 5, 5), 1, 24 * 60, 120, 0);
    let mut ten = worker("w-10", LicenseType::Enterprise, cap);
    book(&mut ten, "a", req.window, Capacity::new(10, 10, 10, 10));
    let mut sixty = worker("w-60", LicenseType::Enterprise, cap);
    book(&mut sixty, "b", req.window, Capacity::new(60, 60, 60, 60));
    let fleet = FleetSnapshot::new(vec![ten, sixty]);

    let packed = place(&fleet, &req, &BinPack).expect("both fit");
    assert_eq!(packed.worker_id, "w-60");
    assert!((packed.score - 0.65).abs() < 1e-12, "{}", packed.score);
    assert_eq!(packed.peak_after, Capacity::new(65, 65, 65, 65));

    let spread = place(&fleet, &req, &Spread).expect("both fit");
    assert_eq!(spread.worker_id, "w-10");
    assert!((spread.score - 0.85).abs() < 1e-12, "{}", spread.score);
}

#[test]
fn score_uses_the_peak_over_the_window_not_the_current_use() {
    // w-now is 90 % busy only until 09:00; w-later is 50 % busy during the requested slot.
    let cap = Capacity::new(100, 100, 100, 100);
    let req = request_at("i-1", Capacity::new(5, 5, 5, 5), 1, 600, 120, 0);
    let mut now = worker("w-now", LicenseType::Enterprise, cap);
    book(
        &mut now,
        "a",
        TimeWindow::new(at(0), at(540)),
        Capacity::new(90, 90, 90, 90),
    );
    let mut later = worker("w-later", LicenseType::Enterprise, cap);
    book(
        &mut later,
        "b",
        TimeWindow::new(at(660), at(700)),
        Capacity::new(50, 50, 50, 50),
    );
    let fleet = FleetSnapshot::new(vec![now, later]);
    assert_eq!(
        place(&fleet, &req, &BinPack).map(|c| c.worker_id),
        Ok("w-later".to_string())
    );
}

#[test]
fn ties_go_to_fewest_free_ports_then_smallest_id() {
    let req = request("i-1");
    let mut fleet = FleetSnapshot::new(vec![personal("w-c"), personal("w-b"), personal("w-a")]);
    // Identical workers: smallest id.
    assert_eq!(
        place(&fleet, &req, &BinPack).map(|c| c.worker_id),
        Ok("w-a".into())
    );
    assert_eq!(
        place(&fleet, &req, &Spread).map(|c| c.worker_id),
        Ok("w-a".into())
    );
    // w-c holds a port (of an instance whose booking is elsewhere in time): fewest free ports.
    let held = BTreeMap::from([("serial_1".to_string(), 2000u16)]);
    let mut c = fleet.get_mut("w-c").expect("exists");
    c.add_booking(
        "old",
        TimeWindow::new(at(0), at(60)),
        Capacity::new(1, 1, 1, 1),
        &held,
    )
    .expect("free");
    drop(c);
    assert_eq!(
        place(&fleet, &req, &BinPack).map(|c| c.worker_id),
        Ok("w-c".into())
    );
    let explained = plan(&fleet, &req, &BinPack);
    let ids: Vec<&str> = explained
        .candidates
        .iter()
        .map(|c| c.worker_id.as_str())
        .collect();
    assert_eq!(ids, ["w-c", "w-a", "w-b"]);
    // A higher score beats the port tie-break.
    let mut b = fleet.get_mut("w-b").expect("exists");
    book(&mut b, "busy", req.window, Capacity::new(1, 0, 0, 0));
    drop(b);
    assert_eq!(
        place(&fleet, &req, &BinPack).map(|c| c.worker_id),
        Ok("w-b".into())
    );
}

// ---------------------------------------------------------------------------------------------
// Scenario 6 (domain part): no fit
// ---------------------------------------------------------------------------------------------

fn twelve_worker_fleet(req: &PlacementRequest) -> FleetSnapshot {
    let mut workers = Vec::new();
    for i in 0..5 {
        let mut w = enterprise(&format!("w-mem-{i}"));
        book(&mut w, "big", req.window, Capacity::new(0, 190, 0, 0));
        workers.push(w);
    }
    for i in 0..4 {
        workers.push(personal(&format!("w-personal-{i}")));
    }
    for i in 0..3 {
        let mut w = enterprise(&format!("w-drain-{i}"));
        w.state = WorkerState::Draining;
        workers.push(w);
    }
    FleetSnapshot::new(workers)
}

#[test]
fn test_scenario6_no_fit_is_unschedulable_with_why_pending_and_nothing_changes() {
    let req = request_at("i-1", Capacity::new(4, 16, 30, 30), 3, 24 * 60, 120, 0);
    let mut fleet = twelve_worker_fleet(&req);
    let before = fingerprint(&fleet);

    let err = place(&fleet, &req, &BinPack).expect_err("nothing fits");
    let line =
        "0/12 workers fit: 5 insufficient memory, 4 licence PERSONAL allows 20 nodes, 3 draining";
    assert_eq!(err.to_string(), line);
    assert_eq!(err.summary(), line);
    assert_eq!(err.total_workers, 12);
    assert_eq!(
        err.count_of(RejectReason::Insufficient {
            dimension: Dimension::Memory
        }),
        5
    );
    assert_eq!(err.count_of(RejectReason::Draining), 3);
    assert_eq!(err.count_of(RejectReason::NestedVirt), 0);
    let codes: Vec<&str> = err.reasons.iter().map(|c| c.reason.code()).collect();
    assert_eq!(
        codes,
        [
            "INSUFFICIENT_MEMORY",
            "LICENSE_NODE_LIMIT",
            "WORKER_DRAINING"
        ]
    );
    assert_eq!(fingerprint(&fleet), before, "place changes nothing");

    // plan agrees, and the batch leaves the instance pending without touching the fleet.
    assert_eq!(
        plan(&fleet, &req, &BinPack).why_pending(),
        Some(err.clone())
    );
    let out = place_batch(&mut fleet, std::slice::from_ref(&req), &BinPack);
    assert_eq!(out.pending_count(), 1);
    assert_eq!(out.entries[0].decision, Decision::Pending { summary: err });
    assert_eq!(
        fingerprint(&fleet),
        before,
        "a pending request books nothing"
    );
}

#[test]
fn why_pending_orders_by_count_then_phrase_and_handles_an_empty_fleet() {
    let req = request("i-1");
    let empty = FleetSnapshot::default();
    let err = place(&empty, &req, &BinPack).expect_err("no workers");
    assert_eq!(err.to_string(), "0/0 workers fit: no workers");
    assert!(err.reasons.is_empty());

    let mut workers = Vec::new();
    for (id, state) in [
        ("a", WorkerState::Stopped),
        ("b", WorkerState::Draining),
        ("c", WorkerState::Provisioning),
        ("d", WorkerState::Stopped),
        ("e", WorkerState::Draining),
    ] {
        let mut w = personal(id);
        w.state = state;
        workers.push(w);
    }
    let mut legacy = personal("f");
    legacy.template_name = None;
    workers.push(legacy);
    let err = place(&FleetSnapshot::new(workers), &req, &BinPack).expect_err("none running");
    assert_eq!(
        err.to_string(),
        "0/6 workers fit: 2 draining, 2 not running (STOPPED), 1 legacy worker, \
         1 not running (PROVISIONING)"
    );
}

// ---------------------------------------------------------------------------------------------
// Scenario 7: ports
// ---------------------------------------------------------------------------------------------

#[test]
fn test_scenario7_ports_are_disjoint_exhaustion_pends_release_reuses() {
    let mut fleet = FleetSnapshot::new(vec![personal("w-1")]);
    let reqs = [
        request_at("i-1", Capacity::new(1, 1, 1, 1), 3, 600, 60, 0),
        request_at("i-2", Capacity::new(1, 1, 1, 1), 2, 600, 60, 1),
    ];
    let out = place_batch(&mut fleet, &reqs, &BinPack);
    let ports_of = |id: &str| match &out.get(id).expect("decided").decision {
        Decision::Placed {
            ports, worker_id, ..
        } => {
            assert_eq!(worker_id, "w-1");
            ports.clone()
        }
        other => panic!("{id} not placed: {other:?}"),
    };
    let p1 = ports_of("i-1");
    let p2 = ports_of("i-2");
    assert_eq!(p1.values().copied().collect::<Vec<_>>(), [2000, 2001, 2002]);
    assert_eq!(p2.values().copied().collect::<Vec<_>>(), [2003, 2004]);
    let all: BTreeSet<u16> = p1.values().chain(p2.values()).copied().collect();
    assert_eq!(all.len(), 5, "disjoint");
    assert!(all.iter().all(|p| (2000..=9999).contains(p)));
    // The snapshot holds what the outcome says.
    let w = fleet.get("w-1").expect("exists");
    assert_eq!(w.ports.ports_of("i-1"), Some(&p1));
    assert_eq!(w.ports.ports_of("i-2"), Some(&p2));
    assert_eq!(w.live_instances, 2);

    // A tiny range: the second instance finds too few ports and stays pending.
    let tiny = PortRange {
        start: 2000,
        end: 2004,
    };
    let mut fleet =
        FleetSnapshot::new(vec![worker_with("w-1", LicenseType::Personal, METAL, tiny)]);
    let a = request_at("i-a", Capacity::new(1, 1, 1, 1), 3, 600, 60, 0);
    let b = request_at("i-b", Capacity::new(1, 1, 1, 1), 3, 600, 60, 1);
    let out = place_batch(&mut fleet, &[a.clone(), b.clone()], &BinPack);
    assert_eq!(out.worker_of("i-a"), Some("w-1"));
    match &out.get("i-b").expect("decided").decision {
        Decision::Pending { summary } => {
            assert_eq!(summary.to_string(), "0/1 workers fit: 1 insufficient ports");
            assert_eq!(summary.reasons[0].reason.code(), "INSUFFICIENT_PORTS");
        }
        other => panic!("expected pending, got {other:?}"),
    }
    let w = fleet.get("w-1").expect("exists");
    assert_eq!(w.ports.free_count(), 2, "exhaustion took nothing");
    assert!(!w.timeline.contains("i-b"));
    let detail = plan(&fleet, &b, &BinPack).rejected[0].detail.clone();
    assert_eq!(detail, "needs 3 ports, 2 free");

    // Terminated → released → the ports are reused, lowest first.
    assert!(fleet.get_mut("w-1").expect("exists").remove_booking("i-a"));
    let out = place_batch(&mut fleet, &[b], &BinPack);
    match &out.entries[0].decision {
        Decision::Placed { ports, .. } => {
            assert_eq!(
                ports.values().copied().collect::<Vec<_>>(),
                [2000, 2001, 2002]
            );
        }
        other => panic!("expected placed, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Capacity over time (§11 item 9)
// ---------------------------------------------------------------------------------------------

#[test]
fn bookings_that_do_not_overlap_share_a_worker_that_holds_one_at_a_time() {
    let big = Capacity::new(40, 100, 100, 10);
    // 09:00–11:00 and 11:15–13:00 (window from 11:00 with the 15 min lead): they touch, no overlap.
    let a = request_at("i-a", big, 1, 540, 120, 0);
    let b = request_at("i-b", big, 1, 675, 105, 1);
    // 10:00–12:00 overlaps both.
    let c = request_at("i-c", big, 1, 600, 120, 2);

    let mut one = FleetSnapshot::new(vec![personal("w-1")]);
    let out = place_batch(&mut one, &[c.clone(), b.clone(), a.clone()], &BinPack);
    assert_eq!(out.worker_of("i-a"), Some("w-1"));
    assert_eq!(out.worker_of("i-b"), Some("w-1"), "no overlap: same worker");
    match &out.get("i-c").expect("decided").decision {
        Decision::Pending { summary } => {
            assert_eq!(summary.to_string(), "0/1 workers fit: 1 insufficient cpu")
        }
        other => panic!("expected pending, got {other:?}"),
    }

    // With two workers the overlapping one goes to the second worker.
    let mut two = FleetSnapshot::new(vec![personal("w-2"), personal("w-1")]);
    let out = place_batch(&mut two, &[a, b, c], &BinPack);
    assert_eq!(out.worker_of("i-a"), Some("w-1"));
    // Same score on both for i-b (no overlap with i-a): fewer free ports → w-1.
    assert_eq!(out.worker_of("i-b"), Some("w-1"));
    assert_eq!(out.worker_of("i-c"), Some("w-2"));
}

// ---------------------------------------------------------------------------------------------
// Batch
// ---------------------------------------------------------------------------------------------

#[test]
fn batch_accounts_for_its_own_placements() {
    // Each worker holds two 20-CPU instances at once; five requests for the same slot.
    let mut fleet = FleetSnapshot::new(vec![personal("w-b"), personal("w-a")]);
    let reqs: Vec<PlacementRequest> = (1..=5)
        .map(|i| {
            request_at(
                &format!("i-{i}"),
                Capacity::new(20, 10, 10, 2),
                2,
                600,
                120,
                i,
            )
        })
        .collect();
    let out = place_batch(&mut fleet, &reqs, &BinPack);
    let got: Vec<Option<&str>> = (1..=5).map(|i| out.worker_of(&format!("i-{i}"))).collect();
    assert_eq!(
        got,
        [Some("w-a"), Some("w-a"), Some("w-b"), Some("w-b"), None],
        "ties → w-a by id, then bin-packing fills w-a before w-b"
    );
    match &out.get("i-5").expect("decided").decision {
        Decision::Pending { summary } => {
            assert_eq!(summary.to_string(), "0/2 workers fit: 2 insufficient cpu")
        }
        other => panic!("expected pending, got {other:?}"),
    }
    assert_eq!((out.placed_count(), out.pending_count()), (4, 1));
    // Applied to the snapshot: capacity and ports.
    let a = fleet.get("w-a").expect("exists");
    assert_eq!(a.timeline.peak(&reqs[0].window).cpu_cores, 40);
    assert_eq!(a.ports.used_count(), 4);
    assert_eq!(a.live_instances, 2);
    // The summaries the filters read follow the batch's bookings.
    for (w, s) in fleet.workers().iter().zip(fleet.summaries()) {
        assert_eq!(*s, WorkerSummary::of(w, s.image), "{}", w.id);
    }
    let a = fleet.index_of("w-a").expect("exists");
    assert_eq!(fleet.summaries()[a].free_ports, 8000 - 4);
    // The second instance on w-a got the next ports.
    match &out.get("i-2").expect("decided").decision {
        Decision::Placed {
            ports,
            score,
            peak_after,
            ..
        } => {
            assert_eq!(ports.values().copied().collect::<Vec<_>>(), [2002, 2003]);
            assert_eq!(*peak_after, Capacity::new(40, 20, 20, 4));
            assert!(
                (score - (40.0 / 48.0 + 20.0 / 192.0 + 20.0 / 500.0 + 4.0 / 20.0) / 4.0).abs()
                    < 1e-12
            );
        }
        other => panic!("expected placed, got {other:?}"),
    }
}

#[test]
fn batch_follows_the_queue_order_slot_then_created_at() {
    // One worker with room for one of them at a time; all windows overlap.
    let big = Capacity::new(40, 10, 10, 1);
    let reqs = vec![
        request_at("late-slot", big, 1, 660, 120, 0),
        request_at("same-slot-booked-later", big, 1, 600, 120, 7),
        request_at("same-slot-booked-first", big, 1, 600, 120, 3),
    ];
    let mut fleet = FleetSnapshot::new(vec![personal("w-1")]);
    let out = place_batch(&mut fleet, &reqs, &BinPack);
    let order: Vec<&str> = out.entries.iter().map(|e| e.instance_id.as_str()).collect();
    assert_eq!(
        order,
        [
            "same-slot-booked-first",
            "same-slot-booked-later",
            "late-slot"
        ]
    );
    let idx: Vec<usize> = out.entries.iter().map(|e| e.request_index).collect();
    assert_eq!(idx, [2, 1, 0]);
    assert_eq!(out.worker_of("same-slot-booked-first"), Some("w-1"));
    assert_eq!(out.worker_of("same-slot-booked-later"), None);
    assert_eq!(out.worker_of("late-slot"), None);
}

#[test]
fn batch_refuses_malformed_requests_without_booking() {
    let mut fleet = FleetSnapshot::new(vec![personal("w-1")]);
    let ok = request_at("i-1", Capacity::new(1, 1, 1, 1), 1, 600, 60, 0);
    let dup = request_at("i-1", Capacity::new(1, 1, 1, 1), 1, 600, 60, 1);
    let mut bad_ports = request_at("i-2", Capacity::new(1, 1, 1, 1), 2, 600, 60, 2);
    bad_ports.port_names = vec!["serial_1".into(), "serial_1".into()];
    let out = place_batch(&mut fleet, &[ok, dup, bad_ports], &BinPack);
    assert_eq!(out.placed_count(), 1);
    let invalid = out
        .entries
        .iter()
        .filter(|e| matches!(e.decision, Decision::Invalid { .. }))
        .count();
    assert_eq!(invalid, 2);
    let w = fleet.get("w-1").expect("exists");
    assert_eq!(w.timeline.len(), 1);
    assert_eq!(w.ports.used_count(), 1);

    // A request for an instance the worker already holds is refused, not booked twice.
    let again = request_at("i-1", Capacity::new(1, 1, 1, 1), 1, 600, 60, 0);
    let out = place_batch(&mut fleet, &[again], &BinPack);
    assert!(matches!(out.entries[0].decision, Decision::Invalid { .. }));
    assert_eq!(fleet.get("w-1").expect("exists").timeline.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Plan
// ---------------------------------------------------------------------------------------------

#[test]
fn plan_ranks_candidates_and_lists_every_rejected_worker() {
    let req = request("i-1");
    let mut full = personal("w-full");
    book(&mut full, "x", req.window, Capacity::new(0, 180, 0, 0));
    let mut half = personal("w-half");
    book(&mut half, "y", req.window, Capacity::new(24, 96, 250, 10));
    let mut drain = personal("w-drain");
    drain.state = WorkerState::Draining;
    let fleet = FleetSnapshot::new(vec![
        personal("w-empty"),
        full,
        half,
        drain,
        personal("w-empty-2"),
    ]);
    let explained = plan(&fleet, &req, &BinPack);
    assert_eq!(explained.total_workers, 5);
    let ranked: Vec<&str> = explained
        .candidates
        .iter()
        .map(|c| c.worker_id.as_str())
        .collect();
    assert_eq!(ranked, ["w-half", "w-empty", "w-empty-2"]);
    assert!(
        explained
            .candidates
            .windows(2)
            .all(|w| w[0].score >= w[1].score)
    );
    let best = explained.best().expect("feasible");
    let chosen = place(&fleet, &req, &BinPack).expect("fits");
    assert_eq!(best.worker_id, chosen.worker_id);
    assert_eq!(best.worker_index, 2);
    assert_eq!(best.peak_after, Capacity::new(28, 112, 280, 15));
    assert_eq!(
        best.utilisation_after,
        [28.0 / 48.0, 112.0 / 192.0, 280.0 / 500.0, 15.0 / 20.0]
    );
    assert!((best.score - chosen.score).abs() < 1e-15);
    assert_eq!(best.free_ports, 8000);

    let rejected: Vec<(&str, &str)> = explained
        .rejected
        .iter()
        .map(|r| (r.worker_id.as_str(), r.reason.code()))
        .collect();
    assert_eq!(
        rejected,
        [
            ("w-full", "INSUFFICIENT_MEMORY"),
            ("w-drain", "WORKER_DRAINING")
        ]
    );
    assert!(
        explained.rejected[0]
            .detail
            .starts_with("needs 16 GiB memory, 12 free at the peak of")
    );
    assert_eq!(
        explained.summary(),
        "3/5 workers fit: 1 draining, 1 insufficient memory"
    );
    assert_eq!(explained.why_pending(), None);
    // Spread ranks the other way round (ties still by id).
    let spread = plan(&fleet, &req, &Spread);
    let ranked: Vec<&str> = spread
        .candidates
        .iter()
        .map(|c| c.worker_id.as_str())
        .collect();
    assert_eq!(ranked, ["w-empty", "w-empty-2", "w-half"]);
}

#[test]
fn check_worker_answers_for_a_hypothetical_worker() {
    let template = personal_metal();
    let w =
        WorkerSnapshot::hypothetical("new", &template, WorkerState::Running, t0()).expect("valid");
    assert_eq!(
        check_worker(&w, &request("i-1")),
        Ok(Capacity::new(4, 16, 30, 5))
    );
    let thirty = request_at("i-2", Capacity::new(4, 16, 30, 30), 1, 600, 60, 0);
    assert_eq!(
        check_worker(&w, &thirty),
        Err(RejectReason::LicenceNodeLimit {
            licence: LicenseType::Personal,
            limit: 20
        })
    );
}

// ---------------------------------------------------------------------------------------------
// The filters without the state, for the autoscaler
// ---------------------------------------------------------------------------------------------

#[test]
fn check_fit_ignores_the_state_and_takes_free_ports_and_ami_from_the_caller() {
    let req = ami_request("i-1");
    let mut w = personal("w-1");
    w.state = WorkerState::Stopped;
    assert_eq!(
        check_worker(&w, &req),
        Err(RejectReason::NotRunning {
            state: WorkerState::Stopped
        })
    );
    let ami = ami_check(
        &req.ami_requirements,
        w.ami_name.as_deref(),
        w.cml_version.as_deref(),
    );
    assert_eq!(ami, Ok(()));
    let summary = WorkerSummary::of(&w, 0);
    assert_eq!(
        check_fit(&summary, &w.timeline, ami, &req, &req.window),
        Ok(Capacity::new(4, 16, 30, 5))
    );
    // The caller's free ports, not the worker's.
    let few = WorkerSummary {
        free_ports: 2,
        ..summary
    };
    assert_eq!(
        check_fit(&few, &w.timeline, Ok(()), &req, &req.window),
        Err(RejectReason::InsufficientPorts)
    );
    // The caller's AMI verdict, in the AMI filter's place in the order (after the licence).
    assert_eq!(
        check_fit(
            &summary,
            &w.timeline,
            Err(RejectReason::AmiVersion),
            &req,
            &req.window
        ),
        Err(RejectReason::AmiVersion)
    );
    let mut enterprise_only = req.clone();
    enterprise_only.license_affinity = vec![LicenseType::Enterprise];
    assert_eq!(
        check_fit(
            &summary,
            &w.timeline,
            Err(RejectReason::AmiVersion),
            &enterprise_only,
            &req.window
        ),
        Err(RejectReason::LicenceAffinity {
            licence: LicenseType::Personal
        })
    );
    // A legacy worker is still refused.
    let legacy = WorkerSummary {
        managed: false,
        ..summary
    };
    assert_eq!(
        check_fit(&legacy, &w.timeline, Ok(()), &req, &req.window),
        Err(RejectReason::Legacy)
    );
    // The window is the caller's: a booking before a clamped start does not count.
    book(
        &mut w,
        "early",
        TimeWindow::new(req.window.start, req.window.start + Duration::minutes(30)),
        Capacity::new(45, 0, 0, 0),
    );
    assert_eq!(
        check_fit(&summary, &w.timeline, Ok(()), &req, &req.window),
        Err(RejectReason::Insufficient {
            dimension: Dimension::Cpu
        })
    );
    let clamped = TimeWindow::new(req.window.start + Duration::minutes(30), req.window.end);
    assert_eq!(
        check_fit(&summary, &w.timeline, Ok(()), &req, &clamped),
        Ok(Capacity::new(4, 16, 30, 5))
    );
}

#[test]
fn check_fit_on_a_template_agrees_with_check_worker_on_its_hypothetical_worker() {
    let mut template = ccm_core::model::WorkerTemplate {
        port_range: PortRange {
            start: 2000,
            end: 2003,
        },
        ..personal_metal()
    };
    let mut nested = request("i-nested");
    nested.nested_virt = true;
    let requests = [
        request("i-1"),
        request_at("i-30", Capacity::new(4, 16, 30, 30), 1, 600, 60, 0),
        request_at("i-cpu", Capacity::new(64, 16, 30, 5), 1, 600, 60, 0),
        request_at("i-ports", Capacity::new(1, 1, 1, 1), 5, 600, 60, 0),
        nested,
    ];
    for nested_virt in [true, false] {
        template.nested_virt = nested_virt;
        let w = WorkerSnapshot::hypothetical("new", &template, WorkerState::Running, t0())
            .expect("valid");
        let summary = WorkerSummary::of_template(&template, WorkerState::Running);
        assert_eq!(summary, WorkerSummary::of(&w, 0));
        for req in &requests {
            assert_eq!(
                check_fit(&summary, &w.timeline, Ok(()), req, &req.window),
                check_worker(&w, req),
                "{} (nested_virt {nested_virt})",
                req.instance_id
            );
        }
    }
}

#[test]
fn ami_checks_split_into_name_and_version() {
    let reqs = vec![
        AmiRequirement {
            name_pattern: "CML-2.*".into(),
            min_version: None,
        },
        AmiRequirement {
            name_pattern: String::new(),
            min_version: Some(Version::new(2, 9, 0)),
        },
    ];
    assert_eq!(ami_name_check(&reqs, Some("CML-2.8.0")), Ok(()));
    assert_eq!(
        ami_name_check(&reqs, Some("CML-3.0.0")),
        Err(RejectReason::AmiPattern)
    );
    assert_eq!(ami_name_check(&reqs, None), Err(RejectReason::AmiPattern));
    assert_eq!(ami_version_check(&reqs, Some("2.9.0")), Ok(()));
    assert_eq!(
        ami_version_check(&reqs, Some("2.8.9")),
        Err(RejectReason::AmiVersion)
    );
    assert_eq!(
        ami_version_check(&reqs, None),
        Err(RejectReason::AmiVersion)
    );
    // Both: the name first.
    assert_eq!(
        ami_check(&reqs, Some("CML-3.0.0"), Some("2.8.0")),
        Err(RejectReason::AmiPattern)
    );
    assert_eq!(
        ami_check(&reqs, Some("CML-2.8.0"), Some("2.8.0")),
        Err(RejectReason::AmiVersion)
    );
    assert_eq!(ami_check(&reqs, Some("CML-2.9.1"), Some("2.9.1")), Ok(()));
    assert_eq!(ami_check(&[], None, None), Ok(()));
}
