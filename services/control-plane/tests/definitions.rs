//! DefinitionService over real gRPC (TestPlane on loopback): domain.md §10 scenario 1 (create,
//! get/list, duplicate rejected, sync → new PATCH version + CloudEvent), every validation
//! failure with its field path, artifacts from files and from the moto S3 emulator, deprecate,
//! delete refused while an instance uses the definition, optimistic concurrency, paging.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ccm_artifacts::{DefaultFetcher, FetcherConfig, S3Config, StaticCredentials};
use ccm_cloudevents::{CloudEvent, Data};
use ccm_control_plane::app::AppSettings;
use ccm_control_plane::record::{Mutation, audit_from_entry};
use ccm_control_plane::testing::{TestOptions, TestPlane};
use ccm_proto::v1 as pb;
use ccm_proto::v1::definition_service_client::DefinitionServiceClient;
use ccm_store::{ClaimChange, LogKind, LogQuery};
use ccm_testkit::moto::{MotoServer, TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

type Client = DefinitionServiceClient<Channel>;

const CREATED: &str = "ccm.lablet.definition.created";
const VERSION_CREATED: &str = "ccm.lablet.definition.version.created";
const DEPRECATED: &str = "ccm.lablet.definition.deprecated";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/labs")
        .join(name)
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("fixture readable")
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("ccm-definitions-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Writes `content` to `name` inside the directory and returns its path.
    fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("temp file written");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn minutes(m: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: m * 60,
        nanos: 0,
    }
}

fn port(name: &str) -> pb::PortDefinition {
    pb::PortDefinition {
        name: name.into(),
        protocol: pb::PortProtocol::Tcp as i32,
    }
}

/// A valid definition of the `lab-ports.yaml` topology (3 nodes, ports serial_1 and vnc_1).
fn definition(name: &str, uri: &str) -> pb::LabletDefinition {
    pb::LabletDefinition {
        name: name.into(),
        description: "Routing basics".into(),
        lab_artifact_uri: uri.into(),
        resource_requirements: Some(pb::ResourceRequirements {
            cpu_cores: 4,
            memory_gb: 8,
            storage_gb: 20,
            nested_virt: true,
            ami_requirements: vec![pb::AmiRequirement {
                name_pattern: "CML-2.9.*".into(),
                min_version: "2.9.0".into(),
            }],
        }),
        license_affinity: vec![
            pb::LicenseType::Personal as i32,
            pb::LicenseType::Enterprise as i32,
        ],
        node_count: 3,
        port_template: Some(pb::PortTemplate {
            ports: vec![port("serial_1"), port("vnc_1")],
        }),
        max_duration: Some(minutes(120)),
        ..Default::default()
    }
}

async fn start() -> (TestPlane, Client) {
    let plane = TestPlane::start().await.expect("plane starts");
    let client = DefinitionServiceClient::new(plane.channel().await.expect("connects"));
    (plane, client)
}

async fn create(client: &mut Client, d: pb::LabletDefinition) -> pb::CreateDefinitionResponse {
    client
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(d),
            request_id: String::new(),
        })
        .await
        .expect("created")
        .into_inner()
}

async fn create_err(client: &mut Client, d: pb::LabletDefinition) -> tonic::Status {
    client
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(d),
            request_id: String::new(),
        })
        .await
        .expect_err("refused")
}

/// The `(field, description)` pairs of an INVALID_ARGUMENT.
fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| (v.field, v.description))
        .collect()
}

fn fields(status: &tonic::Status) -> Vec<String> {
    violations(status).into_iter().map(|(f, _)| f).collect()
}

fn events_of(plane: &TestPlane, event_type: &str) -> Vec<CloudEvent> {
    plane
        .sink
        .events()
        .into_iter()
        .filter(|e| e.event_type == event_type)
        .collect()
}

fn data(e: &CloudEvent) -> serde_json::Value {
    match &e.data {
        Some(Data::Json(v)) => v.clone(),
        other => panic!("expected JSON data, got {other:?}"),
    }
}

async fn get(client: &mut Client, id: &str, version: &str) -> pb::LabletDefinition {
    client
        .get_definition(pb::GetDefinitionRequest {
            definition_id: id.into(),
            version: version.into(),
            include_lab_yaml: false,
        })
        .await
        .expect("found")
        .into_inner()
        .definition
        .expect("definition")
}

async fn list(client: &mut Client, req: pb::ListDefinitionsRequest) -> pb::ListDefinitionsResponse {
    client
        .list_definitions(req)
        .await
        .expect("listed")
        .into_inner()
}

async fn versions(client: &mut Client, id: &str, include_deleted: bool) -> Vec<String> {
    client
        .list_definition_versions(pb::ListDefinitionVersionsRequest {
            definition_id: id.into(),
            include_deleted,
            ..Default::default()
        })
        .await
        .expect("versions listed")
        .into_inner()
        .definitions
        .into_iter()
        .map(|d| d.version)
        .collect()
}

async fn sync(client: &mut Client, id: &str, new_version: &str) -> pb::SyncDefinitionResponse {
    client
        .sync_definition(pb::SyncDefinitionRequest {
            definition_id: id.into(),
            new_version: new_version.into(),
            lab_artifact_uri: String::new(),
        })
        .await
        .expect("synced")
        .into_inner()
}

async fn definitions_stored(plane: &TestPlane) -> u64 {
    plane
        .app
        .store
        .count(ccm_store::Kind::Definition, &[])
        .await
        .expect("counted")
}

/// Puts an instance of `definition_id` in `state` straight into the store (the instance service
/// is not what is tested here).
async fn put_instance(
    plane: &TestPlane,
    definition_id: &str,
    state: pb::InstanceState,
) -> pb::LabletInstance {
    let mut instance = pb::LabletInstance {
        id: uuid::Uuid::new_v4().to_string(),
        definition_id: definition_id.into(),
        definition_version: "1.0.0".into(),
        definition_name: "ccna-routing".into(),
        owner_id: "alice".into(),
        ..Default::default()
    };
    instance.set_state(state);
    let mut m = Mutation::at(plane.app.now());
    m.create(&mut instance, Vec::new()).expect("encodes");
    plane.app.commit(m).await.expect("instance stored");
    instance
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: create, read, duplicates, sync
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_create_definition_is_stored_with_semver_and_readable() {
    let (plane, mut client) = start().await;
    let path = fixture("lab-ports.yaml");
    let yaml = read(&path);
    let mut input = definition("ccna-routing", &file_uri(&path));
    input.description = "<script>alert('x')</script> stays inert".into();
    // Output-only fields from a client are ignored.
    input.id = "not-mine".into();
    input.lab_yaml_hash = "sha256:forged".into();
    input.status = pb::DefinitionStatus::Deleted as i32;
    let created = create(&mut client, input).await;
    let d = created.definition.expect("definition");
    assert!(
        uuid::Uuid::parse_str(&d.id).is_ok(),
        "lineage id is a UUID: {}",
        d.id
    );
    assert_eq!(d.version, "1.0.0", "defaults to 1.0.0");
    assert_eq!(d.name, "ccna-routing");
    assert_eq!(d.status(), pb::DefinitionStatus::Active);
    assert_eq!(
        d.lab_yaml_hash,
        ccm_core::version::content_hash(yaml.as_bytes())
    );
    assert_eq!(d.created_by, "user:anonymous");
    assert_eq!(d.resource_version, 1);
    assert!(
        d.lab_yaml.is_empty(),
        "the cached YAML is not in the create answer"
    );
    assert_eq!(d.description, "<script>alert('x')</script> stays inert");
    assert!(created.findings.is_empty(), "{:?}", created.findings);

    // Get: latest by default, by version, and with the cached YAML on request.
    let latest = get(&mut client, &d.id, "").await;
    assert_eq!(latest, d);
    assert_eq!(get(&mut client, &d.id, "1.0.0").await, d);
    let with_yaml = client
        .get_definition(pb::GetDefinitionRequest {
            definition_id: d.id.clone(),
            version: String::new(),
            include_lab_yaml: true,
        })
        .await
        .expect("found")
        .into_inner()
        .definition
        .expect("definition");
    assert_eq!(with_yaml.lab_yaml, yaml);

    // List.
    let listed = list(&mut client, pb::ListDefinitionsRequest::default()).await;
    assert_eq!(listed.definitions, vec![d.clone()]);
    assert_eq!(listed.total_size, 1);
    assert!(listed.next_page_token.is_empty());

    // The CloudEvent and the audit record.
    let events = events_of(&plane, CREATED);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].subject.as_deref(), Some(d.id.as_str()));
    let payload = data(&events[0]);
    assert_eq!(payload["definition_id"], d.id.as_str());
    assert_eq!(payload["name"], "ccna-routing");
    assert_eq!(payload["version"], "1.0.0");
    let audit = plane
        .app
        .store
        .list_log(
            LogKind::Audit,
            LogQuery {
                resource_id: Some(format!("{}@1.0.0", d.id)),
                ..Default::default()
            },
        )
        .await
        .expect("audit readable");
    assert_eq!(audit.entries.len(), 1);
    let record = audit_from_entry(&audit.entries[0]).expect("audit record");
    assert_eq!(record.action, "definition.create");
    assert_eq!(record.actor, "user:anonymous");
    assert_eq!(record.to_state, "DEFINITION_STATUS_ACTIVE");

    // Unknown and malformed ids.
    let missing = client
        .get_definition(pb::GetDefinitionRequest {
            definition_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
    let missing_version = client
        .get_definition(pb::GetDefinitionRequest {
            definition_id: d.id.clone(),
            version: "9.9.9".into(),
            ..Default::default()
        })
        .await
        .expect_err("no such version");
    assert_eq!(missing_version.code(), Code::NotFound);
    let bad = client
        .get_definition(pb::GetDefinitionRequest {
            definition_id: "../etc".into(),
            version: "1.0".into(),
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(fields(&bad), ["definition_id", "version"]);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_duplicate_name_and_version_is_rejected_and_names_belong_to_one_lineage() {
    let (plane, mut client) = start().await;
    let uri = file_uri(&fixture("lab-ports.yaml"));
    let first = create(&mut client, definition("ccna-routing", &uri))
        .await
        .definition
        .expect("definition");

    let dup = create_err(&mut client, definition("ccna-routing", &uri)).await;
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    let info = dup.get_details_resource_info().expect("ResourceInfo");
    assert_eq!(info.resource_type, "definition");
    assert_eq!(info.resource_name, "ccna-routing@1.0.0");

    // Another version under the same name is not a new lineage: use Sync.
    let mut v2 = definition("ccna-routing", &uri);
    v2.version = "2.0.0".into();
    let taken = create_err(&mut client, v2).await;
    assert_eq!(taken.code(), Code::AlreadyExists);
    assert!(
        taken
            .get_details_resource_info()
            .expect("ResourceInfo")
            .resource_name
            .contains(&first.id),
        "names the lineage that owns the name"
    );

    // A different name at the same version is fine.
    let other = create(&mut client, definition("ccnp-routing", &uri))
        .await
        .definition
        .expect("definition");
    assert_ne!(other.id, first.id);
    assert_eq!(definitions_stored(&plane).await, 2);
    assert_eq!(events_of(&plane, CREATED).len(), 2);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_with_request_id_is_idempotent() {
    let (plane, mut client) = start().await;
    let uri = file_uri(&fixture("lab-ports.yaml"));
    let request = pb::CreateDefinitionRequest {
        definition: Some(definition("ccna-routing", &uri)),
        request_id: "create-ccna-1".into(),
    };
    let first = client
        .create_definition(request.clone())
        .await
        .expect("created")
        .into_inner();
    let again = client
        .create_definition(request)
        .await
        .expect("a retry succeeds")
        .into_inner();
    assert_eq!(first.definition, again.definition);
    assert_eq!(definitions_stored(&plane).await, 1);
    assert_eq!(
        events_of(&plane, CREATED).len(),
        1,
        "one event for one create"
    );

    let reused = client
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(definition("another-lab", &uri)),
            request_id: "create-ccna-1".into(),
        })
        .await
        .expect_err("key reused for a different definition");
    assert_eq!(fields(&reused), ["request_id"]);
    let too_long = client
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(definition("another-lab", &uri)),
            request_id: "k".repeat(65),
        })
        .await
        .expect_err("key too long");
    assert_eq!(fields(&too_long), ["request_id"]);
    assert_eq!(definitions_stored(&plane).await, 1);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_sync_with_changed_artifact_creates_patch_version_and_event() {
    let (plane, mut client) = start().await;
    let dir = TempDir::new();
    let v1 = read(&fixture("lab-ports.yaml"));
    let v2 = read(&fixture("lab-ports-v2.yaml"));
    let path = dir.write("lab.yaml", &v1);
    let created = create(&mut client, definition("ccna-routing", &file_uri(&path)))
        .await
        .definition
        .expect("definition");
    let id = created.id.clone();

    // Unchanged artifact: no new version, no event.
    let same = sync(&mut client, &id, "").await;
    assert!(!same.changed);
    assert_eq!(same.previous_version, "1.0.0");
    assert_eq!(same.previous_hash, created.lab_yaml_hash);
    assert_eq!(
        same.definition.as_ref().map(|d| d.version.as_str()),
        Some("1.0.0")
    );
    assert_eq!(versions(&mut client, &id, true).await, ["1.0.0"]);
    assert!(events_of(&plane, VERSION_CREATED).is_empty());

    // Changed artifact: PATCH + 1 and the CloudEvent.
    dir.write("lab.yaml", &v2);
    let changed = sync(&mut client, &id, "").await;
    assert!(changed.changed);
    assert_eq!(changed.previous_version, "1.0.0");
    assert_eq!(changed.previous_hash, created.lab_yaml_hash);
    let new = changed.definition.expect("new version");
    assert_eq!(new.id, id, "same lineage");
    assert_eq!(new.version, "1.0.1");
    assert_eq!(
        new.lab_yaml_hash,
        ccm_core::version::content_hash(v2.as_bytes())
    );
    assert_eq!(new.status(), pb::DefinitionStatus::Active);
    assert_eq!(new.port_template, created.port_template, "carried over");
    assert_eq!(new.resource_requirements, created.resource_requirements);
    let events = events_of(&plane, VERSION_CREATED);
    assert_eq!(events.len(), 1);
    let payload = data(&events[0]);
    assert_eq!(payload["definition_id"], id.as_str());
    assert_eq!(payload["old_version"], "1.0.0");
    assert_eq!(payload["new_version"], "1.0.1");
    assert_eq!(get(&mut client, &id, "").await.version, "1.0.1");
    assert_eq!(
        get(&mut client, &id, "1.0.0").await,
        created,
        "old version unchanged"
    );
    assert_eq!(versions(&mut client, &id, false).await, ["1.0.1", "1.0.0"]);

    // Syncing again without a change is a no-op.
    let again = sync(&mut client, &id, "").await;
    assert!(!again.changed);
    assert_eq!(again.previous_version, "1.0.1");
    assert_eq!(events_of(&plane, VERSION_CREATED).len(), 1);

    // Admin override: an explicit version must be greater than the latest.
    dir.write("lab.yaml", &v1);
    let low = client
        .sync_definition(pb::SyncDefinitionRequest {
            definition_id: id.clone(),
            new_version: "1.0.1".into(),
            lab_artifact_uri: String::new(),
        })
        .await
        .expect_err("not greater");
    assert_eq!(fields(&low), ["new_version"]);
    let bad = client
        .sync_definition(pb::SyncDefinitionRequest {
            definition_id: id.clone(),
            new_version: "v2".into(),
            lab_artifact_uri: "ftp://example.com/lab.yaml".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(fields(&bad), ["new_version", "lab_artifact_uri"]);
    let overridden = sync(&mut client, &id, "2.0.0").await;
    assert!(overridden.changed);
    assert_eq!(overridden.definition.expect("new").version, "2.0.0");
    assert_eq!(
        versions(&mut client, &id, false).await,
        ["2.0.0", "1.0.1", "1.0.0"],
        "numeric semver order"
    );

    // A changed artifact that no longer matches the port template creates nothing.
    dir.write(
        "lab.yaml",
        read(&fixture("lab-ports.yaml")).replace("${PORT_VNC_1}", "${PORT_VNC_7}"),
    );
    let broken = client
        .sync_definition(pb::SyncDefinitionRequest {
            definition_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("invalid artifact");
    let v = violations(&broken);
    assert!(
        v.iter().any(|(f, d)| f == "lab_yaml"
            && d.contains("${PORT_VNC_7}")
            && d.contains("nodes[1].tags[0]")),
        "{v:?}"
    );
    assert!(
        !v.iter().any(|(f, _)| f == "port_template.ports[1].name"),
        "vnc_1 is now unused, which is a warning, not a violation: {v:?}"
    );
    assert_eq!(versions(&mut client, &id, true).await.len(), 3);

    // A new artifact location.
    let moved = dir.write("moved.yaml", &v2);
    let relocated = client
        .sync_definition(pb::SyncDefinitionRequest {
            definition_id: id.clone(),
            new_version: String::new(),
            lab_artifact_uri: file_uri(&moved),
        })
        .await
        .expect("synced from the new location")
        .into_inner();
    assert!(
        relocated.changed,
        "v2 content differs from 2.0.0 (v1 content)"
    );
    let relocated = relocated.definition.expect("new");
    assert_eq!(relocated.version, "2.0.1");
    assert_eq!(relocated.lab_artifact_uri, file_uri(&moved));

    let unknown = client
        .sync_definition(pb::SyncDefinitionRequest {
            definition_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("no such lineage");
    assert_eq!(unknown.code(), Code::NotFound);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_create_reports_each_invalid_field_with_its_path() {
    let (plane, mut client) = start().await;
    let uri = file_uri(&fixture("lab-ports.yaml"));
    type Edit = Box<dyn Fn(&mut pb::LabletDefinition)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "empty name",
            Box::new(|d| d.name.clear()),
            "definition.name",
        ),
        (
            "oversize name",
            Box::new(|d| d.name = "a".repeat(129)),
            "definition.name",
        ),
        (
            "hostile name",
            Box::new(|d| d.name = "<script>alert(1)</script>".into()),
            "definition.name",
        ),
        (
            "upper-case name",
            Box::new(|d| d.name = "CCNA Lab".into()),
            "definition.name",
        ),
        (
            "non-semver",
            Box::new(|d| d.version = "1.0".into()),
            "definition.version",
        ),
        (
            "v-prefixed",
            Box::new(|d| d.version = "v1.2.3".into()),
            "definition.version",
        ),
        (
            "negative cpu",
            Box::new(|d| {
                if let Some(r) = d.resource_requirements.as_mut() {
                    r.cpu_cores = -1;
                }
            }),
            "definition.resource_requirements.cpu_cores",
        ),
        (
            "zero memory",
            Box::new(|d| {
                if let Some(r) = d.resource_requirements.as_mut() {
                    r.memory_gb = 0;
                }
            }),
            "definition.resource_requirements.memory_gb",
        ),
        (
            "negative storage",
            Box::new(|d| {
                if let Some(r) = d.resource_requirements.as_mut() {
                    r.storage_gb = -5;
                }
            }),
            "definition.resource_requirements.storage_gb",
        ),
        (
            "absurd cpu",
            Box::new(|d| {
                if let Some(r) = d.resource_requirements.as_mut() {
                    r.cpu_cores = i32::MAX;
                }
            }),
            "definition.resource_requirements.cpu_cores",
        ),
        (
            "bad AMI min_version",
            Box::new(|d| {
                if let Some(r) = d.resource_requirements.as_mut() {
                    r.ami_requirements[0].min_version = "2.9".into();
                }
            }),
            "definition.resource_requirements.ami_requirements[0].min_version",
        ),
        (
            "missing resources",
            Box::new(|d| d.resource_requirements = None),
            "definition.resource_requirements",
        ),
        (
            "unknown licence number",
            Box::new(|d| d.license_affinity = vec![99]),
            "definition.license_affinity[0]",
        ),
        (
            "UNSPECIFIED licence",
            Box::new(|d| d.license_affinity = vec![1, 0]),
            "definition.license_affinity[1]",
        ),
        (
            "no licence",
            Box::new(|d| d.license_affinity.clear()),
            "definition.license_affinity",
        ),
        (
            "too many nodes for PERSONAL alone",
            Box::new(|d| {
                d.node_count = 25;
                d.license_affinity = vec![pb::LicenseType::Personal as i32];
            }),
            "definition.license_affinity",
        ),
        (
            "zero nodes",
            Box::new(|d| d.node_count = 0),
            "definition.node_count",
        ),
        (
            "negative nodes",
            Box::new(|d| d.node_count = -3),
            "definition.node_count",
        ),
        (
            "invalid port name",
            Box::new(|d| {
                if let Some(t) = d.port_template.as_mut() {
                    t.ports[0].name = "Serial-1".into();
                }
            }),
            "definition.port_template.ports[0].name",
        ),
        (
            "duplicate port name",
            Box::new(|d| {
                if let Some(t) = d.port_template.as_mut() {
                    t.ports[1].name = "serial_1".into();
                }
            }),
            "definition.port_template.ports[1].name",
        ),
        (
            "unknown port protocol",
            Box::new(|d| {
                if let Some(t) = d.port_template.as_mut() {
                    t.ports[1].protocol = 42;
                }
            }),
            "definition.port_template.ports[1].protocol",
        ),
        (
            "zero max_duration",
            Box::new(|d| d.max_duration = Some(minutes(0))),
            "definition.max_duration",
        ),
        (
            "missing max_duration",
            Box::new(|d| d.max_duration = None),
            "definition.max_duration",
        ),
        (
            "fractional minutes",
            Box::new(|d| {
                d.max_duration = Some(prost_types::Duration {
                    seconds: 90,
                    nanos: 0,
                })
            }),
            "definition.max_duration",
        ),
        (
            "two months",
            Box::new(|d| d.max_duration = Some(minutes(60 * 24 * 62))),
            "definition.max_duration",
        ),
        (
            "ftp artifact",
            Box::new(|d| d.lab_artifact_uri = "ftp://example.com/lab.yaml".into()),
            "definition.lab_artifact_uri",
        ),
        (
            "http artifact (not allowed by default)",
            Box::new(|d| d.lab_artifact_uri = "http://127.0.0.1:1/lab.yaml".into()),
            "definition.lab_artifact_uri",
        ),
        (
            "path traversal",
            Box::new(|d| d.lab_artifact_uri = "file:///srv/labs/../../etc/passwd".into()),
            "definition.lab_artifact_uri",
        ),
        (
            "missing artifact",
            Box::new(|d| d.lab_artifact_uri.clear()),
            "definition.lab_artifact_uri",
        ),
        (
            "bad grading rules URI",
            Box::new(|d| d.grading_rules_uri = "grading.yaml".into()),
            "definition.grading_rules_uri",
        ),
        (
            "plain-http webhook",
            Box::new(|d| {
                d.owner_notification = Some(pb::NotificationConfig {
                    emails: vec![],
                    webhook_url: "http://example.com/hook".into(),
                })
            }),
            "definition.owner_notification.webhook_url",
        ),
        (
            "not an e-mail",
            Box::new(|d| {
                d.owner_notification = Some(pb::NotificationConfig {
                    emails: vec!["ops@example.com".into(), "not an email".into()],
                    webhook_url: String::new(),
                })
            }),
            "definition.owner_notification.emails[1]",
        ),
        (
            "control characters in the description",
            Box::new(|d| d.description = "line\u{0}break".into()),
            "definition.description",
        ),
        (
            "bidi override in the description",
            Box::new(|d| d.description = "abc\u{202E}gpj.exe".into()),
            "definition.description",
        ),
    ];
    for (what, edit, field) in &cases {
        let mut d = definition("ccna-routing", &uri);
        edit(&mut d);
        let status = create_err(&mut client, d).await;
        assert_eq!(fields(&status), [*field], "{what}");
    }

    // Every problem at once, nothing stored.
    let mut d = definition("", &uri);
    d.version = "one".into();
    d.license_affinity = vec![99];
    d.node_count = -1;
    d.max_duration = None;
    let status = create_err(&mut client, d).await;
    let mut got = fields(&status);
    got.sort();
    assert_eq!(
        got,
        [
            "definition.license_affinity[0]",
            "definition.max_duration",
            "definition.name",
            "definition.node_count",
            "definition.version",
        ]
    );
    let missing = client
        .create_definition(pb::CreateDefinitionRequest::default())
        .await
        .expect_err("no definition");
    assert_eq!(fields(&missing), ["definition"]);
    assert_eq!(definitions_stored(&plane).await, 0);
    assert!(plane.sink.events().is_empty(), "nothing emitted");
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_create_rejects_artifacts_that_do_not_match_the_definition() {
    let (plane, mut client) = start().await;
    let dir = TempDir::new();

    // Malformed YAML.
    let status = create_err(
        &mut client,
        definition("broken", &file_uri(&fixture("lab-malformed.yaml"))),
    )
    .await;
    let v = violations(&status);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, "definition.lab_yaml");
    assert!(v[0].1.contains("invalid lab YAML"), "{v:?}");

    // A placeholder naming no port, with its location.
    let mut d = definition(
        "unknown",
        &file_uri(&fixture("lab-unknown-placeholder.yaml")),
    );
    d.node_count = 2;
    d.port_template = Some(pb::PortTemplate {
        ports: vec![port("serial_1")],
    });
    let status = create_err(&mut client, d).await;
    let v = violations(&status);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, "definition.lab_yaml");
    assert!(
        v[0].1.contains("${PORT_SERIAL_9}") && v[0].1.contains("nodes[1].tags[0]"),
        "{v:?}"
    );

    // A port no placeholder refers to: accepted, with a WARNING finding (definition.proto).
    let mut d = definition("unused-port", &file_uri(&fixture("lab-ports.yaml")));
    if let Some(t) = d.port_template.as_mut() {
        t.ports.push(port("ssh_1"));
    }
    let created = client
        .create_definition(pb::CreateDefinitionRequest {
            definition: Some(d),
            ..Default::default()
        })
        .await
        .expect("an unused port is a warning, not an error")
        .into_inner();
    let warnings: Vec<(String, String, pb::FindingSeverity)> = created
        .findings
        .iter()
        .map(|f| (f.code.clone(), f.path.clone(), f.severity()))
        .collect();
    assert_eq!(
        warnings,
        [(
            "port.unused".to_owned(),
            "port_template.ports[2].name".to_owned(),
            pb::FindingSeverity::Warning
        )]
    );
    assert!(created.findings[0].message.contains("${PORT_SSH_1}"));

    // Fewer nodes declared than the topology has.
    let mut d = definition("too-few-nodes", &file_uri(&fixture("lab-ports.yaml")));
    d.node_count = 2;
    let status = create_err(&mut client, d).await;
    assert_eq!(fields(&status), ["definition.node_count"]);

    // A missing file is a failed precondition, not a bad request.
    let status = create_err(
        &mut client,
        definition("missing", &file_uri(&dir.0.join("nope.yaml"))),
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // Not UTF-8.
    let binary = dir.write("lab.bin", [0xff_u8, 0xfe, 0x00, 0x41]);
    let status = create_err(&mut client, definition("binary", &file_uri(&binary))).await;
    assert_eq!(fields(&status), ["definition.lab_artifact_uri"]);

    // An empty file.
    let empty = dir.write("empty.yaml", "");
    let status = create_err(&mut client, definition("empty", &file_uri(&empty))).await;
    assert_eq!(fields(&status), ["definition.lab_yaml"]);

    // Under 4 MiB, but too large to keep with the definition once JSON-escaped.
    let quotes = format!(
        "{}\n# {}\n",
        read(&fixture("lab-ports.yaml")),
        "\"".repeat(5 * 1024 * 1024 / 2)
    );
    let heavy = dir.write("quotes.yaml", quotes);
    let status = create_err(&mut client, definition("quotes", &file_uri(&heavy))).await;
    let v = violations(&status);
    assert_eq!(
        v.len(),
        1,
        "{:?}",
        v.iter().map(|(f, _)| f).collect::<Vec<_>>()
    );
    assert_eq!(v[0].0, "definition.lab_yaml");
    assert!(v[0].1.contains("once stored"), "{}", v[0].1);

    // A file that is YAML but not a lab.
    let not_a_lab = dir.write("list.yaml", "- just\n- a list\n");
    let status = create_err(&mut client, definition("list", &file_uri(&not_a_lab))).await;
    assert_eq!(fields(&status), ["definition.lab_yaml"]);
    // Only the definition with the unused port (a warning) was stored.
    assert_eq!(definitions_stored(&plane).await, 1);

    // More nodes declared than the topology has: accepted, with a warning.
    let mut d = definition("spare-nodes", &file_uri(&fixture("lab-ports.yaml")));
    d.node_count = 5;
    let created = create(&mut client, d).await;
    assert_eq!(created.findings.len(), 1, "{:?}", created.findings);
    assert_eq!(created.findings[0].code, "nodes.count_mismatch");
    assert_eq!(created.findings[0].severity(), pb::FindingSeverity::Warning);
    assert_eq!(definitions_stored(&plane).await, 2);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_http_artifacts_only_when_the_settings_allow_them() {
    let plane = TestPlane::start_with(TestOptions {
        settings: Some(AppSettings {
            allow_http_artifacts: true,
            ..AppSettings::default()
        }),
        ..TestOptions::default()
    })
    .await
    .expect("plane starts");
    let mut client = DefinitionServiceClient::new(plane.channel().await.expect("connects"));
    // Nothing listens on port 1: the URI is accepted, the fetch fails as unavailable.
    let status = create_err(
        &mut client,
        definition("over-http", "http://127.0.0.1:1/lab.yaml"),
    )
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_validate_definition_reports_every_finding_without_writing() {
    let (plane, mut client) = start().await;
    let yaml = read(&fixture("lab-unknown-placeholder.yaml"));
    let report = client
        .validate_definition(pb::ValidateDefinitionRequest {
            source: Some(pb::validate_definition_request::Source::LabYaml(
                yaml.clone(),
            )),
            port_template: Some(pb::PortTemplate {
                ports: vec![port("serial_1"), port("vnc_1")],
            }),
            node_count: 1,
            license_affinity: vec![pb::LicenseType::Enterprise as i32],
        })
        .await
        .expect("validated")
        .into_inner();
    assert!(!report.valid);
    assert_eq!(report.detected_node_count, 2);
    assert_eq!(report.placeholders, ["serial_1", "serial_9"]);
    assert_eq!(
        report.lab_yaml_hash,
        ccm_core::version::content_hash(yaml.as_bytes())
    );
    let found: Vec<(String, String, pb::FindingSeverity)> = report
        .findings
        .iter()
        .map(|f| (f.code.clone(), f.path.clone(), f.severity()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "port.placeholder_unknown".to_owned(),
                "nodes[1].tags[0]".to_owned(),
                pb::FindingSeverity::Error
            ),
            (
                "nodes.count_mismatch".to_owned(),
                "node_count".to_owned(),
                pb::FindingSeverity::Error
            ),
            (
                "port.unused".to_owned(),
                "port_template.ports[1].name".to_owned(),
                pb::FindingSeverity::Warning
            ),
        ],
        "every problem, errors first"
    );

    // A valid lab by URI.
    let ok = client
        .validate_definition(pb::ValidateDefinitionRequest {
            source: Some(pb::validate_definition_request::Source::LabArtifactUri(
                file_uri(&fixture("lab-ports.yaml")),
            )),
            port_template: Some(pb::PortTemplate {
                ports: vec![port("serial_1"), port("vnc_1")],
            }),
            node_count: 3,
            license_affinity: vec![pb::LicenseType::Personal as i32],
        })
        .await
        .expect("validated")
        .into_inner();
    assert!(ok.valid, "{:?}", ok.findings);
    assert!(ok.findings.is_empty());
    assert_eq!(ok.placeholders, ["serial_1", "vnc_1"]);

    // Malformed YAML and invalid port names are findings too.
    let broken = client
        .validate_definition(pb::ValidateDefinitionRequest {
            source: Some(pb::validate_definition_request::Source::LabYaml(read(
                &fixture("lab-malformed.yaml"),
            ))),
            port_template: Some(pb::PortTemplate {
                ports: vec![port("Serial 1")],
            }),
            ..Default::default()
        })
        .await
        .expect("validated")
        .into_inner();
    assert!(!broken.valid);
    let codes: Vec<(&str, &str)> = broken
        .findings
        .iter()
        .map(|f| (f.code.as_str(), f.path.as_str()))
        .collect();
    assert_eq!(
        codes,
        [
            ("yaml.parse", ""),
            ("port.name_invalid", "port_template.ports[0].name")
        ]
    );

    // Licence node limits: an error with PERSONAL alone, a warning with PERSONAL among others.
    let big = big_lab(30);
    for (affinity, severity, valid) in [
        (
            vec![pb::LicenseType::Personal as i32],
            pb::FindingSeverity::Error,
            false,
        ),
        (
            vec![
                pb::LicenseType::Personal as i32,
                pb::LicenseType::Enterprise as i32,
            ],
            pb::FindingSeverity::Warning,
            true,
        ),
    ] {
        let r = client
            .validate_definition(pb::ValidateDefinitionRequest {
                source: Some(pb::validate_definition_request::Source::LabYaml(
                    big.clone(),
                )),
                port_template: Some(pb::PortTemplate { ports: vec![] }),
                node_count: 0,
                license_affinity: affinity,
            })
            .await
            .expect("validated")
            .into_inner();
        assert_eq!(r.detected_node_count, 30);
        assert_eq!(r.valid, valid);
        assert_eq!(r.findings.len(), 1, "{:?}", r.findings);
        assert_eq!(r.findings[0].code, "license.personal_node_limit");
        assert_eq!(r.findings[0].severity(), severity);
    }

    // Malformed requests are refused.
    let none = client
        .validate_definition(pb::ValidateDefinitionRequest::default())
        .await
        .expect_err("no source");
    assert_eq!(fields(&none), ["source"]);
    let bad = client
        .validate_definition(pb::ValidateDefinitionRequest {
            source: Some(pb::validate_definition_request::Source::LabArtifactUri(
                "relative/lab.yaml".into(),
            )),
            node_count: -1,
            license_affinity: vec![99],
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(
        fields(&bad),
        ["lab_artifact_uri", "node_count", "license_affinity[0]"]
    );
    let oversize = client
        .validate_definition(pb::ValidateDefinitionRequest {
            source: Some(pb::validate_definition_request::Source::LabYaml(
                "#".repeat(4 * 1024 * 1024 + 1),
            )),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_eq!(fields(&oversize), ["lab_yaml"]);
    assert_eq!(definitions_stored(&plane).await, 0);
    assert!(plane.sink.events().is_empty());
    plane.stop().await.expect("stops");
}

/// A lab of `n` unmanaged switches without placeholders.
fn big_lab(n: usize) -> String {
    let mut yaml = String::from("lab:\n  title: Big\nnodes:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - id: n{i}\n    label: sw{i}\n    node_definition: unmanaged_switch\n    tags: []\n"
        ));
    }
    yaml.push_str("links: []\n");
    yaml
}

#[tokio::test]
async fn test_large_topology_needs_a_licence_beyond_personal() {
    let (plane, mut client) = start().await;
    let dir = TempDir::new();
    let path = dir.write("big.yaml", big_lab(30));
    let mut d = definition("big-lab", &file_uri(&path));
    d.node_count = 30;
    d.port_template = None;
    d.license_affinity = vec![pb::LicenseType::Personal as i32];
    let status = create_err(&mut client, d.clone()).await;
    assert_eq!(fields(&status), ["definition.license_affinity"]);
    d.license_affinity = vec![
        pb::LicenseType::Personal as i32,
        pb::LicenseType::Enterprise as i32,
    ];
    let created = create(&mut client, d).await;
    assert_eq!(created.findings.len(), 1);
    assert_eq!(created.findings[0].code, "license.personal_node_limit");
    assert_eq!(created.findings[0].severity(), pb::FindingSeverity::Warning);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Deprecate, delete, concurrency
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_deprecate_definition_keeps_it_readable_and_emits_the_event() {
    let (plane, mut client) = start().await;
    let d = create(
        &mut client,
        definition("ccna-routing", &file_uri(&fixture("lab-ports.yaml"))),
    )
    .await
    .definition
    .expect("definition");

    let stale = client
        .deprecate_definition(pb::DeprecateDefinitionRequest {
            definition_id: d.id.clone(),
            version: "1.0.0".into(),
            reason: "replaced".into(),
            resource_version: 7,
        })
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let info = stale.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "STALE_RESOURCE_VERSION");
    assert_eq!(info.metadata["current_resource_version"], "1");

    let lineage_with_version = client
        .deprecate_definition(pb::DeprecateDefinitionRequest {
            definition_id: d.id.clone(),
            version: String::new(),
            reason: "replaced".into(),
            resource_version: 1,
        })
        .await
        .expect_err("resource_version needs a version");
    assert_eq!(fields(&lineage_with_version), ["resource_version"]);
    let hostile_reason = client
        .deprecate_definition(pb::DeprecateDefinitionRequest {
            definition_id: d.id.clone(),
            reason: "two\nlines".into(),
            ..Default::default()
        })
        .await
        .expect_err("control characters");
    assert_eq!(fields(&hostile_reason), ["reason"]);

    let deprecated = client
        .deprecate_definition(pb::DeprecateDefinitionRequest {
            definition_id: d.id.clone(),
            version: "1.0.0".into(),
            reason: "replaced by <b>ccna-v2</b>".into(),
            resource_version: 1,
        })
        .await
        .expect("deprecated")
        .into_inner()
        .definitions;
    assert_eq!(deprecated.len(), 1);
    assert_eq!(deprecated[0].status(), pb::DefinitionStatus::Deprecated);
    assert_eq!(deprecated[0].status_reason, "replaced by <b>ccna-v2</b>");
    assert_eq!(deprecated[0].resource_version, 2);
    let events = events_of(&plane, DEPRECATED);
    assert_eq!(events.len(), 1);
    assert_eq!(data(&events[0])["version"], "1.0.0");

    // Still readable and listed by default.
    assert_eq!(
        get(&mut client, &d.id, "").await.status(),
        pb::DefinitionStatus::Deprecated
    );
    let listed = list(&mut client, pb::ListDefinitionsRequest::default()).await;
    assert_eq!(listed.definitions.len(), 1);
    let active_only = list(
        &mut client,
        pb::ListDefinitionsRequest {
            statuses: vec![pb::DefinitionStatus::Active as i32],
            ..Default::default()
        },
    )
    .await;
    assert!(active_only.definitions.is_empty());

    // Idempotent: nothing changes the second time.
    let again = client
        .deprecate_definition(pb::DeprecateDefinitionRequest {
            definition_id: d.id.clone(),
            ..Default::default()
        })
        .await
        .expect("no-op")
        .into_inner();
    assert!(again.definitions.is_empty());
    assert_eq!(events_of(&plane, DEPRECATED).len(), 1);
    plane.stop().await.expect("stops");
}

#[tokio::test]
async fn test_delete_is_refused_while_an_instance_uses_the_definition() {
    let (plane, mut client) = start().await;
    let dir = TempDir::new();
    let path = dir.write("lab.yaml", read(&fixture("lab-ports.yaml")));
    let d = create(&mut client, definition("ccna-routing", &file_uri(&path)))
        .await
        .definition
        .expect("definition");
    dir.write("lab.yaml", read(&fixture("lab-ports-v2.yaml")));
    assert!(sync(&mut client, &d.id, "").await.changed);

    let instance = put_instance(&plane, &d.id, pb::InstanceState::Running).await;
    // An instance of another lineage does not matter; a terminated one neither.
    put_instance(
        &plane,
        &uuid::Uuid::new_v4().to_string(),
        pb::InstanceState::Running,
    )
    .await;
    put_instance(&plane, &d.id, pb::InstanceState::Terminated).await;

    for version in ["", "1.0.0"] {
        let refused = client
            .delete_definition(pb::DeleteDefinitionRequest {
                definition_id: d.id.clone(),
                version: version.into(),
                reason: "retired".into(),
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
            pre.violations[0].description.contains("1 instance"),
            "{pre:?}"
        );
    }
    assert_eq!(
        versions(&mut client, &d.id, false).await,
        ["1.0.1", "1.0.0"],
        "nothing deleted"
    );

    // Once the instance is TERMINATED the delete goes through.
    let mut stored: pb::LabletInstance = plane.app.get(&instance.id).await.expect("instance");
    stored.set_state(pb::InstanceState::Terminated);
    let mut m = Mutation::at(plane.app.now());
    m.update(&mut stored, ClaimChange::Keep).expect("encodes");
    plane.app.commit(m).await.expect("terminated");

    let stale = client
        .delete_definition(pb::DeleteDefinitionRequest {
            definition_id: d.id.clone(),
            version: "1.0.1".into(),
            reason: "retired".into(),
            resource_version: 5,
        })
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted);

    let deleted = client
        .delete_definition(pb::DeleteDefinitionRequest {
            definition_id: d.id.clone(),
            version: "1.0.1".into(),
            reason: "retired".into(),
            resource_version: 1,
        })
        .await
        .expect("deleted")
        .into_inner()
        .definitions;
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].status(), pb::DefinitionStatus::Deleted);
    // The latest visible version is now 1.0.0; the deleted one is still readable by version.
    assert_eq!(get(&mut client, &d.id, "").await.version, "1.0.0");
    assert_eq!(
        get(&mut client, &d.id, "1.0.1").await.status(),
        pb::DefinitionStatus::Deleted
    );
    assert_eq!(versions(&mut client, &d.id, false).await, ["1.0.0"]);
    assert_eq!(versions(&mut client, &d.id, true).await, ["1.0.1", "1.0.0"]);
    // A deleted version cannot be deprecated.
    let refused = client
        .deprecate_definition(pb::DeprecateDefinitionRequest {
            definition_id: d.id.clone(),
            version: "1.0.1".into(),
            ..Default::default()
        })
        .await
        .expect_err("deleted");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Delete the rest of the lineage: hidden from Get and List, kept in the store.
    let rest = client
        .delete_definition(pb::DeleteDefinitionRequest {
            definition_id: d.id.clone(),
            reason: "retired".into(),
            ..Default::default()
        })
        .await
        .expect("deleted")
        .into_inner()
        .definitions;
    assert_eq!(rest.len(), 1, "only 1.0.0 changed");
    let gone = client
        .get_definition(pb::GetDefinitionRequest {
            definition_id: d.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("hidden");
    assert_eq!(gone.code(), Code::NotFound);
    assert!(
        list(&mut client, pb::ListDefinitionsRequest::default())
            .await
            .definitions
            .is_empty()
    );
    let deleted_list = list(
        &mut client,
        pb::ListDefinitionsRequest {
            statuses: vec![pb::DefinitionStatus::Deleted as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(deleted_list.definitions.len(), 1);
    assert_eq!(deleted_list.definitions[0].version, "1.0.1");
    assert!(versions(&mut client, &d.id, false).await.is_empty());
    assert_eq!(definitions_stored(&plane).await, 2);
    // The name stays bound to its lineage.
    let reuse = create_err(&mut client, definition("ccna-routing", &file_uri(&path))).await;
    assert_eq!(reuse.code(), Code::AlreadyExists);
    let unknown = client
        .delete_definition(pb::DeleteDefinitionRequest {
            definition_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// Paging
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_list_definitions_pages_by_name_without_duplicates() {
    let (plane, mut client) = start().await;
    let dir = TempDir::new();
    let shared = dir.write("lab.yaml", read(&fixture("lab-ports.yaml")));
    let names = [
        "echo", "alpha", "golf", "charlie", "bravo", "foxtrot", "delta",
    ];
    let mut ids = std::collections::HashMap::new();
    for name in names {
        let mut d = definition(name, &file_uri(&shared));
        if name == "golf" {
            d.license_affinity = vec![pb::LicenseType::Enterprise as i32];
        }
        let created = create(&mut client, d).await.definition.expect("definition");
        ids.insert(name, created.id);
    }
    // Give "charlie" a second version.
    let own = dir.write("charlie.yaml", read(&fixture("lab-ports.yaml")));
    let charlie = ids["charlie"].clone();
    client
        .delete_definition(pb::DeleteDefinitionRequest {
            definition_id: ids["delta"].clone(),
            reason: "gone".into(),
            ..Default::default()
        })
        .await
        .expect("deleted");
    // Sync charlie from a changed file at a new location.
    std::fs::write(&own, read(&fixture("lab-ports-v2.yaml"))).expect("written");
    let synced = client
        .sync_definition(pb::SyncDefinitionRequest {
            definition_id: charlie.clone(),
            new_version: String::new(),
            lab_artifact_uri: file_uri(&own),
        })
        .await
        .expect("synced")
        .into_inner();
    assert!(synced.changed);

    // Latest per lineage, by name, three per page.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(
            &mut client,
            pb::ListDefinitionsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        pages += 1;
        assert_eq!(page.total_size, 6, "delta is deleted");
        assert!(page.definitions.len() <= 3);
        seen.extend(
            page.definitions
                .iter()
                .map(|d| (d.name.clone(), d.version.clone())),
        );
        assert!(page.definitions.iter().all(|d| d.lab_yaml.is_empty()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 2);
    let expected: Vec<(String, String)> = [
        ("alpha", "1.0.0"),
        ("bravo", "1.0.0"),
        ("charlie", "1.0.1"),
        ("echo", "1.0.0"),
        ("foxtrot", "1.0.0"),
        ("golf", "1.0.0"),
    ]
    .iter()
    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(seen, expected);

    // Every version, two per page: charlie's versions newest first.
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(
            &mut client,
            pb::ListDefinitionsRequest {
                page_size: 2,
                page_token: token.clone(),
                all_versions: true,
                ..Default::default()
            },
        )
        .await;
        all.extend(
            page.definitions
                .iter()
                .map(|d| format!("{}@{}", d.name, d.version)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        all,
        [
            "alpha@1.0.0",
            "bravo@1.0.0",
            "charlie@1.0.1",
            "charlie@1.0.0",
            "echo@1.0.0",
            "foxtrot@1.0.0",
            "golf@1.0.0"
        ]
    );

    // Filters.
    let filtered = list(
        &mut client,
        pb::ListDefinitionsRequest {
            name_contains: "O".into(),
            license_type: pb::LicenseType::Personal as i32,
            ..Default::default()
        },
    )
    .await;
    let names: Vec<&str> = filtered
        .definitions
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["bravo", "echo", "foxtrot"],
        "golf is ENTERPRISE only"
    );

    // A token is bound to its filters and its list call.
    let first = list(
        &mut client,
        pb::ListDefinitionsRequest {
            page_size: 1,
            ..Default::default()
        },
    )
    .await;
    let changed = client
        .list_definitions(pb::ListDefinitionsRequest {
            page_size: 1,
            page_token: first.next_page_token.clone(),
            all_versions: true,
            ..Default::default()
        })
        .await
        .expect_err("filters changed");
    assert_eq!(fields(&changed), ["page_token"]);
    let wrong_call = client
        .list_definition_versions(pb::ListDefinitionVersionsRequest {
            definition_id: charlie.clone(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .expect_err("token of another call");
    assert_eq!(fields(&wrong_call), ["page_token"]);
    let bad = client
        .list_definitions(pb::ListDefinitionsRequest {
            page_size: -1,
            statuses: vec![0, 42],
            license_type: 99,
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(
        fields(&bad),
        ["page_size", "statuses[0]", "statuses[1]", "license_type"]
    );

    // ListDefinitionVersions pages one by one.
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_definition_versions(pb::ListDefinitionVersionsRequest {
                definition_id: charlie.clone(),
                page_size: 1,
                page_token: token.clone(),
                include_deleted: false,
            })
            .await
            .expect("listed")
            .into_inner();
        got.extend(page.definitions.into_iter().map(|d| d.version));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(got, ["1.0.1", "1.0.0"]);
    let unknown = client
        .list_definition_versions(pb::ListDefinitionVersionsRequest {
            definition_id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("unknown lineage");
    assert_eq!(unknown.code(), Code::NotFound);
    plane.stop().await.expect("stops");
}

// ---------------------------------------------------------------------------------------------
// S3 (moto)
// ---------------------------------------------------------------------------------------------

async fn s3_client(moto: &MotoServer) -> aws_sdk_s3::Client {
    let credentials = aws_sdk_s3::config::Credentials::new(
        TEST_ACCESS_KEY_ID,
        TEST_SECRET_ACCESS_KEY,
        None,
        None,
        "ccm-tests",
    );
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(TEST_REGION))
        .endpoint_url(moto.endpoint())
        .credentials_provider(credentials)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

async fn put_object(client: &aws_sdk_s3::Client, bucket: &str, key: &str, body: &str) {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from(
            body.as_bytes().to_vec(),
        ))
        .send()
        .await
        .expect("object stored in moto");
}

#[tokio::test]
async fn test_create_and_sync_definition_from_s3_against_moto() {
    let moto = MotoServer::start().expect("moto_server starts (scripts/test installs it)");
    let s3 = s3_client(&moto).await;
    s3.create_bucket()
        .bucket("ccm-labs")
        .send()
        .await
        .expect("bucket created");
    let v1 = read(&fixture("lab-ports.yaml"));
    put_object(&s3, "ccm-labs", "ccna/routing.yaml", &v1).await;

    let fetcher = DefaultFetcher::new(FetcherConfig {
        s3: S3Config {
            region: Some(TEST_REGION.into()),
            endpoint_url: Some(moto.endpoint().to_owned()),
            force_path_style: true,
            credentials: Some(StaticCredentials {
                access_key_id: TEST_ACCESS_KEY_ID.into(),
                secret_access_key: TEST_SECRET_ACCESS_KEY.into(),
                session_token: None,
            }),
        },
        ..FetcherConfig::default()
    })
    .expect("fetcher");
    let plane = TestPlane::start_with(TestOptions {
        fetcher: Some(Arc::new(fetcher)),
        ..TestOptions::default()
    })
    .await
    .expect("plane starts");
    let mut client = DefinitionServiceClient::new(plane.channel().await.expect("connects"));

    let d = create(
        &mut client,
        definition("ccna-routing", "s3://ccm-labs/ccna/routing.yaml"),
    )
    .await
    .definition
    .expect("definition");
    assert_eq!(
        d.lab_yaml_hash,
        ccm_core::version::content_hash(v1.as_bytes())
    );
    assert_eq!(d.lab_artifact_uri, "s3://ccm-labs/ccna/routing.yaml");

    // A missing object.
    let missing = create_err(
        &mut client,
        definition("other-lab", "s3://ccm-labs/ccna/missing.yaml"),
    )
    .await;
    assert_eq!(missing.code(), Code::FailedPrecondition, "{missing:?}");

    // The object changes in S3: sync makes 1.0.1.
    assert!(!sync(&mut client, &d.id, "").await.changed);
    let v2 = read(&fixture("lab-ports-v2.yaml"));
    put_object(&s3, "ccm-labs", "ccna/routing.yaml", &v2).await;
    let synced = sync(&mut client, &d.id, "").await;
    assert!(synced.changed);
    let new = synced.definition.expect("new version");
    assert_eq!(new.version, "1.0.1");
    assert_eq!(
        new.lab_yaml_hash,
        ccm_core::version::content_hash(v2.as_bytes())
    );
    assert_eq!(events_of(&plane, VERSION_CREATED).len(), 1);
    plane.stop().await.expect("stops");
}
