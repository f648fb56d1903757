//! Subscriber JWTs against a real broker: HS256, RS256 and ES256 (PEM and JWKS), claims in
//! row rules, and the token lifecycle (expiry, `TOKEN_EXPIRED`, re-auth, `AUTH_TIMEOUT`).

#[path = "support/jwt.rs"]
mod jwt;
mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::{start, TestServer, WsClient};
use tidings::auth::JwtSettings;
use tidings::config::AuthMode;
use tidings::Config;

const EXPIRED: &str = r#"{"type":"auth","status":"error","error":{"code":"TOKEN_EXPIRED","message":"Token expired."}}"#;
const TIMED_OUT: &str = r#"{"type":"auth","status":"error","error":{"code":"AUTH_TIMEOUT","message":"Authentication timed out."}}"#;

fn jwt_config(mode: AuthMode, settings: JwtSettings) -> Config {
    Config {
        auth_mode: mode,
        jwt: Some(Arc::new(
            settings.build().expect("jwt settings").expect("a key"),
        )),
        tokens: tidings::auth::TokenStore::from_json(
            r#"{"static-admin":{"sub":"admin","collections":{"*":{}}}}"#,
        )
        .expect("tokens"),
        ..Config::default()
    }
}

fn hs_settings() -> JwtSettings {
    JwtSettings {
        secret: Some(jwt::SECRET.into()),
        ..JwtSettings::default()
    }
}

async fn auth(c: &mut WsClient, token: &str) {
    c.exchange(
        &json!({"type":"auth","access_token":token}).to_string(),
        r#"{"type":"auth","status":"ok"}"#,
    )
    .await;
}

/// A token for every collection that outlives the test.
fn long_token() -> String {
    jwt::hs256(&json!({"sub": "a", "exp": jwt::now() + 600, "tidings": {"*": {}}}))
}

/// A token for every collection that expires 2 to 3 s from now (`exp` is whole seconds).
///
/// The expiry tests set up everything that must happen before the expiry (subscribe, a first
/// delivery) under [`long_token`], then switch to this one with a re-auth, which keeps the
/// subscriptions. The expiry timer then races nothing the test checks: the one step that must
/// beat it is this re-auth's round trip, with at least 2 s to do it. (Authenticating with a
/// short token first made the subscribe and the first delivery race the timer, which a
/// loaded machine lost.)
fn short_token() -> String {
    jwt::hs256(&json!({"sub": "a", "exp": jwt::now() + 3, "tidings": {"*": {}}}))
}

async fn subscribe(c: &mut WsClient, collection: &str, uid: &str, query: Value) {
    c.send(
        &json!({"type":"subscribe","collection":collection,"uid":uid,"query":query}).to_string(),
    )
    .await;
    let init = c.recv().await;
    assert_eq!(init["event"], "init", "{init}");
}

async fn publish(server: &TestServer, collection: &str, data: Value) {
    server
        .publish(json!({"collection":collection,"event":"create","data":data}))
        .await;
}

#[tokio::test]
async fn hs256_claims_drive_row_rules_and_fields() {
    let server = start(jwt_config(AuthMode::Handshake, hs_settings())).await;
    let token = jwt::hs256(&json!({
        "sub": "alice", "exp": jwt::now() + 600, "tenant": "t1",
        "tidings": {"orders": {
            "filter": {"_and": [{"tenant": {"_eq": "$CLAIMS.tenant"}}, {"owner": {"_eq": "$CURRENT_USER"}}]},
            "fields": ["id", "tenant", "owner", "total"]
        }}
    }));
    let mut c = server.ws().await;
    auth(&mut c, &token).await;
    subscribe(&mut c, "orders", "o", json!({})).await;
    publish(
        &server,
        "orders",
        json!([
            {"id": 1, "tenant": "t2", "owner": "alice", "total": 1, "secret": "x"},
            {"id": 2, "tenant": "t1", "owner": "bob", "total": 2, "secret": "x"},
            {"id": 3, "tenant": "t1", "owner": "alice", "total": 3, "secret": "x"}
        ]),
    )
    .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":3,"tenant":"t1","owner":"alice","total":3}],"uid":"o"}"#).await;
    // Collections outside the claim are forbidden.
    c.exchange(
        r#"{"type":"subscribe","collection":"secrets","uid":"s"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"secrets\" or it does not exist. Queried in root."},"uid":"s"}"#,
    )
    .await;
    // A token without a `tidings` claim authenticates but grants nothing.
    let bare = jwt::hs256(&json!({"sub": "carol", "exp": jwt::now() + 600}));
    let mut d = server.ws().await;
    auth(&mut d, &bare).await;
    d.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":1}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"orders\" or it does not exist. Queried in root."},"uid":1}"#,
    )
    .await;
    // A rule naming a claim the token lacks fails closed.
    let no_tenant = jwt::hs256(&json!({"sub": "dave", "exp": jwt::now() + 600,
        "tidings": {"orders": {"filter": {"tenant": {"_eq": "$CLAIMS.tenant"}}}}}));
    let mut e = server.ws().await;
    auth(&mut e, &no_tenant).await;
    e.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"x"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"orders\" or it does not exist. Queried in root."},"uid":"x"}"#,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn rs256_and_es256_from_pem_and_jwks() {
    let settings = JwtSettings {
        public_keys: vec![jwt::fixture("rsa-public.pem")],
        jwks_file: Some(jwt::fixture("jwks.json")),
        issuer: Some("https://auth.example".into()),
        audience: Some("tidings".into()),
        ..JwtSettings::default()
    };
    let server = start(jwt_config(AuthMode::Strict, settings)).await;
    let claims = json!({"sub": "alice", "exp": jwt::now() + 600, "iss": "https://auth.example",
        "aud": ["other", "tidings"], "tidings": {"*": {}}});
    let url = |t: &str| format!("{}?access_token={t}", server.ws_url());
    let good = [
        jwt::rs256(&claims, "rsa-private.pem", None),
        jwt::rs256(&claims, "rsa-private.pem", Some("rsa-1")),
        jwt::es256(&claims, Some("ec-1")),
        jwt::es256(&claims, None),
    ];
    for token in &good {
        assert_eq!(server.ws_status(&url(token)).await, 101, "{token}");
    }
    let mut c = server.ws_token(&good[2]).await;
    subscribe(&mut c, "orders", "o", json!({"fields": ["id"]})).await;
    publish(&server, "orders", json!({"id": 9, "x": 1})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":9}],"uid":"o"}"#)
        .await;

    let mut wrong_iss = claims.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    let mut no_aud = claims.clone();
    no_aud.as_object_mut().expect("object").remove("aud");
    let bad = [
        jwt::rs256(&claims, "other-rsa-private.pem", None),
        jwt::rs256(&claims, "other-rsa-private.pem", Some("rsa-1")),
        jwt::es256(&claims, Some("rsa-1")),
        jwt::rs256(&wrong_iss, "rsa-private.pem", None),
        jwt::rs256(&no_aud, "rsa-private.pem", None),
        jwt::hs256(&claims),
        jwt::alg_none(&claims),
    ];
    for token in &bad {
        assert_eq!(server.ws_status(&url(token)).await, 401, "{token}");
    }
    // Static tokens keep working beside JWTs.
    assert_eq!(server.ws_status(&url("static-admin")).await, 101);
    server.shutdown().await;
}

/// Handshake mode: the token expires, the client gets TOKEN_EXPIRED, its subscription
/// receives nothing more, and without a new `auth` it gets AUTH_TIMEOUT and is closed.
#[tokio::test]
async fn expiry_then_auth_timeout_closes() {
    let mut config = jwt_config(AuthMode::Handshake, hs_settings());
    config.auth_timeout = Duration::from_millis(600);
    let server = start(config).await;
    let mut c = server.ws().await;
    auth(&mut c, &long_token()).await;
    subscribe(&mut c, "orders", "o", json!({})).await;
    publish(&server, "orders", json!({"id": 1})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":1}],"uid":"o"}"#)
        .await;
    auth(&mut c, &short_token()).await;
    c.expect(EXPIRED).await;
    publish(&server, "orders", json!({"id": 2})).await;
    c.expect(TIMED_OUT).await;
    assert_eq!(c.expect_close().await, None);
    server
        .wait_for_metric(
            "tidings_connections_closed_total{reason=\"auth_timeout\"}",
            1.0,
        )
        .await;
    assert_eq!(
        server
            .metric("tidings_protocol_errors_total{code=\"TOKEN_EXPIRED\"}")
            .await,
        Some(1.0)
    );
    server.shutdown().await;
}

/// A re-auth inside the window resumes the suspended subscriptions under the new token's
/// permissions; a re-auth at any time swaps them.
#[tokio::test]
async fn reauth_after_expiry_swaps_permissions() {
    let mut config = jwt_config(AuthMode::Handshake, hs_settings());
    config.auth_timeout = Duration::from_secs(3);
    let server = start(config).await;
    let mut c = server.ws().await;
    auth(&mut c, &long_token()).await;
    subscribe(&mut c, "orders", "o", json!({})).await;
    auth(&mut c, &short_token()).await;
    c.expect(EXPIRED).await;
    // While expired: nothing is delivered and nothing new may be subscribed.
    publish(&server, "orders", json!({"id": 1, "secret": "s"})).await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"late"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"orders\" or it does not exist. Queried in root."},"uid":"late"}"#,
    )
    .await;
    let narrower = jwt::hs256(&json!({"sub": "a", "exp": jwt::now() + 600,
        "tidings": {"orders": {"fields": ["id"]}}}));
    auth(&mut c, &narrower).await;
    publish(&server, "orders", json!({"id": 2, "secret": "s"})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":2}],"uid":"o"}"#)
        .await;
    // No AUTH_TIMEOUT comes after a successful re-auth.
    c.expect_silence(Duration::from_millis(3500)).await;
    // Re-auth with a static token widens again.
    auth(&mut c, "static-admin").await;
    publish(&server, "orders", json!({"id": 3, "secret": "s"})).await;
    c.expect(
        r#"{"type":"subscription","event":"create","data":[{"id":3,"secret":"s"}],"uid":"o"}"#,
    )
    .await;
    server.shutdown().await;
}

/// Public mode: after AUTH_TIMEOUT the connection stays open with the public permissions;
/// subscriptions they do not allow are dropped with FORBIDDEN, the others resume.
#[tokio::test]
async fn public_mode_falls_back_to_public_rights() {
    let mut config = jwt_config(AuthMode::Public, hs_settings());
    config.auth_timeout = Duration::from_millis(500);
    config.public_permissions = tidings::auth::Permissions::collections(["news"]);
    let server = start(config).await;
    let mut c = server.ws_token(&long_token()).await;
    subscribe(&mut c, "orders", "o", json!({})).await;
    subscribe(&mut c, "news", "n", json!({})).await;
    auth(&mut c, &short_token()).await;
    c.expect(EXPIRED).await;
    c.expect(TIMED_OUT).await;
    c.expect(r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"orders\" or it does not exist. Queried in root."},"uid":"o"}"#).await;
    publish(&server, "orders", json!({"id": 1})).await;
    publish(&server, "news", json!({"id": 2})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":2}],"uid":"n"}"#)
        .await;
    c.exchange(r#"{"type":"ping"}"#, r#"{"type":"pong"}"#).await;
    server.shutdown().await;
}

/// Messages over an `auth` with a bad JWT: AUTH_FAILED, whatever the reason, and the reason
/// only in the metrics.
#[tokio::test]
async fn refused_tokens_are_counted_by_reason() {
    let server = start(jwt_config(AuthMode::Public, hs_settings())).await;
    let failed = r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication failed."}}"#;
    let mut c = server.ws().await;
    for (token, reason) in [
        (jwt::hs256(&json!({"exp": jwt::now() - 3600})), "expired"),
        (
            jwt::hs256_with(
                &json!({"exp": jwt::now() + 60}),
                "another-secret-0123456789abcdefghij",
            ),
            "bad_signature",
        ),
        (jwt::alg_none(&json!({"exp": jwt::now() + 60})), "malformed"),
        ("nope".to_string(), "unknown_token"),
    ] {
        c.exchange(
            &json!({"type":"auth","access_token":token}).to_string(),
            failed,
        )
        .await;
        assert_eq!(
            server
                .metric(&format!(
                    "tidings_auth_rejections_total{{reason=\"{reason}\"}}"
                ))
                .await,
            Some(1.0),
            "{reason}"
        );
    }
    server.shutdown().await;
}
