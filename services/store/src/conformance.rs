//! The conformance suite: one set of async checks that every [`Store`] must pass.
//!
//! Each check is a `pub async fn(Arc<dyn Store>)` that expects an EMPTY store and panics on any
//! deviation. [`conformance_tests!`](crate::conformance_tests) turns all of them into one
//! `#[tokio::test]` each, given an async function that returns a fresh [`TestEnv`]:
//!
//! ```text
//! async fn open() -> ccm_store::conformance::TestEnv {
//!     let store = ccm_store::SqliteStore::open_in_memory().expect("in-memory store");
//!     ccm_store::conformance::TestEnv::new(std::sync::Arc::new(store))
//! }
//! ccm_store::conformance_tests!(open);
//! ```
//!
//! [`reopen_finds_everything`] needs a way to reopen the same store, so it is called by the
//! backends that have one (a SQLite file, a MongoDB database) rather than by the macro.
//!
//! This module is test code (feature `conformance`): it panics instead of returning errors.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::json;
use uuid::Uuid;

use crate::{
    Applied, Body, Claim, ClaimChange, ClaimHolder, DEFAULT_PAGE_SIZE, Document, DocumentData,
    Filter, IndexField, IndexFields, Kind, LogEntry, LogKind, LogQuery, MAX_BODY_BYTES,
    MAX_GET_MANY, MAX_ID_BYTES, MAX_IN_VALUES, MAX_PAGE_SIZE, MAX_WRITES_PER_TRANSACTION, Order,
    Query, Store, StoreError, StoreResult, Write,
};

/// A store under test plus what to do after the check (drop a database, remove a directory).
pub struct TestEnv {
    /// The store, empty.
    pub store: Arc<dyn Store>,
    cleanup: Option<BoxFuture<'static, ()>>,
}

impl TestEnv {
    /// A store with nothing to clean up.
    pub fn new(store: Arc<dyn Store>) -> TestEnv {
        TestEnv {
            store,
            cleanup: None,
        }
    }

    /// Runs `cleanup` after the check, whether it passed or not.
    pub fn with_cleanup(mut self, cleanup: impl Future<Output = ()> + Send + 'static) -> TestEnv {
        self.cleanup = Some(Box::pin(cleanup));
        self
    }

    /// Runs one check, then the cleanup, then re-raises the check's panic if it had one.
    pub async fn run<F, Fut>(self, check: F)
    where
        F: FnOnce(Arc<dyn Store>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let TestEnv { store, cleanup } = self;
        let outcome = AssertUnwindSafe(check(store)).catch_unwind().await;
        if let Some(cleanup) = cleanup {
            cleanup.await;
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

/// A directory under the system temp dir, removed (with its content) when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, empty directory.
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One `#[tokio::test]` per conformance check, each on a fresh [`TestEnv`] from `$open`
/// (an async fn path).
#[macro_export]
macro_rules! conformance_tests {
    ($open:path) => {
        $crate::conformance_tests!(@checks $open;
            create_then_get_round_trips,
            create_existing_id_is_already_exists,
            kinds_are_separate_id_spaces,
            update_bumps_version_and_keeps_creation,
            update_delete_guard_of_missing_are_not_found,
            stale_update_conflicts_and_writes_nothing,
            expected_version_zero_skips_the_check,
            delete_checks_version_and_releases_claims,
            guard_checks_existence_and_version,
            guard_none_match_blocks_while_anything_matches,
            claims_are_unique_across_documents_and_kinds,
            claims_replace_keep_and_release,
            claims_move_within_one_batch,
            apply_each_commits_successful_items_only,
            apply_each_failed_item_leaves_no_trace,
            empty_batches_do_nothing,
            invalid_inputs_are_refused_and_write_nothing,
            filters_match_the_reference_semantics,
            list_orders_are_total_and_as_documented,
            pagination_visits_every_document_once,
            pagination_is_stable_under_concurrent_inserts,
            page_size_defaults_and_clamps,
            page_tokens_are_bound_to_their_query,
            get_many_answers_in_the_order_asked,
            logs_list_newest_first_with_filters_and_pages,
            logs_are_append_only,
            logs_purge_respects_the_retention_floor,
            concurrent_versioned_writes_have_one_winner_per_version,
            concurrent_claims_have_one_winner,
            hostile_strings_are_stored_inert,
            large_bodies_round_trip_byte_identical,
            ping_answers,
        );
    };
    (@checks $open:path; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let env: $crate::conformance::TestEnv = $open().await;
                env.run($crate::conformance::$check).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// helpers

fn body(v: serde_json::Value) -> Body {
    Body::from_json_text(v.to_string()).expect("test body is a JSON object")
}

fn data(kind: Kind, id: &str, index: IndexFields, b: serde_json::Value) -> DocumentData {
    DocumentData::new(kind, id, body(b)).with_index(index)
}

fn state(s: &str) -> IndexFields {
    IndexFields {
        state: Some(s.to_owned()),
        ..IndexFields::default()
    }
}

fn port(worker: &str, p: u16) -> Claim {
    Claim::new("port", format!("{worker}/{p}"))
}

fn expect_err<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) -> StoreError {
    match r {
        Err(e) => e,
        Ok(v) => panic!("{what}: expected an error, got {v:?}"),
    }
}

async fn create(store: &Arc<dyn Store>, doc: DocumentData, claims: Vec<Claim>) -> Document {
    let id = doc.id.clone();
    let mut applied = store
        .apply(vec![Write::Create { doc, claims }])
        .await
        .unwrap_or_else(|e| panic!("create {id:?}: {e}"));
    match applied.pop() {
        Some(Applied::Created(d)) => d,
        other => panic!("create {id:?} answered {other:?}"),
    }
}

async fn update(
    store: &Arc<dyn Store>,
    doc: DocumentData,
    expected_version: i64,
    claims: ClaimChange,
) -> StoreResult<Document> {
    let mut applied = store
        .apply(vec![Write::Update {
            doc,
            expected_version,
            claims,
        }])
        .await?;
    match applied.pop() {
        Some(Applied::Updated(d)) => Ok(d),
        other => panic!("update answered {other:?}"),
    }
}

async fn get(store: &Arc<dyn Store>, kind: Kind, id: &str) -> Option<Document> {
    store
        .get(kind, id)
        .await
        .unwrap_or_else(|e| panic!("get {kind} {id:?}: {e}"))
}

async fn must_get(store: &Arc<dyn Store>, kind: Kind, id: &str) -> Document {
    get(store, kind, id)
        .await
        .unwrap_or_else(|| panic!("{kind} {id:?} should exist"))
}

async fn holder(store: &Arc<dyn Store>, claim: &Claim) -> Option<ClaimHolder> {
    store.claim_holder(claim).await.expect("claim_holder")
}

fn held_by(kind: Kind, id: &str) -> Option<ClaimHolder> {
    Some(ClaimHolder {
        kind,
        id: id.to_owned(),
    })
}

async fn claims_of(store: &Arc<dyn Store>, kind: Kind, id: &str) -> Vec<Claim> {
    store.claims_of(kind, id).await.expect("claims_of")
}

/// Every page of `query` (must terminate within `limit` pages).
async fn list_all(store: &Arc<dyn Store>, query: Query) -> Vec<Document> {
    let mut out = Vec::new();
    let mut q = query;
    for _ in 0..10_000 {
        let page = store.list(q.clone()).await.expect("list");
        let size = crate::effective_page_size(q.page_size) as usize;
        assert!(page.items.len() <= size, "a page is larger than its size");
        out.extend(page.items);
        match page.next_page_token {
            Some(t) => q.page_token = Some(t),
            None => return out,
        }
    }
    panic!("pagination did not terminate");
}

fn ids(docs: &[Document]) -> Vec<String> {
    docs.iter().map(|d| d.id.clone()).collect()
}

async fn all_log(store: &Arc<dyn Store>, log: LogKind, mut q: LogQuery) -> Vec<LogEntry> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let page = store.list_log(log, q.clone()).await.expect("list_log");
        out.extend(page.entries);
        match page.next_page_token {
            Some(t) => q.page_token = Some(t),
            None => return out,
        }
    }
    panic!("log pagination did not terminate");
}

fn entry(resource_id: &str, action: &str, at: DateTime<Utc>) -> LogEntry {
    LogEntry::new(
        "instance",
        resource_id,
        "tester",
        action,
        body(json!({ "action": action, "resource": resource_id })),
    )
    .at(at)
}

// ---------------------------------------------------------------------------------------------
// documents

/// A created document reads back exactly as created, with version 1.
pub async fn create_then_get_round_trips(store: Arc<dyn Store>) {
    let before = Utc::now() - Duration::seconds(1);
    let index = IndexFields {
        name: Some("lab-a".into()),
        version_key: Some("000001.000002.000003".into()),
        state: Some("pending".into()),
        worker_id: Some("w-1".into()),
        owner_id: Some("alice".into()),
        definition_id: Some("def-1".into()),
        template_name: Some("small".into()),
        sort_key: Some(1_700_000_000_000),
    };
    let text = "{ \"b\": 1,\n  \"a\": [true, null, 1.5e3, \"x\"] }";
    let doc = DocumentData::new(
        Kind::Instance,
        "i-1",
        Body::from_json_text(text).expect("valid"),
    )
    .with_index(index.clone());
    let created = create(&store, doc, vec![]).await;
    let after = Utc::now() + Duration::seconds(1);
    assert_eq!(created.kind, Kind::Instance);
    assert_eq!(created.id, "i-1");
    assert_eq!(created.resource_version, 1);
    assert_eq!(created.index, index);
    assert_eq!(
        created.body.as_str(),
        text,
        "the body is kept byte for byte"
    );
    assert!(created.seq > 0, "seq {}", created.seq);
    assert_eq!(created.created_at, created.updated_at);
    assert!(created.created_at >= before && created.created_at <= after);
    assert_eq!(
        created.created_at.timestamp_subsec_nanos() % 1_000_000,
        0,
        "times have millisecond precision"
    );

    let read = must_get(&store, Kind::Instance, "i-1").await;
    assert_eq!(read, created);
    assert_eq!(get(&store, Kind::Instance, "i-2").await, None);
    assert_eq!(get(&store, Kind::Worker, "i-1").await, None);

    let bare = create(
        &store,
        data(Kind::Worker, "w-1", IndexFields::default(), json!({})),
        vec![],
    )
    .await;
    assert_eq!(bare.index, IndexFields::default());
    assert_eq!(must_get(&store, Kind::Worker, "w-1").await, bare);
    let second = create(
        &store,
        data(Kind::Instance, "i-0", IndexFields::default(), json!({})),
        vec![],
    )
    .await;
    assert!(
        second.seq > created.seq,
        "seq grows with every create of a kind"
    );
}

/// Creating an id that exists fails with AlreadyExists and changes nothing.
pub async fn create_existing_id_is_already_exists(store: Arc<dyn Store>) {
    let first = create(
        &store,
        data(Kind::Template, "t", state("a"), json!({"v": 1})),
        vec![],
    )
    .await;
    let err = expect_err(
        store
            .apply(vec![Write::Create {
                doc: data(Kind::Template, "t", state("b"), json!({"v": 2})),
                claims: vec![Claim::new("template_name", "t")],
            }])
            .await,
        "second create",
    );
    assert_eq!(
        err,
        StoreError::AlreadyExists {
            kind: "template".into(),
            id: "t".into()
        }
    );
    assert_eq!(err.grpc_code_name(), "ALREADY_EXISTS");
    assert_eq!(must_get(&store, Kind::Template, "t").await, first);
    assert_eq!(
        holder(&store, &Claim::new("template_name", "t")).await,
        None,
        "the failed create's claim was not taken"
    );
}

/// The same id in two kinds is two documents.
pub async fn kinds_are_separate_id_spaces(store: Arc<dyn Store>) {
    for kind in Kind::ALL {
        create(
            &store,
            data(
                kind,
                "same",
                state(kind.as_str()),
                json!({"kind": kind.as_str()}),
            ),
            vec![Claim::new("k", kind.as_str())],
        )
        .await;
    }
    for kind in Kind::ALL {
        let d = must_get(&store, kind, "same").await;
        assert_eq!(d.index.state.as_deref(), Some(kind.as_str()));
        assert_eq!(
            claims_of(&store, kind, "same").await,
            vec![Claim::new("k", kind.as_str())]
        );
        assert_eq!(store.count(kind, &[]).await.expect("count"), 1);
    }
    store
        .apply(vec![Write::delete(Kind::Worker, "same", 0)])
        .await
        .expect("delete");
    assert_eq!(get(&store, Kind::Worker, "same").await, None);
    assert!(get(&store, Kind::Template, "same").await.is_some());
    assert_eq!(holder(&store, &Claim::new("k", "worker")).await, None);
    assert_eq!(
        holder(&store, &Claim::new("k", "template")).await,
        held_by(Kind::Template, "same")
    );
}

/// Updates bump the version by one and keep seq and created_at.
pub async fn update_bumps_version_and_keeps_creation(store: Arc<dyn Store>) {
    let created = create(
        &store,
        data(
            Kind::Worker,
            "w",
            IndexFields {
                name: Some("worker".into()),
                state: Some("pending".into()),
                template_name: Some("small".into()),
                sort_key: Some(5),
                ..IndexFields::default()
            },
            json!({"n": 1}),
        ),
        vec![],
    )
    .await;
    let v2 = update(
        &store,
        data(Kind::Worker, "w", state("running"), json!({"n": 2})),
        1,
        ClaimChange::Keep,
    )
    .await
    .expect("update at 1");
    assert_eq!(v2.resource_version, 2);
    assert_eq!(v2.seq, created.seq);
    assert_eq!(v2.created_at, created.created_at);
    assert!(v2.updated_at >= created.updated_at);
    assert_eq!(
        v2.index,
        state("running"),
        "index fields are replaced, not merged"
    );
    assert_eq!(must_get(&store, Kind::Worker, "w").await, v2);

    let v3 = update(
        &store,
        data(Kind::Worker, "w", state("stopped"), json!({"n": 3})),
        2,
        ClaimChange::Keep,
    )
    .await
    .expect("update at 2");
    assert_eq!(v3.resource_version, 3);
    let read = must_get(&store, Kind::Worker, "w").await;
    assert_eq!(read, v3);
    assert_eq!(read.body.as_str(), r#"{"n":3}"#);
}

/// Update, delete and guard of a missing document fail with NotFound.
pub async fn update_delete_guard_of_missing_are_not_found(store: Arc<dyn Store>) {
    let nf = StoreError::NotFound {
        kind: "instance".into(),
        id: "nope".into(),
    };
    for w in [
        Write::update(data(Kind::Instance, "nope", state("x"), json!({})), 0),
        Write::update(data(Kind::Instance, "nope", state("x"), json!({})), 3),
        Write::delete(Kind::Instance, "nope", 0),
        Write::delete(Kind::Instance, "nope", 1),
        Write::guard(Kind::Instance, "nope", 0),
        Write::guard(Kind::Instance, "nope", 2),
    ] {
        let e = expect_err(store.apply(vec![w.clone()]).await, "missing document");
        assert_eq!(e, nf, "{w:?}");
        assert_eq!(e.grpc_code_name(), "NOT_FOUND");
    }
    assert_eq!(store.count(Kind::Instance, &[]).await.expect("count"), 0);
}

/// A stale write fails with Conflict and nothing of its batch is written.
pub async fn stale_update_conflicts_and_writes_nothing(store: Arc<dyn Store>) {
    let a = create(
        &store,
        data(Kind::Instance, "a", state("s1"), json!({"a": 1})),
        vec![Claim::new("ns", "a")],
    )
    .await;
    let a2 = update(
        &store,
        data(Kind::Instance, "a", state("s2"), json!({"a": 2})),
        a.resource_version,
        ClaimChange::Keep,
    )
    .await
    .expect("update a");
    let b = create(
        &store,
        data(Kind::Instance, "b", state("s1"), json!({"b": 1})),
        vec![Claim::new("ns", "b1")],
    )
    .await;
    let d = create(
        &store,
        data(Kind::Instance, "d", state("s1"), json!({})),
        vec![],
    )
    .await;

    let batch = vec![
        Write::Create {
            doc: data(Kind::Instance, "c", state("s1"), json!({})),
            claims: vec![Claim::new("ns", "c")],
        },
        Write::Update {
            doc: data(Kind::Instance, "b", state("moved"), json!({"b": 2})),
            expected_version: 1,
            claims: ClaimChange::Replace(vec![Claim::new("ns", "b2")]),
        },
        Write::delete(Kind::Instance, "d", 1),
        Write::append(LogKind::Audit, entry("b", "update", Utc::now())),
        Write::update(data(Kind::Instance, "a", state("s3"), json!({"a": 3})), 1),
        Write::create(data(Kind::Instance, "e", state("s1"), json!({}))),
    ];
    let e = expect_err(store.apply(batch).await, "stale batch");
    assert_eq!(
        e,
        StoreError::Conflict {
            kind: Kind::Instance,
            id: "a".into(),
            expected: 1,
            actual: 2
        }
    );
    assert_eq!(e.grpc_code_name(), "ABORTED");

    assert_eq!(
        get(&store, Kind::Instance, "c").await,
        None,
        "create rolled back"
    );
    assert_eq!(get(&store, Kind::Instance, "e").await, None);
    assert_eq!(
        must_get(&store, Kind::Instance, "b").await,
        b,
        "update rolled back"
    );
    assert_eq!(
        must_get(&store, Kind::Instance, "d").await,
        d,
        "delete rolled back"
    );
    assert_eq!(must_get(&store, Kind::Instance, "a").await, a2);
    assert_eq!(holder(&store, &Claim::new("ns", "c")).await, None);
    assert_eq!(holder(&store, &Claim::new("ns", "b2")).await, None);
    assert_eq!(
        holder(&store, &Claim::new("ns", "b1")).await,
        held_by(Kind::Instance, "b")
    );
    assert!(
        all_log(&store, LogKind::Audit, LogQuery::default())
            .await
            .is_empty(),
        "the append rolled back"
    );
}

/// expected_version 0 writes whatever the version.
pub async fn expected_version_zero_skips_the_check(store: Arc<dyn Store>) {
    create(
        &store,
        data(Kind::Definition, "d", state("a"), json!({})),
        vec![],
    )
    .await;
    for n in 2..=4 {
        let d = update(
            &store,
            data(Kind::Definition, "d", state("b"), json!({ "n": n })),
            0,
            ClaimChange::Keep,
        )
        .await
        .expect("unconditional update");
        assert_eq!(d.resource_version, n);
    }
    let applied = store
        .apply(vec![Write::delete(Kind::Definition, "d", 0)])
        .await
        .expect("unconditional delete");
    assert_eq!(
        applied,
        vec![Applied::Deleted {
            kind: Kind::Definition,
            id: "d".into(),
            resource_version: 4
        }]
    );
}

/// Delete is conditional, releases every claim, and the id can be created again.
pub async fn delete_checks_version_and_releases_claims(store: Arc<dyn Store>) {
    let claims = vec![port("w", 1), port("w", 2), Claim::new("name", "x")];
    create(
        &store,
        data(Kind::Instance, "d", state("a"), json!({})),
        claims.clone(),
    )
    .await;
    let e = expect_err(
        store
            .apply(vec![Write::delete(Kind::Instance, "d", 5)])
            .await,
        "stale delete",
    );
    assert_eq!(
        e,
        StoreError::Conflict {
            kind: Kind::Instance,
            id: "d".into(),
            expected: 5,
            actual: 1
        }
    );
    assert!(get(&store, Kind::Instance, "d").await.is_some());
    let mut sorted = claims.clone();
    sorted.sort();
    assert_eq!(claims_of(&store, Kind::Instance, "d").await, sorted);

    store
        .apply(vec![Write::delete(Kind::Instance, "d", 1)])
        .await
        .expect("delete");
    assert_eq!(get(&store, Kind::Instance, "d").await, None);
    assert!(claims_of(&store, Kind::Instance, "d").await.is_empty());
    for c in &claims {
        assert_eq!(holder(&store, c).await, None, "{c:?} released");
    }
    let again = expect_err(
        store
            .apply(vec![Write::delete(Kind::Instance, "d", 0)])
            .await,
        "delete twice",
    );
    assert!(matches!(again, StoreError::NotFound { .. }), "{again:?}");

    let recreated = create(
        &store,
        data(Kind::Instance, "d", state("b"), json!({})),
        claims.clone(),
    )
    .await;
    assert_eq!(recreated.resource_version, 1);
    assert_eq!(claims_of(&store, Kind::Instance, "d").await, sorted);
}

/// Guard passes on the right version (or any, with 0) and fails the batch otherwise.
pub async fn guard_checks_existence_and_version(store: Arc<dyn Store>) {
    create(
        &store,
        data(Kind::Worker, "w", state("running"), json!({})),
        vec![],
    )
    .await;
    update(
        &store,
        data(Kind::Worker, "w", state("running"), json!({"x": 1})),
        1,
        ClaimChange::Keep,
    )
    .await
    .expect("update");

    let ok = store
        .apply(vec![
            Write::guard(Kind::Worker, "w", 2),
            Write::create(data(
                Kind::Instance,
                "placed",
                state("scheduled"),
                json!({}),
            )),
            Write::guard(Kind::Worker, "w", 0),
        ])
        .await
        .expect("guarded batch");
    assert_eq!(
        ok[0],
        Applied::Guarded {
            kind: Kind::Worker,
            id: "w".into(),
            resource_version: 2
        }
    );
    assert!(matches!(ok[1], Applied::Created(_)));
    assert_eq!(ok[2], ok[0]);
    assert_eq!(
        must_get(&store, Kind::Worker, "w").await.resource_version,
        2,
        "a guard does not write"
    );

    let e = expect_err(
        store
            .apply(vec![
                Write::create(data(Kind::Instance, "other", state("scheduled"), json!({}))),
                Write::guard(Kind::Worker, "w", 1),
            ])
            .await,
        "stale guard",
    );
    assert_eq!(
        e,
        StoreError::Conflict {
            kind: Kind::Worker,
            id: "w".into(),
            expected: 1,
            actual: 2
        }
    );
    assert_eq!(get(&store, Kind::Instance, "other").await, None);
}

/// GuardNoneMatch fails while any document matches and passes once none does.
pub async fn guard_none_match_blocks_while_anything_matches(store: Arc<dyn Store>) {
    create(
        &store,
        data(
            Kind::Template,
            "small",
            IndexFields {
                name: Some("small".into()),
                ..IndexFields::default()
            },
            json!({}),
        ),
        vec![Claim::new("template_name", "small")],
    )
    .await;
    let worker_index = |t: &str, s: &str| IndexFields {
        template_name: Some(t.into()),
        state: Some(s.into()),
        ..IndexFields::default()
    };
    create(
        &store,
        data(
            Kind::Worker,
            "w1",
            worker_index("small", "running"),
            json!({}),
        ),
        vec![],
    )
    .await;
    create(
        &store,
        data(
            Kind::Worker,
            "w2",
            worker_index("large", "running"),
            json!({}),
        ),
        vec![],
    )
    .await;

    let delete_template = || {
        vec![
            Write::GuardNoneMatch {
                kind: Kind::Worker,
                filters: vec![Filter::eq(IndexField::TemplateName, "small")],
            },
            Write::delete(Kind::Template, "small", 0),
        ]
    };
    let e = expect_err(store.apply(delete_template()).await, "template in use");
    assert_eq!(
        e,
        StoreError::GuardFailed {
            kind: Kind::Worker,
            id: "w1".into()
        }
    );
    assert_eq!(e.grpc_code_name(), "FAILED_PRECONDITION");
    assert!(get(&store, Kind::Template, "small").await.is_some());

    // Several filters are ANDed, IN included.
    let busy = Write::GuardNoneMatch {
        kind: Kind::Worker,
        filters: vec![
            Filter::eq(IndexField::TemplateName, "large"),
            Filter::any_of(IndexField::State, ["draining", "stopping"]),
        ],
    };
    assert_eq!(
        store.apply(vec![busy.clone()]).await.expect("no match"),
        vec![Applied::NoneMatched { kind: Kind::Worker }]
    );

    update(
        &store,
        data(
            Kind::Worker,
            "w1",
            worker_index("large", "draining"),
            json!({}),
        ),
        0,
        ClaimChange::Keep,
    )
    .await
    .expect("move w1");
    let e = expect_err(store.apply(vec![busy]).await, "now w1 matches");
    assert_eq!(
        e,
        StoreError::GuardFailed {
            kind: Kind::Worker,
            id: "w1".into()
        }
    );

    let done = store
        .apply(delete_template())
        .await
        .expect("template unused now");
    assert_eq!(done[0], Applied::NoneMatched { kind: Kind::Worker });
    assert_eq!(get(&store, Kind::Template, "small").await, None);
    assert_eq!(
        holder(&store, &Claim::new("template_name", "small")).await,
        None
    );

    // A guard sees the earlier writes of its own batch.
    let e = expect_err(
        store
            .apply(vec![
                Write::create(data(
                    Kind::Worker,
                    "w3",
                    worker_index("tiny", "pending"),
                    json!({}),
                )),
                Write::GuardNoneMatch {
                    kind: Kind::Worker,
                    filters: vec![Filter::eq(IndexField::TemplateName, "tiny")],
                },
            ])
            .await,
        "guard after create in the same batch",
    );
    assert_eq!(
        e,
        StoreError::GuardFailed {
            kind: Kind::Worker,
            id: "w3".into()
        }
    );
    assert_eq!(get(&store, Kind::Worker, "w3").await, None);
}

/// A claim is held by one document at a time, across kinds.
pub async fn claims_are_unique_across_documents_and_kinds(store: Arc<dyn Store>) {
    let name = Claim::new("definition_name_version", "my-lab@1.2.0");
    create(
        &store,
        data(Kind::Definition, "d1", state("active"), json!({})),
        vec![name.clone()],
    )
    .await;
    let e = expect_err(
        store
            .apply(vec![Write::Create {
                doc: data(Kind::Definition, "d2", state("active"), json!({})),
                claims: vec![Claim::new("other", "free"), name.clone()],
            }])
            .await,
        "duplicate claim",
    );
    assert_eq!(
        e,
        StoreError::ClaimTaken {
            namespace: "definition_name_version".into(),
            key: "my-lab@1.2.0".into(),
            holder_kind: Kind::Definition,
            holder_id: "d1".into()
        }
    );
    assert_eq!(get(&store, Kind::Definition, "d2").await, None);
    assert_eq!(holder(&store, &Claim::new("other", "free")).await, None);

    let e = expect_err(
        store
            .apply(vec![Write::Create {
                doc: data(Kind::Template, "t", state("x"), json!({})),
                claims: vec![name.clone()],
            }])
            .await,
        "same claim from another kind",
    );
    assert!(
        matches!(e, StoreError::ClaimTaken { ref holder_id, .. } if holder_id == "d1"),
        "{e:?}"
    );

    // Same key in another namespace is a different claim; duplicates in one list are one claim.
    create(
        &store,
        data(Kind::Definition, "d3", state("active"), json!({})),
        vec![
            Claim::new("other_namespace", "my-lab@1.2.0"),
            Claim::new("other_namespace", "my-lab@1.2.0"),
        ],
    )
    .await;
    assert_eq!(
        claims_of(&store, Kind::Definition, "d3").await,
        vec![Claim::new("other_namespace", "my-lab@1.2.0")]
    );
    assert_eq!(holder(&store, &name).await, held_by(Kind::Definition, "d1"));
    assert_eq!(claims_of(&store, Kind::Definition, "d1").await, vec![name]);
    assert!(claims_of(&store, Kind::Definition, "d2").await.is_empty());
}

/// Replace acquires the new claims and releases the dropped ones; Keep keeps them.
pub async fn claims_replace_keep_and_release(store: Arc<dyn Store>) {
    create(
        &store,
        data(Kind::Instance, "i", state("scheduled"), json!({})),
        vec![port("w", 1), port("w", 2), port("w", 3)],
    )
    .await;
    update(
        &store,
        data(Kind::Instance, "i", state("scheduled"), json!({"v": 2})),
        1,
        ClaimChange::Replace(vec![port("w", 2), port("w", 3), port("w", 4)]),
    )
    .await
    .expect("replace");
    assert_eq!(
        claims_of(&store, Kind::Instance, "i").await,
        vec![port("w", 2), port("w", 3), port("w", 4)]
    );
    assert_eq!(holder(&store, &port("w", 1)).await, None);

    create(
        &store,
        data(Kind::Instance, "j", state("scheduled"), json!({})),
        vec![port("w", 1)],
    )
    .await;
    let e = expect_err(
        update(
            &store,
            data(
                Kind::Instance,
                "j",
                state("scheduled"),
                json!({"moved": true}),
            ),
            1,
            ClaimChange::Replace(vec![port("w", 1), port("w", 2)]),
        )
        .await,
        "take a held port",
    );
    assert_eq!(
        e,
        StoreError::ClaimTaken {
            namespace: "port".into(),
            key: "w/2".into(),
            holder_kind: Kind::Instance,
            holder_id: "i".into()
        }
    );
    let j = must_get(&store, Kind::Instance, "j").await;
    assert_eq!(j.resource_version, 1, "the refused update wrote nothing");
    assert_eq!(
        claims_of(&store, Kind::Instance, "j").await,
        vec![port("w", 1)]
    );

    update(
        &store,
        data(Kind::Instance, "i", state("running"), json!({"v": 3})),
        2,
        ClaimChange::Keep,
    )
    .await
    .expect("keep");
    assert_eq!(claims_of(&store, Kind::Instance, "i").await.len(), 3);

    update(
        &store,
        data(Kind::Instance, "i", state("running"), json!({"v": 4})),
        3,
        ClaimChange::Replace(vec![port("w", 5), port("w", 5)]),
    )
    .await
    .expect("replace with duplicates");
    assert_eq!(
        claims_of(&store, Kind::Instance, "i").await,
        vec![port("w", 5)]
    );

    update(
        &store,
        data(Kind::Instance, "i", state("done"), json!({})),
        4,
        ClaimChange::Replace(vec![]),
    )
    .await
    .expect("release all");
    assert!(claims_of(&store, Kind::Instance, "i").await.is_empty());
    for p in 1..=5 {
        let h = holder(&store, &port("w", p)).await;
        if p == 1 {
            assert_eq!(h, held_by(Kind::Instance, "j"));
        } else {
            assert_eq!(h, None, "port {p}");
        }
    }
}

/// Claims follow the order of writes within one batch.
pub async fn claims_move_within_one_batch(store: Arc<dyn Store>) {
    let k = Claim::new("ns", "k");
    let e = expect_err(
        store
            .apply(vec![
                Write::Create {
                    doc: data(Kind::Worker, "a", state("x"), json!({})),
                    claims: vec![k.clone()],
                },
                Write::Create {
                    doc: data(Kind::Worker, "b", state("x"), json!({})),
                    claims: vec![k.clone()],
                },
            ])
            .await,
        "two creates claiming one key",
    );
    assert_eq!(
        e,
        StoreError::ClaimTaken {
            namespace: "ns".into(),
            key: "k".into(),
            holder_kind: Kind::Worker,
            holder_id: "a".into()
        }
    );
    assert_eq!(store.count(Kind::Worker, &[]).await.expect("count"), 0);
    assert_eq!(holder(&store, &k).await, None);

    store
        .apply(vec![
            Write::Create {
                doc: data(Kind::Worker, "a", state("x"), json!({})),
                claims: vec![k.clone()],
            },
            Write::Update {
                doc: data(Kind::Worker, "a", state("y"), json!({})),
                expected_version: 1,
                claims: ClaimChange::Replace(vec![]),
            },
            Write::Create {
                doc: data(Kind::Worker, "b", state("x"), json!({})),
                claims: vec![k.clone()],
            },
        ])
        .await
        .expect("release then take in one batch");
    assert_eq!(holder(&store, &k).await, held_by(Kind::Worker, "b"));

    store
        .apply(vec![
            Write::delete(Kind::Worker, "b", 1),
            Write::Update {
                doc: data(Kind::Worker, "a", state("z"), json!({})),
                expected_version: 2,
                claims: ClaimChange::Replace(vec![k.clone()]),
            },
        ])
        .await
        .expect("delete releases for a later write of the batch");
    assert_eq!(holder(&store, &k).await, held_by(Kind::Worker, "a"));
}

/// apply_each commits the items that succeed and reports the others.
pub async fn apply_each_commits_successful_items_only(store: Arc<dyn Store>) {
    for i in 1..=5 {
        create(
            &store,
            data(
                Kind::Instance,
                &format!("i{i}"),
                state("pending"),
                json!({}),
            ),
            vec![],
        )
        .await;
    }
    create(
        &store,
        data(Kind::Instance, "x", state("running"), json!({})),
        vec![port("w", 1)],
    )
    .await;
    let placed = |id: &str, v: i64, ports: Vec<Claim>| {
        vec![
            Write::Update {
                doc: data(
                    Kind::Instance,
                    id,
                    IndexFields {
                        state: Some("scheduled".into()),
                        worker_id: Some("w".into()),
                        ..IndexFields::default()
                    },
                    json!({"placed": id}),
                ),
                expected_version: v,
                claims: ClaimChange::Replace(ports),
            },
            Write::append(LogKind::Audit, entry(id, "placed", Utc::now())),
        ]
    };
    let results = store
        .apply_each(vec![
            placed("i1", 1, vec![]),
            placed("i2", 9, vec![]),
            placed("i3", 1, vec![port("w", 1)]),
            placed("i4", 1, vec![port("w", 2)]),
            placed("i5", 1, vec![port("w", 2)]),
            vec![Write::create(data(
                Kind::Instance,
                "",
                state("x"),
                json!({}),
            ))],
            vec![Write::create(data(
                Kind::Instance,
                "i6",
                state("pending"),
                json!({}),
            ))],
        ])
        .await
        .expect("the batch commits");
    assert_eq!(results.len(), 7);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert_eq!(
        results[1].clone().err(),
        Some(StoreError::Conflict {
            kind: Kind::Instance,
            id: "i2".into(),
            expected: 9,
            actual: 1
        })
    );
    assert_eq!(
        results[2].clone().err(),
        Some(StoreError::ClaimTaken {
            namespace: "port".into(),
            key: "w/1".into(),
            holder_kind: Kind::Instance,
            holder_id: "x".into()
        })
    );
    assert!(results[3].is_ok(), "{:?}", results[3]);
    assert_eq!(
        results[4].clone().err(),
        Some(StoreError::ClaimTaken {
            namespace: "port".into(),
            key: "w/2".into(),
            holder_kind: Kind::Instance,
            holder_id: "i4".into()
        }),
        "a later item sees an earlier item's claims"
    );
    assert!(
        matches!(results[5], Err(StoreError::InvalidInput(_))),
        "{:?}",
        results[5]
    );
    assert!(results[6].is_ok(), "{:?}", results[6]);

    let applied = results[0].as_ref().expect("item 0");
    assert_eq!(applied.len(), 2);
    assert_eq!(applied[0].document().map(|d| d.resource_version), Some(2));

    for (id, version, st) in [
        ("i1", 2, "scheduled"),
        ("i2", 1, "pending"),
        ("i3", 1, "pending"),
        ("i4", 2, "scheduled"),
        ("i5", 1, "pending"),
        ("i6", 1, "pending"),
    ] {
        let d = must_get(&store, Kind::Instance, id).await;
        assert_eq!(
            (d.resource_version, d.index.state.as_deref()),
            (version, Some(st)),
            "{id}"
        );
    }
    assert_eq!(
        holder(&store, &port("w", 1)).await,
        held_by(Kind::Instance, "x")
    );
    assert_eq!(
        holder(&store, &port("w", 2)).await,
        held_by(Kind::Instance, "i4")
    );
    let mut logged: Vec<String> = all_log(&store, LogKind::Audit, LogQuery::default())
        .await
        .into_iter()
        .map(|e| e.resource_id)
        .collect();
    logged.sort();
    assert_eq!(
        logged,
        vec!["i1", "i4"],
        "only the successful items' appends"
    );
}

/// A failed item is undone completely, even writes that succeeded before the failing one.
pub async fn apply_each_failed_item_leaves_no_trace(store: Arc<dyn Store>) {
    let m = create(
        &store,
        data(Kind::Instance, "m", state("a"), json!({"m": 1})),
        vec![Claim::new("ns", "m1")],
    )
    .await;
    let k = create(
        &store,
        data(Kind::Instance, "k", state("a"), json!({"k": 1})),
        vec![Claim::new("ns", "k1")],
    )
    .await;
    let audit = entry("n", "create", Utc::now());
    let failing = vec![
        Write::Create {
            doc: data(Kind::Instance, "n", state("a"), json!({})),
            claims: vec![Claim::new("ns", "n")],
        },
        Write::append(LogKind::Audit, audit.clone()),
        Write::Update {
            doc: data(Kind::Instance, "m", state("b"), json!({"m": 2})),
            expected_version: 1,
            claims: ClaimChange::Replace(vec![Claim::new("ns", "m2")]),
        },
        Write::delete(Kind::Instance, "k", 1),
        Write::guard(Kind::Worker, "missing", 0),
    ];
    let results = store
        .apply_each(vec![
            failing.clone(),
            vec![
                Write::Create {
                    doc: data(Kind::Instance, "n", state("ok"), json!({})),
                    claims: vec![Claim::new("ns", "n")],
                },
                Write::Create {
                    doc: data(Kind::Instance, "k-claim", state("ok"), json!({})),
                    claims: vec![Claim::new("ns", "k2")],
                },
            ],
            failing,
        ])
        .await
        .expect("batch");
    assert_eq!(
        results[0].clone().err(),
        Some(StoreError::NotFound {
            kind: "worker".into(),
            id: "missing".into()
        })
    );
    assert!(
        results[1].is_ok(),
        "the undone create left nothing behind: {:?}",
        results[1]
    );
    assert_eq!(
        results[2].clone().err(),
        Some(StoreError::AlreadyExists {
            kind: "instance".into(),
            id: "n".into()
        })
    );

    assert_eq!(must_get(&store, Kind::Instance, "m").await, m);
    assert_eq!(
        claims_of(&store, Kind::Instance, "m").await,
        vec![Claim::new("ns", "m1")]
    );
    assert_eq!(holder(&store, &Claim::new("ns", "m2")).await, None);
    assert_eq!(must_get(&store, Kind::Instance, "k").await, k);
    assert_eq!(
        claims_of(&store, Kind::Instance, "k").await,
        vec![Claim::new("ns", "k1")]
    );
    assert_eq!(
        must_get(&store, Kind::Instance, "n")
            .await
            .index
            .state
            .as_deref(),
        Some("ok")
    );
    assert!(
        all_log(&store, LogKind::Audit, LogQuery::default())
            .await
            .is_empty()
    );
    // The entry's id was never taken.
    store
        .apply(vec![Write::append(LogKind::Audit, audit)])
        .await
        .expect("append now");
}

/// Empty batches are fine and write nothing.
pub async fn empty_batches_do_nothing(store: Arc<dyn Store>) {
    assert_eq!(store.apply(vec![]).await.expect("empty apply"), vec![]);
    assert_eq!(
        store.apply_each(vec![]).await.expect("empty apply_each"),
        vec![]
    );
    assert_eq!(
        store.apply_each(vec![vec![]]).await.expect("empty item"),
        vec![Ok(vec![])]
    );
    for kind in Kind::ALL {
        assert_eq!(store.count(kind, &[]).await.expect("count"), 0);
    }
}

/// Malformed input is refused with InvalidInput/InvalidQuery and nothing is written.
pub async fn invalid_inputs_are_refused_and_write_nothing(store: Arc<dyn Store>) {
    assert!(matches!(
        Body::from_json_text("not json"),
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        Body::from_json_text("[1, 2]"),
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        Body::from_json_text("{\"a\": 1} trailing"),
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        Body::from_json_text("{\"a\": \"\\q\"}"),
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        Body::from_json_text("x".repeat(MAX_BODY_BYTES + 1)),
        Err(StoreError::InvalidInput(_))
    ));

    let ok = || data(Kind::Instance, "ok", state("a"), json!({}));
    let with_id = |id: String| DocumentData { id, ..ok() };
    let bad_writes: Vec<(&str, Write)> = vec![
        ("empty id", Write::create(with_id(String::new()))),
        ("NUL in id", Write::create(with_id("a\0b".into()))),
        (
            "long id",
            Write::create(with_id("i".repeat(MAX_ID_BYTES + 1))),
        ),
        (
            "non-object body",
            Write::create(DocumentData {
                body: Body::from(&json!(5)),
                ..ok()
            }),
        ),
        (
            "array body",
            Write::create(DocumentData {
                body: Body::from(&json!([1])),
                ..ok()
            }),
        ),
        (
            "oversized body",
            Write::create(DocumentData {
                body: Body::from(&json!({"p": "y".repeat(MAX_BODY_BYTES)})),
                ..ok()
            }),
        ),
        (
            "NUL in index",
            Write::create(DocumentData {
                index: state("a\0"),
                ..ok()
            }),
        ),
        (
            "long index value",
            Write::create(DocumentData {
                index: state(&"s".repeat(crate::MAX_TEXT_BYTES + 1)),
                ..ok()
            }),
        ),
        (
            "empty claim key",
            Write::Create {
                doc: ok(),
                claims: vec![Claim::new("ns", "")],
            },
        ),
        (
            "empty claim namespace",
            Write::Create {
                doc: ok(),
                claims: vec![Claim::new("", "k")],
            },
        ),
        ("negative version", Write::update(ok(), -1)),
        (
            "negative delete version",
            Write::delete(Kind::Instance, "ok", -2),
        ),
        ("guard with empty id", Write::guard(Kind::Instance, "", 0)),
        (
            "append with a non-object body",
            Write::append(
                LogKind::Audit,
                LogEntry {
                    body: Body::from(&json!("s")),
                    ..entry("r", "a", Utc::now())
                },
            ),
        ),
        (
            "append with NUL",
            Write::append(LogKind::Audit, entry("r\0", "a", Utc::now())),
        ),
        (
            "guard with a huge IN",
            Write::GuardNoneMatch {
                kind: Kind::Instance,
                filters: vec![Filter::In(
                    IndexField::State,
                    vec!["s".into(); MAX_IN_VALUES + 1],
                )],
            },
        ),
    ];
    for (what, w) in bad_writes {
        let e = expect_err(
            store
                .apply(vec![
                    Write::create(data(Kind::Instance, "before", state("a"), json!({}))),
                    w.clone(),
                ])
                .await,
            what,
        );
        assert!(matches!(e, StoreError::InvalidInput(_)), "{what}: {e:?}");
        assert_eq!(e.grpc_code_name(), "INVALID_ARGUMENT");
        let each = store
            .apply_each(vec![vec![w]])
            .await
            .expect("apply_each reports invalid items");
        assert!(
            matches!(each[0], Err(StoreError::InvalidInput(_))),
            "{what}: {:?}",
            each[0]
        );
    }
    let too_many = vec![Write::guard(Kind::Instance, "x", 0); MAX_WRITES_PER_TRANSACTION + 1];
    assert!(matches!(
        store.apply(too_many.clone()).await,
        Err(StoreError::InvalidInput(_))
    ));
    assert!(matches!(
        store.apply_each(vec![too_many]).await,
        Err(StoreError::InvalidInput(_))
    ));

    let huge_in = Filter::In(IndexField::State, vec!["s".into(); MAX_IN_VALUES + 1]);
    assert!(matches!(
        store
            .list(Query::new(Kind::Instance).with_filter(huge_in.clone()))
            .await,
        Err(StoreError::InvalidQuery(_))
    ));
    assert!(matches!(
        store.count(Kind::Instance, &[huge_in]).await,
        Err(StoreError::InvalidQuery(_))
    ));
    let nul = Filter::eq(IndexField::Name, "a\0");
    assert!(matches!(
        store.count(Kind::Instance, &[nul]).await,
        Err(StoreError::InvalidQuery(_))
    ));
    let many_ids = vec!["x".to_owned(); MAX_GET_MANY + 1];
    assert!(matches!(
        store.get_many(Kind::Instance, &many_ids).await,
        Err(StoreError::InvalidQuery(_))
    ));

    for kind in Kind::ALL {
        assert_eq!(
            store.count(kind, &[]).await.expect("count"),
            0,
            "{kind}: nothing written"
        );
    }
    assert!(
        all_log(&store, LogKind::Audit, LogQuery::default())
            .await
            .is_empty()
    );
}

/// list and count agree with the reference semantics of [`Filter::matches`].
pub async fn filters_match_the_reference_semantics(store: Arc<dyn Store>) {
    let states = ["pending", "scheduled", "running", "stopped"];
    let mut docs = Vec::new();
    for i in 0..24_i64 {
        let index = IndexFields {
            name: Some(format!("n{}", i % 3)),
            version_key: (i % 4 != 0).then(|| format!("v{}", i % 5)),
            state: Some(states[(i % 4) as usize].to_owned()),
            worker_id: (i % 3 != 0).then(|| format!("w{}", i % 2)),
            owner_id: Some(if i % 2 == 0 { "alice" } else { "bob" }.to_owned()),
            definition_id: Some(format!("d{}", i % 6)),
            template_name: (i % 5 == 0).then(|| "small".to_owned()),
            sort_key: (i % 7 != 0).then_some(i * 100 - 1000),
        };
        docs.push(
            create(
                &store,
                data(
                    Kind::Instance,
                    &format!("i{i:02}"),
                    index,
                    json!({ "i": i }),
                ),
                vec![],
            )
            .await,
        );
    }
    create(
        &store,
        data(Kind::Worker, "w0", state("pending"), json!({})),
        vec![],
    )
    .await;

    let cases: Vec<Vec<Filter>> = vec![
        vec![],
        vec![Filter::eq(IndexField::State, "running")],
        vec![Filter::eq(IndexField::Name, "n1")],
        vec![Filter::eq(IndexField::VersionKey, "v3")],
        vec![Filter::eq(IndexField::WorkerId, "w1")],
        vec![Filter::eq(IndexField::OwnerId, "alice")],
        vec![Filter::eq(IndexField::DefinitionId, "d5")],
        vec![Filter::eq(IndexField::TemplateName, "small")],
        vec![Filter::eq(IndexField::State, "nope")],
        vec![Filter::any_of(IndexField::State, ["pending", "running"])],
        vec![Filter::any_of(IndexField::State, Vec::<String>::new())],
        vec![Filter::any_of(IndexField::WorkerId, ["w0", "zz"])],
        vec![Filter::Missing(IndexField::WorkerId)],
        vec![
            Filter::Missing(IndexField::TemplateName),
            Filter::eq(IndexField::OwnerId, "bob"),
        ],
        vec![Filter::SortKeyAtLeast(0)],
        vec![Filter::SortKeyBefore(0)],
        vec![Filter::SortKeyAtLeast(-500), Filter::SortKeyBefore(500)],
        vec![
            Filter::eq(IndexField::OwnerId, "alice"),
            Filter::any_of(IndexField::State, ["pending", "scheduled"]),
            Filter::eq(IndexField::WorkerId, "w0"),
        ],
        vec![
            Filter::eq(IndexField::State, "running"),
            Filter::eq(IndexField::State, "pending"),
        ],
    ];
    for filters in cases {
        let expected: Vec<String> = docs
            .iter()
            .filter(|d| filters.iter().all(|f| f.matches(&d.index)))
            .map(|d| d.id.clone())
            .collect();
        let q = Query {
            kind: Kind::Instance,
            filters: filters.clone(),
            order: Order::CreatedAsc,
            page_size: 5,
            page_token: None,
        };
        assert_eq!(
            ids(&list_all(&store, q).await),
            expected,
            "list {filters:?}"
        );
        assert_eq!(
            store.count(Kind::Instance, &filters).await.expect("count"),
            expected.len() as u64,
            "count {filters:?}"
        );
    }
}

/// The three orders, with their tie-breaks and missing keys.
pub async fn list_orders_are_total_and_as_documented(store: Arc<dyn Store>) {
    let rows: [(&str, Option<i64>, Option<&str>); 7] = [
        ("a", Some(30), Some("000001.000010")),
        ("b", None, Some("000001.000009")),
        ("c", Some(10), None),
        ("d", Some(20), Some("000002.000000")),
        ("e", Some(10), Some("000001.000010")),
        ("f", Some(-5), None),
        ("g", None, Some("000002.000000")),
    ];
    let mut docs = Vec::new();
    for (id, sk, vk) in rows {
        let index = IndexFields {
            sort_key: sk,
            version_key: vk.map(str::to_owned),
            ..IndexFields::default()
        };
        docs.push(create(&store, data(Kind::Definition, id, index, json!({})), vec![]).await);
    }
    let walk = |order: Order| {
        let store = store.clone();
        async move {
            ids(&list_all(
                &store,
                Query::new(Kind::Definition)
                    .ordered_by(order)
                    .with_page_size(2),
            )
            .await)
        }
    };
    assert_eq!(
        walk(Order::CreatedAsc).await,
        vec!["a", "b", "c", "d", "e", "f", "g"]
    );
    assert_eq!(
        walk(Order::SortKeyAsc).await,
        vec!["b", "g", "f", "c", "e", "d", "a"],
        "missing first, ties by creation"
    );
    assert_eq!(
        walk(Order::VersionDesc).await,
        vec!["g", "d", "e", "a", "b", "f", "c"],
        "ties newest first, missing last"
    );

    // An update does not move a document in the creation order.
    update(
        &store,
        data(
            Kind::Definition,
            "a",
            IndexFields::default(),
            json!({"u": 1}),
        ),
        0,
        ClaimChange::Keep,
    )
    .await
    .expect("update");
    assert_eq!(
        walk(Order::CreatedAsc).await,
        vec!["a", "b", "c", "d", "e", "f", "g"]
    );
}

/// Every page size walks every document exactly once, in order.
pub async fn pagination_visits_every_document_once(store: Arc<dyn Store>) {
    let n = 57_i64;
    let writes: Vec<Write> = (0..n)
        .map(|i| {
            let index = IndexFields {
                state: Some(if i % 3 == 0 { "odd" } else { "even" }.into()),
                sort_key: Some((i * 37) % 11),
                version_key: Some(format!("{:03}", (i * 13) % 7)),
                ..IndexFields::default()
            };
            Write::create(data(
                Kind::Instance,
                &format!("p{i:03}"),
                index,
                json!({ "i": i }),
            ))
        })
        .collect();
    store.apply(writes).await.expect("create 57");
    for order in [Order::CreatedAsc, Order::SortKeyAsc, Order::VersionDesc] {
        let full = store
            .list(
                Query::new(Kind::Instance)
                    .ordered_by(order)
                    .with_page_size(MAX_PAGE_SIZE),
            )
            .await
            .expect("one page");
        assert_eq!(full.items.len(), n as usize);
        assert_eq!(full.next_page_token, None);
        for size in [1_u32, 7, 56, 57, 58] {
            let mut q = Query::new(Kind::Instance)
                .ordered_by(order)
                .with_page_size(size);
            let mut seen = Vec::new();
            let mut pages = 0;
            loop {
                let page = store.list(q.clone()).await.expect("page");
                pages += 1;
                match &page.next_page_token {
                    Some(_) => assert_eq!(
                        page.items.len(),
                        size as usize,
                        "full pages before the last"
                    ),
                    None => assert!(page.items.len() <= size as usize),
                }
                seen.extend(page.items);
                match page.next_page_token {
                    Some(t) => q = q.after(Some(t)),
                    None => break,
                }
            }
            assert_eq!(ids(&seen), ids(&full.items), "{order:?} by {size}");
            assert_eq!(
                pages,
                (n as u32).div_ceil(size).max(1),
                "{order:?} by {size}: pages"
            );
        }
        let filtered = list_all(
            &store,
            Query::new(Kind::Instance)
                .ordered_by(order)
                .with_filter(Filter::eq(IndexField::State, "odd"))
                .with_page_size(4),
        )
        .await;
        let expected: Vec<String> = full
            .items
            .iter()
            .filter(|d| d.index.state.as_deref() == Some("odd"))
            .map(|d| d.id.clone())
            .collect();
        assert_eq!(ids(&filtered), expected, "{order:?} filtered");
    }
}

/// Inserts during a walk never duplicate or hide documents that existed throughout.
pub async fn pagination_is_stable_under_concurrent_inserts(store: Arc<dyn Store>) {
    for i in 0..40_i64 {
        let index = IndexFields {
            sort_key: Some((i * 7919) % 100),
            ..IndexFields::default()
        };
        create(
            &store,
            data(Kind::Instance, &format!("old{i:02}"), index, json!({})),
            vec![],
        )
        .await;
    }
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..40_i64 {
                let index = IndexFields {
                    sort_key: Some((i * 31) % 100),
                    ..IndexFields::default()
                };
                create(
                    &store,
                    data(Kind::Instance, &format!("new{i:02}"), index, json!({})),
                    vec![],
                )
                .await;
                tokio::task::yield_now().await;
            }
        })
    };
    for order in [Order::CreatedAsc, Order::SortKeyAsc] {
        let mut q = Query::new(Kind::Instance)
            .ordered_by(order)
            .with_page_size(3);
        let mut seen: Vec<Document> = Vec::new();
        loop {
            let page = store.list(q.clone()).await.expect("page");
            seen.extend(page.items);
            tokio::task::yield_now().await;
            match page.next_page_token {
                Some(t) => q = q.after(Some(t)),
                None => break,
            }
        }
        let unique: HashSet<&str> = seen.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(unique.len(), seen.len(), "{order:?}: no duplicates");
        for i in 0..40 {
            assert!(
                unique.contains(format!("old{i:02}").as_str()),
                "{order:?}: old{i:02} was skipped"
            );
        }
        let keys: Vec<(i64, i64)> = seen
            .iter()
            .map(|d| match order {
                Order::SortKeyAsc => (d.index.sort_key.unwrap_or(i64::MIN), d.seq),
                _ => (d.seq, 0),
            })
            .collect();
        assert!(
            keys.windows(2).all(|w| w[0] < w[1]),
            "{order:?}: strictly ordered"
        );
    }
    writer.await.expect("writer task");
    assert_eq!(store.count(Kind::Instance, &[]).await.expect("count"), 80);
}

/// 0 means the default page size; more than the maximum is clamped.
pub async fn page_size_defaults_and_clamps(store: Arc<dyn Store>) {
    let n = MAX_PAGE_SIZE as usize + 1;
    let writes: Vec<Write> = (0..n)
        .map(|i| {
            Write::create(data(
                Kind::WorkerOperation,
                &format!("op{i:05}"),
                IndexFields::default(),
                json!({}),
            ))
        })
        .collect();
    store.apply(writes).await.expect("bulk create");
    let page = store
        .list(Query::new(Kind::WorkerOperation))
        .await
        .expect("default");
    assert_eq!(page.items.len(), DEFAULT_PAGE_SIZE as usize);
    assert!(page.next_page_token.is_some());
    let page = store
        .list(Query::new(Kind::WorkerOperation).with_page_size(u32::MAX))
        .await
        .expect("clamped");
    assert_eq!(page.items.len(), MAX_PAGE_SIZE as usize);
    let rest = store
        .list(
            Query::new(Kind::WorkerOperation)
                .with_page_size(u32::MAX)
                .after(page.next_page_token),
        )
        .await
        .expect("rest");
    assert_eq!(ids(&rest.items), vec![format!("op{:05}", n - 1)]);
    assert_eq!(rest.next_page_token, None);
    assert_eq!(
        store
            .count(Kind::WorkerOperation, &[])
            .await
            .expect("count"),
        n as u64
    );
}

/// A token only works with the query that produced it.
pub async fn page_tokens_are_bound_to_their_query(store: Arc<dyn Store>) {
    for i in 0..5 {
        create(
            &store,
            data(Kind::Instance, &format!("t{i}"), state("a"), json!({})),
            vec![],
        )
        .await;
        create(
            &store,
            data(Kind::Worker, &format!("t{i}"), state("a"), json!({})),
            vec![],
        )
        .await;
    }
    let base = Query::new(Kind::Instance).with_page_size(2);
    let token = store
        .list(base.clone())
        .await
        .expect("page")
        .next_page_token;
    assert!(token.is_some());
    let misuse = [
        Query::new(Kind::Worker).with_page_size(2),
        base.clone().ordered_by(Order::SortKeyAsc),
        base.clone().with_filter(Filter::eq(IndexField::State, "a")),
    ];
    for q in misuse {
        let e = expect_err(
            store.list(q.clone().after(token.clone())).await,
            "foreign token",
        );
        assert!(matches!(e, StoreError::InvalidQuery(_)), "{q:?}: {e:?}");
    }
    for garbage in ["garbage", "!!", "eyJ2IjoxfQ"] {
        let e = expect_err(
            store.list(base.clone().after(Some(garbage.into()))).await,
            "garbage token",
        );
        assert!(matches!(e, StoreError::InvalidQuery(_)), "{garbage}: {e:?}");
    }
    let e = expect_err(
        store
            .list_log(
                LogKind::Audit,
                LogQuery {
                    page_token: token.clone(),
                    ..LogQuery::default()
                },
            )
            .await,
        "document token on a log",
    );
    assert!(matches!(e, StoreError::InvalidQuery(_)), "{e:?}");
    // The same query continues fine; an empty token is the first page.
    let page2 = store
        .list(base.clone().with_page_size(2).after(token))
        .await
        .expect("page 2");
    assert_eq!(ids(&page2.items), vec!["t2", "t3"]);
    let first = store
        .list(base.after(Some(String::new())))
        .await
        .expect("empty token");
    assert_eq!(ids(&first.items), vec!["t0", "t1"]);
}

/// get_many answers found documents in the order asked, once each.
pub async fn get_many_answers_in_the_order_asked(store: Arc<dyn Store>) {
    for id in ["a", "b", "c"] {
        create(
            &store,
            data(Kind::Instance, id, state(id), json!({ "id": id })),
            vec![],
        )
        .await;
    }
    let asked: Vec<String> = ["c", "missing", "a", "c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let got = store
        .get_many(Kind::Instance, &asked)
        .await
        .expect("get_many");
    assert_eq!(ids(&got), vec!["c", "a"]);
    assert_eq!(got[0], must_get(&store, Kind::Instance, "c").await);
    assert!(
        store
            .get_many(Kind::Instance, &[])
            .await
            .expect("none")
            .is_empty()
    );
    assert!(
        store
            .get_many(Kind::Worker, &asked)
            .await
            .expect("other kind")
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// logs

/// Logs list newest first, filter by resource and time, and page without gaps.
pub async fn logs_list_newest_first_with_filters_and_pages(store: Arc<dyn Store>) {
    let base = crate::truncate_to_millis(Utc::now() - Duration::days(1));
    let mut appended = Vec::new();
    for i in 0..25_i64 {
        // Five entries share one timestamp: ties are ordered by id.
        let at = if (10..15).contains(&i) {
            base + Duration::minutes(10)
        } else {
            base + Duration::minutes(i)
        };
        let e = entry(&format!("r{}", i % 3), &format!("a{i}"), at);
        appended.push(e.clone());
        store
            .apply(vec![Write::append(LogKind::Audit, e)])
            .await
            .expect("append");
    }
    store
        .apply(vec![Write::append(
            LogKind::ScalingDecision,
            entry("w-1", "scale_up", base),
        )])
        .await
        .expect("append scaling");

    let mut expected = appended.clone();
    expected.sort_by_key(|e| std::cmp::Reverse((e.at, e.id.to_string())));
    let all = all_log(
        &store,
        LogKind::Audit,
        LogQuery {
            page_size: 4,
            ..LogQuery::default()
        },
    )
    .await;
    assert_eq!(
        all, expected,
        "newest first, byte-identical entries, every page"
    );
    let one_page = store
        .list_log(LogKind::Audit, LogQuery::default())
        .await
        .expect("one page");
    assert_eq!(one_page.entries, expected);
    assert_eq!(one_page.next_page_token, None);

    let r1 = all_log(
        &store,
        LogKind::Audit,
        LogQuery {
            resource_id: Some("r1".into()),
            page_size: 2,
            ..LogQuery::default()
        },
    )
    .await;
    let exp_r1: Vec<LogEntry> = expected
        .iter()
        .filter(|e| e.resource_id == "r1")
        .cloned()
        .collect();
    assert_eq!(r1, exp_r1);
    let kind_and_id = all_log(
        &store,
        LogKind::Audit,
        LogQuery {
            resource_kind: Some("instance".into()),
            resource_id: Some("r2".into()),
            ..LogQuery::default()
        },
    )
    .await;
    assert_eq!(
        kind_and_id.len(),
        expected.iter().filter(|e| e.resource_id == "r2").count()
    );
    assert!(
        all_log(
            &store,
            LogKind::Audit,
            LogQuery {
                resource_kind: Some("worker".into()),
                ..LogQuery::default()
            }
        )
        .await
        .is_empty()
    );

    let since = base + Duration::minutes(10);
    let until = base + Duration::minutes(20);
    let window = all_log(
        &store,
        LogKind::Audit,
        LogQuery {
            since: Some(since),
            until: Some(until),
            page_size: 3,
            ..LogQuery::default()
        },
    )
    .await;
    let exp_window: Vec<LogEntry> = expected
        .iter()
        .filter(|e| e.at >= since && e.at < until)
        .cloned()
        .collect();
    assert_eq!(window, exp_window, "since inclusive, until exclusive");
    assert!(window.iter().any(|e| e.at == since));

    let scaling = all_log(&store, LogKind::ScalingDecision, LogQuery::default()).await;
    assert_eq!(scaling.len(), 1, "logs are separate");
    assert_eq!(scaling[0].action, "scale_up");
}

/// Entries keep their id forever, commit only with their batch, and are stored at ms precision.
pub async fn logs_are_append_only(store: Arc<dyn Store>) {
    let mut e = entry("r", "first", Utc::now());
    e.at = Utc::now(); // finer than a millisecond: stored truncated
    let applied = store
        .apply(vec![Write::append(LogKind::Audit, e.clone())])
        .await
        .expect("append");
    let stored_at = crate::truncate_to_millis(e.at);
    assert_eq!(
        applied,
        vec![Applied::Appended {
            log: LogKind::Audit,
            id: e.id,
            at: stored_at
        }]
    );

    let dup = LogEntry {
        action: "rewritten".into(),
        ..e.clone()
    };
    let err = expect_err(
        store.apply(vec![Write::append(LogKind::Audit, dup)]).await,
        "same id again",
    );
    assert_eq!(
        err,
        StoreError::AlreadyExists {
            kind: "audit".into(),
            id: e.id.to_string()
        }
    );

    create(
        &store,
        data(Kind::Instance, "x", state("a"), json!({})),
        vec![],
    )
    .await;
    let lost = entry("x", "lost", Utc::now());
    let err = expect_err(
        store
            .apply(vec![
                Write::append(LogKind::Audit, lost.clone()),
                Write::update(data(Kind::Instance, "x", state("b"), json!({})), 7),
            ])
            .await,
        "append in a failed batch",
    );
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");

    let all = all_log(&store, LogKind::Audit, LogQuery::default()).await;
    assert_eq!(all.len(), 1);
    assert_eq!(
        all[0],
        LogEntry {
            at: stored_at,
            ..e.clone()
        },
        "the first entry is unchanged"
    );
    // Each log is its own id space.
    store
        .apply(vec![Write::append(LogKind::ScalingDecision, e)])
        .await
        .expect("same id in the other log");
}

/// purge_log deletes only entries older than the cut-off, never younger than the floor.
pub async fn logs_purge_respects_the_retention_floor(store: Arc<dyn Store>) {
    let now = Utc::now();
    let ages = [200, 200, 100, 100, 1];
    for (i, days) in ages.iter().enumerate() {
        store
            .apply(vec![Write::append(
                LogKind::Audit,
                entry(&format!("r{i}"), "x", now - Duration::days(*days)),
            )])
            .await
            .expect("append");
    }
    store
        .apply(vec![Write::append(
            LogKind::ScalingDecision,
            entry("w", "scale_down", now - Duration::days(200)),
        )])
        .await
        .expect("append scaling");

    for log in LogKind::ALL {
        let too_young = now - log.min_retention() + Duration::days(1);
        let e = expect_err(
            store.purge_log(log, too_young).await,
            "purge under the floor",
        );
        assert!(matches!(e, StoreError::InvalidQuery(_)), "{e:?}");
        assert!(
            log.min_retention() <= log.default_retention()
                && log.default_retention() <= log.max_retention()
        );
    }
    assert_eq!(
        all_log(&store, LogKind::Audit, LogQuery::default())
            .await
            .len(),
        5,
        "a refused purge deletes nothing"
    );

    assert_eq!(
        store
            .purge_log(LogKind::Audit, now - Duration::days(150))
            .await
            .expect("purge"),
        2
    );
    let left = all_log(&store, LogKind::Audit, LogQuery::default()).await;
    let mut left_ids: Vec<&str> = left.iter().map(|e| e.resource_id.as_str()).collect();
    left_ids.sort();
    assert_eq!(left_ids, vec!["r2", "r3", "r4"]);
    assert_eq!(
        all_log(&store, LogKind::ScalingDecision, LogQuery::default())
            .await
            .len(),
        1,
        "other log untouched"
    );
    assert_eq!(
        store
            .purge_log(LogKind::Audit, now - Duration::days(150))
            .await
            .expect("again"),
        0
    );
    assert_eq!(
        store
            .purge_log(LogKind::ScalingDecision, now - Duration::days(150))
            .await
            .expect("scaling"),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// concurrency

/// Many writers racing on one document: every version is won exactly once.
pub async fn concurrent_versioned_writes_have_one_winner_per_version(store: Arc<dyn Store>) {
    create(
        &store,
        data(Kind::Worker, "hot", state("v1"), json!({"writer": null})),
        vec![],
    )
    .await;
    let writers = 8;
    let attempts = 12;
    let mut tasks = Vec::new();
    for t in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut conflicts = 0;
            for i in 0..attempts {
                let current = must_get(&store, Kind::Worker, "hot").await;
                let next = data(
                    Kind::Worker,
                    "hot",
                    state(&format!("t{t}-{i}")),
                    json!({ "writer": t, "i": i }),
                );
                match update(&store, next, current.resource_version, ClaimChange::Keep).await {
                    Ok(d) => {
                        assert_eq!(d.resource_version, current.resource_version + 1);
                        won.push((d.resource_version, t, i));
                    }
                    Err(StoreError::Conflict {
                        expected, actual, ..
                    }) => {
                        assert_eq!(expected, current.resource_version);
                        assert!(actual > expected, "a conflict means someone else moved on");
                        conflicts += 1;
                    }
                    Err(e) => panic!("writer {t}: unexpected {e}"),
                }
                tokio::task::yield_now().await;
            }
            (won, conflicts)
        }));
    }
    let mut wins = Vec::new();
    for task in tasks {
        let (won, _conflicts) = task.await.expect("writer task");
        wins.extend(won);
    }
    wins.sort();
    let versions: Vec<i64> = wins.iter().map(|w| w.0).collect();
    let expected: Vec<i64> = (2..=(wins.len() as i64 + 1)).collect();
    assert_eq!(versions, expected, "each version won exactly once, no gaps");
    let last = must_get(&store, Kind::Worker, "hot").await;
    assert_eq!(last.resource_version, wins.len() as i64 + 1);
    let (_, t, i) = wins.last().copied().expect("at least one win");
    assert_eq!(
        last.body.as_str(),
        json!({ "writer": t, "i": i }).to_string(),
        "the last winner's body"
    );
}

/// Many creators racing for one claim: exactly one gets it.
pub async fn concurrent_claims_have_one_winner(store: Arc<dyn Store>) {
    let claim = port("w", 2001);
    let mut tasks = Vec::new();
    for t in 0..12 {
        let store = store.clone();
        let claim = claim.clone();
        tasks.push(tokio::spawn(async move {
            store
                .apply(vec![Write::Create {
                    doc: data(
                        Kind::Instance,
                        &format!("c{t}"),
                        state("scheduled"),
                        json!({}),
                    ),
                    claims: vec![claim],
                }])
                .await
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for (t, task) in tasks.into_iter().enumerate() {
        match task.await.expect("task") {
            Ok(_) => winners.push(format!("c{t}")),
            Err(e) => losers.push(e),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?} {losers:?}");
    for e in &losers {
        assert_eq!(
            e,
            &StoreError::ClaimTaken {
                namespace: "port".into(),
                key: "w/2001".into(),
                holder_kind: Kind::Instance,
                holder_id: winners[0].clone()
            }
        );
    }
    assert_eq!(store.count(Kind::Instance, &[]).await.expect("count"), 1);
    assert_eq!(
        holder(&store, &claim).await,
        held_by(Kind::Instance, &winners[0])
    );
}

// ---------------------------------------------------------------------------------------------
// content

const HOSTILE: [&str; 14] = [
    "'; DROP TABLE documents; --",
    "\" OR 1=1 --",
    "$where",
    "$gt",
    "a.b.c",
    ".",
    "$",
    "%_wild*card?",
    "{\"$ne\": null}",
    "🚀 ünïcødé 中文",
    "\u{202e}rtl\u{200b}",
    "back\\slash\ttab\nnewline",
    "name' || 'x",
    "[]{}()^+|",
];

/// Quotes, SQL, `$` and `.`, unicode: all stored as inert data and read back identical.
pub async fn hostile_strings_are_stored_inert(store: Arc<dyn Store>) {
    let hostile_body = |s: &str| {
        let text = format!(
            "{{\"$set\": {{\"a.b\": {v}}}, \"$where\": \"function() {{ return true; }}\", \"k.{i}\": [ {v} ,\n\t\"\\u0000\\ud83d\\ude80\"] }}",
            v = serde_json::Value::String(s.to_owned()),
            i = s.len()
        );
        Body::from_json_text(text).expect("hostile body is valid JSON")
    };
    for (n, s) in HOSTILE.iter().enumerate() {
        let index = IndexFields {
            name: Some((*s).to_owned()),
            state: Some(format!("{s}-state")),
            owner_id: Some((*s).to_owned()),
            ..IndexFields::default()
        };
        let doc = DocumentData::new(Kind::Definition, *s, hostile_body(s)).with_index(index);
        let claims = vec![Claim::new(*s, *s), Claim::new("name", format!("{s}@{n}"))];
        create(&store, doc.clone(), claims.clone()).await;
        store
            .apply(vec![Write::append(
                LogKind::Audit,
                LogEntry::new(*s, *s, *s, *s, hostile_body(s)),
            )])
            .await
            .expect("append hostile");
    }
    assert_eq!(
        store.count(Kind::Definition, &[]).await.expect("count"),
        HOSTILE.len() as u64,
        "nothing was executed"
    );
    for (n, s) in HOSTILE.iter().enumerate() {
        let d = must_get(&store, Kind::Definition, s).await;
        assert_eq!(d.id, *s);
        assert_eq!(d.body, hostile_body(s), "body of {s:?} byte-identical");
        assert_eq!(d.index.name.as_deref(), Some(*s));
        let found = list_all(
            &store,
            Query::new(Kind::Definition).with_filter(Filter::eq(IndexField::Name, *s)),
        )
        .await;
        assert_eq!(
            ids(&found),
            vec![s.to_string()],
            "equality on {s:?} matches only itself"
        );
        let by_in = list_all(
            &store,
            Query::new(Kind::Definition).with_filter(Filter::any_of(IndexField::OwnerId, [*s])),
        )
        .await;
        assert_eq!(ids(&by_in), vec![s.to_string()]);
        assert_eq!(
            holder(&store, &Claim::new(*s, *s)).await,
            held_by(Kind::Definition, s)
        );
        let mut expected = vec![Claim::new(*s, *s), Claim::new("name", format!("{s}@{n}"))];
        expected.sort();
        assert_eq!(claims_of(&store, Kind::Definition, s).await, expected);
        let logged = all_log(
            &store,
            LogKind::Audit,
            LogQuery {
                resource_kind: Some((*s).to_owned()),
                resource_id: Some((*s).to_owned()),
                ..LogQuery::default()
            },
        )
        .await;
        assert_eq!(logged.len(), 1, "log filter on {s:?}");
        assert_eq!(
            (logged[0].actor.as_str(), logged[0].action.as_str()),
            (*s, *s)
        );
        assert_eq!(logged[0].body, hostile_body(s));
    }
    let none = list_all(
        &store,
        Query::new(Kind::Definition).with_filter(Filter::eq(IndexField::Name, "%")),
    )
    .await;
    assert!(none.is_empty(), "no pattern matching");
    let got = store
        .get_many(
            Kind::Definition,
            &HOSTILE.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .await
        .expect("get_many");
    assert_eq!(got.len(), HOSTILE.len());
    for s in HOSTILE {
        store
            .apply(vec![Write::delete(Kind::Definition, s, 1)])
            .await
            .expect("delete hostile");
    }
    assert_eq!(store.count(Kind::Definition, &[]).await.expect("count"), 0);
}

/// 64 KiB and 1 MiB bodies (multi-byte characters included) come back byte for byte.
pub async fn large_bodies_round_trip_byte_identical(store: Arc<dyn Store>) {
    for (id, size) in [("k64", 64 * 1024), ("m1", 1024 * 1024)] {
        let mut text = String::from("{\"blob\": \"");
        let pattern = "ab\\\"cd ü 🚀 \\n $.x ";
        while text.len() < size - 4 {
            text.push_str(pattern);
        }
        text.push_str("\" }");
        let b = Body::from_json_text(text.clone()).expect("valid large body");
        create(&store, DocumentData::new(Kind::Instance, id, b), vec![]).await;
        let read = must_get(&store, Kind::Instance, id).await;
        assert_eq!(read.body.as_str().len(), text.len());
        assert!(read.body.as_str() == text, "{id}: byte-identical");
        let entry = LogEntry::new(
            "instance",
            id,
            "t",
            "big",
            Body::from_json_text(text.clone()).expect("valid"),
        );
        store
            .apply(vec![Write::append(LogKind::Audit, entry)])
            .await
            .expect("append large");
    }
    let logged = all_log(&store, LogKind::Audit, LogQuery::default()).await;
    assert_eq!(logged.len(), 2);
    let sizes: BTreeSet<usize> = logged.iter().map(|e| e.body.len()).collect();
    assert_eq!(sizes.len(), 2);
}

/// ping answers on a healthy store.
pub async fn ping_answers(store: Arc<dyn Store>) {
    store.ping().await.expect("ping");
    assert!(["sqlite", "mongodb"].contains(&store.backend()));
}

// ---------------------------------------------------------------------------------------------
// persistence

/// Everything written before closing is there after reopening: documents, versions, claims,
/// logs; creation order continues. `reopen` must drop nothing and return the same database.
pub async fn reopen_finds_everything<F, Fut>(store: Arc<dyn Store>, reopen: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let mut written: HashMap<(Kind, String), Document> = HashMap::new();
    for kind in Kind::ALL {
        for i in 0..3 {
            let d = create(
                &store,
                data(
                    kind,
                    &format!("{kind}-{i}"),
                    state("s"),
                    json!({ "kind": kind.as_str(), "i": i }),
                ),
                vec![Claim::new(kind.as_str(), format!("{i}"))],
            )
            .await;
            written.insert((kind, d.id.clone()), d);
        }
    }
    let updated = update(
        &store,
        data(Kind::Instance, "instance-0", state("t"), json!({"u": true})),
        1,
        ClaimChange::Keep,
    )
    .await
    .expect("update");
    written.insert((Kind::Instance, updated.id.clone()), updated);
    let e = entry("instance-0", "update", Utc::now());
    store
        .apply(vec![Write::append(LogKind::Audit, e.clone())])
        .await
        .expect("append");
    let max_seq = written.values().map(|d| d.seq).max().unwrap_or(0);

    let store = reopen(store).await;
    for ((kind, id), d) in &written {
        assert_eq!(
            &must_get(&store, *kind, id).await,
            d,
            "{kind} {id} after reopen"
        );
        assert_eq!(claims_of(&store, *kind, id).await.len(), 1);
    }
    assert_eq!(
        all_log(&store, LogKind::Audit, LogQuery::default()).await,
        vec![e]
    );
    let again = update(
        &store,
        data(Kind::Instance, "instance-0", state("u"), json!({})),
        2,
        ClaimChange::Keep,
    )
    .await
    .expect("versions continue");
    assert_eq!(again.resource_version, 3);
    let e2 = expect_err(
        store
            .apply(vec![Write::Create {
                doc: data(Kind::Worker, "x", state("s"), json!({})),
                claims: vec![Claim::new("worker", "0")],
            }])
            .await,
        "claims survive",
    );
    assert!(matches!(e2, StoreError::ClaimTaken { .. }), "{e2:?}");
    let newer = create(
        &store,
        data(Kind::Instance, "after", state("s"), json!({})),
        vec![],
    )
    .await;
    assert!(newer.seq > max_seq, "creation order continues after reopen");
    let listed = list_all(&store, Query::new(Kind::Instance)).await;
    assert_eq!(listed.last().map(|d| d.id.as_str()), Some("after"));
}
