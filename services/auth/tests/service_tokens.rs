//! Client-credentials tokens for the scheduler and controller, against the real issuer, and the
//! interceptor carrying them through the auth layer of a real server.

mod common;

use std::time::Duration;

use ccm_auth::{AuthError, AuthLayer, ClientCredentials, ServiceTokenSource};
use ccm_proto::v1::CommitPlacementsRequest;
use ccm_proto::v1::Role;
use ccm_proto::v1::internal_service_client::InternalServiceClient;
use ccm_testkit::oidc::OidcIssuer;
use common::{ECHO_ROLES, ECHO_SUBJECT, authenticator, issuer, meta, serve_echo};
use tonic::Code;

fn credentials(issuer: &OidcIssuer, client: &str) -> ClientCredentials {
    ClientCredentials {
        token_url: issuer.token_url(),
        client_id: client.into(),
        client_secret: issuer.client_secret(client).expect("secret").into(),
        scope: None,
    }
}

#[tokio::test]
async fn tokens_are_cached_until_their_refresh_time() {
    let issuer = issuer().await;
    let auth = authenticator(&issuer);
    let source = ServiceTokenSource::new(credentials(&issuer, "controller")).expect("source");
    assert_eq!(source.cached(), None);
    let first = source.token().await.expect("token");
    let caller = auth.validate(&first).await.expect("valid");
    assert_eq!(caller.roles, vec![Role::Service]);
    assert_eq!(
        caller.username.as_deref(),
        Some("service-account-controller")
    );
    for _ in 0..5 {
        assert_eq!(source.token().await.expect("token"), first);
    }
    assert_eq!(source.cached(), Some(first));
    assert_eq!(source.fetch_count(), 1);
    assert_eq!(issuer.stats().await.expect("stats").token, 1);
    // The secret never shows in Debug output.
    assert!(!format!("{source:?}").contains("controller-secret"));
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_they_expire() {
    let issuer = issuer().await;
    // 6 s tokens: refreshed at half their lifetime (the 30 s margin is longer than that).
    issuer
        .set_token_ttl(Duration::from_secs(6))
        .await
        .expect("ttl");
    let source = ServiceTokenSource::new(credentials(&issuer, "scheduler")).expect("source");
    let first = source.token().await.expect("token");
    let _refresher = source.spawn_refresher();
    tokio::time::sleep(Duration::from_millis(3800)).await;
    let second = source.cached().expect("still valid");
    assert_ne!(first, second, "refreshed at ~3 s");
    assert_eq!(source.fetch_count(), 2);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let third = source.cached().expect("still valid");
    assert_ne!(second, third);
    assert_eq!(source.fetch_count(), 3);
    // The refresher stops with its handle.
    drop(_refresher);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(source.fetch_count(), 3);
}

#[tokio::test]
async fn rejected_credentials_and_an_unreachable_issuer_are_errors() {
    let mut issuer = issuer().await;
    let mut wrong = credentials(&issuer, "scheduler");
    wrong.client_secret = "not-the-secret".into();
    let err = ServiceTokenSource::new(wrong)
        .expect("source")
        .token()
        .await
        .expect_err("wrong secret");
    assert!(
        matches!(&err, AuthError::TokenRequestRejected(m) if m.contains("unauthorized_client")),
        "{err:?}"
    );
    let mut unknown = credentials(&issuer, "scheduler");
    unknown.client_id = "nobody".into();
    assert!(matches!(
        ServiceTokenSource::new(unknown)
            .expect("source")
            .token()
            .await,
        Err(AuthError::TokenRequestRejected(_))
    ));

    // A valid token survives the issuer going away (served from the cache).
    let source = ServiceTokenSource::new(credentials(&issuer, "scheduler")).expect("source");
    let token = source.token().await.expect("token");
    let creds = credentials(&issuer, "controller");
    issuer.stop().await;
    assert_eq!(source.token().await.expect("cached"), token);
    let err = ServiceTokenSource::new(creds)
        .expect("source")
        .token()
        .await
        .expect_err("down");
    assert!(matches!(err, AuthError::IssuerUnavailable(_)), "{err:?}");
}

#[tokio::test]
async fn the_interceptor_authenticates_internal_calls() {
    let issuer = issuer().await;
    let server = serve_echo(AuthLayer::new(authenticator(&issuer))).await;
    let source = ServiceTokenSource::new(credentials(&issuer, "scheduler")).expect("source");

    // Before any token: the call fails fast with UNAVAILABLE and a fetch starts in the background.
    let mut client =
        InternalServiceClient::with_interceptor(server.channel().await, source.interceptor());
    let status = client
        .commit_placements(CommitPlacementsRequest::default())
        .await
        .expect_err("no token yet");
    assert_eq!(status.code(), Code::Unavailable);
    let mut waited = Duration::ZERO;
    while source.cached().is_none() && waited < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    assert!(source.cached().is_some(), "background fetch");

    let response = client
        .commit_placements(CommitPlacementsRequest::default())
        .await
        .expect("service role may call InternalService");
    assert_eq!(meta(&response, ECHO_ROLES), "service");
    assert_eq!(
        meta(&response, ECHO_SUBJECT),
        issuer.subject_of("scheduler").expect("sub")
    );

    // The assessment client has a token too, but not the role.
    let assessment = ServiceTokenSource::new(credentials(&issuer, "assessment")).expect("source");
    assessment.token().await.expect("token");
    let mut client =
        InternalServiceClient::with_interceptor(server.channel().await, assessment.interceptor());
    let status = client
        .commit_placements(CommitPlacementsRequest::default())
        .await
        .expect_err("wrong role");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "requires one of roles: service");
}
