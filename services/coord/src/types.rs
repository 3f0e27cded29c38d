//! Values shared by every [`Coordinator`](crate::Coordinator) implementation.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{CoordError, Result};

/// Default lease TTL of a leadership (ARCHITECTURE §4: "TTL ~10 s").
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// The default keep-alive interval is the TTL divided by this (ARCHITECTURE §4: "keep-alive every
/// TTL/3").
pub const KEEPALIVE_DIVISOR: u32 = 3;
/// The default renew deadline is the TTL minus the TTL divided by this (i.e. 3/4 of the TTL): a
/// leader that has not renewed for that long steps down while its lease is still valid on the
/// backend, so it has stopped before anyone else can be elected.
pub const RENEW_MARGIN_DIVISOR: u32 = 4;
/// Longest election name, feed topic name or dedup key accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Election names that would collide with the key spaces of the feed and of the dedup keys.
pub const RESERVED_ELECTION_NAMES: [&str; 2] = ["feed", "dedup"];

/// Lease timing of a leadership.
///
/// The leader renews its lease every `keepalive_interval`. If no renewal succeeds within
/// `renew_deadline`, measured from the last successful renewal (from the moment that renewal was
/// sent), leadership is declared lost locally at once, even though the backend may still hold it
/// for the rest of the TTL: the leader steps down first, before anyone else can be elected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseOptions {
    /// Lease time-to-live on the backend. etcd counts whole seconds (rounded up) and enforces a
    /// minimum TTL (2 s with default server settings).
    pub ttl: Duration,
    /// How often the lease is renewed. Default: `ttl / KEEPALIVE_DIVISOR`.
    pub keepalive_interval: Duration,
    /// How long without a successful renewal before leadership is declared lost. Default:
    /// `ttl - ttl / RENEW_MARGIN_DIVISOR`.
    pub renew_deadline: Duration,
}

impl LeaseOptions {
    /// Options with the given TTL and the default keep-alive interval and renew deadline.
    pub fn with_ttl(ttl: Duration) -> Self {
        LeaseOptions {
            ttl,
            keepalive_interval: ttl / KEEPALIVE_DIVISOR,
            renew_deadline: ttl - ttl / RENEW_MARGIN_DIVISOR,
        }
    }

    /// Replaces the keep-alive interval.
    pub fn keepalive_interval(mut self, interval: Duration) -> Self {
        self.keepalive_interval = interval;
        self
    }

    /// Replaces the renew deadline.
    pub fn renew_deadline(mut self, deadline: Duration) -> Self {
        self.renew_deadline = deadline;
        self
    }

    /// Checks `0 < keepalive_interval < renew_deadline <= ttl`.
    pub fn validate(&self) -> Result<()> {
        if self.ttl.is_zero() || self.keepalive_interval.is_zero() {
            return Err(CoordError::InvalidArgument(format!(
                "lease ttl and keep-alive interval must be positive: {self:?}"
            )));
        }
        if self.keepalive_interval >= self.renew_deadline {
            return Err(CoordError::InvalidArgument(format!(
                "keep-alive interval must be shorter than the renew deadline: {self:?}"
            )));
        }
        if self.renew_deadline > self.ttl {
            return Err(CoordError::InvalidArgument(format!(
                "renew deadline must not exceed the lease ttl: {self:?}"
            )));
        }
        Ok(())
    }
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions::with_ttl(DEFAULT_LEASE_TTL)
    }
}

/// Who leads an election, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaderInfo {
    /// The candidate id the leader campaigned with.
    pub holder: String,
    /// The fencing token of this leadership: strictly greater than the epoch of every earlier
    /// leader of the same election (etcd: the create revision of the election key).
    pub epoch: i64,
}

/// The answer of [`Coordinator::check_fence`](crate::Coordinator::check_fence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceCheck {
    /// The epoch belongs to the current leader: accept the call.
    Current,
    /// The epoch is not the current leader's (a deposed leader, no leader at all, or an epoch that
    /// never existed): reject the call. At an RPC boundary this is `UNAVAILABLE` ("not leader",
    /// ARCHITECTURE §3).
    Stale {
        /// The current leader, if there is one.
        current: Option<LeaderInfo>,
    },
}

impl FenceCheck {
    /// Whether the call may proceed.
    pub fn is_current(&self) -> bool {
        matches!(self, FenceCheck::Current)
    }
}

/// Why leadership ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossReason {
    /// [`Leadership::resign`](crate::Leadership::resign) was called.
    Resigned,
    /// The [`Leadership`](crate::Leadership) was dropped without resigning; its lease is no longer
    /// renewed and expires after the TTL.
    Dropped,
    /// No renewal succeeded within the renew deadline; the leader stepped down on its own.
    RenewDeadlineMissed,
    /// The backend reports the lease or the election key gone (expired, revoked by someone else,
    /// or deleted) or the key now belongs to another leader.
    LeaseLost,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LossReason::Resigned => "resigned",
            LossReason::Dropped => "leadership handle dropped",
            LossReason::RenewDeadlineMissed => "lease not renewed before the renew deadline",
            LossReason::LeaseLost => "lease or election key gone on the backend",
        })
    }
}

/// One item of a change-feed watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// An event published to the topic. Revisions strictly increase along a stream; they are
    /// global to the backend (shared by all topics), so they are not consecutive within a topic.
    Event {
        /// The revision [`Coordinator::publish`](crate::Coordinator::publish) returned.
        revision: u64,
        /// The payload as published.
        payload: Bytes,
    },
    /// Events were lost (compaction, an overflowing buffer, a slow consumer). This is the last item
    /// of the stream: the client must re-list from the store and watch again.
    Reset {
        /// What happened.
        reason: ResetReason,
    },
}

/// Why a change-feed watch was reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetReason {
    /// The requested history was compacted: revisions below `compact_revision` are gone.
    Compacted {
        /// The oldest revision still available.
        compact_revision: u64,
    },
    /// The consumer fell behind and the in-process buffer overflowed.
    Lagged {
        /// How many events were dropped.
        missed: u64,
    },
    /// The backend cancelled the watch for another reason.
    Cancelled {
        /// The backend's reason.
        reason: String,
    },
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::Compacted { compact_revision } => {
                write!(f, "history compacted up to revision {compact_revision}")
            }
            ResetReason::Lagged { missed } => {
                write!(f, "consumer too slow: {missed} events dropped")
            }
            ResetReason::Cancelled { reason } => write!(f, "watch cancelled: {reason}"),
        }
    }
}

/// Checks an election name: non-empty, at most [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._:-]`, not
/// one of [`RESERVED_ELECTION_NAMES`].
pub(crate) fn validate_election(name: &str) -> Result<()> {
    validate_simple_name("election", name)?;
    if RESERVED_ELECTION_NAMES.contains(&name) {
        return Err(CoordError::InvalidArgument(format!(
            "election name {name:?} is reserved"
        )));
    }
    Ok(())
}

/// Checks a topic name: non-empty, at most [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._:-]`.
pub(crate) fn validate_topic(name: &str) -> Result<()> {
    validate_simple_name("topic", name)
}

/// Checks a candidate id: non-empty, at most [`MAX_NAME_LEN`] bytes, no control characters.
pub(crate) fn validate_candidate(id: &str) -> Result<()> {
    validate_free_text("candidate id", id)
}

/// Checks a dedup key and its TTL: a non-empty key of at most [`MAX_NAME_LEN`] bytes without
/// control characters, and a positive TTL.
pub(crate) fn validate_dedup(key: &str, ttl: Duration) -> Result<()> {
    validate_free_text("dedup key", key)?;
    if ttl.is_zero() {
        return Err(CoordError::InvalidArgument(
            "dedup ttl must be positive".into(),
        ));
    }
    Ok(())
}

fn validate_simple_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CoordError::InvalidArgument(format!(
            "{kind} name {name:?} must be 1..={MAX_NAME_LEN} characters of [A-Za-z0-9._:-]"
        )))
    }
}

fn validate_free_text(kind: &str, text: &str) -> Result<()> {
    if text.is_empty() || text.len() > MAX_NAME_LEN || text.chars().any(char::is_control) {
        Err(CoordError::InvalidArgument(format!(
            "{kind} {text:?} must be 1..={MAX_NAME_LEN} bytes without control characters"
        )))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_defaults_follow_the_ttl() {
        let o = LeaseOptions::with_ttl(Duration::from_secs(12));
        assert_eq!(o.keepalive_interval, Duration::from_secs(4));
        assert_eq!(o.renew_deadline, Duration::from_secs(9));
        o.validate().expect("defaults are valid");
        assert_eq!(LeaseOptions::default().ttl, DEFAULT_LEASE_TTL);
    }

    #[test]
    fn bad_lease_options_are_rejected() {
        let ttl = Duration::from_secs(3);
        for bad in [
            LeaseOptions::with_ttl(Duration::ZERO),
            LeaseOptions::with_ttl(ttl).keepalive_interval(Duration::ZERO),
            LeaseOptions::with_ttl(ttl).renew_deadline(Duration::from_secs(4)),
            LeaseOptions::with_ttl(ttl).keepalive_interval(Duration::from_secs(3)),
        ] {
            assert!(
                matches!(bad.validate(), Err(CoordError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_election("scheduler").is_ok());
        assert!(validate_election("feed").is_err());
        assert!(validate_election("").is_err());
        assert!(validate_election("a/b").is_err());
        assert!(validate_topic("instances.v1").is_ok());
        assert!(validate_topic(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(validate_candidate("scheduler-1 @host").is_ok());
        assert!(validate_candidate("bad\nid").is_err());
        assert!(validate_dedup("events/processed/abc", Duration::from_secs(1)).is_ok());
        assert!(validate_dedup("k", Duration::ZERO).is_err());
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        assert_eq!(
            CoordError::Unavailable("x".into()).grpc_code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            CoordError::InvalidArgument("x".into()).grpc_code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            CoordError::Internal("x".into()).grpc_code(),
            tonic::Code::Internal
        );
        let status: tonic::Status = CoordError::Unavailable("etcd down".into()).into();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("etcd down"));
    }
}
