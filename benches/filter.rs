//! `Filter::matches` per operator family, on a realistic 15-field order item.
//!
//! Run: `cargo bench -j1 --bench filter -- --warm-up-time 1 --measurement-time 3`
//! (figures and machine in BENCHMARKS.md).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use tidings::filter::{CompileContext, Filter, FilterLimits};

/// A typical order row: 15 top-level fields, one nested object, one array.
fn item() -> Value {
    json!({
        "id": 918273,
        "tenant_id": 99,
        "status": "paid",
        "total": 1249.5,
        "currency": "EUR",
        "created_at": "2024-06-01T10:15:30Z",
        "updated_at": "2024-06-01T10:16:02.123+02:00",
        "customer": {"id": 4411, "name": "Ann Example", "email": "ann@example.com"},
        "tags": ["priority", "gift", "eu"],
        "note": "Please deliver by Express before noon; ring twice at the back door.",
        "priority": 3,
        "paid": true,
        "region": "eu-west",
        "sku": "SKU-2048-B",
        "quantity": 4
    })
}

fn compile(f: Value) -> Filter {
    Filter::compile(&f, &FilterLimits::default(), &CompileContext::default())
        .unwrap_or_else(|e| panic!("bench filter does not compile: {e}"))
}

fn cases() -> Vec<(&'static str, Value)> {
    let hundred: Vec<i64> = (0..100).collect();
    let hundred_miss: Vec<i64> = (1000..1100).collect();
    vec![
        ("eq", json!({"status": {"_eq": "paid"}})),
        ("eq_shorthand_number", json!({"tenant_id": 99})),
        // tenant_id 99 is the last of the 100 values: the worst case of a linear scan.
        ("in_100_hit_last", json!({"tenant_id": {"_in": hundred}})),
        ("in_100_miss", json!({"tenant_id": {"_in": hundred_miss}})),
        ("gt_number", json!({"total": {"_gt": 1000}})),
        (
            "gt_iso_date",
            json!({"created_at": {"_gt": "2024-01-01T00:00:00Z"}}),
        ),
        ("contains", json!({"note": {"_contains": "noon"}})),
        ("icontains", json!({"note": {"_icontains": "EXPRESS"}})),
        ("regex", json!({"sku": {"_regex": "^SKU-[0-9]{4}-[A-Z]$"}})),
        (
            "and_or_nested",
            json!({"_and": [
                {"status": {"_in": ["paid", "shipped"]}},
                {"_or": [
                    {"total": {"_gt": 5000}},
                    {"customer": {"email": {"_iends_with": "@EXAMPLE.COM"}}}
                ]},
                {"_or": [{"region": "us-east"}, {"priority": {"_gte": 3}}]},
                {"paid": {"_eq": true}}
            ]}),
        ),
        (
            "now_minus_1_day",
            json!({"updated_at": {"_gt": "$NOW(-1 day)"}}),
        ),
        (
            "now_month_arith",
            json!({"created_at": {"_lt": "$NOW(-1 month)"}}),
        ),
    ]
}

fn bench_matches(c: &mut Criterion) {
    let item = item();
    let mut group = c.benchmark_group("filter_matches");
    for (name, f) in cases() {
        let filter = compile(f);
        group.bench_function(name, |b| {
            b.iter(|| black_box(&filter).matches(black_box(&item)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_matches);
criterion_main!(benches);
