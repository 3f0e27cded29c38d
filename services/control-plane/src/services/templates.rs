//! TemplateService: worker templates (domain.md §1.4, FR-2.4.2).
//!
//! A template is one store document whose id is its name (names are unique and immutable). The
//! stored form is normalised: defaults the contract names are written out (startup 20 min,
//! drain timeout 4 h, ports 2000..=9999, root volume [`DEFAULT_VOLUME_SIZE_GB`] GiB), so what a
//! client reads is what the scheduler and autoscaler use. [`normalize_template`] is the one
//! validation, shared by `CreateTemplate`, `UpdateTemplate` (on the merged result) and seeding
//! ([`crate::seed`]).
//!
//! * `UpdateTemplate` changes exactly the fields named in `update_mask` (top-level fields, or
//!   `capacity.<field>` / `port_range.<field>`); `*`, unknown paths, `name` and output-only
//!   fields are `INVALID_ARGUMENT` on `update_mask.paths[i]`.
//! * `DeleteTemplate` is refused with `FAILED_PRECONDITION` (`IN_USE`) while a worker of the
//!   template is not TERMINATED; the check is a `GuardNoneMatch` in the delete's transaction.
//! * `worker_count` (output only) is counted on every read: workers with the template that are
//!   not TERMINATED.
//! * `ListTemplates` orders by name; templates are few, so the handler reads them all, filters,
//!   sorts and pages in memory with the last name as the cursor.
//!
//! Templates have no CloudEvents in the catalog (domain.md §8); every change is audited
//! (`template.create`, `template.update`, `template.delete`, `template.seed`) and published on
//! the change feed.

use std::collections::HashSet;

use ccm_proto::v1 as pb;
use ccm_proto::v1::template_service_server::{TemplateService, TemplateServiceServer};
use ccm_store::{ClaimChange, Filter, IndexField, Kind, Query};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::app::App;
use crate::convert::{self, timestamp_to_proto};
use crate::error::ApiError;
use crate::paging::{self, PageKind};
use crate::record::{AuditFacts, Mutation};
use crate::repo::decode;
use crate::server::request_id;
use crate::services::{Scope, caller_of};
use crate::validate::{self, Violations, index_path, join_path};

/// Root volume size when a template does not give one (template.proto: default 500).
pub const DEFAULT_VOLUME_SIZE_GB: i32 = 500;
/// Smallest root volume accepted, GiB.
pub const MIN_VOLUME_SIZE_GB: i32 = 8;
/// Largest root volume accepted, GiB (EBS gp3 limit, 16 TiB).
pub const MAX_VOLUME_SIZE_GB: i32 = 16 * 1024;
/// Most regions a template may list.
pub const MAX_TEMPLATE_REGIONS: usize = 32;
/// Longest `scale_up_cooldown` / `stopped_retention` accepted (sanity bound: 365 days).
pub const MAX_TEMPLATE_SPAN_SECONDS: i64 = 365 * 24 * 3600;
/// Largest protobuf enum number the live-state list looks at.
const MAX_ENUM_NUMBER: i32 = 64;
/// Documents read per store page when scanning templates.
const SCAN_PAGE_SIZE: u32 = ccm_store::MAX_PAGE_SIZE;

/// Audit action of CreateTemplate.
pub const ACTION_CREATE: &str = "template.create";
/// Audit action of UpdateTemplate.
pub const ACTION_UPDATE: &str = "template.update";
/// Audit action of DeleteTemplate.
pub const ACTION_DELETE: &str = "template.delete";

const METHOD_CREATE: &str = "/ccm.v1.TemplateService/CreateTemplate";
const METHOD_UPDATE: &str = "/ccm.v1.TemplateService/UpdateTemplate";
const METHOD_DELETE: &str = "/ccm.v1.TemplateService/DeleteTemplate";

/// Update-mask paths that may be changed.
pub const UPDATABLE_PATHS: &[&str] = &[
    "description",
    "instance_type",
    "capacity",
    "capacity.cpu_cores",
    "capacity.memory_gb",
    "capacity.storage_gb",
    "capacity.max_nodes",
    "license_type",
    "ami_pattern",
    "regions",
    "startup_time",
    "port_range",
    "port_range.start",
    "port_range.end",
    "drain_timeout",
    "tags",
    "volume_size_gb",
    "min_workers",
    "max_workers",
    "scale_up_cooldown",
    "stopped_retention",
];

/// Fields of `WorkerTemplate` that exist but cannot be updated (immutable or output only).
pub const FIXED_PATHS: &[&str] = &[
    "id",
    "name",
    "is_seeded",
    "worker_count",
    "created_at",
    "updated_at",
    "resource_version",
];

/// The TemplateService implementation.
#[derive(Debug, Clone)]
pub struct Templates {
    app: App,
}

/// The tonic server for [`Templates`].
pub fn server(app: App) -> TemplateServiceServer<Templates> {
    TemplateServiceServer::new(Templates { app })
}

fn failure(v: Violations) -> ApiError {
    match v.into_result() {
        Err(e) => e,
        Ok(()) => ApiError::internal_msg("validation failed without a violation"),
    }
}

/// Worker states that count as "using" a template: every state but TERMINATED.
pub fn live_worker_states() -> Vec<&'static str> {
    (0..=MAX_ENUM_NUMBER)
        .filter_map(|n| pb::WorkerState::try_from(n).ok())
        .filter(|s| *s != pb::WorkerState::Terminated)
        .map(|s| s.as_str_name())
        .collect()
}

fn workers_of(name: &str) -> Vec<Filter> {
    vec![
        Filter::eq(IndexField::TemplateName, name),
        Filter::any_of(IndexField::State, live_worker_states()),
    ]
}

/// Workers of template `name` that are not TERMINATED.
pub async fn worker_count(app: &App, name: &str) -> Result<i32, ApiError> {
    let n = app.store.count(Kind::Worker, &workers_of(name)).await?;
    Ok(i32::try_from(n).unwrap_or(i32::MAX))
}

/// A span (`scale_up_cooldown`, `stopped_retention`): valid, ≥ 0, at most
/// [`MAX_TEMPLATE_SPAN_SECONDS`].
fn optional_span(v: &mut Violations, field: &str, d: Option<&prost_types::Duration>) {
    let Some(d) = d else { return };
    if let Some(span) = v.absorb(convert::duration_from_proto(d, field)) {
        if span < chrono::Duration::zero() {
            v.add(field, "must not be negative");
        } else if span.num_seconds() > MAX_TEMPLATE_SPAN_SECONDS {
            v.add(
                field,
                format!("must be at most {MAX_TEMPLATE_SPAN_SECONDS} seconds"),
            );
        }
    }
}

/// Validates a template as a client (or the seed file) gives it and returns its stored form:
/// every check of [`convert::template_from_proto`] (name, instance type, capacity, licence, AMI
/// pattern, regions, startup time, port range, drain timeout, tags, min/max workers) plus: each
/// capacity dimension but storage ≥ 1, regions unique and at most [`MAX_TEMPLATE_REGIONS`], tag
/// keys not starting with `aws:` or `ccm:` (ccm sets its own), `volume_size_gb` 0 (default
/// [`DEFAULT_VOLUME_SIZE_GB`]) or in [`MIN_VOLUME_SIZE_GB`]..=[`MAX_VOLUME_SIZE_GB`],
/// `max_workers` 0 (no limit) or ≥ `min_workers`, spans ≥ 0. Every problem is reported at once
/// with its path under `field`.
///
/// Output-only fields (`id`, `is_seeded`, timestamps, `resource_version`) are copied from `t`
/// unchanged; `worker_count` is cleared (it is counted on read).
pub fn normalize_template(
    t: &pb::WorkerTemplate,
    field: &str,
) -> Result<pb::WorkerTemplate, ApiError> {
    let mut v = Violations::new();
    let core = v.absorb(convert::template_from_proto(t, field));
    if let Some(c) = &t.capacity {
        let cap = join_path(field, "capacity");
        for (name, value) in [
            ("cpu_cores", c.cpu_cores),
            ("memory_gb", c.memory_gb),
            ("max_nodes", c.max_nodes),
        ] {
            if value == 0 {
                v.add(join_path(&cap, name), "must be at least 1");
            }
        }
    }
    let regions_field = join_path(field, "regions");
    if t.regions.len() > MAX_TEMPLATE_REGIONS {
        v.add(
            &regions_field,
            format!(
                "at most {MAX_TEMPLATE_REGIONS} regions are allowed, got {}",
                t.regions.len()
            ),
        );
    }
    let mut seen = HashSet::new();
    for (i, region) in t.regions.iter().enumerate() {
        if !seen.insert(region.as_str()) {
            v.add(
                index_path(&regions_field, i),
                format!("duplicate region {region:?}"),
            );
        }
    }
    let tags_field = join_path(field, "tags");
    let mut keys: Vec<&String> = t.tags.keys().collect();
    keys.sort();
    for key in keys {
        let lower = key.to_ascii_lowercase();
        if lower.starts_with(validate::RESERVED_TAG_PREFIX_AWS)
            || lower.starts_with(validate::RESERVED_TAG_PREFIX_CCM)
        {
            v.add(
                validate::key_path(&tags_field, key),
                format!(
                    "keys starting with {:?} or {:?} are reserved",
                    validate::RESERVED_TAG_PREFIX_AWS,
                    validate::RESERVED_TAG_PREFIX_CCM
                ),
            );
        }
    }
    let volume = if t.volume_size_gb == 0 {
        Some(DEFAULT_VOLUME_SIZE_GB)
    } else {
        validate::int_range(
            &mut v,
            &join_path(field, "volume_size_gb"),
            i64::from(t.volume_size_gb),
            i64::from(MIN_VOLUME_SIZE_GB),
            i64::from(MAX_VOLUME_SIZE_GB),
        )
        .and_then(|n| i32::try_from(n).ok())
    };
    if t.max_workers > 0 && t.min_workers > t.max_workers {
        v.add(
            join_path(field, "max_workers"),
            format!(
                "must be 0 (no limit) or at least min_workers ({}), got {}",
                t.min_workers, t.max_workers
            ),
        );
    }
    optional_span(
        &mut v,
        &join_path(field, "scale_up_cooldown"),
        t.scale_up_cooldown.as_ref(),
    );
    optional_span(
        &mut v,
        &join_path(field, "stopped_retention"),
        t.stopped_retention.as_ref(),
    );
    v.into_result()?;
    let (Some(core), Some(volume)) = (core, volume) else {
        return Err(ApiError::internal_msg("template not converted"));
    };
    Ok(pb::WorkerTemplate {
        id: t.id.clone(),
        volume_size_gb: volume,
        scale_up_cooldown: t.scale_up_cooldown,
        stopped_retention: t.stopped_retention,
        is_seeded: t.is_seeded,
        worker_count: 0,
        created_at: t.created_at,
        updated_at: t.updated_at,
        resource_version: t.resource_version,
        ..convert::template_to_proto(&core)
    })
}

/// Copies the fields named by `paths` from `from` into `into`. Every path must be one of
/// [`UPDATABLE_PATHS`]; violations are on `update_mask.paths[i]`.
fn apply_mask(
    into: &mut pb::WorkerTemplate,
    from: &pb::WorkerTemplate,
    paths: &[String],
) -> Result<(), ApiError> {
    let mut v = Violations::new();
    if paths.is_empty() {
        v.add(
            "update_mask",
            "is required: list the fields to update (e.g. \"capacity\", \"tags\")",
        );
    }
    for (i, path) in paths.iter().enumerate() {
        let field = index_path("update_mask.paths", i);
        let path = path.as_str();
        if path == "*" {
            v.add(
                field,
                "the wildcard \"*\" is not accepted; list the fields to update",
            );
            continue;
        }
        if FIXED_PATHS.contains(&path) {
            v.add(
                field,
                format!("{path:?} cannot be updated (immutable or output only)"),
            );
            continue;
        }
        if !UPDATABLE_PATHS.contains(&path) {
            v.add(field, format!("unknown field {path:?} of WorkerTemplate"));
            continue;
        }
        let capacity = |t: &pb::WorkerTemplate| t.capacity.unwrap_or_default();
        let range = |t: &pb::WorkerTemplate| t.port_range.unwrap_or_default();
        match path {
            "description" => into.description.clone_from(&from.description),
            "instance_type" => into.instance_type.clone_from(&from.instance_type),
            "capacity" => into.capacity = from.capacity,
            "capacity.cpu_cores" => {
                let mut c = capacity(into);
                c.cpu_cores = capacity(from).cpu_cores;
                into.capacity = Some(c);
            }
            "capacity.memory_gb" => {
                let mut c = capacity(into);
                c.memory_gb = capacity(from).memory_gb;
                into.capacity = Some(c);
            }
            "capacity.storage_gb" => {
                let mut c = capacity(into);
                c.storage_gb = capacity(from).storage_gb;
                into.capacity = Some(c);
            }
            "capacity.max_nodes" => {
                let mut c = capacity(into);
                c.max_nodes = capacity(from).max_nodes;
                into.capacity = Some(c);
            }
            "license_type" => into.license_type = from.license_type,
            "ami_pattern" => into.ami_pattern.clone_from(&from.ami_pattern),
            "regions" => into.regions.clone_from(&from.regions),
            "startup_time" => into.startup_time = from.startup_time,
            "port_range" => into.port_range = from.port_range,
            "port_range.start" => {
                let mut r = range(into);
                r.start = range(from).start;
                into.port_range = Some(r);
            }
            "port_range.end" => {
                let mut r = range(into);
                r.end = range(from).end;
                into.port_range = Some(r);
            }
            "drain_timeout" => into.drain_timeout = from.drain_timeout,
            "tags" => into.tags.clone_from(&from.tags),
            "volume_size_gb" => into.volume_size_gb = from.volume_size_gb,
            "min_workers" => into.min_workers = from.min_workers,
            "max_workers" => into.max_workers = from.max_workers,
            "scale_up_cooldown" => into.scale_up_cooldown = from.scale_up_cooldown,
            "stopped_retention" => into.stopped_retention = from.stopped_retention,
            other => {
                return Err(ApiError::internal_msg(format!(
                    "update path {other:?} is listed as updatable but not applied"
                )));
            }
        }
    }
    v.into_result()
}

impl Templates {
    async fn with_count(&self, mut t: pb::WorkerTemplate) -> Result<pb::WorkerTemplate, ApiError> {
        t.worker_count = worker_count(&self.app, &t.name).await?;
        Ok(t)
    }

    async fn create(
        &self,
        scope: Scope,
        rid: Option<String>,
        req: pb::CreateTemplateRequest,
    ) -> Result<pb::CreateTemplateResponse, ApiError> {
        let Some(mut input) = req.template else {
            return Err(ApiError::invalid_argument("template", "is required"));
        };
        // Output-only fields are ignored.
        input.id = uuid::Uuid::new_v4().to_string();
        input.is_seeded = false;
        input.worker_count = 0;
        input.resource_version = 0;
        let now = self.app.now();
        input.created_at = Some(timestamp_to_proto(now));
        input.updated_at = Some(timestamp_to_proto(now));
        let mut template = normalize_template(&input, "template")?;
        let origin = scope.origin(METHOD_CREATE, rid.as_deref());
        let mut m = Mutation::at(now);
        m.create(&mut template, Vec::new())?;
        m.audit(
            &template,
            &origin,
            AuditFacts {
                action: ACTION_CREATE.to_owned(),
                ..Default::default()
            },
        );
        self.app.commit(m).await?;
        tracing::info!(template = %template.name, "template created");
        Ok(pb::CreateTemplateResponse {
            template: Some(template),
        })
    }

    async fn get(&self, req: pb::GetTemplateRequest) -> Result<pb::GetTemplateResponse, ApiError> {
        let mut v = Violations::new();
        validate::template_name(&mut v, "template_name", &req.template_name);
        v.into_result()?;
        let t: pb::WorkerTemplate = self.app.get(&req.template_name).await?;
        Ok(pb::GetTemplateResponse {
            template: Some(self.with_count(t).await?),
        })
    }

    async fn list(
        &self,
        req: pb::ListTemplatesRequest,
    ) -> Result<pb::ListTemplatesResponse, ApiError> {
        let mut filters = req.clone();
        filters.page_size = 0;
        filters.page_token.clear();
        let fingerprint = paging::filter_fingerprint(&filters);
        let mut v = Violations::new();
        let page = v.absorb(paging::page_request::<String>(
            PageKind::Templates,
            req.page_size,
            &req.page_token,
            fingerprint,
        ));
        let license = validate::enum_value::<pb::LicenseType>(
            &mut v,
            "license_type",
            req.license_type,
            false,
        );
        if !req.region.is_empty() {
            validate::resource_name(&mut v, "region", &req.region);
        }
        v.into_result()?;
        let (Some(page), Some(license)) = (page, license) else {
            return Err(ApiError::internal_msg("list request not parsed"));
        };
        let mut all = Vec::new();
        let mut token = None;
        let query = Query::new(Kind::Template).with_page_size(SCAN_PAGE_SIZE);
        loop {
            let result = self.app.store.list(query.clone().after(token)).await?;
            for doc in &result.items {
                all.push(decode::<pb::WorkerTemplate>(doc)?);
            }
            match result.next_page_token {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        all.retain(|t| {
            (license == pb::LicenseType::Unspecified || t.license_type == license as i32)
                && (req.region.is_empty() || t.regions.contains(&req.region))
        });
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let start = match &page.cursor {
            Some(after) => all.partition_point(|t| &t.name <= after),
            None => 0,
        };
        let rest = &all[start.min(all.len())..];
        let taken = rest.len().min(page.page_size);
        let next_page_token = match rest.get(taken.saturating_sub(1)) {
            Some(last) if rest.len() > taken => {
                paging::encode_page_token(PageKind::Templates, fingerprint, &last.name)
            }
            _ => String::new(),
        };
        let mut templates = Vec::with_capacity(taken);
        for t in &rest[..taken] {
            templates.push(self.with_count(t.clone()).await?);
        }
        Ok(pb::ListTemplatesResponse {
            templates,
            next_page_token,
        })
    }

    async fn update(
        &self,
        scope: Scope,
        rid: Option<String>,
        req: pb::UpdateTemplateRequest,
    ) -> Result<pb::UpdateTemplateResponse, ApiError> {
        let mut v = Violations::new();
        let Some(input) = req.template else {
            v.add("template", "is required");
            if req.update_mask.is_none() {
                v.add("update_mask", "is required");
            }
            return Err(failure(v));
        };
        validate::template_name(&mut v, "template.name", &input.name);
        if input.resource_version < 0 {
            v.add(
                "template.resource_version",
                format!("must not be negative, got {}", input.resource_version),
            );
        }
        let paths = req
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        let mut scratch = input.clone();
        v.absorb(apply_mask(&mut scratch, &input, &paths));
        v.into_result()?;

        let stored: pb::WorkerTemplate = self.app.get(&input.name).await?;
        if input.resource_version != 0 && input.resource_version != stored.resource_version {
            return Err(ApiError::stale_version(
                "template",
                &input.name,
                input.resource_version,
                stored.resource_version,
            ));
        }
        let mut merged = stored.clone();
        apply_mask(&mut merged, &input, &paths)?;
        let now = self.app.now();
        merged.updated_at = Some(timestamp_to_proto(now));
        let mut template = normalize_template(&merged, "template")?;
        let origin = scope.origin(METHOD_UPDATE, rid.as_deref());
        let mut m = Mutation::at(now);
        m.update(&mut template, ClaimChange::Keep)?;
        m.audit(
            &template,
            &origin,
            AuditFacts {
                action: ACTION_UPDATE.to_owned(),
                details: Some(prost_types::Struct {
                    fields: [(
                        "paths".to_owned(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue(paths.join(","))),
                        },
                    )]
                    .into_iter()
                    .collect(),
                }),
                ..Default::default()
            },
        );
        self.app.commit(m).await?;
        tracing::info!(template = %template.name, paths = %paths.join(","), "template updated");
        Ok(pb::UpdateTemplateResponse {
            template: Some(self.with_count(template).await?),
        })
    }

    async fn delete(
        &self,
        scope: Scope,
        rid: Option<String>,
        req: pb::DeleteTemplateRequest,
    ) -> Result<pb::DeleteTemplateResponse, ApiError> {
        let mut v = Violations::new();
        validate::template_name(&mut v, "template_name", &req.template_name);
        if req.resource_version < 0 {
            v.add(
                "resource_version",
                format!("must not be negative, got {}", req.resource_version),
            );
        }
        v.into_result()?;
        let stored: pb::WorkerTemplate = self.app.get(&req.template_name).await?;
        if req.resource_version != 0 && req.resource_version != stored.resource_version {
            return Err(ApiError::stale_version(
                "template",
                &req.template_name,
                req.resource_version,
                stored.resource_version,
            ));
        }
        let workers = worker_count(&self.app, &stored.name).await?;
        if workers > 0 {
            return Err(in_use(&stored.name, Some(workers)));
        }
        let origin = scope.origin(METHOD_DELETE, rid.as_deref());
        let mut m = Mutation::at(self.app.now());
        // Atomic with the delete: no worker of the template appeared meanwhile.
        m.guard_none(Kind::Worker, workers_of(&stored.name));
        m.delete(&stored);
        m.audit(
            &stored,
            &origin,
            AuditFacts {
                action: ACTION_DELETE.to_owned(),
                ..Default::default()
            },
        );
        self.app.commit(m).await.map_err(|e| match e {
            ApiError::FailedPrecondition { .. } => in_use(&stored.name, None),
            other => other,
        })?;
        tracing::info!(template = %stored.name, "template deleted");
        Ok(pb::DeleteTemplateResponse {
            template: Some(stored),
        })
    }
}

/// `FAILED_PRECONDITION` (`IN_USE`): workers still use template `name`.
fn in_use(name: &str, workers: Option<i32>) -> ApiError {
    let count = workers.map_or_else(|| "workers".to_owned(), |n| format!("{n} worker(s)"));
    ApiError::failed_precondition(
        "IN_USE",
        "worker",
        format!("template {name} is used by {count} that are not TERMINATED; terminate them first"),
    )
    .on_resource("template", name)
}

#[tonic::async_trait]
impl TemplateService for Templates {
    async fn create_template(
        &self,
        request: Request<pb::CreateTemplateRequest>,
    ) -> Result<Response<pb::CreateTemplateResponse>, Status> {
        let scope = caller_of(&request)?;
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let name = req
            .template
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        let span = tracing::info_span!("templates.create", template = %name, caller = %scope.caller.subject);
        self.create(scope, rid, req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn get_template(
        &self,
        request: Request<pb::GetTemplateRequest>,
    ) -> Result<Response<pb::GetTemplateResponse>, Status> {
        caller_of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!("templates.get", template = %req.template_name);
        self.get(req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        caller_of(&request)?;
        let span = tracing::info_span!("templates.list");
        self.list(request.into_inner())
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn update_template(
        &self,
        request: Request<pb::UpdateTemplateRequest>,
    ) -> Result<Response<pb::UpdateTemplateResponse>, Status> {
        let scope = caller_of(&request)?;
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let name = req
            .template
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        let span = tracing::info_span!("templates.update", template = %name, caller = %scope.caller.subject);
        self.update(scope, rid, req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn delete_template(
        &self,
        request: Request<pb::DeleteTemplateRequest>,
    ) -> Result<Response<pb::DeleteTemplateResponse>, Status> {
        let scope = caller_of(&request)?;
        let rid = request_id(&request).map(str::to_owned);
        let req = request.into_inner();
        let span = tracing::info_span!(
            "templates.delete",
            template = %req.template_name,
            caller = %scope.caller.subject
        );
        self.delete(scope, rid, req)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}
