//! The OpenAPI 3.1 document of the HTTP API, generated from the same descriptors and route
//! table the gateway serves (paths, parameters, bodies, schemas with the contracts' doc
//! comments, roles, security schemes), and the self-contained `/api/docs` page that renders it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use prost_reflect::{FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::OidcSettings;
use crate::error::GatewayError;
use crate::routes::{Route, RouteTable};
use crate::session::SESSION_COOKIE;

/// The browsable API page served at `/api/docs`: plain HTML and JavaScript, no CDN; it fetches
/// `/openapi.json` and renders it.
pub const DOCS_PAGE: &str = include_str!("../assets/api-docs.html");

/// Version of the OpenAPI specification the document follows.
pub const OPENAPI_VERSION: &str = "3.1.0";

/// Name of the problem document schema.
pub const PROBLEM_SCHEMA: &str = "Problem";

/// Leading comments of each file, by source path.
#[derive(Default)]
struct Comments {
    by_file: HashMap<String, HashMap<Vec<i32>, String>>,
}

impl Comments {
    fn get(&mut self, file: &FileDescriptor, path: &[i32]) -> Option<String> {
        let map = self
            .by_file
            .entry(file.name().to_owned())
            .or_insert_with(|| {
                file.file_descriptor_proto()
                    .source_code_info
                    .as_ref()
                    .map(|info| {
                        info.location
                            .iter()
                            .filter_map(|l| {
                                l.leading_comments
                                    .as_ref()
                                    .map(|c| (l.path.clone(), clean_comment(c)))
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            });
        map.get(path).cloned().filter(|c| !c.is_empty())
    }
}

fn clean_comment(c: &str) -> String {
    c.lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// Schemas of the messages and enums the API uses.
struct Schemas {
    comments: Comments,
    done: BTreeMap<String, Value>,
    queue: VecDeque<Kind>,
}

impl Schemas {
    fn well_known(name: &str) -> Option<Value> {
        Some(match name {
            "google.protobuf.Timestamp" => {
                json!({"type": "string", "format": "date-time", "description": "RFC 3339 timestamp"})
            }
            "google.protobuf.Duration" => {
                json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$", "description": "duration in seconds with an `s` suffix, e.g. `1.5s`"})
            }
            "google.protobuf.FieldMask" => {
                json!({"type": "string", "description": "comma-separated field paths"})
            }
            "google.protobuf.Struct" => json!({"type": "object"}),
            "google.protobuf.Value" => json!({"description": "any JSON value"}),
            "google.protobuf.ListValue" => json!({"type": "array", "items": {}}),
            "google.protobuf.Empty" => json!({"type": "object"}),
            "google.protobuf.Any" => {
                json!({"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true})
            }
            "google.protobuf.BoolValue" => json!({"type": ["boolean", "null"]}),
            "google.protobuf.StringValue" => json!({"type": ["string", "null"]}),
            "google.protobuf.BytesValue" => {
                json!({"type": ["string", "null"], "contentEncoding": "base64"})
            }
            "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => {
                json!({"type": ["integer", "null"]})
            }
            "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => {
                json!({"type": ["string", "null"], "format": "int64"})
            }
            "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => {
                json!({"type": ["number", "null"]})
            }
            _ => return None,
        })
    }

    /// The schema of a value of `kind` (a `$ref` for messages and enums, queued).
    fn kind_schema(&mut self, kind: &Kind) -> Value {
        match kind {
            Kind::Double | Kind::Float => json!({"type": "number"}),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                json!({"type": "integer", "format": "int32"})
            }
            Kind::Uint32 | Kind::Fixed32 => {
                json!({"type": "integer", "format": "int32", "minimum": 0})
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({"type": "string", "format": "int64"})
            }
            Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64"}),
            Kind::Bool => json!({"type": "boolean"}),
            Kind::String => json!({"type": "string"}),
            Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
            Kind::Enum(e) => {
                if !self.done.contains_key(e.full_name()) {
                    self.queue.push_back(kind.clone());
                }
                schema_ref(e.full_name())
            }
            Kind::Message(m) => {
                if let Some(wk) = Self::well_known(m.full_name()) {
                    return wk;
                }
                if !self.done.contains_key(m.full_name()) {
                    self.queue.push_back(kind.clone());
                }
                schema_ref(m.full_name())
            }
        }
    }

    fn field_schema(&mut self, field: &FieldDescriptor) -> Value {
        let mut schema = if field.is_map() {
            let value = match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind().clone(),
                other => other,
            };
            json!({"type": "object", "additionalProperties": self.kind_schema(&value)})
        } else if field.is_list() {
            json!({"type": "array", "items": self.kind_schema(&field.kind())})
        } else {
            self.kind_schema(&field.kind())
        };
        if let Some(doc) = self.comments.get(&field.parent_file(), field.path())
            && let Value::Object(map) = &mut schema
        {
            if map.contains_key("$ref") {
                // 3.1 allows siblings of $ref.
                map.insert("description".into(), Value::String(doc));
            } else {
                map.insert("description".into(), Value::String(doc));
            }
        }
        schema
    }

    fn message_schema(&mut self, message: &MessageDescriptor) -> Value {
        let mut properties = Map::new();
        for field in message.fields() {
            properties.insert(field.json_name().to_owned(), self.field_schema(&field));
        }
        let mut schema = json!({"type": "object", "properties": properties});
        if let Some(doc) = self.comments.get(&message.parent_file(), message.path()) {
            schema["description"] = Value::String(doc);
        }
        schema
    }

    fn drain(&mut self) {
        while let Some(kind) = self.queue.pop_front() {
            match &kind {
                Kind::Message(m) if !self.done.contains_key(m.full_name()) => {
                    self.done.insert(m.full_name().to_owned(), Value::Null);
                    let schema = self.message_schema(m);
                    self.done.insert(m.full_name().to_owned(), schema);
                }
                Kind::Enum(e) if !self.done.contains_key(e.full_name()) => {
                    let names: Vec<Value> = e
                        .values()
                        .map(|v| Value::String(v.name().to_owned()))
                        .collect();
                    let mut schema = json!({"type": "string", "enum": names});
                    let mut docs = Vec::new();
                    if let Some(d) = self.comments.get(&e.parent_file(), e.path()) {
                        docs.push(d);
                    }
                    for v in e.values() {
                        if let Some(d) = self.comments.get(&v.parent_file(), v.path()) {
                            docs.push(format!("- `{}`: {}", v.name(), d.replace('\n', " ")));
                        }
                    }
                    if !docs.is_empty() {
                        schema["description"] = Value::String(docs.join("\n"));
                    }
                    self.done.insert(e.full_name().to_owned(), schema);
                }
                _ => {}
            }
        }
    }
}

/// Query parameters of a route: every non-path field of the request that can be written as
/// text, nested messages expanded as `a.b` (up to [`MAX_QUERY_DEPTH`] levels).
pub const MAX_QUERY_DEPTH: usize = 3;

fn query_params(
    schemas: &mut Schemas,
    message: &MessageDescriptor,
    prefix: &str,
    path_fields: &[String],
    depth: usize,
    out: &mut Vec<Value>,
) {
    for field in message.fields() {
        let name = format!("{prefix}{}", field.name());
        if path_fields.contains(&name) || field.is_map() {
            continue;
        }
        match field.kind() {
            Kind::Message(m)
                if Schemas::well_known(m.full_name()).is_none() && !field.is_list() =>
            {
                if depth < MAX_QUERY_DEPTH {
                    query_params(
                        schemas,
                        &m,
                        &format!("{name}."),
                        path_fields,
                        depth + 1,
                        out,
                    );
                }
            }
            Kind::Message(m) if field.is_list() && Schemas::well_known(m.full_name()).is_none() => {
            }
            _ => {
                let schema = schemas.field_schema(&field);
                let mut p = json!({"name": name, "in": "query", "schema": schema});
                if field.is_list() {
                    p["explode"] = Value::Bool(true);
                }
                out.push(p);
            }
        }
    }
}

fn operation(schemas: &mut Schemas, route: &Route, suffix: usize) -> Value {
    let rpc = &route.rpc;
    let service = rpc.parent_service();
    let doc = schemas
        .comments
        .get(&rpc.parent_file(), rpc.path())
        .unwrap_or_default();
    let summary = doc.lines().next().unwrap_or_default().to_owned();
    let path_fields: Vec<String> = route
        .template
        .variables
        .iter()
        .map(|v| v.field_path.join("."))
        .collect();
    let input = rpc.input();
    let mut parameters = Vec::new();
    for var in &route.template.variables {
        let mut schema = json!({"type": "string"});
        let mut desc = input.clone();
        for (i, part) in var.field_path.iter().enumerate() {
            let Some(f) = crate::transcode::find_field(&desc, part) else {
                break;
            };
            if i + 1 == var.field_path.len() {
                schema = schemas.field_schema(&f);
            } else if let Kind::Message(m) = f.kind() {
                desc = m;
            }
        }
        parameters.push(json!({
            "name": var.field_path.join("."),
            "in": "path",
            "required": true,
            "schema": schema,
        }));
    }
    if route.body != "*" {
        let mut q = Vec::new();
        let body_field = route.body.clone();
        query_params(schemas, &input, "", &path_fields, 0, &mut q);
        q.retain(|p| {
            body_field.is_empty()
                || !p["name"]
                    .as_str()
                    .is_some_and(|n| n == body_field || n.starts_with(&format!("{body_field}.")))
        });
        parameters.extend(q);
    }
    if route.is_streaming() {
        parameters.push(json!({
            "name": "Last-Event-ID",
            "in": "header",
            "description": "resume after this revision (sent by EventSource on reconnect)",
            "schema": {"type": "string"},
        }));
    }
    let mut op = json!({
        "operationId": if suffix == 0 {
            format!("{}_{}", service.name(), rpc.name())
        } else {
            format!("{}_{}{}", service.name(), rpc.name(), suffix + 1)
        },
        "tags": [service.name()],
        "summary": summary,
        "description": doc,
        "parameters": parameters,
    });
    match route.body.as_str() {
        "" => {}
        "*" => {
            op["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": schemas.kind_schema(&Kind::Message(input.clone()))}}
            });
        }
        field => {
            if let Some(f) = crate::transcode::find_field(&input, field) {
                op["requestBody"] = json!({
                    "required": true,
                    "content": {"application/json": {"schema": schemas.field_schema(&f)}}
                });
            }
        }
    }
    let output = rpc.output();
    let ok = if route.is_streaming() {
        json!({
            "description": "Server-Sent Events: one event per stream item (`event:` the item's kind, `id:` its revision, `data:` its JSON)",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "x-item-schema": schemas.kind_schema(&Kind::Message(output))}}
        })
    } else {
        let schema = if route.response_body.is_empty() {
            schemas.kind_schema(&Kind::Message(output))
        } else {
            crate::transcode::find_field(&output, &route.response_body)
                .map(|f| schemas.field_schema(&f))
                .unwrap_or_else(|| json!({}))
        };
        json!({"description": "OK", "content": {"application/json": {"schema": schema}}})
    };
    op["responses"] = json!({
        "200": ok,
        "default": {
            "description": "an error (RFC 9457 problem document)",
            "content": {"application/problem+json": {"schema": schema_ref(PROBLEM_SCHEMA)}}
        }
    });
    if let Some(rule) = ccm_proto::method_authz(ccm_proto::descriptor_pool(), rpc.full_name()) {
        let roles: Vec<&str> = rule.roles().map(|r| r.claim()).collect();
        op["x-ccm-roles"] = json!(roles);
        op["x-ccm-owner-scoped"] = Value::Bool(rule.owner_scoped);
    }
    op
}

fn problem_schema() -> Value {
    json!({
        "type": "object",
        "description": "RFC 9457 problem details, with the google.rpc error details of the gRPC status decoded",
        "properties": {
            "type": {"type": "string", "description": "urn:ccm:problem:<slug>"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "grpcStatus": {"type": "string"},
            "requestId": {"type": "string"},
            "reason": {"type": "string", "description": "google.rpc.ErrorInfo.reason"},
            "domain": {"type": "string"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "fieldViolations": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "description": {"type": "string"}, "reason": {"type": "string"}}}},
            "preconditionFailures": {"type": "array", "items": {"type": "object", "properties": {
                "type": {"type": "string"}, "subject": {"type": "string"}, "description": {"type": "string"}}}},
            "retryAfterSeconds": {"type": "integer"},
            "resource": {"type": "string"}
        },
        "required": ["type", "title", "status", "detail"]
    })
}

/// The OpenAPI document as a JSON value.
pub fn document(routes: &RouteTable, oidc: Option<&OidcSettings>) -> Value {
    let mut schemas = Schemas {
        comments: Comments::default(),
        done: BTreeMap::new(),
        queue: VecDeque::new(),
    };
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for route in routes.routes() {
        let count = seen.entry(route.rpc.full_name().to_owned()).or_default();
        let op = operation(&mut schemas, route, *count);
        *count += 1;
        paths
            .entry(route.template.openapi_path())
            .or_default()
            .insert(route.method.as_str().to_ascii_lowercase(), op);
    }
    schemas.drain();
    let mut components: Map<String, Value> = schemas
        .done
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .collect();
    components.insert(PROBLEM_SCHEMA.into(), problem_schema());
    let mut security_schemes = json!({
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": "an OIDC access token, passed through to the services"},
        "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
                    "description": "the browser session of /auth/login"}
    });
    if let Some(oidc) = oidc {
        security_schemes["oidc"] = json!({
            "type": "openIdConnect",
            "openIdConnectUrl": format!("{}{}", oidc.issuer_url, ccm_auth::DISCOVERY_PATH),
        });
    }
    json!({
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "ccm API",
            "version": "v1",
            "description": "HTTP/JSON API of ccm, transcoded by the gateway from the gRPC contracts \
                            (proto/ccm/v1). JSON is canonical proto3 JSON; errors are RFC 9457 \
                            problem documents; the change feed is Server-Sent Events at \
                            /v1/events:stream. `x-ccm-roles` lists the roles an operation needs."
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": security_schemes}
    })
}

/// The OpenAPI document, serialized.
pub fn document_json(
    routes: &RouteTable,
    oidc: Option<&OidcSettings>,
) -> Result<Vec<u8>, GatewayError> {
    serde_json::to_vec(&document(routes, oidc))
        .map_err(|e| GatewayError::Contract(format!("OpenAPI document: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_its_schemas() {
        let table = RouteTable::from_descriptors(ccm_proto::descriptor_pool()).unwrap();
        let doc = document(&table, None);
        assert_eq!(doc["openapi"], OPENAPI_VERSION);
        for route in table.routes() {
            let op = &doc["paths"][route.template.openapi_path()]
                [route.method.as_str().to_ascii_lowercase()];
            assert!(op.is_object(), "{} missing", route.label());
            assert!(
                !op["summary"].as_str().unwrap_or("").is_empty(),
                "{}",
                route.label()
            );
        }
        let drain = &doc["paths"]["/v1/workers/{worker_id}:drain"]["post"];
        assert_eq!(drain["parameters"][0]["name"], "worker_id");
        assert_eq!(drain["x-ccm-roles"], json!(["admin"]));
        let list = &doc["paths"]["/v1/workers"]["get"]["parameters"];
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "page_size" && p["in"] == "query")
        );
        let worker = &doc["components"]["schemas"]["ccm.v1.CmlWorker"];
        assert!(worker["description"].as_str().is_some());
        assert!(worker["properties"]["id"].is_object());
        // Every $ref resolves.
        let text = serde_json::to_string(&doc).unwrap();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "dangling $ref {name}"
            );
        }
    }
}
