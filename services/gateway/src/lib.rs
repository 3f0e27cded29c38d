//! # ccm-gateway — HTTP/JSON, SSE, OIDC login, OpenAPI and the web UI
//!
//! The gateway puts an HTTP face on ccm's gRPC services with no per-endpoint code: every route
//! comes from a `google.api.http` rule in the contracts ([`routes`]), requests and responses are
//! transcoded with prost-reflect ([`transcode`]) and sent with a generic codec ([`codec`]) to the
//! process that serves the RPC (control plane, scheduler or controller). Errors are RFC 9457
//! problem documents with the `google.rpc` details decoded ([`problem`]). The change feed is
//! relayed as Server-Sent Events ([`sse`]), `/openapi.json` and the `/api/docs` page are built
//! from the same descriptors ([`openapi`]), browsers log in with OIDC authorization code + PKCE
//! and get a server-side session ([`session`], [`oidc`]), and the built web UI is served from a
//! directory ([`ui`]).
//!
//! Entry points: [`GatewayArgs`] (the `ccm serve gateway` flags) → [`GatewaySettings`] →
//! [`Gateway::bind`] → [`BoundGateway::run`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod codec;
pub mod error;
pub mod metrics;
pub mod oidc;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod server;
pub mod session;
pub mod sse;
pub mod transcode;
pub mod ui;

pub use error::GatewayError;
pub use server::{BoundGateway, Gateway};

/// Default listen address: loopback only.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:8080";
/// Default control-plane gRPC endpoint.
pub const DEFAULT_CONTROL_PLANE_URL: &str = "http://127.0.0.1:50051";
/// Default directory of the built web UI.
pub const DEFAULT_UI_DIR: &str = "web/dist";
/// Default lifetime of a browser session (absolute; a new login is needed after it).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Default audience the API's access tokens carry (the control plane's `auth.audience`).
pub const DEFAULT_OIDC_AUDIENCE: &str = "ccm-api";
/// Default OAuth scopes requested at login.
pub const DEFAULT_OIDC_SCOPES: &str = "openid profile email";
/// Default OAuth client id of the browser login.
pub const DEFAULT_OIDC_CLIENT_ID: &str = "ccm-web";

/// Command-line flags of `ccm serve gateway`; every flag also reads `CCM_GATEWAY__<NAME>`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct GatewayArgs {
    /// Address to listen on (HTTP/1.1 and h2c).
    #[arg(long, env = "CCM_GATEWAY__LISTEN_ADDR", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,
    /// gRPC endpoint of the control plane (Definition, Instance, Worker, Template, Event services).
    #[arg(long, env = "CCM_GATEWAY__CONTROL_PLANE_URL", default_value = DEFAULT_CONTROL_PLANE_URL)]
    pub control_plane_url: String,
    /// gRPC endpoint of the scheduler (SchedulerService); without it those routes answer 503.
    #[arg(long, env = "CCM_GATEWAY__SCHEDULER_URL")]
    pub scheduler_url: Option<String>,
    /// gRPC endpoint of the controller (ControllerService); without it those routes answer 503.
    #[arg(long, env = "CCM_GATEWAY__CONTROLLER_URL")]
    pub controller_url: Option<String>,
    /// OIDC issuer URL (Keycloak: `https://HOST/realms/REALM`); enables browser login.
    #[arg(long, env = "CCM_GATEWAY__OIDC_ISSUER_URL")]
    pub oidc_issuer_url: Option<String>,
    /// OAuth client id of the browser login.
    #[arg(long, env = "CCM_GATEWAY__OIDC_CLIENT_ID", default_value = DEFAULT_OIDC_CLIENT_ID)]
    pub oidc_client_id: String,
    /// OAuth client secret (confidential client); omit for a public client (PKCE only).
    #[arg(long, env = "CCM_GATEWAY__OIDC_CLIENT_SECRET", hide_env_values = true)]
    pub oidc_client_secret: Option<String>,
    /// Audience the API's access tokens carry (checked on login).
    #[arg(long, env = "CCM_GATEWAY__OIDC_AUDIENCE", default_value = DEFAULT_OIDC_AUDIENCE)]
    pub oidc_audience: String,
    /// Login redirect URL registered at the issuer, `https://HOST/auth/callback`
    /// (default: `http://<listen addr>/auth/callback`).
    #[arg(long, env = "CCM_GATEWAY__OIDC_REDIRECT_URL")]
    pub oidc_redirect_url: Option<String>,
    /// Mark the session cookie `Secure` (set it whenever the gateway is reached over HTTPS).
    #[arg(long, env = "CCM_GATEWAY__COOKIE_SECURE")]
    pub cookie_secure: bool,
    /// Lifetime of a browser session, in seconds.
    #[arg(long, env = "CCM_GATEWAY__SESSION_TTL_SECS", default_value_t = DEFAULT_SESSION_TTL.as_secs())]
    pub session_ttl_secs: u64,
    /// Redis URL for sessions shared by several gateway replicas (`redis://host:6379/0`);
    /// without it sessions live in this process.
    #[arg(long, env = "CCM_GATEWAY__REDIS_URL")]
    pub redis_url: Option<String>,
    /// Directory of the built web UI.
    #[arg(long, env = "CCM_GATEWAY__UI_DIR", default_value = DEFAULT_UI_DIR)]
    pub ui_dir: PathBuf,
    /// Run without authentication: no login, calls pass through with no token (development
    /// only; the control plane must run with --insecure-no-auth too).
    #[arg(long, env = "CCM_GATEWAY__INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

/// OIDC settings of the browser login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcSettings {
    /// The issuer URL.
    pub issuer_url: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret, for a confidential client.
    pub client_secret: Option<String>,
    /// Audience of the API's access tokens.
    pub audience: String,
    /// Where the issuer sends the browser back: `…/auth/callback`.
    pub redirect_url: String,
    /// Scopes requested.
    pub scopes: String,
}

/// Everything the gateway runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    /// Listen address (port 0 = any free port).
    pub listen_addr: SocketAddr,
    /// Control-plane gRPC endpoint.
    pub control_plane_url: String,
    /// Scheduler gRPC endpoint.
    pub scheduler_url: Option<String>,
    /// Controller gRPC endpoint.
    pub controller_url: Option<String>,
    /// Browser login; `None` with `insecure_no_auth` (or for a bearer-only gateway).
    pub oidc: Option<OidcSettings>,
    /// `Secure` on the session cookie.
    pub cookie_secure: bool,
    /// Session lifetime.
    pub session_ttl: Duration,
    /// Redis URL for shared sessions.
    pub redis_url: Option<String>,
    /// Directory of the built UI.
    pub ui_dir: PathBuf,
    /// No authentication at all.
    pub insecure_no_auth: bool,
    /// Interval of SSE heartbeat comments (default [`sse::DEFAULT_HEARTBEAT`]).
    pub sse_heartbeat: Duration,
}

impl GatewaySettings {
    /// Settings with every default, for `control_plane_url`, auth off.
    pub fn insecure(control_plane_url: impl Into<String>) -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            control_plane_url: control_plane_url.into(),
            scheduler_url: None,
            controller_url: None,
            oidc: None,
            cookie_secure: false,
            session_ttl: DEFAULT_SESSION_TTL,
            redis_url: None,
            ui_dir: PathBuf::from(DEFAULT_UI_DIR),
            insecure_no_auth: true,
            sse_heartbeat: sse::DEFAULT_HEARTBEAT,
        }
    }

    /// Validates the flags and turns them into settings.
    pub fn from_args(args: &GatewayArgs) -> Result<Self, GatewayError> {
        let oidc = match (&args.oidc_issuer_url, args.insecure_no_auth) {
            (Some(_), true) => {
                return Err(GatewayError::Config(
                    "--oidc-issuer-url and --insecure-no-auth exclude each other".into(),
                ));
            }
            (None, false) => {
                return Err(GatewayError::Config(
                    "no OIDC issuer: set --oidc-issuer-url (CCM_GATEWAY__OIDC_ISSUER_URL), or \
                     --insecure-no-auth for development"
                        .into(),
                ));
            }
            (None, true) => None,
            (Some(issuer), false) => {
                url::Url::parse(issuer).map_err(|e| {
                    GatewayError::Config(format!("--oidc-issuer-url {issuer:?}: {e}"))
                })?;
                let redirect_url = args
                    .oidc_redirect_url
                    .clone()
                    .unwrap_or_else(|| format!("http://{}/auth/callback", args.listen_addr));
                url::Url::parse(&redirect_url).map_err(|e| {
                    GatewayError::Config(format!("--oidc-redirect-url {redirect_url:?}: {e}"))
                })?;
                Some(OidcSettings {
                    issuer_url: issuer.trim_end_matches('/').to_owned(),
                    client_id: args.oidc_client_id.clone(),
                    client_secret: args.oidc_client_secret.clone(),
                    audience: args.oidc_audience.clone(),
                    redirect_url,
                    scopes: DEFAULT_OIDC_SCOPES.to_owned(),
                })
            }
        };
        if args.session_ttl_secs == 0 {
            return Err(GatewayError::Config(
                "--session-ttl-secs must be positive".into(),
            ));
        }
        if args.insecure_no_auth && !args.listen_addr.ip().is_loopback() {
            tracing::warn!(
                addr = %args.listen_addr,
                "the gateway runs WITHOUT AUTHENTICATION on a non-loopback address"
            );
        }
        Ok(Self {
            listen_addr: args.listen_addr,
            control_plane_url: args.control_plane_url.clone(),
            scheduler_url: args.scheduler_url.clone(),
            controller_url: args.controller_url.clone(),
            oidc,
            cookie_secure: args.cookie_secure,
            session_ttl: Duration::from_secs(args.session_ttl_secs),
            redis_url: args.redis_url.clone(),
            ui_dir: args.ui_dir.clone(),
            insecure_no_auth: args.insecure_no_auth,
            sse_heartbeat: sse::DEFAULT_HEARTBEAT,
        })
    }
}
