//! `HttpCmlClient` against the CML simulator over real HTTP (no mocks).

use std::sync::Arc;
use std::time::Duration;

use ccm_cml::client::{Deregistration, LabAction};
use ccm_cml::http::{CmlEndpoint, HttpCmlClient, HttpCmlClientFactory};
use ccm_cml::{CmlClient, CmlClientFactory, CmlError};
use ccm_cml_sim::{CmlSim, FaultPatch, LicenceMode, SimHandle, SimOptions};

const LAB: &str = include_str!("fixtures/three-node-lab.yaml");
const MIB: u64 = 1024 * 1024;

fn endpoint(base_url: &str) -> CmlEndpoint {
    CmlEndpoint::new(base_url, "admin", "admin")
}

fn client(base_url: &str) -> HttpCmlClient {
    HttpCmlClient::new(endpoint(base_url)).unwrap()
}

async fn sim(options: SimOptions) -> SimHandle {
    CmlSim::start(options).await.unwrap()
}

/// Polls the licence until `status` (bounded; the simulator's delay is milliseconds).
async fn wait_for_registration(client: &HttpCmlClient, status: &str) {
    for _ in 0..500 {
        if client.licensing().await.unwrap().registration_status == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("registration never reached {status}");
}

#[tokio::test]
async fn every_call_round_trips() {
    let sim = sim(SimOptions::default()).await;
    let cml = client(&sim.base_url());

    let info = cml.system_information().await.unwrap();
    assert!(info.ready);
    assert_eq!(info.version, ccm_cml_sim::options::DEFAULT_VERSION);

    let health = cml.system_health().await.unwrap();
    assert!(health.valid && health.is_licensed && !health.is_enterprise);
    assert_eq!(health.computes.len(), 1);
    assert!(health.computes.values().all(|c| c.is_ready));

    let licence = cml.licensing().await.unwrap();
    assert_eq!(licence.registration_status, "EVALUATION");
    assert_eq!(licence.authorization_status, "EVAL");
    assert!(licence.raw.pointer("/udi/product_uuid").is_some());

    assert!(cml.list_labs().await.unwrap().is_empty());
    let idle = cml.system_stats().await.unwrap();
    assert_eq!(idle.dominfo.total_nodes, 0);

    // Title with characters that need query encoding; it overrides the YAML's title.
    let imported = cml.import_lab(LAB, Some("lab a&b=c ü")).await.unwrap();
    assert_eq!(cml.list_labs().await.unwrap(), vec![imported.id.clone()]);
    let lab = cml.get_lab(&imported.id).await.unwrap();
    assert_eq!(lab.id, imported.id);
    assert_eq!(lab.lab_title, "lab a&b=c ü");
    assert_eq!(lab.lab_description, "three nodes for the client tests");
    assert_eq!(lab.state, "DEFINED_ON_CORE");
    assert_eq!((lab.node_count, lab.link_count), (3, 2));
    assert_eq!(lab.owner_username, "admin");
    assert_eq!(cml.download_lab(&imported.id).await.unwrap(), LAB);

    let defined = cml.system_stats().await.unwrap();
    assert_eq!(defined.dominfo.total_nodes, 3);
    assert_eq!(defined.dominfo.running_nodes, 0);
    assert!(defined.all.disk.used > idle.all.disk.used);

    cml.lab_action(&imported.id, LabAction::Start)
        .await
        .unwrap();
    assert_eq!(cml.get_lab(&imported.id).await.unwrap().state, "BOOTED");
    let running = cml.system_stats().await.unwrap();
    assert_eq!(running.dominfo.running_nodes, 3);
    // cpus 2 + 1 + default 1; ram 1024 + 512 + default 2048 MiB.
    assert_eq!(running.dominfo.allocated_cpus, 4);
    assert_eq!(running.dominfo.allocated_memory, 3584);
    assert_eq!(
        running.all.memory.used - defined.all.memory.used,
        3584 * MIB
    );
    assert!(running.all.cpu.percent > defined.all.cpu.percent);

    cml.lab_action(&imported.id, LabAction::Stop).await.unwrap();
    assert_eq!(cml.get_lab(&imported.id).await.unwrap().state, "STOPPED");
    assert_eq!(cml.system_stats().await.unwrap().dominfo.running_nodes, 0);
    cml.lab_action(&imported.id, LabAction::Wipe).await.unwrap();
    assert_eq!(
        cml.get_lab(&imported.id).await.unwrap().state,
        "DEFINED_ON_CORE"
    );
    cml.delete_lab(&imported.id).await.unwrap();
    assert!(cml.list_labs().await.unwrap().is_empty());

    let categories: Vec<String> = cml
        .telemetry_events()
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            assert!(!e.timestamp.is_empty());
            assert_eq!(e.data["lab_id"], imported.id.as_str());
            e.category
        })
        .collect();
    assert_eq!(
        categories,
        [
            "import_lab",
            "start_lab",
            "stop_lab",
            "wipe_lab",
            "delete_lab"
        ]
    );
    // One authentication served every call.
    assert_eq!(sim.state("default").unwrap().authentications, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn yaml_title_is_used_without_a_title_parameter() {
    let sim = sim(SimOptions::default()).await;
    let cml = client(&sim.base_url());
    let imported = cml.import_lab(LAB, None).await.unwrap();
    assert_eq!(
        cml.get_lab(&imported.id).await.unwrap().lab_title,
        "ccm test lab"
    );
    // The simulator keeps the YAML as imported: the allocated ports are there.
    let state = sim.state("default").unwrap();
    assert!(state.labs[0].yaml.contains("serial:2001"));
    assert_eq!(state.labs[0].nodes[0].tags, vec!["serial:2001".to_string()]);
}

#[tokio::test]
async fn reauthenticates_once_when_the_token_is_revoked() {
    let sim = sim(SimOptions::default()).await;
    let cml = client(&sim.base_url());
    cml.list_labs().await.unwrap();
    sim.set_faults(
        "default",
        &FaultPatch {
            expire_tokens: true,
            ..FaultPatch::default()
        },
    )
    .unwrap();
    assert_eq!(sim.state("default").unwrap().valid_tokens, 0);
    // PUT and POST paths re-authenticate too.
    cml.list_labs().await.unwrap();
    let lab = cml.import_lab(LAB, None).await.unwrap();
    sim.set_faults(
        "default",
        &FaultPatch {
            expire_tokens: true,
            ..FaultPatch::default()
        },
    )
    .unwrap();
    cml.lab_action(&lab.id, LabAction::Start).await.unwrap();
    assert_eq!(sim.state("default").unwrap().authentications, 3);
}

#[tokio::test]
async fn reauthenticates_after_token_expiry() {
    let sim = sim(SimOptions {
        token_ttl: Duration::from_millis(40),
        ..SimOptions::default()
    })
    .await;
    let cml = client(&sim.base_url());
    cml.system_health().await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    cml.system_health().await.unwrap();
    assert_eq!(sim.state("default").unwrap().authentications, 2);
}

#[tokio::test]
async fn a_401_after_reauthentication_is_an_auth_error() {
    // Tokens expire at once: the call, the re-authentication and the one retry all happen,
    // and the second 401 is reported.
    let sim = sim(SimOptions {
        token_ttl: Duration::ZERO,
        ..SimOptions::default()
    })
    .await;
    let cml = client(&sim.base_url());
    let err = cml.list_labs().await.unwrap_err();
    assert!(
        matches!(err, CmlError::Auth(ref m) if m.contains("401")),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert_eq!(sim.state("default").unwrap().authentications, 2);
}

#[tokio::test]
async fn wrong_password_is_an_auth_error() {
    let sim = sim(SimOptions::default()).await;
    let cml = HttpCmlClient::new(CmlEndpoint::new(sim.base_url(), "admin", "wrong")).unwrap();
    // system_information needs no authentication.
    assert!(cml.system_information().await.unwrap().ready);
    let err = cml.system_health().await.unwrap_err();
    assert!(
        matches!(err, CmlError::Auth(ref m) if m.contains("403")),
        "{err:?}"
    );
    assert_eq!(sim.state("default").unwrap().authentications, 0);
}

#[tokio::test]
async fn calls_slower_than_the_timeout_time_out() {
    let sim = sim(SimOptions::default()).await;
    let mut settings = endpoint(&sim.base_url());
    settings.timeout = Duration::from_millis(100);
    let cml = HttpCmlClient::new(settings).unwrap();
    cml.list_labs().await.unwrap();
    sim.set_faults(
        "default",
        &FaultPatch {
            latency_ms: Some(600),
            ..FaultPatch::default()
        },
    )
    .unwrap();
    let err = cml.system_information().await.unwrap_err();
    assert!(matches!(err, CmlError::Timeout(_)), "{err:?}");
    assert!(err.is_retryable());
    let err = cml.list_labs().await.unwrap_err();
    assert!(matches!(err, CmlError::Timeout(_)), "{err:?}");
    sim.set_faults(
        "default",
        &FaultPatch {
            latency_ms: Some(0),
            ..FaultPatch::default()
        },
    )
    .unwrap();
    cml.list_labs().await.unwrap();
}

#[tokio::test]
async fn deregistration_timeout_counts_as_done_but_auth_timeout_does_not() {
    let sim = sim(SimOptions {
        licence: LicenceMode::Registered,
        ..SimOptions::default()
    })
    .await;
    let mut settings = endpoint(&sim.base_url());
    settings.timeout = Duration::from_millis(150);
    settings.deregistration_timeout = Duration::from_millis(100);
    let cml = HttpCmlClient::new(settings).unwrap();
    assert_eq!(
        cml.licensing().await.unwrap().registration_status,
        "COMPLETED"
    );
    let slow = FaultPatch {
        latency_ms: Some(600),
        ..FaultPatch::default()
    };
    sim.set_faults("default", &slow).unwrap();
    assert_eq!(
        cml.deregister_license().await.unwrap(),
        Deregistration::TimedOut
    );
    // With no cached token the authentication itself times out: that is an error.
    cml.forget_token().await;
    let err = cml.deregister_license().await.unwrap_err();
    assert!(matches!(err, CmlError::Timeout(_)), "{err:?}");
}

#[tokio::test]
async fn status_classes_map_to_errors() {
    let sim = sim(SimOptions {
        node_limit: Some(4),
        ..SimOptions::default()
    })
    .await;
    let cml = client(&sim.base_url());

    // 404
    let err = cml.get_lab("no-such-lab").await.unwrap_err();
    assert!(
        matches!(err, CmlError::NotFound(ref m) if m.contains("no-such-lab")),
        "{err:?}"
    );
    let err = cml
        .lab_action("no-such-lab", LabAction::Start)
        .await
        .unwrap_err();
    assert!(matches!(err, CmlError::NotFound(_)), "{err:?}");
    let err = cml.download_lab("no/such lab").await.unwrap_err();
    assert!(matches!(err, CmlError::NotFound(_)), "{err:?}");

    // 400 with CML's description
    let err = cml.import_lab("{{{ not yaml", None).await.unwrap_err();
    match &err {
        CmlError::Rejected { status, message } => {
            assert_eq!(*status, 400);
            assert!(message.contains("not valid YAML"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_retryable());

    let two = "nodes:\n  - {id: n0, node_definition: a}\n  - {id: n1, node_definition: b}\n";
    let small = cml.import_lab(two, Some("two")).await.unwrap();
    cml.lab_action(&small.id, LabAction::Start).await.unwrap();
    for action in [LabAction::Wipe] {
        let err = cml.lab_action(&small.id, action).await.unwrap_err();
        assert!(
            matches!(err, CmlError::Rejected { status: 400, ref message } if message.contains("stop it")),
            "{err:?}"
        );
    }
    let err = cml.delete_lab(&small.id).await.unwrap_err();
    assert!(
        matches!(err, CmlError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    // The node limit (4) would be passed: 2 running + 3 more.
    let big = cml.import_lab(LAB, None).await.unwrap();
    let err = cml.lab_action(&big.id, LabAction::Start).await.unwrap_err();
    assert!(
        matches!(err, CmlError::Rejected { status: 400, ref message } if message.contains("node limit")),
        "{err:?}"
    );

    // 409
    cml.register_license("good-token", false).await.unwrap();
    let err = cml.register_license("good-token", false).await.unwrap_err();
    assert!(matches!(err, CmlError::Busy(_)), "{err:?}");
    assert!(err.is_retryable());

    // 5xx
    sim.set_faults(
        "default",
        &FaultPatch {
            fail_imports: Some(1),
            fail_starts: Some(1),
            fail_stops: Some(1),
            ..FaultPatch::default()
        },
    )
    .unwrap();
    let err = cml.import_lab(LAB, None).await.unwrap_err();
    assert!(
        matches!(err, CmlError::Unavailable(ref m) if m.contains("500")),
        "{err:?}"
    );
    let err = cml.lab_action(&big.id, LabAction::Start).await.unwrap_err();
    assert!(matches!(err, CmlError::Unavailable(_)), "{err:?}");
    let err = cml
        .lab_action(&small.id, LabAction::Stop)
        .await
        .unwrap_err();
    assert!(matches!(err, CmlError::Unavailable(_)), "{err:?}");
    // Each fault fires once.
    cml.import_lab(LAB, None).await.unwrap();
    cml.lab_action(&small.id, LabAction::Stop).await.unwrap();
    cml.lab_action(&big.id, LabAction::Start).await.unwrap();

    sim.set_faults(
        "default",
        &FaultPatch {
            unreachable: Some(true),
            ..FaultPatch::default()
        },
    )
    .unwrap();
    let err = cml.system_information().await.unwrap_err();
    assert!(
        matches!(err, CmlError::Unavailable(ref m) if m.contains("503")),
        "{err:?}"
    );

    // Nothing listening.
    let addr = sim.addr();
    sim.shutdown().await;
    let gone = client(&format!("http://{addr}"));
    let err = gone.system_information().await.unwrap_err();
    assert!(matches!(err, CmlError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn bad_endpoints_are_refused() {
    for bad in ["ftp://cml", "cml.example", "https://cml/?x=1", ""] {
        let err = HttpCmlClient::new(endpoint(bad)).unwrap_err();
        assert!(
            matches!(err, CmlError::InvalidEndpoint(_)),
            "{bad}: {err:?}"
        );
    }
    let factory = HttpCmlClientFactory::new(endpoint("")).unwrap();
    assert!(matches!(
        factory.client("not a url"),
        Err(CmlError::InvalidEndpoint(_))
    ));
}

#[tokio::test]
async fn hosts_are_isolated_and_clients_cached() {
    let sim = sim(SimOptions::default()).await;
    let factory = HttpCmlClientFactory::new(endpoint("")).unwrap();
    let a = factory.client(&sim.host_url("i-0aaa")).unwrap();
    let b = factory.client(&sim.host_url("i-0bbb")).unwrap();
    let default = factory.client(&sim.base_url()).unwrap();
    let again = factory
        .client(&format!("{}/", sim.host_url("i-0aaa")))
        .unwrap();
    assert!(Arc::ptr_eq(&a, &again));
    assert_eq!(factory.len(), 3);

    let lab = a.import_lab(LAB, None).await.unwrap();
    a.lab_action(&lab.id, LabAction::Start).await.unwrap();
    assert_eq!(a.list_labs().await.unwrap(), vec![lab.id.clone()]);
    assert!(b.list_labs().await.unwrap().is_empty());
    assert!(default.list_labs().await.unwrap().is_empty());
    assert!(matches!(
        b.get_lab(&lab.id).await,
        Err(CmlError::NotFound(_))
    ));
    assert_eq!(a.system_stats().await.unwrap().dominfo.running_nodes, 3);
    assert_eq!(b.system_stats().await.unwrap().dominfo.running_nodes, 0);

    // Faults and licences are per host too.
    sim.set_faults(
        "i-0bbb",
        &FaultPatch {
            unreachable: Some(true),
            ..FaultPatch::default()
        },
    )
    .unwrap();
    assert!(b.system_information().await.is_err());
    assert!(a.system_information().await.unwrap().ready);
    a.register_license("token", false).await.unwrap();
    assert_eq!(
        default.licensing().await.unwrap().registration_status,
        "EVALUATION"
    );

    let mut hosts = sim.hosts();
    hosts.sort();
    assert_eq!(hosts, ["default", "i-0aaa", "i-0bbb"]);
    assert!(factory.forget(&sim.host_url("i-0aaa")));
    assert!(!factory.forget(&sim.host_url("i-0aaa")));
    assert_eq!(factory.len(), 2);
}

#[tokio::test]
async fn licence_registration_flow() {
    let sim = sim(SimOptions {
        registration_delay: Duration::from_millis(30),
        ..SimOptions::default()
    })
    .await;
    let cml = client(&sim.base_url());

    let err = cml.register_license("invalid", false).await.unwrap_err();
    assert!(
        matches!(err, CmlError::Rejected { status: 400, ref message } if message == "Invalid token."),
        "{err:?}"
    );
    let err = cml.deregister_license().await.unwrap_err();
    assert!(
        matches!(err, CmlError::Rejected { status: 400, ref message } if message == "Already deregistered"),
        "{err:?}"
    );

    cml.register_license("good", false).await.unwrap();
    assert_eq!(
        cml.licensing().await.unwrap().registration_status,
        "IN_PROGRESS"
    );
    assert!(matches!(
        cml.register_license("good", true).await,
        Err(CmlError::Busy(_))
    ));
    assert!(matches!(
        cml.deregister_license().await,
        Err(CmlError::Busy(_))
    ));
    wait_for_registration(&cml, "COMPLETED").await;
    let licence = cml.licensing().await.unwrap();
    assert_eq!(licence.authorization_status, "AUTHORIZED");
    assert!(licence.raw["registration"]["register_time"]["succeeded"].is_string());
    assert!(cml.system_health().await.unwrap().is_licensed);

    // Registered: a plain registration is refused, a re-registration is accepted.
    assert!(matches!(
        cml.register_license("good", false).await,
        Err(CmlError::Rejected { status: 400, .. })
    ));
    cml.register_license("good", true).await.unwrap();
    wait_for_registration(&cml, "COMPLETED").await;

    assert_eq!(
        cml.deregister_license().await.unwrap(),
        Deregistration::Done
    );
    assert_eq!(
        cml.licensing().await.unwrap().registration_status,
        "EVALUATION"
    );

    // Deregistered locally only (202).
    sim.set_faults(
        "default",
        &FaultPatch {
            deregistration_local_only: Some(true),
            ..FaultPatch::default()
        },
    )
    .unwrap();
    cml.register_license("good", false).await.unwrap();
    wait_for_registration(&cml, "COMPLETED").await;
    assert_eq!(
        cml.deregister_license().await.unwrap(),
        Deregistration::LocalOnly
    );

    // A registration that fails at Cisco ends FAILED.
    sim.set_faults(
        "default",
        &FaultPatch {
            fail_registration: Some(true),
            ..FaultPatch::default()
        },
    )
    .unwrap();
    cml.register_license("good", false).await.unwrap();
    wait_for_registration(&cml, "FAILED").await;
}

#[tokio::test]
async fn unregistered_cml_is_not_licensed() {
    let sim = sim(SimOptions {
        licence: LicenceMode::Unregistered,
        enterprise: true,
        ..SimOptions::default()
    })
    .await;
    let cml = client(&sim.base_url());
    let health = cml.system_health().await.unwrap();
    assert!(!health.is_licensed);
    assert!(health.is_enterprise);
    let licence = cml.licensing().await.unwrap();
    assert_eq!(licence.registration_status, "NOT_REGISTERED");
    assert!(licence.is_enterprise);
}

#[tokio::test]
async fn unready_cml_reports_not_ready_and_refuses_calls() {
    let sim = sim(SimOptions {
        ready_after: Duration::from_secs(3600),
        ..SimOptions::default()
    })
    .await;
    let cml = client(&sim.base_url());
    assert!(!cml.system_information().await.unwrap().ready);
    let err = cml.list_labs().await.unwrap_err();
    assert!(
        matches!(err, CmlError::Unavailable(ref m) if m.contains("503")),
        "{err:?}"
    );

    let ready = self::sim(SimOptions::default()).await;
    let cml = client(&ready.base_url());
    ready
        .set_faults(
            "default",
            &FaultPatch {
                unready: Some(true),
                ..FaultPatch::default()
            },
        )
        .unwrap();
    assert!(!cml.system_information().await.unwrap().ready);
    assert!(matches!(
        cml.system_health().await,
        Err(CmlError::Unavailable(_))
    ));
    ready
        .set_faults(
            "default",
            &FaultPatch {
                unready: Some(false),
                ..FaultPatch::default()
            },
        )
        .unwrap();
    assert!(cml.system_health().await.unwrap().valid);
}

#[tokio::test]
async fn dominfo_is_summed_over_computes() {
    let sim = sim(SimOptions {
        computes: 2,
        ..SimOptions::default()
    })
    .await;
    let cml = client(&sim.base_url());
    let lab = cml.import_lab(LAB, None).await.unwrap();
    cml.lab_action(&lab.id, LabAction::Start).await.unwrap();
    let stats = cml.system_stats().await.unwrap();
    let computes = stats.raw["computes"].as_object().unwrap();
    assert_eq!(computes.len(), 2);
    let per_compute: Vec<u64> = computes
        .values()
        .map(|c| c["stats"]["dominfo"]["running_nodes"].as_u64().unwrap())
        .collect();
    assert!(
        per_compute.iter().all(|&n| n > 0 && n < 3),
        "{per_compute:?}"
    );
    assert_eq!(stats.dominfo.running_nodes, 3);
    assert_eq!(stats.dominfo.total_nodes, 3);
    assert_eq!(stats.dominfo.allocated_cpus, 4);
    assert_eq!(stats.dominfo.allocated_memory, 3584);
}

#[tokio::test]
async fn client_debug_output_hides_secrets() {
    let sim = sim(SimOptions {
        password: "s3cret-pw".into(),
        ..SimOptions::default()
    })
    .await;
    let cml = HttpCmlClient::new(CmlEndpoint::new(sim.base_url(), "admin", "s3cret-pw")).unwrap();
    cml.list_labs().await.unwrap();
    let text = format!("{cml:?}");
    assert!(!text.contains("s3cret-pw"), "password leaked: {text}");
    assert!(!text.contains("sim-"), "token leaked: {text}");
    let factory = HttpCmlClientFactory::new(CmlEndpoint::new("", "admin", "s3cret-pw")).unwrap();
    assert!(!format!("{factory:?}").contains("s3cret-pw"));
}
