//! The conformance suite every [`CloudProvider`] must pass (feature `conformance`).
//!
//! The controller codes against `Arc<dyn CloudProvider>`; these checks pin down the behaviour it
//! relies on, so [`crate::aws::Ec2Provider`] (against the moto server, tests/ec2_moto.rs) and
//! [`crate::simulated::SimulatedCloud`] (tests/simulated.rs) behave the same. Each check takes a
//! [`Harness`] and panics with a message when the provider misbehaves.
//!
//! Clouds take time: a launched instance is `pending` before it is `running`. The harness's
//! [`Harness::advance`] lets cloud time pass — a manual clock moves for the simulated cloud, a
//! short real pause for moto (whose state changes are instant) — and the checks poll with it
//! instead of sleeping.
//!
//! Every check works in its own scope (a fresh template name and fresh worker ids, tagged), so
//! checks may run in parallel against one shared backend.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::CloudError;
use crate::provider::{
    CloudImage, CloudInstance, CloudProvider, InstanceState, LaunchRequest, ListFilter,
    TAG_MANAGED, TAG_NAME, TAG_TEMPLATE, TAG_WORKER_ID,
};

/// Most [`Harness::advance`] steps a check waits for a state.
pub const MAX_WAIT_STEPS: u32 = 200;
/// Instance id that is well formed and never exists.
pub const UNKNOWN_INSTANCE_ID: &str = "i-0badc0ffee0000000";
/// Image id that is well formed and never exists.
pub const UNKNOWN_IMAGE_ID: &str = "ami-0badc0ffee0000000";
/// Instance type the checks launch.
pub const INSTANCE_TYPE: &str = "m5.large";

/// Behaviour a backend does not model (moto's gaps), so the checks skip what cannot be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fidelity {
    /// Tagging an instance that does not exist fails with [`CloudError::NotFound`] (EC2 does;
    /// moto accepts it).
    pub tagging_unknown_instance_fails: bool,
    /// Starting or stopping a terminated instance fails with [`CloudError::InvalidRequest`]
    /// (EC2's `IncorrectInstanceState`; moto starts it again).
    pub terminated_instance_is_final: bool,
}

impl Fidelity {
    /// Everything modelled.
    pub const FULL: Fidelity = Fidelity {
        tagging_unknown_instance_fails: true,
        terminated_instance_is_final: true,
    };
}

/// The backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The provider.
    fn provider(&self) -> Arc<dyn CloudProvider>;
    /// Lets `by` of cloud time pass.
    async fn advance(&self, by: Duration);
    /// How far one wait step advances (a fraction of the slowest transition).
    fn step(&self) -> Duration;
    /// Adds an image named `name`, created now, to the images the provider can find and launch.
    async fn add_image(&self, name: &str) -> CloudImage;
    /// How many instances [`many_instances_are_all_listed`] launches: more than one list page.
    fn many(&self) -> usize;
    /// What the backend models.
    fn fidelity(&self) -> Fidelity;
}

/// A check's own names: template `conf-<id>`, workers `conf-<id>-<n>`.
struct Scope {
    id: String,
}

impl Scope {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            id: id[..12].to_owned(),
        }
    }

    fn template(&self) -> String {
        format!("conf-{}", self.id)
    }

    fn worker(&self, n: usize) -> String {
        format!("conf-{}-{n}", self.id)
    }

    fn request(&self, n: usize, image: &CloudImage) -> LaunchRequest {
        LaunchRequest {
            worker_id: self.worker(n),
            name: format!("conformance worker {n}"),
            template_name: self.template(),
            instance_type: INSTANCE_TYPE.to_owned(),
            ami_id: image.image_id.clone(),
            volume_size_gib: 64,
            tags: BTreeMap::from([("team".to_owned(), "conformance".to_owned())]),
            ..LaunchRequest::default()
        }
    }

    fn filter(&self) -> ListFilter {
        ListFilter {
            tags: BTreeMap::from([(TAG_TEMPLATE.to_owned(), self.template())]),
            ..ListFilter::default()
        }
    }
}

async fn base_image(h: &dyn Harness, scope: &Scope) -> CloudImage {
    h.add_image(&format!("{}-base", scope.template())).await
}

async fn launch(p: &dyn CloudProvider, request: &LaunchRequest) -> CloudInstance {
    p.launch(request)
        .await
        .unwrap_or_else(|e| panic!("launch of {} failed: {e}", request.worker_id))
}

async fn describe(p: &dyn CloudProvider, id: &str) -> CloudInstance {
    match p.describe(id).await {
        Ok(Some(i)) => i,
        Ok(None) => panic!("{id} is unknown to the cloud"),
        Err(e) => panic!("describe {id} failed: {e}"),
    }
}

/// Advances cloud time until `id` is in `state`; returns it as described then.
async fn wait_for(h: &dyn Harness, id: &str, state: InstanceState) -> CloudInstance {
    let p = h.provider();
    let mut seen = Vec::new();
    for _ in 0..MAX_WAIT_STEPS {
        let inst = describe(p.as_ref(), id).await;
        if inst.state == state {
            return inst;
        }
        if seen.last() != Some(&inst.state) {
            seen.push(inst.state);
        }
        h.advance(h.step()).await;
    }
    panic!(
        "{id} did not reach {} within {MAX_WAIT_STEPS} steps of {:?}; states seen: {seen:?}",
        state.as_str(),
        h.step()
    );
}

fn assert_err(result: Result<impl std::fmt::Debug, CloudError>, expected: &str, what: &str) {
    let class = match &result {
        Err(CloudError::NotFound(_)) => "NotFound",
        Err(CloudError::Quota(_)) => "Quota",
        Err(CloudError::Auth(_)) => "Auth",
        Err(CloudError::InvalidRequest(_)) => "InvalidRequest",
        Err(CloudError::Throttled(_)) => "Throttled",
        Err(CloudError::Unavailable(_)) => "Unavailable",
        Ok(_) => "Ok",
    };
    assert_eq!(class, expected, "{what}: got {result:?}");
}

/// A launch returns a pending (or already running) instance that carries the ccm tags, the
/// template's tags and `Name`, and reaches `running` with a private IP.
pub async fn launch_reaches_running_with_tags(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let image = base_image(h, &scope).await;
    let request = scope.request(1, &image);
    let launched = launch(p.as_ref(), &request).await;
    assert!(
        launched.instance_id.starts_with("i-") && launched.instance_id.len() > 2,
        "instance id {:?}",
        launched.instance_id
    );
    assert!(
        matches!(
            launched.state,
            InstanceState::Pending | InstanceState::Running
        ),
        "just launched: {:?}",
        launched.state
    );
    let running = wait_for(h, &launched.instance_id, InstanceState::Running).await;
    for inst in [&launched, &running] {
        assert_eq!(inst.image_id, image.image_id);
        assert_eq!(inst.instance_type, INSTANCE_TYPE);
        let tag = |k: &str| inst.tags.get(k).map(String::as_str);
        assert_eq!(tag(TAG_MANAGED), Some("true"), "tags {:?}", inst.tags);
        assert_eq!(tag(TAG_TEMPLATE), Some(scope.template().as_str()));
        assert_eq!(tag(TAG_WORKER_ID), Some(request.worker_id.as_str()));
        assert_eq!(tag(TAG_NAME), Some("conformance worker 1"));
        assert_eq!(inst.name(), Some("conformance worker 1"));
        assert_eq!(tag("team"), Some("conformance"));
    }
    assert!(running.private_ip.is_some(), "running without a private IP");
    assert!(
        running.launch_time.is_some(),
        "running without a launch time"
    );
}

/// Launching again for the same worker id returns the same instance; another worker id gets
/// another instance.
pub async fn launch_is_idempotent_per_worker_id(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let image = base_image(h, &scope).await;
    let first = launch(p.as_ref(), &scope.request(1, &image)).await;
    let again = launch(p.as_ref(), &scope.request(1, &image)).await;
    assert_eq!(
        again.instance_id, first.instance_id,
        "second launch made a new instance"
    );
    wait_for(h, &first.instance_id, InstanceState::Running).await;
    let after_running = launch(p.as_ref(), &scope.request(1, &image)).await;
    assert_eq!(after_running.instance_id, first.instance_id);
    assert_eq!(after_running.state, InstanceState::Running);
    let other = launch(p.as_ref(), &scope.request(2, &image)).await;
    assert_ne!(other.instance_id, first.instance_id);
    let listed = p.list(&scope.filter()).await.expect("list");
    assert_eq!(
        listed.len(),
        2,
        "exactly two instances for two workers: {listed:?}"
    );
}

/// `find_image` returns the newest image matching a glob, `None` when nothing matches; a launch
/// by name pattern uses the newest match.
pub async fn images_are_found_by_pattern(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let older = h
        .add_image(&format!("{}-cml-2.7.0", scope.template()))
        .await;
    h.advance(h.step()).await;
    let newer = h
        .add_image(&format!("{}-cml-2.8.0", scope.template()))
        .await;
    let all = format!("{}-cml-*", scope.template());
    let found = p
        .find_image(&all)
        .await
        .expect("find_image")
        .expect("a match");
    assert_eq!(
        found.image_id, newer.image_id,
        "newest of {older:?} and {newer:?}"
    );
    assert_eq!(found.name, newer.name);
    let only_old = format!("{}-cml-2.7.?", scope.template());
    let found = p
        .find_image(&only_old)
        .await
        .expect("find_image")
        .expect("a match");
    assert_eq!(found.image_id, older.image_id);
    let none = p
        .find_image(&format!("{}-nothing-*", scope.template()))
        .await
        .expect("find_image");
    assert!(none.is_none(), "{none:?}");

    let request = LaunchRequest {
        ami_id: String::new(),
        ami_name_pattern: all,
        ..scope.request(1, &older)
    };
    let launched = launch(p.as_ref(), &request).await;
    assert_eq!(launched.image_id, newer.image_id);
}

/// Stop leads to `stopped`, start back to `running`; stopping a stopped instance and starting a
/// running one are no-ops.
pub async fn stop_and_start(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let image = base_image(h, &scope).await;
    let id = launch(p.as_ref(), &scope.request(1, &image))
        .await
        .instance_id;
    wait_for(h, &id, InstanceState::Running).await;
    p.start(&id).await.expect("start of a running instance");
    assert_eq!(
        describe(p.as_ref(), &id).await.state,
        InstanceState::Running
    );

    p.stop(&id).await.expect("stop");
    let stopped = wait_for(h, &id, InstanceState::Stopped).await;
    assert!(
        stopped.private_ip.is_some(),
        "a stopped instance keeps its private IP"
    );
    p.stop(&id).await.expect("stop of a stopped instance");
    assert_eq!(
        describe(p.as_ref(), &id).await.state,
        InstanceState::Stopped
    );

    p.start(&id).await.expect("start");
    let running = wait_for(h, &id, InstanceState::Running).await;
    assert_eq!(running.tags.get(TAG_WORKER_ID), Some(&scope.worker(1)));
}

/// Terminate leads to `terminated`; terminating again, or an instance the cloud never had, is
/// fine; a terminated instance is listed only when asked for.
pub async fn terminate_is_final_and_tolerant(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let image = base_image(h, &scope).await;
    let id = launch(p.as_ref(), &scope.request(1, &image))
        .await
        .instance_id;
    wait_for(h, &id, InstanceState::Running).await;
    p.terminate(&id).await.expect("terminate");
    wait_for(h, &id, InstanceState::Terminated).await;
    p.terminate(&id).await.expect("terminate again");
    p.terminate(UNKNOWN_INSTANCE_ID)
        .await
        .expect("terminate of an unknown instance");

    let live = p.list(&scope.filter()).await.expect("list");
    assert!(live.is_empty(), "terminated instance listed: {live:?}");
    let all = p
        .list(&ListFilter {
            include_terminated: true,
            ..scope.filter()
        })
        .await
        .expect("list with terminated");
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].instance_id, id);
    assert_eq!(all[0].state, InstanceState::Terminated);

    if h.fidelity().terminated_instance_is_final {
        assert_err(
            p.start(&id).await,
            "InvalidRequest",
            "start of a terminated instance",
        );
        assert_err(
            p.stop(&id).await,
            "InvalidRequest",
            "stop of a terminated instance",
        );
    }
}

/// Describing an instance the cloud does not know gives `None`, not an error.
pub async fn describe_unknown_is_none(h: &dyn Harness) {
    let p = h.provider();
    let described = p.describe(UNKNOWN_INSTANCE_ID).await.expect("describe");
    assert!(described.is_none(), "{described:?}");
}

/// `list` filters by the managed tag, other tags, instance ids and state.
pub async fn list_filters(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let image = base_image(h, &scope).await;
    let a = launch(p.as_ref(), &scope.request(1, &image)).await;
    let b = launch(
        p.as_ref(),
        &LaunchRequest {
            tags: BTreeMap::from([("team".to_owned(), "other".to_owned())]),
            ..scope.request(2, &image)
        },
    )
    .await;
    let c = launch(p.as_ref(), &scope.request(3, &image)).await;
    let ids = |list: &[CloudInstance]| {
        let mut ids: Vec<String> = list.iter().map(|i| i.instance_id.clone()).collect();
        ids.sort();
        ids
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    let in_scope = p.list(&scope.filter()).await.expect("list");
    assert_eq!(
        ids(&in_scope),
        sorted(vec![
            a.instance_id.clone(),
            b.instance_id.clone(),
            c.instance_id.clone()
        ])
    );

    let managed = p
        .list(&ListFilter {
            managed_only: true,
            ..ListFilter::default()
        })
        .await
        .expect("list managed");
    assert!(
        managed
            .iter()
            .all(|i| i.tags.get(TAG_MANAGED).is_some_and(|v| v == "true"))
    );
    for inst in [&a, &b, &c] {
        assert!(
            managed.iter().any(|i| i.instance_id == inst.instance_id),
            "{} missing from the managed list",
            inst.instance_id
        );
    }

    let mut by_team = scope.filter();
    by_team.tags.insert("team".to_owned(), "other".to_owned());
    assert_eq!(
        ids(&p.list(&by_team).await.expect("list by tag")),
        vec![b.instance_id.clone()]
    );

    let by_ids = ListFilter {
        instance_ids: vec![
            a.instance_id.clone(),
            c.instance_id.clone(),
            UNKNOWN_INSTANCE_ID.into(),
        ],
        ..ListFilter::default()
    };
    assert_eq!(
        ids(&p.list(&by_ids).await.expect("list by ids")),
        sorted(vec![a.instance_id.clone(), c.instance_id.clone()]),
        "unknown ids are skipped, not an error"
    );

    let mut nobody = scope.filter();
    nobody
        .tags
        .insert(TAG_WORKER_ID.to_owned(), "no-such-worker".to_owned());
    assert!(p.list(&nobody).await.expect("list").is_empty());

    p.terminate(&c.instance_id).await.expect("terminate");
    wait_for(h, &c.instance_id, InstanceState::Terminated).await;
    let live = p.list(&scope.filter()).await.expect("list");
    assert_eq!(
        ids(&live),
        sorted(vec![a.instance_id.clone(), b.instance_id.clone()])
    );
}

/// `list` returns every match, however many pages the cloud splits them into.
pub async fn many_instances_are_all_listed(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let image = base_image(h, &scope).await;
    let mut launched = Vec::new();
    for n in 0..h.many() {
        launched.push(
            launch(p.as_ref(), &scope.request(n, &image))
                .await
                .instance_id,
        );
    }
    launched.sort();
    let mut listed: Vec<String> = p
        .list(&scope.filter())
        .await
        .expect("list")
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    listed.sort();
    assert_eq!(listed, launched);
}

/// `update_tags` sets and removes tags; a key both set and removed is set.
pub async fn update_tags_sets_and_removes(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let image = base_image(h, &scope).await;
    let id = launch(p.as_ref(), &scope.request(1, &image))
        .await
        .instance_id;
    let set = BTreeMap::from([
        ("owner".to_owned(), "alice".to_owned()),
        ("cost-center".to_owned(), "42".to_owned()),
        ("team".to_owned(), "blue".to_owned()),
    ]);
    p.update_tags(&id, &set, &["team".to_owned()])
        .await
        .expect("set tags");
    let tags = describe(p.as_ref(), &id).await.tags;
    assert_eq!(tags.get("owner").map(String::as_str), Some("alice"));
    assert_eq!(tags.get("cost-center").map(String::as_str), Some("42"));
    assert_eq!(
        tags.get("team").map(String::as_str),
        Some("blue"),
        "set wins over remove"
    );

    p.update_tags(
        &id,
        &BTreeMap::new(),
        &["owner".to_owned(), "absent".to_owned()],
    )
    .await
    .expect("remove tags");
    let tags = describe(p.as_ref(), &id).await.tags;
    assert!(!tags.contains_key("owner"), "{tags:?}");
    assert_eq!(tags.get("cost-center").map(String::as_str), Some("42"));
    assert_eq!(tags.get(TAG_MANAGED).map(String::as_str), Some("true"));

    // Bad keys never reach the cloud.
    let reserved = BTreeMap::from([("aws:owner".to_owned(), "x".to_owned())]);
    assert_err(
        p.update_tags(&id, &reserved, &[]).await,
        "InvalidRequest",
        "aws: key",
    );
    assert_err(
        p.update_tags(&id, &BTreeMap::new(), &[String::new()]).await,
        "InvalidRequest",
        "empty key",
    );
    if h.fidelity().tagging_unknown_instance_fails {
        assert_err(
            p.update_tags(UNKNOWN_INSTANCE_ID, &set, &[]).await,
            "NotFound",
            "tagging an unknown instance",
        );
    }
}

/// Errors come back classified the way the controller acts on them.
pub async fn errors_are_classified(h: &dyn Harness) {
    let p = h.provider();
    let scope = Scope::new();
    let image = base_image(h, &scope).await;
    assert_err(
        p.start(UNKNOWN_INSTANCE_ID).await,
        "NotFound",
        "start unknown",
    );
    assert_err(
        p.stop(UNKNOWN_INSTANCE_ID).await,
        "NotFound",
        "stop unknown",
    );

    let bad_ami = LaunchRequest {
        ami_id: UNKNOWN_IMAGE_ID.to_owned(),
        ..scope.request(1, &image)
    };
    assert_err(p.launch(&bad_ami).await, "InvalidRequest", "unknown AMI id");
    let no_match = LaunchRequest {
        ami_id: String::new(),
        ami_name_pattern: format!("{}-no-such-image-*", scope.template()),
        ..scope.request(2, &image)
    };
    assert_err(
        p.launch(&no_match).await,
        "InvalidRequest",
        "AMI pattern without match",
    );
    let no_worker = LaunchRequest {
        worker_id: String::new(),
        ..scope.request(3, &image)
    };
    assert_err(
        p.launch(&no_worker).await,
        "InvalidRequest",
        "empty worker id",
    );
    assert_err(
        p.find_image(" ").await,
        "InvalidRequest",
        "empty image pattern",
    );
    // None of the failed launches left an instance behind.
    let left = p
        .list(&ListFilter {
            include_terminated: true,
            ..scope.filter()
        })
        .await
        .expect("list");
    assert!(left.is_empty(), "failed launches created {left:?}");
}
