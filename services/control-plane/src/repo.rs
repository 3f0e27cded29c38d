//! Typed access to the store: the control plane's entities (the `ccm.v1` messages) as store
//! documents.
//!
//! Each entity is kept as its canonical proto3 JSON (the same form the HTTP API shows, readable
//! in MongoDB and in the SQLite file), with a handful of index fields the queries filter on. The
//! store owns `resource_version`: it is written into the body on every write
//! ([`crate::record::Mutation`] sets the version the write will produce) and copied from the
//! document on every read, so the two always agree.

use ccm_proto::v1::{
    self, CmlWorker, LabletDefinition, LabletInstance, WorkerOperation, WorkerTemplate,
    change_event::Resource,
};
use ccm_store::{Body, Document, DocumentData, IndexFields, Kind};
use prost_reflect::{DeserializeOptions, DynamicMessage, ReflectMessage};

use crate::error::ApiError;

/// A `ccm.v1` message the control plane stores as a document.
pub trait Entity:
    ReflectMessage + prost::Message + Default + Clone + Send + Sync + 'static
{
    /// The store kind.
    const KIND: Kind;
    /// The kind in change events and audit records.
    const RESOURCE: v1::ResourceKind;
    /// Its name in error details (`google.rpc.ResourceInfo.resource_type`).
    const TYPE_NAME: &'static str;

    /// The document id.
    fn doc_id(&self) -> String;
    /// The stored resource version (0 before the first write).
    fn resource_version(&self) -> i64;
    /// Sets the resource version.
    fn set_resource_version(&mut self, version: i64);
    /// The index fields the store filters on.
    fn index(&self) -> IndexFields;
    /// The owner (JWT `sub`) for owner-scoped watches and reads; empty when none.
    fn owner_id(&self) -> &str {
        ""
    }
    /// The change-event form.
    fn into_resource(self) -> Resource;
}

/// Serialises an entity to its stored body (canonical proto3 JSON).
pub fn encode<E: Entity>(entity: &E) -> Result<Body, ApiError> {
    let dynamic = entity.transcode_to_dynamic();
    let text = serde_json::to_string(&dynamic)
        .map_err(|e| ApiError::internal(format!("encoding a {}", E::TYPE_NAME), e))?;
    Body::from_json_text(text)
        .map_err(|e| ApiError::internal(format!("storing a {}", E::TYPE_NAME), e))
}

/// Reads an entity back from its document, taking the resource version from the store.
///
/// Unknown fields are ignored, so a document written by a newer build still reads.
pub fn decode<E: Entity>(doc: &Document) -> Result<E, ApiError> {
    let descriptor = E::default().descriptor();
    let mut de = serde_json::Deserializer::from_str(doc.body.as_str());
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    let dynamic = DynamicMessage::deserialize_with_options(descriptor, &mut de, &options)
        .map_err(|e| ApiError::internal(format!("reading {} {}", E::TYPE_NAME, doc.id), e))?;
    let mut entity: E = dynamic
        .transcode_to()
        .map_err(|e| ApiError::internal(format!("reading {} {}", E::TYPE_NAME, doc.id), e))?;
    entity.set_resource_version(doc.resource_version);
    Ok(entity)
}

/// Most definition versions [`decode_definition`] keeps decoded (the cache is emptied when it
/// would grow past this).
pub const DEFINITION_CACHE_ENTRIES: usize = 4096;

/// Decoded definition versions by document id: the resource version and body they were decoded
/// from, and the result.
type DefinitionCache =
    std::sync::Mutex<std::collections::HashMap<String, (i64, Body, LabletDefinition)>>;

/// [`decode`] for definition versions, remembering what it decoded.
///
/// A definition version's content never changes once created (only its status, which bumps the
/// resource version), and every booking reads one, so the decoded form is kept and reused for as
/// long as the stored document has the same resource version AND the same body. Comparing the
/// body makes the cache exact even when one process talks to several stores (tests) or another
/// replica rewrote the document: a hit is a document byte-for-byte equal to the one decoded.
pub fn decode_definition(doc: &Document) -> Result<LabletDefinition, ApiError> {
    static CACHE: std::sync::LazyLock<DefinitionCache> = std::sync::LazyLock::new(Default::default);
    let lock = || {
        CACHE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some((version, body, definition)) = lock().get(&doc.id)
        && *version == doc.resource_version
        && body.as_str() == doc.body.as_str()
    {
        return Ok(definition.clone());
    }
    let definition: LabletDefinition = decode(doc)?;
    let mut cache = lock();
    if cache.len() >= DEFINITION_CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(
        doc.id.clone(),
        (doc.resource_version, doc.body.clone(), definition.clone()),
    );
    Ok(definition)
}

/// The document an entity is written as.
pub fn document<E: Entity>(entity: &E) -> Result<DocumentData, ApiError> {
    Ok(DocumentData::new(E::KIND, entity.doc_id(), encode(entity)?).with_index(entity.index()))
}

/// Document id of a definition version: `<lineage id>@<version>`.
pub fn definition_doc_id(id: &str, version: &str) -> String {
    format!("{id}@{version}")
}

/// A sortable key for a `MAJOR.MINOR.PATCH` version (zero-padded parts), so the store can order
/// versions numerically.
pub fn version_key(version: &str) -> Option<String> {
    let v: ccm_core::version::Version = version.parse().ok()?;
    Some(format!("{:020}.{:020}.{:020}", v.major, v.minor, v.patch))
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl Entity for LabletDefinition {
    const KIND: Kind = Kind::Definition;
    const RESOURCE: v1::ResourceKind = v1::ResourceKind::Definition;
    const TYPE_NAME: &'static str = "definition";

    fn doc_id(&self) -> String {
        definition_doc_id(&self.id, &self.version)
    }
    fn resource_version(&self) -> i64 {
        self.resource_version
    }
    fn set_resource_version(&mut self, version: i64) {
        self.resource_version = version;
    }
    fn index(&self) -> IndexFields {
        IndexFields {
            name: non_empty(&self.name),
            version_key: version_key(&self.version),
            state: non_empty(self.status().as_str_name()),
            definition_id: non_empty(&self.id),
            ..Default::default()
        }
    }
    fn into_resource(self) -> Resource {
        Resource::Definition(self)
    }
}

impl Entity for LabletInstance {
    const KIND: Kind = Kind::Instance;
    const RESOURCE: v1::ResourceKind = v1::ResourceKind::Instance;
    const TYPE_NAME: &'static str = "instance";

    fn doc_id(&self) -> String {
        self.id.clone()
    }
    fn resource_version(&self) -> i64 {
        self.resource_version
    }
    fn set_resource_version(&mut self, version: i64) {
        self.resource_version = version;
    }
    fn index(&self) -> IndexFields {
        IndexFields {
            name: non_empty(&self.definition_name),
            state: non_empty(self.state().as_str_name()),
            worker_id: non_empty(&self.worker_id),
            owner_id: non_empty(&self.owner_id),
            definition_id: non_empty(&self.definition_id),
            sort_key: self
                .time_slot
                .as_ref()
                .and_then(|s| s.start.as_ref())
                .map(|t| t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000)),
            ..Default::default()
        }
    }
    fn owner_id(&self) -> &str {
        &self.owner_id
    }
    fn into_resource(self) -> Resource {
        Resource::Instance(self)
    }
}

impl Entity for CmlWorker {
    const KIND: Kind = Kind::Worker;
    const RESOURCE: v1::ResourceKind = v1::ResourceKind::Worker;
    const TYPE_NAME: &'static str = "worker";

    fn doc_id(&self) -> String {
        self.id.clone()
    }
    fn resource_version(&self) -> i64 {
        self.resource_version
    }
    fn set_resource_version(&mut self, version: i64) {
        self.resource_version = version;
    }
    fn index(&self) -> IndexFields {
        IndexFields {
            name: non_empty(&self.name),
            state: non_empty(self.state().as_str_name()),
            template_name: non_empty(&self.template_name),
            ..Default::default()
        }
    }
    fn into_resource(self) -> Resource {
        Resource::Worker(self)
    }
}

impl Entity for WorkerTemplate {
    const KIND: Kind = Kind::Template;
    const RESOURCE: v1::ResourceKind = v1::ResourceKind::Template;
    const TYPE_NAME: &'static str = "template";

    fn doc_id(&self) -> String {
        self.name.clone()
    }
    fn resource_version(&self) -> i64 {
        self.resource_version
    }
    fn set_resource_version(&mut self, version: i64) {
        self.resource_version = version;
    }
    fn index(&self) -> IndexFields {
        IndexFields {
            name: non_empty(&self.name),
            template_name: non_empty(&self.name),
            ..Default::default()
        }
    }
    fn into_resource(self) -> Resource {
        Resource::Template(self)
    }
}

impl Entity for WorkerOperation {
    const KIND: Kind = Kind::WorkerOperation;
    const RESOURCE: v1::ResourceKind = v1::ResourceKind::WorkerOperation;
    const TYPE_NAME: &'static str = "worker operation";

    fn doc_id(&self) -> String {
        self.id.clone()
    }
    fn resource_version(&self) -> i64 {
        self.resource_version
    }
    fn set_resource_version(&mut self, version: i64) {
        self.resource_version = version;
    }
    fn index(&self) -> IndexFields {
        IndexFields {
            state: non_empty(self.status().as_str_name()),
            worker_id: non_empty(&self.worker_id),
            // The creation time in epoch milliseconds, negated: `Order::SortKeyAsc` lists
            // operations newest first (ListWorkerOperations) and a `SortKeyBefore` filter finds
            // the ones created after an instant (the refresh rate limit).
            sort_key: self
                .created_at
                .as_ref()
                .map(|t| -(t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000))),
            ..Default::default()
        }
    }
    fn into_resource(self) -> Resource {
        Resource::WorkerOperation(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccm_proto::v1::{InstanceState, TimeSlot};
    use std::collections::HashMap;

    fn stored<E: Entity>(e: &E, version: i64) -> Document {
        let data = document(e).expect("encodes");
        Document {
            kind: data.kind,
            id: data.id,
            index: data.index,
            body: data.body,
            resource_version: version,
            seq: 1,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn an_instance_round_trips_through_its_document_with_the_store_version() {
        let mut i = LabletInstance {
            id: "i-1".into(),
            definition_id: "d-1".into(),
            definition_version: "1.2.3".into(),
            definition_name: "ccna-lab".into(),
            owner_id: "alice".into(),
            worker_id: "w-1".into(),
            allocated_ports: HashMap::from([("serial_1".to_string(), 2001)]),
            time_slot: Some(TimeSlot {
                start: Some(prost_types::Timestamp {
                    seconds: 1_800_000_000,
                    nanos: 5_000_000,
                }),
                end: None,
                asap: false,
            }),
            resource_version: 3,
            ..Default::default()
        };
        i.set_state(InstanceState::Scheduled);
        let doc = stored(&i, 7);
        assert_eq!(doc.index.state.as_deref(), Some("INSTANCE_STATE_SCHEDULED"));
        assert_eq!(doc.index.owner_id.as_deref(), Some("alice"));
        assert_eq!(doc.index.sort_key, Some(1_800_000_000_005));
        assert!(
            doc.body.as_str().contains("\"allocatedPorts\""),
            "canonical JSON names"
        );
        let back: LabletInstance = decode(&doc).expect("decodes");
        assert_eq!(back.resource_version, 7, "the store's version wins");
        assert_eq!(
            LabletInstance {
                resource_version: 3,
                ..back
            },
            i
        );
    }

    #[test]
    fn definition_ids_and_version_keys_sort_numerically() {
        let d = LabletDefinition {
            id: "lineage".into(),
            version: "1.10.0".into(),
            name: "lab".into(),
            ..Default::default()
        };
        assert_eq!(d.doc_id(), "lineage@1.10.0");
        assert!(version_key("1.10.0") > version_key("1.9.12"));
        assert_eq!(version_key("not-a-version"), None);
    }

    #[test]
    fn unknown_fields_in_a_stored_body_are_ignored() {
        let w = CmlWorker {
            id: "w-1".into(),
            name: "worker-1".into(),
            ..Default::default()
        };
        let mut doc = stored(&w, 1);
        doc.body = Body::from_json_text(r#"{"id":"w-1","name":"worker-1","fromTheFuture":true}"#)
            .expect("json object");
        let back: CmlWorker = decode(&doc).expect("decodes");
        assert_eq!(back.name, "worker-1");
    }

    #[test]
    fn a_corrupt_body_is_an_internal_error() {
        let w = CmlWorker::default();
        let mut doc = stored(&w, 1);
        doc.body = Body::from_json_text(r#"{"name":{"not":"a string"}}"#).expect("json object");
        let err = decode::<CmlWorker>(&doc).expect_err("wrong type");
        assert_eq!(err.code(), tonic::Code::Internal);
    }
}
