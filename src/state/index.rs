//! Secondary equality indexes of one retained collection (`--state-index COLLECTION.FIELD`):
//! for each declared field, the keys of the items by the index key of their value there
//! (`filter::index_key`, which normalizes as `_eq` compares). Maintained by the fold, under
//! the store's lock, with every put and remove; used by `init` and reads when the spec's
//! filter has a top-level `_eq` (or `_in`) on an indexed field, so they parse only the
//! candidate items instead of all of them.
//!
//! Soundness: the candidates are a superset of the matching items (the contract of
//! [`Filter::equality_terms`]), and every candidate is still evaluated against the whole
//! filter, so an index changes how fast a list is cut, never what it holds.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::filter::{index_key, index_keys_at, Filter};

/// One field's index: index key of a value → keys of the items holding it.
type ByValue = HashMap<String, HashSet<Box<str>>>;

/// The indexes of one collection.
#[derive(Debug, Default)]
pub(super) struct Index {
    /// Per indexed (dotted) field: index key of a value → keys of the items holding it.
    fields: Vec<(String, ByValue)>,
}

impl Index {
    /// Indexes over `fields` (none: an index that costs nothing).
    pub(super) fn new(fields: &[String]) -> Self {
        Index {
            fields: fields.iter().map(|f| (f.clone(), HashMap::new())).collect(),
        }
    }

    /// Whether any field is indexed.
    pub(super) fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Forgets every item (a truncate emptied the store).
    pub(super) fn clear(&mut self) {
        for (_, by_value) in &mut self.fields {
            by_value.clear();
        }
    }

    /// Records `item`, stored under `key`.
    pub(super) fn insert(&mut self, key: &str, item: &Value) {
        for (field, by_value) in &mut self.fields {
            for value in index_keys_at(item, field) {
                by_value.entry(value).or_default().insert(Box::from(key));
            }
        }
    }

    /// Forgets `item`, which was stored under `key`.
    pub(super) fn remove(&mut self, key: &str, item: &Value) {
        for (field, by_value) in &mut self.fields {
            for value in index_keys_at(item, field) {
                if let Some(keys) = by_value.get_mut(&value) {
                    keys.remove(key);
                    if keys.is_empty() {
                        by_value.remove(&value);
                    }
                }
            }
        }
    }

    /// The keys of the items that can match `filter`, from the indexed top-level equality
    /// term that leaves the fewest; `None` when no such term is on an indexed field.
    pub(super) fn candidates(&self, filter: &Filter) -> Option<Vec<&str>> {
        let mut best: Option<Vec<&str>> = None;
        for (field, values) in filter.equality_terms() {
            let Some((_, by_value)) = self.fields.iter().find(|(f, _)| *f == field) else {
                continue;
            };
            let mut keys: Vec<&str> = Vec::new();
            let mut seen: HashSet<&str> = HashSet::new();
            for value in &values {
                let Some(held) = index_key(value).and_then(|k| by_value.get(&k)) else {
                    continue;
                };
                for key in held {
                    // An array field may hold several of the values: list its item once.
                    if values.len() == 1 || seen.insert(key) {
                        keys.push(key);
                    }
                }
            }
            if best.as_ref().is_none_or(|b| keys.len() < b.len()) {
                best = Some(keys);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{CompileContext, FilterLimits};
    use serde_json::json;

    fn filter(v: Value) -> Filter {
        Filter::compile(&v, &FilterLimits::DEFAULT, &CompileContext::default()).unwrap()
    }

    #[test]
    fn candidates_follow_puts_and_removes() {
        let mut index = Index::new(&["status".to_string(), "tags".to_string()]);
        index.insert("1", &json!({"id":1,"status":"open","tags":["a","b"]}));
        index.insert("2", &json!({"id":2,"status":"done","tags":["b"]}));
        index.insert("3", &json!({"id":3,"status":5}));
        let keys = |f: Value| {
            let mut k: Vec<String> = index
                .candidates(&filter(f))
                .map(|c| c.into_iter().map(String::from).collect())
                .unwrap_or_else(|| vec!["scan".into()]);
            k.sort();
            k
        };
        assert_eq!(keys(json!({"status":{"_eq":"open"}})), ["1"]);
        // `_eq` normalizes: 5 and "5" are one index key.
        assert_eq!(keys(json!({"status":{"_eq":"5"}})), ["3"]);
        assert_eq!(keys(json!({"tags":{"_in":["a","b"]}})), ["1", "2"]);
        // The smallest term wins; a term on an unindexed field, or an `_or`, scans.
        assert_eq!(
            keys(json!({"_and":[{"tags":{"_eq":"b"}},{"status":{"_eq":"done"}}]})),
            ["2"]
        );
        assert_eq!(keys(json!({"id":{"_eq":1}})), ["scan"]);
        assert_eq!(
            keys(json!({"_or":[{"status":{"_eq":"open"}},{"id":{"_eq":2}}]})),
            ["scan"]
        );
        // `_null` is not an equality term: it scans.
        assert_eq!(keys(json!({"tags":{"_null":true}})), ["scan"]);
        index.remove("1", &json!({"id":1,"status":"open","tags":["a","b"]}));
        assert_eq!(
            index
                .candidates(&filter(json!({"status":{"_eq":"open"}})))
                .map(|c| c.len()),
            Some(0)
        );
    }
}
