//! `s3:` URIs.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::OnceCell;

use crate::{
    Artifact, ArtifactError, ArtifactFetcher, FetcherConfig, S3Config, check_announced, invalid,
    push_limited, redact_uri,
};

/// Provider name recorded with static credentials (shows up in SDK debug logs).
const STATIC_CREDENTIALS_PROVIDER: &str = "ccm-artifacts-static";

/// S3 error codes that mean "nothing there".
const NOT_FOUND_CODES: &[&str] = &["NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchVersion"];
/// S3 error codes that mean "not allowed" (including bad credentials).
const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
];
/// S3 error codes that mean "try again later".
const UNAVAILABLE_CODES: &[&str] = &[
    "InternalError",
    "RequestTimeout",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
];

/// Fetches `s3://bucket/key` with aws-sdk-s3.
///
/// The client is built on the first fetch from [`S3Config`]: region, endpoint (for MinIO or
/// moto), path-style addressing and static credentials, each falling back to the SDK's default
/// chain when not set. Every fetch is bounded by [`FetcherConfig::timeout`] (the SDK's
/// operation timeout, its retries included).
///
/// Error mapping by S3 error code, then by HTTP status: `NoSuchKey`, `NoSuchBucket`, 404 →
/// [`ArtifactError::NotFound`]; `AccessDenied`, bad or expired credentials, 401/403 →
/// [`ArtifactError::Denied`]; `SlowDown`, `InternalError`, 5xx, 429, timeouts and connection
/// failures → [`ArtifactError::Unavailable`]; others (e.g. `InvalidObjectState` for archived
/// objects) → [`ArtifactError::Failed`].
#[derive(Debug)]
pub struct S3Fetcher {
    config: S3Config,
    timeout: Duration,
    max_bytes: u64,
    client: OnceCell<aws_sdk_s3::Client>,
}

impl S3Fetcher {
    /// A fetcher for `config.s3`, with `config`'s timeout and size limit.
    pub fn new(config: &FetcherConfig) -> S3Fetcher {
        S3Fetcher {
            config: config.s3.clone(),
            timeout: config.timeout,
            max_bytes: config.max_bytes,
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> &aws_sdk_s3::Client {
        self.client
            .get_or_init(|| async {
                let cfg = &self.config;
                let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .operation_timeout(self.timeout)
                        .build(),
                );
                if let Some(region) = &cfg.region {
                    loader = loader.region(Region::new(region.clone()));
                }
                if let Some(endpoint) = &cfg.endpoint_url {
                    loader = loader.endpoint_url(endpoint.clone());
                }
                if let Some(creds) = &cfg.credentials {
                    loader = loader.credentials_provider(Credentials::new(
                        creds.access_key_id.clone(),
                        creds.secret_access_key.clone(),
                        creds.session_token.clone(),
                        None,
                        STATIC_CREDENTIALS_PROVIDER,
                    ));
                }
                let sdk_config = loader.load().await;
                let s3_config = aws_sdk_s3::config::Builder::from(&sdk_config)
                    .force_path_style(cfg.force_path_style)
                    .build();
                aws_sdk_s3::Client::from_conf(s3_config)
            })
            .await
    }
}

#[async_trait]
impl ArtifactFetcher for S3Fetcher {
    async fn fetch(&self, uri: &str) -> Result<Artifact, ArtifactError> {
        let (bucket, key) = parse_s3_uri(uri)?;
        let client = self.client().await;
        let mut output = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error(uri, e))?;
        let announced = output.content_length().and_then(|n| u64::try_from(n).ok());
        check_announced(announced, self.max_bytes, uri)?;
        let etag = output.e_tag().map(str::to_owned);
        let last_modified = output
            .last_modified()
            .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()));
        let mut bytes = Vec::new();
        while let Some(chunk) = output.body.next().await {
            let chunk = chunk.map_err(|e| ArtifactError::Unavailable {
                uri: redact_uri(uri),
                detail: format!("reading the object failed: {e}"),
            })?;
            push_limited(&mut bytes, &chunk, self.max_bytes, uri)?;
        }
        Ok(Artifact::new(uri, Bytes::from(bytes), etag, last_modified))
    }
}

/// Splits `s3://bucket/key` into bucket and key.
///
/// The bucket must be a valid S3 bucket name (3–63 characters of `a-z`, `0-9`, `.` and `-`,
/// starting and ending with a letter or digit); the key is everything after the first `/`
/// following the bucket, taken literally, and must not be empty.
pub fn parse_s3_uri(uri: &str) -> Result<(&str, &str), ArtifactError> {
    let rest = uri
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("s3://"))
        .map(|_| &uri[5..])
        .ok_or_else(|| invalid(uri, "an S3 URI must be s3://bucket/key"))?;
    let (bucket, key) = rest
        .split_once('/')
        .ok_or_else(|| invalid(uri, "an S3 URI must be s3://bucket/key (no key)"))?;
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(invalid(
            uri,
            format!("{bucket:?} is not a valid S3 bucket name"),
        ));
    }
    if key.is_empty() {
        return Err(invalid(uri, "an S3 URI must name an object key"));
    }
    Ok((bucket, key))
}

fn sdk_error(uri: &str, err: SdkError<GetObjectError, HttpResponse>) -> ArtifactError {
    let redacted = redact_uri(uri);
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let source = service.err();
            let code = source.code().unwrap_or("");
            let message = source.message().unwrap_or("");
            let detail = format!("S3 error {code} (HTTP {status}) {message}")
                .trim_end()
                .to_owned();
            if matches!(source, GetObjectError::NoSuchKey(_))
                || NOT_FOUND_CODES.contains(&code)
                || (code.is_empty() && status == 404)
            {
                ArtifactError::NotFound {
                    uri: redacted,
                    detail,
                }
            } else if DENIED_CODES.contains(&code) || status == 401 || status == 403 {
                ArtifactError::Denied {
                    uri: redacted,
                    detail,
                }
            } else if UNAVAILABLE_CODES.contains(&code)
                || status >= 500
                || status == 429
                || status == 408
            {
                ArtifactError::Unavailable {
                    uri: redacted,
                    detail,
                }
            } else {
                ArtifactError::Failed {
                    uri: redacted,
                    detail,
                }
            }
        }
        SdkError::ConstructionFailure(_) => ArtifactError::Config(format!(
            "cannot build the S3 request for {redacted}: {}",
            aws_sdk_s3::error::DisplayErrorContext(&err)
        )),
        // Timeouts, connection failures, unreadable responses.
        _ => ArtifactError::Unavailable {
            uri: redacted,
            detail: aws_sdk_s3::error::DisplayErrorContext(&err).to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_key() {
        assert_eq!(
            parse_s3_uri("s3://labs/a/b c.yaml").unwrap(),
            ("labs", "a/b c.yaml")
        );
        assert_eq!(
            parse_s3_uri("S3://my.bucket-1/k").unwrap(),
            ("my.bucket-1", "k")
        );
    }

    #[test]
    fn refuses_bad_uris() {
        for uri in [
            "s3://bucket",
            "s3://bucket/",
            "s3://Bucket/k",
            "s3://ab/k",
            "s3://-bucket/k",
            "s3://bucket_1/k",
            "s3:/bucket/k",
            "s3:bucket/k",
            "https://bucket/k",
        ] {
            let err = parse_s3_uri(uri).unwrap_err();
            assert!(
                matches!(err, ArtifactError::InvalidUri { .. }),
                "{uri}: {err:?}"
            );
        }
    }
}
