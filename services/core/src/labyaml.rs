//! The `${PORT_<NAME>}` rewrite of CML lab files (FR-2.2.3d, FR-2.2.4c, ADR-004).
//!
//! A lablet definition's lab YAML names the ports of its port template with placeholders; at
//! instantiation the controller substitutes the ports allocated on the worker before importing
//! the lab into CML.
//!
//! # Placeholders
//!
//! For a port named `serial_1`, the placeholder is `${PORT_SERIAL_1}` (`PORT_` + the name
//! upper-cased). The bare form `${SERIAL_1}` is accepted too (domain.md §11.11). If the two forms
//! could name different ports (ports `x` and `port_x` both give `${PORT_X}`), the canonical
//! `PORT_` form wins: `${PORT_X}` is port `x`, and port `port_x` is `${PORT_PORT_X}`. Matching
//! is case-sensitive against the upper-cased name.
//!
//! Placeholders are looked for, and replaced, **only** in
//!
//! * `smart_annotations[].tag` and `smart_annotations[].label`,
//! * `nodes[].tags[]`,
//!
//! e.g. `serial:${PORT_SERIAL_1}` → `serial:5041`. In those fields every `${` must open a known
//! placeholder closed by `}`. A `${...}` anywhere else (a node's configuration script, a
//! description) is data and is left exactly as it is.
//!
//! # The entry points
//!
//! * [`scan_placeholders`]: what a lab references and where, without a port template (plus the
//!   node count and title).
//! * [`validate_against_ports`]: what the definition Validate/Create path calls: every
//!   placeholder names a template port and every template port is referenced.
//! * [`rewrite_ports`] / [`rewrite_ports_detailed`]: the one-shot substitution.
//! * [`PreparedLab`]: validate and plan once per definition version, then
//!   [`PreparedLab::render`] per instance.
//!
//! # Formatting is kept, data is guaranteed
//!
//! The document is parsed with `serde_yaml_ng` (structure checks, the expected result). The
//! rewrite then edits **only the placeholder characters in the original text**, so comments,
//! quoting, indentation and key order survive byte for byte. Correctness does not rest on that
//! edit being clever: the edited text is parsed again and compared, node by node and in key
//! order, with the expected document (the input with the substitutions applied to the target
//! fields only). The edit is used only if they are identical.
//!
//! That proof is made once per lab with probe numbers ([`PreparedLab::new`]) and holds for any
//! port numbers, because swapping digits for digits cannot change YAML structure; the only
//! digit-dependent effect, a plain scalar reading as a number, boolean or null (`${PORT_X}`
//! alone, `0b${PORT_X}`), is excluded beforehand by requiring every rewritten field to contain
//! a character no such scalar can (`:` in `serial:${PORT_SERIAL_1}`). Fields that fail that test
//! are rewritten through the checked path on every render: substitute in the document, splice,
//! re-parse and compare.
//!
//! When the in-place edit cannot be proven right (a placeholder written in a comment, through an
//! alias, with escapes in a double-quoted string, or a plain tag that would become a bare number
//! and so change type), the expected document is re-emitted by `serde_yaml_ng` instead
//! ([`RewriteMode::Reemitted`]) and that output is verified the same way. Re-emission keeps every
//! key, key order, value and type, and multi-line strings byte for byte once parsed, but comments
//! and quoting or block style may change and aliases are expanded. CML exports are
//! machine-generated, so that is acceptable; in practice CML exports take the in-place path.
//!
//! # Cost
//!
//! Parsing dominates: `serde_yaml_ng` reads a realistic 50-node lab (~130 KB with node
//! configurations) in a few milliseconds, and a one-shot [`rewrite_ports`] parses twice (read,
//! prove). A [`PreparedLab`] pays that once; its proven [`PreparedLab::render`] is a text splice
//! of tens of microseconds. The controller should keep prepared labs per `lab_yaml_hash`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde_yaml_ng::{Mapping, Value};

use crate::error::{CoreError, CoreResult};

/// Opening of every placeholder.
const OPEN: &str = "${";
/// Prefix of the canonical placeholder name.
const CANONICAL_PREFIX: &str = "PORT_";

/// The canonical placeholder of a port: `serial_1` → `${PORT_SERIAL_1}`.
pub fn placeholder_for(port_name: &str) -> String {
    format!("${{{CANONICAL_PREFIX}{}}}", port_name.to_uppercase())
}

/// One `${...}` found in a rewritable field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceholderUse {
    /// The placeholder as written, e.g. `${PORT_SERIAL_1}`.
    pub placeholder: String,
    /// Where, e.g. `nodes[1].tags[0]` or `smart_annotations[2].label`.
    pub location: String,
}

impl PlaceholderUse {
    /// The text between `${` and `}`, e.g. `PORT_SERIAL_1`.
    pub fn name(&self) -> &str {
        self.placeholder
            .strip_prefix(OPEN)
            .and_then(|rest| rest.strip_suffix('}'))
            .unwrap_or(&self.placeholder)
    }
}

/// What [`scan_placeholders`] finds in a lab, without a port template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabPlaceholders {
    /// `len(nodes)`: the node count a definition declares.
    pub node_count: usize,
    /// `lab.title`, if the lab has one.
    pub title: Option<String>,
    /// Every placeholder in the rewritable fields, in document order.
    pub uses: Vec<PlaceholderUse>,
}

impl LabPlaceholders {
    /// Checks these placeholders against a port template's port names: the first unknown
    /// placeholder ([`CoreError::UnknownPlaceholder`], document order), else the first port no
    /// placeholder refers to ([`CoreError::PortWithoutPlaceholder`], template order). Invalid
    /// port names (empty, containing `$`, `{`, `}` or whitespace, or two names equal once
    /// upper-cased) are [`CoreError::Invalid`] on `port_template.ports`.
    pub fn check_ports(&self, port_names: &[&str]) -> CoreResult<LabSummary> {
        let index = PortIndex::new(port_names)?;
        match self.problems_with(&index).into_iter().next() {
            Some(first) => Err(first),
            None => Ok(self.summary(&index)),
        }
    }

    /// Every problem [`LabPlaceholders::check_ports`] would report, not just the first: unknown
    /// placeholders in document order, then unreferenced ports in template order. Empty when the
    /// lab and the template agree. Invalid port names are the only problem reported if present.
    pub fn port_problems(&self, port_names: &[&str]) -> Vec<CoreError> {
        match PortIndex::new(port_names) {
            Ok(index) => self.problems_with(&index),
            Err(e) => vec![e],
        }
    }

    fn problems_with(&self, index: &PortIndex) -> Vec<CoreError> {
        let mut used = vec![false; index.names.len()];
        let mut problems = Vec::new();
        for u in &self.uses {
            match index.resolve(u.name()) {
                Some(i) => used[i] = true,
                None => problems.push(CoreError::UnknownPlaceholder {
                    placeholder: u.placeholder.clone(),
                    location: u.location.clone(),
                }),
            }
        }
        for (name, used) in index.names.iter().zip(used) {
            if !used {
                problems.push(CoreError::PortWithoutPlaceholder {
                    port_name: name.clone(),
                });
            }
        }
        problems
    }

    fn summary(&self, index: &PortIndex) -> LabSummary {
        let references = self
            .uses
            .iter()
            .filter_map(|u| {
                index.resolve(u.name()).map(|i| PortReference {
                    port_name: index.names[i].clone(),
                    placeholder: u.placeholder.clone(),
                    location: u.location.clone(),
                })
            })
            .collect();
        LabSummary {
            node_count: self.node_count,
            title: self.title.clone(),
            references,
        }
    }
}

/// A placeholder resolved to a port of the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortReference {
    /// The port's name in the template, e.g. `serial_1`.
    pub port_name: String,
    /// The placeholder as written, e.g. `${PORT_SERIAL_1}` or `${SERIAL_1}`.
    pub placeholder: String,
    /// Where, e.g. `nodes[1].tags[0]`.
    pub location: String,
}

/// What [`validate_against_ports`] returns for a lab that agrees with its port template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSummary {
    /// `len(nodes)`.
    pub node_count: usize,
    /// `lab.title`, if any.
    pub title: Option<String>,
    /// Every placeholder with the port it names, in document order.
    pub references: Vec<PortReference>,
}

impl LabSummary {
    /// Locations where `port_name` is referenced, in document order.
    pub fn locations_of<'a>(&'a self, port_name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.references
            .iter()
            .filter(move |r| r.port_name == port_name)
            .map(|r| r.location.as_str())
    }
}

/// How [`rewrite_ports_detailed`] produced its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteMode {
    /// Only the placeholders were edited in the original text; everything else is byte-identical.
    InPlace,
    /// The document was re-emitted by `serde_yaml_ng`: same data, formatting may differ.
    Reemitted,
}

/// The result of [`rewrite_ports_detailed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The rewritten lab YAML (verified to parse to the expected document).
    pub yaml: String,
    /// How it was produced.
    pub mode: RewriteMode,
    /// How many placeholders were replaced.
    pub substitutions: usize,
}

/// Parses a lab and lists the placeholders of its rewritable fields, with `len(nodes)` and
/// `lab.title`. Needs no port template; see [`LabPlaceholders::check_ports`].
///
/// Errors: [`CoreError::InvalidLabYaml`] if the text is not YAML (with line and column), is not
/// a mapping, has no `nodes` sequence, has a node or smart annotation that is not a mapping,
/// `tags` that is not a sequence, a tag/label that is a collection, or an unterminated `${` in a
/// rewritable field (each with its location).
pub fn scan_placeholders(yaml: &str) -> CoreResult<LabPlaceholders> {
    let doc = parse(yaml)?;
    let lab = inspect(&doc)?;
    let mut uses = Vec::new();
    for (field, text) in &lab.targets {
        for span in placeholder_spans(*field, text) {
            let (start, end) = span?;
            uses.push(PlaceholderUse {
                placeholder: text[start..end].to_owned(),
                location: field.to_string(),
            });
        }
    }
    Ok(LabPlaceholders {
        node_count: lab.node_count,
        title: lab.title.map(str::to_owned),
        uses,
    })
}

/// What the definition Validate path calls: [`scan_placeholders`] then
/// [`LabPlaceholders::check_ports`]. Every placeholder must name a port of `port_names` and
/// every port must be referenced at least once.
///
/// Errors: those of [`scan_placeholders`], then [`CoreError::UnknownPlaceholder`] (with its
/// location) or [`CoreError::PortWithoutPlaceholder`], or [`CoreError::Invalid`] for invalid
/// port names.
pub fn validate_against_ports(yaml: &str, port_names: &[&str]) -> CoreResult<LabSummary> {
    scan_placeholders(yaml)?.check_ports(port_names)
}

/// Replaces every placeholder of the rewritable fields with its allocated port number and
/// returns the new lab YAML. `port_names` is the definition's port template; `allocated` maps
/// each of those names to the port allocated on the worker.
///
/// The lab must pass [`validate_against_ports`]; then every template port must have a number
/// ([`CoreError::PortNotAllocated`]) and `allocated` must not name ports outside the template
/// ([`CoreError::Invalid`] on `allocated_ports`). See the module docs for how formatting is kept
/// and correctness verified.
///
/// Cost: two YAML parses of the lab (read it, then prove the edit). A caller that rewrites the
/// same definition version many times should keep a [`PreparedLab`] instead, whose
/// [`PreparedLab::render`] is a text splice.
pub fn rewrite_ports(
    yaml: &str,
    port_names: &[&str],
    allocated: &BTreeMap<String, u16>,
) -> CoreResult<String> {
    rewrite_ports_detailed(yaml, port_names, allocated).map(|r| r.yaml)
}

/// [`rewrite_ports`], also saying how the output was produced and how many placeholders were
/// replaced.
pub fn rewrite_ports_detailed(
    yaml: &str,
    port_names: &[&str],
    allocated: &BTreeMap<String, u16>,
) -> CoreResult<Rewritten> {
    let mut prepared = PreparedLab::new(yaml, port_names)?;
    let numbers = prepared.ports.numbers(allocated)?;
    match prepared.doc.take() {
        None => Ok(prepared.splice_rewritten(&numbers)),
        Some(doc) => prepared.render_checked(doc, &numbers),
    }
}

/// A lab YAML read, validated against its port template and planned once, to be rendered with
/// port numbers many times (a definition version is immutable, so the control plane can keep
/// one per `(definition, version)` or per `lab_yaml_hash`).
///
/// [`PreparedLab::new`] does the work of [`validate_against_ports`] and finds the text spans of
/// the placeholders in the rewritable fields. It then proves the in-place edit: it splices
/// distinct probe numbers into those spans, parses the result and compares it with the expected
/// document. Replacing the probe digits with other digits cannot change the document's
/// structure (digits are never YAML syntax), and placeholders whose field could turn into a
/// number, boolean or null once substituted (e.g. a tag that is only `${PORT_X}`) are excluded
/// up front, so after that proof [`PreparedLab::render`] is a plain splice: microseconds, no
/// parsing. Labs where the proof does not hold render through the checked path of
/// [`rewrite_ports`] instead (parse, substitute, verify; see the module docs).
#[derive(Debug, Clone)]
pub struct PreparedLab {
    yaml: String,
    ports: PortIndex,
    summary: LabSummary,
    /// Spans of the placeholders to replace in `yaml`, when they line up with the document.
    edits: Option<Vec<Edit>>,
    /// The parsed document, kept only when the splice is not proven (rendering then needs it).
    doc: Option<Value>,
}

/// One placeholder to replace in the original text: byte range and port index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edit {
    start: usize,
    end: usize,
    port: usize,
}

impl PreparedLab {
    /// Reads and validates `yaml` against the port template `port_names` (the errors of
    /// [`validate_against_ports`]) and plans the rewrite.
    pub fn new(yaml: &str, port_names: &[&str]) -> CoreResult<Self> {
        let ports = PortIndex::new(port_names)?;
        let mut doc = parse(yaml)?;

        // Shape, placeholders and their ports.
        let lab = inspect(&doc)?;
        let mut used = vec![false; ports.names.len()];
        let mut references = Vec::new();
        // Whether some rewritable field could read back as a non-string once substituted.
        let mut type_risk = false;
        for (field, text) in &lab.targets {
            for span in placeholder_spans(*field, text) {
                let (start, end) = span?;
                let placeholder = &text[start..end];
                let port = ports
                    .resolve(&placeholder[OPEN.len()..placeholder.len() - 1])
                    .ok_or_else(|| CoreError::UnknownPlaceholder {
                        placeholder: placeholder.to_owned(),
                        location: field.to_string(),
                    })?;
                used[port] = true;
                references.push(PortReference {
                    port_name: ports.names[port].clone(),
                    placeholder: placeholder.to_owned(),
                    location: field.to_string(),
                });
            }
            type_risk |= !literal_forces_string(text, &ports);
        }
        if let Some((name, _)) = ports.names.iter().zip(&used).find(|(_, u)| !**u) {
            return Err(CoreError::PortWithoutPlaceholder {
                port_name: name.clone(),
            });
        }
        let summary = LabSummary {
            node_count: lab.node_count,
            title: lab.title.map(str::to_owned),
            references,
        };
        drop(lab);

        let mut prepared = PreparedLab {
            yaml: yaml.to_owned(),
            ports,
            summary,
            edits: None,
            doc: None,
        };
        if prepared.summary.references.is_empty() {
            // Nothing to replace: rendering returns the input.
            prepared.edits = Some(Vec::new());
            return Ok(prepared);
        }

        // Which occurrences of known placeholders, in the whole document and in document order,
        // sit in a rewritable field; and the matching spans of the text, if they line up.
        let mut plan = Vec::new();
        plan_occurrences(&doc, Ctx::Root, &prepared.ports, &mut plan);
        prepared.edits = align_edits(yaml, &prepared.ports, &plan);

        // Prove the splice with distinct probe numbers (any digits would do).
        if prepared.edits.is_some() && !type_risk {
            let probes: Vec<String> = (0..prepared.ports.names.len())
                .map(|i| (10_000 + i).to_string())
                .collect();
            substitute_targets(&mut doc, &prepared.ports, &probes)?;
            let spliced = prepared.splice(&probes);
            if parse(&spliced).is_ok_and(|reparsed| same(&reparsed, &doc)) {
                return Ok(prepared);
            }
            // Not proven (rare): keep the document as written for the checked path.
            doc = parse(yaml)?;
        }
        prepared.doc = Some(doc);
        Ok(prepared)
    }

    /// What [`validate_against_ports`] returns for this lab.
    pub fn summary(&self) -> &LabSummary {
        &self.summary
    }

    /// The lab YAML as given.
    pub fn yaml(&self) -> &str {
        &self.yaml
    }

    /// Whether [`PreparedLab::render`] is a proven text splice (the fast path); `false` means
    /// each render parses, substitutes and verifies.
    pub fn splices_in_place(&self) -> bool {
        self.doc.is_none()
    }

    /// The lab with `allocated` port numbers substituted; the same result as [`rewrite_ports`].
    ///
    /// Errors: [`CoreError::PortNotAllocated`] for a template port without a number,
    /// [`CoreError::Invalid`] (`allocated_ports`) for a number given to a port outside the
    /// template.
    pub fn render(&self, allocated: &BTreeMap<String, u16>) -> CoreResult<String> {
        self.render_detailed(allocated).map(|r| r.yaml)
    }

    /// [`PreparedLab::render`], also saying how the output was produced.
    pub fn render_detailed(&self, allocated: &BTreeMap<String, u16>) -> CoreResult<Rewritten> {
        let numbers = self.ports.numbers(allocated)?;
        match &self.doc {
            None => Ok(self.splice_rewritten(&numbers)),
            Some(doc) => self.render_checked(doc.clone(), &numbers),
        }
    }

    fn splice_rewritten(&self, numbers: &[String]) -> Rewritten {
        Rewritten {
            yaml: self.splice(numbers),
            mode: RewriteMode::InPlace,
            substitutions: self.summary.references.len(),
        }
    }

    /// The original text with the planned spans replaced by `numbers[port]`.
    fn splice(&self, numbers: &[String]) -> String {
        let edits = self.edits.as_deref().unwrap_or_default();
        let mut out = String::with_capacity(self.yaml.len() + 8 * edits.len());
        let mut last = 0;
        for edit in edits {
            out.push_str(&self.yaml[last..edit.start]);
            out.push_str(&numbers[edit.port]);
            last = edit.end;
        }
        out.push_str(&self.yaml[last..]);
        out
    }

    /// The slow path: substitute in the document, then use the in-place edit if it reads back
    /// as that document, else re-emit (and verify that too).
    fn render_checked(&self, mut doc: Value, numbers: &[String]) -> CoreResult<Rewritten> {
        let substitutions = self.summary.references.len();
        substitute_targets(&mut doc, &self.ports, numbers)?;
        if self.edits.is_some() {
            let spliced = self.splice(numbers);
            if parse(&spliced).is_ok_and(|reparsed| same(&reparsed, &doc)) {
                return Ok(Rewritten {
                    yaml: spliced,
                    mode: RewriteMode::InPlace,
                    substitutions,
                });
            }
        }
        let emitted = serde_yaml_ng::to_string(&doc).map_err(|e| {
            CoreError::InvalidLabYaml(format!("cannot re-emit the rewritten lab: {e}"))
        })?;
        match parse(&emitted) {
            Ok(reparsed) if same(&reparsed, &doc) => Ok(Rewritten {
                yaml: emitted,
                mode: RewriteMode::Reemitted,
                substitutions,
            }),
            _ => Err(CoreError::InvalidLabYaml(
                "the rewritten lab does not read back as the expected document".into(),
            )),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Ports
// ------------------------------------------------------------------------------------------

/// Port names and the placeholder names that resolve to them.
#[derive(Debug, Clone)]
struct PortIndex {
    names: Vec<String>,
    /// `PORT_SERIAL_1` and `SERIAL_1` → index into `names` (canonical form first).
    by_name: HashMap<String, usize>,
}

impl PortIndex {
    fn new(port_names: &[&str]) -> CoreResult<Self> {
        let mut canonical: HashMap<String, usize> = HashMap::with_capacity(port_names.len() * 2);
        for (i, name) in port_names.iter().enumerate() {
            let field = format!("port_template.ports[{i}].name");
            if name.is_empty() {
                return Err(CoreError::invalid(field, "a port name must not be empty"));
            }
            if let Some(bad) = name
                .chars()
                .find(|c| matches!(c, '$' | '{' | '}') || c.is_whitespace())
            {
                return Err(CoreError::invalid(
                    field,
                    format!("port name {name:?} must not contain {bad:?}"),
                ));
            }
            let key = format!("{CANONICAL_PREFIX}{}", name.to_uppercase());
            if let Some(&other) = canonical.get(&key) {
                return Err(CoreError::invalid(
                    field,
                    format!(
                        "port name {name:?} gives the same placeholder ${{{key}}} as port {:?}",
                        port_names[other]
                    ),
                ));
            }
            canonical.insert(key, i);
        }
        let mut by_name = canonical;
        for (i, name) in port_names.iter().enumerate() {
            by_name.entry(name.to_uppercase()).or_insert(i);
        }
        Ok(PortIndex {
            names: port_names.iter().map(|n| (*n).to_owned()).collect(),
            by_name,
        })
    }

    /// The port a placeholder name (between `${` and `}`) stands for.
    fn resolve(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The replacement text of each port, in template order.
    fn numbers(&self, allocated: &BTreeMap<String, u16>) -> CoreResult<Vec<String>> {
        if let Some(extra) = allocated.keys().find(|k| !self.names.contains(k)) {
            return Err(CoreError::invalid(
                "allocated_ports",
                format!("port {extra:?} is not in the port template"),
            ));
        }
        self.names
            .iter()
            .map(|name| {
                allocated
                    .get(name)
                    .map(u16::to_string)
                    .ok_or_else(|| CoreError::PortNotAllocated {
                        port_name: name.clone(),
                    })
            })
            .collect()
    }
}

/// Whether a rewritable field is sure to stay a string whatever digits replace its
/// placeholders: its literal text (outside the placeholders) has a character that no YAML null,
/// boolean, integer or float can contain (`:` in `serial:${PORT_SERIAL_1}`, a space, most
/// letters). Conservative superset of serde_yaml_ng 0.10's plain-scalar resolution (YAML 1.2
/// core schema plus Rust's float syntax, e.g. `inf`, `1e5`, `0x1F`, `0o17`, `~`).
fn literal_forces_string(text: &str, ports: &PortIndex) -> bool {
    let mut last = 0;
    let literal_forces = |part: &str| {
        part.chars().any(|c| {
            !(c.is_ascii_digit()
                || "+-._~".contains(c)
                || "abcdefilnorstuxyABCDEFILNORSTUXY".contains(c))
        })
    };
    for (start, end, _) in known_occurrences(text, ports) {
        if literal_forces(&text[last..start]) {
            return true;
        }
        last = end;
    }
    literal_forces(&text[last..])
}

// ------------------------------------------------------------------------------------------
// Document shape
// ------------------------------------------------------------------------------------------

fn parse(yaml: &str) -> CoreResult<Value> {
    serde_yaml_ng::from_str(yaml)
        .map_err(|e| CoreError::InvalidLabYaml(format!("not valid YAML: {e}")))
}

/// A rewritable field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    AnnotationTag(usize),
    AnnotationLabel(usize),
    NodeTag { node: usize, tag: usize },
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::AnnotationTag(i) => write!(f, "smart_annotations[{i}].tag"),
            Field::AnnotationLabel(i) => write!(f, "smart_annotations[{i}].label"),
            Field::NodeTag { node, tag } => write!(f, "nodes[{node}].tags[{tag}]"),
        }
    }
}

/// The parts of a lab the rewrite cares about, borrowed from the parsed document.
struct Lab<'a> {
    node_count: usize,
    title: Option<&'a str>,
    /// Rewritable fields that contain `${`, in document order.
    targets: Vec<(Field, &'a str)>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn shape_error(location: impl fmt::Display, expected: &str, found: &Value) -> CoreError {
    CoreError::InvalidLabYaml(format!(
        "{location}: expected {expected}, found {}",
        kind(found)
    ))
}

/// A rewritable scalar: strings are returned; other plain scalars hold no placeholder and are
/// left alone; collections and tagged values are refused.
fn target_text(v: &Value, field: Field) -> CoreResult<Option<&str>> {
    match v {
        Value::String(s) => Ok(Some(s)),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(None),
        other => Err(shape_error(field, "a string", other)),
    }
}

/// An optional list: absent or null is empty.
fn optional_seq<'a>(
    map: &'a Mapping,
    key: &str,
    location: impl fmt::Display,
) -> CoreResult<&'a [Value]> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Sequence(items)) => Ok(items),
        Some(other) => Err(shape_error(location, "a sequence", other)),
    }
}

/// Checks the shape of a CML lab and collects its rewritable fields that contain `${`.
///
/// The shape rules here and the walks of [`plan_occurrences`] and [`substitute_targets`] must
/// agree on what a rewritable field is; they do, because the latter two only run on documents
/// this accepted and follow the same keys.
fn inspect(doc: &Value) -> CoreResult<Lab<'_>> {
    let root = match doc {
        Value::Mapping(m) => m,
        Value::Null => {
            return Err(CoreError::InvalidLabYaml(
                "the document is empty; expected a CML lab (a mapping with `nodes`)".into(),
            ));
        }
        other => {
            return Err(shape_error(
                "the document root",
                "a mapping (a CML lab)",
                other,
            ));
        }
    };
    let mut targets = Vec::new();

    for (i, annotation) in optional_seq(root, "smart_annotations", "smart_annotations")?
        .iter()
        .enumerate()
    {
        let Value::Mapping(annotation) = annotation else {
            return Err(shape_error(
                format_args!("smart_annotations[{i}]"),
                "a mapping",
                annotation,
            ));
        };
        // In the annotation's own key order, so `uses` follow the file.
        for (key, v) in annotation {
            let field = match key {
                Value::String(k) if k == "tag" => Field::AnnotationTag(i),
                Value::String(k) if k == "label" => Field::AnnotationLabel(i),
                _ => continue,
            };
            if let Some(text) = target_text(v, field)?
                && text.contains(OPEN)
            {
                targets.push((field, text));
            }
        }
    }

    let nodes = match root.get("nodes") {
        Some(Value::Sequence(nodes)) => nodes,
        Some(other) => return Err(shape_error("nodes", "a sequence", other)),
        None => {
            return Err(CoreError::InvalidLabYaml(
                "nodes: missing; a CML lab has a `nodes` sequence".into(),
            ));
        }
    };
    for (n, node) in nodes.iter().enumerate() {
        let Value::Mapping(node) = node else {
            return Err(shape_error(format_args!("nodes[{n}]"), "a mapping", node));
        };
        for (t, tag) in optional_seq(node, "tags", format_args!("nodes[{n}].tags"))?
            .iter()
            .enumerate()
        {
            let field = Field::NodeTag { node: n, tag: t };
            if let Some(text) = target_text(tag, field)?
                && text.contains(OPEN)
            {
                targets.push((field, text));
            }
        }
    }

    let title = match root.get("lab") {
        Some(Value::Mapping(lab)) => match lab.get("title") {
            Some(Value::String(title)) => Some(title.as_str()),
            _ => None,
        },
        _ => None,
    };

    // Document order: put the fields in the order their sections appear in the file.
    let annotations_first = root
        .keys()
        .filter_map(|k| match k {
            Value::String(k) if k == "smart_annotations" || k == "nodes" => Some(k.as_str()),
            _ => None,
        })
        .next()
        != Some("nodes");
    if !annotations_first {
        targets.sort_by_key(|(field, _)| !matches!(field, Field::NodeTag { .. }));
    }

    Ok(Lab {
        node_count: nodes.len(),
        title,
        targets,
    })
}

/// The `${...}` spans of a rewritable field, as byte ranges; an unterminated `${` is an error.
fn placeholder_spans(
    field: Field,
    text: &str,
) -> impl Iterator<Item = CoreResult<(usize, usize)>> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let start = pos + text.get(pos..)?.find(OPEN)?;
        match text[start + OPEN.len()..].find('}') {
            Some(close) => {
                let end = start + OPEN.len() + close + 1;
                pos = end;
                Some(Ok((start, end)))
            }
            None => {
                pos = text.len();
                Some(Err(CoreError::InvalidLabYaml(format!(
                    "{field}: unterminated placeholder {:?} (no closing '}}')",
                    &text[start..]
                ))))
            }
        }
    })
}

/// Occurrences of *known* placeholders in any text: `(start, end, port index)`. A `${` that does
/// not open a known placeholder is skipped. Used identically on scalars of the parsed document
/// and on the raw file text, so the two sequences can be lined up.
fn known_occurrences<'t>(
    text: &'t str,
    index: &'t PortIndex,
) -> impl Iterator<Item = (usize, usize, usize)> + 't {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        loop {
            let start = pos + text.get(pos..)?.find(OPEN)?;
            let name_start = start + OPEN.len();
            let found = text[name_start..].find('}').and_then(|close| {
                let end = name_start + close;
                index
                    .resolve(&text[name_start..end])
                    .map(|port| (end + 1, port))
            });
            match found {
                Some((end, port)) => {
                    pos = end;
                    return Some((start, end, port));
                }
                None => pos = name_start,
            }
        }
    })
}

/// Where a value sits, for telling rewritable fields from the rest in a whole-document walk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Root,
    Annotations,
    Annotation,
    Nodes,
    Node,
    Tags,
    Target,
    Other,
}

/// Walks the whole document in document order (keys before values, sequences in order) and
/// records, for each occurrence of a known placeholder in any string, its port and whether it is
/// in a rewritable field.
fn plan_occurrences(v: &Value, ctx: Ctx, index: &PortIndex, out: &mut Vec<(usize, bool)>) {
    match v {
        Value::String(s) => {
            if s.contains(OPEN) {
                let target = ctx == Ctx::Target;
                out.extend(known_occurrences(s, index).map(|(_, _, port)| (port, target)));
            }
        }
        Value::Sequence(items) => {
            let child = match ctx {
                Ctx::Annotations => Ctx::Annotation,
                Ctx::Nodes => Ctx::Node,
                Ctx::Tags => Ctx::Target,
                _ => Ctx::Other,
            };
            for item in items {
                plan_occurrences(item, child, index, out);
            }
        }
        Value::Mapping(map) => {
            for (key, value) in map {
                plan_occurrences(key, Ctx::Other, index, out);
                let child = match (ctx, key) {
                    (Ctx::Root, Value::String(k)) if k == "smart_annotations" => Ctx::Annotations,
                    (Ctx::Root, Value::String(k)) if k == "nodes" => Ctx::Nodes,
                    (Ctx::Annotation, Value::String(k)) if k == "tag" || k == "label" => {
                        Ctx::Target
                    }
                    (Ctx::Node, Value::String(k)) if k == "tags" => Ctx::Tags,
                    _ => Ctx::Other,
                };
                plan_occurrences(value, child, index, out);
            }
        }
        Value::Tagged(tagged) => plan_occurrences(&tagged.value, Ctx::Other, index, out),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Replaces the placeholders of one string.
fn substitute(text: &str, index: &PortIndex, numbers: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end, port) in known_occurrences(text, index) {
        out.push_str(&text[last..start]);
        out.push_str(&numbers[port]);
        last = end;
    }
    out.push_str(&text[last..]);
    out
}

/// Applies the substitution to the rewritable fields of a document [`inspect`] accepted.
fn substitute_targets(doc: &mut Value, index: &PortIndex, numbers: &[String]) -> CoreResult<()> {
    let Value::Mapping(root) = doc else {
        return Err(CoreError::InvalidLabYaml(
            "the document root: expected a mapping".into(),
        ));
    };
    let mut fix = |v: &mut Value| {
        if let Value::String(s) = v
            && s.contains(OPEN)
        {
            *s = substitute(s, index, numbers);
        }
    };
    if let Some(Value::Sequence(annotations)) = root.get_mut("smart_annotations") {
        for annotation in annotations {
            if let Value::Mapping(annotation) = annotation {
                for key in ["tag", "label"] {
                    if let Some(v) = annotation.get_mut(key) {
                        fix(v);
                    }
                }
            }
        }
    }
    if let Some(Value::Sequence(nodes)) = root.get_mut("nodes") {
        for node in nodes {
            if let Value::Mapping(node) = node
                && let Some(Value::Sequence(tags)) = node.get_mut("tags")
            {
                tags.iter_mut().for_each(&mut fix);
            }
        }
    }
    Ok(())
}

/// The spans of the raw text to replace: the known placeholders the plan marks as rewritable,
/// provided the text's occurrences line up one for one with the document's. `None` when they
/// do not (a placeholder in a comment, an alias, an escape...).
fn align_edits(yaml: &str, ports: &PortIndex, plan: &[(usize, bool)]) -> Option<Vec<Edit>> {
    let mut edits = Vec::new();
    let mut planned = plan.iter();
    for (start, end, port) in known_occurrences(yaml, ports) {
        let &(planned_port, target) = planned.next()?;
        if planned_port != port {
            return None;
        }
        if target {
            edits.push(Edit { start, end, port });
        }
    }
    if planned.next().is_some() {
        return None;
    }
    Some(edits)
}

/// Structural equality that, unlike `Value`'s `PartialEq`, also requires mapping keys in the
/// same order. Numbers compare by kind and value (NaN equals NaN, `1` differs from `1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => x == y,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Sequence(x), Value::Sequence(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Mapping(x), Value::Mapping(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| same(kx, ky) && same(vx, vy))
        }
        (Value::Tagged(x), Value::Tagged(y)) => x.tag == y.tag && same(&x.value, &y.value),
        _ => false,
    }
}
