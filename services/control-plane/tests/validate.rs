//! Input validation: the collector, names and free text (hostile input included), ids, URIs,
//! enums, time slots, labels and lab YAML; property tests for the name and URI validators.

use std::collections::HashMap;

use ccm_control_plane::error::ApiError;
use ccm_control_plane::validate::{self, LabelLimits, UriPolicy, UriScheme, Violations};
use ccm_proto::v1 as pb;
use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use tonic::Code;

fn fields(err: &ApiError) -> Vec<String> {
    err.field_violations()
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

fn collected(v: Violations) -> Vec<(String, String)> {
    v.iter()
        .map(|x| (x.field.clone(), x.description.clone()))
        .collect()
}

#[test]
fn the_collector_reports_every_violation_at_once() {
    let mut v = Violations::new();
    assert!(v.is_empty());
    validate::resource_name(&mut v, "template.name", "Bad Name");
    validate::non_empty(&mut v, "template.instance_type", "  ");
    validate::uri(
        &mut v,
        "definition.lab_artifact_uri",
        "ftp://x/y",
        UriPolicy::ARTIFACT,
    );
    v.check(1 + 1 == 2, "never", "not recorded");
    assert_eq!(v.len(), 3);
    let err = v.into_result().expect_err("three problems");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        fields(&err),
        [
            "template.name",
            "template.instance_type",
            "definition.lab_artifact_uri"
        ]
    );
    assert!(Violations::new().finish(7).is_ok_and(|x| x == 7));

    // Nested results are absorbed with their paths.
    let mut v = Violations::new();
    let nested: Result<u8, ApiError> = Err(ApiError::invalid_argument("a.b", "bad"));
    assert_eq!(v.absorb(nested), None);
    assert_eq!(v.absorb(Ok::<u8, ApiError>(3)), Some(3));
    let core: Result<(), ccm_core::CoreError> = Err(ccm_core::CoreError::invalid(
        "cpu_cores",
        "must be at least 1",
    ));
    v.absorb_core("definition.resource_requirements", core);
    assert_eq!(
        collected(v).into_iter().map(|(f, _)| f).collect::<Vec<_>>(),
        ["a.b", "definition.resource_requirements.cpu_cores"]
    );
}

#[test]
fn names_refuse_hostile_and_oversized_input_free_text_keeps_it_inert() {
    let hostile = [
        "<script>alert(1)</script>",
        "\"><img src=x onerror=alert(1)>",
        "javascript:alert(1)",
        "'; DROP TABLE workers; --",
        "../../etc/passwd",
        "name\u{0}with-nul",
        "ＡＢＣ",
    ];
    for payload in hostile {
        let mut v = Violations::new();
        assert_eq!(
            validate::resource_name(&mut v, "name", payload),
            None,
            "{payload:?}"
        );
        assert_eq!(v.len(), 1);
    }
    let mut v = Violations::new();
    let oversized = "a".repeat(validate::MAX_NAME_LEN + 1);
    validate::resource_name(&mut v, "name", &oversized);
    let (_, why) = collected(v).remove(0);
    assert!(why.contains("at most 128"), "{why}");

    // Free text stores markup as data.
    let mut v = Violations::new();
    for payload in &hostile[..5] {
        assert_eq!(
            validate::description(&mut v, "description", payload),
            Some(*payload)
        );
    }
    assert!(v.is_empty());
    // ... but not control or bidi characters, and not beyond its length.
    validate::description(&mut v, "description", "a\u{0}b");
    validate::reason(&mut v, "reason", "line one\nline two");
    validate::description(&mut v, "description", "evil\u{202E}txt.exe");
    validate::description(
        &mut v,
        "description",
        &"x".repeat(validate::MAX_DESCRIPTION_LEN + 1),
    );
    assert_eq!(v.len(), 4);

    // Template names are stricter.
    let mut v = Violations::new();
    assert!(validate::template_name(&mut v, "name", "metal-personal-1").is_some());
    assert!(validate::template_name(&mut v, "name", "metal_personal").is_none());
    assert!(validate::template_name(&mut v, "name", &"a".repeat(64)).is_none());
    assert_eq!(v.len(), 2);
}

#[test]
fn ids_are_uuids_or_names() {
    let mut v = Violations::new();
    assert!(validate::id(&mut v, "id", "3f2b8c1e-5d7a-4e1b-9c0d-2a6f4b8e1c3d").is_some());
    assert!(validate::id(&mut v, "id", "metal-personal").is_some());
    assert!(validate::uuid(&mut v, "id", "3F2B8C1E-5D7A-4E1B-9C0D-2A6F4B8E1C3D").is_some());
    assert!(v.is_empty());
    assert!(validate::id(&mut v, "a", "").is_none());
    assert!(validate::id(&mut v, "b", "Not An Id").is_none());
    assert!(validate::uuid(&mut v, "c", "metal-personal").is_none());
    assert!(validate::uuid(&mut v, "d", "3f2b8c1e5d7a4e1b9c0d2a6f4b8e1c3d").is_none());
    assert_eq!(validate::optional_id(&mut v, "e", ""), Some(None));
    assert_eq!(
        collected(v).into_iter().map(|(f, _)| f).collect::<Vec<_>>(),
        ["a", "b", "c", "d"]
    );
}

#[test]
fn versions_are_strict_semver() {
    let mut v = Violations::new();
    assert_eq!(
        validate::semver(&mut v, "version", "1.2.3"),
        Some(ccm_core::version::Version::new(1, 2, 3))
    );
    assert_eq!(validate::optional_semver(&mut v, "min", ""), Some(None));
    for bad in ["", "1.2", "v1.2.3", "01.2.3", "1.2.3-rc1", " 1.2.3"] {
        assert!(
            validate::semver(&mut v, "version", bad).is_none(),
            "{bad:?}"
        );
    }
    assert_eq!(v.len(), 6);
}

#[test]
fn enum_numbers_are_checked_for_every_value() {
    // Every defined, non-zero value of a contract enum passes; 0 only when optional; others fail.
    for raw in -2..=20 {
        let mut v = Violations::new();
        let got = validate::enum_value::<pb::InstanceState>(&mut v, "states[0]", raw, true);
        let defined = pb::InstanceState::try_from(raw).is_ok();
        if raw != 0 && defined {
            assert_eq!(got.map(|s| s as i32), Some(raw));
        } else {
            assert!(got.is_none());
            let (field, why) = collected(v).remove(0);
            assert_eq!(field, "states[0]");
            assert!(
                why.contains(if raw == 0 {
                    "UNSPECIFIED"
                } else {
                    "unknown enum value"
                }),
                "{why}"
            );
        }
    }
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    ccm_control_plane::convert::timestamp_to_proto(t)
}

#[test]
fn time_slots_resolve_asap_defaults_and_limits() {
    let now = DateTime::from_timestamp(1_800_000_000, 0).expect("instant");
    let max = Duration::minutes(120);
    let check = |slot: Option<pb::TimeSlot>| {
        let mut v = Violations::new();
        let out = validate::time_slot(&mut v, "time_slot", slot.as_ref(), now, max);
        (out, collected(v))
    };

    // ASAP: starts now, ends after the maximum duration; a given start is ignored.
    let (slot, problems) = check(Some(pb::TimeSlot {
        asap: true,
        start: Some(ts(now - Duration::days(3))),
        end: None,
    }));
    let slot = slot.expect("valid");
    assert!(problems.is_empty());
    assert_eq!((slot.start, slot.end, slot.asap), (now, now + max, true));

    // Future slot with a default end.
    let start = now + Duration::hours(2);
    let (slot, _) = check(Some(pb::TimeSlot {
        asap: false,
        start: Some(ts(start)),
        end: None,
    }));
    assert_eq!(slot.map(|s| (s.start, s.end)), Some((start, start + max)));

    // Explicit end within the maximum.
    let (slot, _) = check(Some(pb::TimeSlot {
        asap: false,
        start: Some(ts(start)),
        end: Some(ts(start + Duration::minutes(45))),
    }));
    assert_eq!(slot.map(|s| s.end), Some(start + Duration::minutes(45)));

    let cases: Vec<(Option<pb::TimeSlot>, &str, &str)> = vec![
        (None, "time_slot", "required"),
        (
            Some(pb::TimeSlot {
                asap: false,
                start: None,
                end: None,
            }),
            "time_slot.start",
            "required unless asap",
        ),
        (
            Some(pb::TimeSlot {
                asap: false,
                start: Some(ts(now - Duration::minutes(10))),
                end: None,
            }),
            "time_slot.start",
            "in the past",
        ),
        (
            Some(pb::TimeSlot {
                asap: false,
                start: Some(ts(now + Duration::days(400))),
                end: None,
            }),
            "time_slot.start",
            "days ahead",
        ),
        (
            Some(pb::TimeSlot {
                asap: false,
                start: Some(ts(start)),
                end: Some(ts(start)),
            }),
            "time_slot.end",
            "after the start",
        ),
        (
            Some(pb::TimeSlot {
                asap: false,
                start: Some(ts(start)),
                end: Some(ts(start + Duration::minutes(121))),
            }),
            "time_slot.end",
            "longer than the definition's maximum",
        ),
        (
            Some(pb::TimeSlot {
                asap: false,
                start: Some(prost_types::Timestamp {
                    seconds: 1_800_000_000,
                    nanos: -1,
                }),
                end: None,
            }),
            "time_slot.start.nanos",
            "0..999999999",
        ),
    ];
    for (slot, field, text) in cases {
        let (out, problems) = check(slot);
        assert!(out.is_none(), "{slot:?}");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, field);
        assert!(
            problems[0].1.contains(text),
            "{:?} lacks {text:?}",
            problems[0].1
        );
    }
    // A slight clock skew is tolerated.
    let (slot, _) = check(Some(pb::TimeSlot {
        asap: false,
        start: Some(ts(now - Duration::seconds(30))),
        end: None,
    }));
    assert!(slot.is_some());
}

#[test]
fn labels_and_ec2_tags_are_bounded_and_reserved_keys_refused() {
    let mut ok = HashMap::new();
    ok.insert("Owner".to_owned(), "<b>team</b>".to_owned());
    ok.insert("Env".to_owned(), String::new());
    let mut v = Violations::new();
    assert!(validate::ec2_tags(&mut v, "tags", &ok));
    assert!(v.is_empty());

    let mut bad = HashMap::new();
    bad.insert("aws:createdBy".to_owned(), "x".to_owned());
    bad.insert("ccm:template".to_owned(), "x".to_owned());
    bad.insert(String::new(), "x".to_owned());
    bad.insert("k".repeat(129), "x".to_owned());
    bad.insert("v".to_owned(), "x".repeat(257));
    bad.insert("ctl".to_owned(), "a\u{7}b".to_owned());
    let mut v = Violations::new();
    assert!(!validate::ec2_tags(&mut v, "tags", &bad));
    let mut got = collected(v).into_iter().map(|(f, _)| f).collect::<Vec<_>>();
    got.sort();
    let mut want = vec![
        "tags[\"aws:createdBy\"]".to_owned(),
        "tags[\"ccm:template\"]".to_owned(),
        "tags[\"\"]".to_owned(),
        format!("tags[{:?}]", "k".repeat(129)),
        "tags[\"v\"]".to_owned(),
        "tags[\"ctl\"]".to_owned(),
    ];
    want.sort();
    assert_eq!(got, want);

    let many: HashMap<String, String> = (0..51).map(|i| (format!("k{i}"), String::new())).collect();
    let mut v = Violations::new();
    assert!(!validate::labels(
        &mut v,
        "labels",
        &many,
        LabelLimits::DEFAULT
    ));
    assert_eq!(collected(v)[0].0, "labels");
}

const LAB: &str = "lab:\n  title: demo\nnodes:\n  - label: r1\n    tags: [\"serial:${PORT_SERIAL_1}\"]\n  - label: r2\n    tags: [\"vnc:${PORT_VNC_1}\"]\n";

#[test]
fn lab_yaml_is_checked_against_the_port_template() {
    let mut v = Violations::new();
    let summary = validate::lab_yaml(
        &mut v,
        "lab_yaml",
        LAB,
        "port_template.ports",
        &["serial_1", "vnc_1"],
    )
    .expect("valid lab");
    assert_eq!(summary.node_count, 2);
    assert!(v.is_empty());

    // An unknown placeholder and an unreferenced port, both reported with locations.
    let mut v = Violations::new();
    assert!(
        validate::lab_yaml(
            &mut v,
            "lab_yaml",
            LAB,
            "port_template.ports",
            &["serial_1", "ssh_1"]
        )
        .is_none()
    );
    let problems = collected(v);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert_eq!(problems[0].0, "lab_yaml");
    assert!(problems[0].1.contains("${PORT_VNC_1}") && problems[0].1.contains("nodes[1].tags[0]"));
    assert_eq!(problems[1].0, "port_template.ports[1].name");
    assert!(problems[1].1.contains("ssh_1"));

    for (yaml, text) in [
        ("nodes: [", "invalid lab YAML"),
        ("", "required"),
        ("title: no nodes\n", "invalid lab YAML"),
    ] {
        let mut v = Violations::new();
        assert!(validate::lab_yaml(&mut v, "lab_yaml", yaml, "ports", &[]).is_none());
        let problems = collected(v);
        assert_eq!(problems[0].0, "lab_yaml");
        assert!(problems[0].1.contains(text), "{problems:?}");
    }
    let huge = format!("nodes: []\n#{}", "x".repeat(validate::MAX_LAB_YAML_BYTES));
    let mut v = Violations::new();
    assert!(validate::lab_yaml(&mut v, "lab_yaml", &huge, "ports", &[]).is_none());
    assert!(collected(v)[0].1.contains("bytes"));
}

#[test]
fn port_names_and_resource_requirements() {
    let mut v = Violations::new();
    assert!(validate::port_names(&mut v, "ports", ["serial_1", "vnc_1"]).is_some());
    assert!(
        validate::port_names(&mut v, "ports", ["serial_1", "Serial-2", "serial_1", ""]).is_none()
    );
    assert_eq!(
        collected(v).into_iter().map(|(f, _)| f).collect::<Vec<_>>(),
        ["ports[1].name", "ports[2].name", "ports[3].name"]
    );

    let mut v = Violations::new();
    let r = pb::ResourceRequirements {
        cpu_cores: 0,
        memory_gb: -1,
        storage_gb: 10,
        nested_virt: true,
        ami_requirements: vec![pb::AmiRequirement {
            name_pattern: "CML-2.9.*".into(),
            min_version: "2.9".into(),
        }],
    };
    assert!(
        validate::resource_requirements(&mut v, "definition.resource_requirements", Some(&r))
            .is_none()
    );
    assert_eq!(
        collected(v).into_iter().map(|(f, _)| f).collect::<Vec<_>>(),
        [
            "definition.resource_requirements.cpu_cores",
            "definition.resource_requirements.memory_gb",
            "definition.resource_requirements.ami_requirements[0].min_version",
        ]
    );
    let mut v = Violations::new();
    assert!(validate::resource_requirements(&mut v, "r", None).is_none());
    assert_eq!(collected(v)[0].0, "r");
}

#[test]
fn idempotency_keys_and_slugs() {
    let mut v = Violations::new();
    assert_eq!(
        validate::idempotency_key(&mut v, "request_id", ""),
        Some(None)
    );
    assert_eq!(
        validate::idempotency_key(&mut v, "request_id", "abc-1"),
        Some(Some("abc-1"))
    );
    assert_eq!(
        validate::idempotency_key(&mut v, "request_id", &"k".repeat(65)),
        None
    );
    assert_eq!(
        validate::idempotency_key(&mut v, "request_id", "has space"),
        None
    );
    assert_eq!(v.len(), 2);
    assert_eq!(
        validate::slugify_name("CML Worker (Lab #3)").as_deref(),
        Some("cml-worker-lab-3")
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

fn name_is_in_charset(s: &str) -> bool {
    let bytes = s.as_bytes();
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= validate::MAX_NAME_LEN
        && edge(bytes[0])
        && edge(bytes[bytes.len() - 1])
        && bytes
            .iter()
            .all(|b| edge(*b) || matches!(b, b'-' | b'_' | b'.'))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn name_validator_never_panics_and_agrees_with_the_charset(s in any::<String>()) {
        let accepted = validate::resource_name_problem(&s).is_none();
        prop_assert_eq!(accepted, name_is_in_charset(&s));
        if accepted {
            prop_assert!(validate::resource_name_problem(&s).is_none());
            let mut v = Violations::new();
            prop_assert_eq!(validate::resource_name(&mut v, "n", &s), Some(s.as_str()));
        }
    }

    #[test]
    fn near_miss_names_never_panic(s in "[a-zA-Z0-9._ <>/-]{0,140}") {
        let accepted = validate::resource_name_problem(&s).is_none();
        prop_assert_eq!(accepted, name_is_in_charset(&s));
    }

    #[test]
    fn generated_valid_names_are_accepted(s in "[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?") {
        prop_assert!(validate::resource_name_problem(&s).is_none(), "{}", s);
    }

    #[test]
    fn slugify_always_yields_a_valid_name(s in any::<String>()) {
        if let Some(slug) = validate::slugify_name(&s) {
            prop_assert!(validate::resource_name_problem(&slug).is_none(), "{:?} -> {:?}", s, slug);
        }
    }

    #[test]
    fn uri_validator_never_panics_and_accepted_uris_are_stable(s in any::<String>()) {
        for policy in [UriPolicy::ARTIFACT, UriPolicy::ARTIFACT_ALLOW_HTTP, UriPolicy::HTTPS_ONLY] {
            if let Ok(scheme) = validate::uri_check(&s, policy) {
                prop_assert!(policy.schemes.contains(&scheme));
                prop_assert_eq!(validate::uri_check(&s, policy), Ok(scheme));
                prop_assert!(s.bytes().all(|b| b.is_ascii_graphic()));
                prop_assert!(s.len() <= validate::MAX_URI_LEN);
            }
        }
    }

    #[test]
    fn uri_like_strings_never_panic(
        scheme in "(s3|file|https|http|ftp|S3|HTTPS|)",
        sep in "(://|:/|:|)",
        rest in "[a-zA-Z0-9.:/@\\[\\]?#% _-]{0,80}",
    ) {
        let s = format!("{scheme}{sep}{rest}");
        if let Ok(scheme) = validate::uri_check(&s, UriPolicy::ARTIFACT_ALLOW_HTTP) {
            prop_assert_eq!(validate::uri_check(&s, UriPolicy::ARTIFACT_ALLOW_HTTP), Ok(scheme));
            prop_assert!(!s.contains(' '));
            if scheme == UriScheme::File {
                prop_assert!(!s.split('/').any(|seg| seg == ".."));
            }
        }
    }

    #[test]
    fn generated_valid_uris_are_accepted(
        bucket in "[a-z0-9][a-z0-9-]{1,20}[a-z0-9]",
        // Segments never start with a dot, so no `..` segment (file URIs refuse those).
        key in "[a-zA-Z0-9_-]{1,20}(/[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,19}){0,3}",
        host in "[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,6}){1,2}",
        port in proptest::option::of(1u16..),
    ) {
        let s3 = format!("s3://{bucket}/{key}");
        prop_assert_eq!(validate::uri_check(&s3, UriPolicy::ARTIFACT), Ok(UriScheme::S3));
        let file = format!("file:///srv/{key}");
        prop_assert_eq!(validate::uri_check(&file, UriPolicy::ARTIFACT), Ok(UriScheme::File));
        let authority = match port { Some(p) => format!("{host}:{p}"), None => host.clone() };
        let https = format!("https://{authority}/{key}");
        prop_assert_eq!(validate::uri_check(&https, UriPolicy::ARTIFACT), Ok(UriScheme::Https));
        let http = format!("http://{authority}/{key}");
        prop_assert!(validate::uri_check(&http, UriPolicy::ARTIFACT).is_err());
        prop_assert_eq!(validate::uri_check(&http, UriPolicy::ARTIFACT_ALLOW_HTTP), Ok(UriScheme::Http));
    }

    #[test]
    fn free_text_never_panics(s in any::<String>(), max in 0usize..300) {
        let problem = validate::free_text_problem(&s, max, true);
        if problem.is_none() {
            prop_assert!(s.chars().count() <= max);
            prop_assert!(s.chars().all(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r')));
        }
    }
}
