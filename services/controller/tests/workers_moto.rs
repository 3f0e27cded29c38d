//! The worker reconciler against the moto EC2 emulator (the real `Ec2Provider` over HTTP) and
//! the CML simulator: launch → RUNNING, admin tag changes applied to EC2, admin stop carried out.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice};
use ccm_cloud::CloudProvider;
use ccm_cloud::aws::{AwsCredentials, AwsSettings, Ec2Provider};
use ccm_proto::v1 as pb;
use ccm_testkit::moto::{MotoServer, TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY};
use common::World;

async fn provider(moto: &MotoServer) -> Ec2Provider {
    let provider = Ec2Provider::new(AwsSettings {
        endpoint_url: Some(moto.endpoint().to_owned()),
        credentials: AwsCredentials::Static {
            access_key_id: TEST_ACCESS_KEY_ID.to_owned(),
            secret_access_key: TEST_SECRET_ACCESS_KEY.to_owned(),
            session_token: None,
        },
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..AwsSettings::new(TEST_REGION)
    })
    .await
    .expect("provider");
    provider
        .client()
        .register_image()
        .name("cml-2.9.0-lablet-test")
        .description("test image")
        .root_device_name("/dev/sda1")
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name("/dev/sda1")
                .ebs(EbsBlockDevice::builder().volume_size(8).build())
                .build(),
        )
        .send()
        .await
        .expect("RegisterImage");
    provider
}

async fn wait_state(world: &World, id: &str, state: pb::WorkerState) -> pb::CmlWorker {
    world
        .until(&format!("worker {}", state.as_str_name()), || async {
            let w = world.worker(id).await;
            (w.state() == state).then_some(w)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_worker_lifecycle_on_moto_ec2() {
    let moto = MotoServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ec2 = Arc::new(provider(&moto).await);
    let world = World::start_with_cloud(
        |s| s.autoscaler_enabled = false,
        true,
        Some(ec2.clone() as Arc<dyn CloudProvider>),
    )
    .await;
    world.create_template(0).await;
    let created = world
        .client
        .workers()
        .create_worker(pb::CreateWorkerRequest {
            template_name: common::TEMPLATE.into(),
            request_id: "moto-1".into(),
            ..Default::default()
        })
        .await
        .expect("created")
        .into_inner()
        .worker
        .expect("worker");

    // Launched on EC2 (moto), running at once, CML (the simulator) answers → RUNNING.
    let running = wait_state(&world, &created.id, pb::WorkerState::Running).await;
    let facts = running.ec2.clone().expect("ec2");
    assert!(facts.instance_id.starts_with("i-"), "{facts:?}");
    assert_eq!(facts.instance_type, "m5zn.metal");
    assert!(!facts.private_ip.is_empty(), "{facts:?}");
    let instance = ec2
        .describe(&facts.instance_id)
        .await
        .expect("describe")
        .expect("the instance exists");
    assert_eq!(instance.tags.get("ccm:worker-id"), Some(&created.id));
    assert_eq!(
        instance.tags.get("Environment").map(String::as_str),
        Some("test")
    );

    // An admin replaces the tags: the controller applies them to EC2.
    world
        .client
        .workers()
        .update_worker_tags(pb::UpdateWorkerTagsRequest {
            worker_id: created.id.clone(),
            tags: [("CostCenter".to_owned(), "labs-42".to_owned())].into(),
            merge: false,
            resource_version: 0,
        })
        .await
        .expect("tags updated");
    world
        .until("tags applied on EC2", || async {
            let i = ec2.describe(&facts.instance_id).await.ok()??;
            (i.tags.get("CostCenter").map(String::as_str) == Some("labs-42")
                && !i.tags.contains_key("Environment"))
            .then_some(())
        })
        .await;
    let synced = world
        .until("TagsSynced=True", || async {
            let w = world.worker(&created.id).await;
            w.conditions
                .iter()
                .any(|c| c.r#type == "TagsSynced" && c.status() == pb::ConditionStatus::True)
                .then_some(w)
        })
        .await;
    let tags = synced.ec2.expect("ec2").tags;
    assert_eq!(tags.get("CostCenter").map(String::as_str), Some("labs-42"));
    assert!(
        tags.contains_key("ccm:template"),
        "ccm's own tags stay: {tags:?}"
    );

    // An admin stops it: EC2 stop, STOPPED.
    world
        .client
        .workers()
        .stop_worker(pb::StopWorkerRequest {
            worker_id: created.id.clone(),
            reason: "maintenance".into(),
            ..Default::default()
        })
        .await
        .expect("stop accepted");
    wait_state(&world, &created.id, pb::WorkerState::Stopped).await;
    let stopped = ec2
        .describe(&facts.instance_id)
        .await
        .expect("describe")
        .expect("exists");
    assert_eq!(stopped.state, ccm_cloud::InstanceState::Stopped);
    world.stop().await;
}
