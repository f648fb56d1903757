//! `GET /v1/admin/stats` and `GET /console` against a real broker: the figures follow real
//! traffic and match `/metrics`, the answer matches `AdminStats` in protocol/openapi.yaml, the
//! admin key guards the figures and is no subscriber credential, `--console off` removes both
//! routes, and a non-loopback listen address without `--admin-key` refuses to start.

mod support;

use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{TestServer, WsClient, WAIT};
use tidings::auth::AdminKey;
use tidings::config::AuthMode;
use tidings::Config;

const ADMIN_KEY: &str = "admin-key-0123456789abcdef";

async fn stats(server: &TestServer, key: Option<&str>) -> (StatusCode, Value) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let (status, _, body) = server
        .request("GET", "/v1/admin/stats", &headers, vec![])
        .await;
    let value: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("stats answered non-JSON ({e}): {body}"));
    let component = if status == StatusCode::OK {
        "AdminStats"
    } else {
        "Error"
    };
    support::schema_check_component(component, &value);
    (status, value)
}

/// Polls the stats until `done` holds (fails after `within`).
async fn stats_until(
    server: &TestServer,
    what: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, s) = stats(server, None).await;
        assert_eq!(status, StatusCode::OK, "{s}");
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {within:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn subscribe(c: &mut WsClient, frame: Value) {
    c.send(&frame.to_string()).await;
    let init = c.recv().await;
    assert_eq!(init["event"], "init", "{init}");
}

#[tokio::test]
async fn stats_follow_connections_subscriptions_and_traffic() {
    let server = support::start_default().await;
    let (status, idle) = stats(&server, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(idle["connections"], 0);
    assert_eq!(idle["subscriptions"], 0);
    assert_eq!(idle["collections"], json!([]));
    assert_eq!(
        idle["backplane"],
        json!({"engine": "memory", "ready": true, "reconnects": 0})
    );

    let mut one = server.ws().await;
    let mut two = server.ws().await;
    subscribe(
        &mut one,
        json!({"type":"subscribe","collection":"orders","uid":"all"}),
    )
    .await;
    subscribe(
        &mut two,
        json!({"type":"subscribe","collection":"orders","uid":"all"}),
    )
    .await;
    subscribe(
        &mut one,
        json!({"type":"subscribe","collection":"orders","uid":"paid",
               "query":{"filter":{"status":{"_eq":"secret-value"}},"fields":["id","status"],"sort":["-id"]}}),
    )
    .await;
    subscribe(
        &mut two,
        json!({"type":"subscribe","collection":"items","event":"create","uid":"new"}),
    )
    .await;

    let s = stats_until(&server, "two connections", WAIT, |s| s["connections"] == 2).await;
    assert_eq!(s["subscriptions"], 4);
    let text = s.to_string();
    assert!(
        !text.contains("secret-value"),
        "filter values must not be shown: {text}"
    );
    let collections = s["collections"].as_array().expect("collections");
    let names: Vec<&str> = collections
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["items", "orders"]);
    assert_eq!(collections[0]["subscribers"], 1);
    assert_eq!(collections[0]["groups"][0]["events"], json!(["create"]));
    let orders = &collections[1];
    assert_eq!(orders["subscribers"], 3);
    let groups = orders["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2, "{orders}");
    // Two identical subscriptions with the same uid: one group, one uid bucket.
    assert_eq!(groups[0]["subscribers"], 2);
    assert_eq!(groups[0]["uids"], 1);
    assert_eq!(groups[0]["filtered"], false);
    assert_eq!(groups[0]["fields"], Value::Null);
    assert_eq!(groups[1]["subscribers"], 1);
    assert_eq!(groups[1]["filtered"], true);
    assert_eq!(groups[1]["fields"], json!(["id", "status"]));
    assert_eq!(groups[1]["sort"], json!(["-id"]));

    // Traffic: 20 events, each reaching the two `all` subscriptions (40 frames).
    for id in 1..=20 {
        server
            .publish(
                json!({"collection":"orders","event":"create","data":{"id":id,"status":"open"}}),
            )
            .await;
    }
    for c in [&mut one, &mut two] {
        for _ in 0..20 {
            assert_eq!(c.recv().await["event"], "create");
        }
    }
    let s = stats_until(&server, "the traffic", WAIT, |s| {
        s["published_events"] == 20
            && s["deliveries"].as_u64() >= Some(40)
            && s["publishes_per_second"].as_f64() > Some(0.0)
            && s["deliveries_per_second"].as_f64() > Some(0.0)
    })
    .await;
    // The figures are the metrics'.
    let metric = |name: &'static str| {
        let server = &server;
        async move { server.metric(name).await.unwrap_or(-1.0) }
    };
    assert_eq!(
        s["deliveries"].as_f64(),
        Some(metric("tidings_deliveries_total").await)
    );
    assert_eq!(
        s["drops"].as_f64(),
        Some(metric("tidings_outbox_dropped_total").await)
    );
    assert_eq!(
        s["slow_consumer_closes"].as_f64(),
        Some(metric("tidings_slow_consumer_closes_total").await)
    );
    // The sampled series (one sample a second) show the burst.
    stats_until(
        &server,
        "the burst in the series",
        Duration::from_secs(5),
        |s| {
            s["series"]["publishes_per_second"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x.as_f64() > Some(0.0)))
                && s["series"]["connections"]
                    .as_array()
                    .is_some_and(|v| v.last() == Some(&json!(2)))
        },
    )
    .await;

    two.close().await;
    let s = stats_until(&server, "one connection left", WAIT, |s| {
        s["connections"] == 1
    })
    .await;
    assert_eq!(s["subscriptions"], 2);
    assert_eq!(s["collections"].as_array().map(Vec::len), Some(1));
}

fn with_admin_key(config: Config) -> Config {
    Config {
        admin_key: Some(AdminKey::new(ADMIN_KEY).expect("admin key")),
        ..config
    }
}

#[tokio::test]
async fn the_admin_key_guards_the_figures_and_is_no_subscriber_credential() {
    let server = support::start(with_admin_key(support::directus_like(AuthMode::Handshake))).await;
    for key in [None, Some("wrong-key-0123456789"), Some("")] {
        let (status, body) = stats(&server, key).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}: {body}");
        assert_eq!(body["error"]["code"], "UNAUTHORIZED");
        assert_eq!(body["error"]["where"], "authorization");
    }
    let (status, _) = stats(&server, Some(ADMIN_KEY)).await;
    assert_eq!(status, StatusCode::OK);
    let lower = format!("bearer {ADMIN_KEY}");
    let (status, _, _) = server
        .request(
            "GET",
            "/v1/admin/stats",
            &[("authorization", lower.as_str())],
            vec![],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the scheme is case-insensitive");

    // The admin key opens no subscription: the WebSocket refuses it as a token.
    let mut ws = server.ws().await;
    ws.send(&json!({"type":"auth","access_token":ADMIN_KEY}).to_string())
        .await;
    let answer = ws.recv().await;
    assert_eq!(answer["status"], "error", "{answer}");
    assert_eq!(answer["error"]["code"], "AUTH_FAILED", "{answer}");

    // The page is static (it holds no figures) and asks for the key.
    let (status, headers, page) = server.request("GET", "/console", &[], vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/html")));
    assert!(page.contains(r#"<meta name="tidings-ws-path" content="/websocket">"#));
    assert!(page.contains(r#"<meta name="tidings-auth-mode" content="handshake">"#));
    assert!(page.contains(r#"<meta name="tidings-admin-key-required" content="true">"#));
    assert!(page.contains("from '/console/tidings-client.js'"));
    let (status, headers, js) = server
        .request("GET", "/console/tidings-client.js", &[], vec![])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/javascript")));
    let dist = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/js/dist/index.js"
    ))
    .expect("dist");
    assert!(js == dist, "the console serves the built client");
}

#[tokio::test]
async fn console_off_routes_neither_page_nor_figures() {
    let server = support::start(Config {
        console: false,
        ..Config::default()
    })
    .await;
    for path in ["/console", "/console/tidings-client.js", "/v1/admin/stats"] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        let body: Value = serde_json::from_str(&body).expect("JSON 404");
        assert_eq!(body["error"]["code"], "NOT_FOUND");
    }
}

#[test]
fn a_non_loopback_address_without_an_admin_key_refuses_to_start() {
    // The check runs on the flags, before anything is bound.
    let out = support::process::run(
        &["serve", "--listen", "0.0.0.0:0"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.describe("serve"));
    assert!(
        out.stderr.contains("--admin-key") && out.stderr.contains("open to anyone"),
        "{}",
        out.describe("serve")
    );
    let out = support::process::run(
        &["serve", "--listen", "[::]:0", "--admin-key", "short"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.describe("serve"));
    assert!(
        out.stderr.contains("at least 16 bytes"),
        "{}",
        out.describe("serve")
    );
}

#[test]
fn without_a_key_only_loopback_addresses_may_serve_the_console() {
    // What `into_config` checks for `--listen` and `App::serve_with` for an embedder's
    // listener (tests bind loopback only, so this is checked on addresses, not listeners).
    let open: std::net::SocketAddr = "10.1.2.3:8080".parse().expect("addr");
    let refused = tidings::config::check_admin_exposure(true, false, open).expect_err("refused");
    assert_eq!(refused.flag, "admin-key");
    assert!(tidings::config::check_admin_exposure(true, true, open).is_ok());
    assert!(tidings::config::check_admin_exposure(false, false, open).is_ok());
    for lo in ["127.0.0.1:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
        let lo: std::net::SocketAddr = lo.parse().expect("addr");
        assert!(tidings::config::check_admin_exposure(true, false, lo).is_ok());
    }
}
