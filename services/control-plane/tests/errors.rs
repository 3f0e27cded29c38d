//! `ApiError` → gRPC status, decoded by a real client: every kind produces its code and
//! `google.rpc` details, and every `CoreError` variant maps as documented.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use ccm_control_plane::error::{
    ApiError, ERROR_DOMAIN, INTERNAL_MESSAGE, PRECONDITION_FENCE, PRECONDITION_STATE,
    REASON_STALE_LEADER_EPOCH, WWW_AUTHENTICATE_METADATA,
};
use ccm_proto::v1::definition_service_client::DefinitionServiceClient;
use common::{TestServer, core_errors, get};
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt as _};

async fn status_of(
    client: &mut DefinitionServiceClient<tonic::transport::Channel>,
    kind: &str,
) -> tonic::Status {
    client
        .get_definition(get(&format!("error:{kind}")))
        .await
        .expect_err("the handler fails")
}

fn decoded(status: &tonic::Status) -> ErrorDetails {
    status
        .check_error_details()
        .expect("details decode as google.rpc.Status")
}

fn info_metadata(details: &ErrorDetails) -> HashMap<String, String> {
    details
        .error_info()
        .map(|i| i.metadata.clone())
        .unwrap_or_default()
}

fn reason(details: &ErrorDetails) -> String {
    let info = details
        .error_info()
        .expect("every ccm error carries ErrorInfo");
    assert_eq!(info.domain, ERROR_DOMAIN);
    info.reason.clone()
}

#[tokio::test]
async fn every_api_error_kind_has_its_code_and_details_on_the_wire() {
    let server = TestServer::start().await;
    let mut client = DefinitionServiceClient::new(server.channel().await);

    // INVALID_ARGUMENT: every field violation, in order.
    let s = status_of(&mut client, "invalid").await;
    assert_eq!(s.code(), Code::InvalidArgument);
    let d = decoded(&s);
    let fields: Vec<(String, String)> = d
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|v| (v.field.clone(), v.description.clone()))
        .collect();
    assert_eq!(
        fields,
        [
            ("definition.name".to_owned(), "must not be empty".to_owned()),
            (
                "definition.resource_requirements.cpu_cores".to_owned(),
                "must be at least 1, got 0".to_owned()
            ),
        ]
    );
    assert_eq!(reason(&d), "INVALID_ARGUMENT");
    assert!(s.message().contains("definition.name: must not be empty"));

    // NOT_FOUND with ResourceInfo.
    let s = status_of(&mut client, "not_found").await;
    assert_eq!(s.code(), Code::NotFound);
    let d = decoded(&s);
    let info = d.resource_info().expect("ResourceInfo");
    assert_eq!(
        (info.resource_type.as_str(), info.resource_name.as_str()),
        ("instance", "i-123")
    );
    assert_eq!(reason(&d), "NOT_FOUND");

    // ALREADY_EXISTS with ResourceInfo.
    let s = status_of(&mut client, "already_exists").await;
    assert_eq!(s.code(), Code::AlreadyExists);
    let d = decoded(&s);
    assert_eq!(
        d.resource_info().map(|r| r.resource_name.as_str()),
        Some("metal-personal")
    );

    // ABORTED: the current version is in ErrorInfo.
    let s = status_of(&mut client, "stale").await;
    assert_eq!(s.code(), Code::Aborted);
    let d = decoded(&s);
    assert_eq!(reason(&d), "STALE_RESOURCE_VERSION");
    let meta = info_metadata(&d);
    assert_eq!(
        meta.get("current_resource_version").map(String::as_str),
        Some("5")
    );
    assert_eq!(
        meta.get("expected_resource_version").map(String::as_str),
        Some("3")
    );
    assert_eq!(
        d.resource_info().map(|r| r.resource_name.as_str()),
        Some("w-1")
    );

    // FAILED_PRECONDITION, illegal transition: a STATE violation naming from and to.
    let s = status_of(&mut client, "transition").await;
    assert_eq!(s.code(), Code::FailedPrecondition);
    let d = decoded(&s);
    let violations = &d
        .precondition_failure()
        .expect("PreconditionFailure")
        .violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].r#type, PRECONDITION_STATE);
    assert_eq!(violations[0].subject, "instance");
    assert!(violations[0].description.contains("INSTANCE_STATE_RUNNING"));
    assert!(violations[0].description.contains("INSTANCE_STATE_PENDING"));
    let meta = info_metadata(&d);
    assert_eq!(
        meta.get("from").map(String::as_str),
        Some("INSTANCE_STATE_RUNNING")
    );
    assert_eq!(
        meta.get("to").map(String::as_str),
        Some("INSTANCE_STATE_PENDING")
    );
    assert_eq!(reason(&d), "INVALID_STATE_TRANSITION");

    // FAILED_PRECONDITION, stale fence: a FENCE violation, reason STALE_LEADER_EPOCH.
    let s = status_of(&mut client, "fence").await;
    assert_eq!(s.code(), Code::FailedPrecondition);
    let d = decoded(&s);
    let violations = &d
        .precondition_failure()
        .expect("PreconditionFailure")
        .violations;
    assert_eq!(violations[0].r#type, PRECONDITION_FENCE);
    assert_eq!(violations[0].subject, "scheduler");
    assert_eq!(reason(&d), REASON_STALE_LEADER_EPOCH);
    let meta = info_metadata(&d);
    assert_eq!(meta.get("current_epoch").map(String::as_str), Some("7"));
    assert_eq!(meta.get("presented_epoch").map(String::as_str), Some("4"));

    // RESOURCE_EXHAUSTED with QuotaFailure.
    let s = status_of(&mut client, "ports").await;
    assert_eq!(s.code(), Code::ResourceExhausted);
    let d = decoded(&s);
    let quota = &d.quota_failure().expect("QuotaFailure").violations;
    assert_eq!(quota.len(), 1);
    assert_eq!(quota[0].subject, "port range 2000-2001");
    assert!(quota[0].description.contains("3 ports requested, 2 free"));
    assert_eq!(reason(&d), "PORTS_EXHAUSTED");

    // PERMISSION_DENIED.
    let s = status_of(&mut client, "denied").await;
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(reason(&decoded(&s)), "PERMISSION_DENIED");
    assert!(s.message().contains("requires one of roles: admin"));

    // UNAUTHENTICATED with the WWW-Authenticate challenge in metadata.
    let s = status_of(&mut client, "unauthenticated").await;
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(
        s.metadata()
            .get(WWW_AUTHENTICATE_METADATA)
            .and_then(|v| v.to_str().ok()),
        Some(r#"Bearer error="invalid_token", error_description="expired""#)
    );

    // UNAVAILABLE (not leader) with RetryInfo and the leader's id.
    let s = status_of(&mut client, "not_leader").await;
    assert_eq!(s.code(), Code::Unavailable);
    let d = decoded(&s);
    assert_eq!(
        d.retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(reason(&d), "NOT_LEADER");
    assert_eq!(
        info_metadata(&d).get("leader").map(String::as_str),
        Some("replica-b")
    );

    // INTERNAL: a generic message with the request id; the cause is not sent.
    let mut request = tonic::Request::new(get("error:internal"));
    request
        .metadata_mut()
        .insert("x-request-id", "int-req-1".parse().expect("ascii"));
    let s = client.get_definition(request).await.expect_err("internal");
    assert_eq!(s.code(), Code::Internal);
    assert_eq!(
        s.message(),
        format!("{INTERNAL_MESSAGE} (request id int-req-1)")
    );
    assert!(!s.message().contains("disk on fire"));
    let d = decoded(&s);
    assert_eq!(reason(&d), "INTERNAL");
    assert_eq!(
        d.request_info().map(|r| r.request_id.as_str()),
        Some("int-req-1")
    );
    assert!(d.debug_info().is_none(), "no debug info leaks");

    server.stop().await.expect("clean stop");
}

#[tokio::test]
async fn every_core_error_variant_maps_as_documented_on_the_wire() {
    let server = TestServer::start().await;
    let mut client = DefinitionServiceClient::new(server.channel().await);
    let all = core_errors();
    assert_eq!(all.len(), 10, "one value per CoreError variant");
    for (name, _) in &all {
        let s = status_of(&mut client, &format!("core:{name}")).await;
        let d = decoded(&s);
        let bad_fields: Vec<String> = d
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        match *name {
            "InvalidInstanceTransition" | "InvalidWorkerTransition" => {
                assert_eq!(s.code(), Code::FailedPrecondition, "{name}");
                let v = &d
                    .precondition_failure()
                    .expect("PreconditionFailure")
                    .violations[0];
                assert_eq!(v.r#type, PRECONDITION_STATE, "{name}");
                let meta = info_metadata(&d);
                if *name == "InvalidWorkerTransition" {
                    assert_eq!(v.subject, "worker");
                    assert_eq!(
                        meta.get("from").map(String::as_str),
                        Some("WORKER_STATE_STOPPED")
                    );
                    assert_eq!(
                        meta.get("to").map(String::as_str),
                        Some("WORKER_STATE_DRAINING")
                    );
                } else {
                    assert_eq!(v.subject, "instance");
                    assert_eq!(
                        meta.get("from").map(String::as_str),
                        Some("INSTANCE_STATE_TERMINATED")
                    );
                }
            }
            "PortsExhausted" => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{name}");
                let q = &d.quota_failure().expect("QuotaFailure").violations[0];
                assert_eq!(q.subject, "port range 2000-2009");
                let meta = info_metadata(&d);
                assert_eq!(meta.get("requested").map(String::as_str), Some("12"));
                assert_eq!(meta.get("free").map(String::as_str), Some("10"));
            }
            "InvalidPortRange" => {
                assert_eq!(s.code(), Code::InvalidArgument);
                assert_eq!(bad_fields, ["port_range"]);
            }
            "InvalidLabYaml" | "UnknownPlaceholder" => {
                assert_eq!(s.code(), Code::InvalidArgument, "{name}");
                assert_eq!(bad_fields, ["lab_yaml"], "{name}");
                if *name == "UnknownPlaceholder" {
                    let desc =
                        &d.bad_request().expect("BadRequest").field_violations[0].description;
                    assert!(desc.contains("${PORT_SERIAL_9}") && desc.contains("nodes[1].tags[0]"));
                }
            }
            "PortWithoutPlaceholder" => {
                assert_eq!(s.code(), Code::InvalidArgument);
                assert_eq!(bad_fields, ["port_template.ports"]);
                let desc = &d.bad_request().expect("BadRequest").field_violations[0].description;
                assert!(
                    desc.contains("vnc_1") && desc.contains("${PORT_VNC_1}"),
                    "{desc}"
                );
            }
            "PortNotAllocated" => {
                assert_eq!(s.code(), Code::InvalidArgument);
                assert_eq!(bad_fields, ["allocated_ports"]);
            }
            "InvalidVersion" => {
                assert_eq!(s.code(), Code::InvalidArgument);
                assert_eq!(bad_fields, ["version"]);
            }
            "Invalid" => {
                assert_eq!(s.code(), Code::InvalidArgument);
                assert_eq!(bad_fields, ["resource_requirements.cpu_cores"]);
                let desc = &d.bad_request().expect("BadRequest").field_violations[0].description;
                assert_eq!(desc, "must be at least 1");
            }
            other => panic!("variant {other} is not checked"),
        }
    }
    server.stop().await.expect("clean stop");
}

#[test]
fn conversion_outside_a_call_has_no_request_info() {
    let status = ApiError::not_found("worker", "w-9").into_status();
    assert_eq!(status.code(), Code::NotFound);
    let d = status.get_error_details();
    assert!(d.request_info().is_none());
    assert_eq!(d.error_info().map(|i| i.reason.as_str()), Some("NOT_FOUND"));
    assert_eq!(
        ApiError::internal_msg("broken invariant")
            .into_status()
            .message(),
        INTERNAL_MESSAGE
    );
}

#[test]
fn helpers_prefix_paths_and_name_resources() {
    let err = ApiError::invalid_argument("cpu_cores", "must be at least 1")
        .under("definition.resource_requirements");
    assert_eq!(
        err.field_violations()[0].field,
        "definition.resource_requirements.cpu_cores"
    );
    let err = ApiError::from(ccm_core::CoreError::InvalidInstanceTransition {
        from: ccm_core::model::InstanceState::Running,
        to: ccm_core::model::InstanceState::Pending,
        why: "no".into(),
    })
    .on_resource("instance", "i-1");
    let status = err.into_status();
    assert_eq!(
        status
            .get_error_details()
            .resource_info()
            .map(|r| r.resource_name.clone()),
        Some("i-1".to_owned())
    );
    assert_eq!(
        ApiError::not_leader("controller", None, None).code(),
        Code::Unavailable
    );
    let status = ApiError::not_leader("controller", None, None).into_status();
    assert_eq!(
        status
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay),
        Some(ccm_control_plane::error::DEFAULT_NOT_LEADER_RETRY)
    );
}
