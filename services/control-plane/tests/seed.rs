//! Template seeding (domain.md §1.4): the shipped `config/worker-templates.yaml` is valid and
//! seeds its templates, seeding is idempotent, never overwrites a template (manual edits win),
//! re-creates a deleted one, is safe when run concurrently, and refuses an invalid file with
//! errors that name the entry and the field.

use std::path::Path;

use ccm_control_plane::seed::{SeedReport, seed_templates, seed_templates_file};
use ccm_control_plane::testing::TestPlane;
use ccm_proto::v1 as pb;
use ccm_proto::v1::template_service_client::TemplateServiceClient;
use ccm_store::{LogKind, LogQuery};
use tonic::Code;
use tonic::transport::Channel;

const PERSONAL: &str = "personal-m5zn-metal";
const ENTERPRISE: &str = "enterprise-m5zn-metal";

fn shipped_file() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/worker-templates.yaml");
    std::fs::read_to_string(&path).expect("config/worker-templates.yaml exists")
}

async fn start() -> (TestPlane, TemplateServiceClient<Channel>) {
    let plane = TestPlane::start().await.expect("plane starts");
    let client = TemplateServiceClient::new(plane.channel().await.expect("connects"));
    (plane, client)
}

async fn get(client: &mut TemplateServiceClient<Channel>, name: &str) -> pb::WorkerTemplate {
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

fn report(created: &[&str], skipped: &[&str]) -> SeedReport {
    SeedReport {
        created: created.iter().map(|s| (*s).to_owned()).collect(),
        skipped: skipped.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn hours(h: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: h * 3600,
        nanos: 0,
    })
}

#[tokio::test]
async fn test_seeding_the_shipped_file_creates_its_templates_once() {
    let (plane, mut client) = start().await;
    let yaml = shipped_file();
    let first = seed_templates(&plane.app, &yaml).await.expect("seeded");
    assert_eq!(first, report(&[PERSONAL, ENTERPRISE], &[]));

    let personal = get(&mut client, PERSONAL).await;
    assert!(personal.is_seeded);
    assert!(uuid::Uuid::parse_str(&personal.id).is_ok());
    assert_eq!(personal.instance_type, "m5zn.metal");
    assert_eq!(personal.license_type, pb::LicenseType::Personal as i32);
    assert_eq!(
        personal.capacity,
        Some(pb::WorkerCapacity {
            cpu_cores: 48,
            memory_gb: 192,
            storage_gb: 500,
            max_nodes: 20
        })
    );
    assert_eq!(personal.regions, ["us-east-1", "us-west-2"]);
    assert_eq!(personal.drain_timeout, hours(4));
    assert_eq!(
        personal.port_range,
        Some(pb::PortRange {
            start: 2000,
            end: 9999
        })
    );
    assert_eq!(
        personal.tags.get("ManagedBy").map(String::as_str),
        Some("ccm")
    );
    let enterprise = get(&mut client, ENTERPRISE).await;
    assert_eq!(enterprise.license_type, pb::LicenseType::Enterprise as i32);
    assert_eq!(enterprise.capacity.map(|c| c.max_nodes), Some(500));
    assert_eq!(enterprise.drain_timeout, hours(6));
    assert_eq!(enterprise.stopped_retention, hours(72));

    // Again (a restart): nothing written.
    let second = seed_templates(&plane.app, &yaml).await.expect("seeded");
    assert_eq!(second, report(&[], &[PERSONAL, ENTERPRISE]));
    assert_eq!(get(&mut client, PERSONAL).await, personal);
    assert_eq!(get(&mut client, ENTERPRISE).await.resource_version, 1);
    let audit = plane
        .app
        .store
        .list_log(LogKind::Audit, LogQuery::default())
        .await
        .expect("audit readable");
    let seeded: Vec<&str> = audit
        .entries
        .iter()
        .filter(|e| e.action == "template.seed")
        .map(|e| e.resource_id.as_str())
        .collect();
    assert_eq!(seeded.len(), 2, "one audit record per created template");
    assert!(audit.entries.iter().all(|e| e.actor == "system:seed"));
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_seeding_never_overwrites_and_recreates_deleted_templates() {
    let (plane, mut client) = start().await;
    // A template of the same name made by hand before the first seeding is kept as it is.
    let manual = client
        .create_template(pb::CreateTemplateRequest {
            template: Some(pb::WorkerTemplate {
                name: ENTERPRISE.into(),
                instance_type: "m5zn.metal".into(),
                capacity: Some(pb::WorkerCapacity {
                    cpu_cores: 48,
                    memory_gb: 192,
                    storage_gb: 2000,
                    max_nodes: 250,
                }),
                license_type: pb::LicenseType::Enterprise as i32,
                ami_pattern: "CML-2.8.*".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("created")
        .into_inner()
        .template
        .expect("template");
    let yaml = shipped_file();
    assert_eq!(
        seed_templates(&plane.app, &yaml).await.expect("seeded"),
        report(&[PERSONAL], &[ENTERPRISE])
    );
    assert_eq!(
        get(&mut client, ENTERPRISE).await,
        manual,
        "not overwritten"
    );
    assert!(!manual.is_seeded);

    // A manual edit of a seeded template survives the next seeding.
    let mut edit = get(&mut client, PERSONAL).await;
    edit.description = "Edited by an operator".into();
    edit.max_workers = 2;
    let edited = client
        .update_template(pb::UpdateTemplateRequest {
            template: Some(edit),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".into(), "max_workers".into()],
            }),
        })
        .await
        .expect("updated")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(
        seed_templates(&plane.app, &yaml).await.expect("seeded"),
        report(&[], &[PERSONAL, ENTERPRISE])
    );
    let after = get(&mut client, PERSONAL).await;
    assert_eq!(after, edited);
    assert_eq!(after.description, "Edited by an operator");
    assert_eq!(after.max_workers, 2);
    assert!(after.is_seeded, "still marked as seeded");

    // A deleted template comes back on the next seeding.
    client
        .delete_template(pb::DeleteTemplateRequest {
            template_name: PERSONAL.into(),
            resource_version: 0,
        })
        .await
        .expect("deleted");
    assert_eq!(
        seed_templates(&plane.app, &yaml).await.expect("seeded"),
        report(&[PERSONAL], &[ENTERPRISE])
    );
    assert_eq!(get(&mut client, PERSONAL).await.max_workers, 10);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_concurrent_seeding_creates_each_template_once() {
    let (plane, mut client) = start().await;
    let yaml = shipped_file();
    let (a, b) = tokio::join!(
        seed_templates(&plane.app, &yaml),
        seed_templates(&plane.app, &yaml)
    );
    let (a, b) = (a.expect("seeded"), b.expect("seeded"));
    let mut created: Vec<String> = a.created.iter().chain(&b.created).cloned().collect();
    created.sort();
    assert_eq!(created, [ENTERPRISE, PERSONAL], "each created exactly once");
    assert_eq!(a.created.len() + a.skipped.len(), 2);
    assert_eq!(b.created.len() + b.skipped.len(), 2);
    assert_eq!(get(&mut client, PERSONAL).await.resource_version, 1);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_invalid_seed_files_are_refused_with_the_entry_and_field() {
    let (plane, mut client) = start().await;
    let yaml = r#"
- name: good-one
  instance_type: m5zn.metal
  license_type: personal
  capacity: { cpu_cores: 48, memory_gb: 192, storage_gb: 500, max_nodes: 20 }
  ami_pattern: "CML-2.9.*"
- name: bad-values
  instance_type: m5zn.metal
  license_type: GOLD
  capacity: { cpu_cores: -1, memory_gb: 192, storage_gb: 500, max_nodes: 20 }
  ami_pattern: "CML-2.9.*"
  drain_timeout_hours: -2
- name: unknown-key
  instance_type: m5zn.metal
  license_type: ENTERPRISE
  capacity: { cpu_cores: 48, memory_gb: 192, storage_gb: 500, max_nodes: 500 }
  ami_pattern: "CML-2.9.*"
  cpu: 48
- instance_type: m5zn.metal
  license_type: ENTERPRISE
  capacity: { cpu_cores: 48, memory_gb: 192, storage_gb: 500, max_nodes: 500 }
  ami_pattern: "CML-2.9.*"
- name: good-one
  instance_type: m5zn.metal
  license_type: LICENSE_TYPE_EVALUATION
  capacity: { cpu_cores: 48, memory_gb: 192, storage_gb: 500, max_nodes: 500 }
  ami_pattern: "CML-2.9.*"
"#;
    let err = seed_templates(&plane.app, yaml)
        .await
        .expect_err("invalid file");
    assert_eq!(err.code(), Code::InvalidArgument);
    let got: Vec<(&str, &str)> = err
        .field_violations()
        .iter()
        .map(|v| (v.field.as_str(), v.description.as_str()))
        .collect();
    let fields: Vec<&str> = got.iter().map(|(f, _)| *f).collect();
    assert_eq!(
        fields,
        [
            "templates[1].license_type",
            "templates[1].capacity.cpu_cores",
            "templates[1].drain_timeout",
            "templates[2]",
            "templates[3]",
            "templates[4].name",
        ],
        "{got:?}"
    );
    assert!(got[0].1.contains("GOLD"), "{got:?}");
    assert!(got[3].1.contains("cpu"), "names the unknown key: {got:?}");
    assert!(got[4].1.contains("name"), "names the missing key: {got:?}");
    assert!(got[5].1.contains("duplicate"), "{got:?}");
    // Nothing was written, not even the valid entry.
    let listed = client
        .list_templates(pb::ListTemplatesRequest::default())
        .await
        .expect("listed")
        .into_inner();
    assert!(listed.templates.is_empty());

    for (what, text) in [
        ("not a list", "name: lonely\n"),
        ("not YAML", "- name: [unclosed\n"),
    ] {
        let err = seed_templates(&plane.app, text).await.expect_err(what);
        let fields: Vec<&str> = err
            .field_violations()
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["templates"], "{what}");
    }
    assert_eq!(
        seed_templates(&plane.app, "# nothing to seed\n")
            .await
            .expect("empty file"),
        SeedReport::default()
    );
    let missing = seed_templates_file(&plane.app, Path::new("/nonexistent/worker-templates.yaml"))
        .await
        .expect_err("missing file");
    assert_eq!(missing.code(), Code::FailedPrecondition);
    assert!(
        missing
            .to_string()
            .contains("/nonexistent/worker-templates.yaml")
    );
    plane.stop().await.expect("stops");
}
