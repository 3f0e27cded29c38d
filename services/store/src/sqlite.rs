//! [`SqliteStore`]: the embedded default backend.
//!
//! # Layout
//!
//! One SQLite file (or an in-memory database for tests). The tables have the names of the
//! MongoDB collections (domain.md §7):
//!
//! - one table per [`Kind`] (`lablet_definitions`, `lablet_instances`, `cml_workers`,
//!   `worker_templates`, `worker_operations`): `seq` (INTEGER PRIMARY KEY AUTOINCREMENT, so never
//!   reused) is the creation sequence and the row id, `id` is UNIQUE, one column per index field
//!   plus `ord_sort` / `ord_version` (the never-null ordering values), and the body as TEXT. Each
//!   table has only the SQL indexes its queries need (domain.md §7 adapted to the index fields;
//!   the same list as the MongoDB indexes), which keeps a create at a handful of B-tree inserts.
//! - `claims`: `PRIMARY KEY(namespace, key)` and the owner `(owner_kind, owner_id)`: what makes
//!   claims unique. Each document row also keeps the claims it holds (`claims`, a sorted JSON
//!   array of `[namespace, key]`), so a write finds them without another index; both change in
//!   the same transaction.
//! - one table per [`LogKind`] (`audit_events`, `scaling_audit_events`): `id` UNIQUE, indexed by
//!   time and by resource.
//!
//! plus `schema_version` (see [Migrations](#migrations)). Table names come from the [`Kind`] /
//! [`LogKind`] enums, never from input; every value is a bound parameter.
//!
//! # Concurrency
//!
//! rusqlite is blocking. There is ONE writer connection, owned by a dedicated writer thread
//! (`ccm-store-writer`): writes are serialised in the process (SQLite allows one writer anyway)
//! and every transaction is `BEGIN IMMEDIATE`, so a batch never fails half-way on a lock. Reads
//! run in `tokio::task::spawn_blocking` on [`SQLITE_READ_CONNECTIONS`] read-only connections
//! (file-backed store): in WAL mode they run concurrently with the writer and see every
//! committed write. An in-memory store has only the writer connection (an in-memory database is
//! private to its connection), so its reads are jobs for the writer thread too. Other processes
//! may open the same file; the busy timeout ([`SQLITE_BUSY_TIMEOUT`]) then arbitrates, and a
//! timeout becomes [`StoreError::Unavailable`].
//!
//! # Group commit
//!
//! [`Store::apply`] hands its writes to the writer thread and awaits the answer. The thread
//! takes the first waiting call and every call queued behind it (up to
//! [`SQLITE_GROUP_COMMIT_MAX`]) and runs them in ONE transaction, each call inside its own
//! `SAVEPOINT`: a call whose writes fail (conflict, claim taken, …) is rolled back to its
//! savepoint and answered with its error, exactly as if it had run alone; the others commit
//! together and are answered once the `COMMIT` succeeded. A backend failure (or a failed
//! `COMMIT`) fails every call of the group, and none of them wrote anything. Calls in a group
//! run in arrival order, and a later call sees the writes of an earlier one, as it would if they
//! had committed one after the other. Under load this turns N commits (each rewriting the same
//! B-tree pages into the WAL) into one, so the WAL grows by the pages the group touched instead
//! of N times that; an idle store commits a lone call at once (the thread never waits to fill a
//! group).
//!
//! # Durability
//!
//! WAL with `synchronous=NORMAL`: a commit is atomic and survives a process crash; after an
//! OS crash or power loss the last commits since the latest checkpoint may be lost (the
//! database is never corrupted). That is SQLite's recommended trade-off for WAL and what makes
//! thousands of single-document commits per second possible. Checkpoints (copying the WAL into
//! the database file, with an fsync) run on a background thread every
//! [`SQLITE_CHECKPOINT_INTERVAL`], so commits do not pay for them; the writer checkpoints by
//! itself only past [`SQLITE_WAL_BACKSTOP_PAGES`].
//!
//! # Migrations
//!
//! The schema is a list of numbered migration scripts ([`SCHEMA_VERSION`] is the newest).
//! `schema_version` holds one row per applied migration. At open, in one `BEGIN IMMEDIATE`
//! transaction, every script newer than the file's version is applied in order and recorded; a
//! file whose version is newer than this build knows is refused (an old binary must not write a
//! schema it does not understand). Migrations are append-only: a released script is never
//! edited; a change is a new script (`ALTER TABLE`, new index, data rewrite).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, ToSql, TransactionBehavior, params};
use uuid::Uuid;

use crate::error::{StoreError, StoreResult};
use crate::model::{
    Applied, Body, Claim, ClaimChange, ClaimHolder, Document, DocumentData, Filter, IndexField,
    IndexFields, Kind, LogEntry, LogKind, LogPage, LogQuery, Order, Page, Query, Write,
    effective_page_size, truncate_to_millis,
};
use crate::store::{Store, check_purge_cutoff, is_item_failure};
use crate::token::{self, DocCursor, LogCursor};
use crate::validate;

/// The file name [`SqliteStore::open_in_dir`] uses inside the data directory.
pub const SQLITE_FILE_NAME: &str = "ccm-store.sqlite3";
/// How long a connection waits for a lock held by another connection or process before the
/// call fails with [`StoreError::Unavailable`].
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read-only connections of a file-backed store (reads run concurrently with the writer).
pub const SQLITE_READ_CONNECTIONS: usize = 4;
/// Prepared statements cached per connection.
pub const SQLITE_STATEMENT_CACHE: usize = 128;
/// How often the checkpointer thread copies the WAL into the database file.
pub const SQLITE_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1000);
/// WAL size (in pages) at which the writer checkpoints by itself, should the checkpointer thread
/// fall behind (SQLite's default is 1,000 pages, which would put a checkpoint and its fsync into
/// nearly every large batch commit).
pub const SQLITE_WAL_BACKSTOP_PAGES: i64 = 16_384;
/// Size the WAL file is truncated to after a checkpoint reset it.
pub const SQLITE_WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;
/// Most [`Store::apply`] calls the writer thread commits in one transaction (group commit).
pub const SQLITE_GROUP_COMMIT_MAX: usize = 128;
/// Page cache of the writer connection, in KiB.
pub const SQLITE_WRITER_CACHE_KIB: i64 = 64 * 1024;
/// Page cache of each read connection, in KiB.
pub const SQLITE_READER_CACHE_KIB: i64 = 16 * 1024;
/// The schema version this build writes (the number of migration scripts).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The migration scripts; script `i` brings the schema to version `i + 1`. Append only.
const MIGRATIONS: &[&str] = &[MIGRATION_1];

/// `CREATE TABLE` for one document kind.
macro_rules! document_table {
    ($table:literal) => {
        concat!(
            "CREATE TABLE ",
            $table,
            " (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    resource_version INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    name             TEXT,
    version_key      TEXT,
    state            TEXT,
    worker_id        TEXT,
    owner_id         TEXT,
    definition_id    TEXT,
    template_name    TEXT,
    sort_key         INTEGER,
    ord_sort         INTEGER NOT NULL,
    ord_version      TEXT    NOT NULL,
    body             TEXT    NOT NULL,
    claims           TEXT    NOT NULL
);
"
        )
    };
}

/// `CREATE TABLE` and indexes for one log.
macro_rules! log_table {
    ($table:literal) => {
        concat!(
            "CREATE TABLE ",
            $table,
            " (
    seq           INTEGER PRIMARY KEY,
    id            TEXT    NOT NULL UNIQUE,
    at            INTEGER NOT NULL,
    resource_kind TEXT    NOT NULL,
    resource_id   TEXT    NOT NULL,
    actor         TEXT    NOT NULL,
    action        TEXT    NOT NULL,
    body          TEXT    NOT NULL
);
CREATE INDEX ",
            $table,
            "_by_time ON ",
            $table,
            " (at, id);
CREATE INDEX ",
            $table,
            "_by_resource ON ",
            $table,
            " (resource_kind, resource_id, at, id);
"
        )
    };
}

const MIGRATION_1: &str = concat!(
    document_table!("lablet_definitions"),
    document_table!("lablet_instances"),
    document_table!("cml_workers"),
    document_table!("worker_templates"),
    document_table!("worker_operations"),
    "
CREATE INDEX lablet_definitions_by_name_version  ON lablet_definitions (name, version_key);
CREATE INDEX lablet_definitions_by_version       ON lablet_definitions (ord_version, seq);
CREATE INDEX lablet_instances_by_state_slot      ON lablet_instances (state, ord_sort);
CREATE INDEX lablet_instances_by_worker_state    ON lablet_instances (worker_id, state);
CREATE INDEX lablet_instances_by_definition      ON lablet_instances (definition_id);
CREATE INDEX lablet_instances_by_owner           ON lablet_instances (owner_id);
CREATE INDEX lablet_instances_by_slot            ON lablet_instances (ord_sort, seq);
CREATE INDEX cml_workers_by_state_template       ON cml_workers (state, template_name);
CREATE INDEX cml_workers_by_template             ON cml_workers (template_name);
CREATE INDEX cml_workers_by_name                 ON cml_workers (name);
CREATE INDEX worker_templates_by_name            ON worker_templates (name);
CREATE INDEX worker_operations_by_worker_state   ON worker_operations (worker_id, state);

CREATE TABLE claims (
    namespace  TEXT NOT NULL,
    key        TEXT NOT NULL,
    owner_kind TEXT NOT NULL,
    owner_id   TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
",
    log_table!("audit_events"),
    log_table!("scaling_audit_events"),
);

const DOC_COLUMNS: &str = "id, resource_version, seq, created_at, updated_at, name, version_key, \
     state, worker_id, owner_id, definition_id, template_name, sort_key, body";

const LOG_COLUMNS: &str = "id, at, resource_kind, resource_id, actor, action, body";

/// The SQLite [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

/// Where the writer thread answers one [`Store::apply`] call.
type ApplyReply = tokio::sync::oneshot::Sender<StoreResult<Vec<Applied>>>;

/// Work for the writer thread.
enum Job {
    /// One [`Store::apply`] call (group-committed with the calls queued behind it).
    Apply {
        writes: Vec<Write>,
        reply: ApplyReply,
    },
    /// Anything else that needs the writer connection, run alone (it replies by itself).
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
}

struct Inner {
    /// The writer thread's queue; dropping it (with the store) ends the thread.
    writer: mpsc::Sender<Job>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: Option<Mutex<mpsc::Sender<()>>>,
    location: String,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

/// rusqlite errors → [`StoreError`].
trait Db<T> {
    fn db(self) -> StoreResult<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> StoreResult<T> {
        self.map_err(|e| match &e {
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
            {
                StoreError::Unavailable(format!("sqlite is busy: {e}"))
            }
            _ => StoreError::Backend(format!("sqlite: {e}")),
        })
    }
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the lock dropped (= rolled back) any open transaction, so the
    // connection is usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The error of a call whose writer job never answered (the writer thread is gone).
fn writer_gone() -> StoreError {
    StoreError::Backend("the sqlite writer thread stopped".to_owned())
}

/// Starts the writer thread that owns `conn` (see [Group commit](self#group-commit)).
fn spawn_writer(mut conn: Connection, location: String) -> StoreResult<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("ccm-store-writer".to_owned())
        .spawn(move || {
            let mut next: Option<Job> = None;
            loop {
                let job = match next.take() {
                    Some(job) => job,
                    None => match rx.recv() {
                        Ok(job) => job,
                        // Every sender is gone: the store was dropped.
                        Err(_) => return,
                    },
                };
                match job {
                    Job::Run(run) => {
                        // A panic drops the job's reply sender (its caller gets an error) and
                        // rolls back any open transaction; the thread carries on.
                        let run = std::panic::AssertUnwindSafe(|| run(&mut conn));
                        if std::panic::catch_unwind(run).is_err() {
                            tracing::error!(%location, "sqlite writer job panicked");
                        }
                    }
                    Job::Apply { writes, reply } => {
                        let mut group = vec![(writes, reply)];
                        while group.len() < SQLITE_GROUP_COMMIT_MAX {
                            match rx.try_recv() {
                                Ok(Job::Apply { writes, reply }) => group.push((writes, reply)),
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let commit =
                            std::panic::AssertUnwindSafe(|| commit_group(&mut conn, group));
                        if std::panic::catch_unwind(commit).is_err() {
                            tracing::error!(%location, "sqlite group commit panicked");
                        }
                    }
                }
            }
        })
        .map_err(|e| StoreError::Backend(format!("cannot start the sqlite writer: {e}")))?;
    Ok(tx)
}

/// Commits a group of `apply` calls in one transaction, each in its own savepoint, and answers
/// each call (see [Group commit](self#group-commit)).
fn commit_group(conn: &mut Connection, group: Vec<(Vec<Write>, ApplyReply)>) {
    let now = truncate_to_millis(Utc::now());
    if let [_] = group.as_slice() {
        // A lone call: a plain transaction, no savepoint.
        for (writes, reply) in group {
            let result = (|| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .db()?;
                let applied = exec_writes(&tx, &writes, now)?;
                tx.commit().db()?;
                Ok(applied)
            })();
            // The caller may have gone away (cancelled); the writes stand.
            let _ = reply.send(result);
        }
        return;
    }
    let calls = group.len();
    let mut results: Vec<StoreResult<Vec<Applied>>> = Vec::with_capacity(calls);
    let outcome = (|| {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .db()?;
        for (writes, _) in &group {
            results.push(exec_item(&tx, writes, now)?);
        }
        tx.commit().db()
    })();
    match outcome {
        Ok(()) => {
            for ((_, reply), result) in group.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        // Nothing of the group was written: every call fails with the transaction's error.
        Err(e) => {
            tracing::warn!(error = %e, calls, "sqlite group commit failed");
            for (_, reply) in group {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Runs one item's writes inside a savepoint of the open transaction: `Ok(Err(_))` is the
/// item's own failure (rolled back to the savepoint, the transaction goes on); `Err(_)` is a
/// failure of the whole transaction.
fn exec_item(
    tx: &Connection,
    writes: &[Write],
    now: DateTime<Utc>,
) -> StoreResult<StoreResult<Vec<Applied>>> {
    // Prepared once per connection: this runs a thousand times per placement batch.
    tx.prepare_cached("SAVEPOINT ccm_item")
        .db()?
        .execute([])
        .db()?;
    match exec_writes(tx, writes, now) {
        Ok(applied) => {
            tx.prepare_cached("RELEASE ccm_item")
                .db()?
                .execute([])
                .db()?;
            Ok(Ok(applied))
        }
        Err(e) if is_item_failure(&e) => {
            tx.prepare_cached("ROLLBACK TO ccm_item")
                .db()?
                .execute([])
                .db()?;
            tx.prepare_cached("RELEASE ccm_item")
                .db()?
                .execute([])
                .db()?;
            Ok(Err(e))
        }
        Err(e) => Err(e),
    }
}

/// What a connection is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Writer,
    Reader,
    Checkpointer,
}

fn configure(conn: &Connection, file: bool, role: Role) -> StoreResult<()> {
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT).db()?;
    conn.set_prepared_statement_cache_capacity(SQLITE_STATEMENT_CACHE);
    let cache_kib = match role {
        Role::Writer => SQLITE_WRITER_CACHE_KIB,
        Role::Reader | Role::Checkpointer => SQLITE_READER_CACHE_KIB,
    };
    // A negative cache_size is in KiB.
    conn.pragma_update(None, "cache_size", -cache_kib).db()?;
    if file {
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .db()?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "sqlite refused WAL mode (journal_mode is {mode})"
            )));
        }
        conn.pragma_update(None, "synchronous", "NORMAL").db()?;
        if role == Role::Writer {
            // Checkpoints run on the checkpointer thread; the writer only checkpoints itself if
            // the WAL grows past the backstop (the checkpointer fell behind).
            conn.pragma_update(None, "wal_autocheckpoint", SQLITE_WAL_BACKSTOP_PAGES)
                .db()?;
            conn.pragma_update(None, "journal_size_limit", SQLITE_WAL_SIZE_LIMIT_BYTES)
                .db()?;
        }
    }
    if role == Role::Reader {
        conn.pragma_update(None, "query_only", true).db()?;
    }
    conn.pragma_update(None, "temp_store", "MEMORY").db()?;
    Ok(())
}

/// Runs `PRAGMA wal_checkpoint(PASSIVE)` every [`SQLITE_CHECKPOINT_INTERVAL`] on its own
/// connection and thread, so commits never pay for copying the WAL into the database file (and
/// the fsync that goes with it). A passive checkpoint never blocks readers or the writer. The
/// thread ends when the returned sender is dropped (with the store).
fn spawn_checkpointer(conn: Connection, location: String) -> StoreResult<mpsc::Sender<()>> {
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("ccm-store-checkpoint".to_owned())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(SQLITE_CHECKPOINT_INTERVAL)
            {
                let r: rusqlite::Result<(i64, i64, i64)> =
                    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    });
                match r {
                    Ok((_, log, done)) if log > 0 => {
                        tracing::trace!(%location, wal_pages = log, checkpointed = done, "sqlite checkpoint");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(%location, error = %e, "sqlite checkpoint failed"),
                }
            }
        })
        .map_err(|e| StoreError::Backend(format!("cannot start the sqlite checkpointer: {e}")))?;
    Ok(stop)
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER PRIMARY KEY,
             applied_at INTEGER NOT NULL
         )",
    )
    .db()?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )
        .db()?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "the database has schema version {current}, this build knows up to {SCHEMA_VERSION}: \
             it was written by a newer ccm"
        )));
    }
    for (i, script) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        tx.execute_batch(script).db()?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
            params![version, Utc::now().timestamp_millis()],
        )
        .db()?;
        tracing::info!(version, "sqlite store: applied schema migration");
    }
    tx.commit().db()
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, in WAL mode, and migrates its
    /// schema. Blocking: call it before serving, or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> StoreResult<SqliteStore> {
        let path = path.as_ref();
        let mut writer = Connection::open(path).map_err(|e| {
            StoreError::Unavailable(format!("cannot open sqlite file {}: {e}", path.display()))
        })?;
        configure(&writer, true, Role::Writer)?;
        migrate(&mut writer)?;
        let mut readers = Vec::with_capacity(SQLITE_READ_CONNECTIONS);
        for _ in 0..SQLITE_READ_CONNECTIONS {
            let r = Connection::open(path).db()?;
            configure(&r, true, Role::Reader)?;
            readers.push(Mutex::new(r));
        }
        let checkpointer = Connection::open(path).db()?;
        configure(&checkpointer, true, Role::Checkpointer)?;
        let stop = spawn_checkpointer(checkpointer, path.display().to_string())?;
        tracing::info!(path = %path.display(), schema_version = SCHEMA_VERSION, "sqlite store opened");
        SqliteStore::from_parts(writer, readers, Some(stop), path.display().to_string())
    }

    /// Opens `<dir>/`[`SQLITE_FILE_NAME`], creating the directory if needed.
    pub fn open_in_dir(dir: impl AsRef<Path>) -> StoreResult<SqliteStore> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        SqliteStore::open(Self::file_in(dir))
    }

    /// The database file [`SqliteStore::open_in_dir`] uses for `dir`.
    pub fn file_in(dir: impl AsRef<Path>) -> PathBuf {
        dir.as_ref().join(SQLITE_FILE_NAME)
    }

    /// A private in-memory database (for tests and simulations); gone when dropped.
    pub fn open_in_memory() -> StoreResult<SqliteStore> {
        let mut writer = Connection::open_in_memory().db()?;
        configure(&writer, false, Role::Writer)?;
        migrate(&mut writer)?;
        SqliteStore::from_parts(writer, Vec::new(), None, ":memory:".to_owned())
    }

    fn from_parts(
        writer: Connection,
        readers: Vec<Mutex<Connection>>,
        checkpointer: Option<mpsc::Sender<()>>,
        location: String,
    ) -> StoreResult<Self> {
        let writer = spawn_writer(writer, location.clone())?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer,
                readers,
                next_reader: AtomicUsize::new(0),
                _checkpointer: checkpointer.map(Mutex::new),
                location,
            }),
        })
    }

    /// The schema version of the open database.
    pub async fn schema_version(&self) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
                .db()
        })
        .await
    }

    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        if self.inner.readers.is_empty() {
            // In memory: the writer connection is the only one.
            return self.write(move |c| f(c)).await;
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.with_reader(f))
            .await
            .map_err(|e| StoreError::Backend(format!("sqlite read task failed: {e}")))?
    }

    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job::Run(Box::new(move |conn: &mut Connection| {
            let _ = reply.send(f(conn));
        }));
        self.inner.writer.send(job).map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Hands one `apply` call to the writer thread (group commit).
    async fn apply_writes(&self, writes: Vec<Write>) -> StoreResult<Vec<Applied>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.inner
            .writer
            .send(Job::Apply { writes, reply })
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }
}

impl Inner {
    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let n = self.readers.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(conn) = self.readers[(start + i) % n].try_lock() {
                return f(&conn);
            }
        }
        f(&lock(&self.readers[start]))
    }
}

fn millis_to_time(idx: usize, ms: i64) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms).ok_or(rusqlite::Error::IntegralValueOutOfRange(idx, ms))
}

fn doc_from_row(kind: Kind, r: &Row<'_>) -> rusqlite::Result<Document> {
    Ok(Document {
        kind,
        id: r.get(0)?,
        resource_version: r.get(1)?,
        seq: r.get(2)?,
        created_at: millis_to_time(3, r.get(3)?)?,
        updated_at: millis_to_time(4, r.get(4)?)?,
        index: IndexFields {
            name: r.get(5)?,
            version_key: r.get(6)?,
            state: r.get(7)?,
            worker_id: r.get(8)?,
            owner_id: r.get(9)?,
            definition_id: r.get(10)?,
            template_name: r.get(11)?,
            sort_key: r.get(12)?,
        },
        body: Body::from_stored(r.get(13)?),
    })
}

fn log_from_row(r: &Row<'_>) -> rusqlite::Result<LogEntry> {
    let id: String = r.get(0)?;
    let id = Uuid::parse_str(&id).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(LogEntry {
        id,
        at: millis_to_time(1, r.get(1)?)?,
        resource_kind: r.get(2)?,
        resource_id: r.get(3)?,
        actor: r.get(4)?,
        action: r.get(5)?,
        body: Body::from_stored(r.get(6)?),
    })
}

/// Appends ` AND <condition>` for each filter.
fn push_filters(sql: &mut String, params: &mut Vec<Value>, filters: &[Filter]) {
    for f in filters {
        match f {
            Filter::Eq(field, v) => {
                sql.push_str(&format!(" AND {} = ?", field.column()));
                params.push(Value::Text(v.clone()));
            }
            Filter::In(_, vs) if vs.is_empty() => {
                sql.push_str(" AND 0");
            }
            Filter::In(field, vs) => {
                let marks = vec!["?"; vs.len()].join(", ");
                sql.push_str(&format!(" AND {} IN ({marks})", field.column()));
                params.extend(vs.iter().cloned().map(Value::Text));
            }
            Filter::Missing(field) => {
                sql.push_str(&format!(" AND {} IS NULL", field.column()));
            }
            Filter::SortKeyAtLeast(n) => {
                sql.push_str(" AND sort_key >= ?");
                params.push(Value::Integer(*n));
            }
            Filter::SortKeyBefore(n) => {
                sql.push_str(" AND sort_key < ?");
                params.push(Value::Integer(*n));
            }
        }
    }
}

/// The statements of one document table, built once (table names come from [`Kind`]).
struct TableSql {
    get: String,
    version: String,
    current: String,
    insert: String,
    delete: String,
    claims: String,
}

impl TableSql {
    fn new(kind: Kind) -> TableSql {
        let t = kind.collection();
        TableSql {
            get: format!("SELECT {DOC_COLUMNS} FROM {t} WHERE id = ?1"),
            version: format!("SELECT resource_version FROM {t} WHERE id = ?1"),
            current: format!(
                "SELECT resource_version, seq, created_at, claims, name, version_key, state,
                     worker_id, owner_id, definition_id, template_name, sort_key
                 FROM {t} WHERE id = ?1"
            ),
            insert: format!(
                "INSERT INTO {t} (id, resource_version, created_at, updated_at, name, version_key,
                     state, worker_id, owner_id, definition_id, template_name, sort_key, ord_sort,
                     ord_version, body, claims)
                 VALUES (?1, 1, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (id) DO NOTHING"
            ),
            delete: format!(
                "DELETE FROM {t} WHERE id = ?1 AND (?2 = 0 OR resource_version = ?2)
                 RETURNING resource_version, claims"
            ),
            claims: format!("SELECT claims FROM {t} WHERE id = ?1"),
        }
    }
}

/// The INSERT of one log table.
fn log_insert_sql(log: LogKind) -> &'static str {
    static SQL: LazyLock<Vec<String>> = LazyLock::new(|| {
        LogKind::ALL
            .iter()
            .map(|log| {
                format!(
                    "INSERT INTO {} (id, at, resource_kind, resource_id, actor, action, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (id) DO NOTHING",
                    log.collection()
                )
            })
            .collect()
    });
    &SQL[log as usize]
}

fn table_sql(kind: Kind) -> &'static TableSql {
    static SQL: LazyLock<Vec<TableSql>> =
        LazyLock::new(|| Kind::ALL.iter().map(|k| TableSql::new(*k)).collect());
    &SQL[kind as usize]
}

/// A document's claims as stored in its row: a JSON array of `[namespace, key]`, sorted.
/// The `claims` table (primary key `(namespace, key)`) is what makes claims unique; the row's
/// copy lets a write find the claims it holds without a second index.
fn encode_claims(claims: &[&Claim]) -> StoreResult<String> {
    let pairs: Vec<(&str, &str)> = claims
        .iter()
        .map(|c| (c.namespace.as_str(), c.key.as_str()))
        .collect();
    serde_json::to_string(&pairs)
        .map_err(|e| StoreError::Backend(format!("cannot encode claims: {e}")))
}

fn decode_claims(text: &str) -> StoreResult<Vec<Claim>> {
    let pairs: Vec<(String, String)> = serde_json::from_str(text)
        .map_err(|e| StoreError::Backend(format!("sqlite: stored claims are malformed: {e}")))?;
    Ok(pairs
        .into_iter()
        .map(|(namespace, key)| Claim { namespace, key })
        .collect())
}

fn acquire_claim(c: &Connection, kind: Kind, id: &str, claim: &Claim) -> StoreResult<()> {
    let inserted = c
        .prepare_cached(
            "INSERT INTO claims (namespace, key, owner_kind, owner_id) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (namespace, key) DO NOTHING",
        )
        .db()?
        .execute(params![claim.namespace, claim.key, kind.as_str(), id])
        .db()?;
    if inserted == 1 {
        return Ok(());
    }
    let (holder_kind, holder_id): (String, String) = c
        .prepare_cached("SELECT owner_kind, owner_id FROM claims WHERE namespace = ?1 AND key = ?2")
        .db()?
        .query_row(params![claim.namespace, claim.key], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .db()?;
    if holder_kind == kind.as_str() && holder_id == id {
        return Ok(());
    }
    Err(StoreError::ClaimTaken {
        namespace: claim.namespace.clone(),
        key: claim.key.clone(),
        holder_kind: holder_kind.parse()?,
        holder_id,
    })
}

fn release_claims<'a>(
    c: &Connection,
    claims: impl IntoIterator<Item = &'a Claim>,
) -> StoreResult<()> {
    let mut release = c
        .prepare_cached("DELETE FROM claims WHERE namespace = ?1 AND key = ?2")
        .db()?;
    for claim in claims {
        release.execute(params![claim.namespace, claim.key]).db()?;
    }
    Ok(())
}

fn current_version(c: &Connection, kind: Kind, id: &str) -> StoreResult<Option<i64>> {
    c.prepare_cached(&table_sql(kind).version)
        .db()?
        .query_row(params![id], |r| r.get(0))
        .optional()
        .db()
}

/// NotFound or Conflict, after a conditional statement matched no row.
fn missing_or_conflict(c: &Connection, kind: Kind, id: &str, expected: i64) -> StoreError {
    match current_version(c, kind, id) {
        Ok(None) => StoreError::not_found(kind.as_str(), id),
        Ok(Some(actual)) => StoreError::Conflict {
            kind,
            id: id.to_owned(),
            expected,
            actual,
        },
        Err(e) => e,
    }
}

/// The stored value of a string index field.
fn field_value(index: &IndexFields, field: IndexField) -> &Option<String> {
    match field {
        IndexField::Name => &index.name,
        IndexField::VersionKey => &index.version_key,
        IndexField::State => &index.state,
        IndexField::WorkerId => &index.worker_id,
        IndexField::OwnerId => &index.owner_id,
        IndexField::DefinitionId => &index.definition_id,
        IndexField::TemplateName => &index.template_name,
    }
}

/// The row an update starts from.
struct Current {
    resource_version: i64,
    seq: i64,
    created_ms: i64,
    claims: String,
    index: IndexFields,
}

fn create(
    c: &Connection,
    doc: &DocumentData,
    claims: &[Claim],
    now: DateTime<Utc>,
) -> StoreResult<Applied> {
    let DocumentData {
        kind,
        id,
        index,
        body,
    } = doc;
    let claims = validate::dedup_claims(claims);
    let n = c
        .prepare_cached(&table_sql(*kind).insert)
        .db()?
        .execute(params![
            id,
            now.timestamp_millis(),
            index.name,
            index.version_key,
            index.state,
            index.worker_id,
            index.owner_id,
            index.definition_id,
            index.template_name,
            index.sort_key,
            token::ord_sort(index),
            token::ord_version(index),
            body.as_str(),
            encode_claims(&claims)?,
        ])
        .db()?;
    if n == 0 {
        return Err(StoreError::already_exists(kind.as_str(), id.clone()));
    }
    let seq = c.last_insert_rowid();
    for claim in claims {
        acquire_claim(c, *kind, id, claim)?;
    }
    Ok(Applied::Created(Document {
        kind: *kind,
        id: id.clone(),
        index: index.clone(),
        body: body.clone(),
        resource_version: 1,
        seq,
        created_at: now,
        updated_at: now,
    }))
}

fn update(
    c: &Connection,
    doc: &DocumentData,
    expected_version: i64,
    claims: &ClaimChange,
    now: DateTime<Utc>,
) -> StoreResult<Applied> {
    let DocumentData {
        kind,
        id,
        index,
        body,
    } = doc;
    let current: Option<Current> = c
        .prepare_cached(&table_sql(*kind).current)
        .db()?
        .query_row(params![id], |r| {
            Ok(Current {
                resource_version: r.get(0)?,
                seq: r.get(1)?,
                created_ms: r.get(2)?,
                claims: r.get(3)?,
                index: IndexFields {
                    name: r.get(4)?,
                    version_key: r.get(5)?,
                    state: r.get(6)?,
                    worker_id: r.get(7)?,
                    owner_id: r.get(8)?,
                    definition_id: r.get(9)?,
                    template_name: r.get(10)?,
                    sort_key: r.get(11)?,
                },
            })
        })
        .optional()
        .db()?;
    let Some(current) = current else {
        return Err(StoreError::not_found(kind.as_str(), id.clone()));
    };
    if expected_version != 0 && expected_version != current.resource_version {
        return Err(StoreError::Conflict {
            kind: *kind,
            id: id.clone(),
            expected: expected_version,
            actual: current.resource_version,
        });
    }
    // Claims first (a refusal leaves the row untouched), then ONE update of the row.
    let mut new_claims: Option<String> = None;
    if let ClaimChange::Replace(wanted) = claims {
        let wanted = validate::dedup_claims(wanted);
        let held = decode_claims(&current.claims)?;
        let held_set: BTreeSet<&Claim> = held.iter().collect();
        let wanted_set: BTreeSet<&Claim> = wanted.iter().copied().collect();
        if held_set != wanted_set {
            release_claims(c, held.iter().filter(|h| !wanted_set.contains(h)))?;
            for claim in wanted.iter().filter(|w| !held_set.contains(*w)) {
                acquire_claim(c, *kind, id, claim)?;
            }
            new_claims = Some(encode_claims(&wanted)?);
        }
    }
    // Write only what changed: an UPDATE that assigns an indexed column rewrites that index
    // entry even when the value is the same.
    let resource_version = current.resource_version + 1;
    let now_ms = now.timestamp_millis();
    let ord_sort = token::ord_sort(index);
    let ord_version = token::ord_version(index);
    let body_text = body.as_str();
    let mut sql = format!(
        "UPDATE {} SET resource_version = ?, updated_at = ?, body = ?",
        kind.collection()
    );
    let mut values: Vec<&dyn ToSql> = vec![&resource_version, &now_ms, &body_text];
    for field in IndexField::ALL {
        if field.get(&current.index) != field.get(index) {
            sql.push_str(", ");
            sql.push_str(field.column());
            sql.push_str(" = ?");
            values.push(field_value(index, field));
        }
    }
    if current.index.version_key != index.version_key {
        sql.push_str(", ord_version = ?");
        values.push(&ord_version);
    }
    if current.index.sort_key != index.sort_key {
        sql.push_str(", sort_key = ?, ord_sort = ?");
        values.push(&index.sort_key);
        values.push(&ord_sort);
    }
    if let Some(text) = &new_claims {
        sql.push_str(", claims = ?");
        values.push(text);
    }
    sql.push_str(" WHERE seq = ?");
    values.push(&current.seq);
    c.prepare_cached(&sql).db()?.execute(&values[..]).db()?;

    Ok(Applied::Updated(Document {
        kind: *kind,
        id: id.clone(),
        index: index.clone(),
        body: body.clone(),
        resource_version,
        seq: current.seq,
        created_at: millis_to_time(2, current.created_ms).db()?,
        updated_at: now,
    }))
}

fn exec_write(c: &Connection, w: &Write, now: DateTime<Utc>) -> StoreResult<Applied> {
    match w {
        Write::Create { doc, claims } => create(c, doc, claims, now),
        Write::Update {
            doc,
            expected_version,
            claims,
        } => update(c, doc, *expected_version, claims, now),
        Write::Delete {
            kind,
            id,
            expected_version,
        } => {
            let deleted: Option<(i64, String)> = c
                .prepare_cached(&table_sql(*kind).delete)
                .db()?
                .query_row(params![id, expected_version], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .db()?;
            let Some((resource_version, claims)) = deleted else {
                return Err(missing_or_conflict(c, *kind, id, *expected_version));
            };
            release_claims(c, &decode_claims(&claims)?)?;
            Ok(Applied::Deleted {
                kind: *kind,
                id: id.clone(),
                resource_version,
            })
        }
        Write::Guard {
            kind,
            id,
            expected_version,
        } => match current_version(c, *kind, id)? {
            None => Err(StoreError::not_found(kind.as_str(), id.clone())),
            Some(actual) if *expected_version != 0 && actual != *expected_version => {
                Err(StoreError::Conflict {
                    kind: *kind,
                    id: id.clone(),
                    expected: *expected_version,
                    actual,
                })
            }
            Some(actual) => Ok(Applied::Guarded {
                kind: *kind,
                id: id.clone(),
                resource_version: actual,
            }),
        },
        Write::GuardNoneMatch { kind, filters } => {
            let mut sql = format!("SELECT id FROM {} WHERE 1", kind.collection());
            let mut values = Vec::new();
            push_filters(&mut sql, &mut values, filters);
            sql.push_str(" LIMIT 1");
            let hit: Option<String> = c
                .prepare_cached(&sql)
                .db()?
                .query_row(rusqlite::params_from_iter(values), |r| r.get(0))
                .optional()
                .db()?;
            match hit {
                Some(id) => Err(StoreError::GuardFailed { kind: *kind, id }),
                None => Ok(Applied::NoneMatched { kind: *kind }),
            }
        }
        Write::Append { log, entry } => {
            let at = truncate_to_millis(entry.at);
            let id = entry.id.hyphenated().to_string();
            let n = c
                .prepare_cached(log_insert_sql(*log))
                .db()?
                .execute(params![
                    id,
                    at.timestamp_millis(),
                    entry.resource_kind,
                    entry.resource_id,
                    entry.actor,
                    entry.action,
                    entry.body.as_str(),
                ])
                .db()?;
            if n == 0 {
                return Err(StoreError::already_exists(log.as_str(), id));
            }
            Ok(Applied::Appended {
                log: *log,
                id: entry.id,
                at,
            })
        }
    }
}

fn exec_writes(c: &Connection, writes: &[Write], now: DateTime<Utc>) -> StoreResult<Vec<Applied>> {
    writes.iter().map(|w| exec_write(c, w, now)).collect()
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "sqlite"))]
    async fn ping(&self) -> StoreResult<()> {
        self.read(|c| {
            c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .db()
                .map(|_| ())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "sqlite"))]
    async fn get(&self, kind: Kind, id: &str) -> StoreResult<Option<Document>> {
        let id = id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&table_sql(kind).get)
                .db()?
                .query_row(params![id], |r| doc_from_row(kind, r))
                .optional()
                .db()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self, ids), fields(backend = "sqlite", n = ids.len()))]
    async fn get_many(&self, kind: Kind, ids: &[String]) -> StoreResult<Vec<Document>> {
        validate::check_get_many(ids)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = ids.to_vec();
        self.read(move |c| {
            let marks = vec!["?"; ids.len()].join(", ");
            let sql = format!(
                "SELECT {DOC_COLUMNS} FROM {} WHERE id IN ({marks})",
                kind.collection()
            );
            let values: Vec<Value> = ids.iter().cloned().map(Value::Text).collect();
            let mut found: HashMap<String, Document> = c
                .prepare(&sql)
                .db()?
                .query_map(rusqlite::params_from_iter(values), |r| {
                    doc_from_row(kind, r)
                })
                .db()?
                .map(|d| d.map(|d| (d.id.clone(), d)))
                .collect::<rusqlite::Result<_>>()
                .db()?;
            Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "sqlite", kind = %query.kind))]
    async fn list(&self, query: Query) -> StoreResult<Page> {
        validate::check_filters(&query.filters)?;
        let cursor = token::decode_doc(&query)?;
        let page_size = effective_page_size(query.page_size) as usize;
        self.read(move |c| {
            let mut sql = format!(
                "SELECT {DOC_COLUMNS} FROM {} WHERE 1",
                query.kind.collection()
            );
            let mut values = Vec::new();
            push_filters(&mut sql, &mut values, &query.filters);
            if let Some(cur) = &cursor {
                match query.order {
                    Order::CreatedAsc => {
                        sql.push_str(" AND seq > ?");
                        values.push(Value::Integer(cur.seq));
                    }
                    Order::SortKeyAsc => {
                        sql.push_str(" AND (ord_sort, seq) > (?, ?)");
                        values.push(Value::Integer(cur.ord_sort));
                        values.push(Value::Integer(cur.seq));
                    }
                    Order::VersionDesc => {
                        sql.push_str(" AND (ord_version, seq) < (?, ?)");
                        values.push(Value::Text(cur.ord_version.clone()));
                        values.push(Value::Integer(cur.seq));
                    }
                }
            }
            sql.push_str(match query.order {
                Order::CreatedAsc => " ORDER BY seq",
                Order::SortKeyAsc => " ORDER BY ord_sort, seq",
                Order::VersionDesc => " ORDER BY ord_version DESC, seq DESC",
            });
            sql.push_str(" LIMIT ?");
            values.push(Value::Integer(page_size as i64 + 1));
            let mut items: Vec<Document> = c
                .prepare_cached(&sql)
                .db()?
                .query_map(rusqlite::params_from_iter(values), |r| {
                    doc_from_row(query.kind, r)
                })
                .db()?
                .collect::<rusqlite::Result<_>>()
                .db()?;
            let next_page_token = if items.len() > page_size {
                items.truncate(page_size);
                match items.last() {
                    Some(last) => Some(token::encode_doc(
                        &query,
                        DocCursor {
                            ord_sort: token::ord_sort(&last.index),
                            ord_version: token::ord_version(&last.index).to_owned(),
                            seq: last.seq,
                            id: last.id.clone(),
                        },
                    )?),
                    None => None,
                }
            } else {
                None
            };
            Ok(Page {
                items,
                next_page_token,
            })
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "sqlite", kind = %kind))]
    async fn count(&self, kind: Kind, filters: &[Filter]) -> StoreResult<u64> {
        validate::check_filters(filters)?;
        let filters = filters.to_vec();
        self.read(move |c| {
            let mut sql = format!("SELECT COUNT(*) FROM {} WHERE 1", kind.collection());
            let mut values = Vec::new();
            push_filters(&mut sql, &mut values, &filters);
            let n: i64 = c
                .prepare_cached(&sql)
                .db()?
                .query_row(rusqlite::params_from_iter(values), |r| r.get(0))
                .db()?;
            Ok(n.max(0) as u64)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "sqlite"))]
    async fn claims_of(&self, kind: Kind, id: &str) -> StoreResult<Vec<Claim>> {
        let id = id.to_owned();
        self.read(move |c| {
            let text: Option<String> = c
                .prepare_cached(&table_sql(kind).claims)
                .db()?
                .query_row(params![id], |r| r.get(0))
                .optional()
                .db()?;
            match text {
                Some(t) => decode_claims(&t),
                None => Ok(Vec::new()),
            }
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "sqlite"))]
    async fn claim_holder(&self, claim: &Claim) -> StoreResult<Option<ClaimHolder>> {
        let claim = claim.clone();
        self.read(move |c| {
            let row: Option<(String, String)> = c
                .prepare_cached(
                    "SELECT owner_kind, owner_id FROM claims WHERE namespace = ?1 AND key = ?2",
                )
                .db()?
                .query_row(params![claim.namespace, claim.key], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .db()?;
            row.map(|(kind, id)| {
                Ok(ClaimHolder {
                    kind: kind.parse()?,
                    id,
                })
            })
            .transpose()
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "sqlite", writes = writes.len()))]
    async fn apply(&self, writes: Vec<Write>) -> StoreResult<Vec<Applied>> {
        validate::check_writes(&writes)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.apply_writes(writes).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "sqlite", items = items.len()))]
    async fn apply_each(
        &self,
        items: Vec<Vec<Write>>,
    ) -> StoreResult<Vec<StoreResult<Vec<Applied>>>> {
        validate::check_total(items.iter().map(Vec::len).sum())?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let now = truncate_to_millis(Utc::now());
            let mut results = Vec::with_capacity(items.len());
            for item in &items {
                if let Err(e) = validate::check_writes(item) {
                    results.push(Err(e));
                    continue;
                }
                // One savepoint per item. Any error that is not the item's own aborts the whole
                // transaction (dropping `tx` rolls it back).
                results.push(exec_item(&tx, item, now)?);
            }
            tx.commit().db()?;
            Ok(results)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(backend = "sqlite", log = %log))]
    async fn list_log(&self, log: LogKind, query: LogQuery) -> StoreResult<LogPage> {
        validate::check_log_query(&query)?;
        let cursor = token::decode_log(log, &query)?;
        let page_size = effective_page_size(query.page_size) as usize;
        self.read(move |c| {
            let mut sql = format!("SELECT {LOG_COLUMNS} FROM {} WHERE 1", log.collection());
            let mut values = Vec::new();
            if let Some(k) = &query.resource_kind {
                sql.push_str(" AND resource_kind = ?");
                values.push(Value::Text(k.clone()));
            }
            if let Some(id) = &query.resource_id {
                sql.push_str(" AND resource_id = ?");
                values.push(Value::Text(id.clone()));
            }
            if let Some(t) = query.since {
                sql.push_str(" AND at >= ?");
                values.push(Value::Integer(t.timestamp_millis()));
            }
            if let Some(t) = query.until {
                sql.push_str(" AND at < ?");
                values.push(Value::Integer(t.timestamp_millis()));
            }
            if let Some(cur) = &cursor {
                sql.push_str(" AND (at, id) < (?, ?)");
                values.push(Value::Integer(cur.at_ms));
                values.push(Value::Text(cur.id.clone()));
            }
            sql.push_str(" ORDER BY at DESC, id DESC LIMIT ?");
            values.push(Value::Integer(page_size as i64 + 1));
            let mut entries: Vec<LogEntry> = c
                .prepare_cached(&sql)
                .db()?
                .query_map(rusqlite::params_from_iter(values), log_from_row)
                .db()?
                .collect::<rusqlite::Result<_>>()
                .db()?;
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
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = "sqlite"))]
    async fn purge_log(&self, log: LogKind, older_than: DateTime<Utc>) -> StoreResult<u64> {
        check_purge_cutoff(log, older_than)?;
        self.write(move |conn| {
            let n = conn
                .prepare_cached(&format!("DELETE FROM {} WHERE at < ?1", log.collection()))
                .db()?
                .execute(params![older_than.timestamp_millis()])
                .db()?;
            tracing::info!(log = %log, deleted = n, %older_than, "purged log entries");
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(index name without the table prefix, columns)` of `table`'s explicit indexes.
    fn indexes_of(c: &Connection, table: &str) -> Vec<(String, Vec<String>)> {
        let names: Vec<String> = c
            .prepare(
                "SELECT name FROM sqlite_master
                 WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL ORDER BY name",
            )
            .unwrap()
            .query_map([table], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        names
            .into_iter()
            .map(|name| {
                let columns: Vec<String> = c
                    .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                    .unwrap()
                    .query_map([&name], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                let short = name
                    .strip_prefix(&format!("{table}_"))
                    .unwrap_or_else(|| panic!("index {name} is not prefixed with {table}_"))
                    .to_owned();
                (short, columns)
            })
            .collect()
    }

    fn sorted(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        let mut v: Vec<(String, Vec<String>)> = list
            .iter()
            .map(|(n, cols)| (n.to_string(), cols.iter().map(|c| c.to_string()).collect()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn sqlite_indexes_match_the_shared_schema() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        for kind in Kind::ALL {
            assert_eq!(
                indexes_of(&c, kind.collection()),
                sorted(crate::schema::document_indexes(kind)),
                "{kind}"
            );
        }
        for log in LogKind::ALL {
            assert_eq!(
                indexes_of(&c, log.collection()),
                sorted(crate::schema::LOG_INDEXES),
                "{log}"
            );
        }
    }

    #[test]
    fn enum_discriminants_index_the_statement_tables() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
            assert!(table_sql(*k).get.contains(k.collection()));
        }
        for (i, l) in LogKind::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i);
            assert!(log_insert_sql(*l).contains(l.collection()));
        }
    }

    #[test]
    fn claims_column_round_trips() {
        let a = Claim::new("port", "w/1");
        let b = Claim::new("n\"s", "k\u{1F680}");
        let text = encode_claims(&[&a, &b]).unwrap();
        assert_eq!(decode_claims(&text).unwrap(), vec![a, b]);
        assert!(matches!(decode_claims("{"), Err(StoreError::Backend(_))));
    }

    #[test]
    fn migrating_twice_applies_nothing() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        migrate(&mut c).unwrap();
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, SCHEMA_VERSION);
    }

    #[test]
    fn the_planner_uses_the_indexes() {
        let mut c = Connection::open_in_memory().unwrap();
        migrate(&mut c).unwrap();
        let plan = |sql: &str| -> String {
            c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .join(" | ")
        };
        for (sql, index) in [
            (
                "SELECT id FROM lablet_instances WHERE 1 AND state IN ('a', 'b') ORDER BY seq",
                "lablet_instances_by_state_slot",
            ),
            (
                "SELECT id FROM lablet_instances WHERE 1 AND worker_id = 'w' AND state = 's'",
                "lablet_instances_by_worker_state",
            ),
            (
                "SELECT id FROM lablet_instances WHERE 1 AND (ord_sort, seq) > (1, 2) ORDER BY ord_sort, seq LIMIT 10",
                "lablet_instances_by_slot",
            ),
            (
                "SELECT id FROM lablet_definitions WHERE 1 AND name = 'n' ORDER BY ord_version DESC, seq DESC",
                "lablet_definitions_by_name_version",
            ),
            (
                "SELECT id FROM cml_workers WHERE 1 AND template_name = 't' LIMIT 1",
                "cml_workers_by_template",
            ),
            (
                "SELECT id FROM audit_events WHERE 1 AND resource_kind = 'k' AND resource_id = 'r' ORDER BY at DESC, id DESC",
                "audit_events_by_resource",
            ),
        ] {
            let p = plan(sql);
            assert!(p.contains(index), "{sql}\n  plan: {p}");
        }
    }
}
