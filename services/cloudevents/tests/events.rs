//! The envelope, its JSON format, the HTTP binding and the catalog.

use bytes::Bytes;
use ccm_cloudevents::catalog::{self, ScalingPhase};
use ccm_cloudevents::event::{from_json_batch, to_json_batch};
use ccm_cloudevents::http::{
    BATCH_CONTENT_TYPE, Mode, STRUCTURED_CONTENT_TYPE, decode_binary, decode_request, detect_mode,
    encode_binary, encode_structured,
};
use ccm_cloudevents::{CloudEvent, CloudEventError, Data, EventFactory};
use ccm_core::autoscale::ScalingAction;
use ccm_core::model::{InstanceState, WorkerState};
use chrono::{TimeZone, Utc};
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use serde_json::json;

fn full_event() -> CloudEvent {
    CloudEvent::new("evt-1", "ccm/control-plane", "ccm.lablet.instance.running")
        .with_subject("inst-42")
        .with_time(Utc.with_ymd_and_hms(2026, 1, 15, 10, 30, 0).unwrap())
        .with_json(json!({
            "instance_id": "inst-42",
            "worker_id": "w-1",
            "allocated_ports": {"serial_1": 5041, "vnc_1": 5044},
            "note": "ünïcødé"
        }))
        .with_extension(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    map
}

// ---------------------------------------------------------------------------------------------
// JSON format
// ---------------------------------------------------------------------------------------------

#[test]
fn json_round_trip_keeps_every_attribute() {
    let event = full_event();
    let bytes = event.to_json().unwrap();
    let back = CloudEvent::from_json(&bytes).unwrap();
    assert_eq!(back, event);

    // The wire form is the CloudEvents JSON format.
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(value["specversion"], "1.0");
    assert_eq!(value["type"], "ccm.lablet.instance.running");
    assert_eq!(value["time"], "2026-01-15T10:30:00Z");
    assert_eq!(value["datacontenttype"], "application/json");
    assert_eq!(value["data"]["allocated_ports"]["serial_1"], 5041);
    assert_eq!(
        value["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert!(value.get("data_base64").is_none());
    assert!(value.get("dataschema").is_none());

    // serde uses the same format.
    let via_serde: CloudEvent =
        serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
    assert_eq!(via_serde, event);
}

#[test]
fn json_binary_and_text_payloads() {
    let binary = CloudEvent::new("b", "src", "t").with_data(
        "application/octet-stream",
        Data::Binary(Bytes::from_static(&[0, 1, 2, 255])),
    );
    let value = binary.to_json_value();
    assert_eq!(value["data_base64"], "AAEC/w==");
    assert!(value.get("data").is_none());
    assert_eq!(
        CloudEvent::from_json(&binary.to_json().unwrap()).unwrap(),
        binary
    );

    let text = CloudEvent::new("t", "src", "t").with_data("text/plain", Data::Text("hello".into()));
    assert_eq!(text.to_json_value()["data"], "hello");
    assert_eq!(
        CloudEvent::from_json(&text.to_json().unwrap()).unwrap(),
        text
    );

    // No datacontenttype: data is JSON.
    let bare = CloudEvent::from_json(
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":"x"}"#,
    )
    .unwrap();
    assert_eq!(bare.data, Some(Data::Json(json!("x"))));
    // No data at all.
    let empty = CloudEvent::from_json(br#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#)
        .unwrap();
    assert_eq!(empty.data, None);
}

#[test]
fn json_extension_values_are_canonical_strings() {
    let event = CloudEvent::from_json(
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t",
             "partitionkey":"p","sequence":42,"sampled":true,"nothing":null}"#,
    )
    .unwrap();
    assert_eq!(
        event.extensions.get("partitionkey").map(String::as_str),
        Some("p")
    );
    assert_eq!(
        event.extensions.get("sequence").map(String::as_str),
        Some("42")
    );
    assert_eq!(
        event.extensions.get("sampled").map(String::as_str),
        Some("true")
    );
    assert!(!event.extensions.contains_key("nothing"));

    let err = CloudEvent::from_json(
        br#"{"specversion":"1.0","id":"1","source":"s","type":"t","ratio":0.5}"#,
    )
    .unwrap_err();
    assert!(
        matches!(err, CloudEventError::InvalidAttribute { ref name, .. } if name == "ratio"),
        "{err:?}"
    );
}

#[test]
fn json_decode_errors() {
    type Check = fn(&CloudEventError) -> bool;
    let cases: &[(&[u8], Check)] = &[
        (b"not json", |e| matches!(e, CloudEventError::Malformed(_))),
        (b"[1,2]", |e| matches!(e, CloudEventError::Malformed(_))),
        (br#"{"id":"1","source":"s","type":"t"}"#, |e| {
            matches!(e, CloudEventError::MissingAttribute(a) if a == "specversion")
        }),
        (br#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#, |e| {
            matches!(e, CloudEventError::UnsupportedSpecVersion(v) if v == "0.3")
        }),
        (br#"{"specversion":"1.0","source":"s","type":"t"}"#, |e| {
            matches!(e, CloudEventError::MissingAttribute(a) if a == "id")
        }),
        (br#"{"specversion":"1.0","id":"1","type":"t"}"#, |e| {
            matches!(e, CloudEventError::MissingAttribute(a) if a == "source")
        }),
        (br#"{"specversion":"1.0","id":"1","source":"s"}"#, |e| {
            matches!(e, CloudEventError::MissingAttribute(a) if a == "type")
        }),
        (br#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#, |e| {
            matches!(e, CloudEventError::MissingAttribute(a) if a == "id")
        }),
        (br#"{"specversion":"1.0","id":7,"source":"s","type":"t"}"#, |e| {
            matches!(e, CloudEventError::InvalidAttribute { name, .. } if name == "id")
        }),
        (br#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#, |e| {
            matches!(e, CloudEventError::InvalidAttribute { name, .. } if name == "time")
        }),
        (br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data_base64":"AA=="}"#, |e| {
            matches!(e, CloudEventError::Malformed(_))
        }),
        (br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"!!"}"#, |e| {
            matches!(e, CloudEventError::Malformed(_))
        }),
        (br#"{"specversion":"1.0","id":"1","source":"s","type":"t","Bad-Name":"x"}"#, |e| {
            matches!(e, CloudEventError::InvalidAttribute { name, .. } if name == "Bad-Name")
        }),
        (br#"{"specversion":"1.0","id":"1","source":"has space","type":"t"}"#, |e| {
            matches!(e, CloudEventError::InvalidAttribute { name, .. } if name == "source")
        }),
        (br#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"json"}"#, |e| {
            matches!(e, CloudEventError::InvalidAttribute { name, .. } if name == "datacontenttype")
        }),
    ];
    for (input, check) in cases {
        let err = CloudEvent::from_json(input).unwrap_err();
        assert!(check(&err), "{}: {err:?}", String::from_utf8_lossy(input));
    }
}

#[test]
fn validation_rejects_bad_events_on_encode() {
    let mut event = full_event();
    event.specversion = "2.0".into();
    assert!(matches!(
        event.to_json(),
        Err(CloudEventError::UnsupportedSpecVersion(_))
    ));

    let event = full_event().with_extension("data", "x");
    assert!(matches!(
        event.validate(),
        Err(CloudEventError::InvalidAttribute { .. })
    ));
    let event = full_event().with_extension("UPPER", "x");
    assert!(matches!(
        event.validate(),
        Err(CloudEventError::InvalidAttribute { .. })
    ));
    let mut event = full_event();
    event.subject = Some(String::new());
    assert!(matches!(
        event.validate(),
        Err(CloudEventError::InvalidAttribute { .. })
    ));
    let mut event = full_event();
    event.event_type.clear();
    assert!(matches!(event.validate(), Err(CloudEventError::MissingAttribute(a)) if a == "type"));
    full_event().validate().unwrap();
}

#[test]
fn batch_round_trip_and_errors() {
    let events = vec![
        full_event(),
        CloudEvent::new("2", "s", "t"),
        CloudEvent::new("3", "s", "t").with_data("text/plain", Data::Text("x".into())),
    ];
    let bytes = to_json_batch(&events).unwrap();
    assert_eq!(from_json_batch(&bytes).unwrap(), events);
    assert_eq!(from_json_batch(b"[]").unwrap(), vec![]);
    assert!(matches!(
        from_json_batch(b"{}"),
        Err(CloudEventError::Malformed(_))
    ));
    let err = from_json_batch(br#"[{"specversion":"1.0","id":"1","source":"s","type":"t"}, 5]"#)
        .unwrap_err();
    assert!(
        matches!(&err, CloudEventError::Malformed(m) if m.contains("item 1")),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP binding
// ---------------------------------------------------------------------------------------------

#[test]
fn binary_mode_decode() {
    let h = headers(&[
        ("ce-specversion", "1.0"),
        ("ce-id", "a-1"),
        ("ce-source", "assessment/collector"),
        ("ce-type", "assessment.collection.completed"),
        ("ce-subject", "inst-42"),
        ("ce-time", "2026-01-15T10:30:00.5+01:00"),
        ("ce-traceparent", "00-abc-def-01"),
        ("ce-comment", "caf%C3%A9%20au%20lait"),
        ("content-type", "application/json; charset=utf-8"),
        ("x-other", "ignored"),
    ]);
    let body = br#"{"instance_id":"inst-42","collection_id":"c-9","artifacts_uri":"s3://r/c-9"}"#;
    assert_eq!(detect_mode(&h), Some(Mode::Binary));
    let events = decode_request(&h, body).unwrap();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.id, "a-1");
    assert_eq!(e.source, "assessment/collector");
    assert_eq!(e.event_type, catalog::ASSESSMENT_COLLECTION_COMPLETED);
    assert_eq!(e.subject.as_deref(), Some("inst-42"));
    assert_eq!(
        e.time.unwrap(),
        Utc.with_ymd_and_hms(2026, 1, 15, 9, 30, 0).unwrap() + chrono::Duration::milliseconds(500)
    );
    assert_eq!(
        e.datacontenttype.as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        e.data,
        Some(Data::Json(json!({
            "instance_id": "inst-42", "collection_id": "c-9", "artifacts_uri": "s3://r/c-9"
        })))
    );
    assert_eq!(
        e.extensions.get("traceparent").map(String::as_str),
        Some("00-abc-def-01")
    );
    assert_eq!(
        e.extensions.get("comment").map(String::as_str),
        Some("café au lait")
    );
    assert!(!e.extensions.contains_key("other"));
}

#[test]
fn binary_mode_payload_kinds() {
    let base = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "s"),
        ("ce-type", "t"),
    ];
    let with = |extra: &[(&str, &str)]| {
        let mut all = base.to_vec();
        all.extend_from_slice(extra);
        headers(&all)
    };
    let e = decode_binary(&with(&[("content-type", "text/plain")]), b"hello").unwrap();
    assert_eq!(e.data, Some(Data::Text("hello".into())));
    let e = decode_binary(
        &with(&[("content-type", "application/octet-stream")]),
        &[1, 2],
    )
    .unwrap();
    assert_eq!(e.data, Some(Data::Binary(Bytes::from_static(&[1, 2]))));
    let e = decode_binary(&with(&[]), b"").unwrap();
    assert_eq!(e.data, None);
    assert_eq!(e.datacontenttype, None);
    let e = decode_binary(
        &with(&[("content-type", "application/cloudevents-x+json")]),
        b"[1]",
    )
    .unwrap();
    assert_eq!(e.data, Some(Data::Json(json!([1]))));
}

#[test]
fn binary_mode_errors() {
    let ok = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "s"),
        ("ce-type", "t"),
    ];
    let without = |skip: &str| {
        headers(
            &ok.iter()
                .copied()
                .filter(|(k, _)| *k != skip)
                .collect::<Vec<_>>(),
        )
    };
    assert!(
        matches!(decode_binary(&without("ce-id"), b""), Err(CloudEventError::MissingAttribute(a)) if a == "id")
    );
    assert!(
        matches!(decode_binary(&without("ce-source"), b""), Err(CloudEventError::MissingAttribute(a)) if a == "source")
    );
    assert!(
        matches!(decode_binary(&without("ce-type"), b""), Err(CloudEventError::MissingAttribute(a)) if a == "type")
    );
    assert!(
        matches!(decode_binary(&without("ce-specversion"), b""), Err(CloudEventError::MissingAttribute(a)) if a == "specversion")
    );

    let mut h = headers(&ok);
    h.insert("ce-specversion", "0.3".parse().unwrap());
    assert!(matches!(
        decode_binary(&h, b""),
        Err(CloudEventError::UnsupportedSpecVersion(_))
    ));

    let mut h = headers(&ok);
    h.insert("content-type", "application/json".parse().unwrap());
    assert!(matches!(
        decode_binary(&h, b"{not json"),
        Err(CloudEventError::Malformed(_))
    ));

    let mut h = headers(&ok);
    h.insert("ce-time", "not-a-time".parse().unwrap());
    assert!(
        matches!(decode_binary(&h, b""), Err(CloudEventError::InvalidAttribute { name, .. }) if name == "time")
    );

    let mut h = headers(&ok);
    h.insert("ce-bad_name", "x".parse().unwrap());
    assert!(matches!(
        decode_binary(&h, b""),
        Err(CloudEventError::InvalidAttribute { .. })
    ));

    let mut h = headers(&ok);
    h.insert("ce-datacontenttype", "text/plain".parse().unwrap());
    assert!(matches!(
        decode_binary(&h, b""),
        Err(CloudEventError::InvalidAttribute { .. })
    ));

    let mut h = headers(&ok);
    h.insert("ce-comment", "bad%zzescape".parse().unwrap());
    assert!(matches!(
        decode_binary(&h, b""),
        Err(CloudEventError::InvalidAttribute { .. })
    ));

    let mut h = headers(&ok);
    h.insert("content-type", "text/plain".parse().unwrap());
    assert!(matches!(
        decode_binary(&h, &[0xff, 0xfe]),
        Err(CloudEventError::Malformed(_))
    ));
}

#[test]
fn binary_encode_decode_round_trip() {
    let mut event = full_event().with_extension("comment", "spaces and \"quotes\" 100% ünï");
    event.dataschema = Some("https://schemas.example/ccm/running.json".into());
    let (h, body) = encode_binary(&event).unwrap();
    assert_eq!(h.get("ce-id").unwrap(), "evt-1");
    assert_eq!(h.get(CONTENT_TYPE).unwrap(), "application/json");
    assert!(
        h.get("ce-comment")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("%20")
    );
    assert_eq!(decode_binary(&h, &body).unwrap(), event);

    let binary = CloudEvent::new("b", "s", "t").with_data(
        "application/octet-stream",
        Data::Binary(Bytes::from_static(b"\x00\x01")),
    );
    let (h, body) = encode_binary(&binary).unwrap();
    assert_eq!(decode_binary(&h, &body).unwrap(), binary);
}

#[test]
fn structured_and_batch_requests_decode() {
    let event = full_event();
    let (h, body) = encode_structured(&event).unwrap();
    assert_eq!(h.get(CONTENT_TYPE).unwrap(), STRUCTURED_CONTENT_TYPE);
    assert_eq!(detect_mode(&h), Some(Mode::Structured));
    assert_eq!(decode_request(&h, &body).unwrap(), vec![event.clone()]);

    // Parameters and case in the content type are tolerated.
    let h = headers(&[(
        "content-type",
        "Application/CloudEvents+JSON; charset=utf-8",
    )]);
    assert_eq!(decode_request(&h, &body).unwrap(), vec![event.clone()]);

    let h = headers(&[("content-type", BATCH_CONTENT_TYPE)]);
    let batch = to_json_batch(&[event.clone(), CloudEvent::new("2", "s", "t")]).unwrap();
    assert_eq!(detect_mode(&h), Some(Mode::Batch));
    assert_eq!(decode_request(&h, &batch).unwrap().len(), 2);
}

#[test]
fn non_cloudevent_requests_are_refused() {
    for h in [
        headers(&[("content-type", "application/json")]),
        headers(&[]),
        headers(&[("content-type", "application/cloudevents+avro")]),
    ] {
        assert_eq!(detect_mode(&h), None);
        let err = decode_request(&h, b"{}").unwrap_err();
        assert!(matches!(err, CloudEventError::NotACloudEvent(_)), "{err:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// catalog
// ---------------------------------------------------------------------------------------------

#[test]
fn instance_event_types_cover_every_state() {
    let expected = [
        (InstanceState::Pending, "ccm.lablet.instance.pending"),
        (InstanceState::Scheduled, "ccm.lablet.instance.scheduled"),
        (
            InstanceState::Instantiating,
            "ccm.lablet.instance.provisioning.started",
        ),
        (InstanceState::Running, "ccm.lablet.instance.running"),
        (
            InstanceState::Collecting,
            "ccm.lablet.instance.collecting.started",
        ),
        (
            InstanceState::Grading,
            "ccm.lablet.instance.grading.started",
        ),
        (InstanceState::Stopping, "ccm.lablet.instance.stopping"),
        (InstanceState::Stopped, "ccm.lablet.instance.stopped"),
        (InstanceState::Archived, "ccm.lablet.instance.archived"),
        (InstanceState::Terminated, "ccm.lablet.instance.terminated"),
    ];
    assert_eq!(expected.len(), InstanceState::ALL.len());
    for (state, ty) in expected {
        assert_eq!(ccm_cloudevents::event_type_for_instance_state(state), ty);
    }
}

#[test]
fn worker_event_types_are_distinct_and_drain_cancel_is_special() {
    let types: std::collections::BTreeSet<_> = WorkerState::ALL
        .iter()
        .map(|s| ccm_cloudevents::event_type_for_worker_state(*s))
        .collect();
    assert_eq!(types.len(), WorkerState::ALL.len());
    assert!(types.iter().all(|t| t.starts_with("ccm.worker.")));
    assert_eq!(
        ccm_cloudevents::event_type_for_worker_state(WorkerState::Provisioning),
        "ccm.worker.provisioning.started"
    );
    assert_eq!(
        ccm_cloudevents::event_type_for_worker_transition(
            WorkerState::Draining,
            WorkerState::Running
        ),
        "ccm.worker.drain.cancelled"
    );
    assert_eq!(
        ccm_cloudevents::event_type_for_worker_transition(
            WorkerState::Provisioning,
            WorkerState::Running
        ),
        "ccm.worker.running"
    );
}

#[test]
fn scaling_event_types() {
    use ccm_cloudevents::event_type_for_scaling as ty;
    assert_eq!(
        ty(ScalingAction::ScaleUp, ScalingPhase::Requested),
        "ccm.scaling.up.requested"
    );
    assert_eq!(
        ty(ScalingAction::RestartStopped, ScalingPhase::Completed),
        "ccm.scaling.up.completed"
    );
    for action in [
        ScalingAction::Drain,
        ScalingAction::Stop,
        ScalingAction::ForceStop,
        ScalingAction::Terminate,
    ] {
        assert_eq!(
            ty(action, ScalingPhase::Requested),
            "ccm.scaling.down.requested"
        );
        assert_eq!(
            ty(action, ScalingPhase::Completed),
            "ccm.scaling.down.completed"
        );
    }
    assert_eq!(
        ty(ScalingAction::Wait, ScalingPhase::Requested),
        "ccm.scaling.wait"
    );
}

#[test]
fn factory_stamps_source_subject_time_and_unique_ids() {
    let at = Utc.with_ymd_and_hms(2026, 1, 16, 8, 0, 0).unwrap();
    let factory = EventFactory::new("ccm/controller");
    let a = factory.instance_state(
        "inst-1",
        InstanceState::Scheduled,
        json!({"worker_id": "w-1"}),
        at,
    );
    let b = factory.instance_state("inst-1", InstanceState::Scheduled, json!({}), at);
    a.validate().unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(a.source, "ccm/controller");
    assert_eq!(a.subject.as_deref(), Some("inst-1"));
    assert_eq!(a.time, Some(at));
    assert_eq!(a.event_type, "ccm.lablet.instance.scheduled");
    assert_eq!(a.datacontenttype.as_deref(), Some("application/json"));
    assert_eq!(a.data, Some(Data::Json(json!({"worker_id": "w-1"}))));

    let w = factory.worker_transition(
        "w-1",
        WorkerState::Draining,
        WorkerState::Running,
        json!({}),
        at,
    );
    assert_eq!(w.event_type, "ccm.worker.drain.cancelled");
    let s = factory.scaling(
        "tmpl-a",
        ScalingAction::ScaleUp,
        ScalingPhase::Requested,
        json!({"count": 2}),
        at,
    );
    assert_eq!(s.event_type, "ccm.scaling.up.requested");
    assert_eq!(
        EventFactory::default().source(),
        ccm_cloudevents::DEFAULT_SOURCE
    );
    assert_eq!(ccm_cloudevents::DEFAULT_SOURCE, "ccm/control-plane");
}
