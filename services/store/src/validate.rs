//! Input checks shared by both backends, so both refuse exactly the same inputs.

use crate::error::{StoreError, StoreResult};
use crate::model::{
    Claim, ClaimChange, Filter, IndexFields, LogEntry, LogQuery, MAX_CLAIMS_PER_DOCUMENT,
    MAX_GET_MANY, MAX_ID_BYTES, MAX_IN_VALUES, MAX_TEXT_BYTES, MAX_WRITES_PER_TRANSACTION, Write,
    check_body,
};

fn check_text(what: &str, value: &str, max: usize, allow_empty: bool) -> StoreResult<()> {
    if value.is_empty() && !allow_empty {
        return Err(StoreError::InvalidInput(format!(
            "{what} must not be empty"
        )));
    }
    if value.len() > max {
        return Err(StoreError::InvalidInput(format!(
            "{what} is {} bytes, the limit is {max}",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(StoreError::InvalidInput(format!(
            "{what} must not contain NUL characters"
        )));
    }
    Ok(())
}

/// A document id: 1..=MAX_ID_BYTES bytes, no NUL.
pub(crate) fn check_id(id: &str) -> StoreResult<()> {
    check_text("id", id, MAX_ID_BYTES, false)
}

fn check_expected(expected_version: i64) -> StoreResult<()> {
    if expected_version < 0 {
        return Err(StoreError::InvalidInput(format!(
            "expected_version must be 0 (don't check) or positive, got {expected_version}"
        )));
    }
    Ok(())
}

fn check_index(index: &IndexFields) -> StoreResult<()> {
    for field in crate::model::IndexField::ALL {
        if let Some(v) = field.get(index) {
            check_text(field.column(), v, MAX_TEXT_BYTES, true)?;
        }
    }
    Ok(())
}

fn check_claims(claims: &[Claim]) -> StoreResult<()> {
    if claims.len() > MAX_CLAIMS_PER_DOCUMENT {
        return Err(StoreError::InvalidInput(format!(
            "{} claims, the limit per document is {MAX_CLAIMS_PER_DOCUMENT}",
            claims.len()
        )));
    }
    for c in claims {
        check_text("claim namespace", &c.namespace, MAX_TEXT_BYTES, false)?;
        check_text("claim key", &c.key, MAX_TEXT_BYTES, false)?;
    }
    Ok(())
}

pub(crate) fn check_log_entry(entry: &LogEntry) -> StoreResult<()> {
    check_text("resource_kind", &entry.resource_kind, MAX_TEXT_BYTES, true)?;
    check_text("resource_id", &entry.resource_id, MAX_TEXT_BYTES, true)?;
    check_text("actor", &entry.actor, MAX_TEXT_BYTES, true)?;
    check_text("action", &entry.action, MAX_TEXT_BYTES, true)?;
    check_body(&entry.body)
}

/// Filters: value lengths, no NUL, IN list sizes.
pub(crate) fn check_filters(filters: &[Filter]) -> StoreResult<()> {
    let check_value = |field: &str, v: &str| -> StoreResult<()> {
        check_text(field, v, MAX_TEXT_BYTES, true)
            .map_err(|e| StoreError::InvalidQuery(format!("filter value: {e}")))
    };
    for f in filters {
        match f {
            Filter::Eq(field, v) => check_value(field.column(), v)?,
            Filter::In(field, vs) => {
                if vs.len() > MAX_IN_VALUES {
                    return Err(StoreError::InvalidQuery(format!(
                        "IN filter on {} lists {} values, the limit is {MAX_IN_VALUES}",
                        field.column(),
                        vs.len()
                    )));
                }
                for v in vs {
                    check_value(field.column(), v)?;
                }
            }
            Filter::Missing(_) | Filter::SortKeyAtLeast(_) | Filter::SortKeyBefore(_) => {}
        }
    }
    Ok(())
}

pub(crate) fn check_log_query(q: &LogQuery) -> StoreResult<()> {
    for (what, v) in [
        ("resource_kind", &q.resource_kind),
        ("resource_id", &q.resource_id),
    ] {
        if let Some(v) = v {
            check_text(what, v, MAX_TEXT_BYTES, true)
                .map_err(|e| StoreError::InvalidQuery(e.to_string()))?;
        }
    }
    Ok(())
}

pub(crate) fn check_get_many(ids: &[String]) -> StoreResult<()> {
    if ids.len() > MAX_GET_MANY {
        return Err(StoreError::InvalidQuery(format!(
            "get_many of {} ids, the limit is {MAX_GET_MANY}",
            ids.len()
        )));
    }
    Ok(())
}

/// One write, fully.
pub(crate) fn check_write(w: &Write) -> StoreResult<()> {
    match w {
        Write::Create { doc, claims } => {
            check_id(&doc.id)?;
            check_index(&doc.index)?;
            check_body(&doc.body)?;
            check_claims(claims)
        }
        Write::Update {
            doc,
            expected_version,
            claims,
        } => {
            check_id(&doc.id)?;
            check_expected(*expected_version)?;
            check_index(&doc.index)?;
            check_body(&doc.body)?;
            match claims {
                ClaimChange::Keep => Ok(()),
                ClaimChange::Replace(c) => check_claims(c),
            }
        }
        Write::Delete {
            id,
            expected_version,
            ..
        }
        | Write::Guard {
            id,
            expected_version,
            ..
        } => {
            check_id(id)?;
            check_expected(*expected_version)
        }
        Write::GuardNoneMatch { filters, .. } => {
            check_filters(filters).map_err(|e| StoreError::InvalidInput(e.to_string()))
        }
        Write::Append { entry, .. } => check_log_entry(entry),
    }
}

/// Every write of one transaction.
pub(crate) fn check_writes(writes: &[Write]) -> StoreResult<()> {
    check_total(writes.len())?;
    writes.iter().try_for_each(check_write)
}

/// The size of a whole transaction.
pub(crate) fn check_total(n: usize) -> StoreResult<()> {
    if n > MAX_WRITES_PER_TRANSACTION {
        return Err(StoreError::InvalidInput(format!(
            "{n} writes in one transaction, the limit is {MAX_WRITES_PER_TRANSACTION}"
        )));
    }
    Ok(())
}

/// Claims without duplicates, in a fixed order.
pub(crate) fn dedup_claims(claims: &[Claim]) -> Vec<&Claim> {
    let mut v: Vec<&Claim> = claims.iter().collect();
    v.sort();
    v.dedup();
    v
}
