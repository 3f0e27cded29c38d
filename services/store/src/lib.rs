//! # ccm-store — the source of truth of ccm
//!
//! The [`Store`] trait and its two implementations:
//!
//! | implementation | used for |
//! |---|---|
//! | [`SqliteStore`] | the embedded default: one file in the data directory, or in memory for tests |
//! | [`MongoStore`] | production: a MongoDB replica set (transactions need one) |
//!
//! The control plane is the only writer. It stores its entities (canonical proto3 JSON) as
//! opaque [`Body`]s of a [`Kind`], with a few [`IndexFields`] it sets for queries. Every write
//! is conditional and transactional ([`Write`], [`Store::apply`], [`Store::apply_each`]):
//! optimistic concurrency on `resource_version`, unique [`Claim`]s (names, ports), guards, and
//! appends to the append-only [`LogKind`] logs in the same transaction.
//!
//! One conformance suite (module `conformance`, feature `conformance`) runs against both backends:
//! SQLite always, MongoDB whenever `CCM_TEST_MONGO_URI` points at a replica set.
//!
//! See `docs/store.md` for the schema, the semantics and how to run the MongoDB suite.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod model;
pub mod mongo;
mod schema;
pub mod sqlite;
mod store;
mod token;
mod validate;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use error::{StoreError, StoreResult};
pub use model::*;
pub use mongo::MongoStore;

pub use sqlite::SqliteStore;
pub use store::Store;
