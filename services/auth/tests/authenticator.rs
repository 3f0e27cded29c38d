//! Token validation against a real OIDC issuer process (tools/oidc-issuer, RS256, JWKS over HTTP).

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ccm_auth::{AuthConfig, AuthError, Authenticator, WWW_AUTHENTICATE};
use ccm_proto::v1::Role;
use serde_json::{Map, Value, json};

use common::{authenticator, config_for, issuer};

fn challenge(description: &str) -> String {
    format!("Bearer realm=\"ccm\", error=\"invalid_token\", error_description=\"{description}\"")
}

/// The error answers UNAUTHENTICATED with the RFC 6750 challenge as message and metadata.
fn assert_unauthenticated(err: &AuthError, description: &str) {
    let status = err.to_status();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert_eq!(status.message(), challenge(description), "{err:?}");
    let header = status
        .metadata()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(header, Some(challenge(description)), "{err:?}");
    assert_eq!(err.http_status(), http::StatusCode::UNAUTHORIZED);
}

fn parts(token: &str) -> (Map<String, Value>, Map<String, Value>) {
    let mut it = token.split('.');
    let mut decode = || {
        let bytes = URL_SAFE_NO_PAD
            .decode(it.next().expect("part"))
            .expect("base64url");
        serde_json::from_slice(&bytes).expect("json object")
    };
    let header = decode();
    let claims = decode();
    (header, claims)
}

fn enc(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
}

#[tokio::test]
async fn valid_tokens_yield_callers_with_their_roles() {
    let issuer = issuer().await;
    let auth = authenticator(&issuer);
    let expected: &[(&str, &[Role])] = &[
        ("admin", &[Role::Admin, Role::Manager, Role::User]),
        ("manager", &[Role::Manager, Role::User]),
        ("user", &[Role::User]),
        ("viewer", &[Role::Viewer]),
        ("assessment", &[Role::Assessment]),
        ("guest", &[]),
        ("operator", &[]),
    ];
    for (name, roles) in expected {
        let token = issuer.token_for(name).await.expect("token");
        let caller = auth
            .authenticate(Some(&format!("Bearer {token}")))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(caller.roles, roles.to_vec(), "{name}");
        assert_eq!(Some(caller.subject.as_str()), issuer.subject_of(name));
        assert_eq!(caller.username.as_deref(), Some(*name));
        assert_eq!(caller.display_name(), *name);
        assert_eq!(
            caller.claims.get("iss").and_then(Value::as_str),
            Some(issuer.issuer())
        );
    }
    for client in ["scheduler", "controller"] {
        let token = issuer.service_token(client).await.expect("service token");
        let caller = auth.validate(&token).await.expect("service caller");
        assert_eq!(caller.roles, vec![Role::Service]);
        assert_eq!(
            caller.username.as_deref(),
            Some(format!("service-account-{client}").as_str())
        );
        assert_eq!(
            caller.claims.get("azp").and_then(Value::as_str),
            Some(client)
        );
    }
    // Unknown realm roles (Keycloak's defaults) are ignored, known ones kept, duplicates merged.
    let token = issuer
        .sign(
            "user",
            json!({"realm_access": {"roles": ["offline_access", "USER", "user", "viewer", "uma_authorization"]}}),
            None,
        )
        .await
        .expect("signed");
    let caller = auth.validate(&token).await.expect("caller");
    assert_eq!(caller.roles, vec![Role::User, Role::Viewer]);
    // One discovery, one JWKS fetch for all of the above.
    let stats = issuer.stats().await.expect("stats");
    assert_eq!((stats.discovery, stats.certs), (1, 1));
}

#[tokio::test]
async fn missing_and_malformed_tokens_are_rejected_without_contacting_the_issuer() {
    let issuer = issuer().await;
    let auth = authenticator(&issuer);

    let err = auth.authenticate(None).await.expect_err("missing");
    assert_eq!(err, AuthError::Missing);
    let status = err.to_status();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let missing = "Bearer realm=\"ccm\", error_description=\"missing bearer token\"";
    assert_eq!(status.message(), missing);
    assert_eq!(
        status
            .metadata()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok()),
        Some(missing)
    );
    assert_eq!(auth.authenticate(Some("")).await, Err(AuthError::Missing));

    let valid = issuer.token_for("user").await.expect("token");
    let (header, _) = parts(&valid);
    let mut truncated = valid.clone();
    truncated.truncate(valid.rfind('.').expect("dot"));
    let bad_payload = format!("{}.{}.sig", enc(&Value::Object(header)), "bm90IGpzb24");
    let huge = format!("{valid}{}", "A".repeat(ccm_auth::MAX_TOKEN_BYTES));
    for (what, value) in [
        ("basic scheme", "Basic dXNlcjp0ZXN0".to_owned()),
        ("empty bearer", "Bearer ".to_owned()),
        ("not a jwt", "Bearer not-a-jwt".to_owned()),
        ("two parts", format!("Bearer {truncated}")),
        ("garbage header", "Bearer %%%.e30.sig".to_owned()),
        ("payload not json", format!("Bearer {bad_payload}")),
        ("too long", format!("Bearer {huge}")),
    ] {
        let err = auth.authenticate(Some(&value)).await.expect_err(what);
        assert!(matches!(err, AuthError::Malformed(_)), "{what}: {err:?}");
        assert_unauthenticated(&err, "malformed token");
    }
    let stats = issuer.stats().await.expect("stats");
    assert_eq!((stats.discovery, stats.certs), (0, 0));
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_rejected() {
    let issuer = issuer().await;
    let auth = authenticator(&issuer);
    let expired = issuer.expired_token_for("admin").await.expect("token");
    let err = auth.validate(&expired).await.expect_err("expired");
    assert_eq!(err, AuthError::Expired);
    assert_unauthenticated(&err, "token expired");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Within the leeway (30 s) either way: accepted.
    let just_expired = issuer
        .sign("admin", json!({"exp": now - 5}), None)
        .await
        .expect("signed");
    auth.validate(&just_expired)
        .await
        .expect("inside the leeway");
    let future = issuer
        .sign("admin", json!({"nbf": now + 3600, "exp": now + 7200}), None)
        .await
        .expect("signed");
    let err = auth.validate(&future).await.expect_err("nbf");
    assert_eq!(err, AuthError::NotYetValid);
    assert_unauthenticated(&err, "token not yet valid");
    // No exp at all is malformed, not eternal.
    let eternal = issuer
        .sign("admin", json!({"exp": null}), None)
        .await
        .expect("signed");
    assert!(matches!(
        auth.validate(&eternal).await,
        Err(AuthError::Malformed(_))
    ));
    // No sub.
    let anonymous = issuer
        .sign("admin", json!({"sub": null}), None)
        .await
        .expect("signed");
    assert!(matches!(
        auth.validate(&anonymous).await,
        Err(AuthError::Malformed(_))
    ));
}

#[tokio::test]
async fn wrong_issuer_is_rejected_before_any_key_lookup() {
    let issuer = issuer().await;
    let other = common::issuer().await;
    let auth = authenticator(&issuer);

    let forged_iss = issuer
        .sign(
            "admin",
            json!({"iss": "http://127.0.0.1:1/realms/evil"}),
            None,
        )
        .await
        .expect("signed");
    let err = auth.validate(&forged_iss).await.expect_err("iss");
    assert_eq!(err, AuthError::WrongIssuer);
    assert_unauthenticated(&err, "wrong token issuer");

    let no_iss = issuer
        .sign("admin", json!({"iss": null}), None)
        .await
        .expect("signed");
    assert_eq!(auth.validate(&no_iss).await, Err(AuthError::WrongIssuer));

    // A genuine token of another real issuer (same realm name, another port).
    let foreign = other.token_for("admin").await.expect("token");
    assert_eq!(auth.validate(&foreign).await, Err(AuthError::WrongIssuer));

    for stats in [issuer.stats().await, other.stats().await] {
        let stats = stats.expect("stats");
        assert_eq!((stats.discovery, stats.certs), (0, 0));
    }
}

#[tokio::test]
async fn wrong_audience_is_rejected() {
    let issuer = issuer().await;
    let auth = authenticator(&issuer);
    let token = issuer
        .token_with_audience("admin", "some-other-api")
        .await
        .expect("token");
    let err = auth.validate(&token).await.expect_err("aud");
    assert_eq!(err, AuthError::WrongAudience);
    assert_unauthenticated(&err, "wrong token audience");

    let no_aud = issuer
        .sign("admin", json!({"aud": null}), None)
        .await
        .expect("signed");
    assert_eq!(auth.validate(&no_aud).await, Err(AuthError::WrongAudience));

    // A configured list accepts any of its audiences (string or array form of aud).
    let mut config = config_for(&issuer);
    config.audiences = vec!["ccm-ui".into(), "some-other-api".into()];
    let lenient = Authenticator::new(config).expect("authenticator");
    let caller = lenient.validate(&token).await.expect("listed audience");
    assert_eq!(caller.roles, vec![Role::Admin, Role::Manager, Role::User]);
    let default_aud = issuer.token_for("admin").await.expect("token");
    assert_eq!(
        lenient.validate(&default_aud).await,
        Err(AuthError::WrongAudience)
    );
}

#[tokio::test]
async fn tokens_not_signed_by_the_issuer_are_rejected() {
    let issuer = issuer().await;
    let auth = authenticator(&issuer);
    let valid = issuer.token_for("user").await.expect("token");
    auth.validate(&valid).await.expect("valid");
    let (header, claims) = parts(&valid);
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .expect("kid")
        .to_owned();

    // Another RSA key, same kid, same claims.
    let forged = issuer
        .forged_signer()
        .token_for("admin")
        .await
        .expect("forged");
    assert_eq!(
        parts(&forged).0.get("kid").and_then(Value::as_str),
        Some(kid.as_str())
    );
    let err = auth.validate(&forged).await.expect_err("forged");
    assert_eq!(err, AuthError::InvalidSignature);
    assert_unauthenticated(&err, "invalid token signature");

    // The issuer's signature over other claims: a user promoting itself to admin.
    let mut promoted = claims.clone();
    promoted.insert(
        "realm_access".into(),
        json!({"roles": ["admin", "manager", "user"]}),
    );
    let signature = valid.rsplit('.').next().expect("sig");
    let tampered = format!(
        "{}.{}.{signature}",
        enc(&Value::Object(header.clone())),
        enc(&Value::Object(promoted))
    );
    assert_eq!(
        auth.validate(&tampered).await,
        Err(AuthError::InvalidSignature)
    );

    // Unsigned: alg none, with and without a signature part.
    for alg in ["none", "None", "NONE"] {
        let mut none_header = header.clone();
        none_header.insert("alg".into(), json!(alg));
        let unsigned = format!(
            "{}.{}.",
            enc(&Value::Object(none_header)),
            enc(&Value::Object(claims.clone()))
        );
        let err = auth.validate(&unsigned).await.expect_err(alg);
        assert_eq!(err, AuthError::DisallowedAlgorithm(alg.to_owned()));
        assert_unauthenticated(&err, "token algorithm not accepted");
    }

    // HS256 keyed with the issuer's public key (the classic RS/HS confusion): both the JWK as
    // published and its modulus as secret.
    let jwks: Value = reqwest::get(issuer.jwks_url())
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    let jwk = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == json!(kid)))
        .expect("published key")
        .clone();
    // The authenticator's fetch and this one.
    assert_eq!(issuer.stats().await.expect("stats").certs, 2);
    let modulus = URL_SAFE_NO_PAD
        .decode(jwk["n"].as_str().expect("n"))
        .expect("n bytes");
    let jwk_text = serde_json::to_vec(&jwk).expect("json");
    for secret in [jwk_text.as_slice(), modulus.as_slice()] {
        let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        hs_header.kid = Some(kid.clone());
        let hs = jsonwebtoken::encode(
            &hs_header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .expect("hs256");
        let err = auth.validate(&hs).await.expect_err("hs256");
        assert_eq!(err, AuthError::DisallowedAlgorithm("HS256".into()));
    }
    // The rejected tokens never caused a JWKS fetch.
    assert_eq!(issuer.stats().await.expect("stats").certs, 2);
}

#[tokio::test]
async fn unknown_kid_triggers_exactly_one_rate_limited_refresh() {
    const INTERVAL: Duration = Duration::from_secs(3);
    const PAST_INTERVAL: Duration = Duration::from_millis(3300);
    let issuer = issuer().await;
    let mut config = config_for(&issuer);
    config.min_jwks_refresh_interval = INTERVAL;
    let auth = Authenticator::new(config).expect("authenticator");

    // Signed before the timed part, so that the timed part makes no request but validations.
    let mut bogus = Vec::new();
    for i in 0..10 {
        let kid = format!("bogus-{i}");
        bogus.push(
            issuer
                .sign("admin", json!({}), Some(&kid))
                .await
                .expect("signed"),
        );
    }
    let old = issuer.token_for("user").await.expect("token");

    auth.validate(&old).await.expect("first token");
    assert_eq!(issuer.stats().await.expect("stats").certs, 1);

    // Key rotation: the new kid is unknown; within the interval no refresh happens.
    let new_kid = issuer.rotate_key().await.expect("rotate");
    let rotated = issuer.token_for("manager").await.expect("token");
    assert_eq!(
        parts(&rotated).0.get("kid").and_then(Value::as_str),
        Some(new_kid.as_str())
    );
    let err = auth.validate(&rotated).await.expect_err("rate-limited");
    assert_eq!(err, AuthError::UnknownKey(new_kid.clone()));
    assert_unauthenticated(&err, "unknown signing key");
    assert_eq!(issuer.stats().await.expect("stats").certs, 1);

    // After the interval the unknown kid triggers one refresh, which finds the new key.
    tokio::time::sleep(PAST_INTERVAL).await;
    let caller = auth.validate(&rotated).await.expect("rotated key");
    assert_eq!(caller.roles, vec![Role::Manager, Role::User]);
    for _ in 0..5 {
        auth.validate(&rotated).await.expect("cached");
    }
    auth.validate(&old).await.expect("old key still published");
    assert_eq!(issuer.stats().await.expect("stats").certs, 2);

    // A flood of made-up kids right after a refresh: no request at all.
    for token in &bogus {
        assert!(matches!(
            auth.validate(token).await,
            Err(AuthError::UnknownKey(_))
        ));
    }
    assert_eq!(issuer.stats().await.expect("stats").certs, 2);

    // Once the interval has passed: exactly one more request for the whole flood.
    tokio::time::sleep(PAST_INTERVAL).await;
    for token in &bogus {
        assert!(matches!(
            auth.validate(token).await,
            Err(AuthError::UnknownKey(_))
        ));
    }
    assert_eq!(issuer.stats().await.expect("stats").certs, 3);
}

#[tokio::test]
async fn concurrent_requests_share_one_refresh() {
    let issuer = issuer().await;
    let mut config = config_for(&issuer);
    config.min_jwks_refresh_interval = Duration::from_secs(1);
    let auth = Authenticator::new(config).expect("authenticator");
    let first = issuer.token_for("user").await.expect("token");
    auth.validate(&first).await.expect("valid");
    issuer.rotate_key().await.expect("rotate");
    let rotated = issuer.token_for("user").await.expect("token");
    let bogus = issuer
        .sign("user", json!({}), Some("made-up"))
        .await
        .expect("signed");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut tasks = Vec::new();
    for i in 0..40 {
        let auth = auth.clone();
        let token = if i % 2 == 0 {
            rotated.clone()
        } else {
            bogus.clone()
        };
        tasks.push(tokio::spawn(async move { auth.validate(&token).await }));
    }
    let mut ok = 0;
    let mut unknown = 0;
    for task in tasks {
        match task.await.expect("join") {
            Ok(_) => ok += 1,
            Err(AuthError::UnknownKey(kid)) => {
                assert_eq!(kid, "made-up");
                unknown += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, unknown), (20, 20));
    assert_eq!(issuer.stats().await.expect("stats").certs, 2);
}

#[tokio::test]
async fn issuer_down_is_unavailable_but_cached_keys_keep_working() {
    let mut issuer = issuer().await;
    let warm = authenticator(&issuer);
    let cold = authenticator(&issuer);
    let token = issuer.token_for("viewer").await.expect("token");
    assert_eq!(warm.refresh_keys().await, Ok(1));
    issuer.stop().await;

    let caller = warm.validate(&token).await.expect("cached key");
    assert_eq!(caller.roles, vec![Role::Viewer]);

    let err = cold.validate(&token).await.expect_err("down");
    assert!(matches!(err, AuthError::IssuerUnavailable(_)), "{err:?}");
    let status = err.to_status();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.metadata().get(WWW_AUTHENTICATE).is_none());
    assert_eq!(err.http_status(), http::StatusCode::SERVICE_UNAVAILABLE);
    // Within the refresh interval the failure is remembered, not retried.
    let again = cold.validate(&token).await.expect_err("still down");
    assert!(matches!(again, AuthError::IssuerUnavailable(_)));
}

#[tokio::test]
async fn configured_jwks_url_skips_discovery_and_client_roles_are_opt_in() {
    let issuer = issuer().await;
    let mut config = config_for(&issuer);
    config.jwks_url = Some(issuer.jwks_url());
    let direct = Authenticator::new(config.clone()).expect("authenticator");
    let operator = issuer.token_for("operator").await.expect("token");
    let caller = direct.validate(&operator).await.expect("valid");
    assert!(
        caller.roles.is_empty(),
        "realm roles only: {:?}",
        caller.roles
    );
    let stats = issuer.stats().await.expect("stats");
    assert_eq!((stats.discovery, stats.certs), (0, 1));

    config.client_roles_of = Some(issuer.audience().to_owned());
    let with_client_roles = Authenticator::new(config).expect("authenticator");
    let caller = with_client_roles.validate(&operator).await.expect("valid");
    assert_eq!(caller.roles, vec![Role::Admin]);

    // A JWKS URL that answers 404 makes the issuer unavailable, not the token invalid.
    let mut broken = config_for(&issuer);
    broken.jwks_url = Some(format!("{}/nope", issuer.issuer()));
    let broken = Authenticator::new(broken).expect("authenticator");
    assert!(matches!(
        broken.validate(&operator).await,
        Err(AuthError::IssuerUnavailable(_))
    ));
}

#[tokio::test]
async fn config_defaults_are_the_documented_constants() {
    let config = AuthConfig::new("https://idp/realms/ccm/", ["ccm-api"]);
    assert_eq!(config.leeway, ccm_auth::DEFAULT_LEEWAY);
    assert_eq!(
        config.min_jwks_refresh_interval,
        ccm_auth::MIN_JWKS_REFRESH_INTERVAL
    );
    assert_eq!(config.jwks_max_age, ccm_auth::DEFAULT_JWKS_MAX_AGE);
    assert_eq!(
        config.discovery_url(),
        "https://idp/realms/ccm/.well-known/openid-configuration"
    );
}
