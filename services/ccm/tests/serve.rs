//! `ccm serve control-plane` as a real process: it serves gRPC (health, reflection, the ccm
//! services) and shuts down gracefully on SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ccm_proto::v1::template_service_client::TemplateServiceClient;
use ccm_testkit::ports::{free_port, wait_for_port};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate(child: &Child) {
    // SIGTERM through the `kill` program: no libc dependency for one signal.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test]
async fn control_plane_serves_grpc_and_stops_on_sigterm() {
    let port = free_port().expect("a free port");
    let dir = std::env::temp_dir().join(format!("ccm-serve-test-{}-{port}", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_ccm"))
        .args([
            "serve",
            "control-plane",
            "--insecure-no-auth",
            "--listen-addr",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &dir.display().to_string(),
        ])
        .env("CCM_STORE__SQLITE_PATH", dir.join("ccm.sqlite3"))
        .env(
            "CCM_TEMPLATES_SEED_FILE",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../config/worker-templates.yaml"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ccm starts");
    let mut running = Running(child);
    assert!(
        wait_for_port(port, Duration::from_secs(30)),
        "the control plane did not listen on {port}"
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("connects");
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "ccm.v1.InstanceService".into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status;
    assert_eq!(status, 1, "SERVING");

    // The templates of config/worker-templates.yaml were seeded at startup and are served.
    let mut templates = TemplateServiceClient::new(channel);
    let listed = templates
        .list_templates(ccm_proto::v1::ListTemplatesRequest::default())
        .await
        .expect("ListTemplates answers")
        .into_inner();
    let names: Vec<_> = listed.templates.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["enterprise-m5zn-metal", "personal-m5zn-metal"],
        "sorted by name"
    );

    terminate(&running.0);
    let started = Instant::now();
    let exit = loop {
        if let Some(status) = running.0.try_wait().expect("waits") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        dir.join("ccm.sqlite3").exists(),
        "the store file was created"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
