//! Autoscaling decisions: domain.md §6 and the acceptance scenarios 6, 13, 14, 15 and 17.
//!
//! The fleet is built from hypothetical workers of two templates (PERSONAL and ENTERPRISE, both
//! 48 CPU / 192 GiB / 500 GiB); requests take 16 CPU so three fit one worker at a time.

use std::collections::{BTreeMap, BTreeSet};

use ccm_core::autoscale::{
    AutoscaleInput, AutoscalePolicy, ScalingAction, ScalingDecision, ScalingPlan, codes, plan,
    select_template,
};
use ccm_core::fleet::{FleetSnapshot, PlacementRequest, WorkerSnapshot};
use ccm_core::model::{
    AmiRequirement, Capacity, LicenseType, PortRange, TimeSlot, TimeWindow, WorkerState,
    WorkerTemplate,
};
use chrono::{DateTime, Duration, TimeZone, Utc};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 15, 9, 0, 0)
        .single()
        .expect("valid time")
}

fn at(minutes: i64) -> DateTime<Utc> {
    now() + Duration::minutes(minutes)
}

fn template(name: &str, license: LicenseType, drain_hours: u32) -> WorkerTemplate {
    WorkerTemplate {
        name: name.into(),
        description: String::new(),
        instance_type: "m5zn.metal".into(),
        nested_virt: true,
        capacity: Capacity::new(48, 192, 500, 500),
        license_type: license,
        ami_pattern: "CML-2.9.*".into(),
        regions: vec!["us-east-1".into()],
        startup_minutes: 20,
        port_range: PortRange::default(),
        drain_timeout_hours: drain_hours,
        min_warm: 0,
        max_workers: 10,
        tags: BTreeMap::new(),
    }
}

fn personal() -> WorkerTemplate {
    template("personal-metal", LicenseType::Personal, 4)
}

fn enterprise() -> WorkerTemplate {
    template("enterprise-metal", LicenseType::Enterprise, 6)
}

fn templates() -> Vec<WorkerTemplate> {
    vec![personal(), enterprise()]
}

/// A managed worker of `t` that entered `state` `ago` minutes before now.
fn worker(id: &str, t: &WorkerTemplate, state: WorkerState, ago: i64) -> WorkerSnapshot {
    WorkerSnapshot::hypothetical(id, t, state, at(-ago)).expect("valid template")
}

/// A legacy worker (no template): the autoscaler must never count or touch it.
fn legacy(id: &str, state: WorkerState, ago: i64) -> WorkerSnapshot {
    let mut w = worker(id, &personal(), state, ago);
    w.template_name = None;
    w
}

/// A placed instance on `w`: holds capacity from `start` for `minutes` and counts as live.
fn place(w: &mut WorkerSnapshot, id: &str, start: i64, minutes: i64) {
    w.add_booking(
        id,
        TimeWindow::new(at(start), at(start + minutes)),
        Capacity::new(16, 32, 20, 5),
        &BTreeMap::new(),
    )
    .expect("no port conflict");
}

/// A PENDING request for 16 CPU / `nodes` nodes, slot starting in `start` minutes.
fn req(id: &str, nodes: u32, start: i64, minutes: i64) -> PlacementRequest {
    req_cpu(id, 16, nodes, start, minutes)
}

fn req_cpu(id: &str, cpu: u32, nodes: u32, start: i64, minutes: i64) -> PlacementRequest {
    let slot = TimeSlot {
        start: at(start),
        end: at(start + minutes),
        asap: false,
    };
    PlacementRequest {
        instance_id: id.into(),
        definition_id: "def-ccna".into(),
        demand: Capacity::new(cpu, 32, 20, nodes),
        port_names: vec!["serial_1".into(), "vnc_1".into()],
        license_affinity: vec![LicenseType::Personal, LicenseType::Enterprise],
        ami_requirements: vec![],
        nested_virt: true,
        slot,
        window: slot.booking_window(Duration::minutes(15)),
        created_at: at(-60),
    }
}

fn asap(id: &str, booked_at: i64) -> PlacementRequest {
    let mut r = req(id, 5, booked_at, 120);
    r.slot.asap = true;
    r.window = r.slot.booking_window(Duration::minutes(15));
    r
}

struct Case {
    workers: Vec<WorkerSnapshot>,
    demand: Vec<PlacementRequest>,
    templates: Vec<WorkerTemplate>,
    last_scale_up: BTreeMap<String, DateTime<Utc>>,
    policy: AutoscalePolicy,
}

impl Case {
    fn new(workers: Vec<WorkerSnapshot>, demand: Vec<PlacementRequest>) -> Self {
        Case {
            workers,
            demand,
            templates: templates(),
            last_scale_up: BTreeMap::new(),
            policy: AutoscalePolicy::default(),
        }
    }

    fn run(&self) -> ScalingPlan {
        let fleet = FleetSnapshot::new(self.workers.clone());
        plan(
            &AutoscaleInput {
                fleet: &fleet,
                demand: &self.demand,
                templates: &self.templates,
                now: now(),
                last_scale_up: &self.last_scale_up,
            },
            &self.policy,
        )
    }
}

fn of(plan: &ScalingPlan, action: ScalingAction) -> Vec<&ScalingDecision> {
    plan.with_action(action).collect()
}

fn ids(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn worker_ids(plan: &ScalingPlan, action: ScalingAction) -> Vec<String> {
    plan.with_action(action)
        .filter_map(|d| d.worker_id.clone())
        .collect()
}

/// `n` requests that all overlap in time: `n / 3` workers' worth.
fn overlapping_demand(n: usize) -> Vec<PlacementRequest> {
    (0..n)
        .map(|i| req(&format!("i{i:02}"), 5, 20, 120))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Scale-up
// ---------------------------------------------------------------------------------------------

#[test]
fn scenario6_no_fit_requests_exactly_one_scale_up() {
    // The only RUNNING worker is full for the request's window.
    let mut busy = worker("w-busy", &personal(), WorkerState::Running, 300);
    for i in 0..3 {
        place(&mut busy, &format!("live{i}"), -60, 300);
    }
    let plan = Case::new(vec![busy], vec![req("i1", 5, 30, 60)]).run();
    let up = of(&plan, ScalingAction::ScaleUp);
    assert_eq!(up.len(), 1, "{plan:#?}");
    assert_eq!(up[0].template.as_deref(), Some("personal-metal"));
    assert_eq!(up[0].count, 1);
    assert_eq!(up[0].instances, ids(&["i1"]));
    assert_eq!(up[0].code, codes::SCALE_UP_DEMAND);
    // Nothing else: the busy worker is neither drained nor waited on.
    assert_eq!(plan.decisions.len(), 1, "{plan:#?}");
    assert!(plan.halted.is_none());
}

#[test]
fn scenario6_second_pass_with_booting_worker_waits_instead_of_scaling_again() {
    for state in [WorkerState::Pending, WorkerState::Provisioning] {
        // The worker asked for in the first pass is booting; no cooldown is recorded, so only
        // counting booting capacity can prevent a second scale-up.
        let booting = worker("w-new", &personal(), state, 2);
        let plan = Case::new(vec![booting], vec![req("i1", 5, 30, 60)]).run();
        assert_eq!(plan.new_workers(), 0, "{state}: {plan:#?}");
        let wait = of(&plan, ScalingAction::Wait);
        assert_eq!(wait.len(), 1, "{state}: {plan:#?}");
        assert_eq!(wait[0].worker_id.as_deref(), Some("w-new"));
        assert_eq!(wait[0].code, codes::WAIT_BOOTING);
        assert_eq!(wait[0].instances, ids(&["i1"]));
        assert!(
            wait[0].reason.contains(state.as_str()),
            "{}",
            wait[0].reason
        );
    }
}

#[test]
fn booting_capacity_is_counted_so_three_workers_of_demand_with_one_booting_scales_up_two() {
    let booting = worker("w-boot", &personal(), WorkerState::Provisioning, 5);
    let plan = Case::new(vec![booting], overlapping_demand(9)).run();
    let up = of(&plan, ScalingAction::ScaleUp);
    assert_eq!(up.len(), 1, "{plan:#?}");
    assert_eq!(up[0].count, 2);
    assert_eq!(up[0].instances.len(), 6);
    let wait = of(&plan, ScalingAction::Wait);
    assert_eq!(wait.len(), 1);
    assert_eq!(wait[0].instances.len(), 3);
}

#[test]
fn booting_worker_of_an_unsuitable_template_does_not_cover_demand() {
    // Only ENTERPRISE is booting, but the request accepts PERSONAL only.
    let booting = worker("w-ent", &enterprise(), WorkerState::Provisioning, 5);
    let mut r = req("i1", 5, 20, 60);
    r.license_affinity = vec![LicenseType::Personal];
    let plan = Case::new(vec![booting], vec![r]).run();
    let up = of(&plan, ScalingAction::ScaleUp);
    assert_eq!(up.len(), 1, "{plan:#?}");
    assert_eq!(up[0].template.as_deref(), Some("personal-metal"));
}

#[test]
fn stopped_worker_is_restarted_before_creating_a_new_one() {
    let stopped = worker("w-stopped", &personal(), WorkerState::Stopped, 120);
    let plan = Case::new(vec![stopped], vec![req("i1", 5, 20, 60)]).run();
    assert_eq!(plan.new_workers(), 0, "{plan:#?}");
    let restart = of(&plan, ScalingAction::RestartStopped);
    assert_eq!(restart.len(), 1);
    assert_eq!(restart[0].worker_id.as_deref(), Some("w-stopped"));
    assert_eq!(restart[0].instances, ids(&["i1"]));
    assert_eq!(restart[0].code, codes::RESTART_FOR_DEMAND);
}

#[test]
fn stopped_workers_cover_what_they_can_and_new_workers_the_rest() {
    let stopped = worker("w-stopped", &personal(), WorkerState::Stopped, 120);
    let plan = Case::new(vec![stopped], overlapping_demand(6)).run();
    assert_eq!(
        worker_ids(&plan, ScalingAction::RestartStopped),
        ids(&["w-stopped"])
    );
    assert_eq!(plan.new_workers(), 1, "{plan:#?}");
}

#[test]
fn stopped_worker_past_retention_that_is_restarted_is_not_terminated() {
    let stopped = worker("w-old", &personal(), WorkerState::Stopped, 100 * 60);
    let plan = Case::new(vec![stopped], vec![req("i1", 5, 20, 60)]).run();
    assert_eq!(
        worker_ids(&plan, ScalingAction::RestartStopped),
        ids(&["w-old"])
    );
    assert!(of(&plan, ScalingAction::Terminate).is_empty(), "{plan:#?}");
}

#[test]
fn disjoint_window_demands_share_one_new_worker() {
    // 40 CPU each: two never fit one worker at the same time.
    // a: slot 09:05–09:20, window [now, 09:20); b: slot 09:35–10:35, window [09:20, 10:35).
    let a = req_cpu("a", 40, 5, 5, 15);
    let b = req_cpu("b", 40, 5, 35, 60);
    let plan = Case::new(vec![], vec![a.clone(), b]).run();
    assert_eq!(plan.new_workers(), 1, "{plan:#?}");
    assert_eq!(
        of(&plan, ScalingAction::ScaleUp)[0].instances,
        ids(&["a", "b"])
    );

    // Control: overlapping windows need two workers.
    let b_overlap = req_cpu("b", 40, 5, 30, 60);
    let plan = Case::new(vec![], vec![a, b_overlap]).run();
    assert_eq!(plan.new_workers(), 2, "{plan:#?}");
}

#[test]
fn first_fit_decreasing_packs_large_demands_first() {
    // 32 + 16 fills a worker exactly; in queue order (s1, s2, z1, z2 = 16, 16, 32, 32) plain
    // first-fit would need 3.
    let demand = vec![
        req_cpu("s1", 16, 1, 20, 60),
        req_cpu("s2", 16, 1, 20, 60),
        req_cpu("z1", 32, 1, 20, 60),
        req_cpu("z2", 32, 1, 20, 60),
    ];
    let plan = Case::new(vec![], demand).run();
    assert_eq!(plan.new_workers(), 2, "{plan:#?}");
}

#[test]
fn template_selection_prefers_personal_before_enterprise() {
    let r = req("i1", 5, 20, 60);
    let reversed = vec![enterprise(), personal()];
    assert_eq!(
        select_template(&r, &reversed).map(|t| t.name.as_str()),
        Ok("personal-metal")
    );
    let mut case = Case::new(vec![], vec![r]);
    case.templates = reversed;
    let plan = case.run();
    assert_eq!(
        of(&plan, ScalingAction::ScaleUp)[0].template.as_deref(),
        Some("personal-metal")
    );
}

#[test]
fn template_selection_node_count_30_forces_enterprise() {
    let r = req("i30", 30, 20, 60);
    assert_eq!(
        select_template(&r, &templates()).map(|t| t.name.as_str()),
        Ok("enterprise-metal")
    );
    let plan = Case::new(vec![], vec![r]).run();
    let up = of(&plan, ScalingAction::ScaleUp);
    assert_eq!(up.len(), 1, "{plan:#?}");
    assert_eq!(up[0].template.as_deref(), Some("enterprise-metal"));
}

#[test]
fn template_selection_prefers_smallest_capacity_then_name() {
    let mut big = template("a-big", LicenseType::Personal, 4);
    big.capacity = Capacity::new(96, 384, 1000, 500);
    let small_b = template("b-small", LicenseType::Personal, 4);
    let small_c = template("c-small", LicenseType::Personal, 4);
    let ts = vec![small_c, big, small_b];
    let r = req("i1", 5, 20, 60);
    assert_eq!(
        select_template(&r, &ts).map(|t| t.name.as_str()),
        Ok("b-small")
    );
    // A request too big for the small ones takes the big one.
    let huge = req_cpu("i2", 64, 5, 20, 60);
    assert_eq!(
        select_template(&huge, &ts).map(|t| t.name.as_str()),
        Ok("a-big")
    );
}

#[test]
fn template_selection_respects_ami_and_nested_virt() {
    let mut r = req("i1", 5, 20, 60);
    r.ami_requirements = vec![AmiRequirement {
        name_pattern: "CML-2.8.*".into(),
        min_version: None,
    }];
    let err = select_template(&r, &templates()).expect_err("no template has a 2.8 AMI");
    assert!(err.to_string().contains("CML-2.8.*"), "{err}");

    let mut virt = personal();
    virt.instance_type = "m5.24xlarge".into();
    virt.nested_virt = false;
    let r = req("i2", 5, 20, 60);
    let err = select_template(&r, &[virt]).expect_err("not metal");
    assert!(err.to_string().contains("nested virtualisation"), "{err}");
}

#[test]
fn template_max_workers_caps_scale_up_with_a_reason() {
    let mut capped = personal();
    capped.max_workers = 2;
    let mut full = worker("w-full", &capped, WorkerState::Running, 300);
    for i in 0..3 {
        place(&mut full, &format!("live{i}"), -60, 300);
    }
    let mut case = Case::new(vec![full], overlapping_demand(9));
    case.templates = vec![capped, enterprise()];
    let plan = case.run();
    let up = of(&plan, ScalingAction::ScaleUp);
    assert_eq!(up.len(), 1, "{plan:#?}");
    assert_eq!(up[0].template.as_deref(), Some("personal-metal"));
    assert_eq!(up[0].count, 1);
    assert!(
        up[0].reason.contains("capped from 3 to 1"),
        "{}",
        up[0].reason
    );
    assert!(up[0].reason.contains("max_workers 2"), "{}", up[0].reason);
    let wait = of(&plan, ScalingAction::Wait);
    assert_eq!(wait.len(), 1, "{plan:#?}");
    assert_eq!(wait[0].code, codes::WAIT_TEMPLATE_MAX);
    assert_eq!(wait[0].count, 2);
    assert_eq!(wait[0].instances.len(), 6);
}

#[test]
fn global_max_workers_caps_scale_up_with_a_reason() {
    let mut case = Case::new(vec![], overlapping_demand(9));
    case.policy.max_workers = 1;
    let plan = case.run();
    assert_eq!(plan.new_workers(), 1, "{plan:#?}");
    let wait = of(&plan, ScalingAction::Wait);
    assert_eq!(wait.len(), 1, "{plan:#?}");
    assert_eq!(wait[0].code, codes::WAIT_GLOBAL_MAX);
    assert!(
        wait[0].reason.contains("global max_workers 1"),
        "{}",
        wait[0].reason
    );
}

#[test]
fn cooldown_turns_scale_up_into_wait() {
    let mut case = Case::new(vec![], vec![req("i1", 5, 20, 60)]);
    case.last_scale_up.insert("personal-metal".into(), at(-5));
    let plan = case.run();
    assert_eq!(plan.new_workers(), 0, "{plan:#?}");
    let wait = of(&plan, ScalingAction::Wait);
    assert_eq!(wait.len(), 1);
    assert_eq!(wait[0].code, codes::WAIT_COOLDOWN);
    assert_eq!(wait[0].count, 1);
    assert!(wait[0].reason.contains("cooldown"), "{}", wait[0].reason);

    // The cooldown is the template's startup time (20 min): 25 min later it has passed.
    case.last_scale_up.insert("personal-metal".into(), at(-25));
    assert_eq!(case.run().new_workers(), 1);

    // An explicit policy cooldown overrides it.
    case.last_scale_up.insert("personal-metal".into(), at(-5));
    case.policy.scale_up_cooldown = Some(Duration::minutes(3));
    assert_eq!(case.run().new_workers(), 1);
}

#[test]
fn demand_outside_the_lookahead_is_ignored() {
    let plan = Case::new(vec![], vec![req("later", 5, 36, 60)]).run();
    assert!(plan.decisions.is_empty(), "{plan:#?}");
    // The boundary (now + 35 min) is inside.
    let plan = Case::new(vec![], vec![req("edge", 5, 35, 60)]).run();
    assert_eq!(plan.new_workers(), 1, "{plan:#?}");
}

#[test]
fn asap_demand_is_counted_at_once() {
    // Even with a slot start that lies beyond the lookahead, ASAP means now.
    let plan = Case::new(vec![], vec![asap("now", 0), asap("odd", 120)]).run();
    let up = of(&plan, ScalingAction::ScaleUp);
    assert_eq!(up.len(), 1, "{plan:#?}");
    assert_eq!(up[0].instances, ids(&["now", "odd"]));
    let mut not_asap = asap("odd", 120);
    not_asap.slot.asap = false;
    assert!(Case::new(vec![], vec![not_asap]).run().decisions.is_empty());
}

#[test]
fn expired_demand_is_left_to_the_control_plane() {
    let plan = Case::new(vec![], vec![req("gone", 5, -120, 60)]).run();
    assert!(plan.decisions.is_empty(), "{plan:#?}");
}

#[test]
fn no_template_fits_is_explained_to_operators() {
    let huge = req("huge", 600, 20, 60);
    let mut eval = req("eval", 5, 20, 60);
    eval.license_affinity = vec![LicenseType::Evaluation];
    let plan = Case::new(vec![], vec![huge, eval]).run();
    assert_eq!(plan.new_workers(), 0, "{plan:#?}");
    let waits = of(&plan, ScalingAction::Wait);
    assert_eq!(waits.len(), 2, "{plan:#?}");
    for w in &waits {
        assert_eq!(w.code, codes::WAIT_NO_TEMPLATE);
        assert_eq!(w.template, None);
        assert!(w.reason.starts_with("no template fits"), "{}", w.reason);
        assert!(w.reason.contains("personal-metal") && w.reason.contains("enterprise-metal"));
    }
    let huge_reason = &waits
        .iter()
        .find(|w| w.instances == ids(&["huge"]))
        .expect("huge")
        .reason;
    assert!(huge_reason.contains("needs 600 nodes"), "{huge_reason}");
    let eval_reason = &waits
        .iter()
        .find(|w| w.instances == ids(&["eval"]))
        .expect("eval")
        .reason;
    assert!(eval_reason.contains("licence"), "{eval_reason}");
}

#[test]
fn demand_that_fits_a_running_worker_waits_for_the_scheduler_and_keeps_it() {
    let idle = worker("w-idle", &personal(), WorkerState::Running, 300);
    let plan = Case::new(vec![idle], vec![req("i1", 5, 20, 60)]).run();
    assert_eq!(plan.new_workers(), 0, "{plan:#?}");
    assert!(of(&plan, ScalingAction::Drain).is_empty(), "{plan:#?}");
    let wait = of(&plan, ScalingAction::Wait);
    assert_eq!(wait.len(), 1);
    assert_eq!(wait[0].code, codes::WAIT_FITS_RUNNING);
    assert_eq!(wait[0].worker_id.as_deref(), Some("w-idle"));
}

#[test]
fn min_warm_template_below_its_minimum_restarts_then_scales_up() {
    let mut warm = personal();
    warm.min_warm = 2;
    let stopped = worker("w-stopped", &warm, WorkerState::Stopped, 60);
    let mut case = Case::new(vec![stopped], vec![]);
    case.templates = vec![warm, enterprise()];
    let plan = case.run();
    let restart = of(&plan, ScalingAction::RestartStopped);
    assert_eq!(restart.len(), 1, "{plan:#?}");
    assert_eq!(restart[0].code, codes::RESTART_FOR_MIN_WARM);
    let up = of(&plan, ScalingAction::ScaleUp);
    assert_eq!(up.len(), 1, "{plan:#?}");
    assert_eq!((up[0].count, up[0].code), (1, codes::SCALE_UP_MIN_WARM));

    // Met by RUNNING + booting workers: nothing to do.
    let mut warm = personal();
    warm.min_warm = 2;
    let mut case = Case::new(
        vec![
            worker("w-run", &warm, WorkerState::Running, 60),
            worker("w-boot", &warm, WorkerState::Provisioning, 5),
        ],
        vec![],
    );
    case.templates = vec![warm];
    assert!(case.run().decisions.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Scale-down
// ---------------------------------------------------------------------------------------------

#[test]
fn scenario14_idle_worker_with_no_work_in_the_next_30_minutes_is_drained() {
    let idle = worker("w-idle", &personal(), WorkerState::Running, 300);
    let plan = Case::new(vec![idle], vec![]).run();
    let drain = of(&plan, ScalingAction::Drain);
    assert_eq!(drain.len(), 1, "{plan:#?}");
    assert_eq!(drain[0].worker_id.as_deref(), Some("w-idle"));
    assert_eq!(drain[0].code, codes::SCALE_DOWN_IDLE);
    assert!(
        drain[0]
            .reason
            .starts_with("No running or scheduled instances"),
        "{}",
        drain[0].reason
    );
}

#[test]
fn scenario14_worker_with_a_booking_starting_within_grace_is_not_drained() {
    // The booking alone (no live count) must keep it: starts in 20 min, inside the 30 min grace.
    let mut soon = worker("w-soon", &personal(), WorkerState::Running, 300);
    soon.timeline.insert(
        "upcoming",
        TimeWindow::new(at(20), at(80)),
        Capacity::new(16, 32, 20, 5),
    );
    let plan = Case::new(vec![soon], vec![]).run();
    assert!(of(&plan, ScalingAction::Drain).is_empty(), "{plan:#?}");

    // Control: a booking starting after the grace does not protect it.
    let mut later = worker("w-later", &personal(), WorkerState::Running, 300);
    later.timeline.insert(
        "upcoming",
        TimeWindow::new(at(45), at(90)),
        Capacity::new(16, 32, 20, 5),
    );
    let plan = Case::new(vec![later], vec![]).run();
    assert_eq!(worker_ids(&plan, ScalingAction::Drain), ids(&["w-later"]));
}

#[test]
fn scenario14_worker_with_live_instances_is_never_drained() {
    let mut busy = worker("w-busy", &personal(), WorkerState::Running, 300);
    // Booked far beyond the grace period: the live instance alone must keep it.
    place(&mut busy, "tomorrow", 24 * 60, 60);
    let mut case = Case::new(vec![busy], vec![]);
    case.policy.max_concurrent_drains = 10;
    let plan = case.run();
    assert!(of(&plan, ScalingAction::Drain).is_empty(), "{plan:#?}");
}

#[test]
fn scenario14_template_min_warm_is_honoured() {
    let mut warm = personal();
    warm.min_warm = 1;
    let mut recent = worker("w-recent", &warm, WorkerState::Running, 30);
    recent.timeline.insert(
        "finished",
        TimeWindow::new(at(-90), at(-10)),
        Capacity::new(16, 32, 20, 5),
    );
    let old = worker("w-old", &warm, WorkerState::Running, 600);
    let mut case = Case::new(vec![recent, old], vec![]);
    case.templates = vec![warm, enterprise()];
    case.policy.max_concurrent_drains = 5;
    let plan = case.run();
    // One is kept; the one with the least recent activity goes.
    assert_eq!(
        worker_ids(&plan, ScalingAction::Drain),
        ids(&["w-old"]),
        "{plan:#?}"
    );
}

#[test]
fn scenario14_global_min_warm_is_honoured() {
    let workers = (0..3)
        .map(|i| worker(&format!("w{i}"), &personal(), WorkerState::Running, 100 + i))
        .collect();
    let mut case = Case::new(workers, vec![]);
    case.policy.max_concurrent_drains = 5;
    case.policy.min_warm_workers = 2;
    let plan = case.run();
    assert_eq!(of(&plan, ScalingAction::Drain).len(), 1, "{plan:#?}");
    // The oldest (w2: RUNNING for 102 min) goes first.
    assert_eq!(worker_ids(&plan, ScalingAction::Drain), ids(&["w2"]));
}

#[test]
fn scenario14_disruption_budget_caps_concurrent_drains() {
    let idle = |id: &str| worker(id, &personal(), WorkerState::Running, 300);
    let plan = Case::new(vec![idle("a"), idle("b"), idle("c")], vec![]).run();
    assert_eq!(of(&plan, ScalingAction::Drain).len(), 1, "{plan:#?}");

    // One already DRAINING (with instances, within its timeout) uses the whole budget.
    let mut draining = worker("d", &personal(), WorkerState::Draining, 30);
    place(&mut draining, "still-running", -60, 120);
    draining.drain_started_at = Some(at(-30));
    let plan = Case::new(vec![idle("a"), idle("b"), draining.clone()], vec![]).run();
    assert!(of(&plan, ScalingAction::Drain).is_empty(), "{plan:#?}");

    let mut case = Case::new(vec![idle("a"), idle("b"), idle("c"), draining], vec![]);
    case.policy.max_concurrent_drains = 3;
    assert_eq!(of(&case.run(), ScalingAction::Drain).len(), 2);
}

#[test]
fn draining_worker_being_stopped_does_not_use_the_budget() {
    let empty = worker("d-empty", &personal(), WorkerState::Draining, 30);
    let idle = worker("w-idle", &personal(), WorkerState::Running, 300);
    let plan = Case::new(vec![empty, idle], vec![]).run();
    assert_eq!(worker_ids(&plan, ScalingAction::Stop), ids(&["d-empty"]));
    assert_eq!(worker_ids(&plan, ScalingAction::Drain), ids(&["w-idle"]));
}

#[test]
fn draining_and_empty_worker_is_stopped() {
    let mut empty = worker("w-drained", &personal(), WorkerState::Draining, 40);
    empty.drain_started_at = Some(at(-40));
    let plan = Case::new(vec![empty], vec![]).run();
    let stop = of(&plan, ScalingAction::Stop);
    assert_eq!(stop.len(), 1, "{plan:#?}");
    assert_eq!(stop[0].worker_id.as_deref(), Some("w-drained"));
    assert_eq!(stop[0].code, codes::DRAIN_COMPLETE);
    assert!(of(&plan, ScalingAction::ForceStop).is_empty());
}

#[test]
fn scenario15_draining_past_the_drain_timeout_is_force_stopped_with_instance_count() {
    let mut stuck = worker("w-stuck", &personal(), WorkerState::Draining, 245);
    stuck.drain_started_at = Some(at(-245));
    place(&mut stuck, "lab-a", -300, 600);
    place(&mut stuck, "lab-b", -300, 600);
    let plan = Case::new(vec![stuck.clone()], vec![]).run();
    let force = of(&plan, ScalingAction::ForceStop);
    assert_eq!(force.len(), 1, "{plan:#?}");
    assert_eq!(force[0].worker_id.as_deref(), Some("w-stuck"));
    assert_eq!(force[0].code, codes::DRAIN_TIMEOUT);
    assert_eq!(force[0].instances, ids(&["lab-a", "lab-b"]));
    assert!(
        force[0].reason.contains("4 h drain timeout"),
        "{}",
        force[0].reason
    );
    assert!(
        force[0].reason.contains("2 remaining instance(s)"),
        "{}",
        force[0].reason
    );
    assert!(of(&plan, ScalingAction::Stop).is_empty());

    // Within the timeout: left alone.
    stuck.drain_started_at = Some(at(-235));
    assert!(Case::new(vec![stuck], vec![]).run().decisions.is_empty());

    // The ENTERPRISE template allows 6 h.
    let mut ent = worker("w-ent", &enterprise(), WorkerState::Draining, 300);
    ent.drain_started_at = Some(at(-300));
    place(&mut ent, "lab-c", -400, 600);
    assert!(Case::new(vec![ent], vec![]).run().decisions.is_empty());
}

#[test]
fn stopped_worker_past_retention_is_terminated() {
    let old = worker("w-old", &personal(), WorkerState::Stopped, 73 * 60);
    let young = worker("w-young", &personal(), WorkerState::Stopped, 71 * 60);
    let plan = Case::new(vec![old, young], vec![]).run();
    let term = of(&plan, ScalingAction::Terminate);
    assert_eq!(term.len(), 1, "{plan:#?}");
    assert_eq!(term[0].worker_id.as_deref(), Some("w-old"));
    assert_eq!(term[0].code, codes::STOPPED_RETENTION);
}

// ---------------------------------------------------------------------------------------------
// Halt, legacy, determinism, reasons
// ---------------------------------------------------------------------------------------------

#[test]
fn too_many_unready_workers_halt_scale_up_and_drain_but_not_stop() {
    let workers = vec![
        worker("p1", &personal(), WorkerState::Provisioning, 60),
        worker("p2", &personal(), WorkerState::Failed, 10),
        worker("p3", &personal(), WorkerState::Unknown, 10),
        worker("r1", &personal(), WorkerState::Running, 300),
        worker("d1", &personal(), WorkerState::Draining, 30),
        worker("s1", &personal(), WorkerState::Stopped, 100 * 60),
    ];
    // 3 unready of 6 = 50 %: not more than allowed.
    let plan = Case::new(workers.clone(), vec![req("i1", 5, 20, 60)]).run();
    assert!(plan.halted.is_none(), "{plan:#?}");

    let mut more = workers;
    more.push(worker("p4", &personal(), WorkerState::Starting, 50));
    let plan = Case::new(more, vec![req("i1", 5, 20, 60)]).run();
    let reason = plan.halted.clone().expect("4 of 7 unready must halt");
    assert!(reason.contains("4 of 7"), "{reason}");
    assert!(reason.contains("p1") && reason.contains("p4"), "{reason}");
    for action in [
        ScalingAction::ScaleUp,
        ScalingAction::RestartStopped,
        ScalingAction::Drain,
        ScalingAction::Terminate,
        ScalingAction::Wait,
    ] {
        assert!(of(&plan, action).is_empty(), "{action}: {plan:#?}");
    }
    assert_eq!(worker_ids(&plan, ScalingAction::Stop), ids(&["d1"]));
}

#[test]
fn a_single_unready_worker_or_a_young_booting_one_does_not_halt() {
    let plan = Case::new(
        vec![worker("f", &personal(), WorkerState::Failed, 10)],
        vec![req("i1", 5, 20, 60)],
    )
    .run();
    assert!(plan.halted.is_none());
    assert_eq!(plan.new_workers(), 1);

    let plan = Case::new(
        vec![
            worker("b1", &personal(), WorkerState::Provisioning, 10),
            worker("b2", &personal(), WorkerState::Pending, 10),
        ],
        vec![],
    )
    .run();
    assert!(plan.halted.is_none(), "{plan:#?}");
}

#[test]
fn legacy_workers_are_untouched_in_every_path() {
    let mut legacy_draining_busy = legacy("L-drain-busy", WorkerState::Draining, 10 * 60);
    legacy_draining_busy.drain_started_at = Some(at(-10 * 60));
    place(&mut legacy_draining_busy, "legacy-lab", -700, 900);
    let workers = vec![
        legacy("L-idle", WorkerState::Running, 600),
        legacy("L-drained", WorkerState::Draining, 60),
        legacy_draining_busy,
        legacy("L-stopped", WorkerState::Stopped, 200 * 60),
        legacy("L-boot", WorkerState::Provisioning, 5),
        legacy("L-fail1", WorkerState::Failed, 60),
        legacy("L-fail2", WorkerState::Failed, 60),
        legacy("L-unknown", WorkerState::Unknown, 60),
    ];
    let mut case = Case::new(workers, vec![req("i1", 5, 20, 60)]);
    case.policy.max_workers = 1;
    case.policy.max_concurrent_drains = 10;
    let plan = case.run();
    // Legacy failures do not halt, legacy capacity (running, booting, stopped) does not serve
    // the demand, legacy workers do not count toward max_workers.
    assert!(plan.halted.is_none(), "{plan:#?}");
    assert_eq!(plan.new_workers(), 1, "{plan:#?}");
    for d in &plan.decisions {
        assert!(
            d.worker_id.as_deref().is_none_or(|id| !id.starts_with('L')),
            "legacy worker touched: {d:#?}"
        );
        assert!(!d.reason.contains("L-"), "legacy worker mentioned: {d:#?}");
    }
    assert_eq!(plan.decisions.len(), 1, "{plan:#?}");
}

fn rich_case() -> Case {
    let mut stuck = worker("w-stuck", &personal(), WorkerState::Draining, 300);
    stuck.drain_started_at = Some(at(-300));
    place(&mut stuck, "lab-x", -400, 800);
    let mut running_busy = worker("w-busy", &enterprise(), WorkerState::Running, 600);
    for i in 0..3 {
        place(&mut running_busy, &format!("busy{i}"), -60, 600);
    }
    let mut case = Case::new(
        vec![
            worker("w-idle", &personal(), WorkerState::Running, 300),
            worker("w-boot", &enterprise(), WorkerState::Provisioning, 5),
            worker("w-stopped", &enterprise(), WorkerState::Stopped, 120),
            worker("w-ancient", &personal(), WorkerState::Stopped, 200 * 60),
            worker("w-empty", &personal(), WorkerState::Draining, 20),
            stuck,
            running_busy,
            legacy("L-idle", WorkerState::Running, 600),
        ],
        {
            let mut d = overlapping_demand(12);
            // ENTERPRISE-only demand: 3 fit the booting worker, 3 the restarted one, 6 need two
            // new workers; none fits the idle PERSONAL worker, which is drained.
            for r in d.iter_mut() {
                r.license_affinity = vec![LicenseType::Enterprise];
            }
            d.push(req("huge", 600, 20, 60));
            d.push(req("far", 5, 300, 60));
            d
        },
    );
    case.last_scale_up
        .insert("enterprise-metal".into(), at(-25));
    case.policy.max_concurrent_drains = 3;
    case
}

#[test]
fn every_decision_has_a_non_empty_reason_and_code() {
    let plan = rich_case().run();
    let actions: BTreeSet<ScalingAction> = plan.decisions.iter().map(|d| d.action).collect();
    assert_eq!(
        actions,
        BTreeSet::from([
            ScalingAction::ScaleUp,
            ScalingAction::RestartStopped,
            ScalingAction::Drain,
            ScalingAction::Stop,
            ScalingAction::ForceStop,
            ScalingAction::Terminate,
            ScalingAction::Wait,
        ]),
        "{plan:#?}"
    );
    for d in &plan.decisions {
        assert!(!d.reason.trim().is_empty(), "{d:#?}");
        assert!(!d.code.is_empty(), "{d:#?}");
        assert!(
            d.action != ScalingAction::ScaleUp || d.count > 0,
            "a ScaleUp asks for workers: {d:#?}"
        );
    }
    assert_eq!(plan.new_workers(), 2, "{plan:#?}");
    assert_eq!(worker_ids(&plan, ScalingAction::Drain), ids(&["w-idle"]));
    assert_eq!(
        worker_ids(&plan, ScalingAction::Terminate),
        ids(&["w-ancient"])
    );
}

#[test]
fn plan_is_deterministic_and_sorted() {
    let case = rich_case();
    let first = case.run();
    assert_eq!(first, case.run());

    // Input order does not matter either.
    let mut shuffled = rich_case();
    shuffled.workers.reverse();
    shuffled.demand.reverse();
    shuffled.templates.reverse();
    assert_eq!(first, shuffled.run());

    let keys: Vec<_> = first
        .decisions
        .iter()
        .map(|d| (d.action, d.template.clone(), d.worker_id.clone()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

// ---------------------------------------------------------------------------------------------
// One fit check with placement
// ---------------------------------------------------------------------------------------------

/// A request whose definition needs CML ≥ 2.9.0 (any AMI name).
fn needs_cml_29(id: &str) -> PlacementRequest {
    let mut r = req(id, 5, 20, 60);
    r.ami_requirements = vec![AmiRequirement {
        name_pattern: String::new(),
        min_version: Some(ccm_core::version::Version::new(2, 9, 0)),
    }];
    r
}

#[test]
fn a_running_worker_is_judged_by_placements_own_filters() {
    // RUNNING without a reported CML version: placement refuses a minimum version, so the
    // autoscaler must not count on that worker (it would wait forever).
    let unknown = worker("w-run", &personal(), WorkerState::Running, 300);
    let plan = Case::new(vec![unknown.clone()], vec![needs_cml_29("i1")]).run();
    assert!(
        of(&plan, ScalingAction::Wait)
            .iter()
            .all(|w| w.code != codes::WAIT_FITS_RUNNING),
        "{plan:#?}"
    );
    assert_eq!(plan.new_workers(), 1, "{plan:#?}");
    assert!(
        ccm_core::placement::place(
            &FleetSnapshot::new(vec![unknown.clone()]),
            &needs_cml_29("i1"),
            &ccm_core::placement::BinPack
        )
        .is_err()
    );

    // Once it reports 2.9.1 placement takes it, and so does the autoscaler's check.
    let mut known = unknown;
    known.cml_version = Some("2.9.1".into());
    let plan = Case::new(vec![known], vec![needs_cml_29("i1")]).run();
    let wait = of(&plan, ScalingAction::Wait);
    assert_eq!(wait.len(), 1, "{plan:#?}");
    assert_eq!(wait[0].code, codes::WAIT_FITS_RUNNING);
    assert_eq!(plan.new_workers(), 0, "{plan:#?}");
}

#[test]
fn a_booting_worker_that_has_not_reported_its_version_yet_still_counts() {
    let booting = worker("w-boot", &personal(), WorkerState::Provisioning, 5);
    let plan = Case::new(vec![booting.clone()], vec![needs_cml_29("i1")]).run();
    let wait = of(&plan, ScalingAction::Wait);
    assert_eq!(wait.len(), 1, "{plan:#?}");
    assert_eq!(wait[0].code, codes::WAIT_BOOTING);
    assert_eq!(plan.new_workers(), 0, "{plan:#?}");

    // A version it does report is checked: too low, so a new worker is needed.
    let mut old = booting;
    old.cml_version = Some("2.8.0".into());
    let plan = Case::new(vec![old], vec![needs_cml_29("i1")]).run();
    assert_eq!(plan.new_workers(), 1, "{plan:#?}");
}

#[test]
fn an_empty_licence_affinity_accepts_any_licence_as_placement_does() {
    let mut r = req("i1", 5, 20, 60);
    r.license_affinity = vec![];
    assert_eq!(
        select_template(&r, &templates()).map(|t| t.name.as_str()),
        Ok("personal-metal")
    );
    let idle = worker("w-ent", &enterprise(), WorkerState::Running, 300);
    let plan = Case::new(vec![idle], vec![r]).run();
    let wait = of(&plan, ScalingAction::Wait);
    assert_eq!(wait.len(), 1, "{plan:#?}");
    assert_eq!(wait[0].code, codes::WAIT_FITS_RUNNING);
}

#[test]
fn template_nested_virt_is_the_templates_field_not_its_instance_type() {
    let mut r = req("i1", 5, 20, 60);
    r.nested_virt = true;
    // A metal type that the operator marked as not nesting, and the reverse.
    let mut no = personal();
    no.nested_virt = false;
    let err = select_template(&r, &[no]).expect_err("no nested virtualisation");
    assert!(err.to_string().contains("nested virtualisation"), "{err}");
    let mut yes = personal();
    yes.instance_type = "m5.24xlarge".into();
    assert_eq!(
        select_template(&r, &[yes]).map(|t| t.name.as_str()),
        Ok("personal-metal")
    );
}
