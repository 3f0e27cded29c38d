//! proto ↔ domain conversions: round trips (property-tested), every enum value both ways,
//! `UNSPECIFIED` and unknown numbers refused with their field path, and field paths of nested
//! problems.

use std::collections::BTreeMap;

use ccm_control_plane::convert::{self, DEFAULT_DEFINITION_VERSION};
use ccm_control_plane::error::ApiError;
use ccm_control_plane::validate::UriPolicy;
use ccm_core::model::{
    Actor, AmiRequirement, Capacity, CmlWorker, CriterionScore, DefinitionStatus, GradingScore,
    InstanceState, LabletDefinition, LabletInstance, LicenseType, PortDefinition, PortRange,
    ResourceRequirements, ServiceStatus, StateTransition, TimeSlot, WorkerState, WorkerTemplate,
    instance_type_has_nested_virt,
};
use ccm_core::version::Version;
use ccm_proto::v1 as pb;
use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use tonic::Code;

fn fields(err: &ApiError) -> Vec<String> {
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    err.field_violations()
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).expect("instant")
}

// ---------------------------------------------------------------------------------------------
// Enums: every value, both ways
// ---------------------------------------------------------------------------------------------

/// Checks one enum mapping: every domain value round-trips; every raw number in a generous range
/// is either a defined non-zero proto value that maps back to itself, 0 (refused as UNSPECIFIED
/// unless `unspecified_ok`) or unknown (refused), always naming `field`; and the defined non-zero
/// proto values are exactly as many as the domain values (a bijection).
fn check_enum<C: Copy + PartialEq + std::fmt::Debug>(
    all: &[C],
    to: impl Fn(C) -> i32,
    from: impl Fn(i32, &str) -> Result<C, ApiError>,
    unspecified_ok: Option<C>,
) {
    for c in all {
        assert_eq!(from(to(*c), "f").ok(), Some(*c), "{c:?} round-trips");
    }
    let mut mapped = 0;
    for raw in -5..=64 {
        match from(raw, "x.y[2]") {
            Ok(c) => {
                if raw == 0 {
                    assert_eq!(Some(c), unspecified_ok, "0 maps only where allowed");
                } else {
                    assert_eq!(to(c), raw, "{raw} maps back to itself");
                    mapped += 1;
                }
            }
            Err(err) => {
                assert_eq!(fields(&err), ["x.y[2]"]);
                let why = &err.field_violations()[0].description;
                if raw == 0 {
                    assert!(unspecified_ok.is_none());
                    assert!(why.contains("UNSPECIFIED"), "{why}");
                } else {
                    assert!(why.contains(&format!("value {raw}")), "{why}");
                }
            }
        }
    }
    assert_eq!(mapped, all.len(), "one proto value per domain value");
}

#[test]
fn instance_states_map_both_ways() {
    check_enum(
        &InstanceState::ALL,
        |s| convert::instance_state_to_proto(s) as i32,
        convert::instance_state_from_proto,
        None,
    );
    assert_eq!(
        convert::instance_state_name(InstanceState::Running),
        "INSTANCE_STATE_RUNNING"
    );
}

#[test]
fn worker_states_map_both_ways() {
    check_enum(
        &WorkerState::ALL,
        |s| convert::worker_state_to_proto(s) as i32,
        convert::worker_state_from_proto,
        None,
    );
    assert_eq!(
        convert::worker_state_name(WorkerState::ShuttingDown),
        "WORKER_STATE_SHUTTING_DOWN"
    );
}

#[test]
fn license_types_map_both_ways() {
    check_enum(
        &LicenseType::ALL,
        |l| convert::license_type_to_proto(l) as i32,
        convert::license_type_from_proto,
        None,
    );
}

#[test]
fn definition_statuses_map_both_ways() {
    check_enum(
        &[
            DefinitionStatus::Active,
            DefinitionStatus::Deprecated,
            DefinitionStatus::Deleted,
        ],
        |s| convert::definition_status_to_proto(s) as i32,
        convert::definition_status_from_proto,
        None,
    );
}

#[test]
fn service_statuses_map_both_ways_and_unspecified_is_unavailable() {
    check_enum(
        &[
            ServiceStatus::Unavailable,
            ServiceStatus::Starting,
            ServiceStatus::Available,
            ServiceStatus::Error,
        ],
        |s| convert::service_status_to_proto(s) as i32,
        convert::service_status_from_proto,
        Some(ServiceStatus::Unavailable),
    );
}

#[test]
fn port_protocols_map_both_ways() {
    for p in [convert::PROTOCOL_TCP, convert::PROTOCOL_UDP] {
        let raw = convert::port_protocol_to_proto(p) as i32;
        assert_eq!(convert::port_protocol_from_proto(raw, "p").ok(), Some(p));
    }
    assert_eq!(
        convert::port_protocol_from_proto(0, "p").ok(),
        Some("tcp"),
        "UNSPECIFIED is TCP"
    );
    assert_eq!(
        convert::port_protocol_to_proto("UDP"),
        pb::PortProtocol::Udp
    );
    assert_eq!(
        convert::port_protocol_to_proto("sctp"),
        pb::PortProtocol::Unspecified
    );
    let err = convert::port_protocol_from_proto(9, "ports[0].protocol").expect_err("unknown");
    assert_eq!(fields(&err), ["ports[0].protocol"]);
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..4_000_000_000, 0u32..1_000_000_000)
        .prop_map(|(s, n)| DateTime::from_timestamp(s, n).expect("in range"))
}

fn version() -> impl Strategy<Value = Version> {
    (0u64..1000, 0u64..1000, 0u64..1000).prop_map(|(a, b, c)| Version::new(a, b, c))
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ._:<>/-]{0,24}"
}

fn some_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[a-zA-Z0-9._:/-]{1,24}")
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
}

fn instance_state() -> impl Strategy<Value = InstanceState> {
    proptest::sample::select(InstanceState::ALL.to_vec())
}

fn license() -> impl Strategy<Value = LicenseType> {
    proptest::sample::select(LicenseType::ALL.to_vec())
}

fn capacity() -> impl Strategy<Value = Capacity> {
    (0u32..100_000, 0u32..100_000, 0u32..100_000, 0u32..100_000)
        .prop_map(|(a, b, c, d)| Capacity::new(a, b, c, d))
}

fn port_range() -> impl Strategy<Value = PortRange> {
    (1u16..=65535, 0u16..=65535).prop_map(|(a, b)| {
        let (start, end) = if a <= b { (a, b) } else { (b.max(1), a) };
        PortRange { start, end }
    })
}

fn slot() -> impl Strategy<Value = TimeSlot> {
    (instant(), 0i64..10_000_000, any::<bool>()).prop_map(|(start, secs, asap)| TimeSlot {
        start,
        end: start + Duration::seconds(secs),
        asap,
    })
}

fn grading() -> impl Strategy<Value = GradingScore> {
    (
        0.0f64..1000.0,
        0.0f64..1000.0,
        any::<bool>(),
        proptest::collection::vec(("[a-z ]{0,10}", 0.0f64..50.0, 0.0f64..50.0), 0..4),
    )
        .prop_map(|(total, extra, passed, breakdown)| GradingScore {
            total,
            max: total + extra,
            passed,
            breakdown: breakdown
                .into_iter()
                .map(|(criterion, points, more)| CriterionScore {
                    criterion,
                    points,
                    max: points + more,
                })
                .collect(),
        })
}

fn transition() -> impl Strategy<Value = StateTransition<InstanceState>> {
    (
        proptest::option::of(instance_state()),
        instance_state(),
        instant(),
        text(),
        text(),
    )
        .prop_map(|(from, to, at, reason, actor)| StateTransition {
            from,
            to,
            at,
            reason,
            actor: Actor(actor),
        })
}

fn instance() -> impl Strategy<Value = LabletInstance> {
    (
        (name(), name(), version(), some_text(), instance_state()),
        proptest::collection::vec(transition(), 0..4),
        proptest::collection::btree_map("[a-z][a-z0-9_]{0,8}", 1u16..=65535, 0..4),
        (some_text(), slot(), text(), some_text()),
        (proptest::option::of(grading()), 0u32..10, instant()),
        (
            proptest::option::of(instant()),
            proptest::option::of(instant()),
            proptest::option::of(instant()),
        ),
    )
        .prop_map(
            |(
                (id, definition_id, definition_version, worker_id, state),
                state_history,
                allocated_ports,
                (cml_lab_id, timeslot, owner_id, reservation_id),
                (grading_score, retry_count, created_at),
                (scheduled_at, started_at, terminated_at),
            )| LabletInstance {
                id,
                definition_id,
                definition_version,
                worker_id,
                state,
                state_history,
                allocated_ports,
                cml_lab_id,
                timeslot,
                owner_id,
                reservation_id,
                grading_score,
                retry_count,
                created_at,
                scheduled_at,
                started_at,
                terminated_at,
            },
        )
}

fn definition() -> impl Strategy<Value = LabletDefinition> {
    let requirements = (
        1u32..=1024,
        1u32..=32768,
        0u32..=65536,
        any::<bool>(),
        proptest::collection::vec(
            ("[A-Za-z0-9.*?-]{0,12}", proptest::option::of(version())),
            0..3,
        ),
    )
        .prop_map(|(cpu, mem, disk, nested, amis)| ResourceRequirements {
            cpu_cores: cpu,
            memory_gb: mem,
            storage_gb: disk,
            nested_virt: nested,
            ami_requirements: amis
                .into_iter()
                .map(|(name_pattern, min_version)| AmiRequirement {
                    name_pattern,
                    min_version,
                })
                .collect(),
        });
    let ports =
        proptest::collection::btree_set("[a-z][a-z0-9_]{0,10}", 0..4).prop_flat_map(|names| {
            let names: Vec<String> = names.into_iter().collect();
            let n = names.len();
            proptest::collection::vec(proptest::bool::ANY, n).prop_map(move |udp| {
                names
                    .iter()
                    .zip(udp)
                    .map(|(name, udp)| PortDefinition {
                        name: name.clone(),
                        protocol: if udp { "udp" } else { "tcp" }.to_owned(),
                    })
                    .collect::<Vec<_>>()
            })
        });
    (
        (
            name(),
            name(),
            version(),
            "[a-z0-9:/._-]{1,30}",
            "[0-9a-f]{0,64}",
        ),
        requirements,
        proptest::sample::subsequence(LicenseType::ALL.to_vec(), 1..=3),
        (1u32..=20, ports, some_text(), 1u32..100_000),
        (
            proptest::sample::select(vec![
                DefinitionStatus::Active,
                DefinitionStatus::Deprecated,
                DefinitionStatus::Deleted,
            ]),
            instant(),
            text(),
        ),
    )
        .prop_map(
            |(
                (id, name, version, lab_artifact_uri, lab_yaml_hash),
                resource_requirements,
                license_affinity,
                (node_count, port_template, grading_rules_uri, max_duration_minutes),
                (status, created_at, created_by),
            )| LabletDefinition {
                id,
                name,
                version,
                lab_artifact_uri,
                lab_yaml_hash,
                resource_requirements,
                license_affinity,
                node_count,
                port_template,
                grading_rules_uri,
                max_duration_minutes,
                status,
                created_at,
                created_by,
            },
        )
}

fn worker() -> impl Strategy<Value = CmlWorker> {
    (
        (name(), text(), proptest::option::of(name())),
        (
            proptest::sample::select(WorkerState::ALL.to_vec()),
            proptest::sample::select(vec![
                ServiceStatus::Unavailable,
                ServiceStatus::Starting,
                ServiceStatus::Available,
                ServiceStatus::Error,
            ]),
            license(),
            capacity(),
            port_range(),
        ),
        (some_text(), some_text(), some_text()),
        (proptest::option::of(instant()), some_text(), instant()),
    )
        .prop_map(
            |(
                (id, name, template_name),
                (state, service_status, license_type, declared, port_range),
                (ami_name, cml_version, aws_instance_id),
                (drain_started_at, drain_reason, created_at),
            )| CmlWorker {
                id,
                name,
                template_name,
                state,
                state_history: Vec::new(),
                service_status,
                license_type,
                declared,
                port_range,
                ami_name,
                cml_version,
                aws_instance_id,
                drain_started_at,
                drain_reason,
                created_at,
            },
        )
}

fn template() -> impl Strategy<Value = WorkerTemplate> {
    (
        (
            name(),
            text(),
            "[a-z0-9]{1,6}\\.(metal|metal-24xl|large|24xlarge)",
        ),
        (capacity(), license(), "[A-Za-z0-9.*-]{1,12}"),
        proptest::collection::vec("[a-z]{2}-[a-z]{2,8}-[1-9]", 0..3),
        (1u32..10_000, port_range(), 1u32..1000, 0u32..100, 0u32..100),
        proptest::collection::btree_map("[A-Za-z][A-Za-z0-9]{0,10}", "[a-z0-9 ]{0,10}", 0..4),
    )
        .prop_map(
            |(
                (name, description, instance_type),
                (capacity, license_type, ami_pattern),
                regions,
                (startup_minutes, port_range, drain_timeout_hours, min_warm, max_workers),
                tags,
            )| WorkerTemplate {
                nested_virt: instance_type_has_nested_virt(&instance_type),
                name,
                description,
                instance_type,
                capacity,
                license_type,
                ami_pattern,
                regions,
                startup_minutes,
                port_range,
                drain_timeout_hours,
                min_warm,
                max_workers,
                tags,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn timestamps_round_trip(t in instant()) {
        let back = convert::timestamp_from_proto(&convert::timestamp_to_proto(t), "t");
        prop_assert_eq!(back.ok(), Some(t));
    }

    #[test]
    fn durations_round_trip(secs in -10_000_000i64..10_000_000, nanos in 0i64..1_000_000_000) {
        let d = Duration::seconds(secs) + Duration::nanoseconds(if secs < 0 { -nanos } else { nanos });
        let back = convert::duration_from_proto(&convert::duration_to_proto(d), "d");
        prop_assert_eq!(back.ok(), Some(d));
    }

    #[test]
    fn capacities_round_trip(c in capacity()) {
        let back = convert::capacity_from_proto(&convert::capacity_to_proto(&c), "c");
        prop_assert_eq!(back.ok(), Some(c));
    }

    #[test]
    fn time_slots_round_trip(s in slot()) {
        let back = convert::time_slot_from_proto(Some(&convert::time_slot_to_proto(&s)), "s");
        prop_assert_eq!(back.ok(), Some(s));
    }

    #[test]
    fn transitions_round_trip(t in transition()) {
        let back = convert::state_transition_from_proto(&convert::state_transition_to_proto(&t), "t");
        prop_assert_eq!(back.ok(), Some(t));
    }

    #[test]
    fn grading_scores_round_trip(g in grading()) {
        let back = convert::grading_score_from_proto(&convert::grading_score_to_proto(&g), "g");
        prop_assert_eq!(back.ok(), Some(g));
    }

    #[test]
    fn instances_round_trip(i in instance()) {
        let proto = convert::instance_to_proto(&i);
        let back = convert::instance_from_proto(&proto, "instance");
        prop_assert_eq!(back.as_ref().ok(), Some(&i), "{:?}", back.as_ref().err());
    }

    #[test]
    fn definitions_round_trip(d in definition()) {
        let proto = convert::definition_to_proto(&d);
        let back = convert::definition_from_proto(&proto, "definition");
        prop_assert_eq!(back.as_ref().ok(), Some(&d), "{:?}", back.as_ref().err());
    }

    #[test]
    fn workers_round_trip(w in worker()) {
        let proto = convert::worker_to_proto(&w);
        let back = convert::worker_from_proto(&proto, "worker");
        prop_assert_eq!(back.as_ref().ok(), Some(&w), "{:?}", back.as_ref().err());
    }

    #[test]
    fn templates_round_trip(t in template()) {
        let proto = convert::template_to_proto(&t);
        let back = convert::template_from_proto(&proto, "template");
        prop_assert_eq!(back.as_ref().ok(), Some(&t), "{:?}", back.as_ref().err());
    }

    #[test]
    fn port_templates_round_trip(d in definition()) {
        let proto = convert::port_template_to_proto(&d.port_template);
        let back = convert::port_template_from_proto(Some(&proto), "port_template");
        prop_assert_eq!(back.ok(), Some(d.port_template));
    }

    #[test]
    fn proto_to_core_never_panics_on_garbage(
        state in any::<i32>(),
        license in any::<i32>(),
        cpu in any::<i32>(),
        seconds in any::<i64>(),
        nanos in any::<i32>(),
        version in ".{0,12}",
    ) {
        let def = pb::LabletDefinition {
            version,
            license_affinity: vec![license],
            node_count: cpu,
            resource_requirements: Some(pb::ResourceRequirements { cpu_cores: cpu, memory_gb: cpu, ..Default::default() }),
            max_duration: Some(prost_types::Duration { seconds, nanos }),
            created_at: Some(prost_types::Timestamp { seconds, nanos }),
            ..Default::default()
        };
        let _ = convert::definition_from_proto(&def, "definition");
        let inst = pb::LabletInstance {
            state,
            time_slot: Some(pb::TimeSlot { start: Some(prost_types::Timestamp { seconds, nanos }), end: None, asap: false }),
            ..Default::default()
        };
        let _ = convert::instance_from_proto(&inst, "instance");
        let w = pb::CmlWorker { state, license_type: license, ..Default::default() };
        let _ = convert::worker_from_proto(&w, "worker");
    }
}

// ---------------------------------------------------------------------------------------------
// Field paths of refused input
// ---------------------------------------------------------------------------------------------

fn good_definition() -> pb::LabletDefinition {
    pb::LabletDefinition {
        id: "d-1".into(),
        version: "1.2.3".into(),
        name: "ccna-lab".into(),
        lab_artifact_uri: "s3://labs/ccna.yaml".into(),
        resource_requirements: Some(pb::ResourceRequirements {
            cpu_cores: 4,
            memory_gb: 16,
            storage_gb: 20,
            nested_virt: true,
            ami_requirements: vec![pb::AmiRequirement {
                name_pattern: "CML-2.9.*".into(),
                min_version: "2.9.0".into(),
            }],
        }),
        license_affinity: vec![pb::LicenseType::Personal as i32],
        node_count: 5,
        port_template: Some(pb::PortTemplate {
            ports: vec![pb::PortDefinition {
                name: "serial_1".into(),
                protocol: pb::PortProtocol::Tcp as i32,
            }],
        }),
        max_duration: Some(prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        }),
        ..Default::default()
    }
}

#[test]
fn a_create_request_definition_gets_neutral_output_fields() {
    let mut d = good_definition();
    d.version.clear();
    let core = convert::definition_from_proto(&d, "definition").expect("valid");
    assert_eq!(core.version, DEFAULT_DEFINITION_VERSION);
    assert_eq!(core.status, DefinitionStatus::Active);
    assert_eq!(core.created_at, DateTime::<Utc>::UNIX_EPOCH);
    assert_eq!(core.max_duration_minutes, 120);
    assert_eq!(core.demand(), Capacity::new(4, 16, 20, 5));
    assert_eq!(
        core.resource_requirements.ami_requirements[0].min_version,
        Some(Version::new(2, 9, 0))
    );
}

#[test]
fn every_problem_of_a_definition_is_reported_with_its_path() {
    let mut d = good_definition();
    d.version = "v1".into();
    d.resource_requirements.as_mut().expect("set").cpu_cores = 0;
    d.resource_requirements
        .as_mut()
        .expect("set")
        .ami_requirements[0]
        .min_version = "2.9".into();
    d.license_affinity = vec![0, 99];
    d.node_count = 0;
    d.port_template
        .as_mut()
        .expect("set")
        .ports
        .push(pb::PortDefinition {
            name: "Serial 2".into(),
            protocol: 7,
        });
    d.max_duration = Some(prost_types::Duration {
        seconds: 90,
        nanos: 0,
    });
    d.status = 42;
    let err = convert::definition_from_proto(&d, "definition").expect_err("many problems");
    assert_eq!(
        fields(&err),
        [
            "definition.version",
            "definition.resource_requirements.cpu_cores",
            "definition.resource_requirements.ami_requirements[0].min_version",
            "definition.license_affinity[0]",
            "definition.license_affinity[1]",
            "definition.node_count",
            "definition.port_template.ports[1].name",
            "definition.port_template.ports[1].protocol",
            "definition.max_duration",
            "definition.status",
        ]
    );

    let mut d = good_definition();
    d.resource_requirements = None;
    d.license_affinity.clear();
    d.max_duration = None;
    let err = convert::definition_from_proto(&d, "definition").expect_err("missing");
    assert_eq!(
        fields(&err),
        [
            "definition.resource_requirements",
            "definition.license_affinity",
            "definition.max_duration"
        ]
    );

    // PERSONAL alone cannot run more than 20 nodes.
    let mut d = good_definition();
    d.node_count = 21;
    let err = convert::definition_from_proto(&d, "definition").expect_err("too many nodes");
    assert_eq!(fields(&err), ["definition.license_affinity"]);
    d.license_affinity.push(pb::LicenseType::Enterprise as i32);
    assert!(convert::definition_from_proto(&d, "definition").is_ok());

    // Duplicated licence types and a negative max_duration.
    let mut d = good_definition();
    d.license_affinity = vec![1, 1];
    d.max_duration = Some(prost_types::Duration {
        seconds: -60,
        nanos: 0,
    });
    let err = convert::definition_from_proto(&d, "").expect_err("dup");
    assert_eq!(fields(&err), ["license_affinity[1]", "max_duration"]);
}

#[test]
fn create_input_also_checks_names_and_uris() {
    let mut d = good_definition();
    d.name = "<script>alert(1)</script>".into();
    d.description = "<b>stored inert</b>".into();
    d.lab_artifact_uri = "http://labs.example/a.yaml".into();
    d.grading_rules_uri = "s3://x".into();
    d.owner_notification = Some(pb::NotificationConfig {
        emails: vec![],
        webhook_url: "http://hooks.example/x".into(),
    });
    let err = convert::definition_input_from_proto(&d, "definition", UriPolicy::ARTIFACT)
        .expect_err("bad input");
    assert_eq!(
        fields(&err),
        [
            "definition.name",
            "definition.lab_artifact_uri",
            "definition.grading_rules_uri",
            "definition.owner_notification.webhook_url",
        ]
    );
    let ok =
        convert::definition_input_from_proto(&good_definition(), "definition", UriPolicy::ARTIFACT)
            .expect("valid");
    assert_eq!(ok.name, "ccna-lab");
}

#[test]
fn instance_problems_name_nested_paths() {
    let i = pb::LabletInstance {
        id: "i-1".into(),
        definition_version: "1.0".into(),
        state: 0,
        state_history: vec![
            pb::StateTransition {
                from: 0,
                to: pb::InstanceState::Pending as i32,
                at: Some(convert::timestamp_to_proto(at(1_800_000_000))),
                ..Default::default()
            },
            pb::StateTransition {
                from: pb::InstanceState::Pending as i32,
                to: 99,
                at: None,
                ..Default::default()
            },
        ],
        allocated_ports: [("serial_1".to_owned(), 70000)].into_iter().collect(),
        time_slot: Some(pb::TimeSlot {
            start: Some(convert::timestamp_to_proto(at(1_800_000_100))),
            end: Some(convert::timestamp_to_proto(at(1_800_000_000))),
            asap: false,
        }),
        grading_score: Some(pb::GradingScore {
            total: 5.0,
            max: 3.0,
            passed: true,
            breakdown: vec![pb::GradingCriterion {
                criterion: "c".into(),
                points: f64::NAN,
                max: 1.0,
            }],
        }),
        retry_count: -1,
        created_at: None,
        ..Default::default()
    };
    let err = convert::instance_from_proto(&i, "instance").expect_err("broken");
    assert_eq!(
        fields(&err),
        [
            "instance.definition_version",
            "instance.state",
            "instance.state_history[1].to",
            "instance.state_history[1].at",
            "instance.allocated_ports[\"serial_1\"]",
            "instance.time_slot.end",
            "instance.grading_score.max",
            "instance.grading_score.breakdown[0].points",
            "instance.retry_count",
            "instance.created_at",
        ]
    );
}

#[test]
fn legacy_and_managed_workers_differ_on_missing_fields() {
    let legacy = pb::CmlWorker {
        id: "w-1".into(),
        state: pb::WorkerState::Running as i32,
        created_at: Some(convert::timestamp_to_proto(at(1_800_000_000))),
        ..Default::default()
    };
    let core = convert::worker_from_proto(&legacy, "worker").expect("legacy defaults");
    assert_eq!(core.template_name, None);
    assert_eq!(core.declared, convert::LEGACY_DECLARED_CAPACITY);
    assert_eq!(core.declared, Capacity::new(48, 192, 500, 20));
    assert_eq!(core.license_type, convert::LEGACY_LICENSE_TYPE);
    assert_eq!(core.port_range, PortRange::default());
    assert_eq!(core.service_status, ServiceStatus::Unavailable);

    let managed = pb::CmlWorker {
        template_name: "metal-personal".into(),
        ..legacy.clone()
    };
    let err = convert::worker_from_proto(&managed, "worker").expect_err("managed needs more");
    assert_eq!(
        fields(&err),
        ["worker.license_type", "worker.declared_capacity"]
    );

    let bad_range = pb::CmlWorker {
        port_range: Some(pb::PortRange {
            start: 5000,
            end: 4000,
        }),
        state: 0,
        ..legacy
    };
    let err = convert::worker_from_proto(&bad_range, "worker").expect_err("bad");
    assert_eq!(fields(&err), ["worker.state", "worker.port_range.end"]);

    // The last transition's reason becomes state_reason.
    let mut w = convert::worker_from_proto(
        &pb::CmlWorker {
            id: "w-2".into(),
            state: pb::WorkerState::Draining as i32,
            created_at: Some(convert::timestamp_to_proto(at(1_800_000_000))),
            ..Default::default()
        },
        "",
    )
    .expect("valid");
    w.state_history.push(StateTransition {
        from: Some(WorkerState::Running),
        to: WorkerState::Draining,
        at: at(1_800_000_500),
        reason: "scale_down_idle".into(),
        actor: Actor::controller(),
    });
    assert_eq!(convert::worker_to_proto(&w).state_reason, "scale_down_idle");
}

#[test]
fn template_durations_must_be_whole_units() {
    let t = pb::WorkerTemplate {
        name: "metal-personal".into(),
        instance_type: "m5zn.metal".into(),
        capacity: Some(pb::WorkerCapacity {
            cpu_cores: 48,
            memory_gb: 192,
            storage_gb: 500,
            max_nodes: 20,
        }),
        license_type: pb::LicenseType::Personal as i32,
        ami_pattern: "CML-2.9.*".into(),
        ..Default::default()
    };
    let core = convert::template_from_proto(&t, "template").expect("defaults apply");
    assert_eq!(core.startup_minutes, 20);
    assert_eq!(core.drain_timeout_hours, 4);
    assert!(core.nested_virt, "m5zn.metal has nested virtualisation");
    assert_eq!(core.port_range, PortRange::default());

    let bad = pb::WorkerTemplate {
        name: "Metal_Personal".into(),
        drain_timeout: Some(prost_types::Duration {
            seconds: 5400,
            nanos: 0,
        }),
        startup_time: Some(prost_types::Duration {
            seconds: 90,
            nanos: 0,
        }),
        min_workers: -1,
        license_type: 0,
        ..t
    };
    let err = convert::template_from_proto(&bad, "template").expect_err("bad");
    assert_eq!(
        fields(&err),
        [
            "template.name",
            "template.license_type",
            "template.startup_time",
            "template.drain_timeout",
            "template.min_workers",
        ]
    );
}

#[test]
fn placement_requests_come_from_a_definition_and_an_instance() {
    let mut def = good_definition();
    def.license_affinity
        .push(pb::LicenseType::Enterprise as i32);
    let start = at(1_800_003_600);
    let inst = pb::LabletInstance {
        id: "i-9".into(),
        definition_id: "d-1".into(),
        definition_version: "1.2.3".into(),
        state: pb::InstanceState::Pending as i32,
        time_slot: Some(pb::TimeSlot {
            start: Some(convert::timestamp_to_proto(start)),
            end: Some(convert::timestamp_to_proto(start + Duration::hours(2))),
            asap: false,
        }),
        created_at: Some(convert::timestamp_to_proto(at(1_800_000_000))),
        ..Default::default()
    };
    let req =
        convert::placement_request_from_proto(&def, &inst, Duration::minutes(15)).expect("valid");
    assert_eq!(req.instance_id, "i-9");
    assert_eq!(req.definition_id, "d-1");
    assert_eq!(req.demand, Capacity::new(4, 16, 20, 5));
    assert_eq!(req.port_names, ["serial_1"]);
    assert_eq!(
        req.license_affinity,
        [LicenseType::Personal, LicenseType::Enterprise]
    );
    assert!(req.nested_virt);
    assert_eq!(req.window.start, start - Duration::minutes(15));
    assert_eq!(req.window.end, start + Duration::hours(2));
    assert_eq!(req.created_at, at(1_800_000_000));
    let _: BTreeMap<String, u16> = BTreeMap::new();

    let wrong = pb::LabletInstance {
        definition_id: "d-2".into(),
        definition_version: "1.2.4".into(),
        time_slot: None,
        ..inst
    };
    let err = convert::placement_request_from_proto(&def, &wrong, Duration::minutes(15))
        .expect_err("mismatch");
    assert_eq!(
        fields(&err),
        [
            "instance.time_slot",
            "instance.definition_id",
            "instance.definition_version"
        ]
    );
}
