//! The list shape of a subscription's messages: `sort`, `offset`, `limit` applied to the
//! items of each event, as Directus applies the subscription query.

use std::cmp::Ordering;

use serde_json::Value;

/// How the items of one message are ordered and cut (`sort`, `offset`, `limit`), as Directus
/// applies the subscription query to every event's items.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ListShape {
    /// Sort keys: dotted field and descending flag.
    pub sort: Vec<(String, bool)>,
    /// Items to skip.
    pub offset: usize,
    /// Most items to keep; `None` = all (Tidings has no default limit on event messages).
    pub limit: Option<usize>,
    /// The query asked for every item (`limit: -1`), not just left `limit` out: a retained
    /// `init` then has no default limit (see `state::DEFAULT_INIT_LIMIT`).
    pub unbounded: bool,
}

impl ListShape {
    /// True when the shape leaves lists untouched.
    pub fn is_identity(&self) -> bool {
        self.sort.is_empty() && self.offset == 0 && self.limit.is_none()
    }

    /// Applies sort, offset and limit to matched items.
    pub fn apply<'a>(&self, mut items: Vec<&'a Value>) -> Vec<&'a Value> {
        if !self.sort.is_empty() {
            items.sort_by(|a, b| {
                for (field, desc) in &self.sort {
                    let ord = compare_for_sort(lookup(a, field), lookup(b, field));
                    let ord = if *desc { ord.reverse() } else { ord };
                    if ord != Ordering::Equal {
                        return ord;
                    }
                }
                Ordering::Equal
            });
        }
        items
            .into_iter()
            .skip(self.offset)
            .take(self.limit.unwrap_or(usize::MAX))
            .collect()
    }
}

fn lookup<'a>(item: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(item, |v, part| v.get(part))
}

/// Nulls and missing values first (as PostgreSQL sorts ascending with NULLS FIRST in
/// Directus' default), then numbers, then strings, then anything else by its JSON text.
fn compare_for_sort(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    fn rank(v: Option<&Value>) -> u8 {
        match v {
            None | Some(Value::Null) => 0,
            Some(Value::Bool(_)) => 1,
            Some(Value::Number(_)) => 2,
            Some(Value::String(_)) => 3,
            Some(_) => 4,
        }
    }
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)).then_with(|| {
            a.map(Value::to_string)
                .unwrap_or_default()
                .cmp(&b.map(Value::to_string).unwrap_or_default())
        }),
    }
}
