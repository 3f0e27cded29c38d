//! A held leadership, how its holder learns that it ended, and the campaign loop that runs work
//! only while leading and campaigns again after every loss.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::Coordinator;
use crate::error::{CoordError, Result};
use crate::types::{LeaderInfo, LeaseOptions, LossReason};

/// How long [`run_for_leadership`] waits before campaigning again after a campaign failed (the
/// backend was unavailable).
pub const CAMPAIGN_RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// What a backend does for a leadership it granted.
#[async_trait]
pub(crate) trait LeaseControl: Send + Sync + fmt::Debug {
    /// Releases the election at once (etcd: revokes the lease, which deletes the key).
    async fn release(&self) -> Result<()>;
    /// Stops renewing the lease without releasing it (the lease expires after its TTL).
    fn stop_renewing(&self);
}

/// State shared by a [`Leadership`], its [`LeaderContext`]s and the backend's keep-alive task.
#[derive(Debug)]
pub(crate) struct LeaseShared {
    lost: CancellationToken,
    reason: Mutex<Option<LossReason>>,
    /// Failure injection: when set, the keep-alive task sends no renewals (as if the leader were
    /// partitioned from the backend) and does not release the lease when it steps down.
    suspended: AtomicBool,
}

impl LeaseShared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(LeaseShared {
            lost: CancellationToken::new(),
            reason: Mutex::new(None),
            suspended: AtomicBool::new(false),
        })
    }

    /// Declares leadership lost (the first reason wins). Returns whether this call declared it.
    pub(crate) fn declare_lost(&self, reason: LossReason) -> bool {
        let first = {
            let mut guard = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some(reason);
                true
            } else {
                false
            }
        };
        self.lost.cancel();
        first
    }

    pub(crate) fn reason(&self) -> Option<LossReason> {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::SeqCst)
    }

    fn suspend(&self) {
        self.suspended.store(true, Ordering::SeqCst);
    }
}

/// A leadership held by this process.
///
/// The backend renews its lease in the background. When leadership ends, for whatever reason,
/// [`Leadership::lost`] completes and every [`Leadership::lost_token`] is cancelled: the holder must
/// stop acting as leader at once. Resign with [`Leadership::resign`] for a fast hand-over;
/// dropping the handle only stops the renewals, so the election frees up after the lease TTL.
///
/// A lost leadership stays lost: campaign again for a new one (with a new, greater epoch), or let
/// [`run_for_leadership`] do it.
pub struct Leadership {
    election: String,
    info: LeaderInfo,
    shared: Arc<LeaseShared>,
    control: Box<dyn LeaseControl>,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("election", &self.election)
            .field("info", &self.info)
            .field("lost", &self.shared.reason())
            .finish()
    }
}

impl Leadership {
    pub(crate) fn new(
        election: String,
        info: LeaderInfo,
        shared: Arc<LeaseShared>,
        control: Box<dyn LeaseControl>,
    ) -> Self {
        Leadership {
            election,
            info,
            shared,
            control,
        }
    }

    /// The election.
    pub fn election(&self) -> &str {
        &self.election
    }

    /// The fencing token: pass it on every fenced call.
    pub fn epoch(&self) -> i64 {
        self.info.epoch
    }

    /// The candidate id this leadership was won with.
    pub fn holder(&self) -> &str {
        &self.info.holder
    }

    /// Holder and epoch.
    pub fn info(&self) -> &LeaderInfo {
        &self.info
    }

    /// Whether leadership has ended.
    pub fn is_lost(&self) -> bool {
        self.shared.lost.is_cancelled()
    }

    /// Why leadership ended, once it has.
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.shared.reason()
    }

    /// Completes as soon as leadership ends, with the reason.
    pub async fn lost(&self) -> LossReason {
        self.shared.lost.cancelled().await;
        self.shared.reason().unwrap_or(LossReason::LeaseLost)
    }

    /// A token cancelled as soon as leadership ends (a child token: cancelling it does not end the
    /// leadership). Hand it to the tasks that act as leader.
    pub fn lost_token(&self) -> CancellationToken {
        self.shared.lost.child_token()
    }

    /// A cloneable view of this leadership for the work that runs while leading.
    pub fn context(&self) -> LeaderContext {
        LeaderContext {
            election: self.election.clone(),
            info: self.info.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Steps down at once (the loss is declared before anything else) and then releases the
    /// election on the backend so that a standby can take over without waiting for the TTL.
    ///
    /// Returns `Unavailable` if the backend could not be told; leadership is lost locally anyway
    /// and the lease expires after its TTL.
    #[tracing::instrument(level = "debug", skip(self), fields(election = %self.election, epoch = self.info.epoch))]
    pub async fn resign(self) -> Result<()> {
        self.shared.declare_lost(LossReason::Resigned);
        self.control.stop_renewing();
        self.control.release().await
    }

    /// Failure injection for failover tests and chaos drills: stop renewing the lease as if this
    /// leader were cut off from the backend. The leader then detects the loss itself within the
    /// renew deadline (reason [`LossReason::RenewDeadlineMissed`]) and does not release the lease,
    /// so a standby takes over when the lease expires on the backend.
    pub fn suspend_renewals(&self) {
        self.shared.suspend();
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.shared.declare_lost(LossReason::Dropped);
        self.control.stop_renewing();
    }
}

/// A cloneable view of a [`Leadership`], for the work that runs while leading.
#[derive(Debug, Clone)]
pub struct LeaderContext {
    election: String,
    info: LeaderInfo,
    shared: Arc<LeaseShared>,
}

impl LeaderContext {
    /// The election.
    pub fn election(&self) -> &str {
        &self.election
    }

    /// The fencing token.
    pub fn epoch(&self) -> i64 {
        self.info.epoch
    }

    /// Holder and epoch.
    pub fn info(&self) -> &LeaderInfo {
        &self.info
    }

    /// Whether leadership has ended.
    pub fn is_lost(&self) -> bool {
        self.shared.lost.is_cancelled()
    }

    /// A token cancelled as soon as leadership ends.
    pub fn lost_token(&self) -> CancellationToken {
        self.shared.lost.child_token()
    }

    /// See [`Leadership::suspend_renewals`].
    pub fn suspend_renewals(&self) {
        self.shared.suspend();
    }
}

/// Campaigns for `election` as `candidate_id`, runs `work` while leading, and campaigns again
/// after every loss, until `shutdown` is cancelled or `work` returns.
///
/// This is the pattern every leader-elected service uses (it fixes the scaffold's bug where a
/// leader that lost its lease never campaigned again):
///
/// - the work future is dropped **at once** when leadership is lost (renew deadline missed, lease
///   revoked or expired), then the loop campaigns again;
/// - a failed campaign (backend unavailable) is retried after [`CAMPAIGN_RETRY_BACKOFF`];
/// - on `shutdown`, or when `work` returns, the leadership is resigned (fast hand-over) and the
///   function returns `Ok(())`;
/// - invalid arguments are returned as errors at once.
#[tracing::instrument(level = "info", skip(coordinator, opts, shutdown, work))]
pub async fn run_for_leadership<F, Fut>(
    coordinator: Arc<dyn Coordinator>,
    election: String,
    candidate_id: String,
    opts: LeaseOptions,
    shutdown: CancellationToken,
    mut work: F,
) -> Result<()>
where
    F: FnMut(LeaderContext) -> Fut + Send,
    Fut: Future<Output = ()> + Send,
{
    loop {
        let campaign = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            result = coordinator.campaign(&election, &candidate_id, opts) => result,
        };
        let leadership = match campaign {
            Ok(leadership) => leadership,
            Err(err @ CoordError::InvalidArgument(_)) => return Err(err),
            Err(err) => {
                tracing::warn!(error = %err, "campaign failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(CAMPAIGN_RETRY_BACKOFF) => continue,
                }
            }
        };
        tracing::info!(epoch = leadership.epoch(), "leading");
        let running = work(leadership.context());
        tokio::select! {
            biased;
            reason = leadership.lost() => {
                tracing::warn!(%reason, epoch = leadership.epoch(), "leadership lost; campaigning again");
            }
            _ = shutdown.cancelled() => {
                if let Err(err) = leadership.resign().await {
                    tracing::warn!(error = %err, "resign on shutdown failed; the lease will expire");
                }
                return Ok(());
            }
            () = running => {
                if let Err(err) = leadership.resign().await {
                    tracing::warn!(error = %err, "resign after work ended failed; the lease will expire");
                }
                return Ok(());
            }
        }
    }
}
