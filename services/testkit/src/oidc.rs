//! An OIDC issuer with Keycloak's URL layout, issuing real RS256 tokens, on a free loopback port.
//!
//! [`OidcIssuer::start`] runs `node tools/oidc-issuer/issuer.mjs` (npm `oauth2-mock-server` behind
//! a small wrapper, see that file) and reads the JSON line it prints when ready. The issuer serves
//! `{issuer}/.well-known/openid-configuration` and `{issuer}/protocol/openid-connect/{auth,token,
//! certs,userinfo,logout}` with `issuer = http://127.0.0.1:PORT/realms/REALM`; dropping the
//! [`OidcIssuer`] kills the process.
//!
//! Its users (password grant, password [`TEST_PASSWORD`]) and confidential clients
//! (client credentials) and their realm roles:
//!
//! | name | kind | `realm_access.roles` |
//! |---|---|---|
//! | `admin` | user | admin, manager, user |
//! | `manager` | user | manager, user |
//! | `user` | user | user |
//! | `viewer` | user | viewer |
//! | `assessment` | user and client | assessment |
//! | `guest` | user | (none) |
//! | `operator` | user | (none; `resource_access.<audience>.roles` = admin) |
//! | `scheduler`, `controller` | client | service |
//!
//! Tokens carry `aud = [audience, "account"]` ([`OidcIssuer::audience`], default
//! [`DEFAULT_AUDIENCE`]), `sub` (a stable UUID per name, [`OidcIssuer::subject_of`]),
//! `preferred_username` (`service-account-<client>` for clients) and `azp`.
//!
//! For bad-path tests the issuer also signs arbitrary claims ([`OidcIssuer::sign`]), rotates its
//! key ([`OidcIssuer::rotate_key`]), counts the requests it served ([`OidcIssuer::stats`]), and a
//! [`ForgedSigner`] signs with a second RSA key the issuer never publishes.
//!
//! The error type is [`OidcError`], local to this module (the harness modules were written side
//! by side; it can be folded into a crate-wide error later).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The issuer script, relative to the repository root.
pub const ISSUER_SCRIPT: &str = "tools/oidc-issuer/issuer.mjs";
/// The npm package the script needs, relative to the repository root.
pub const ISSUER_PACKAGE_DIR: &str = "tools/node_modules/oauth2-mock-server";
/// Environment variable naming the `node` program (default: `node` on the `PATH`).
pub const NODE_ENV: &str = "CCM_NODE";
/// The audience the issuer puts in its tokens unless told otherwise.
pub const DEFAULT_AUDIENCE: &str = "ccm-api";
/// The password of every test user.
pub const TEST_PASSWORD: &str = "test";
/// The OAuth client id the harness's password grants name (`azp`).
pub const TEST_CLIENT_ID: &str = "ccm-test";
/// How long [`OidcIssuer::start`] waits for the ready line (Node starts in well under a second; a
/// loaded 2-core machine building Rust can take several).
pub const ISSUER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one request to the issuer.
pub const ISSUER_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the issuer could not be started or did not answer as expected.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The `node` program could not be run.
    #[error(
        "cannot run node ({program}): {source}; install Node.js 20 (apt-get install nodejs npm) \
         or run scripts/test"
    )]
    NodeMissing {
        /// The program tried.
        program: String,
        /// Why spawning failed.
        source: std::io::Error,
    },
    /// `tools/node_modules` lacks oauth2-mock-server.
    #[error("{0} is missing: run scripts/test or (cd tools && npm ci)")]
    NodeModulesMissing(PathBuf),
    /// The script exited or printed something unexpected before it was ready.
    #[error("the OIDC issuer did not start: {0}")]
    Startup(String),
    /// An HTTP request to the issuer failed.
    #[error("request to the OIDC issuer failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The issuer answered with an error.
    #[error("the OIDC issuer answered {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// The name is not in the issuer's user or client table.
    #[error("the OIDC issuer has no user or client named {0:?}")]
    UnknownPrincipal(String),
}

/// A user or client of the issuer as announced in its ready line.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Principal {
    /// The `sub` of its tokens.
    pub sub: String,
    /// Its `realm_access.roles`.
    pub roles: Vec<String>,
    /// The client secret (clients only).
    #[serde(default)]
    pub secret: Option<String>,
}

/// Requests served by the issuer so far ([`OidcIssuer::stats`]).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct IssuerStats {
    /// `GET .well-known/openid-configuration`.
    pub discovery: u64,
    /// `GET protocol/openid-connect/certs` (the JWKS).
    pub certs: u64,
    /// `POST protocol/openid-connect/token`.
    pub token: u64,
    /// `GET protocol/openid-connect/userinfo`.
    pub userinfo: u64,
}

#[derive(Debug, Deserialize)]
struct ReadyLine {
    issuer: String,
    port: u16,
    realm: String,
    audience: String,
    users: HashMap<String, Principal>,
    clients: HashMap<String, Principal>,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    access_token: String,
}

#[derive(Debug, Deserialize)]
struct SignResponse {
    token: String,
}

/// A running issuer process; killed on drop.
#[derive(Debug)]
pub struct OidcIssuer {
    child: Option<Child>,
    ready: ReadyLine,
    http: reqwest::Client,
}

/// The repository root (two levels above this crate's manifest).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn http_client() -> Result<reqwest::Client, OidcError> {
    Ok(reqwest::Client::builder()
        .timeout(ISSUER_REQUEST_TIMEOUT)
        .no_proxy()
        .build()?)
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, OidcError> {
    let status = response.status();
    if status.is_success() {
        Ok(response)
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(OidcError::Refused {
            status: status.as_u16(),
            body,
        })
    }
}

impl OidcIssuer {
    /// Starts an issuer for realm `realm` with audience [`DEFAULT_AUDIENCE`].
    pub async fn start(realm: &str) -> Result<Self, OidcError> {
        Self::start_with_audience(realm, DEFAULT_AUDIENCE).await
    }

    /// Starts an issuer for realm `realm` whose tokens name `audience` in `aud`.
    pub async fn start_with_audience(realm: &str, audience: &str) -> Result<Self, OidcError> {
        let root = repo_root();
        let package = root.join(ISSUER_PACKAGE_DIR);
        if !package.join("package.json").is_file() {
            return Err(OidcError::NodeModulesMissing(package));
        }
        let program = std::env::var(NODE_ENV).unwrap_or_else(|_| "node".to_owned());
        let mut child = Command::new(&program)
            .arg(root.join(ISSUER_SCRIPT))
            .args(["--realm", realm, "--port", "0", "--audience", audience])
            // The script exits when this pipe closes, so it never outlives a crashed test.
            .arg("--exit-on-stdin-close")
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| OidcError::NodeMissing {
                program: program.clone(),
                source,
            })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(OidcError::Startup("no stdout/stderr pipe".into()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(ISSUER_START_TIMEOUT, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = child.start_kill();
                let mut err = String::new();
                let mut stderr_lines = BufReader::new(stderr).lines();
                while let Ok(Ok(Some(l))) =
                    tokio::time::timeout(Duration::from_secs(2), stderr_lines.next_line()).await
                {
                    err.push_str(&l);
                    err.push('\n');
                }
                let why = match other {
                    Err(_) => format!("no ready line within {ISSUER_START_TIMEOUT:?}"),
                    Ok(Err(e)) => format!("reading its output: {e}"),
                    _ => "it exited".to_owned(),
                };
                return Err(OidcError::Startup(format!("{why}; stderr: {err}")));
            }
        };
        let ready: ReadyLine = serde_json::from_str(&line)
            .map_err(|e| OidcError::Startup(format!("unexpected ready line {line:?}: {e}")))?;
        // Keep draining both pipes so the process never blocks on a full pipe.
        tokio::spawn(async move {
            let mut stderr_lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr_lines.next_line().await {
                eprintln!("[oidc-issuer] {line}");
            }
        });
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child: Some(child),
            ready,
            http: http_client()?,
        })
    }

    /// The issuer URL (`iss`): `http://127.0.0.1:PORT/realms/REALM`.
    pub fn issuer(&self) -> &str {
        &self.ready.issuer
    }

    /// The realm name.
    pub fn realm(&self) -> &str {
        &self.ready.realm
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.ready.port
    }

    /// The audience its tokens carry (first entry of `aud`).
    pub fn audience(&self) -> &str {
        &self.ready.audience
    }

    /// The OIDC discovery document URL.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.ready.issuer)
    }

    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/protocol/openid-connect/token", self.ready.issuer)
    }

    /// The JWKS endpoint.
    pub fn jwks_url(&self) -> String {
        format!("{}/protocol/openid-connect/certs", self.ready.issuer)
    }

    fn debug_url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/debug/{name}", self.ready.port)
    }

    /// The user `name` as announced by the issuer.
    pub fn user(&self, name: &str) -> Option<&Principal> {
        self.ready.users.get(name)
    }

    /// The confidential client `client_id` as announced by the issuer (with its secret).
    pub fn client(&self, client_id: &str) -> Option<&Principal> {
        self.ready.clients.get(client_id)
    }

    /// The `sub` of the tokens of user `name` (or of client `name` when no user has that name).
    pub fn subject_of(&self, name: &str) -> Option<&str> {
        self.user(name)
            .or_else(|| self.client(name))
            .map(|p| p.sub.as_str())
    }

    /// The secret of confidential client `client_id`.
    pub fn client_secret(&self, client_id: &str) -> Option<&str> {
        self.client(client_id).and_then(|p| p.secret.as_deref())
    }

    async fn password_grant(
        &self,
        user: &str,
        extra: &[(&str, &str)],
    ) -> Result<String, OidcError> {
        if self.user(user).is_none() {
            return Err(OidcError::UnknownPrincipal(user.to_owned()));
        }
        let mut form = vec![
            ("grant_type", "password"),
            ("username", user),
            ("password", TEST_PASSWORD),
            ("client_id", TEST_CLIENT_ID),
            ("scope", "openid profile email"),
        ];
        form.extend_from_slice(extra);
        let response = self.http.post(self.token_url()).form(&form).send().await?;
        Ok(check(response)
            .await?
            .json::<TokenResponse>()
            .await?
            .access_token)
    }

    /// An access token for test user `username` (password grant).
    pub async fn token_for(&self, username: &str) -> Result<String, OidcError> {
        self.password_grant(username, &[]).await
    }

    /// An access token for `username` that expired ten minutes ago (signed by the issuer).
    pub async fn expired_token_for(&self, username: &str) -> Result<String, OidcError> {
        self.password_grant(username, &[("ccm_expired", "1")]).await
    }

    /// An access token for `username` whose `aud` is `audience` only.
    pub async fn token_with_audience(
        &self,
        username: &str,
        audience: &str,
    ) -> Result<String, OidcError> {
        self.password_grant(username, &[("ccm_audience", audience)])
            .await
    }

    /// An access token for `username` valid for `ttl` (whole seconds).
    pub async fn token_with_ttl(&self, username: &str, ttl: Duration) -> Result<String, OidcError> {
        let secs = ttl.as_secs().to_string();
        self.password_grant(username, &[("ccm_ttl", &secs)]).await
    }

    /// An access token for confidential client `client_id` (client-credentials grant with its
    /// secret, HTTP Basic).
    pub async fn service_token(&self, client_id: &str) -> Result<String, OidcError> {
        let secret = self
            .client_secret(client_id)
            .ok_or_else(|| OidcError::UnknownPrincipal(client_id.to_owned()))?;
        let response = self
            .http
            .post(self.token_url())
            .basic_auth(client_id, Some(secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await?;
        Ok(check(response)
            .await?
            .json::<TokenResponse>()
            .await?
            .access_token)
    }

    async fn sign_with(&self, body: Value) -> Result<String, OidcError> {
        let response = self
            .http
            .post(self.debug_url("sign"))
            .json(&body)
            .send()
            .await?;
        Ok(check(response).await?.json::<SignResponse>().await?.token)
    }

    /// A token signed with the issuer's current key carrying the standard claims of user (or
    /// client) `name`, changed by `overrides` (a JSON object; `null` removes a claim), with
    /// header `kid` replaced by `kid` when given.
    pub async fn sign(
        &self,
        name: &str,
        overrides: Value,
        kid: Option<&str>,
    ) -> Result<String, OidcError> {
        self.sign_with(self.sign_request(name, overrides, kid, "issuer")?)
            .await
    }

    fn sign_request(
        &self,
        name: &str,
        overrides: Value,
        kid: Option<&str>,
        signer: &str,
    ) -> Result<Value, OidcError> {
        let who = if self.user(name).is_some() {
            "user"
        } else if self.client(name).is_some() {
            "client"
        } else {
            return Err(OidcError::UnknownPrincipal(name.to_owned()));
        };
        let mut body = json!({ "claims": overrides, "kid": kid, "signer": signer });
        body[who] = json!(name);
        Ok(body)
    }

    /// A signer using an RSA key of its own that this issuer never publishes.
    pub fn forged_signer(&self) -> ForgedSigner<'_> {
        ForgedSigner { issuer: self }
    }

    /// Makes a new RSA key the signing key (the old one stays in the JWKS) and returns its `kid`.
    pub async fn rotate_key(&self) -> Result<String, OidcError> {
        #[derive(Deserialize)]
        struct Rotated {
            kid: String,
        }
        let response = self.http.post(self.debug_url("rotate")).send().await?;
        Ok(check(response).await?.json::<Rotated>().await?.kid)
    }

    /// Sets the lifetime of every token issued from now on (whole seconds).
    pub async fn set_token_ttl(&self, ttl: Duration) -> Result<(), OidcError> {
        let response = self
            .http
            .post(self.debug_url("config"))
            .json(&json!({ "token_ttl": ttl.as_secs() }))
            .send()
            .await?;
        check(response).await.map(|_| ())
    }

    /// How many requests the issuer has served, per endpoint.
    pub async fn stats(&self) -> Result<IssuerStats, OidcError> {
        let response = self.http.get(self.debug_url("stats")).send().await?;
        Ok(check(response).await?.json().await?)
    }

    /// Kills the process now (for issuer-down tests) and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

impl Drop for OidcIssuer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Signs tokens that look like the issuer's (same `iss`, same claims, by default the same `kid`
/// as the issuer's first key) with a different RSA key, which the issuer generated at start and
/// never publishes in its JWKS: a validator must reject them as badly signed.
#[derive(Debug, Clone, Copy)]
pub struct ForgedSigner<'a> {
    issuer: &'a OidcIssuer,
}

impl ForgedSigner<'_> {
    /// A forged token with the standard claims of user (or client) `name`.
    pub async fn token_for(&self, name: &str) -> Result<String, OidcError> {
        self.sign(name, json!({}), None).await
    }

    /// A forged token for `name` with claim `overrides` and, when given, header `kid`.
    pub async fn sign(
        &self,
        name: &str,
        overrides: Value,
        kid: Option<&str>,
    ) -> Result<String, OidcError> {
        let body = self.issuer.sign_request(name, overrides, kid, "foreign")?;
        self.issuer.sign_with(body).await
    }
}
