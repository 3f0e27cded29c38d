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

/// Many concurrent `apply` calls on a file store (the writer thread commits the calls queued
/// behind each other in one transaction): every call is answered as if it had run alone. Of the
/// calls that race for the same claim exactly one wins; a losing call leaves no trace (neither
/// its document nor its audit entry), and the winners are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_commit_together_and_fail_alone() {
    use ccm_store::{Claim, LogEntry, LogKind, LogQuery};
    const CALLS: usize = 240;
    const KEYS: usize = 20;
    let dir = TempDir::new("ccm-store-group");
    let store = Arc::new(SqliteStore::open_in_dir(dir.path()).expect("open"));
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("i-{i}");
            let key = format!("k-{}", i % KEYS);
            let doc = DocumentData::new(
                Kind::Instance,
                id.clone(),
                Body::from_json_text(format!(r#"{{"n":{i}}}"#)).expect("body"),
            );
            let audit = LogEntry::new(
                "instance",
                id.clone(),
                "user:test",
                "instance.create",
                Body::from_json_text("{}").expect("body"),
            );
            let r = store
                .apply(vec![
                    Write::Create {
                        doc,
                        claims: vec![Claim::new("slot", key.clone())],
                    },
                    Write::append(LogKind::Audit, audit),
                ])
                .await;
            (id, key, r)
        }));
    }
    let mut winners = std::collections::BTreeMap::<String, String>::new();
    let mut losers = Vec::new();
    for t in tasks {
        let (id, key, r) = t.await.expect("task");
        match r {
            Ok(applied) => {
                assert_eq!(applied.len(), 2, "{id}");
                assert!(
                    winners.insert(key.clone(), id.clone()).is_none(),
                    "two calls won claim {key}"
                );
            }
            Err(StoreError::ClaimTaken { key: taken, .. }) => {
                assert_eq!(taken, key);
                losers.push(id);
            }
            Err(e) => panic!("{id}: unexpected error {e:?}"),
        }
    }
    assert_eq!(winners.len(), KEYS, "one winner per claim");
    assert_eq!(losers.len(), CALLS - KEYS);
    for (key, id) in &winners {
        let holder = store
            .claim_holder(&Claim::new("slot", key.clone()))
            .await
            .expect("holder")
            .expect("held");
        assert_eq!(&holder.id, id);
        assert!(store.get(Kind::Instance, id).await.expect("get").is_some());
    }
    for id in &losers {
        assert!(
            store.get(Kind::Instance, id).await.expect("get").is_none(),
            "{id} lost its claim but its document is stored"
        );
        let audit = store
            .list_log(
                LogKind::Audit,
                LogQuery {
                    resource_id: Some(id.clone()),
                    ..Default::default()
                },
            )
            .await
            .expect("audit");
        assert!(
            audit.entries.is_empty(),
            "{id} lost but its audit entry is stored"
        );
    }
    let mut stored = 0;
    let mut token = None;
    loop {
        let page = store
            .list(Query::new(Kind::Instance).after(token))
            .await
            .expect("list");
        stored += page.items.len();
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(stored, KEYS);
}
