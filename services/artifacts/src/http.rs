//! `https:` (and, when allowed, `http:`) URIs.

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::{ETAG, LAST_MODIFIED};

use crate::{
    Artifact, ArtifactError, ArtifactFetcher, FetcherConfig, check_announced, invalid,
    push_limited, redact_uri,
};

/// `User-Agent` sent with artifact requests.
pub const USER_AGENT: &str = concat!("ccm-artifacts/", env!("CARGO_PKG_VERSION"));

/// Fetches `https:` URIs (and `http:` ones when [`FetcherConfig::allow_http`] is set) with
/// reqwest over rustls.
///
/// Status mapping: 2xx → the artifact; 404 and 410 → [`ArtifactError::NotFound`]; 401 and 403
/// → [`ArtifactError::Denied`]; 408, 429 and 5xx → [`ArtifactError::Unavailable`]; any other
/// status → [`ArtifactError::Failed`]. Connection, TLS and timeout errors are
/// [`ArtifactError::Unavailable`]; too many redirects, or a redirect to `http:` while plain
/// HTTP is not allowed, are [`ArtifactError::Failed`].
#[derive(Debug, Clone)]
pub struct HttpFetcher {
    client: reqwest::Client,
    allow_http: bool,
    max_bytes: u64,
}

impl HttpFetcher {
    /// Builds the HTTP client from `config` (timeouts, redirect limit, `allow_http`).
    pub fn new(config: &FetcherConfig) -> Result<HttpFetcher, ArtifactError> {
        let max_redirects = config.max_redirects;
        let allow_http = config.allow_http;
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                attempt.error(format!("more than {max_redirects} redirects"))
            } else if !allow_http && attempt.url().scheme() != "https" {
                attempt.error("redirect to a non-https URL refused (plain HTTP is not allowed)")
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .redirect(policy)
            .https_only(!allow_http)
            .build()
            .map_err(|e| ArtifactError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpFetcher {
            client,
            allow_http,
            max_bytes: config.max_bytes,
        })
    }
}

#[async_trait]
impl ArtifactFetcher for HttpFetcher {
    async fn fetch(&self, uri: &str) -> Result<Artifact, ArtifactError> {
        let url = reqwest::Url::parse(uri).map_err(|e| invalid(uri, e.to_string()))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(invalid(
                    uri,
                    "plain http:// is not allowed; use https:// (or enable allow_http)",
                ));
            }
            other => return Err(invalid(uri, format!("not an HTTP URL (scheme {other:?})"))),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid(uri, "no host"));
        }

        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| request_error(uri, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(status_error(uri, status));
        }
        check_announced(response.content_length(), self.max_bytes, uri)?;
        let etag = header_string(&response, ETAG);
        let last_modified = header_string(&response, LAST_MODIFIED)
            .and_then(|v| DateTime::parse_from_rfc2822(&v).ok())
            .map(|t| t.with_timezone(&Utc));

        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| request_error(uri, &e))? {
            push_limited(&mut bytes, &chunk, self.max_bytes, uri)?;
        }
        Ok(Artifact::new(uri, Bytes::from(bytes), etag, last_modified))
    }
}

fn header_string(
    response: &reqwest::Response,
    name: reqwest::header::HeaderName,
) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn status_error(uri: &str, status: StatusCode) -> ArtifactError {
    let uri = redact_uri(uri);
    let detail = format!("HTTP status {status}");
    match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => ArtifactError::NotFound { uri, detail },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ArtifactError::Denied { uri, detail },
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
            ArtifactError::Unavailable { uri, detail }
        }
        s if s.is_server_error() => ArtifactError::Unavailable { uri, detail },
        _ => ArtifactError::Failed { uri, detail },
    }
}

fn request_error(uri: &str, err: &reqwest::Error) -> ArtifactError {
    let uri = redact_uri(uri);
    // reqwest's Display is terse; include the source chain (e.g. "connection refused").
    let mut detail = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    // Reqwest's messages may quote the URL: strip queries from them as well.
    let detail = detail
        .split_whitespace()
        .map(|word| {
            if word.contains("://") {
                redact_uri(word.trim_matches(|c| c == '(' || c == ')' || c == ','))
            } else {
                word.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    if err.is_redirect() {
        ArtifactError::Failed { uri, detail }
    } else if err.is_builder() {
        ArtifactError::InvalidUri {
            uri,
            reason: detail,
        }
    } else {
        // Timeouts, connection and TLS failures, interrupted bodies.
        ArtifactError::Unavailable { uri, detail }
    }
}
