//! The `ccm` binary, run as a process: exit codes, messages and the offline commands.

use std::path::PathBuf;
use std::process::{Command, Output};

fn ccm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ccm"))
        .args(args)
        .output()
        .expect("the ccm binary runs")
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn version_prints_the_crate_version() {
    let o = ccm(&["--version"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).trim(),
        format!("ccm {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_every_subcommand() {
    let o = ccm(&["--help"]);
    assert!(o.status.success());
    let out = stdout(&o);
    for sub in ["dev", "serve", "simulate", "config", "lab", "api"] {
        assert!(
            out.contains(&format!("  {sub} ")),
            "{sub} missing from:\n{out}"
        );
    }
}

#[test]
fn unbuilt_subcommands_say_so_and_exit_69() {
    let o = ccm(&["simulate", "--trace", "x.jsonl"]);
    assert_eq!(o.status.code(), Some(69));
    assert!(stdout(&o).is_empty(), "simulate printed output");
    assert!(
        stderr(&o).contains("is not available yet"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn services_refuse_to_start_without_auth_settings() {
    // Production services never run unauthenticated by accident: without credentials (or an
    // explicit --insecure-no-auth) they stop at once with a usage error that names the fix.
    for (args, needle) in [
        (&["serve", "scheduler"][..], "--insecure-no-auth"),
        (&["serve", "gateway"], "--oidc-issuer-url"),
        (&["serve", "controller"], "etcd_endpoints"),
    ] {
        let o = ccm(args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn config_print_shows_every_value_and_where_it_came_from() {
    let o = Command::new(env!("CARGO_BIN_EXE_ccm"))
        .args([
            "config",
            "print",
            "--insecure-no-auth",
            "--listen-addr",
            "127.0.0.1:6000",
        ])
        .env("CCM_CONCURRENCY_LIMIT", "7")
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(r#"listen_addr = "127.0.0.1:6000"  # flag --listen-addr"#),
        "{out}"
    );
    assert!(
        out.contains("concurrency_limit = 7  # environment variable CCM_CONCURRENCY_LIMIT"),
        "{out}"
    );
    assert!(out.contains(r#"backend = "sqlite"  # default"#), "{out}");
}

#[test]
fn serving_without_an_issuer_is_a_configuration_error() {
    let o = ccm(&["config", "print"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("auth.issuer_url"), "{}", stderr(&o));
    let o = ccm(&[
        "serve",
        "control-plane",
        "--listen-addr",
        "not-an-address",
        "--insecure-no-auth",
    ]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("listen_addr"), "{}", stderr(&o));
}

#[test]
fn unknown_service_is_a_usage_error() {
    let o = ccm(&["serve", "database"]);
    assert_eq!(o.status.code(), Some(2), "clap's usage exit code");
    assert!(
        stderr(&o).contains("unrecognized subcommand 'database'"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn lab_validate_reports_every_placeholder() {
    let o = ccm(&[
        "lab",
        "validate",
        &fixture("one-node.yaml"),
        "--port",
        "serial_1",
        "--port",
        "vnc_1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("ok: ccm-cli-fixture (1 nodes, 4 placeholders for 2 ports)"));
    assert!(out.contains("nodes[0].tags[1]"), "{out}");
}

#[test]
fn lab_validate_refuses_a_port_without_placeholder() {
    let o = ccm(&[
        "lab",
        "validate",
        &fixture("one-node.yaml"),
        "--port",
        "serial_1",
        "--port",
        "vnc_1",
        "--port",
        "ssh_1",
    ]);
    assert_eq!(o.status.code(), Some(65));
    assert!(stderr(&o).contains("ssh_1"), "{}", stderr(&o));
}

#[test]
fn lab_validate_refuses_an_unknown_placeholder() {
    let o = ccm(&[
        "lab",
        "validate",
        &fixture("one-node.yaml"),
        "--port",
        "serial_1",
    ]);
    assert_eq!(o.status.code(), Some(65));
    assert!(stderr(&o).contains("${PORT_VNC_1}"), "{}", stderr(&o));
}

#[test]
fn lab_rewrite_substitutes_ports_and_keeps_the_rest() {
    let o = ccm(&[
        "lab",
        "rewrite",
        &fixture("one-node.yaml"),
        "--port",
        "serial_1=5041",
        "--port",
        "vnc_1=5044",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("serial:5041") && out.contains("vnc:5044"),
        "{out}"
    );
    assert!(!out.contains("${PORT_SERIAL_1}") && !out.contains("${PORT_VNC_1}"));
    assert!(out.contains("${PORT_NOT_A_FIELD_WE_REWRITE} stays as it is"));
}

#[test]
fn lab_rewrite_writes_to_a_file() {
    let dir = std::env::temp_dir().join(format!("ccm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.join("lab.yaml");
    let o = ccm(&[
        "lab",
        "rewrite",
        &fixture("one-node.yaml"),
        "--port",
        "serial_1=2000",
        "--port",
        "vnc_1=2001",
        "-o",
        &out.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let written = std::fs::read_to_string(&out).expect("written");
    assert!(written.contains("vnc:2001"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn lab_rewrite_rejects_bad_assignments() {
    for bad in ["serial_1", "serial_1=0", "serial_1=70000", "serial_1=abc"] {
        let o = ccm(&["lab", "rewrite", &fixture("one-node.yaml"), "--port", bad]);
        assert_eq!(o.status.code(), Some(64), "{bad}: {}", stderr(&o));
    }
}

#[test]
fn lab_commands_report_missing_files() {
    let o = ccm(&["lab", "validate", "/nonexistent/lab.yaml"]);
    assert_eq!(o.status.code(), Some(74));
    assert!(stderr(&o).contains("/nonexistent/lab.yaml"));
}

#[test]
fn api_routes_lists_every_rpc_of_the_contracts() {
    let o = ccm(&["api", "routes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let pool = ccm_proto::descriptor_pool();
    let mut rpcs = 0;
    for service in pool.services().filter(|s| s.package_name() == "ccm.v1") {
        for m in service.methods() {
            rpcs += 1;
            let key = format!("{}.{}", service.name(), m.name());
            assert!(out.contains(&key), "{key} missing");
        }
    }
    assert_eq!(out.lines().count(), rpcs);
    assert!(out.contains("WorkerService.DrainWorker") && out.contains(":drain"));
    assert!(out.contains("InternalService.CommitPlacements") && out.contains("(gRPC only)"));
}

#[test]
fn api_routes_rejects_an_unknown_service() {
    let o = ccm(&["api", "routes", "--service", "NopeService"]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("InstanceService"));
}
