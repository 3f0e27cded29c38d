//! [`Ec2Provider`] against the real moto server (one server shared by the tests of this binary,
//! each test in its own tag scope), and against a scripted EC2 endpoint on loopback for what moto
//! cannot produce: throttling, 5xx, auth failures, capacity errors, a dead endpoint.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice, Filter};
use ccm_cloud::aws::{AwsCredentials, AwsSettings, Ec2Provider};
use ccm_cloud::conformance::{self, Fidelity, Harness};
use ccm_cloud::{CloudError, CloudImage, CloudProvider, InstanceState, LaunchRequest, ListFilter};
use ccm_testkit::moto::{MotoServer, TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Page size the moto tests use, so a handful of instances spans several pages.
const TEST_PAGE_SIZE: i32 = 5;

/// The moto server shared by the tests running now; started by the first, killed when the last
/// one drops it (a later test starts a new one).
static SHARED_MOTO: Mutex<Weak<MotoServer>> = Mutex::new(Weak::new());

fn moto() -> Arc<MotoServer> {
    let mut shared = SHARED_MOTO.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(server) = shared.upgrade() {
        return server;
    }
    // AMI validation on: unknown AMI ids must fail as on AWS.
    let server = Arc::new(
        MotoServer::start_with_env(&[("MOTO_ENABLE_AMI_VALIDATION", "true")])
            .unwrap_or_else(|e| panic!("{e}")),
    );
    *shared = Arc::downgrade(&server);
    server
}

fn settings(endpoint: &str) -> AwsSettings {
    AwsSettings {
        endpoint_url: Some(endpoint.to_owned()),
        credentials: AwsCredentials::Static {
            access_key_id: TEST_ACCESS_KEY_ID.to_owned(),
            secret_access_key: TEST_SECRET_ACCESS_KEY.to_owned(),
            session_token: None,
        },
        page_size: TEST_PAGE_SIZE,
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(2),
        attempt_timeout: Duration::from_secs(10),
        operation_timeout: Duration::from_secs(20),
        ..AwsSettings::new(TEST_REGION)
    }
}

struct Moto {
    /// Keeps the shared server alive while the test runs.
    _server: Arc<MotoServer>,
    provider: Ec2Provider,
}

impl Moto {
    async fn new() -> Self {
        let server = moto();
        let provider = Ec2Provider::new(settings(server.endpoint()))
            .await
            .expect("provider");
        Self {
            _server: server,
            provider,
        }
    }

    async fn register_image(&self, name: &str) -> String {
        self.provider
            .client()
            .register_image()
            .name(name)
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
            .expect("RegisterImage")
            .image_id()
            .expect("image id")
            .to_owned()
    }
}

#[async_trait]
impl Harness for Moto {
    fn provider(&self) -> Arc<dyn CloudProvider> {
        Arc::new(self.provider.clone())
    }

    async fn advance(&self, by: Duration) {
        // moto's state changes are instant; a short real pause is all "time passing" needs.
        tokio::time::sleep(by).await;
    }

    fn step(&self) -> Duration {
        Duration::from_millis(20)
    }

    async fn add_image(&self, name: &str) -> CloudImage {
        let id = self.register_image(name).await;
        let found = self
            .provider
            .find_image(name)
            .await
            .expect("find_image")
            .expect("the image just registered");
        assert_eq!(found.image_id, id);
        found
    }

    fn many(&self) -> usize {
        // Three pages of TEST_PAGE_SIZE.
        12
    }

    fn fidelity(&self) -> Fidelity {
        Fidelity {
            tagging_unknown_instance_fails: false,
            terminated_instance_is_final: false,
        }
    }
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                conformance::$name(&Moto::new().await).await;
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

fn scope() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("moto-{}", &id[..12])
}

fn request(scope: &str, n: usize, ami: &str) -> LaunchRequest {
    LaunchRequest {
        worker_id: format!("{scope}-{n}"),
        name: format!("{scope} worker {n}"),
        template_name: scope.to_owned(),
        instance_type: "m5.large".to_owned(),
        ami_id: ami.to_owned(),
        ..LaunchRequest::default()
    }
}

#[tokio::test]
async fn launch_maps_every_request_field_to_run_instances() {
    let moto = Moto::new().await;
    let client = moto.provider.client();
    let scope = scope();
    let ami = moto.register_image(&format!("{scope}-image")).await;
    let subnet = client
        .describe_subnets()
        .send()
        .await
        .expect("DescribeSubnets")
        .subnets()
        .first()
        .cloned()
        .expect("moto has default subnets");
    let group = client
        .create_security_group()
        .group_name(&scope)
        .description("ccm test")
        .vpc_id(subnet.vpc_id().expect("vpc"))
        .send()
        .await
        .expect("CreateSecurityGroup")
        .group_id()
        .expect("group id")
        .to_owned();
    client
        .create_key_pair()
        .key_name(&scope)
        .send()
        .await
        .expect("CreateKeyPair");

    let req = LaunchRequest {
        subnet_id: subnet.subnet_id().expect("subnet id").to_owned(),
        security_group_ids: vec![group.clone()],
        key_name: scope.clone(),
        volume_size_gib: 100,
        tags: BTreeMap::from([("cost-center".to_owned(), "42".to_owned())]),
        ..request(&scope, 1, &ami)
    };
    let launched = moto.provider.launch(&req).await.expect("launch");

    let raw = client
        .describe_instances()
        .instance_ids(&launched.instance_id)
        .send()
        .await
        .expect("DescribeInstances");
    let inst = raw.reservations()[0].instances()[0].clone();
    assert_eq!(inst.image_id(), Some(ami.as_str()));
    assert_eq!(inst.subnet_id(), subnet.subnet_id());
    assert_eq!(inst.key_name(), Some(scope.as_str()));
    assert_eq!(
        inst.security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .collect::<Vec<_>>(),
        vec![group.as_str()]
    );
    assert_eq!(
        inst.monitoring()
            .and_then(|m| m.state())
            .map(|s| s.as_str()),
        Some("enabled"),
        "detailed monitoring is requested"
    );
    assert_eq!(
        inst.client_token(),
        Some(req.worker_id.as_str()),
        "the worker id is the idempotency token"
    );
    let root = inst
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some("/dev/sda1"))
        .expect("root volume on the image's root device");
    let volume_id = root.ebs().and_then(|e| e.volume_id()).expect("volume id");
    let volumes = client
        .describe_volumes()
        .volume_ids(volume_id)
        .send()
        .await
        .expect("DescribeVolumes");
    assert_eq!(volumes.volumes()[0].size(), Some(100));
    assert_eq!(
        launched.tags.get("cost-center").map(String::as_str),
        Some("42")
    );
    assert_eq!(launched.tags.get("Name"), Some(&req.name));
}

#[tokio::test]
async fn list_follows_next_token_across_pages() {
    let moto = Moto::new().await;
    let scope = scope();
    let ami = moto.register_image(&format!("{scope}-image")).await;
    let mut launched = Vec::new();
    for n in 0..7 {
        launched.push(
            moto.provider
                .launch(&request(&scope, n, &ami))
                .await
                .expect("launch")
                .instance_id,
        );
    }
    // The first page really is partial: moto paginates like EC2.
    let first_page = moto
        .provider
        .client()
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:ccm:template")
                .values(&scope)
                .build(),
        )
        .max_results(TEST_PAGE_SIZE)
        .send()
        .await
        .expect("DescribeInstances");
    let on_first: usize = first_page
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum();
    assert_eq!(on_first, TEST_PAGE_SIZE as usize);
    assert!(first_page.next_token().is_some(), "a second page exists");

    let filter = ListFilter {
        tags: BTreeMap::from([("ccm:template".to_owned(), scope.clone())]),
        ..ListFilter::default()
    };
    let mut listed: Vec<String> = moto
        .provider
        .list(&filter)
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    listed.sort();
    launched.sort();
    assert_eq!(listed, launched);
}

#[tokio::test]
async fn wrong_launch_parameters_are_invalid_requests() {
    let moto = Moto::new().await;
    let scope = scope();
    let ami = moto.register_image(&format!("{scope}-image")).await;
    let cases = [
        (
            LaunchRequest {
                ami_id: "not-an-ami".to_owned(),
                ..request(&scope, 1, &ami)
            },
            "InvalidAMIID.Malformed",
        ),
        (
            LaunchRequest {
                security_group_ids: vec!["sg-0badc0ffee0000000".to_owned()],
                ..request(&scope, 2, &ami)
            },
            "InvalidGroup.NotFound",
        ),
        (
            LaunchRequest {
                subnet_id: "subnet-0badc0ffee0000000".to_owned(),
                ..request(&scope, 3, &ami)
            },
            "InvalidSubnetID.NotFound",
        ),
    ];
    for (req, code) in cases {
        match moto.provider.launch(&req).await {
            Err(CloudError::InvalidRequest(text)) => {
                assert!(text.contains(code), "{text:?} should name {code}")
            }
            other => panic!("{code}: expected InvalidRequest, got {other:?}"),
        }
    }
    let left = moto
        .provider
        .list(&ListFilter {
            tags: BTreeMap::from([("ccm:template".to_owned(), scope.clone())]),
            include_terminated: true,
            ..ListFilter::default()
        })
        .await
        .expect("list");
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn terminated_instances_stay_describable() {
    let moto = Moto::new().await;
    let scope = scope();
    let ami = moto.register_image(&format!("{scope}-image")).await;
    let id = moto
        .provider
        .launch(&request(&scope, 1, &ami))
        .await
        .expect("launch")
        .instance_id;
    moto.provider.terminate(&id).await.expect("terminate");
    let described = moto
        .provider
        .describe(&id)
        .await
        .expect("describe")
        .expect("still known");
    assert_eq!(described.state, InstanceState::Terminated);
    // A new launch for the same worker: the terminated instance is not reused.
    let again = moto
        .provider
        .launch(&request(&scope, 1, &ami))
        .await
        .expect("launch again");
    assert_ne!(again.instance_id, id);
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let err = Ec2Provider::new(AwsSettings {
        page_size: 2,
        ..AwsSettings::new(TEST_REGION)
    })
    .await
    .expect_err("page size 2");
    assert!(
        matches!(err, CloudError::InvalidRequest(ref t) if t.contains("page_size")),
        "{err}"
    );
}

// ---- a scripted EC2 endpoint ----

/// What the scripted endpoint answers to one EC2 action: HTTP status and XML body.
type Script = Arc<dyn Fn(&str) -> (u16, String) + Send + Sync>;

/// An HTTP/1.1 server on loopback that answers EC2 query requests from a script and counts them
/// per action.
struct ScriptedEc2 {
    endpoint: String,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedEc2 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedEc2 {
    async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counted = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let script = script.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: headers, then Content-Length bytes of form body.
                        let Some(head_end) = read_until_headers(&mut stream, &mut buf).await else {
                            return;
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                        let length = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        while buf.len() < head_end + length {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body =
                            String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
                        buf.drain(..head_end + length);
                        let action = body
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("Action="))
                            .unwrap_or("")
                            .to_owned();
                        *counted
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(action.clone())
                            .or_default() += 1;
                        let (status, xml) = script(&action);
                        let response = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                            xml.len()
                        );
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            endpoint,
            calls,
            task,
        }
    }

    fn calls(&self, action: &str) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    async fn provider(&self) -> Ec2Provider {
        Ec2Provider::new(settings(&self.endpoint))
            .await
            .expect("provider")
    }
}

async fn read_until_headers(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<usize> {
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(pos + 4);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn ec2_error(code: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>scripted {code}</Message></Error></Errors><RequestID>req-1</RequestID></Response>"
    )
}

const NS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

fn no_instances() -> String {
    format!(
        "<DescribeInstancesResponse xmlns=\"{NS}\"><requestId>r</requestId><reservationSet/>\
         </DescribeInstancesResponse>"
    )
}

fn one_image() -> String {
    format!(
        "<DescribeImagesResponse xmlns=\"{NS}\"><requestId>r</requestId><imagesSet><item>\
         <imageId>ami-0123456789abcdef0</imageId><name>cml</name>\
         <creationDate>2026-01-01T00:00:00.000Z</creationDate>\
         <rootDeviceName>/dev/xvda</rootDeviceName></item></imagesSet></DescribeImagesResponse>"
    )
}

#[tokio::test]
async fn throttling_is_retried_then_reported_as_throttled() {
    let ec2 = ScriptedEc2::start(Arc::new(|_| (503, ec2_error("RequestLimitExceeded")))).await;
    let provider = ec2.provider().await;
    match provider.describe("i-0123456789abcdef0").await {
        Err(CloudError::Throttled(text)) => {
            assert!(text.contains("RequestLimitExceeded"), "{text}");
            assert!(text.contains("DescribeInstances"), "{text}");
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert_eq!(ec2.calls("DescribeInstances"), 3, "max_attempts = 3");
}

#[tokio::test]
async fn server_errors_are_retried_then_unavailable() {
    let ec2 = ScriptedEc2::start(Arc::new(|_| (500, ec2_error("InternalError")))).await;
    let provider = ec2.provider().await;
    assert!(matches!(
        provider.stop("i-0123456789abcdef0").await,
        Err(CloudError::Unavailable(_))
    ));
    assert_eq!(ec2.calls("StopInstances"), 3);
}

#[tokio::test]
async fn auth_failures_are_not_retried() {
    for (status, code) in [(401, "AuthFailure"), (403, "UnauthorizedOperation")] {
        let ec2 = ScriptedEc2::start(Arc::new(move |_| (status, ec2_error(code)))).await;
        let provider = ec2.provider().await;
        match provider.start("i-0123456789abcdef0").await {
            Err(CloudError::Auth(text)) => assert!(text.contains(code), "{text}"),
            other => panic!("{code}: expected Auth, got {other:?}"),
        }
        assert_eq!(ec2.calls("StartInstances"), 1, "{code} is not retried");
    }
}

#[tokio::test]
async fn capacity_errors_on_launch_are_quota() {
    for code in ["InsufficientInstanceCapacity", "InstanceLimitExceeded"] {
        let ec2 = ScriptedEc2::start(Arc::new(move |action| match action {
            "DescribeInstances" => (200, no_instances()),
            "DescribeImages" => (200, one_image()),
            _ => (400, ec2_error(code)),
        }))
        .await;
        let provider = ec2.provider().await;
        let req = request("scripted", 1, "ami-0123456789abcdef0");
        match provider.launch(&req).await {
            Err(CloudError::Quota(text)) => {
                assert!(text.contains(code), "{text}");
                assert!(text.contains("RunInstances"), "{text}");
            }
            other => panic!("{code}: expected Quota, got {other:?}"),
        }
        assert_eq!(ec2.calls("RunInstances"), 1);
        assert_eq!(ec2.calls("DescribeImages"), 1, "the AMI is checked first");
    }
}

#[tokio::test]
async fn unreachable_endpoint_is_unavailable() {
    // Bind and drop: nothing listens on the port any more.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let provider = Ec2Provider::new(settings(&format!("http://127.0.0.1:{port}")))
        .await
        .expect("provider");
    assert!(matches!(
        provider.list(&ListFilter::default()).await,
        Err(CloudError::Unavailable(_))
    ));
}
