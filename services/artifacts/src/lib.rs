//! # ccm-artifacts — fetching lab artifacts
//!
//! A lablet definition points at its CML lab YAML (and optionally its grading rules) by URI
//! (domain.md §1.1 `lab_artifact_uri`). The control plane fetches it on create and sync to
//! compute its hash, and the controller fetches it again to instantiate a lab. This crate does
//! the fetching behind one trait, [`ArtifactFetcher`], and returns an [`Artifact`]: the bytes,
//! their hash `sha256:<hex>` ([`ccm_core::version::content_hash`]) and the source's validators
//! (ETag, Last-Modified) when it has them.
//!
//! [`DefaultFetcher`] dispatches on the scheme:
//!
//! | scheme | fetcher | notes |
//! |---|---|---|
//! | `file:///abs/path` | [`FileFetcher`] | absolute local paths only; optional root directory |
//! | `https://host/path` | [`HttpFetcher`] | rustls; `http://` only when [`FetcherConfig::allow_http`] |
//! | `s3://bucket/key` | [`S3Fetcher`] | aws-sdk-s3; region, endpoint, credentials configurable |
//!
//! ## Limits and safety
//!
//! - Size: at most [`FetcherConfig::max_bytes`] (default [`DEFAULT_MAX_ARTIFACT_BYTES`],
//!   16 MiB). The limit is checked against the announced size (file metadata,
//!   `Content-Length`, S3 `ContentLength`) and enforced again while reading, so a source that
//!   lies or streams without a length cannot make the fetcher buffer more than the limit plus
//!   one chunk.
//! - `file:` URIs must be `file:///absolute/path` (or `file://localhost/absolute/path`),
//!   percent-encoded; relative paths, other hosts and any `..` segment are refused as
//!   [`ArtifactError::InvalidUri`]. When [`FetcherConfig::file_root`] is set, the path is
//!   resolved (symlinks included) and must stay inside that directory, otherwise
//!   [`ArtifactError::Denied`]. Production deployments that accept URIs from API users should
//!   set a root: without one, any file the process can read can be fetched.
//! - HTTP: TLS is rustls (reqwest's `rustls` feature, certificates verified by
//!   rustls-platform-verifier against the operating system's trust store). Plain `http://` is
//!   refused unless [`FetcherConfig::allow_http`] is set, and then also as a redirect target. At
//!   most [`FetcherConfig::max_redirects`] redirects are followed; the whole request is bounded
//!   by [`FetcherConfig::timeout`]. No proxy is taken from the environment.
//! - S3: the key is taken literally (everything after the first `/` following the bucket, not
//!   percent-decoded), as the AWS CLI does. Path-style addressing and a custom endpoint make it
//!   work against MinIO or the moto emulator.
//! - Errors and logs carry the URI without user-info, query string and fragment
//!   ([`redact_uri`]), so pre-signed URL signatures and passwords do not leak.
//!
//! Each error variant documents its gRPC status code ([`ArtifactError::grpc_code`]); only
//! [`ArtifactError::Unavailable`] is worth retrying.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod file;
mod http;
mod s3;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tracing::Instrument;

pub use error::ArtifactError;
pub use file::FileFetcher;
pub use http::HttpFetcher;
pub use s3::{S3Fetcher, parse_s3_uri};

/// Largest artifact fetched by default: 16 MiB (CML lab YAML files are kilobytes to a few MiB).
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 16 * 1024 * 1024;
/// Default bound on one whole fetch (connect, redirects, body) over HTTP or S3.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on establishing one connection (TCP and TLS).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of HTTP redirects followed before giving up.
pub const DEFAULT_MAX_REDIRECTS: usize = 5;
/// Plain `http://` is refused by default.
pub const DEFAULT_ALLOW_HTTP: bool = false;
/// S3 addressing defaults to virtual-hosted style (`bucket.endpoint/key`, what AWS wants);
/// set [`S3Config::force_path_style`] for moto and most MinIO setups.
pub const DEFAULT_S3_FORCE_PATH_STYLE: bool = false;

/// Fetches artifacts by URI.
#[async_trait]
pub trait ArtifactFetcher: Send + Sync {
    /// Fetches the artifact at `uri` in full.
    async fn fetch(&self, uri: &str) -> Result<Artifact, ArtifactError>;
}

/// A fetched artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The URI it was fetched from, as given.
    pub uri: String,
    /// The content.
    pub bytes: Bytes,
    /// `sha256:<64 lowercase hex>` of [`Artifact::bytes`].
    pub content_hash: String,
    /// The source's entity tag (HTTP `ETag`, S3 `ETag`), quotes included as sent.
    pub etag: Option<String>,
    /// When the source says the content last changed (file mtime, HTTP `Last-Modified`, S3
    /// `LastModified`).
    pub last_modified: Option<DateTime<Utc>>,
}

impl Artifact {
    /// Builds an artifact from its bytes, computing the hash.
    pub fn new(
        uri: impl Into<String>,
        bytes: Bytes,
        etag: Option<String>,
        last_modified: Option<DateTime<Utc>>,
    ) -> Artifact {
        let content_hash = ccm_core::version::content_hash(&bytes);
        Artifact {
            uri: uri.into(),
            bytes,
            content_hash,
            etag,
            last_modified,
        }
    }

    /// The content as UTF-8 text (lab YAML), or `None` if it is not valid UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.bytes).ok()
    }
}

/// Static AWS credentials (for tests against moto, or MinIO). Production normally leaves
/// [`S3Config::credentials`] empty and uses the default provider chain (environment, profile,
/// instance role).
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How to reach S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// AWS region, e.g. `us-east-1`. `None`: the default chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// Custom endpoint, e.g. `http://127.0.0.1:5000` for moto or a MinIO URL. `None`: AWS.
    pub endpoint_url: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key` instead of `bucket.endpoint/key`); needed
    /// for moto and most MinIO setups. Default [`DEFAULT_S3_FORCE_PATH_STYLE`].
    pub force_path_style: bool,
    /// Static credentials. `None`: the default provider chain.
    pub credentials: Option<StaticCredentials>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            region: None,
            endpoint_url: None,
            force_path_style: DEFAULT_S3_FORCE_PATH_STYLE,
            credentials: None,
        }
    }
}

/// Configuration of [`DefaultFetcher`] (and of the per-scheme fetchers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetcherConfig {
    /// Largest artifact accepted, in bytes. Default [`DEFAULT_MAX_ARTIFACT_BYTES`].
    pub max_bytes: u64,
    /// Bound on one whole HTTP or S3 fetch. Default [`DEFAULT_FETCH_TIMEOUT`].
    pub timeout: Duration,
    /// Bound on establishing a connection. Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Redirects followed. Default [`DEFAULT_MAX_REDIRECTS`].
    pub max_redirects: usize,
    /// Accept plain `http://` URIs and redirects. Default [`DEFAULT_ALLOW_HTTP`] (`false`).
    pub allow_http: bool,
    /// When set, `file:` paths must resolve (symlinks included) inside this directory.
    /// Default `None`: any absolute path the process can read.
    pub file_root: Option<PathBuf>,
    /// S3 settings.
    pub s3: S3Config,
}

impl Default for FetcherConfig {
    fn default() -> Self {
        FetcherConfig {
            max_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
            timeout: DEFAULT_FETCH_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_redirects: DEFAULT_MAX_REDIRECTS,
            allow_http: DEFAULT_ALLOW_HTTP,
            file_root: None,
            s3: S3Config::default(),
        }
    }
}

/// The URI schemes [`DefaultFetcher`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `file:`
    File,
    /// `https:` (and `http:` when allowed)
    Http,
    /// `s3:`
    S3,
}

impl Scheme {
    /// Reads the scheme of `uri` (case-insensitive).
    pub fn of(uri: &str) -> Result<Scheme, ArtifactError> {
        let Some((scheme, _)) = uri.split_once(':') else {
            return Err(invalid(uri, "no scheme; use file://, https:// or s3://"));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => Ok(Scheme::File),
            "https" | "http" => Ok(Scheme::Http),
            "s3" => Ok(Scheme::S3),
            other => Err(invalid(
                uri,
                format!("unsupported scheme {other:?}; use file://, https:// or s3://"),
            )),
        }
    }

    /// Lower-case name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::File => "file",
            Scheme::Http => "http",
            Scheme::S3 => "s3",
        }
    }
}

/// Fetches `file:`, `https:` (and `http:` if allowed) and `s3:` URIs.
#[derive(Debug)]
pub struct DefaultFetcher {
    file: FileFetcher,
    http: HttpFetcher,
    s3: S3Fetcher,
}

impl DefaultFetcher {
    /// Builds the fetchers. The S3 client is created on the first `s3:` fetch (it may read the
    /// environment and instance metadata), so building this is cheap and does no I/O.
    pub fn new(config: FetcherConfig) -> Result<DefaultFetcher, ArtifactError> {
        Ok(DefaultFetcher {
            file: FileFetcher::new(config.file_root.clone(), config.max_bytes),
            http: HttpFetcher::new(&config)?,
            s3: S3Fetcher::new(&config),
        })
    }
}

#[async_trait]
impl ArtifactFetcher for DefaultFetcher {
    async fn fetch(&self, uri: &str) -> Result<Artifact, ArtifactError> {
        let scheme = Scheme::of(uri)?;
        let span = tracing::info_span!(
            "artifact.fetch",
            uri = %redact_uri(uri),
            scheme = scheme.as_str()
        );
        async move {
            let result = match scheme {
                Scheme::File => self.file.fetch(uri).await,
                Scheme::Http => self.http.fetch(uri).await,
                Scheme::S3 => self.s3.fetch(uri).await,
            };
            match &result {
                Ok(artifact) => tracing::debug!(
                    bytes = artifact.bytes.len(),
                    hash = %artifact.content_hash,
                    "artifact fetched"
                ),
                Err(err) => tracing::debug!(error = %err, "artifact fetch failed"),
            }
            result
        }
        .instrument(span)
        .await
    }
}

/// The URI without user-info, query string and fragment, for errors and logs.
///
/// `https://user:pw@host/a?X-Amz-Signature=…#f` becomes `https://host/a`. Other URIs (and
/// HTTP URLs that do not parse) lose the user-info of their authority and are cut at the first
/// `?` or `#`; their path is left as written.
pub fn redact_uri(uri: &str) -> String {
    let is_http = uri.split_once(':').is_some_and(|(scheme, _)| {
        matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
    });
    match reqwest::Url::parse(uri) {
        // Only HTTP URLs go through the URL parser: it would normalise `file:` paths and
        // percent-encode literal S3 keys, changing what the error shows.
        Ok(mut url) if is_http && url.has_host() => {
            // Both setters only fail for URLs that cannot have credentials; ignore that case.
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        _ => {
            let end = uri.find(['?', '#']).unwrap_or(uri.len());
            let cut = &uri[..end];
            // Drop user-info of an authority that did not parse.
            match cut.split_once("://") {
                Some((scheme, rest)) => {
                    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                    let host = authority.rsplit('@').next().unwrap_or(authority);
                    format!("{scheme}://{host}{path}")
                }
                None => cut.to_owned(),
            }
        }
    }
}

/// Shorthand for [`ArtifactError::InvalidUri`].
pub(crate) fn invalid(uri: &str, reason: impl Into<String>) -> ArtifactError {
    ArtifactError::InvalidUri {
        uri: redact_uri(uri),
        reason: reason.into(),
    }
}

/// Appends `chunk` to `buf`, failing with [`ArtifactError::TooLarge`] once more than `limit`
/// bytes were seen.
pub(crate) fn push_limited(
    buf: &mut Vec<u8>,
    chunk: &[u8],
    limit: u64,
    uri: &str,
) -> Result<(), ArtifactError> {
    let total = buf.len() as u64 + chunk.len() as u64;
    if total > limit {
        return Err(ArtifactError::TooLarge {
            uri: redact_uri(uri),
            limit,
            size: None,
        });
    }
    buf.extend_from_slice(chunk);
    Ok(())
}

/// Fails with [`ArtifactError::TooLarge`] when an announced size exceeds the limit.
pub(crate) fn check_announced(
    size: Option<u64>,
    limit: u64,
    uri: &str,
) -> Result<(), ArtifactError> {
    match size {
        Some(size) if size > limit => Err(ArtifactError::TooLarge {
            uri: redact_uri(uri),
            limit,
            size: Some(size),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_dispatch() {
        assert_eq!(Scheme::of("file:///x").unwrap(), Scheme::File);
        assert_eq!(Scheme::of("HTTPS://h/x").unwrap(), Scheme::Http);
        assert_eq!(Scheme::of("http://h/x").unwrap(), Scheme::Http);
        assert_eq!(Scheme::of("s3://b/k").unwrap(), Scheme::S3);
        for bad in ["ftp://h/x", "/abs/path", "relative.yaml", "gs://b/k", ""] {
            let err = Scheme::of(bad).unwrap_err();
            assert!(
                matches!(err, ArtifactError::InvalidUri { .. }),
                "{bad}: {err:?}"
            );
            assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn redaction_removes_secrets() {
        assert_eq!(
            redact_uri("https://user:pw@example.com/a/b.yaml?X-Amz-Signature=abc#frag"),
            "https://example.com/a/b.yaml"
        );
        assert_eq!(redact_uri("s3://bucket/key.yaml"), "s3://bucket/key.yaml");
        assert_eq!(redact_uri("file:///tmp/x.yaml"), "file:///tmp/x.yaml");
        assert_eq!(redact_uri("s3://u:p@bucket/k?token=1"), "s3://bucket/k");
        assert_eq!(redact_uri("weird://u:p@[bad/k?x"), "weird://[bad/k");
        assert_eq!(redact_uri("file:///a/../b c"), "file:///a/../b c");
        assert_eq!(redact_uri("s3://b/my key"), "s3://b/my key");
    }

    #[test]
    fn error_codes_and_retryability() {
        let uri = "s3://b/k".to_owned();
        let cases = [
            (
                ArtifactError::NotFound {
                    uri: uri.clone(),
                    detail: String::new(),
                },
                tonic::Code::NotFound,
                false,
            ),
            (
                ArtifactError::Denied {
                    uri: uri.clone(),
                    detail: String::new(),
                },
                tonic::Code::PermissionDenied,
                false,
            ),
            (
                ArtifactError::TooLarge {
                    uri: uri.clone(),
                    limit: 1,
                    size: Some(2),
                },
                tonic::Code::ResourceExhausted,
                false,
            ),
            (
                ArtifactError::Unavailable {
                    uri: uri.clone(),
                    detail: String::new(),
                },
                tonic::Code::Unavailable,
                true,
            ),
            (
                ArtifactError::Failed {
                    uri: uri.clone(),
                    detail: String::new(),
                },
                tonic::Code::FailedPrecondition,
                false,
            ),
            (
                ArtifactError::Config(String::new()),
                tonic::Code::Internal,
                false,
            ),
        ];
        for (err, code, retryable) in cases {
            assert_eq!(err.grpc_code(), code, "{err:?}");
            assert_eq!(err.is_retryable(), retryable, "{err:?}");
            assert_eq!(tonic::Status::from(err).code(), code);
        }
    }

    #[test]
    fn limit_helpers() {
        let mut buf = Vec::new();
        push_limited(&mut buf, b"12345", 5, "file:///x").unwrap();
        let err = push_limited(&mut buf, b"6", 5, "file:///x").unwrap_err();
        assert!(matches!(
            err,
            ArtifactError::TooLarge {
                limit: 5,
                size: None,
                ..
            }
        ));
        assert_eq!(buf.len(), 5);
        check_announced(Some(5), 5, "file:///x").unwrap();
        check_announced(None, 5, "file:///x").unwrap();
        let err = check_announced(Some(6), 5, "file:///x").unwrap_err();
        assert!(matches!(err, ArtifactError::TooLarge { size: Some(6), .. }));
    }
}
