//! The fetchers against real sources: files in a temporary directory, an HTTP server on
//! loopback (axum), and the moto S3 emulator.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ccm_artifacts::{
    Artifact, ArtifactError, ArtifactFetcher, DefaultFetcher, FetcherConfig, S3Config,
    StaticCredentials,
};
use ccm_testkit::moto::{MotoServer, TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY};

const LAB_YAML: &[u8] =
    b"lab:\n  title: demo\nnodes:\n  - id: n0\n    tags: [serial:${PORT_SERIAL_1}]\n";
/// SHA-256 of "abc" (FIPS 180-2 test vector), to check the hash independently of ccm-core.
const ABC_SHA256: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ccm-artifacts-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display().to_string().replace(' ', "%20"))
}

fn fetcher(config: FetcherConfig) -> DefaultFetcher {
    DefaultFetcher::new(config).unwrap()
}

fn allow_http() -> FetcherConfig {
    FetcherConfig {
        allow_http: true,
        ..FetcherConfig::default()
    }
}

fn expect_err(result: Result<Artifact, ArtifactError>) -> ArtifactError {
    match result {
        Ok(artifact) => panic!("expected an error, got {} bytes", artifact.bytes.len()),
        Err(err) => err,
    }
}

fn assert_not_found(result: Result<Artifact, ArtifactError>) {
    let err = expect_err(result);
    assert!(matches!(err, ArtifactError::NotFound { .. }), "{err:?}");
    assert_eq!(err.grpc_code(), tonic::Code::NotFound);
    assert!(!err.is_retryable());
}

fn assert_invalid(result: Result<Artifact, ArtifactError>) {
    let err = expect_err(result);
    assert!(matches!(err, ArtifactError::InvalidUri { .. }), "{err:?}");
    assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument);
}

fn assert_too_large(result: Result<Artifact, ArtifactError>, limit: u64) {
    let err = expect_err(result);
    match &err {
        ArtifactError::TooLarge { limit: l, .. } => assert_eq!(*l, limit),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(err.grpc_code(), tonic::Code::ResourceExhausted);
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    ccm_testkit::ports::free_port().unwrap()
}

// ---------------------------------------------------------------------------------------------
// file://
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn file_found_returns_bytes_hash_and_mtime() {
    let dir = TempDir::new("found");
    let path = dir.write("my lab.yaml", LAB_YAML);
    let uri = file_uri(&path);
    let artifact = fetcher(FetcherConfig::default()).fetch(&uri).await.unwrap();
    assert_eq!(artifact.uri, uri);
    assert_eq!(&artifact.bytes[..], LAB_YAML);
    assert_eq!(
        artifact.content_hash,
        ccm_core::version::content_hash(LAB_YAML)
    );
    assert_eq!(artifact.text(), std::str::from_utf8(LAB_YAML).ok());
    assert_eq!(artifact.etag, None);
    let mtime = artifact.last_modified.expect("mtime");
    assert!(
        (chrono::Utc::now() - mtime).num_seconds().abs() < 60,
        "{mtime}"
    );

    // Independent check of the hash format and value.
    let abc = dir.write("abc", b"abc");
    let artifact = fetcher(FetcherConfig::default())
        .fetch(&file_uri(&abc))
        .await
        .unwrap();
    assert_eq!(artifact.content_hash, ABC_SHA256);
}

#[tokio::test]
async fn file_missing_is_not_found() {
    let dir = TempDir::new("missing");
    let uri = file_uri(&dir.path().join("nope.yaml"));
    assert_not_found(fetcher(FetcherConfig::default()).fetch(&uri).await);
}

#[tokio::test]
async fn file_relative_and_escaping_paths_are_refused() {
    let dir = TempDir::new("relative");
    dir.write("lab.yaml", LAB_YAML);
    let f = fetcher(FetcherConfig::default());
    let abs = dir.path().display().to_string();
    for uri in [
        "file:lab.yaml".to_owned(),
        "file://lab.yaml".to_owned(),
        "file:./lab.yaml".to_owned(),
        format!(
            "file://{abs}/../{}/lab.yaml",
            dir.path().file_name().unwrap().to_string_lossy()
        ),
        format!("file://{abs}/%2E%2E/etc/passwd"),
        "file://otherhost/etc/passwd".to_owned(),
        format!("file://{abs}"), // a directory
    ] {
        assert_invalid(f.fetch(&uri).await);
    }
    // The well-formed form of the same file works.
    f.fetch(&format!("file://{abs}/lab.yaml")).await.unwrap();
    f.fetch(&format!("file://localhost{abs}/lab.yaml"))
        .await
        .unwrap();
}

#[tokio::test]
async fn file_too_large_is_refused() {
    let dir = TempDir::new("large");
    let path = dir.write("big.yaml", &vec![b'a'; 1001]);
    let exact = dir.write("exact.yaml", &vec![b'a'; 1000]);
    let f = fetcher(FetcherConfig {
        max_bytes: 1000,
        ..FetcherConfig::default()
    });
    assert_too_large(f.fetch(&file_uri(&path)).await, 1000);
    assert_eq!(f.fetch(&file_uri(&exact)).await.unwrap().bytes.len(), 1000);
}

#[tokio::test]
async fn file_root_confines_paths_and_symlinks() {
    let root = TempDir::new("root");
    let outside = TempDir::new("outside");
    let inside = root.write("lab.yaml", LAB_YAML);
    let secret = outside.write("secret.yaml", b"secret");
    let link = root.path().join("escape.yaml");
    std::os::unix::fs::symlink(&secret, &link).unwrap();

    let f = fetcher(FetcherConfig {
        file_root: Some(root.path().to_path_buf()),
        ..FetcherConfig::default()
    });
    assert_eq!(
        &f.fetch(&file_uri(&inside)).await.unwrap().bytes[..],
        LAB_YAML
    );
    for uri in [file_uri(&secret), file_uri(&link)] {
        let err = expect_err(f.fetch(&uri).await);
        assert!(
            matches!(err, ArtifactError::Denied { .. }),
            "{uri}: {err:?}"
        );
        assert_eq!(err.grpc_code(), tonic::Code::PermissionDenied);
    }
    // Missing inside the root is still NotFound.
    assert_not_found(f.fetch(&file_uri(&root.path().join("nope.yaml"))).await);
}

// ---------------------------------------------------------------------------------------------
// http(s)://
// ---------------------------------------------------------------------------------------------

/// An axum server on 127.0.0.1, aborted on drop.
struct TestServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

type Hits = State<Arc<AtomicUsize>>;

impl TestServer {
    async fn start() -> TestServer {
        let hits = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route("/lab.yaml", get(lab))
            .route("/status/{code}", get(status))
            .route("/big", get(big_with_length))
            .route("/big-chunked", get(big_chunked))
            .route("/slow", get(slow))
            .route("/redirect/{n}", get(redirect))
            .route("/loop", get(redirect_loop))
            .with_state(Arc::clone(&hits));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        TestServer { addr, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn lab(State(hits): Hits) -> impl IntoResponse {
    hits.fetch_add(1, Ordering::SeqCst);
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, "\"v1-abc\"".parse().unwrap());
    headers.insert(
        header::LAST_MODIFIED,
        "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
    );
    headers.insert(header::CONTENT_TYPE, "application/yaml".parse().unwrap());
    (headers, LAB_YAML)
}

async fn status(State(hits): Hits, UrlPath(code): UrlPath<u16>) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    (StatusCode::from_u16(code).unwrap(), "status body").into_response()
}

/// 64 KiB with a Content-Length.
async fn big_with_length(State(hits): Hits) -> Vec<u8> {
    hits.fetch_add(1, Ordering::SeqCst);
    vec![b'x'; 64 * 1024]
}

/// 64 KiB streamed without a Content-Length (chunked).
async fn big_chunked(State(hits): Hits) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 1024]));
    Body::from_stream(futures::stream::iter(chunks)).into_response()
}

async fn slow(State(hits): Hits) -> &'static str {
    hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    "late"
}

/// `/redirect/N` redirects to `/redirect/N-1`, and `/redirect/0` to the lab.
async fn redirect(State(hits): Hits, UrlPath(n): UrlPath<u32>) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    let target = if n == 0 {
        "/lab.yaml".to_owned()
    } else {
        format!("/redirect/{}", n - 1)
    };
    (StatusCode::FOUND, [(header::LOCATION, target)]).into_response()
}

async fn redirect_loop(State(hits): Hits) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    (StatusCode::FOUND, [(header::LOCATION, "/loop")]).into_response()
}

#[tokio::test]
async fn http_is_denied_by_default_without_a_request() {
    let server = TestServer::start().await;
    let err = expect_err(
        fetcher(FetcherConfig::default())
            .fetch(&server.url("/lab.yaml"))
            .await,
    );
    assert!(matches!(err, ArtifactError::InvalidUri { .. }), "{err:?}");
    assert!(err.to_string().contains("http://"), "{err}");
    assert_eq!(server.hits(), 0, "no request may be sent");
}

#[tokio::test]
async fn http_allowed_fetches_with_validators() {
    let server = TestServer::start().await;
    let uri = server.url("/lab.yaml");
    let artifact = fetcher(allow_http()).fetch(&uri).await.unwrap();
    assert_eq!(&artifact.bytes[..], LAB_YAML);
    assert_eq!(
        artifact.content_hash,
        ccm_core::version::content_hash(LAB_YAML)
    );
    assert_eq!(artifact.etag.as_deref(), Some("\"v1-abc\""));
    assert_eq!(
        artifact.last_modified.map(|t| t.to_rfc3339()),
        Some("2015-10-21T07:28:00+00:00".to_owned())
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn http_statuses_map_to_error_kinds() {
    let server = TestServer::start().await;
    let f = fetcher(allow_http());
    for (code, want) in [
        (404, tonic::Code::NotFound),
        (410, tonic::Code::NotFound),
        (401, tonic::Code::PermissionDenied),
        (403, tonic::Code::PermissionDenied),
        (408, tonic::Code::Unavailable),
        (429, tonic::Code::Unavailable),
        (500, tonic::Code::Unavailable),
        (503, tonic::Code::Unavailable),
        (400, tonic::Code::FailedPrecondition),
        (416, tonic::Code::FailedPrecondition),
    ] {
        let err = expect_err(f.fetch(&server.url(&format!("/status/{code}"))).await);
        assert_eq!(err.grpc_code(), want, "HTTP {code}: {err:?}");
        assert_eq!(
            err.is_retryable(),
            want == tonic::Code::Unavailable,
            "HTTP {code}"
        );
        assert!(err.to_string().contains(&code.to_string()), "{err}");
    }
}

#[tokio::test]
async fn http_too_large_by_length_and_while_streaming() {
    let server = TestServer::start().await;
    let limit = 32 * 1024;
    let f = fetcher(FetcherConfig {
        max_bytes: limit,
        ..allow_http()
    });
    let err = expect_err(f.fetch(&server.url("/big")).await);
    assert!(
        matches!(
            err,
            ArtifactError::TooLarge {
                size: Some(65536),
                ..
            }
        ),
        "announced size is reported: {err:?}"
    );
    assert_too_large(f.fetch(&server.url("/big-chunked")).await, limit);
    // Under a large enough limit both succeed.
    let f = fetcher(allow_http());
    assert_eq!(
        f.fetch(&server.url("/big")).await.unwrap().bytes.len(),
        65536
    );
    assert_eq!(
        f.fetch(&server.url("/big-chunked"))
            .await
            .unwrap()
            .bytes
            .len(),
        65536
    );
}

#[tokio::test]
async fn http_timeout_and_refused_connection_are_unavailable() {
    let server = TestServer::start().await;
    let f = fetcher(FetcherConfig {
        timeout: Duration::from_millis(300),
        ..allow_http()
    });
    let started = Instant::now();
    let err = expect_err(f.fetch(&server.url("/slow")).await);
    assert!(matches!(err, ArtifactError::Unavailable { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "timeout not applied"
    );

    let err = expect_err(
        f.fetch(&format!("http://127.0.0.1:{}/lab.yaml", closed_port()))
            .await,
    );
    assert!(matches!(err, ArtifactError::Unavailable { .. }), "{err:?}");
}

#[tokio::test]
async fn http_redirects_are_followed_up_to_the_limit() {
    let server = TestServer::start().await;
    let f = fetcher(FetcherConfig {
        max_redirects: 3,
        ..allow_http()
    });
    // 3 redirects: /redirect/2 → /redirect/1 → /redirect/0 → /lab.yaml
    let artifact = f.fetch(&server.url("/redirect/2")).await.unwrap();
    assert_eq!(&artifact.bytes[..], LAB_YAML);
    // 4 redirects: one too many.
    let err = expect_err(f.fetch(&server.url("/redirect/3")).await);
    assert!(matches!(err, ArtifactError::Failed { .. }), "{err:?}");
    let err = expect_err(f.fetch(&server.url("/loop")).await);
    assert!(matches!(err, ArtifactError::Failed { .. }), "{err:?}");
    assert_eq!(err.grpc_code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn https_goes_through_tls() {
    // No CA is available here to serve real TLS; an https:// URL aimed at a plain-HTTP server
    // must fail in the TLS handshake (Unavailable), proving https is not silently downgraded.
    let server = TestServer::start().await;
    let uri = format!("https://{}/lab.yaml", server.addr);
    let err = expect_err(fetcher(FetcherConfig::default()).fetch(&uri).await);
    assert!(matches!(err, ArtifactError::Unavailable { .. }), "{err:?}");
    assert_eq!(server.hits(), 0, "no HTTP request may reach the server");
}

#[tokio::test]
async fn secrets_in_uris_do_not_leak_into_errors() {
    let server = TestServer::start().await;
    let uri = format!(
        "http://user:hunter2@{}/status/404?X-Amz-Signature=topsecret",
        server.addr
    );
    let err = expect_err(fetcher(allow_http()).fetch(&uri).await);
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains("topsecret"), "{text}");
    assert!(matches!(err, ArtifactError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn unsupported_schemes_are_invalid() {
    let f = fetcher(FetcherConfig::default());
    for uri in [
        "ftp://example.com/lab.yaml",
        "lab.yaml",
        "gs://bucket/lab.yaml",
        "s3://x/",
    ] {
        assert_invalid(f.fetch(uri).await);
    }
}

// ---------------------------------------------------------------------------------------------
// s3://
// ---------------------------------------------------------------------------------------------

fn s3_config(endpoint: &str) -> FetcherConfig {
    FetcherConfig {
        timeout: Duration::from_secs(10),
        s3: S3Config {
            region: Some(TEST_REGION.to_owned()),
            endpoint_url: Some(endpoint.to_owned()),
            force_path_style: true,
            credentials: Some(StaticCredentials {
                access_key_id: TEST_ACCESS_KEY_ID.to_owned(),
                secret_access_key: TEST_SECRET_ACCESS_KEY.to_owned(),
                session_token: None,
            }),
        },
        ..FetcherConfig::default()
    }
}

/// A plain SDK client to seed moto.
async fn seed_client(moto: &MotoServer) -> aws_sdk_s3::Client {
    let creds = aws_sdk_s3::config::Credentials::new(
        TEST_ACCESS_KEY_ID,
        TEST_SECRET_ACCESS_KEY,
        None,
        None,
        "test",
    );
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(TEST_REGION))
        .endpoint_url(moto.endpoint())
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

async fn put(client: &aws_sdk_s3::Client, bucket: &str, key: &str, body: &[u8]) {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body.to_vec()))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn s3_fetch_found_missing_key_and_missing_bucket() {
    let moto = MotoServer::start().unwrap();
    let client = seed_client(&moto).await;
    client.create_bucket().bucket("labs").send().await.unwrap();
    put(&client, "labs", "defs/demo lab.yaml", LAB_YAML).await;
    put(&client, "labs", "abc", b"abc").await;

    let f = fetcher(s3_config(moto.endpoint()));
    let artifact = f.fetch("s3://labs/defs/demo lab.yaml").await.unwrap();
    assert_eq!(&artifact.bytes[..], LAB_YAML);
    assert_eq!(
        artifact.content_hash,
        ccm_core::version::content_hash(LAB_YAML)
    );
    // S3's ETag of a single-part upload is the quoted MD5 of the content.
    let etag = artifact.etag.clone().expect("etag");
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() == 34,
        "{etag}"
    );
    let modified = artifact.last_modified.expect("last modified");
    assert!(
        (chrono::Utc::now() - modified).num_seconds().abs() < 120,
        "{modified}"
    );

    assert_eq!(
        f.fetch("s3://labs/abc").await.unwrap().content_hash,
        ABC_SHA256
    );

    assert_not_found(f.fetch("s3://labs/defs/absent.yaml").await);
    assert_not_found(f.fetch("s3://no-such-bucket/defs/demo.yaml").await);

    // Same content, same hash; changed content, another hash (what Sync relies on).
    put(&client, "labs", "copy.yaml", LAB_YAML).await;
    assert_eq!(
        f.fetch("s3://labs/copy.yaml").await.unwrap().content_hash,
        artifact.content_hash
    );
    put(&client, "labs", "copy.yaml", b"lab: changed\n").await;
    assert_ne!(
        f.fetch("s3://labs/copy.yaml").await.unwrap().content_hash,
        artifact.content_hash
    );
}

#[tokio::test]
async fn s3_too_large_is_refused() {
    let moto = MotoServer::start().unwrap();
    let client = seed_client(&moto).await;
    client.create_bucket().bucket("big").send().await.unwrap();
    put(&client, "big", "lab.yaml", &vec![b'z'; 4096]).await;
    let f = fetcher(FetcherConfig {
        max_bytes: 4095,
        ..s3_config(moto.endpoint())
    });
    assert_too_large(f.fetch("s3://big/lab.yaml").await, 4095);
    let f = fetcher(FetcherConfig {
        max_bytes: 4096,
        ..s3_config(moto.endpoint())
    });
    assert_eq!(
        f.fetch("s3://big/lab.yaml").await.unwrap().bytes.len(),
        4096
    );
}

#[tokio::test]
async fn s3_after_reset_objects_are_gone() {
    let moto = MotoServer::start().unwrap();
    let client = seed_client(&moto).await;
    client.create_bucket().bucket("reset").send().await.unwrap();
    put(&client, "reset", "k", b"v").await;
    let f = fetcher(s3_config(moto.endpoint()));
    f.fetch("s3://reset/k").await.unwrap();
    moto.reset().unwrap();
    assert_not_found(f.fetch("s3://reset/k").await);
}

#[tokio::test]
async fn s3_unreachable_endpoint_is_unavailable() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let f = fetcher(FetcherConfig {
        timeout: Duration::from_secs(5),
        ..s3_config(&endpoint)
    });
    let err = expect_err(f.fetch("s3://labs/lab.yaml").await);
    assert!(matches!(err, ArtifactError::Unavailable { .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn s3_bad_uris_are_invalid() {
    let f = fetcher(s3_config("http://127.0.0.1:9"));
    for uri in [
        "s3://labs",
        "s3://labs/",
        "s3://Labs/k",
        "s3://la/k",
        "s3:labs/k",
    ] {
        assert_invalid(f.fetch(uri).await);
    }
}
