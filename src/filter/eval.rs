//! Evaluation of a compiled filter tree, plus its canonical string and field list.

use std::cmp::Ordering;
use std::panic::{catch_unwind, AssertUnwindSafe};

use jiff::Timestamp;
use serde_json::Value;

use super::value::{
    contains_ci, ends_with_ci, eq_lit, eq_lit_cached, is_empty, order_instant, order_lit,
    starts_with_ci, Lit, NumCache,
};
use super::{JsonPathQuery, Node, Op, Operand, TextKind};

/// How many arrays nested directly in arrays a path may descend through.
const MAX_ARRAY_NESTING: usize = 32;

/// Per-evaluation state: the current time, read at most once per evaluation so every `$NOW`
/// in one filter sees the same instant.
struct Ctx {
    now: Option<Timestamp>,
}

impl Ctx {
    fn now(&mut self) -> Timestamp {
        *self.now.get_or_insert_with(Timestamp::now)
    }
}

/// Evaluates `root` against `item`.
pub(crate) fn matches(root: &Node, item: &Value) -> bool {
    let mut ctx = Ctx { now: None };
    eval(root, item, &mut ctx)
}

fn eval(node: &Node, item: &Value, ctx: &mut Ctx) -> bool {
    match node {
        Node::True => true,
        Node::And(children) => children.iter().all(|c| eval(c, item, ctx)),
        Node::Or(children) => children.iter().any(|c| eval(c, item, ctx)),
        Node::Cond { path, op } => any_at(item, &path.segs, 0, &mut |v| test(op, v, ctx)),
        Node::Quant { path, none, inner } => {
            any_at(item, &path.segs, 0, &mut |v| quant(*none, inner, v, ctx))
        }
        Node::JsonPath(q) => jsonpath_matches(q, item),
    }
}

/// Resolves `segs` inside `v` and reports whether `f` holds for some resolved value.
///
/// Objects are descended by key (a missing key resolves to `None`); an array met before the
/// path ends is fanned out over its elements (existential, like Directus' default `_some` on
/// to-many relations); a scalar or null met before the path ends resolves to `None`. The value
/// at the end of the path is passed as is, arrays included.
pub(crate) fn any_at<'v, F>(v: &'v Value, segs: &[String], nesting: usize, f: &mut F) -> bool
where
    F: FnMut(Option<&'v Value>) -> bool,
{
    let Some((first, rest)) = segs.split_first() else {
        return f(Some(v));
    };
    match v {
        Value::Object(m) => match m.get(first.as_str()) {
            Some(child) => any_at(child, rest, 0, f),
            None => f(None),
        },
        Value::Array(items) => {
            nesting < MAX_ARRAY_NESTING && items.iter().any(|e| any_at(e, segs, nesting + 1, f))
        }
        _ => f(None),
    }
}

fn test(op: &Op, v: Option<&Value>, ctx: &mut Ctx) -> bool {
    let present = v.filter(|x| !x.is_null());
    match op {
        Op::Null(is_null) => *is_null == present.is_none(),
        Op::Empty(empty) => *empty == is_empty(v),
        Op::Eq(o) => match present {
            None => matches!(o, Operand::Lit(l) if l.value.is_null()),
            Some(x) => match o {
                Operand::Lit(l) => eq_lit(x, l),
                Operand::Now(_) => order(x, o, ctx) == Some(Ordering::Equal),
            },
        },
        Op::Neq(o) => present.is_some_and(|x| match o {
            Operand::Lit(l) => !eq_lit(x, l),
            Operand::Now(_) => order(x, o, ctx).is_some_and(Ordering::is_ne),
        }),
        Op::Lt(o) => present.is_some_and(|x| order(x, o, ctx).is_some_and(Ordering::is_lt)),
        Op::Lte(o) => present.is_some_and(|x| order(x, o, ctx).is_some_and(Ordering::is_le)),
        Op::Gt(o) => present.is_some_and(|x| order(x, o, ctx).is_some_and(Ordering::is_gt)),
        Op::Gte(o) => present.is_some_and(|x| order(x, o, ctx).is_some_and(Ordering::is_ge)),
        Op::In(list) => in_list(present, list),
        Op::Nin(list) => present.is_some_and(|x| !in_list(Some(x), list)),
        Op::Contains { lit, text, neg } => match present {
            Some(Value::String(s)) => match text {
                Some(t) => s.contains(t.as_str()) != *neg,
                None => false,
            },
            Some(Value::Array(items)) => items.iter().any(|e| eq_lit(e, lit)) != *neg,
            _ => false,
        },
        Op::Text {
            kind,
            ci,
            neg,
            needle,
        } => match present {
            Some(Value::String(s)) => text_test(*kind, *ci, s, needle) != *neg,
            _ => false,
        },
        Op::Between { lo, hi, neg } => {
            present.is_some_and(|x| match (order(x, lo, ctx), order(x, hi, ctx)) {
                (Some(a), Some(b)) => (a.is_ge() && b.is_le()) != *neg,
                _ => false,
            })
        }
        Op::Regex(re) => matches!(present, Some(Value::String(s)) if re.is_match(s)),
    }
}

/// `_in`: null/missing matches a `null` in the list; an array matches when any element (or
/// the array itself) is in the list; anything else when it equals a listed value.
fn in_list(present: Option<&Value>, list: &[Lit]) -> bool {
    match present {
        None => list.iter().any(|l| l.value.is_null()),
        Some(arr @ Value::Array(items)) => {
            items.iter().any(|e| in_scalars(e, list)) || list.iter().any(|l| eq_lit(arr, l))
        }
        Some(x) => in_scalars(x, list),
    }
}

/// Whether `x` equals one of `list`, parsing `x` as a number at most once.
fn in_scalars(x: &Value, list: &[Lit]) -> bool {
    let mut cache = NumCache::default();
    list.iter().any(|l| eq_lit_cached(x, &mut cache, l))
}

fn order(x: &Value, o: &Operand, ctx: &mut Ctx) -> Option<Ordering> {
    match o {
        Operand::Lit(l) => order_lit(x, l),
        Operand::Now(n) => order_instant(x, n.at(ctx.now())?),
    }
}

fn text_test(kind: TextKind, ci: bool, s: &str, needle: &str) -> bool {
    match (kind, ci) {
        (TextKind::Contains, false) => s.contains(needle),
        (TextKind::Contains, true) => contains_ci(s, needle),
        (TextKind::StartsWith, false) => s.starts_with(needle),
        (TextKind::StartsWith, true) => starts_with_ci(s, needle),
        (TextKind::EndsWith, false) => s.ends_with(needle),
        (TextKind::EndsWith, true) => ends_with_ci(s, needle),
    }
}

/// `_some` / `_none` on the value at the relation path.
fn quant(none: bool, inner: &Node, v: Option<&Value>, ctx: &mut Ctx) -> bool {
    match v {
        Some(Value::Array(items)) => items.iter().any(|e| eval(inner, e, ctx)) != none,
        Some(obj @ Value::Object(_)) => eval(inner, obj, ctx) != none,
        None | Some(Value::Null) => none,
        Some(_) => false,
    }
}

fn jsonpath_matches(q: &JsonPathQuery, item: &Value) -> bool {
    // The query engine is third-party code: contain any panic it might raise.
    catch_unwind(AssertUnwindSafe(|| {
        jsonpath_rust::query::js_path_process(&q.query, item).is_ok_and(|r| !r.is_empty())
    }))
    .unwrap_or(false)
}

/// The canonical string of a node (see [`super::Filter::canonical`]).
pub(crate) fn canonical(node: &Node) -> String {
    let mut out = String::new();
    write_node(node, &mut out);
    out
}

fn write_node(node: &Node, out: &mut String) {
    match node {
        Node::True => {}
        Node::And(children) | Node::Or(children) => {
            let mut parts: Vec<String> = children.iter().map(canonical).collect();
            parts.sort();
            parts.dedup();
            if let [only] = parts.as_slice() {
                out.push_str(only);
                return;
            }
            out.push_str(if matches!(node, Node::And(_)) {
                "(_and"
            } else {
                "(_or"
            });
            for p in parts {
                out.push(' ');
                out.push_str(&p);
            }
            out.push(')');
        }
        Node::Cond { path, op } => {
            out.push('(');
            write_str(&path.dotted, out);
            out.push(' ');
            write_op(op, out);
            out.push(')');
        }
        Node::Quant { path, none, inner } => {
            out.push('(');
            write_str(&path.dotted, out);
            out.push_str(if *none { " _none " } else { " _some " });
            write_node(inner, out);
            out.push(')');
        }
        Node::JsonPath(q) => {
            out.push_str("(_jsonpath ");
            write_str(&q.expr, out);
            out.push(')');
        }
    }
}

fn write_op(op: &Op, out: &mut String) {
    match op {
        Op::Eq(o) => write_named("_eq", o, out),
        Op::Neq(o) => write_named("_neq", o, out),
        Op::Lt(o) => write_named("_lt", o, out),
        Op::Lte(o) => write_named("_lte", o, out),
        Op::Gt(o) => write_named("_gt", o, out),
        Op::Gte(o) => write_named("_gte", o, out),
        Op::In(list) | Op::Nin(list) => {
            out.push_str(if matches!(op, Op::In(_)) {
                "_in ["
            } else {
                "_nin ["
            });
            let mut parts: Vec<String> = list
                .iter()
                .map(|l| {
                    let mut s = String::new();
                    write_json(&l.value, &mut s);
                    s
                })
                .collect();
            parts.sort();
            parts.dedup();
            out.push_str(&parts.join(","));
            out.push(']');
        }
        Op::Null(b) => out.push_str(if *b { "_null true" } else { "_null false" }),
        Op::Empty(b) => out.push_str(if *b { "_empty true" } else { "_empty false" }),
        Op::Contains { lit, neg, .. } => {
            out.push_str(if *neg { "_ncontains " } else { "_contains " });
            write_json(&lit.value, out);
        }
        Op::Text {
            kind,
            ci,
            neg,
            needle,
        } => {
            out.push_str(&text_op_name(*kind, *ci, *neg));
            out.push(' ');
            write_str(needle, out);
        }
        Op::Between { lo, hi, neg } => {
            out.push_str(if *neg { "_nbetween [" } else { "_between [" });
            write_operand(lo, out);
            out.push(',');
            write_operand(hi, out);
            out.push(']');
        }
        Op::Regex(re) => {
            out.push_str("_regex ");
            write_str(re.as_str(), out);
        }
    }
}

/// The Directus name of a text operator, e.g. `_nistarts_with`.
pub(crate) fn text_op_name(kind: TextKind, ci: bool, neg: bool) -> String {
    let base = match kind {
        TextKind::Contains => "contains",
        TextKind::StartsWith => "starts_with",
        TextKind::EndsWith => "ends_with",
    };
    format!(
        "_{}{}{base}",
        if neg { "n" } else { "" },
        if ci { "i" } else { "" }
    )
}

fn write_named(name: &str, o: &Operand, out: &mut String) {
    out.push_str(name);
    out.push(' ');
    write_operand(o, out);
}

fn write_operand(o: &Operand, out: &mut String) {
    match o {
        Operand::Lit(l) => write_json(&l.value, out),
        Operand::Now(n) => out.push_str(&n.canonical()),
    }
}

/// JSON text with object keys sorted, independent of the map's iteration order.
fn write_json(v: &Value, out: &mut String) {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => out.push_str(&v.to_string()),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(k, out);
                out.push(':');
                write_json(item, out);
            }
            out.push('}');
        }
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// Adds the top-level field of every path `node` reads to `out`; false when it reads the whole
/// item (JSONPath, or a path without segments).
pub(crate) fn collect_top_fields<'n>(node: &'n Node, out: &mut Vec<&'n str>) -> bool {
    match node {
        Node::True => true,
        Node::And(children) | Node::Or(children) => {
            children.iter().all(|c| collect_top_fields(c, out))
        }
        // A quantifier's inner paths are relative to the items at its path, inside the same
        // top-level field.
        Node::Cond { path, .. } | Node::Quant { path, .. } => match path.segs.first() {
            Some(first) => {
                out.push(first);
                true
            }
            None => false,
        },
        Node::JsonPath(_) => false,
    }
}

/// Pushes every dotted field path under `node`, prefixed with `prefix`.
pub(crate) fn collect_fields(node: &Node, prefix: &str, out: &mut Vec<String>) {
    match node {
        Node::True => {}
        Node::And(children) | Node::Or(children) => {
            for c in children {
                collect_fields(c, prefix, out);
            }
        }
        Node::Cond { path, .. } => out.push(format!("{prefix}{}", path.dotted)),
        Node::Quant { path, inner, .. } => {
            let full = format!("{prefix}{}", path.dotted);
            collect_fields(inner, &format!("{full}."), out);
            out.push(full);
        }
        Node::JsonPath(_) => out.push("*".to_owned()),
    }
}
