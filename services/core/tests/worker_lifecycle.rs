//! The CML worker state machine (domain.md §2.2, §11.4, §11.5) and the domain part of acceptance
//! scenarios 13, 14 and 15 (§10).
//!
//! The expected edges are written out here, independently of `ccm_core::worker`.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, TimeZone, Utc};

use ccm_core::clock::{Clock, ManualClock};
use ccm_core::defaults::DRAIN_TIMEOUT_HOURS;
use ccm_core::model::{
    Actor, Capacity, CmlWorker, LicenseType, PortRange, ServiceStatus, WorkerState,
};
use ccm_core::worker::{
    Ec2Observation, REASON_EC2_INSTANCE_VANISHED, WorkerTransitionContext, accepts_placements,
    allowed_next_states, check_worker_transition,
};
use ccm_core::{CoreError, CoreResult};

use WorkerState::*;

/// The worker edges of domain.md §2.2 with §11.4, written out by hand. `true` = admin only.
const EXPECTED_EDGES: &[(WorkerState, WorkerState, bool)] = &[
    (Pending, Provisioning, false),
    (Pending, ShuttingDown, false),
    (Pending, Terminated, false),
    (Pending, Failed, false),
    (Provisioning, Running, false),
    (Provisioning, ShuttingDown, false),
    (Provisioning, Terminated, false),
    (Provisioning, Failed, false),
    (Starting, Running, false),
    (Starting, ShuttingDown, false),
    (Starting, Terminated, false),
    (Starting, Failed, false),
    (Running, Draining, false),
    (Running, Stopping, false),
    (Running, ShuttingDown, false),
    (Running, Terminated, false),
    (Running, Failed, false),
    (Draining, Running, true),
    (Draining, Stopping, false),
    (Draining, ShuttingDown, false),
    (Draining, Terminated, false),
    (Draining, Failed, false),
    (Stopping, Stopped, false),
    (Stopping, ShuttingDown, false),
    (Stopping, Terminated, false),
    (Stopping, Failed, false),
    (Stopped, Starting, false),
    (Stopped, ShuttingDown, false),
    (Stopped, Terminated, false),
    (Stopped, Failed, false),
    (ShuttingDown, Terminated, false),
    (ShuttingDown, Failed, false),
    (Failed, ShuttingDown, false),
    (Failed, Terminated, false),
    (Unknown, Starting, false),
    (Unknown, Running, false),
    (Unknown, Stopping, false),
    (Unknown, Stopped, false),
    (Unknown, ShuttingDown, false),
    (Unknown, Terminated, false),
    (Unknown, Failed, false),
];

const ALL_STATES: [WorkerState; 11] = [
    Pending,
    Provisioning,
    Starting,
    Running,
    Draining,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
    Failed,
    Unknown,
];

const EC2_NAMES: [&str; 7] = [
    "pending",
    "running",
    "stopping",
    "stopped",
    "shutting-down",
    "terminated",
    "rebooting-weirdly",
];

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 15, 9, 0, 0)
        .single()
        .expect("valid time")
}

fn at() -> DateTime<Utc> {
    t0() + Duration::minutes(30)
}

fn expected_set(admin: bool) -> BTreeSet<(WorkerState, WorkerState)> {
    EXPECTED_EDGES
        .iter()
        .filter(|(_, _, admin_only)| admin || !admin_only)
        .map(|(f, t, _)| (*f, *t))
        .collect()
}

fn new_worker(state: WorkerState) -> CmlWorker {
    CmlWorker {
        id: "w-1".into(),
        name: "cml-worker-1".into(),
        template_name: Some("personal-metal".into()),
        state,
        state_history: Vec::new(),
        service_status: ServiceStatus::Available,
        license_type: LicenseType::Personal,
        declared: Capacity::new(48, 192, 500, 20),
        port_range: PortRange::default(),
        ami_name: Some("CML-2.9.0".into()),
        cml_version: Some("2.9.0".into()),
        aws_instance_id: None,
        drain_started_at: None,
        drain_reason: None,
        created_at: t0(),
    }
}

fn step(r: CoreResult<()>) {
    r.expect("fixture step must be legal");
}

/// A worker brought to `state` along legal edges (UNKNOWN: created so, as an imported worker).
fn worker_in(state: WorkerState) -> CmlWorker {
    if state == Unknown {
        return new_worker(Unknown);
    }
    let mut w = new_worker(Pending);
    let ctl = Actor::controller();
    let path: &[WorkerState] = match state {
        Pending => &[],
        Provisioning => &[Provisioning],
        Running => &[Provisioning, Running],
        Draining => &[Provisioning, Running, Draining],
        Stopping => &[Provisioning, Running, Stopping],
        Stopped => &[Provisioning, Running, Stopping, Stopped],
        Starting => &[Provisioning, Running, Stopping, Stopped, Starting],
        ShuttingDown => &[Provisioning, Running, Stopping, Stopped, ShuttingDown],
        Terminated => &[
            Provisioning,
            Running,
            Stopping,
            Stopped,
            ShuttingDown,
            Terminated,
        ],
        Failed => &[Provisioning, Failed],
        Unknown => &[],
    };
    for s in path {
        match s {
            Provisioning => step(w.begin_provisioning("i-0abc", at(), &ctl)),
            Running => step(w.mark_running(at(), &ctl)),
            Draining => step(w.drain("scale_down_idle", at(), &ctl)),
            Stopping => step(w.begin_stop("admin_stop", at(), &Actor::user("admin"))),
            Stopped => step(w.mark_stopped(at(), &ctl)),
            Starting => step(w.begin_start(at(), &ctl)),
            ShuttingDown => step(w.begin_terminate("retention", at(), &ctl)),
            Terminated => step(w.mark_terminated("ec2_terminated", at(), &ctl)),
            Failed => step(w.mark_failed("provisioning_failed", at(), &ctl)),
            Pending | Unknown => {}
        }
    }
    assert_eq!(w.state, state);
    w
}

type Method = fn(&mut CmlWorker, DateTime<Utc>, &Actor) -> CoreResult<()>;

/// Every method that leads to `to`, with a name for messages. cancel_drain is called as admin.
fn methods_to(to: WorkerState) -> Vec<(&'static str, Method)> {
    match to {
        Pending | Unknown => vec![],
        Provisioning => vec![("begin_provisioning", |w, t, a| {
            w.begin_provisioning("i-0abc", t, a)
        })],
        Starting => vec![("begin_start", |w, t, a| w.begin_start(t, a))],
        Running => vec![
            ("mark_running", |w, t, a| w.mark_running(t, a)),
            ("cancel_drain", |w, t, a| w.cancel_drain(t, a, true)),
        ],
        Draining => vec![("drain", |w, t, a| w.drain("scale_down_idle", t, a))],
        Stopping => vec![("begin_stop", |w, t, a| w.begin_stop("admin_stop", t, a))],
        Stopped => vec![("mark_stopped", |w, t, a| w.mark_stopped(t, a))],
        ShuttingDown => vec![("begin_terminate", |w, t, a| {
            w.begin_terminate("retention", t, a)
        })],
        Terminated => vec![("mark_terminated", |w, t, a| {
            w.mark_terminated("ec2_terminated", t, a)
        })],
        Failed => vec![("mark_failed", |w, t, a| w.mark_failed("broken", t, a))],
    }
}

fn assert_typed_refusal(r: &CoreResult<()>, from: WorkerState, what: &str) {
    match r {
        Err(CoreError::InvalidWorkerTransition { from: f, .. }) => {
            assert_eq!(*f, from, "{what}: error names the wrong from-state")
        }
        other => panic!("{what}: expected InvalidWorkerTransition, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

#[test]
fn table_all_121_pairs_match_expected_edges_for_admin_and_system() {
    for (ctx, admin) in [
        (WorkerTransitionContext::ADMIN, true),
        (WorkerTransitionContext::SYSTEM, false),
    ] {
        let expected = expected_set(admin);
        for from in ALL_STATES {
            for to in ALL_STATES {
                let r = check_worker_transition(from, to, &ctx);
                if expected.contains(&(from, to)) {
                    assert!(
                        r.is_ok(),
                        "admin={admin}: {from} → {to} must be allowed: {r:?}"
                    );
                } else {
                    match r {
                        Err(CoreError::InvalidWorkerTransition {
                            from: f,
                            to: t,
                            why,
                        }) => {
                            assert_eq!((f, t), (from, to));
                            assert!(!why.is_empty());
                        }
                        other => panic!("admin={admin}: {from} → {to} must be refused: {other:?}"),
                    }
                }
            }
        }
    }
}

#[test]
fn table_allowed_next_states_match_expected_edges() {
    let expected = expected_set(true);
    for from in ALL_STATES {
        let listed: BTreeSet<_> = allowed_next_states(from).iter().copied().collect();
        let want: BTreeSet<_> = expected
            .iter()
            .filter(|(f, _)| *f == from)
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(listed, want, "next states of {from}");
    }
}

#[test]
fn methods_every_allowed_edge_succeeds_and_records_history() {
    let actor = Actor::user("admin");
    let when = at() + Duration::minutes(5);
    for (from, to) in expected_set(true) {
        let mut succeeded = false;
        for (name, m) in methods_to(to) {
            let mut w = worker_in(from);
            let before = w.clone();
            let r = m(&mut w, when, &actor);
            if r.is_ok() {
                succeeded = true;
                assert_eq!(w.state, to, "{name}");
                assert_eq!(w.state_history.len(), before.state_history.len() + 1);
                let last = w.state_history.last().expect("recorded");
                assert_eq!(last.from, Some(from), "{name}");
                assert_eq!(last.to, to, "{name}");
                assert_eq!(last.at, when, "{name}");
                assert_eq!(last.actor, actor, "{name}");
                assert!(!last.reason.trim().is_empty(), "{name}");
                assert_eq!(w.state_since(), when);
            } else {
                assert_typed_refusal(&r, from, name);
                assert_eq!(w, before, "{name} changed the worker on error");
            }
        }
        assert!(succeeded, "no method performs {from} → {to}");
    }
}

#[test]
fn methods_every_disallowed_pair_rejected_typed_and_unchanged() {
    let expected = expected_set(true);
    let mut refusals = 0;
    for from in ALL_STATES {
        for to in ALL_STATES {
            if expected.contains(&(from, to)) {
                continue;
            }
            assert!(check_worker_transition(from, to, &WorkerTransitionContext::ADMIN).is_err());
            for (name, m) in methods_to(to) {
                let mut w = worker_in(from);
                let before = w.clone();
                let r = m(&mut w, at(), &Actor::user("admin"));
                assert_typed_refusal(&r, from, &format!("{name} from {from}"));
                assert_eq!(w, before, "{name} from {from} changed the worker");
                refusals += 1;
            }
        }
    }
    // 80 refused pairs, minus 22 into PENDING/UNKNOWN (no method leads there), plus a second
    // method (cancel_drain) for the 7 refused pairs into RUNNING.
    assert_eq!(refusals, 80 - 22 + 7);
}

#[test]
fn draining_always_goes_through_stopping() {
    let mut w = worker_in(Draining);
    let before = w.clone();
    assert!(matches!(
        check_worker_transition(Draining, Stopped, &WorkerTransitionContext::ADMIN),
        Err(CoreError::InvalidWorkerTransition { .. })
    ));
    assert!(w.mark_stopped(at(), &Actor::controller()).is_err());
    assert_eq!(w, before);
    step(w.begin_stop("drained", at(), &Actor::controller()));
    step(w.mark_stopped(at(), &Actor::controller()));
    assert_eq!(w.state, Stopped);
}

#[test]
fn only_running_accepts_placements() {
    for s in ALL_STATES {
        assert_eq!(accepts_placements(s), s == Running, "{s}");
        assert_eq!(worker_in(s).accepts_placements(), s == Running, "{s}");
    }
}

#[test]
fn drain_fields_set_entering_and_cleared_leaving_draining() {
    let w = worker_in(Draining);
    assert_eq!(w.drain_started_at, Some(at()));
    assert_eq!(w.drain_reason.as_deref(), Some("scale_down_idle"));
    for to in allowed_next_states(Draining) {
        for (name, m) in methods_to(*to) {
            let mut w = worker_in(Draining);
            if m(&mut w, at(), &Actor::user("admin")).is_ok() {
                assert_eq!(w.drain_started_at, None, "{name}");
                assert_eq!(w.drain_reason, None, "{name}");
            }
        }
    }
}

#[test]
fn empty_reason_rejected_unchanged() {
    let mut w = worker_in(Running);
    let before = w.clone();
    assert!(matches!(
        w.drain(" ", at(), &Actor::controller()),
        Err(CoreError::Invalid { .. })
    ));
    assert!(w.mark_failed("", at(), &Actor::controller()).is_err());
    assert_eq!(w, before);
}

// ---------------------------------------------------------------------------------------------
// Scenario 13 / 14: scale up and scale down paths
// ---------------------------------------------------------------------------------------------

#[test]
fn scenario13_provisioning_to_running_requires_cml_available() {
    let mut w = new_worker(Pending);
    w.service_status = ServiceStatus::Starting;
    let ctl = Actor::controller();
    step(w.begin_provisioning("i-0123", at(), &ctl));
    assert_eq!(w.aws_instance_id.as_deref(), Some("i-0123"));
    assert!(!w.accepts_placements());

    let before = w.clone();
    assert!(matches!(
        w.mark_running(at(), &ctl),
        Err(CoreError::InvalidWorkerTransition {
            from: Provisioning,
            to: Running,
            ..
        })
    ));
    assert_eq!(w, before);

    w.service_status = ServiceStatus::Available;
    step(w.mark_running(at(), &ctl));
    assert!(w.accepts_placements());
}

#[test]
fn scenario13_begin_provisioning_empty_id_rejected_unchanged() {
    let mut w = new_worker(Pending);
    let before = w.clone();
    assert!(matches!(
        w.begin_provisioning("", at(), &Actor::controller()),
        Err(CoreError::Invalid { .. })
    ));
    assert_eq!(w, before);
}

#[test]
fn scenario14_idle_worker_drains_then_stops() {
    let ctl = Actor::controller();
    let mut w = worker_in(Running);
    step(w.drain("scale_down_idle", at(), &ctl));
    assert!(!w.accepts_placements());
    step(w.begin_stop("drained", at() + Duration::seconds(30), &ctl));
    step(w.mark_stopped(at() + Duration::minutes(2), &ctl));
    let tail: Vec<_> = w.state_history.iter().rev().take(3).map(|t| t.to).collect();
    assert_eq!(tail, vec![Stopped, Stopping, Draining]);
    assert_eq!(w.drain_started_at, None);
}

#[test]
fn scenario14_stopped_worker_restarts_via_starting() {
    let ctl = Actor::controller();
    let mut w = worker_in(Stopped);
    let before = w.clone();
    assert!(
        w.mark_running(at(), &ctl).is_err(),
        "STOPPED cannot jump to RUNNING"
    );
    assert_eq!(w, before);
    step(w.begin_start(at(), &ctl));
    step(w.mark_running(at(), &ctl));
    assert_eq!(w.state, Running);
}

// ---------------------------------------------------------------------------------------------
// Scenario 15: drain cancel and drain timeout
// ---------------------------------------------------------------------------------------------

#[test]
fn scenario15_admin_cancel_drain_returns_running_and_accepts_placements() {
    let mut w = worker_in(Draining);
    let admin = Actor::user("admin");
    step(w.cancel_drain(at() + Duration::hours(1), &admin, true));
    assert_eq!(w.state, Running);
    assert!(w.accepts_placements());
    assert_eq!(
        (w.drain_started_at, w.drain_reason.as_deref()),
        (None, None)
    );
    let last = w.state_history.last().expect("recorded");
    assert_eq!(
        (last.from, last.to, last.reason.as_str()),
        (Some(Draining), Running, "admin_action")
    );
    assert_eq!(last.actor, admin);
}

#[test]
fn scenario15_non_admin_cancel_drain_refused_unchanged() {
    for actor in [Actor::controller(), Actor::scheduler(), Actor::user("bob")] {
        let mut w = worker_in(Draining);
        let before = w.clone();
        let r = w.cancel_drain(at(), &actor, false);
        assert!(matches!(
            r,
            Err(CoreError::InvalidWorkerTransition {
                from: Draining,
                to: Running,
                ..
            })
        ));
        assert_eq!(w, before);
        // Nor can the controller sneak back to RUNNING through mark_running.
        assert!(w.mark_running(at(), &actor).is_err());
        assert_eq!(w, before);
    }
}

#[test]
fn scenario15_cancel_drain_when_not_draining_refused() {
    let mut w = worker_in(Running);
    let before = w.clone();
    assert!(w.cancel_drain(at(), &Actor::user("admin"), true).is_err());
    assert_eq!(w, before);
}

#[test]
fn scenario15_drain_timeout_computed_from_template_hours() {
    let clock = ManualClock::new(t0());
    let mut w = worker_in(Running);
    let started = clock.now();
    step(w.drain("consolidation", started, &Actor::user("admin")));

    // Enterprise template: 6 hours.
    assert_eq!(w.drain_deadline(6), Some(started + Duration::hours(6)));
    clock.advance(Duration::hours(6) - Duration::seconds(1));
    assert!(!w.drain_timed_out(clock.now(), 6));
    clock.advance(Duration::seconds(1));
    assert!(w.drain_timed_out(clock.now(), 6));

    // The default of 4 hours.
    let default_hours = u32::try_from(DRAIN_TIMEOUT_HOURS).expect("small");
    assert_eq!(
        w.drain_deadline(default_hours),
        Some(started + Duration::hours(4))
    );
    assert!(w.drain_timed_out(started + Duration::hours(4), default_hours));

    // Force stop: through STOPPING, drain fields cleared, no deadline any more.
    step(w.begin_stop("drain_timeout", clock.now(), &Actor::controller()));
    assert_eq!(w.drain_deadline(6), None);
    assert!(!w.drain_timed_out(clock.now() + Duration::hours(100), 6));
}

#[test]
fn scenario15_not_draining_has_no_deadline() {
    for s in ALL_STATES.into_iter().filter(|s| *s != Draining) {
        let w = worker_in(s);
        assert_eq!(w.drain_deadline(4), None, "{s}");
        assert!(!w.drain_timed_out(at() + Duration::days(30), 4), "{s}");
    }
}

// ---------------------------------------------------------------------------------------------
// EC2 observations
// ---------------------------------------------------------------------------------------------

#[test]
fn ec2_terminated_from_running_transitions_terminated_instance_vanished() {
    let mut w = worker_in(Running);
    let obs = w.observe_ec2_state("terminated", at(), &Actor::controller());
    assert_eq!(
        obs,
        Ec2Observation::Transitioned {
            from: Running,
            to: Terminated,
            reason: REASON_EC2_INSTANCE_VANISHED.into()
        }
    );
    assert_eq!(w.state, Terminated);
    assert_eq!(
        w.state_history.last().map(|t| t.reason.as_str()),
        Some("ec2_instance_vanished")
    );
}

#[test]
fn ec2_terminated_after_shutting_down_transitions_ec2_terminated() {
    let mut w = worker_in(ShuttingDown);
    let obs = w.observe_ec2_state("terminated", at(), &Actor::controller());
    assert!(matches!(
        obs,
        Ec2Observation::Transitioned { to: Terminated, ref reason, .. } if reason == "ec2_terminated"
    ));
}

#[test]
fn ec2_stopped_from_running_is_divergence_unchanged() {
    let mut w = worker_in(Running);
    let before = w.clone();
    let obs = w.observe_ec2_state("stopped", at(), &Actor::controller());
    assert!(matches!(
        obs,
        Ec2Observation::Divergence {
            current: Running,
            observed: Stopped,
            ..
        }
    ));
    assert_eq!(w, before);
}

#[test]
fn ec2_unknown_state_name_is_divergence_unchanged() {
    let mut w = worker_in(Running);
    let before = w.clone();
    let obs = w.observe_ec2_state("rebooting-weirdly", at(), &Actor::controller());
    assert!(matches!(
        obs,
        Ec2Observation::Divergence { observed: Unknown, ref ec2_state, .. } if ec2_state == "rebooting-weirdly"
    ));
    assert_eq!(w, before);
}

#[test]
fn ec2_running_while_provisioning_waits_for_cml_then_runs() {
    let mut w = worker_in(Provisioning);
    w.service_status = ServiceStatus::Starting;
    let before = w.clone();
    assert!(matches!(
        w.observe_ec2_state("running", at(), &Actor::controller()),
        Ec2Observation::Waiting { .. }
    ));
    assert_eq!(w, before);
    w.service_status = ServiceStatus::Available;
    assert!(matches!(
        w.observe_ec2_state("running", at(), &Actor::controller()),
        Ec2Observation::Transitioned {
            from: Provisioning,
            to: Running,
            ..
        }
    ));
}

#[test]
fn ec2_stopping_while_draining_transitions_and_clears_drain() {
    let mut w = worker_in(Draining);
    let obs = w.observe_ec2_state("stopping", at(), &Actor::controller());
    assert!(matches!(
        obs,
        Ec2Observation::Transitioned {
            from: Draining,
            to: Stopping,
            ..
        }
    ));
    assert_eq!(
        (w.drain_started_at, w.drain_reason.as_deref()),
        (None, None)
    );
    assert!(matches!(
        w.observe_ec2_state("stopped", at(), &Actor::controller()),
        Ec2Observation::Transitioned {
            from: Stopping,
            to: Stopped,
            ..
        }
    ));
}

#[test]
fn ec2_running_while_stopped_moves_to_starting() {
    let mut w = worker_in(Stopped);
    assert!(matches!(
        w.observe_ec2_state("running", at(), &Actor::controller()),
        Ec2Observation::Transitioned {
            from: Stopped,
            to: Starting,
            ..
        }
    ));
    assert!(matches!(
        w.observe_ec2_state("running", at(), &Actor::controller()),
        Ec2Observation::Transitioned {
            from: Starting,
            to: Running,
            ..
        }
    ));
}

#[test]
fn ec2_matching_states_are_in_sync() {
    let cases = [
        (Running, "running"),
        (Draining, "running"),
        (Pending, "pending"),
        (Provisioning, "pending"),
        (Starting, "pending"),
        (Stopping, "stopping"),
        (Stopped, "stopped"),
        (ShuttingDown, "shutting-down"),
        (Terminated, "terminated"),
    ];
    for (s, name) in cases {
        let mut w = worker_in(s);
        let before = w.clone();
        assert_eq!(
            w.observe_ec2_state(name, at(), &Actor::controller()),
            Ec2Observation::InSync,
            "{s} / {name}"
        );
        assert_eq!(w, before);
    }
}

#[test]
fn ec2_behind_a_request_is_waiting() {
    let cases = [
        (Stopping, "running"),
        (Starting, "stopped"),
        (ShuttingDown, "running"),
        (ShuttingDown, "stopped"),
    ];
    for (s, name) in cases {
        let mut w = worker_in(s);
        let before = w.clone();
        assert!(
            matches!(
                w.observe_ec2_state(name, at(), &Actor::controller()),
                Ec2Observation::Waiting { .. }
            ),
            "{s} / {name}"
        );
        assert_eq!(w, before);
    }
}

#[test]
fn ec2_every_state_and_name_only_legal_transitions_or_unchanged() {
    let expected = expected_set(false);
    for s in ALL_STATES {
        for name in EC2_NAMES {
            let mut w = worker_in(s);
            let before = w.clone();
            match w.observe_ec2_state(name, at(), &Actor::controller()) {
                Ec2Observation::Transitioned { from, to, reason } => {
                    assert_eq!(from, s);
                    assert!(
                        expected.contains(&(from, to)),
                        "{s} / {name}: {from} → {to}"
                    );
                    assert_eq!(w.state, to);
                    let last = w.state_history.last().expect("recorded");
                    assert_eq!(
                        (last.from, last.to, &last.reason),
                        (Some(from), to, &reason)
                    );
                    assert_eq!(last.actor, Actor::controller());
                }
                _ => assert_eq!(w, before, "{s} / {name}"),
            }
        }
    }
}

#[test]
fn ec2_anything_but_terminated_on_terminated_worker_is_divergence() {
    for name in EC2_NAMES.into_iter().filter(|n| *n != "terminated") {
        let mut w = worker_in(Terminated);
        assert!(
            matches!(
                w.observe_ec2_state(name, at(), &Actor::controller()),
                Ec2Observation::Divergence {
                    current: Terminated,
                    ..
                }
            ),
            "{name}"
        );
    }
}
