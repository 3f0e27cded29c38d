//! A real etcd server (v3 API) on free loopback ports, for tests.
//!
//! [`EtcdServer::start`] runs `/usr/bin/etcd` (or `$CCM_ETCD_BIN`) as a single-member cluster with
//! a fresh data directory under the system temp directory, a free client port and a free peer port
//! on 127.0.0.1, and waits until `GET /health` answers `"health":"true"` (etcd 3.4 serves `/health`,
//! not `/livez`). Dropping the server kills the process and deletes the data directory.
//!
//! Failover tests can [`EtcdServer::kill`] (SIGKILL), [`EtcdServer::stop`] (SIGTERM, then SIGKILL)
//! and [`EtcdServer::restart`] it: a restart reuses the same ports and data directory, so clients
//! reconnect to the same endpoint and find the same data.
//!
//! The process's output goes to `etcd.log` in the data directory; start-up failures include its
//! last lines. The program is installed by `scripts/test` (`ensure_etcd` in `scripts/lib.sh`, i.e.
//! `apt-get install -y etcd-server etcd-client`).
//!
//! The error type is [`HarnessError`]; it is local to this module for now (the harness modules
//! were written side by side) and can be folded into a crate-wide error later.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::ports::free_port;

/// Environment variable that overrides the path of the etcd program.
pub const ETCD_BIN_ENV: &str = "CCM_ETCD_BIN";
/// Where Debian's `etcd-server` package installs the etcd program.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";
/// How long [`EtcdServer::start`] waits for `/health` (etcd is usually healthy in about a second).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`EtcdServer::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the harness polls `/health` while waiting for the server.
pub const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Timeout of one `/health` request (connect, write and read each).
pub const HEALTH_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// How many times [`EtcdServer::start`] tries fresh ports when etcd exits during start-up (another
/// process may take a "free" port between choosing it and etcd binding it).
pub const START_ATTEMPTS: usize = 3;
/// How many trailing lines of `etcd.log` an error message includes.
pub const LOG_TAIL_LINES: usize = 20;
/// The member name of the single-member cluster.
pub const MEMBER_NAME: &str = "ccm-test";

/// Why the etcd harness could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The etcd program does not exist.
    #[error(
        "etcd not found at {path}: run scripts/test (it installs it) or `apt-get install -y etcd-server etcd-client`, or set {ETCD_BIN_ENV}"
    )]
    BinaryMissing {
        /// The path that was tried.
        path: PathBuf,
    },
    /// Creating the data directory, the log file or the process failed.
    #[error("etcd harness I/O error ({context}): {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// etcd exited or never became healthy.
    #[error("etcd did not become healthy: {reason}\n--- last lines of {log} ---\n{tail}")]
    Unhealthy {
        /// What went wrong.
        reason: String,
        /// The log file.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// A running (or stopped, see [`EtcdServer::kill`]) single-member etcd cluster on loopback.
#[derive(Debug)]
pub struct EtcdServer {
    bin: PathBuf,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl EtcdServer {
    /// Starts etcd on free ports with a new data directory and waits until it is healthy.
    ///
    /// The program is `$CCM_ETCD_BIN` when set, otherwise [`DEFAULT_ETCD_BIN`].
    pub fn start() -> Result<Self, HarnessError> {
        let bin = std::env::var_os(ETCD_BIN_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ETCD_BIN));
        Self::start_with_binary(bin)
    }

    /// Like [`EtcdServer::start`], with an explicit path to the etcd program.
    pub fn start_with_binary(bin: impl Into<PathBuf>) -> Result<Self, HarnessError> {
        let bin = bin.into();
        if !bin.is_file() {
            return Err(HarnessError::BinaryMissing { path: bin });
        }
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let data_dir = unique_data_dir();
            fs::create_dir_all(&data_dir)
                .map_err(io_err(format!("creating {}", data_dir.display())))?;
            let mut server = EtcdServer {
                bin: bin.clone(),
                data_dir,
                client_port: free_port().map_err(io_err("choosing a client port"))?,
                peer_port: free_port().map_err(io_err("choosing a peer port"))?,
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(e @ HarnessError::Unhealthy { .. }) => last_error = Some(e),
                Err(e) => return Err(e),
            }
            // `server` drops here: the process is killed and the directory removed.
        }
        Err(last_error.unwrap_or_else(|| HarnessError::Unhealthy {
            reason: "no start attempt was made".into(),
            log: PathBuf::new(),
            tail: String::new(),
        }))
    }

    /// The client URL, e.g. `http://127.0.0.1:23791`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port on 127.0.0.1.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The data directory (deleted on drop).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether the etcd process is running (it was not killed or stopped, and has not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process at once (SIGKILL) and waits for it to exit. The data directory is kept,
    /// so [`EtcdServer::restart`] brings the same cluster back. Killing a stopped server is a no-op.
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        if let Some(mut child) = self.child.take() {
            // `kill` fails only if the process has already exited; `wait` reaps it either way.
            let _ = child.kill();
            child.wait().map_err(io_err("waiting for etcd to exit"))?;
        }
        Ok(())
    }

    /// Stops the process gracefully (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and waits for it
    /// to exit. The data directory is kept.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = child.id().to_string();
        let term = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if matches!(term, Ok(status) if status.success()) {
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return Ok(());
                }
                std::thread::sleep(HEALTH_POLL_INTERVAL);
            }
        }
        self.kill()
    }

    /// Restarts the server on the same ports with the same data directory (stopping it first if
    /// it is running) and waits until it is healthy again.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill()?;
        self.spawn_and_wait()
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("etcd.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicating the log file handle"))?;
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg(MEMBER_NAME)
            .arg("--data-dir")
            .arg(self.data_dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{MEMBER_NAME}={peer_url}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(format!("ccm-test-{}", self.client_port))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_err(format!("spawning {}", self.bin.display())))?;
        self.child = Some(child);
        self.wait_healthy()
    }

    fn wait_healthy(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(self.unhealthy(format!("etcd exited during start-up ({status})")));
            }
            if health_ok(self.client_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.kill();
                return Err(self.unhealthy(format!(
                    "/health did not answer healthy within {STARTUP_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(HEALTH_POLL_INTERVAL);
        }
    }

    fn unhealthy(&self, reason: String) -> HarnessError {
        let log = self.log_path();
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        HarnessError::Unhealthy { reason, log, tail }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = fs::remove_dir_all(&self.data_dir);
    }
}

fn unique_data_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(
        "ccm-etcd-{}-{}-{nanos}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    ))
}

/// One `GET /health` over HTTP/1.0; true when etcd answers 200 with `"health":"true"`.
fn health_ok(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, HEALTH_REQUEST_TIMEOUT) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(HEALTH_REQUEST_TIMEOUT))
        .is_err()
        || stream
            .set_write_timeout(Some(HEALTH_REQUEST_TIMEOUT))
            .is_err()
    {
        return false;
    }
    let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    if stream.read_to_string(&mut response).is_err() {
        return false;
    }
    let compact: String = response.chars().filter(|c| !c.is_whitespace()).collect();
    response.starts_with("HTTP/1.")
        && response.contains(" 200")
        && compact.contains("\"health\":\"true\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_kill_restart_and_drop_cleans_up() {
        let mut server = EtcdServer::start().expect("etcd starts");
        assert!(server.endpoint().starts_with("http://127.0.0.1:"));
        assert!(health_ok(server.client_port()), "healthy after start");
        assert!(server.is_running());
        let dir = server.data_dir().to_path_buf();
        assert!(dir.join("data").is_dir(), "etcd wrote its data directory");

        server.kill().expect("kill");
        assert!(!server.is_running());
        assert!(!health_ok(server.client_port()), "not answering after kill");

        server.restart().expect("restart");
        assert!(health_ok(server.client_port()), "healthy after restart");

        server.stop().expect("graceful stop");
        assert!(!server.is_running());
        assert!(!health_ok(server.client_port()), "not answering after stop");

        drop(server);
        assert!(!dir.exists(), "data directory removed on drop");
    }

    #[test]
    fn missing_binary_says_how_to_install() {
        let err = EtcdServer::start_with_binary("/nonexistent/etcd").expect_err("must fail");
        let message = err.to_string();
        assert!(
            matches!(err, HarnessError::BinaryMissing { .. }),
            "{message}"
        );
        assert!(message.contains("scripts/test"), "{message}");
        assert!(
            message.contains("apt-get install -y etcd-server"),
            "{message}"
        );
    }

    #[test]
    fn a_binary_that_is_not_etcd_fails_with_its_log() {
        // `/bin/false` exits at once: the harness must report it instead of waiting forever.
        let err = EtcdServer::start_with_binary("/bin/false").expect_err("must fail");
        assert!(
            matches!(&err, HarnessError::Unhealthy { reason, .. } if reason.contains("exited")),
            "{err}"
        );
    }

    #[test]
    fn two_servers_get_distinct_ports_and_directories() {
        let a = EtcdServer::start().expect("first etcd");
        let b = EtcdServer::start().expect("second etcd");
        assert_ne!(a.endpoint(), b.endpoint());
        assert_ne!(a.data_dir(), b.data_dir());
    }
}
