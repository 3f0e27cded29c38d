//! [`MongoStore`]: the production backend (MongoDB replica set).
//!
//! # Layout
//!
//! One collection per [`Kind`] and per [`LogKind`] (names from domain.md §7), plus `claims`
//! and `migrations`:
//!
//! - documents: `{_id: id, resource_version, seq, created_at, updated_at, name, version_key,
//!   state, worker_id, owner_id, definition_id, template_name, sort_key, ord_sort, ord_version,
//!   body}`. Unset index fields are stored as `null`. `body` is the JSON **text** (a string):
//!   the store never interprets it, so keys with `$` or `.` are inert and the text reads back
//!   byte-identical.
//! - `claims`: `{namespace, key, owner_kind, owner_id}`, unique index on `(namespace, key)`.
//! - `audit_events`, `scaling_audit_events`: `{_id: uuid, at: Date, resource_kind,
//!   resource_id, actor, action, body}`; a TTL index on `at` expires entries after the log's
//!   [`max_retention`](LogKind::max_retention) as a backstop to [`Store::purge_log`].
//! - `migrations`: `{_id: "ccm-store", schema_version}`.
//! - `locks`: `{_id: <kind>, n}`, conflict markers (see [Isolation](#isolation)).
//!
//! Indexes (created at connect, idempotent) are the shared list of `schema.rs` (domain.md §7
//! adapted to the index fields, the same as SQLite's), plus `{seq, _id}` on every document
//! collection. Uniqueness that the old design put into unique indexes (definition name +
//! version, template name) is expressed with claims, exactly as in SQLite.
//!
//! # Transactions
//!
//! Every `apply`/`apply_each` is one multi-document transaction (snapshot read concern, majority
//! write concern), which needs a **replica set** (a single-node one is fine:
//! `mongod --replSet rs0` + `rs.initiate()`); [`MongoStore::connect`] refuses a standalone
//! server. Each write first reads what it depends on (version, claims, guard) inside the
//! transaction and only writes if its preconditions hold, so a refused write never aborts the
//! server-side transaction. For `apply_each`, each item records what it changed and a failing
//! item is undone inside the transaction (the equivalent of SQLite's savepoints) before the next
//! item runs. Transient transaction errors (write conflicts with concurrent transactions) and
//! duplicate-key races restart the whole transaction, up to [`MONGO_TXN_MAX_ATTEMPTS`] times;
//! a stale expected version then shows up as [`StoreError::Conflict`] on the retry.
//!
//! # Isolation
//!
//! MongoDB transactions are snapshot-isolated, SQLite's (one writer) are serializable. Two
//! conflict markers make every outcome one that SQLite could also produce:
//!
//! - [`Write::Guard`] increments a hidden counter on the guarded document, so a transaction that
//!   changes that document concurrently conflicts with the guard (one of them restarts and then
//!   sees the other's result).
//! - [`Write::GuardNoneMatch`] checks a predicate, which MongoDB cannot lock. Every write that
//!   can make a document of a kind newly match a predicate (a create, or an update that changes
//!   the index fields) and every `GuardNoneMatch` on that kind increment the kind's counter in
//!   `locks`, so a guard never commits next to a concurrent write that would have failed it
//!   (no write skew). Body-only updates and deletes do not touch it.
//!
//! The price is that MongoDB serialises creates and index-changing updates per kind, which is
//! what SQLite does for all writes anyway.
//!
//! # Creation order
//!
//! `seq` is a per-process strictly increasing microsecond clock; ties between processes are
//! broken by `_id`, so every order stays total and page tokens exact.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document as BsonDoc, doc};
use mongodb::error::{
    ErrorKind, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT, WriteFailure,
};
use mongodb::options::{ClientOptions, IndexOptions, ReadConcern, WriteConcern};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use uuid::Uuid;

use crate::error::{StoreError, StoreResult};
use crate::model::{
    Applied, Body, Claim, ClaimChange, ClaimHolder, Document, DocumentData, Filter, IndexFields,
    Kind, LogEntry, LogKind, LogPage, LogQuery, Order, Page, Query, Write, effective_page_size,
    truncate_to_millis,
};
use crate::store::{Store, check_purge_cutoff, is_item_failure};
use crate::token::{self, DocCursor, LogCursor};
use crate::validate;

/// How many times a transaction is restarted after a transient error before the call fails
/// with [`StoreError::Unavailable`].
pub const MONGO_TXN_MAX_ATTEMPTS: u32 = 20;
/// First back-off between transaction attempts (doubles each time, capped by
/// [`MONGO_TXN_MAX_BACKOFF`]).
pub const MONGO_TXN_BASE_BACKOFF: Duration = Duration::from_millis(2);
/// Longest back-off between transaction attempts.
pub const MONGO_TXN_MAX_BACKOFF: Duration = Duration::from_millis(200);
/// How many times a commit with an unknown result is retried.
pub const MONGO_COMMIT_MAX_ATTEMPTS: u32 = 5;
/// Server selection timeout used when the URI does not set `serverSelectionTimeoutMS`.
pub const MONGO_SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The schema version this build writes into `migrations`.
pub const MONGO_SCHEMA_VERSION: i64 = 1;
/// The collection holding claims.
pub const CLAIMS_COLLECTION: &str = "claims";
/// The collection holding the schema version.
pub const MIGRATIONS_COLLECTION: &str = "migrations";
/// The collection holding one conflict marker per kind (see "Isolation" above).
pub const LOCKS_COLLECTION: &str = "locks";

const MIGRATION_ID: &str = "ccm-store";
/// MongoDB's duplicate key error code.
const DUPLICATE_KEY: i32 = 11000;

/// The MongoDB [`Store`].
#[derive(Clone)]
pub struct MongoStore {
    client: Client,
    db: Database,
    seq: std::sync::Arc<AtomicI64>,
}

impl std::fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoStore")
            .field("database", &self.db.name())
            .finish_non_exhaustive()
    }
}

fn mongo_err(e: &mongodb::error::Error) -> StoreError {
    let retryable = e.contains_label(TRANSIENT_TRANSACTION_ERROR)
        || e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
        || matches!(
            *e.kind,
            ErrorKind::ServerSelection { .. }
                | ErrorKind::Io(_)
                | ErrorKind::ConnectionPoolCleared { .. }
                | ErrorKind::DnsResolve { .. }
        );
    if retryable {
        StoreError::Unavailable(format!("mongodb: {e}"))
    } else {
        StoreError::Backend(format!("mongodb: {e}"))
    }
}

trait Mongo<T> {
    fn db(self) -> StoreResult<T>;
}

impl<T> Mongo<T> for mongodb::error::Result<T> {
    fn db(self) -> StoreResult<T> {
        self.map_err(|e| mongo_err(&e))
    }
}

fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    match &*e.kind {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first().map(|w| w.code)),
        _ => None,
    }
}

/// Whether restarting the transaction may succeed.
fn restartable(e: &mongodb::error::Error) -> bool {
    e.contains_label(TRANSIENT_TRANSACTION_ERROR) || error_code(e) == Some(DUPLICATE_KEY)
}

/// Result of work inside a transaction: the outer error aborts (and maybe restarts) the
/// transaction; the inner one is a refused write.
type TxnResult<T> = mongodb::error::Result<StoreResult<T>>;

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("mongodb: stored {what} is malformed: {e}"))
}

fn opt_str(d: &BsonDoc, key: &str) -> StoreResult<Option<String>> {
    match d.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(corrupt(key, format!("{other:?} is not a string"))),
    }
}

fn req_str(d: &BsonDoc, key: &str) -> StoreResult<String> {
    d.get_str(key)
        .map(str::to_owned)
        .map_err(|e| corrupt(key, e))
}

fn req_i64(d: &BsonDoc, key: &str) -> StoreResult<i64> {
    match d.get(key) {
        Some(Bson::Int64(n)) => Ok(*n),
        Some(Bson::Int32(n)) => Ok(i64::from(*n)),
        other => Err(corrupt(key, format!("{other:?} is not an integer"))),
    }
}

fn req_time(d: &BsonDoc, key: &str) -> StoreResult<DateTime<Utc>> {
    let t = d.get_datetime(key).map_err(|e| corrupt(key, e))?;
    DateTime::from_timestamp_millis(t.timestamp_millis())
        .ok_or_else(|| corrupt(key, "out of range"))
}

fn bson_time(t: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis())
}

fn opt_bson(v: &Option<String>) -> Bson {
    match v {
        Some(s) => Bson::String(s.clone()),
        None => Bson::Null,
    }
}

fn decode_doc(kind: Kind, d: &BsonDoc) -> StoreResult<Document> {
    let sort_key = match d.get("sort_key") {
        None | Some(Bson::Null) => None,
        Some(_) => Some(req_i64(d, "sort_key")?),
    };
    Ok(Document {
        kind,
        id: req_str(d, "_id")?,
        resource_version: req_i64(d, "resource_version")?,
        seq: req_i64(d, "seq")?,
        created_at: req_time(d, "created_at")?,
        updated_at: req_time(d, "updated_at")?,
        index: IndexFields {
            name: opt_str(d, "name")?,
            version_key: opt_str(d, "version_key")?,
            state: opt_str(d, "state")?,
            worker_id: opt_str(d, "worker_id")?,
            owner_id: opt_str(d, "owner_id")?,
            definition_id: opt_str(d, "definition_id")?,
            template_name: opt_str(d, "template_name")?,
            sort_key,
        },
        body: Body::from_stored(req_str(d, "body")?),
    })
}

/// The `$set` part shared by create and update: index fields, ordering values, body.
fn content_fields(index: &IndexFields, body: &Body) -> BsonDoc {
    doc! {
        "name": opt_bson(&index.name),
        "version_key": opt_bson(&index.version_key),
        "state": opt_bson(&index.state),
        "worker_id": opt_bson(&index.worker_id),
        "owner_id": opt_bson(&index.owner_id),
        "definition_id": opt_bson(&index.definition_id),
        "template_name": opt_bson(&index.template_name),
        "sort_key": index.sort_key.map_or(Bson::Null, Bson::Int64),
        "ord_sort": token::ord_sort(index),
        "ord_version": token::ord_version(index),
        "body": body.as_str(),
    }
}

fn decode_log(d: &BsonDoc) -> StoreResult<LogEntry> {
    let id = req_str(d, "_id")?;
    Ok(LogEntry {
        id: Uuid::parse_str(&id).map_err(|e| corrupt("log entry id", e))?,
        at: req_time(d, "at")?,
        resource_kind: req_str(d, "resource_kind")?,
        resource_id: req_str(d, "resource_id")?,
        actor: req_str(d, "actor")?,
        action: req_str(d, "action")?,
        body: Body::from_stored(req_str(d, "body")?),
    })
}

/// The conditions of `filters`, one BSON condition each.
fn filter_conditions(filters: &[Filter]) -> Vec<BsonDoc> {
    filters
        .iter()
        .map(|f| match f {
            Filter::Eq(field, v) => doc! { field.column(): { "$eq": v.as_str() } },
            Filter::In(field, vs) => doc! { field.column(): { "$in": vs.clone() } },
            Filter::Missing(field) => doc! { field.column(): { "$eq": Bson::Null } },
            Filter::SortKeyAtLeast(n) => doc! { "sort_key": { "$gte": *n } },
            Filter::SortKeyBefore(n) => doc! { "sort_key": { "$lt": *n } },
        })
        .collect()
}

fn and(conditions: Vec<BsonDoc>) -> BsonDoc {
    if conditions.is_empty() {
        doc! {}
    } else {
        doc! { "$and": conditions }
    }
}

fn claim_filter(c: &Claim) -> BsonDoc {
    doc! { "namespace": c.namespace.as_str(), "key": c.key.as_str() }
}

fn owner_filter(kind: Kind, id: &str) -> BsonDoc {
    doc! { "owner_kind": kind.as_str(), "owner_id": id }
}

/// What one `apply_each` item changed, to undo it if a later write of the item is refused.
#[derive(Default)]
struct Undo {
    /// Documents touched: their state before (None = did not exist).
    docs: Vec<(Kind, String, Option<BsonDoc>)>,
    /// Claims touched: their state before.
    claims: Vec<(Claim, Option<BsonDoc>)>,
    /// Log entries appended.
    logs: Vec<(LogKind, String)>,
}

fn named_index(keys: BsonDoc, name: &str) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_owned()).build())
        .build()
}

impl MongoStore {
    /// Connects to `uri` (which must reach a replica set, e.g.
    /// `mongodb://host:27017/?replicaSet=rs0`), uses database `db_name`, and creates the
    /// collections and indexes if needed. Refuses a standalone server (no transactions) and a
    /// database written by a newer schema.
    pub async fn connect(uri: &str, db_name: &str) -> StoreResult<MongoStore> {
        if db_name.is_empty() {
            return Err(StoreError::InvalidInput(
                "mongodb database name must not be empty".to_owned(),
            ));
        }
        let mut options = ClientOptions::parse(uri)
            .await
            .map_err(|e| StoreError::InvalidInput(format!("mongodb URI: {e}")))?;
        if options.server_selection_timeout.is_none() {
            options.server_selection_timeout = Some(MONGO_SERVER_SELECTION_TIMEOUT);
        }
        if options.app_name.is_none() {
            options.app_name = Some("ccm-store".to_owned());
        }
        let client = Client::with_options(options).db()?;
        let db = client.database(db_name);
        let hello = db.run_command(doc! { "hello": 1 }).await.db()?;
        let replica_set = hello.get_str("setName").is_ok();
        let mongos = hello.get_str("msg") == Ok("isdbgrid");
        if !replica_set && !mongos {
            return Err(StoreError::Unavailable(
                "the MongoDB server is a standalone server: ccm-store needs transactions, which \
                 need a replica set (start mongod with --replSet rs0, run rs.initiate(), and \
                 connect with ?replicaSet=rs0)"
                    .to_owned(),
            ));
        }
        let store = MongoStore {
            client,
            db,
            seq: std::sync::Arc::new(AtomicI64::new(0)),
        };
        store.migrate().await?;
        tracing::info!(database = db_name, "mongodb store connected");
        Ok(store)
    }

    /// Drops the whole database (every collection of this store). For tests and teardown.
    pub async fn drop_database(&self) -> StoreResult<()> {
        self.db.drop().await.db()
    }

    /// The database name.
    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    async fn migrate(&self) -> StoreResult<()> {
        let migrations = self.db.collection::<BsonDoc>(MIGRATIONS_COLLECTION);
        let found = migrations
            .find_one(doc! { "_id": MIGRATION_ID })
            .await
            .db()?;
        let current = match &found {
            Some(d) => req_i64(d, "schema_version")?,
            None => 0,
        };
        if current > MONGO_SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "the database has schema version {current}, this build knows up to \
                 {MONGO_SCHEMA_VERSION}: it was written by a newer ccm"
            )));
        }
        for kind in Kind::ALL {
            let mut indexes = vec![named_index(doc! { "seq": 1, "_id": 1 }, "by_seq")];
            for (name, columns) in crate::schema::document_indexes(kind) {
                let mut keys = BsonDoc::new();
                for c in *columns {
                    keys.insert(*c, 1);
                }
                if columns.last() == Some(&"seq") {
                    keys.insert("_id", 1);
                }
                indexes.push(named_index(keys, name));
            }
            self.docs(kind).create_indexes(indexes).await.db()?;
        }
        self.claims()
            .create_indexes([
                IndexModel::builder()
                    .keys(doc! { "namespace": 1, "key": 1 })
                    .options(
                        IndexOptions::builder()
                            .name("unique_claim".to_owned())
                            .unique(true)
                            .build(),
                    )
                    .build(),
                named_index(doc! { "owner_kind": 1, "owner_id": 1 }, "by_owner"),
            ])
            .await
            .db()?;
        for log in LogKind::ALL {
            let ttl = log
                .max_retention()
                .to_std()
                .map_err(|e| StoreError::Backend(format!("retention out of range: {e}")))?;
            self.logs(log)
                .create_indexes([IndexModel::builder()
                    .keys(doc! { "at": 1 })
                    .options(
                        IndexOptions::builder()
                            .name("retention_ttl".to_owned())
                            .expire_after(ttl)
                            .build(),
                    )
                    .build()])
                .await
                .db()?;
            let indexes = crate::schema::LOG_INDEXES.iter().map(|(name, columns)| {
                let mut keys = BsonDoc::new();
                for c in *columns {
                    keys.insert(if *c == "id" { "_id" } else { *c }, 1);
                }
                named_index(keys, name)
            });
            self.logs(log).create_indexes(indexes).await.db()?;
        }
        for kind in Kind::ALL {
            self.locks()
                .update_one(
                    doc! { "_id": kind.as_str() },
                    doc! { "$setOnInsert": { "n": 0_i64 } },
                )
                .upsert(true)
                .await
                .db()?;
        }
        if current < MONGO_SCHEMA_VERSION {
            migrations
                .update_one(
                    doc! { "_id": MIGRATION_ID },
                    doc! { "$set": {
                        "schema_version": MONGO_SCHEMA_VERSION,
                        "applied_at": bson::DateTime::now(),
                    } },
                )
                .upsert(true)
                .await
                .db()?;
            tracing::info!(
                version = MONGO_SCHEMA_VERSION,
                "mongodb store: applied schema migration"
            );
        }
        Ok(())
    }

    fn docs(&self, kind: Kind) -> Collection<BsonDoc> {
        self.db.collection(kind.collection())
    }

    fn claims(&self) -> Collection<BsonDoc> {
        self.db.collection(CLAIMS_COLLECTION)
    }

    fn logs(&self, log: LogKind) -> Collection<BsonDoc> {
        self.db.collection(log.collection())
    }

    fn locks(&self) -> Collection<BsonDoc> {
        self.db.collection(LOCKS_COLLECTION)
    }

    /// Writes the kind's conflict marker (see [Isolation](self#isolation)).
    async fn touch_kind(&self, s: &mut ClientSession, kind: Kind) -> mongodb::error::Result<()> {
        self.locks()
            .update_one(
                doc! { "_id": kind.as_str() },
                doc! { "$inc": { "n": 1_i64 } },
            )
            .upsert(true)
            .session(&mut *s)
            .await
            .map(|_| ())
    }

    /// A strictly increasing (per process) microsecond clock.
    fn next_seq(&self) -> i64 {
        let now = Utc::now().timestamp_micros();
        let prev = self
            .seq
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or_else(|last| last);
        now.max(prev + 1)
    }

    async fn find_all(
        &self,
        coll: &Collection<BsonDoc>,
        filter: BsonDoc,
        s: &mut ClientSession,
    ) -> mongodb::error::Result<Vec<BsonDoc>> {
        let mut cursor = coll.find(filter).session(&mut *s).await?;
        cursor.stream(s).try_collect().await
    }

    /// Refuses if any of `claims` is held by a document other than `(kind, id)`.
    async fn check_claims_free(
        &self,
        s: &mut ClientSession,
        kind: Kind,
        id: &str,
        claims: &[&Claim],
    ) -> TxnResult<()> {
        if claims.is_empty() {
            return Ok(Ok(()));
        }
        let any: Vec<BsonDoc> = claims.iter().map(|c| claim_filter(c)).collect();
        let found = self
            .find_all(&self.claims(), doc! { "$or": any }, s)
            .await?;
        let mut holders: HashMap<(String, String), (String, String)> = HashMap::new();
        for d in &found {
            let parts = (|| -> StoreResult<_> {
                Ok((
                    (req_str(d, "namespace")?, req_str(d, "key")?),
                    (req_str(d, "owner_kind")?, req_str(d, "owner_id")?),
                ))
            })();
            match parts {
                Ok((k, v)) => {
                    holders.insert(k, v);
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        for c in claims {
            if let Some((hk, hid)) = holders.get(&(c.namespace.clone(), c.key.clone()))
                && !(hk == kind.as_str() && hid == id)
            {
                let holder_kind = match hk.parse() {
                    Ok(k) => k,
                    Err(e) => return Ok(Err(e)),
                };
                return Ok(Err(StoreError::ClaimTaken {
                    namespace: c.namespace.clone(),
                    key: c.key.clone(),
                    holder_kind,
                    holder_id: hid.clone(),
                }));
            }
        }
        Ok(Ok(()))
    }

    async fn insert_claims(
        &self,
        s: &mut ClientSession,
        kind: Kind,
        id: &str,
        claims: &[&Claim],
        undo: &mut Undo,
    ) -> mongodb::error::Result<()> {
        if claims.is_empty() {
            return Ok(());
        }
        let docs: Vec<BsonDoc> = claims
            .iter()
            .map(|c| {
                doc! {
                    "namespace": c.namespace.as_str(),
                    "key": c.key.as_str(),
                    "owner_kind": kind.as_str(),
                    "owner_id": id,
                }
            })
            .collect();
        self.claims().insert_many(docs).session(&mut *s).await?;
        undo.claims
            .extend(claims.iter().map(|c| ((*c).clone(), None)));
        Ok(())
    }

    /// The claims `(kind, id)` holds, as stored documents.
    async fn held_claims(
        &self,
        s: &mut ClientSession,
        kind: Kind,
        id: &str,
    ) -> TxnResult<Vec<(Claim, BsonDoc)>> {
        let found = self
            .find_all(&self.claims(), owner_filter(kind, id), s)
            .await?;
        let mut out = Vec::with_capacity(found.len());
        for d in found {
            let claim = match (req_str(&d, "namespace"), req_str(&d, "key")) {
                (Ok(namespace), Ok(key)) => Claim { namespace, key },
                (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
            };
            out.push((claim, d));
        }
        Ok(Ok(out))
    }

    /// Reads a document and checks `expected_version`; the refusal if it does not hold.
    async fn load_checked(
        &self,
        s: &mut ClientSession,
        kind: Kind,
        id: &str,
        expected: i64,
    ) -> TxnResult<(BsonDoc, i64)> {
        let Some(old) = self
            .docs(kind)
            .find_one(doc! { "_id": id })
            .session(&mut *s)
            .await?
        else {
            return Ok(Err(StoreError::not_found(kind.as_str(), id)));
        };
        let actual = match req_i64(&old, "resource_version") {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        if expected != 0 && expected != actual {
            return Ok(Err(StoreError::Conflict {
                kind,
                id: id.to_owned(),
                expected,
                actual,
            }));
        }
        Ok(Ok((old, actual)))
    }

    async fn exec_write(
        &self,
        s: &mut ClientSession,
        w: &Write,
        now: DateTime<Utc>,
        undo: &mut Undo,
    ) -> TxnResult<Applied> {
        macro_rules! refuse {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                }
            };
        }
        match w {
            Write::Create { doc, claims } => {
                let DocumentData {
                    kind,
                    id,
                    index,
                    body,
                } = doc;
                let coll = self.docs(*kind);
                if coll
                    .find_one(doc! { "_id": id.as_str() })
                    .projection(doc! { "_id": 1 })
                    .session(&mut *s)
                    .await?
                    .is_some()
                {
                    return Ok(Err(StoreError::already_exists(kind.as_str(), id.clone())));
                }
                let claims = validate::dedup_claims(claims);
                refuse!(self.check_claims_free(s, *kind, id, &claims).await?);
                let seq = self.next_seq();
                let mut d = doc! {
                    "_id": id.as_str(),
                    "resource_version": 1_i64,
                    "seq": seq,
                    "created_at": bson_time(now),
                    "updated_at": bson_time(now),
                };
                d.extend(content_fields(index, body));
                self.touch_kind(s, *kind).await?;
                coll.insert_one(d).session(&mut *s).await?;
                undo.docs.push((*kind, id.clone(), None));
                self.insert_claims(s, *kind, id, &claims, undo).await?;
                Ok(Ok(Applied::Created(Document {
                    kind: *kind,
                    id: id.clone(),
                    index: index.clone(),
                    body: body.clone(),
                    resource_version: 1,
                    seq,
                    created_at: now,
                    updated_at: now,
                })))
            }
            Write::Update {
                doc,
                expected_version,
                claims,
            } => {
                let DocumentData {
                    kind,
                    id,
                    index,
                    body,
                } = doc;
                let (old, actual) =
                    refuse!(self.load_checked(s, *kind, id, *expected_version).await?);
                let before = refuse!(decode_doc(*kind, &old));
                let (seq, created_at) = (before.seq, before.created_at);
                // Work out the claim change and refuse before writing anything.
                let mut release: Vec<(Claim, BsonDoc)> = Vec::new();
                let mut acquire: Vec<&Claim> = Vec::new();
                if let ClaimChange::Replace(wanted) = claims {
                    let wanted = validate::dedup_claims(wanted);
                    let held = refuse!(self.held_claims(s, *kind, id).await?);
                    let held_set: BTreeSet<&Claim> = held.iter().map(|(c, _)| c).collect();
                    let wanted_set: BTreeSet<&Claim> = wanted.iter().copied().collect();
                    acquire = wanted
                        .into_iter()
                        .filter(|c| !held_set.contains(c))
                        .collect();
                    refuse!(self.check_claims_free(s, *kind, id, &acquire).await?);
                    release = held
                        .into_iter()
                        .filter(|(c, _)| !wanted_set.contains(c))
                        .collect();
                }
                if before.index != *index {
                    self.touch_kind(s, *kind).await?;
                }
                let mut set = content_fields(index, body);
                set.insert("resource_version", actual + 1);
                set.insert("updated_at", bson_time(now));
                let r = self
                    .docs(*kind)
                    .update_one(
                        doc! { "_id": id.as_str(), "resource_version": actual },
                        doc! { "$set": set },
                    )
                    .session(&mut *s)
                    .await?;
                if r.matched_count != 1 {
                    return Ok(Err(StoreError::Backend(format!(
                        "mongodb: {kind} {id:?} changed inside the transaction"
                    ))));
                }
                undo.docs.push((*kind, id.clone(), Some(old)));
                if !release.is_empty() {
                    let any: Vec<BsonDoc> = release.iter().map(|(c, _)| claim_filter(c)).collect();
                    let mut filter = owner_filter(*kind, id);
                    filter.insert("$or", any);
                    self.claims().delete_many(filter).session(&mut *s).await?;
                    undo.claims
                        .extend(release.into_iter().map(|(c, d)| (c, Some(d))));
                }
                self.insert_claims(s, *kind, id, &acquire, undo).await?;
                Ok(Ok(Applied::Updated(Document {
                    kind: *kind,
                    id: id.clone(),
                    index: index.clone(),
                    body: body.clone(),
                    resource_version: actual + 1,
                    seq,
                    created_at,
                    updated_at: now,
                })))
            }
            Write::Delete {
                kind,
                id,
                expected_version,
            } => {
                let (old, actual) =
                    refuse!(self.load_checked(s, *kind, id, *expected_version).await?);
                let held = refuse!(self.held_claims(s, *kind, id).await?);
                if !held.is_empty() {
                    self.claims()
                        .delete_many(owner_filter(*kind, id))
                        .session(&mut *s)
                        .await?;
                    undo.claims
                        .extend(held.into_iter().map(|(c, d)| (c, Some(d))));
                }
                self.docs(*kind)
                    .delete_one(doc! { "_id": id.as_str() })
                    .session(&mut *s)
                    .await?;
                undo.docs.push((*kind, id.clone(), Some(old)));
                Ok(Ok(Applied::Deleted {
                    kind: *kind,
                    id: id.clone(),
                    resource_version: actual,
                }))
            }
            Write::Guard {
                kind,
                id,
                expected_version,
            } => {
                let (_, actual) =
                    refuse!(self.load_checked(s, *kind, id, *expected_version).await?);
                // The conflict marker: a concurrent writer of this document now conflicts.
                self.docs(*kind)
                    .update_one(
                        doc! { "_id": id.as_str() },
                        doc! { "$inc": { "guard_marker": 1_i64 } },
                    )
                    .session(&mut *s)
                    .await?;
                Ok(Ok(Applied::Guarded {
                    kind: *kind,
                    id: id.clone(),
                    resource_version: actual,
                }))
            }
            Write::GuardNoneMatch { kind, filters } => {
                self.touch_kind(s, *kind).await?;
                let hit = self
                    .docs(*kind)
                    .find_one(and(filter_conditions(filters)))
                    .projection(doc! { "_id": 1 })
                    .session(&mut *s)
                    .await?;
                match hit {
                    Some(d) => Ok(Err(StoreError::GuardFailed {
                        kind: *kind,
                        id: refuse!(req_str(&d, "_id")),
                    })),
                    None => Ok(Ok(Applied::NoneMatched { kind: *kind })),
                }
            }
            Write::Append { log, entry } => {
                let coll = self.logs(*log);
                let id = entry.id.to_string();
                if coll
                    .find_one(doc! { "_id": id.as_str() })
                    .projection(doc! { "_id": 1 })
                    .session(&mut *s)
                    .await?
                    .is_some()
                {
                    return Ok(Err(StoreError::already_exists(log.as_str(), id)));
                }
                let at = truncate_to_millis(entry.at);
                coll.insert_one(doc! {
                    "_id": id.as_str(),
                    "at": bson_time(at),
                    "resource_kind": entry.resource_kind.as_str(),
                    "resource_id": entry.resource_id.as_str(),
                    "actor": entry.actor.as_str(),
                    "action": entry.action.as_str(),
                    "body": entry.body.as_str(),
                })
                .session(&mut *s)
                .await?;
                undo.logs.push((*log, id));
                Ok(Ok(Applied::Appended {
                    log: *log,
                    id: entry.id,
                    at,
                }))
            }
        }
    }

    async fn exec_writes(
        &self,
        s: &mut ClientSession,
        writes: &[Write],
        now: DateTime<Utc>,
        undo: &mut Undo,
    ) -> TxnResult<Vec<Applied>> {
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            match self.exec_write(s, w, now, undo).await? {
                Ok(a) => out.push(a),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(out))
    }

    /// Restores what an item changed, newest change first.
    async fn undo(&self, s: &mut ClientSession, undo: Undo) -> mongodb::error::Result<()> {
        for (log, id) in undo.logs.into_iter().rev() {
            self.logs(log)
                .delete_one(doc! { "_id": id })
                .session(&mut *s)
                .await?;
        }
        for (claim, before) in undo.claims.into_iter().rev() {
            self.claims()
                .delete_one(claim_filter(&claim))
                .session(&mut *s)
                .await?;
            if let Some(d) = before {
                self.claims().insert_one(d).session(&mut *s).await?;
            }
        }
        for (kind, id, before) in undo.docs.into_iter().rev() {
            self.docs(kind)
                .delete_one(doc! { "_id": id })
                .session(&mut *s)
                .await?;
            if let Some(d) = before {
                self.docs(kind).insert_one(d).session(&mut *s).await?;
            }
        }
        Ok(())
    }

    async fn run_body(&self, s: &mut ClientSession, body: &TxnBody<'_>) -> TxnResult<TxnOut> {
        let now = truncate_to_millis(Utc::now());
        match body {
            TxnBody::Apply(writes) => {
                let mut undo = Undo::default();
                Ok(self
                    .exec_writes(s, writes, now, &mut undo)
                    .await?
                    .map(TxnOut::Applied))
            }
            TxnBody::ApplyEach(items) => {
                let mut results = Vec::with_capacity(items.len());
                for item in items.iter() {
                    if let Err(e) = validate::check_writes(item) {
                        results.push(Err(e));
                        continue;
                    }
                    let mut undo = Undo::default();
                    match self.exec_writes(s, item, now, &mut undo).await? {
                        Ok(applied) => results.push(Ok(applied)),
                        Err(e) if is_item_failure(&e) => {
                            self.undo(s, undo).await?;
                            results.push(Err(e));
                        }
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Ok(Ok(TxnOut::Each(results)))
            }
        }
    }

    /// Runs `body` in a transaction, restarting it on transient errors.
    async fn transaction(&self, body: TxnBody<'_>) -> StoreResult<TxnOut> {
        let mut s = self.client.start_session().await.db()?;
        let mut backoff = MONGO_TXN_BASE_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            s.start_transaction()
                .read_concern(ReadConcern::snapshot())
                .write_concern(WriteConcern::majority())
                .await
                .db()?;
            let outcome = self.run_body(&mut s, &body).await;
            let failure = match outcome {
                Ok(Ok(out)) => match self.commit(&mut s).await {
                    Ok(()) => return Ok(out),
                    Err(e) => e,
                },
                Ok(Err(refused)) => {
                    // Nothing was written that must stay: abort. An abort failure does not
                    // matter (the server aborts on its own).
                    let _ = s.abort_transaction().await;
                    return Err(refused);
                }
                Err(e) => {
                    let _ = s.abort_transaction().await;
                    e
                }
            };
            if !restartable(&failure) || attempt >= MONGO_TXN_MAX_ATTEMPTS {
                tracing::warn!(attempt, error = %failure, "mongodb transaction failed");
                let mapped = mongo_err(&failure);
                return Err(match mapped {
                    StoreError::Backend(m) if restartable(&failure) => {
                        StoreError::Unavailable(format!("{m} (gave up after {attempt} attempts)"))
                    }
                    other => other,
                });
            }
            tracing::debug!(attempt, error = %failure, "mongodb transaction restarts");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MONGO_TXN_MAX_BACKOFF);
        }
    }

    async fn commit(&self, s: &mut ClientSession) -> mongodb::error::Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match s.commit_transaction().await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                        && attempt < MONGO_COMMIT_MAX_ATTEMPTS =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The work of one transaction.
enum TxnBody<'a> {
    Apply(&'a [Write]),
    ApplyEach(&'a [Vec<Write>]),
}

/// What a transaction produced.
enum TxnOut {
    Applied(Vec<Applied>),
    Each(Vec<StoreResult<Vec<Applied>>>),
}

fn doc_cursor(last: &Document) -> DocCursor {
    DocCursor {
        ord_sort: token::ord_sort(&last.index),
        ord_version: token::ord_version(&last.index).to_owned(),
        seq: last.seq,
        id: last.id.clone(),
    }
}

#[async_trait]
impl Store for MongoStore {
    fn backend(&self) -> &'static str {
        "mongodb"
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "mongodb"))]
    async fn ping(&self) -> StoreResult<()> {
        self.db
            .run_command(doc! { "ping": 1 })
            .await
            .db()
            .map(|_| ())
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "mongodb"))]
    async fn get(&self, kind: Kind, id: &str) -> StoreResult<Option<Document>> {
        self.docs(kind)
            .find_one(doc! { "_id": id })
            .await
            .db()?
            .map(|d| decode_doc(kind, &d))
            .transpose()
    }

    #[tracing::instrument(level = "debug", skip(self, ids), fields(backend = "mongodb", n = ids.len()))]
    async fn get_many(&self, kind: Kind, ids: &[String]) -> StoreResult<Vec<Document>> {
        validate::check_get_many(ids)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<BsonDoc> = self
            .docs(kind)
            .find(doc! { "_id": { "$in": ids.to_vec() } })
            .await
            .db()?
            .try_collect()
            .await
            .db()?;
        let mut by_id = HashMap::with_capacity(found.len());
        for d in &found {
            let doc = decode_doc(kind, d)?;
            by_id.insert(doc.id.clone(), doc);
        }
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "mongodb", kind = %query.kind))]
    async fn list(&self, query: Query) -> StoreResult<Page> {
        validate::check_filters(&query.filters)?;
        let cursor = token::decode_doc(&query)?;
        let page_size = effective_page_size(query.page_size) as usize;
        let mut conditions = filter_conditions(&query.filters);
        if let Some(c) = &cursor {
            conditions.push(match query.order {
                Order::CreatedAsc => doc! { "$or": [
                    { "seq": { "$gt": c.seq } },
                    { "seq": c.seq, "_id": { "$gt": c.id.as_str() } },
                ] },
                Order::SortKeyAsc => doc! { "$or": [
                    { "ord_sort": { "$gt": c.ord_sort } },
                    { "ord_sort": c.ord_sort, "seq": { "$gt": c.seq } },
                    { "ord_sort": c.ord_sort, "seq": c.seq, "_id": { "$gt": c.id.as_str() } },
                ] },
                Order::VersionDesc => doc! { "$or": [
                    { "ord_version": { "$lt": c.ord_version.as_str() } },
                    { "ord_version": c.ord_version.as_str(), "seq": { "$lt": c.seq } },
                    {
                        "ord_version": c.ord_version.as_str(),
                        "seq": c.seq,
                        "_id": { "$lt": c.id.as_str() },
                    },
                ] },
            });
        }
        let sort = match query.order {
            Order::CreatedAsc => doc! { "seq": 1, "_id": 1 },
            Order::SortKeyAsc => doc! { "ord_sort": 1, "seq": 1, "_id": 1 },
            Order::VersionDesc => doc! { "ord_version": -1, "seq": -1, "_id": -1 },
        };
        let found: Vec<BsonDoc> = self
            .docs(query.kind)
            .find(and(conditions))
            .sort(sort)
            .limit(page_size as i64 + 1)
            .await
            .db()?
            .try_collect()
            .await
            .db()?;
        let mut items = found
            .iter()
            .map(|d| decode_doc(query.kind, d))
            .collect::<StoreResult<Vec<_>>>()?;
        let next_page_token = if items.len() > page_size {
            items.truncate(page_size);
            match items.last() {
                Some(last) => Some(token::encode_doc(&query, doc_cursor(last))?),
                None => None,
            }
        } else {
            None
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "mongodb", kind = %kind))]
    async fn count(&self, kind: Kind, filters: &[Filter]) -> StoreResult<u64> {
        validate::check_filters(filters)?;
        self.docs(kind)
            .count_documents(and(filter_conditions(filters)))
            .await
            .db()
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "mongodb"))]
    async fn claims_of(&self, kind: Kind, id: &str) -> StoreResult<Vec<Claim>> {
        let found: Vec<BsonDoc> = self
            .claims()
            .find(owner_filter(kind, id))
            .sort(doc! { "namespace": 1, "key": 1 })
            .await
            .db()?
            .try_collect()
            .await
            .db()?;
        found
            .iter()
            .map(|d| {
                Ok(Claim {
                    namespace: req_str(d, "namespace")?,
                    key: req_str(d, "key")?,
                })
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "mongodb"))]
    async fn claim_holder(&self, claim: &Claim) -> StoreResult<Option<ClaimHolder>> {
        let found = self.claims().find_one(claim_filter(claim)).await.db()?;
        found
            .map(|d| {
                Ok(ClaimHolder {
                    kind: req_str(&d, "owner_kind")?.parse()?,
                    id: req_str(&d, "owner_id")?,
                })
            })
            .transpose()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "mongodb", writes = writes.len()))]
    async fn apply(&self, writes: Vec<Write>) -> StoreResult<Vec<Applied>> {
        validate::check_writes(&writes)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        match self.transaction(TxnBody::Apply(&writes)).await? {
            TxnOut::Applied(a) => Ok(a),
            TxnOut::Each(_) => Err(StoreError::Backend(
                "mongodb: transaction produced the wrong result".to_owned(),
            )),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "mongodb", items = items.len()))]
    async fn apply_each(
        &self,
        items: Vec<Vec<Write>>,
    ) -> StoreResult<Vec<StoreResult<Vec<Applied>>>> {
        validate::check_total(items.iter().map(Vec::len).sum())?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        match self.transaction(TxnBody::ApplyEach(&items)).await? {
            TxnOut::Each(r) => Ok(r),
            TxnOut::Applied(_) => Err(StoreError::Backend(
                "mongodb: transaction produced the wrong result".to_owned(),
            )),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "mongodb", log = %log))]
    async fn list_log(&self, log: LogKind, query: LogQuery) -> StoreResult<LogPage> {
        validate::check_log_query(&query)?;
        let cursor = token::decode_log(log, &query)?;
        let page_size = effective_page_size(query.page_size) as usize;
        let mut conditions = Vec::new();
        if let Some(k) = &query.resource_kind {
            conditions.push(doc! { "resource_kind": { "$eq": k.as_str() } });
        }
        if let Some(id) = &query.resource_id {
            conditions.push(doc! { "resource_id": { "$eq": id.as_str() } });
        }
        if let Some(t) = query.since {
            conditions.push(doc! { "at": { "$gte": bson_time(t) } });
        }
        if let Some(t) = query.until {
            conditions.push(doc! { "at": { "$lt": bson_time(t) } });
        }
        if let Some(c) = &cursor {
            let at = bson::DateTime::from_millis(c.at_ms);
            conditions.push(doc! { "$or": [
                { "at": { "$lt": at } },
                { "at": at, "_id": { "$lt": c.id.as_str() } },
            ] });
        }
        let found: Vec<BsonDoc> = self
            .logs(log)
            .find(and(conditions))
            .sort(doc! { "at": -1, "_id": -1 })
            .limit(page_size as i64 + 1)
            .await
            .db()?
            .try_collect()
            .await
            .db()?;
        let mut entries = found
            .iter()
            .map(decode_log)
            .collect::<StoreResult<Vec<_>>>()?;
        let next_page_token = if entries.len() > page_size {
            entries.truncate(page_size);
            match entries.last() {
                Some(last) => Some(token::encode_log(
                    log,
                    &query,
                    LogCursor {
                        at_ms: last.at.timestamp_millis(),
                        id: last.id.to_string(),
                    },
                )?),
                None => None,
            }
        } else {
            None
        };
        Ok(LogPage {
            entries,
            next_page_token,
        })
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "mongodb"))]
    async fn purge_log(&self, log: LogKind, older_than: DateTime<Utc>) -> StoreResult<u64> {
        check_purge_cutoff(log, older_than)?;
        let r = self
            .logs(log)
            .delete_many(doc! { "at": { "$lt": bson_time(older_than) } })
            .await
            .db()?;
        tracing::info!(log = %log, deleted = r.deleted_count, %older_than, "purged log entries");
        Ok(r.deleted_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IndexField;

    #[test]
    fn filters_become_operator_conditions_with_inert_values() {
        let c = filter_conditions(&[
            Filter::eq(IndexField::State, "$where"),
            Filter::any_of(IndexField::Name, ["a.b", "$gt"]),
            Filter::Missing(IndexField::WorkerId),
            Filter::SortKeyAtLeast(3),
            Filter::SortKeyBefore(9),
        ]);
        assert_eq!(c[0], doc! { "state": { "$eq": "$where" } });
        assert_eq!(c[1], doc! { "name": { "$in": ["a.b", "$gt"] } });
        assert_eq!(c[2], doc! { "worker_id": { "$eq": Bson::Null } });
        assert_eq!(c[3], doc! { "sort_key": { "$gte": 3_i64 } });
        assert_eq!(c[4], doc! { "sort_key": { "$lt": 9_i64 } });
        assert_eq!(and(Vec::new()), doc! {});
    }

    #[test]
    fn documents_round_trip_through_bson() {
        let index = IndexFields {
            name: Some("n".into()),
            sort_key: Some(-5),
            ..IndexFields::default()
        };
        let body = Body::from_json_text(r#"{"$set": {"a.b": 1}}"#).unwrap();
        let now = truncate_to_millis(Utc::now());
        let mut d = doc! {
            "_id": "x",
            "resource_version": 3_i64,
            "seq": 7_i64,
            "created_at": bson_time(now),
            "updated_at": bson_time(now),
        };
        d.extend(content_fields(&index, &body));
        let back = decode_doc(Kind::Worker, &d).unwrap();
        assert_eq!(back.index, index);
        assert_eq!(back.body, body);
        assert_eq!((back.resource_version, back.seq), (3, 7));
        assert_eq!(back.created_at, now);
    }

    #[test]
    fn corrupt_documents_are_backend_errors() {
        let d = doc! { "_id": 5 };
        assert!(matches!(
            decode_doc(Kind::Worker, &d),
            Err(StoreError::Backend(_))
        ));
    }
}
