//! The conformance suite against [`SimulatedCloud`] on a manual clock, plus the simulated
//! cloud's own behaviour: timings, failure injection, the instance limit, dying instances, ids and
//! addresses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ccm_cloud::conformance::{self, Fidelity, Harness};
use ccm_cloud::simulated::{
    DEFAULT_BOOT_TIME, DEFAULT_STOP_TIME, DEFAULT_TERMINATE_TIME, Operation, default_images,
};
use ccm_cloud::{
    CloudError, CloudImage, CloudProvider, InstanceState, LaunchRequest, ListFilter,
    SimulatedCloud, SimulatedConfig,
};
use ccm_core::clock::{Clock, ManualClock};
use chrono::{TimeZone, Utc};

fn clock() -> Arc<ManualClock> {
    let start = Utc
        .with_ymd_and_hms(2026, 1, 15, 9, 0, 0)
        .single()
        .expect("valid time");
    Arc::new(ManualClock::new(start))
}

fn cloud(clock: &Arc<ManualClock>, config: SimulatedConfig) -> SimulatedCloud {
    SimulatedCloud::new(clock.clone(), config)
}

fn advance(clock: &ManualClock, by: chrono::Duration) {
    clock.advance(by);
}

struct Simulated {
    clock: Arc<ManualClock>,
    cloud: SimulatedCloud,
}

impl Simulated {
    fn new() -> Self {
        let clock = clock();
        let cloud = cloud(&clock, SimulatedConfig::default());
        Self { clock, cloud }
    }
}

#[async_trait]
impl Harness for Simulated {
    fn provider(&self) -> Arc<dyn CloudProvider> {
        Arc::new(self.cloud.clone())
    }

    async fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).expect("small duration");
        self.clock.advance(by);
    }

    fn step(&self) -> Duration {
        Duration::from_millis(500)
    }

    async fn add_image(&self, name: &str) -> CloudImage {
        self.cloud.add_image(name, "conformance image")
    }

    fn many(&self) -> usize {
        12
    }

    fn fidelity(&self) -> Fidelity {
        Fidelity::FULL
    }
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                conformance::$name(&Simulated::new()).await;
            }
        )*
    };
}

conformance_tests!(
    launch_reaches_running_with_tags,
    launch_is_idempotent_per_worker_id,
    images_are_found_by_pattern,
    stop_and_start,
    terminate_is_final_and_tolerant,
    describe_unknown_is_none,
    list_filters,
    many_instances_are_all_listed,
    update_tags_sets_and_removes,
    errors_are_classified,
);

fn request(worker: &str) -> LaunchRequest {
    LaunchRequest {
        worker_id: worker.to_owned(),
        name: worker.to_owned(),
        template_name: "small".to_owned(),
        instance_type: "m5zn.metal".to_owned(),
        ami_name_pattern: "cml-2.*".to_owned(),
        ..LaunchRequest::default()
    }
}

async fn state(cloud: &SimulatedCloud, id: &str) -> InstanceState {
    cloud
        .describe(id)
        .await
        .expect("describe")
        .expect("known")
        .state
}

#[tokio::test]
async fn states_advance_exactly_at_the_configured_times() {
    let clock = clock();
    let config = SimulatedConfig {
        boot_time: chrono::Duration::seconds(10),
        stop_time: chrono::Duration::seconds(4),
        terminate_time: chrono::Duration::seconds(2),
        ..SimulatedConfig::default()
    };
    let cloud = cloud(&clock, config);
    let launched = cloud.launch(&request("w1")).await.expect("launch");
    let id = launched.instance_id;
    assert_eq!(launched.state, InstanceState::Pending);
    assert_eq!(launched.public_ip, None, "no public IP while pending");
    assert_eq!(launched.launch_time, Some(clock.now()));

    advance(&clock, chrono::Duration::milliseconds(9_999));
    assert_eq!(state(&cloud, &id).await, InstanceState::Pending);
    advance(&clock, chrono::Duration::milliseconds(1));
    let running = cloud.describe(&id).await.expect("describe").expect("known");
    assert_eq!(running.state, InstanceState::Running);
    let first_public = running.public_ip.clone().expect("public IP when running");
    let private = running.private_ip.clone().expect("private IP");

    cloud.stop(&id).await.expect("stop");
    let stopping = cloud.describe(&id).await.expect("describe").expect("known");
    assert_eq!(stopping.state, InstanceState::Stopping);
    assert_eq!(stopping.public_ip, None, "public IP released on stop");
    advance(&clock, chrono::Duration::seconds(3));
    assert_eq!(state(&cloud, &id).await, InstanceState::Stopping);
    advance(&clock, chrono::Duration::seconds(1));
    assert_eq!(state(&cloud, &id).await, InstanceState::Stopped);

    cloud.start(&id).await.expect("start");
    assert_eq!(state(&cloud, &id).await, InstanceState::Pending);
    advance(&clock, chrono::Duration::seconds(10));
    let restarted = cloud.describe(&id).await.expect("describe").expect("known");
    assert_eq!(restarted.state, InstanceState::Running);
    assert_eq!(restarted.private_ip.as_deref(), Some(private.as_str()));
    assert_ne!(restarted.public_ip.as_deref(), Some(first_public.as_str()));
    assert_eq!(
        restarted.launch_time,
        Some(clock.now() - chrono::Duration::seconds(10))
    );

    cloud.terminate(&id).await.expect("terminate");
    assert_eq!(state(&cloud, &id).await, InstanceState::ShuttingDown);
    advance(&clock, chrono::Duration::seconds(2));
    assert_eq!(state(&cloud, &id).await, InstanceState::Terminated);
}

#[tokio::test]
async fn terminated_instances_are_forgotten_after_the_retention() {
    let clock = clock();
    let cloud = cloud(&clock, SimulatedConfig::default());
    let id = cloud
        .launch(&request("w1"))
        .await
        .expect("launch")
        .instance_id;
    cloud.terminate(&id).await.expect("terminate");
    advance(&clock, DEFAULT_TERMINATE_TIME);
    assert_eq!(state(&cloud, &id).await, InstanceState::Terminated);
    advance(&clock, ccm_cloud::simulated::DEFAULT_TERMINATED_RETENTION);
    assert!(cloud.describe(&id).await.expect("describe").is_none());
    cloud
        .terminate(&id)
        .await
        .expect("terminate of a forgotten instance");
}

#[tokio::test]
async fn zero_times_make_transitions_immediate() {
    let clock = clock();
    let zero = chrono::Duration::zero();
    let cloud = cloud(
        &clock,
        SimulatedConfig {
            boot_time: zero,
            stop_time: zero,
            terminate_time: zero,
            ..SimulatedConfig::default()
        },
    );
    let launched = cloud.launch(&request("w1")).await.expect("launch");
    // The first description is taken at launch; the next one is running.
    assert_eq!(
        state(&cloud, &launched.instance_id).await,
        InstanceState::Running
    );
    cloud.stop(&launched.instance_id).await.expect("stop");
    assert_eq!(
        state(&cloud, &launched.instance_id).await,
        InstanceState::Stopped
    );
}

#[tokio::test]
async fn defaults_are_a_few_seconds() {
    let config = SimulatedConfig::default();
    assert_eq!(config.boot_time, DEFAULT_BOOT_TIME);
    assert_eq!(config.stop_time, DEFAULT_STOP_TIME);
    assert_eq!(config.terminate_time, DEFAULT_TERMINATE_TIME);
    for d in [DEFAULT_BOOT_TIME, DEFAULT_STOP_TIME, DEFAULT_TERMINATE_TIME] {
        assert!(d >= chrono::Duration::seconds(1) && d <= chrono::Duration::seconds(10));
    }
    assert_eq!(config.instance_limit, None);
}

#[tokio::test]
async fn injected_launch_failures_then_success() {
    let clock = clock();
    let cloud = cloud(&clock, SimulatedConfig::default());
    cloud.fail_next_launches(2, CloudError::Quota("InsufficientInstanceCapacity".into()));
    cloud.fail_next_launches(1, CloudError::Unavailable("InternalError".into()));
    for expected in ["Quota", "Quota", "Unavailable"] {
        let err = cloud.launch(&request("w1")).await.expect_err("injected");
        assert!(err.is_retryable(), "{err:?}");
        let class = match err {
            CloudError::Quota(_) => "Quota",
            CloudError::Unavailable(_) => "Unavailable",
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(class, expected);
    }
    assert_eq!(cloud.launch_count(), 0);
    cloud
        .launch(&request("w1"))
        .await
        .expect("fourth launch works");
    assert_eq!(cloud.launch_count(), 1);
}

#[tokio::test]
async fn failures_can_target_any_operation_and_be_cleared() {
    let clock = clock();
    let cloud = cloud(&clock, SimulatedConfig::default());
    let id = cloud
        .launch(&request("w1"))
        .await
        .expect("launch")
        .instance_id;
    cloud.fail_next(
        Operation::Describe,
        1,
        CloudError::Throttled("slow down".into()),
    );
    assert!(matches!(
        cloud.describe(&id).await,
        Err(CloudError::Throttled(_))
    ));
    assert!(
        cloud
            .describe(&id)
            .await
            .expect("second describe")
            .is_some()
    );

    cloud.fail_next(Operation::List, 1, CloudError::Auth("expired".into()));
    assert!(matches!(
        cloud.list(&ListFilter::default()).await,
        Err(CloudError::Auth(_))
    ));
    cloud.fail_next(Operation::Stop, 5, CloudError::Unavailable("down".into()));
    cloud.clear_failures();
    cloud.stop(&id).await.expect("stop after clearing");
}

#[tokio::test]
async fn instance_limit_caps_live_instances() {
    let clock = clock();
    let cloud = cloud(
        &clock,
        SimulatedConfig {
            instance_limit: Some(2),
            ..SimulatedConfig::default()
        },
    );
    let a = cloud.launch(&request("a")).await.expect("a").instance_id;
    cloud.launch(&request("b")).await.expect("b");
    match cloud.launch(&request("c")).await {
        Err(CloudError::Quota(text)) => assert!(text.contains("InstanceLimitExceeded"), "{text}"),
        other => panic!("expected Quota, got {other:?}"),
    }
    // Idempotent repeats are not new instances.
    cloud.launch(&request("a")).await.expect("repeat of a");
    // Stopped instances still count; terminated ones do not.
    cloud.stop(&a).await.expect("stop");
    advance(&clock, DEFAULT_STOP_TIME);
    assert!(cloud.launch(&request("c")).await.is_err());
    cloud.terminate(&a).await.expect("terminate");
    assert!(
        cloud.launch(&request("c")).await.is_err(),
        "shutting-down still counts"
    );
    advance(&clock, DEFAULT_TERMINATE_TIME);
    cloud
        .launch(&request("c"))
        .await
        .expect("room after termination");
    cloud.set_instance_limit(None);
    cloud.launch(&request("d")).await.expect("no limit");
}

#[tokio::test]
async fn killed_instances_die() {
    let clock = clock();
    let cloud = cloud(&clock, SimulatedConfig::default());
    let id = cloud
        .launch(&request("w1"))
        .await
        .expect("launch")
        .instance_id;
    advance(&clock, DEFAULT_BOOT_TIME);
    assert_eq!(state(&cloud, &id).await, InstanceState::Running);
    cloud.kill(&id).expect("kill");
    assert_eq!(state(&cloud, &id).await, InstanceState::ShuttingDown);
    advance(&clock, DEFAULT_TERMINATE_TIME);
    assert_eq!(state(&cloud, &id).await, InstanceState::Terminated);
    // The worker's next launch makes a new instance.
    let again = cloud.launch(&request("w1")).await.expect("relaunch");
    assert_ne!(again.instance_id, id);
    assert!(matches!(
        cloud.kill("i-0000000000000abcd"),
        Err(CloudError::NotFound(_))
    ));
}

#[tokio::test]
async fn ids_and_addresses_look_like_ec2() {
    let clock = clock();
    let cloud = cloud(
        &clock,
        SimulatedConfig {
            boot_time: chrono::Duration::zero(),
            ..SimulatedConfig::default()
        },
    );
    let mut privates = Vec::new();
    let mut publics = Vec::new();
    for n in 0..300 {
        let id = cloud
            .launch(&request(&format!("w{n}")))
            .await
            .expect("launch")
            .instance_id;
        let hex = id.strip_prefix("i-").expect("i- prefix");
        assert_eq!(hex.len(), 17, "{id}");
        assert!(
            hex.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let inst = cloud.describe(&id).await.expect("describe").expect("known");
        let private: std::net::Ipv4Addr = inst.private_ip.expect("private").parse().expect("ip");
        let public: std::net::Ipv4Addr = inst.public_ip.expect("public").parse().expect("ip");
        assert!(private.is_private(), "{private}");
        assert!(!public.is_private() && !public.is_loopback(), "{public}");
        privates.push(private);
        publics.push(public);
    }
    privates.sort();
    privates.dedup();
    publics.sort();
    publics.dedup();
    assert_eq!(privates.len(), 300, "private IPs are unique");
    assert_eq!(publics.len(), 300, "public IPs are unique");
}

#[tokio::test]
async fn malformed_ids_are_invalid_requests() {
    let clock = clock();
    let cloud = cloud(&clock, SimulatedConfig::default());
    for bad in [
        "",
        "i-",
        "i-XYZ",
        "vol-0123456789abcdef0",
        "i-0123456789ABCDEF0",
    ] {
        assert!(
            matches!(
                cloud.describe(bad).await,
                Err(CloudError::InvalidRequest(_))
            ),
            "{bad:?}"
        );
        assert!(matches!(
            cloud.start(bad).await,
            Err(CloudError::InvalidRequest(_))
        ));
    }
}

#[tokio::test]
async fn image_catalog_newest_by_date_not_name() {
    let clock = clock();
    let cloud = cloud(&clock, SimulatedConfig::default());
    let defaults = default_images();
    let newest_default = cloud
        .find_image("cml-*")
        .await
        .expect("find")
        .expect("match");
    assert_eq!(newest_default.name, "cml-2.9.0-lablet-v0.1.0");
    assert_eq!(newest_default, defaults[2]);
    // Registered later with a smaller name: the date decides.
    cloud.add_image("zz-old-name", "");
    advance(&clock, chrono::Duration::seconds(1));
    let newer = cloud.add_image("aa-new-name", "");
    let found = cloud
        .find_image("??-*")
        .await
        .expect("find")
        .expect("match");
    assert_eq!(found, newer);
    assert_eq!(cloud.images().len(), defaults.len() + 2);
}

#[tokio::test]
async fn too_many_tags_are_refused_without_change() {
    let clock = clock();
    let cloud = cloud(&clock, SimulatedConfig::default());
    let id = cloud
        .launch(&request("w1"))
        .await
        .expect("launch")
        .instance_id;
    let many: BTreeMap<String, String> = (0..50).map(|i| (format!("k{i}"), "v".into())).collect();
    assert!(matches!(
        cloud.update_tags(&id, &many, &[]).await,
        Err(CloudError::Quota(_))
    ));
    let tags = cloud
        .describe(&id)
        .await
        .expect("describe")
        .expect("known")
        .tags;
    assert!(!tags.contains_key("k0"), "a refused update changed nothing");
}

#[tokio::test]
async fn clones_share_one_cloud() {
    let clock = clock();
    let cloud = cloud(&clock, SimulatedConfig::default());
    let other = cloud.clone();
    let id = cloud
        .launch(&request("w1"))
        .await
        .expect("launch")
        .instance_id;
    assert!(other.describe(&id).await.expect("describe").is_some());
    assert_eq!(other.kind(), "simulated");
    assert!(format!("{other:?}").contains("instances: 1"));
}
