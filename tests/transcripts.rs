//! One test per applicable case of `../shared/reference/directus-realtime-transcripts.md`,
//! against the real broker over real sockets. Frames are compared byte for byte where Tidings
//! answers as Directus does; where it deliberately differs (no item writes, no schema), the
//! test says so and asserts Tidings' documented answer (protocol/README.md).

mod support;

use std::time::Duration;

use serde_json::json;
use support::{directus_like, start, WsClient};
use tidings::config::AuthMode;

const AUTH_OK: &str = r#"{"type":"auth","status":"ok"}"#;
const HANDSHAKE_FAILED: &str = r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication handshake failed."}}"#;

async fn authed(server: &support::TestServer) -> WsClient {
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"auth","access_token":"admin-static-token"}"#,
        AUTH_OK,
    )
    .await;
    c
}

fn handshake() -> tidings::Config {
    directus_like(AuthMode::Handshake)
}

#[tokio::test]
async fn h1_handshake_silence_fails_after_auth_timeout() {
    let mut config = handshake();
    config.auth_timeout = Duration::from_millis(300);
    let server = start(config).await;
    let mut c = server.ws().await;
    c.expect(HANDSHAKE_FAILED).await;
    assert_eq!(
        c.expect_close().await,
        None,
        "Directus closes without a status code"
    );
}

#[tokio::test]
async fn h2_first_message_not_auth() {
    let server = start(handshake()).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"s1"}"#,
        HANDSHAKE_FAILED,
    )
    .await;
    assert_eq!(c.expect_close().await, None);
    let mut c = server.ws().await;
    c.exchange(r#"{"type":"ping"}"#, HANDSHAKE_FAILED).await;
    assert_eq!(c.expect_close().await, None);
}

#[tokio::test]
async fn h3_auth_success_with_and_without_uid_and_reauth() {
    let server = start(handshake()).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"auth","access_token":"admin-static-token","uid":"auth-1"}"#,
        r#"{"type":"auth","status":"ok","uid":"auth-1"}"#,
    )
    .await;
    let mut c2 = server.ws().await;
    c2.exchange(
        r#"{"type":"auth","access_token":"admin-static-token"}"#,
        AUTH_OK,
    )
    .await;
    c2.exchange(
        r#"{"type":"auth","access_token":"admin-static-token","uid":7}"#,
        r#"{"type":"auth","status":"ok","uid":7}"#,
    )
    .await;
}

#[tokio::test]
async fn h4_auth_failures() {
    let server = start(handshake()).await;
    let mut c1 = server.ws().await;
    c1.exchange(
        r#"{"type":"auth","access_token":"not-a-valid-token","uid":"auth-bad"}"#,
        HANDSHAKE_FAILED,
    )
    .await;
    assert_eq!(c1.expect_close().await, None);

    let mut c2 = authed(&server).await;
    c2.exchange(
        r#"{"type":"auth","access_token":"not-a-valid-token","uid":"auth-bad-2"}"#,
        r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication failed."},"uid":"auth-bad-2"}"#,
    )
    .await;
    assert_eq!(
        c2.expect_close().await,
        None,
        "a later failed auth closes outside public mode"
    );

    let mut c3 = server.ws().await;
    c3.exchange(r#"{"type":"auth","uid":"no-cred"}"#, HANDSHAKE_FAILED)
        .await;
    assert_eq!(c3.expect_close().await, None);
}

/// Deviation: Tidings has no user database, so email/password and refresh-token logins fail
/// like a bad token.
#[tokio::test]
async fn h5_email_password_and_refresh_token_are_refused() {
    let server = start(handshake()).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"auth","email":"admin@example.com","password":"admin-password","uid":"login"}"#,
        HANDSHAKE_FAILED,
    )
    .await;
    assert_eq!(c.expect_close().await, None);
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"auth","refresh_token":"XFufcMJX3sPF"}"#,
        HANDSHAKE_FAILED,
    )
    .await;
}

#[tokio::test]
async fn h6_token_in_url_in_handshake_mode() {
    let server = start(handshake()).await;
    let mut c = server.ws_token("admin-static-token").await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"s","query":{"fields":["id"],"limit":1}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"s"}"#,
    )
    .await;
    assert_eq!(
        server
            .ws_status(&format!("{}?access_token=bad-token", server.ws_url()))
            .await,
        401
    );
}

#[tokio::test]
async fn h7_client_ping_pong() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(r#"{"type":"ping"}"#, r#"{"type":"pong"}"#).await;
    c.exchange(
        r#"{"type":"ping","uid":"p1"}"#,
        r#"{"type":"pong","uid":"p1"}"#,
    )
    .await;
    c.exchange(r#"{"type":"ping","uid":42}"#, r#"{"type":"pong","uid":42}"#)
        .await;
    c.send(r#"{"type":"pong"}"#).await;
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn h8_subscribe_without_uid_gets_every_event_shape() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    // Deviation: no stored items, so init carries an empty list.
    c.exchange(
        r#"{"type":"subscribe","collection":"messages"}"#,
        r#"{"type":"subscription","event":"init","data":[]}"#,
    )
    .await;
    server
        .publish(json!({"collection":"messages","event":"create","data":{"id":7,"text":"new","status":"published","user":"dave","meta":null}}))
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":7,"text":"new","status":"published","user":"dave","meta":null}]}"#).await;
    server
        .publish(json!({"collection":"messages","event":"update","data":{"id":4,"text":"hello (edited)","status":"published","user":"alice","meta":{"priority":1,"tags":["a"]}}}))
        .await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":4,"text":"hello (edited)","status":"published","user":"alice","meta":{"priority":1,"tags":["a"]}}]}"#).await;
    server
        .post("/v1/collections/messages/delete", &json!(["5"]))
        .await;
    c.expect(r#"{"type":"subscription","event":"delete","data":["5"]}"#)
        .await;
}

#[tokio::test]
async fn h9_string_and_numeric_uids() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"sub-str","query":{"fields":["id"],"limit":1}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"sub-str"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":42,"query":{"fields":["id"],"limit":1}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"42"}"#,
    )
    .await;
    server.publish(json!({"collection":"messages","event":"create","data":{"id":11,"text":"x","status":"draft","user":"eve"}})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":11}],"uid":"sub-str"}"#)
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":11}],"uid":"42"}"#)
        .await;
    c.exchange(
        r#"{"type":"unsubscribe","uid":42}"#,
        r#"{"type":"subscription","event":"unsubscribe","uid":42}"#,
    )
    .await;
    // Tidings has no schema: any well-formed collection name is readable by a token allowed
    // everywhere; an unreadable one gets Directus' FORBIDDEN, uid echoed with its type.
    let mut reader = server.ws_token("reader-static-token").await;
    reader
        .exchange(
            r#"{"type":"subscribe","collection":"nope_collection","uid":43}"#,
            r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"nope_collection\" or it does not exist. Queried in root."},"uid":43}"#,
        )
        .await;
}

#[tokio::test]
async fn h10_event_filter() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","event":"create","uid":"only-create"}"#,
        r#"{"type":"subscription","event":"init","uid":"only-create"}"#,
    )
    .await;
    server.publish(json!({"collection":"messages","event":"create","data":{"id":15,"text":"created","status":"draft","user":"eve","meta":null}})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":15,"text":"created","status":"draft","user":"eve","meta":null}],"uid":"only-create"}"#).await;
    server
        .publish(
            json!({"collection":"messages","event":"update","data":{"id":15,"status":"published"}}),
        )
        .await;
    server
        .publish(json!({"collection":"messages","event":"delete","keys":["12"]}))
        .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","event":"delete","uid":"only-delete"}"#,
        r#"{"type":"subscription","event":"init","uid":"only-delete"}"#,
    )
    .await;
    server
        .publish(json!({"collection":"messages","event":"delete","keys":["15"]}))
        .await;
    c.expect(r#"{"type":"subscription","event":"delete","data":["15"],"uid":"only-delete"}"#)
        .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","event":"read","uid":"bad-event"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected \"create\" at \"event\" or Invalid input: expected \"update\" at \"event\" or Invalid input: expected \"delete\" at \"event\""}}"#,
    )
    .await;
}

#[tokio::test]
async fn h11_fields() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    let subs = [
        ("f-explicit", r#"["id","text"]"#),
        ("f-star", r#"["*"]"#),
        ("f-star-and-more", r#"["*","id"]"#),
        ("f-meta", r#"["id","meta"]"#),
        ("f-dotted-json", r#"["id","meta.priority"]"#),
        ("f-json-fn", r#"["id","json(meta, priority)"]"#),
        ("f-unknown", r#"["id","nope"]"#),
        ("f-csv-string", r#""id,status""#),
    ];
    for (uid, fields) in subs {
        c.exchange(
            &format!(r#"{{"type":"subscribe","collection":"messages","uid":"{uid}","query":{{"fields":{fields},"limit":2,"sort":["id"]}}}}"#),
            &format!(r#"{{"type":"subscription","event":"init","data":[],"uid":"{uid}"}}"#),
        )
        .await;
    }
    server
        .publish(json!({"collection":"messages","event":"update","data":{"id":16,"text":"hello","status":"published","user":"alice","meta":{"priority":2,"tags":["a","b"]}}}))
        .await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":16,"text":"hello"}],"uid":"f-explicit"}"#).await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":16,"text":"hello","status":"published","user":"alice","meta":{"priority":2,"tags":["a","b"]}}],"uid":"f-star"}"#).await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":16,"text":"hello","status":"published","user":"alice","meta":{"priority":2,"tags":["a","b"]}}],"uid":"f-star-and-more"}"#).await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":16,"meta":{"priority":2,"tags":["a","b"]}}],"uid":"f-meta"}"#).await;
    // Deviation: without a schema, a dotted path into a nested object is kept (Directus drops
    // it for JSON fields and expands it for relations; Tidings treats both like relations).
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":16,"meta":{"priority":2}}],"uid":"f-dotted-json"}"#).await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":16,"meta_priority_json":2}],"uid":"f-json-fn"}"#).await;
    // Deviation: an unknown field is simply absent (Directus: FORBIDDEN at subscribe).
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":16}],"uid":"f-unknown"}"#)
        .await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":16,"status":"published"}],"uid":"f-csv-string"}"#).await;
}

#[tokio::test]
async fn h12_relational_dotted_fields() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    for (uid, query) in [
        ("rel", r#","query":{"fields":["id","title","author.name"]}"#),
        ("rel-star", r#","query":{"fields":["*","author.*"]}"#),
        ("plain", ""),
    ] {
        c.exchange(
            &format!(r#"{{"type":"subscribe","collection":"posts","uid":"{uid}"{query}}}"#),
            &format!(r#"{{"type":"subscription","event":"init","data":[],"uid":"{uid}"}}"#),
        )
        .await;
    }
    server
        .publish(json!({"collection":"posts","event":"create","data":{"id":2,"title":"second","author":{"id":2,"name":"Zed"}}}))
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":2,"title":"second","author":{"name":"Zed"}}],"uid":"rel"}"#).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":2,"title":"second","author":{"id":2,"name":"Zed"}}],"uid":"rel-star"}"#).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":2,"title":"second","author":{"id":2,"name":"Zed"}}],"uid":"plain"}"#).await;
    // An event of another collection (the related author) does not notify `posts`.
    server
        .publish(
            json!({"collection":"authors","event":"update","data":{"id":2,"name":"Zed (renamed)"}}),
        )
        .await;
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn h13_filters() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    let subs = [
        (
            "eq",
            r#"{"filter":{"status":{"_eq":"published"}},"fields":["id","status"]}"#,
        ),
        (
            "in",
            r#"{"filter":{"user":{"_in":["bob","zoe"]}},"fields":["id","user"]}"#,
        ),
        ("gt", r#"{"filter":{"id":{"_gt":20}},"fields":["id"]}"#),
        (
            "and-or",
            r#"{"filter":{"_and":[{"status":{"_eq":"published"}},{"_or":[{"user":{"_eq":"alice"}},{"user":{"_eq":"zoe"}}]}]},"fields":["id","user","status"]}"#,
        ),
        (
            "hidden-field",
            r#"{"filter":{"user":{"_eq":"zoe"}},"fields":["id","text"]}"#,
        ),
        (
            "shorthand",
            r#"{"filter":{"status":"draft"},"fields":["id","status"]}"#,
        ),
    ];
    for (uid, query) in subs {
        c.exchange(
            &format!(
                r#"{{"type":"subscribe","collection":"messages","uid":"{uid}","query":{query}}}"#
            ),
            &format!(r#"{{"type":"subscription","event":"init","data":[],"uid":"{uid}"}}"#),
        )
        .await;
    }
    server.publish(json!({"collection":"messages","event":"create","data":{"id":22,"text":"by zoe","status":"published","user":"zoe"}})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":22,"status":"published"}],"uid":"eq"}"#).await;
    c.expect(
        r#"{"type":"subscription","event":"create","data":[{"id":22,"user":"zoe"}],"uid":"in"}"#,
    )
    .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":22}],"uid":"gt"}"#)
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":22,"user":"zoe","status":"published"}],"uid":"and-or"}"#).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":22,"text":"by zoe"}],"uid":"hidden-field"}"#).await;
    server.publish(json!({"collection":"messages","event":"create","data":{"id":23,"text":"by bob","status":"draft","user":"bob"}})).await;
    c.expect(
        r#"{"type":"subscription","event":"create","data":[{"id":23,"user":"bob"}],"uid":"in"}"#,
    )
    .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":23}],"uid":"gt"}"#)
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":23,"status":"draft"}],"uid":"shorthand"}"#).await;
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn h14_invalid_queries() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    // The message names the offending path (Directus names the field type instead).
    c.send(r#"{"type":"subscribe","collection":"messages","uid":"bad-op","query":{"filter":{"status":{"_nope":1}}}}"#).await;
    let v = c.recv().await;
    assert_eq!(v["type"], "subscribe");
    assert_eq!(v["error"]["code"], "INVALID_QUERY");
    assert_eq!(v["uid"], "bad-op");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Invalid query. ") && message.contains("_nope"),
        "{message}"
    );
    // Deviation: no schema, so an unknown field is not an error; it never matches `_eq`.
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"bad-field","query":{"filter":{"nope":{"_eq":1}}}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"bad-field"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"bad-query-type","query":"fields=id"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected record, received string at \"query\""}}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"bad-limit","query":{"limit":"x"}}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_QUERY","message":"Invalid query. \"limit\" must be a number."},"uid":"bad-limit"}"#,
    )
    .await;
}

#[tokio::test]
async fn h15_item_subscriptions() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    // Deviation: Tidings cannot read the item, so init has no data and a missing item is not
    // an error.
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","item":24,"uid":"one-num","query":{"fields":["id","text"]}}"#,
        r#"{"type":"subscription","event":"init","uid":"one-num"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","item":"26","uid":"one-str","query":{"fields":["id","text"]}}"#,
        r#"{"type":"subscription","event":"init","uid":"one-str"}"#,
    )
    .await;
    server
        .post(
            "/v1/collections/messages/update",
            &json!({"id":24,"text":"edited via url","status":"draft"}),
        )
        .await;
    c.expect(r#"{"type":"subscription","event":"update","data":{"id":24,"text":"edited via url"},"uid":"one-num"}"#).await;
    server
        .post(
            "/v1/collections/messages/update",
            &json!({"id":26,"text":"other edited"}),
        )
        .await;
    c.expect(r#"{"type":"subscription","event":"update","data":{"id":26,"text":"other edited"},"uid":"one-str"}"#).await;
    // Creates never reach item subscriptions (as in Directus).
    server
        .post(
            "/v1/collections/messages/create",
            &json!({"id":24,"text":"again"}),
        )
        .await;
    server
        .post("/v1/collections/messages/delete", &json!(["24"]))
        .await;
    c.expect(r#"{"type":"subscription","event":"delete","data":"24","uid":"one-num"}"#)
        .await;
    // Deviation: numeric keys match string item keys (Directus compares with ===).
    server
        .post("/v1/collections/messages/delete", &json!([26]))
        .await;
    c.expect(r#"{"type":"subscription","event":"delete","data":"26","uid":"one-str"}"#)
        .await;
}

#[tokio::test]
async fn h16_limit_offset_sort_search_apply_to_event_items() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    for (uid, query) in [
        ("all-default", r#"{"fields":["id"]}"#),
        (
            "limit-sort",
            r#"{"fields":["id","text"],"limit":2,"sort":["-id"]}"#,
        ),
        (
            "offset",
            r#"{"fields":["id"],"limit":2,"offset":1,"sort":["id"]}"#,
        ),
        (
            "search",
            r#"{"fields":["id","text"],"search":"bulk 10","limit":3}"#,
        ),
    ] {
        c.exchange(
            &format!(
                r#"{{"type":"subscribe","collection":"messages","uid":"{uid}","query":{query}}}"#
            ),
            &format!(r#"{{"type":"subscription","event":"init","data":[],"uid":"{uid}"}}"#),
        )
        .await;
    }
    server
        .publish(json!({"collection":"messages","event":"create","data":{"id":132,"text":"after"}}))
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":132}],"uid":"all-default"}"#)
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":132,"text":"after"}],"uid":"limit-sort"}"#).await;
    server
        .publish(json!({"collection":"messages","event":"update","data":[{"id":27,"text":"bulk 0"},{"id":28,"text":"bulk 1"},{"id":29,"text":"bulk 2"}]}))
        .await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":27},{"id":28},{"id":29}],"uid":"all-default"}"#).await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":29,"text":"bulk 2"},{"id":28,"text":"bulk 1"}],"uid":"limit-sort"}"#).await;
    c.expect(
        r#"{"type":"subscription","event":"update","data":[{"id":28},{"id":29}],"uid":"offset"}"#,
    )
    .await;
    server
        .publish(
            json!({"collection":"messages","event":"create","data":{"id":37,"text":"Bulk 10"}}),
        )
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":37}],"uid":"all-default"}"#)
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":37,"text":"Bulk 10"}],"uid":"limit-sort"}"#).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":37,"text":"Bulk 10"}],"uid":"search"}"#).await;
}

#[tokio::test]
async fn h17_event_shapes_single_and_batch() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"ev"}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"ev"}"#,
    )
    .await;
    server
        .publish(json!({"collection":"messages","event":"create","data":[{"id":134,"text":"b1"},{"id":135,"text":"b2"},{"id":136,"text":"b3"}]}))
        .await;
    for (id, text) in [(134, "b1"), (135, "b2"), (136, "b3")] {
        c.expect(&format!(r#"{{"type":"subscription","event":"create","data":[{{"id":{id},"text":"{text}"}}],"uid":"ev"}}"#)).await;
    }
    server
        .publish(json!({"collection":"messages","event":"update","data":[{"id":134,"status":"published"},{"id":135,"status":"published"}]}))
        .await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":134,"status":"published"},{"id":135,"status":"published"}],"uid":"ev"}"#).await;
    server
        .publish(json!({"collection":"messages","event":"delete","keys":[134,135]}))
        .await;
    c.expect(r#"{"type":"subscription","event":"delete","data":[134,135],"uid":"ev"}"#)
        .await;
    server
        .post("/v1/collections/messages/delete", &json!({"keys":["136"]}))
        .await;
    c.expect(r#"{"type":"subscription","event":"delete","data":["136"],"uid":"ev"}"#)
        .await;
}

#[tokio::test]
async fn h18_items_entering_and_leaving_the_filter() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"pub","query":{"fields":["id","status"],"filter":{"status":{"_eq":"published"}}}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"pub"}"#,
    )
    .await;
    server.publish(json!({"collection":"messages","event":"create","data":{"id":137,"text":"t","status":"published"}})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":137,"status":"published"}],"uid":"pub"}"#).await;
    server
        .publish(
            json!({"collection":"messages","event":"update","data":{"id":137,"status":"draft"}}),
        )
        .await;
    server.publish(json!({"collection":"messages","event":"update","data":{"id":137,"status":"published"}})).await;
    c.expect(r#"{"type":"subscription","event":"update","data":[{"id":137,"status":"published"}],"uid":"pub"}"#).await;
    // A key-only delete reaches every subscription, as in Directus…
    server
        .publish(json!({"collection":"messages","event":"delete","keys":["138"]}))
        .await;
    c.expect(r#"{"type":"subscription","event":"delete","data":["138"],"uid":"pub"}"#)
        .await;
    // …but a delete that carries the deleted item is filtered like a create.
    server.publish(json!({"collection":"messages","event":"delete","data":[{"id":139,"status":"draft"},{"id":140,"status":"published"}]})).await;
    c.expect(r#"{"type":"subscription","event":"delete","data":[140],"uid":"pub"}"#)
        .await;
}

#[tokio::test]
async fn h19_unsubscribe_variants() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"s1","query":{"fields":["id"]}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"s1"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","uid":"s2","query":{"fields":["id"]}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"s2"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"messages","query":{"fields":["id"]}}"#,
        r#"{"type":"subscription","event":"init","data":[]}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"unsubscribe","uid":"s1"}"#,
        r#"{"type":"subscription","event":"unsubscribe","uid":"s1"}"#,
    )
    .await;
    server
        .publish(json!({"collection":"messages","event":"create","data":{"id":139,"text":"a"}}))
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":139}],"uid":"s2"}"#)
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":139}]}"#)
        .await;
    c.exchange(
        r#"{"type":"unsubscribe","uid":"never-subscribed"}"#,
        r#"{"type":"subscription","event":"unsubscribe","uid":"never-subscribed"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"unsubscribe"}"#,
        r#"{"type":"subscription","event":"unsubscribe"}"#,
    )
    .await;
    server
        .publish(json!({"collection":"messages","event":"create","data":{"id":140,"text":"b"}}))
        .await;
    c.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(server.state.registry.counts("messages"), (0, 0));
}

#[tokio::test]
async fn h20_reused_uid_replaces_and_uidless_duplicates_both_deliver() {
    let server = start(handshake()).await;
    let mut c1 = authed(&server).await;
    c1.exchange(r#"{"type":"subscribe","collection":"messages","uid":"dup","query":{"fields":["id","user"],"filter":{"user":{"_eq":"a"}}}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"dup"}"#).await;
    c1.exchange(r#"{"type":"subscribe","collection":"messages","uid":"dup","query":{"fields":["id","user"],"filter":{"user":{"_eq":"b"}}}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"dup"}"#).await;
    server.publish(json!({"collection":"messages","event":"create","data":[{"id":141,"text":"1","user":"a"},{"id":142,"text":"2","user":"b"}]})).await;
    c1.expect(
        r#"{"type":"subscription","event":"create","data":[{"id":142,"user":"b"}],"uid":"dup"}"#,
    )
    .await;
    c1.expect_silence(Duration::from_millis(150)).await;
    let mut c2 = authed(&server).await;
    c2.exchange(
        r#"{"type":"subscribe","collection":"messages","query":{"fields":["id"]}}"#,
        r#"{"type":"subscription","event":"init","data":[]}"#,
    )
    .await;
    c2.exchange(r#"{"type":"subscribe","collection":"messages","event":"create","query":{"fields":["text"]}}"#, r#"{"type":"subscription","event":"init"}"#).await;
    server.publish(json!({"collection":"messages","event":"create","data":{"id":143,"text":"3","user":"c"}})).await;
    c2.expect(r#"{"type":"subscription","event":"create","data":[{"id":143}]}"#)
        .await;
    c2.expect(r#"{"type":"subscription","event":"create","data":[{"text":"3"}]}"#)
        .await;
}

#[tokio::test]
async fn h21_errors_keep_the_connection_open() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    let parse = r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Unable to parse the incoming message."}}"#;
    c.exchange(r#"{"type":"subscribe","uid":"no-collection"}"#, r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received undefined at \"collection\""}}"#).await;
    c.exchange(r#"{"type":"subscribe","collection":123,"uid":"num-collection"}"#, r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received number at \"collection\""}}"#).await;
    c.exchange(r#"{"type":"subscribe", "collection": "messages""#, parse)
        .await;
    c.exchange("not json at all", parse).await;
    c.send(r#"{"type":"frobnicate","uid":"unknown-type"}"#)
        .await;
    c.exchange(r#"{"uid":"no-type"}"#, r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received undefined at \"type\""}}"#).await;
    c.exchange("[1,2,3]", r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected object, received array"}}"#).await;
    c.exchange("42", r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected object, received number"}}"#).await;
    c.exchange(r#"{"type":"subscribe","collection":"messages","uid":{"nested":true}}"#, r#"{"type":"server","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received object at \"uid\" or Invalid input: expected number, received object at \"uid\""}}"#).await;
    c.exchange(
        r#"{"type":"ping","uid":"still-alive"}"#,
        r#"{"type":"pong","uid":"still-alive"}"#,
    )
    .await;

    let mut reader = server.ws().await;
    reader
        .exchange(
            r#"{"type":"auth","access_token":"reader-static-token"}"#,
            AUTH_OK,
        )
        .await;
    reader.exchange(r#"{"type":"subscribe","collection":"secrets","uid":"forbidden"}"#, r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"secrets\" or it does not exist. Queried in root."},"uid":"forbidden"}"#).await;
    reader.exchange(r#"{"type":"subscribe","collection":"messages","uid":"allowed","query":{"fields":["id"],"limit":1}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"allowed"}"#).await;
    assert!(
        server
            .metric("tidings_protocol_errors_total{code=\"INVALID_PAYLOAD\"}")
            .await
            .unwrap()
            >= 7.0
    );
}

#[tokio::test]
async fn h22_client_close_drops_subscriptions() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(r#"{"type":"subscribe","collection":"messages","uid":"x","query":{"fields":["id"],"limit":1}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"x"}"#).await;
    assert_eq!(server.state.registry.counts("messages"), (1, 1));
    c.close().await;
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while server.state.registry.counts("messages") != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription not dropped on close"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The read of H23 is answered as Directus answers it, from the retained state (`--state
/// messages`). Deviations: writes over the socket are UNSUPPORTED (Tidings takes them from
/// the application, over HTTP), and a collection that retains nothing, `directus_users`
/// included, answers INVALID_COLLECTION, Directus' code for a system collection, with
/// Tidings' reason.
#[tokio::test]
async fn h23_items_read_from_state_writes_unsupported() {
    let mut config = handshake();
    config.state.collections = vec!["messages".into()];
    let server = start(config).await;
    server
        .publish(json!({"collection":"messages","event":"create","data":{"id":144,"text":"via ws","status":"draft","user":"ws"}}))
        .await;
    let mut c = authed(&server).await;
    c.exchange(
        r#"{"type":"items","collection":"messages","action":"create","data":{"text":"via ws","status":"draft","user":"ws"},"uid":"i1","query":{"fields":["id","text"]}}"#,
        r#"{"type":"items","status":"error","error":{"code":"UNSUPPORTED","message":"Tidings only reads items over the socket: \"create\", \"update\" and \"delete\" are not supported (publish changes through the HTTP API)."},"uid":"i1"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"items","collection":"messages","action":"read","query":{"fields":["id","text"],"limit":2},"uid":"i2"}"#,
        r#"{"type":"items","data":[{"id":144,"text":"via ws"}],"uid":"i2"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"items","collection":"directus_users","action":"read","uid":"i6"}"#,
        r#"{"type":"items","status":"error","error":{"code":"INVALID_COLLECTION","message":"Collection \"directus_users\" retains no items in Tidings (start it with --state directus_users), so it cannot be read."},"uid":"i6"}"#,
    )
    .await;
}

#[tokio::test]
async fn h24_websocket_ping_frame_does_not_disturb_the_protocol() {
    use futures_util::SinkExt;
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.ws.send(tokio_tungstenite::tungstenite::Message::Ping(
        vec![1, 2].into(),
    ))
    .await
    .unwrap();
    c.exchange(
        r#"{"type":"ping","uid":"json-ping"}"#,
        r#"{"type":"pong","uid":"json-ping"}"#,
    )
    .await;
}

/// Tidings has no transaction race: each update carries the item as published, in order.
#[tokio::test]
async fn h25_batch_of_updates_arrives_in_order_with_fresh_data() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(r#"{"type":"subscribe","collection":"messages","uid":"ev","query":{"fields":["id","text"]}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"ev"}"#).await;
    for round in 1..=3 {
        let batch: Vec<_> = [145, 146, 147]
            .iter()
            .zip(["a", "b", "c"])
            .map(|(id, p)| json!({"collection":"messages","event":"update","data":{"id":id,"text":format!("{p}{round}")}}))
            .collect();
        server.publish(json!(batch)).await;
        for (id, p) in [(145, "a"), (146, "b"), (147, "c")] {
            c.expect(&format!(r#"{{"type":"subscription","event":"update","data":[{{"id":{id},"text":"{p}{round}"}}],"uid":"ev"}}"#)).await;
        }
    }
}

#[tokio::test]
async fn h26_sdk_string_query_form() {
    let server = start(handshake()).await;
    let mut c = authed(&server).await;
    c.exchange(
        r#"{"query":{"fields":"id,text,status","filter":"{\"status\":{\"_eq\":\"published\"}}","sort":"-id","limit":"1"},"uid":"1","collection":"messages","type":"subscribe"}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"1"}"#,
    )
    .await;
    c.exchange(
        r#"{"query":{"fields":"id,text","filter":"{not json"},"uid":"2","collection":"messages","type":"subscribe"}"#,
        r#"{"type":"subscribe","status":"error","error":{"code":"INVALID_QUERY","message":"Invalid query. Invalid JSON for filter object."},"uid":"2"}"#,
    )
    .await;
    server.publish(json!({"collection":"messages","event":"create","data":[{"id":150,"text":"world","status":"published","user":"carol"},{"id":151,"text":"draft","status":"draft"}]})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":150,"text":"world","status":"published"}],"uid":"1"}"#).await;
    c.expect_silence(Duration::from_millis(150)).await;
}

/// The fcs_directus 1.0.0 frames (reference H27/P4): Directus refuses them; Tidings accepts the
/// nested form and answers in a dialect that client can parse.
#[tokio::test]
async fn h27_fcs_directus_frames_in_handshake_mode() {
    let server = start(handshake()).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"auth","data":{"access_token":"admin-static-token"}}"#,
        AUTH_OK,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","uid":"sub_0","data":{"collection":"messages","event":"create","query":{"fields":["id","text"]}}}"#,
        r#"{"type":"subscription","event":"init","uid":"sub_0"}"#,
    )
    .await;
    server.publish(json!({"collection":"messages","event":"create","data":[{"id":1,"text":"a","x":1},{"id":2,"text":"b"}]})).await;
    c.expect(
        r#"{"type":"subscription","event":"create","data":{"id":1,"text":"a"},"uid":"sub_0"}"#,
    )
    .await;
    c.expect(
        r#"{"type":"subscription","event":"create","data":{"id":2,"text":"b"},"uid":"sub_0"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"unsubscribe","uid":"sub_0"}"#,
        r#"{"type":"subscription","event":"unsubscribe","uid":"sub_0"}"#,
    )
    .await;
}

fn public() -> tidings::Config {
    directus_like(AuthMode::Public)
}

#[tokio::test]
async fn p1_public_mode_without_auth() {
    let server = start(public()).await;
    let mut c = server.ws().await;
    c.exchange(r#"{"type":"subscribe","collection":"messages","uid":"pub","query":{"fields":["id","text"],"limit":2}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"pub"}"#).await;
    c.exchange(r#"{"type":"subscribe","collection":"secrets","uid":"sec"}"#, r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"secrets\" or it does not exist. Queried in root."},"uid":"sec"}"#).await;
    c.exchange(r#"{"type":"ping"}"#, r#"{"type":"pong"}"#).await;
    server.publish(json!({"collection":"messages","event":"create","data":{"id":154,"text":"public event","status":"draft","user":"p"}})).await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":154,"text":"public event"}],"uid":"pub"}"#).await;
}

#[tokio::test]
async fn p2_public_mode_failed_auth_keeps_connection_and_success_upgrades() {
    let server = start(public()).await;
    let mut c = server.ws().await;
    c.exchange(r#"{"type":"auth","access_token":"bad-token","uid":"a-bad"}"#, r#"{"type":"auth","status":"error","error":{"code":"AUTH_FAILED","message":"Authentication failed."},"uid":"a-bad"}"#).await;
    c.exchange(r#"{"type":"subscribe","collection":"messages","uid":"still-public","query":{"fields":["id"],"limit":1}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"still-public"}"#).await;
    c.exchange(
        r#"{"type":"auth","access_token":"admin-static-token","uid":"a-ok"}"#,
        r#"{"type":"auth","status":"ok","uid":"a-ok"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"secrets","uid":"sec-as-admin"}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"sec-as-admin"}"#,
    )
    .await;
}

#[tokio::test]
async fn p3_subscriptions_survive_auth() {
    let server = start(public()).await;
    let mut c = server.ws().await;
    c.exchange(r#"{"type":"subscribe","collection":"messages","uid":"before-auth","query":{"fields":["id"],"limit":1}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"before-auth"}"#).await;
    c.exchange(
        r#"{"type":"auth","access_token":"reader-static-token"}"#,
        AUTH_OK,
    )
    .await;
    server
        .publish(json!({"collection":"messages","event":"create","data":{"id":155,"text":"x"}}))
        .await;
    c.expect(r#"{"type":"subscription","event":"create","data":[{"id":155}],"uid":"before-auth"}"#)
        .await;
}

/// Re-auth re-applies permissions: a subscription the new identity may not read is dropped
/// with FORBIDDEN (Directus would fail it at dispatch time).
#[tokio::test]
async fn p3b_reauth_narrowing_permissions_drops_forbidden_subscriptions() {
    let server = start(public()).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"auth","access_token":"admin-static-token"}"#,
        AUTH_OK,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"secrets","uid":"sec"}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"sec"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"auth","access_token":"reader-static-token"}"#,
        AUTH_OK,
    )
    .await;
    c.expect(r#"{"type":"subscribe","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"secrets\" or it does not exist. Queried in root."},"uid":"sec"}"#).await;
    server
        .publish(json!({"collection":"secrets","event":"create","data":{"id":1}}))
        .await;
    c.expect_silence(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn p4_fcs_directus_frames_in_public_mode() {
    let server = start(public()).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"auth","data":{"access_token":"admin-static-token"}}"#,
        AUTH_OK,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","uid":"sub_0","data":{"collection":"messages","query":{"fields":["id"]}}}"#,
        r#"{"type":"subscription","event":"init","uid":"sub_0"}"#,
    )
    .await;
    c.send(r#"{"type":"pong"}"#).await;
    server
        .publish(json!({"collection":"messages","event":"delete","keys":[5]}))
        .await;
    c.expect(r#"{"type":"subscription","event":"delete","data":{"id":"5"},"uid":"sub_0"}"#)
        .await;
}

#[tokio::test]
async fn s1_s2_strict_mode() {
    let server = start(directus_like(AuthMode::Strict)).await;
    assert_eq!(server.ws_status(&server.ws_url()).await, 401);
    assert_eq!(
        server
            .ws_status(&format!("{}?access_token=bad", server.ws_url()))
            .await,
        401
    );
    let mut c = server.ws_token("admin-static-token").await;
    c.exchange(r#"{"type":"subscribe","collection":"messages","uid":"s","query":{"fields":["id"],"limit":1}}"#, r#"{"type":"subscription","event":"init","data":[],"uid":"s"}"#).await;
    c.exchange(
        r#"{"type":"auth","access_token":"admin-static-token","uid":"re"}"#,
        r#"{"type":"auth","status":"ok","uid":"re"}"#,
    )
    .await;
    assert_eq!(
        server
            .metric("tidings_connections_refused_total{reason=\"unauthorized\"}")
            .await,
        Some(2.0)
    );
}

fn short_heartbeat() -> tidings::Config {
    let mut config = handshake();
    config.heartbeat_period = Some(Duration::from_millis(300));
    config.auth_timeout = Duration::from_millis(200);
    config
}

#[tokio::test]
async fn b1_heartbeat_answered_keeps_the_connection() {
    let server = start(short_heartbeat()).await;
    let mut c = authed(&server).await;
    for _ in 0..3 {
        c.expect(r#"{"type":"ping"}"#).await;
        c.send(r#"{"type":"pong"}"#).await;
    }
    c.exchange(
        r#"{"type":"ping","uid":"alive"}"#,
        r#"{"type":"pong","uid":"alive"}"#,
    )
    .await;
}

#[tokio::test]
async fn b2_silent_client_is_closed_without_code() {
    let server = start(short_heartbeat()).await;
    let mut c = authed(&server).await;
    c.expect(r#"{"type":"ping"}"#).await;
    assert_eq!(c.expect_close().await, None);
    server
        .wait_for_metric(
            "tidings_connections_closed_total{reason=\"heartbeat_timeout\"}",
            1.0,
        )
        .await;
}

#[tokio::test]
async fn b3_any_message_counts_as_a_heartbeat_reply() {
    let server = start(short_heartbeat()).await;
    let mut c = authed(&server).await;
    for _ in 0..3 {
        c.expect(r#"{"type":"ping"}"#).await;
        c.exchange(
            r#"{"type":"ping","uid":"mine"}"#,
            r#"{"type":"pong","uid":"mine"}"#,
        )
        .await;
    }
}

#[tokio::test]
async fn b4_handshake_auth_timeout() {
    let server = start(short_heartbeat()).await;
    let mut c = server.ws().await;
    c.expect(HANDSHAKE_FAILED).await;
    assert_eq!(c.expect_close().await, None);
}

#[tokio::test]
async fn n1_heartbeat_disabled_means_no_pong() {
    let mut config = handshake();
    config.heartbeat_period = None;
    let server = start(config).await;
    let mut c = authed(&server).await;
    c.send(r#"{"type":"ping","uid":"p"}"#).await;
    c.expect_silence(Duration::from_millis(300)).await;
}
