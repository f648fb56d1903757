//! Test harness: a real broker on 127.0.0.1:0, real WebSocket and HTTP clients, every wait
//! bounded by a timeout, every server frame checked against `protocol/schemas/`.
#![allow(dead_code)]

pub mod control;
pub mod process;
#[path = "schema.rs"]
pub mod schema;
pub mod services;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tidings::app::App;
use tidings::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// What tests may look at inside a running broker, through `App`'s accessors.
#[derive(Clone)]
pub struct ServerState {
    pub config: Arc<tidings::Config>,
    pub metrics: Arc<tidings::metrics::Metrics>,
    pub registry: Arc<tidings::registry::Registry>,
    pub hub: Arc<tidings::hub::Hub>,
    pub backplane: Arc<dyn tidings::backplane::Backplane>,
    pub ready: tidings::readiness::Readiness,
    /// The WebSocket sessions still running.
    pub sessions: tokio_util::task::TaskTracker,
}

impl ServerState {
    pub fn of(app: &App) -> Arc<ServerState> {
        Arc::new(ServerState {
            config: app.config().clone(),
            metrics: app.metrics().clone(),
            registry: app.registry().clone(),
            hub: app.hub().clone(),
            backplane: app.backplane().clone(),
            ready: app.readiness().clone(),
            sessions: app.ws_state().sessions.clone(),
        })
    }
}

/// A running broker.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<ServerState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Starts a broker with `config` on a free loopback port.
pub async fn start(config: Config) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = App::new(config).expect("valid config");
    let state = ServerState::of(&app);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.serve(listener, async move {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    TestServer {
        addr,
        state,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Bound on a cluster node becoming (un)ready or a backplane metric moving: reconnects back
/// off, and a loaded machine is slow.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(20);

/// Starts a cluster node with `config` and waits until its backplane is ready.
pub async fn start_ready(config: Config) -> TestServer {
    let server = start(config).await;
    server.wait_ready(true).await;
    server
}

/// Starts a broker on the embedded defaults.
pub async fn start_default() -> TestServer {
    start(Config::default()).await
}

/// The embedded defaults, with `collections` retaining their items (`--state`).
pub fn retaining(collections: &[&str]) -> Config {
    let defaults = Config::default();
    Config {
        state: tidings::state::StateSettings {
            collections: collections.iter().map(|c| c.to_string()).collect(),
            ..defaults.state.clone()
        },
        ..defaults
    }
}

/// A config with static tokens like the reference recordings: `admin-static-token` reads
/// everything, `reader-static-token` reads `messages` only.
pub fn directus_like(mode: tidings::config::AuthMode) -> Config {
    Config {
        auth_mode: mode,
        tokens: tidings::auth::TokenStore::from_json(
            r#"{"admin-static-token":{"sub":"admin","collections":{"*":{}}},
                "reader-static-token":{"sub":"reader","collections":{"messages":{}}}}"#,
        )
        .expect("tokens"),
        public_permissions: tidings::auth::Permissions::collections(["messages"]),
        ..Config::default()
    }
}

impl TestServer {
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.addr, self.state.config.ws_path)
    }

    /// Opens a WebSocket (panics if the upgrade is refused).
    pub async fn ws(&self) -> WsClient {
        self.ws_at(&self.ws_url()).await
    }

    /// Opens a WebSocket subscribed to each (collection, uid), every `init` empty.
    pub async fn ws_subscribed(&self, subs: &[(&str, &str)]) -> WsClient {
        let mut ws = self.ws().await;
        for (collection, uid) in subs {
            ws.send(&format!(
                r#"{{"type":"subscribe","collection":"{collection}","uid":"{uid}"}}"#
            ))
            .await;
            ws.expect(&format!(
                r#"{{"type":"subscription","event":"init","data":[],"uid":"{uid}"}}"#
            ))
            .await;
        }
        ws
    }

    /// Opens a WebSocket with `?access_token=`.
    pub async fn ws_token(&self, token: &str) -> WsClient {
        self.ws_at(&format!("{}?access_token={token}", self.ws_url()))
            .await
    }

    pub async fn ws_at(&self, url: &str) -> WsClient {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect");
        WsClient { ws }
    }

    /// Tries an upgrade and returns the HTTP status of a refusal (or 101).
    pub async fn ws_status(&self, url: &str) -> u16 {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("timed out")
        {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    /// POSTs JSON to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_raw(
            path,
            Some("application/json"),
            body.to_string().into_bytes(),
            &[],
        )
        .await
    }

    /// Publishes via `POST /v1/publish` and asserts 202.
    pub async fn publish(&self, body: Value) -> Value {
        let (status, answer) = self.post("/v1/publish", &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "publish refused: {answer}");
        answer
    }

    /// POSTs raw bytes with an optional content type and extra headers.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::post(format!("http://{}{path}", self.addr));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (status, text) = send(req.body(Full::new(Bytes::from(body))).expect("request")).await;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Any method, with headers: status, response headers and body text.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, hyper::HeaderMap, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("request");
        let response = tokio::time::timeout(WAIT, http_client().request(req))
            .await
            .expect("HTTP request timed out")
            .expect("HTTP request");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.expect("body");
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        (status, headers, text)
    }

    /// GETs `path`, returning status and body text.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        get_at(self.addr, path).await
    }

    /// The value of one metric series (exact line prefix `name{labels}`), or None.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(self.addr, series).await
    }

    /// Polls `/metrics` until `series` reaches `at_least` (fails after [`WAIT`]).
    pub async fn wait_for_metric(&self, series: &str, at_least: f64) {
        self.wait_for_metric_within(series, at_least, WAIT).await;
    }

    /// Polls `/readyz` until it answers 200 (`ready`) or 503 (fails after [`CLUSTER_WAIT`]).
    pub async fn wait_ready(&self, ready: bool) {
        let want = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let deadline = tokio::time::Instant::now() + CLUSTER_WAIT;
        loop {
            let (status, _) = self.get("/readyz").await;
            if status == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz stayed {status} for {CLUSTER_WAIT:?}, wanted {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/metrics` until `series` reaches `at_least` (fails after [`CLUSTER_WAIT`]).
    pub async fn wait_for_cluster_metric(&self, series: &str, at_least: f64) {
        self.wait_for_metric_within(series, at_least, CLUSTER_WAIT)
            .await;
    }

    /// Polls `/metrics` until `series` reaches `at_least` (fails after `within`).
    pub async fn wait_for_metric_within(&self, series: &str, at_least: f64, within: Duration) {
        wait_for_metric_at(self.addr, series, at_least, within).await;
    }

    /// Triggers shutdown and waits for `serve` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("shutdown timed out")
                .expect("serve task");
        }
    }

    /// Triggers shutdown without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("running")
    }
}

/// GETs `path` from the server at `addr` (in this process or not): status and body text.
pub async fn get_at(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(req).await
}

/// The value of one metric series (exact line prefix `name{labels}`) of the server at
/// `addr`, or None.
pub async fn metric_at(addr: SocketAddr, series: &str) -> Option<f64> {
    let (_, text) = get_at(addr, "/metrics").await;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls the `/metrics` of the server at `addr` until `series` reaches `at_least` (fails
/// after `within`).
pub async fn wait_for_metric_at(addr: SocketAddr, series: &str, at_least: f64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = metric_at(addr, series).await.unwrap_or(0.0);
        if v >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr}: {series} stayed at {v}, wanted {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn send(req: Request<Full<Bytes>>) -> (StatusCode, String) {
    send_with(&http_client(), req).await
}

/// A plain HTTP/1 client (keep-alive), for tests that publish from a task of their own.
pub type Http = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A new [`Http`] client.
pub fn http_client() -> Http {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

/// POSTs JSON to `addr` with `client` and asserts 202.
pub async fn post_with(client: &Http, addr: SocketAddr, path: &str, body: &Value) -> Value {
    let req = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let (status, text) = send_with(client, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    serde_json::from_str(&text).expect("json")
}

async fn send_with(client: &Http, req: Request<Full<Bytes>>) -> (StatusCode, String) {
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("http timed out")
        .expect("http");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A WebSocket client over a socket with a tiny receive buffer, for tests that need a client
/// which stops reading to back up quickly.
pub async fn raw_ws_small_buffer(server: &TestServer) -> WebSocketStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(server.addr).await.expect("connect");
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(server.ws_url(), stream),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake");
    ws
}

/// Checks an HTTP API answer (publish response or error) against `protocol/openapi.yaml`'s
/// component schemas: `PublishResponse` or `Error`.
pub fn schema_check_http(answer: &Value) {
    let name = if answer["error"]["code"] == "PARTIALLY_ACCEPTED" {
        "PartialPublish"
    } else if answer.get("error").is_some() {
        "Error"
    } else {
        "PublishResponse"
    };
    schema_check_component(name, answer);
}

/// Checks `answer` against `#/components/schemas/NAME` of `protocol/openapi.yaml`.
pub fn schema_check_component(name: &str, answer: &Value) {
    use std::sync::OnceLock;
    static COMPONENTS: OnceLock<Value> = OnceLock::new();
    let components = COMPONENTS.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/protocol/openapi.yaml");
        let text = std::fs::read_to_string(path).expect("openapi.yaml");
        let doc: Value = serde_yaml::from_str(&text).expect("openapi yaml");
        doc["components"].clone()
    });
    let schema = serde_json::json!({"$ref": format!("#/components/schemas/{name}"), "components": components});
    let validator = jsonschema::validator_for(&schema).expect("compile openapi component");
    let errors: Vec<String> = validator
        .iter_errors(answer)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{answer} does not match {name}: {errors:?}"
    );
}

/// Asserts an HTTP error answer exactly: its status, `code`, `where` (`""` when absent) and
/// `message` (not checked when `message` is empty), and that it matches the OpenAPI `Error`.
pub fn assert_error(
    what: &str,
    (got, answer): (StatusCode, &Value),
    status: StatusCode,
    code: &str,
    pointer: &str,
    message: &str,
) {
    assert_eq!(got, status, "{what}: {answer}");
    let error = &answer["error"];
    assert_eq!(error["code"], code, "{what}: {answer}");
    assert_eq!(
        error["where"].as_str().unwrap_or(""),
        pointer,
        "{what}: {answer}"
    );
    if !message.is_empty() {
        assert_eq!(error["message"], message, "{what}: {answer}");
    }
    schema_check_http(answer);
}

/// Subscribes to `orders` with `query` as `uid` on a new connection; the connection and
/// the first frame it gets (the `init`).
pub async fn subscribe_orders(server: &TestServer, uid: &str, query: Value) -> (WsClient, String) {
    let mut c = server.ws().await;
    c.send(
        &serde_json::json!({"type":"subscribe","collection":"orders","uid":uid,"query":query})
            .to_string(),
    )
    .await;
    let init = c.recv_text().await;
    (c, init)
}

/// Two subscriptions to an empty `orders`: `a` to everything, `o` to `status` `open`.
pub async fn all_and_open(server: &TestServer) -> (WsClient, WsClient) {
    let (all, first) = subscribe_orders(server, "a", serde_json::json!({})).await;
    assert_eq!(first, init_frame("a", serde_json::json!([])));
    let open = serde_json::json!({"filter":{"status":{"_eq":"open"}}});
    let (open, _) = subscribe_orders(server, "o", open).await;
    (all, open)
}

/// The `init` frame a collection subscription `uid` gets with `data`.
pub fn init_frame(uid: &str, data: Value) -> String {
    format!(r#"{{"type":"subscription","event":"init","data":{data},"uid":"{uid}"}}"#)
}

/// The `event` frame a subscription `uid` gets with `data`.
pub fn frame(event: &str, uid: &str, data: Value) -> String {
    format!(r#"{{"type":"subscription","event":"{event}","data":{data},"uid":"{uid}"}}"#)
}

/// [`frame`] of a transition: `cause` is `enter` or `leave`.
pub fn caused(event: &str, uid: &str, data: Value, cause: &str) -> String {
    format!(
        r#"{{"type":"subscription","event":"{event}","data":{data},"uid":"{uid}","cause":"{cause}"}}"#
    )
}

/// What arrived on a socket.
#[derive(Debug)]
pub enum Received {
    Text(String),
    Close(Option<CloseFrame>),
    /// The stream ended without a close frame.
    Ended,
}

/// A real WebSocket client.
pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Sends a text frame as is (may be malformed on purpose).
    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Next data or close event, skipping control frames.
    pub async fn next(&mut self) -> Received {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match m {
                None => return Received::Ended,
                Some(Err(_)) => return Received::Ended,
                Some(Ok(Message::Text(t))) => return Received::Text(t.to_string()),
                Some(Ok(Message::Close(f))) => return Received::Close(f),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Next text frame, exactly as sent; checked against the server schema.
    ///
    /// The Tidings extension fields (`position`, `recovered`) are checked and then removed, so
    /// what is left can be compared byte for byte with what Directus sends.
    pub async fn recv_text(&mut self) -> String {
        strip_extensions(&self.recv_raw_text().await)
    }

    /// Next text frame exactly as sent (schema-checked), extension fields included.
    pub async fn recv_raw_text(&mut self) -> String {
        match self.next().await {
            Received::Text(t) => {
                let v: Value = serde_json::from_str(&t)
                    .unwrap_or_else(|e| panic!("server sent non-JSON {t}: {e}"));
                schema::assert_server_message(&v);
                t
            }
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Next text frame as JSON, extension fields included.
    pub async fn recv_raw(&mut self) -> Value {
        let t = self.recv_raw_text().await;
        serde_json::from_str(&t).expect("json")
    }

    /// Next text frame as JSON.
    pub async fn recv(&mut self) -> Value {
        let t = self.recv_text().await;
        serde_json::from_str(&t).expect("json")
    }

    /// Asserts the next frame is exactly `expected` (byte for byte).
    pub async fn expect(&mut self, expected: &str) {
        let got = self.recv_text().await;
        assert_eq!(got, expected);
    }

    /// Sends and expects a reply, exactly.
    pub async fn exchange(&mut self, send: &str, expected: &str) {
        self.send(send).await;
        self.expect(expected).await;
    }

    /// Asserts nothing arrives for `dur`.
    pub async fn expect_silence(&mut self, dur: Duration) {
        if let Ok(m) = tokio::time::timeout(dur, self.ws.next()).await {
            match m {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Asserts the server closes, returning the close code (None = no status code).
    pub async fn expect_close(&mut self) -> Option<u16> {
        match self.next().await {
            Received::Close(f) => f.map(|f| u16::from(f.code)),
            Received::Ended => None,
            Received::Text(t) => panic!("expected close, got {t}"),
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Removes the Tidings extension fields from a server frame, after checking that every
/// `init` and event frame carries its `position` as the last field (before `recovered`), so
/// the rest is a Directus frame.
pub fn strip_extensions(text: &str) -> String {
    static EXT: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let ext = EXT.get_or_init(|| {
        regex::Regex::new(
            r#","position":\{"epoch":"[a-z0-9]+","offset":[0-9]+\}(,"recovered":(true|false))?\}$"#,
        )
        .expect("regex")
    });
    let v: Value = serde_json::from_str(text).expect("json");
    let carries = v["type"] == "subscription" && v["event"] != "unsubscribe";
    if !carries {
        assert!(v.get("position").is_none(), "unexpected position in {text}");
        return text.to_string();
    }
    assert!(ext.is_match(text), "no position at the end of {text}");
    ext.replace(text, "}").into_owned()
}
