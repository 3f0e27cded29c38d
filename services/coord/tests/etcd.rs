//! The conformance suite against a real etcd (started by ccm-testkit), plus etcd's own failure
//! paths: a lease revoked by someone else, etcd killed and restarted, a dead endpoint, and the key
//! layout under a custom prefix.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ccm_coord::conformance::{self, Backend};
use ccm_coord::{
    CoordError, Coordinator, EtcdConfig, EtcdCoordinator, FeedItem, FenceCheck, LeaseOptions,
    LossReason,
};
use ccm_testkit::etcd::EtcdServer;
use futures::StreamExt;
use tokio::time::Instant;

/// Lease TTL used by the suite: etcd's minimum lease TTL with default server settings is 2 s.
const TEST_TTL: Duration = Duration::from_secs(2);
/// Request timeout in tests, so a dead etcd is noticed quickly.
const TEST_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Watch reconnect window in tests.
const TEST_WATCH_RECONNECT: Duration = Duration::from_secs(2);

fn config(server: &EtcdServer, prefix: &str) -> EtcdConfig {
    EtcdConfig::new([server.endpoint()])
        .key_prefix(prefix)
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(TEST_REQUEST_TIMEOUT)
        .watch_reconnect_timeout(TEST_WATCH_RECONNECT)
}

async fn connect(server: &EtcdServer, prefix: &str) -> EtcdCoordinator {
    EtcdCoordinator::connect(config(server, prefix))
        .await
        .expect("connect to etcd")
}

fn start_etcd() -> EtcdServer {
    EtcdServer::start().unwrap_or_else(|e| panic!("{e}"))
}

struct Etcd(EtcdServer);

#[async_trait]
impl Backend for Etcd {
    async fn coordinator(&self) -> Arc<dyn Coordinator> {
        Arc::new(connect(&self.0, "/ccm/").await)
    }

    fn lease_options(&self) -> LeaseOptions {
        LeaseOptions::with_ttl(TEST_TTL)
    }

    fn dedup_ttl(&self) -> Duration {
        TEST_TTL
    }
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let backend = Etcd(start_etcd());
                let measured = conformance::$name(&backend).await;
                print!("{measured}");
            }
        )*
    };
}

conformance_tests!(
    exactly_one_leader_and_increasing_epochs,
    resign_hands_over_quickly,
    stalled_leader_steps_down_and_standby_takes_over,
    dropped_leadership_expires_after_ttl,
    cancelled_campaign_withdraws,
    leader_loop_campaigns_again_after_loss,
    feed_orders_resumes_and_agrees,
    feed_reset_after_compaction,
    dedup_once_per_ttl,
    invalid_arguments_are_rejected,
);

async fn raw_client(server: &EtcdServer) -> etcd_client::Client {
    etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("raw etcd client")
}

fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, CoordError>, what: &str) {
    assert!(
        matches!(result, Err(CoordError::Unavailable(_))),
        "{what}: expected Unavailable, got {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_by_someone_else_is_detected_at_once() {
    let server = start_etcd();
    let a = connect(&server, "/ccm/").await;
    let b = connect(&server, "/ccm/").await;
    let opts = LeaseOptions::with_ttl(TEST_TTL);
    let leader = a.campaign("scheduler", "a", opts).await.expect("a leads");
    let standby = {
        let b = b.clone();
        tokio::spawn(async move { b.campaign("scheduler", "b", opts).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // An operator (or a bug) revokes the leader's lease directly in etcd.
    let mut raw = raw_client(&server).await;
    let key = a.election_key("scheduler");
    let kv = raw.get(key.as_str(), None).await.expect("get");
    let lease = kv.kvs()[0].lease();
    assert_ne!(lease, 0, "the election key is attached to a lease");
    let revoked_at = Instant::now();
    raw.lease_revoke(lease).await.expect("revoke");

    let reason = tokio::time::timeout(Duration::from_millis(500), leader.lost())
        .await
        .expect("the leader notices the revocation at once");
    assert_eq!(reason, LossReason::LeaseLost);
    println!(
        "measured: revoked lease detected after {} ms",
        revoked_at.elapsed().as_millis()
    );
    let next = tokio::time::timeout(Duration::from_secs(1), standby)
        .await
        .expect("the standby takes over at once")
        .expect("task")
        .expect("campaign");
    println!(
        "measured: standby took over {} ms after the revocation",
        revoked_at.elapsed().as_millis()
    );
    assert!(next.epoch() > leader.epoch());
    assert!(
        !a.check_fence("scheduler", leader.epoch())
            .await
            .expect("fence")
            .is_current()
    );
    next.resign().await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_fails_fast_and_the_leader_steps_down_then_recovers() {
    let mut server = start_etcd();
    let a = connect(&server, "/ccm/").await;
    let b = connect(&server, "/ccm/").await;
    let opts = LeaseOptions::with_ttl(TEST_TTL);
    let leader = a.campaign("controller", "a", opts).await.expect("a leads");
    let epoch = leader.epoch();
    let mut feed = b.watch("instances", None).await.expect("watch");
    let before = a
        .publish("instances", Bytes::from_static(b"before"))
        .await
        .expect("publish");
    match feed.next().await {
        Some(Ok(FeedItem::Event { revision, .. })) => assert_eq!(revision, before),
        other => panic!("expected the first event, got {other:?}"),
    }
    tokio::time::sleep(opts.keepalive_interval).await;

    let killed_at = Instant::now();
    server.kill().expect("kill etcd");

    // The leader cannot renew: it steps down within its renew deadline.
    let reason = tokio::time::timeout(
        opts.renew_deadline + Duration::from_millis(500),
        leader.lost(),
    )
    .await
    .expect("the leader steps down while etcd is down");
    assert_eq!(reason, LossReason::RenewDeadlineMissed);
    println!(
        "measured: leader stepped down {} ms after etcd was killed",
        killed_at.elapsed().as_millis()
    );

    // Every operation fails with Unavailable within the request timeout; none hangs.
    let limit = TEST_REQUEST_TIMEOUT + Duration::from_secs(1);
    let started = Instant::now();
    assert_unavailable(
        tokio::time::timeout(limit, a.publish("instances", Bytes::from_static(b"x")))
            .await
            .expect("publish does not hang"),
        "publish",
    );
    assert_unavailable(
        tokio::time::timeout(limit, a.dedup("k", Duration::from_secs(5)))
            .await
            .expect("dedup does not hang"),
        "dedup",
    );
    assert_unavailable(
        tokio::time::timeout(limit, a.ping())
            .await
            .expect("ping does not hang"),
        "ping",
    );
    assert_unavailable(
        tokio::time::timeout(limit, b.campaign("controller", "b", opts))
            .await
            .expect("campaign does not hang"),
        "campaign",
    );
    assert_unavailable(
        tokio::time::timeout(limit, b.watch("instances", Some(before)))
            .await
            .expect("watch does not hang")
            .map(drop),
        "watch",
    );
    assert_unavailable(
        tokio::time::timeout(limit, b.check_fence("controller", epoch + 1_000))
            .await
            .expect("fence read does not hang"),
        "check_fence of an unseen epoch",
    );
    assert!(started.elapsed() < limit * 6);
    // The cached fence goes out of sync, so the deposed epoch is not accepted from the cache.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match b.check_fence("controller", epoch).await {
            Err(CoordError::Unavailable(_)) => break,
            Ok(FenceCheck::Current) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("check_fence while etcd is down: {other:?}"),
        }
    }
    // The open feed watch gives up after its reconnect window with Unavailable.
    let item = tokio::time::timeout(TEST_WATCH_RECONNECT + Duration::from_secs(3), feed.next())
        .await
        .expect("the feed stream does not hang");
    assert!(
        matches!(item, Some(Err(CoordError::Unavailable(_)))),
        "feed while etcd is down: {item:?}"
    );

    // etcd comes back (same data): the same coordinators work again.
    server.restart().expect("restart etcd");
    let restarted_at = Instant::now();
    let after = loop {
        match a.publish("instances", Bytes::from_static(b"after")).await {
            Ok(rev) => break rev,
            Err(CoordError::Unavailable(_)) if restarted_at.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("publish after restart: {e}"),
        }
    };
    println!(
        "measured: client usable {} ms after etcd restarted",
        restarted_at.elapsed().as_millis()
    );
    let mut resumed = b.watch("instances", Some(before)).await.expect("resume");
    match resumed.next().await {
        Some(Ok(FeedItem::Event { revision, payload })) => {
            assert_eq!((revision, payload), (after, Bytes::from_static(b"after")));
        }
        other => panic!("expected the event published after the restart, got {other:?}"),
    }
    // The old leader's lease expires (etcd does not renew it) and b takes over.
    let next = tokio::time::timeout(
        opts.ttl + Duration::from_secs(4),
        b.campaign("controller", "b", opts),
    )
    .await
    .expect("b takes over after the restart")
    .expect("campaign");
    println!(
        "measured: new leader {} ms after etcd restarted",
        restarted_at.elapsed().as_millis()
    );
    assert!(next.epoch() > epoch);
    assert!(
        !a.check_fence("controller", epoch)
            .await
            .expect("fence")
            .is_current()
    );
    assert_eq!(
        b.check_fence("controller", next.epoch())
            .await
            .expect("fence"),
        FenceCheck::Current
    );
    next.resign().await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_watch_survives_a_quick_etcd_restart() {
    let mut server = start_etcd();
    let c = connect(&server, "/ccm/").await;
    let mut feed = c.watch("workers", None).await.expect("watch");
    let first = c
        .publish("workers", Bytes::from_static(b"1"))
        .await
        .expect("publish");
    server.kill().expect("kill");
    server.restart().expect("restart");
    let second = loop {
        match c.publish("workers", Bytes::from_static(b"2")).await {
            Ok(rev) => break rev,
            Err(CoordError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("publish after restart: {e}"),
        }
    };
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), feed.next()).await {
            Ok(Some(Ok(FeedItem::Event { revision, .. }))) => seen.push(revision),
            other => panic!("expected events across the restart, got {other:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![first, second],
        "no gap, no duplicate across the restart"
    );
}

#[tokio::test]
async fn connecting_to_a_dead_endpoint_is_unavailable() {
    let port = ccm_testkit::ports::free_port().expect("port");
    let started = Instant::now();
    let result = EtcdCoordinator::connect(
        EtcdConfig::new([format!("http://127.0.0.1:{port}")])
            .connect_timeout(Duration::from_secs(1)),
    )
    .await;
    assert_unavailable(result.map(drop), "connect to a dead endpoint");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "connect honours its timeout"
    );
    let empty = EtcdCoordinator::connect(EtcdConfig::new(Vec::<String>::new())).await;
    assert!(
        matches!(empty, Err(CoordError::InvalidArgument(_))),
        "{empty:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_live_under_the_configured_prefix() {
    let server = start_etcd();
    let custom = connect(&server, "/custom-x").await;
    let default = connect(&server, "/ccm/").await;
    assert_eq!(custom.key_prefix(), "/custom-x/");
    assert_eq!(
        custom.election_key("scheduler"),
        "/custom-x/scheduler/leader"
    );
    let opts = LeaseOptions::with_ttl(TEST_TTL);
    let leader = custom
        .campaign("scheduler", "sched-1", opts)
        .await
        .expect("campaign");
    // Another prefix is another namespace: its election is independent.
    let other = tokio::time::timeout(
        Duration::from_secs(1),
        default.campaign("scheduler", "sched-2", opts),
    )
    .await
    .expect("the default prefix has its own election")
    .expect("campaign");
    let revision = custom
        .publish("instances", Bytes::from_static(b"payload"))
        .await
        .expect("publish");
    assert!(
        custom
            .dedup("events/processed/e1", Duration::from_secs(5))
            .await
            .expect("dedup")
    );

    let mut raw = raw_client(&server).await;
    let kv = raw
        .get("/custom-x/scheduler/leader", None)
        .await
        .expect("get");
    let kv = &kv.kvs()[0];
    assert_eq!(kv.value(), b"sched-1");
    assert_eq!(
        kv.create_revision(),
        leader.epoch(),
        "the epoch is the key's create revision"
    );
    assert_ne!(kv.lease(), 0);
    let feed = raw
        .get("/custom-x/feed/instances", None)
        .await
        .expect("get");
    assert_eq!(feed.kvs()[0].value(), b"payload");
    assert_eq!(
        feed.kvs()[0].mod_revision(),
        i64::try_from(revision).expect("revision")
    );
    let dedup = raw
        .get("/custom-x/dedup/events/processed/e1", None)
        .await
        .expect("get");
    assert_ne!(dedup.kvs()[0].lease(), 0, "dedup keys carry a lease");
    let default_keys = raw
        .get(
            "/ccm/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("get");
    let keys: Vec<String> = default_keys
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    assert_eq!(keys, vec!["/ccm/scheduler/leader".to_owned()]);
    leader.resign().await.expect("resign");
    other.resign().await.expect("resign");
    let after = raw
        .get("/custom-x/scheduler/leader", None)
        .await
        .expect("get");
    assert!(
        after.kvs().is_empty(),
        "resign deletes the election key at once"
    );
}
