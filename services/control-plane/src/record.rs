//! One way to change state: a [`Mutation`] collects the document writes, the audit records and
//! the CloudEvents of one operation; [`crate::app::App::commit`] applies the writes and audit
//! records in one store transaction and, only once that has committed, announces the changes on
//! the change feed (one feed entry per commit) and hands the CloudEvents to the sink.
//!
//! So nothing is announced that was not stored, and nothing stored goes unaudited. The feed and
//! the sink are best effort after the commit: watchers re-list after a gap, and the sink retries.

use ccm_proto::v1::{self, ActorKind, AuditRecord, ChangeEvent, ChangeType, ResourceKind};
use ccm_store::{Claim, ClaimChange, Filter, Kind, LogEntry, LogKind, Write};
use chrono::{DateTime, Utc};
use prost::Message;
use prost_reflect::{DeserializeOptions, DynamicMessage, ReflectMessage};

use crate::convert::timestamp_to_proto;
use crate::error::ApiError;
use crate::repo::{Entity, document};

/// Who is doing something, for state history, audit records and event attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `user:<sub>`, `service:<client>`, `system:<component>`, `cloudevent:<source>`.
    pub actor: String,
    /// The kind of actor.
    pub actor_kind: ActorKind,
    /// The gRPC method, when the change comes from a call.
    pub method: String,
    /// The request id, when the change comes from a call.
    pub request_id: String,
    /// The W3C trace id of the call (32 hex digits; the caller's `traceparent`, or the trace
    /// the call started), when the change comes from a served call. Audit records carry it.
    pub trace_id: String,
}

impl Origin {
    /// A person or API client, by subject.
    pub fn user(subject: &str) -> Origin {
        Origin::of(format!("user:{subject}"), ActorKind::User)
    }

    /// The scheduler or the controller (service identity).
    pub fn service(name: &str) -> Origin {
        Origin::of(format!("service:{name}"), ActorKind::Service)
    }

    /// The control plane itself (expiry, seeding).
    pub fn system(component: &str) -> Origin {
        Origin::of(format!("system:{component}"), ActorKind::System)
    }

    /// An external system sending a CloudEvent.
    pub fn external(source: &str) -> Origin {
        Origin::of(format!("cloudevent:{source}"), ActorKind::External)
    }

    fn of(actor: String, actor_kind: ActorKind) -> Origin {
        Origin {
            actor,
            actor_kind,
            method: String::new(),
            request_id: String::new(),
            trace_id: String::new(),
        }
    }

    /// The same origin, inside the call `method` with `request_id`; the trace id is that of
    /// the call being served ([`ccm_runtime::server::current_trace_id`]), if any.
    pub fn in_call(mut self, method: &str, request_id: Option<&str>) -> Origin {
        self.method = method.to_string();
        self.request_id = request_id.unwrap_or_default().to_string();
        self.trace_id = ccm_runtime::server::current_trace_id().unwrap_or_default();
        self
    }
}

/// What an audit record says happened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFacts {
    /// The action, dotted: `instance.create`, `instance.transition`, `worker.drain`, …
    pub action: String,
    /// State before (proto enum value name), if a state changed.
    pub from_state: String,
    /// State after, if a state changed.
    pub to_state: String,
    /// Why.
    pub reason: String,
    /// Anything else worth keeping.
    pub details: Option<prost_types::Struct>,
}

struct Change {
    change_type: ChangeType,
    kind: ResourceKind,
    resource_id: String,
    owner_id: String,
    resource: v1::change_event::Resource,
}

/// The writes, audit records and events of one operation, committed together.
#[derive(Default)]
pub struct Mutation {
    writes: Vec<Write>,
    changes: Vec<Change>,
    events: Vec<ccm_cloudevents::CloudEvent>,
    at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for Mutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mutation")
            .field("writes", &self.writes.len())
            .field("changes", &self.changes.len())
            .field("events", &self.events.len())
            .finish()
    }
}

impl Mutation {
    /// An empty mutation happening at `at` (the time stamped on its change events and audit
    /// records).
    pub fn at(at: DateTime<Utc>) -> Mutation {
        Mutation {
            at: Some(at),
            ..Default::default()
        }
    }

    /// When it happens.
    pub fn time(&self) -> DateTime<Utc> {
        self.at.unwrap_or_else(Utc::now)
    }

    /// `true` when it writes nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Creates `entity` (resource version 1) holding `claims`.
    pub fn create<E: Entity>(
        &mut self,
        entity: &mut E,
        claims: Vec<Claim>,
    ) -> Result<(), ApiError> {
        entity.set_resource_version(1);
        self.writes.push(Write::Create {
            doc: document(entity)?,
            claims,
        });
        self.changed(ChangeType::Added, entity.clone());
        Ok(())
    }

    /// Updates `entity`, conditional on the resource version it was read at (which must be
    /// set: read before you write). Its version becomes the next one.
    pub fn update<E: Entity>(
        &mut self,
        entity: &mut E,
        claims: ClaimChange,
    ) -> Result<(), ApiError> {
        let expected = entity.resource_version();
        if expected <= 0 {
            return Err(ApiError::internal_msg(format!(
                "update of {} {} without a resource version",
                E::TYPE_NAME,
                entity.doc_id()
            )));
        }
        entity.set_resource_version(expected + 1);
        self.writes.push(Write::Update {
            doc: document(entity)?,
            expected_version: expected,
            claims,
        });
        self.changed(ChangeType::Modified, entity.clone());
        Ok(())
    }

    /// Deletes `entity`, conditional on its resource version.
    pub fn delete<E: Entity>(&mut self, entity: &E) {
        self.writes.push(Write::delete(
            E::KIND,
            entity.doc_id(),
            entity.resource_version(),
        ));
        self.changed(ChangeType::Deleted, entity.clone());
    }

    /// Asserts `entity` is still at the version it was read at, without writing it.
    pub fn guard<E: Entity>(&mut self, entity: &E) {
        self.writes.push(Write::guard(
            E::KIND,
            entity.doc_id(),
            entity.resource_version(),
        ));
    }

    /// Asserts that no document of `kind` matches all of `filters`.
    pub fn guard_none(&mut self, kind: Kind, filters: Vec<Filter>) {
        self.writes.push(Write::GuardNoneMatch { kind, filters });
    }

    /// Appends an audit record about `entity`.
    pub fn audit<E: Entity>(&mut self, entity: &E, origin: &Origin, facts: AuditFacts) {
        let record = AuditRecord {
            id: uuid::Uuid::new_v4().to_string(),
            at: Some(timestamp_to_proto(self.time())),
            actor: origin.actor.clone(),
            actor_kind: origin.actor_kind as i32,
            action: facts.action,
            resource_kind: E::RESOURCE as i32,
            resource_id: entity.doc_id(),
            from_state: facts.from_state,
            to_state: facts.to_state,
            reason: facts.reason,
            details: facts.details,
            method: origin.method.clone(),
            trace_id: origin.trace_id.clone(),
        };
        self.append_audit(record);
    }

    /// Appends a prepared audit record.
    pub fn append_audit(&mut self, record: AuditRecord) {
        match audit_entry(&record) {
            Ok(entry) => self.writes.push(Write::append(LogKind::Audit, entry)),
            Err(e) => tracing::error!(error = %e, "audit record could not be encoded"),
        }
    }

    /// Appends a raw entry to a log (scaling decisions).
    pub fn append(&mut self, log: LogKind, entry: LogEntry) {
        self.writes.push(Write::append(log, entry));
    }

    /// Queues a CloudEvent, sent once the mutation has committed.
    pub fn emit(&mut self, event: ccm_cloudevents::CloudEvent) {
        self.events.push(event);
    }

    /// Announces a change of a resource that is not a store document (a scaling decision, kept
    /// in its log) on the change feed with the rest of the mutation.
    pub fn announce(
        &mut self,
        change_type: ChangeType,
        kind: ResourceKind,
        resource_id: impl Into<String>,
        resource: v1::change_event::Resource,
    ) {
        self.changes.push(Change {
            change_type,
            kind,
            resource_id: resource_id.into(),
            owner_id: String::new(),
            resource,
        });
    }

    fn changed<E: Entity>(&mut self, change_type: ChangeType, entity: E) {
        self.changes.push(Change {
            change_type,
            kind: E::RESOURCE,
            resource_id: entity.doc_id(),
            owner_id: entity.owner_id().to_string(),
            resource: entity.into_resource(),
        });
    }

    /// Splits the mutation for [`crate::app::App::commit`].
    pub(crate) fn into_parts(self) -> (Vec<Write>, FeedBatch, Vec<ccm_cloudevents::CloudEvent>) {
        let at = self.time();
        let batch = FeedBatch(
            self.changes
                .into_iter()
                .map(|c| ChangeEvent {
                    revision: 0,
                    kind: c.kind as i32,
                    r#type: c.change_type as i32,
                    resource_id: c.resource_id,
                    owner_id: c.owner_id,
                    at: Some(timestamp_to_proto(at)),
                    resource: Some(c.resource),
                })
                .collect(),
        );
        (self.writes, batch, self.events)
    }
}

/// The change events of one commit: one feed entry, length-delimited `ChangeEvent`s.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FeedBatch(pub Vec<ChangeEvent>);

impl FeedBatch {
    /// Encodes the batch as one feed payload.
    pub fn encode(&self) -> bytes::Bytes {
        let mut buf = Vec::new();
        for change in &self.0 {
            // Writing into a Vec cannot run out of space.
            let _ = change.encode_length_delimited(&mut buf);
        }
        buf.into()
    }

    /// Decodes a feed payload, stamping every change with the feed `revision`.
    pub fn decode(payload: &[u8], revision: u64) -> Result<FeedBatch, prost::DecodeError> {
        let mut buf = payload;
        let mut changes = Vec::new();
        while !buf.is_empty() {
            let mut change = ChangeEvent::decode_length_delimited(&mut buf)?;
            change.revision = i64::try_from(revision).unwrap_or(i64::MAX);
            changes.push(change);
        }
        Ok(FeedBatch(changes))
    }

    /// `true` when the commit changed no document.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The log entry an audit record is stored as (its body is the record's canonical JSON).
pub fn audit_entry(record: &AuditRecord) -> Result<LogEntry, ApiError> {
    let text = serde_json::to_string(&record.transcode_to_dynamic())
        .map_err(|e| ApiError::internal("encoding an audit record", e))?;
    let body = ccm_store::Body::from_json_text(text)
        .map_err(|e| ApiError::internal("encoding an audit record", e))?;
    let id = uuid::Uuid::parse_str(&record.id).unwrap_or_else(|_| uuid::Uuid::new_v4());
    let at = record
        .at
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_else(Utc::now);
    let kind = ResourceKind::try_from(record.resource_kind)
        .map(|k| k.as_str_name())
        .unwrap_or("RESOURCE_KIND_UNSPECIFIED");
    Ok(LogEntry {
        id,
        at: ccm_store::truncate_to_millis(at),
        resource_kind: kind.to_string(),
        resource_id: record.resource_id.clone(),
        actor: record.actor.clone(),
        action: record.action.clone(),
        body,
    })
}

/// The audit record a log entry holds.
pub fn audit_from_entry(entry: &LogEntry) -> Result<AuditRecord, ApiError> {
    let descriptor = AuditRecord::default().descriptor();
    let mut de = serde_json::Deserializer::from_str(entry.body.as_str());
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    DynamicMessage::deserialize_with_options(descriptor, &mut de, &options)
        .and_then(|d| {
            d.transcode_to::<AuditRecord>()
                .map_err(serde::de::Error::custom)
        })
        .map_err(|e| ApiError::internal(format!("reading audit record {}", entry.id), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccm_proto::v1::LabletInstance;

    #[test]
    fn feed_batches_round_trip_and_take_the_feed_revision() {
        let mut m = Mutation::at(Utc::now());
        let mut a = LabletInstance {
            id: "a".into(),
            owner_id: "alice".into(),
            ..Default::default()
        };
        let mut b = LabletInstance {
            id: "b".into(),
            resource_version: 4,
            ..Default::default()
        };
        m.create(&mut a, vec![]).expect("encodes");
        m.update(&mut b, ClaimChange::Keep).expect("encodes");
        assert_eq!((a.resource_version, b.resource_version), (1, 5));
        let (writes, batch, _) = m.into_parts();
        assert_eq!(writes.len(), 2);
        let back = FeedBatch::decode(&batch.encode(), 42).expect("decodes");
        assert_eq!(back.0.len(), 2);
        assert!(back.0.iter().all(|c| c.revision == 42));
        assert_eq!(back.0[0].owner_id, "alice");
        assert_eq!(back.0[1].r#type, ChangeType::Modified as i32);
        assert!(FeedBatch::decode(&[0xff, 0xff], 1).is_err());
    }

    #[test]
    fn update_without_a_read_version_is_refused() {
        let mut m = Mutation::default();
        let mut i = LabletInstance::default();
        assert!(m.update(&mut i, ClaimChange::Keep).is_err());
        assert!(m.is_empty());
    }

    #[test]
    fn audit_records_round_trip_through_log_entries() {
        let mut m = Mutation::at(Utc::now());
        let i = LabletInstance {
            id: "i-1".into(),
            ..Default::default()
        };
        m.audit(
            &i,
            &Origin::user("alice").in_call("/ccm.v1.InstanceService/CreateInstance", Some("r1")),
            AuditFacts {
                action: "instance.create".into(),
                to_state: "INSTANCE_STATE_PENDING".into(),
                reason: "booked".into(),
                ..Default::default()
            },
        );
        let (writes, _, _) = m.into_parts();
        let Some(Write::Append { entry, .. }) = writes.first() else {
            panic!("an append");
        };
        assert_eq!(entry.resource_kind, "RESOURCE_KIND_INSTANCE");
        assert_eq!(entry.actor, "user:alice");
        let record = audit_from_entry(entry).expect("decodes");
        assert_eq!(record.action, "instance.create");
        assert_eq!(record.method, "/ccm.v1.InstanceService/CreateInstance");
        assert_eq!(
            record.trace_id, "",
            "outside a served call there is no trace id (the request id is not one)"
        );
        assert_eq!(record.id, entry.id.to_string());
    }
}
