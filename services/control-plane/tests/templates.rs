//! TemplateService over real gRPC (TestPlane on loopback): CRUD, defaults, every validation
//! failure with its field path, UpdateTemplate's field mask, optimistic concurrency, paging, and
//! delete refused while a worker uses the template.

use std::collections::HashMap;

use ccm_control_plane::record::{Mutation, audit_from_entry};
use ccm_control_plane::testing::{TestPlane, test_epoch};
use ccm_proto::v1 as pb;
use ccm_proto::v1::template_service_client::TemplateServiceClient;
use ccm_store::{ClaimChange, LogKind, LogQuery};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Client = TemplateServiceClient<Channel>;

fn span(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

fn template(name: &str, license: pb::LicenseType) -> pb::WorkerTemplate {
    pb::WorkerTemplate {
        name: name.into(),
        description: "Metal worker".into(),
        instance_type: "m5zn.metal".into(),
        capacity: Some(pb::WorkerCapacity {
            cpu_cores: 48,
            memory_gb: 192,
            storage_gb: 500,
            max_nodes: 20,
        }),
        license_type: license as i32,
        ami_pattern: "CML-2.9.*".into(),
        regions: vec!["us-east-1".into(), "us-west-2".into()],
        tags: HashMap::from([("Environment".to_owned(), "test".to_owned())]),
        ..Default::default()
    }
}

async fn start() -> (TestPlane, Client) {
    let plane = TestPlane::start().await.expect("plane starts");
    let client = TemplateServiceClient::new(plane.channel().await.expect("connects"));
    (plane, client)
}

async fn create(client: &mut Client, t: pb::WorkerTemplate) -> pb::WorkerTemplate {
    client
        .create_template(pb::CreateTemplateRequest { template: Some(t) })
        .await
        .expect("created")
        .into_inner()
        .template
        .expect("template")
}

async fn get(client: &mut Client, name: &str) -> pb::WorkerTemplate {
    client
        .get_template(pb::GetTemplateRequest {
            template_name: name.into(),
        })
        .await
        .expect("found")
        .into_inner()
        .template
        .expect("template")
}

fn fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

async fn put_worker(plane: &TestPlane, template: &str, state: pb::WorkerState) -> pb::CmlWorker {
    let mut worker = pb::CmlWorker {
        id: uuid::Uuid::new_v4().to_string(),
        name: format!("worker-{}", &uuid::Uuid::new_v4().to_string()[..8]),
        template_name: template.into(),
        ..Default::default()
    };
    worker.set_state(state);
    let mut m = Mutation::at(plane.app.now());
    m.create(&mut worker, Vec::new()).expect("encodes");
    plane.app.commit(m).await.expect("worker stored");
    worker
}

async fn audit_actions(plane: &TestPlane, name: &str) -> Vec<String> {
    let page = plane
        .app
        .store
        .list_log(
            LogKind::Audit,
            LogQuery {
                resource_id: Some(name.into()),
                ..Default::default()
            },
        )
        .await
        .expect("audit readable");
    let mut actions: Vec<String> = page
        .entries
        .iter()
        .map(|e| audit_from_entry(e).expect("record").action)
        .collect();
    // Entries at the same instant have no defined order among themselves.
    actions.sort();
    actions
}

#[tokio::test]
async fn test_template_crud_fills_defaults_and_ignores_output_only_fields() {
    let (plane, mut client) = start().await;
    let mut input = template("personal-metal", pb::LicenseType::Personal);
    input.description = "<img src=x onerror=alert(1)> kept as text".into();
    input.is_seeded = true;
    input.worker_count = 7;
    input.id = "mine".into();
    let created = create(&mut client, input).await;
    assert!(uuid::Uuid::parse_str(&created.id).is_ok());
    assert!(!created.is_seeded, "is_seeded is output only");
    assert_eq!(created.worker_count, 0);
    assert_eq!(created.resource_version, 1);
    assert_eq!(created.startup_time, Some(span(20 * 60)), "default 20 min");
    assert_eq!(created.drain_timeout, Some(span(4 * 3600)), "default 4 h");
    assert_eq!(
        created.port_range,
        Some(pb::PortRange {
            start: 2000,
            end: 9999
        })
    );
    assert_eq!(created.volume_size_gb, 500);
    assert_eq!(
        created.description,
        "<img src=x onerror=alert(1)> kept as text"
    );
    assert_eq!(
        created.created_at.map(|t| t.seconds),
        Some(test_epoch().timestamp())
    );
    assert_eq!(get(&mut client, "personal-metal").await, created);

    let dup = client
        .create_template(pb::CreateTemplateRequest {
            template: Some(template("personal-metal", pb::LicenseType::Enterprise)),
        })
        .await
        .expect_err("name taken");
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    assert_eq!(
        get(&mut client, "personal-metal").await,
        created,
        "unchanged"
    );

    let deleted = client
        .delete_template(pb::DeleteTemplateRequest {
            template_name: "personal-metal".into(),
            resource_version: 1,
        })
        .await
        .expect("deleted")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(deleted.name, "personal-metal");
    let gone = client
        .get_template(pb::GetTemplateRequest {
            template_name: "personal-metal".into(),
        })
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), Code::NotFound);
    let again = client
        .delete_template(pb::DeleteTemplateRequest {
            template_name: "personal-metal".into(),
            resource_version: 0,
        })
        .await
        .expect_err("already deleted");
    assert_eq!(again.code(), Code::NotFound);
    let bad = client
        .get_template(pb::GetTemplateRequest {
            template_name: "Bad Name".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(fields(&bad), ["template_name"]);
    assert_eq!(
        audit_actions(&plane, "personal-metal").await,
        ["template.create", "template.delete"]
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_template_reports_each_invalid_field_with_its_path() {
    let (plane, mut client) = start().await;
    type Edit = Box<dyn Fn(&mut pb::WorkerTemplate)>;
    let cap = |f: fn(&mut pb::WorkerCapacity)| -> Edit {
        Box::new(move |t: &mut pb::WorkerTemplate| {
            if let Some(c) = t.capacity.as_mut() {
                f(c);
            }
        })
    };
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("empty name", Box::new(|t| t.name.clear()), "template.name"),
        (
            "underscore",
            Box::new(|t| t.name = "bad_name".into()),
            "template.name",
        ),
        (
            "64 characters",
            Box::new(|t| t.name = "a".repeat(64)),
            "template.name",
        ),
        (
            "hostile name",
            Box::new(|t| t.name = "<script>x</script>".into()),
            "template.name",
        ),
        (
            "no instance type",
            Box::new(|t| t.instance_type.clear()),
            "template.instance_type",
        ),
        (
            "no capacity",
            Box::new(|t| t.capacity = None),
            "template.capacity",
        ),
        (
            "negative cpu",
            cap(|c| c.cpu_cores = -1),
            "template.capacity.cpu_cores",
        ),
        (
            "zero memory",
            cap(|c| c.memory_gb = 0),
            "template.capacity.memory_gb",
        ),
        (
            "negative storage",
            cap(|c| c.storage_gb = -10),
            "template.capacity.storage_gb",
        ),
        (
            "zero nodes",
            cap(|c| c.max_nodes = 0),
            "template.capacity.max_nodes",
        ),
        (
            "UNSPECIFIED licence",
            Box::new(|t| t.license_type = 0),
            "template.license_type",
        ),
        (
            "unknown licence",
            Box::new(|t| t.license_type = 99),
            "template.license_type",
        ),
        (
            "no AMI pattern",
            Box::new(|t| t.ami_pattern = "  ".into()),
            "template.ami_pattern",
        ),
        (
            "duplicate region",
            Box::new(|t| t.regions = vec!["us-east-1".into(), "us-east-1".into()]),
            "template.regions[1]",
        ),
        (
            "bad region",
            Box::new(|t| t.regions = vec!["US East".into()]),
            "template.regions[0]",
        ),
        (
            "inverted port range",
            Box::new(|t| {
                t.port_range = Some(pb::PortRange {
                    start: 9000,
                    end: 2000,
                })
            }),
            "template.port_range.end",
        ),
        (
            "port 0",
            Box::new(|t| t.port_range = Some(pb::PortRange { start: 0, end: 10 })),
            "template.port_range.start",
        ),
        (
            "startup in seconds",
            Box::new(|t| t.startup_time = Some(span(90))),
            "template.startup_time",
        ),
        (
            "drain timeout not whole hours",
            Box::new(|t| t.drain_timeout = Some(span(1800))),
            "template.drain_timeout",
        ),
        (
            "reserved tag",
            Box::new(|t| {
                t.tags.insert("aws:cloudformation".into(), "x".into());
            }),
            "template.tags[\"aws:cloudformation\"]",
        ),
        (
            "ccm tag",
            Box::new(|t| {
                t.tags.insert("ccm:template".into(), "x".into());
            }),
            "template.tags[\"ccm:template\"]",
        ),
        (
            "tiny volume",
            Box::new(|t| t.volume_size_gb = 4),
            "template.volume_size_gb",
        ),
        (
            "negative min workers",
            Box::new(|t| t.min_workers = -1),
            "template.min_workers",
        ),
        (
            "max below min",
            Box::new(|t| {
                t.min_workers = 3;
                t.max_workers = 1;
            }),
            "template.max_workers",
        ),
        (
            "negative cooldown",
            Box::new(|t| t.scale_up_cooldown = Some(span(-60))),
            "template.scale_up_cooldown",
        ),
        (
            "retention of ten years",
            Box::new(|t| t.stopped_retention = Some(span(10 * 365 * 24 * 3600))),
            "template.stopped_retention",
        ),
    ];
    for (what, edit, field) in &cases {
        let mut t = template("metal", pb::LicenseType::Enterprise);
        edit(&mut t);
        let status = client
            .create_template(pb::CreateTemplateRequest { template: Some(t) })
            .await
            .expect_err(what);
        assert_eq!(fields(&status), [*field], "{what}");
    }
    let missing = client
        .create_template(pb::CreateTemplateRequest { template: None })
        .await
        .expect_err("no template");
    assert_eq!(fields(&missing), ["template"]);

    // Every problem at once.
    let mut t = template("", pb::LicenseType::Unspecified);
    t.capacity = None;
    t.min_workers = -2;
    let status = client
        .create_template(pb::CreateTemplateRequest { template: Some(t) })
        .await
        .expect_err("invalid");
    let mut got = fields(&status);
    got.sort();
    assert_eq!(
        got,
        [
            "template.capacity",
            "template.license_type",
            "template.min_workers",
            "template.name"
        ]
    );
    let listed = client
        .list_templates(pb::ListTemplatesRequest::default())
        .await
        .expect("listed")
        .into_inner();
    assert!(listed.templates.is_empty(), "nothing stored");
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_update_template_changes_only_the_masked_fields() {
    let (plane, mut client) = start().await;
    let created = create(&mut client, template("metal", pb::LicenseType::Enterprise)).await;
    plane.clock.advance(chrono::Duration::minutes(5));

    let mut change = template("metal", pb::LicenseType::Personal);
    change.instance_type = "c5.large".into(); // not in the mask: ignored
    change.description = "Bigger node limit".into();
    if let Some(c) = change.capacity.as_mut() {
        c.max_nodes = 500;
        c.cpu_cores = 1; // not in the mask
    }
    change.tags = HashMap::from([("Team".to_owned(), "labs".to_owned())]);
    change.resource_version = 1;
    let updated = client
        .update_template(pb::UpdateTemplateRequest {
            template: Some(change.clone()),
            update_mask: mask(&["capacity.max_nodes", "tags", "description"]),
        })
        .await
        .expect("updated")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(updated.resource_version, 2);
    assert_eq!(updated.description, "Bigger node limit");
    assert_eq!(
        updated.capacity.map(|c| (c.cpu_cores, c.max_nodes)),
        Some((48, 500))
    );
    assert_eq!(updated.tags, change.tags);
    assert_eq!(updated.instance_type, "m5zn.metal", "not in the mask");
    assert_eq!(updated.license_type, pb::LicenseType::Enterprise as i32);
    assert_eq!(updated.id, created.id);
    assert_eq!(updated.created_at, created.created_at);
    assert_eq!(
        updated.updated_at.map(|t| t.seconds),
        Some(test_epoch().timestamp() + 300)
    );
    assert_eq!(get(&mut client, "metal").await, updated);

    // The stale version is refused; nothing changes.
    let stale = client
        .update_template(pb::UpdateTemplateRequest {
            template: Some(change.clone()),
            update_mask: mask(&["description"]),
        })
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let info = stale.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["current_resource_version"], "2");

    // Mask problems, each on its path.
    let mut unconditional = change.clone();
    unconditional.resource_version = 0;
    for (paths, field) in [
        (vec!["cpu"], "update_mask.paths[0]"),
        (vec!["description", "name"], "update_mask.paths[1]"),
        (vec!["*"], "update_mask.paths[0]"),
        (vec!["worker_count"], "update_mask.paths[0]"),
        (vec!["capacity.gpus"], "update_mask.paths[0]"),
    ] {
        let status = client
            .update_template(pb::UpdateTemplateRequest {
                template: Some(unconditional.clone()),
                update_mask: mask(&paths),
            })
            .await
            .expect_err("bad mask");
        assert_eq!(fields(&status), [field], "{paths:?}");
    }
    for update_mask in [None, mask(&[])] {
        let status = client
            .update_template(pb::UpdateTemplateRequest {
                template: Some(unconditional.clone()),
                update_mask,
            })
            .await
            .expect_err("no mask");
        assert_eq!(fields(&status), ["update_mask"]);
    }

    // The merged result is validated.
    let mut invalid = unconditional.clone();
    if let Some(c) = invalid.capacity.as_mut() {
        c.cpu_cores = -4;
    }
    let status = client
        .update_template(pb::UpdateTemplateRequest {
            template: Some(invalid),
            update_mask: mask(&["capacity.cpu_cores"]),
        })
        .await
        .expect_err("invalid value");
    assert_eq!(fields(&status), ["template.capacity.cpu_cores"]);
    assert_eq!(get(&mut client, "metal").await, updated, "nothing changed");

    // Clearing a field with a default resets it to the default.
    let mut narrow = unconditional.clone();
    narrow.port_range = Some(pb::PortRange {
        start: 3000,
        end: 3999,
    });
    let narrowed = client
        .update_template(pb::UpdateTemplateRequest {
            template: Some(narrow.clone()),
            update_mask: mask(&["port_range.end"]),
        })
        .await
        .expect("updated")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(
        narrowed.port_range,
        Some(pb::PortRange {
            start: 2000,
            end: 3999
        })
    );
    narrow.port_range = None;
    let reset = client
        .update_template(pb::UpdateTemplateRequest {
            template: Some(narrow),
            update_mask: mask(&["port_range"]),
        })
        .await
        .expect("updated")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(
        reset.port_range,
        Some(pb::PortRange {
            start: 2000,
            end: 9999
        })
    );
    assert_eq!(reset.resource_version, 4);

    let mut unknown = unconditional.clone();
    unknown.name = "no-such-template".into();
    let status = client
        .update_template(pb::UpdateTemplateRequest {
            template: Some(unknown),
            update_mask: mask(&["description"]),
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        audit_actions(&plane, "metal").await,
        [
            "template.create",
            "template.update",
            "template.update",
            "template.update"
        ]
    );
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_delete_template_is_refused_while_a_worker_uses_it() {
    let (plane, mut client) = start().await;
    create(&mut client, template("metal", pb::LicenseType::Enterprise)).await;
    create(&mut client, template("spare", pb::LicenseType::Enterprise)).await;
    let worker = put_worker(&plane, "metal", pb::WorkerState::Running).await;
    put_worker(&plane, "metal", pb::WorkerState::Terminated).await;
    put_worker(&plane, "spare-2", pb::WorkerState::Running).await;
    assert_eq!(get(&mut client, "metal").await.worker_count, 1);
    assert_eq!(get(&mut client, "spare").await.worker_count, 0);

    let refused = client
        .delete_template(pb::DeleteTemplateRequest {
            template_name: "metal".into(),
            resource_version: 0,
        })
        .await
        .expect_err("in use");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let pre = refused
        .get_details_precondition_failure()
        .expect("PreconditionFailure");
    assert_eq!(pre.violations[0].r#type, "IN_USE");
    assert!(
        pre.violations[0].description.contains("1 worker"),
        "{pre:?}"
    );
    assert_eq!(
        refused
            .get_details_resource_info()
            .expect("ResourceInfo")
            .resource_name,
        "metal"
    );
    // The other template is free to go.
    client
        .delete_template(pb::DeleteTemplateRequest {
            template_name: "spare".into(),
            resource_version: 0,
        })
        .await
        .expect("unused template deleted");

    // Once the worker is TERMINATED the template can be deleted.
    let mut stored: pb::CmlWorker = plane.app.get(&worker.id).await.expect("worker");
    stored.set_state(pb::WorkerState::Terminated);
    let mut m = Mutation::at(plane.app.now());
    m.update(&mut stored, ClaimChange::Keep).expect("encodes");
    plane.app.commit(m).await.expect("terminated");
    assert_eq!(get(&mut client, "metal").await.worker_count, 0);

    let stale = client
        .delete_template(pb::DeleteTemplateRequest {
            template_name: "metal".into(),
            resource_version: 9,
        })
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted);
    let negative = client
        .delete_template(pb::DeleteTemplateRequest {
            template_name: "metal".into(),
            resource_version: -1,
        })
        .await
        .expect_err("negative");
    assert_eq!(fields(&negative), ["resource_version"]);
    client
        .delete_template(pb::DeleteTemplateRequest {
            template_name: "metal".into(),
            resource_version: 1,
        })
        .await
        .expect("deleted");
    let listed = client
        .list_templates(pb::ListTemplatesRequest::default())
        .await
        .expect("listed")
        .into_inner();
    assert!(listed.templates.is_empty());
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_list_templates_pages_by_name_with_filters() {
    let (plane, mut client) = start().await;
    for (name, license, region) in [
        ("echo", pb::LicenseType::Personal, "us-east-1"),
        ("alpha", pb::LicenseType::Enterprise, "us-east-1"),
        ("delta", pb::LicenseType::Personal, "eu-west-1"),
        ("charlie", pb::LicenseType::Evaluation, "us-east-1"),
        ("bravo", pb::LicenseType::Personal, "us-east-1"),
    ] {
        let mut t = template(name, license);
        t.regions = vec![region.into()];
        create(&mut client, t).await;
    }
    put_worker(&plane, "bravo", pb::WorkerState::Draining).await;

    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_templates(pb::ListTemplatesRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("listed")
            .into_inner();
        pages += 1;
        for t in &page.templates {
            names.push(t.name.clone());
            assert_eq!(t.worker_count, i32::from(t.name == "bravo"));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["alpha", "bravo", "charlie", "delta", "echo"]);

    let personal_us = client
        .list_templates(pb::ListTemplatesRequest {
            license_type: pb::LicenseType::Personal as i32,
            region: "us-east-1".into(),
            ..Default::default()
        })
        .await
        .expect("listed")
        .into_inner();
    let names: Vec<&str> = personal_us
        .templates
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names, ["bravo", "echo"]);

    let first = client
        .list_templates(pb::ListTemplatesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("listed")
        .into_inner();
    let changed = client
        .list_templates(pb::ListTemplatesRequest {
            page_size: 1,
            page_token: first.next_page_token,
            region: "eu-west-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("filters changed");
    assert_eq!(fields(&changed), ["page_token"]);
    let bad = client
        .list_templates(pb::ListTemplatesRequest {
            page_size: -5,
            license_type: 42,
            region: "Not A Region".into(),
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(fields(&bad), ["page_size", "license_type", "region"]);
    plane.stop().await.expect("stops");
}
