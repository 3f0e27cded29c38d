//! The data model of the store: kinds, documents, index fields, claims, writes, queries and log
//! entries, plus every limit and default as a named constant.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Duration, Timelike, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{StoreError, StoreResult};

/// Page size used when a query asks for 0 (i.e. does not say).
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page a query gets; larger requests are clamped to it (AIP-158 style).
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Most values one `In` filter may list.
pub const MAX_IN_VALUES: usize = 1000;
/// Most ids one [`Store::get_many`](crate::Store::get_many) call may ask for.
pub const MAX_GET_MANY: usize = 1000;
/// Longest document id, in bytes of UTF-8.
pub const MAX_ID_BYTES: usize = 512;
/// Longest index-field value, claim namespace or key, or log-entry string, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Largest document or log-entry body, in bytes of JSON text (MongoDB's own limit is 16 MiB per
/// document; the control plane's entities are a few KiB).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most claims one document may hold.
pub const MAX_CLAIMS_PER_DOCUMENT: usize = 1024;
/// Most writes one transaction (`apply`, or all items of `apply_each` together) may hold.
pub const MAX_WRITES_PER_TRANSACTION: usize = 20_000;

/// Default retention of the audit log (the allowed range is [`AUDIT_RETENTION_MIN`] ..=
/// [`AUDIT_RETENTION_MAX`]: "3 to 12 months", domain.md §7).
pub const AUDIT_RETENTION_DEFAULT: Duration = Duration::days(365);
/// Shortest retention of the audit log: [`Store::purge_log`](crate::Store::purge_log) refuses
/// to delete audit entries younger than this.
pub const AUDIT_RETENTION_MIN: Duration = Duration::days(90);
/// Longest retention of the audit log (MongoDB also expires entries older than this with a TTL
/// index).
pub const AUDIT_RETENTION_MAX: Duration = Duration::days(365);
/// Retention of scaling decisions (domain.md §7: TTL 365 d).
pub const SCALING_RETENTION_DEFAULT: Duration = Duration::days(365);
/// Shortest retention of scaling decisions: a floor against purging by mistake.
pub const SCALING_RETENTION_MIN: Duration = Duration::days(90);
/// Longest retention of scaling decisions (MongoDB's TTL index).
pub const SCALING_RETENTION_MAX: Duration = Duration::days(365);

/// The kinds of documents the control plane stores. Each kind is its own id space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// A lablet definition (one document per version).
    Definition,
    /// A lablet instance (a reservation and its lifecycle).
    Instance,
    /// A CML worker.
    Worker,
    /// A worker template.
    Template,
    /// A long-running operation on a worker (start, stop, drain…).
    WorkerOperation,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 5] = [
        Kind::Definition,
        Kind::Instance,
        Kind::Worker,
        Kind::Template,
        Kind::WorkerOperation,
    ];

    /// The stable name (stored in SQLite, shown in errors).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Definition => "definition",
            Kind::Instance => "instance",
            Kind::Worker => "worker",
            Kind::Template => "template",
            Kind::WorkerOperation => "worker_operation",
        }
    }

    /// The MongoDB collection (domain.md §7).
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Definition => "lablet_definitions",
            Kind::Instance => "lablet_instances",
            Kind::Worker => "cml_workers",
            Kind::Template => "worker_templates",
            Kind::WorkerOperation => "worker_operations",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = StoreError;

    fn from_str(s: &str) -> StoreResult<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| StoreError::Backend(format!("unknown document kind {s:?}")))
    }
}

/// The append-only logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum LogKind {
    /// The audit trail (who did what; CloudEvents received).
    Audit,
    /// The autoscaler's decisions.
    ScalingDecision,
}

impl LogKind {
    /// Every log kind.
    pub const ALL: [LogKind; 2] = [LogKind::Audit, LogKind::ScalingDecision];

    /// The stable name (stored in SQLite, shown in errors).
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::Audit => "audit",
            LogKind::ScalingDecision => "scaling_decision",
        }
    }

    /// The MongoDB collection (domain.md §7).
    pub fn collection(self) -> &'static str {
        match self {
            LogKind::Audit => "audit_events",
            LogKind::ScalingDecision => "scaling_audit_events",
        }
    }

    /// The retention the control plane uses unless configured otherwise.
    pub fn default_retention(self) -> Duration {
        match self {
            LogKind::Audit => AUDIT_RETENTION_DEFAULT,
            LogKind::ScalingDecision => SCALING_RETENTION_DEFAULT,
        }
    }

    /// The shortest retention allowed: [`Store::purge_log`](crate::Store::purge_log) never
    /// deletes younger entries.
    pub fn min_retention(self) -> Duration {
        match self {
            LogKind::Audit => AUDIT_RETENTION_MIN,
            LogKind::ScalingDecision => SCALING_RETENTION_MIN,
        }
    }

    /// The longest retention (MongoDB's TTL index expires older entries by itself).
    pub fn max_retention(self) -> Duration {
        match self {
            LogKind::Audit => AUDIT_RETENTION_MAX,
            LogKind::ScalingDecision => SCALING_RETENTION_MAX,
        }
    }
}

impl fmt::Display for LogKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogKind {
    type Err = StoreError;

    fn from_str(s: &str) -> StoreResult<LogKind> {
        LogKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| StoreError::Backend(format!("unknown log kind {s:?}")))
    }
}

/// A document or log-entry body: the text of a JSON object, kept byte for byte.
///
/// The store never looks inside; it stores the text as is (a TEXT column in SQLite, a string
/// field in MongoDB), so keys with `$` or `.`, any unicode and any formatting come back
/// byte-identical.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Body(String);

impl Body {
    /// Checks that `text` is one JSON object (and at most [`MAX_BODY_BYTES`]) and keeps it.
    pub fn from_json_text(text: impl Into<String>) -> StoreResult<Body> {
        let text = text.into();
        check_body_text(&text)?;
        Ok(Body(text))
    }

    /// Serialises `value` (which must serialise to a JSON object).
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> StoreResult<Body> {
        let text = serde_json::to_string(value)
            .map_err(|e| StoreError::InvalidInput(format!("body does not serialise: {e}")))?;
        Body::from_json_text(text)
    }

    /// The empty object `{}`.
    pub fn empty_object() -> Body {
        Body("{}".to_owned())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The JSON text, owned.
    pub fn into_string(self) -> String {
        self.0
    }

    /// Length of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty (never true for a valid body).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the text into `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> StoreResult<T> {
        serde_json::from_str(&self.0)
            .map_err(|e| StoreError::InvalidInput(format!("body does not parse: {e}")))
    }

    /// Parses the text into a [`serde_json::Value`].
    pub fn to_value(&self) -> StoreResult<serde_json::Value> {
        self.parse()
    }

    /// Wraps text read back from a backend without re-validating it (it was validated on write).
    pub(crate) fn from_stored(text: String) -> Body {
        Body(text)
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 200;
        if self.0.len() <= SHOWN {
            write!(f, "Body({})", self.0)
        } else {
            let mut end = SHOWN;
            while !self.0.is_char_boundary(end) {
                end -= 1;
            }
            write!(f, "Body({}… {} bytes)", &self.0[..end], self.0.len())
        }
    }
}

impl fmt::Display for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&serde_json::Value> for Body {
    /// Serialises a value. Not validated as an object: use [`Body::from_json_text`] or
    /// [`Body::from_serialize`] for untrusted values (a write with a non-object body is refused).
    fn from(value: &serde_json::Value) -> Body {
        Body(value.to_string())
    }
}

fn check_body_text(text: &str) -> StoreResult<()> {
    if text.len() > MAX_BODY_BYTES {
        return Err(StoreError::InvalidInput(format!(
            "body is {} bytes, the limit is {MAX_BODY_BYTES}",
            text.len()
        )));
    }
    if !text.trim_start().starts_with('{') {
        return Err(StoreError::InvalidInput(
            "body must be a JSON object".to_owned(),
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| StoreError::InvalidInput(format!("body is not valid JSON: {e}")))?;
    Ok(())
}

pub(crate) fn check_body(body: &Body) -> StoreResult<()> {
    check_body_text(&body.0)
}

/// The string-valued index fields (see [`IndexFields`]); what filters name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum IndexField {
    /// [`IndexFields::name`].
    Name,
    /// [`IndexFields::version_key`].
    VersionKey,
    /// [`IndexFields::state`].
    State,
    /// [`IndexFields::worker_id`].
    WorkerId,
    /// [`IndexFields::owner_id`].
    OwnerId,
    /// [`IndexFields::definition_id`].
    DefinitionId,
    /// [`IndexFields::template_name`].
    TemplateName,
}

impl IndexField {
    /// Every string index field.
    pub const ALL: [IndexField; 7] = [
        IndexField::Name,
        IndexField::VersionKey,
        IndexField::State,
        IndexField::WorkerId,
        IndexField::OwnerId,
        IndexField::DefinitionId,
        IndexField::TemplateName,
    ];

    /// The column (SQLite) and field (MongoDB) name.
    pub fn column(self) -> &'static str {
        match self {
            IndexField::Name => "name",
            IndexField::VersionKey => "version_key",
            IndexField::State => "state",
            IndexField::WorkerId => "worker_id",
            IndexField::OwnerId => "owner_id",
            IndexField::DefinitionId => "definition_id",
            IndexField::TemplateName => "template_name",
        }
    }

    /// This field's value in `fields`.
    pub fn get(self, fields: &IndexFields) -> Option<&str> {
        match self {
            IndexField::Name => fields.name.as_deref(),
            IndexField::VersionKey => fields.version_key.as_deref(),
            IndexField::State => fields.state.as_deref(),
            IndexField::WorkerId => fields.worker_id.as_deref(),
            IndexField::OwnerId => fields.owner_id.as_deref(),
            IndexField::DefinitionId => fields.definition_id.as_deref(),
            IndexField::TemplateName => fields.template_name.as_deref(),
        }
    }
}

/// The few fields of a document the control plane queries and orders by. The control plane
/// copies them out of the body on every write; the store indexes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IndexFields {
    /// Resource name (definitions, templates, workers).
    pub name: Option<String>,
    /// A sortable version string (e.g. zero-padded semver of a definition); orders
    /// [`Order::VersionDesc`].
    pub version_key: Option<String>,
    /// Lifecycle state (instances, workers, operations).
    pub state: Option<String>,
    /// The worker an instance or operation is on.
    pub worker_id: Option<String>,
    /// The owner of an instance.
    pub owner_id: Option<String>,
    /// The definition an instance was made from.
    pub definition_id: Option<String>,
    /// The template a worker was made from.
    pub template_name: Option<String>,
    /// A number to order by with [`Order::SortKeyAsc`] and to filter by range (e.g. an
    /// instance's slot start in epoch milliseconds).
    pub sort_key: Option<i64>,
}

/// The part of a document the caller writes: what it is, and its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentData {
    /// The kind (each kind is its own id space).
    pub kind: Kind,
    /// The id: 1..=[`MAX_ID_BYTES`] bytes of UTF-8, no NUL.
    pub id: String,
    /// The fields the store indexes.
    pub index: IndexFields,
    /// The content (the entity's canonical proto3 JSON).
    pub body: Body,
}

impl DocumentData {
    /// A document with no index fields.
    pub fn new(kind: Kind, id: impl Into<String>, body: Body) -> DocumentData {
        DocumentData {
            kind,
            id: id.into(),
            index: IndexFields::default(),
            body,
        }
    }

    /// The same document with these index fields.
    pub fn with_index(mut self, index: IndexFields) -> DocumentData {
        self.index = index;
        self
    }
}

/// A stored document: the caller's data plus what the store manages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// The kind.
    pub kind: Kind,
    /// The id.
    pub id: String,
    /// The index fields as last written.
    pub index: IndexFields,
    /// The body as last written, byte for byte.
    pub body: Body,
    /// Starts at 1 on create, +1 on every update.
    pub resource_version: i64,
    /// Creation sequence: increases with every create of this kind and never changes
    /// afterwards. Together with the id it orders documents by creation ([`Order::CreatedAsc`]).
    /// SQLite gives a strictly increasing counter per kind; MongoDB a per-process monotonic
    /// microsecond clock. Only comparable within one kind.
    pub seq: i64,
    /// When the document was created (millisecond precision).
    pub created_at: DateTime<Utc>,
    /// When the document was last written (millisecond precision).
    pub updated_at: DateTime<Utc>,
}

impl Document {
    /// The caller-owned part, e.g. to modify and write back.
    pub fn data(&self) -> DocumentData {
        DocumentData {
            kind: self.kind,
            id: self.id.clone(),
            index: self.index.clone(),
            body: self.body.clone(),
        }
    }
}

/// A unique key owned by one document, e.g. `("definition_name_version", "my-lab@1.2.0")` or
/// `("port", "<worker_id>/2001")`. At most one document holds a given `(namespace, key)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Claim {
    /// What kind of uniqueness this is (1..=[`MAX_TEXT_BYTES`] bytes, no NUL).
    pub namespace: String,
    /// The unique value within the namespace (1..=[`MAX_TEXT_BYTES`] bytes, no NUL).
    pub key: String,
}

impl Claim {
    /// A claim.
    pub fn new(namespace: impl Into<String>, key: impl Into<String>) -> Claim {
        Claim {
            namespace: namespace.into(),
            key: key.into(),
        }
    }
}

/// Who holds a claim.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClaimHolder {
    /// The holder's kind.
    pub kind: Kind,
    /// The holder's id.
    pub id: String,
}

/// What an update does to the document's claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ClaimChange {
    /// Keep the claims the document holds.
    #[default]
    Keep,
    /// Hold exactly these claims afterwards: claims no longer listed are released, new ones
    /// acquired (failing with [`StoreError::ClaimTaken`] if another document holds one).
    Replace(Vec<Claim>),
}

/// An entry of an append-only log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Unique id.
    pub id: Uuid,
    /// When it happened. Stored with millisecond precision (MongoDB dates are milliseconds);
    /// [`LogEntry::new`] truncates, and an entry with finer precision is truncated on append.
    pub at: DateTime<Utc>,
    /// What kind of resource it is about (free text, e.g. `instance`, `cloudevent`).
    pub resource_kind: String,
    /// Which resource it is about.
    pub resource_id: String,
    /// Who did it (user, service identity, `controller`…).
    pub actor: String,
    /// What was done (e.g. `instance.create`, `scale_up`).
    pub action: String,
    /// Details (a JSON object).
    pub body: Body,
}

impl LogEntry {
    /// An entry with a fresh random id, happening now.
    pub fn new(
        resource_kind: impl Into<String>,
        resource_id: impl Into<String>,
        actor: impl Into<String>,
        action: impl Into<String>,
        body: Body,
    ) -> LogEntry {
        LogEntry {
            id: Uuid::new_v4(),
            at: truncate_to_millis(Utc::now()),
            resource_kind: resource_kind.into(),
            resource_id: resource_id.into(),
            actor: actor.into(),
            action: action.into(),
            body,
        }
    }

    /// The same entry happening at `at` (truncated to milliseconds).
    pub fn at(mut self, at: DateTime<Utc>) -> LogEntry {
        self.at = truncate_to_millis(at);
        self
    }
}

/// `t` without its sub-millisecond part.
pub fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.nanosecond();
    t.with_nanosecond(nanos - nanos % 1_000_000).unwrap_or(t)
}

/// One write of a transaction. Writes run in order; each sees the effects of the ones before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Create a document (resource_version 1) holding `claims`.
    /// Fails with [`StoreError::AlreadyExists`] or [`StoreError::ClaimTaken`].
    Create {
        /// The document.
        doc: DocumentData,
        /// The claims it holds.
        claims: Vec<Claim>,
    },
    /// Replace a document's index fields and body (resource_version + 1).
    /// Fails with [`StoreError::NotFound`], [`StoreError::Conflict`] or
    /// [`StoreError::ClaimTaken`].
    Update {
        /// The new content (kind and id say which document).
        doc: DocumentData,
        /// The version the document must be at; 0 = don't check.
        expected_version: i64,
        /// What happens to its claims.
        claims: ClaimChange,
    },
    /// Delete a document and release its claims.
    /// Fails with [`StoreError::NotFound`] or [`StoreError::Conflict`].
    Delete {
        /// The kind.
        kind: Kind,
        /// The id.
        id: String,
        /// The version the document must be at; 0 = don't check.
        expected_version: i64,
    },
    /// Assert that a document exists (at `expected_version`, unless 0) without writing it.
    /// Fails with [`StoreError::NotFound`] or [`StoreError::Conflict`].
    Guard {
        /// The kind.
        kind: Kind,
        /// The id.
        id: String,
        /// The version the document must be at; 0 = only check it exists.
        expected_version: i64,
    },
    /// Assert that no document of `kind` matches `filters` (e.g. no worker uses a template).
    /// Fails with [`StoreError::GuardFailed`].
    GuardNoneMatch {
        /// The kind.
        kind: Kind,
        /// All must match (AND) for a document to count.
        filters: Vec<Filter>,
    },
    /// Append an entry to a log; it commits with the rest of the transaction.
    /// Fails with [`StoreError::AlreadyExists`] if the id is taken.
    Append {
        /// Which log.
        log: LogKind,
        /// The entry.
        entry: LogEntry,
    },
}

impl Write {
    /// A create without claims.
    pub fn create(doc: DocumentData) -> Write {
        Write::Create {
            doc,
            claims: Vec::new(),
        }
    }

    /// An update that keeps the claims.
    pub fn update(doc: DocumentData, expected_version: i64) -> Write {
        Write::Update {
            doc,
            expected_version,
            claims: ClaimChange::Keep,
        }
    }

    /// A delete.
    pub fn delete(kind: Kind, id: impl Into<String>, expected_version: i64) -> Write {
        Write::Delete {
            kind,
            id: id.into(),
            expected_version,
        }
    }

    /// A guard.
    pub fn guard(kind: Kind, id: impl Into<String>, expected_version: i64) -> Write {
        Write::Guard {
            kind,
            id: id.into(),
            expected_version,
        }
    }

    /// An append.
    pub fn append(log: LogKind, entry: LogEntry) -> Write {
        Write::Append { log, entry }
    }
}

/// What one [`Write`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The document as created.
    Created(Document),
    /// The document as updated.
    Updated(Document),
    /// The document was deleted; it was at `resource_version`.
    Deleted {
        /// The kind.
        kind: Kind,
        /// The id.
        id: String,
        /// The version it had when deleted.
        resource_version: i64,
    },
    /// The guard held; the document is at `resource_version`.
    Guarded {
        /// The kind.
        kind: Kind,
        /// The id.
        id: String,
        /// Its version.
        resource_version: i64,
    },
    /// The none-match guard held.
    NoneMatched {
        /// The kind it looked at.
        kind: Kind,
    },
    /// The entry was appended.
    Appended {
        /// The log.
        log: LogKind,
        /// The entry's id.
        id: Uuid,
        /// The entry's time as stored (milliseconds).
        at: DateTime<Utc>,
    },
}

impl Applied {
    /// The document, for `Created` and `Updated`.
    pub fn document(&self) -> Option<&Document> {
        match self {
            Applied::Created(d) | Applied::Updated(d) => Some(d),
            _ => None,
        }
    }
}

/// A condition on a document's index fields. A query's filters are ANDed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Filter {
    /// The field equals the value (a document without the field never matches).
    Eq(IndexField, String),
    /// The field equals one of the values (an empty list matches nothing). At most
    /// [`MAX_IN_VALUES`] values.
    In(IndexField, Vec<String>),
    /// The field is not set.
    Missing(IndexField),
    /// `sort_key >= n` (a document without a sort key never matches).
    SortKeyAtLeast(i64),
    /// `sort_key < n` (a document without a sort key never matches).
    SortKeyBefore(i64),
}

impl Filter {
    /// `field == value`.
    pub fn eq(field: IndexField, value: impl Into<String>) -> Filter {
        Filter::Eq(field, value.into())
    }

    /// `field IN values`.
    pub fn any_of<I, S>(field: IndexField, values: I) -> Filter
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Filter::In(field, values.into_iter().map(Into::into).collect())
    }

    /// Whether a document with these index fields matches (the reference semantics both
    /// backends implement).
    pub fn matches(&self, fields: &IndexFields) -> bool {
        match self {
            Filter::Eq(f, v) => f.get(fields) == Some(v.as_str()),
            Filter::In(f, vs) => f.get(fields).is_some_and(|x| vs.iter().any(|v| v == x)),
            Filter::Missing(f) => f.get(fields).is_none(),
            Filter::SortKeyAtLeast(n) => fields.sort_key.is_some_and(|k| k >= *n),
            Filter::SortKeyBefore(n) => fields.sort_key.is_some_and(|k| k < *n),
        }
    }
}

/// How a list is ordered. Every order is total (ties broken by creation sequence and id), which
/// is what makes keyset page tokens exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum Order {
    /// By creation: oldest first.
    #[default]
    CreatedAsc,
    /// By `sort_key` ascending (documents without one first), then by creation.
    SortKeyAsc,
    /// By `version_key` descending (documents without one last), then newest first.
    VersionDesc,
}

/// A list query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The kind to list.
    pub kind: Kind,
    /// Conditions, ANDed.
    pub filters: Vec<Filter>,
    /// The order.
    pub order: Order,
    /// Items per page: 0 means [`DEFAULT_PAGE_SIZE`], more than [`MAX_PAGE_SIZE`] is clamped.
    pub page_size: u32,
    /// The `next_page_token` of the previous page (of the same query), or `None` for the first.
    pub page_token: Option<String>,
}

impl Query {
    /// All documents of `kind`, by creation, default page size.
    pub fn new(kind: Kind) -> Query {
        Query {
            kind,
            filters: Vec::new(),
            order: Order::default(),
            page_size: 0,
            page_token: None,
        }
    }

    /// Adds a filter.
    pub fn with_filter(mut self, filter: Filter) -> Query {
        self.filters.push(filter);
        self
    }

    /// Sets the order.
    pub fn ordered_by(mut self, order: Order) -> Query {
        self.order = order;
        self
    }

    /// Sets the page size.
    pub fn with_page_size(mut self, page_size: u32) -> Query {
        self.page_size = page_size;
        self
    }

    /// Continues after a previous page.
    pub fn after(mut self, page_token: Option<String>) -> Query {
        self.page_token = page_token;
        self
    }
}

/// The page size a request for `requested` gets.
pub fn effective_page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// One page of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The documents, in the query's order.
    pub items: Vec<Document>,
    /// Pass this as `page_token` for the next page; `None` when this is the last page.
    pub next_page_token: Option<String>,
}

/// A query over a log. Entries come newest first (by `at`, then id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Only entries about this kind of resource.
    pub resource_kind: Option<String>,
    /// Only entries about this resource id.
    pub resource_id: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only entries strictly before this time.
    pub until: Option<DateTime<Utc>>,
    /// Entries per page: 0 means [`DEFAULT_PAGE_SIZE`], more than [`MAX_PAGE_SIZE`] is clamped.
    pub page_size: u32,
    /// The `next_page_token` of the previous page, or `None` for the first.
    pub page_token: Option<String>,
}

/// One page of a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPage {
    /// The entries, newest first.
    pub entries: Vec<LogEntry>,
    /// Pass this as `page_token` for the next page; `None` when this is the last page.
    pub next_page_token: Option<String>,
}
