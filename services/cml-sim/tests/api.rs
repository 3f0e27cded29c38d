//! The simulator's HTTP protocol, checked with a plain HTTP client (what a real CML client
//! sees: statuses, bodies, headers), plus the admin API.

use std::time::Duration;

use ccm_cml_sim::{CmlSim, Faults, HostSnapshot, LabState, SimHandle, SimOptions};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

const LAB: &str = include_str!("fixtures/three-node-lab.yaml");

async fn start(options: SimOptions) -> (SimHandle, Client) {
    (CmlSim::start(options).await.unwrap(), Client::new())
}

async fn token(http: &Client, base: &str) -> String {
    let reply = http
        .post(format!("{base}/api/v0/authenticate"))
        .json(&json!({"username": "admin", "password": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    reply.json::<String>().await.unwrap()
}

async fn description(reply: reqwest::Response) -> (StatusCode, String) {
    let status = reply.status();
    let body: Value = reply.json().await.unwrap();
    assert_eq!(body["code"], status.as_u16());
    (status, body["description"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn authentication_is_enforced() {
    let (sim, http) = start(SimOptions::default()).await;
    let base = sim.base_url();

    let reply = http
        .post(format!("{base}/api/v0/authenticate"))
        .json(&json!({"username": "admin", "password": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::FORBIDDEN);

    let reply = http
        .post(format!("{base}/api/v0/authenticate"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::BAD_REQUEST);

    let reply = http
        .get(format!("{base}/api/v0/labs"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        reply.headers()["www-authenticate"].to_str().unwrap(),
        "Bearer"
    );
    let (status, text) = description(reply).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(text.contains("No authorization token"), "{text}");

    let reply = http
        .get(format!("{base}/api/v0/labs"))
        .bearer_auth("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::UNAUTHORIZED);

    let token = token(&http, &base).await;
    let reply = http
        .get(format!("{base}/api/v0/labs?show_all=true"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    assert_eq!(
        reply.json::<Vec<String>>().await.unwrap(),
        Vec::<String>::new()
    );

    // A token of one host is not valid on another.
    let other = sim.host_url("i-0other");
    let reply = http
        .get(format!("{other}/api/v0/labs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_requests_are_rejected_like_cml() {
    let (sim, http) = start(SimOptions::default()).await;
    let base = sim.base_url();
    let token = token(&http, &base).await;

    for (body, needle) in [
        ("{{{", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
        ("nodes: [{id: n0}]", "node_definition"),
    ] {
        let reply = http
            .post(format!("{base}/api/v0/import"))
            .bearer_auth(&token)
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, text) = description(reply).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(text.contains(needle), "{body}: {text}");
    }
    let reply = http
        .post(format!("{base}/api/v0/import"))
        .bearer_auth(&token)
        .body(vec![0xff, 0xfe, 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::BAD_REQUEST);

    for op in ["start", "stop", "wipe"] {
        let reply = http
            .put(format!("{base}/api/v0/labs/unknown/{op}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(description(reply).await.0, StatusCode::NOT_FOUND, "{op}");
    }
    let reply = http
        .delete(format!("{base}/api/v0/labs/unknown"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::NOT_FOUND);

    let reply = http
        .post(format!("{base}/api/v0/licensing/registration"))
        .bearer_auth(&token)
        .json(&json!({"reregister": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::BAD_REQUEST);

    let reply = http
        .get(format!("{base}/api/v0/no_such_thing"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::NOT_FOUND);
    let reply = http.get(format!("{base}/elsewhere")).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::NOT_FOUND);

    // Running labs can be neither wiped nor deleted; stopped ones can.
    let reply = http
        .post(format!("{base}/api/v0/import?title=t"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(LAB)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let id = reply.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let put = |op: &str| {
        http.put(format!("{base}/api/v0/labs/{id}/{op}"))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(put("start").await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(
        description(put("wipe").await.unwrap()).await.0,
        StatusCode::BAD_REQUEST
    );
    let delete = http
        .delete(format!("{base}/api/v0/labs/{id}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(description(delete).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(put("stop").await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(put("wipe").await.unwrap().status(), StatusCode::NO_CONTENT);
    let reply = http
        .put(format!("{base}/api/v0/labs/{id}/explode"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn labs_boot_after_the_boot_duration() {
    let (sim, http) = start(SimOptions {
        boot_duration: Duration::from_secs(3600),
        ..SimOptions::default()
    })
    .await;
    let base = sim.base_url();
    let token = token(&http, &base).await;
    let id = http
        .post(format!("{base}/api/v0/import"))
        .bearer_auth(&token)
        .body(LAB)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    http.put(format!("{base}/api/v0/labs/{id}/start"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let lab: Value = http
        .get(format!("{base}/api/v0/labs/{id}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(lab["state"], "STARTED");
    assert_eq!(
        sim.state("default").unwrap().labs[0].state,
        LabState::Started
    );
}

#[tokio::test]
async fn admin_api_over_http() {
    let (sim, http) = start(SimOptions::default()).await;
    let base = sim.base_url();
    let host = sim.host_url("i-0abc");

    // Faults: a patch changes only what it names; unknown fields are refused.
    let faults: Faults = http
        .post(format!("{host}/_sim/faults"))
        .json(&json!({"fail_imports": 2, "latency_ms": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((faults.fail_imports, faults.latency_ms), (2, 5));
    let faults: Faults = http
        .post(format!("{host}/_sim/faults"))
        .json(&json!({"unready": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((faults.fail_imports, faults.unready), (2, true));
    let reply = http
        .post(format!("{host}/_sim/faults"))
        .json(&json!({"explode": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::BAD_REQUEST);
    // The default host is untouched.
    let default: HostSnapshot = http
        .get(format!("{base}/_sim/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(default.faults, Faults::default());
    assert!(default.ready);
    let cleared: Faults = http
        .delete(format!("{host}/_sim/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleared, Faults::default());

    // Telemetry injection shows up in the API.
    let reply = http
        .post(format!("{host}/_sim/telemetry"))
        .json(&json!({"category": "user_activity", "data": {"user_id": "1234"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::NO_CONTENT);
    let reply = http
        .post(format!("{host}/_sim/telemetry"))
        .json(&json!({"category": " "}))
        .send()
        .await
        .unwrap();
    assert_eq!(description(reply).await.0, StatusCode::BAD_REQUEST);
    let token = token(&http, &host).await;
    let events: Vec<Value> = http
        .get(format!("{host}/api/v0/telemetry/events"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["category"], "user_activity");
    assert_eq!(events[0]["data"]["user_id"], "1234");
    let timestamp = events[0]["timestamp"].as_str().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(timestamp, "%Y-%m-%dT%H:%M:%S%.f").is_ok(),
        "{timestamp}"
    );

    // State carries the imported YAML verbatim.
    http.post(format!("{host}/api/v0/import"))
        .bearer_auth(&token)
        .body(LAB)
        .send()
        .await
        .unwrap();
    let state: HostSnapshot = http
        .get(format!("{host}/_sim/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state.host, "i-0abc");
    assert_eq!(state.labs.len(), 1);
    assert_eq!(state.labs[0].yaml, LAB);
    assert_eq!(state.labs[0].nodes[1].tags, vec!["vnc:2002".to_string()]);
    assert_eq!(state.total_nodes, 3);

    let hosts: Vec<String> = http
        .get(format!("{base}/_sim/hosts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hosts, ["default", "i-0abc"]);

    // Reset: a fresh CML.
    let reply = http
        .post(format!("{host}/_sim/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::NO_CONTENT);
    let state = sim.state("i-0abc").unwrap();
    assert!(state.labs.is_empty());
    assert_eq!((state.telemetry_events, state.valid_tokens), (0, 0));
}

#[tokio::test]
async fn options_faults_apply_to_every_host() {
    let (sim, http) = start(SimOptions {
        faults: Faults {
            unreachable: true,
            ..Faults::default()
        },
        ..SimOptions::default()
    })
    .await;
    for base in [sim.base_url(), sim.host_url("i-1")] {
        let reply = http
            .get(format!("{base}/api/v0/system_information"))
            .send()
            .await
            .unwrap();
        assert_eq!(description(reply).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(matches!(
        sim.host("bad name"),
        Err(ccm_cml_sim::SimError::Host(_))
    ));
    // A second simulator cannot take the same port.
    let taken = CmlSim::start(SimOptions {
        port: sim.addr().port(),
        ..SimOptions::default()
    })
    .await;
    assert!(matches!(taken, Err(ccm_cml_sim::SimError::Bind { .. })));
}
