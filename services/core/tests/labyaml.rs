//! Tests of the lab YAML port rewrite (`ccm_core::labyaml`).

use std::collections::{BTreeMap, BTreeSet};

use ccm_core::CoreError;
use ccm_core::labyaml::{
    PlaceholderUse, PreparedLab, RewriteMode, placeholder_for, rewrite_ports,
    rewrite_ports_detailed, scan_placeholders, validate_against_ports,
};
use proptest::prelude::*;
use serde_yaml_ng::{Mapping, Value};

const TWO_NODE: &str = include_str!("fixtures/two-node-serial-vnc.yaml");
const FOUR_NODE: &str = include_str!("fixtures/four-node-mixed-forms.yaml");
const UNKNOWN: &str = include_str!("fixtures/unknown-placeholder.yaml");
const MISSING: &str = include_str!("fixtures/missing-placeholder.yaml");
const MALFORMED: &str = include_str!("fixtures/malformed.yaml");

const TWO_NODE_PORTS: [&str; 3] = ["serial_1", "serial_2", "vnc_1"];
const FOUR_NODE_PORTS: [&str; 4] = ["serial_1", "serial_2", "serial_3", "vnc_1"];

fn alloc(pairs: &[(&str, u16)]) -> BTreeMap<String, u16> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

fn two_node_alloc() -> BTreeMap<String, u16> {
    alloc(&[("serial_1", 5041), ("serial_2", 5042), ("vnc_1", 5044)])
}

fn four_node_alloc() -> BTreeMap<String, u16> {
    alloc(&[
        ("serial_1", 6001),
        ("serial_2", 6002),
        ("serial_3", 6003),
        ("vnc_1", 6004),
    ])
}

fn parse(yaml: &str) -> Value {
    serde_yaml_ng::from_str(yaml).expect("test YAML parses")
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

/// Follows a path like `nodes.1.tags.0` (numbers index sequences).
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, part| match part.parse::<usize>() {
            Ok(i) => &v
                .as_sequence()
                .unwrap_or_else(|| panic!("{path}: not a sequence"))[i],
            Err(_) => v
                .as_mapping()
                .and_then(|m| m.get(part))
                .unwrap_or_else(|| panic!("{path}: no key {part}")),
        })
}

/// Every difference between two trees: `(path, before, after)`. Mapping keys must be the same
/// and in the same order (a key-order change is reported as a difference at the mapping).
fn diff(a: &Value, b: &Value) -> Vec<(String, Value, Value)> {
    fn walk(a: &Value, b: &Value, path: String, out: &mut Vec<(String, Value, Value)>) {
        match (a, b) {
            (Value::Mapping(x), Value::Mapping(y)) => {
                if !x.keys().eq(y.keys()) {
                    out.push((format!("{path}{{keys}}"), a.clone(), b.clone()));
                    return;
                }
                for ((k, va), (_, vb)) in x.iter().zip(y) {
                    let key = match k {
                        Value::String(k) => k.clone(),
                        other => format!("{other:?}"),
                    };
                    let p = if path.is_empty() {
                        key
                    } else {
                        format!("{path}.{key}")
                    };
                    walk(va, vb, p, out);
                }
            }
            (Value::Sequence(x), Value::Sequence(y)) if x.len() == y.len() => {
                for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                    walk(va, vb, format!("{path}[{i}]"), out);
                }
            }
            (Value::Tagged(x), Value::Tagged(y)) if x.tag == y.tag => {
                walk(&x.value, &y.value, path, out);
            }
            (Value::Mapping(_) | Value::Sequence(_) | Value::Tagged(_), _)
            | (_, Value::Mapping(_) | Value::Sequence(_) | Value::Tagged(_)) => {
                out.push((path, a.clone(), b.clone()));
            }
            // Scalars: same variant and value (Number keeps int vs float; NaN == NaN).
            _ => {
                if a != b {
                    out.push((path, a.clone(), b.clone()));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(a, b, String::new(), &mut out);
    out
}

fn diff_set(a: &Value, b: &Value) -> BTreeSet<(String, String, String)> {
    diff(a, b)
        .into_iter()
        .map(|(p, x, y)| {
            (
                p,
                x.as_str().unwrap_or("<non-string>").to_owned(),
                y.as_str().unwrap_or("<non-string>").to_owned(),
            )
        })
        .collect()
}

fn expect_diffs(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(p, a, b)| ((*p).to_owned(), (*a).to_owned(), (*b).to_owned()))
        .collect()
}

// ------------------------------------------------------------------------------------------
// the diff walker itself can fail
// ------------------------------------------------------------------------------------------

#[test]
fn diff_walker_sees_reordered_keys_retyped_scalars_and_changed_text() {
    let a = parse("x: 1\ny: '1'\nz: |\n  a\n  b\n");
    assert!(diff(&a, &a).is_empty());
    assert_eq!(diff(&a, &parse("y: '1'\nx: 1\nz: |\n  a\n  b\n")).len(), 1);
    assert_eq!(
        diff(&a, &parse("x: 1\ny: 1\nz: |\n  a\n  b\n"))[0].0,
        "y",
        "string '1' vs integer 1"
    );
    assert_eq!(
        diff(&a, &parse("x: 1.0\ny: '1'\nz: |\n  a\n  b\n"))[0].0,
        "x"
    );
    assert_eq!(
        diff(&a, &parse("x: 1\ny: '1'\nz: |-\n  a\n  b\n"))[0].0,
        "z"
    );
}

// ------------------------------------------------------------------------------------------
// rewrite: the two-node fixture
// ------------------------------------------------------------------------------------------

#[test]
fn rewrite_replaces_annotation_tag_label_and_node_tags() {
    let out = rewrite_ports(TWO_NODE, &TWO_NODE_PORTS, &two_node_alloc()).unwrap();
    let v = parse(&out);
    assert_eq!(at(&v, "smart_annotations.0.tag"), &s("serial:5041"));
    assert_eq!(at(&v, "smart_annotations.0.label"), &s("serial:5041"));
    assert_eq!(at(&v, "smart_annotations.1.tag"), &s("serial:5042"));
    assert_eq!(at(&v, "smart_annotations.1.label"), &s("serial:5042"));
    assert_eq!(at(&v, "smart_annotations.2.tag"), &s("vnc:5044"));
    assert_eq!(at(&v, "smart_annotations.2.label"), &s("vnc:5044"));
    assert_eq!(
        at(&v, "nodes.0.tags"),
        &Value::Sequence(vec![s("serial:5041"), s("core")])
    );
    assert_eq!(
        at(&v, "nodes.1.tags"),
        &Value::Sequence(vec![s("serial:5042"), s("vnc:5044")])
    );
}

#[test]
fn rewrite_changes_nothing_but_the_substitutions() {
    let before = parse(TWO_NODE);
    let after = parse(&rewrite_ports(TWO_NODE, &TWO_NODE_PORTS, &two_node_alloc()).unwrap());
    assert_eq!(
        diff_set(&before, &after),
        expect_diffs(&[
            (
                "smart_annotations[0].tag",
                "serial:${PORT_SERIAL_1}",
                "serial:5041"
            ),
            (
                "smart_annotations[0].label",
                "serial:${PORT_SERIAL_1}",
                "serial:5041"
            ),
            (
                "smart_annotations[1].tag",
                "serial:${PORT_SERIAL_2}",
                "serial:5042"
            ),
            (
                "smart_annotations[1].label",
                "serial:${PORT_SERIAL_2}",
                "serial:5042"
            ),
            ("smart_annotations[2].tag", "vnc:${PORT_VNC_1}", "vnc:5044"),
            (
                "smart_annotations[2].label",
                "vnc:${PORT_VNC_1}",
                "vnc:5044"
            ),
            ("nodes[0].tags[0]", "serial:${PORT_SERIAL_1}", "serial:5041"),
            ("nodes[1].tags[0]", "serial:${PORT_SERIAL_2}", "serial:5042"),
            ("nodes[1].tags[1]", "vnc:${PORT_VNC_1}", "vnc:5044"),
        ])
    );
}

#[test]
fn rewrite_leaves_placeholders_in_configurations_alone() {
    let before = parse(TWO_NODE);
    let after = parse(&rewrite_ports(TWO_NODE, &TWO_NODE_PORTS, &two_node_alloc()).unwrap());
    let router = at(&after, "nodes.0.configuration.0.content")
        .as_str()
        .unwrap();
    assert!(router.contains("a literal ${PORT_SERIAL_1} that must stay"));
    assert_eq!(
        router,
        at(&before, "nodes.0.configuration.0.content")
            .as_str()
            .unwrap()
    );
    let desktop = at(&after, "nodes.1.configuration.0.content")
        .as_str()
        .unwrap();
    assert!(desktop.contains("# ${PORT_VNC_1} and ${SERIAL_2} here are shell text"));
    assert!(desktop.contains("echo \"Welcome, ${USER:-student}\""));
    assert!(desktop.ends_with("\n\n# trailing blank line above is part of the script"));
    assert_eq!(
        desktop,
        at(&before, "nodes.1.configuration.0.content")
            .as_str()
            .unwrap()
    );
    // Strings that look like numbers stay strings.
    assert_eq!(at(&after, "lab.version"), &s("0.3.0"));
}

#[test]
fn rewrite_edits_only_placeholder_text_in_place() {
    let r = rewrite_ports_detailed(TWO_NODE, &TWO_NODE_PORTS, &two_node_alloc()).unwrap();
    assert_eq!(r.mode, RewriteMode::InPlace);
    assert_eq!(r.substitutions, 9);
    let before: Vec<&str> = TWO_NODE.lines().collect();
    let after: Vec<&str> = r.yaml.lines().collect();
    assert_eq!(before.len(), after.len());
    let mut changed = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            changed += 1;
            let expected = b
                .replace("${PORT_SERIAL_1}", "5041")
                .replace("${PORT_SERIAL_2}", "5042")
                .replace("${PORT_VNC_1}", "5044");
            assert_eq!(*a, expected);
            assert!(b.trim_start().starts_with("- ") || b.contains("tag:") || b.contains("label:"));
        }
    }
    assert_eq!(changed, 9);
    assert_eq!(
        TWO_NODE.len() - r.yaml.len(),
        6 * ("${PORT_SERIAL_1}".len() - 4) + 3 * ("${PORT_VNC_1}".len() - 4)
    );
}

#[test]
fn rewrite_output_has_no_placeholder_left_in_rewritable_fields() {
    let out = rewrite_ports(TWO_NODE, &TWO_NODE_PORTS, &two_node_alloc()).unwrap();
    let scanned = scan_placeholders(&out).unwrap();
    assert!(scanned.uses.is_empty(), "{:?}", scanned.uses);
    assert_eq!(scanned.node_count, 2);
}

// ------------------------------------------------------------------------------------------
// rewrite: both placeholder forms, quoting styles, four nodes
// ------------------------------------------------------------------------------------------

#[test]
fn rewrite_accepts_the_bare_name_form_and_quoted_tags() {
    let r = rewrite_ports_detailed(FOUR_NODE, &FOUR_NODE_PORTS, &four_node_alloc()).unwrap();
    assert_eq!(r.mode, RewriteMode::InPlace);
    assert!(
        r.yaml.starts_with("# Written for ccm's tests"),
        "comment kept"
    );
    assert!(
        r.yaml.contains("tags: ['serial:6001', core]"),
        "flow style kept"
    );
    assert!(
        r.yaml.contains("  - tag: \"serial:6001\"\n"),
        "double quotes kept"
    );
    let before = parse(FOUR_NODE);
    let after = parse(&r.yaml);
    assert_eq!(
        diff_set(&before, &after),
        expect_diffs(&[
            (
                "smart_annotations[0].tag",
                "serial:${PORT_SERIAL_1}",
                "serial:6001"
            ),
            (
                "smart_annotations[0].label",
                "console ${PORT_SERIAL_1}",
                "console 6001"
            ),
            (
                "smart_annotations[1].tag",
                "serial:${SERIAL_3}",
                "serial:6003"
            ),
            (
                "smart_annotations[1].label",
                "consoles ${PORT_SERIAL_2}+${SERIAL_3}",
                "consoles 6002+6003"
            ),
            (
                "smart_annotations[2].label",
                "vnc:${PORT_VNC_1}",
                "vnc:6004"
            ),
            ("nodes[0].tags[0]", "serial:${PORT_SERIAL_1}", "serial:6001"),
            ("nodes[1].tags[0]", "serial:${SERIAL_2}", "serial:6002"),
            ("nodes[3].tags[0]", "serial:${PORT_SERIAL_3}", "serial:6003"),
            ("nodes[3].tags[1]", "vnc:${VNC_1}", "vnc:6004"),
        ])
    );
    // The numeric tag is left as a number.
    assert_eq!(at(&after, "nodes.3.tags.2"), &Value::Number(2024.into()));
    assert!(
        at(&after, "nodes.3.configuration.0.content")
            .as_str()
            .unwrap()
            .contains("serial console is ${PORT_SERIAL_3}; do not substitute me")
    );
}

#[test]
fn scan_lists_uses_in_document_order_with_locations() {
    let scanned = scan_placeholders(FOUR_NODE).unwrap();
    assert_eq!(scanned.node_count, 4);
    assert_eq!(
        scanned.title.as_deref(),
        Some("CCM-FIXTURE four-node mixed forms")
    );
    let got: Vec<(&str, &str)> = scanned
        .uses
        .iter()
        .map(|u| (u.placeholder.as_str(), u.location.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("${PORT_SERIAL_1}", "smart_annotations[0].tag"),
            ("${PORT_SERIAL_1}", "smart_annotations[0].label"),
            ("${SERIAL_3}", "smart_annotations[1].tag"),
            ("${PORT_SERIAL_2}", "smart_annotations[1].label"),
            ("${SERIAL_3}", "smart_annotations[1].label"),
            ("${PORT_VNC_1}", "smart_annotations[2].label"),
            ("${PORT_SERIAL_1}", "nodes[0].tags[0]"),
            ("${SERIAL_2}", "nodes[1].tags[0]"),
            ("${PORT_SERIAL_3}", "nodes[3].tags[0]"),
            ("${VNC_1}", "nodes[3].tags[1]"),
        ]
    );
    assert_eq!(scanned.uses[2].name(), "SERIAL_3");
}

#[test]
fn scan_follows_the_file_when_nodes_come_before_smart_annotations() {
    let yaml = "nodes:\n  - tags: [\"a:${PORT_A}\"]\nsmart_annotations:\n  - label: b:${PORT_B}\n    tag: a:${A}\n";
    let uses: Vec<PlaceholderUse> = scan_placeholders(yaml).unwrap().uses;
    let locations: Vec<&str> = uses.iter().map(|u| u.location.as_str()).collect();
    assert_eq!(
        locations,
        [
            "nodes[0].tags[0]",
            "smart_annotations[0].label",
            "smart_annotations[0].tag"
        ]
    );
}

#[test]
fn validate_resolves_every_placeholder_to_its_port() {
    let summary = validate_against_ports(FOUR_NODE, &FOUR_NODE_PORTS).unwrap();
    assert_eq!(summary.node_count, 4);
    assert_eq!(summary.references.len(), 10);
    let serial_3: Vec<&str> = summary.locations_of("serial_3").collect();
    assert_eq!(
        serial_3,
        [
            "smart_annotations[1].tag",
            "smart_annotations[1].label",
            "nodes[3].tags[0]"
        ]
    );
    let vnc: Vec<&str> = summary.locations_of("vnc_1").collect();
    assert_eq!(vnc, ["smart_annotations[2].label", "nodes[3].tags[1]"]);
    assert_eq!(summary.references[7].placeholder, "${SERIAL_2}");
    assert_eq!(summary.references[7].port_name, "serial_2");
}

#[test]
fn validate_two_node_fixture() {
    let summary = validate_against_ports(TWO_NODE, &TWO_NODE_PORTS).unwrap();
    assert_eq!(summary.node_count, 2);
    assert_eq!(
        summary.title.as_deref(),
        Some("CCM-FIXTURE two-node serial+vnc")
    );
    assert_eq!(
        summary.locations_of("vnc_1").collect::<Vec<_>>(),
        [
            "smart_annotations[2].tag",
            "smart_annotations[2].label",
            "nodes[1].tags[1]"
        ]
    );
}

#[test]
fn placeholder_for_upper_cases_the_port_name() {
    assert_eq!(placeholder_for("serial_1"), "${PORT_SERIAL_1}");
    assert_eq!(placeholder_for("Vnc"), "${PORT_VNC}");
}

#[test]
fn canonical_form_wins_over_the_bare_form() {
    // Ports `x` and `port_x`: ${PORT_X} is port x (canonical), ${PORT_PORT_X} is port_x.
    let yaml = "nodes:\n  - tags:\n      - a:${PORT_X}\n      - b:${PORT_PORT_X}\n      - c:${X}\n";
    let out = rewrite_ports(
        yaml,
        &["x", "port_x"],
        &alloc(&[("x", 2001), ("port_x", 2002)]),
    )
    .unwrap();
    assert_eq!(
        at(&parse(&out), "nodes.0.tags"),
        &Value::Sequence(vec![s("a:2001"), s("b:2002"), s("c:2001")])
    );
}

#[test]
fn placeholder_is_case_sensitive() {
    let yaml = "nodes:\n  - tags: ['serial:${port_serial_1}']\n";
    assert_eq!(
        validate_against_ports(yaml, &["serial_1"]).unwrap_err(),
        CoreError::UnknownPlaceholder {
            placeholder: "${port_serial_1}".into(),
            location: "nodes[0].tags[0]".into()
        }
    );
}

// ------------------------------------------------------------------------------------------
// rewrite: cases that cannot be edited in place fall back to re-emission, still correct
// ------------------------------------------------------------------------------------------

#[test]
fn tag_made_only_of_a_placeholder_stays_a_string() {
    let yaml = "nodes:\n  - id: n0\n    tags:\n      - ${PORT_SERIAL_1}\n    version: '1.10'\n";
    let r = rewrite_ports_detailed(yaml, &["serial_1"], &alloc(&[("serial_1", 5041)])).unwrap();
    // In place it would read back as the integer 5041, so it is re-emitted.
    assert_eq!(r.mode, RewriteMode::Reemitted);
    let v = parse(&r.yaml);
    assert_eq!(at(&v, "nodes.0.tags.0"), &s("5041"));
    assert_eq!(at(&v, "nodes.0.version"), &s("1.10"));
    assert_eq!(diff(&parse(yaml), &v).len(), 1);
}

#[test]
fn placeholder_in_a_comment_forces_a_verified_reemit() {
    let yaml = "# console is ${PORT_SERIAL_1}\nnodes:\n  - id: n0\n    configuration: |-\n      echo ${PORT_SERIAL_1}\n      done\n    tags: [\"serial:${PORT_SERIAL_1}\"]\n";
    let r = rewrite_ports_detailed(yaml, &["serial_1"], &alloc(&[("serial_1", 5041)])).unwrap();
    assert_eq!(r.mode, RewriteMode::Reemitted);
    assert_eq!(
        diff_set(&parse(yaml), &parse(&r.yaml)),
        expect_diffs(&[("nodes[0].tags[0]", "serial:${PORT_SERIAL_1}", "serial:5041")])
    );
    assert_eq!(
        at(&parse(&r.yaml), "nodes.0.configuration"),
        &s("echo ${PORT_SERIAL_1}\ndone")
    );
}

#[test]
fn aliased_tags_are_rewritten_everywhere_they_appear() {
    let yaml = "nodes:\n  - id: n0\n    tags: &t\n      - serial:${PORT_SERIAL_1}\n  - id: n1\n    tags: *t\n";
    let r = rewrite_ports_detailed(yaml, &["serial_1"], &alloc(&[("serial_1", 5041)])).unwrap();
    let v = parse(&r.yaml);
    assert_eq!(at(&v, "nodes.0.tags.0"), &s("serial:5041"));
    assert_eq!(at(&v, "nodes.1.tags.0"), &s("serial:5041"));
}

#[test]
fn escaped_placeholder_in_double_quotes_is_still_found() {
    // \x24 is '$': the parsed tag is serial:${PORT_SERIAL_1} though the text never spells it.
    let yaml = "nodes:\n  - tags: [\"serial:\\x24{PORT_SERIAL_1}\"]\n";
    let r = rewrite_ports_detailed(yaml, &["serial_1"], &alloc(&[("serial_1", 5041)])).unwrap();
    assert_eq!(r.mode, RewriteMode::Reemitted);
    assert_eq!(at(&parse(&r.yaml), "nodes.0.tags.0"), &s("serial:5041"));
}

#[test]
fn crlf_input_is_edited_in_place() {
    let yaml = TWO_NODE.replace('\n', "\r\n");
    let r = rewrite_ports_detailed(&yaml, &TWO_NODE_PORTS, &two_node_alloc()).unwrap();
    assert_eq!(r.mode, RewriteMode::InPlace);
    assert!(r.yaml.contains("  - tag: serial:5041\r\n"));
    assert_eq!(diff(&parse(&yaml), &parse(&r.yaml)).len(), 9);
}

#[test]
fn no_ports_and_no_placeholders_returns_the_input_unchanged() {
    let yaml = "nodes:\n  - id: n0   # a comment\n    tags: [core]\n";
    assert_eq!(rewrite_ports(yaml, &[], &BTreeMap::new()).unwrap(), yaml);
}

#[test]
fn empty_and_null_optional_sections_are_fine() {
    let yaml = "smart_annotations:\nnodes:\n  - id: n0\n    tags:\n  - id: n1\n    tags: [\"v:${PORT_V}\"]\n";
    let summary = validate_against_ports(yaml, &["v"]).unwrap();
    assert_eq!(summary.node_count, 2);
    assert!(summary.title.is_none());
    let out = rewrite_ports(yaml, &["v"], &alloc(&[("v", 9999)])).unwrap();
    assert_eq!(at(&parse(&out), "nodes.1.tags.0"), &s("v:9999"));
}

// ------------------------------------------------------------------------------------------
// PreparedLab: prepare once, render many times
// ------------------------------------------------------------------------------------------

#[test]
fn prepared_lab_splices_fixtures_and_matches_rewrite_ports() {
    for (yaml, ports, allocated) in [
        (TWO_NODE, &TWO_NODE_PORTS[..], two_node_alloc()),
        (FOUR_NODE, &FOUR_NODE_PORTS[..], four_node_alloc()),
    ] {
        let prepared = PreparedLab::new(yaml, ports).unwrap();
        assert!(prepared.splices_in_place());
        assert_eq!(prepared.yaml(), yaml);
        assert_eq!(
            prepared.summary(),
            &validate_against_ports(yaml, ports).unwrap()
        );
        assert_eq!(
            prepared.render(&allocated).unwrap(),
            rewrite_ports(yaml, ports, &allocated).unwrap()
        );
    }
}

#[test]
fn prepared_lab_renders_any_allocation() {
    let prepared = PreparedLab::new(TWO_NODE, &TWO_NODE_PORTS).unwrap();
    for numbers in [[1u16, 2, 3], [9999, 10, 65535], [2000, 2001, 2002]] {
        let allocated = alloc(&[
            ("serial_1", numbers[0]),
            ("serial_2", numbers[1]),
            ("vnc_1", numbers[2]),
        ]);
        let r = prepared.render_detailed(&allocated).unwrap();
        assert_eq!(r.mode, RewriteMode::InPlace);
        assert_eq!(r.substitutions, 9);
        let v = parse(&r.yaml);
        assert_eq!(
            at(&v, "nodes.0.tags.0"),
            &s(&format!("serial:{}", numbers[0]))
        );
        assert_eq!(at(&v, "nodes.1.tags.1"), &s(&format!("vnc:{}", numbers[2])));
        assert_eq!(diff(&parse(TWO_NODE), &v).len(), 9);
    }
    assert_eq!(
        prepared.render(&alloc(&[("serial_1", 1)])).unwrap_err(),
        CoreError::PortNotAllocated {
            port_name: "serial_2".into()
        }
    );
}

#[test]
fn prepared_lab_reports_validation_errors() {
    assert_eq!(
        PreparedLab::new(UNKNOWN, &["serial_1", "vnc_1"]).unwrap_err(),
        CoreError::UnknownPlaceholder {
            placeholder: "${PORT_SERIAL_9}".into(),
            location: "nodes[1].tags[1]".into()
        }
    );
    assert!(matches!(
        PreparedLab::new(MALFORMED, &["serial_1"]).unwrap_err(),
        CoreError::InvalidLabYaml(_)
    ));
}

#[test]
fn fields_that_could_become_numbers_are_checked_on_every_render() {
    // `0o${PORT_A}` reads as an octal integer for 17 but as a string for 18; `1${PORT_A}` is
    // always an integer once substituted. Both must come out as strings.
    let yaml = "nodes:\n  - tags:\n      - 0o${PORT_A}\n      - 1${PORT_A}\n      - '${PORT_A}'\n";
    let prepared = PreparedLab::new(yaml, &["a"]).unwrap();
    assert!(!prepared.splices_in_place());
    for n in [17u16, 18, 5041] {
        let out = prepared.render(&alloc(&[("a", n)])).unwrap();
        let v = parse(&out);
        assert_eq!(
            at(&v, "nodes.0.tags"),
            &Value::Sequence(vec![
                s(&format!("0o{n}")),
                s(&format!("1{n}")),
                s(&n.to_string())
            ]),
            "{out}"
        );
    }
    // `0b${PORT_C}` is a string for most numbers but an integer for some (0b101 is 5): a proof
    // with digits that happen to give a string must not be trusted for other digits.
    let yaml = "nodes:\n  - tags: ['a:${PORT_A}', 'b:${PORT_B}']\n  - tags:\n      - 0b${PORT_C}\n";
    let ports = ["a", "b", "c"];
    let prepared = PreparedLab::new(yaml, &ports).unwrap();
    assert!(!prepared.splices_in_place());
    for c in [101u16, 109, 8, 2] {
        let allocated = alloc(&[("a", 2000), ("b", 2001), ("c", c)]);
        let v = parse(&prepared.render(&allocated).unwrap());
        assert_eq!(at(&v, "nodes.1.tags.0"), &s(&format!("0b{c}")));
    }
}

#[test]
fn quoted_placeholder_only_tag_is_still_edited_in_place_by_the_checked_path() {
    let yaml = "nodes:\n  - tags: ['${PORT_A}']  # keep me\n";
    let r = rewrite_ports_detailed(yaml, &["a"], &alloc(&[("a", 2000)])).unwrap();
    assert_eq!(r.mode, RewriteMode::InPlace);
    assert_eq!(r.yaml, "nodes:\n  - tags: ['2000']  # keep me\n");
}

// ------------------------------------------------------------------------------------------
// errors
// ------------------------------------------------------------------------------------------

fn lab_yaml_error(result: Result<impl std::fmt::Debug, CoreError>) -> String {
    match result {
        Err(CoreError::InvalidLabYaml(msg)) => msg,
        other => panic!("expected InvalidLabYaml, got {other:?}"),
    }
}

#[test]
fn malformed_yaml_is_invalid_with_a_line() {
    let msg = lab_yaml_error(scan_placeholders(MALFORMED));
    assert!(msg.contains("not valid YAML"), "{msg}");
    assert!(msg.contains("line 6"), "{msg}");
    let msg = lab_yaml_error(rewrite_ports(
        MALFORMED,
        &["serial_1"],
        &alloc(&[("serial_1", 1)]),
    ));
    assert!(msg.contains("line"), "{msg}");
}

#[test]
fn shape_errors_name_their_location() {
    let cases: &[(&str, &str)] = &[
        ("", "the document is empty"),
        (
            "- a\n- b\n",
            "the document root: expected a mapping (a CML lab), found a sequence",
        ),
        (
            "just text\n",
            "the document root: expected a mapping (a CML lab), found a string",
        ),
        ("lab: {title: x}\n", "nodes: missing"),
        (
            "nodes: {n0: {}}\n",
            "nodes: expected a sequence, found a mapping",
        ),
        ("nodes: ~\n", "nodes: expected a sequence, found null"),
        (
            "nodes:\n  - id: n0\n  - just-a-string\n",
            "nodes[1]: expected a mapping, found a string",
        ),
        (
            "nodes:\n  - tags: core\n",
            "nodes[0].tags: expected a sequence, found a string",
        ),
        (
            "nodes:\n  - tags: [a, {b: c}]\n",
            "nodes[0].tags[1]: expected a string, found a mapping",
        ),
        (
            "nodes:\n  - tags: [a, !x b]\n",
            "nodes[0].tags[1]: expected a string, found a tagged value",
        ),
        (
            "smart_annotations: 3\nnodes: []\n",
            "smart_annotations: expected a sequence, found a number",
        ),
        (
            "smart_annotations: [x]\nnodes: []\n",
            "smart_annotations[0]: expected a mapping, found a string",
        ),
        (
            "smart_annotations:\n  - tag: t\n    label: [a]\nnodes: []\n",
            "smart_annotations[0].label: expected a string, found a sequence",
        ),
        ("a: 1\n---\nb: 2\n", "more than one document"),
        ("nodes: []\nnodes: []\n", "duplicate entry"),
    ];
    for (yaml, want) in cases {
        let msg = lab_yaml_error(scan_placeholders(yaml));
        assert!(
            msg.contains(want),
            "{yaml:?}: {msg:?} should contain {want:?}"
        );
        let msg = lab_yaml_error(rewrite_ports(yaml, &[], &BTreeMap::new()));
        assert!(
            msg.contains(want),
            "{yaml:?}: {msg:?} should contain {want:?}"
        );
    }
}

#[test]
fn unterminated_placeholder_in_a_rewritable_field_is_an_error() {
    let yaml = "nodes:\n  - tags: [ok, 'serial:${PORT_SERIAL_1']\n";
    let msg = lab_yaml_error(scan_placeholders(yaml));
    assert!(
        msg.starts_with("nodes[0].tags[1]: unterminated placeholder"),
        "{msg}"
    );
    assert!(msg.contains("${PORT_SERIAL_1"), "{msg}");
    let yaml = "smart_annotations:\n  - label: 'x ${'\nnodes: []\n";
    let msg = lab_yaml_error(validate_against_ports(yaml, &[]));
    assert!(
        msg.starts_with("smart_annotations[0].label: unterminated"),
        "{msg}"
    );
}

#[test]
fn unterminated_placeholder_elsewhere_is_data() {
    let yaml = "nodes:\n  - configuration: 'echo ${HOME'\n    tags: ['s:${PORT_S}']\n";
    let out = rewrite_ports(yaml, &["s"], &alloc(&[("s", 2000)])).unwrap();
    assert_eq!(
        out,
        "nodes:\n  - configuration: 'echo ${HOME'\n    tags: ['s:2000']\n"
    );
}

#[test]
fn unknown_placeholder_is_reported_with_its_location() {
    let want = CoreError::UnknownPlaceholder {
        placeholder: "${PORT_SERIAL_9}".into(),
        location: "nodes[1].tags[1]".into(),
    };
    let ports = ["serial_1", "vnc_1"];
    assert_eq!(validate_against_ports(UNKNOWN, &ports).unwrap_err(), want);
    let allocated = alloc(&[("serial_1", 5041), ("vnc_1", 5044)]);
    assert_eq!(
        rewrite_ports(UNKNOWN, &ports, &allocated).unwrap_err(),
        want
    );
}

#[test]
fn unknown_placeholder_in_an_annotation_label() {
    let yaml = "smart_annotations:\n  - tag: a:${PORT_A}\n    label: 'b:${}'\nnodes: []\n";
    assert_eq!(
        validate_against_ports(yaml, &["a"]).unwrap_err(),
        CoreError::UnknownPlaceholder {
            placeholder: "${}".into(),
            location: "smart_annotations[0].label".into()
        }
    );
}

#[test]
fn all_problems_are_listed_for_the_validate_rpc() {
    let scanned = scan_placeholders(UNKNOWN).unwrap();
    assert_eq!(
        scanned.port_problems(&["serial_1", "vnc_1", "extra"]),
        vec![
            CoreError::UnknownPlaceholder {
                placeholder: "${PORT_SERIAL_9}".into(),
                location: "nodes[1].tags[1]".into()
            },
            CoreError::PortWithoutPlaceholder {
                port_name: "extra".into()
            },
        ]
    );
    assert!(
        scanned
            .port_problems(&["serial_1", "vnc_1", "serial_9"])
            .is_empty()
    );
}

#[test]
fn port_without_placeholder_ignores_mentions_outside_rewritable_fields() {
    let ports = ["serial_1", "serial_2", "vnc_1"];
    let want = CoreError::PortWithoutPlaceholder {
        port_name: "vnc_1".into(),
    };
    assert_eq!(validate_against_ports(MISSING, &ports).unwrap_err(), want);
    let allocated = alloc(&[("serial_1", 1), ("serial_2", 2), ("vnc_1", 3)]);
    assert_eq!(
        rewrite_ports(MISSING, &ports, &allocated).unwrap_err(),
        want
    );
    assert!(validate_against_ports(MISSING, &["serial_1", "serial_2"]).is_ok());
}

#[test]
fn port_not_allocated() {
    let allocated = alloc(&[("serial_1", 5041), ("serial_2", 5042)]);
    assert_eq!(
        rewrite_ports(TWO_NODE, &TWO_NODE_PORTS, &allocated).unwrap_err(),
        CoreError::PortNotAllocated {
            port_name: "vnc_1".into()
        }
    );
}

#[test]
fn allocation_outside_the_template_is_refused() {
    let mut allocated = two_node_alloc();
    allocated.insert("serial_7".into(), 5047);
    match rewrite_ports(TWO_NODE, &TWO_NODE_PORTS, &allocated).unwrap_err() {
        CoreError::Invalid { field, message } => {
            assert_eq!(field, "allocated_ports");
            assert!(message.contains("serial_7"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn invalid_port_names_are_refused() {
    for (ports, field) in [
        (&["serial_1", "SERIAL_1"][..], "port_template.ports[1].name"),
        (&["a", ""][..], "port_template.ports[1].name"),
        (&["a}b"][..], "port_template.ports[0].name"),
        (&["a b"][..], "port_template.ports[0].name"),
    ] {
        match validate_against_ports(TWO_NODE, ports).unwrap_err() {
            CoreError::Invalid { field: f, .. } => assert_eq!(f, field, "{ports:?}"),
            other => panic!("{ports:?}: {other:?}"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// property tests
// ------------------------------------------------------------------------------------------

/// `smart_annotations[i].tag`, `smart_annotations[i].label` or `nodes[i].tags[j]`.
fn is_target_path(path: &str) -> bool {
    let index = |s: &str| -> Option<usize> {
        let rest = s.strip_prefix('[')?;
        let close = rest.find(']')?;
        rest[..close].parse::<usize>().ok()?;
        Some(close + 2)
    };
    if let Some(rest) = path.strip_prefix("smart_annotations") {
        return index(rest).is_some_and(|n| matches!(&rest[n..], ".tag" | ".label"));
    }
    if let Some(rest) = path.strip_prefix("nodes") {
        return index(rest).is_some_and(|n| {
            rest[n..]
                .strip_prefix(".tags")
                .is_some_and(|t| index(t).is_some_and(|m| m == t.len()))
        });
    }
    false
}

#[test]
fn target_path_helper() {
    assert!(is_target_path("smart_annotations[3].label"));
    assert!(is_target_path("nodes[12].tags[0]"));
    assert!(!is_target_path("nodes[1].configuration[0].content"));
    assert!(!is_target_path("nodes[1].tags"));
    assert!(!is_target_path("smart_annotations[0].fill_color"));
}

/// A piece of a generated rewritable string.
#[derive(Debug, Clone)]
enum Piece {
    Lit(String),
    /// Port index and whether to use the canonical `${PORT_X}` form.
    Ph(usize, bool),
}

fn render(pieces: &[Piece], ports: &[String], numbers: Option<&[u16]>) -> String {
    pieces
        .iter()
        .map(|p| match (p, numbers) {
            (Piece::Lit(l), _) => l.clone(),
            (Piece::Ph(i, _), Some(numbers)) => numbers[*i].to_string(),
            (Piece::Ph(i, true), None) => format!("${{PORT_{}}}", ports[*i].to_uppercase()),
            (Piece::Ph(i, false), None) => format!("${{{}}}", ports[*i].to_uppercase()),
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Tag {
    Text(Vec<Piece>),
    Number(i64),
}

#[derive(Debug, Clone)]
struct GenNode {
    tags: Vec<Tag>,
    config: String,
    extra: Vec<(String, Value)>,
}

#[derive(Debug, Clone)]
struct GenLab {
    ports: Vec<String>,
    numbers: Vec<u16>,
    annotations: Vec<(Vec<Piece>, Vec<Piece>)>,
    nodes: Vec<GenNode>,
    nodes_first: bool,
}

/// Literals never contain `${` (only `{` is excluded, `$` and `}` may appear).
fn literal() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:_ .$}/-]{0,8}"
}

fn pieces(port_count: usize) -> impl Strategy<Value = Vec<Piece>> {
    prop::collection::vec(
        prop_oneof![
            literal().prop_map(Piece::Lit),
            (0..port_count, any::<bool>()).prop_map(|(i, c)| Piece::Ph(i, c)),
        ],
        0..4,
    )
}

/// Multi-line text, sometimes with placeholder-looking text that must survive.
fn multiline() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[ -~]{0,40}",
            Just("echo ${PORT_SERIAL_1} ${HOME}".to_owned()),
            Just("  indented: ${NOT_A_PORT".to_owned()),
            Just(String::new()),
        ],
        0..8,
    )
    .prop_map(|lines| lines.join("\n"))
}

fn other_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        (-1e6f64..1e6).prop_map(|f| Value::Number(f.into())),
        "[ -~]{0,12}".prop_map(Value::String),
        Just(Value::String("0.3.0".into())),
        Just(Value::String("5041".into())),
        multiline().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
            prop::collection::vec(("[a-z_]{1,6}", inner), 0..4).prop_map(|kvs| {
                let mut m = Mapping::new();
                for (k, v) in kvs {
                    m.insert(Value::String(k), v);
                }
                Value::Mapping(m)
            }),
        ]
    })
}

fn gen_lab() -> impl Strategy<Value = GenLab> {
    // Port names: lower-case, unique, never starting with `port_` (so the bare form of one can
    // never be the canonical form of another; that precedence has its own unit test).
    prop::collection::btree_set("[a-z][a-z0-9_]{0,7}", 1..8)
        .prop_map(|set| {
            set.into_iter()
                .filter(|n| !n.starts_with("port_"))
                .collect::<Vec<_>>()
        })
        .prop_filter("at least one port", |p| !p.is_empty())
        .prop_flat_map(|ports| {
            let n = ports.len();
            let node = (
                prop::collection::vec(
                    prop_oneof![
                        3 => pieces(n).prop_map(Tag::Text),
                        1 => any::<i64>().prop_map(Tag::Number),
                    ],
                    0..4,
                ),
                multiline(),
                prop::collection::vec(("x_[a-z]{1,6}", other_value()), 0..3),
            )
                .prop_map(|(tags, config, extra)| GenNode {
                    tags,
                    config,
                    extra,
                });
            (
                Just(ports),
                prop::collection::btree_set(2000u16..=9999, n),
                prop::collection::vec((pieces(n), pieces(n)), 0..6),
                prop::collection::vec(node, 1..=60),
                any::<bool>(),
            )
        })
        .prop_map(
            |(ports, numbers, mut annotations, mut nodes, nodes_first)| {
                // Half the labs look like CML's (`serial:...` in every field with a placeholder),
                // which the prepared splice can prove; the others keep fields such as a lone
                // `${PORT_X}` that must go through the checked path.
                if nodes_first {
                    let prefix = |p: &mut Vec<Piece>| {
                        if p.iter().any(|x| matches!(x, Piece::Ph(..))) {
                            p.insert(0, Piece::Lit("t:".into()));
                        }
                    };
                    for (tag, label) in &mut annotations {
                        prefix(tag);
                        prefix(label);
                    }
                    for node in &mut nodes {
                        for tag in &mut node.tags {
                            if let Tag::Text(p) = tag {
                                prefix(p);
                            }
                        }
                    }
                }
                // Every port referenced at least once.
                let node_count = nodes.len();
                for i in 0..ports.len() {
                    nodes[i % node_count].tags.push(Tag::Text(vec![
                        Piece::Lit("p:".into()),
                        Piece::Ph(i, i % 2 == 0),
                    ]));
                }
                GenLab {
                    ports,
                    numbers: numbers.into_iter().collect(),
                    annotations,
                    nodes,
                    nodes_first,
                }
            },
        )
}

/// The lab as a document: with placeholders (`numbers` = None) or substituted.
fn lab_value(lab: &GenLab, numbers: Option<&[u16]>) -> Value {
    let text = |p: &[Piece]| Value::String(render(p, &lab.ports, numbers));
    let annotations = Value::Sequence(
        lab.annotations
            .iter()
            .enumerate()
            .map(|(i, (tag, label))| {
                let mut m = Mapping::new();
                m.insert(s("tag"), text(tag));
                m.insert(s("is_on"), Value::Bool(i % 2 == 0));
                m.insert(s("label"), text(label));
                m.insert(s("fill_color"), s("#FFD10080"));
                m.insert(s("z_index"), Value::Number((i as u64).into()));
                Value::Mapping(m)
            })
            .collect(),
    );
    let nodes = Value::Sequence(
        lab.nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let mut m = Mapping::new();
                m.insert(s("id"), s(&format!("n{i}")));
                let mut cfg = Mapping::new();
                cfg.insert(s("name"), s("node.cfg"));
                cfg.insert(s("content"), s(&node.config));
                m.insert(
                    s("configuration"),
                    Value::Sequence(vec![Value::Mapping(cfg)]),
                );
                m.insert(
                    s("tags"),
                    Value::Sequence(
                        node.tags
                            .iter()
                            .map(|t| match t {
                                Tag::Text(p) => text(p),
                                Tag::Number(n) => Value::Number((*n).into()),
                            })
                            .collect(),
                    ),
                );
                for (k, v) in &node.extra {
                    m.insert(s(k), v.clone());
                }
                m.insert(s("x"), Value::Number((i as i64 * 40 - 100).into()));
                Value::Mapping(m)
            })
            .collect(),
    );
    let mut root = Mapping::new();
    root.insert(s("annotations"), Value::Sequence(vec![]));
    if lab.nodes_first {
        root.insert(s("nodes"), nodes);
        root.insert(s("smart_annotations"), annotations);
    } else {
        root.insert(s("smart_annotations"), annotations);
        root.insert(s("nodes"), nodes);
    }
    let mut meta = Mapping::new();
    meta.insert(s("title"), s("generated"));
    meta.insert(s("version"), s("0.3.0"));
    root.insert(s("lab"), Value::Mapping(meta));
    Value::Mapping(root)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_labs_rewrite_exactly_the_placeholders(lab in gen_lab()) {
        let input = serde_yaml_ng::to_string(&lab_value(&lab, None)).unwrap();
        let ports: Vec<&str> = lab.ports.iter().map(String::as_str).collect();
        let allocated: BTreeMap<String, u16> =
            lab.ports.iter().cloned().zip(lab.numbers.iter().copied()).collect();

        let summary = validate_against_ports(&input, &ports).unwrap();
        prop_assert_eq!(summary.node_count, lab.nodes.len());

        let out = rewrite_ports(&input, &ports, &allocated).unwrap();
        let got = parse(&out);
        let want = lab_value(&lab, Some(&lab.numbers));
        let differences = diff(&want, &got);
        prop_assert!(differences.is_empty(), "{:?}", differences);

        // A prepared lab renders the same, and stays right for a different allocation
        // (other digit counts: the splice must not depend on the probe numbers).
        let prepared = PreparedLab::new(&input, &ports).unwrap();
        prop_assert_eq!(prepared.render(&allocated).unwrap(), out);
        let other: Vec<u16> = (0..lab.ports.len()).map(|i| (i * 7 + 1) as u16).collect();
        let allocated2: BTreeMap<String, u16> =
            lab.ports.iter().cloned().zip(other.iter().copied()).collect();
        let got2 = parse(&prepared.render(&allocated2).unwrap());
        let differences = diff(&lab_value(&lab, Some(&other)), &got2);
        prop_assert!(differences.is_empty(), "{:?}", differences);
        // And the input still reads as the unsubstituted lab.
        prop_assert!(diff(&lab_value(&lab, None), &parse(&input)).is_empty());
    }

    #[test]
    fn plain_tags_near_numbers_come_out_as_the_right_strings(
        prefix in "[0-9a-fA-FxXoObB.+~_:eE-]{0,3}",
        suffix in "[0-9a-fA-F.eE:_]{0,3}",
        first in any::<u16>(),
        second in any::<u16>(),
    ) {
        let yaml = format!("nodes:\n  - tags:\n      - {prefix}${{PORT_A}}{suffix}\n      - b:${{PORT_B}}\n");
        let Ok(prepared) = PreparedLab::new(&yaml, &["a", "b"]) else {
            // Not valid YAML / not a plain scalar holding the placeholder: nothing to check.
            return Ok(());
        };
        for n in [first, second] {
            let out = prepared.render(&alloc(&[("a", n), ("b", 2000)])).unwrap();
            let v = parse(&out);
            prop_assert_eq!(at(&v, "nodes.0.tags.0"), &s(&format!("{prefix}{n}{suffix}")), "{}", out);
            prop_assert_eq!(at(&v, "nodes.0.tags.1"), &s("b:2000"));
        }
    }

    #[test]
    fn junk_never_panics(junk in "(?s).{0,300}") {
        let _ = scan_placeholders(&junk);
        let _ = validate_against_ports(&junk, &["serial_1"]);
        if let Ok(out) = rewrite_ports(&junk, &["serial_1"], &alloc(&[("serial_1", 5041)])) {
            prop_assert!(serde_yaml_ng::from_str::<Value>(&out).is_ok());
        }
    }

    #[test]
    fn yaml_flavoured_junk_never_panics(junk in "[-:{}\\[\\]$ a-zA-Z_\n'\"|>#&*!,?]{0,300}") {
        let _ = scan_placeholders(&junk);
        if let Ok(out) = rewrite_ports(&junk, &["serial_1"], &alloc(&[("serial_1", 5041)])) {
            prop_assert!(serde_yaml_ng::from_str::<Value>(&out).is_ok());
        }
    }

    #[test]
    fn damaged_fixture_never_panics_and_ok_output_parses(
        cuts in prop::collection::vec((any::<prop::sample::Index>(), "[-:{}$ \n'\"#|]{0,3}"), 1..4)
    ) {
        let mut text = TWO_NODE.to_owned();
        for (at, insert) in cuts {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            let end = (i + 2).min(text.len());
            let end = if text.is_char_boundary(end) { end } else { i };
            text.replace_range(i..end, &insert);
        }
        if let Ok(out) = rewrite_ports(&text, &TWO_NODE_PORTS, &two_node_alloc()) {
            let got = parse(&out);
            let before = parse(&text);
            for (path, _, after) in diff(&before, &got) {
                prop_assert!(is_target_path(&path), "{} changed", path);
                prop_assert!(!after.as_str().unwrap_or("").contains("${"), "{} not rewritten", path);
            }
        }
    }
}
