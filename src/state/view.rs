//! Lists cut from the retained state: the one engine behind a collection subscription's
//! `init`, the socket `items` read and `GET /v1/collections/{collection}/items`. Each matches
//! the retained items against the spec (filter, row rule, search), counts what `query.meta`
//! asks, sorts by `sort` then by key, slices by `offset`/`limit` (Directus' default limit of
//! [`DEFAULT_INIT_LIMIT`] without one), projects, and encodes, under the collection's store
//! lock only for the match (the store is never held while sorting or encoding).

use std::time::Instant;

use serde_json::Value;

use super::{parse, State, StateError, DEFAULT_INIT_LIMIT};
use crate::subscription::{ListShape, MetaCount, Spec};

/// Who asks for a view: it decides the duration metric and the error over the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A collection subscription's `init` (`tidings_state_init_duration_seconds`).
    Init,
    /// An `items` read, over the socket or HTTP (`tidings_state_read_duration_seconds`).
    Read,
}

/// A list cut from the state, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The items, as a JSON array.
    pub data: String,
    /// `{"total_count":N,"filter_count":N}` (the counts asked, in the order asked) when the
    /// spec's query had `meta`.
    pub meta: Option<String>,
}

impl State {
    /// The list `spec` sees (see the module doc); with `keys`, only the items with those keys
    /// (Directus' `readMany`: the default limit is then the number of keys). `meta` counts
    /// the query as a whole, whatever `keys` say, as Directus' `getMetaForQuery` does.
    pub fn view(
        &self,
        spec: &Spec,
        keys: Option<&[String]>,
        purpose: Purpose,
    ) -> Result<View, StateError> {
        let started = Instant::now();
        // The map shard is released before the store is locked (§6 of ARCHITECTURE).
        let store = self.stores.get(&spec.collection).map(|s| s.value().clone());
        let meta = spec.meta.as_deref();
        let mut total = 0usize;
        let mut filtered = 0usize;
        let matched: Vec<Value> = match store {
            None => Vec::new(),
            Some(store) => {
                let store = store.lock();
                match (keys, meta) {
                    // Without counts to make, a keyed read looks up its keys only.
                    (Some(keys), None) => keys
                        .iter()
                        .filter_map(|k| store.items.get(k.as_str()))
                        .map(|held| parse(held.json()))
                        .filter(|item| spec.matches(item))
                        .collect(),
                    _ => {
                        let mut out = Vec::new();
                        for held in &store.items {
                            let item = parse(held.json());
                            if let Some(meta) = meta {
                                if meta.rule.as_ref().is_none_or(|r| r.matches(&item)) {
                                    total += 1;
                                }
                            }
                            if !spec.matches(&item) {
                                continue;
                            }
                            filtered += 1;
                            if keys.is_none_or(|keys| keys.iter().any(|k| k == held.key())) {
                                out.push(item);
                            }
                        }
                        out
                    }
                }
            }
        };
        let mut sort = spec.list.sort.clone();
        sort.push((spec.key_field.to_string(), false));
        let limit = match (spec.list.limit, spec.list.unbounded, keys) {
            (Some(n), _, _) => Some(n),
            (None, true, _) => None,
            (None, false, Some(keys)) => Some(keys.len()),
            (None, false, None) => Some(DEFAULT_INIT_LIMIT),
        };
        let shape = ListShape {
            sort,
            offset: spec.list.offset,
            limit,
            unbounded: spec.list.unbounded,
        };
        let kept = shape.apply(matched.iter().collect());
        let bound = self.settings.max_init_items;
        if kept.len() > bound {
            return Err(match purpose {
                Purpose::Init => StateError::InitTooLarge {
                    count: kept.len(),
                    limit: bound,
                },
                Purpose::Read => StateError::ReadTooLarge {
                    count: kept.len(),
                    limit: bound,
                },
            });
        }
        let projected: Vec<Value> = kept
            .into_iter()
            .map(|item| match spec.projection.is_all() {
                true => item.clone(),
                false => spec.projection.apply(item),
            })
            .collect();
        let data = serde_json::to_string(&projected).unwrap_or_else(|_| "[]".to_string());
        let meta = meta.map(|meta| {
            let fields: Vec<String> = meta
                .counts
                .iter()
                .map(|count| {
                    let n = match count {
                        MetaCount::Total => total,
                        MetaCount::Filter => filtered,
                    };
                    format!("\"{}\":{n}", count.as_str())
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        });
        let histogram = match purpose {
            Purpose::Init => &self.metrics.state_init_duration,
            Purpose::Read => &self.metrics.state_read_duration,
        };
        histogram.observe(started.elapsed().as_secs_f64());
        Ok(View { data, meta })
    }
}
