//! `--jwks-url` against a real identity-provider stand-in: an axum server on 127.0.0.1:0 that
//! serves a JWKS, rotates its keys mid-test, goes down, and counts every fetch. Tokens are
//! presented at the WebSocket upgrade (`?access_token=`: 101 accepted, 401 refused) and in an
//! `auth` message.

#[path = "support/jwt.rs"]
mod jwt;
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use parking_lot::Mutex;
use serde_json::{json, Value};
use support::{start, TestServer};
use tidings::auth::JwtSettings;
use tidings::config::AuthMode;
use tidings::Config;
use tokio::net::TcpListener;

/// The identity provider: what it serves, whether it is up, how often it was asked.
struct Idp {
    jwks: Mutex<Value>,
    up: AtomicBool,
    fetches: AtomicUsize,
}

impl Idp {
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn serve_keys(&self, kids: &[&str]) {
        *self.jwks.lock() = keys(kids);
    }
}

/// The fixture JWKS (`rsa-1`, `ec-1`) reduced to the named keys.
fn keys(kids: &[&str]) -> Value {
    let all: Value = serde_json::from_str(
        &std::fs::read_to_string(jwt::fixture("jwks.json")).expect("jwks fixture"),
    )
    .expect("jwks json");
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap_or_default()))
        .cloned()
        .collect();
    json!({ "keys": keys })
}

async fn jwks(State(idp): State<Arc<Idp>>) -> Response {
    idp.fetches.fetch_add(1, Ordering::SeqCst);
    if !idp.up.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response();
    }
    let body = idp.jwks.lock().to_string();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Starts the identity provider serving `kids`; returns it and its JWKS URL.
async fn idp(kids: &[&str], up: bool) -> (Arc<Idp>, String) {
    let idp = Arc::new(Idp {
        jwks: Mutex::new(keys(kids)),
        up: AtomicBool::new(up),
        fetches: AtomicUsize::new(0),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind idp");
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().expect("addr")
    );
    let app = Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(idp.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (idp, url)
}

fn broker_config(url: &str, min_interval: Duration) -> Config {
    Config {
        auth_mode: AuthMode::Handshake,
        jwt: Some(Arc::new(
            JwtSettings {
                jwks_url: Some(url.to_string()),
                jwks_min_interval: min_interval,
                ..JwtSettings::default()
            }
            .build()
            .expect("jwt settings")
            .expect("a key source"),
        )),
        ..Config::default()
    }
}

fn claims() -> Value {
    json!({"sub": "alice", "exp": jwt::now() + 600, "tidings": {"orders": {}}})
}

fn rsa_token() -> String {
    jwt::rs256(&claims(), "rsa-private.pem", Some("rsa-1"))
}

fn ec_token() -> String {
    jwt::es256(&claims(), Some("ec-1"))
}

/// 101 when the upgrade with `token` is accepted, 401 when it is refused.
async fn upgrade(server: &TestServer, token: &str) -> u16 {
    server
        .ws_status(&format!("{}?access_token={token}", server.ws_url()))
        .await
}

async fn metric(server: &TestServer, series: &str) -> f64 {
    server.metric(series).await.unwrap_or(-1.0)
}

/// Waits until the broker's first fetch has happened (its `ok` counter moves).
async fn wait_first_fetch(server: &TestServer) {
    server
        .wait_for_metric(r#"tidings_jwks_fetches_total{outcome="ok"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn rotation_unknown_kid_refresh_rate_limit_and_idp_outage() {
    let min_interval = Duration::from_millis(1500);
    let (idp, url) = idp(&["rsa-1"], true).await;
    let server = start(broker_config(&url, min_interval)).await;
    wait_first_fetch(&server).await;
    assert_eq!(idp.fetches(), 1, "fetched once at start");
    assert_eq!(metric(&server, "tidings_jwks_keys").await, 1.0);

    // The start set verifies: at the upgrade and in a handshake `auth`.
    assert_eq!(upgrade(&server, &rsa_token()).await, 101);
    let mut c = server.ws().await;
    c.exchange(
        &json!({"type":"auth","access_token":rsa_token()}).to_string(),
        r#"{"type":"auth","status":"ok"}"#,
    )
    .await;
    c.close().await;
    assert_eq!(idp.fetches(), 1, "a known kid fetches nothing");

    // Rotation: the provider now serves only the new EC key.
    idp.serve_keys(&["ec-1"]);
    tokio::time::sleep(min_interval + Duration::from_millis(100)).await;
    assert_eq!(
        upgrade(&server, &ec_token()).await,
        101,
        "a new-key token is accepted after the unknown-kid refresh"
    );
    assert_eq!(idp.fetches(), 2);
    assert_eq!(metric(&server, "tidings_jwks_keys").await, 1.0);

    // The old key is gone from the set: its tokens are refused, and the unknown-kid refreshes
    // they ask for are refused by the rate limit. However slow this machine is, a burst that
    // lasts T can cause at most T / min_interval fetches (without the limit: one per token).
    let unknown = jwt::rs256(&claims(), "other-rsa-private.pem", Some("never-published"));
    let burst = std::time::Instant::now();
    for token in std::iter::repeat_n(rsa_token(), 5).chain(std::iter::repeat_n(unknown.clone(), 5))
    {
        assert_eq!(upgrade(&server, &token).await, 401);
    }
    let allowed = (burst.elapsed().as_secs_f64() / min_interval.as_secs_f64()).floor() as usize;
    let made = idp.fetches() - 2;
    assert!(
        made <= allowed && made < 10,
        "{made} fetches for 10 unknown-kid tokens in {:?}",
        burst.elapsed()
    );
    assert_eq!(
        metric(
            &server,
            r#"tidings_jwks_fetches_total{outcome="rate_limited"}"#
        )
        .await,
        (10 - made) as f64
    );

    // After the interval one refresh is allowed; the old key is still not served.
    tokio::time::sleep(min_interval + Duration::from_millis(100)).await;
    let before = idp.fetches();
    assert_eq!(upgrade(&server, &rsa_token()).await, 401);
    assert_eq!(idp.fetches(), before + 1);

    // The provider goes down: a refresh fails, and the last good set is kept.
    idp.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(min_interval + Duration::from_millis(100)).await;
    assert_eq!(upgrade(&server, &unknown).await, 401);
    assert_eq!(idp.fetches(), before + 2, "the refresh was attempted");
    assert_eq!(
        metric(
            &server,
            r#"tidings_jwks_fetches_total{outcome="http_status"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        upgrade(&server, &ec_token()).await,
        101,
        "last good set kept"
    );
    assert_eq!(metric(&server, "tidings_jwks_keys").await, 1.0);
    assert_eq!(
        metric(&server, r#"tidings_jwks_fetches_total{outcome="ok"}"#).await,
        (before + 1) as f64
    );
    server.shutdown().await;
}

#[tokio::test]
async fn starts_while_the_idp_is_down_and_uses_keys_once_it_answers() {
    let min_interval = Duration::from_millis(500);
    let (idp, url) = idp(&["rsa-1", "ec-1"], false).await;
    let server = start(broker_config(&url, min_interval)).await;
    server
        .wait_for_metric(r#"tidings_jwks_fetches_total{outcome="http_status"}"#, 1.0)
        .await;
    // Serving and ready without a key set; JWTs are refused meanwhile.
    let (status, _) = server.get("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&server, "tidings_jwks_keys").await, 0.0);
    assert_eq!(upgrade(&server, &rsa_token()).await, 401);

    // The provider comes back: the next token's refresh (or the retry) loads the set.
    idp.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(min_interval + Duration::from_millis(100)).await;
    assert_eq!(upgrade(&server, &rsa_token()).await, 101);
    assert_eq!(upgrade(&server, &ec_token()).await, 101);
    assert_eq!(metric(&server, "tidings_jwks_keys").await, 2.0);
    server.shutdown().await;
}

#[test]
fn only_http_and_https_jwks_urls_are_accepted() {
    for bad in ["ftp://idp.example/jwks", "/jwks.json", "http://"] {
        let err = JwtSettings {
            jwks_url: Some(bad.into()),
            ..JwtSettings::default()
        }
        .build()
        .expect_err(bad);
        assert_eq!(err.flag, "jwks-url", "{bad}");
    }
}

/// `https://`: the provider's certificate must chain to a system root. One signed by a private
/// CA (here, made in the test) is refused during the TLS handshake, before any HTTP is sent:
/// the fetch counts as `unreachable`, no key is loaded, and tokens stay refused.
#[tokio::test]
async fn an_https_provider_with_an_untrusted_certificate_is_refused() {
    use tokio_rustls::rustls;
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("server certificate");
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
    )
    .expect("server TLS config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("https://{}/jwks.json", listener.local_addr().expect("addr"));
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            // The client aborts the handshake (unknown issuer): accept() fails.
            if acceptor.accept(tcp).await.is_err() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let server = start(broker_config(&url, Duration::from_millis(500))).await;
    server
        .wait_for_metric(r#"tidings_jwks_fetches_total{outcome="unreachable"}"#, 1.0)
        .await;
    // The server sees the client's alert a moment after the client gave up.
    let deadline = std::time::Instant::now() + support::WAIT;
    while refused.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no TLS handshake reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&server, "tidings_jwks_keys").await, 0.0);
    assert_eq!(
        metric(&server, r#"tidings_jwks_fetches_total{outcome="ok"}"#).await,
        0.0
    );
    assert_eq!(upgrade(&server, &rsa_token()).await, 401);
    server.shutdown().await;
}
