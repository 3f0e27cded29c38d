//! DefinitionService: versioned, immutable lablet definitions (domain.md §1.1, FR-2.1.*).
//!
//! # Identity and storage
//!
//! A definition is a *lineage* (a stable UUID, `LabletDefinition.id`) of immutable *versions*
//! (domain.md §11.14). Each version is one store document with id `<lineage>@<version>`
//! ([`crate::repo::definition_doc_id`]) holding the whole `ccm.v1.LabletDefinition`, including
//! the cached lab YAML (returned only by `GetDefinition` with `include_lab_yaml`, never in
//! lists).
//!
//! Uniqueness is kept by store claims, so it holds under concurrent creates:
//!
//! | claim namespace | key | held by |
//! |---|---|---|
//! | [`CLAIM_NAME_VERSION`] | `<name>@<version>` | every version |
//! | [`CLAIM_NAME`] | `<name>` | the first version of a lineage: a name belongs to one lineage for good |
//! | [`CLAIM_CREATE_REQUEST`] | `<caller subject>/<request_id>` | the version a `CreateDefinition` with an idempotency key created |
//!
//! `CreateDefinition` always starts a new lineage (definition.proto: "a new lineage with its
//! first version"); a taken `(name, version)` — or a name that already belongs to another
//! lineage — is `ALREADY_EXISTS`. New versions of a lineage come only from `SyncDefinition`.
//! Documents are never removed: deleted versions keep their claims, so a name and a
//! `(name, version)` are never reused.
//!
//! # Validation of the lab artifact
//!
//! Create and Sync fetch the artifact ([`crate::app::App::fetcher`]) and lint it with the same
//! rules `ValidateDefinition` reports as findings ([`lint_lab`]):
//!
//! | code | severity | when |
//! |---|---|---|
//! | `yaml.empty`, `yaml.too_large`, `yaml.encoding`, `yaml.parse` | ERROR | not a CML lab YAML of at most 4 MiB (and small enough to cache in the definition document: [`MAX_CACHED_LAB_YAML_JSON_BYTES`] once JSON-escaped) |
//! | `port.placeholder_unknown` | ERROR | a `${…}` in a node tag or smart annotation names no port of the template (path = its YAML location) |
//! | `port.unused` | WARNING | a port of the template is never referenced (its instances will hold a port nothing uses; accepted, as definition.proto says) |
//! | `port.name_invalid` | ERROR | a port name is not lower snake case or is duplicated (ValidateDefinition only; Create refuses it as a field violation) |
//! | `nodes.count_mismatch` | ERROR / WARNING | `node_count` below the topology's node count (capacity would be under-reserved) / above it (over-reserved) |
//! | `license.personal_node_limit` | ERROR / WARNING | more than 20 nodes with PERSONAL as the only licence / with PERSONAL among others (PERSONAL workers will never take it; domain.md §11.16) |
//!
//! Errors fail Create and Sync with `INVALID_ARGUMENT`: a YAML problem on `definition.lab_yaml`
//! (Sync: `lab_yaml`) with its location in the description, a node count problem on
//! `definition.node_count`.
//! Warnings are returned in the response's `findings`.
//!
//! An artifact that cannot be fetched maps as [`crate::error`] documents: an unusable URI is
//! `INVALID_ARGUMENT` on `definition.lab_artifact_uri`, a missing or forbidden object is
//! `FAILED_PRECONDITION` (the request is fine, the artifact is not there), an unreachable
//! source is `UNAVAILABLE`.
//!
//! # Listing
//!
//! `ListDefinitions` orders by name, then version descending, as the contract says. The store
//! orders by creation, slot or version only, so the handler reads the definitions whose status
//! matches (all pages), keeps the highest version of each lineage unless `all_versions`, applies
//! the name and licence filters, sorts, and pages in memory with a keyset cursor
//! `(name, version, document id)` in the page token. That is exact (no duplicates or gaps across
//! pages, `total_size` exact) and costs one scan of the catalogue per page — fine for a
//! catalogue of hundreds of definitions; an index on name would be the next step beyond that.
//! "Latest per lineage" means the highest version among the versions whose status the request
//! asks for (ACTIVE and DEPRECATED by default), so a lineage whose newest version was deleted
//! lists its newest remaining one.
//!
//! `SyncDefinition` compares the hash of the latest version that is not DELETED; a changed
//! artifact becomes a new ACTIVE version (even when the latest was DEPRECATED: syncing is a
//! deliberate publication) whose number is PATCH + 1 of the highest version ever created
//! (deleted ones included, their `(name, version)` stays taken), or the caller's `new_version`,
//! which must be greater than that. Everything but the artifact (resources, ports, licences,
//! node count, …) is carried over from the latest version; the new artifact must pass the same
//! lint against them. The same content at a new `lab_artifact_uri` is not a change.
//!
//! `ListDefinitionVersions` is a plain store query (lineage, status, `VersionDesc` — numeric
//! semver order through the zero-padded `version_key`) paged by the store's own keyset token.
//!
//! # Deprecate and delete
//!
//! Both are status changes (documents are kept for the instances that pin them). Delete is
//! refused with `FAILED_PRECONDITION` (`IN_USE`) while an instance of the lineage is not
//! TERMINATED; the check is a `GuardNoneMatch` in the same transaction as the status change, so
//! an instance created concurrently cannot slip in between. Instances are indexed by lineage,
//! not by version, so the guard is per lineage: deleting one version is refused while any
//! version of the lineage has a live instance (conservative).

use std::collections::HashMap;

use ccm_core::CoreError;
use ccm_core::defaults::PERSONAL_LICENSE_MAX_NODES;
use ccm_core::labyaml;
use ccm_core::model::LicenseType;
use ccm_core::version::{Version, content_hash, next_version_on_sync};
use ccm_proto::v1 as pb;
use ccm_proto::v1::definition_service_server::{DefinitionService, DefinitionServiceServer};
use ccm_store::{Claim, ClaimChange, Filter, IndexField, Kind, Query};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::app::App;
use crate::convert::{self, timestamp_to_proto};
use crate::error::ApiError;
use crate::paging::{self, PageKind};
use crate::record::{AuditFacts, Mutation};
use crate::repo::{decode, definition_doc_id, version_key};
use crate::server::request_id;
use crate::services::{Scope, caller_of};
use crate::validate::{self, MAX_LAB_YAML_BYTES, Violations, index_path, join_path};

/// Claim namespace making `(name, version)` unique; key `<name>@<version>`.
pub const CLAIM_NAME_VERSION: &str = "definition_name_version";
/// Claim namespace binding a name to one lineage; key `<name>`, held by the lineage's first
/// version.
pub const CLAIM_NAME: &str = "definition_name";
/// Claim namespace of `CreateDefinitionRequest.request_id`; key `<caller subject>/<request_id>`.
pub const CLAIM_CREATE_REQUEST: &str = "definition_create_request";
/// Longest `max_duration` a definition may declare (sanity bound: 31 days).
pub const MAX_SESSION_MINUTES: u32 = 31 * 24 * 60;
/// Most e-mail addresses in `owner_notification.emails`.
pub const MAX_NOTIFICATION_EMAILS: usize = 20;
/// Longest e-mail address (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;
/// Documents read per store page when a handler scans a lineage or the catalogue.
pub const SCAN_PAGE_SIZE: u32 = ccm_store::MAX_PAGE_SIZE;
/// Largest protobuf enum number the live-state lists look at (every defined state is below).
const MAX_ENUM_NUMBER: i32 = 64;
/// Room left in a stored definition document for everything but the cached lab YAML.
pub const DEFINITION_DOC_OVERHEAD_BYTES: usize = 64 * 1024;
/// Longest cached lab YAML once escaped as a JSON string: the store's document limit minus
/// [`DEFINITION_DOC_OVERHEAD_BYTES`]. (JSON escaping grows quote- and newline-heavy text, so a
/// YAML under [`MAX_LAB_YAML_BYTES`] can still be too large to store.)
pub const MAX_CACHED_LAB_YAML_JSON_BYTES: usize =
    ccm_store::MAX_BODY_BYTES - DEFINITION_DOC_OVERHEAD_BYTES;

/// Finding code: the YAML is empty.
pub const CODE_YAML_EMPTY: &str = "yaml.empty";
/// Finding code: the YAML is larger than [`MAX_LAB_YAML_BYTES`].
pub const CODE_YAML_TOO_LARGE: &str = "yaml.too_large";
/// Finding code: the artifact is not UTF-8 text.
pub const CODE_YAML_ENCODING: &str = "yaml.encoding";
/// Finding code: the YAML does not parse as a CML lab.
pub const CODE_YAML_PARSE: &str = "yaml.parse";
/// Finding code: a placeholder names no port of the template.
pub const CODE_PLACEHOLDER_UNKNOWN: &str = "port.placeholder_unknown";
/// Finding code: a port of the template is never referenced.
pub const CODE_PORT_UNUSED: &str = "port.unused";
/// Finding code: a port name is invalid or duplicated.
pub const CODE_PORT_NAME_INVALID: &str = "port.name_invalid";
/// Finding code: the declared node count differs from the topology's.
pub const CODE_NODES_COUNT_MISMATCH: &str = "nodes.count_mismatch";
/// Finding code: more nodes than a PERSONAL licence allows.
pub const CODE_PERSONAL_NODE_LIMIT: &str = "license.personal_node_limit";

/// Audit action of CreateDefinition.
pub const ACTION_CREATE: &str = "definition.create";
/// Audit action of a SyncDefinition that created a version.
pub const ACTION_SYNC: &str = "definition.sync";
/// Audit action of DeprecateDefinition.
pub const ACTION_DEPRECATE: &str = "definition.deprecate";
/// Audit action of DeleteDefinition.
pub const ACTION_DELETE: &str = "definition.delete";

const METHOD_CREATE: &str = "/ccm.v1.DefinitionService/CreateDefinition";
const METHOD_SYNC: &str = "/ccm.v1.DefinitionService/SyncDefinition";
const METHOD_DEPRECATE: &str = "/ccm.v1.DefinitionService/DeprecateDefinition";
const METHOD_DELETE: &str = "/ccm.v1.DefinitionService/DeleteDefinition";

/// The DefinitionService implementation.
#[derive(Debug, Clone)]
pub struct Definitions {
    app: App,
}

/// The tonic server for [`Definitions`].
pub fn server(app: App) -> DefinitionServiceServer<Definitions> {
    DefinitionServiceServer::new(Definitions { app })
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// The `INVALID_ARGUMENT` of a collector known to hold violations.
fn failure(v: Violations) -> ApiError {
    match v.into_result() {
        Err(e) => e,
        Ok(()) => ApiError::internal_msg("validation failed without a violation"),
    }
}

fn status_name(s: pb::DefinitionStatus) -> String {
    s.as_str_name().to_owned()
}

/// Statuses a lineage shows by default (DELETED hidden).
fn visible_statuses() -> Vec<String> {
    vec![
        status_name(pb::DefinitionStatus::Active),
        status_name(pb::DefinitionStatus::Deprecated),
    ]
}

/// Instance states that still use a definition: every state but TERMINATED (unset included,
/// to be safe).
pub fn live_instance_states() -> Vec<&'static str> {
    (0..=MAX_ENUM_NUMBER)
        .filter_map(|n| pb::InstanceState::try_from(n).ok())
        .filter(|s| *s != pb::InstanceState::Terminated)
        .map(|s| s.as_str_name())
        .collect()
}

/// The guard filters "an instance of lineage `id` that is not TERMINATED".
fn live_instances_of(id: &str) -> Vec<Filter> {
    vec![
        Filter::eq(IndexField::DefinitionId, id),
        Filter::any_of(IndexField::State, live_instance_states()),
    ]
}

fn struct_of(pairs: &[(&str, String)]) -> prost_types::Struct {
    prost_types::Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(v.clone())),
                    },
                )
            })
            .collect(),
    }
}

/// The definition as returned to clients: the cached YAML only when asked for.
fn present(mut d: pb::LabletDefinition, include_lab_yaml: bool) -> pb::LabletDefinition {
    if !include_lab_yaml {
        d.lab_yaml.clear();
    }
    d
}

/// The lineage part of a definition document id (`<lineage>@<version>`).
fn lineage_of(doc_id: &str) -> &str {
    doc_id.split_once('@').map_or(doc_id, |(id, _)| id)
}

fn version_of(d: &pb::LabletDefinition) -> Option<Version> {
    d.version.parse().ok()
}

/// Licence types of a stored definition (unknown numbers skipped: they were validated on
/// create).
fn affinity_of(d: &pb::LabletDefinition) -> Vec<LicenseType> {
    d.license_affinity
        .iter()
        .filter_map(|raw| convert::license_type_from_proto(*raw, "").ok())
        .collect()
}

/// Every version of lineage `id` whose status is in `statuses` (all when `None`), newest first.
async fn lineage_versions(
    app: &App,
    id: &str,
    statuses: Option<Vec<String>>,
) -> Result<Vec<pb::LabletDefinition>, ApiError> {
    let mut query = Query::new(Kind::Definition)
        .with_filter(Filter::eq(IndexField::DefinitionId, id))
        .ordered_by(ccm_store::Order::VersionDesc)
        .with_page_size(SCAN_PAGE_SIZE);
    if let Some(statuses) = statuses {
        query = query.with_filter(Filter::any_of(IndexField::State, statuses));
    }
    scan(app, query).await
}

/// Every document a query matches, through all its pages.
async fn scan(app: &App, query: Query) -> Result<Vec<pb::LabletDefinition>, ApiError> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = app.store.list(query.clone().after(token)).await?;
        for doc in &page.items {
            out.push(decode::<pb::LabletDefinition>(doc)?);
        }
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => return Ok(out),
        }
    }
}

/// The latest version of lineage `id` that is not DELETED.
async fn latest_visible(app: &App, id: &str) -> Result<Option<pb::LabletDefinition>, ApiError> {
    let query = Query::new(Kind::Definition)
        .with_filter(Filter::eq(IndexField::DefinitionId, id))
        .with_filter(Filter::any_of(IndexField::State, visible_statuses()))
        .ordered_by(ccm_store::Order::VersionDesc)
        .with_page_size(1);
    let page = app.store.list(query).await?;
    page.items.first().map(decode).transpose()
}

/// The URI policy for artifact URIs under the application settings.
fn uri_policy(app: &App) -> validate::UriPolicy {
    if app.settings.allow_http_artifacts {
        validate::UriPolicy::ARTIFACT_ALLOW_HTTP
    } else {
        validate::UriPolicy::ARTIFACT
    }
}

/// Checks `owner_notification.emails` (the webhook is checked by the conversion): at most
/// [`MAX_NOTIFICATION_EMAILS`], each `local@domain`, ≤ [`MAX_EMAIL_LEN`], printable ASCII
/// without spaces.
fn check_emails(v: &mut Violations, field: &str, n: Option<&pb::NotificationConfig>) {
    let Some(n) = n else { return };
    let emails_field = join_path(field, "emails");
    if n.emails.len() > MAX_NOTIFICATION_EMAILS {
        v.add(
            &emails_field,
            format!(
                "at most {MAX_NOTIFICATION_EMAILS} addresses are allowed, got {}",
                n.emails.len()
            ),
        );
    }
    for (i, email) in n.emails.iter().enumerate() {
        let path = index_path(&emails_field, i);
        let well_formed = email.len() <= MAX_EMAIL_LEN
            && email.bytes().all(|b| b.is_ascii_graphic())
            && email
                .split_once('@')
                .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
        if !well_formed {
            v.add(
                path,
                format!(
                    "must be an e-mail address (local@domain, at most {MAX_EMAIL_LEN} characters)"
                ),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lab linting
// ---------------------------------------------------------------------------------------------

/// One problem found in a lab YAML and its port template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How serious.
    pub severity: pb::FindingSeverity,
    /// Stable code (`CODE_*`).
    pub code: &'static str,
    /// `ValidationFinding.path`: a YAML location or a request field path; empty when global.
    pub path: String,
    /// The request field it is about, relative to the definition (`lab_yaml`, `node_count`,
    /// `port_template.ports[1].name`, `license_affinity`), for field violations.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Finding {
    fn new(
        severity: pb::FindingSeverity,
        code: &'static str,
        path: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Finding {
        Finding {
            severity,
            code,
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn is_error(&self) -> bool {
        self.severity == pb::FindingSeverity::Error
    }

    /// The contract's form.
    pub fn to_proto(&self) -> pb::ValidationFinding {
        pb::ValidationFinding {
            severity: self.severity as i32,
            code: self.code.to_owned(),
            path: self.path.clone(),
            message: self.message.clone(),
        }
    }
}

/// What [`lint_lab`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabLint {
    /// Every finding, errors first.
    pub findings: Vec<Finding>,
    /// `len(nodes)` when the YAML parsed.
    pub detected_nodes: Option<usize>,
    /// Port names the placeholders refer to, in document order, without duplicates.
    pub placeholders: Vec<String>,
}

impl LabLint {
    /// `true` when there is no ERROR finding.
    pub fn is_valid(&self) -> bool {
        !self.findings.iter().any(Finding::is_error)
    }

    /// The ERROR findings as field violations under `prefix` (`definition` on create).
    fn violations(&self, prefix: &str) -> Violations {
        let mut v = Violations::new();
        for f in self.findings.iter().filter(|f| f.is_error()) {
            v.add(join_path(prefix, &f.field), f.message.clone());
        }
        v
    }

    /// The non-error findings, for a response.
    fn warnings(&self) -> Vec<pb::ValidationFinding> {
        self.findings
            .iter()
            .filter(|f| !f.is_error())
            .map(Finding::to_proto)
            .collect()
    }
}

/// The port a placeholder name (`PORT_SERIAL_1`, `SERIAL_1`) refers to: the template port it
/// resolves to (canonical form first), else the name with `PORT_` removed, lower-cased.
fn placeholder_port_name(name: &str, ports: &[&str]) -> String {
    let canonical = ports
        .iter()
        .find(|p| name.strip_prefix("PORT_") == Some(p.to_uppercase().as_str()));
    let bare = ports.iter().find(|p| name == p.to_uppercase());
    match canonical.or(bare) {
        Some(p) => (*p).to_owned(),
        None => name.strip_prefix("PORT_").unwrap_or(name).to_lowercase(),
    }
}

/// Lints a lab YAML against a port template (`ports`; `None` when the template's names are
/// themselves invalid, which skips the placeholder ↔ port checks), a declared node count (0
/// skips the comparison) and a licence affinity. See the module docs for the codes.
pub fn lint_lab(
    yaml: &str,
    ports: Option<&[&str]>,
    declared_nodes: u32,
    affinity: &[LicenseType],
) -> LabLint {
    use pb::FindingSeverity::{Error, Warning};
    let mut lint = LabLint::default();
    let findings = &mut lint.findings;
    if yaml.trim().is_empty() {
        findings.push(Finding::new(
            Error,
            CODE_YAML_EMPTY,
            "",
            "lab_yaml",
            "the lab YAML is empty",
        ));
    } else if yaml.len() > MAX_LAB_YAML_BYTES {
        findings.push(Finding::new(
            Error,
            CODE_YAML_TOO_LARGE,
            "",
            "lab_yaml",
            format!(
                "the lab YAML is {} bytes; at most {MAX_LAB_YAML_BYTES} bytes are accepted",
                yaml.len()
            ),
        ));
    } else if let Some(escaped) = json_escaped_len(yaml)
        && escaped > MAX_CACHED_LAB_YAML_JSON_BYTES
    {
        findings.push(Finding::new(
            Error,
            CODE_YAML_TOO_LARGE,
            "",
            "lab_yaml",
            format!(
                "the lab YAML takes {escaped} bytes once stored (JSON-escaped); at most \
                 {MAX_CACHED_LAB_YAML_JSON_BYTES} bytes can be kept with the definition"
            ),
        ));
    } else {
        match labyaml::scan_placeholders(yaml) {
            Err(e) => {
                let message = match e {
                    CoreError::InvalidLabYaml(why) => format!("invalid lab YAML: {why}"),
                    other => format!("invalid lab YAML: {other}"),
                };
                findings.push(Finding::new(
                    Error,
                    CODE_YAML_PARSE,
                    "",
                    "lab_yaml",
                    message,
                ));
            }
            Ok(scan) => {
                lint.detected_nodes = Some(scan.node_count);
                let names = ports.unwrap_or(&[]);
                for u in &scan.uses {
                    let port = placeholder_port_name(u.name(), names);
                    if !lint.placeholders.contains(&port) {
                        lint.placeholders.push(port);
                    }
                }
                if let Some(ports) = ports {
                    for problem in scan.port_problems(ports) {
                        findings.push(port_finding(problem, ports));
                    }
                }
                if declared_nodes > 0 {
                    let detected = scan.node_count;
                    let declared = usize::try_from(declared_nodes).unwrap_or(usize::MAX);
                    if declared < detected {
                        findings.push(Finding::new(
                            Error,
                            CODE_NODES_COUNT_MISMATCH,
                            "node_count",
                            "node_count",
                            format!(
                                "declares {declared} nodes but the lab topology has {detected}; \
                                 node_count must cover every node of the topology"
                            ),
                        ));
                    } else if declared > detected {
                        findings.push(Finding::new(
                            Warning,
                            CODE_NODES_COUNT_MISMATCH,
                            "node_count",
                            "node_count",
                            format!(
                                "declares {declared} nodes but the lab topology has {detected}; \
                                 capacity for {declared} nodes is reserved per instance"
                            ),
                        ));
                    }
                }
            }
        }
    }
    let nodes = if declared_nodes > 0 {
        u64::from(declared_nodes)
    } else {
        lint.detected_nodes
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0)
    };
    if nodes > u64::from(PERSONAL_LICENSE_MAX_NODES) && affinity.contains(&LicenseType::Personal) {
        let only_personal = affinity.iter().all(|l| *l == LicenseType::Personal);
        let (severity, message) = if only_personal {
            (
                Error,
                format!(
                    "{nodes} nodes exceed the PERSONAL licence limit of \
                     {PERSONAL_LICENSE_MAX_NODES}; add ENTERPRISE or EVALUATION"
                ),
            )
        } else {
            (
                Warning,
                format!(
                    "{nodes} nodes exceed the PERSONAL licence limit of \
                     {PERSONAL_LICENSE_MAX_NODES}; PERSONAL workers will never run it"
                ),
            )
        };
        lint.findings.push(Finding::new(
            severity,
            CODE_PERSONAL_NODE_LIMIT,
            "license_affinity",
            "license_affinity",
            message,
        ));
    }
    lint.findings
        .sort_by_key(|f| std::cmp::Reverse(f.severity as i32));
    lint
}

/// Length of `text` as a JSON string literal (how the store keeps the cached YAML).
fn json_escaped_len(text: &str) -> Option<usize> {
    serde_json::to_string(text).ok().map(|s| s.len())
}

fn port_finding(problem: CoreError, ports: &[&str]) -> Finding {
    use pb::FindingSeverity::{Error, Warning};
    match problem {
        CoreError::UnknownPlaceholder {
            placeholder,
            location,
        } => Finding::new(
            Error,
            CODE_PLACEHOLDER_UNKNOWN,
            location.clone(),
            "lab_yaml",
            format!(
                "unknown port placeholder {placeholder} at {location}: no port of the port \
                 template has this name"
            ),
        ),
        CoreError::PortWithoutPlaceholder { port_name } => {
            let path = ports
                .iter()
                .position(|p| *p == port_name)
                .map(|i| join_path(&index_path("port_template.ports", i), "name"))
                .unwrap_or_else(|| "port_template.ports".to_owned());
            // Suspicious but accepted (definition.proto's example of a WARNING).
            Finding::new(
                Warning,
                CODE_PORT_UNUSED,
                path.clone(),
                path,
                format!(
                    "port {port_name:?} is not referenced by any placeholder in the lab YAML \
                     (expected {} in a node tag or smart annotation)",
                    labyaml::placeholder_for(&port_name)
                ),
            )
        }
        CoreError::Invalid { message, .. } => Finding::new(
            Error,
            CODE_PORT_NAME_INVALID,
            "port_template.ports",
            "port_template.ports",
            message,
        ),
        other => Finding::new(Error, CODE_YAML_PARSE, "", "lab_yaml", other.to_string()),
    }
}

/// The artifact's text, or the finding why it has none.
fn artifact_text(artifact: &ccm_artifacts::Artifact) -> Result<&str, Finding> {
    artifact.text().ok_or_else(|| {
        Finding::new(
            pb::FindingSeverity::Error,
            CODE_YAML_ENCODING,
            "",
            "lab_yaml",
            format!(
                "the artifact {} is not UTF-8 text",
                ccm_artifacts::redact_uri(&artifact.uri)
            ),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

impl Definitions {
    async fn create(
        &self,
        scope: Scope,
        rid: Option<String>,
        req: pb::CreateDefinitionRequest,
    ) -> Result<pb::CreateDefinitionResponse, ApiError> {
        let mut v = Violations::new();
        let key = validate::idempotency_key(&mut v, "request_id", &req.request_id)
            .flatten()
            .map(str::to_owned);
        let Some(mut input) = req.definition else {
            v.add("definition", "is required");
            return Err(failure(v));
        };
        // Output-only fields are ignored (definition.proto).
        input.id.clear();
        input.lab_yaml_hash.clear();
        input.lab_yaml.clear();
        input.status = 0;
        input.status_reason.clear();
        input.created_at = None;
        input.created_by.clear();
        input.updated_at = None;
        input.resource_version = 0;
        let core = v.absorb(convert::definition_input_from_proto(
            &input,
            "definition",
            uri_policy(&self.app),
        ));
        if let Some(core) = &core
            && core.max_duration_minutes > MAX_SESSION_MINUTES
        {
            v.add(
                "definition.max_duration",
                format!(
                    "must be at most {MAX_SESSION_MINUTES} minutes, got {}",
                    core.max_duration_minutes
                ),
            );
        }
        check_emails(
            &mut v,
            "definition.owner_notification",
            input.owner_notification.as_ref(),
        );
        v.into_result()?;
        let core = core.ok_or_else(|| ApiError::internal_msg("definition not converted"))?;
        let version = core.version.to_string();
        let name = core.name.clone();
        let name_version = format!("{name}@{version}");
        tracing::Span::current().record("name", name.as_str());

        let request_claim = key.map(|k| {
            Claim::new(
                CLAIM_CREATE_REQUEST,
                format!("{}/{k}", scope.caller.subject),
            )
        });
        if let Some(claim) = &request_claim
            && let Some(holder) = self.app.store.claim_holder(claim).await?
        {
            return self.replay(&holder.id, &name, &version).await;
        }
        self.check_name_free(&name, &name_version).await?;

        let artifact = self
            .app
            .fetcher
            .fetch(&input.lab_artifact_uri)
            .await
            .map_err(|e| ApiError::from(e).under("definition"))?;
        let text = artifact_text(&artifact)
            .map_err(|f| ApiError::invalid_argument("definition.lab_artifact_uri", f.message))?;
        let port_names: Vec<&str> = core.port_template.iter().map(|p| p.name.as_str()).collect();
        let lint = lint_lab(
            text,
            Some(&port_names),
            core.node_count,
            &core.license_affinity,
        );
        if !lint.is_valid() {
            return Err(failure(lint.violations("definition")));
        }

        let now = self.app.now();
        let lineage = uuid::Uuid::new_v4().to_string();
        let hash = content_hash(&artifact.bytes);
        let origin = scope.origin(METHOD_CREATE, rid.as_deref());
        let mut doc = pb::LabletDefinition {
            id: lineage.clone(),
            version: version.clone(),
            lab_yaml_hash: hash.clone(),
            lab_yaml: text.to_owned(),
            status: pb::DefinitionStatus::Active as i32,
            created_at: Some(timestamp_to_proto(now)),
            updated_at: Some(timestamp_to_proto(now)),
            created_by: origin.actor.clone(),
            ..input
        };
        let mut claims = vec![
            Claim::new(CLAIM_NAME_VERSION, name_version.clone()),
            Claim::new(CLAIM_NAME, name.clone()),
        ];
        claims.extend(request_claim.clone());
        let mut m = Mutation::at(now);
        m.create(&mut doc, claims)?;
        m.audit(
            &doc,
            &origin,
            AuditFacts {
                action: ACTION_CREATE.to_owned(),
                to_state: status_name(pb::DefinitionStatus::Active),
                details: Some(struct_of(&[
                    ("name", name.clone()),
                    ("version", version.clone()),
                    ("lab_yaml_hash", hash.clone()),
                    (
                        "lab_artifact_uri",
                        ccm_artifacts::redact_uri(&doc.lab_artifact_uri),
                    ),
                ])),
                ..Default::default()
            },
        );
        m.emit(self.app.factory.event(
            ccm_cloudevents::catalog::DEFINITION_CREATED,
            &lineage,
            serde_json::json!({
                "definition_id": lineage,
                "name": name,
                "version": version,
                "lab_yaml_hash": hash,
            }),
            now,
        ));
        match self.app.commit(m).await {
            Ok(_) => {}
            Err(ApiError::AlreadyExists { resource }) => {
                return match resource.resource_type.as_str() {
                    CLAIM_CREATE_REQUEST => match &request_claim {
                        Some(claim) => match self.app.store.claim_holder(claim).await? {
                            Some(holder) => self.replay(&holder.id, &name, &version).await,
                            None => Err(ApiError::already_exists("definition", name_version)),
                        },
                        None => Err(ApiError::already_exists("definition", name_version)),
                    },
                    CLAIM_NAME => {
                        self.check_name_free(&name, &name_version).await?;
                        Err(ApiError::already_exists("definition", name))
                    }
                    _ => Err(ApiError::already_exists("definition", name_version)),
                };
            }
            Err(e) => return Err(e),
        }
        tracing::info!(definition_id = %lineage, %version, "definition created");
        Ok(pb::CreateDefinitionResponse {
            definition: Some(present(doc, false)),
            findings: lint.warnings(),
        })
    }

    /// `ALREADY_EXISTS` when `(name, version)` is taken or `name` belongs to a lineage.
    async fn check_name_free(&self, name: &str, name_version: &str) -> Result<(), ApiError> {
        if self
            .app
            .store
            .claim_holder(&Claim::new(CLAIM_NAME_VERSION, name_version))
            .await?
            .is_some()
        {
            return Err(ApiError::already_exists("definition", name_version));
        }
        if let Some(holder) = self
            .app
            .store
            .claim_holder(&Claim::new(CLAIM_NAME, name))
            .await?
        {
            return Err(ApiError::already_exists(
                "definition",
                format!(
                    "{name} (lineage {}; add versions with SyncDefinition)",
                    lineage_of(&holder.id)
                ),
            ));
        }
        Ok(())
    }

    /// The answer to a retried create (same idempotency key): the version it created.
    async fn replay(
        &self,
        doc_id: &str,
        name: &str,
        version: &str,
    ) -> Result<pb::CreateDefinitionResponse, ApiError> {
        let existing: pb::LabletDefinition = self.app.get(doc_id).await?;
        if existing.name != name || existing.version != version {
            return Err(ApiError::invalid_argument(
                "request_id",
                format!(
                    "was already used to create definition {}@{}; use a new request_id for a \
                     different definition",
                    existing.name, existing.version
                ),
            ));
        }
        Ok(pb::CreateDefinitionResponse {
            definition: Some(present(existing, false)),
            findings: Vec::new(),
        })
    }

    async fn get(
        &self,
        req: pb::GetDefinitionRequest,
    ) -> Result<pb::GetDefinitionResponse, ApiError> {
        let mut v = Violations::new();
        validate::uuid(&mut v, "definition_id", &req.definition_id);
        let version = validate::optional_semver(&mut v, "version", &req.version);
        v.into_result()?;
        let definition = match version.flatten() {
            Some(version) => {
                self.app
                    .get::<pb::LabletDefinition>(&definition_doc_id(
                        &req.definition_id,
                        &version.to_string(),
                    ))
                    .await?
            }
            None => latest_visible(&self.app, &req.definition_id)
                .await?
                .ok_or_else(|| ApiError::not_found("definition", &req.definition_id))?,
        };
        Ok(pb::GetDefinitionResponse {
            definition: Some(present(definition, req.include_lab_yaml)),
        })
    }

    async fn list(
        &self,
        req: pb::ListDefinitionsRequest,
    ) -> Result<pb::ListDefinitionsResponse, ApiError> {
        let mut filters = req.clone();
        filters.page_size = 0;
        filters.page_token.clear();
        let fingerprint = paging::filter_fingerprint(&filters);
        let mut v = Violations::new();
        let page = v.absorb(paging::page_request::<ListCursor>(
            PageKind::Definitions,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        let mut statuses = Vec::new();
        for (i, raw) in req.statuses.iter().enumerate() {
            if let Some(s) = v.absorb(convert::definition_status_from_proto(
                *raw,
                &index_path("statuses", i),
            )) {
                statuses.push(convert::definition_status_name(s).to_owned());
            }
        }
        if statuses.is_empty() {
            statuses = visible_statuses();
        }
        validate::free_text(
            &mut v,
            "name_contains",
            &req.name_contains,
            validate::MAX_NAME_LEN,
            false,
        );
        let license = validate::enum_value::<pb::LicenseType>(
            &mut v,
            "license_type",
            req.license_type,
            false,
        );
        v.into_result()?;
        let page = page.ok_or_else(|| ApiError::internal_msg("page request not parsed"))?;
        let license = license.unwrap_or_default();

        let all = scan(
            &self.app,
            Query::new(Kind::Definition)
                .with_filter(Filter::any_of(IndexField::State, statuses))
                .with_page_size(SCAN_PAGE_SIZE),
        )
        .await?;
        let candidates: Vec<pb::LabletDefinition> = if req.all_versions {
            all
        } else {
            let mut latest: HashMap<String, pb::LabletDefinition> = HashMap::new();
            for d in all {
                let newer = latest
                    .get(&d.id)
                    .is_none_or(|best| version_of(&d) > version_of(best));
                if newer {
                    latest.insert(d.id.clone(), d);
                }
            }
            latest.into_values().collect()
        };
        let needle = req.name_contains.to_lowercase();
        let mut matching: Vec<(ListCursor, pb::LabletDefinition)> = candidates
            .into_iter()
            .filter(|d| needle.is_empty() || d.name.to_lowercase().contains(&needle))
            .filter(|d| {
                license == pb::LicenseType::Unspecified
                    || d.license_affinity.contains(&(license as i32))
            })
            .map(|d| (ListCursor::of(&d), d))
            .collect();
        matching.sort_by(|a, b| a.0.cmp(&b.0));
        let total = matching.len();
        let start = match &page.cursor {
            Some(after) => matching.partition_point(|(k, _)| k <= after),
            None => 0,
        };
        let rest = &matching[start.min(total)..];
        let taken = rest.len().min(page.page_size);
        let next_page_token = if rest.len() > taken {
            rest.get(taken.saturating_sub(1))
                .map(|(k, _)| paging::encode_page_token(PageKind::Definitions, fingerprint, k))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let definitions = rest[..taken]
            .iter()
            .map(|(_, d)| present(d.clone(), false))
            .collect();
        Ok(pb::ListDefinitionsResponse {
            definitions,
            next_page_token,
            total_size: i32::try_from(total).unwrap_or(i32::MAX),
        })
    }

    async fn list_versions(
        &self,
        req: pb::ListDefinitionVersionsRequest,
    ) -> Result<pb::ListDefinitionVersionsResponse, ApiError> {
        let mut filters = req.clone();
        filters.page_size = 0;
        filters.page_token.clear();
        let fingerprint = paging::filter_fingerprint(&filters);
        let mut v = Violations::new();
        validate::uuid(&mut v, "definition_id", &req.definition_id);
        let page = v.absorb(paging::page_request::<String>(
            PageKind::DefinitionVersions,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        v.into_result()?;
        let page = page.ok_or_else(|| ApiError::internal_msg("page request not parsed"))?;
        let mut query = Query::new(Kind::Definition)
            .with_filter(Filter::eq(IndexField::DefinitionId, &req.definition_id))
            .ordered_by(ccm_store::Order::VersionDesc)
            .with_page_size(u32::try_from(page.page_size).unwrap_or(SCAN_PAGE_SIZE));
        if !req.include_deleted {
            query = query.with_filter(Filter::any_of(IndexField::State, visible_statuses()));
        }
        let first_page = page.cursor.is_none();
        let result = self.app.store.list(query.after(page.cursor)).await?;
        if first_page && result.items.is_empty() {
            let any = self
                .app
                .store
                .count(
                    Kind::Definition,
                    &[Filter::eq(IndexField::DefinitionId, &req.definition_id)],
                )
                .await?;
            if any == 0 {
                return Err(ApiError::not_found("definition", &req.definition_id));
            }
        }
        let definitions = result
            .items
            .iter()
            .map(|doc| decode::<pb::LabletDefinition>(doc).map(|d| present(d, false)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pb::ListDefinitionVersionsResponse {
            definitions,
            next_page_token: result
                .next_page_token
                .map(|t| paging::encode_page_token(PageKind::DefinitionVersions, fingerprint, &t))
                .unwrap_or_default(),
        })
    }

    async fn sync(
        &self,
        scope: Scope,
        rid: Option<String>,
        req: pb::SyncDefinitionRequest,
    ) -> Result<pb::SyncDefinitionResponse, ApiError> {
        let mut v = Violations::new();
        validate::uuid(&mut v, "definition_id", &req.definition_id);
        let requested = validate::optional_semver(&mut v, "new_version", &req.new_version);
        validate::optional_uri(
            &mut v,
            "lab_artifact_uri",
            &req.lab_artifact_uri,
            uri_policy(&self.app),
        );
        v.into_result()?;
        let requested = requested.flatten();

        let versions = lineage_versions(&self.app, &req.definition_id, None).await?;
        let visible: Vec<String> = visible_statuses();
        let Some(latest) = versions
            .iter()
            .find(|d| visible.contains(&status_name(d.status())))
            .cloned()
        else {
            return Err(ApiError::not_found("definition", &req.definition_id));
        };
        // The highest version ever created (deleted ones included: their (name, version)
        // stays taken).
        let highest = versions
            .iter()
            .filter_map(version_of)
            .max()
            .ok_or_else(|| ApiError::internal_msg("definition without a readable version"))?;
        let latest_version = version_of(&latest)
            .ok_or_else(|| ApiError::internal_msg("definition without a readable version"))?;
        if let Some(requested) = requested
            && requested <= highest
        {
            return Err(ApiError::invalid_argument(
                "new_version",
                format!("must be greater than the latest version {highest}, got {requested}"),
            ));
        }
        let uri = if req.lab_artifact_uri.is_empty() {
            latest.lab_artifact_uri.clone()
        } else {
            req.lab_artifact_uri.clone()
        };
        let artifact = self.app.fetcher.fetch(&uri).await.map_err(ApiError::from)?;
        let hash = content_hash(&artifact.bytes);
        let previous_hash = latest.lab_yaml_hash.clone();
        let previous_version = latest.version.clone();
        let Some(auto) = next_version_on_sync(latest_version, &previous_hash, &hash) else {
            tracing::info!(version = %previous_version, "artifact unchanged; no new version");
            return Ok(pb::SyncDefinitionResponse {
                changed: false,
                definition: Some(present(latest, false)),
                previous_version,
                previous_hash,
                findings: Vec::new(),
            });
        };
        let new_version = requested.unwrap_or_else(|| {
            if auto > highest {
                auto
            } else {
                highest.bump_patch()
            }
        });
        let text = artifact_text(&artifact)
            .map_err(|f| ApiError::invalid_argument("lab_artifact_uri", f.message))?;
        let ports: Vec<&str> = latest
            .port_template
            .as_ref()
            .map(|t| t.ports.iter().map(|p| p.name.as_str()).collect())
            .unwrap_or_default();
        let lint = lint_lab(
            text,
            Some(&ports),
            u32::try_from(latest.node_count).unwrap_or(0),
            &affinity_of(&latest),
        );
        if !lint.is_valid() {
            return Err(failure(lint.violations("")));
        }

        let now = self.app.now();
        let new_version = new_version.to_string();
        let origin = scope.origin(METHOD_SYNC, rid.as_deref());
        let mut doc = pb::LabletDefinition {
            version: new_version.clone(),
            lab_artifact_uri: uri,
            lab_yaml_hash: hash.clone(),
            lab_yaml: text.to_owned(),
            status: pb::DefinitionStatus::Active as i32,
            status_reason: String::new(),
            created_at: Some(timestamp_to_proto(now)),
            updated_at: Some(timestamp_to_proto(now)),
            created_by: origin.actor.clone(),
            resource_version: 0,
            ..latest.clone()
        };
        let mut m = Mutation::at(now);
        m.guard(&latest);
        let name_version = format!("{}@{new_version}", doc.name);
        m.create(
            &mut doc,
            vec![Claim::new(CLAIM_NAME_VERSION, name_version.clone())],
        )?;
        m.audit(
            &doc,
            &origin,
            AuditFacts {
                action: ACTION_SYNC.to_owned(),
                to_state: status_name(pb::DefinitionStatus::Active),
                reason: if requested.is_some() {
                    "artifact changed; version given by the caller".to_owned()
                } else {
                    "artifact changed; PATCH bumped".to_owned()
                },
                details: Some(struct_of(&[
                    ("previous_version", previous_version.clone()),
                    ("new_version", new_version.clone()),
                    ("previous_hash", previous_hash.clone()),
                    ("lab_yaml_hash", hash.clone()),
                ])),
                ..Default::default()
            },
        );
        m.emit(self.app.factory.event(
            ccm_cloudevents::catalog::DEFINITION_VERSION_CREATED,
            &doc.id,
            serde_json::json!({
                "definition_id": doc.id,
                "name": doc.name,
                "old_version": previous_version,
                "new_version": new_version,
                "lab_yaml_hash": hash,
            }),
            now,
        ));
        self.app.commit(m).await.map_err(|e| match e {
            ApiError::AlreadyExists { .. } => ApiError::already_exists("definition", name_version),
            other => other,
        })?;
        tracing::info!(from = %previous_version, to = %new_version, "definition version created");
        Ok(pb::SyncDefinitionResponse {
            changed: true,
            definition: Some(present(doc, false)),
            previous_version,
            previous_hash,
            findings: lint.warnings(),
        })
    }

    /// The versions a deprecate / delete addresses, after the common checks: one version
    /// (checked against `resource_version`) or every version of the lineage.
    async fn addressed(
        &self,
        id: &str,
        version: &str,
        resource_version: i64,
        reason: &str,
    ) -> Result<Vec<pb::LabletDefinition>, ApiError> {
        let mut v = Violations::new();
        validate::uuid(&mut v, "definition_id", id);
        let version = validate::optional_semver(&mut v, "version", version);
        validate::reason(&mut v, "reason", reason);
        if resource_version < 0 {
            v.add(
                "resource_version",
                format!("must not be negative, got {resource_version}"),
            );
        }
        if matches!(version, Some(None)) && resource_version != 0 {
            v.add(
                "resource_version",
                "must be 0 when no version is given (several versions are addressed)",
            );
        }
        v.into_result()?;
        match version.flatten() {
            Some(version) => {
                let doc_id = definition_doc_id(id, &version.to_string());
                let d: pb::LabletDefinition = self.app.get(&doc_id).await?;
                if resource_version != 0 && resource_version != d.resource_version {
                    return Err(ApiError::stale_version(
                        "definition",
                        doc_id,
                        resource_version,
                        d.resource_version,
                    ));
                }
                Ok(vec![d])
            }
            None => {
                let all = lineage_versions(&self.app, id, None).await?;
                if all.is_empty() {
                    return Err(ApiError::not_found("definition", id));
                }
                Ok(all)
            }
        }
    }

    async fn deprecate(
        &self,
        scope: Scope,
        rid: Option<String>,
        req: pb::DeprecateDefinitionRequest,
    ) -> Result<pb::DeprecateDefinitionResponse, ApiError> {
        let single = !req.version.is_empty();
        let targets = self
            .addressed(
                &req.definition_id,
                &req.version,
                req.resource_version,
                &req.reason,
            )
            .await?;
        let now = self.app.now();
        let origin = scope.origin(METHOD_DEPRECATE, rid.as_deref());
        let mut m = Mutation::at(now);
        let mut changed = Vec::new();
        for mut d in targets {
            match d.status() {
                pb::DefinitionStatus::Active => {}
                pb::DefinitionStatus::Deleted if single => {
                    return Err(ApiError::illegal_transition(
                        "definition",
                        status_name(pb::DefinitionStatus::Deleted),
                        status_name(pb::DefinitionStatus::Deprecated),
                        "a deleted version cannot be deprecated",
                    )
                    .on_resource("definition", definition_doc_id(&d.id, &d.version)));
                }
                // Already deprecated (idempotent) or deleted (when addressing the lineage).
                _ => continue,
            }
            d.set_status(pb::DefinitionStatus::Deprecated);
            d.status_reason = req.reason.clone();
            d.updated_at = Some(timestamp_to_proto(now));
            m.update(&mut d, ClaimChange::Keep)?;
            m.audit(
                &d,
                &origin,
                AuditFacts {
                    action: ACTION_DEPRECATE.to_owned(),
                    from_state: status_name(pb::DefinitionStatus::Active),
                    to_state: status_name(pb::DefinitionStatus::Deprecated),
                    reason: req.reason.clone(),
                    details: None,
                },
            );
            m.emit(self.app.factory.event(
                ccm_cloudevents::catalog::DEFINITION_DEPRECATED,
                &d.id,
                serde_json::json!({
                    "definition_id": d.id,
                    "name": d.name,
                    "version": d.version,
                    "reason": req.reason,
                }),
                now,
            ));
            changed.push(d);
        }
        if !m.is_empty() {
            self.app.commit(m).await?;
        }
        tracing::info!(versions = changed.len(), reason = %req.reason, "definition deprecated");
        Ok(pb::DeprecateDefinitionResponse {
            definitions: changed.into_iter().map(|d| present(d, false)).collect(),
        })
    }

    async fn delete(
        &self,
        scope: Scope,
        rid: Option<String>,
        req: pb::DeleteDefinitionRequest,
    ) -> Result<pb::DeleteDefinitionResponse, ApiError> {
        let targets = self
            .addressed(
                &req.definition_id,
                &req.version,
                req.resource_version,
                &req.reason,
            )
            .await?;
        let live = self
            .app
            .store
            .count(Kind::Instance, &live_instances_of(&req.definition_id))
            .await?;
        if live > 0 {
            return Err(in_use(&req.definition_id, Some(live)));
        }
        let now = self.app.now();
        let origin = scope.origin(METHOD_DELETE, rid.as_deref());
        let mut m = Mutation::at(now);
        let mut changed = Vec::new();
        for mut d in targets {
            let from = d.status();
            if from == pb::DefinitionStatus::Deleted {
                continue;
            }
            d.set_status(pb::DefinitionStatus::Deleted);
            d.status_reason = req.reason.clone();
            d.updated_at = Some(timestamp_to_proto(now));
            m.update(&mut d, ClaimChange::Keep)?;
            m.audit(
                &d,
                &origin,
                AuditFacts {
                    action: ACTION_DELETE.to_owned(),
                    from_state: status_name(from),
                    to_state: status_name(pb::DefinitionStatus::Deleted),
                    reason: req.reason.clone(),
                    details: None,
                },
            );
            changed.push(d);
        }
        if !m.is_empty() {
            // Atomic with the status change: no live instance of the lineage.
            m.guard_none(Kind::Instance, live_instances_of(&req.definition_id));
            self.app.commit(m).await.map_err(|e| match e {
                ApiError::FailedPrecondition { .. } => in_use(&req.definition_id, None),
                other => other,
            })?;
        }
        tracing::info!(versions = changed.len(), reason = %req.reason, "definition deleted");
        Ok(pb::DeleteDefinitionResponse {
            definitions: changed.into_iter().map(|d| present(d, false)).collect(),
        })
    }

    async fn validate(
        &self,
        req: pb::ValidateDefinitionRequest,
    ) -> Result<pb::ValidateDefinitionResponse, ApiError> {
        let mut v = Violations::new();
        match &req.source {
            None => v.add("source", "set lab_yaml or lab_artifact_uri"),
            Some(pb::validate_definition_request::Source::LabYaml(yaml)) => {
                if yaml.len() > MAX_LAB_YAML_BYTES {
                    v.add(
                        "lab_yaml",
                        format!(
                            "is {} bytes; at most {MAX_LAB_YAML_BYTES} bytes are accepted",
                            yaml.len()
                        ),
                    );
                }
            }
            Some(pb::validate_definition_request::Source::LabArtifactUri(uri)) => {
                validate::uri(&mut v, "lab_artifact_uri", uri, uri_policy(&self.app));
            }
        }
        let declared = validate::non_negative(&mut v, "node_count", req.node_count);
        let mut affinity = Vec::new();
        for (i, raw) in req.license_affinity.iter().enumerate() {
            if let Some(l) = v.absorb(convert::license_type_from_proto(
                *raw,
                &index_path("license_affinity", i),
            )) {
                affinity.push(l);
            }
        }
        let ports = req.port_template.clone().unwrap_or_default();
        for (i, p) in ports.ports.iter().enumerate() {
            v.absorb(convert::port_protocol_from_proto(
                p.protocol,
                &join_path(&index_path("port_template.ports", i), "protocol"),
            ));
        }
        v.into_result()?;
        // Port names are linted, not refused: they are findings on their paths.
        let mut names_check = Violations::new();
        let names = validate::port_names(
            &mut names_check,
            "port_template.ports",
            ports.ports.iter().map(|p| p.name.as_str()),
        );
        let mut name_findings: Vec<Finding> = names_check
            .iter()
            .map(|fv| {
                Finding::new(
                    pb::FindingSeverity::Error,
                    CODE_PORT_NAME_INVALID,
                    fv.field.clone(),
                    fv.field.clone(),
                    fv.description.clone(),
                )
            })
            .collect();

        let fetched;
        let (text, hash) = match req.source {
            Some(pb::validate_definition_request::Source::LabYaml(ref yaml)) => {
                (Ok(yaml.as_str()), content_hash(yaml.as_bytes()))
            }
            Some(pb::validate_definition_request::Source::LabArtifactUri(ref uri)) => {
                fetched = self.app.fetcher.fetch(uri).await?;
                (artifact_text(&fetched), content_hash(&fetched.bytes))
            }
            None => return Err(ApiError::invalid_argument("source", "is required")),
        };
        let mut lint = match text {
            Ok(text) => lint_lab(text, names.as_deref(), declared.unwrap_or(0), &affinity),
            Err(finding) => LabLint {
                findings: vec![finding],
                ..LabLint::default()
            },
        };
        lint.findings.append(&mut name_findings);
        lint.findings
            .sort_by_key(|f| std::cmp::Reverse(f.severity as i32));
        Ok(pb::ValidateDefinitionResponse {
            valid: lint.is_valid(),
            findings: lint.findings.iter().map(Finding::to_proto).collect(),
            detected_node_count: lint
                .detected_nodes
                .and_then(|n| i32::try_from(n).ok())
                .unwrap_or(0),
            placeholders: lint.placeholders,
            lab_yaml_hash: hash,
        })
    }
}

/// `FAILED_PRECONDITION` (`IN_USE`): live instances (`live` of them, when counted) still use
/// lineage `id`.
fn in_use(id: &str, live: Option<u64>) -> ApiError {
    let count = live.map_or_else(|| "instances".to_owned(), |n| format!("{n} instance(s)"));
    ApiError::failed_precondition(
        "IN_USE",
        "instance",
        format!(
            "definition {id} is used by {count} that are not TERMINATED; terminate them first \
             or deprecate the definition instead"
        ),
    )
    .on_resource("definition", id)
}

/// Keyset position in the ListDefinitions order (name ascending, version descending, document
/// id ascending).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ListCursor {
    name: String,
    /// Zero-padded version key, inverted for descending order.
    version_desc: String,
    id: String,
}

impl ListCursor {
    fn of(d: &pb::LabletDefinition) -> ListCursor {
        let key = version_key(&d.version).unwrap_or_default();
        // Invert every digit so that ascending comparison of the string orders versions
        // descending (all keys have the same length and shape).
        let version_desc = key
            .chars()
            .map(|c| match c.to_digit(10) {
                Some(n) => char::from_digit(9 - n, 10).unwrap_or(c),
                None => c,
            })
            .collect();
        ListCursor {
            name: d.name.clone(),
            version_desc,
            id: definition_doc_id(&d.id, &d.version),
        }
    }
}

impl PartialOrd for ListCursor {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ListCursor {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.name, &self.version_desc, &self.id).cmp(&(
            &other.name,
            &other.version_desc,
            &other.id,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------------

macro_rules! span {
    ($name:literal, $($field:tt)*) => {
        tracing::info_span!($name, $($field)*, name = tracing::field::Empty)
    };
}

#[tonic::async_trait]
impl DefinitionService for Definitions {
    async fn create_definition(
        &self,
        request: Request<pb::CreateDefinitionRequest>,
    ) -> Result<Response<pb::CreateDefinitionResponse>, Status> {
        let scope = caller_of(&request)?;
        let rid = request_id(&request).map(str::to_owned);
        let span = span!("definitions.create", caller = %scope.caller.subject);
        self.create(scope, rid, request.into_inner())
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn get_definition(
        &self,
        request: Request<pb::GetDefinitionRequest>,
    ) -> Result<Response<pb::GetDefinitionResponse>, Status> {
        caller_of(&request)?;
        let req = request.into_inner();
        let span =
            span!("definitions.get", definition_id = %req.definition_id, version = %req.version);
        self.get(req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn list_definitions(
        &self,
        request: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        caller_of(&request)?;
        let span = span!(
            "definitions.list",
            all_versions = request.get_ref().all_versions
        );
        self.list(request.into_inner())
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn list_definition_versions(
        &self,
        request: Request<pb::ListDefinitionVersionsRequest>,
    ) -> Result<Response<pb::ListDefinitionVersionsResponse>, Status> {
        caller_of(&request)?;
        let req = request.into_inner();
        let span = span!("definitions.list_versions", definition_id = %req.definition_id);
        self.list_versions(req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn sync_definition(
        &self,
        request: Request<pb::SyncDefinitionRequest>,
    ) -> Result<Response<pb::SyncDefinitionResponse>, Status> {
        let scope = caller_of(&request)?;
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let span = span!("definitions.sync", definition_id = %req.definition_id, caller = %scope.caller.subject);
        self.sync(scope, rid, req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn deprecate_definition(
        &self,
        request: Request<pb::DeprecateDefinitionRequest>,
    ) -> Result<Response<pb::DeprecateDefinitionResponse>, Status> {
        let scope = caller_of(&request)?;
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let span = span!(
            "definitions.deprecate",
            definition_id = %req.definition_id,
            version = %req.version,
            caller = %scope.caller.subject
        );
        self.deprecate(scope, rid, req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn delete_definition(
        &self,
        request: Request<pb::DeleteDefinitionRequest>,
    ) -> Result<Response<pb::DeleteDefinitionResponse>, Status> {
        let scope = caller_of(&request)?;
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let span = span!(
            "definitions.delete",
            definition_id = %req.definition_id,
            version = %req.version,
            caller = %scope.caller.subject
        );
        self.delete(scope, rid, req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn validate_definition(
        &self,
        request: Request<pb::ValidateDefinitionRequest>,
    ) -> Result<Response<pb::ValidateDefinitionResponse>, Status> {
        caller_of(&request)?;
        let span = span!(
            "definitions.validate",
            port_count = request
                .get_ref()
                .port_template
                .as_ref()
                .map_or(0, |t| t.ports.len())
        );
        self.validate(request.into_inner())
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}
