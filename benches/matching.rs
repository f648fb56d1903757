//! The publish path: one event against N live subscriptions, through the real public API
//! (`subscription::compile` → `Registry::insert` → `Hub::dispatch` → `Outbox`).
//!
//! - `matching_distinct_eq/N`: N subscriptions, each `{"tenant_id":{"_eq": i}}` with fields
//!   `["id","total"]` and its own uid and outbox (N groups); each event matches exactly one.
//!   Target: cost at N = 100,000 ≤ 2 × cost at N = 1,000, and < 5 µs.
//! - `matching_distinct_eq_miss/N`: same registry, an event whose tenant nobody filters on.
//! - `broadcast_identical/N`: N identical subscriptions (same filter, fields and uid "1"): one
//!   group, one encoding, N outbox pushes. Throughput is per delivery.
//! - `projection_encode`: `subscription::payloads` (project + serialize) of one 20-field item, to two
//!   fields and to the whole item.
//!
//! Outboxes are drained outside the timed region (`iter_custom`).
//!
//! Run: `cargo bench -j1 --bench matching -- --warm-up-time 1 --measurement-time 3`
//! (figures and machine in BENCHMARKS.md).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Map, Value};
use tidings::auth::{Permissions, Principal};
use tidings::event::{Event, EventKind};
use tidings::filter::FilterLimits;
use tidings::hub::Hub;
use tidings::metrics::Metrics;
use tidings::outbox::{Frame, Outbox};
use tidings::protocol::{SubscribeRequest, Uid};
use tidings::registry::Registry;
use tidings::subscription::{compile, payloads, Spec, SpecContext};

const COLLECTION: &str = "orders";
const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

fn principal() -> Principal {
    Principal::new(None, Permissions::all())
}

fn spec(filter: Option<Value>, fields: Option<Value>, uid: &str) -> Spec {
    let mut query = Map::new();
    if let Some(f) = filter {
        query.insert("filter".into(), f);
    }
    if let Some(f) = fields {
        query.insert("fields".into(), f);
    }
    let req = SubscribeRequest {
        uid: Some(Uid::Str(Arc::from(uid))),
        collection: COLLECTION.into(),
        event: None,
        item: None,
        query: Some(query),
        nested: false,
        since: None,
        checkpoints: false,
        max_rate: None,
    };
    let principal = principal();
    let limits = FilterLimits::default();
    let ctx = SpecContext {
        principal: &principal,
        limits: &limits,
        key_field: "id",
    };
    compile(&req, &ctx).unwrap_or_else(|e| panic!("bench subscription refused: {e:?}"))
}

fn outbox() -> Arc<Outbox> {
    Arc::new(Outbox::new(usize::MAX / 2, usize::MAX / 2))
}

/// A hub over `n` subscriptions; subscription `i` has `filter(i)`, fields `["id","total"]`,
/// uid `uid(i)` and its own outbox (returned in subscription order).
fn setup(
    n: usize,
    filter: impl Fn(usize) -> Value,
    uid: impl Fn(usize) -> String,
) -> (Hub, Vec<Arc<Outbox>>) {
    let registry = Arc::new(Registry::new());
    let outboxes: Vec<Arc<Outbox>> = (0..n)
        .map(|i| {
            let uid = uid(i);
            let ob = outbox();
            registry.insert(
                spec(Some(filter(i)), Some(json!(["id", "total"])), &uid),
                Some(Arc::from(uid.as_str())),
                ob.clone(),
            );
            ob
        })
        .collect();
    let metrics = Arc::new(Metrics::new(100).expect("metrics"));
    (Hub::new(registry, metrics, history()), outboxes)
}

fn order(id: u64, tenant: u64) -> Value {
    json!({
        "id": id,
        "tenant_id": tenant,
        "status": "paid",
        "total": 1249.5,
        "currency": "EUR",
        "created_at": "2024-06-01T10:15:30Z",
        "customer": {"id": 4411, "name": "Ann Example"},
        "note": "deliver before noon",
    })
}

fn create(item: Value) -> Event {
    let key = item["id"].clone();
    Event {
        collection: Arc::from(COLLECTION),
        kind: EventKind::Create,
        items: vec![item],
        keys: vec![key],
        before: Vec::new(),
        version: None,
        apply: Default::default(),
        offset: 1,
        epoch: Arc::from("bench"),
        received: Instant::now(),
    }
}

fn drain(outboxes: &[&Arc<Outbox>], buf: &mut Vec<Frame>) -> usize {
    let mut n = 0;
    for ob in outboxes {
        ob.drain(buf);
        n += buf.len();
        buf.clear();
    }
    n
}

/// Times `dispatch` of `events` in turn, `batch` dispatches per timed block, draining
/// `targets` (the outboxes those events reach) between blocks, untimed.
fn timed_dispatch(
    hub: &Hub,
    events: &[Event],
    targets: &[&Arc<Outbox>],
    batch: u64,
    iters: u64,
) -> Duration {
    let mut buf = Vec::new();
    let mut total = Duration::ZERO;
    let mut done = 0u64;
    let mut next = 0usize;
    while done < iters {
        let this = batch.min(iters - done);
        let start = Instant::now();
        for _ in 0..this {
            hub.dispatch(black_box(&events[next]));
            next = (next + 1) % events.len();
        }
        total += start.elapsed();
        drain(targets, &mut buf);
        done += this;
    }
    total
}

fn bench_distinct(c: &mut Criterion) {
    const SPREAD: usize = 16;
    for (name, miss) in [
        ("matching_distinct_eq", false),
        ("matching_distinct_eq_miss", true),
    ] {
        let mut group = c.benchmark_group(name);
        group.sample_size(20);
        group.throughput(Throughput::Elements(1));
        for n in SIZES {
            let (hub, outboxes) =
                setup(n, |i| json!({"tenant_id": {"_eq": i}}), |i| format!("s{i}"));
            // Events for 16 tenants spread over the range, in turn; or tenants nobody has.
            let tenants: Vec<usize> = (0..SPREAD)
                .map(|k| {
                    if miss {
                        n + k
                    } else {
                        (k * n / SPREAD + 7) % n
                    }
                })
                .collect();
            let events: Vec<Event> = tenants
                .iter()
                .map(|t| create(order(*t as u64, *t as u64)))
                .collect();
            let targets: Vec<&Arc<Outbox>> =
                tenants.iter().filter_map(|t| outboxes.get(*t)).collect();
            // Sanity: each event reaches exactly its tenant's subscription (or nobody).
            let mut buf = Vec::new();
            for (event, t) in events.iter().zip(&tenants) {
                hub.dispatch(event);
                let reached: Vec<usize> = (0..n).filter(|i| !outboxes[*i].is_empty()).collect();
                let expected: Vec<usize> = if miss { vec![] } else { vec![*t] };
                assert_eq!(
                    reached, expected,
                    "event for tenant {t} reached {reached:?}"
                );
                drain(&targets, &mut buf);
            }
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter_custom(|iters| timed_dispatch(&hub, &events, &targets, 256, iters))
            });
        }
        group.finish();
    }
}

fn bench_broadcast(c: &mut Criterion) {
    let mut group = c.benchmark_group("broadcast_identical");
    group.sample_size(10);
    for n in SIZES {
        let (hub, outboxes) = setup(n, |_| json!({"tenant_id": {"_eq": 1}}), |_| "1".into());
        let events = [create(order(1, 1))];
        let targets: Vec<&Arc<Outbox>> = outboxes.iter().collect();
        let mut buf = Vec::new();
        hub.dispatch(&events[0]);
        assert_eq!(
            drain(&targets, &mut buf),
            n,
            "every identical subscription gets one frame"
        );
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            // Drain after every dispatch: each push then finds an empty outbox and wakes its
            // session, as in steady state.
            b.iter_custom(|iters| timed_dispatch(&hub, &events, &targets, 1, iters))
        });
    }
    group.finish();
}

fn bench_projection(c: &mut Criterion) {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(918273));
    obj.insert("total".into(), json!(1249.5));
    for i in 0..18 {
        let v = match i % 4 {
            0 => json!(format!("some text value number {i}")),
            1 => json!(i * 1000 + 7),
            2 => json!(i % 3 == 0),
            _ => json!("2024-06-01T10:15:30Z"),
        };
        obj.insert(format!("field_{i:02}"), v);
    }
    let event = create(Value::Object(obj));
    let two = spec(None, Some(json!(["id", "total"])), "p");
    let all = spec(None, None, "p");
    let data: Vec<String> = payloads(&two, &event).into_iter().map(|p| p.data).collect();
    assert_eq!(data, vec![r#"[{"id":918273,"total":1249.5}]"#]);
    let mut group = c.benchmark_group("projection_encode");
    group.bench_function("20_fields_to_2", |b| {
        b.iter(|| payloads(black_box(&two), black_box(&event)))
    });
    group.bench_function("20_fields_all", |b| {
        b.iter(|| payloads(black_box(&all), black_box(&event)))
    });
    group.finish();
}

criterion_group!(benches, bench_distinct, bench_broadcast, bench_projection);
criterion_main!(benches);

/// A history as the broker configures it by default.
fn history() -> Arc<tidings::history::History> {
    Arc::new(tidings::history::History::new(
        tidings::Config::default().history,
        Arc::from("test"),
        true,
    ))
}
