//! The conformance suite every [`Coordinator`] implementation must pass (feature `conformance`).
//!
//! Each check takes a [`Backend`] that hands out coordinator handles on one shared backend (for
//! etcd: separate connections, i.e. separate control-plane replicas) and panics with a message
//! when the implementation misbehaves; the test files of this crate run every check against etcd
//! (tests/etcd.rs) and against the in-process implementation (tests/in_process.rs). Checks that
//! measure something (hand-over and failover times) return the [`Measurements`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    CoordError, Coordinator, FeedItem, FeedStream, FenceCheck, LeaderContext, LeaderInfo,
    Leadership, LeaseOptions, LossReason, ResetReason, run_for_leadership,
};

/// A resigned leadership must be taken over by a waiting candidate within this time.
pub const HANDOVER_LIMIT: Duration = Duration::from_secs(1);
/// A standby must take over within the lease TTL plus this after the leader stalls or vanishes.
pub const TAKEOVER_SLACK: Duration = Duration::from_secs(2);
/// A stalled leader must notice within its renew deadline plus this (scheduling slack).
pub const LOSS_DETECTION_SLACK: Duration = Duration::from_millis(300);
/// Time allowed for watched caches and streams to observe a change made elsewhere.
pub const PROPAGATION_LIMIT: Duration = Duration::from_secs(2);
/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(10);

/// The backend under test.
#[async_trait]
pub trait Backend: Send + Sync {
    /// A new coordinator handle on the shared backend: a separate replica (for etcd, a separate
    /// connection). Every handle sees the same elections, feed and dedup keys.
    async fn coordinator(&self) -> Arc<dyn Coordinator>;
    /// Lease options with a short TTL (1–3 s) to keep the suite fast.
    fn lease_options(&self) -> LeaseOptions;
    /// A short dedup TTL the backend honours (etcd rounds TTLs up to its minimum lease TTL).
    fn dedup_ttl(&self) -> Duration;
}

/// Durations measured by a check, for the test output.
#[derive(Debug, Default, Clone)]
pub struct Measurements(pub Vec<(String, Duration)>);

impl Measurements {
    fn record(&mut self, what: impl Into<String>, took: Duration) {
        self.0.push((what.into(), took));
    }
}

impl fmt::Display for Measurements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (what, took) in &self.0 {
            writeln!(f, "measured: {what}: {} ms", took.as_millis())?;
        }
        Ok(())
    }
}

async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: did not happen within {limit:?}"),
    }
}

/// Polls `check` until it returns `Some`, for at most `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not reached within {limit:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn spawn_campaign(
    coordinator: &Arc<dyn Coordinator>,
    election: &str,
    candidate: &str,
    opts: LeaseOptions,
) -> JoinHandle<Result<Leadership, CoordError>> {
    let coordinator = coordinator.clone();
    let election = election.to_owned();
    let candidate = candidate.to_owned();
    tokio::spawn(async move { coordinator.campaign(&election, &candidate, opts).await })
}

type Joined = Result<Result<Leadership, CoordError>, tokio::task::JoinError>;

async fn join_leader(handle: JoinHandle<Result<Leadership, CoordError>>, who: &str) -> Leadership {
    unwrap_joined(handle.await, who)
}

fn unwrap_joined(joined: Joined, who: &str) -> Leadership {
    match joined {
        Ok(Ok(leadership)) => leadership,
        Ok(Err(err)) => panic!("campaign of {who} failed: {err}"),
        Err(err) => panic!("campaign task of {who} panicked: {err}"),
    }
}

/// Waits until exactly one of the pending campaigns finished; returns its index and the time.
async fn first_winner(
    pending: &[Option<JoinHandle<Result<Leadership, CoordError>>>],
    limit: Duration,
) -> (usize, Duration) {
    let start = Instant::now();
    eventually(limit, "a candidate wins", || async move {
        let finished: Vec<usize> = pending
            .iter()
            .enumerate()
            .filter(|(_, h)| h.as_ref().is_some_and(|h| h.is_finished()))
            .map(|(i, _)| i)
            .collect();
        assert!(
            finished.len() <= 1,
            "more than one candidate leads at once: {finished:?}"
        );
        finished.first().map(|i| (*i, start.elapsed()))
    })
    .await
}

async fn fence(c: &Arc<dyn Coordinator>, election: &str, epoch: i64) -> FenceCheck {
    c.check_fence(election, epoch)
        .await
        .unwrap_or_else(|e| panic!("check_fence({election}, {epoch}) failed: {e}"))
}

async fn assert_stale_everywhere(
    coordinators: &[Arc<dyn Coordinator>],
    election: &str,
    epoch: i64,
) {
    for (i, c) in coordinators.iter().enumerate() {
        let check = fence(c, election, epoch).await;
        assert!(
            !check.is_current(),
            "coordinator {i}: deposed epoch {epoch} must be stale at once, got {check:?}"
        );
    }
}

async fn assert_leader_everywhere(
    coordinators: &[Arc<dyn Coordinator>],
    election: &str,
    expected: Option<&LeaderInfo>,
) {
    for (i, c) in coordinators.iter().enumerate() {
        eventually(
            PROPAGATION_LIMIT,
            &format!("coordinator {i} sees leader {expected:?}"),
            || async move {
                let seen = c.leader(election).await.expect("leader()");
                (seen.as_ref() == expected).then_some(())
            },
        )
        .await;
    }
}

/// Several contenders: exactly one leads at a time, every coordinator agrees who, the fence
/// accepts only the leader's epoch, epochs strictly increase across successive leaders, a
/// resignation hands over within [`HANDOVER_LIMIT`], and a resigned candidate can campaign again
/// and win later.
pub async fn exactly_one_leader_and_increasing_epochs(backend: &dyn Backend) -> Measurements {
    let mut m = Measurements::default();
    let opts = backend.lease_options();
    let election = "conf-one-leader";
    let mut coordinators = Vec::new();
    for _ in 0..3 {
        coordinators.push(backend.coordinator().await);
    }
    // Nobody leads yet.
    assert_leader_everywhere(&coordinators, election, None).await;
    assert_eq!(
        fence(&coordinators[0], election, 1).await,
        FenceCheck::Stale { current: None }
    );

    let mut pending: Vec<Option<_>> = (0..3)
        .map(|i| {
            Some(spawn_campaign(
                &coordinators[i],
                election,
                &format!("candidate-{i}"),
                opts,
            ))
        })
        .collect();
    let (first, _) = first_winner(&pending, PROPAGATION_LIMIT).await;
    let mut leader = join_leader(pending[first].take().expect("pending"), "first").await;
    assert_eq!(leader.holder(), format!("candidate-{first}"));
    assert!(leader.epoch() > 0, "epochs are positive");

    // Longer than a lease TTL: the leader keeps renewing, nobody else gets in.
    tokio::time::sleep(opts.ttl + opts.keepalive_interval).await;
    assert!(
        pending.iter().flatten().all(|h| !h.is_finished()),
        "a second candidate won while the first still leads"
    );
    assert!(
        !leader.is_lost(),
        "the leader lost its lease while renewing it"
    );
    assert_leader_everywhere(&coordinators, election, Some(leader.info())).await;
    for c in &coordinators {
        assert_eq!(
            fence(c, election, leader.epoch()).await,
            FenceCheck::Current
        );
        assert_eq!(
            fence(c, election, leader.epoch() - 1).await,
            FenceCheck::Stale {
                current: Some(leader.info().clone())
            }
        );
        assert_eq!(
            fence(c, election, leader.epoch() + 1_000_000).await,
            FenceCheck::Stale {
                current: Some(leader.info().clone())
            },
            "an epoch that never existed is stale"
        );
    }

    // Hand over twice; the first leader campaigns again in between and must win in the end.
    let mut epochs = vec![leader.epoch()];
    let mut current = first;
    for round in 0..2 {
        let old = leader.info().clone();
        let started = Instant::now();
        leader.resign().await.expect("resign");
        let (next, _) = first_winner(&pending, HANDOVER_LIMIT).await;
        let handover = started.elapsed();
        m.record(format!("resign hand-over (round {round})"), handover);
        leader = join_leader(pending[next].take().expect("pending"), "next").await;
        assert!(
            leader.epoch() > old.epoch,
            "epochs must increase: {} then {}",
            old.epoch,
            leader.epoch()
        );
        epochs.push(leader.epoch());
        assert_stale_everywhere(&coordinators, election, old.epoch).await;
        assert_eq!(
            fence(&coordinators[next], election, leader.epoch()).await,
            FenceCheck::Current
        );
        // The resigned candidate campaigns again.
        pending[current] = Some(spawn_campaign(
            &coordinators[current],
            election,
            &format!("candidate-{current}"),
            opts,
        ));
        current = next;
    }
    let _ = current;
    // The first leader is waiting again: resign (without campaigning again) until it wins.
    let mut rounds = 0;
    while leader.holder() != format!("candidate-{first}") {
        rounds += 1;
        assert!(rounds <= 2, "the first leader never won again");
        let old = leader.epoch();
        leader.resign().await.expect("resign");
        let (next, _) = first_winner(&pending, HANDOVER_LIMIT).await;
        leader = join_leader(pending[next].take().expect("pending"), "next").await;
        assert!(leader.epoch() > old);
        epochs.push(leader.epoch());
    }
    assert!(
        epochs.windows(2).all(|w| w[0] < w[1]),
        "epochs strictly increase: {epochs:?}"
    );
    // Clean up: withdraw the waiting candidacies, resign, and the election is empty.
    for h in pending.iter_mut().filter_map(Option::take) {
        h.abort();
        if let Ok(Ok(late)) = h.await {
            // It won between the last check and the abort: that would be a second leader.
            panic!(
                "a waiting candidate won while another led: {:?}",
                late.info()
            );
        }
    }
    leader.resign().await.expect("resign");
    assert_leader_everywhere(&coordinators, election, None).await;
    m
}

/// A waiting candidate takes over within [`HANDOVER_LIMIT`] of a resignation; the resigned
/// leadership reports [`LossReason::Resigned`] at once.
pub async fn resign_hands_over_quickly(backend: &dyn Backend) -> Measurements {
    let mut m = Measurements::default();
    let opts = backend.lease_options();
    let election = "conf-resign";
    let a = backend.coordinator().await;
    let b = backend.coordinator().await;
    let leader = a.campaign(election, "a", opts).await.expect("a campaigns");
    let standby = spawn_campaign(&b, election, "b", opts);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!standby.is_finished(), "b won while a leads");
    let token = leader.lost_token();
    let old = leader.epoch();
    let started = Instant::now();
    leader.resign().await.expect("resign");
    assert!(
        token.is_cancelled(),
        "resign cancels the lost token at once"
    );
    let next = unwrap_joined(
        within(HANDOVER_LIMIT, "b takes over after a resigns", standby).await,
        "b",
    );
    let handover = started.elapsed();
    m.record("resign hand-over", handover);
    assert_eq!(next.holder(), "b");
    assert!(next.epoch() > old);
    assert!(!fence(&a, election, old).await.is_current());
    assert_eq!(fence(&b, election, next.epoch()).await, FenceCheck::Current);
    next.resign().await.expect("resign");
    m
}

/// A leader whose renewals stop (as if partitioned from the backend) declares the loss itself
/// within its renew deadline, strictly before a standby is elected; the standby takes over within
/// the TTL plus [`TAKEOVER_SLACK`]; the old epoch is stale at once everywhere; a late resignation
/// of the lost leadership is harmless; the old leader can campaign again and win later with a
/// greater epoch.
pub async fn stalled_leader_steps_down_and_standby_takes_over(
    backend: &dyn Backend,
) -> Measurements {
    let mut m = Measurements::default();
    let opts = backend.lease_options();
    let election = "conf-stall";
    let a = backend.coordinator().await;
    let b = backend.coordinator().await;
    let observer = backend.coordinator().await;
    let leader = a.campaign(election, "a", opts).await.expect("a campaigns");
    let old = leader.info().clone();
    let standby = spawn_campaign(&b, election, "b", opts);
    // Let at least one renewal go through first.
    tokio::time::sleep(opts.keepalive_interval + opts.keepalive_interval / 2).await;
    assert!(!leader.is_lost());
    assert_eq!(
        fence(&observer, election, old.epoch).await,
        FenceCheck::Current
    );

    let stalled_at = Instant::now();
    leader.suspend_renewals();
    let reason = within(
        opts.renew_deadline + LOSS_DETECTION_SLACK,
        "the stalled leader notices the loss",
        leader.lost(),
    )
    .await;
    let lost_after = stalled_at.elapsed();
    assert_eq!(reason, LossReason::RenewDeadlineMissed);
    assert!(
        !standby.is_finished(),
        "the standby was elected before the old leader stepped down"
    );
    m.record("stalled leader detects loss", lost_after);

    let next = unwrap_joined(
        within(opts.ttl + TAKEOVER_SLACK, "the standby takes over", standby).await,
        "b",
    );
    let takeover = stalled_at.elapsed();
    m.record("standby takes over after stall", takeover);
    assert_eq!(next.holder(), "b");
    assert!(next.epoch() > old.epoch);
    assert_stale_everywhere(
        &[a.clone(), b.clone(), observer.clone()],
        election,
        old.epoch,
    )
    .await;
    assert_eq!(fence(&b, election, next.epoch()).await, FenceCheck::Current);
    // A late resignation of the lost leadership is harmless and does not touch the new leader.
    leader.resign().await.expect("a late resign succeeds");
    assert_eq!(fence(&b, election, next.epoch()).await, FenceCheck::Current);
    assert_leader_everywhere(&[a.clone(), observer.clone()], election, Some(next.info())).await;

    // The loser campaigns again and wins once b resigns.
    let again = spawn_campaign(&a, election, "a", opts);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!again.is_finished(), "a won again while b leads");
    let b_epoch = next.epoch();
    next.resign().await.expect("b resigns");
    let again = unwrap_joined(within(HANDOVER_LIMIT, "a wins again", again).await, "a");
    assert_eq!(again.holder(), "a");
    assert!(again.epoch() > b_epoch);
    assert!(!fence(&observer, election, b_epoch).await.is_current());
    again.resign().await.expect("resign");
    m
}

/// A leadership dropped without resigning stops renewing; the election frees up when the lease
/// expires (not at once, and within the TTL plus [`TAKEOVER_SLACK`]).
pub async fn dropped_leadership_expires_after_ttl(backend: &dyn Backend) -> Measurements {
    let mut m = Measurements::default();
    let opts = backend.lease_options();
    let election = "conf-drop";
    let a = backend.coordinator().await;
    let b = backend.coordinator().await;
    let leader = a.campaign(election, "a", opts).await.expect("a campaigns");
    let token = leader.lost_token();
    let standby = spawn_campaign(&b, election, "b", opts);
    tokio::time::sleep(opts.keepalive_interval + opts.keepalive_interval / 2).await;
    let dropped_at = Instant::now();
    drop(leader);
    assert!(
        token.is_cancelled(),
        "dropping the leadership cancels its token"
    );
    let next = unwrap_joined(
        within(
            opts.ttl + TAKEOVER_SLACK,
            "the election frees up after the TTL",
            standby,
        )
        .await,
        "b",
    );
    let took = dropped_at.elapsed();
    m.record("takeover after a dropped leadership", took);
    let earliest = opts
        .ttl
        .saturating_sub(opts.keepalive_interval + Duration::from_millis(200));
    assert!(
        took >= earliest,
        "the election freed up after {took:?}, before the lease could have expired ({earliest:?})"
    );
    next.resign().await.expect("resign");
    m
}

/// Dropping a campaign future withdraws the candidacy, whether it was still waiting or had just
/// won: the next candidate wins within [`HANDOVER_LIMIT`] instead of waiting for a lease TTL.
pub async fn cancelled_campaign_withdraws(backend: &dyn Backend) -> Measurements {
    let mut m = Measurements::default();
    let opts = backend.lease_options();
    let election = "conf-cancel";
    let a = backend.coordinator().await;
    let b = backend.coordinator().await;
    let c = backend.coordinator().await;

    // A waiting candidacy is dropped.
    let leader = a.campaign(election, "a", opts).await.expect("a campaigns");
    let gave_up =
        tokio::time::timeout(Duration::from_millis(300), b.campaign(election, "b", opts)).await;
    assert!(gave_up.is_err(), "b must not win while a leads");
    leader.resign().await.expect("resign");
    // b's withdrawn candidacy must not take the free election.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.leader(election).await.expect("leader"), None);

    // Campaigns dropped at various points of their progress on a free election.
    for delay_ms in [0u64, 1, 2, 3, 5, 8, 13] {
        let attempt = tokio::time::timeout(
            Duration::from_millis(delay_ms),
            b.campaign(election, "b", opts),
        )
        .await;
        if let Ok(won) = attempt {
            won.expect("b campaigns").resign().await.expect("resign");
        }
        let started = Instant::now();
        let next = within(
            HANDOVER_LIMIT,
            &format!("c wins after b's campaign was dropped after {delay_ms} ms"),
            c.campaign(election, "c", opts),
        )
        .await
        .expect("c campaigns");
        m.record(
            format!("win after a campaign dropped at {delay_ms} ms"),
            started.elapsed(),
        );
        next.resign().await.expect("resign");
    }
    m
}

/// [`run_for_leadership`] runs the work only while leading, drops it at once on loss, campaigns
/// again after every loss (the scaffold's bug), and resigns on shutdown.
pub async fn leader_loop_campaigns_again_after_loss(backend: &dyn Backend) -> Measurements {
    let mut m = Measurements::default();
    let opts = backend.lease_options();
    let election = "conf-loop";
    let shutdown = CancellationToken::new();
    let (events, mut rx) = mpsc::unbounded_channel::<LoopEvent>();

    struct OnDrop(String, mpsc::UnboundedSender<LoopEvent>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.1.send((self.0.clone(), false, None));
        }
    }

    let mut loops = Vec::new();
    for name in ["x", "y"] {
        let coordinator = backend.coordinator().await;
        let events = events.clone();
        let shutdown = shutdown.clone();
        loops.push(tokio::spawn(run_for_leadership(
            coordinator,
            election.to_owned(),
            name.to_owned(),
            opts,
            shutdown,
            move |ctx: LeaderContext| {
                let events = events.clone();
                let name = name.to_owned();
                async move {
                    let _stopped = OnDrop(name.clone(), events.clone());
                    let _ = events.send((name, true, Some(ctx)));
                    std::future::pending::<()>().await;
                }
            },
        )));
    }
    let (mut leader, started, ctx) = next_event(&mut rx, PROPAGATION_LIMIT).await;
    assert!(started);
    let mut ctx = ctx.expect("context");
    let mut epochs = vec![ctx.epoch()];
    let mut have_lost: Vec<String> = Vec::new();

    // Stall whoever leads until a candidate that lost before wins again (with two candidates
    // this takes at most two rounds).
    loop {
        assert!(
            epochs.len() <= 3,
            "no candidate won again after losing: {have_lost:?}"
        );
        let stalled_at = Instant::now();
        ctx.suspend_renewals();
        let (who, started, _) =
            next_event(&mut rx, opts.renew_deadline + LOSS_DETECTION_SLACK).await;
        assert_eq!(
            (who.as_str(), started),
            (leader.as_str(), false),
            "the lost leader's work is dropped as soon as the loss is detected"
        );
        assert!(ctx.is_lost());
        have_lost.push(leader.clone());
        let (next, started, next_ctx) = next_event(&mut rx, opts.ttl + TAKEOVER_SLACK).await;
        assert!(started, "a new leader starts its work");
        m.record(
            format!("leader loop takeover after stall (round {})", epochs.len()),
            stalled_at.elapsed(),
        );
        ctx = next_ctx.expect("context");
        epochs.push(ctx.epoch());
        leader = next;
        if have_lost.contains(&leader) {
            break;
        }
    }
    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");

    // Shutdown: both loops return, the leader resigns, the election is empty.
    shutdown.cancel();
    for l in loops {
        let result = within(PROPAGATION_LIMIT, "leader loops stop on shutdown", l)
            .await
            .expect("loop task");
        result.expect("loop result");
    }
    let observer = backend.coordinator().await;
    assert_leader_everywhere(&[observer], election, None).await;
    m
}

/// (candidate, started (true) or stopped (false), context when started)
type LoopEvent = (String, bool, Option<LeaderContext>);

async fn next_event(rx: &mut mpsc::UnboundedReceiver<LoopEvent>, limit: Duration) -> LoopEvent {
    within(limit, "the next leader-loop event", rx.recv())
        .await
        .expect("event channel open")
}

async fn next_item(stream: &mut FeedStream, what: &str) -> FeedItem {
    within(PROPAGATION_LIMIT, what, stream.next())
        .await
        .unwrap_or_else(|| panic!("{what}: stream ended"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn next_events(stream: &mut FeedStream, n: usize, what: &str) -> Vec<(u64, Bytes)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match next_item(stream, what).await {
            FeedItem::Event { revision, payload } => out.push((revision, payload)),
            FeedItem::Reset { reason } => panic!("{what}: unexpected reset: {reason}"),
        }
    }
    out
}

async fn assert_quiet(stream: &mut FeedStream, what: &str) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
        panic!("{what}: expected nothing more, got {item:?}");
    }
}

/// Events arrive in publish order with the revisions `publish` returned; two watchers on two
/// coordinators see identical sequences; a watch from `None` sees only new events; resuming from a
/// revision delivers exactly the later events (no gap, no duplicate); other topics do not leak in.
pub async fn feed_orders_resumes_and_agrees(backend: &dyn Backend) -> Measurements {
    let one = backend.coordinator().await;
    let two = backend.coordinator().await;
    let topic = "conf-feed";
    let noise = "conf-feed-other";
    let before = one
        .publish(topic, Bytes::from_static(b"before"))
        .await
        .expect("publish");
    let mut w1 = one.watch(topic, None).await.expect("watch");
    let mut w2 = two.watch(topic, None).await.expect("watch");
    let mut published = Vec::new();
    for i in 0..20u32 {
        let by = if i % 2 == 0 { &one } else { &two };
        let payload = Bytes::from(format!("event-{i}"));
        let revision = by.publish(topic, payload.clone()).await.expect("publish");
        assert!(revision > before);
        by.publish(noise, Bytes::from_static(b"noise"))
            .await
            .expect("publish noise");
        published.push((revision, payload));
    }
    assert!(
        published.windows(2).all(|w| w[0].0 < w[1].0),
        "publish revisions increase"
    );
    let seen1 = next_events(&mut w1, 20, "watcher 1").await;
    let seen2 = next_events(&mut w2, 20, "watcher 2").await;
    assert_eq!(
        seen1, published,
        "watcher 1 sees every event in order, nothing older"
    );
    assert_eq!(seen2, seen1, "two coordinators see identical sequences");
    assert_quiet(&mut w1, "watcher 1").await;

    // Resume after the 10th event.
    let (tenth, _) = published[9].clone();
    let mut resumed = two.watch(topic, Some(tenth)).await.expect("resume");
    let replay = next_events(&mut resumed, 10, "resumed watcher").await;
    assert_eq!(
        replay,
        published[10..].to_vec(),
        "resume: no gap, no duplicate"
    );
    let late = one
        .publish(topic, Bytes::from_static(b"late"))
        .await
        .expect("publish");
    let expected = vec![(late, Bytes::from_static(b"late"))];
    assert_eq!(next_events(&mut resumed, 1, "resumed live").await, expected);
    assert_eq!(next_events(&mut w1, 1, "watcher 1 live").await, expected);
    assert_eq!(next_events(&mut w2, 1, "watcher 2 live").await, expected);

    // Resume from before everything: the whole history of the topic.
    let mut all = one.watch(topic, Some(before - 1)).await.expect("watch all");
    let history = next_events(&mut all, 22, "full history").await;
    assert_eq!(history[0], (before, Bytes::from_static(b"before")));
    assert_eq!(history[1..21].to_vec(), published);
    assert_eq!(history[21].0, late);
    // Resume from the latest revision: nothing until something new.
    let mut tail = one.watch(topic, Some(late)).await.expect("watch tail");
    assert_quiet(&mut tail, "watch from the latest revision").await;

    let current = one.feed_revision().await.expect("feed revision");
    assert!(
        current >= late,
        "feed_revision {current} < last publish {late}"
    );
    Measurements::default()
}

/// After a compaction, resuming from a compacted revision yields a `Reset` (and the stream ends);
/// resuming from after the compaction point works; live watchers are unaffected.
pub async fn feed_reset_after_compaction(backend: &dyn Backend) -> Measurements {
    let c = backend.coordinator().await;
    let topic = "conf-compact";
    let mut live = c.watch(topic, None).await.expect("watch");
    let mut revisions = Vec::new();
    for i in 0..5u32 {
        revisions.push(
            c.publish(topic, Bytes::from(format!("e{i}")))
                .await
                .expect("publish"),
        );
    }
    // Discard everything below the 4th event.
    c.compact_feed(revisions[3]).await.expect("compact");
    c.compact_feed(revisions[3])
        .await
        .expect("compacting again is a no-op");
    c.compact_feed(revisions[1])
        .await
        .expect("compacting to an older revision is a no-op");
    let future = c.feed_revision().await.expect("revision") + 1_000;
    assert!(
        matches!(
            c.compact_feed(future).await,
            Err(CoordError::InvalidArgument(_))
        ),
        "compacting to a future revision is invalid"
    );

    let mut stale = c.watch(topic, Some(revisions[0])).await.expect("watch");
    match next_item(&mut stale, "watch from a compacted revision").await {
        FeedItem::Reset {
            reason: ResetReason::Compacted { compact_revision },
        } => assert!(compact_revision > revisions[0]),
        other => panic!("expected a compaction reset, got {other:?}"),
    }
    let end = within(PROPAGATION_LIMIT, "the reset stream ends", stale.next()).await;
    assert!(end.is_none(), "a reset is the last item, got {end:?}");

    let mut fresh = c.watch(topic, Some(revisions[3])).await.expect("watch");
    let got = next_events(&mut fresh, 1, "watch after the compaction point").await;
    assert_eq!(got[0].0, revisions[4]);

    let seen = next_events(&mut live, 5, "live watcher across a compaction").await;
    assert_eq!(seen.iter().map(|(r, _)| *r).collect::<Vec<_>>(), revisions);
    Measurements::default()
}

/// `dedup` is true the first time, false while recorded (on every coordinator), true again once
/// the TTL has passed; keys are independent.
pub async fn dedup_once_per_ttl(backend: &dyn Backend) -> Measurements {
    let mut m = Measurements::default();
    let ttl = backend.dedup_ttl();
    let a = backend.coordinator().await;
    let b = backend.coordinator().await;
    let b_ref = &b;
    let key = "events/processed/conf-1";
    let first_at = Instant::now();
    assert!(a.dedup(key, ttl).await.expect("dedup"), "first time");
    assert!(!a.dedup(key, ttl).await.expect("dedup"), "second time");
    assert!(
        !b.dedup(key, ttl).await.expect("dedup"),
        "seen from another replica"
    );
    assert!(
        a.dedup("events/processed/conf-2", ttl)
            .await
            .expect("dedup"),
        "another key is independent"
    );
    tokio::time::sleep(ttl / 2).await;
    assert!(
        !b.dedup(key, ttl).await.expect("dedup"),
        "still recorded at half the TTL"
    );
    let again = eventually(
        ttl + TAKEOVER_SLACK + Duration::from_secs(1),
        "dedup key expires",
        || async move {
            b_ref
                .dedup(key, ttl)
                .await
                .expect("dedup")
                .then(|| first_at.elapsed())
        },
    )
    .await;
    assert!(
        again >= ttl,
        "expired after {again:?}, before its TTL {ttl:?}"
    );
    m.record("dedup key expiry", again);
    assert!(!a.dedup(key, ttl).await.expect("dedup"), "recorded again");
    m
}

/// Bad names, lease options, TTLs and revisions are `InvalidArgument`.
pub async fn invalid_arguments_are_rejected(backend: &dyn Backend) -> Measurements {
    let c = backend.coordinator().await;
    let opts = backend.lease_options();
    let invalid = |r: Result<(), CoordError>, what: &str| {
        assert!(
            matches!(r, Err(CoordError::InvalidArgument(_))),
            "{what}: expected InvalidArgument, got {r:?}"
        );
    };
    invalid(c.campaign("", "a", opts).await.map(drop), "empty election");
    invalid(
        c.campaign("a/b", "a", opts).await.map(drop),
        "election with a slash",
    );
    invalid(
        c.campaign("feed", "a", opts).await.map(drop),
        "reserved election",
    );
    invalid(
        c.campaign("ok", "", opts).await.map(drop),
        "empty candidate",
    );
    invalid(
        c.campaign("ok", "a", opts.renew_deadline(opts.ttl * 2))
            .await
            .map(drop),
        "renew deadline beyond the TTL",
    );
    invalid(c.leader("").await.map(drop), "leader of an empty election");
    invalid(
        c.check_fence("", 1).await.map(drop),
        "fence of an empty election",
    );
    invalid(c.publish("", Bytes::new()).await.map(drop), "empty topic");
    invalid(
        c.publish("a b", Bytes::new()).await.map(drop),
        "topic with a space",
    );
    invalid(c.watch("", None).await.map(drop), "watch an empty topic");
    invalid(
        c.dedup("", Duration::from_secs(1)).await.map(drop),
        "empty dedup key",
    );
    invalid(
        c.dedup("k", Duration::ZERO).await.map(drop),
        "zero dedup ttl",
    );
    c.ping().await.expect("the backend answers");
    Measurements::default()
}
