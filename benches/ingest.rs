//! The cost of one publish in each body format, through the real HTTP edge: the same item
//! (one order) as `/v1/publish` JSON, as a structured CloudEvent, and as a Debezium change
//! event with its schema envelope, each POSTed to an in-process broker over loopback HTTP
//! (keep-alive, no subscribers). Every request carries a new identity (CloudEvents `id`,
//! Debezium `lsn`), so deduplication never short-cuts a publish. Issue 12's target: the
//! CloudEvents and Debezium rows at most 1.2x the JSON row (BENCHMARKS.md).

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tidings::app::App;
use tidings::Config;

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn item() -> Value {
    json!({"id": 1, "status": "paid", "total": 42.5, "customer": "ann", "note": "leave at the door"})
}

fn bodies(n: u64) -> [(&'static str, &'static str, String); 3] {
    let item = item();
    [
        (
            "/v1/publish",
            "application/json",
            json!({"collection": "orders", "event": "create", "data": item}).to_string(),
        ),
        (
            "/v1/cloudevents",
            "application/cloudevents+json",
            json!({"specversion": "1.0", "id": format!("e{n}"), "source": "/shop", "type": "com.shop.order.created",
                   "subject": "orders", "data": item}).to_string(),
        ),
        (
            "/v1/debezium",
            "application/json",
            json!({"schema": {"type": "struct", "fields": [
                       {"type": "struct", "optional": true, "field": "after", "fields": [
                           {"type": "int32", "field": "id"}, {"type": "string", "field": "status"},
                           {"type": "double", "field": "total"}, {"type": "string", "field": "customer"},
                           {"type": "string", "field": "note"}]}]},
                   "payload": {"before": null, "after": item, "op": "c", "ts_ms": 1,
                       "source": {"connector": "postgresql", "name": "shop", "db": "shop", "schema": "public",
                                  "table": "orders", "lsn": n}}}).to_string(),
        ),
    ]
}

async fn post(client: &Http, url: &str, content_type: &str, body: String) {
    let req = Request::post(url)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = client.request(req).await.expect("HTTP");
    assert_eq!(response.status(), 202);
    let _ = response.into_body().collect().await.expect("body");
}

fn formats(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = App::new(Config::default()).expect("config");
        tokio::spawn(async move {
            let _ = app.serve(listener, std::future::pending::<()>()).await;
        });
        addr
    });
    let client: Http = Client::builder(TokioExecutor::new()).build_http();
    let n = AtomicU64::new(1);
    let mut group = c.benchmark_group("publish_format");
    for (i, name) in ["json", "cloudevents", "debezium"].into_iter().enumerate() {
        group.bench_function(name, |b| {
            b.iter(|| {
                let (path, content_type, body) = bodies(n.fetch_add(1, Ordering::Relaxed))
                    .into_iter()
                    .nth(i)
                    .expect("format");
                rt.block_on(post(
                    &client,
                    &format!("http://{addr}{path}"),
                    content_type,
                    body,
                ));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, formats);
criterion_main!(benches);
