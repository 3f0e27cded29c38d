//! Opaque keyset page tokens.
//!
//! A token holds the ordering key of the last item of a page (so the next page starts strictly
//! after it, whatever was inserted or deleted meanwhile) and a fingerprint of the query it
//! belongs to (so a token cannot be replayed against a different query). It is URL-safe base64
//! of a small JSON object; callers must treat it as opaque.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::{StoreError, StoreResult};
use crate::model::{IndexFields, LogKind, LogQuery, Query};

/// The token format version; a token of another version is refused.
const TOKEN_FORMAT: u32 = 1;

/// What a missing `sort_key` orders as (first in [`crate::Order::SortKeyAsc`]).
pub(crate) const SORT_KEY_ABSENT: i64 = i64::MIN;

/// The stored, never-null ordering value for `sort_key`.
pub(crate) fn ord_sort(index: &IndexFields) -> i64 {
    index.sort_key.unwrap_or(SORT_KEY_ABSENT)
}

/// The stored, never-null ordering value for `version_key` ("" sorts last in
/// [`crate::Order::VersionDesc`]).
pub(crate) fn ord_version(index: &IndexFields) -> &str {
    index.version_key.as_deref().unwrap_or("")
}

/// The ordering key of a document: enough to resume after it in any order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DocCursor {
    pub(crate) ord_sort: i64,
    pub(crate) ord_version: String,
    pub(crate) seq: i64,
    pub(crate) id: String,
}

/// The ordering key of a log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogCursor {
    pub(crate) at_ms: i64,
    pub(crate) id: String,
}

#[derive(Serialize, Deserialize)]
struct Token<C> {
    v: u32,
    f: u64,
    c: C,
}

/// FNV-1a, 64 bit: a stable fingerprint (std's hashers are not stable across releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

fn fingerprint<T: Serialize>(what: &T) -> StoreResult<u64> {
    let text = serde_json::to_string(what)
        .map_err(|e| StoreError::Backend(format!("cannot fingerprint a query: {e}")))?;
    Ok(fnv1a(text.as_bytes()))
}

fn query_fingerprint(q: &Query) -> StoreResult<u64> {
    fingerprint(&(q.kind, &q.filters, q.order))
}

fn log_fingerprint(log: LogKind, q: &LogQuery) -> StoreResult<u64> {
    fingerprint(&(
        log,
        &q.resource_kind,
        &q.resource_id,
        q.since.map(|t| t.timestamp_millis()),
        q.until.map(|t| t.timestamp_millis()),
    ))
}

fn encode<C: Serialize>(f: u64, c: C) -> StoreResult<String> {
    let json = serde_json::to_vec(&Token {
        v: TOKEN_FORMAT,
        f,
        c,
    })
    .map_err(|e| StoreError::Backend(format!("cannot encode a page token: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

fn decode<C: for<'de> Deserialize<'de>>(token: &str, f: u64) -> StoreResult<C> {
    let bad = || StoreError::InvalidQuery("page_token is not a token of this query".to_owned());
    let bytes = URL_SAFE_NO_PAD
        .decode(token.as_bytes())
        .map_err(|_| bad())?;
    let t: Token<C> = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if t.v != TOKEN_FORMAT || t.f != f {
        return Err(bad());
    }
    Ok(t.c)
}

/// The token that resumes `query` after `cursor`.
pub(crate) fn encode_doc(query: &Query, cursor: DocCursor) -> StoreResult<String> {
    encode(query_fingerprint(query)?, cursor)
}

/// The cursor in `query.page_token`, if any.
pub(crate) fn decode_doc(query: &Query) -> StoreResult<Option<DocCursor>> {
    match query.page_token.as_deref() {
        None | Some("") => Ok(None),
        Some(t) => decode(t, query_fingerprint(query)?).map(Some),
    }
}

/// The token that resumes a log query after `cursor`.
pub(crate) fn encode_log(log: LogKind, query: &LogQuery, cursor: LogCursor) -> StoreResult<String> {
    encode(log_fingerprint(log, query)?, cursor)
}

/// The cursor in a log query's page token, if any.
pub(crate) fn decode_log(log: LogKind, query: &LogQuery) -> StoreResult<Option<LogCursor>> {
    match query.page_token.as_deref() {
        None | Some("") => Ok(None),
        Some(t) => decode(t, log_fingerprint(log, query)?).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Filter, IndexField, Kind, Order};

    fn cursor() -> DocCursor {
        DocCursor {
            ord_sort: 5,
            ord_version: "v".into(),
            seq: 9,
            id: "a\"b".into(),
        }
    }

    #[test]
    fn round_trips_for_the_same_query() {
        let mut q = Query::new(Kind::Instance).with_filter(Filter::eq(IndexField::State, "x"));
        let t = encode_doc(&q, cursor()).unwrap();
        q.page_token = Some(t);
        assert_eq!(decode_doc(&q).unwrap(), Some(cursor()));
    }

    #[test]
    fn refuses_a_token_of_another_query() {
        let q = Query::new(Kind::Instance);
        let t = encode_doc(&q, cursor()).unwrap();
        for other in [
            Query::new(Kind::Worker),
            Query::new(Kind::Instance).ordered_by(Order::SortKeyAsc),
            Query::new(Kind::Instance).with_filter(Filter::Missing(IndexField::WorkerId)),
        ] {
            let other = other.after(Some(t.clone()));
            assert!(matches!(
                decode_doc(&other),
                Err(StoreError::InvalidQuery(_))
            ));
        }
    }

    #[test]
    fn refuses_garbage() {
        for t in [
            "x",
            "!!!",
            "eyJ2IjoyfQ",
            &URL_SAFE_NO_PAD.encode(b"{\"v\":1}"),
        ] {
            let q = Query::new(Kind::Instance).after(Some(t.to_owned()));
            assert!(
                matches!(decode_doc(&q), Err(StoreError::InvalidQuery(_))),
                "{t}"
            );
        }
    }

    #[test]
    fn fnv_is_stable() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
