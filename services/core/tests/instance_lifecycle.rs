//! The lablet instance state machine (domain.md §2.1, §11.1–§11.3, §11.18) and the domain part of
//! acceptance scenarios 9, 10, 11, 12 and 15 (§10).
//!
//! The expected edges are written out here, independently of `ccm_core::instance`.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, TimeZone, Utc};

use ccm_core::clock::{Clock, ManualClock};
use ccm_core::defaults::{INSTANTIATION_LEAD_MINUTES, MAX_INSTANTIATION_RETRIES};
use ccm_core::instance::{
    DueAction, InstanceTransitionContext, REASON_CANCELLED, REASON_DELETE_REQUESTED,
    REASON_DELETED, REASON_DRAIN_TIMEOUT, REASON_EXPIRED, REASON_MAX_RETRIES_EXCEEDED,
    REASON_WORKER_GONE, REASON_WORKER_STOPPED_DURING_RETRY, RetryOutcome, TerminatePlan,
    allowed_next_states, check_instance_transition, due_actions, instantiation_due_at,
    slot_end_action, terminate_plan,
};
use ccm_core::model::{
    Actor, CriterionScore, GradingScore, InstanceState, LabletInstance, TimeSlot, WorkerState,
};
use ccm_core::version::Version;
use ccm_core::{CoreError, CoreResult};

use InstanceState::*;

/// The table of domain.md §2.1, written out by hand.
const EXPECTED_EDGES: &[(InstanceState, InstanceState)] = &[
    (Pending, Scheduled),
    (Pending, Terminated),
    (Scheduled, Instantiating),
    (Scheduled, Terminated),
    (Instantiating, Running),
    (Instantiating, Terminated),
    (Running, Collecting),
    (Running, Stopping),
    (Collecting, Grading),
    (Collecting, Stopping),
    (Grading, Stopping),
    (Stopping, Stopped),
    (Stopped, Running),
    (Stopped, Archived),
    (Archived, Terminated),
];

const ALL_STATES: [InstanceState; 10] = [
    Pending,
    Scheduled,
    Instantiating,
    Running,
    Collecting,
    Grading,
    Stopping,
    Stopped,
    Archived,
    Terminated,
];

fn lead() -> Duration {
    Duration::minutes(INSTANTIATION_LEAD_MINUTES)
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 15, 9, 0, 0)
        .single()
        .expect("valid time")
}

/// Slot [t0 + 1 h, t0 + 3 h).
fn slot() -> TimeSlot {
    TimeSlot {
        start: t0() + Duration::hours(1),
        end: t0() + Duration::hours(3),
        asap: false,
    }
}

/// An instant inside the slot, where every fixture step happens.
fn during() -> DateTime<Utc> {
    t0() + Duration::minutes(90)
}

fn ports() -> BTreeMap<String, u16> {
    BTreeMap::from([
        ("serial_1".to_string(), 5041),
        ("serial_2".to_string(), 5042),
        ("vnc_1".to_string(), 5044),
    ])
}

fn score() -> GradingScore {
    GradingScore {
        total: 8.0,
        max: 10.0,
        passed: true,
        breakdown: vec![CriterionScore {
            criterion: "ping".into(),
            points: 8.0,
            max: 10.0,
        }],
    }
}

fn new_pending(timeslot: TimeSlot) -> LabletInstance {
    LabletInstance {
        id: "inst-1".into(),
        definition_id: "def-1".into(),
        definition_version: Version::new(1, 2, 3),
        worker_id: None,
        state: Pending,
        state_history: Vec::new(),
        allocated_ports: BTreeMap::new(),
        cml_lab_id: None,
        timeslot,
        owner_id: "alice".into(),
        reservation_id: None,
        grading_score: None,
        retry_count: 0,
        created_at: t0(),
        scheduled_at: None,
        started_at: None,
        terminated_at: None,
    }
}

fn step(r: CoreResult<()>) {
    r.expect("fixture step must be legal");
}

/// An instance brought to `state` along legal edges, all at [`during`].
fn instance_in(state: InstanceState) -> LabletInstance {
    let mut i = new_pending(slot());
    let (at, sys) = (during(), Actor::controller());
    let path: &[InstanceState] = match state {
        Pending => &[],
        Scheduled => &[Scheduled],
        Instantiating => &[Scheduled, Instantiating],
        Running => &[Scheduled, Instantiating, Running],
        Collecting => &[Scheduled, Instantiating, Running, Collecting],
        Grading => &[Scheduled, Instantiating, Running, Collecting, Grading],
        Stopping => &[Scheduled, Instantiating, Running, Stopping],
        Stopped => &[Scheduled, Instantiating, Running, Stopping, Stopped],
        Archived => &[
            Scheduled,
            Instantiating,
            Running,
            Stopping,
            Stopped,
            Archived,
        ],
        Terminated => &[Terminated],
    };
    for s in path {
        match s {
            Scheduled => step(i.schedule("w-1", ports(), at, &Actor::scheduler())),
            Instantiating => step(i.begin_instantiation(at, &Actor::scheduler())),
            Running => step(i.mark_running("lab-1", at, &sys)),
            Collecting => step(i.start_collection("manual", at, &Actor::user("alice"))),
            Grading => step(i.collection_completed(at, &Actor::assessment())),
            Stopping => step(i.stop("manual", at, &Actor::user("alice"))),
            Stopped => step(i.mark_stopped(at, &sys)),
            Archived => step(i.archive("timeslot_end", at, &sys)),
            Terminated => step(i.terminate("cancelled", at, &Actor::user("alice"))),
            Pending => {}
        }
    }
    assert_eq!(i.state, state);
    i
}

type Method = fn(&mut LabletInstance, DateTime<Utc>, &Actor) -> CoreResult<()>;

/// Every method that leads to `to` (besides force_terminate), with the name for messages.
fn methods_to(to: InstanceState) -> Vec<(&'static str, Method)> {
    match to {
        Pending => vec![],
        Scheduled => vec![("schedule", |i, at, a| i.schedule("w-1", ports(), at, a))],
        Instantiating => vec![
            ("begin_instantiation", |i, at, a| {
                i.begin_instantiation(at, a)
            }),
            ("record_instantiation_failure", |i, at, a| {
                i.record_instantiation_failure("import failed", WorkerState::Running, at, a)
                    .map(|_| ())
            }),
        ],
        Running => vec![
            ("mark_running", |i, at, a| i.mark_running("lab-1", at, a)),
            ("restart", |i, at, a| i.restart(at, a)),
        ],
        Collecting => vec![("start_collection", |i, at, a| {
            i.start_collection("manual", at, a)
        })],
        Grading => vec![("collection_completed", |i, at, a| {
            i.collection_completed(at, a)
        })],
        Stopping => vec![
            ("stop", |i, at, a| i.stop("manual", at, a)),
            ("record_grading", |i, at, a| {
                i.record_grading(score(), at, a)
            }),
        ],
        Stopped => vec![("mark_stopped", |i, at, a| i.mark_stopped(at, a))],
        Archived => vec![("archive", |i, at, a| i.archive("timeslot_end", at, a))],
        Terminated => vec![("terminate", |i, at, a| i.terminate("cancelled", at, a))],
    }
}

fn assert_typed_refusal(r: &CoreResult<()>, from: InstanceState, what: &str) {
    match r {
        Err(CoreError::InvalidInstanceTransition { from: f, .. }) => {
            assert_eq!(*f, from, "{what}: error names the wrong from-state")
        }
        other => panic!("{what}: expected InvalidInstanceTransition, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

#[test]
fn table_all_100_pairs_match_expected_edges() {
    let expected: BTreeSet<_> = EXPECTED_EDGES.iter().copied().collect();
    for from in ALL_STATES {
        for to in ALL_STATES {
            let r = check_instance_transition(from, to, &InstanceTransitionContext::NORMAL);
            if expected.contains(&(from, to)) {
                assert!(r.is_ok(), "{from} → {to} must be allowed: {r:?}");
            } else {
                match r {
                    Err(CoreError::InvalidInstanceTransition {
                        from: f,
                        to: t,
                        why,
                    }) => {
                        assert_eq!((f, t), (from, to));
                        assert!(!why.is_empty());
                    }
                    other => panic!("{from} → {to} must be refused, got {other:?}"),
                }
            }
        }
    }
}

#[test]
fn table_allowed_next_states_match_expected_edges() {
    for from in ALL_STATES {
        let listed: BTreeSet<_> = allowed_next_states(from).iter().copied().collect();
        let expected: BTreeSet<_> = EXPECTED_EDGES
            .iter()
            .filter(|(f, _)| *f == from)
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(listed, expected, "next states of {from}");
    }
}

#[test]
fn table_force_context_only_non_terminal_to_terminated() {
    for privileged in [true, false] {
        let ctx = InstanceTransitionContext::force_terminate(privileged);
        for from in ALL_STATES {
            for to in ALL_STATES {
                let ok = check_instance_transition(from, to, &ctx).is_ok();
                let expected = privileged && to == Terminated && from != Terminated;
                assert_eq!(ok, expected, "force({privileged}) {from} → {to}");
            }
        }
    }
}

#[test]
fn table_retry_context_only_instantiating_self_edge() {
    for from in ALL_STATES {
        for to in ALL_STATES {
            let ok = check_instance_transition(from, to, &InstanceTransitionContext::RETRY).is_ok();
            assert_eq!(
                ok,
                from == Instantiating && to == Instantiating,
                "{from} → {to}"
            );
        }
    }
}

#[test]
fn methods_every_allowed_edge_succeeds_and_records_history() {
    let actor = Actor::user("tester");
    let at = during() + Duration::minutes(1);
    let mut covered = BTreeSet::new();
    for (from, to) in EXPECTED_EDGES
        .iter()
        .copied()
        .chain([(Instantiating, Instantiating)])
    {
        let mut succeeded = false;
        for (name, m) in methods_to(to) {
            let mut i = instance_in(from);
            let before = i.clone();
            let r = m(&mut i, at, &actor);
            if r.is_ok() {
                succeeded = true;
                assert_eq!(i.state, to, "{name}");
                assert_eq!(
                    i.state_history.len(),
                    before.state_history.len() + 1,
                    "{name}"
                );
                let last = i.state_history.last().expect("recorded");
                assert_eq!(last.from, Some(from), "{name}");
                assert_eq!(last.to, to, "{name}");
                assert_eq!(last.at, at, "{name}");
                assert_eq!(last.actor, actor, "{name}");
                assert!(!last.reason.trim().is_empty(), "{name}");
            } else {
                assert_typed_refusal(&r, from, name);
                assert_eq!(i, before, "{name} changed the instance on error");
            }
        }
        assert!(succeeded, "no method performs {from} → {to}");
        covered.insert((from, to));
    }
    assert_eq!(covered.len(), EXPECTED_EDGES.len() + 1);
}

#[test]
fn methods_every_disallowed_pair_rejected_typed_and_unchanged() {
    let expected: BTreeSet<_> = EXPECTED_EDGES.iter().copied().collect();
    let actor = Actor::user("tester");
    let mut refusals = 0;
    for from in ALL_STATES {
        for to in ALL_STATES {
            let retry_edge = from == Instantiating && to == Instantiating;
            if expected.contains(&(from, to)) || retry_edge {
                continue;
            }
            // The pure rule refuses it…
            assert!(
                check_instance_transition(from, to, &InstanceTransitionContext::NORMAL).is_err()
            );
            // …and so does every method leading to `to`, without touching the instance.
            for (name, m) in methods_to(to) {
                let mut i = instance_in(from);
                let before = i.clone();
                let r = m(&mut i, during(), &actor);
                assert_typed_refusal(&r, from, &format!("{name} from {from}"));
                assert_eq!(i, before, "{name} from {from} changed the instance");
                refusals += 1;
            }
        }
    }
    // 84 refused pairs, minus 10 into PENDING (no method leads there), plus the second method
    // for the refused pairs into INSTANTIATING (8), RUNNING (8) and STOPPING (7).
    assert_eq!(refusals, 84 - 10 + 8 + 8 + 7);
}

#[test]
fn terminated_is_terminal_everything_refused() {
    for to in ALL_STATES {
        for (name, m) in methods_to(to) {
            let mut i = instance_in(Terminated);
            let before = i.clone();
            assert!(m(&mut i, during(), &Actor::controller()).is_err(), "{name}");
            assert_eq!(i, before);
        }
    }
    let mut i = instance_in(Terminated);
    let before = i.clone();
    assert!(
        i.force_terminate("again", true, during(), &Actor::controller())
            .is_err()
    );
    assert_eq!(i, before);
}

// ---------------------------------------------------------------------------------------------
// Derived fields
// ---------------------------------------------------------------------------------------------

#[test]
fn schedule_sets_worker_ports_and_scheduled_at() {
    let i = instance_in(Scheduled);
    assert_eq!(i.worker_id.as_deref(), Some("w-1"));
    assert_eq!(i.allocated_ports, ports());
    assert_eq!(i.scheduled_at, Some(during()));
    assert_eq!(i.state_history[0].actor, Actor::scheduler());
}

#[test]
fn schedule_invalid_input_rejected_unchanged() {
    let mut i = instance_in(Pending);
    let before = i.clone();
    let dup = BTreeMap::from([("a".to_string(), 2000), ("b".to_string(), 2000)]);
    assert!(matches!(
        i.schedule("w-1", dup, during(), &Actor::scheduler()),
        Err(CoreError::Invalid { .. })
    ));
    assert!(
        i.schedule("", ports(), during(), &Actor::scheduler())
            .is_err()
    );
    assert_eq!(i, before);
}

#[test]
fn mark_running_sets_lab_and_started_at_once() {
    let mut i = instance_in(Running);
    assert_eq!(i.cml_lab_id.as_deref(), Some("lab-1"));
    assert_eq!(i.started_at, Some(during()));
    let later = during() + Duration::minutes(10);
    step(i.stop("manual", later, &Actor::user("alice")));
    step(i.mark_stopped(later, &Actor::controller()));
    step(i.restart(later + Duration::minutes(1), &Actor::user("alice")));
    assert_eq!(i.state, Running);
    assert_eq!(
        i.started_at,
        Some(during()),
        "restart keeps the first start"
    );
    assert_eq!(i.cml_lab_id.as_deref(), Some("lab-1"));
}

#[test]
fn mark_running_empty_lab_id_rejected_unchanged() {
    let mut i = instance_in(Instantiating);
    let before = i.clone();
    assert!(matches!(
        i.mark_running(" ", during(), &Actor::controller()),
        Err(CoreError::Invalid { .. })
    ));
    assert_eq!(i, before);
}

#[test]
fn restart_after_slot_end_rejected_unchanged() {
    let mut i = instance_in(Stopped);
    let before = i.clone();
    let r = i.restart(slot().end, &Actor::user("alice"));
    assert!(matches!(
        r,
        Err(CoreError::InvalidInstanceTransition {
            from: Stopped,
            to: Running,
            ..
        })
    ));
    assert_eq!(i, before);
}

#[test]
fn terminate_keeps_ports_on_record_and_releases_resources_by_state() {
    let mut i = instance_in(Archived);
    step(i.terminate("cleanup", during(), &Actor::controller()));
    assert_eq!(i.terminated_at, Some(during()));
    // The record still shows what it held; the store commit releases the ports.
    assert_eq!(i.allocated_ports, ports());
    assert_eq!(i.worker_id.as_deref(), Some("w-1"));
    assert!(!i.state.holds_resources());
}

// ---------------------------------------------------------------------------------------------
// Scenario 9: time slots and retries
// ---------------------------------------------------------------------------------------------

#[test]
fn scenario9_scheduled_instantiates_exactly_at_start_minus_lead() {
    let clock = ManualClock::new(t0());
    let mut i = new_pending(slot());
    step(i.schedule("w-1", ports(), clock.now(), &Actor::scheduler()));
    assert_eq!(
        instantiation_due_at(&i.timeslot, lead()),
        slot().start - lead()
    );

    clock.set(slot().start - lead() - Duration::seconds(1));
    assert_eq!(
        due_actions(&i, clock.now(), lead(), false),
        None,
        "one second early"
    );

    clock.advance(Duration::seconds(1));
    assert_eq!(clock.now(), slot().start - Duration::minutes(15));
    let due = due_actions(&i, clock.now(), lead(), false);
    assert_eq!(due, Some(DueAction::Instantiate));
    step(i.apply_due_action(DueAction::Instantiate, clock.now(), &Actor::scheduler()));
    assert_eq!(i.state, Instantiating);
    assert_eq!(i.state_since(), clock.now());

    clock.advance(Duration::minutes(3));
    step(i.mark_running("lab-42", clock.now(), &Actor::controller()));
    assert_eq!(i.state, Running);
    assert_eq!(i.cml_lab_id.as_deref(), Some("lab-42"));
    assert_eq!(i.started_at, Some(clock.now()));
}

#[test]
fn scenario9_asap_instantiates_at_once() {
    let clock = ManualClock::new(t0());
    let asap = TimeSlot {
        start: clock.now(),
        end: clock.now() + Duration::hours(2),
        asap: true,
    };
    let mut i = new_pending(asap);
    step(i.schedule("w-1", ports(), clock.now(), &Actor::scheduler()));
    assert_eq!(instantiation_due_at(&i.timeslot, lead()), clock.now());
    assert_eq!(
        due_actions(&i, clock.now(), lead(), false),
        Some(DueAction::Instantiate)
    );
    step(i.apply_due_action(DueAction::Instantiate, clock.now(), &Actor::scheduler()));
    assert_eq!(i.state, Instantiating);
}

#[test]
fn scenario9_three_failed_imports_retry_then_terminated_max_retries_exceeded() {
    assert_eq!(MAX_INSTANTIATION_RETRIES, 3);
    let clock = ManualClock::new(during());
    let mut i = instance_in(Instantiating);
    let ctl = Actor::controller();

    let first =
        i.record_instantiation_failure("import failed", WorkerState::Running, clock.now(), &ctl);
    assert_eq!(first, Ok(RetryOutcome::Retry { attempt: 2 }));
    assert_eq!((i.state, i.retry_count), (Instantiating, 1));

    clock.advance(Duration::seconds(30));
    let second =
        i.record_instantiation_failure("import failed", WorkerState::Running, clock.now(), &ctl);
    assert_eq!(second, Ok(RetryOutcome::Retry { attempt: 3 }));
    assert_eq!((i.state, i.retry_count), (Instantiating, 2));

    clock.advance(Duration::seconds(60));
    let third =
        i.record_instantiation_failure("import failed", WorkerState::Running, clock.now(), &ctl);
    assert_eq!(
        third,
        Ok(RetryOutcome::GiveUp {
            reason: REASON_MAX_RETRIES_EXCEEDED
        })
    );
    assert_eq!(i.state, Terminated);
    assert_eq!(i.retry_count, 3);
    assert_eq!(i.terminated_at, Some(clock.now()));
    let last = i.state_history.last().expect("recorded");
    assert_eq!(last.reason, "max_retries_exceeded");
    assert_eq!((last.from, last.to), (Some(Instantiating), Terminated));

    let retries: Vec<_> = i
        .state_history
        .iter()
        .filter(|t| t.from == Some(Instantiating) && t.to == Instantiating)
        .collect();
    assert_eq!(retries.len(), 2, "two retry records");
    assert!(retries[0].reason.contains("import failed"));

    let before = i.clone();
    assert!(
        i.record_instantiation_failure("again", WorkerState::Running, clock.now(), &ctl)
            .is_err()
    );
    assert_eq!(i, before);
}

#[test]
fn scenario9_retry_on_draining_worker_allowed_stopped_worker_terminated() {
    let ctl = Actor::controller();
    let mut i = instance_in(Instantiating);
    assert_eq!(
        i.record_instantiation_failure("import failed", WorkerState::Draining, during(), &ctl),
        Ok(RetryOutcome::Retry { attempt: 2 })
    );
    assert_eq!(
        i.record_instantiation_failure("import failed", WorkerState::Stopping, during(), &ctl),
        Ok(RetryOutcome::GiveUp {
            reason: REASON_WORKER_STOPPED_DURING_RETRY
        })
    );
    assert_eq!(i.state, Terminated);
    assert_eq!(
        i.state_history.last().map(|t| t.reason.as_str()),
        Some("worker_stopped_during_retry")
    );
}

#[test]
fn scenario9_failure_with_empty_reason_rejected_unchanged() {
    let mut i = instance_in(Instantiating);
    let before = i.clone();
    assert!(
        i.record_instantiation_failure("", WorkerState::Running, during(), &Actor::controller())
            .is_err()
    );
    assert_eq!(i, before);
}

// ---------------------------------------------------------------------------------------------
// Scenario 10: invalid transitions
// ---------------------------------------------------------------------------------------------

#[test]
fn scenario10_collect_on_pending_rejected() {
    let mut i = instance_in(Pending);
    let before = i.clone();
    let r = i.start_collection("manual", during(), &Actor::user("alice"));
    assert!(matches!(
        r,
        Err(CoreError::InvalidInstanceTransition {
            from: Pending,
            to: Collecting,
            ..
        })
    ));
    assert_eq!(i, before);
}

#[test]
fn scenario10_grading_result_outside_grading_rejected() {
    for from in ALL_STATES.into_iter().filter(|s| *s != Grading) {
        let mut i = instance_in(from);
        let before = i.clone();
        let r = i.record_grading(score(), during(), &Actor::assessment());
        assert_typed_refusal(&r, from, "record_grading");
        assert_eq!(i, before, "from {from}");
        assert!(i.grading_score.is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 11: assessment path
// ---------------------------------------------------------------------------------------------

#[test]
fn scenario11_collect_grade_stop_archive_terminate_path() {
    let mut i = instance_in(Running);
    let n = i.state_history.len();
    let (mut at, ctl) = (during(), Actor::controller());
    step(i.start_collection("manual", at, &Actor::user("alice")));
    at += Duration::minutes(2);
    step(i.collection_completed(at, &Actor::assessment()));
    at += Duration::minutes(2);
    step(i.record_grading(score(), at, &Actor::assessment()));
    assert_eq!(i.state, Stopping);
    assert_eq!(i.grading_score, Some(score()));

    // The same grading event again finds the instance past GRADING.
    let before = i.clone();
    assert!(i.record_grading(score(), at, &Actor::assessment()).is_err());
    assert_eq!(i, before);

    at += Duration::minutes(1);
    step(i.mark_stopped(at, &ctl));
    step(i.archive("results_stored", at, &ctl));
    step(i.terminate("cleanup", at, &ctl));

    let path: Vec<_> = i.state_history[n..].iter().map(|t| t.to).collect();
    assert_eq!(
        path,
        vec![Collecting, Grading, Stopping, Stopped, Archived, Terminated]
    );
    let reasons: Vec<_> = i.state_history[n..]
        .iter()
        .map(|t| t.reason.as_str())
        .collect();
    assert_eq!(reasons[0], "manual");
    assert_eq!(reasons[1], "collection_completed");
    assert_eq!(reasons[2], "grading_completed");
    assert_eq!(i.terminated_at, Some(at));
}

// ---------------------------------------------------------------------------------------------
// Scenario 12: slot end and orphans
// ---------------------------------------------------------------------------------------------

#[test]
fn scenario12_running_past_end_with_grading_collects() {
    let mut i = instance_in(Running);
    let end = slot().end;
    assert_eq!(
        due_actions(&i, end - Duration::seconds(1), lead(), true),
        None
    );
    assert_eq!(due_actions(&i, end, lead(), true), Some(DueAction::Collect));
    assert_eq!(slot_end_action(true), Collecting);
    step(i.apply_due_action(DueAction::Collect, end, &Actor::controller()));
    assert_eq!(i.state, Collecting);
    assert_eq!(
        i.state_history.last().map(|t| t.reason.as_str()),
        Some("timeslot_end")
    );
}

#[test]
fn scenario12_running_past_end_without_grading_stops() {
    let mut i = instance_in(Running);
    let after = slot().end + Duration::minutes(5);
    assert_eq!(due_actions(&i, after, lead(), false), Some(DueAction::Stop));
    assert_eq!(slot_end_action(false), Stopping);
    step(i.apply_due_action(DueAction::Stop, after, &Actor::controller()));
    assert_eq!(i.state, Stopping);
    assert_eq!(
        i.state_history.last().map(|t| t.reason.as_str()),
        Some("timeslot_end")
    );
}

#[test]
fn scenario12_pending_past_end_expires() {
    let mut i = instance_in(Pending);
    let end = slot().end;
    assert_eq!(
        due_actions(&i, end - Duration::seconds(1), lead(), false),
        None
    );
    assert_eq!(due_actions(&i, end, lead(), false), Some(DueAction::Expire));
    step(i.apply_due_action(DueAction::Expire, end, &Actor::control_plane()));
    assert_eq!(i.state, Terminated);
    assert_eq!(
        i.state_history.last().map(|t| t.reason.as_str()),
        Some(REASON_EXPIRED)
    );
    assert_eq!(i.terminated_at, Some(end));
}

#[test]
fn scenario12_scheduled_past_end_expires_instead_of_instantiating() {
    let mut i = instance_in(Scheduled);
    assert_eq!(
        due_actions(&i, slot().end, lead(), false),
        Some(DueAction::Expire)
    );
    step(i.apply_due_action(DueAction::Expire, slot().end, &Actor::scheduler()));
    assert_eq!(i.state, Terminated);
}

#[test]
fn scenario12_stopped_past_end_archived_then_cleaned_up() {
    let mut i = instance_in(Stopped);
    assert_eq!(
        due_actions(&i, during(), lead(), false),
        None,
        "restartable"
    );
    let end = slot().end;
    assert_eq!(
        due_actions(&i, end, lead(), false),
        Some(DueAction::Archive)
    );
    step(i.apply_due_action(DueAction::Archive, end, &Actor::controller()));
    assert_eq!(
        due_actions(&i, end, lead(), false),
        Some(DueAction::Cleanup)
    );
    step(i.apply_due_action(DueAction::Cleanup, end, &Actor::controller()));
    assert_eq!(i.state, Terminated);
    assert_eq!(due_actions(&i, end, lead(), false), None);
}

#[test]
fn scenario12_busy_states_have_no_due_action() {
    for s in [Instantiating, Collecting, Grading, Stopping, Terminated] {
        let i = instance_in(s);
        assert_eq!(
            due_actions(&i, slot().end + Duration::hours(1), lead(), true),
            None,
            "{s}"
        );
    }
}

#[test]
fn scenario12_orphan_force_terminated_worker_gone() {
    for s in [Scheduled, Running, Stopped] {
        let mut i = instance_in(s);
        step(i.force_terminate(REASON_WORKER_GONE, true, during(), &Actor::controller()));
        assert_eq!(i.state, Terminated);
        assert_eq!(
            i.state_history.last().map(|t| t.reason.as_str()),
            Some("worker_gone")
        );
    }
}

#[test]
fn due_action_on_wrong_state_rejected_unchanged() {
    let mut i = instance_in(Running);
    let before = i.clone();
    for a in [
        DueAction::Instantiate,
        DueAction::Expire,
        DueAction::Archive,
        DueAction::Cleanup,
    ] {
        assert!(
            i.apply_due_action(a, during(), &Actor::controller())
                .is_err(),
            "{a:?}"
        );
        assert_eq!(i, before);
    }
}

// ---------------------------------------------------------------------------------------------
// Force-terminate and DELETE (§11.2), scenario 15's instance part
// ---------------------------------------------------------------------------------------------

#[test]
fn force_terminate_from_every_non_terminal_state_succeeds() {
    for s in ALL_STATES.into_iter().filter(|s| *s != Terminated) {
        let mut i = instance_in(s);
        let ports_before = i.allocated_ports.clone();
        step(i.force_terminate(REASON_DRAIN_TIMEOUT, true, during(), &Actor::controller()));
        assert_eq!(i.state, Terminated, "from {s}");
        assert_eq!(i.terminated_at, Some(during()));
        assert_eq!(i.allocated_ports, ports_before, "ports stay on the record");
        let last = i.state_history.last().expect("recorded");
        assert_eq!(
            (last.from, last.to, last.reason.as_str()),
            (Some(s), Terminated, "drain_timeout")
        );
        assert_eq!(last.actor, Actor::controller());
    }
}

#[test]
fn force_terminate_by_user_or_without_reason_rejected_unchanged() {
    for s in ALL_STATES {
        let mut i = instance_in(s);
        let before = i.clone();
        let r = i.force_terminate("deleted", false, during(), &Actor::user("alice"));
        assert_typed_refusal(&r, s, "unprivileged force_terminate");
        if s != Terminated {
            assert!(
                i.force_terminate("  ", true, during(), &Actor::controller())
                    .is_err()
            );
        }
        assert_eq!(i, before);
    }
}

#[test]
fn user_terminate_of_running_rejected_typed() {
    for s in [Running, Collecting, Grading, Stopping, Stopped] {
        let mut i = instance_in(s);
        let before = i.clone();
        let r = i.terminate("deleted", during(), &Actor::user("alice"));
        assert!(matches!(
            r,
            Err(CoreError::InvalidInstanceTransition { to: Terminated, .. })
        ));
        assert_eq!(i, before);
    }
}

#[test]
fn user_delete_running_goes_through_stopping_to_terminated() {
    let alice = Actor::user("alice");
    let ctl = Actor::controller();
    let mut i = instance_in(Running);
    assert_eq!(terminate_plan(Running, false), TerminatePlan::StopFirst);
    assert_eq!(
        i.request_delete(false, during(), &alice),
        Ok(TerminatePlan::StopFirst)
    );
    assert_eq!(i.state, Stopping);
    assert_eq!(
        i.state_history.last().map(|t| t.reason.as_str()),
        Some(REASON_DELETE_REQUESTED)
    );
    assert!(i.deletion_requested());

    step(i.mark_stopped(during(), &ctl));
    // Still inside the slot, but the delete keeps the teardown going; no restart.
    let before = i.clone();
    assert!(i.restart(during(), &alice).is_err());
    assert_eq!(i, before);
    assert_eq!(
        due_actions(&i, during(), lead(), false),
        Some(DueAction::Archive)
    );
    step(i.apply_due_action(DueAction::Archive, during(), &ctl));
    assert_eq!(
        due_actions(&i, during(), lead(), false),
        Some(DueAction::Cleanup)
    );
    step(i.apply_due_action(DueAction::Cleanup, during(), &ctl));
    assert_eq!(i.state, Terminated);

    let path: Vec<_> = i.state_history.iter().rev().take(4).map(|t| t.to).collect();
    assert_eq!(path, vec![Terminated, Archived, Stopped, Stopping]);
}

#[test]
fn user_delete_plan_per_state() {
    let alice = Actor::user("alice");
    let cases = [
        (Pending, TerminatePlan::TerminateNow, Terminated),
        (Scheduled, TerminatePlan::TerminateNow, Terminated),
        (Instantiating, TerminatePlan::TerminateNow, Terminated),
        (Running, TerminatePlan::StopFirst, Stopping),
        (Collecting, TerminatePlan::StopFirst, Stopping),
        (Grading, TerminatePlan::StopFirst, Stopping),
        (Stopping, TerminatePlan::AwaitStopped, Stopping),
        (Stopped, TerminatePlan::ArchiveFirst, Archived),
        (Archived, TerminatePlan::TerminateNow, Terminated),
        (Terminated, TerminatePlan::AlreadyTerminated, Terminated),
    ];
    for (s, plan, after) in cases {
        let mut i = instance_in(s);
        let before = i.clone();
        assert_eq!(i.request_delete(false, during(), &alice), Ok(plan), "{s}");
        assert_eq!(i.state, after, "{s}");
        if matches!(
            plan,
            TerminatePlan::AwaitStopped | TerminatePlan::AlreadyTerminated
        ) {
            assert_eq!(i, before, "{s}: nothing recorded");
        }
    }
    let mut p = instance_in(Pending);
    step(p.request_delete(false, during(), &alice).map(|_| ()));
    assert_eq!(
        p.state_history.last().map(|t| t.reason.as_str()),
        Some(REASON_CANCELLED)
    );
}

#[test]
fn admin_delete_running_terminates_now() {
    let mut i = instance_in(Running);
    assert_eq!(terminate_plan(Running, true), TerminatePlan::TerminateNow);
    assert_eq!(
        i.request_delete(true, during(), &Actor::user("admin")),
        Ok(TerminatePlan::TerminateNow)
    );
    assert_eq!(i.state, Terminated);
    assert_eq!(
        i.state_history.last().map(|t| t.reason.as_str()),
        Some(REASON_DELETED)
    );
}
