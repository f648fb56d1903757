use super::value::values_eq;
use super::*;
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use serde_json::json;

fn ctx() -> CompileContext {
    CompileContext {
        current_user: Some("u1".to_owned()),
        ..CompileContext::default()
    }
}

fn c(filter: Value) -> Filter {
    match Filter::compile(&filter, &FilterLimits::default(), &ctx()) {
        Ok(f) => f,
        Err(e) => panic!("{filter}: {e}"),
    }
}

fn cerr_with(filter: Value, limits: &FilterLimits, ctx: &CompileContext) -> FilterError {
    match Filter::compile(&filter, limits, ctx) {
        Ok(f) => panic!("{filter} compiled to {f:?}"),
        Err(e) => e,
    }
}

fn cerr(filter: Value) -> FilterError {
    cerr_with(filter, &FilterLimits::default(), &ctx())
}

/// Marker for "field absent from the item".
const MISSING: &str = "<missing>";

/// Runs `{"f": {op: operand}}` against items `{"f": value}` (or `{}` for [`MISSING`]).
fn table(op: &str, operand: Value, cases: &[(Value, bool)]) {
    let filter = c(json!({ "f": { op: operand.clone() } }));
    for (value, expected) in cases {
        let item = if value == MISSING {
            json!({})
        } else {
            json!({ "f": value })
        };
        assert_eq!(
            filter.matches(&item),
            *expected,
            "{op} {operand} against {item}"
        );
    }
}

fn missing() -> Value {
    json!(MISSING)
}

#[test]
fn op_eq() {
    table(
        "_eq",
        json!("paid"),
        &[
            (json!("paid"), true),
            (json!("Paid"), false),
            (json!(["paid"]), false),
            (missing(), false),
            (json!(null), false),
        ],
    );
    table(
        "_eq",
        json!(5),
        &[
            (json!(5), true),
            (json!(5.0), true),
            (json!("5"), true),
            (json!("5.00"), true),
            (json!("+5"), true),
            (json!(" 5"), false),
            (json!("5a"), false),
            (json!(6), false),
            (json!(true), false),
        ],
    );
    table(
        "_eq",
        json!("2.50"),
        &[
            (json!(2.5), true),
            (json!("2.5"), true),
            (json!(2.51), false),
        ],
    );
    table(
        "_eq",
        json!(true),
        &[
            (json!(true), true),
            (json!("true"), true),
            (json!(false), false),
            (json!(1), false),
            (json!("TRUE"), false),
        ],
    );
    table(
        "_eq",
        json!("false"),
        &[
            (json!(false), true),
            (json!("false"), true),
            (json!(0), false),
        ],
    );
    table(
        "_eq",
        json!(null),
        &[
            (json!(null), true),
            (missing(), true),
            (json!(0), false),
            (json!(""), false),
        ],
    );
    table(
        "_eq",
        json!([1, "a"]),
        &[
            (json!([1, "a"]), true),
            (json!(["1", "a"]), true),
            (json!(["a", 1]), false),
            (json!(1), false),
        ],
    );
    table(
        "_eq",
        json!({"a": 1, "b": [true]}),
        &[
            (json!({"b": [true], "a": 1}), true),
            (json!({"a": 1}), false),
        ],
    );
    // Integers beyond 2^53 compare exactly.
    table(
        "_eq",
        json!(9_007_199_254_740_993_u64),
        &[
            (json!(9_007_199_254_740_993_u64), true),
            (json!(9_007_199_254_740_992_u64), false),
            (json!("9007199254740993"), true),
        ],
    );
    // Shorthand is `_eq`.
    assert!(c(json!({"f": "5"})).matches(&json!({"f": 5})));
    assert!(c(json!({"f": null})).matches(&json!({})));
}

#[test]
fn op_neq() {
    table(
        "_neq",
        json!("a"),
        &[
            (json!("b"), true),
            (json!("a"), false),
            (missing(), false),
            (json!(null), false),
            (json!(1), true),
        ],
    );
    table(
        "_neq",
        json!(5),
        &[(json!("5"), false), (json!(5.5), true), (json!("x"), true)],
    );
    table(
        "_neq",
        json!(null),
        &[(json!(1), true), (json!(null), false), (missing(), false)],
    );
}

#[test]
fn op_ordering() {
    table(
        "_lt",
        json!(10),
        &[
            (json!(9), true),
            (json!(10), false),
            (json!(9.99), true),
            (json!("9"), true),
            (json!("10.0"), false),
            (json!("abc"), false),
            (missing(), false),
            (json!(null), false),
            (json!(true), false),
            (json!([1]), false),
        ],
    );
    table(
        "_lte",
        json!("10"),
        &[
            (json!(10), true),
            (json!("9"), true), // both numeric: numeric, not lexicographic
            (json!("10.5"), false),
            (json!(11), false),
        ],
    );
    table(
        "_gt",
        json!("b"),
        &[
            (json!("c"), true),
            (json!("b"), false),
            (json!("B"), false), // bytes: 'B' < 'b'
            (json!("ba"), true),
            (json!(5), false), // non-numeric string vs number: never ordered
        ],
    );
    table(
        "_gte",
        json!(-1.5),
        &[
            (json!(-1.5), true),
            (json!(-2), false),
            (json!("-1"), true),
            (json!("x"), false),
        ],
    );
    // Dates: offsets, Z, dates and naive date-times (UTC) compare as instants.
    table(
        "_lt",
        json!("2024-01-01T09:00:00Z"),
        &[
            (json!("2024-01-01T10:00:00+02:00"), true), // 08:00Z
            (json!("2024-01-01T10:00:00+00:00"), false),
            (json!("2024-01-01T08:59:59"), true), // naive = UTC
            (json!("2024-01-01"), true),
            (json!("2024-01-01T09:00:00.000Z"), false),
            (json!("2023-12-31T23:00:00-11:00"), false), // 10:00Z next day
            (json!("not a date"), false),                // 'n' > '2' bytewise
        ],
    );
    table(
        "_gt",
        json!("2024-01-01"),
        &[
            (json!("2024-01-01T00:00:01Z"), true),
            (json!("2024-01-01T00:00:00Z"), false),
            (json!("2023-12-31T23:30:00-01:00"), true),
        ],
    );
}

#[test]
fn op_in_nin() {
    table(
        "_in",
        json!([1, "a", true]),
        &[
            (json!(1), true),
            (json!("1"), true),
            (json!(1.0), true),
            (json!("a"), true),
            (json!("true"), true),
            (json!("b"), false),
            (missing(), false),
            (json!(null), false),
            (json!(["x", "a"]), true),
            (json!(["x"]), false),
            (json!([]), false),
        ],
    );
    table(
        "_in",
        json!([null, "a"]),
        &[(missing(), true), (json!(null), true), (json!("b"), false)],
    );
    table(
        "_nin",
        json!([1, "a"]),
        &[
            (json!(2), true),
            (json!("1"), false),
            (missing(), false),
            (json!(null), false),
            (json!(["x"]), true),
            (json!(["x", "a"]), false),
            (json!([]), true),
        ],
    );
}

#[test]
fn op_null_nnull() {
    let cases_null = [
        (json!(null), true),
        (missing(), true),
        (json!(0), false),
        (json!(""), false),
        (json!(false), false),
    ];
    table("_null", json!(true), &cases_null);
    table("_nnull", json!(false), &cases_null);
    let cases_nnull = [
        (json!(null), false),
        (missing(), false),
        (json!(0), true),
        (json!([]), true),
    ];
    table("_nnull", json!(true), &cases_nnull);
    table("_null", json!(false), &cases_nnull);
}

#[test]
fn op_contains() {
    table(
        "_contains",
        json!("ell"),
        &[
            (json!("hello"), true),
            (json!("HELLO"), false),
            (json!(["ell", "x"]), true),
            (json!(["hello"]), false),
            (json!(5), false),
            (missing(), false),
            (json!(null), false),
        ],
    );
    table(
        "_contains",
        json!(5),
        &[
            (json!("a5b"), true),
            (json!([1, 5]), true),
            (json!(["5"]), true),
            (json!([6]), false),
        ],
    );
    table(
        "_ncontains",
        json!("x"),
        &[
            (json!("hello"), true),
            (json!("box"), false),
            (json!(["a"]), true),
            (json!(["x"]), false),
            (missing(), false),
            (json!(null), false),
            (json!(3), false),
        ],
    );
}

#[test]
fn op_case_insensitive_text() {
    table(
        "_icontains",
        json!("ELL"),
        &[
            (json!("hello"), true),
            (json!("HeLLo"), true),
            (json!("help"), false),
            (missing(), false),
            (json!(["hello"]), false),
        ],
    );
    table(
        "_icontains",
        json!("ÄBΓ"),
        &[
            (json!("xäbγy"), true),
            (json!("xÄBΓy"), true),
            (json!("abg"), false),
        ],
    );
    table(
        "_nicontains",
        json!("ELL"),
        &[
            (json!("hello"), false),
            (json!("world"), true),
            (missing(), false),
        ],
    );
    // İ lowercases to "i̇" (two chars); per-character mapping on both sides.
    table(
        "_istarts_with",
        json!("i"),
        &[
            (json!("İstanbul"), true),
            (json!("Ist"), true),
            (json!("x"), false),
        ],
    );
    table(
        "_iends_with",
        json!("SS"),
        &[(json!("BOSS"), true), (json!("boß"), false)],
    );
    table(
        "_niends_with",
        json!("Ω"),
        &[
            (json!("ωmega ω"), false),
            (json!("x"), true),
            (json!(1), false),
        ],
    );
    table(
        "_nistarts_with",
        json!("HE"),
        &[(json!("hello"), false), (json!("xhe"), true)],
    );
}

#[test]
fn op_starts_ends_with() {
    table(
        "_starts_with",
        json!("he"),
        &[
            (json!("hello"), true),
            (json!("Hello"), false),
            (json!("the"), false),
            (missing(), false),
            (json!(["hello"]), false),
        ],
    );
    table(
        "_starts_with",
        json!(12),
        &[(json!("123"), true), (json!(123), false)],
    );
    table(
        "_nstarts_with",
        json!("he"),
        &[
            (json!("hello"), false),
            (json!("the"), true),
            (missing(), false),
            (json!(null), false),
        ],
    );
    table(
        "_ends_with",
        json!("lo"),
        &[(json!("hello"), true), (json!("LO"), false)],
    );
    table(
        "_nends_with",
        json!("lo"),
        &[
            (json!("hello"), false),
            (json!("help"), true),
            (missing(), false),
        ],
    );
}

#[test]
fn op_between() {
    table(
        "_between",
        json!([1, 5]),
        &[
            (json!(1), true),
            (json!(5), true),
            (json!(3.5), true),
            (json!("3"), true),
            (json!(0), false),
            (json!(6), false),
            (json!("x"), false),
            (missing(), false),
        ],
    );
    table(
        "_between",
        json!(["2024-01-01", "2024-12-31T23:59:59Z"]),
        &[
            (json!("2024-06-01T00:00:00+02:00"), true),
            (json!("2025-01-01T00:30:00+01:00"), true),
            (json!("2025-01-01T00:30:00Z"), false),
        ],
    );
    table(
        "_nbetween",
        json!([1, 5]),
        &[
            (json!(6), true),
            (json!(3), false),
            (missing(), false),
            (json!("x"), false),
        ],
    );
}

#[test]
fn op_empty_nempty() {
    let empty = [
        (missing(), true),
        (json!(null), true),
        (json!(""), true),
        (json!([]), true),
        (json!({}), true),
        (json!(" "), false),
        (json!(0), false),
        (json!(false), false),
        (json!([null]), false),
    ];
    table("_empty", json!(true), &empty);
    table("_nempty", json!(false), &empty);
    let nempty: Vec<(Value, bool)> = empty.iter().map(|(v, b)| (v.clone(), !b)).collect();
    table("_nempty", json!(true), &nempty);
    table("_empty", json!(false), &nempty);
}

#[test]
fn op_regex() {
    table(
        "_regex",
        json!("^a.c$"),
        &[
            (json!("abc"), true),
            (json!("abd"), false),
            (json!(["abc"]), false),
            (missing(), false),
        ],
    );
    table(
        "_regex",
        json!("1"),
        &[(json!(123), false), (json!("x1"), true)],
    );
    table("_regex", json!("(?i)ÄB"), &[(json!("äb"), true)]);
}

#[test]
fn logical_operators() {
    let f = c(json!({"_or": [
        {"status": "paid"},
        {"_and": [{"total": {"_gt": 100}}, {"vip": true}]}
    ]}));
    assert!(f.matches(&json!({"status": "paid"})));
    assert!(f.matches(&json!({"status": "open", "total": 101, "vip": "true"})));
    assert!(!f.matches(&json!({"status": "open", "total": 101})));
    // Several keys in one object are ANDed, also next to operators on a field.
    let f = c(json!({"n": {"_gt": 1, "_lt": 5}, "s": "x"}));
    assert!(f.matches(&json!({"n": 3, "s": "x"})));
    assert!(!f.matches(&json!({"n": 6, "s": "x"})));
    assert!(!f.matches(&json!({"n": 3})));
    // Empty filter and empty groups match everything.
    for empty in [
        json!({}),
        json!({"_and": []}),
        json!({"_or": []}),
        json!({"a": {}}),
    ] {
        let f = c(empty.clone());
        assert!(f.is_always(), "{empty}");
        assert_eq!(f.canonical(), "");
        assert!(f.matches(&json!({"x": 1})));
        assert!(f.matches(&json!(null)));
    }
}

#[test]
fn nested_and_dotted_fields() {
    let nested = c(json!({"author": {"name": {"_eq": "Ann"}}}));
    let dotted = c(json!({"author.name": {"_eq": "Ann"}}));
    assert_eq!(nested.canonical(), dotted.canonical());
    for f in [&nested, &dotted] {
        assert!(f.matches(&json!({"author": {"name": "Ann"}})));
        assert!(!f.matches(&json!({"author": {"name": "Bo"}})));
        assert!(!f.matches(&json!({"author": 5})));
        assert!(!f.matches(&json!({})));
    }
    // An unexpanded foreign key (a scalar) makes the nested field missing.
    let f = c(json!({"author": {"name": {"_null": true}}}));
    assert!(f.matches(&json!({"author": 5})));
    assert!(f.matches(&json!({"author": null})));
    // `_or` inside a field object is relative to that field.
    let f = c(json!({"author": {"_or": [{"name": "Ann"}, {"name": "Bo"}]}}));
    assert!(f.matches(&json!({"author": {"name": "Bo"}})));
    assert!(!f.matches(&json!({"author": {"name": "Cy"}})));
    assert_eq!(f.fields(), vec!["author.name"]);
    // Arrays of objects on the way are searched (Directus' default `_some`).
    let f = c(json!({"tags": {"name": {"_eq": "y"}}}));
    assert!(f.matches(&json!({"tags": [{"name": "x"}, {"name": "y"}]})));
    assert!(!f.matches(&json!({"tags": [{"name": "x"}]})));
    assert!(!f.matches(&json!({"tags": []})));
}

#[test]
fn some_and_none() {
    let some = c(json!({"tags": {"_some": {"name": {"_eq": "x"}}}}));
    let none = c(json!({"tags": {"_none": {"name": {"_eq": "x"}}}}));
    let cases = [
        (json!({"tags": [{"name": "x"}, {"name": "y"}]}), true, false),
        (json!({"tags": [{"name": "y"}]}), false, true),
        (json!({"tags": []}), false, true),
        (json!({}), false, true),
        (json!({"tags": null}), false, true),
        (json!({"tags": {"name": "x"}}), true, false),
        (json!({"tags": 5}), false, false),
    ];
    for (item, s, n) in cases {
        assert_eq!(some.matches(&item), s, "_some {item}");
        assert_eq!(none.matches(&item), n, "_none {item}");
    }
    assert_ne!(some.canonical(), none.canonical());
    assert_eq!(some.fields(), vec!["tags", "tags.name"]);
}

fn ts(offset_ms: i64) -> String {
    Timestamp::now()
        .checked_add(SignedDuration::from_millis(offset_ms))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

#[test]
fn now_offsets() {
    table(
        "_lt",
        json!("$NOW"),
        &[
            (json!(ts(-HOUR)), true),
            (json!(ts(HOUR)), false),
            (json!("abc"), false),
            (json!(5), false),
            (missing(), false),
        ],
    );
    table(
        "_gte",
        json!("$NOW(-1 day)"),
        &[(json!(ts(-2 * HOUR)), true), (json!(ts(-2 * DAY)), false)],
    );
    table(
        "_lt",
        json!("$NOW(+2 hours)"),
        &[(json!(ts(HOUR)), true), (json!(ts(3 * HOUR)), false)],
    );
    table(
        "_lt",
        json!("$NOW(-1 month)"),
        &[(json!(ts(-40 * DAY)), true), (json!(ts(-20 * DAY)), false)],
    );
    table(
        "_gt",
        json!("$NOW(- 2 years)"),
        &[
            (json!(ts(-700 * DAY)), true),
            (json!(ts(-740 * DAY)), false),
        ],
    );
    table(
        "_gt",
        json!("$NOW(1 week)"),
        &[(json!(ts(8 * DAY)), true), (json!(ts(6 * DAY)), false)],
    );
    table(
        "_between",
        json!(["$NOW(-1 day)", "$NOW"]),
        &[(json!(ts(-HOUR)), true), (json!(ts(HOUR)), false)],
    );
    table(
        "_neq",
        json!("$NOW"),
        &[(json!(ts(-HOUR)), true), (json!("abc"), false)],
    );
    // Naive date strings are UTC.
    table("_lt", json!("$NOW"), &[(json!("2000-01-01"), true)]);
}

#[test]
fn now_is_evaluated_at_match_time() {
    let f = c(json!({"t": {"_gt": "$NOW(+30 minutes)"}}));
    assert_eq!(f.canonical(), r#"("t" _gt $NOW(+30 minute))"#);
    let item = json!({"t": ts(30 * 60_000 + 400)});
    assert!(f.matches(&item));
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(!f.matches(&item));
}

#[test]
fn current_user() {
    let f = c(json!({"owner": {"_eq": "$CURRENT_USER"}}));
    assert!(f.matches(&json!({"owner": "u1"})));
    assert!(!f.matches(&json!({"owner": "u2"})));
    let f = c(json!({"owner": {"_in": ["x", "$CURRENT_USER"]}}));
    assert!(f.matches(&json!({"owner": "u1"})));
    let other = Filter::compile(
        &json!({"owner": "$CURRENT_USER"}),
        &FilterLimits::default(),
        &CompileContext {
            current_user: Some("u2".to_owned()),
            ..CompileContext::default()
        },
    )
    .ok();
    assert_ne!(
        other.as_ref().map(Filter::canonical),
        Some(c(json!({"owner": "$CURRENT_USER"})).canonical())
    );

    let anon = CompileContext::default();
    let e = cerr_with(
        json!({"owner": {"_eq": "$CURRENT_USER"}}),
        &FilterLimits::default(),
        &anon,
    );
    assert_eq!(e.path, "owner._eq");
    assert_eq!(
        e.message,
        r#""$CURRENT_USER" at "owner._eq" needs an authenticated subscriber."#
    );
    let e = cerr_with(
        json!({"_and": [{"owner": {"_in": ["a", "$CURRENT_USER"]}}]}),
        &FilterLimits::default(),
        &anon,
    );
    assert_eq!(e.path, "_and.0.owner._in.1");
}

#[test]
fn claims_placeholders() {
    let claims: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "sub": "u1", "tenant": "t1", "org": {"id": 7}, "tenants": ["t1", "t2", "$CURRENT_USER"],
        "tricky": "$NOW"
    }))
    .unwrap();
    let ctx = CompileContext {
        current_user: Some("u1".to_owned()),
        claims: Some(std::sync::Arc::new(claims)),
    };
    let compile = |f: Value| Filter::compile(&f, &FilterLimits::default(), &ctx);
    let f = compile(json!({"tenant": {"_eq": "$CLAIMS.tenant"}})).unwrap();
    assert!(f.matches(&json!({"tenant": "t1"})));
    assert!(!f.matches(&json!({"tenant": "t2"})));
    let f = compile(json!({"org": {"_eq": "$CLAIMS.org.id"}})).unwrap();
    assert!(f.matches(&json!({"org": 7})));
    let f = compile(json!({"tenant": {"_in": "$CLAIMS.tenants"}})).unwrap();
    assert!(f.matches(&json!({"tenant": "t2"})));
    // Claim values are data, never placeholders.
    assert!(f.matches(&json!({"tenant": "$CURRENT_USER"})));
    assert!(!f.matches(&json!({"tenant": "u1"})));
    let f = compile(json!({"x": {"_eq": "$CLAIMS.tricky"}})).unwrap();
    assert!(f.matches(&json!({"x": "$NOW"})));
    let e = compile(json!({"tenant": {"_eq": "$CLAIMS.nope"}})).unwrap_err();
    assert_eq!(e.path, "tenant._eq");
    assert_eq!(
        e.message,
        r#"Claim "nope" at "tenant._eq" is not in the subscriber's token."#
    );
    let e = compile(json!({"tenant": {"_in": "$CLAIMS.tenant"}})).unwrap_err();
    assert_eq!(e.message, r#""_in" at "tenant._in" expects an array."#);
    let e = cerr(json!({"tenant": {"_eq": "$CLAIMS.tenant"}}));
    assert_eq!(
        e.message,
        r#""$CLAIMS.tenant" at "tenant._eq" needs a subscriber authenticated with a JWT."#
    );
}

#[test]
fn compile_errors_name_their_path() {
    let e = cerr(json!({"status": {"_nope": 1}}));
    assert_eq!(e.path, "status._nope");
    assert_eq!(
        e.message,
        r#"Unknown filter operator "_nope" at "status._nope"."#
    );
    assert_eq!(e.to_string(), e.message);
    let e = cerr(json!({"user": {"_in": "a,b"}}));
    assert_eq!(e.message, r#""_in" at "user._in" expects an array."#);

    let cases = [
        (json!({"_nope": 1}), "_nope"),
        (json!({"_and": {}}), "_and"),
        (json!({"_and": [1]}), "_and.0"),
        (
            json!({"_or": [{}, {"a": {"_between": [1]}}]}),
            "_or.1.a._between",
        ),
        (json!({"a": {"_between": "1,2"}}), "a._between"),
        (json!({"a": {"_between": [1, true]}}), "a._between.1"),
        (json!({"a": {"_nin": {}}}), "a._nin"),
        (json!({"a": {"_regex": 5}}), "a._regex"),
        (json!({"a": {"_regex": "("}}), "a._regex"),
        (json!({"a": {"_null": "yes"}}), "a._null"),
        (json!({"a": {"_empty": 1}}), "a._empty"),
        (json!({"a": {"_lt": true}}), "a._lt"),
        (json!({"a": {"_gte": null}}), "a._gte"),
        (json!({"a": {"_gt": [1]}}), "a._gt"),
        (json!({"a": {"_starts_with": [1]}}), "a._starts_with"),
        (json!({"a": {"_icontains": null}}), "a._icontains"),
        (json!({"a": {"_contains": null}}), "a._contains"),
        (json!({"_eq": 1}), "_eq"),
        (json!({"_some": {}}), "_some"),
        (json!({"tags": {"_some": []}}), "tags._some"),
        (
            json!({"tags": {"_none": {"n": {"_bad": 1}}}}),
            "tags._none.n._bad",
        ),
        (json!({"a..b": 1}), "a..b"),
        (json!({"": 1}), ""),
        (json!({"a": {"_in": ["$NOW"]}}), "a._in.0"),
        (json!({"a": {"_contains": "$NOW(-1 day)"}}), "a._contains"),
        (json!({"a": {"_gt": "$NOW(1 fortnight)"}}), "a._gt"),
        (json!({"a": {"_gt": "$NOW(-1 day"}}), "a._gt"),
        (json!({"a": {"_eq": "$CURRENT_ROLE"}}), "a._eq"),
        (json!({"a": "$CURRENT_USER.email"}), "a"),
    ];
    for (filter, path) in cases {
        let e = cerr(filter.clone());
        assert_eq!(e.path, path, "{filter}: {e}");
        assert!(
            e.message.contains(&format!("\"{path}\"")),
            "{filter}: {}",
            e.message
        );
        assert!(e.message.ends_with('.'), "{}", e.message);
        assert!(!e.message.starts_with("Invalid query"), "{}", e.message);
    }
    let e = cerr(json!([{"a": 1}]));
    assert_eq!(e.path, "");
}

#[test]
fn limits_are_enforced() {
    let limits = FilterLimits::default();
    assert_eq!(
        (
            limits.max_depth,
            limits.max_nodes,
            limits.max_list,
            limits.max_regex_bytes
        ),
        (16, 256, 1000, 64 * 1024)
    );
    // Depth: each filter object is one level.
    fn nest(levels: usize) -> Value {
        let mut v = json!({"a": 1});
        for _ in 1..levels {
            v = json!({"_and": [v]});
        }
        v
    }
    c(nest(16));
    let e = cerr(nest(17));
    let deep_path = vec!["_and.0"; 16].join(".");
    assert_eq!(e.path, deep_path);
    assert_eq!(
        e.message,
        format!("Filter is nested deeper than 16 levels at \"{deep_path}\".")
    );
    // Nodes: the `_and` counts as one.
    let conds = |n: usize| -> Value {
        json!({"_and": (0..n).map(|i| json!({format!("f{i}"): i})).collect::<Vec<_>>()})
    };
    c(conds(255));
    let e = cerr(conds(256));
    assert!(e.message.contains("more than 256 conditions"), "{e}");
    assert!(e.path.starts_with("_and."), "{e:?}");
    // Lists.
    let list = |n: usize| json!({"a": {"_in": (0..n).collect::<Vec<_>>()}});
    c(list(1000));
    let e = cerr(list(1001));
    assert_eq!(e.path, "a._in");
    assert!(e.message.contains("1000"), "{e}");
    // Regex size.
    let small = FilterLimits {
        max_regex_bytes: 2_000,
        ..FilterLimits::default()
    };
    let e = cerr_with(json!({"a": {"_regex": "\\w{200}"}}), &small, &ctx());
    assert_eq!(e.path, "a._regex");
    assert!(e.message.contains("2000 bytes"), "{e}");
    let e = cerr_with(json!({"a": {"_regex": "a".repeat(2_001)}}), &small, &ctx());
    assert_eq!(e.path, "a._regex");
    assert!(Filter::compile(&json!({"a": {"_regex": "^[a-z]+$"}}), &small, &ctx()).is_ok());
    // The default limit accepts ordinary patterns and rejects huge repetitions. Each Unicode
    // class costs tens of KiB, so ASCII classes are the way to write larger patterns.
    c(json!({"a": {"_regex": "^\\w+@example\\.(com|org)$"}}));
    c(json!({"a": {"_regex": "^(?-u:\\w)+@(?-u:\\w)+\\.[a-z]{2,}$"}}));
    assert!(cerr(json!({"a": {"_regex": "\\w{1000}"}}))
        .message
        .contains("65536 bytes"));
}

#[test]
fn canonical_identity() {
    let a = c(json!({"_and": [{"b": {"_in": [2, 1]}}, {"a": 1}]}));
    let b = c(json!({"a": 1, "b": {"_in": [1, 2]}}));
    assert_eq!(a.canonical(), b.canonical());
    let parsed_a: Value =
        serde_json::from_str(r#"{"x":{"_gt":1,"_lt":9},"y":"z"}"#).unwrap_or_default();
    let parsed_b: Value =
        serde_json::from_str(r#"{"y":"z","x":{"_lt":9,"_gt":1}}"#).unwrap_or_default();
    assert_eq!(c(parsed_a).canonical(), c(parsed_b).canonical());
    let or1 = c(json!({"_or": [{"a": 1}, {"b": 2}]}));
    let or2 = c(json!({"_or": [{"b": 2}, {"a": 1}]}));
    assert_eq!(or1.canonical(), or2.canonical());
    assert_eq!(
        c(json!({"a": {"_nnull": true}})).canonical(),
        c(json!({"a": {"_null": false}})).canonical()
    );
    let distinct = [
        json!({"a": 1}),
        json!({"a": "1"}),
        json!({"a": 2}),
        json!({"b": 1}),
        json!({"a": {"_lt": 1}}),
        json!({"a": {"_lte": 1}}),
        json!({"a": {"_in": [1]}}),
        json!({"a": {"_nin": [1]}}),
        json!({"a": {"_icontains": "x"}}),
        json!({"a": {"_nicontains": "x"}}),
        json!({"a": {"_istarts_with": "x"}}),
        json!({"a": {"_contains": "x"}}),
        json!({"a": {"_regex": "x"}}),
        json!({"a": {"_gt": "$NOW"}}),
        json!({"a": {"_gt": "$NOW(-1 day)"}}),
        json!({"a": {"_gt": "$NOW(-1 week)"}}),
        json!({"a.b": 1}),
        json!({"a": 1, "b": 1}),
        json!({"_or": [{"a": 1}, {"b": 1}]}),
        json!({"a": {"_between": [1, 2]}}),
        json!({"a": {"_nbetween": [1, 2]}}),
        json!({"a": {"_eq": [1, 2]}}),
        json!({"a": {"_eq": "[1,2]"}}),
    ];
    let canon: Vec<String> = distinct
        .iter()
        .map(|f| c(f.clone()).canonical().to_owned())
        .collect();
    for i in 0..canon.len() {
        for j in i + 1..canon.len() {
            assert_ne!(canon[i], canon[j], "{} vs {}", distinct[i], distinct[j]);
        }
    }
}

#[test]
fn and_combines_filters() {
    let rule = c(json!({"owner": "$CURRENT_USER"}));
    let sub = c(json!({"status": "paid"}));
    let both = rule.clone().and(sub.clone());
    assert!(both.matches(&json!({"owner": "u1", "status": "paid"})));
    assert!(!both.matches(&json!({"owner": "u2", "status": "paid"})));
    assert_eq!(both.canonical(), sub.clone().and(rule.clone()).canonical());
    assert_eq!(
        both.canonical(),
        c(json!({"owner": "$CURRENT_USER", "status": "paid"})).canonical()
    );
    assert_eq!(
        sub.clone().and(Filter::always()).canonical(),
        sub.canonical()
    );
    assert!(Filter::always().and(Filter::always()).is_always());
    assert_eq!(Filter::always().canonical(), "");
    assert!(Filter::always().matches(&json!(1)));
    assert_eq!(both.fields(), vec!["owner", "status"]);
}

#[test]
fn fields_lists_every_path() {
    let f = c(json!({
        "a": 1,
        "b.c": {"_gt": 1},
        "_or": [{"d": {"e": {"_null": true}}}, {"a": 2}],
        "tags": {"_some": {"name": "x"}}
    }));
    assert_eq!(f.fields(), vec!["a", "b.c", "d.e", "tags", "tags.name"]);
}

#[test]
fn equality_terms_and_index_keys() {
    let f = c(json!({
        "status": "paid",
        "n": {"_in": [1, "2"]},
        "x": {"_gt": 1},
        "author": {"name": {"_eq": "Ann"}},
        "arr": {"_eq": [1]},
        "mixed": {"_in": [1, [2]]},
        "t": {"_eq": "$NOW"},
        "_or": [{"z": 1}, {"z": 2}]
    }));
    let mut terms = f.equality_terms();
    terms.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        terms,
        vec![
            ("author.name".to_owned(), vec![json!("Ann")]),
            ("n".to_owned(), vec![json!(1), json!("2")]),
            ("status".to_owned(), vec![json!("paid")]),
        ]
    );
    assert_eq!(
        c(json!({"a": null})).equality_terms(),
        vec![("a".to_owned(), vec![json!(null)])]
    );
    assert!(c(json!({"_or": [{"a": 1}, {"b": 1}]}))
        .equality_terms()
        .is_empty());
    assert!(Filter::always().equality_terms().is_empty());

    for (a, b) in [
        (json!(5), json!("5")),
        (json!(5), json!(5.0)),
        (json!("5"), json!("5.0")),
        (json!("2.50"), json!(2.5)),
        (json!(true), json!("true")),
        (json!(false), json!("false")),
        (json!("a"), json!("a")),
        (json!(null), json!(null)),
        (json!(-0.0), json!(0)),
        (json!("1e2"), json!(100)),
    ] {
        assert_eq!(index_key(&a), index_key(&b), "{a} vs {b}");
    }
    for (a, b) in [
        (json!(5), json!("5a")),
        (json!(true), json!(1)),
        (json!("true"), json!("TRUE")),
        (json!(null), json!("null")),
        (json!(null), json!("")),
        (json!(1), json!(1.000_000_1)),
        (
            json!(9_007_199_254_740_993_u64),
            json!(9_007_199_254_740_992_u64),
        ),
        (json!("s:a"), json!("a")),
    ] {
        assert_ne!(index_key(&a), index_key(&b), "{a} vs {b}");
    }
    assert_eq!(index_key(&json!([1])), None);
    assert_eq!(index_key(&json!({})), None);

    let item = json!({"tags": [{"n": 1}, {"n": "2"}, {"x": 0}], "a": null, "arr": [1, "x", [2]]});
    assert_eq!(index_keys_at(&item, "tags.n"), vec!["n:1", "n:2", "null"]);
    assert_eq!(index_keys_at(&item, "a"), vec!["null"]);
    assert_eq!(index_keys_at(&item, "nope"), vec!["null"]);
    assert_eq!(index_keys_at(&item, "arr"), vec!["n:1", "s:x"]);
}

/// Scalars covering every type and the numeric/boolean string cases.
fn scalar_pool() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(false),
        json!("true"),
        json!("false"),
        json!("TRUE"),
        json!(0),
        json!(-0.0),
        json!(1),
        json!(1.0),
        json!(1.5),
        json!("1"),
        json!("1.0"),
        json!("1.50"),
        json!("+1"),
        json!(".5"),
        json!(0.5),
        json!("1e0"),
        json!(""),
        json!("a"),
        json!("A"),
        json!("null"),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e300),
        json!("2024-01-01"),
    ]
}

#[test]
fn index_key_agrees_with_eq_on_scalars() {
    let pool = scalar_pool();
    for a in &pool {
        for b in &pool {
            let eq = values_eq(a, b);
            assert_eq!(index_key(a) == index_key(b), eq, "{a} vs {b}");
            let f = c(json!({"f": {"_eq": b}}));
            assert_eq!(f.matches(&json!({"f": a})), eq, "{a} _eq {b}");
        }
    }
}

#[test]
fn jsonpath_filters() {
    let limits = FilterLimits::default();
    let f = match Filter::compile_jsonpath("$.items[?(@.price > 10)]", &limits) {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    };
    assert!(f.matches(&json!({"items": [{"price": 5}, {"price": 12}]})));
    assert!(!f.matches(&json!({"items": [{"price": 5}]})));
    assert!(!f.matches(&json!({})));
    assert!(!f.matches(&json!("scalar")));
    assert_eq!(f.fields(), vec!["*"]);
    assert_eq!(f.canonical(), r#"(_jsonpath "$.items[?(@.price > 10)]")"#);

    let g = Filter::compile_jsonpath(" $.status ", &limits).ok();
    assert!(g
        .as_ref()
        .is_some_and(|g| g.matches(&json!({"status": null}))));
    assert!(g.as_ref().is_some_and(|g| !g.matches(&json!({"other": 1}))));

    let both = f.clone().and(c(json!({"vip": true})));
    assert!(both.matches(&json!({"vip": true, "items": [{"price": 12}]})));
    assert!(!both.matches(&json!({"vip": false, "items": [{"price": 12}]})));

    for bad in ["$[", "", "   ", "no dollar", "$.a[?(@.b ==)]"] {
        let e = match Filter::compile_jsonpath(bad, &limits) {
            Ok(f) => panic!("{bad:?} compiled: {f:?}"),
            Err(e) => e,
        };
        assert_eq!(e.path, "jsonpath");
        assert!(e.message.contains("\"jsonpath\""), "{}", e.message);
        assert!(!e.message.contains('\n'), "{}", e.message);
    }
    let long = format!("$.{}", "a".repeat(MAX_JSONPATH_BYTES));
    assert!(Filter::compile_jsonpath(&long, &limits).is_err());
    let deep = format!("$.a{}", "[0]".repeat(3));
    assert!(Filter::compile_jsonpath(&deep, &limits).is_ok());
    let nested = format!("$[?{}@.a{}]", "(".repeat(20), ")".repeat(20));
    let e = Filter::compile_jsonpath(&nested, &limits).err();
    assert!(e.is_some_and(|e| e.message.contains("deeper than 16")));
}

#[test]
fn filter_is_send_sync_clone_debug() {
    fn check<T: Send + Sync + Clone + std::fmt::Debug>() {}
    check::<Filter>();
    check::<FilterError>();
}

#[test]
fn hostile_items_do_not_panic() {
    let f = c(
        json!({"a": {"b": {"c": {"_eq": 1}}}, "_or": [{"x": {"_icontains": "İ"}}, {"x": {"_iends_with": "ß"}}]}),
    );
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    for item in [
        json!(null),
        json!([1, 2]),
        json!({"a": deep}),
        json!({"a": [[[[{"b": [{"c": "1"}]}]]]]}),
        json!({"x": "\u{0130}\u{0130}ß"}),
        json!({"x": ""}),
    ] {
        let _ = f.matches(&item);
    }
    assert!(c(json!({"a": {"b": {"c": 1}}})).matches(&json!({"a": [[[[{"b": [{"c": "1"}]}]]]]})));
}

// ---- property tests ----

fn prop_scalar() -> impl Strategy<Value = Value> {
    prop::sample::select(scalar_pool())
}

/// A small pool, so random items often match random filters.
fn prop_small_scalar() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!(null),
        json!(true),
        json!("true"),
        json!(1),
        json!(1.0),
        json!("1"),
        json!("1.00"),
        json!(2.5),
        json!("2.50"),
        json!("a"),
    ])
}

const FIELDS: [&str; 3] = ["a", "b", "c.d"];

fn prop_leaf() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(FIELDS.to_vec());
    prop_oneof![
        (field.clone(), prop_small_scalar()).prop_map(|(f, v)| json!({ f: { "_eq": v } })),
        (field.clone(), prop_small_scalar()).prop_map(|(f, v)| json!({ f: v })),
        (
            field.clone(),
            prop::collection::vec(prop_small_scalar(), 0..4)
        )
            .prop_map(|(f, v)| json!({ f: { "_in": v } })),
        (
            field,
            prop_oneof![Just(json!(0)), Just(json!("1")), Just(json!(1.5))]
        )
            .prop_map(|(f, v)| json!({ f: { "_gt": v } })),
    ]
}

fn prop_filter() -> impl Strategy<Value = Value> {
    prop_leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| json!({ "_and": v })),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| json!({ "_or": v })),
            prop::collection::vec(inner, 1..3).prop_map(|v| json!({ "_and": v })),
        ]
    })
}

fn prop_field_value() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => prop_small_scalar().prop_map(Some),
        1 => Just(None),
        1 => prop::collection::vec(prop_small_scalar(), 0..3).prop_map(|v| Some(Value::Array(v))),
    ]
}

fn prop_item() -> impl Strategy<Value = Value> {
    (
        prop_field_value(),
        prop_field_value(),
        prop_field_value(),
        any::<bool>(),
    )
        .prop_map(|(a, b, d, c_is_array)| {
            let mut item = serde_json::Map::new();
            if let Some(a) = a {
                item.insert("a".to_owned(), a);
            }
            if let Some(b) = b {
                item.insert("b".to_owned(), b);
            }
            if let Some(d) = d {
                let inner = json!({ "d": d });
                item.insert(
                    "c".to_owned(),
                    if c_is_array {
                        json!([inner, {}])
                    } else {
                        inner
                    },
                );
            }
            Value::Object(item)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn equality_terms_are_sound(filters in prop::collection::vec(prop_filter(), 1..3), item in prop_item()) {
        let filter = c(json!({ "_and": filters }));
        if filter.matches(&item) {
            for (field, values) in filter.equality_terms() {
                let allowed: Vec<Option<String>> = values.iter().map(index_key).collect();
                let keys = index_keys_at(&item, &field);
                prop_assert!(
                    keys.iter().any(|k| allowed.contains(&Some(k.clone()))),
                    "item {} matches {} but term {} {:?} has keys {:?}",
                    item, filter.canonical(), field, values, keys
                );
            }
        }
    }

    #[test]
    fn index_key_matches_eq(a in prop_scalar_or_random(), b in prop_scalar_or_random()) {
        prop_assert_eq!(index_key(&a) == index_key(&b), values_eq(&a, &b), "{} vs {}", a, b);
    }

    #[test]
    fn arbitrary_json_never_panics(filter in arbitrary_json(), item in arbitrary_json()) {
        if let Ok(f) = Filter::compile(&filter, &FilterLimits::default(), &ctx()) {
            let _ = f.matches(&item);
            let _ = f.fields();
            let _ = f.equality_terms();
        }
    }
}

fn prop_scalar_or_random() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop_scalar(),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        "[+-]?[0-9]{0,3}(\\.[0-9]{0,3})?(e[+-]?[0-9]{1,2})?".prop_map(Value::String),
        any::<i32>().prop_map(|i| json!(i.to_string())),
    ]
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "a",
        "b.c",
        "_and",
        "_or",
        "_eq",
        "_neq",
        "_lt",
        "_gte",
        "_in",
        "_nin",
        "_null",
        "_contains",
        "_icontains",
        "_starts_with",
        "_niends_with",
        "_between",
        "_empty",
        "_regex",
        "_some",
        "_none",
        "_nope",
    ]);
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i32>().prop_map(|i| json!(i)),
        prop::sample::select(vec![
            "x",
            "1",
            "$NOW",
            "$NOW(-1 day)",
            "$CURRENT_USER",
            "2024-01-01",
            "İ",
            "(",
            ".*",
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 32, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..4).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

#[test]
fn jsonpath_errors_are_short() {
    let l = FilterLimits::default();
    let msg = |e: &str| Filter::compile_jsonpath(e, &l).err().map(|e| e.message);
    assert_eq!(
        msg("$["),
        Some(
            r#"Invalid JSONPath expression at "jsonpath": expected selector at column 3."#
                .to_owned()
        )
    );
    assert_eq!(
        msg("$.a[?(@.b ==)]"),
        Some(
            r#"Invalid JSONPath expression at "jsonpath": expected comparable at column 13."#
                .to_owned()
        )
    );
}

/// `required_texts` is a necessary condition: an item a filter matches always contains one
/// text of every list in its compact JSON, whatever the item holds there (escapes, non-ASCII,
/// strings `_eq` reads as numbers or booleans, arrays, nested objects).
#[test]
fn required_texts_never_reject_a_match() {
    let values = [
        json!("a"),
        json!("a\"b"),
        json!("x"),
        json!("é"),
        json!("5"),
        json!(5),
        json!("TRUE"),
        json!(true),
        json!(["a", "x"]),
        json!({"t": "a"}),
        json!([{"t": "a"}, {"t": "é"}]),
        Value::Null,
    ];
    let filters = [
        json!({"s": {"_eq": "a"}}),
        json!({"s": "a"}),
        json!({"s": {"_eq": "a\"b"}}),
        json!({"s": {"_in": ["x", "é"]}}),
        json!({"s.t": {"_eq": "a"}}),
        json!({"s.t": {"_in": ["é"]}}),
        json!({"_and": [{"s": {"_eq": "a"}}, {"u": {"_eq": "x"}}]}),
        json!({"_and": [{"s": {"_in": ["a", "x"]}}, {"u": {"_neq": "x"}}]}),
        json!({"s": {"_eq": "5"}}),
        json!({"s": {"_eq": "TRUE"}}),
        json!({"s": {"_in": ["a", 5]}}),
    ];
    for f in &filters {
        let filter = c(f.clone());
        let texts = filter.required_texts();
        for s in &values {
            for u in &values {
                let item = json!({"id": 1, "s": s, "u": u});
                if !filter.matches(&item) {
                    continue;
                }
                let text = serde_json::to_string(&item).expect("json");
                for any in &texts {
                    assert!(
                        any.iter().any(|t| text.contains(t.as_str())),
                        "{f} matches {text}, which holds none of {any:?}"
                    );
                }
            }
        }
    }
    // Strings `_eq` reads as numbers, and lists with a number, give no text.
    assert!(c(json!({"s": {"_eq": "5"}})).required_texts().is_empty());
    assert_eq!(
        c(json!({"s": {"_in": ["x", "é"]}})).required_texts(),
        [vec![r#""x""#.to_string(), r#""é""#.to_string()]]
    );
}
