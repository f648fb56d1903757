//! Compilation of Directus filter JSON and JSONPath expressions into a [`Node`] tree.

use regex::RegexBuilder;
use serde_json::{Map, Value};

use super::value::{lower, Lit, NowOffset};
use super::{
    CompileContext, FieldPath, FilterError, FilterLimits, JsonPathQuery, Node, Op, Operand,
    TextKind, MAX_JSONPATH_BYTES,
};

/// Every operator that applies to a field value.
const FIELD_OPS: &[&str] = &[
    "_eq",
    "_neq",
    "_lt",
    "_lte",
    "_gt",
    "_gte",
    "_in",
    "_nin",
    "_null",
    "_nnull",
    "_contains",
    "_ncontains",
    "_icontains",
    "_nicontains",
    "_starts_with",
    "_nstarts_with",
    "_istarts_with",
    "_nistarts_with",
    "_ends_with",
    "_nends_with",
    "_iends_with",
    "_niends_with",
    "_between",
    "_nbetween",
    "_empty",
    "_nempty",
    "_regex",
];

/// Operators that accept a `$NOW` operand.
const NOW_OPS: &str = "_eq, _neq, _lt, _lte, _gt, _gte, _between and _nbetween";

fn err(path: &str, message: String) -> FilterError {
    FilterError::new(path, message)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Compiles a Directus filter object.
pub(crate) fn compile(
    json: &Value,
    limits: &FilterLimits,
    ctx: &CompileContext,
) -> Result<Node, FilterError> {
    let Value::Object(obj) = json else {
        return Err(err("", "The filter must be a JSON object.".to_owned()));
    };
    let mut c = Compiler {
        limits,
        ctx,
        nodes: 0,
    };
    c.object(obj, &[], "", 1)
}

/// A placeholder-resolved operand value.
enum Resolved {
    Value(Value),
    Now(NowOffset),
}

struct Compiler<'a> {
    limits: &'a FilterLimits,
    ctx: &'a CompileContext,
    nodes: usize,
}

impl Compiler<'_> {
    fn count(&mut self, path: &str) -> Result<(), FilterError> {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(err(
                path,
                format!(
                    "Filter has more than {} conditions at \"{path}\".",
                    self.limits.max_nodes
                ),
            ));
        }
        Ok(())
    }

    /// Compiles one filter object whose fields are relative to `prefix`.
    fn object(
        &mut self,
        obj: &Map<String, Value>,
        prefix: &[String],
        path: &str,
        depth: usize,
    ) -> Result<Node, FilterError> {
        if depth > self.limits.max_depth {
            return Err(err(
                path,
                format!(
                    "Filter is nested deeper than {} levels at \"{path}\".",
                    self.limits.max_depth
                ),
            ));
        }
        let mut parts = Vec::with_capacity(obj.len());
        for (key, val) in obj {
            let kpath = join(path, key);
            parts.push(self.entry(key, val, prefix, &kpath, depth)?);
        }
        Ok(Node::and(parts))
    }

    fn entry(
        &mut self,
        key: &str,
        val: &Value,
        prefix: &[String],
        kpath: &str,
        depth: usize,
    ) -> Result<Node, FilterError> {
        if !key.starts_with('_') {
            let mut segs = prefix.to_vec();
            for seg in key.split('.') {
                if seg.is_empty() {
                    return Err(err(
                        kpath,
                        format!("Field name \"{key}\" at \"{kpath}\" has an empty segment."),
                    ));
                }
                segs.push(seg.to_owned());
            }
            return match val {
                Value::Object(o) => self.object(o, &segs, kpath, depth + 1),
                // Shorthand `{field: value}` means `_eq`.
                other => {
                    self.count(kpath)?;
                    Ok(Node::Cond {
                        path: FieldPath::new(&segs),
                        op: Box::new(Op::Eq(self.operand(other, kpath)?)),
                    })
                }
            };
        }
        match key {
            "_and" | "_or" => {
                self.count(kpath)?;
                let Value::Array(items) = val else {
                    return Err(err(
                        kpath,
                        format!("\"{key}\" at \"{kpath}\" expects an array of filter objects."),
                    ));
                };
                let mut children = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let ipath = format!("{kpath}.{i}");
                    let Value::Object(o) = item else {
                        return Err(err(
                            &ipath,
                            format!("\"{key}\" expects filter objects, but \"{ipath}\" is not an object."),
                        ));
                    };
                    children.push(self.object(o, prefix, &ipath, depth + 1)?);
                }
                Ok(if key == "_and" {
                    Node::and(children)
                } else {
                    Node::or(children)
                })
            }
            "_some" | "_none" => {
                if prefix.is_empty() {
                    return Err(err(
                        kpath,
                        format!("\"{key}\" at \"{kpath}\" must be used under a field, as in {{\"tags\": {{\"{key}\": {{...}}}}}}."),
                    ));
                }
                self.count(kpath)?;
                let Value::Object(o) = val else {
                    return Err(err(
                        kpath,
                        format!("\"{key}\" at \"{kpath}\" expects a filter object."),
                    ));
                };
                let inner = self.object(o, &[], kpath, depth + 1)?;
                Ok(Node::Quant {
                    path: FieldPath::new(prefix),
                    none: key == "_none",
                    inner: Box::new(inner),
                })
            }
            _ if FIELD_OPS.contains(&key) => {
                if prefix.is_empty() {
                    return Err(err(
                        kpath,
                        format!("Operator \"{key}\" at \"{kpath}\" must be applied to a field."),
                    ));
                }
                self.count(kpath)?;
                Ok(Node::Cond {
                    path: FieldPath::new(prefix),
                    op: Box::new(self.op(key, val, kpath)?),
                })
            }
            _ => Err(err(
                kpath,
                format!("Unknown filter operator \"{key}\" at \"{kpath}\"."),
            )),
        }
    }

    /// Resolves `$CURRENT_USER` and recognizes `$NOW` in a string operand.
    fn resolve(&self, v: &Value, path: &str) -> Result<Resolved, FilterError> {
        let Value::String(s) = v else {
            return Ok(Resolved::Value(v.clone()));
        };
        if s == "$CURRENT_USER" {
            return match &self.ctx.current_user {
                Some(user) => Ok(Resolved::Value(Value::String(user.clone()))),
                None => Err(err(
                    path,
                    format!("\"$CURRENT_USER\" at \"{path}\" needs an authenticated subscriber."),
                )),
            };
        }
        if let Some(name) = s.strip_prefix("$CLAIMS.") {
            return self.claim(name, path).map(Resolved::Value);
        }
        if s.starts_with("$CURRENT_") {
            return Err(err(
                path,
                format!("Placeholder \"{s}\" at \"{path}\" is not supported; only \"$CURRENT_USER\" is."),
            ));
        }
        match NowOffset::parse(s) {
            None => Ok(Resolved::Value(v.clone())),
            Some(Ok(n)) => Ok(Resolved::Now(n)),
            Some(Err(())) => Err(err(
                path,
                format!(
                    "Invalid \"$NOW\" expression \"{s}\" at \"{path}\"; write $NOW or $NOW(<+|-><number> <unit>) with a unit of second, minute, hour, day, week, month or year."
                ),
            )),
        }
    }

    /// The value of `$CLAIMS.<name>` (a dotted path into the claims). Claim values are used
    /// as they are, never read as placeholders themselves.
    fn claim(&self, name: &str, path: &str) -> Result<Value, FilterError> {
        let Some(claims) = &self.ctx.claims else {
            return Err(err(
                path,
                format!(
                    "\"$CLAIMS.{name}\" at \"{path}\" needs a subscriber authenticated with a JWT."
                ),
            ));
        };
        let mut parts = name.split('.');
        let first = parts.next().unwrap_or_default();
        let found = parts.try_fold(claims.get(first), |v, part| {
            Ok::<_, ()>(v.and_then(|v| v.get(part)))
        });
        match found {
            Ok(Some(v)) => Ok(v.clone()),
            _ => Err(err(
                path,
                format!("Claim \"{name}\" at \"{path}\" is not in the subscriber's token."),
            )),
        }
    }

    /// Any operand, `$NOW` included.
    fn operand(&self, v: &Value, path: &str) -> Result<Operand, FilterError> {
        Ok(match self.resolve(v, path)? {
            Resolved::Value(v) => Operand::Lit(Lit::new(v)),
            Resolved::Now(n) => Operand::Now(n),
        })
    }

    /// An operand of an ordering operator: a number, a string (date) or `$NOW`.
    fn ordered(&self, v: &Value, path: &str, op: &str) -> Result<Operand, FilterError> {
        if !matches!(v, Value::Number(_) | Value::String(_)) {
            return Err(err(
                path,
                format!("\"{op}\" at \"{path}\" expects a number, a string or a date."),
            ));
        }
        self.operand(v, path)
    }

    /// A literal operand: `$NOW` is rejected.
    fn literal(&self, v: &Value, path: &str) -> Result<Lit, FilterError> {
        match self.resolve(v, path)? {
            Resolved::Value(v) => Ok(Lit::new(v)),
            Resolved::Now(_) => Err(err(
                path,
                format!("\"$NOW\" at \"{path}\" can only be used with {NOW_OPS}."),
            )),
        }
    }

    fn op(&self, key: &str, val: &Value, path: &str) -> Result<Op, FilterError> {
        Ok(match key {
            "_eq" => Op::Eq(self.operand(val, path)?),
            "_neq" => Op::Neq(self.operand(val, path)?),
            "_lt" => Op::Lt(self.ordered(val, path, key)?),
            "_lte" => Op::Lte(self.ordered(val, path, key)?),
            "_gt" => Op::Gt(self.ordered(val, path, key)?),
            "_gte" => Op::Gte(self.ordered(val, path, key)?),
            "_in" | "_nin" => {
                // A whole list may come from a claim: `{"_in": "$CLAIMS.tenants"}`.
                let from_claim = match val {
                    Value::String(s) if s.starts_with("$CLAIMS.") => {
                        Some(self.claim(&s["$CLAIMS.".len()..], path)?)
                    }
                    _ => None,
                };
                let val = from_claim.as_ref().unwrap_or(val);
                let Value::Array(items) = val else {
                    return Err(err(
                        path,
                        format!("\"{key}\" at \"{path}\" expects an array."),
                    ));
                };
                if items.len() > self.limits.max_list {
                    return Err(err(
                        path,
                        format!(
                            "\"{key}\" at \"{path}\" has {} values, more than the limit of {}.",
                            items.len(),
                            self.limits.max_list
                        ),
                    ));
                }
                let list = match from_claim {
                    Some(_) => items.iter().map(|v| Lit::new(v.clone())).collect(),
                    None => items
                        .iter()
                        .enumerate()
                        .map(|(i, v)| self.literal(v, &format!("{path}.{i}")))
                        .collect::<Result<Vec<_>, _>>()?,
                };
                if key == "_in" {
                    Op::In(list)
                } else {
                    Op::Nin(list)
                }
            }
            "_null" | "_nnull" | "_empty" | "_nempty" => {
                let Value::Bool(b) = val else {
                    return Err(err(
                        path,
                        format!("\"{key}\" at \"{path}\" expects true or false."),
                    ));
                };
                match key {
                    "_null" => Op::Null(*b),
                    "_nnull" => Op::Null(!*b),
                    "_empty" => Op::Empty(*b),
                    _ => Op::Empty(!*b),
                }
            }
            "_contains" | "_ncontains" => {
                if val.is_null() {
                    return Err(err(
                        path,
                        format!("\"{key}\" at \"{path}\" expects a value, not null."),
                    ));
                }
                let lit = self.literal(val, path)?;
                let text = match &lit.value {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                };
                Op::Contains {
                    lit,
                    text,
                    neg: key == "_ncontains",
                }
            }
            "_between" | "_nbetween" => {
                let [lo, hi] = val.as_array().map(Vec::as_slice).unwrap_or_default() else {
                    return Err(err(
                        path,
                        format!("\"{key}\" at \"{path}\" expects an array of two values."),
                    ));
                };
                Op::Between {
                    lo: self.ordered(lo, &format!("{path}.0"), key)?,
                    hi: self.ordered(hi, &format!("{path}.1"), key)?,
                    neg: key == "_nbetween",
                }
            }
            "_regex" => {
                let Value::String(pattern) = val else {
                    return Err(err(
                        path,
                        format!("\"_regex\" at \"{path}\" expects a string."),
                    ));
                };
                let max = self.limits.max_regex_bytes;
                if pattern.len() > max {
                    return Err(err(
                        path,
                        format!("\"_regex\" at \"{path}\" is longer than {max} bytes."),
                    ));
                }
                let re = RegexBuilder::new(pattern)
                    .size_limit(max)
                    .dfa_size_limit(max)
                    .build()
                    .map_err(|e| {
                        let detail = match &e {
                            regex::Error::CompiledTooBig(_) => {
                                format!("it compiles to more than {max} bytes")
                            }
                            regex::Error::Syntax(s) => s
                                .lines()
                                .rev()
                                .find_map(|l| l.trim().strip_prefix("error: "))
                                .unwrap_or("invalid syntax")
                                .to_owned(),
                            _ => "it cannot be compiled".to_owned(),
                        };
                        err(
                            path,
                            format!("\"_regex\" at \"{path}\" is not a valid regular expression: {detail}."),
                        )
                    })?;
                Op::Regex(re)
            }
            _ => {
                let Some((kind, ci, neg)) = text_op(key) else {
                    return Err(err(
                        path,
                        format!("Unknown filter operator \"{key}\" at \"{path}\"."),
                    ));
                };
                let needle = match self.literal(val, path)?.value {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    _ => {
                        return Err(err(
                            path,
                            format!("\"{key}\" at \"{path}\" expects a string."),
                        ))
                    }
                };
                Op::Text {
                    kind,
                    ci,
                    neg,
                    needle: if ci { lower(&needle) } else { needle },
                }
            }
        })
    }
}

/// Decodes `_[n][i](contains|starts_with|ends_with)`, except plain `_contains`/`_ncontains`.
fn text_op(key: &str) -> Option<(TextKind, bool, bool)> {
    let rest = key.strip_prefix('_')?;
    let (neg, rest) = rest.strip_prefix('n').map_or((false, rest), |r| (true, r));
    let (ci, rest) = rest.strip_prefix('i').map_or((false, rest), |r| (true, r));
    let kind = match rest {
        "contains" if ci => TextKind::Contains,
        "starts_with" => TextKind::StartsWith,
        "ends_with" => TextKind::EndsWith,
        _ => return None,
    };
    Some((kind, ci, neg))
}

/// The path reported for JSONPath errors.
const JSONPATH_PATH: &str = "jsonpath";

/// Compiles a JSONPath expression.
pub(crate) fn compile_jsonpath(expr: &str, limits: &FilterLimits) -> Result<Node, FilterError> {
    let p = JSONPATH_PATH;
    let e = expr.trim();
    if e.is_empty() {
        return Err(err(
            p,
            format!("The JSONPath expression at \"{p}\" is empty."),
        ));
    }
    if e.len() > MAX_JSONPATH_BYTES {
        return Err(err(
            p,
            format!(
                "The JSONPath expression at \"{p}\" is longer than {MAX_JSONPATH_BYTES} bytes."
            ),
        ));
    }
    if bracket_depth(e) > limits.max_depth {
        return Err(err(
            p,
            format!(
                "The JSONPath expression at \"{p}\" is nested deeper than {} levels.",
                limits.max_depth
            ),
        ));
    }
    let query = jsonpath_rust::parser::parse_json_path(e).map_err(|error| {
        err(
            p,
            format!(
                "Invalid JSONPath expression at \"{p}\": {}.",
                jsonpath_detail(&error.to_string())
            ),
        )
    })?;
    Ok(Node::JsonPath(Box::new(JsonPathQuery {
        expr: e.to_owned(),
        query,
    })))
}

/// Deepest nesting of `(`/`[` outside string literals.
fn bracket_depth(expr: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' | '[' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' | ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Turns a parser error into a short clause: pest's multi-line report
/// (`--> 1:3 | ... = expected selector`) becomes `expected selector at column 3`.
fn jsonpath_detail(message: &str) -> String {
    let column = message
        .split("-->")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pos| pos.rsplit(':').next())
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()));
    let expected = message
        .rsplit("= ")
        .next()
        .map(str::trim)
        .filter(|e| e.starts_with("expected") || e.starts_with("unexpected"));
    match (expected, column) {
        (Some(e), Some(c)) => one_line(&format!("{e} at column {c}")),
        _ => one_line(message),
    }
}

/// Collapses a (possibly multi-line) library message into one short line.
fn one_line(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let trimmed = collapsed.trim_end_matches('.');
    match trimmed.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", trimmed.get(..cut).unwrap_or(trimmed)),
        None => trimmed.to_owned(),
    }
}
