//! The moto server (an AWS emulator: EC2, S3, CloudWatch, …) on a free loopback port.
//!
//! [`MotoServer::start`] runs `moto_server -H 127.0.0.1 -p PORT` and waits until it answers HTTP;
//! dropping the [`MotoServer`] kills the process. moto keeps all state in the process: call
//! [`MotoServer::reset`] (`POST /moto-api/reset`) between tests that share one server.
//!
//! The program is `$CCM_MOTO_SERVER` when set, otherwise `.tools/venv/bin/moto_server` under the
//! repository root (installed by `scripts/test`, see `ensure_moto` in `scripts/lib.sh`).
//!
//! Point an AWS SDK client at [`MotoServer::endpoint`] with the static credentials
//! [`TEST_ACCESS_KEY_ID`] / [`TEST_SECRET_ACCESS_KEY`], region [`TEST_REGION`] and, for S3,
//! path-style addressing.
//!
//! The error type is [`MotoError`]; it is local to this module for now (the harness modules were
//! written side by side) and can be folded into a crate-wide error later.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::free_port;

/// Environment variable that overrides the path of the `moto_server` program.
pub const MOTO_SERVER_ENV: &str = "CCM_MOTO_SERVER";
/// Where `scripts/test` installs `moto_server`, relative to the repository root.
pub const MOTO_SERVER_RELATIVE_PATH: &str = ".tools/venv/bin/moto_server";
/// How long [`MotoServer::start`] waits for the server to answer HTTP (it is usually ready in
/// well under a second; a loaded 2-core machine can take several).
pub const MOTO_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times [`MotoServer::start`] tries a new free port when the server exits at start
/// (another process may grab the port between choosing and binding it).
pub const MOTO_START_ATTEMPTS: u32 = 3;
/// Timeout of one control request ([`MotoServer::reset`], the readiness probe).
pub const MOTO_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Access key id moto accepts (moto accepts any static credentials).
pub const TEST_ACCESS_KEY_ID: &str = "testing";
/// Secret access key paired with [`TEST_ACCESS_KEY_ID`].
pub const TEST_SECRET_ACCESS_KEY: &str = "testing";
/// Region the tests use against moto.
pub const TEST_REGION: &str = "us-east-1";

/// How many bytes of the server's log an error quotes.
const LOG_TAIL_BYTES: u64 = 2048;

/// Why the moto server could not be started or controlled.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    /// The program is not installed where it was looked for.
    #[error(
        "moto_server not found at {path}: run scripts/test (it installs moto into .tools/venv), \
         or set {MOTO_SERVER_ENV} to the moto_server program"
    )]
    NotInstalled {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Starting the process, choosing a port or writing its log file failed.
    #[error("cannot start moto_server: {0}")]
    Spawn(#[source] std::io::Error),
    /// The process exited or did not answer in time.
    #[error("moto_server did not become ready on port {port}: {reason}; log tail:\n{log_tail}")]
    NotReady {
        /// The port it was told to use.
        port: u16,
        /// What went wrong.
        reason: String,
        /// The end of its output.
        log_tail: String,
    },
    /// A control request (reset) failed.
    #[error("moto control request {path} failed: {reason}")]
    Request {
        /// The request path.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// A running moto server, killed on drop.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    port: u16,
    endpoint: String,
    log_path: PathBuf,
}

impl MotoServer {
    /// Starts moto on 127.0.0.1 and a free port and waits until it answers HTTP.
    pub fn start() -> Result<MotoServer, MotoError> {
        Self::start_with_env(&[])
    }

    /// Like [`MotoServer::start`], with extra environment variables for the server (for example
    /// `MOTO_ENABLE_AMI_VALIDATION=true`).
    pub fn start_with_env(env: &[(&str, &str)]) -> Result<MotoServer, MotoError> {
        Self::start_program(&moto_server_path(), env)
    }

    fn start_program(program: &Path, env: &[(&str, &str)]) -> Result<MotoServer, MotoError> {
        let program = program.to_path_buf();
        if !program.is_file() {
            return Err(MotoError::NotInstalled { path: program });
        }
        let mut last_error = None;
        for _ in 0..MOTO_START_ATTEMPTS {
            match Self::try_start(&program, env) {
                Ok(server) => return Ok(server),
                // The process died at start: most likely the port was taken; try another.
                Err(e @ MotoError::NotReady { .. }) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| MotoError::NotReady {
            port: 0,
            reason: "no start attempt was made".to_owned(),
            log_tail: String::new(),
        }))
    }

    fn try_start(program: &Path, env: &[(&str, &str)]) -> Result<MotoServer, MotoError> {
        let port = free_port().map_err(MotoError::Spawn)?;
        let log_path =
            std::env::temp_dir().join(format!("ccm-moto-{}-{port}.log", std::process::id()));
        let log = File::create(&log_path).map_err(MotoError::Spawn)?;
        let log_err = log.try_clone().map_err(MotoError::Spawn)?;
        let mut command = Command::new(program);
        command
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().map_err(MotoError::Spawn)?;
        let mut server = MotoServer {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            log_path,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<(), MotoError> {
        let deadline = Instant::now() + MOTO_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.not_ready(format!("the process exited at start ({status})")));
            }
            if let Ok(200) = http_request(self.port, "GET", "/moto-api/") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!(
                    "no HTTP answer within {} s",
                    MOTO_START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn not_ready(&self, reason: String) -> MotoError {
        MotoError::NotReady {
            port: self.port,
            reason,
            log_tail: self.log_tail(),
        }
    }

    /// The base URL, `http://127.0.0.1:PORT`, for an SDK's `endpoint_url`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Forgets every resource (`POST /moto-api/reset`).
    pub fn reset(&self) -> Result<(), MotoError> {
        const PATH: &str = "/moto-api/reset";
        match http_request(self.port, "POST", PATH) {
            Ok(200) => Ok(()),
            Ok(status) => Err(MotoError::Request {
                path: PATH.to_owned(),
                reason: format!("HTTP status {status}"),
            }),
            Err(e) => Err(MotoError::Request {
                path: PATH.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// The last [`LOG_TAIL_BYTES`] bytes of the server's output (for failure messages).
    pub fn log_tail(&self) -> String {
        read_tail(&self.log_path).unwrap_or_default()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // Ignoring errors: the process may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// `$CCM_MOTO_SERVER`, or `.tools/venv/bin/moto_server` under the repository root (two levels
/// above this crate's manifest directory).
pub fn moto_server_path() -> PathBuf {
    if let Some(path) = std::env::var_os(MOTO_SERVER_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    repo_root().join(MOTO_SERVER_RELATIVE_PATH)
}

fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

fn read_tail(path: &Path) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A minimal HTTP/1.1 request without a body to `127.0.0.1:port`; returns the status code.
fn http_request(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, MOTO_REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(MOTO_REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(MOTO_REQUEST_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let head = String::from_utf8_lossy(&response);
    let status_line = head.lines().next().unwrap_or_default();
    // "HTTP/1.1 200 OK"
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP response: {status_line:?}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_resets_and_stops_on_drop() {
        let server = MotoServer::start().expect("moto starts");
        let port = server.port();
        assert_eq!(server.endpoint(), format!("http://127.0.0.1:{port}"));
        assert_eq!(
            http_request(port, "GET", "/moto-api/").expect("answers"),
            200
        );
        server.reset().expect("reset");
        drop(server);
        // Killed: the port no longer accepts connections.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            assert!(Instant::now() < deadline, "moto still answers after drop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn two_servers_are_independent() {
        let a = MotoServer::start().expect("first");
        let b = MotoServer::start().expect("second");
        assert_ne!(a.port(), b.port());
        a.reset().expect("reset a");
        b.reset().expect("reset b");
    }

    #[test]
    fn missing_program_is_reported_with_install_hint() {
        let err = MotoServer::start_program(Path::new("/nonexistent/moto_server"), &[])
            .expect_err("must fail");
        assert!(matches!(err, MotoError::NotInstalled { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("scripts/test"), "{text}");
        assert!(text.contains("/nonexistent/moto_server"), "{text}");
    }

    #[test]
    fn a_program_that_exits_at_start_is_not_ready() {
        // `false` ignores its arguments and exits with status 1 at once.
        let program = ["/bin/false", "/usr/bin/false"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .expect("coreutils false");
        let err = MotoServer::start_program(program, &[]).expect_err("must fail");
        match err {
            MotoError::NotReady { reason, .. } => assert!(reason.contains("exited"), "{reason}"),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn default_path_is_under_the_repository_root() {
        // Only meaningful when the override is not set (scripts/test does not set it).
        if std::env::var_os(MOTO_SERVER_ENV).is_none() {
            let path = moto_server_path();
            assert!(
                path.ends_with(MOTO_SERVER_RELATIVE_PATH),
                "{}",
                path.display()
            );
            // <root>/.tools/venv/bin/moto_server
            assert!(
                path.ancestors().nth(4).is_some_and(
                    |root| root.join("Cargo.toml").is_file() && root.join("scripts").is_dir()
                ),
                "{} is not under the workspace root",
                path.display()
            );
        }
    }

    #[test]
    fn readiness_probe_fails_where_nothing_listens() {
        // The readiness probe must not accept a port where nothing answers HTTP.
        let port = free_port().expect("port");
        assert!(http_request(port, "GET", "/moto-api/").is_err());
    }
}
