//! `POST /v1/debezium` against a real broker, with change events copied from Debezium's own
//! documentation (`tests/fixtures/debezium/`, each file's source in `SOURCES.md` there):
//!
//! - PostgreSQL: `postgresql.adoc` § "_create_ events", "_update_ events", "_delete_ events",
//!   "_truncate_ events"; the snapshot read in the CloudEvents format from
//!   `integrations/cloudevents.adoc` § "Example event format";
//! - MySQL: `shared-mariadb-mysql.adoc` (the MySQL connector page) § "_create_ events",
//!   "_update_ events", "_delete_ events", "_truncate_ events"; the snapshot read from the
//!   tutorial's "Viewing a create event"; tombstones as § "Tombstone events" describes them.
//!
//! Each is sent with its schema envelope and as the bare payload (`schemas.enable=false`) and
//! gives exactly the expected frames; an update's full `before` drives an enter and a leave;
//! redeliveries are delivered once; logical types are
//! converted as the flags say; and a table of bad inputs gets exact statuses and errors, with
//! nothing delivered.

mod support;

use std::path::Path;
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{json, Value};
use support::{start, TestServer, WsClient};
use tidings::ingest::debezium::{DecimalMode, TimeMode};
use tidings::Config;

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/debezium")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

/// The fixture as `schemas.enable=false` sends it: the payload alone.
fn bare(event: &Value) -> Value {
    event["payload"].clone()
}

fn config() -> Config {
    let mut config = Config {
        max_publish_bytes: 64 * 1024,
        ..Config::default()
    };
    // Both documented databases have a `customers` table: one collection each.
    for (table, collection) in [
        ("public.customers", "pg_customers"),
        ("inventory.customers", "my_customers"),
    ] {
        config
            .debezium
            .collections
            .insert(table.into(), collection.into());
    }
    // The CloudEvents example's table `s1.a` has the primary key `pk`.
    config.key_fields.insert("a".into(), "pk".into());
    config
}

async fn subscribed(server: &TestServer, subs: &[(&str, &str)]) -> WsClient {
    server.ws_subscribed(subs).await
}

async fn post(server: &TestServer, body: &Value) -> (StatusCode, Value) {
    server.post("/v1/debezium", body).await
}

/// (collection, event, items, duplicate) of each accepted event.
fn accepted(answer: &Value) -> Vec<(String, String, u64, bool)> {
    support::schema_check_http(answer);
    answer["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .map(|e| {
                    (
                        e["collection"].as_str().unwrap_or_default().to_string(),
                        e["event"].as_str().unwrap_or_default().to_string(),
                        e["items"].as_u64().unwrap_or_default(),
                        e["duplicate"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn one(collection: &str, event: &str) -> Vec<(String, String, u64, bool)> {
    vec![(collection.into(), event.into(), 1, false)]
}

const PG_ROW: &str =
    r#"{"id":1,"first_name":"Anne","last_name":"Kretchmar","email":"annek@noanswer.org"}"#;
const PG_UPDATED: &str =
    r#"{"id":1,"first_name":"Anne Marie","last_name":"Kretchmar","email":"annek@noanswer.org"}"#;
const MY_ROW: &str =
    r#"{"id":1004,"first_name":"Anne","last_name":"Kretchmar","email":"annek@noanswer.org"}"#;
const MY_UPDATED: &str =
    r#"{"id":1004,"first_name":"Anne Marie","last_name":"Kretchmar","email":"annek@noanswer.org"}"#;

#[tokio::test]
async fn documented_events_give_exactly_the_expected_frames() {
    for with_schema in [true, false] {
        let form = |v: Value| if with_schema { v } else { bare(&v) };
        let server = start(config()).await;
        let mut ws = subscribed(
            &server,
            &[("pg_customers", "p"), ("my_customers", "m"), ("a", "a")],
        )
        .await;
        let what = if with_schema {
            "with schema"
        } else {
            "without schema"
        };

        // PostgreSQL: create, update, delete; MySQL: the snapshot read, create, update (a
        // full `before`), delete. (Their truncates are refused, below.)
        let pg = |event: &str, data: &str| {
            (
                event.to_string(),
                format!(r#"{{"type":"subscription","event":"{event}","data":[{data}],"uid":"p"}}"#),
            )
        };
        let my = |event: &str, data: &str| {
            (
                event.to_string(),
                format!(r#"{{"type":"subscription","event":"{event}","data":[{data}],"uid":"m"}}"#),
            )
        };
        let steps = [
            (
                "postgresql-create.json",
                "pg_customers",
                pg("create", PG_ROW),
            ),
            (
                "postgresql-update.json",
                "pg_customers",
                pg("update", PG_UPDATED),
            ),
            ("postgresql-delete.json", "pg_customers", pg("delete", "1")),
            ("mysql-snapshot.json", "my_customers", my("create", MY_ROW)),
            ("mysql-create.json", "my_customers", my("create", MY_ROW)),
            (
                "mysql-update.json",
                "my_customers",
                my("update", MY_UPDATED),
            ),
            ("mysql-delete.json", "my_customers", my("delete", "1004")),
        ];
        for (file, collection, (event, frame)) in &steps {
            let (status, answer) = post(&server, &form(fixture(file))).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{what} {file}: {answer}");
            assert_eq!(accepted(&answer), one(collection, event), "{what} {file}");
            ws.expect(frame).await;
        }
        // Truncates: nothing is retained, so they are refused, and say why (a retained
        // collection's truncate: `truncate_deletes_every_retained_item`).
        for (file, collection) in [
            ("postgresql-truncate.json", "pg_customers"),
            ("mysql-truncate.json", "my_customers"),
        ] {
            let (status, answer) = post(&server, &form(fixture(file))).await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{what} {file}: {answer}"
            );
            let pointer = if with_schema { "/payload/op" } else { "/op" };
            assert_eq!(
                answer["error"],
                json!({"code": "INVALID_PAYLOAD", "where": pointer, "message": format!(
                    "a truncate of `{collection}` cannot be published: Tidings keeps no state of this collection (see --state), so it cannot tell which items to delete"
                )}),
                "{what} {file}"
            );
        }
        // The CloudEvents format (the example has JSON data without a schema either way).
        let (status, answer) = post(&server, &fixture("postgresql-snapshot.cloudevent.json")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(accepted(&answer), one("a", "create"));
        ws.expect(
            r#"{"type":"subscription","event":"create","data":[{"pk":1,"name":"Bob"}],"uid":"a"}"#,
        )
        .await;

        // Tombstones: accepted, skipped, counted.
        let tombstone = if with_schema {
            json!({"schema": null, "payload": null})
        } else {
            Value::Null
        };
        let (status, answer) = post(&server, &tombstone).await;
        assert_eq!(
            (status, &answer),
            (
                StatusCode::ACCEPTED,
                &json!({"events": [], "tombstones": 1})
            )
        );
        support::schema_check_http(&answer);

        ws.expect_silence(Duration::from_millis(200)).await;
        assert_eq!(
            server.metric("tidings_debezium_tombstones_total").await,
            Some(1.0)
        );
        assert_eq!(
            server
                .metric("tidings_publish_requests_total{format=\"debezium\",status=\"202\"}")
                .await,
            Some(9.0)
        );
        assert_eq!(
            server
                .metric("tidings_publish_requests_total{format=\"debezium\",status=\"422\"}")
                .await,
            Some(2.0)
        );
    }
}

#[tokio::test]
async fn redeliveries_and_batches() {
    let server = start(config()).await;
    let mut ws = subscribed(&server, &[("my_customers", "m")]).await;
    let update = fixture("mysql-update.json");
    let (_, first) = post(&server, &update).await;
    assert_eq!(accepted(&first), one("my_customers", "update"));
    ws.expect(&format!(
        r#"{{"type":"subscription","event":"update","data":[{MY_UPDATED}],"uid":"m"}}"#
    ))
    .await;
    // The same change again, with or without its schema: the same source position.
    for again in [update.clone(), bare(&update)] {
        let (status, answer) = post(&server, &again).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(
            accepted(&answer),
            vec![("my_customers".into(), "update".into(), 1, true)]
        );
        assert_eq!(answer["events"][0]["offset"], first["events"][0]["offset"]);
    }
    ws.expect_silence(Duration::from_millis(200)).await;

    // An array: a Kafka Connect batch, tombstone included, all or nothing.
    let batch = json!([
        fixture("mysql-snapshot.json"),
        bare(&fixture("mysql-delete.json")),
        null
    ]);
    let (status, answer) = post(&server, &batch).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["tombstones"], 1);
    assert_eq!(
        accepted(&answer),
        [one("my_customers", "create"), one("my_customers", "delete")].concat()
    );
    ws.expect(&format!(
        r#"{{"type":"subscription","event":"create","data":[{MY_ROW}],"uid":"m"}}"#
    ))
    .await;
    ws.expect(r#"{"type":"subscription","event":"delete","data":[1004],"uid":"m"}"#)
        .await;
    assert_eq!(
        server.metric("tidings_publish_duplicates_total").await,
        Some(2.0)
    );
}

/// A create in `products` whose columns have Debezium's logical types, encoded as
/// `postgresql.adoc` § "Decimal types" (`decimal.handling.mode=precise`: base64 of the unscaled
/// two's-complement value, `scale` in the schema's parameters; `VariableScaleDecimal` as
/// `{scale, value}`) and § "Temporal types" (`time.precision.mode=adaptive`: `Date` in days,
/// `MicroTimestamp` in µs and `MicroTime` in µs past midnight, `Timestamp` in ms) describe
/// them. Not a documentation example: the documentation gives the encodings, not an event.
fn typed_event() -> Value {
    let field = |name: &str, ty: &str, logical: Option<&str>, parameters: Value| {
        let mut f = json!({"type": ty, "optional": true, "field": name});
        if let Some(logical) = logical {
            f["name"] = json!(logical);
        }
        if !parameters.is_null() {
            f["parameters"] = parameters;
        }
        f
    };
    let row = vec![
        field("id", "int32", None, Value::Null),
        field(
            "price",
            "bytes",
            Some("org.apache.kafka.connect.data.Decimal"),
            json!({"scale": "2", "connect.decimal.precision": "10"}),
        ),
        field(
            "weight",
            "struct",
            Some("io.debezium.data.VariableScaleDecimal"),
            Value::Null,
        ),
        field(
            "released",
            "int32",
            Some("io.debezium.time.Date"),
            Value::Null,
        ),
        field(
            "updated_at",
            "int64",
            Some("io.debezium.time.MicroTimestamp"),
            Value::Null,
        ),
        field(
            "opens",
            "int64",
            Some("io.debezium.time.MicroTime"),
            Value::Null,
        ),
        field(
            "seen",
            "int64",
            Some("io.debezium.time.Timestamp"),
            Value::Null,
        ),
        field("note", "string", None, Value::Null),
    ];
    json!({
        "schema": {"type": "struct", "name": "pg.public.products.Envelope", "fields": [
            {"type": "struct", "optional": true, "field": "before", "fields": row.clone()},
            {"type": "struct", "optional": true, "field": "after", "fields": row},
            {"type": "struct", "optional": false, "field": "source", "fields": []},
            {"type": "string", "optional": false, "field": "op"}
        ]},
        "payload": {
            "before": null,
            "after": {
                "id": 7,
                // 0x01E240 = 123456 → 1234.56 at scale 2.
                "price": "AeJA",
                // 0xFB2E = -1234 → -1.234 at scale 3.
                "weight": {"scale": 3, "value": "+y4="},
                "released": 16953,
                "updated_at": 1465491411815437i64,
                "opens": 49539738000i64,
                "seen": 1465491411815i64,
                "note": "AeJA"
            },
            "source": {"connector": "postgresql", "name": "pg", "db": "shop", "schema": "public", "table": "products", "lsn": 42},
            "op": "c",
            "ts_ms": 1465491411815i64
        }
    })
}

#[tokio::test]
async fn logical_types_are_converted_as_the_flags_say() {
    let cases = [
        (
            DecimalMode::String,
            TimeMode::Iso,
            r#"{"id":7,"price":"1234.56","weight":"-1.234","released":"2016-06-01","updated_at":"2016-06-09T16:56:51.815437Z","opens":"13:45:39.738","seen":"2016-06-09T16:56:51.815Z","note":"AeJA"}"#,
        ),
        (
            DecimalMode::Number,
            TimeMode::Epoch,
            r#"{"id":7,"price":1234.56,"weight":-1.234,"released":16953,"updated_at":1465491411815437,"opens":49539738000,"seen":1465491411815,"note":"AeJA"}"#,
        ),
        (
            DecimalMode::Base64,
            TimeMode::Iso,
            r#"{"id":7,"price":"AeJA","weight":{"scale":3,"value":"+y4="},"released":"2016-06-01","updated_at":"2016-06-09T16:56:51.815437Z","opens":"13:45:39.738","seen":"2016-06-09T16:56:51.815Z","note":"AeJA"}"#,
        ),
    ];
    for (decimal, time, row) in cases {
        let mut config = config();
        config.debezium.decimal = decimal;
        config.debezium.time = time;
        let server = start(config).await;
        let mut ws = subscribed(&server, &[("products", "x")]).await;
        let (status, answer) = post(&server, &typed_event()).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{decimal:?} {time:?}: {answer}"
        );
        ws.expect(&format!(
            r#"{{"type":"subscription","event":"create","data":[{row}],"uid":"x"}}"#
        ))
        .await;
        // Without a schema there are no logical types: values pass through.
        let mut plain = bare(&typed_event());
        plain["source"]["lsn"] = json!(43);
        let (status, _) = post(&server, &plain).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let raw = serde_json::to_string(&plain["after"]).expect("json");
        ws.expect(&format!(
            r#"{{"type":"subscription","event":"create","data":[{raw}],"uid":"x"}}"#
        ))
        .await;
    }
}

#[tokio::test]
async fn bad_inputs_get_exact_errors_and_deliver_nothing() {
    let mut config = config();
    config.max_publish_bytes = 8192;
    config.max_publish_events = 3;
    config.debezium.tables = Some(
        ["public.customers", "inventory.customers", "products"]
            .map(String::from)
            .into(),
    );
    let server = start(config).await;
    let mut ws = subscribed(
        &server,
        &[
            ("pg_customers", "p"),
            ("my_customers", "m"),
            ("secrets", "s"),
            ("products", "x"),
        ],
    )
    .await;
    let create = bare(&fixture("postgresql-create.json"));
    let with = |path: &[&str], value: Value| {
        let mut event = create.clone();
        let mut at = &mut event;
        for (i, key) in path.iter().enumerate() {
            if i + 1 == path.len() {
                if value.is_null() {
                    at.as_object_mut().map(|o| o.remove(*key));
                } else {
                    at[*key] = value.clone();
                }
                break;
            }
            at = &mut at[*key];
        }
        event
    };
    let mut bad_decimal = typed_event();
    bad_decimal["payload"]["after"]["price"] = json!("not*base64");
    let truncate = fixture("postgresql-truncate.json");
    /// (what, body, status, code, where, message)
    type Case<'a> = (&'a str, Vec<u8>, StatusCode, &'a str, &'a str, String);
    let cases: Vec<Case> = vec![
        ("not JSON", b"{\"payload\":".to_vec(), StatusCode::BAD_REQUEST, "INVALID_JSON", "", String::new()),
        ("a number", b"5".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "",
         "expected a Debezium change event (an object), got number".into()),
        ("no op", with(&["op"], Value::Null).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/op",
         "missing field `op`".into()),
        ("unknown op", with(&["op"], json!("x")).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/op",
         "unknown op `x`; expected c, r, u, d or t".into()),
        ("op of the wrong type", with(&["op"], json!(1)).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/op",
         "`op` must be a string, got number".into()),
        ("no source", with(&["source"], Value::Null).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/source",
         "missing field `source`".into()),
        ("no table", with(&["source", "table"], Value::Null).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/source/table",
         "missing `source.table`".into()),
        ("a table outside the allow-list", with(&["source", "table"], json!("secrets")).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/source/table",
         "table `public.secrets` is not accepted: add it to --debezium-tables".into()),
        ("a create without after", with(&["after"], Value::Null).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/after",
         "a `c` event needs `after`: the row".into()),
        ("after of the wrong type", with(&["after"], json!([1])).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/after",
         "`after` must be an object, got array".into()),
        ("a row without its key", with(&["after", "id"], Value::Null).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/after/id",
         "the item has no key field `id`".into()),
        ("a key of the wrong type", with(&["after", "id"], json!(true)).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/after/id",
         "the key field `id` must be a string or a number, got boolean".into()),
        ("a delete without before (REPLICA IDENTITY NOTHING)", with(&["op"], json!("d")).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/before",
         "a `d` event needs `before`: the row".into()),
        ("a truncate", truncate.to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/payload/op",
         "a truncate of `pg_customers` cannot be published: Tidings keeps no state of this collection (see --state), so it cannot tell which items to delete".into()),
        ("a decimal that is not base64", bad_decimal.to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/payload/after/price",
         "`not*base64` is not a base64 Decimal".into()),
        ("a bad event after a good one", json!([create, with(&["op"], json!("m"))]).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/1/op",
         "unknown op `m`; expected c, r, u, d or t".into()),
        ("an empty array", b"[]".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "",
         "the array of change events is empty".into()),
        ("too many events", json!([create, create, create, create]).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "",
         "4 change events in one request; the limit is 3".into()),
        ("a CloudEvent of another specversion", json!({"specversion": "0.3", "id": "1", "source": "/x", "type": "t", "data": create}).to_string().into_bytes(), StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/specversion",
         "a CloudEvent here has specversion `1.0`".into()),
        ("oversized", with(&["after", "pad"], json!("x".repeat(9000))).to_string().into_bytes(), StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "",
         "the request body is larger than 8192 bytes".into()),
    ];
    let count = cases.len();
    for (what, body, status, code, pointer, message) in cases {
        let (got, answer) = server
            .post_raw("/v1/debezium", Some("application/json"), body, &[])
            .await;
        support::assert_error(what, (got, &answer), status, code, pointer, &message);
    }
    ws.expect_silence(Duration::from_millis(200)).await;
    let mut refused = 0.0;
    for status in ["400", "413", "422"] {
        refused += server
            .metric(&format!(
                "tidings_publish_requests_total{{format=\"debezium\",status=\"{status}\"}}"
            ))
            .await
            .unwrap_or_default();
    }
    assert_eq!(refused, count as f64);
    // Nothing took an offset: the first accepted change is offset 1.
    let (status, answer) = post(&server, &create).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(answer["events"][0]["offset"], 1);
    ws.expect(&format!(
        r#"{{"type":"subscription","event":"create","data":[{PG_ROW}],"uid":"p"}}"#
    ))
    .await;
}

/// An update's `before` decides transitions in a collection Tidings retains nothing of: the
/// MySQL update (full row image) moves row 1004 out of one filter and into another, so one
/// subscriber gets a `leave` and the other an `enter`. PostgreSQL's update under the default
/// replica identity carries the key only: no previous version, so the stateless rule
/// applies (only the new version is judged).
#[tokio::test]
async fn before_drives_enter_and_leave() {
    let server = start(config()).await;
    let mut ws = server.ws().await;
    for (collection, uid, name) in [
        ("my_customers", "anne", "Anne"),
        ("my_customers", "marie", "Anne Marie"),
        ("pg_customers", "pg_anne", "Anne"),
        ("pg_customers", "pg_marie", "Anne Marie"),
    ] {
        ws.send(
            &json!({"type": "subscribe", "collection": collection, "uid": uid,
            "query": {"filter": {"first_name": {"_eq": name}}}})
            .to_string(),
        )
        .await;
        ws.expect(&format!(
            r#"{{"type":"subscription","event":"init","data":[],"uid":"{uid}"}}"#
        ))
        .await;
    }
    for form in [
        fixture("mysql-update.json"),
        bare(&fixture("postgresql-update.json")),
    ] {
        let (status, answer) = post(&server, &form).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    }
    ws.expect(
        r#"{"type":"subscription","event":"delete","data":[1004],"uid":"anne","cause":"leave"}"#,
    )
    .await;
    ws.expect(&format!(r#"{{"type":"subscription","event":"create","data":[{MY_UPDATED}],"uid":"marie","cause":"enter"}}"#)).await;
    ws.expect(&format!(
        r#"{{"type":"subscription","event":"update","data":[{PG_UPDATED}],"uid":"pg_marie"}}"#
    ))
    .await;
    ws.expect_silence(Duration::from_millis(200)).await;
}

fn retaining_config() -> Config {
    let mut config = config();
    config.state.collections = vec!["pg_customers".into(), "my_customers".into()];
    config
}

fn customer(id: i64, first_name: &str) -> Value {
    json!({"id": id, "first_name": first_name, "last_name": "Kretchmar", "email": format!("c{id}@noanswer.org")})
}

/// Debezium's own truncate examples (`postgresql-truncate.json`, `mysql-truncate.json`, with
/// and without schema) on collections that retain state: one `delete` of every retained item,
/// which each subscriber sees only for the items it was shown (a filtered subscriber the
/// matching ones, an unfiltered one all), and after which the state is empty. A redelivered
/// truncate is delivered once; a truncate of an empty collection reaches nobody.
#[tokio::test]
async fn truncate_deletes_every_retained_item() {
    for with_schema in [true, false] {
        let form = |v: Value| if with_schema { v } else { bare(&v) };
        let server = start(retaining_config()).await;
        let seed = |collection: &str, ids: &[(i64, &str)]| {
            json!({"collection": collection, "event": "create",
                "data": ids.iter().map(|(id, name)| customer(*id, name)).collect::<Vec<_>>()})
        };
        server
            .publish(seed(
                "pg_customers",
                &[(1, "Anne"), (2, "Bob"), (3, "Anne")],
            ))
            .await;
        server
            .publish(seed("my_customers", &[(1004, "Anne"), (1005, "Edward")]))
            .await;
        let mut ws = server.ws().await;
        for (collection, uid, query, init) in [
            (
                "pg_customers",
                "all",
                json!({}),
                json!([customer(1, "Anne"), customer(2, "Bob"), customer(3, "Anne")]),
            ),
            (
                "pg_customers",
                "annes",
                json!({"filter": {"first_name": {"_eq": "Anne"}}}),
                json!([customer(1, "Anne"), customer(3, "Anne")]),
            ),
            (
                "pg_customers",
                "nobody",
                json!({"filter": {"first_name": {"_eq": "Zoe"}}}),
                json!([]),
            ),
            (
                "my_customers",
                "my",
                json!({"filter": {"first_name": {"_eq": "Edward"}}}),
                json!([customer(1005, "Edward")]),
            ),
        ] {
            ws.send(
                &json!({"type": "subscribe", "collection": collection, "uid": uid, "query": query})
                    .to_string(),
            )
            .await;
            ws.expect(&format!(
                r#"{{"type":"subscription","event":"init","data":{init},"uid":"{uid}"}}"#
            ))
            .await;
        }
        let truncate = form(fixture("postgresql-truncate.json"));
        let (status, answer) = post(&server, &truncate).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(
            accepted(&answer),
            vec![("pg_customers".into(), "delete".into(), 0, false)]
        );
        assert_eq!(answer["events"][0]["offset"], 2);
        ws.expect(r#"{"type":"subscription","event":"delete","data":[1,2,3],"uid":"all"}"#)
            .await;
        ws.expect(r#"{"type":"subscription","event":"delete","data":[1,3],"uid":"annes"}"#)
            .await;
        // The same truncate again (same source position): delivered once.
        let (status, again) = post(&server, &truncate).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(again["events"][0]["duplicate"], true, "{again}");
        // A truncate of what is now empty: accepted, reaches nobody.
        let mut later = truncate.clone();
        let source = if with_schema {
            &mut later["payload"]["source"]
        } else {
            &mut later["source"]
        };
        source["lsn"] = json!(46523200);
        let (status, answer) = post(&server, &later).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(answer["events"][0]["offset"], 3);
        // MySQL's truncate example, in the same batch as a create after it: the create
        // survives (the truncate deletes what is held when it is applied).
        let batch = json!([
            form(fixture("mysql-truncate.json")),
            form(fixture("mysql-create.json"))
        ]);
        let (status, answer) = post(&server, &batch).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        assert_eq!(
            accepted(&answer),
            [
                vec![("my_customers".into(), "delete".into(), 0, false)],
                one("my_customers", "create")
            ]
            .concat()
        );
        ws.expect(r#"{"type":"subscription","event":"delete","data":[1005],"uid":"my"}"#)
            .await;
        ws.expect_silence(Duration::from_millis(200)).await;
        assert_eq!(
            server
                .metric("tidings_state_items{collection=\"pg_customers\"}")
                .await,
            Some(0.0)
        );
        assert_eq!(
            server
                .metric("tidings_state_items{collection=\"my_customers\"}")
                .await,
            Some(1.0)
        );
        // A new subscriber's init is what is left.
        ws.send(r#"{"type":"subscribe","collection":"my_customers","uid":"late"}"#)
            .await;
        ws.expect(&format!(
            r#"{{"type":"subscription","event":"init","data":[{MY_ROW}],"uid":"late"}}"#
        ))
        .await;
        ws.send(r#"{"type":"subscribe","collection":"pg_customers","uid":"late_pg"}"#)
            .await;
        ws.expect(r#"{"type":"subscription","event":"init","data":[],"uid":"late_pg"}"#)
            .await;
    }
}

/// The CloudEvents binary content mode at `/v1/debezium`: the attributes in `ce-*` headers
/// (`ce-iodebezium*` standing in for `op` and `source`), the body the change (`data`), with or
/// without its schema envelope. Debezium's own CloudEvents example, sent binary, gives the
/// same frame as sent structured; a redelivery in the other mode is the same change.
#[tokio::test]
async fn cloudevents_binary_mode() {
    let server = start(config()).await;
    let mut ws = subscribed(&server, &[("a", "a"), ("pg_customers", "p")]).await;
    let structured = fixture("postgresql-snapshot.cloudevent.json");
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in structured.as_object().expect("object") {
        let value = match value {
            Value::String(s) => s.clone(),
            Value::Null => continue,
            _ if name == "data" => continue,
            other => other.to_string(),
        };
        if name != "datacontenttype" {
            headers.push((format!("ce-{name}"), value));
        }
    }
    let (status, answer) = post_binary(&server, &structured["data"], &headers).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(accepted(&answer), one("a", "create"));
    ws.expect(
        r#"{"type":"subscription","event":"create","data":[{"pk":1,"name":"Bob"}],"uid":"a"}"#,
    )
    .await;
    // The same event structured: the same source position, so a duplicate.
    let (status, answer) = post(&server, &structured).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(answer["events"][0]["duplicate"], true, "{answer}");

    // A change with its schema envelope as the body, and only the required attributes.
    let required: Vec<(String, String)> = [
        ("ce-specversion", "1.0"),
        ("ce-id", "name:PostgreSQL_server;lsn:33227720"),
        ("ce-source", "/debezium/postgresql/PostgreSQL_server"),
        (
            "ce-type",
            "io.debezium.connector.postgresql.DataChangeEvent",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (status, answer) =
        post_binary(&server, &fixture("postgresql-create.json"), &required).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(accepted(&answer), one("pg_customers", "create"));
    ws.expect(&format!(
        r#"{{"type":"subscription","event":"create","data":[{PG_ROW}],"uid":"p"}}"#
    ))
    .await;

    // Bad binary events: exact errors, nothing delivered.
    let with = |name: &str, value: Option<&str>| {
        let mut h: Vec<(String, String)> =
            headers.iter().filter(|(k, _)| k != name).cloned().collect();
        if let Some(v) = value {
            h.push((name.to_string(), v.to_string()));
        }
        h
    };
    /// (what, body, headers, status, code, where, message)
    type Case<'a> = (
        &'a str,
        Value,
        Vec<(String, String)>,
        StatusCode,
        &'a str,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("another specversion", structured["data"].clone(), with("ce-specversion", Some("0.3")),
         StatusCode::BAD_REQUEST, "INVALID_HEADER", "ce-specversion",
         "invalid ce-specversion header: unsupported specversion `0.3`: this endpoint takes CloudEvents 1.0"),
        ("no op anywhere", structured["data"].clone(), with("ce-iodebeziumop", None),
         StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/op", "missing field `op`"),
        ("an unknown op in the header", structured["data"].clone(), with("ce-iodebeziumop", Some("x")),
         StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/op", "unknown op `x`; expected c, r, u, d or t"),
        ("no table anywhere", structured["data"].clone(), with("ce-iodebeziumtable", None),
         StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/source/table", "missing `source.table`"),
        ("a body that is no change", json!([1]), headers.clone(),
         StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "", "expected the change event as a JSON object, got array"),
        ("a truncate of a collection without state", json!({}), with("ce-iodebeziumop", Some("t")),
         StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PAYLOAD", "/op",
         "a truncate of `a` cannot be published: Tidings keeps no state of this collection (see --state), so it cannot tell which items to delete"),
    ];
    for (what, body, headers, status, code, pointer, message) in cases {
        let got = post_binary(&server, &body, &headers).await;
        support::assert_error(what, (got.0, &got.1), status, code, pointer, message);
    }
    ws.expect_silence(Duration::from_millis(200)).await;
}

async fn post_binary(
    server: &TestServer,
    body: &Value,
    headers: &[(String, String)],
) -> (StatusCode, Value) {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    server
        .post_raw(
            "/v1/debezium",
            Some("application/json"),
            body.to_string().into_bytes(),
            &headers,
        )
        .await
}
