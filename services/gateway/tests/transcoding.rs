//! HTTP/JSON transcoding against a real control plane: every public RPC of the contracts,
//! path/query/body mapping, canonical JSON both ways, and problem+json errors.

mod common;

use ccm_gateway::routes::{RouteTable, Segment};
use common::{call, http, plane_and_gateway, template_json};
use reqwest::Method;
use serde_json::{Value, json};

/// A concrete path for a template, every variable filled with `value`.
fn concrete_path(route: &ccm_gateway::routes::Route, value: &str) -> String {
    let t = &route.template;
    let mut out = String::new();
    let mut k = 0;
    while k < t.segments.len() {
        out.push('/');
        if let Some(var) = t.variables.iter().find(|v| v.start == k) {
            out.push_str(value);
            k += var.len;
            continue;
        }
        match &t.segments[k] {
            Segment::Literal(l) => out.push_str(l),
            _ => out.push_str(value),
        }
        k += 1;
    }
    if let Some(verb) = &t.verb {
        out.push(':');
        out.push_str(verb);
    }
    out
}

#[tokio::test]
async fn every_public_rpc_is_reachable_over_http() {
    let (_plane, gw) = plane_and_gateway().await;
    let client = http();
    let table = RouteTable::from_descriptors(ccm_proto::descriptor_pool()).unwrap();
    assert!(
        table.routes().len() >= 45,
        "{} routes",
        table.routes().len()
    );
    let mut checked = 0;
    for route in table.routes() {
        let path = concrete_path(route, "no-such-id");
        let url = gw.url(&path);
        let method = Method::from_bytes(route.method.as_str().as_bytes()).unwrap();
        let label = format!("{} {path} ({})", route.method, route.rpc.full_name());
        if route.is_streaming() {
            let resp = client.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{label}");
            assert_eq!(
                resp.headers()["content-type"],
                "text/event-stream",
                "{label}"
            );
            checked += 1;
            continue;
        }
        let body = (!route.body.is_empty()).then(|| json!({}));
        let (status, headers, value) = call(&client, method, &url, body).await;
        assert_ne!(
            value["type"], "urn:ccm:problem:route-not-found",
            "{label}: the gateway did not route it"
        );
        assert_ne!(status, 405, "{label}");
        if (200..300).contains(&status) {
            assert_eq!(headers["content-type"], "application/json", "{label}");
            assert!(value.is_object(), "{label}: {value}");
        } else {
            assert_eq!(
                headers["content-type"], "application/problem+json",
                "{label}"
            );
            let grpc = value["grpcStatus"].as_str().unwrap_or_default();
            match route.served_by.as_str() {
                // The scheduler and controller endpoints point at the control plane, which does
                // not serve their services: reaching it proves the call went to that endpoint.
                "scheduler" | "controller" => {
                    assert_eq!(grpc, "UNIMPLEMENTED", "{label}: {value}");
                    assert_eq!(status, 501, "{label}");
                }
                _ => {
                    assert!(
                        !grpc.is_empty() && grpc != "UNIMPLEMENTED",
                        "{label}: {status} {value}"
                    );
                    assert_ne!(status, 501, "{label}");
                }
            }
        }
        checked += 1;
    }
    assert_eq!(checked, table.routes().len());
}

#[tokio::test]
async fn templates_and_workers_round_trip_as_canonical_json() {
    let (_plane, gw) = plane_and_gateway().await;
    let client = http();
    // body: "template"
    let (status, _, created) = call(
        &client,
        Method::POST,
        &gw.url("/v1/templates"),
        Some(template_json("gw-small")),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let created = created["template"].clone();
    assert_eq!(created["name"], "gw-small");
    assert_eq!(created["licenseType"], "LICENSE_TYPE_PERSONAL");
    assert_eq!(created["capacity"]["maxNodes"], 20);
    // int64 as a string, canonical JSON
    assert!(created["resourceVersion"].is_string(), "{created}");
    // path parameter
    let (status, _, got) = call(
        &client,
        Method::GET,
        &gw.url("/v1/templates/gw-small"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got["template"]["id"], created["id"]);
    // nested path field {template.name} + body field
    let mut patch = template_json("ignored-by-path");
    patch["description"] = json!("patched over HTTP");
    patch["resourceVersion"] = created["resourceVersion"].clone();
    let (status, _, updated) = call(
        &client,
        Method::PATCH,
        &gw.url("/v1/templates/gw-small?update_mask=description,capacity"),
        Some(patch),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["template"]["name"], "gw-small");
    assert_eq!(updated["template"]["description"], "patched over HTTP");
    // body "*": a worker from the template
    let (status, _, worker) = call(
        &client,
        Method::POST,
        &gw.url("/v1/workers"),
        Some(json!({"templateName": "gw-small", "name": "w-http", "tags": {"team": "gw"}})),
    )
    .await;
    assert_eq!(status, 200, "{worker}");
    let worker = if worker["worker"].is_object() {
        worker["worker"].clone()
    } else {
        worker
    };
    let id = worker["id"].as_str().expect("worker id").to_owned();
    // query: repeated enum by name, snake_case and camelCase names
    let (status, _, list) = call(
        &client,
        Method::GET,
        &gw.url("/v1/workers?states=WORKER_STATE_PENDING&states=WORKER_STATE_RUNNING&template_name=gw-small&pageSize=10"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(ids, vec![id.as_str()]);
    let (status, _, none) = call(
        &client,
        Method::GET,
        &gw.url("/v1/workers?states=WORKER_STATE_STOPPED"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        none["workers"].as_array().is_none_or(Vec::is_empty),
        "{none}"
    );
    let (status, _, _) = call(
        &client,
        Method::GET,
        &gw.url(&format!("/v1/workers/{id}")),
        None,
    )
    .await;
    assert_eq!(status, 200);
    // a deleted template is gone: DELETE refused while a worker uses it
    let (status, _, refused) = call(
        &client,
        Method::DELETE,
        &gw.url("/v1/templates/gw-small"),
        None,
    )
    .await;
    assert!(status >= 400, "{refused}");
    assert!(refused["grpcStatus"].is_string(), "{refused}");
}

#[tokio::test]
async fn bad_input_answers_problem_json() {
    let (_plane, gw) = plane_and_gateway().await;
    let client = http();
    // Unknown route.
    let (status, headers, p) = call(&client, Method::GET, &gw.url("/v1/nothing-here"), None).await;
    assert_eq!(status, 404);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(p["type"], "urn:ccm:problem:route-not-found");
    assert_eq!(p["instance"], "/v1/nothing-here");
    assert!(p["requestId"].is_string());
    // Wrong method: 405 with Allow.
    let (status, headers, _) = call(&client, Method::DELETE, &gw.url("/v1/workers"), None).await;
    assert_eq!(status, 405);
    assert!(headers["allow"].to_str().unwrap().contains("GET"));
    // Bad JSON: 400 with the parse error.
    let resp = client
        .post(gw.url("/v1/templates"))
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let p: Value = resp.json().await.unwrap();
    assert!(
        p["detail"].as_str().unwrap().contains("not valid JSON"),
        "{p}"
    );
    // Unknown field in the body.
    let (status, _, p) = call(
        &client,
        Method::POST,
        &gw.url("/v1/workers:import"),
        Some(json!({"bogus": 1})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(p["detail"].as_str().unwrap().contains("bogus"), "{p}");
    // Bad enum in the query: a field violation naming the field.
    let (status, _, p) = call(
        &client,
        Method::GET,
        &gw.url("/v1/workers?states=BROKEN"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(p["fieldViolations"][0]["field"], "states");
    // Unknown query parameter.
    let (status, _, p) = call(
        &client,
        Method::GET,
        &gw.url("/v1/workers?colour=red"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(p["fieldViolations"][0]["field"], "colour");
    // Not JSON at all.
    let resp = client
        .post(gw.url("/v1/templates"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    // The control plane's own validation: BadRequest field violations surfaced.
    let mut bad = template_json("bad template name!");
    bad["capacity"] = json!({"cpuCores": -1});
    let (status, _, p) = call(&client, Method::POST, &gw.url("/v1/templates"), Some(bad)).await;
    assert_eq!(status, 400, "{p}");
    assert_eq!(p["grpcStatus"], "INVALID_ARGUMENT");
    let fields: Vec<&str> = p["fieldViolations"]
        .as_array()
        .expect("field violations from google.rpc.BadRequest")
        .iter()
        .filter_map(|v| v["field"].as_str())
        .collect();
    assert!(!fields.is_empty(), "{p}");
    assert!(p["requestId"].is_string());
    // NOT_FOUND from the backend keeps its gRPC code and the request id the client sent.
    let resp = client
        .get(gw.url("/v1/workers/does-not-exist"))
        .header("x-request-id", "req-gw-test-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-request-id"], "req-gw-test-1");
    let p: Value = resp.json().await.unwrap();
    assert_eq!(p["grpcStatus"], "NOT_FOUND");
    assert_eq!(p["type"], "urn:ccm:problem:not-found");
}

#[tokio::test]
async fn unconfigured_backend_is_503_and_health_endpoints_answer() {
    let plane = common::plane_with(Default::default()).await;
    let gw = common::start_gateway(ccm_gateway::GatewaySettings::insecure(format!(
        "http://{}",
        plane.addr
    )))
    .await;
    let client = http();
    let (status, _, p) = call(&client, Method::GET, &gw.url("/v1/scheduler/status"), None).await;
    assert_eq!(status, 503);
    assert_eq!(p["type"], "urn:ccm:problem:backend-not-configured");
    let r = client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Requests show up in /metrics by route template and status.
    let text = client
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#"ccm_gateway_http_requests_total{route="GET /v1/scheduler/status",status="503"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("ccm_gateway_http_request_duration_seconds_bucket"));
    // A gateway whose control plane is down is alive but not ready.
    plane.stop().await.unwrap();
    let r = client.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let r = client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn openapi_and_docs_page() {
    let (_plane, gw) = plane_and_gateway().await;
    let client = http();
    let (status, _, doc) = call(&client, Method::GET, &gw.url("/openapi.json"), None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let table = RouteTable::from_descriptors(ccm_proto::descriptor_pool()).unwrap();
    for route in table.routes() {
        assert!(
            doc["paths"][route.template.openapi_path()][route.method.as_str().to_ascii_lowercase()]
                .is_object(),
            "{}",
            route.label()
        );
    }
    let page = client.get(gw.url("/api/docs")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("/openapi.json"));
    assert!(
        !html.contains("https://"),
        "the docs page must not load from a CDN"
    );
}

#[tokio::test]
async fn ui_directory_spa_fallback_and_cache_headers() {
    let plane = common::plane_with(Default::default()).await;
    let dir = std::env::temp_dir().join(format!("ccm-gw-ui-{}", uuid_like()));
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    let mut settings = ccm_gateway::GatewaySettings::insecure(format!("http://{}", plane.addr));
    settings.ui_dir = dir.clone();
    let gw = common::start_gateway(settings).await;
    let client = http();
    // Not built yet: a clear page.
    let r = client.get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("not built"));
    std::fs::write(dir.join("index.html"), "<!doctype html><title>ccm</title>").unwrap();
    std::fs::write(dir.join("assets/app-1234.js"), "console.log(1)").unwrap();
    let r = client.get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let r = client.get(gw.url("/workers/abc")).send().await.unwrap();
    assert_eq!(r.status(), 200, "SPA fallback");
    assert!(r.text().await.unwrap().contains("<title>ccm</title>"));
    let r = client
        .get(gw.url("/assets/app-1234.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(
        r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    let r = client
        .get(gw.url("/assets/missing.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .get(gw.url("/..%2f..%2fetc%2fpasswd"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let _ = std::fs::remove_dir_all(&dir);
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
