//! Field projections: compiles a subscriber's `fields` list (Directus syntax) once, at
//! subscribe time, and applies it to every item sent to that subscriber.
//!
//! This module owns the field-list syntax (`*`, `name`, `author.name`, `author.*`,
//! `json(meta, a.b)`), its validation and limits, and the projection semantics for items
//! without a schema: absent fields stay absent, dotted paths descend into objects and into
//! every object of an array, and a scalar met where an object was expected is omitted. It is
//! free of tokio and axum.
//!
//! ```
//! # use tidings::projection::Projection;
//! let p = Projection::compile(&["id".into(), "author.name".into()]).unwrap();
//! let out = p.apply(&serde_json::json!({"id": 1, "text": "hi", "author": {"name": "Ann", "age": 3}}));
//! assert_eq!(out, serde_json::json!({"id": 1, "author": {"name": "Ann"}}));
//! ```

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Maximum number of entries in one field list.
pub const MAX_FIELDS: usize = 256;
/// Maximum number of dotted segments in one entry (and of steps in a `json()` path).
pub const MAX_FIELD_DEPTH: usize = 16;

/// A field-list error; `path` is the offending entry (trimmed) and `message` a sentence naming
/// it, without the `Invalid query. ` prefix the protocol layer adds.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ProjectionError {
    /// The offending entry of the field list, trimmed (or its position, for an empty entry).
    pub path: String,
    /// Human-readable sentence naming the entry.
    pub message: String,
}

fn err(path: &str, message: String) -> ProjectionError {
    ProjectionError {
        path: path.to_owned(),
        message,
    }
}

/// What to emit for one selected key.
#[derive(Debug, Clone, PartialEq)]
enum Child {
    /// The value, copied whole.
    Whole,
    /// Only the nested selection (applied to an object, or to each object of an array).
    Nested(Sel),
}

/// A selection at one level of nesting.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sel {
    /// `*`: copy every key not otherwise selected.
    all: bool,
    fields: BTreeMap<String, Child>,
    /// Selected names in the order the subscriber listed them first: without `*`, output
    /// keys follow this order, as Directus returns explicit fields in request order.
    order: Vec<String>,
}

impl Sel {
    /// Adds the path `segs` (already validated: non-empty, `*` only as a segment of its own).
    fn insert(&mut self, segs: &[&str]) {
        let Some((first, rest)) = segs.split_first() else {
            return;
        };
        if *first == "*" {
            // `*` copies nested values whole, so deeper wildcards (`*.*`) add nothing.
            self.all = true;
            return;
        }
        if !self.fields.contains_key(*first) {
            self.order.push((*first).to_owned());
        }
        if rest.is_empty() {
            // A bare name never narrows an explicit nested selection.
            self.fields
                .entry((*first).to_owned())
                .or_insert(Child::Whole);
            return;
        }
        let child = self
            .fields
            .entry((*first).to_owned())
            .or_insert_with(|| Child::Nested(Sel::default()));
        if let Child::Whole = child {
            *child = Child::Nested(Sel::default());
        }
        if let Child::Nested(sel) = child {
            sel.insert(rest);
        }
    }

    /// Drops bare names that `*` already copies.
    fn normalize(&mut self) {
        if self.all {
            self.fields.retain(|_, c| !matches!(c, Child::Whole));
            let fields = &self.fields;
            self.order.retain(|k| fields.contains_key(k));
        }
        for child in self.fields.values_mut() {
            if let Child::Nested(sel) = child {
                sel.normalize();
            }
        }
    }

    /// Projects one object. With `*`, output keys follow the item's key order (Directus:
    /// column order); without it, the order the fields were requested in.
    fn apply(&self, obj: &Map<String, Value>) -> Map<String, Value> {
        let mut out = Map::new();
        if !self.all {
            for k in &self.order {
                if let (Some(v), Some(child)) = (obj.get(k), self.fields.get(k)) {
                    self.emit(&mut out, k, v, child);
                }
            }
            return out;
        }
        for (k, v) in obj {
            match self.fields.get(k) {
                Some(child) => self.emit(&mut out, k, v, child),
                None => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        out
    }

    fn emit(&self, out: &mut Map<String, Value>, k: &str, v: &Value, child: &Child) {
        match child {
            Child::Nested(sel) => {
                if let Some(x) = sel.apply_value(v, 0) {
                    out.insert(k.to_owned(), x);
                }
            }
            Child::Whole => {
                out.insert(k.to_owned(), v.clone());
            }
        }
    }

    /// Applies a nested selection to the value under a selected key: an object is projected,
    /// an array has each object (or nested array) element projected and other elements
    /// dropped, null stays null (an empty relation), any other scalar is omitted.
    fn apply_value(&self, v: &Value, nesting: usize) -> Option<Value> {
        match v {
            Value::Object(o) => Some(Value::Object(self.apply(o))),
            Value::Array(items) if nesting < MAX_FIELD_DEPTH => Some(Value::Array(
                items
                    .iter()
                    .filter_map(|e| match e {
                        Value::Object(_) | Value::Array(_) => self.apply_value(e, nesting + 1),
                        _ => None,
                    })
                    .collect(),
            )),
            Value::Null => Some(Value::Null),
            _ => None,
        }
    }

    fn write_canonical(&self, out: &mut String) {
        let mut first = true;
        if self.all {
            out.push('*');
            first = false;
        }
        // Without `*` the output follows the requested order, so the order is part of the
        // identity; with `*` it follows the item and only the set matters.
        let entries: Vec<(&String, &Child)> = if self.all {
            self.fields.iter().collect()
        } else {
            self.order
                .iter()
                .filter_map(|k| self.fields.get_key_value(k))
                .collect()
        };
        for (k, child) in entries {
            if !first {
                out.push(',');
            }
            first = false;
            push_quoted(k, out);
            if let Child::Nested(sel) = child {
                out.push('{');
                sel.write_canonical(out);
                out.push('}');
            }
        }
    }

    fn collect_fields(&self, prefix: &str, out: &mut Vec<String>) {
        if self.all {
            out.push(format!("{prefix}*"));
        }
        for (k, child) in &self.fields {
            let full = format!("{prefix}{k}");
            if let Child::Nested(sel) = child {
                sel.collect_fields(&format!("{full}."), out);
            }
            out.push(full);
        }
    }
}

/// One step of a `json()` path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A `json(field, path)` extraction.
#[derive(Debug, Clone, PartialEq)]
struct JsonFn {
    field: String,
    steps: Vec<Step>,
}

impl JsonFn {
    fn extract<'v>(&self, item: &'v Map<String, Value>) -> Option<&'v Value> {
        let mut v = item.get(&self.field)?;
        for step in &self.steps {
            v = match (step, v) {
                (Step::Key(k), Value::Object(o)) => o.get(k)?,
                (Step::Index(i), Value::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        Some(v)
    }

    fn write_canonical(&self, out: &mut String) {
        out.push_str("json(");
        push_quoted(&self.field, out);
        for step in &self.steps {
            match step {
                Step::Key(k) => {
                    out.push('.');
                    push_quoted(k, out);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out.push(')');
    }
}

fn push_quoted(s: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// A compiled field projection. Cheap to apply, immutable, shareable across threads.
#[derive(Debug, Clone)]
pub struct Projection {
    sel: Sel,
    /// `json()` extractions by output key.
    json: BTreeMap<String, JsonFn>,
    canonical: String,
}

impl Default for Projection {
    /// Every field: the projection of an empty field list.
    fn default() -> Self {
        let mut sel = Sel {
            all: true,
            ..Sel::default()
        };
        sel.normalize();
        let mut canonical = String::new();
        sel.write_canonical(&mut canonical);
        Projection {
            sel,
            json: BTreeMap::new(),
            canonical,
        }
    }
}

impl Projection {
    /// Compiles a field list that the caller has already split on commas. An empty list means
    /// all fields, like `["*"]`. Entries are trimmed; errors name the offending entry.
    pub fn compile(fields: &[String]) -> Result<Projection, ProjectionError> {
        if fields.len() > MAX_FIELDS {
            return Err(err(
                "",
                format!(
                    "The field list has {} entries, more than the limit of {MAX_FIELDS}.",
                    fields.len()
                ),
            ));
        }
        let mut sel = Sel::default();
        let mut json: BTreeMap<String, JsonFn> = BTreeMap::new();
        if fields.is_empty() {
            sel.all = true;
        }
        for (i, raw) in fields.iter().enumerate() {
            let entry = raw.trim();
            if entry.is_empty() {
                return Err(err(
                    &i.to_string(),
                    format!("Field {} of the field list is empty.", i + 1),
                ));
            }
            if let Some(inner) = entry.strip_prefix("json(") {
                let (key, f) = parse_json_fn(entry, inner)?;
                if let Some(existing) = json.get(&key) {
                    if *existing != f {
                        return Err(err(
                            entry,
                            format!("Field \"{entry}\" produces the key \"{key}\", which another json() field already produces."),
                        ));
                    }
                }
                json.insert(key, f);
                continue;
            }
            if let Some(open) = entry.find('(') {
                let name = entry.get(..open).unwrap_or_default().trim();
                return Err(err(
                    entry,
                    format!("Field \"{entry}\" uses the function \"{name}\", which is not supported; only json(field, path) is."),
                ));
            }
            let segs: Vec<&str> = entry.split('.').map(str::trim).collect();
            validate_segments(entry, &segs)?;
            sel.insert(&segs);
        }
        sel.normalize();
        let mut canonical = String::new();
        sel.write_canonical(&mut canonical);
        for (key, f) in &json {
            canonical.push_str(if canonical.is_empty() { "" } else { "," });
            push_quoted(key, &mut canonical);
            canonical.push('=');
            f.write_canonical(&mut canonical);
        }
        Ok(Projection {
            sel,
            json,
            canonical,
        })
    }

    /// Projects one item. A non-object item is returned unchanged.
    pub fn apply(&self, item: &Value) -> Value {
        let Value::Object(obj) = item else {
            return item.clone();
        };
        if self.is_all() {
            return item.clone();
        }
        let mut out = self.sel.apply(obj);
        for (key, f) in &self.json {
            if let Some(v) = f.extract(obj) {
                out.insert(key.clone(), v.clone());
            }
        }
        Value::Object(out)
    }

    /// True when the projection keeps every field (empty list or `*`, possibly with
    /// redundant bare names such as `["*","id"]`), so callers can skip copying.
    pub fn is_all(&self) -> bool {
        self.sel.all && self.sel.fields.is_empty() && self.json.is_empty()
    }

    /// Canonical identity: equal strings ⇔ equal projections, independent of entry order and
    /// of redundant entries.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// Every field the projection reads, for permission checks: top-level names and dotted
    /// paths (`author`, `author.name`), `*` / `author.*` for wildcards, and the source field of
    /// each `json()` entry. Sorted and deduplicated.
    pub fn fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.sel.collect_fields("", &mut out);
        out.extend(self.json.values().map(|f| f.field.clone()));
        out.sort();
        out.dedup();
        out
    }
}

fn validate_segments(entry: &str, segs: &[&str]) -> Result<(), ProjectionError> {
    if segs.len() > MAX_FIELD_DEPTH {
        return Err(err(
            entry,
            format!("Field \"{entry}\" is nested deeper than {MAX_FIELD_DEPTH} levels."),
        ));
    }
    for seg in segs {
        if seg.is_empty() {
            return Err(err(
                entry,
                format!("Field \"{entry}\" has an empty name between dots."),
            ));
        }
        if *seg != "*" && seg.contains(['*', '(', ')', ',']) {
            return Err(err(
                entry,
                format!("Field \"{entry}\" contains the invalid name \"{seg}\"."),
            ));
        }
    }
    Ok(())
}

/// Parses `json(field, path)`; `inner` is the text after `json(`. Returns the output key
/// (Directus: the arguments with runs of `.`, `[`, `]`, `,` and whitespace replaced by `_`,
/// then `_json`) and the extraction.
fn parse_json_fn(entry: &str, inner: &str) -> Result<(String, JsonFn), ProjectionError> {
    let Some(args) = inner.strip_suffix(')') else {
        return Err(err(
            entry,
            format!("Field \"{entry}\" opens json( but does not end with \")\"."),
        ));
    };
    if args.contains(['(', ')']) {
        return Err(err(
            entry,
            format!("Field \"{entry}\" has unbalanced parentheses."),
        ));
    }
    let Some((field, path)) = args.split_once(',') else {
        return Err(err(
            entry,
            format!("Field \"{entry}\" must be written json(field, path)."),
        ));
    };
    let (field, path) = (field.trim(), path.trim());
    if field.is_empty() || field.contains(['.', '[', ']', '*']) {
        return Err(err(
            entry,
            format!(
                "Field \"{entry}\" must name a top-level field as the first argument of json()."
            ),
        ));
    }
    let steps = parse_json_path(entry, path)?;
    let mut key = String::new();
    let mut in_sep = false;
    for c in args.trim().chars() {
        if matches!(c, '.' | '[' | ']' | ',') || c.is_whitespace() {
            if !in_sep {
                key.push('_');
            }
            in_sep = true;
        } else {
            key.push(c);
            in_sep = false;
        }
    }
    if !key.ends_with('_') {
        key.push('_');
    }
    key.push_str("json");
    Ok((
        key,
        JsonFn {
            field: field.to_owned(),
            steps,
        },
    ))
}

/// Parses `a.b`, `tags[0]`, `a[1].b`, `[0]`.
fn parse_json_path(entry: &str, path: &str) -> Result<Vec<Step>, ProjectionError> {
    let bad = |what: &str| {
        err(
            entry,
            format!("Field \"{entry}\" has an invalid json() path: {what}."),
        )
    };
    if path.is_empty() {
        return Err(bad("it is empty"));
    }
    let mut steps = Vec::new();
    for (i, part) in path.split('.').enumerate() {
        let part = part.trim();
        let (name, mut rest) = match part.find('[') {
            Some(open) => (
                part.get(..open).unwrap_or_default(),
                part.get(open..).unwrap_or_default(),
            ),
            None => (part, ""),
        };
        if name.contains([']', '*']) || name.contains(char::is_whitespace) {
            return Err(bad(&format!("\"{name}\" is not a valid key")));
        }
        if name.is_empty() && (rest.is_empty() || i > 0) {
            return Err(bad("a key is empty"));
        }
        if !name.is_empty() {
            steps.push(Step::Key(name.to_owned()));
        }
        while !rest.is_empty() {
            let Some(close) = rest.find(']') else {
                return Err(bad("a \"[\" is not closed"));
            };
            let index = rest.get(1..close).unwrap_or_default().trim();
            let Ok(n) = index.parse::<usize>() else {
                return Err(bad(&format!("\"[{index}]\" is not an array index")));
            };
            steps.push(Step::Index(n));
            rest = rest.get(close + 1..).unwrap_or_default();
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(bad("unexpected text after \"]\""));
            }
        }
    }
    if steps.len() > MAX_FIELD_DEPTH {
        return Err(bad(&format!("it has more than {MAX_FIELD_DEPTH} steps")));
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(fields: &[&str]) -> Projection {
        let owned: Vec<String> = fields.iter().map(|s| (*s).to_owned()).collect();
        match Projection::compile(&owned) {
            Ok(p) => p,
            Err(e) => panic!("{fields:?}: {e}"),
        }
    }

    fn perr(fields: &[&str]) -> ProjectionError {
        let owned: Vec<String> = fields.iter().map(|s| (*s).to_owned()).collect();
        match Projection::compile(&owned) {
            Ok(p) => panic!("{fields:?} compiled to {p:?}"),
            Err(e) => e,
        }
    }

    fn item() -> Value {
        json!({
            "id": 7,
            "text": "hello",
            "meta": {"priority": 1, "tags": ["a", "b"], "a": {"b": true}},
            "author": {"id": 3, "name": "Ann", "email": "ann@example.com"},
            "comments": [
                {"id": 1, "body": "x", "user": {"name": "Bo"}},
                {"id": 2, "body": "y", "user": 9},
                5
            ],
            "editor": 12,
            "reviewer": null
        })
    }

    #[test]
    fn default_is_every_field() {
        let p = Projection::default();
        let q = Projection::compile(&[]).unwrap();
        assert!(p.is_all());
        assert_eq!(p.canonical(), q.canonical());
    }

    #[test]
    fn selects_top_level_fields() {
        assert_eq!(
            p(&["id", "text"]).apply(&item()),
            json!({"id": 7, "text": "hello"})
        );
        assert_eq!(
            p(&[" id ", "meta"]).apply(&item()),
            json!({"id": 7, "meta": item()["meta"]})
        );
    }

    #[test]
    fn star_and_empty_keep_everything() {
        for fields in [&[][..], &["*"][..], &["*", "id"][..], &["id", "*", "*"][..]] {
            let proj = p(fields);
            assert!(proj.is_all(), "{fields:?}");
            assert_eq!(proj.canonical(), "*");
            assert_eq!(proj.apply(&item()), item());
        }
        assert!(!p(&["id"]).is_all());
        assert!(!p(&["*", "author.name"]).is_all());
    }

    #[test]
    fn dotted_paths_descend_into_objects() {
        assert_eq!(
            p(&["id", "meta.priority"]).apply(&item()),
            json!({"id": 7, "meta": {"priority": 1}})
        );
        assert_eq!(
            p(&["author.name"]).apply(&item()),
            json!({"author": {"name": "Ann"}})
        );
        assert_eq!(
            p(&["meta.a.b", "meta.priority"]).apply(&item()),
            json!({"meta": {"a": {"b": true}, "priority": 1}})
        );
    }

    #[test]
    fn explicit_nested_selection_wins_over_star_and_bare_name() {
        let mut expected = item();
        expected["author"] = json!({"name": "Ann"});
        assert_eq!(p(&["*", "author.name"]).apply(&item()), expected);
        assert_eq!(
            p(&["author", "author.name"]).apply(&item()),
            json!({"author": {"name": "Ann"}})
        );
        assert_eq!(
            p(&["author.name", "author"]).canonical(),
            p(&["author", "author.name"]).canonical()
        );
    }

    #[test]
    fn nested_star_gives_whole_object() {
        assert_eq!(p(&["*", "author.*"]).apply(&item()), item());
        assert_eq!(
            p(&["author.*"]).apply(&item()),
            json!({"author": item()["author"]})
        );
        assert_eq!(
            p(&["author.*", "author.name"]).apply(&item()),
            json!({"author": item()["author"]})
        );
        // `*.*` means `*`.
        assert!(p(&["*.*"]).is_all());
    }

    #[test]
    fn arrays_of_objects_are_projected_per_element() {
        assert_eq!(
            p(&["comments.id"]).apply(&item()),
            json!({"comments": [{"id": 1}, {"id": 2}]})
        );
        assert_eq!(
            p(&["comments.user.name"]).apply(&item()),
            json!({"comments": [{"user": {"name": "Bo"}}, {}]})
        );
    }

    #[test]
    fn scalars_under_a_dotted_path_are_omitted_and_null_stays() {
        assert_eq!(p(&["id", "editor.name"]).apply(&item()), json!({"id": 7}));
        assert_eq!(
            p(&["reviewer.name"]).apply(&item()),
            json!({"reviewer": null})
        );
    }

    #[test]
    fn missing_fields_are_absent() {
        assert_eq!(
            p(&["id", "nope", "author.nope", "nope.x"]).apply(&item()),
            json!({"id": 7, "author": {}})
        );
    }

    #[test]
    fn json_function_extracts_values() {
        assert_eq!(
            p(&["id", "json(meta, priority)"]).apply(&item()),
            json!({"id": 7, "meta_priority_json": 1})
        );
        assert_eq!(
            p(&["json(meta, a.b)", "json(meta,tags[1])", "json(meta, nope)"]).apply(&item()),
            json!({"meta_a_b_json": true, "meta_tags_1_json": "b"})
        );
        assert_eq!(
            p(&["json(comments, [0].user.name)"]).apply(&item()),
            json!({"comments_0_user_name_json": "Bo"})
        );
        assert_eq!(
            p(&["json(nope, a)", "json(text, a)"]).apply(&item()),
            json!({})
        );
        assert_eq!(
            p(&["*", "json(meta, priority)"]).apply(&item())["meta_priority_json"],
            json!(1)
        );
        assert!(!p(&["*", "json(meta, priority)"]).is_all());
    }

    #[test]
    fn non_object_items_pass_through() {
        assert_eq!(p(&["id"]).apply(&json!([1, 2])), json!([1, 2]));
        assert_eq!(p(&["id"]).apply(&json!("x")), json!("x"));
    }

    #[test]
    fn canonical_follows_output_order_and_distinguishes() {
        assert_eq!(
            p(&["id", "author.name", "json(meta, a)"]).canonical(),
            p(&["json(meta,a)", "id", "author.name", "id"]).canonical()
        );
        // Explicit fields come out in request order: a different order is a different shape.
        assert_ne!(
            p(&["id", "text"]).canonical(),
            p(&["text", "id"]).canonical()
        );
        assert_eq!(
            p(&["*", "a.x", "b.y"]).canonical(),
            p(&["*", "b.y", "a.x"]).canonical()
        );
        assert_ne!(p(&["id"]).canonical(), p(&["id", "text"]).canonical());
        assert_ne!(p(&["author"]).canonical(), p(&["author.name"]).canonical());
        assert_ne!(p(&["author.*"]).canonical(), p(&["author"]).canonical());
        assert_ne!(
            p(&["json(meta, a)"]).canonical(),
            p(&["json(meta, b)"]).canonical()
        );
    }

    #[test]
    fn fields_lists_top_level_and_dotted_paths() {
        assert_eq!(
            p(&["id", "author.name", "comments.*", "json(meta, a.b)"]).fields(),
            vec![
                "author",
                "author.name",
                "comments",
                "comments.*",
                "id",
                "meta"
            ]
        );
        assert_eq!(p(&[]).fields(), vec!["*"]);
    }

    #[test]
    fn errors_name_the_entry() {
        let cases: &[(&[&str], &str)] = &[
            (&["id", " "], "1"),
            (&["author..name"], "author..name"),
            (&["author."], "author."),
            (&["json(meta, priority"], "json(meta, priority"),
            (&["json(meta)"], "json(meta)"),
            (&["json(, a)"], "json(, a)"),
            (&["json(meta, )"], "json(meta, )"),
            (&["json(meta, a[)"], "json(meta, a[)"),
            (&["json(meta, a[x])"], "json(meta, a[x])"),
            (&["json(meta, a((b))"], "json(meta, a((b))"),
            (&["count(id)"], "count(id)"),
            (&["au*thor"], "au*thor"),
            (&["id)"], "id)"),
        ];
        for (fields, path) in cases {
            let e = perr(fields);
            assert_eq!(e.path, *path, "{fields:?}: {e}");
            if !path.chars().all(|c| c.is_ascii_digit()) {
                assert!(e.message.contains(path), "{fields:?}: {}", e.message);
            }
        }
        assert!(perr(&["id", ""]).message.contains("Field 2"));
    }

    #[test]
    fn limits_are_enforced() {
        let many: Vec<String> = (0..=MAX_FIELDS).map(|i| format!("f{i}")).collect();
        assert!(Projection::compile(&many).is_err());
        let deep = vec!["a"; MAX_FIELD_DEPTH + 1].join(".");
        assert_eq!(perr(&[deep.as_str()]).path, deep);
        let ok = vec!["a"; MAX_FIELD_DEPTH].join(".");
        p(&[ok.as_str()]);
    }

    #[test]
    fn projection_is_send_sync_clone_debug() {
        fn check<T: Send + Sync + Clone + std::fmt::Debug>() {}
        check::<Projection>();
    }
}
