//! The conformance suite against MongoDB.
//!
//! MongoDB cannot be installed on the development machines, so this suite runs only where
//! `CCM_TEST_MONGO_URI` points at a replica set, e.g.
//! `CCM_TEST_MONGO_URI='mongodb://127.0.0.1:27017/?replicaSet=rs0' cargo test -p ccm-store --test mongo`.
//! The variable is read at BUILD time (build.rs): with it, every conformance check becomes a
//! test here, each on its own fresh database that is dropped afterwards; without it, the only
//! conformance test is `mongodb_conformance_requires_ccm_test_mongo_uri`, which prints that the
//! MongoDB suite was NOT run. The tests below it (connect failures) always run.

use std::time::{Duration, Instant};

use ccm_store::{MongoStore, StoreError};

const VAR: &str = "CCM_TEST_MONGO_URI";

#[cfg(ccm_mongo_conformance)]
mod mongodb {
    use std::sync::Arc;

    use ccm_store::conformance::TestEnv;
    use ccm_store::{MongoStore, Store};

    fn uri() -> String {
        std::env::var(super::VAR)
            .expect("CCM_TEST_MONGO_URI was set when these tests were built; set it to run them")
    }

    fn fresh_db_name() -> String {
        format!("ccm_store_test_{}", uuid::Uuid::new_v4().simple())
    }

    async fn open() -> TestEnv {
        let name = fresh_db_name();
        let store = MongoStore::connect(&uri(), &name)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", uri()));
        let dropper = store.clone();
        TestEnv::new(Arc::new(store)).with_cleanup(async move {
            dropper
                .drop_database()
                .await
                .unwrap_or_else(|e| panic!("drop test database {name}: {e}"));
        })
    }

    ccm_store::conformance_tests!(open);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_finds_everything() {
        let name = fresh_db_name();
        let store = MongoStore::connect(&uri(), &name).await.expect("connect");
        let dropper = store.clone();
        let reopen_name = name.clone();
        ccm_store::conformance::reopen_finds_everything(Arc::new(store), |old| async move {
            drop(old);
            Arc::new(
                MongoStore::connect(&uri(), &reopen_name)
                    .await
                    .expect("reconnect"),
            ) as Arc<dyn Store>
        })
        .await;
        dropper.drop_database().await.expect("drop test database");
    }

    #[test]
    fn mongodb_conformance_runs_against_ccm_test_mongo_uri() {
        use std::io::Write as _;
        let uri = uri();
        let _ = writeln!(
            std::io::stderr(),
            "ccm-store: the MongoDB conformance suite runs against {uri}"
        );
        assert!(!uri.trim().is_empty());
    }
}

/// Without `CCM_TEST_MONGO_URI` the MongoDB part of the suite does not exist in this build; this
/// test says so in the test output (written straight to stderr, which the test harness does not
/// capture), so a run without MongoDB can never be mistaken for one that tested it.
#[cfg(not(ccm_mongo_conformance))]
#[test]
fn mongodb_conformance_requires_ccm_test_mongo_uri() {
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** ccm-store: the MongoDB conformance suite was NOT run: {VAR} is not set.\n\
         *** To run it against a MongoDB replica set:\n\
         ***   {VAR}='mongodb://127.0.0.1:27017/?replicaSet=rs0' cargo test -p ccm-store --test mongo\n"
    );
    let set = std::env::var(VAR).is_ok_and(|v| !v.trim().is_empty());
    assert!(
        !set,
        "{VAR} is set but this test binary was built without it; rebuild (cargo rebuilds when the \
         variable changes) so the MongoDB conformance tests are compiled in"
    );
}

/// A free loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    port
}

#[tokio::test]
async fn connect_to_nothing_is_unavailable_quickly() {
    let uri = format!(
        "mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=300&connectTimeoutMS=300",
        closed_port()
    );
    let started = Instant::now();
    let err = MongoStore::connect(&uri, "ccm_store_nothing")
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up after the selection timeout, not later: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn connect_refuses_bad_arguments() {
    let err = MongoStore::connect("http://127.0.0.1:1", "db")
        .await
        .expect_err("not a mongodb URI");
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    let err = MongoStore::connect("mongodb://127.0.0.1:1", "")
        .await
        .expect_err("empty database name");
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
}
