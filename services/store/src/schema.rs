//! The secondary indexes of each document collection/table, shared by both backends.
//!
//! domain.md §7 adapted to the index fields. MongoDB builds its indexes from this list
//! (plus `{seq, _id}` on every collection, since it has no row id, and `_id` appended where an
//! index ends with `seq`); SQLite's migration scripts create the same ones by name, and a test
//! checks that they match.

use crate::model::Kind;

/// `(name, columns)` of the secondary indexes of `kind`'s table / collection.
pub(crate) fn document_indexes(kind: Kind) -> &'static [(&'static str, &'static [&'static str])] {
    match kind {
        Kind::Definition => &[
            ("by_name_version", &["name", "version_key"]),
            ("by_version", &["ord_version", "seq"]),
        ],
        Kind::Instance => &[
            ("by_state_slot", &["state", "ord_sort"]),
            ("by_worker_state", &["worker_id", "state"]),
            ("by_definition", &["definition_id"]),
            ("by_owner", &["owner_id"]),
            ("by_slot", &["ord_sort", "seq"]),
        ],
        Kind::Worker => &[
            ("by_state_template", &["state", "template_name"]),
            ("by_template", &["template_name"]),
            ("by_name", &["name"]),
        ],
        Kind::Template => &[("by_name", &["name"])],
        Kind::WorkerOperation => &[("by_worker_state", &["worker_id", "state"])],
    }
}

/// `(name, columns)` of the secondary indexes of every log.
pub(crate) const LOG_INDEXES: &[(&str, &[&str])] = &[
    ("by_time", &["at", "id"]),
    ("by_resource", &["resource_kind", "resource_id", "at", "id"]),
];
