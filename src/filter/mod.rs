//! Subscription filters: compiles a Directus filter object (or a JSONPath expression) into a
//! [`Filter`] once, at subscribe time, and evaluates it against every published item.
//!
//! This module owns the filter language: operator parsing and validation (with errors that name
//! the offending path), compile-time limits ([`FilterLimits`]), placeholder resolution
//! (`$CURRENT_USER` and `$CLAIMS.<name>` at compile time, `$NOW` at match time), the comparison rules between JSON
//! values of different types (see `protocol/filters.md`), the canonical identity used to group
//! identical subscriptions, and the equality terms a future index can use. It is free of tokio
//! and axum.
//!
//! ```
//! # use tidings::filter::{Filter, FilterLimits, CompileContext};
//! let f = Filter::compile(
//!     &serde_json::json!({"status": {"_eq": "paid"}, "total": {"_gt": 10}}),
//!     &FilterLimits::default(),
//!     &CompileContext::default(),
//! ).unwrap();
//! assert!(f.matches(&serde_json::json!({"status": "paid", "total": "12.5"})));
//! ```

mod compile;
mod eval;
#[cfg(test)]
mod tests;
mod value;

use regex::Regex;
use serde_json::Value;

pub use value::index_key;
use value::{Lit, NowOffset};

/// Limits applied while compiling, so a hostile filter cannot cost unbounded work.
#[derive(Debug, Clone)]
pub struct FilterLimits {
    /// Maximum nesting depth of `_and`/`_or`/field objects.
    pub max_depth: usize,
    /// Maximum number of nodes (operators + logical nodes) in one filter.
    pub max_nodes: usize,
    /// Maximum length of an `_in`/`_nin`/`_between` list.
    pub max_list: usize,
    /// Maximum compiled size of a `_regex` in bytes (regex crate size limit).
    pub max_regex_bytes: usize,
}

impl FilterLimits {
    /// Depth 16, 256 nodes, lists of 1000 values, regexes of 64 KiB (also the defaults of
    /// `tidings serve`'s `--max-filter-*` flags, through `config::defaults`).
    pub const DEFAULT: FilterLimits = FilterLimits {
        max_depth: 16,
        max_nodes: 256,
        max_list: 1000,
        max_regex_bytes: 64 * 1024,
    };
}

impl Default for FilterLimits {
    fn default() -> Self {
        FilterLimits::DEFAULT
    }
}

/// Values that compile-time placeholders resolve to (`$CURRENT_USER`, `$CLAIMS.<name>`).
#[derive(Debug, Clone, Default)]
pub struct CompileContext {
    /// Subject of the subscriber's token, if any.
    pub current_user: Option<String>,
    /// Verified claims of the subscriber's JWT, if it has one.
    pub claims: Option<std::sync::Arc<serde_json::Map<String, Value>>>,
}

/// A compile error; `path` names where in the filter the problem is, e.g. `status._nope`.
///
/// `message` is a complete sentence that names the path (for example
/// `Unknown filter operator "_nope" at "status._nope".`), without the `Invalid query. ` prefix
/// the protocol layer adds.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct FilterError {
    /// Dotted path of the offending key; array indexes appear as numbers (`_and.0.status`).
    pub path: String,
    /// Human-readable sentence naming the path.
    pub message: String,
}

impl FilterError {
    pub(crate) fn new(path: &str, message: String) -> FilterError {
        FilterError {
            path: path.to_owned(),
            message,
        }
    }
}

/// Maximum length of a JSONPath expression, in bytes.
pub const MAX_JSONPATH_BYTES: usize = 4096;

/// A compiled predicate over items. Cheap to evaluate, immutable, shareable across threads.
#[derive(Debug, Clone)]
pub struct Filter {
    root: Node,
    canonical: String,
}

/// A field path, kept both dotted (for reporting) and split (for evaluation).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldPath {
    pub(crate) dotted: String,
    pub(crate) segs: Vec<String>,
}

impl FieldPath {
    fn new(segs: &[String]) -> FieldPath {
        FieldPath {
            dotted: segs.join("."),
            segs: segs.to_vec(),
        }
    }
}

/// A comparison operand: a literal, or a `$NOW` offset evaluated at match time.
#[derive(Debug, Clone)]
pub(crate) enum Operand {
    Lit(Lit),
    Now(NowOffset),
}

/// Which end of a string a text operator looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextKind {
    Contains,
    StartsWith,
    EndsWith,
}

/// A field operator with its compiled operand.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Eq(Operand),
    Neq(Operand),
    Lt(Operand),
    Lte(Operand),
    Gt(Operand),
    Gte(Operand),
    In(Vec<Lit>),
    Nin(Vec<Lit>),
    /// `true`: the value is null or missing; `false`: it is present and not null.
    Null(bool),
    /// `true`: the value is missing, null, `""`, `[]` or `{}`; `false`: the negation.
    Empty(bool),
    /// `_contains`/`_ncontains`: substring of a string, or element of an array.
    Contains {
        lit: Lit,
        text: Option<String>,
        neg: bool,
    },
    /// `_starts_with`, `_iends_with`, `_icontains`, ... on strings. `needle` is lowercased
    /// when `ci`.
    Text {
        kind: TextKind,
        ci: bool,
        neg: bool,
        needle: String,
    },
    Between {
        lo: Operand,
        hi: Operand,
        neg: bool,
    },
    Regex(Regex),
}

/// A compiled JSONPath query.
#[derive(Debug, Clone)]
pub(crate) struct JsonPathQuery {
    pub(crate) expr: String,
    pub(crate) query: jsonpath_rust::parser::model::JpQuery,
}

/// The compiled predicate tree.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    True,
    And(Vec<Node>),
    Or(Vec<Node>),
    Cond {
        path: FieldPath,
        op: Box<Op>,
    },
    /// `_some` (`none == false`) / `_none` over the related items at `path`.
    Quant {
        path: FieldPath,
        none: bool,
        inner: Box<Node>,
    },
    JsonPath(Box<JsonPathQuery>),
}

impl Node {
    /// Conjunction, flattening nested `And`s and dropping `True`s.
    pub(crate) fn and(children: Vec<Node>) -> Node {
        let mut out = Vec::with_capacity(children.len());
        for c in children {
            match c {
                Node::True => {}
                Node::And(inner) => out.extend(inner),
                other => out.push(other),
            }
        }
        match out.len() {
            0 => Node::True,
            1 => out.pop().unwrap_or(Node::True),
            _ => Node::And(out),
        }
    }

    /// Disjunction, flattening nested `Or`s. An `Or` with a `True` child, or with no child
    /// at all (Directus: an empty `_or` adds no condition), is `True`.
    pub(crate) fn or(children: Vec<Node>) -> Node {
        let mut out = Vec::with_capacity(children.len());
        for c in children {
            match c {
                Node::True => return Node::True,
                Node::Or(inner) => out.extend(inner),
                other => out.push(other),
            }
        }
        match out.len() {
            0 => Node::True,
            1 => out.pop().unwrap_or(Node::True),
            _ => Node::Or(out),
        }
    }
}

impl Filter {
    /// A filter that matches every item; its canonical string is `""`.
    pub fn always() -> Filter {
        Filter {
            root: Node::True,
            canonical: String::new(),
        }
    }

    fn from_root(root: Node) -> Filter {
        let canonical = eval::canonical(&root);
        Filter { root, canonical }
    }

    /// Compiles a Directus filter object. `{}` compiles to [`Filter::always`].
    ///
    /// Errors name the offending path (see [`FilterError`]); limits are enforced here, so
    /// evaluation cost is bounded by the compiled size.
    pub fn compile(
        json: &Value,
        limits: &FilterLimits,
        ctx: &CompileContext,
    ) -> Result<Filter, FilterError> {
        compile::compile(json, limits, ctx).map(Filter::from_root)
    }

    /// Compiles a JSONPath expression (RFC 9535, via `jsonpath-rust`): the filter matches when
    /// the query selects at least one node of the item. The expression is parsed once, here.
    /// It is limited to [`MAX_JSONPATH_BYTES`] bytes and to `max_depth` nested brackets.
    pub fn compile_jsonpath(expr: &str, limits: &FilterLimits) -> Result<Filter, FilterError> {
        compile::compile_jsonpath(expr, limits).map(Filter::from_root)
    }

    /// ANDs two filters (permission row rule ∧ subscriber filter).
    pub fn and(self, other: Filter) -> Filter {
        Filter::from_root(Node::and(vec![self.root, other.root]))
    }

    /// Evaluates against one item. Never panics; does not allocate except for JSONPath
    /// queries and `$NOW` month/year arithmetic.
    pub fn matches(&self, item: &Value) -> bool {
        eval::matches(&self.root, item)
    }

    /// True for a filter that matches everything (e.g. compiled from `{}`).
    pub fn is_always(&self) -> bool {
        matches!(self.root, Node::True)
    }

    /// Every field path the filter reads (dotted, sorted, deduplicated), for permission
    /// checks. Fields inside `_some`/`_none` are reported both as the relation (`tags`) and as
    /// the full path (`tags.name`). A JSONPath filter reads the whole item and reports `*`.
    pub fn fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        eval::collect_fields(&self.root, "", &mut out);
        out.sort();
        out.dedup();
        out
    }

    /// The top-level fields of an item the filter reads (sorted, deduplicated), or `None` when
    /// it may read any of them (JSONPath). Evaluating it on an item reduced to these fields
    /// gives the same answer as on the whole item.
    pub fn top_fields(&self) -> Option<Vec<&str>> {
        let mut out = Vec::new();
        if !eval::collect_top_fields(&self.root, &mut out) {
            return None;
        }
        out.sort_unstable();
        out.dedup();
        Some(out)
    }

    /// Canonical identity: equal strings ⇔ equal compiled predicates, independent of JSON key
    /// order and of the order of `_and`/`_or` members. Computed once, at compile time.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// The top-level AND conjuncts of the form `field _eq v` (or shorthand `{field: v}`) and
    /// `field _in [..]` whose values are all scalars, as (dotted field, allowed values).
    ///
    /// Soundness contract for an index: an item can match only if, for every returned term,
    /// at least one of [`index_keys_at`]`(item, field)` equals [`index_key`]`(v)` for some
    /// allowed value `v`. `index_key` normalizes the way `_eq` compares (`5`, `"5"` and
    /// `"5.0"` share a key; `true` and `"true"` share a key), and `index_keys_at` keys a
    /// missing or null field as `null`, fans out through arrays of objects on the way, and
    /// keys each element of an array-valued field (because `_in` matches an array field when
    /// any element is in the list).
    pub fn equality_terms(&self) -> Vec<(String, Vec<Value>)> {
        let conjuncts: &[Node] = match &self.root {
            Node::And(children) => children,
            other => std::slice::from_ref(other),
        };
        let mut out = Vec::new();
        for node in conjuncts {
            let Node::Cond { path, op } = node else {
                continue;
            };
            let values: Vec<Value> = match op.as_ref() {
                Op::Eq(Operand::Lit(l)) => vec![l.value.clone()],
                Op::In(list) => list.iter().map(|l| l.value.clone()).collect(),
                _ => continue,
            };
            if values.iter().all(|v| index_key(v).is_some()) {
                out.push((path.dotted.clone(), values));
            }
        }
        out
    }

    /// For each top-level AND conjunct that is an equality on plain strings (`_eq` or a
    /// non-empty `_in`, none of whose values `_eq` reads as a number or a boolean), the JSON
    /// texts of its allowed values. An item can match only if its compact JSON contains one
    /// text of every list: under the [`Filter::equality_terms`] contract such a value matches
    /// only an equal string, at the field or in an array there, and compact serialization
    /// writes that string as exactly this text. A scan uses it to skip, without parsing, the
    /// items that cannot match.
    pub fn required_texts(&self) -> Vec<Vec<String>> {
        self.equality_terms()
            .into_iter()
            .filter(|(_, values)| !values.is_empty())
            .filter_map(|(_, values)| {
                values
                    .iter()
                    .map(|v| match v {
                        Value::String(s) if index_key(v).is_some_and(|k| k.starts_with("s:")) => {
                            serde_json::to_string(s).ok()
                        }
                        _ => None,
                    })
                    .collect::<Option<Vec<String>>>()
            })
            .collect()
    }
}

/// The index keys of the value(s) at a dotted `field` of `item`, following the same path
/// rules as evaluation: see [`Filter::equality_terms`]. The result may hold duplicates.
pub fn index_keys_at(item: &Value, field: &str) -> Vec<String> {
    let segs: Vec<String> = field.split('.').map(str::to_owned).collect();
    let mut out = Vec::new();
    eval::any_at(item, &segs, 0, &mut |v| {
        match v {
            None | Some(Value::Null) => out.push("null".to_owned()),
            Some(Value::Array(items)) => out.extend(items.iter().filter_map(index_key)),
            Some(other) => out.extend(index_key(other)),
        }
        false
    });
    out
}
