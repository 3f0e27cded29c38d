//! Configuration: each layer overrides the previous one, errors name the key and the source,
//! `effective_toml` round-trips and redacts, and the documentation lists every key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ccm_control_plane::ControlPlaneError;
use ccm_control_plane::config::{
    self, ConfigLoader, ConfigSource, ControlPlaneArgs, ControlPlaneConfig, CoordinationBackend,
    KEYS, LogFormat, StoreConfig,
};
use clap::Parser;

/// Wraps the flags the way `ccm serve control-plane` flattens them.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: ControlPlaneArgs,
}

fn args(argv: &[&str]) -> ControlPlaneArgs {
    let mut full = vec!["ccm"];
    full.extend_from_slice(argv);
    Cli::try_parse_from(full).expect("flags parse").args
}

/// The minimum that validates: authentication explicitly disabled.
fn insecure() -> [(&'static str, &'static str); 1] {
    [("CCM_AUTH__INSECURE_NO_AUTH", "true")]
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("literal address")
}

#[test]
fn defaults_apply_when_nothing_is_set() {
    let config = ConfigLoader::new().env(insecure()).load().expect("valid");
    assert_eq!(config.listen_addr, config::DEFAULT_LISTEN_ADDR);
    assert_eq!(config.listen_addr, addr("127.0.0.1:50051"));
    assert_eq!(config.data_dir, PathBuf::from(config::DEFAULT_DATA_DIR));
    assert_eq!(
        config.store,
        StoreConfig::Sqlite {
            path: PathBuf::from("ccm-data").join("ccm.sqlite3")
        }
    );
    assert_eq!(config.coordination.backend, CoordinationBackend::InProcess);
    assert_eq!(config.coordination.lease_ttl, Duration::from_secs(10));
    assert_eq!(config.request_timeout, config::DEFAULT_REQUEST_TIMEOUT);
    assert_eq!(config.concurrency_limit, config::DEFAULT_CONCURRENCY_LIMIT);
    assert_eq!(config.max_message_size, 8 * 1024 * 1024);
    assert_eq!(
        config.shutdown_grace_period,
        config::DEFAULT_SHUTDOWN_GRACE_PERIOD
    );
    assert_eq!(config.auth.audiences, [config::DEFAULT_AUDIENCE]);
    assert_eq!(config.telemetry.log_format, LogFormat::Text);
    assert_eq!(config.source_of("listen_addr"), ConfigSource::Default);
    assert_eq!(
        config.source_of("auth.insecure_no_auth"),
        ConfigSource::Env("CCM_AUTH__INSECURE_NO_AUTH".into())
    );
}

#[test]
fn each_layer_overrides_the_previous_one() {
    let file = r#"
        listen_addr = "127.0.0.1:6001"
        request_timeout = "10s"
        concurrency_limit = 10
        [store]
        backend = "sqlite"
        sqlite_path = "/file/db.sqlite3"
        [auth]
        insecure_no_auth = true
    "#;
    let path = PathBuf::from("/etc/ccm/control-plane.toml");

    // File over defaults.
    let c = ConfigLoader::new()
        .file_text(&path, file)
        .load()
        .expect("valid");
    assert_eq!(c.listen_addr, addr("127.0.0.1:6001"));
    assert_eq!(c.request_timeout, Duration::from_secs(10));
    assert_eq!(c.concurrency_limit, 10);
    assert_eq!(c.source_of("listen_addr"), ConfigSource::File(path.clone()));
    assert_eq!(c.source_of("max_message_size"), ConfigSource::Default);

    // Environment over the file.
    let env = [
        ("CCM_LISTEN_ADDR", "127.0.0.1:6002"),
        ("CCM_REQUEST_TIMEOUT", "1m30s"),
        ("CCM_STORE__SQLITE_PATH", "/env/db.sqlite3"),
        ("UNRELATED", "ignored"),
        (
            "CCM_TEST_MONGO_URI",
            "ignored too: not a configuration section",
        ),
    ];
    let c = ConfigLoader::new()
        .file_text(&path, file)
        .env(env)
        .load()
        .expect("valid");
    assert_eq!(c.listen_addr, addr("127.0.0.1:6002"));
    assert_eq!(c.request_timeout, Duration::from_secs(90));
    assert_eq!(
        c.concurrency_limit, 10,
        "untouched keys keep the file's value"
    );
    assert_eq!(
        c.store,
        StoreConfig::Sqlite {
            path: "/env/db.sqlite3".into()
        }
    );
    assert_eq!(
        c.source_of("listen_addr"),
        ConfigSource::Env("CCM_LISTEN_ADDR".into())
    );

    // Flags over the environment.
    let flags = args(&[
        "--listen-addr",
        "127.0.0.1:6003",
        "--store-sqlite-path",
        "/flag/db.sqlite3",
        "--max-message-size",
        "16MiB",
    ]);
    let c = ConfigLoader::new()
        .file_text(&path, file)
        .env(env)
        .args(&flags)
        .load()
        .expect("valid");
    assert_eq!(c.listen_addr, addr("127.0.0.1:6003"));
    assert_eq!(c.request_timeout, Duration::from_secs(90), "env value kept");
    assert_eq!(c.max_message_size, 16 * 1024 * 1024);
    assert_eq!(
        c.store,
        StoreConfig::Sqlite {
            path: "/flag/db.sqlite3".into()
        }
    );
    assert_eq!(
        c.source_of("listen_addr"),
        ConfigSource::Flag("--listen-addr".into())
    );
    assert_eq!(
        c.source_of("store.sqlite_path"),
        ConfigSource::Flag("--store-sqlite-path".into())
    );
}

#[test]
fn config_file_comes_from_the_flag_then_the_environment() {
    let dir = std::env::temp_dir().join(format!("ccm-cp-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    std::fs::write(
        &a,
        "listen_addr = \"127.0.0.1:7001\"\n[auth]\ninsecure_no_auth = true\n",
    )
    .expect("write a");
    std::fs::write(
        &b,
        "listen_addr = \"127.0.0.1:7002\"\n[auth]\ninsecure_no_auth = true\n",
    )
    .expect("write b");

    let from_env = ConfigLoader::new()
        .env([("CCM_CONFIG", a.to_string_lossy().into_owned())])
        .load()
        .expect("valid");
    assert_eq!(from_env.listen_addr, addr("127.0.0.1:7001"));

    let flag = args(&["--config", &b.to_string_lossy()]);
    let from_flag = ConfigLoader::new()
        .env([("CCM_CONFIG", a.to_string_lossy().into_owned())])
        .args(&flag)
        .load()
        .expect("valid");
    assert_eq!(from_flag.listen_addr, addr("127.0.0.1:7002"));

    let missing = dir.join("missing.toml");
    let err = ConfigLoader::new()
        .file(&missing)
        .load()
        .expect_err("missing file");
    assert!(matches!(&err, ControlPlaneError::ConfigRead { path, .. } if *path == missing));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

fn invalid(err: &ControlPlaneError) -> (String, String, String) {
    match err {
        ControlPlaneError::InvalidConfig {
            key,
            source_name,
            message,
        } => (key.clone(), source_name.clone(), message.clone()),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn unknown_keys_in_the_file_are_all_named() {
    let file = r#"
        listen_adr = "127.0.0.1:1"
        [store]
        backend = "sqlite"
        sqlite_pth = "x"
        [stroe]
        backend = "sqlite"
    "#;
    let err = ConfigLoader::new()
        .file_text("/etc/ccm.toml", file)
        .load()
        .expect_err("unknown keys");
    match &err {
        ControlPlaneError::UnknownConfigKeys { path, keys } => {
            assert_eq!(path, &PathBuf::from("/etc/ccm.toml"));
            assert_eq!(keys, &["listen_adr", "store.sqlite_pth", "stroe"]);
        }
        other => panic!("expected UnknownConfigKeys, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("listen_adr")
            && text.contains("store.sqlite_pth")
            && text.contains("/etc/ccm.toml")
    );
}

#[test]
fn bad_values_name_the_key_and_the_source() {
    // A bad duration in the environment.
    let err = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_REQUEST_TIMEOUT", "30 seconds"),
        ])
        .load()
        .expect_err("bad duration");
    let (key, source, message) = invalid(&err);
    assert_eq!(key, "request_timeout");
    assert_eq!(source, "environment variable CCM_REQUEST_TIMEOUT");
    assert!(message.contains("30 seconds"), "{message}");

    // A duration without a unit, in the file.
    let err = ConfigLoader::new()
        .file_text(
            "/c.toml",
            "shutdown_grace_period = \"30\"\n[auth]\ninsecure_no_auth = true",
        )
        .load()
        .expect_err("no unit");
    let (key, source, message) = invalid(&err);
    assert_eq!(key, "shutdown_grace_period");
    assert_eq!(source, "file /c.toml");
    assert!(message.contains("missing unit"), "{message}");

    // A duration given as a number in TOML.
    let err = ConfigLoader::new()
        .file_text(
            "/c.toml",
            "request_timeout = 30\n[auth]\ninsecure_no_auth = true",
        )
        .load()
        .expect_err("wrong type");
    let (key, _, message) = invalid(&err);
    assert_eq!(key, "request_timeout");
    assert!(message.contains("found an integer"), "{message}");

    // A bad address from a flag.
    let err = ConfigLoader::new()
        .env(insecure())
        .args(&args(&["--listen-addr", "localhost"]))
        .load()
        .expect_err("bad address");
    let (key, source, message) = invalid(&err);
    assert_eq!(key, "listen_addr");
    assert_eq!(source, "flag --listen-addr");
    assert!(message.contains("localhost"), "{message}");

    // A value out of range is reported with its source too.
    let err = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_CONCURRENCY_LIMIT", "0"),
        ])
        .load()
        .expect_err("zero limit");
    let (key, source, _) = invalid(&err);
    assert_eq!(
        (key.as_str(), source.as_str()),
        (
            "concurrency_limit",
            "environment variable CCM_CONCURRENCY_LIMIT"
        )
    );

    // A bad choice.
    let err = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_STORE__BACKEND", "postgres"),
        ])
        .load()
        .expect_err("bad backend");
    let (key, _, message) = invalid(&err);
    assert_eq!(key, "store.backend");
    assert!(message.contains("sqlite, mongodb"), "{message}");

    // A bad boolean.
    let err = ConfigLoader::new()
        .env([("CCM_AUTH__INSECURE_NO_AUTH", "maybe")])
        .load()
        .expect_err("bad bool");
    assert_eq!(invalid(&err).0, "auth.insecure_no_auth");

    // A bad size.
    let err = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_MAX_MESSAGE_SIZE", "8MB"),
        ])
        .load()
        .expect_err("bad size");
    let (key, _, message) = invalid(&err);
    assert_eq!(key, "max_message_size");
    assert!(message.contains("MB"), "{message}");

    // A typo in a section's environment variable.
    let err = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_STORE__SQLITE_PTH", "/x"),
        ])
        .load()
        .expect_err("unknown store variable");
    let (key, source, _) = invalid(&err);
    assert_eq!(key, "CCM_STORE__SQLITE_PTH");
    assert_eq!(source, "environment variable CCM_STORE__SQLITE_PTH");

    // Broken TOML.
    let err = ConfigLoader::new()
        .file_text("/broken.toml", "listen_addr = ")
        .load()
        .expect_err("syntax");
    assert!(
        matches!(err, ControlPlaneError::ConfigSyntax { .. }),
        "{err:?}"
    );
}

#[test]
fn serving_requires_an_issuer_or_explicitly_no_auth() {
    let err = ConfigLoader::new().load().expect_err("no issuer");
    assert!(
        matches!(&err, ControlPlaneError::ConfigConflict { message } if message.contains("--insecure-no-auth"))
    );

    let ok = ConfigLoader::new()
        .env([(
            "CCM_AUTH__ISSUER_URL",
            "https://keycloak.example/realms/ccm",
        )])
        .load()
        .expect("issuer given");
    assert_eq!(
        ok.auth.issuer_url.as_deref(),
        Some("https://keycloak.example/realms/ccm")
    );
    assert!(ok.warnings().is_empty());

    // A loopback issuer may use plain http (tests); another host may not.
    assert!(
        ConfigLoader::new()
            .env([("CCM_AUTH__ISSUER_URL", "http://127.0.0.1:8080/realms/ccm")])
            .load()
            .is_ok()
    );
    let err = ConfigLoader::new()
        .env([("CCM_AUTH__ISSUER_URL", "http://keycloak.example/realms/ccm")])
        .load()
        .expect_err("http issuer");
    assert_eq!(invalid(&err).0, "auth.issuer_url");

    // Both is ambiguous.
    let err = ConfigLoader::new()
        .env([(
            "CCM_AUTH__ISSUER_URL",
            "https://keycloak.example/realms/ccm",
        )])
        .args(&args(&["--insecure-no-auth"]))
        .load()
        .expect_err("both");
    assert!(
        matches!(&err, ControlPlaneError::ConfigConflict { message } if message.contains("flag --insecure-no-auth")),
        "{err}"
    );

    // Disabling auth is loud, louder off loopback.
    let dev = ConfigLoader::new().env(insecure()).load().expect("valid");
    assert_eq!(dev.warnings().len(), 1);
    assert!(dev.warnings()[0].contains("AUTHENTICATION IS DISABLED"));
    let open = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_LISTEN_ADDR", "0.0.0.0:50051"),
        ])
        .load()
        .expect("valid");
    assert!(open.warnings()[0].contains("NOT LOOPBACK"));
}

#[test]
fn backends_are_configured_by_section() {
    let c = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_STORE__BACKEND", "mongodb"),
            (
                "CCM_STORE__MONGODB_URI",
                "mongodb://ccm:s3cret@db-1:27017,db-2:27017/?replicaSet=rs0",
            ),
            ("CCM_COORDINATION__BACKEND", "etcd"),
            (
                "CCM_COORDINATION__ETCD_ENDPOINTS",
                "http://10.0.0.1:2379, http://10.0.0.2:2379",
            ),
            ("CCM_COORDINATION__LEASE_TTL", "15s"),
        ])
        .load()
        .expect("valid");
    match &c.store {
        StoreConfig::MongoDb { uri, database } => {
            assert!(uri.expose().contains("s3cret"));
            assert_eq!(database, config::DEFAULT_MONGODB_DATABASE);
            assert!(
                !format!("{uri:?} {uri}").contains("s3cret"),
                "Debug and Display redact"
            );
        }
        other => panic!("expected MongoDB, got {other:?}"),
    }
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "the config's Debug redacts"
    );
    assert_eq!(
        c.coordination.backend,
        CoordinationBackend::Etcd {
            endpoints: vec!["http://10.0.0.1:2379".into(), "http://10.0.0.2:2379".into()],
            prefix: config::DEFAULT_ETCD_PREFIX.into(),
        }
    );
    assert_eq!(c.coordination.lease_ttl, Duration::from_secs(15));

    let err = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_STORE__BACKEND", "mongodb"),
        ])
        .load()
        .expect_err("no uri");
    assert_eq!(invalid(&err).0, "store.mongodb_uri");

    let err = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_COORDINATION__BACKEND", "etcd"),
            ("CCM_COORDINATION__ETCD_PREFIX", "ccm/"),
        ])
        .load()
        .expect_err("bad prefix");
    assert_eq!(invalid(&err).0, "coordination.etcd_prefix");

    let err = ConfigLoader::new()
        .env([
            ("CCM_AUTH__INSECURE_NO_AUTH", "true"),
            ("CCM_COORDINATION__LEASE_TTL", "1s"),
        ])
        .load()
        .expect_err("lease too short");
    assert_eq!(invalid(&err).0, "coordination.lease_ttl");
}

#[test]
fn effective_toml_round_trips_and_redacts_secrets() {
    let c = ConfigLoader::new()
        .env([
            (
                "CCM_AUTH__ISSUER_URL",
                "https://keycloak.example/realms/ccm",
            ),
            ("CCM_AUTH__AUDIENCES", "ccm,ccm-web"),
            ("CCM_STORE__BACKEND", "mongodb"),
            ("CCM_STORE__MONGODB_URI", "mongodb://ccm:s3cret@db:27017/"),
            ("CCM_STORE__MONGODB_DATABASE", "ccm_prod"),
            ("CCM_COORDINATION__BACKEND", "etcd"),
            ("CCM_REQUEST_TIMEOUT", "1m30s"),
            ("CCM_SHUTDOWN_GRACE_PERIOD", "1500ms"),
            ("CCM_CLOUDEVENTS__SINK_URL", "http://collector:8080/events"),
            ("CCM_TELEMETRY__LOG_FORMAT", "json"),
        ])
        .args(&args(&["--listen-addr", "0.0.0.0:50051"]))
        .load()
        .expect("valid");
    let text = c.effective_toml();
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("mongodb://ccm:REDACTED@db:27017/"), "{text}");
    assert!(text.contains("request_timeout = \"1m30s\""), "{text}");
    assert!(text.contains("# flag --listen-addr"), "{text}");
    assert!(
        text.contains("# environment variable CCM_TELEMETRY__LOG_FORMAT"),
        "{text}"
    );
    assert!(
        text.contains("[store]") && text.contains("[coordination]"),
        "{text}"
    );
    assert!(
        !text.contains("sqlite_path"),
        "unused backend keys are left out: {text}"
    );

    // Reading it back gives the same configuration, except the redacted password.
    let again = ConfigLoader::new()
        .file_text("/printed.toml", text.clone())
        .load()
        .expect("the printed configuration is valid");
    let mut expected = c.clone();
    expected.store = StoreConfig::MongoDb {
        uri: config::Secret::new("mongodb://ccm:REDACTED@db:27017/"),
        database: "ccm_prod".into(),
    };
    assert_eq!(again, expected);

    // The defaults round-trip exactly.
    let defaults = ConfigLoader::new().env(insecure()).load().expect("valid");
    let again = ConfigLoader::new()
        .file_text("/d.toml", defaults.effective_toml())
        .load()
        .expect("valid");
    assert_eq!(again, defaults);
}

#[test]
fn units_parse_and_format() {
    for (text, d) in [
        ("30s", Duration::from_secs(30)),
        ("500ms", Duration::from_millis(500)),
        ("5m", Duration::from_secs(300)),
        ("1h30m", Duration::from_secs(5400)),
        ("2h0m5s250ms", Duration::from_millis(7_205_250)),
    ] {
        assert_eq!(config::parse_duration(text), Ok(d), "{text}");
        assert_eq!(config::parse_duration(&config::format_duration(d)), Ok(d));
    }
    assert_eq!(config::format_duration(Duration::ZERO), "0s");
    for bad in [
        "",
        "30",
        "s",
        "30 s",
        "1.5s",
        "3d",
        "-1s",
        "99999999999999999999h",
    ] {
        assert!(config::parse_duration(bad).is_err(), "{bad:?}");
    }
    assert_eq!(config::parse_size("8MiB"), Ok(8 << 20));
    assert_eq!(config::parse_size("1000"), Ok(1000));
    assert_eq!(config::format_size(8 << 20), "8MiB");
    assert_eq!(config::format_size(1000), "1000");
    assert!(config::parse_size("8MB").is_err());
    assert!(config::parse_size("MiB").is_err());
}

#[test]
fn every_key_has_a_flag_and_is_documented() {
    let command = <Cli as clap::CommandFactory>::command();
    let flags: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect();
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md"),
    )
    .expect("docs/configuration.md exists");
    for key in KEYS {
        assert!(
            flags.contains(&key.flag.to_owned()),
            "no flag {} for {}",
            key.flag,
            key.key
        );
        assert!(
            key.env.starts_with(config::ENV_PREFIX),
            "{} does not start with CCM_",
            key.env
        );
        let expected_env = format!("CCM_{}", key.key.to_ascii_uppercase().replace('.', "__"));
        assert_eq!(key.env, expected_env, "env naming scheme");
        for needle in [key.key, key.env, key.flag] {
            assert!(
                doc.contains(&format!("`{needle}`")),
                "docs/configuration.md lacks `{needle}`"
            );
        }
        // Every key can be set through its flag.
        let value = match key.kind {
            config::KeyKind::Bool => None,
            _ => Some("x"),
        };
        let mut argv = vec![key.flag];
        argv.extend(value);
        assert!(
            Cli::try_parse_from(std::iter::once("ccm").chain(argv.iter().copied())).is_ok(),
            "flag {} parses",
            key.flag
        );
    }
    assert!(flags.contains(&"--config".to_owned()));
}

#[test]
fn a_config_built_in_code_is_validated_too() {
    let mut c = ControlPlaneConfig::default();
    assert!(
        c.validate().is_err(),
        "defaults alone do not say how to authenticate"
    );
    c.auth.insecure_no_auth = true;
    assert!(c.validate().is_ok());
    c.max_message_size = 10;
    let (key, source, _) = invalid(&c.validate().expect_err("too small"));
    assert_eq!(
        (key.as_str(), source.as_str()),
        ("max_message_size", "default")
    );
}
