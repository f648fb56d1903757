//! Hostile input, one table per surface: WebSocket frames, row-rule bypass attempts, HTTP
//! publish bodies, and upgrade / `auth` tokens. Every row states its input and the exact
//! answer (reply frame, close code or HTTP status and error code). After every row a
//! well-behaved client on the same broker must still get its events, and a hostile
//! connection that was not closed must still answer a ping.

#[path = "support/jwt.rs"]
mod jwt;
mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{start, TestServer, WsClient};
use tidings::auth::{JwtSettings, Permissions, TokenStore};
use tidings::config::AuthMode;
use tidings::Config;

/// A broker with a restricted subscriber (`alice`), an unrestricted one (`admin`), JWTs
/// (HS256 and RS256) and small limits, so every limit can be hit cheaply.
fn hostile_config(mode: AuthMode) -> Config {
    Config {
        auth_mode: mode,
        tokens: TokenStore::from_json(
            r#"{"t-alice":{"sub":"alice","collections":{"orders":{
                    "filter":{"owner":{"_eq":"$CURRENT_USER"}},
                    "fields":["id","owner","status","total"]}}},
                "t-admin":{"sub":"admin","collections":{"*":{}}}}"#,
        )
        .expect("tokens"),
        public_permissions: Permissions::collections(["canary", "news"]),
        jwt: Some(Arc::new(
            JwtSettings {
                secret: Some(jwt::SECRET.into()),
                public_keys: vec![jwt::fixture("rsa-public.pem")],
                ..JwtSettings::default()
            }
            .build()
            .expect("jwt")
            .expect("keys"),
        )),
        max_frame_bytes: 16 * 1024,
        max_publish_bytes: 8 * 1024,
        max_publish_events: 3,
        max_subscriptions: 3,
        ..Config::default()
    }
}

/// A well-behaved client subscribed to `canary`; [`Canary::check`] proves the broker still
/// serves it.
struct Canary {
    client: WsClient,
    next: u64,
}

impl Canary {
    async fn new(server: &TestServer) -> Canary {
        let mut client = server.ws_token("t-admin").await;
        client
            .send(r#"{"type":"subscribe","collection":"canary","uid":"c"}"#)
            .await;
        assert_eq!(client.recv().await["event"], "init");
        Canary { client, next: 0 }
    }

    async fn check(&mut self, server: &TestServer, row: &str) {
        self.next += 1;
        server
            .publish(json!({"collection":"canary","event":"create","data":{"id":self.next}}))
            .await;
        let got = self.client.recv_text().await;
        assert_eq!(
            got,
            format!(
                r#"{{"type":"subscription","event":"create","data":[{{"id":{}}}],"uid":"c"}}"#,
                self.next
            ),
            "canary after row {row}"
        );
    }
}

enum Input {
    Text(String),
    Binary(Vec<u8>),
}

enum Expect {
    /// These frames, exactly, in order; the connection stays open.
    Replies(Vec<String>),
    /// A close with this code (None: without a status code).
    Close(Option<u16>),
}

fn server_error(code: &str, message: &str) -> String {
    json!({"type":"server","status":"error","error":{"code":code,"message":message}}).to_string()
}

fn subscribe_error(code: &str, message: &str, uid: &str) -> String {
    format!(
        r#"{{"type":"subscribe","status":"error","error":{{"code":"{code}","message":{}}},"uid":"{uid}"}}"#,
        serde_json::to_string(message).expect("json")
    )
}

fn forbidden_field(field: &str) -> String {
    subscribe_error(
        "FORBIDDEN",
        &format!("You don't have permission to access field \"{field}\" in collection \"orders\" or it does not exist. Queried in root."),
        "h",
    )
}

fn sub(query: Value) -> Input {
    Input::Text(
        json!({"type":"subscribe","collection":"orders","uid":"h","query":query}).to_string(),
    )
}

fn nested_and(depth: usize) -> Value {
    let mut f = json!({"owner": {"_eq": "alice"}});
    for _ in 0..depth {
        f = json!({"_and": [f]});
    }
    f
}

const PARSE: &str = "Unable to parse the incoming message.";

/// WebSocket frames from a restricted subscriber (alice), each on a fresh connection.
#[tokio::test]
async fn websocket_frames() {
    let server = start(hostile_config(AuthMode::Public)).await;
    let mut canary = Canary::new(&server).await;
    let many_nodes: serde_json::Map<String, Value> = (0..300)
        .map(|i| (format!("f{i}"), json!({"_eq": i})))
        .collect();
    let rows: Vec<(&str, Vec<Input>, Expect)> = vec![
        (
            "not JSON",
            vec![Input::Text(r#"{"type":"#.into())],
            Expect::Replies(vec![server_error("INVALID_PAYLOAD", PARSE)]),
        ),
        (
            "invalid UTF-8 in a binary frame",
            vec![Input::Binary(vec![0x7b, 0xff, 0xfe, 0x7d])],
            Expect::Replies(vec![server_error("INVALID_PAYLOAD", PARSE)]),
        ),
        (
            "lone surrogate escape",
            vec![Input::Text(r#"{"type":"ping","uid":"\ud800"}"#.into())],
            Expect::Replies(vec![server_error("INVALID_PAYLOAD", PARSE)]),
        ),
        (
            "number out of range",
            vec![Input::Text(r#"{"type":"ping","uid":1e999}"#.into())],
            Expect::Replies(vec![server_error("INVALID_PAYLOAD", PARSE)]),
        ),
        (
            "JSON nested 2000 deep",
            vec![Input::Text(format!(
                r#"{{"type":"ping","x":{}{}}}"#,
                "[".repeat(2000),
                "]".repeat(2000)
            ))],
            Expect::Replies(vec![server_error("INVALID_PAYLOAD", PARSE)]),
        ),
        (
            "array instead of object",
            vec![Input::Text("[1,2,3]".into())],
            Expect::Replies(vec![server_error(
                "INVALID_PAYLOAD",
                "Validation error: Invalid input: expected object, received array",
            )]),
        ),
        (
            "type of wrong type",
            vec![Input::Text(r#"{"type":5}"#.into())],
            Expect::Replies(vec![server_error(
                "INVALID_PAYLOAD",
                "Validation error: Invalid input: expected string, received number at \"type\"",
            )]),
        ),
        (
            "collection of wrong type",
            vec![Input::Text(r#"{"type":"subscribe","collection":["orders"],"uid":"h"}"#.into())],
            Expect::Replies(vec![json!({"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received array at \"collection\""}}).to_string()]),
        ),
        (
            "filter nested 40 deep",
            vec![sub(json!({"filter": nested_and(40)}))],
            Expect::Replies(vec![subscribe_error(
                "INVALID_QUERY",
                &format!(
                    "Invalid query. Filter is nested deeper than 16 levels at \"{}\".",
                    std::iter::repeat_n("_and.0", 16).collect::<Vec<_>>().join(".")
                ),
                "h",
            )]),
        ),
        (
            "filter with 300 operators",
            vec![sub(json!({"filter": many_nodes}))],
            Expect::Replies(vec![subscribe_error(
                "INVALID_QUERY",
                "Invalid query. Filter has more than 256 conditions at \"f256._eq\".",
                "h",
            )]),
        ),
        (
            "huge regex",
            vec![sub(json!({"filter": {"status": {"_regex": "(\\w{100}){100}"}}}))],
            Expect::Replies(vec![subscribe_error(
                "INVALID_QUERY",
                "Invalid query. \"_regex\" at \"status._regex\" is not a valid regular expression: it compiles to more than 65536 bytes.",
                "h",
            )]),
        ),
        (
            "filter on a forbidden field",
            vec![sub(json!({"filter": {"secret": {"_eq": "x"}}}))],
            Expect::Replies(vec![forbidden_field("secret")]),
        ),
        (
            "forbidden field hidden in _or/_some",
            vec![sub(json!({"filter": {"_or": [{"status": {"_eq": "paid"}}, {"secret": {"_nnull": true}}]}}))],
            Expect::Replies(vec![forbidden_field("secret")]),
        ),
        (
            "forbidden field as a JSON-string filter",
            vec![sub(json!({"filter": "{\"secret\":{\"_starts_with\":\"a\"}}"}))],
            Expect::Replies(vec![forbidden_field("secret")]),
        ),
        (
            "forbidden field in fields",
            vec![sub(json!({"fields": ["id", "secret"]}))],
            Expect::Replies(vec![forbidden_field("secret")]),
        ),
        (
            "forbidden field in json()",
            vec![sub(json!({"fields": ["json(secret, a)"]}))],
            Expect::Replies(vec![forbidden_field("secret")]),
        ),
        (
            "sort by a forbidden field",
            vec![sub(json!({"sort": ["-secret"], "limit": 1}))],
            Expect::Replies(vec![forbidden_field("secret")]),
        ),
        (
            "JSONPath where fields are restricted",
            vec![sub(json!({"jsonpath": "$.secret"}))],
            Expect::Replies(vec![subscribe_error(
                "FORBIDDEN",
                "JSONPath filters are not allowed where fields of collection \"orders\" are restricted.",
                "h",
            )]),
        ),
        (
            "collection outside the permissions",
            vec![Input::Text(r#"{"type":"subscribe","collection":"secrets","uid":"h"}"#.into())],
            Expect::Replies(vec![subscribe_error(
                "FORBIDDEN",
                "You don't have permission to access collection \"secrets\" or it does not exist. Queried in root.",
                "h",
            )]),
        ),
        (
            "path-like collection name",
            vec![Input::Text(r#"{"type":"subscribe","collection":"../orders","uid":"h"}"#.into())],
            Expect::Replies(vec![subscribe_error(
                "FORBIDDEN",
                "You don't have permission to access collection \"../orders\" or it does not exist. Queried in root.",
                "h",
            )]),
        ),
        (
            "more subscriptions than allowed",
            (0..4)
                .map(|i| Input::Text(format!(r#"{{"type":"subscribe","collection":"orders","uid":"n{i}","event":"create"}}"#)))
                .collect(),
            Expect::Replies({
                let mut r: Vec<String> = (0..3)
                    .map(|i| format!(r#"{{"type":"subscription","event":"init","uid":"n{i}"}}"#))
                    .collect();
                r.push(subscribe_error(
                    "LIMIT_EXCEEDED",
                    "Too many subscriptions on this connection (the limit is 3).",
                    "n3",
                ));
                r
            }),
        ),
        (
            "auth with alg none",
            vec![Input::Text(
                json!({"type":"auth","access_token":jwt::alg_none(&json!({"sub":"admin","exp":jwt::now()+600,"tidings":{"*":{}}})),"uid":"a"})
                    .to_string(),
            )],
            Expect::Replies(vec![r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication failed."},"uid":"a"}"#.into()]),
        ),
        (
            "auth with email and password",
            vec![Input::Text(r#"{"type":"auth","email":"admin@example.com","password":"x"}"#.into())],
            Expect::Replies(vec![r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication failed."}}"#.into()]),
        ),
        (
            "frame over the size limit",
            vec![Input::Text(format!(
                r#"{{"type":"ping","pad":"{}"}}"#,
                "x".repeat(17 * 1024)
            ))],
            Expect::Close(Some(1009)),
        ),
    ];
    for (name, inputs, expect) in rows {
        let mut c = server.ws_token("t-alice").await;
        for input in inputs {
            match input {
                Input::Text(t) => c.send(&t).await,
                Input::Binary(b) => {
                    use futures_util::SinkExt;
                    c.ws.send(tokio_tungstenite::tungstenite::Message::binary(b))
                        .await
                        .expect("send");
                }
            }
        }
        match expect {
            Expect::Replies(replies) => {
                for reply in replies {
                    assert_eq!(c.recv_text().await, reply, "row {name}");
                }
                c.exchange(
                    r#"{"type":"ping","uid":"alive"}"#,
                    r#"{"type":"pong","uid":"alive"}"#,
                )
                .await;
            }
            Expect::Close(code) => assert_eq!(c.expect_close().await, code, "row {name}"),
        }
        canary.check(&server, name).await;
    }
    assert_eq!(
        server
            .metric("tidings_connections_closed_total{reason=\"frame_too_big\"}")
            .await,
        Some(1.0)
    );
    server.shutdown().await;
}

/// Subscriptions by a row-restricted subscriber that try to see other rows or hidden fields.
/// Whatever the query, only alice's own rows arrive, with the allowed fields.
#[tokio::test]
async fn row_rule_bypass_attempts() {
    let server = start(hostile_config(AuthMode::Public)).await;
    let mut canary = Canary::new(&server).await;
    // (name, subscribe frame, the frames expected for the events below, in order).
    let alice_create = r#"{"type":"subscription","event":"create","data":[{"id":2,"owner":"alice","status":"paid","total":5}],"uid":"h"}"#;
    let alice_delete = r#"{"type":"subscription","event":"delete","data":[2],"uid":"h"}"#;
    let rows: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "no filter",
            json!({"type":"subscribe","collection":"orders","uid":"h"}),
            vec![alice_create, alice_delete],
        ),
        (
            "_or that matches everything",
            json!({"type":"subscribe","collection":"orders","uid":"h","query":{"filter":{"_or":[{"owner":{"_eq":"bob"}},{"owner":{"_neq":"bob"}}]}}}),
            vec![alice_create, alice_delete],
        ),
        (
            "filter for another owner",
            json!({"type":"subscribe","collection":"orders","uid":"h","query":{"filter":{"owner":{"_eq":"bob"}}}}),
            vec![],
        ),
        (
            "$CURRENT_USER cannot be overridden by the client",
            json!({"type":"subscribe","collection":"orders","uid":"h","query":{"filter":{"owner":{"_in":["bob","$CURRENT_USER"]}}}}),
            vec![alice_create, alice_delete],
        ),
        (
            "item subscription on another owner's item",
            json!({"type":"subscribe","collection":"orders","uid":"h","item":1}),
            vec![],
        ),
        (
            "nested dialect",
            json!({"type":"subscribe","uid":"h","data":{"collection":"orders"}}),
            vec![
                r#"{"type":"subscription","event":"create","data":{"id":2,"owner":"alice","status":"paid","total":5},"uid":"h"}"#,
                r#"{"type":"subscription","event":"delete","data":{"id":"2"},"uid":"h"}"#,
            ],
        ),
        (
            "search for another owner's name",
            json!({"type":"subscribe","collection":"orders","uid":"h","query":{"search":"bob"}}),
            vec![],
        ),
        (
            "search probing a hidden field's value",
            json!({"type":"subscribe","collection":"orders","uid":"h","query":{"search":"zzz-hidden"}}),
            vec![],
        ),
        (
            "star fields",
            json!({"type":"subscribe","collection":"orders","uid":"h","query":{"fields":["*"]}}),
            vec![alice_create, alice_delete],
        ),
        (
            "delete events only",
            json!({"type":"subscribe","collection":"orders","uid":"h","event":"delete"}),
            vec![alice_delete],
        ),
    ];
    for (name, frame, expected) in rows {
        let mut c = server.ws_token("t-alice").await;
        c.send(&frame.to_string()).await;
        assert_eq!(c.recv().await["event"], "init", "row {name}");
        for event in [
            json!({"collection":"orders","event":"create","data":{"id":1,"owner":"bob","status":"paid","total":9,"secret":"zzz-hidden"}}),
            json!({"collection":"orders","event":"create","data":{"id":2,"owner":"alice","status":"paid","total":5,"secret":"zzz-hidden"}}),
            json!({"collection":"orders","event":"update","data":{"id":1,"owner":"bob","status":"shipped","total":9}}),
            json!({"collection":"orders","event":"delete","data":{"id":1,"owner":"bob"}}),
            json!({"collection":"orders","event":"delete","keys":[1]}),
            json!({"collection":"orders","event":"delete","data":[{"id":2,"owner":"alice"}]}),
        ] {
            server.publish(event).await;
        }
        for frame in expected {
            assert_eq!(c.recv_text().await, frame, "row {name}");
        }
        c.expect_silence(Duration::from_millis(200)).await;
        canary.check(&server, name).await;
    }
    // Resuming from the start of the log replays only what the rule allows.
    let mut c = server.ws_token("t-alice").await;
    let epoch = server
        .publish(json!({"collection":"orders","event":"create","data":{"id":3,"owner":"bob"}}))
        .await["events"][0]["epoch"]
        .clone();
    c.send(
        &json!({"type":"subscribe","collection":"orders","uid":"h","event":"create","since":{"epoch":epoch,"offset":0}})
            .to_string(),
    )
    .await;
    assert_eq!(c.recv().await["event"], "init");
    // Each of the ten rows above published alice's order 2 once; bob's orders (1 and 3)
    // and the hidden field never come back.
    for _ in 0..10 {
        assert_eq!(c.recv_text().await, alice_create);
    }
    c.expect_silence(Duration::from_millis(200)).await;
    canary.check(&server, "resume").await;
    server.shutdown().await;
}

/// (name, content type, body, status, error code, `where`).
type PublishRow = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    &'static str,
    Option<&'static str>,
);

/// Publish bodies: each refused with its status and code, nothing delivered, the broker
/// still serving.
#[tokio::test]
async fn publish_bodies() {
    let server = start(hostile_config(AuthMode::Public)).await;
    let mut canary = Canary::new(&server).await;
    let json_ct = Some("application/json");
    let deep = format!(
        r#"{{"collection":"orders","event":"create","data":{{"id":1,"x":{}{}}}}}"#,
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let ev = |id: u32| json!({"collection":"orders","event":"create","data":{"id":id}});
    let rows: Vec<PublishRow> = vec![
        (
            "malformed JSON",
            json_ct,
            b"{\"collection\":".to_vec(),
            400,
            "INVALID_JSON",
            None,
        ),
        (
            "invalid UTF-8",
            json_ct,
            vec![b'"', 0xff, 0xfe, b'"'],
            400,
            "INVALID_JSON",
            None,
        ),
        (
            "JSON nested 1000 deep",
            json_ct,
            deep.into_bytes(),
            400,
            "INVALID_JSON",
            None,
        ),
        (
            "not JSON content type",
            Some("text/plain"),
            ev(1).to_string().into_bytes(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            Some("content-type"),
        ),
        (
            "body over the limit",
            json_ct,
            format!(
                r#"{{"collection":"orders","event":"create","data":{{"id":1,"pad":"{}"}}}}"#,
                "x".repeat(9000)
            )
            .into_bytes(),
            413,
            "PAYLOAD_TOO_LARGE",
            None,
        ),
        (
            "more events than allowed",
            json_ct,
            json!([ev(1), ev(2), ev(3), ev(4)]).to_string().into_bytes(),
            422,
            "INVALID_PAYLOAD",
            Some(""),
        ),
        (
            "collection of wrong type",
            json_ct,
            br#"{"collection":5,"event":"create","data":{"id":1}}"#.to_vec(),
            422,
            "INVALID_PAYLOAD",
            Some("/collection"),
        ),
        (
            "path-like collection",
            json_ct,
            br#"{"collection":"../etc","event":"create","data":{"id":1}}"#.to_vec(),
            422,
            "INVALID_PAYLOAD",
            Some("/collection"),
        ),
        (
            "unknown event kind",
            json_ct,
            br#"{"collection":"orders","event":"drop","data":{"id":1}}"#.to_vec(),
            422,
            "INVALID_PAYLOAD",
            Some("/event"),
        ),
        (
            "key of wrong type",
            json_ct,
            br#"{"collection":"orders","event":"create","data":{"id":{"$gt":1}}}"#.to_vec(),
            422,
            "INVALID_PAYLOAD",
            Some("/data/id"),
        ),
        (
            "unknown member",
            json_ct,
            br#"{"collection":"orders","event":"create","data":{"id":1},"admin":true}"#.to_vec(),
            422,
            "INVALID_PAYLOAD",
            Some("/admin"),
        ),
        (
            "empty batch",
            json_ct,
            b"[]".to_vec(),
            422,
            "INVALID_PAYLOAD",
            Some(""),
        ),
    ];
    let mut watcher = server.ws_token("t-admin").await;
    watcher
        .send(r#"{"type":"subscribe","collection":"orders","uid":"w"}"#)
        .await;
    assert_eq!(watcher.recv().await["event"], "init");
    for (name, ct, body, status, code, pointer) in rows {
        let (got, answer) = server.post_raw("/v1/publish", ct, body, &[]).await;
        assert_eq!(
            got,
            StatusCode::from_u16(status).expect("status"),
            "row {name}: {answer}"
        );
        assert_eq!(answer["error"]["code"], code, "row {name}: {answer}");
        assert_eq!(
            answer["error"]["where"].as_str(),
            pointer,
            "row {name}: {answer}"
        );
        support::schema_check_http(&answer);
        canary.check(&server, name).await;
    }
    watcher.expect_silence(Duration::from_millis(100)).await;
    server.shutdown().await;
}

/// Tokens at the upgrade (`?access_token=`, strict mode) and in the handshake `auth`: each
/// bad one is refused the same way, whatever is wrong with it.
#[tokio::test]
async fn tokens() {
    let claims = json!({"sub": "admin", "exp": jwt::now() + 600, "tidings": {"*": {}}});
    let mut expired = claims.clone();
    expired["exp"] = json!(jwt::now() - 3600);
    let mut early = claims.clone();
    early["nbf"] = json!(jwt::now() + 3600);
    let mut no_exp = claims.clone();
    no_exp.as_object_mut().expect("object").remove("exp");
    let mut bad_perms = claims.clone();
    bad_perms["tidings"] = json!({"orders": {"events": ["drop"]}});
    let rsa_pem = std::fs::read(jwt::fixture("rsa-public.pem")).expect("pem");
    let bad: Vec<(&str, String)> = vec![
        ("alg none", jwt::alg_none(&claims)),
        ("alg none, upper case", {
            let t = jwt::alg_none(&claims);
            t.replacen(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
                "eyJhbGciOiJOT05FIiwidHlwIjoiSldUIn0",
                1,
            )
        }),
        (
            "HS256 signed with the wrong secret",
            jwt::hs256_with(&claims, "wrong-secret-wrong-secret-wrong-secret"),
        ),
        (
            "RS256 signed with the wrong key",
            jwt::rs256(&claims, "other-rsa-private.pem", None),
        ),
        (
            "HS256 keyed with the RSA public key (alg confusion)",
            jwt::with_header(r#"{"alg":"HS256","typ":"JWT"}"#, &claims, &rsa_pem),
        ),
        ("ES256 without an EC key", jwt::es256(&claims, None)),
        ("expired", jwt::hs256(&expired)),
        ("not yet valid", jwt::hs256(&early)),
        ("no exp", jwt::hs256(&no_exp)),
        ("invalid permissions claim", jwt::hs256(&bad_perms)),
        ("tampered payload", {
            let t = jwt::hs256(&claims);
            let mut parts: Vec<String> = t.split('.').map(String::from).collect();
            parts[1] = jwt::hs256(&json!({"sub":"root","exp":jwt::now()+600,"tidings":{"*":{}}}))
                .split('.')
                .nth(1)
                .expect("payload")
                .to_string();
            parts.join(".")
        }),
        ("garbage", "not-a-token".into()),
        ("three garbage parts", "aaa.bbb.ccc".into()),
        (
            "9 KB token",
            format!(
                "{}.{}.{}",
                "a".repeat(3000),
                "b".repeat(3000),
                "c".repeat(3000)
            ),
        ),
    ];
    let server = start(hostile_config(AuthMode::Strict)).await;
    let mut canary = Canary::new(&server).await;
    for (name, token) in &bad {
        let url = format!("{}?access_token={token}", server.ws_url());
        assert_eq!(server.ws_status(&url).await, 401, "row {name}");
        canary.check(&server, name).await;
    }
    for good in [
        jwt::hs256(&claims),
        jwt::rs256(&claims, "rsa-private.pem", None),
        "t-admin".into(),
    ] {
        let url = format!("{}?access_token={good}", server.ws_url());
        assert_eq!(server.ws_status(&url).await, 101);
    }
    server.shutdown().await;

    let server = start(hostile_config(AuthMode::Handshake)).await;
    let mut canary = Canary::new(&server).await;
    for (name, token) in &bad {
        let mut c = server.ws().await;
        c.exchange(
            &json!({"type":"auth","access_token":token,"uid":"u"}).to_string(),
            r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication handshake failed."}}"#,
        )
        .await;
        assert_eq!(c.expect_close().await, None, "row {name}");
        canary.check(&server, name).await;
    }
    server.shutdown().await;
}

/// A client flooding messages gets REQUESTS_EXCEEDED for each one over the rate, keeps its
/// connection, and is served again once it slows down.
#[tokio::test]
async fn message_rate_limit() {
    let server = start(Config {
        max_messages_per_second: 5,
        max_subscriptions: 1,
        ..Config::default()
    })
    .await;
    let mut c = server.ws().await;
    // The burst allowance (5 + 1 subscription) passes, then the rest is refused, give or
    // take what refills (5 per second) while the broker works through the burst.
    for i in 0..20 {
        c.send(&format!(r#"{{"type":"ping","uid":{i}}}"#)).await;
    }
    let re = regex::Regex::new(r"^Too many messages, retry after [0-9]+ms\.$").expect("re");
    let mut refused = 0;
    for i in 0..20 {
        let v = c.recv().await;
        if v["type"] == "pong" {
            assert_eq!(v["uid"], i, "{v}");
            continue;
        }
        assert!(i >= 6, "the burst was refused: {v}");
        assert_eq!(v["type"], "server", "{v}");
        assert_eq!(v["error"]["code"], "REQUESTS_EXCEEDED", "{v}");
        assert!(v.get("uid").is_none(), "{v}");
        let message = v["error"]["message"].as_str().expect("message");
        assert!(re.is_match(message), "{message}");
        refused += 1;
    }
    assert!(refused >= 10, "only {refused} of 20 refused");
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.exchange(
        r#"{"type":"ping","uid":"later"}"#,
        r#"{"type":"pong","uid":"later"}"#,
    )
    .await;
    assert_eq!(
        server
            .metric("tidings_protocol_errors_total{code=\"REQUESTS_EXCEEDED\"}")
            .await,
        Some(f64::from(refused))
    );
    server.shutdown().await;
}

/// `--max-connections-per-ip`: the next upgrade from the same address gets 429 until one
/// of its connections closes.
#[tokio::test]
async fn connections_per_address() {
    let server = start(Config {
        max_connections_per_ip: 2,
        ..Config::default()
    })
    .await;
    let a = server.ws().await;
    let _b = server.ws().await;
    assert_eq!(server.ws_status(&server.ws_url()).await, 429);
    assert_eq!(
        server
            .metric("tidings_connections_refused_total{reason=\"per_ip_limit\"}")
            .await,
        Some(1.0)
    );
    a.close().await;
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while server.ws_status(&server.ws_url()).await != 101 {
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}
