//! Reads of the retained state, over real sockets and HTTP: the socket `items` read (Directus'
//! shape, the connection's row rule and field permissions, `id`/`ids`, `query.meta`) and its
//! errors (a collection that retains nothing, writes, bad queries, the bound), and `meta` in
//! `init`.

mod support;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{retaining, start, TestServer, WsClient};
use tidings::auth::TokenStore;
use tidings::Config;

/// `orders` retained; `t1` sees tenant 1's rows only, and only `id`, `tenant`, `status`.
fn with_tokens() -> Config {
    Config {
        tokens: TokenStore::from_json(
            r#"{"t1":{"sub":"one","collections":{"orders":{"filter":{"tenant":{"_eq":1}},"fields":["id","tenant","status"]}}}}"#,
        )
        .expect("tokens"),
        ..retaining(&["orders"])
    }
}

/// Six orders: ids 1..=6, tenant `id % 2`, status open for 1, 2, 3.
async fn seed(server: &TestServer) {
    let items: Vec<Value> = (1..=6)
        .map(|id| {
            json!({"id": id, "tenant": id % 2, "status": if id <= 3 { "open" } else { "done" }, "secret": format!("s{id}")})
        })
        .collect();
    server
        .publish(json!({"collection":"orders","event":"create","data":items}))
        .await;
}

async fn read(c: &mut WsClient, request: Value) -> String {
    c.send(&request.to_string()).await;
    c.recv_text().await
}

#[tokio::test]
async fn a_socket_read_answers_from_the_state_in_directus_shape() {
    let server = start(retaining(&["orders"])).await;
    seed(&server).await;
    let mut c = server.ws().await;
    let cases: Vec<(Value, &str)> = vec![
        // The transcript's read: fields and limit (sorted by key without sort).
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"fields":["id","status"],"limit":2},"uid":"i2"}),
            r#"{"type":"items","data":[{"id":1,"status":"open"},{"id":2,"status":"open"}],"uid":"i2"}"#,
        ),
        // Filter, sort, offset; a numeric uid comes back a number.
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"fields":"id","filter":{"tenant":{"_eq":0}},"sort":"-id","offset":1},"uid":7}),
            r#"{"type":"items","data":[{"id":4},{"id":2}],"uid":7}"#,
        ),
        // REST string forms, page, search.
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"fields":"id","limit":"2","page":"2","search":"done"}}),
            r#"{"type":"items","data":[{"id":6}]}"#,
        ),
        // meta: total_count is the whole (visible) collection, filter_count what matched.
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"fields":["id"],"filter":{"status":{"_eq":"open"}},"limit":1,"meta":"*"},"uid":"m"}),
            r#"{"type":"items","data":[{"id":1}],"meta":{"total_count":6,"filter_count":3},"uid":"m"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"fields":["id"],"limit":0,"meta":["filter_count"]},"uid":"f"}),
            r#"{"type":"items","data":[],"meta":{"filter_count":6},"uid":"f"}"#,
        ),
        // id: the item object (readOne); ids: those items (readMany), in key order.
        (
            json!({"type":"items","collection":"orders","action":"read","id":3,"query":{"fields":["id","secret"]},"uid":"one"}),
            r#"{"type":"items","data":{"id":3,"secret":"s3"},"uid":"one"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"read","ids":["5",2,99],"query":{"fields":["id"]},"uid":"many"}),
            r#"{"type":"items","data":[{"id":2},{"id":5}],"uid":"many"}"#,
        ),
        // An id the state does not hold (or the filter excludes): Directus' readOne error.
        (
            json!({"type":"items","collection":"orders","action":"read","id":99,"uid":"gone"}),
            r#"{"type":"items","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access this."},"uid":"gone"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"read","id":4,"query":{"filter":{"status":{"_eq":"open"}}},"uid":"hidden"}),
            r#"{"type":"items","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access this."},"uid":"hidden"}"#,
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(read(&mut c, request.clone()).await, expected, "{request}");
    }
    // A partial update is read merged.
    server
        .publish(json!({"collection":"orders","event":"update","data":{"id":1,"status":"done"}}))
        .await;
    assert_eq!(
        read(
            &mut c,
            json!({"type":"items","collection":"orders","action":"read","id":1,"uid":"u"})
        )
        .await,
        r#"{"type":"items","data":{"id":1,"tenant":1,"status":"done","secret":"s1"},"uid":"u"}"#
    );
    let reads = server
        .metric("tidings_state_read_duration_seconds_count")
        .await;
    assert_eq!(reads, Some(10.0));
}

#[tokio::test]
async fn a_socket_read_sees_only_what_the_permission_allows() {
    let server = start(with_tokens()).await;
    seed(&server).await;
    let mut c = server.ws_token("t1").await;
    let cases: Vec<(Value, &str)> = vec![
        // The row rule cuts the list and total_count; the field grant the projection.
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"meta":"total_count,filter_count","filter":{"status":{"_eq":"open"}}},"uid":"r"}),
            r#"{"type":"items","data":[{"id":1,"tenant":1,"status":"open"},{"id":3,"tenant":1,"status":"open"}],"meta":{"total_count":3,"filter_count":2},"uid":"r"}"#,
        ),
        // Another tenant's item cannot be read by id.
        (
            json!({"type":"items","collection":"orders","action":"read","id":2,"uid":"other"}),
            r#"{"type":"items","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access this."},"uid":"other"}"#,
        ),
        // A field outside the grant, in fields or filter: the subscribe's error, type items.
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"fields":["secret"]},"uid":"f"}),
            r#"{"type":"items","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access field \"secret\" in collection \"orders\" or it does not exist. Queried in root."},"uid":"f"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"filter":{"secret":{"_eq":"s1"}}},"uid":"g"}),
            r#"{"type":"items","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access field \"secret\" in collection \"orders\" or it does not exist. Queried in root."},"uid":"g"}"#,
        ),
        // A collection the token does not grant: FORBIDDEN, as Directus (retained or not).
        (
            json!({"type":"items","collection":"invoices","action":"read","uid":"x"}),
            r#"{"type":"items","status":"error","error":{"code":"FORBIDDEN","message":"You don't have permission to access collection \"invoices\" or it does not exist. Queried in root."},"uid":"x"}"#,
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(read(&mut c, request.clone()).await, expected, "{request}");
    }
}

#[tokio::test]
async fn socket_items_errors_are_clear_and_keep_the_connection() {
    let mut config = retaining(&["orders"]);
    config.state.max_init_items = 4;
    let server = start(config).await;
    seed(&server).await;
    let mut c = server.ws().await;
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"type":"items","collection":"invoices","action":"read","uid":"i6"}),
            r#"{"type":"items","status":"error","error":{"code":"INVALID_COLLECTION","message":"Collection \"invoices\" retains no items in Tidings (start it with --state invoices), so it cannot be read."},"uid":"i6"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"create","data":{"id":9},"uid":"i1"}),
            r#"{"type":"items","status":"error","error":{"code":"UNSUPPORTED","message":"Tidings only reads items over the socket: \"create\", \"update\" and \"delete\" are not supported (publish changes through the HTTP API)."},"uid":"i1"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"delete","uid":"i5"}),
            r#"{"type":"items","status":"error","error":{"code":"UNSUPPORTED","message":"Tidings only reads items over the socket: \"create\", \"update\" and \"delete\" are not supported (publish changes through the HTTP API)."},"uid":"i5"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"upsert","uid":"a"}),
            r#"{"type":"items","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected \"create\" at \"action\" or Invalid input: expected \"read\" at \"action\" or Invalid input: expected \"update\" at \"action\" or Invalid input: expected \"delete\" at \"action\""},"uid":"a"}"#,
        ),
        (
            json!({"type":"items","action":"read","uid":"b"}),
            r#"{"type":"items","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received undefined at \"collection\""},"uid":"b"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"read","ids":[{"id":1}],"uid":"c"}),
            r#"{"type":"items","status":"error","error":{"code":"INVALID_PAYLOAD","message":"Validation error: Invalid input: expected string, received object at \"ids.0\" or Invalid input: expected number, received object at \"ids.0\""},"uid":"c"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"filter":{"id":{"_nope":1}}},"uid":"q"}),
            r#"{"type":"items","status":"error","error":{"code":"INVALID_QUERY","message":"Invalid query. Unknown filter operator \"_nope\" at \"id._nope\"."},"uid":"q"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"meta":"page_count"},"uid":"m"}),
            r#"{"type":"items","status":"error","error":{"code":"INVALID_QUERY","message":"Invalid query. \"meta[0]\" must be one of [total_count, filter_count]."},"uid":"m"}"#,
        ),
        (
            json!({"type":"items","collection":"orders","action":"read","query":{"limit":-1},"uid":"all"}),
            r#"{"type":"items","status":"error","error":{"code":"LIMIT_EXCEEDED","message":"The read would return 6 items, over --max-init-items (4); narrow the filter or set a smaller limit."},"uid":"all"}"#,
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(read(&mut c, request.clone()).await, expected, "{request}");
    }
    // Still open and served.
    c.exchange(
        r#"{"type":"ping","uid":"p"}"#,
        r#"{"type":"pong","uid":"p"}"#,
    )
    .await;
}

#[tokio::test]
async fn init_answers_query_meta_from_state() {
    let server = start(with_tokens()).await;
    seed(&server).await;
    let mut c = server.ws_token("t1").await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"with-meta","query":{"fields":["id"],"limit":1,"meta":"*"}}"#,
        r#"{"type":"subscription","event":"init","data":[{"id":1}],"meta":{"total_count":3,"filter_count":3},"uid":"with-meta"}"#,
    )
    .await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"f","query":{"fields":["id"],"filter":{"status":{"_eq":"done"}},"meta":"filter_count"}}"#,
        r#"{"type":"subscription","event":"init","data":[{"id":5}],"meta":{"filter_count":1},"uid":"f"}"#,
    )
    .await;
    // A collection without state answers meta as it answers data: nothing retained.
    let server = start(retaining(&[])).await;
    let mut c = server.ws().await;
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"n","query":{"meta":"*"}}"#,
        r#"{"type":"subscription","event":"init","data":[],"uid":"n"}"#,
    )
    .await;
}

/// Query string, headers, and the error expected: status, code, `where`, message ("": any).
type ErrorCase = (
    String,
    Vec<(&'static str, &'static str)>,
    StatusCode,
    &'static str,
    &'static str,
    &'static str,
);

async fn get_items(
    server: &TestServer,
    query: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let (status, got, body) = server
        .request(
            "GET",
            &format!("/v1/collections/orders/items{query}"),
            headers,
            Vec::new(),
        )
        .await;
    let value: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    if status == StatusCode::OK {
        assert_eq!(got["content-type"], "application/json");
        support::schema_check_component("ItemsRead", &value);
    }
    (status, value)
}

fn encoded(filter: Value) -> String {
    percent_encoding::utf8_percent_encode(&filter.to_string(), percent_encoding::NON_ALPHANUMERIC)
        .to_string()
}

#[tokio::test]
async fn http_read_answers_directus_rest_shape_under_the_credential() {
    let mut config = with_tokens();
    config.state.max_init_items = 5;
    let server = start(config).await;
    seed(&server).await;
    let open = encoded(json!({"status":{"_eq":"open"}}));
    // Public mode (the default): the public permissions read everything.
    let cases: Vec<(String, Value)> = vec![
        (
            format!("?fields=id,status&filter={open}&sort=-id&limit=2"),
            json!({"data":[{"id":3,"status":"open"},{"id":2,"status":"open"}]}),
        ),
        (
            format!("?fields[]=id&fields[]=secret&filter={open}&meta=*&limit=1&page=2"),
            json!({"data":[{"id":2,"secret":"s2"}],"meta":{"total_count":6,"filter_count":3}}),
        ),
        (
            "?fields=id&search=done&offset=1&meta=filter_count&unknown=1".to_string(),
            json!({"data":[{"id":5},{"id":6}],"meta":{"filter_count":3}}),
        ),
    ];
    for (query, expected) in cases {
        let (status, body) = get_items(&server, &query, &[]).await;
        assert_eq!((status, body), (StatusCode::OK, expected), "{query}");
    }
    // A token: its row rule and field grant, by header or by access_token.
    for (query, headers) in [
        ("?meta=*", vec![("authorization", "Bearer t1")]),
        ("?meta=*&access_token=t1", vec![]),
    ] {
        let (status, body) = get_items(&server, query, &headers).await;
        assert_eq!(
            (status, body),
            (
                StatusCode::OK,
                json!({"data":[{"id":1,"tenant":1,"status":"open"},{"id":3,"tenant":1,"status":"open"},{"id":5,"tenant":1,"status":"done"}],"meta":{"total_count":3,"filter_count":3}})
            ),
            "{query}"
        );
    }
    let errors: Vec<ErrorCase> = vec![
        ("".into(), vec![("authorization", "Bearer nope")], StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authorization",
            "a valid access token is required: send `Authorization: Bearer <token>` (a static token or a JWT)"),
        ("".into(), vec![("authorization", "Basic dDE6")], StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authorization", ""),
        ("?fields=secret".into(), vec![("authorization", "Bearer t1")], StatusCode::FORBIDDEN, "FORBIDDEN", "fields",
            "You don't have permission to access field \"secret\" in collection \"orders\" or it does not exist. Queried in root."),
        ("?limit=x".into(), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "limit", "Invalid query. \"limit\" must be a number."),
        ("?filter=%7Bnot".into(), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "filter", "Invalid query. Invalid JSON for filter object."),
        ("?filter[status][_eq]=open".into(), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "filter", ""),
        (format!("?filter={}", encoded(json!({"id":{"_nope":1}}))), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "filter", ""),
        ("?sort=-".into(), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "sort", ""),
        ("?offset=-1".into(), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "offset", ""),
        ("?page=0&limit=1".into(), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "page", ""),
        ("?meta=nope".into(), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "meta", "Invalid query. \"meta[0]\" must be one of [total_count, filter_count]."),
        ("?limit=1&limit=2".into(), vec![], StatusCode::BAD_REQUEST, "INVALID_QUERY", "limit", "Invalid query. \"limit\" is given more than once."),
        ("?limit=-1".into(), vec![], StatusCode::UNPROCESSABLE_ENTITY, "LIMIT_EXCEEDED", "limit",
            "The read would return 6 items, over --max-init-items (5); narrow the filter or set a smaller limit."),
    ];
    for (query, headers, status, code, at, message) in errors {
        let got = get_items(&server, &query, &headers).await;
        support::assert_error(&query, (got.0, &got.1), status, code, at, message);
    }
    // A collection without state; one the token does not grant.
    let (status, _, body) = server
        .request("GET", "/v1/collections/invoices/items", &[], Vec::new())
        .await;
    let body: Value = serde_json::from_str(&body).expect("json");
    support::assert_error("invoices", (status, &body), StatusCode::NOT_FOUND, "INVALID_COLLECTION", "collection",
        "Collection \"invoices\" retains no items in Tidings (start it with --state invoices), so it cannot be read.");
    let (status, _, body) = server
        .request(
            "GET",
            "/v1/collections/invoices/items",
            &[("authorization", "Bearer t1")],
            Vec::new(),
        )
        .await;
    let body: Value = serde_json::from_str(&body).expect("json");
    support::assert_error(
        "invoices t1",
        (status, &body),
        StatusCode::FORBIDDEN,
        "FORBIDDEN",
        "",
        "",
    );
    // Another method: 405 naming GET and PUT.
    let (status, headers, _) = server
        .request(
            "POST",
            "/v1/collections/orders/items",
            &[("content-type", "application/json")],
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET, PUT");
}

#[tokio::test]
async fn http_read_needs_a_token_outside_public_mode() {
    let mut config = with_tokens();
    config.auth_mode = tidings::config::AuthMode::Handshake;
    let server = start(config).await;
    seed(&server).await;
    let (status, headers, body) = server
        .request("GET", "/v1/collections/orders/items", &[], Vec::new())
        .await;
    let body: Value = serde_json::from_str(&body).expect("json");
    support::assert_error(
        "no token",
        (status, &body),
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authorization",
        "",
    );
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, body) = get_items(&server, "?fields=id", &[("authorization", "bearer t1")]).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"data":[{"id":1},{"id":3},{"id":5}]}))
    );
    let reads = server
        .metric("tidings_state_read_duration_seconds_count")
        .await;
    assert_eq!(reads, Some(1.0));
}

#[tokio::test]
async fn an_indexed_field_serves_init_and_reads_as_a_scan_would() {
    let mut config = retaining(&["orders"]);
    config.state.indexes = vec![("orders".into(), "status".into())];
    let server = start(config).await;
    seed(&server).await;
    // Move items across the indexed values: the index follows the fold.
    server
        .publish(json!({"collection":"orders","event":"update","data":[{"id":1,"status":"done"},{"id":6,"status":"open"}]}))
        .await;
    server
        .publish(json!({"collection":"orders","event":"delete","keys":[2]}))
        .await;
    let mut c = server.ws().await;
    assert_eq!(
        read(&mut c, json!({"type":"items","collection":"orders","action":"read","query":{"fields":"id","filter":{"status":{"_eq":"open"}},"meta":"*"},"uid":"r"})).await,
        r#"{"type":"items","data":[{"id":3},{"id":6}],"meta":{"total_count":5,"filter_count":2},"uid":"r"}"#
    );
    c.exchange(
        r#"{"type":"subscribe","collection":"orders","uid":"s","query":{"fields":"id","filter":{"status":{"_in":["done","gone"]}}}}"#,
        r#"{"type":"subscription","event":"init","data":[{"id":1},{"id":4},{"id":5}],"uid":"s"}"#,
    )
    .await;
}

#[test]
fn indexes_need_a_retaining_collection() {
    let mut config = retaining(&["orders"]);
    config.state.indexes = vec![("invoices".into(), "status".into())];
    let error = tidings::app::App::new(config).expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("`invoices` retains no items: add --state invoices"),
        "{error}"
    );
    let file = tidings::collections::CollectionsFile::parse(
        std::path::Path::new("c.json"),
        r#"{"collections":{"logs":{"state":false,"indexes":["level"]}}}"#,
    )
    .expect("file");
    let config = Config {
        collections_file: Some(std::sync::Arc::new(file)),
        ..Config::default()
    };
    let error = tidings::app::App::new(config).expect_err("refused");
    assert!(
        error.to_string().contains("`logs` declares indexes"),
        "{error}"
    );
}
