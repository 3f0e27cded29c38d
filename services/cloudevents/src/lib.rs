//! # ccm-cloudevents — CloudEvents 1.0 for ccm
//!
//! ccm emits a CloudEvent for every instance, worker and scaling transition (ARCHITECTURE.md
//! §7, domain.md §8) and consumes the assessment and grading platforms' events at
//! `POST /v1/events`. This crate holds everything about the events themselves, none of the
//! decisions:
//!
//! | module | what |
//! |---|---|
//! | [`event`] | [`CloudEvent`] with validation, the JSON format (structured and batch) |
//! | [`http`] | the HTTP binding: structured, batch and binary (`ce-*` headers) modes |
//! | [`sink`] | [`HttpSink`]: non-blocking publishing with a bounded queue, retry and backoff |
//! | [`catalog`] | ccm's event types per state and scaling action, [`EventFactory`] |
//!
//! Publishing never holds up a state change: [`SinkHandle::publish`] is a `try_send` into a
//! bounded queue (full → the event is dropped and counted) and a background task delivers
//! in order with exponential backoff. Without a sink URL, publishing is skipped.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod catalog;
mod error;
pub mod event;
pub mod http;
pub mod sink;

pub use catalog::{
    DEFAULT_SOURCE, EventFactory, ScalingPhase, event_type_for_instance_state,
    event_type_for_scaling, event_type_for_worker_state, event_type_for_worker_transition,
};
pub use error::CloudEventError;
pub use event::{CloudEvent, Data, JSON_CONTENT_TYPE, SPEC_VERSION};
pub use sink::{
    DeadLetterFn, EventSink, HttpSink, MemorySink, PublishOutcome, SinkConfig, SinkHandle,
    SinkStats,
};
