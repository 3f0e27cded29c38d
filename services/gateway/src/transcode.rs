//! HTTP/JSON → gRPC request messages and gRPC → HTTP/JSON responses, driven only by the
//! descriptors and the `google.api.http` rule of the route.
//!
//! The request message is assembled as one canonical proto3 JSON object and then parsed with
//! prost-reflect, so every JSON rule (enums by name, 64-bit integers as strings, well-known types
//! such as `Timestamp` / `Duration` / `FieldMask`, wrappers) applies equally to the body, the
//! query and the path:
//!
//! 1. the body: with `body: "*"` it is the whole object; with `body: "field"` it becomes that
//!    field; with no body rule a request body is ignored;
//! 2. query parameters (not with `body: "*"`): `name=value`, nested fields as `a.b=value`,
//!    repeated fields by repeating the parameter (`kinds=A&kinds=B`), field names in
//!    `snake_case` or `lowerCamelCase`; an unknown name is a 400;
//! 3. path parameters, which win over both.

use std::time::Duration;

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions,
};
use serde_json::{Map, Value};

use crate::problem::Problem;
use crate::routes::{PathParams, Route};

/// Upstream deadline of a unary call, unless the client sends a shorter `grpc-timeout`.
pub const DEFAULT_UNARY_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request body accepted (bytes); a larger one is a 413.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Request headers copied to the gRPC call's metadata (besides `authorization`, which the
/// auth step decides on).
pub const FORWARDED_HEADERS: &[&str] = &["x-request-id", "traceparent", "tracestate"];

/// Finds a field of `message` by proto name or JSON name.
pub fn find_field(message: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    message
        .get_field_by_name(name)
        .or_else(|| message.get_field_by_json_name(name))
}

fn is_wrapper(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

/// The JSON value of a textual parameter for a (non-repeated view of) field of kind `kind`.
fn scalar_json(kind: &Kind, raw: &str) -> Result<Value, String> {
    Ok(match kind {
        Kind::Bool => match raw {
            "true" | "1" | "" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            other => return Err(format!("{other:?} is not a boolean (true or false)")),
        },
        Kind::String | Kind::Bytes => Value::String(raw.to_owned()),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => raw
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("{raw:?} is not an integer"))?,
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            if raw.parse::<i128>().is_err() {
                return Err(format!("{raw:?} is not an integer"));
            }
            Value::String(raw.to_owned())
        }
        Kind::Float | Kind::Double => match raw.parse::<f64>() {
            Ok(f) if f.is_finite() => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(raw.to_owned())),
            _ if matches!(raw, "NaN" | "Infinity" | "-Infinity") => Value::String(raw.to_owned()),
            _ => return Err(format!("{raw:?} is not a number")),
        },
        Kind::Enum(e) => match raw.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => {
                if e.get_value_by_name(raw).is_none() {
                    let names: Vec<_> = e.values().map(|v| v.name().to_owned()).collect();
                    return Err(format!("{raw:?} is not one of {}", names.join(", ")));
                }
                Value::String(raw.to_owned())
            }
        },
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask" => Value::String(raw.to_owned()),
            name if is_wrapper(name) => match m.get_field_by_name("value") {
                Some(inner) => scalar_json(&inner.kind(), raw)?,
                None => Value::String(raw.to_owned()),
            },
            "google.protobuf.Value" | "google.protobuf.Struct" | "google.protobuf.ListValue" => {
                serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
            }
            other => {
                return Err(format!(
                    "is a message ({other}); set its fields as parameters named `field.subfield`"
                ));
            }
        },
    })
}

/// Where a parameter came from, for error messages.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Path,
    Query,
}

/// Sets `value` at field path `path` in the JSON object `root` of message `message`.
fn set_param(
    root: &mut Map<String, Value>,
    message: &MessageDescriptor,
    path: &[String],
    raw: &str,
    origin: Origin,
) -> Result<(), Problem> {
    let dotted = path.join(".");
    let mut desc = message.clone();
    let mut obj = root;
    for (i, name) in path.iter().enumerate() {
        let field = find_field(&desc, name).ok_or_else(|| {
            Problem::field(
                dotted.clone(),
                format!("no such field in {}", message.full_name()),
            )
        })?;
        let last = i + 1 == path.len();
        if !last {
            let Kind::Message(inner) = field.kind() else {
                return Err(Problem::field(
                    dotted.clone(),
                    format!("{} is not a message", field.name()),
                ));
            };
            if field.is_list() || field.is_map() {
                return Err(Problem::field(
                    dotted.clone(),
                    "fields of repeated messages cannot be set from parameters",
                ));
            }
            let entry = obj
                .entry(field.name().to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            let Value::Object(next) = entry else {
                return Err(Problem::bad_request("internal: not an object"));
            };
            obj = next;
            desc = inner;
            continue;
        }
        if field.is_map() {
            return Err(Problem::field(
                dotted,
                "map fields cannot be set from parameters",
            ));
        }
        let value = scalar_json(&field.kind(), raw).map_err(|e| Problem::field(&dotted, e))?;
        // Remove an entry under the other spelling of the name so the parser sees one.
        if field.json_name() != field.name()
            && let Some(other) = obj.remove(field.json_name())
        {
            obj.insert(field.name().to_owned(), other);
        }
        if field.is_list() {
            if matches!(origin, Origin::Path) {
                return Err(Problem::field(
                    dotted,
                    "a path parameter cannot bind a repeated field",
                ));
            }
            let entry = obj
                .entry(field.name().to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            match entry {
                Value::Array(items) => items.push(value),
                other => *other = Value::Array(vec![value]),
            }
        } else {
            obj.insert(field.name().to_owned(), value);
        }
    }
    Ok(())
}

/// Builds the request message of `route` from its path parameters, the raw query string and
/// the body.
pub fn build_request(
    route: &Route,
    params: &PathParams,
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, Problem> {
    let input = route.rpc.input();
    let mut root = Map::new();
    let has_body = !body.iter().all(u8::is_ascii_whitespace);
    match route.body.as_str() {
        "" => {}
        "*" => {
            if has_body {
                match serde_json::from_slice::<Value>(body) {
                    Ok(Value::Object(map)) => root = map,
                    Ok(_) => {
                        return Err(Problem::bad_request(
                            "the request body must be a JSON object",
                        ));
                    }
                    Err(e) => {
                        return Err(Problem::bad_request(format!(
                            "the request body is not valid JSON: {e}"
                        )));
                    }
                }
            }
        }
        field_name => {
            if has_body {
                let value: Value = serde_json::from_slice(body).map_err(|e| {
                    Problem::bad_request(format!("the request body is not valid JSON: {e}"))
                })?;
                let field = find_field(&input, field_name).ok_or_else(|| {
                    Problem::bad_request(format!(
                        "contract error: body field {field_name:?} is not in {}",
                        input.full_name()
                    ))
                })?;
                root.insert(field.name().to_owned(), value);
            }
        }
    }
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if route.body == "*" {
                return Err(Problem::field(
                    key.into_owned(),
                    "query parameters are not used by this route: every field goes in the body",
                ));
            }
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            set_param(&mut root, &input, &path, &value, Origin::Query)?;
        }
    }
    for (path, value) in params {
        set_param(&mut root, &input, path, value, Origin::Path)?;
    }
    DynamicMessage::deserialize_with_options(
        input,
        Value::Object(root),
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| Problem::bad_request(format!("invalid request: {e}")))
}

/// The options every response is serialized with: lowerCamelCase names, default values
/// omitted, 64-bit integers as strings, enums by name (canonical proto3 JSON).
pub fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
}

/// Serializes a response message as canonical proto3 JSON; with a `response_body` rule, only
/// that field.
pub fn response_json(message: &DynamicMessage, response_body: &str) -> Result<Vec<u8>, Problem> {
    let value = message
        .serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .map_err(|e| {
            Problem::new(
                http::StatusCode::BAD_GATEWAY,
                "bad-gateway",
                format!("the response could not be written as JSON: {e}"),
            )
        })?;
    let value = if response_body.is_empty() {
        value
    } else {
        let json_name = find_field(&message.descriptor(), response_body)
            .map(|f| f.json_name().to_owned())
            .unwrap_or_else(|| response_body.to_owned());
        value.get(&json_name).cloned().unwrap_or(Value::Null)
    };
    serde_json::to_vec(&value).map_err(|e| {
        Problem::new(
            http::StatusCode::BAD_GATEWAY,
            "bad-gateway",
            format!("the response could not be written as JSON: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{RouteMatch, RouteTable};
    use http::Method;

    fn req(method: Method, path: &str, query: Option<&str>, body: &str) -> Result<Value, Problem> {
        let table = RouteTable::from_descriptors(ccm_proto::descriptor_pool()).unwrap();
        let RouteMatch::Found(route, params) = table.find(&method, path) else {
            panic!("no route for {method} {path}");
        };
        let msg = build_request(route, &params, query, body.as_bytes())?;
        Ok(serde_json::from_slice(&response_json(&msg, "").unwrap()).unwrap())
    }

    #[test]
    fn path_query_and_enums() {
        let v = req(
            Method::GET,
            "/v1/events:watch",
            Some("kinds=RESOURCE_KIND_INSTANCE&kinds=RESOURCE_KIND_WORKER&sinceRevision=12&heartbeat_interval=5s&send_initial_state=true"),
            "",
        )
        .unwrap();
        assert_eq!(
            v["kinds"],
            serde_json::json!(["RESOURCE_KIND_INSTANCE", "RESOURCE_KIND_WORKER"])
        );
        assert_eq!(v["sinceRevision"], "12");
        assert_eq!(v["heartbeatInterval"], "5s");
        assert_eq!(v["sendInitialState"], true);
    }

    #[test]
    fn nested_path_field_and_body_field() {
        let v = req(
            Method::PATCH,
            "/v1/templates/small",
            None,
            r#"{"description": "d"}"#,
        )
        .unwrap();
        assert_eq!(v["template"]["name"], "small");
        assert_eq!(v["template"]["description"], "d");
    }

    #[test]
    fn bad_input_is_a_field_violation() {
        let p = req(Method::GET, "/v1/events:watch", Some("kinds=NOPE"), "").unwrap_err();
        assert_eq!(p.status, 400);
        assert_eq!(p.field_violations[0].field, "kinds");
        assert!(
            p.field_violations[0]
                .description
                .contains("RESOURCE_KIND_INSTANCE")
        );
        let p = req(Method::GET, "/v1/workers", Some("nope=1"), "").unwrap_err();
        assert_eq!(p.field_violations[0].field, "nope");
        let p = req(Method::GET, "/v1/workers", Some("page_size=ten"), "").unwrap_err();
        assert!(p.detail.contains("not an integer"), "{}", p.detail);
        let p = req(Method::POST, "/v1/definitions", None, "{not json").unwrap_err();
        assert!(p.detail.contains("not valid JSON"), "{}", p.detail);
        let p = req(Method::POST, "/v1/workers:import", Some("x=1"), "{}").unwrap_err();
        assert_eq!(p.field_violations[0].field, "x");
    }
}
#[cfg(test)]
mod field_mask_tests {
    use super::*;
    use crate::routes::{RouteMatch, RouteTable};
    use http::Method;

    #[test]
    fn field_mask_from_the_query() {
        let table = RouteTable::from_descriptors(ccm_proto::descriptor_pool()).unwrap();
        let RouteMatch::Found(route, params) = table.find(&Method::PATCH, "/v1/templates/t") else {
            panic!()
        };
        let msg = build_request(
            route,
            &params,
            Some("update_mask=description,capacity"),
            br#"{"description":"d"}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&response_json(&msg, "").unwrap()).unwrap();
        assert_eq!(v["updateMask"], "description,capacity", "{v}");
        let typed: ccm_proto::v1::UpdateTemplateRequest = msg.transcode_to().unwrap();
        assert_eq!(
            typed.update_mask.map(|m| m.paths),
            Some(vec!["description".to_owned(), "capacity".to_owned()])
        );
        assert_eq!(typed.template.map(|t| t.name).as_deref(), Some("t"));
    }
}
