//! Shared by the gateway's integration tests: a real control plane (TestPlane over gRPC on
//! loopback) with a real gateway in front of it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_gateway::{Gateway, GatewaySettings};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// A running gateway; stops when dropped.
pub struct RunningGateway {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl RunningGateway {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start_gateway(settings: GatewaySettings) -> RunningGateway {
    let bound = Gateway::bind(settings).await.expect("gateway binds");
    let addr = bound.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(bound.run(async move {
        let _ = rx.await;
    }));
    RunningGateway {
        addr,
        stop: Some(tx),
    }
}

/// A control plane without auth and a gateway without auth in front of it; the scheduler and
/// controller URLs also point at the plane (which does not serve those services).
pub async fn plane_and_gateway() -> (TestPlane, RunningGateway) {
    let plane = TestPlane::start().await.expect("test plane starts");
    let url = format!("http://{}", plane.addr);
    let mut settings = GatewaySettings::insecure(url.clone());
    settings.scheduler_url = Some(url.clone());
    settings.controller_url = Some(url);
    settings.sse_heartbeat = Duration::from_secs(1);
    let gw = start_gateway(settings).await;
    (plane, gw)
}

pub async fn plane_with(options: TestOptions) -> TestPlane {
    TestPlane::start_with(options)
        .await
        .expect("test plane starts")
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

pub fn template_json(name: &str) -> Value {
    json!({
        "name": name,
        "description": "a test template",
        "instanceType": "m5zn.metal",
        "licenseType": "LICENSE_TYPE_PERSONAL",
        "capacity": {"cpuCores": 48, "memoryGb": 192, "storageGb": 500, "maxNodes": 20},
        "amiPattern": "CML-2.9.*",
        "regions": ["us-east-1"],
        "portRange": {"start": 2000, "end": 9999}
    })
}

/// Sends a request and returns (status, headers, JSON body or Null).
pub async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, headers, value)
}
