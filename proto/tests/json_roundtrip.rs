//! Every message type of package `ccm.v1` survives canonical proto3 JSON and
//! the binary wire format unchanged.
//!
//! For each message in the descriptor pool a `DynamicMessage` is built with
//! every field set to a non-default value (recursively, depth-limited;
//! repeated fields with two items, maps with one entry, enums with a non-zero
//! value, well-known types with valid values). One variant is built per oneof
//! member, so every member of every oneof is exercised. Each variant is
//! encoded to JSON with prost-reflect's serde support (default options),
//! parsed back and compared; then the same through the binary encoding. A
//! sample of generated Rust types is also decoded and compared, which checks
//! that the generated code and the descriptors agree.

use std::collections::HashMap;

use ccm_proto::{PACKAGE, descriptor_pool, v1};
use prost::Message;
use prost::bytes::Bytes;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};

/// Message nesting depth after which optional message fields are left unset.
const MAX_DEPTH: usize = 8;

fn set(msg: &mut DynamicMessage, field: &str, value: Value) {
    let desc = msg.descriptor();
    let field = desc
        .get_field_by_name(field)
        .unwrap_or_else(|| panic!("{} has no field {field}", desc.full_name()));
    msg.set_field(&field, value);
}

fn json_value_string(desc: &MessageDescriptor, s: &str) -> DynamicMessage {
    let mut v = DynamicMessage::new(desc.clone());
    set(&mut v, "string_value", Value::String(s.to_owned()));
    v
}

/// Valid, non-default values for the well-known types whose JSON form is
/// special. `None` for every other type.
fn well_known(desc: &MessageDescriptor) -> Option<DynamicMessage> {
    let pool = desc.parent_pool();
    let mut msg = DynamicMessage::new(desc.clone());
    match desc.full_name() {
        "google.protobuf.Timestamp" => {
            set(&mut msg, "seconds", Value::I64(1_700_000_000));
            set(&mut msg, "nanos", Value::I32(123_000_000));
        }
        "google.protobuf.Duration" => {
            set(&mut msg, "seconds", Value::I64(3_600));
            set(&mut msg, "nanos", Value::I32(500_000_000));
        }
        "google.protobuf.FieldMask" => {
            set(
                &mut msg,
                "paths",
                Value::List(vec![
                    Value::String("description".into()),
                    Value::String("capacity.cpu_cores".into()),
                ]),
            );
        }
        "google.protobuf.Value" => {
            let value_desc = desc.clone();
            let struct_desc = pool.get_message_by_name("google.protobuf.Struct")?;
            let list_desc = pool.get_message_by_name("google.protobuf.ListValue")?;
            // {"name": "x", "n": 1.5, "ok": true, "none": null, "list": ["a"]}
            let mut number = DynamicMessage::new(value_desc.clone());
            set(&mut number, "number_value", Value::F64(1.5));
            let mut boolean = DynamicMessage::new(value_desc.clone());
            set(&mut boolean, "bool_value", Value::Bool(true));
            let mut null = DynamicMessage::new(value_desc.clone());
            set(&mut null, "null_value", Value::EnumNumber(0));
            let mut list = DynamicMessage::new(list_desc);
            set(
                &mut list,
                "values",
                Value::List(vec![Value::Message(json_value_string(&value_desc, "a"))]),
            );
            let mut list_value = DynamicMessage::new(value_desc.clone());
            set(&mut list_value, "list_value", Value::Message(list));
            let mut object = DynamicMessage::new(struct_desc);
            let fields: HashMap<MapKey, Value> = [
                ("name", Value::Message(json_value_string(&value_desc, "x"))),
                ("n", Value::Message(number)),
                ("ok", Value::Message(boolean)),
                ("none", Value::Message(null)),
                ("list", Value::Message(list_value)),
            ]
            .into_iter()
            .map(|(k, v)| (MapKey::String(k.to_owned()), v))
            .collect();
            set(&mut object, "fields", Value::Map(fields));
            set(&mut msg, "struct_value", Value::Message(object));
        }
        "google.protobuf.Struct" => {
            let value_desc = pool.get_message_by_name("google.protobuf.Value")?;
            let fields: HashMap<MapKey, Value> = [
                (
                    MapKey::String("k".into()),
                    Value::Message(json_value_string(&value_desc, "v")),
                ),
                (
                    MapKey::String("nested".into()),
                    Value::Message(well_known(&value_desc)?),
                ),
            ]
            .into_iter()
            .collect();
            set(&mut msg, "fields", Value::Map(fields));
        }
        "google.protobuf.ListValue" => {
            let value_desc = pool.get_message_by_name("google.protobuf.Value")?;
            set(
                &mut msg,
                "values",
                Value::List(vec![
                    Value::Message(json_value_string(&value_desc, "a")),
                    Value::Message(well_known(&value_desc)?),
                ]),
            );
        }
        "google.protobuf.Any" => {
            panic!("google.protobuf.Any needs a type registry in JSON; do not use it in ccm.v1")
        }
        _ => return None,
    }
    Some(msg)
}

fn map_key(field: &FieldDescriptor, n: u32) -> MapKey {
    match field.kind() {
        Kind::Bool => MapKey::Bool(true),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => MapKey::I32(10 + n as i32),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(10 + i64::from(n)),
        Kind::Uint32 | Kind::Fixed32 => MapKey::U32(10 + n),
        Kind::Uint64 | Kind::Fixed64 => MapKey::U64(10 + u64::from(n)),
        Kind::String => MapKey::String(format!("key_{n}")),
        other => panic!("invalid map key kind {other:?}"),
    }
}

/// A non-default value of `field`'s kind; `None` when the depth limit stops
/// recursion into a message.
fn scalar(field: &FieldDescriptor, n: u32, depth: usize) -> Option<Value> {
    Some(match field.kind() {
        Kind::Double => Value::F64(1.5 + f64::from(n)),
        Kind::Float => Value::F32(2.5 + n as f32),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(42 + n as i32),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(9_007_199_254_740_993 + i64::from(n))
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(7 + n),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(18_000_000_000_000_000_000 + u64::from(n)),
        Kind::Bool => Value::Bool(true),
        Kind::String => Value::String(format!("{}-{n} ✓ \"quoted\"", field.name())),
        Kind::Bytes => Value::Bytes(Bytes::from(vec![0, 1, 2, 0xff, n as u8])),
        Kind::Enum(e) => {
            let values: Vec<_> = e.values().filter(|v| v.number() != 0).collect();
            assert!(
                !values.is_empty(),
                "enum {} has no non-zero value",
                e.full_name()
            );
            Value::EnumNumber(values[n as usize % values.len()].number())
        }
        Kind::Message(m) => Value::Message(sample(&m, depth + 1, 0)?),
    })
}

/// Builds a message with every field populated. `variant` selects which
/// member of each (non-synthetic) oneof is set: member `variant % len`.
fn sample(desc: &MessageDescriptor, depth: usize, variant: usize) -> Option<DynamicMessage> {
    if let Some(msg) = well_known(desc) {
        return Some(msg);
    }
    if depth > MAX_DEPTH {
        return None;
    }
    let mut msg = DynamicMessage::new(desc.clone());
    for field in desc.fields() {
        if let Some(oneof) = field.containing_oneof()
            && !oneof.is_synthetic()
        {
            let members: Vec<_> = oneof.fields().collect();
            let chosen = &members[variant % members.len()];
            if chosen.number() != field.number() {
                continue;
            }
        }
        let value = if field.is_map() {
            let Kind::Message(entry) = field.kind() else {
                unreachable!("map fields are messages")
            };
            let key = map_key(&entry.map_entry_key_field(), 1);
            let Some(value) = scalar(&entry.map_entry_value_field(), 1, depth) else {
                continue;
            };
            Value::Map(HashMap::from([(key, value)]))
        } else if field.is_list() {
            let items: Vec<Value> = (1..=2).filter_map(|n| scalar(&field, n, depth)).collect();
            if items.is_empty() {
                continue;
            }
            Value::List(items)
        } else {
            match scalar(&field, 1, depth) {
                Some(value) => value,
                None => continue,
            }
        };
        msg.set_field(&field, value);
    }
    Some(msg)
}

fn ccm_messages() -> Vec<MessageDescriptor> {
    descriptor_pool()
        .all_messages()
        .filter(|m| m.package_name() == PACKAGE)
        .collect()
}

fn variants(desc: &MessageDescriptor) -> usize {
    desc.oneofs()
        .filter(|o| !o.is_synthetic())
        .map(|o| o.fields().len())
        .max()
        .unwrap_or(1)
        .max(1)
}

fn check_round_trips(msg: &DynamicMessage) -> Result<(), String> {
    let name = msg.descriptor().full_name().to_owned();
    // Canonical proto3 JSON, default options.
    let json = serde_json::to_string(msg).map_err(|e| format!("{name}: to JSON: {e}"))?;
    let mut de = serde_json::Deserializer::from_str(&json);
    let parsed = DynamicMessage::deserialize(msg.descriptor(), &mut de)
        .map_err(|e| format!("{name}: from JSON {json}: {e}"))?;
    de.end()
        .map_err(|e| format!("{name}: trailing JSON: {e}"))?;
    if &parsed != msg {
        return Err(format!(
            "{name}: JSON round trip changed the message\n json: {json}\n before: {msg:?}\n after: {parsed:?}"
        ));
    }
    // Binary wire format.
    let bytes = msg.encode_to_vec();
    let decoded = DynamicMessage::decode(msg.descriptor(), bytes.as_slice())
        .map_err(|e| format!("{name}: binary decode: {e}"))?;
    if &decoded != msg {
        return Err(format!("{name}: binary round trip changed the message"));
    }
    Ok(())
}

#[test]
fn every_ccm_message_round_trips_through_json_and_binary() {
    let messages = ccm_messages();
    assert!(!messages.is_empty(), "no ccm.v1 messages in the pool");

    let mut checked = 0usize;
    let mut variants_checked = 0usize;
    let mut failures = Vec::new();
    for desc in &messages {
        for variant in 0..variants(desc) {
            let msg = sample(desc, 0, variant)
                .unwrap_or_else(|| panic!("could not build {}", desc.full_name()));
            // Guard against a silently empty sample (e.g. a generator bug).
            if desc.fields().len() > 0 {
                assert!(
                    desc.fields().any(|f| msg.has_field(&f)),
                    "{} was built with no field set",
                    desc.full_name()
                );
            }
            if let Err(err) = check_round_trips(&msg) {
                failures.push(err);
            }
            variants_checked += 1;
        }
        checked += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    let expected = descriptor_pool()
        .all_messages()
        .filter(|m| m.package_name() == PACKAGE)
        .count();
    assert!(checked > 0);
    assert_eq!(
        checked, expected,
        "every ccm.v1 message type must be checked"
    );
    assert!(variants_checked >= checked);
    eprintln!("round-tripped {checked} message types ({variants_checked} variants)");
}

#[test]
fn every_field_of_a_sample_is_populated() {
    // The sampler must not silently skip fields: on a message without oneofs
    // and within the depth limit, every field is set.
    for name in [
        "ccm.v1.LabletInstance",
        "ccm.v1.CmlWorker",
        "ccm.v1.WorkerTemplate",
    ] {
        let desc = descriptor_pool()
            .get_message_by_name(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let msg = sample(&desc, 0, 0).unwrap_or_else(|| panic!("could not build {name}"));
        for field in desc.fields() {
            assert!(
                msg.has_field(&field),
                "{name}.{} not populated",
                field.name()
            );
        }
    }
}

/// Decodes `dynamic` into the generated type `T`, checks the generated type's
/// descriptor, and converts back.
fn through_generated<T>(dynamic: &DynamicMessage) -> DynamicMessage
where
    T: ReflectMessage + Default,
{
    let typed: T = dynamic.transcode_to().unwrap_or_else(|e| {
        panic!(
            "{}: decode into generated type: {e}",
            dynamic.descriptor().full_name()
        )
    });
    assert_eq!(typed.descriptor(), dynamic.descriptor());
    typed.transcode_to_dynamic()
}

#[test]
fn generated_types_agree_with_descriptors() {
    macro_rules! check {
        ($($ty:ty),+ $(,)?) => {$(
            let desc = <$ty>::default().descriptor();
            for variant in 0..variants(&desc) {
                let dynamic = sample(&desc, 0, variant).expect("sample");
                let back = through_generated::<$ty>(&dynamic);
                assert_eq!(back, dynamic, "{} changed through the generated type", desc.full_name());
                // Also JSON from the generated type equals JSON from the dynamic one.
                let a: serde_json::Value = serde_json::to_value(&back).expect("json");
                let b: serde_json::Value = serde_json::to_value(&dynamic).expect("json");
                assert_eq!(a, b);
            }
        )+};
    }
    check!(
        v1::LabletDefinition,
        v1::LabletInstance,
        v1::CmlWorker,
        v1::WorkerTemplate,
        v1::CloudEvent,
        v1::ChangeEvent,
        v1::WatchEventsResponse,
        v1::AuditRecord,
        v1::ScalingDecision,
        v1::PlanRequest,
        v1::PlanResponse,
        v1::GetWorkerCapacityResponse,
        v1::CommitPlacementsRequest,
        v1::ReportWorkerRequest,
        v1::UpdateTemplateRequest,
        v1::ValidateDefinitionRequest,
        v1::ImportWorkersRequest,
        v1::GetControllerStatusResponse,
        v1::AuthzRule,
        ccm_proto::google::api::HttpRule,
    );
}

#[test]
fn json_uses_canonical_names_and_forms() {
    // Spot-check the canonical JSON mapping of a typed message.
    let instance = v1::LabletInstance {
        id: "i-1".into(),
        state: v1::InstanceState::Running as i32,
        allocated_ports: HashMap::from([("serial_1".to_owned(), 5041)]),
        resource_version: 7,
        time_slot: Some(v1::TimeSlot {
            start: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            end: None,
            asap: false,
        }),
        ..Default::default()
    };
    let json = serde_json::to_value(instance.transcode_to_dynamic()).expect("json");
    assert_eq!(json["state"], "INSTANCE_STATE_RUNNING");
    assert_eq!(json["allocatedPorts"]["serial_1"], 5041);
    assert_eq!(json["resourceVersion"], "7");
    assert_eq!(json["timeSlot"]["start"], "2023-11-14T22:13:20Z");
}
