//! The list engine of a retained collection (`state::State::snapshot`, what an `init` costs
//! the broker; an `items` read is the same call): match, sort by key, slice, project, encode.
//!
//! - `init_indexed_eq/100_of_1000000`: 1,000,000 retained items of ~200 B, an `_eq` filter
//!   on a field indexed with `--state-index` (10,000 values, 100 items each): the candidates
//!   only. Target (issue 10): ≤ 1 ms.
//! - `init_unindexed_eq/100_of_1000000`: the same filter shape on an unindexed field with the
//!   same distribution: a scan of the million, for comparison.
//! - `init_scan/100_of_100000`: 100,000 items, a filter on an unindexed field matching 100:
//!   a full scan. Target: ≤ 20 ms.
//!
//! Run: `cargo bench -j1 --bench state_view -- --warm-up-time 1 --measurement-time 5`
//! (figures and machine in BENCHMARKS.md).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use tidings::auth::{Permissions, Principal};
use tidings::event::{EventKind, NewEvent};
use tidings::filter::FilterLimits;
use tidings::metrics::Metrics;
use tidings::protocol::SubscribeRequest;
use tidings::state::{State, StateSettings};
use tidings::subscription::{compile, Spec, SpecContext};

const TENANTS: u64 = 10_000;

fn item(id: u64) -> Value {
    json!({
        "id": id,
        "tenant": id % TENANTS,
        "region": id % TENANTS,
        "status": if id % 1000 == 7 { "rare" } else { "open" },
        "title": format!("order number {id} for the quarterly restock"),
        "total": (id % 997) as f64 + 0.5,
        "customer": {"name": format!("customer {}", id % 5000), "tier": "gold"},
    })
}

fn retained(n: u64, indexes: &[&str]) -> State {
    let settings = StateSettings {
        collections: vec!["orders".into()],
        max_items: usize::MAX,
        max_bytes: usize::MAX,
        max_init_items: usize::MAX,
        file: None,
        indexes: indexes
            .iter()
            .map(|f| ("orders".to_string(), f.to_string()))
            .collect(),
    };
    let state = State::new(settings, Arc::new(Metrics::new(10).expect("metrics")));
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let items: Vec<Value> = chunk.iter().map(|&id| item(id)).collect();
        let keys = chunk.iter().map(|&id| json!(id)).collect();
        let new = NewEvent::new(Arc::from("orders"), EventKind::Create, items, keys);
        state.fold(&new.at(1, Arc::from("e"), Instant::now()));
    }
    eprintln!("folded {n} items in {:?}", started.elapsed());
    state
}

fn spec(filter: Value) -> Spec {
    let principal = Principal::new(None, Permissions::all());
    let Value::Object(query) = json!({"filter": filter, "limit": -1}) else {
        unreachable!()
    };
    let request = SubscribeRequest {
        uid: None,
        collection: "orders".into(),
        event: None,
        item: None,
        query: Some(query),
        nested: false,
        since: None,
        checkpoints: false,
        max_rate: None,
    };
    let ctx = SpecContext {
        principal: &principal,
        limits: &FilterLimits::DEFAULT,
        key_field: "id",
    };
    compile(&request, &ctx).expect("spec")
}

fn count(text: &str) -> usize {
    serde_json::from_str::<Vec<Value>>(text)
        .expect("list")
        .len()
}

fn views(c: &mut Criterion) {
    let million = retained(1_000_000, &["tenant"]);
    let indexed = spec(json!({"tenant": {"_eq": 4242}}));
    let unindexed = spec(json!({"region": {"_eq": 4242}}));
    assert_eq!(count(&million.snapshot(&indexed).expect("view").data), 100);
    assert_eq!(
        count(&million.snapshot(&unindexed).expect("view").data),
        100
    );
    let mut group = c.benchmark_group("init_indexed_eq");
    group.bench_function("100_of_1000000", |b| {
        b.iter(|| black_box(million.snapshot(&indexed).expect("view")))
    });
    group.finish();
    let mut group = c.benchmark_group("init_unindexed_eq");
    group.sample_size(10);
    group.bench_function("100_of_1000000", |b| {
        b.iter(|| black_box(million.snapshot(&unindexed).expect("view")))
    });
    group.finish();
    drop(million);

    let small = retained(100_000, &[]);
    let rare = spec(json!({"status": {"_eq": "rare"}}));
    assert_eq!(count(&small.snapshot(&rare).expect("view").data), 100);
    let mut group = c.benchmark_group("init_scan");
    group.sample_size(20);
    group.bench_function("100_of_100000", |b| {
        b.iter(|| black_box(small.snapshot(&rare).expect("view")))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = views
}
criterion_main!(benches);
