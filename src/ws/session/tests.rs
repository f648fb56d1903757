//! The session driven through channels (axum's `testing-websockets` shape): a real `App`
//! (memory engine) behind it, no socket. Timers run on tokio's paused clock where a test
//! waits for one, so the handshake window, a JWT's expiry and the re-auth window pass
//! instantly and in order.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{PollSendError, PollSender};

use super::{drive, Session};
use crate::app::App;
use crate::auth::{Identity, Permissions, Principal, TokenStore};
use crate::config::{AuthMode, Config};
use crate::event::{EventKind, NewEvent};

/// Longer than every timer a test waits for (on the paused clock this costs nothing).
const WAIT: Duration = Duration::from_secs(600);

/// The session's side of a pair of channels.
struct ChannelSocket {
    inbound: mpsc::Receiver<Result<Message, axum::Error>>,
    outbound: PollSender<Message>,
}

impl Stream for ChannelSocket {
    type Item = Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inbound.poll_recv(cx)
    }
}

impl Sink<Message> for ChannelSocket {
    type Error = PollSendError<Message>;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.outbound).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        Pin::new(&mut self.outbound).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.outbound).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.outbound).poll_close(cx)
    }
}

/// The client's side.
struct Client {
    tx: mpsc::Sender<Result<Message, axum::Error>>,
    rx: mpsc::Receiver<Message>,
    task: JoinHandle<()>,
}

fn peer() -> SocketAddr {
    "127.0.0.1:40000".parse().unwrap()
}

fn connect(app: &App, identity: Option<Identity>) -> Client {
    let (tx, inbound) = mpsc::channel(16);
    let (outbound, rx) = mpsc::channel(64);
    let state = app.ws_state().clone();
    let slot = state.limits.acquire(peer().ip()).expect("a slot");
    let socket = ChannelSocket {
        inbound,
        outbound: PollSender::new(outbound),
    };
    let task = tokio::spawn(drive(state, identity, peer(), slot, socket));
    Client { tx, rx, task }
}

impl Client {
    async fn send(&self, message: Value) {
        self.tx
            .send(Ok(Message::Text(message.to_string().into())))
            .await
            .expect("session gone");
    }

    async fn recv(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("no frame in time")
            .expect("session ended without a close frame")
    }

    async fn frame(&mut self) -> Value {
        match self.recv().await {
            Message::Text(text) => serde_json::from_str(text.as_str()).expect("JSON frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The close frame's code (`None`: a close without a code).
    async fn close_code(&mut self) -> Option<u16> {
        match self.recv().await {
            Message::Close(frame) => frame.map(|CloseFrame { code, .. }| code),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    async fn ended(self) {
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("session did not end")
            .expect("session panicked");
    }
}

fn tokens() -> TokenStore {
    TokenStore::from_json(
        r#"{"admin-static-token":{"sub":"admin","collections":{"*":{}}},
            "reader-static-token":{"sub":"reader","collections":{"messages":{}}}}"#,
    )
    .unwrap()
}

fn app(mode: AuthMode) -> App {
    App::new(Config {
        auth_mode: mode,
        tokens: tokens(),
        public_permissions: Permissions::collections(["messages"]),
        heartbeat_period: None,
        auth_timeout: Duration::from_secs(5),
        ..Config::default()
    })
    .expect("valid config")
}

async fn publish(app: &App, id: i64) {
    app.backplane()
        .publish(vec![NewEvent {
            collection: "messages".into(),
            kind: EventKind::Create,
            items: vec![json!({"id": id, "text": "hi"})],
            keys: vec![json!(id)],
            before: Vec::new(),
            version: None,
            apply: Default::default(),
            idempotency_key: None,
        }])
        .await
        .expect("published");
}

fn subscribe(uid: &str) -> Value {
    json!({"type": "subscribe", "collection": "messages", "uid": uid})
}

fn assert_event(frame: &Value, uid: &str, id: i64) {
    assert_eq!(frame["type"], "subscription", "{frame}");
    assert_eq!(frame["event"], "create", "{frame}");
    assert_eq!(frame["uid"], uid, "{frame}");
    assert_eq!(frame["data"][0]["id"], id, "{frame}");
}

fn assert_init(frame: &Value, uid: &str) {
    assert_eq!(frame["type"], "subscription", "{frame}");
    assert_eq!(frame["event"], "init", "{frame}");
    assert_eq!(frame["uid"], uid, "{frame}");
}

fn assert_error(frame: &Value, kind: &str, code: &str) {
    assert_eq!(frame["type"], kind, "{frame}");
    assert_eq!(frame["status"], "error", "{frame}");
    assert_eq!(frame["error"]["code"], code, "{frame}");
}

#[tokio::test(start_paused = true)]
async fn handshake_auth_first_then_subscribe() {
    let app = app(AuthMode::Handshake);
    let mut c = connect(&app, None);
    c.send(json!({"type": "auth", "access_token": "reader-static-token", "uid": 1}))
        .await;
    assert_eq!(
        c.frame().await,
        json!({"type": "auth", "status": "ok", "uid": 1})
    );
    c.send(subscribe("s")).await;
    assert_init(&c.frame().await, "s");
    publish(&app, 1).await;
    assert_event(&c.frame().await, "s", 1);
    drop(c.tx);
    c.task.await.unwrap();
    assert_eq!(app.registry().counts("messages"), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn handshake_refuses_anything_but_auth_first() {
    let app = app(AuthMode::Handshake);
    let mut c = connect(&app, None);
    c.send(subscribe("s")).await;
    assert_error(&c.frame().await, "auth", "AUTH_FAILED");
    assert_eq!(c.close_code().await, None);
    c.ended().await;
    assert_eq!(app.registry().counts("messages"), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn handshake_window_closes_after_the_auth_timeout() {
    let app = app(AuthMode::Handshake);
    let mut c = connect(&app, None);
    let started = tokio::time::Instant::now();
    assert_error(&c.frame().await, "auth", "AUTH_FAILED");
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(c.close_code().await, None);
    c.ended().await;
    let closed = app
        .metrics()
        .connections_closed
        .with_label_values(&["auth_failed"])
        .get();
    assert_eq!(closed, 1);
}

/// An identity (as the upgrade URL's JWT would give) that expires in a minute.
fn expiring_reader() -> Identity {
    Identity {
        principal: Arc::new(Principal::new(
            Some("jwt-user".into()),
            Permissions::collections(["messages"]),
        )),
        expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
    }
}

#[tokio::test(start_paused = true)]
async fn expiry_suspends_and_reauth_resumes_the_subscriptions() {
    let app = app(AuthMode::Handshake);
    let mut c = connect(&app, Some(expiring_reader()));
    c.send(subscribe("s")).await;
    assert_init(&c.frame().await, "s");
    publish(&app, 1).await;
    assert_event(&c.frame().await, "s", 1);

    // Nothing else is pending: the paused clock runs to the token's expiry.
    assert_error(&c.frame().await, "auth", "TOKEN_EXPIRED");
    assert_eq!(
        app.registry().counts("messages"),
        (1, 1),
        "suspended, not removed"
    );
    publish(&app, 2).await;
    c.send(json!({"type": "auth", "access_token": "reader-static-token"}))
        .await;
    // A reply flushes queued events first: an event here would have been delivered while
    // suspended.
    assert_eq!(c.frame().await, json!({"type": "auth", "status": "ok"}));
    publish(&app, 3).await;
    assert_event(&c.frame().await, "s", 3);

    // A static token never expires and the re-auth window is over: only the client ends it.
    drop(c.tx);
    let end = c.rx.recv().await;
    assert!(end.is_none(), "nothing after the client left: {end:?}");
    assert_eq!(app.registry().counts("messages"), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn expiry_without_reauth_times_out_and_closes() {
    let app = app(AuthMode::Handshake);
    let mut c = connect(&app, Some(expiring_reader()));
    c.send(subscribe("s")).await;
    assert_init(&c.frame().await, "s");
    assert_error(&c.frame().await, "auth", "TOKEN_EXPIRED");
    let expired = tokio::time::Instant::now();
    assert_error(&c.frame().await, "auth", "AUTH_TIMEOUT");
    assert_eq!(expired.elapsed(), Duration::from_secs(5));
    assert_eq!(c.close_code().await, None);
    c.ended().await;
    assert_eq!(app.registry().counts("messages"), (0, 0));
    let closed = app
        .metrics()
        .connections_closed
        .with_label_values(&["auth_timeout"])
        .get();
    assert_eq!(closed, 1);
}

#[tokio::test(start_paused = true)]
async fn public_mode_expiry_falls_back_to_public_rights() {
    let app = app(AuthMode::Public);
    let mut c = connect(&app, Some(expiring_reader()));
    c.send(subscribe("s")).await;
    assert_init(&c.frame().await, "s");
    assert_error(&c.frame().await, "auth", "TOKEN_EXPIRED");
    assert_error(&c.frame().await, "auth", "AUTH_TIMEOUT");
    // `messages` is public: the subscription is recompiled under the public rights.
    publish(&app, 7).await;
    assert_event(&c.frame().await, "s", 7);
}

#[tokio::test(start_paused = true)]
async fn a_reused_uid_replaces_the_subscription() {
    let app = app(AuthMode::Public);
    let mut c = connect(&app, None);
    c.send(subscribe("a")).await;
    assert_init(&c.frame().await, "a");
    c.send(
        json!({"type": "subscribe", "collection": "messages", "uid": "a",
                  "query": {"filter": {"id": {"_eq": 2}}}}),
    )
    .await;
    assert_init(&c.frame().await, "a");
    assert_eq!(
        app.registry().counts("messages"),
        (1, 1),
        "one left, the new one"
    );
    publish(&app, 1).await;
    publish(&app, 2).await;
    // Only the replacement's filter applies, and only one copy arrives.
    assert_event(&c.frame().await, "a", 2);
    c.send(json!({"type": "unsubscribe", "uid": "a"})).await;
    assert_eq!(
        c.frame().await,
        json!({"type": "subscription", "event": "unsubscribe", "uid": "a"})
    );
    assert_eq!(app.registry().counts("messages"), (0, 0));
}

fn resume_from(app: &App, offset: u64) -> Value {
    let epoch = app.hub().history().epoch();
    json!({"type": "subscribe", "collection": "messages", "uid": "r",
           "since": {"epoch": &*epoch, "offset": offset}})
}

/// A client that saw offset 2 on a node that is ahead reconnects here, where nothing has
/// arrived yet: it waits (registered nowhere, answered nothing) until this node catches up,
/// then is told its position was recovered, with nothing replayed twice.
#[tokio::test]
async fn a_resume_from_ahead_waits_for_this_node_to_catch_up() {
    let app = app(AuthMode::Public);
    let mut c = connect(&app, None);
    c.send(resume_from(&app, 2)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        c.rx.try_recv().is_err(),
        "no init before this node caught up"
    );
    assert_eq!(app.registry().counts("messages"), (0, 0));
    publish(&app, 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(c.rx.try_recv().is_err(), "offset 1 is not offset 2 yet");
    publish(&app, 2).await;
    let init = c.frame().await;
    assert_init(&init, "r");
    assert_eq!(init["recovered"], true, "{init}");
    assert_eq!(init["position"]["offset"], 2, "{init}");
    publish(&app, 3).await;
    assert_event(&c.frame().await, "r", 3);
    let resumes = app
        .metrics()
        .resumes
        .with_label_values(&["recovered"])
        .get();
    assert_eq!(resumes, 1);
}

#[tokio::test(start_paused = true)]
async fn a_resume_from_ahead_is_lost_when_this_node_never_catches_up() {
    let app = app(AuthMode::Public);
    let mut c = connect(&app, None);
    let started = tokio::time::Instant::now();
    c.send(resume_from(&app, 5)).await;
    let init = c.frame().await;
    assert_eq!(started.elapsed(), super::subscriptions::RESUME_CATCH_UP);
    assert_init(&init, "r");
    assert_eq!(init["recovered"], false, "{init}");
    assert_eq!(app.registry().counts("messages"), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn replies_follow_the_events_queued_before_them() {
    let app = app(AuthMode::Public);
    let mut c = connect(&app, None);
    c.send(subscribe("s")).await;
    assert_init(&c.frame().await, "s");
    publish(&app, 1).await;
    c.send(json!({"type": "unsubscribe", "uid": "s"})).await;
    assert_event(&c.frame().await, "s", 1);
    assert_eq!(c.frame().await["event"], "unsubscribe");
}

/// Coalescing (`--coalesce-yields`) must never hold a frame back: after a write that carried
/// several frames the session is "busy" and yields before its next write, yet a lone event
/// still goes out at once (on the paused clock a stuck session would time the test out).
#[tokio::test(start_paused = true)]
async fn a_busy_session_still_writes_a_lone_event_at_once() {
    let app = app(AuthMode::Public);
    let mut c = connect(&app, None);
    c.send(subscribe("s")).await;
    assert_init(&c.frame().await, "s");
    // The session does not run while this task publishes: one wake-up finds all three.
    for id in 1..=3 {
        publish(&app, id).await;
    }
    for id in 1..=3 {
        assert_event(&c.frame().await, "s", id);
    }
    publish(&app, 4).await;
    assert_event(&c.frame().await, "s", 4);
    let writes = &app.metrics().frames_per_write;
    // init alone, the three together, then the lone one.
    assert_eq!(writes.get_sample_count(), 3);
    assert_eq!(writes.get_sample_sum(), 5.0);
}

#[tokio::test(start_paused = true)]
async fn socket_errors_map_to_close_codes() {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
    let app = app(AuthMode::Public);
    let cases = [
        (
            Error::Capacity(CapacityError::MessageTooLong {
                size: 2,
                max_size: 1,
            }),
            1009,
            "frame_too_big",
        ),
        (Error::Utf8("bad".into()), 1007, "invalid_payload"),
    ];
    for (error, code, reason) in cases {
        let mut c = connect(&app, None);
        c.tx.send(Err(axum::Error::new(error))).await.unwrap();
        assert_eq!(c.close_code().await, Some(code));
        c.ended().await;
        let closed = app
            .metrics()
            .connections_closed
            .with_label_values(&[reason])
            .get();
        assert_eq!(closed, 1, "{reason}");
    }
}

/// Sessions are idle almost all of their life, one per connection: the idle-memory figure in
/// BENCHMARKS.md (about 3.7 KB per connection) includes this future. It must not grow
/// unnoticed; raise the bound only with a new measurement.
#[test]
fn the_session_future_stays_small() {
    fn future_size<S, F: std::future::Future>(_: impl FnOnce(S) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let app = app(AuthMode::Public);
    let state = app.ws_state().clone();
    let slot = state.limits.acquire(peer().ip()).unwrap();
    let session = Session::new(state, None, peer(), slot);
    let size = future_size(move |socket: axum::extract::ws::WebSocket| session.run(socket));
    println!("session future over axum's WebSocket: {size} bytes");
    assert!(size <= SESSION_FUTURE_BOUND, "{size} bytes");
}

/// Measured on x86_64 with rustc 1.9x stable: 1,480 B before the split (at `a83b8cf`, the same
/// probe over the concrete session), 1,464 B after it, 1,504 B with the outbox timer of
/// `max_rate` (its field and its `select!` branch; one branch polling both the outbox and the
/// timer measured bigger, 1,528 B).
const SESSION_FUTURE_BOUND: usize = 1504;
