//! The auth layer in front of real tonic servers on loopback, called by real tonic clients with
//! real tokens from the issuer process.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ccm_auth::{AuthLayer, WWW_AUTHENTICATE};
use ccm_proto::v1::instance_service_client::InstanceServiceClient;
use ccm_proto::v1::template_service_client::TemplateServiceClient;
use ccm_proto::v1::{
    CreateTemplateRequest, DeleteTemplateRequest, GetInstanceRequest, GetTemplateRequest,
    ListTemplatesRequest, UpdateTemplateRequest, WorkerTemplate,
};
use common::{
    ECHO_OWN_ONLY, ECHO_ROLES, ECHO_SUBJECT, authenticator, call_path, issuer, meta, serve_echo,
    serve_templates,
};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tower::{Layer, Service, ServiceExt};

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}")).expect("ascii"),
        );
    }
    request
}

/// Calls the five TemplateService RPCs; returns each outcome (Ok(description) or the status).
async fn call_templates(
    channel: Channel,
    token: Option<&str>,
) -> Vec<(&'static str, Result<String, Status>)> {
    let mut client = TemplateServiceClient::new(channel);
    let tpl = || WorkerTemplate {
        name: "small".into(),
        ..Default::default()
    };
    let description = |t: Option<WorkerTemplate>| t.map(|t| t.description).unwrap_or_default();
    vec![
        (
            "CreateTemplate",
            client
                .create_template(with_token(
                    CreateTemplateRequest {
                        template: Some(tpl()),
                    },
                    token,
                ))
                .await
                .map(|r| description(r.into_inner().template)),
        ),
        (
            "GetTemplate",
            client
                .get_template(with_token(
                    GetTemplateRequest {
                        template_name: "small".into(),
                    },
                    token,
                ))
                .await
                .map(|r| description(r.into_inner().template)),
        ),
        (
            "ListTemplates",
            client
                .list_templates(with_token(ListTemplatesRequest::default(), token))
                .await
                .map(|r| description(r.into_inner().templates.into_iter().next())),
        ),
        (
            "UpdateTemplate",
            client
                .update_template(with_token(
                    UpdateTemplateRequest {
                        template: Some(tpl()),
                        update_mask: None,
                    },
                    token,
                ))
                .await
                .map(|r| description(r.into_inner().template)),
        ),
        (
            "DeleteTemplate",
            client
                .delete_template(with_token(
                    DeleteTemplateRequest {
                        template_name: "small".into(),
                        resource_version: 0,
                    },
                    token,
                ))
                .await
                .map(|r| description(r.into_inner().template)),
        ),
    ]
}

#[tokio::test]
async fn template_service_follows_its_authz_table() {
    let issuer = issuer().await;
    let server = serve_templates(AuthLayer::new(authenticator(&issuer))).await;
    let readers = "requires one of roles: admin, manager, user, viewer, service";
    let admins = "requires one of roles: admin";
    // Per principal: may read (Get/List), may write (Create/Update/Delete).
    let table = [
        ("admin", true, true),
        ("manager", true, false),
        ("user", true, false),
        ("viewer", true, false),
        ("assessment", false, false),
        ("guest", false, false),
        ("scheduler", true, false),
    ];
    for (name, read, write) in table {
        let token = if name == "scheduler" {
            issuer.service_token(name).await
        } else {
            issuer.token_for(name).await
        }
        .expect("token");
        let username = if name == "scheduler" {
            "service-account-scheduler".to_owned()
        } else {
            name.to_owned()
        };
        let sub = issuer.subject_of(name).expect("sub");
        for (rpc, outcome) in call_templates(server.channel().await, Some(&token)).await {
            let allowed = if rpc.ends_with("Template") && !rpc.starts_with("Get") {
                write
            } else {
                read
            };
            match outcome {
                Ok(description) => {
                    assert!(allowed, "{name} {rpc} should be denied");
                    assert_eq!(
                        description,
                        format!("seen by {sub} ({username}) own_only=false"),
                        "{name} {rpc}"
                    );
                }
                Err(status) => {
                    assert!(!allowed, "{name} {rpc} should be allowed: {status:?}");
                    assert_eq!(status.code(), Code::PermissionDenied, "{name} {rpc}");
                    let expected = if rpc == "GetTemplate" || rpc == "ListTemplates" {
                        readers
                    } else {
                        admins
                    };
                    assert_eq!(status.message(), expected, "{name} {rpc}");
                }
            }
        }
    }
}

#[tokio::test]
async fn bad_or_missing_tokens_answer_unauthenticated_with_a_challenge() {
    let issuer = issuer().await;
    let server = serve_templates(AuthLayer::new(authenticator(&issuer))).await;
    let expired = issuer.expired_token_for("admin").await.expect("token");
    let forged = issuer
        .forged_signer()
        .token_for("admin")
        .await
        .expect("forged");
    let wrong_aud = issuer
        .token_with_audience("admin", "elsewhere")
        .await
        .expect("token");
    let invalid = |d: &str| {
        format!("Bearer realm=\"ccm\", error=\"invalid_token\", error_description=\"{d}\"")
    };
    let cases = [
        (
            None,
            "Bearer realm=\"ccm\", error_description=\"missing bearer token\"".to_owned(),
        ),
        (Some("garbage"), invalid("malformed token")),
        (Some(expired.as_str()), invalid("token expired")),
        (Some(forged.as_str()), invalid("invalid token signature")),
        (Some(wrong_aud.as_str()), invalid("wrong token audience")),
    ];
    for (token, challenge) in cases {
        for (rpc, outcome) in call_templates(server.channel().await, token).await {
            let status = outcome.expect_err(rpc);
            assert_eq!(status.code(), Code::Unauthenticated, "{rpc} {challenge}");
            assert_eq!(status.message(), challenge);
            assert_eq!(
                status
                    .metadata()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok()),
                Some(challenge.as_str())
            );
        }
    }
}

#[tokio::test]
async fn health_and_reflection_are_public() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::{v1, v1alpha};

    let issuer = issuer().await;
    let server = serve_templates(AuthLayer::new(authenticator(&issuer))).await;
    for token in [None, Some("garbage")] {
        let mut health = HealthClient::new(server.channel().await);
        let response = health
            .check(with_token(
                HealthCheckRequest {
                    service: "ccm.v1.TemplateService".into(),
                },
                token,
            ))
            .await
            .expect("health is public");
        assert_eq!(response.into_inner().status(), ServingStatus::Serving);

        let mut reflection =
            v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut stream = reflection
            .server_reflection_info(with_token(tokio_stream::iter([request]), token))
            .await
            .expect("reflection v1 is public")
            .into_inner();
        let reply = stream.message().await.expect("reply").expect("one reply");
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            reply.message_response
        else {
            panic!("unexpected reflection reply {reply:?}");
        };
        assert!(
            list.service
                .iter()
                .any(|s| s.name == "ccm.v1.TemplateService"),
            "{list:?}"
        );

        let mut alpha =
            v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut stream = alpha
            .server_reflection_info(with_token(tokio_stream::iter([request]), token))
            .await
            .expect("reflection v1alpha is public")
            .into_inner();
        assert!(stream.message().await.expect("reply").is_some());
    }
    // Nothing public needed a key.
    assert_eq!(issuer.stats().await.expect("stats").certs, 0);
}

#[tokio::test]
async fn methods_without_a_rule_are_denied() {
    let issuer = issuer().await;
    let admin = issuer.token_for("admin").await.expect("token");
    let server = serve_templates(AuthLayer::new(authenticator(&issuer))).await;
    for path in [
        "/ccm.v1.TemplateService/DropAllTemplates",
        "/ccm.v1.NoSuchService/Get",
        "/other.pkg.Service/Method",
        "/grpc.health.v1.HealthX/Check",
    ] {
        let status = call_path(server.channel().await, path, Some(&admin))
            .await
            .expect_err(path);
        assert_eq!(status.code(), Code::PermissionDenied, "{path}");
        assert_eq!(
            status.message(),
            format!("method {path} has no authorization rule")
        );
        // Authentication still comes first.
        let status = call_path(server.channel().await, path, None)
            .await
            .expect_err(path);
        assert_eq!(status.code(), Code::Unauthenticated, "{path}");
    }
    // The same in disabled mode: no rule, no call.
    let open = serve_templates(AuthLayer::disabled()).await;
    let status = call_path(
        open.channel().await,
        "/ccm.v1.TemplateService/DropAllTemplates",
        None,
    )
    .await
    .expect_err("denied");
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn owner_scoping_reaches_the_handler_through_extensions() {
    let issuer = issuer().await;
    let server = serve_echo(AuthLayer::new(authenticator(&issuer))).await;
    // (principal, path, expected own_only or None for denied)
    let cases = [
        ("user", "/ccm.v1.InstanceService/GetInstance", Some(true)),
        ("user", "/ccm.v1.InstanceService/CreateInstance", Some(true)),
        (
            "viewer",
            "/ccm.v1.InstanceService/ListInstances",
            Some(true),
        ),
        ("viewer", "/ccm.v1.InstanceService/CreateInstance", None),
        (
            "manager",
            "/ccm.v1.InstanceService/StopInstance",
            Some(false),
        ),
        (
            "admin",
            "/ccm.v1.InstanceService/TerminateInstance",
            Some(false),
        ),
        (
            "scheduler",
            "/ccm.v1.InstanceService/GetInstance",
            Some(false),
        ),
        ("scheduler", "/ccm.v1.InstanceService/StartInstance", None),
        ("user", "/ccm.v1.EventService/WatchEvents", Some(true)),
        ("user", "/ccm.v1.TemplateService/GetTemplate", Some(false)),
        ("guest", "/ccm.v1.InstanceService/ListInstances", None),
    ];
    for (name, path, expected) in cases {
        let token = if name == "scheduler" {
            issuer.service_token(name).await
        } else {
            issuer.token_for(name).await
        }
        .expect("token");
        let outcome = call_path(server.channel().await, path, Some(&token)).await;
        match (expected, outcome) {
            (Some(own_only), Ok(response)) => {
                assert_eq!(
                    meta(&response, ECHO_OWN_ONLY),
                    own_only.to_string(),
                    "{name} {path}"
                );
                assert_eq!(
                    meta(&response, ECHO_SUBJECT),
                    issuer.subject_of(name).expect("sub"),
                    "{name} {path}"
                );
            }
            (None, Err(status)) => {
                assert_eq!(status.code(), Code::PermissionDenied, "{name} {path}");
            }
            (expected, outcome) => panic!("{name} {path}: expected {expected:?}, got {outcome:?}"),
        }
    }

    // A generated client works the same way (the echo's empty message decodes as a default
    // response); the owner scoping shows in the response metadata.
    let token = issuer.token_for("user").await.expect("token");
    let mut client = InstanceServiceClient::new(server.channel().await);
    let response = client
        .get_instance(with_token(
            GetInstanceRequest {
                instance_id: "i-1".into(),
            },
            Some(&token),
        ))
        .await
        .expect("allowed");
    assert_eq!(meta(&response, ECHO_OWN_ONLY), "true");
    assert_eq!(meta(&response, ECHO_ROLES), "user");
}

#[tokio::test]
async fn disabled_mode_admits_everyone_as_anonymous_admin() {
    let templates = serve_templates(AuthLayer::disabled()).await;
    for token in [None, Some("garbage")] {
        for (rpc, outcome) in call_templates(templates.channel().await, token).await {
            assert_eq!(
                outcome.unwrap_or_else(|s| panic!("{rpc}: {s:?}")),
                "seen by anonymous (anonymous) own_only=false"
            );
        }
    }
    let echo = serve_echo(AuthLayer::disabled()).await;
    for path in [
        "/ccm.v1.WorkerService/DrainWorker",
        "/ccm.v1.InternalService/CommitPlacements",
        "/ccm.v1.InstanceService/GetInstance",
        "/ccm.v1.EventService/IngestEvent",
    ] {
        let response = call_path(echo.channel().await, path, None)
            .await
            .unwrap_or_else(|s| panic!("{path}: {s:?}"));
        assert_eq!(meta(&response, ECHO_SUBJECT), "anonymous");
        assert_eq!(meta(&response, ECHO_OWN_ONLY), "false");
        assert_eq!(meta(&response, ECHO_ROLES), "admin,service");
    }
    assert!(AuthLayer::disabled().is_disabled());
}

#[tokio::test]
async fn rejections_are_trailers_only_grpc_responses_and_never_reach_the_service() {
    let issuer = issuer().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = tower::service_fn(move |_request: http::Request<String>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, std::convert::Infallible>(http::Response::new(String::from("inner"))) }
    });
    let mut service = AuthLayer::new(authenticator(&issuer)).layer(inner);
    let request = |token: Option<&str>, path: &str| {
        let mut builder = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc");
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.body(String::new()).expect("request")
    };

    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request(None, "/ccm.v1.TemplateService/GetTemplate"))
        .await
        .expect("response");
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    assert_eq!(response.headers()["grpc-status"], "16");
    assert!(response.headers().contains_key(WWW_AUTHENTICATE));
    assert!(response.body().is_empty());

    let viewer = issuer.token_for("viewer").await.expect("token");
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request(
            Some(&viewer),
            "/ccm.v1.TemplateService/CreateTemplate",
        ))
        .await
        .expect("response");
    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "7");
    // grpc-message is percent-encoded on the wire (gRPC over HTTP/2 spec).
    assert_eq!(
        response.headers()["grpc-message"],
        "requires%20one%20of%20roles:%20admin"
    );
    assert!(!response.headers().contains_key(WWW_AUTHENTICATE));
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Non-ASCII header bytes are malformed, not a panic.
    let mut bad = request(None, "/ccm.v1.TemplateService/GetTemplate");
    bad.headers_mut().insert(
        "authorization",
        http::HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("opaque bytes"),
    );
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(bad)
        .await
        .expect("response");
    assert_eq!(response.headers()["grpc-status"], "16");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let response = service
        .ready()
        .await
        .expect("ready")
        .call(request(
            Some(&viewer),
            "/ccm.v1.TemplateService/GetTemplate",
        ))
        .await
        .expect("response");
    assert_eq!(response.body(), "inner");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn rejections_carry_google_rpc_details_with_the_request_id() {
    use tonic_types::StatusExt as _;
    let issuer = issuer().await;
    let server = serve_templates(AuthLayer::new(authenticator(&issuer))).await;
    let mut client = TemplateServiceClient::new(server.channel().await);

    // No token: UNAUTHENTICATED, ErrorInfo with the cause, RequestInfo with the request id.
    let mut request = with_token(ListTemplatesRequest::default(), None);
    request
        .metadata_mut()
        .insert("x-request-id", MetadataValue::from_static("req-auth-1"));
    let status = client.list_templates(request).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let details = status.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "UNAUTHENTICATED");
    assert_eq!(info.domain, ccm_auth::ERROR_DOMAIN);
    assert_eq!(
        info.metadata.get("method").map(String::as_str),
        Some("/ccm.v1.TemplateService/ListTemplates")
    );
    assert_eq!(
        info.metadata.get("cause").map(String::as_str),
        Some("missing bearer token")
    );
    assert_eq!(
        details.request_info().map(|r| r.request_id.as_str()),
        Some("req-auth-1")
    );
    assert!(
        status.metadata().get(WWW_AUTHENTICATE).is_some(),
        "the challenge is kept"
    );

    // Expired token: the cause says so.
    let expired = issuer.expired_token_for("admin").await.expect("token");
    let status = client
        .list_templates(with_token(ListTemplatesRequest::default(), Some(&expired)))
        .await
        .expect_err("expired");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("cause").map(String::as_str),
        Some("token expired")
    );
    assert!(
        status.get_details_request_info().is_none(),
        "no x-request-id header, no RequestInfo"
    );

    // A role that may not write: PERMISSION_DENIED with ErrorInfo.
    let viewer = issuer.token_for("viewer").await.expect("token");
    let mut request = with_token(
        DeleteTemplateRequest {
            template_name: "small".into(),
            resource_version: 1,
        },
        Some(&viewer),
    );
    request
        .metadata_mut()
        .insert("x-request-id", MetadataValue::from_static("req-auth-2"));
    let status = client.delete_template(request).await.expect_err("denied");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "requires one of roles: admin");
    let details = status.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "PERMISSION_DENIED");
    assert_eq!(
        info.metadata.get("method").map(String::as_str),
        Some("/ccm.v1.TemplateService/DeleteTemplate")
    );
    assert!(!info.metadata.contains_key("cause"));
    assert_eq!(
        details.request_info().map(|r| r.request_id.as_str()),
        Some("req-auth-2")
    );
}
