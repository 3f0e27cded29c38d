//! Seeding worker templates from configuration (domain.md §1.4, ADR-007).
//!
//! The control plane reads a YAML file (by convention `config/worker-templates.yaml`; the
//! format is documented in `docs/templates.md`) at start and creates every template it lists
//! **that does not exist yet** (matched by name). It never updates an existing template, so
//! edits made through `TemplateService.UpdateTemplate` survive restarts, and it is safe to run
//! on every start and from several replicas at once (a template created concurrently by another
//! replica counts as skipped). Created templates have `is_seeded = true`.
//!
//! The whole file is validated before anything is written: an invalid entry fails the seeding
//! with `INVALID_ARGUMENT`, one field violation per problem, each naming the entry
//! (`templates[1].capacity.cpu_cores`, `templates[2]` for an unknown key), so a broken file is
//! fixed rather than half-applied.
//!
//! ```yaml
//! - name: personal-m5zn-metal
//!   instance_type: m5zn.metal
//!   license_type: PERSONAL
//!   capacity: { cpu_cores: 48, memory_gb: 192, storage_gb: 500, max_nodes: 20 }
//!   ami_pattern: "CML-2.9.*"
//!   regions: [us-east-1]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use ccm_proto::v1 as pb;
use serde::Deserialize;

use crate::app::App;
use crate::convert::timestamp_to_proto;
use crate::error::ApiError;
use crate::record::{AuditFacts, Mutation, Origin};
use crate::repo::Entity as _;
use crate::services::templates::normalize_template;
use crate::validate::{Violations, index_path, join_path};

/// Path of the seed file relative to the deployment's working directory.
pub const DEFAULT_TEMPLATES_FILE: &str = "config/worker-templates.yaml";
/// Field path prefix of seed-file entries in violations (`templates[i]`).
pub const SEED_FIELD: &str = "templates";
/// Audit action of a seeded template.
pub const ACTION_SEED: &str = "template.seed";
/// The component named as the actor of seeding (`system:seed`).
pub const SEED_COMPONENT: &str = "seed";

/// What a seeding run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedReport {
    /// Templates created by this run, in file order.
    pub created: Vec<String>,
    /// Templates that already existed (left untouched), in file order.
    pub skipped: Vec<String>,
}

/// One entry of the seed file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedEntry {
    name: String,
    #[serde(default)]
    description: String,
    instance_type: String,
    /// `PERSONAL`, `ENTERPRISE` or `EVALUATION` (the `LICENSE_TYPE_` prefix is optional).
    license_type: String,
    capacity: SeedCapacity,
    ami_pattern: String,
    #[serde(default)]
    regions: Vec<String>,
    startup_time_minutes: Option<i64>,
    port_range: Option<SeedPortRange>,
    drain_timeout_hours: Option<i64>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    volume_size_gb: i32,
    #[serde(default)]
    min_workers: i32,
    #[serde(default)]
    max_workers: i32,
    scale_up_cooldown_minutes: Option<i64>,
    stopped_retention_hours: Option<i64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedCapacity {
    cpu_cores: i32,
    memory_gb: i32,
    storage_gb: i32,
    max_nodes: i32,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedPortRange {
    start: i32,
    end: i32,
}

fn seconds(n: i64, unit: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: n.saturating_mul(unit),
        nanos: 0,
    }
}

fn license_of(v: &mut Violations, field: &str, text: &str) -> i32 {
    let upper = text.trim().to_ascii_uppercase();
    let full = if upper.starts_with("LICENSE_TYPE_") {
        upper
    } else {
        format!("LICENSE_TYPE_{upper}")
    };
    match pb::LicenseType::from_str_name(&full) {
        Some(l) if l != pb::LicenseType::Unspecified => l as i32,
        _ => {
            v.add(
                field,
                format!("unknown licence type {text:?}: use PERSONAL, ENTERPRISE or EVALUATION"),
            );
            0
        }
    }
}

impl SeedEntry {
    fn to_proto(&self, v: &mut Violations, field: &str) -> pb::WorkerTemplate {
        pb::WorkerTemplate {
            name: self.name.clone(),
            description: self.description.clone(),
            instance_type: self.instance_type.clone(),
            capacity: Some(pb::WorkerCapacity {
                cpu_cores: self.capacity.cpu_cores,
                memory_gb: self.capacity.memory_gb,
                storage_gb: self.capacity.storage_gb,
                max_nodes: self.capacity.max_nodes,
            }),
            license_type: license_of(v, &join_path(field, "license_type"), &self.license_type),
            ami_pattern: self.ami_pattern.clone(),
            regions: self.regions.clone(),
            startup_time: self.startup_time_minutes.map(|m| seconds(m, 60)),
            port_range: self.port_range.map(|r| pb::PortRange {
                start: r.start,
                end: r.end,
            }),
            drain_timeout: self.drain_timeout_hours.map(|h| seconds(h, 3600)),
            tags: self
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            volume_size_gb: self.volume_size_gb,
            min_workers: self.min_workers,
            max_workers: self.max_workers,
            scale_up_cooldown: self.scale_up_cooldown_minutes.map(|m| seconds(m, 60)),
            stopped_retention: self.stopped_retention_hours.map(|h| seconds(h, 3600)),
            ..Default::default()
        }
    }
}

/// Parses and validates a seed file: the templates it lists, in order, in their stored form
/// (without id and timestamps). Every problem is reported at once, on `templates[i]…`.
pub fn parse_seed_file(yaml: &str) -> Result<Vec<pb::WorkerTemplate>, ApiError> {
    let root: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).map_err(|e| {
        ApiError::invalid_argument(SEED_FIELD, format!("the seed file is not valid YAML: {e}"))
    })?;
    let entries = match root {
        serde_yaml_ng::Value::Null => return Ok(Vec::new()),
        serde_yaml_ng::Value::Sequence(entries) => entries,
        _ => {
            return Err(ApiError::invalid_argument(
                SEED_FIELD,
                "the seed file must be a YAML list of templates (one `- name: …` entry each)",
            ));
        }
    };
    let mut v = Violations::new();
    let mut out = Vec::with_capacity(entries.len());
    let mut names = HashSet::new();
    for (i, raw) in entries.into_iter().enumerate() {
        let field = index_path(SEED_FIELD, i);
        let entry: SeedEntry = match serde_yaml_ng::from_value(raw) {
            Ok(entry) => entry,
            Err(e) => {
                v.add(&field, e.to_string());
                continue;
            }
        };
        let license_field = join_path(&field, "license_type");
        let mut entry_v = Violations::new();
        let proto = entry.to_proto(&mut entry_v, &field);
        let license_reported = !entry_v.is_empty();
        match normalize_template(&proto, &field) {
            Ok(t) => {
                if !names.insert(t.name.clone()) {
                    entry_v.add(
                        join_path(&field, "name"),
                        format!("duplicate template name {:?} in the seed file", t.name),
                    );
                }
                out.push(t);
            }
            Err(ApiError::InvalidArgument { violations }) => {
                // An unknown licence name is already reported in the file's own terms.
                for fv in violations {
                    if !(license_reported && fv.field == license_field) {
                        entry_v.add(fv.field, fv.description);
                    }
                }
            }
            Err(other) => return Err(other),
        }
        v.extend(entry_v);
    }
    v.finish(out)
}

/// Creates every template of the seed file `yaml` that does not exist yet; never updates an
/// existing one. Idempotent. See the module docs.
pub async fn seed_templates(app: &App, yaml: &str) -> Result<SeedReport, ApiError> {
    let templates = parse_seed_file(yaml)?;
    let origin = Origin::system(SEED_COMPONENT);
    let mut report = SeedReport::default();
    for mut template in templates {
        let name = template.name.clone();
        if app.find::<pb::WorkerTemplate>(&name).await?.is_some() {
            tracing::debug!(template = %name, "seed: template exists; left as it is");
            report.skipped.push(name);
            continue;
        }
        let now = app.now();
        template.id = uuid::Uuid::new_v4().to_string();
        template.is_seeded = true;
        template.created_at = Some(timestamp_to_proto(now));
        template.updated_at = Some(timestamp_to_proto(now));
        let mut m = Mutation::at(now);
        m.create(&mut template, Vec::new())?;
        m.audit(
            &template,
            &origin,
            AuditFacts {
                action: ACTION_SEED.to_owned(),
                reason: "seeded from the template file".to_owned(),
                ..Default::default()
            },
        );
        match app.commit(m).await {
            Ok(_) => {
                tracing::info!(template = %template.doc_id(), "seed: template created");
                report.created.push(name);
            }
            // Another replica seeded it between our read and our write.
            Err(ApiError::AlreadyExists { .. }) => report.skipped.push(name),
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// [`seed_templates`] with the file at `path`. A file that cannot be read is
/// `FAILED_PRECONDITION` naming the path.
pub async fn seed_templates_file(app: &App, path: &Path) -> Result<SeedReport, ApiError> {
    let yaml = tokio::fs::read_to_string(path).await.map_err(|e| {
        ApiError::failed_precondition(
            "CONFIG",
            path.display().to_string(),
            format!("cannot read the template seed file {}: {e}", path.display()),
        )
    })?;
    seed_templates(app, &yaml).await
}
