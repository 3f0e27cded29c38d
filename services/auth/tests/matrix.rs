//! The authorization matrix, generated from the contracts: for every RPC of every `ccm.v1`
//! service and every role, the decision the `(ccm.v1.authz)` option implies must be the decision
//! the layer makes — checked end to end with real tokens from the issuer and real gRPC calls.

mod common;

use ccm_auth::{AuthLayer, denied_message};
use ccm_proto::v1::Role;
use ccm_proto::{AuthzDecision, PACKAGE, authorize, descriptor_pool, grpc_path, method_authz};
use common::{
    ECHO_OWN_ONLY, ECHO_ROLES, ECHO_SUBJECT, authenticator, call_path, issuer, meta, serve_echo,
};
use tonic::Code;

/// A principal of the issuer per role, with the realm roles its tokens carry.
struct Principal {
    name: &'static str,
    client: bool,
    roles: &'static [Role],
}

const PRINCIPALS: &[Principal] = &[
    Principal {
        name: "admin",
        client: false,
        roles: &[Role::Admin, Role::Manager, Role::User],
    },
    Principal {
        name: "manager",
        client: false,
        roles: &[Role::Manager, Role::User],
    },
    Principal {
        name: "user",
        client: false,
        roles: &[Role::User],
    },
    Principal {
        name: "viewer",
        client: false,
        roles: &[Role::Viewer],
    },
    Principal {
        name: "scheduler",
        client: true,
        roles: &[Role::Service],
    },
    Principal {
        name: "assessment",
        client: true,
        roles: &[Role::Assessment],
    },
    Principal {
        name: "guest",
        client: false,
        roles: &[],
    },
];

#[tokio::test]
async fn every_rpc_times_every_role_matches_the_contract() {
    let issuer = issuer().await;
    let server = serve_echo(AuthLayer::new(authenticator(&issuer))).await;
    let pool = descriptor_pool();
    let methods: Vec<String> = pool
        .services()
        .filter(|s| s.package_name() == PACKAGE)
        .flat_map(|s| s.methods().map(|m| grpc_path(&m)).collect::<Vec<_>>())
        .collect();
    assert!(methods.len() >= 50, "only {} ccm.v1 RPCs?", methods.len());

    let mut tokens = Vec::new();
    for p in PRINCIPALS {
        let token = if p.client {
            issuer.service_token(p.name).await
        } else {
            issuer.token_for(p.name).await
        }
        .unwrap_or_else(|e| panic!("token for {}: {e}", p.name));
        tokens.push(token);
    }

    let channel = server.channel().await;
    let mut checked = 0;
    let mut counts = [0usize; 3];
    for path in &methods {
        // The expectation comes from the descriptor option itself; a method without one must be
        // denied to everybody.
        let rule = method_authz(pool, path);
        for (p, token) in PRINCIPALS.iter().zip(&tokens) {
            let expected = rule
                .as_ref()
                .map_or(AuthzDecision::Denied, |r| authorize(r, p.roles));
            let outcome = call_path(channel.clone(), path, Some(token)).await;
            match (expected, outcome) {
                (AuthzDecision::Denied, Err(status)) => {
                    assert_eq!(status.code(), Code::PermissionDenied, "{} {path}", p.name);
                    if let Some(rule) = &rule {
                        assert_eq!(status.message(), denied_message(rule));
                    }
                    counts[0] += 1;
                }
                (decision, Ok(response)) if decision != AuthzDecision::Denied => {
                    let own_only = decision == AuthzDecision::OwnResourcesOnly;
                    assert_eq!(
                        meta(&response, ECHO_OWN_ONLY),
                        own_only.to_string(),
                        "{} {path}",
                        p.name
                    );
                    let principal = if p.client {
                        issuer.client(p.name)
                    } else {
                        issuer.user(p.name)
                    };
                    assert_eq!(
                        meta(&response, ECHO_SUBJECT),
                        principal.expect("principal").sub
                    );
                    let roles: Vec<&str> = p.roles.iter().map(|r| r.claim()).collect();
                    assert_eq!(meta(&response, ECHO_ROLES), roles.join(","));
                    counts[if own_only { 2 } else { 1 }] += 1;
                }
                (expected, outcome) => {
                    panic!("{} {path}: expected {expected:?}, got {outcome:?}", p.name)
                }
            }
            checked += 1;
        }
        // No token at all: unauthenticated everywhere.
        let status = call_path(channel.clone(), path, None)
            .await
            .expect_err("no token");
        assert_eq!(status.code(), Code::Unauthenticated, "{path}");
    }
    assert_eq!(checked, methods.len() * PRINCIPALS.len());
    // The contract has all three outcomes; a matrix of only denials would prove nothing.
    assert!(
        counts.iter().all(|c| *c > 0),
        "denied/allowed/own-only: {counts:?}"
    );
    // Every key fetch was the first one: the whole matrix ran on the cached JWKS.
    assert_eq!(issuer.stats().await.expect("stats").certs, 1);
}

#[tokio::test]
async fn rbac_table_covers_every_rpc_of_the_contract() {
    let table = ccm_auth::RbacTable::from_descriptors();
    let pool = descriptor_pool();
    let mut total = 0;
    for service in pool.services().filter(|s| s.package_name() == PACKAGE) {
        for method in service.methods() {
            let path = grpc_path(&method);
            assert_eq!(
                table.rule(&path),
                method_authz(pool, &path).as_ref(),
                "{path}"
            );
            assert!(table.rule(&path).is_some(), "{path} has no rule");
            total += 1;
        }
    }
    assert_eq!(table.len(), total);
    assert_eq!(
        table.decide("/ccm.v1.Nope/Nope", &[Role::Admin]),
        AuthzDecision::Denied
    );
}
