//! The conformance suite against SQLite: in memory, and file-backed in a temporary directory,
//! plus what only a file can show (reopen, schema version, two stores on one file, WAL).

use std::sync::Arc;

use ccm_store::conformance::{TempDir, TestEnv};
use ccm_store::{
    Body, DocumentData, IndexFields, Kind, Query, SqliteStore, Store, StoreError, Write,
};

mod in_memory {
    use super::*;

    async fn open() -> TestEnv {
        let store = SqliteStore::open_in_memory().expect("in-memory sqlite store");
        TestEnv::new(Arc::new(store))
    }

    ccm_store::conformance_tests!(open);
}

mod file {
    use super::*;

    async fn open() -> TestEnv {
        let dir = TempDir::new("ccm-store-sqlite");
        let store = SqliteStore::open_in_dir(dir.path()).expect("file-backed sqlite store");
        // The directory goes when the check is done.
        TestEnv::new(Arc::new(store)).with_cleanup(async move { drop(dir) })
    }

    ccm_store::conformance_tests!(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_reopen_finds_everything() {
    let dir = TempDir::new("ccm-store-reopen");
    let path = SqliteStore::file_in(dir.path());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("open"));
    ccm_store::conformance::reopen_finds_everything(store, |old| async move {
        drop(old);
        Arc::new(SqliteStore::open(&path).expect("reopen")) as Arc<dyn Store>
    })
    .await;
}

#[tokio::test]
async fn file_store_records_its_schema_version_and_uses_wal() {
    let dir = TempDir::new("ccm-store-schema");
    let store = SqliteStore::open_in_dir(dir.path()).expect("open");
    assert_eq!(
        store.schema_version().await.expect("schema version"),
        ccm_store::sqlite::SCHEMA_VERSION
    );
    let path = SqliteStore::file_in(dir.path());
    assert!(path.is_file(), "{} exists", path.display());
    let raw = rusqlite::Connection::open(&path).expect("raw connection");
    let mode: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode.to_lowercase(), "wal");
    let versions: Vec<i64> = raw
        .prepare("SELECT version FROM schema_version ORDER BY version")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        versions,
        (1..=ccm_store::sqlite::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    drop(store);
    // Opening again applies nothing new.
    let again = SqliteStore::open_in_dir(dir.path()).expect("reopen");
    assert_eq!(
        again.schema_version().await.expect("schema version"),
        ccm_store::sqlite::SCHEMA_VERSION
    );
}

#[tokio::test]
async fn file_written_by_a_newer_schema_is_refused() {
    let dir = TempDir::new("ccm-store-newer");
    drop(SqliteStore::open_in_dir(dir.path()).expect("create"));
    let path = SqliteStore::file_in(dir.path());
    let raw = rusqlite::Connection::open(&path).expect("raw connection");
    raw.execute(
        "INSERT INTO schema_version (version, applied_at) VALUES (?1, 0)",
        [ccm_store::sqlite::SCHEMA_VERSION + 1],
    )
    .expect("pretend a newer build migrated the file");
    drop(raw);
    let err = SqliteStore::open(&path).expect_err("a newer schema must be refused");
    assert!(
        matches!(&err, StoreError::Backend(m) if m.contains("newer")),
        "{err:?}"
    );
}

#[tokio::test]
async fn unopenable_path_is_unavailable() {
    let dir = TempDir::new("ccm-store-bad-path");
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").expect("write a file");
    let err = SqliteStore::open_in_dir(&not_a_dir).expect_err("a file is not a directory");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = SqliteStore::open(not_a_dir.join("sub").join("db.sqlite3"))
        .expect_err("missing parent directory");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    std::fs::write(&not_a_dir, vec![b'x'; 8192]).expect("write garbage");
    let err = SqliteStore::open(&not_a_dir).expect_err("not a database");
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_see_each_others_writes() {
    let dir = TempDir::new("ccm-store-shared");
    let a = SqliteStore::open_in_dir(dir.path()).expect("open a");
    let b = SqliteStore::open_in_dir(dir.path()).expect("open b");
    let doc = DocumentData::new(
        Kind::Worker,
        "w",
        Body::from_json_text(r#"{"x":1}"#).expect("body"),
    )
    .with_index(IndexFields {
        state: Some("running".into()),
        ..IndexFields::default()
    });
    a.apply(vec![Write::create(doc.clone())])
        .await
        .expect("create in a");
    let seen = b
        .get(Kind::Worker, "w")
        .await
        .expect("get in b")
        .expect("visible in b");
    assert_eq!(seen.body.as_str(), r#"{"x":1}"#);
    b.apply(vec![Write::update(doc.clone(), 1)])
        .await
        .expect("update in b");
    let err = a
        .apply(vec![Write::update(doc, 1)])
        .await
        .expect_err("a's view is stale");
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 1,
                actual: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        a.list(Query::new(Kind::Worker))
            .await
            .expect("list")
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn in_memory_stores_are_independent() {
    let a = SqliteStore::open_in_memory().expect("a");
    let b = SqliteStore::open_in_memory().expect("b");
    a.apply(vec![Write::create(DocumentData::new(
        Kind::Template,
        "t",
        Body::empty_object(),
    ))])
    .await
    .expect("create");
    assert!(a.get(Kind::Template, "t").await.expect("get").is_some());
    assert!(b.get(Kind::Template, "t").await.expect("get").is_none());
    assert_eq!(a.backend(), "sqlite");
}
