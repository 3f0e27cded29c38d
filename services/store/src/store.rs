//! The [`Store`] trait.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::StoreResult;
use crate::model::{
    Applied, Claim, ClaimHolder, Document, Filter, Kind, LogKind, LogPage, LogQuery, Page, Query,
    Write,
};

/// The source of truth behind the control plane (its only writer).
///
/// Object-safe: the control plane holds an `Arc<dyn Store>`. Both implementations
/// ([`SqliteStore`](crate::SqliteStore), [`MongoStore`](crate::MongoStore)) pass the same
/// conformance suite, so the semantics below hold for both.
///
/// Documents are opaque JSON [`Body`](crate::Body)s with a few [`IndexFields`](crate::IndexFields)
/// for queries and a store-managed `resource_version`. Every change goes through [`Store::apply`]
/// or [`Store::apply_each`]: ordered writes in one transaction, conditional on versions, claims
/// and guards; the audit and scaling logs are appended in the same transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"mongodb"`.
    fn backend(&self) -> &'static str;

    /// Checks that the backend answers (for health checks).
    async fn ping(&self) -> StoreResult<()>;

    /// One document, or `None`.
    async fn get(&self, kind: Kind, id: &str) -> StoreResult<Option<Document>>;

    /// The documents of `kind` with these ids, in the order asked (missing ids are left out,
    /// duplicates answered once). At most [`MAX_GET_MANY`](crate::MAX_GET_MANY) ids.
    async fn get_many(&self, kind: Kind, ids: &[String]) -> StoreResult<Vec<Document>>;

    /// One page of the documents matching `query`, in its order. Pages are keyset-based: the
    /// token resumes strictly after the last item returned, so walking all pages never returns a
    /// document twice and never skips one that existed for the whole walk, even while documents
    /// are inserted. Fails with [`InvalidQuery`](crate::StoreError::InvalidQuery) for a token of
    /// another query.
    async fn list(&self, query: Query) -> StoreResult<Page>;

    /// How many documents of `kind` match `filters`.
    async fn count(&self, kind: Kind, filters: &[Filter]) -> StoreResult<u64>;

    /// The claims a document holds, sorted.
    async fn claims_of(&self, kind: Kind, id: &str) -> StoreResult<Vec<Claim>>;

    /// Who holds a claim, if anyone.
    async fn claim_holder(&self, claim: &Claim) -> StoreResult<Option<ClaimHolder>>;

    /// Runs `writes` in order in ONE transaction, all or nothing: if any write fails, its error
    /// is returned and nothing of the batch is written. Returns what each write did, in order.
    async fn apply(&self, writes: Vec<Write>) -> StoreResult<Vec<Applied>>;

    /// Runs each item (a list of writes, all or nothing per item) in order, all in ONE
    /// transaction: items that fail are reported in their slot and leave no trace; the others are
    /// committed together (later items see earlier successful ones). The outer error means the
    /// whole transaction failed (backend trouble) and nothing was written.
    async fn apply_each(
        &self,
        items: Vec<Vec<Write>>,
    ) -> StoreResult<Vec<StoreResult<Vec<Applied>>>>;

    /// One page of a log, newest first.
    async fn list_log(&self, log: LogKind, query: LogQuery) -> StoreResult<LogPage>;

    /// Deletes the entries of `log` older than `older_than` (retention) and says how many.
    /// Refuses (with [`InvalidQuery`](crate::StoreError::InvalidQuery)) a cut-off younger than
    /// the log's [`min_retention`](crate::LogKind::min_retention). The only way entries ever
    /// leave a log.
    async fn purge_log(&self, log: LogKind, older_than: DateTime<Utc>) -> StoreResult<u64>;
}

/// Checks a purge cut-off against the log's minimum retention.
pub(crate) fn check_purge_cutoff(log: LogKind, older_than: DateTime<Utc>) -> StoreResult<()> {
    let floor = Utc::now() - log.min_retention();
    if older_than > floor {
        return Err(crate::StoreError::InvalidQuery(format!(
            "purging {log} entries newer than {} days is not allowed (cut-off {older_than})",
            log.min_retention().num_days()
        )));
    }
    Ok(())
}

/// Whether an error is the failure of one `apply_each` item (reported in its slot) rather than
/// of the whole transaction.
pub(crate) fn is_item_failure(e: &crate::StoreError) -> bool {
    !matches!(
        e,
        crate::StoreError::Unavailable(_) | crate::StoreError::Backend(_)
    )
}
