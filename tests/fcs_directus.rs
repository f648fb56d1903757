//! The seed's Dart client, fcs_directus 1.0.0 (reference §4), and its `ChatService` example,
//! end to end: the test sends exactly the frames that client sends and parses every frame it
//! receives with that client's rules — a frame it would drop is a failure.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{directus_like, start, Received, WsClient};
use tidings::config::AuthMode;

/// What fcs_directus hands to an `onMessage` callback.
#[derive(Debug)]
struct DirectusWebSocketMessage {
    event: Option<String>,
    data: Option<serde_json::Map<String, Value>>,
}

/// fcs_directus' decoding: a JSON object with a string `type`, `data` an object or absent,
/// `uid` a string or absent; `event` create/update/delete or null. Anything else fails the
/// typed cast and is dropped (here: the test fails).
fn fcs_parse(text: &str) -> (String, Option<String>, DirectusWebSocketMessage) {
    let v: Value = serde_json::from_str(text).expect("fcs decodes every frame as JSON");
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("fcs drops non-object frame {text}"));
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("fcs drops frame without string type {text}"));
    let data = match obj.get("data") {
        None => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => panic!("fcs drops a frame whose data is not an object: {text}"),
    };
    let uid = match obj.get("uid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => panic!("fcs drops a frame whose uid is not a string: {text}"),
    };
    let event = obj
        .get("event")
        .and_then(Value::as_str)
        .filter(|e| matches!(*e, "create" | "update" | "delete"))
        .map(str::to_string);
    (
        kind.to_string(),
        uid,
        DirectusWebSocketMessage { event, data },
    )
}

/// The `ChatService` callbacks, recorded.
#[derive(Debug, Default, PartialEq)]
struct Chat {
    new_messages: Vec<Value>,
    updated: Vec<Value>,
    deleted: Vec<String>,
    /// Server heartbeat pings answered.
    pings: usize,
}

impl Chat {
    fn handle(&mut self, message: DirectusWebSocketMessage) {
        match message.event.as_deref() {
            Some("create") => self.new_messages.push(Value::Object(
                message.data.expect("ChatMessage.fromJson(data)"),
            )),
            Some("update") => self.updated.push(Value::Object(
                message.data.expect("ChatMessage.fromJson(data)"),
            )),
            Some("delete") => {
                // `onMessageDeleted?.call(message.data['id'])` with a `void Function(String)`.
                let id = message.data.and_then(|d| d.get("id").cloned());
                match id {
                    Some(Value::String(s)) => self.deleted.push(s),
                    other => panic!("ChatService needs data['id'] as a String, got {other:?}"),
                }
            }
            _ => {}
        }
    }
}

/// Reads frames like fcs_directus does (answering pings) until `until` holds, routing
/// subscription frames with uid `sub_0` to the chat.
async fn pump(c: &mut WsClient, chat: &mut Chat, until: impl Fn(&Chat) -> bool) {
    while !until(chat) {
        let text = match c.next().await {
            Received::Text(t) => t,
            other => panic!("connection ended: {other:?}"),
        };
        support::schema::assert_server_message(&serde_json::from_str(&text).unwrap());
        let (kind, uid, message) = fcs_parse(&text);
        match kind.as_str() {
            "ping" => {
                chat.pings += 1;
                c.send(r#"{"type":"pong"}"#).await
            }
            _ if uid.as_deref() == Some("sub_0") => chat.handle(message),
            _ => {}
        }
    }
}

#[tokio::test]
async fn chat_service_example_works_end_to_end() {
    let mut config = directus_like(AuthMode::Handshake);
    config.heartbeat_period = Some(Duration::from_millis(200));
    let server = start(config).await;
    let mut c = server.ws().await;
    // connect(): auth nested under data, without waiting for the answer…
    c.send(r#"{"type":"auth","data":{"access_token":"admin-static-token"}}"#)
        .await;
    // …then subscribe(collection: 'messages', query: QueryParameters(fields: …, sort: …)).
    c.send(r#"{"type":"subscribe","data":{"collection":"messages","query":{"fields":["id","content","author.first_name","date_created"],"sort":["-date_created"]}},"uid":"sub_0"}"#).await;
    let mut chat = Chat::default();
    assert_eq!(fcs_parse(&c.recv_text().await).0, "auth");
    let (kind, uid, init) = fcs_parse(&c.recv_text().await);
    assert_eq!(
        (kind.as_str(), uid.as_deref(), init.event),
        ("subscription", Some("sub_0"), None)
    );

    let author = json!({"first_name":"Ann","last_name":"Lee","email":"ann@example.com"});
    server
        .publish(json!({"collection":"messages","event":"create","data":[
            {"id":"m1","content":"hello","author":author,"date_created":"2026-11-21T10:00:00Z","private_note":"x"},
            {"id":"m2","content":"world","author":author,"date_created":"2026-11-21T10:01:00Z"}
        ]}))
        .await;
    pump(&mut c, &mut chat, |chat| chat.new_messages.len() == 2).await;
    assert_eq!(
        chat.new_messages,
        [
            json!({"id":"m1","content":"hello","author":{"first_name":"Ann"},"date_created":"2026-11-21T10:00:00Z"}),
            json!({"id":"m2","content":"world","author":{"first_name":"Ann"},"date_created":"2026-11-21T10:01:00Z"}),
        ]
    );
    server.publish(json!({"collection":"messages","event":"update","data":{"id":"m1","content":"hello (edited)","author":author,"date_created":"2026-11-21T10:00:00Z"}})).await;
    pump(&mut c, &mut chat, |chat| chat.updated.len() == 1).await;
    assert_eq!(chat.updated[0]["content"], "hello (edited)");
    // Numeric keys too: the Dart callback is typed String, so the key arrives as a string.
    server
        .publish(json!({"collection":"messages","event":"delete","keys":["m2", 17]}))
        .await;
    pump(&mut c, &mut chat, |chat| chat.deleted.len() == 2).await;
    assert_eq!(chat.deleted, ["m2", "17"]);
    // fcs answers every server ping with a pong, which keeps the connection alive.
    let answered = chat.pings;
    pump(&mut c, &mut chat, |chat| chat.pings >= answered + 3).await;
    // disconnect(): unsubscribe(uid) without waiting, then close. The ack is the next frame
    // after any heartbeat pings.
    c.send(r#"{"type":"unsubscribe","uid":"sub_0"}"#).await;
    loop {
        let text = c.recv_text().await;
        let (kind, _, _) = fcs_parse(&text);
        if kind == "ping" {
            c.send(r#"{"type":"pong"}"#).await;
            continue;
        }
        assert_eq!(
            text,
            r#"{"type":"subscription","event":"unsubscribe","uid":"sub_0"}"#
        );
        break;
    }
    server
        .publish(
            json!({"collection":"messages","event":"create","data":{"id":"m3","content":"late"}}),
        )
        .await;
    assert_eq!(server.state.registry.counts("messages"), (0, 0));
    c.close().await;
}
