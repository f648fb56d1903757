//! The registry's candidate narrowing (the equality/`_in` index) must never change who
//! receives an event: dispatching through the real `Registry` + `Hub` delivers to exactly the
//! subscriptions whose filter, evaluated on its own, matches.
//!
//! Filters are random trees of `_eq`/`_in`/`_neq`/`_gt`/shorthand under `_and`/`_or` (and
//! multi-field objects) over `tenant`, `status` and `n`; values mix small ints, floats, small
//! strings, numeric strings (`5 == "5"`, `"2" == "2.0"`), booleans and `"true"`, null, arrays
//! and missing fields.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tidings::auth::{Permissions, Principal};
use tidings::event::{Event, EventKind};
use tidings::filter::{CompileContext, Filter, FilterLimits};
use tidings::hub::Hub;
use tidings::metrics::Metrics;
use tidings::outbox::{Drained, Frame, Outbox};
use tidings::protocol::{SubscribeRequest, Uid};
use tidings::registry::Registry;
use tidings::subscription::{compile, SpecContext};

const COLLECTION: &str = "orders";
const FIELDS: [&str; 3] = ["tenant", "status", "n"];

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

struct Sub {
    uid: String,
    outbox: Arc<Outbox>,
    /// The filter compiled on its own, for the reference evaluation (`None`: no filter).
    reference: Option<Filter>,
}

struct World {
    hub: Hub,
    subs: Vec<Sub>,
    offset: u64,
}

fn request(uid: &str, item: Option<&str>, filter: Option<&Value>) -> SubscribeRequest {
    let mut query = Map::new();
    if let Some(f) = filter {
        query.insert("filter".into(), f.clone());
    }
    SubscribeRequest {
        uid: Some(Uid::Str(Arc::from(uid))),
        collection: COLLECTION.into(),
        event: None,
        item: item.map(str::to_owned),
        query: Some(query),
        nested: false,
        since: None,
        checkpoints: false,
        max_rate: None,
    }
}

impl World {
    /// Registers one subscription per entry (`(item, filter)`), uid `s<i>`, own outbox.
    fn new(specs: &[(Option<&str>, Option<Value>)]) -> World {
        let principal = Principal::new(None, Permissions::all());
        let limits = FilterLimits::default();
        let ctx = SpecContext {
            principal: &principal,
            limits: &limits,
            key_field: "id",
        };
        let registry = Arc::new(Registry::new());
        let mut subs = Vec::new();
        for (i, (item, filter)) in specs.iter().enumerate() {
            let uid = format!("s{i}");
            let spec = compile(&request(&uid, *item, filter.as_ref()), &ctx)
                .unwrap_or_else(|e| panic!("filter {filter:?} refused: {e:?}"));
            let reference = filter.as_ref().map(|f| {
                Filter::compile(f, &limits, &CompileContext::default())
                    .unwrap_or_else(|e| panic!("filter {f} does not compile: {e}"))
            });
            let outbox = Arc::new(Outbox::new(1 << 20, 1 << 30));
            registry.insert(spec, Some(Arc::from(uid.as_str())), outbox.clone());
            subs.push(Sub {
                uid,
                outbox,
                reference,
            });
        }
        let metrics = Arc::new(Metrics::new(100).expect("metrics"));
        World {
            hub: Hub::new(registry, metrics, history()),
            subs,
            offset: 0,
        }
    }

    /// Dispatches one event and returns, per subscription, the frames it received (parsed).
    fn dispatch(
        &mut self,
        kind: EventKind,
        items: Vec<Value>,
        keys: Vec<Value>,
    ) -> Vec<Vec<Value>> {
        self.offset += 1;
        let event = Event {
            collection: Arc::from(COLLECTION),
            kind,
            items,
            keys,
            before: Vec::new(),
            version: None,
            apply: Default::default(),
            offset: self.offset,
            epoch: Arc::from("test"),
            received: Instant::now(),
        };
        self.hub.dispatch(&event);
        self.subs
            .iter()
            .map(|sub| {
                let mut out: Vec<Frame> = Vec::new();
                assert_eq!(
                    sub.outbox.drain(&mut out),
                    Drained::Frames { rate_unheld: 0 }
                );
                out.iter()
                    .map(|f| {
                        let v: Value =
                            serde_json::from_str(f.text.as_str()).expect("frame is JSON");
                        assert_eq!(v["type"], "subscription");
                        assert_eq!(v["event"], kind.as_str());
                        assert_eq!(v["uid"], sub.uid.as_str(), "frame carries its own uid");
                        v
                    })
                    .collect()
            })
            .collect()
    }

    fn reference_matches(&self, sub: usize, item: &Value) -> bool {
        self.subs[sub]
            .reference
            .as_ref()
            .is_none_or(|f| f.matches(item))
    }
}

fn with_ids(items: &[Map<String, Value>]) -> (Vec<Value>, Vec<Value>) {
    let items: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, fields)| {
            let mut obj = fields.clone();
            obj.insert("id".into(), json!(i + 1));
            Value::Object(obj)
        })
        .collect();
    let keys = items.iter().map(|i| i["id"].clone()).collect();
    (items, keys)
}

// ---------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------

/// Scalars whose equality crosses types: `1`, `1.0`, `"1"`, `"1.0"` are all equal; `true`
/// equals `"true"`; `null` equals a missing field for `_eq: null` / `_in: [null]`.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0i64..4).prop_map(|n| json!(n)),
        1 => prop::sample::select(vec![1.0f64, 2.0, 2.5]).prop_map(|f| json!(f)),
        3 => prop::sample::select(vec!["a", "b", "A"]).prop_map(|s| json!(s)),
        3 => prop::sample::select(vec!["0", "1", "2", "3", "2.0", "01"]).prop_map(|s| json!(s)),
        1 => prop::sample::select(vec![json!(true), json!(false), json!("true")]),
        1 => Just(Value::Null),
    ]
}

/// An item field value: a scalar, or (rarely) an array of scalars or an object.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        10 => scalar(),
        1 => prop::collection::vec(scalar(), 0..3).prop_map(Value::Array),
        1 => Just(json!({"x": 1})),
    ]
}

/// An item: each field present (with a value) or missing.
fn item() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::option::weighted(0.85, field_value()),
        prop::option::weighted(0.85, field_value()),
        prop::option::weighted(0.85, field_value()),
    )
        .prop_map(|vals| {
            let mut obj = Map::new();
            for (field, v) in FIELDS.iter().zip([vals.0, vals.1, vals.2]) {
                if let Some(v) = v {
                    obj.insert((*field).into(), v);
                }
            }
            obj
        })
}

fn field() -> impl Strategy<Value = &'static str> {
    prop::sample::select(FIELDS.to_vec())
}

/// The operator object (or shorthand value) for one field.
fn condition() -> impl Strategy<Value = Value> {
    let ordered = prop_oneof![
        (0i64..4).prop_map(|n| json!(n)),
        prop::sample::select(vec!["1", "2.0", "a", "b"]).prop_map(|s| json!(s)),
    ];
    prop_oneof![
        3 => scalar().prop_map(|v| json!({"_eq": v})),
        2 => prop::collection::vec(scalar(), 0..5).prop_map(|vs| json!({"_in": vs})),
        // Shorthand `{field: v}` is `_eq`; an array value compares the whole array.
        2 => scalar(),
        1 => prop::collection::vec(scalar(), 1..3).prop_map(Value::Array),
        1 => scalar().prop_map(|v| json!({"_neq": v})),
        1 => ordered.prop_map(|v| json!({"_gt": v})),
        1 => (scalar(), prop::collection::vec(scalar(), 1..3))
            .prop_map(|(a, b)| json!({"_eq": a, "_nin": b})),
    ]
}

/// A filter object: one field, several fields (ANDed), or `_and`/`_or` of filters.
fn filter() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        3 => (field(), condition()).prop_map(|(f, c)| json!({ f: c })),
        1 => prop::collection::btree_map(field(), condition(), 2..4)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|fs| json!({"_and": fs})),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|fs| json!({"_or": fs})),
            // A field condition next to a logical node in one object (ANDed).
            (field(), condition(), prop::collection::vec(inner, 1..3))
                .prop_map(|(f, c, fs)| json!({ f: c, "_or": fs })),
        ]
    })
}

/// A subscription's filter: mostly a random filter, sometimes none or `{}`.
fn sub_filter() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        12 => filter().prop_map(Some),
        1 => Just(None),
        1 => Just(Some(json!({}))),
    ]
}

fn kind() -> impl Strategy<Value = EventKind> {
    prop::sample::select(EventKind::ALL.to_vec())
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// One create per item: the subscriptions that get a frame are exactly those whose
    /// filter matches the item, and each gets exactly one frame carrying that item.
    #[test]
    fn dispatch_reaches_exactly_the_matching_subscriptions(
        filters in prop::collection::vec(sub_filter(), 1..40),
        items in prop::collection::vec(item(), 1..8),
    ) {
        let specs: Vec<(Option<&str>, Option<Value>)> =
            filters.iter().map(|f| (None, f.clone())).collect();
        let mut world = World::new(&specs);
        let (items, keys) = with_ids(&items);
        for (item, key) in items.iter().zip(&keys) {
            let got = world.dispatch(EventKind::Create, vec![item.clone()], vec![key.clone()]);
            let received: BTreeSet<usize> =
                (0..got.len()).filter(|i| !got[*i].is_empty()).collect();
            let expected: BTreeSet<usize> =
                (0..got.len()).filter(|i| world.reference_matches(*i, item)).collect();
            prop_assert_eq!(
                &received, &expected,
                "item {} with filters {:?}", item,
                received.symmetric_difference(&expected).map(|i| &filters[*i]).collect::<Vec<_>>()
            );
            for i in &received {
                prop_assert_eq!(got[*i].len(), 1);
                prop_assert_eq!(&got[*i][0]["data"], &json!([item]));
            }
        }
    }

    /// All items in ONE event (create, update or delete with the deleted items): a
    /// subscription gets what its matching items give, whichever item made it a candidate.
    #[test]
    fn multi_item_events_reach_every_subscription_with_a_matching_item(
        filters in prop::collection::vec(sub_filter(), 1..40),
        items in prop::collection::vec(item(), 1..6),
        kind in kind(),
    ) {
        let specs: Vec<(Option<&str>, Option<Value>)> =
            filters.iter().map(|f| (None, f.clone())).collect();
        let mut world = World::new(&specs);
        let (items, keys) = with_ids(&items);
        let got = world.dispatch(kind, items.clone(), keys.clone());
        for (i, frames) in got.iter().enumerate() {
            let matched: Vec<usize> =
                (0..items.len()).filter(|j| world.reference_matches(i, &items[*j])).collect();
            let data: Vec<Value> = frames.iter().map(|f| f["data"].clone()).collect();
            let expected: Vec<Value> = match kind {
                // Flat dialect: one message per created item.
                EventKind::Create => matched.iter().map(|j| json!([items[*j]])).collect(),
                // One message with every matched item / every matched key.
                EventKind::Update if !matched.is_empty() => {
                    vec![Value::Array(matched.iter().map(|j| items[*j].clone()).collect())]
                }
                EventKind::Delete if !matched.is_empty() => {
                    vec![Value::Array(matched.iter().map(|j| keys[*j].clone()).collect())]
                }
                _ => Vec::new(),
            };
            prop_assert_eq!(
                &data, &expected,
                "{} event, subscription {} with filter {:?}, items {:?}",
                kind.as_str(), i, &filters[i], &items
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Item subscriptions and key-only deletes
// ---------------------------------------------------------------------------------------

#[test]
fn key_only_deletes_reach_every_subscription_and_item_subscriptions_follow_their_key() {
    let specs: Vec<(Option<&str>, Option<Value>)> = vec![
        (None, Some(json!({"tenant": {"_eq": 1}}))), // s0: indexed on tenant
        (None, Some(json!({"status": {"_in": ["a", "b"]}}))), // s1: indexed on status
        (Some("7"), None),                           // s2: item 7
        (Some("7"), Some(json!({"tenant": 2}))),     // s3: item 7, tenant 2
        (None, None),                                // s4: everything
        (None, Some(json!({"_or": [{"tenant": 3}, {"n": 1}]}))), // s5: unindexed
        (Some("8"), None),                           // s6: item 8
        (None, Some(json!({"tenant": {"_eq": 99}, "n": {"_in": []}}))), // s7: matches nothing
    ];
    let mut world = World::new(&specs);
    let data = |got: &[Vec<Value>]| -> Vec<Option<Value>> {
        got.iter()
            .map(|frames| {
                assert!(frames.len() <= 1, "one frame per subscription: {frames:?}");
                frames.first().map(|f| f["data"].clone())
            })
            .collect()
    };

    // Key-only delete: no item data to look up, so every general subscription gets the keys
    // (whatever its filter), and item subscriptions get it when their key is among them.
    let got = world.dispatch(EventKind::Delete, vec![], vec![json!(7), json!("9")]);
    assert_eq!(
        data(&got),
        vec![
            Some(json!([7, "9"])),
            Some(json!([7, "9"])),
            Some(json!("7")),
            Some(json!("7")),
            Some(json!([7, "9"])),
            Some(json!([7, "9"])),
            None,
            Some(json!([7, "9"])),
        ]
    );

    // Update of item 7 with tenant 1: the tenant-1 subscription, item 7 without filter, the
    // unfiltered one; not item 7 with tenant 2, not item 8.
    let item = json!({"id": 7, "tenant": 1, "status": "c", "n": 0});
    let got = world.dispatch(EventKind::Update, vec![item.clone()], vec![json!(7)]);
    assert_eq!(
        data(&got),
        vec![
            Some(json!([item])),
            None,
            Some(item.clone()),
            None,
            Some(json!([item])),
            None,
            None,
            None,
        ]
    );

    // Update of item 7 with tenant "2" (a numeric string: equals 2): now s3 gets it.
    let item = json!({"id": 7, "tenant": "2", "status": "b", "n": 1});
    let got = world.dispatch(EventKind::Update, vec![item.clone()], vec![json!(7)]);
    assert_eq!(
        data(&got),
        vec![
            None,
            Some(json!([item])),
            Some(item.clone()),
            Some(item.clone()),
            Some(json!([item])),
            Some(json!([item])),
            None,
            None,
        ]
    );

    // Directus never sends creates to item subscriptions.
    let got = world.dispatch(EventKind::Create, vec![item.clone()], vec![json!(7)]);
    assert_eq!(got[2], Vec::<Value>::new());
    assert_eq!(got[3], Vec::<Value>::new());
    assert_eq!(got[1].len(), 1);

    // A delete carrying the deleted item is filtered like a create.
    let deleted = json!({"id": 8, "tenant": 1.0, "status": null});
    let got = world.dispatch(EventKind::Delete, vec![deleted], vec![json!(8)]);
    assert_eq!(
        data(&got),
        vec![
            Some(json!([8])),
            None,
            None,
            None,
            Some(json!([8])),
            None,
            Some(json!("8")),
            None,
        ]
    );
}

/// A history as the broker configures it by default.
fn history() -> Arc<tidings::history::History> {
    Arc::new(tidings::history::History::new(
        tidings::Config::default().history,
        Arc::from("test"),
        true,
    ))
}
