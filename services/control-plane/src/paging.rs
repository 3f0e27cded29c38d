//! Paging: `page_size` rules and opaque `page_token`s.
//!
//! # Page sizes
//!
//! Each list call has a default and a maximum ([`PageKind::limits`], the numbers the contracts
//! give). [`page_size`]: `0` → the default; above the maximum → **clamped** to the maximum (as
//! AIP-158 recommends: a client asking for too much still gets a page); negative →
//! `INVALID_ARGUMENT` on `page_size`.
//!
//! # Page tokens
//!
//! A token is opaque to clients. Inside it is
//!
//! ```text
//! base64url( [format version: 1 byte] [JSON {"k": kind, "f": filter fingerprint, "c": cursor}]
//!            [checksum: first 8 bytes of SHA-256 over everything before it] )
//! ```
//!
//! * the **kind** tag ([`PageKind`]) stops a token of one list call being fed to another
//!   (a `ListWorkers` token given to `ListInstances` is `INVALID_ARGUMENT` on `page_token`);
//! * the **filter fingerprint** ([`filter_fingerprint`]) stops a client changing the filters
//!   between pages (the contracts say they must not change);
//! * the **checksum** rejects truncated, edited or made-up tokens. It is not a MAC: a client that
//!   reverse-engineers the format can mint a token, but a token only carries a position in a
//!   listing the caller is allowed to read anyway (authorisation and owner scoping are applied
//!   to every page), so forging one gains nothing;
//! * the **cursor** is whatever the handler needs to resume (typically the sort key of the last
//!   item returned): any `Serialize + DeserializeOwned` type.
//!
//! ```
//! use ccm_control_plane::paging::{self, PageKind};
//!
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct After { name: String }
//!
//! let fp = 42; // paging::filter_fingerprint(&request_without_paging_fields)
//! let token = paging::encode_page_token(PageKind::Workers, fp, &After { name: "w-7".into() });
//! let page = paging::page_request::<After>(PageKind::Workers, 0, &token, fp).unwrap();
//! assert_eq!(page.page_size, 100);
//! assert_eq!(page.cursor, Some(After { name: "w-7".into() }));
//! assert!(paging::page_request::<After>(PageKind::Instances, 0, &token, fp).is_err());
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::validate::Violations;

/// Format version written as the first byte of every token.
pub const PAGE_TOKEN_VERSION: u8 = 1;
/// Longest token accepted (tokens ccm issues are far shorter).
pub const MAX_PAGE_TOKEN_LEN: usize = 4096;
/// Bytes of the checksum at the end of a token.
const CHECKSUM_LEN: usize = 8;
/// Domain separator of the checksum, so a token checksum is not a plain hash of its body.
const CHECKSUM_DOMAIN: &[u8] = b"ccm.page_token.v1";

/// Field path of page sizes in list requests.
pub const PAGE_SIZE_FIELD: &str = "page_size";
/// Field path of page tokens in list requests.
pub const PAGE_TOKEN_FIELD: &str = "page_token";

/// Default and maximum page size of a list call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimits {
    /// Used when the request's page_size is 0.
    pub default: usize,
    /// Larger requests are clamped to this.
    pub max: usize,
}

/// ListDefinitions: 1..500, default 50 (definition.proto).
pub const DEFINITIONS_PAGE: PageLimits = PageLimits {
    default: 50,
    max: 500,
};
/// ListDefinitionVersions: 1..500, default 50.
pub const DEFINITION_VERSIONS_PAGE: PageLimits = PageLimits {
    default: 50,
    max: 500,
};
/// ListInstances: 1..1000, default 100 (instance.proto).
pub const INSTANCES_PAGE: PageLimits = PageLimits {
    default: 100,
    max: 1000,
};
/// ListWorkers: 1..1000, default 100 (worker.proto).
pub const WORKERS_PAGE: PageLimits = PageLimits {
    default: 100,
    max: 1000,
};
/// ListWorkerLabs: 1..500, default 100.
pub const WORKER_LABS_PAGE: PageLimits = PageLimits {
    default: 100,
    max: 500,
};
/// ListWorkerOperations: 1..500, default 50.
pub const WORKER_OPERATIONS_PAGE: PageLimits = PageLimits {
    default: 50,
    max: 500,
};
/// ListTemplates: 1..500, default 100 (template.proto).
pub const TEMPLATES_PAGE: PageLimits = PageLimits {
    default: 100,
    max: 500,
};
/// ListAuditRecords: 1..1000, default 100 (event.proto).
pub const AUDIT_RECORDS_PAGE: PageLimits = PageLimits {
    default: 100,
    max: 1000,
};
/// ListScalingDecisions / ListScalingDecisionHistory: 1..1000, default 100.
pub const SCALING_DECISIONS_PAGE: PageLimits = PageLimits {
    default: 100,
    max: 1000,
};

/// Which list call a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// DefinitionService.ListDefinitions.
    Definitions,
    /// DefinitionService.ListDefinitionVersions.
    DefinitionVersions,
    /// InstanceService.ListInstances.
    Instances,
    /// WorkerService.ListWorkers.
    Workers,
    /// WorkerService.ListWorkerLabs.
    WorkerLabs,
    /// WorkerService.ListWorkerOperations.
    WorkerOperations,
    /// TemplateService.ListTemplates.
    Templates,
    /// EventService.ListAuditRecords.
    AuditRecords,
    /// ControllerService.ListScalingDecisions and InternalService.ListScalingDecisionHistory.
    ScalingDecisions,
}

impl PageKind {
    /// Every kind.
    pub const ALL: [PageKind; 9] = [
        PageKind::Definitions,
        PageKind::DefinitionVersions,
        PageKind::Instances,
        PageKind::Workers,
        PageKind::WorkerLabs,
        PageKind::WorkerOperations,
        PageKind::Templates,
        PageKind::AuditRecords,
        PageKind::ScalingDecisions,
    ];

    /// The tag written into tokens.
    pub fn tag(self) -> &'static str {
        match self {
            PageKind::Definitions => "definitions",
            PageKind::DefinitionVersions => "definition_versions",
            PageKind::Instances => "instances",
            PageKind::Workers => "workers",
            PageKind::WorkerLabs => "worker_labs",
            PageKind::WorkerOperations => "worker_operations",
            PageKind::Templates => "templates",
            PageKind::AuditRecords => "audit_records",
            PageKind::ScalingDecisions => "scaling_decisions",
        }
    }

    /// Default and maximum page size.
    pub fn limits(self) -> PageLimits {
        match self {
            PageKind::Definitions => DEFINITIONS_PAGE,
            PageKind::DefinitionVersions => DEFINITION_VERSIONS_PAGE,
            PageKind::Instances => INSTANCES_PAGE,
            PageKind::Workers => WORKERS_PAGE,
            PageKind::WorkerLabs => WORKER_LABS_PAGE,
            PageKind::WorkerOperations => WORKER_OPERATIONS_PAGE,
            PageKind::Templates => TEMPLATES_PAGE,
            PageKind::AuditRecords => AUDIT_RECORDS_PAGE,
            PageKind::ScalingDecisions => SCALING_DECISIONS_PAGE,
        }
    }
}

/// The effective page size: 0 → `limits.default`, above `limits.max` → `limits.max`, negative →
/// `INVALID_ARGUMENT` on `page_size`.
pub fn page_size(raw: i32, limits: PageLimits) -> Result<usize, ApiError> {
    match usize::try_from(raw) {
        Err(_) => Err(ApiError::invalid_argument(
            PAGE_SIZE_FIELD,
            format!("must not be negative, got {raw}"),
        )),
        Ok(0) => Ok(limits.default),
        Ok(n) => Ok(n.min(limits.max)),
    }
}

/// A fingerprint of a list request's filters: the first 8 bytes of SHA-256 over its protobuf
/// encoding. Clear `page_size` and `page_token` before calling (they change between pages).
/// The list requests of the contracts have no map fields, so their encoding is deterministic.
pub fn filter_fingerprint(filters: &impl prost::Message) -> u64 {
    let digest = Sha256::digest(filters.encode_to_vec());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[derive(serde::Serialize)]
struct BodyOut<'a, C> {
    k: &'a str,
    f: String,
    c: &'a C,
}

#[derive(serde::Deserialize)]
struct BodyIn<C> {
    k: String,
    f: String,
    c: C,
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut hasher = Sha256::new();
    hasher.update(CHECKSUM_DOMAIN);
    hasher.update(bytes);
    let digest = hasher.finalize();
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

/// A token for the page after `cursor` of a `kind` listing with filters `fingerprint`.
///
/// Serialising a cursor cannot fail for the plain structs handlers use; should it, the token
/// degrades to an empty cursor (`null`), which decodes as an error rather than a wrong page.
pub fn encode_page_token<C: Serialize>(kind: PageKind, fingerprint: u64, cursor: &C) -> String {
    let body = BodyOut {
        k: kind.tag(),
        f: format!("{fingerprint:016x}"),
        c: cursor,
    };
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"null".to_vec());
    let mut bytes = Vec::with_capacity(1 + json.len() + CHECKSUM_LEN);
    bytes.push(PAGE_TOKEN_VERSION);
    bytes.extend_from_slice(&json);
    let sum = checksum(&bytes);
    bytes.extend_from_slice(&sum);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn bad_token(why: impl Into<String>) -> ApiError {
    ApiError::invalid_argument(PAGE_TOKEN_FIELD, why)
}

/// The cursor in `token`, checked against the listing it is used for. An empty token is the
/// first page (`Ok(None)`). Every refusal is `INVALID_ARGUMENT` on `page_token`.
pub fn decode_page_token<C: DeserializeOwned>(
    token: &str,
    kind: PageKind,
    fingerprint: u64,
) -> Result<Option<C>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > MAX_PAGE_TOKEN_LEN {
        return Err(bad_token("is too long to be a page token issued by ccm"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad_token("is not a page token issued by ccm (not base64url)"))?;
    if bytes.len() < 1 + CHECKSUM_LEN {
        return Err(bad_token("is not a page token issued by ccm (too short)"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if checksum(body) != sum {
        return Err(bad_token(
            "is corrupted or was modified; use next_page_token exactly as returned",
        ));
    }
    if body[0] != PAGE_TOKEN_VERSION {
        return Err(bad_token(format!(
            "has format version {} which this server does not read; start over with an empty \
             page_token",
            body[0]
        )));
    }
    let parsed: BodyIn<serde_json::Value> = serde_json::from_slice(&body[1..])
        .map_err(|_| bad_token("is not a page token issued by ccm (bad payload)"))?;
    if parsed.k != kind.tag() {
        return Err(bad_token(format!(
            "was issued for a different list call ({}), not {}",
            parsed.k,
            kind.tag()
        )));
    }
    if parsed.f != format!("{fingerprint:016x}") {
        return Err(bad_token(
            "was issued for different filters; keep the filters unchanged between pages or start \
             over with an empty page_token",
        ));
    }
    serde_json::from_value(parsed.c)
        .map(Some)
        .map_err(|_| bad_token("does not hold a position of this list call"))
}

/// A validated paging request: the effective size and the cursor to resume after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest<C> {
    /// Items to return at most.
    pub page_size: usize,
    /// Where to resume; `None` for the first page.
    pub cursor: Option<C>,
}

/// Both paging fields of a list request at once (both problems reported together).
pub fn page_request<C: DeserializeOwned>(
    kind: PageKind,
    raw_page_size: i32,
    page_token: &str,
    fingerprint: u64,
) -> Result<PageRequest<C>, ApiError> {
    let mut v = Violations::new();
    let size = v.absorb(page_size(raw_page_size, kind.limits()));
    let cursor = v.absorb(decode_page_token(page_token, kind, fingerprint));
    let value = (|| {
        Some(PageRequest {
            page_size: size?,
            cursor: cursor?,
        })
    })();
    v.finish_some(value)
}

/// The `next_page_token` of a page: a token after `last` when the page was full (`returned ==
/// page_size`; there may be more), else empty (the last page).
pub fn next_page_token<C: Serialize>(
    kind: PageKind,
    fingerprint: u64,
    returned: usize,
    page_size: usize,
    last: Option<&C>,
) -> String {
    match last {
        Some(last) if returned >= page_size && page_size > 0 => {
            encode_page_token(kind, fingerprint, last)
        }
        _ => String::new(),
    }
}
