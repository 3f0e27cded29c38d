//! Auth at the gateway against real components: the OIDC issuer (oauth2-mock-server with
//! Keycloak's layout), a control plane enforcing RBAC on real tokens, real redis-server for
//! shared sessions, and a real HTTP client following the login redirects.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use ccm_auth::{AuthConfig, AuthLayer, Authenticator};
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_gateway::{GatewaySettings, OidcSettings};
use ccm_testkit::oidc::OidcIssuer;
use common::{RunningGateway, http, start_gateway, template_json};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::Value;

async fn secured_plane(issuer: &OidcIssuer) -> TestPlane {
    let auth = Authenticator::new(AuthConfig::new(issuer.issuer(), [issuer.audience()])).unwrap();
    TestPlane::start_with(TestOptions {
        auth: Some(AuthLayer::new(auth)),
        ..TestOptions::default()
    })
    .await
    .unwrap()
}

async fn secured_gateway(
    issuer: &OidcIssuer,
    plane: &TestPlane,
    redis_url: Option<String>,
) -> RunningGateway {
    let port = ccm_testkit::ports::free_port().unwrap();
    let mut settings = GatewaySettings::insecure(format!("http://{}", plane.addr));
    settings.insecure_no_auth = false;
    settings.listen_addr = ([127, 0, 0, 1], port).into();
    settings.redis_url = redis_url;
    settings.oidc = Some(OidcSettings {
        issuer_url: issuer.issuer().to_owned(),
        client_id: "ccm-web".into(),
        client_secret: None,
        audience: issuer.audience().to_owned(),
        redirect_url: format!("http://127.0.0.1:{port}/auth/callback"),
        scopes: ccm_gateway::DEFAULT_OIDC_SCOPES.into(),
    });
    start_gateway(settings).await
}

/// A browser: follows redirects across the gateway and the issuer, keeping the gateway's
/// session cookie. Returns the last response's status, URL, headers and body, and every
/// Set-Cookie seen.
struct Browser {
    client: reqwest::Client,
    cookie: Option<String>,
    set_cookies: Vec<String>,
}

impl Browser {
    fn new() -> Self {
        Self {
            client: http(),
            cookie: None,
            set_cookies: Vec::new(),
        }
    }

    async fn get(&mut self, start: &str, gateway: &RunningGateway) -> (u16, url::Url, String) {
        let mut url = url::Url::parse(start).unwrap();
        for _ in 0..10 {
            let mut req = self.client.get(url.clone());
            let to_gateway = url.port() == Some(gateway.addr.port());
            if let (true, Some(c)) = (to_gateway, &self.cookie) {
                req = req.header(
                    COOKIE,
                    format!("{}={c}", ccm_gateway::session::SESSION_COOKIE),
                );
            }
            let resp = req.send().await.unwrap();
            if to_gateway {
                for v in resp.headers().get_all(SET_COOKIE) {
                    let v = v.to_str().unwrap().to_owned();
                    let value = v
                        .split(';')
                        .next()
                        .and_then(|kv| kv.split_once('='))
                        .map(|(_, v)| v.to_owned())
                        .unwrap_or_default();
                    self.cookie = (!value.is_empty()).then_some(value);
                    self.set_cookies.push(v);
                }
            }
            if resp.status().is_redirection() {
                let location = resp.headers()[LOCATION].to_str().unwrap().to_owned();
                url = url.join(&location).unwrap();
                continue;
            }
            let status = resp.status().as_u16();
            return (status, url, resp.text().await.unwrap_or_default());
        }
        panic!("too many redirects");
    }

    async fn json(
        &self,
        gateway: &RunningGateway,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, gateway.url(path));
        if let Some(c) = &self.cookie {
            req = req.header(
                COOKIE,
                format!("{}={c}", ccm_gateway::session::SESSION_COOKIE),
            );
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn login(&mut self, gateway: &RunningGateway, user: &str) {
        let (_, url, _) = self
            .get(
                &gateway.url(&format!(
                    "/auth/login?return_to=/workers%3Fview%3Dcards&login_hint={user}"
                )),
                gateway,
            )
            .await;
        assert_eq!(url.port(), Some(gateway.addr.port()), "ended at {url}");
        assert_eq!(url.path(), "/workers");
        assert_eq!(url.query(), Some("view=cards"));
        assert!(self.cookie.is_some(), "no session cookie after login");
    }
}

#[tokio::test]
async fn browser_login_session_api_calls_and_logout() {
    let issuer = OidcIssuer::start("ccm").await.unwrap();
    let plane = secured_plane(&issuer).await;
    let gw = secured_gateway(&issuer, &plane, None).await;

    // Without a session or a bearer: 401 with a challenge.
    let resp = http().get(gw.url("/v1/workers")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let p: Value = resp.json().await.unwrap();
    assert_eq!(p["type"], "urn:ccm:problem:unauthenticated");

    let mut browser = Browser::new();
    browser.login(&gw, "admin").await;
    let cookie = browser.set_cookies.last().unwrap().clone();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(
        !cookie.contains("Secure"),
        "not configured secure: {cookie}"
    );

    let (status, who) = browser
        .json(&gw, reqwest::Method::GET, "/auth/session", None)
        .await;
    assert_eq!(status, 200, "{who}");
    assert_eq!(who["via"], "session");
    assert_eq!(who["username"], "admin");
    assert_eq!(who["subject"], issuer.subject_of("admin").unwrap());
    assert!(
        who["roles"]
            .as_array()
            .unwrap()
            .contains(&Value::from("admin"))
    );
    assert!(
        who["expiresAt"].as_u64().unwrap() > who["accessTokenExpiresAt"].as_u64().unwrap() - 10
    );

    // The session's token reaches the control plane, which enforces RBAC on it.
    let (status, created) = browser
        .json(
            &gw,
            reqwest::Method::POST,
            "/v1/templates",
            Some(template_json("auth-t")),
        )
        .await;
    assert_eq!(status, 200, "{created}");

    // Logout: session gone, cookie cleared, RP-initiated logout at the issuer, back home.
    let (status, url, _) = browser.get(&gw.url("/auth/logout"), &gw).await;
    assert!(browser.set_cookies.last().unwrap().contains("Max-Age=0"));
    assert_eq!(url.port(), Some(gw.addr.port()), "ended at {url}");
    assert_eq!(url.path(), "/");
    assert_ne!(status, 0);
    // The old cookie no longer works.
    let old = cookie.split(';').next().unwrap().to_owned();
    let resp = http()
        .get(gw.url("/auth/session"))
        .header(COOKIE, old)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn logout_redirects_to_the_issuer_end_session_endpoint() {
    let issuer = OidcIssuer::start("ccm").await.unwrap();
    let plane = secured_plane(&issuer).await;
    let gw = secured_gateway(&issuer, &plane, None).await;
    let mut browser = Browser::new();
    browser.login(&gw, "user").await;
    let resp = browser
        .client
        .get(gw.url("/auth/logout"))
        .header(
            COOKIE,
            format!("ccm_session={}", browser.cookie.clone().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let location = url::Url::parse(resp.headers()[LOCATION].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(&format!(
        "{}/protocol/openid-connect/logout",
        issuer.issuer()
    )));
    let q: HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], "ccm-web");
    assert_eq!(
        q["post_logout_redirect_uri"],
        format!("http://{}/", gw.addr)
    );
    assert!(q.contains_key("id_token_hint"));
}

#[tokio::test]
async fn bearer_pass_through_permission_denied_and_bad_callbacks() {
    let issuer = OidcIssuer::start("ccm").await.unwrap();
    let plane = secured_plane(&issuer).await;
    let gw = secured_gateway(&issuer, &plane, None).await;
    let client = http();
    let admin = issuer.token_for("admin").await.unwrap();
    let viewer = issuer.token_for("viewer").await.unwrap();
    let r = client
        .get(gw.url("/v1/workers"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The control plane's PERMISSION_DENIED becomes a 403 problem.
    let r = client
        .post(gw.url("/v1/templates"))
        .bearer_auth(&viewer)
        .json(&template_json("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["grpcStatus"], "PERMISSION_DENIED");
    assert!(p["detail"].as_str().unwrap().contains("admin"), "{p}");
    // A bad bearer token is refused by the control plane: 401 with its challenge.
    let r = client
        .get(gw.url("/v1/workers"))
        .bearer_auth("not.a.jwt")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    // /auth/session also answers for bearer callers.
    let r = client
        .get(gw.url("/auth/session"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let who: Value = r.json().await.unwrap();
    assert_eq!(who["via"], "bearer");
    assert_eq!(who["roles"], serde_json::json!(["viewer"]));
    // A viewer's session gets 403 from the plane too.
    let mut browser = Browser::new();
    browser.login(&gw, "viewer").await;
    let (status, p) = browser
        .json(&gw, reqwest::Method::DELETE, "/v1/templates/x", None)
        .await;
    assert_eq!(status, 403, "{p}");
    // Callbacks with a forged or replayed state are refused.
    let r = client
        .get(gw.url("/auth/callback?code=abc&state=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["fieldViolations"][0]["field"], "state");
    let r = client
        .get(gw.url("/auth/callback?code=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // return_to must stay on the gateway.
    let r = client
        .get(gw.url("/auth/login?return_to=https://evil.example/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The login redirect carries PKCE S256, state and nonce.
    let r = client.get(gw.url("/auth/login")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let location = url::Url::parse(r.headers()[LOCATION].to_str().unwrap()).unwrap();
    let q: HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert!(q["state"].len() >= 43 && q["nonce"].len() >= 43);
    assert_eq!(
        q["redirect_uri"],
        format!("http://{}/auth/callback", gw.addr)
    );
}

#[tokio::test]
async fn access_tokens_near_expiry_are_refreshed() {
    let issuer = OidcIssuer::start("ccm").await.unwrap();
    let plane = secured_plane(&issuer).await;
    let gw = secured_gateway(&issuer, &plane, None).await;
    // Tokens live 30 s, inside the refresh margin: every use of the session refreshes.
    assert!(ccm_gateway::session::REFRESH_MARGIN > Duration::from_secs(30));
    issuer.set_token_ttl(Duration::from_secs(30)).await.unwrap();
    let mut browser = Browser::new();
    browser.login(&gw, "manager").await;
    let before = issuer.stats().await.unwrap().token;
    let (status, _) = browser
        .json(&gw, reqwest::Method::GET, "/v1/workers", None)
        .await;
    assert_eq!(status, 200);
    let after = issuer.stats().await.unwrap().token;
    assert_eq!(after, before + 1, "one refresh_token grant");
    let (status, who) = browser
        .json(&gw, reqwest::Method::GET, "/auth/session", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(who["username"], "manager");
    // Longer-lived tokens are not refreshed.
    issuer
        .set_token_ttl(Duration::from_secs(3600))
        .await
        .unwrap();
    let mut browser = Browser::new();
    browser.login(&gw, "manager").await;
    let before = issuer.stats().await.unwrap().token;
    let (status, _) = browser
        .json(&gw, reqwest::Method::GET, "/v1/workers", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(issuer.stats().await.unwrap().token, before);
}

/// A redis-server on a free port, without persistence; killed on drop.
struct Redis {
    child: tokio::process::Child,
    port: u16,
}

impl Redis {
    async fn start() -> Redis {
        let port = ccm_testkit::ports::free_port().unwrap();
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (apt-get install redis-server, or run scripts/test)");
        assert!(
            tokio::task::spawn_blocking(move || ccm_testkit::ports::wait_for_port(
                port,
                Duration::from_secs(10)
            ))
            .await
            .unwrap(),
            "redis-server did not start"
        );
        Redis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn replicas_share_sessions_through_redis() {
    let redis = Redis::start().await;
    let issuer = OidcIssuer::start("ccm").await.unwrap();
    let plane = secured_plane(&issuer).await;
    let a = secured_gateway(&issuer, &plane, Some(redis.url())).await;
    let b = secured_gateway(&issuer, &plane, Some(redis.url())).await;
    let mut browser = Browser::new();
    browser.login(&a, "admin").await;
    let cookie = format!("ccm_session={}", browser.cookie.clone().unwrap());
    let client = http();
    // The session made on A works on B.
    let r = client
        .get(b.url("/auth/session"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let who: Value = r.json().await.unwrap();
    assert_eq!(who["username"], "admin");
    let r = client
        .get(b.url("/v1/workers"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Logging out on B ends it on A.
    let r = client
        .get(b.url("/auth/logout"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = client
        .get(a.url("/auth/session"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
