//! The conformance suite against the in-process coordinator, plus its own bad paths (buffer
//! overflow, truncated history) and a run on a virtual clock.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ccm_coord::conformance::{self, Backend};
use ccm_coord::{
    Coordinator, FeedItem, InProcessConfig, InProcessCoordinator, LeaseOptions, LossReason,
    ResetReason,
};
use futures::StreamExt;
use tokio::time::Instant;

/// Lease TTL used by the suite (the in-process coordinator has no minimum TTL).
const TEST_TTL: Duration = Duration::from_secs(1);

struct InProcess(InProcessCoordinator);

#[async_trait]
impl Backend for InProcess {
    async fn coordinator(&self) -> Arc<dyn Coordinator> {
        // Clones share the state: they behave like replicas on one backend.
        Arc::new(self.0.clone())
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
                let backend = InProcess(InProcessCoordinator::default());
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

#[tokio::test]
async fn slow_consumer_gets_reset_when_the_buffer_overflows() {
    let coordinator = InProcessCoordinator::new(InProcessConfig {
        watch_buffer: 8,
        ..InProcessConfig::default()
    });
    let mut slow = coordinator.watch("t", None).await.expect("watch");
    let mut revisions = Vec::new();
    for i in 0..20u32 {
        revisions.push(
            coordinator
                .publish("t", Bytes::from(format!("e{i}")))
                .await
                .expect("publish"),
        );
    }
    match slow.next().await {
        Some(Ok(FeedItem::Reset {
            reason: ResetReason::Lagged { missed },
        })) => assert_eq!(missed, 12, "20 events into a buffer of 8"),
        other => panic!("expected a lag reset, got {other:?}"),
    }
    assert!(slow.next().await.is_none(), "the reset ends the stream");
    // A consumer that keeps up is not affected, and a resume after the reset catches up.
    let mut resumed = coordinator
        .watch("t", Some(revisions[0]))
        .await
        .expect("resume");
    for expected in &revisions[1..] {
        match resumed.next().await {
            Some(Ok(FeedItem::Event { revision, .. })) => assert_eq!(revision, *expected),
            other => panic!("expected event {expected}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn resuming_beyond_the_retained_history_resets() {
    let coordinator = InProcessCoordinator::new(InProcessConfig {
        feed_history: 5,
        ..InProcessConfig::default()
    });
    let mut revisions = Vec::new();
    for i in 0..10u32 {
        revisions.push(
            coordinator
                .publish("t", Bytes::from(format!("e{i}")))
                .await
                .expect("publish"),
        );
    }
    // Events 0..5 were dropped from the history: resuming before event 4 would miss some.
    let mut lost = coordinator
        .watch("t", Some(revisions[3]))
        .await
        .expect("watch");
    match lost.next().await {
        Some(Ok(FeedItem::Reset {
            reason: ResetReason::Compacted { compact_revision },
        })) => assert_eq!(compact_revision, revisions[5]),
        other => panic!("expected a reset, got {other:?}"),
    }
    assert!(lost.next().await.is_none());
    // Resuming right after the last dropped event is complete.
    let mut ok = coordinator
        .watch("t", Some(revisions[4]))
        .await
        .expect("watch");
    for expected in &revisions[5..] {
        match ok.next().await {
            Some(Ok(FeedItem::Event { revision, .. })) => assert_eq!(revision, *expected),
            other => panic!("expected event {expected}, got {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failover_on_a_virtual_clock_uses_the_default_ttl() {
    // Default lease options (TTL 10 s): on tokio's paused clock this takes no real time, which
    // is what `ccm simulate` relies on.
    let coordinator = InProcessCoordinator::default();
    let opts = LeaseOptions::default();
    let leader = coordinator
        .campaign("scheduler", "a", opts)
        .await
        .expect("campaign");
    let standby = {
        let c = coordinator.clone();
        tokio::spawn(async move { c.campaign("scheduler", "b", opts).await })
    };
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!leader.is_lost(), "renewals keep the leadership");
    assert!(!standby.is_finished());

    let stalled_at = Instant::now();
    leader.suspend_renewals();
    assert_eq!(leader.lost().await, LossReason::RenewDeadlineMissed);
    let lost_after = stalled_at.elapsed();
    assert!(
        lost_after <= opts.renew_deadline,
        "lost after {lost_after:?}"
    );
    assert!(
        !standby.is_finished(),
        "stepped down before the lease expired"
    );
    let next = standby.await.expect("task").expect("campaign");
    let takeover = stalled_at.elapsed();
    assert!(takeover <= opts.ttl, "took over after {takeover:?}");
    // Both are measured from the last renewal: the old leader stopped ttl - renew_deadline
    // before anyone else could be elected.
    assert!(
        takeover - lost_after >= opts.ttl - opts.renew_deadline,
        "took over after {takeover:?}, lost after {lost_after:?}"
    );
    assert!(next.epoch() > leader.epoch());
}

#[tokio::test]
async fn resign_after_loss_is_harmless_and_frees_nothing_else() {
    let coordinator = InProcessCoordinator::default();
    let opts = LeaseOptions::with_ttl(TEST_TTL);
    let old = coordinator
        .campaign("e", "a", opts)
        .await
        .expect("campaign");
    old.suspend_renewals();
    assert_eq!(old.lost().await, LossReason::RenewDeadlineMissed);
    // Wait for the lease to expire and someone else to lead.
    let next = tokio::time::timeout(TEST_TTL * 2, coordinator.campaign("e", "b", opts))
        .await
        .expect("b wins after expiry")
        .expect("campaign");
    // The old leader resigning late must not remove the new leader.
    old.resign().await.expect("late resign");
    assert_eq!(
        coordinator.leader("e").await.expect("leader"),
        Some(next.info().clone())
    );
}
