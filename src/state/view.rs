//! Lists cut from the retained state: the one engine behind a collection subscription's
//! `init`, the socket `items` read and `GET /v1/collections/{collection}/items`. Each matches
//! the retained items against the spec (filter, row rule, search), counts what `query.meta`
//! asks, sorts by `sort` then by key, slices by `offset`/`limit` (Directus' default limit of
//! [`DEFAULT_INIT_LIMIT`] without one), projects, and encodes, under the collection's store
//! lock only for the match (the store is never held while sorting or encoding).

use std::time::Instant;

use serde_json::Value;

use super::{parse, parse_fields, State, StateError, DEFAULT_INIT_LIMIT};
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
                        // An index narrows the items to parse when nothing needs all of
                        // them: no `total_count` under a row rule (without one it is the
                        // collection's size).
                        let indexed = match (meta, &spec.filter) {
                            (Some(m), _) if m.rule.is_some() => None,
                            (_, Some(filter)) => store.index.candidates(filter),
                            (_, None) => None,
                        };
                        let scanning = indexed.is_none();
                        // Judging an item needs only the fields the predicates read: parsing
                        // just those (and the whole item only when it matches) is what keeps
                        // a scan cheap. The row rule `total_count` counts under is part of the
                        // spec's filter, so its fields are among these.
                        let counting = meta.filter(|_| scanning);
                        let reads = spec.reads();
                        let candidates: Box<dyn Iterator<Item = &super::Stored>> = match indexed {
                            Some(keys) => {
                                total = store.items.len();
                                Box::new(keys.into_iter().filter_map(|k| store.items.get(k)))
                            }
                            None => Box::new(store.items.iter()),
                        };
                        // Texts an item must contain to match (cheaper to look for than to
                        // parse); not when every item is parsed anyway, for its count.
                        let needles: Vec<Vec<memchr::memmem::Finder>> =
                            match (&spec.filter, counting) {
                                (Some(filter), None) => filter
                                    .required_texts()
                                    .iter()
                                    .map(|texts| {
                                        texts
                                            .iter()
                                            .map(|t| memchr::memmem::Finder::new(t).into_owned())
                                            .collect()
                                    })
                                    .collect(),
                                _ => Vec::new(),
                            };
                        for held in candidates {
                            let text = held.json().as_bytes();
                            if !needles
                                .iter()
                                .all(|any| any.iter().any(|f| f.find(text).is_some()))
                            {
                                continue;
                            }
                            let probe = match &reads {
                                Some(fields) => parse_fields(held.json(), fields),
                                None => parse(held.json()),
                            };
                            if let Some(meta) = counting {
                                if meta.rule.as_ref().is_none_or(|r| r.matches(&probe)) {
                                    total += 1;
                                }
                            }
                            if !spec.matches(&probe) {
                                continue;
                            }
                            filtered += 1;
                            if keys.is_none_or(|keys| keys.iter().any(|k| k == held.key())) {
                                out.push(match reads {
                                    Some(_) => parse(held.json()),
                                    None => probe,
                                });
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{json, Map, Value};

    use super::Purpose;
    use crate::auth::{Permissions, Principal};
    use crate::event::{Event, EventKind};
    use crate::filter::FilterLimits;
    use crate::metrics::Metrics;
    use crate::protocol::SubscribeRequest;
    use crate::state::{State, StateSettings};
    use crate::subscription::{compile, Spec, SpecContext};

    fn state(indexes: &[&str]) -> State {
        let settings = StateSettings {
            collections: vec!["orders".into()],
            max_items: 1 << 20,
            max_bytes: 1 << 30,
            max_init_items: 1 << 20,
            file: None,
            indexes: indexes
                .iter()
                .map(|f| ("orders".to_string(), f.to_string()))
                .collect(),
        };
        State::new(settings, Arc::new(Metrics::new(10).unwrap()))
    }

    fn spec(query: Value) -> Spec {
        let principal = Principal::anonymous(Permissions::all());
        let Value::Object(query) = query else {
            panic!("query")
        };
        let request = SubscribeRequest {
            uid: None,
            collection: "orders".into(),
            event: None,
            item: None,
            query: Some(query),
            nested: false,
            since: None,
            checkpoints: false,
            max_rate: None,
        };
        let ctx = SpecContext {
            principal: &principal,
            limits: &FilterLimits::DEFAULT,
            key_field: "id",
        };
        compile(&request, &ctx).unwrap()
    }

    fn event(kind: EventKind, item: Value) -> Event {
        let keys = vec![item["id"].clone()];
        let items = match kind {
            EventKind::Delete => Vec::new(),
            _ => vec![item],
        };
        Event::test("orders", kind, items, keys)
    }

    /// A predicate judged on an item reduced to the fields `Spec::reads` names answers as on
    /// the whole item: filters on nested paths, relations, `_null` on absent fields, search
    /// limited to fields, and a JSONPath or full search (which read everything).
    #[test]
    fn the_fields_a_spec_reads_decide_it() {
        let items = [
            json!({"id":1,"status":"a","n":{"x":1},"tags":[{"name":"t1"}],"text":"X marks"}),
            json!({"id":2,"status":null,"n":{"x":2},"tags":[],"other":"x"}),
            json!({"id":3,"tags":[{"name":"t2"},{"name":"t1"}],"we\"ird":5}),
            json!({"id":4,"status":"b","n":[{"x":1}],"text":"nothing"}),
        ];
        let queries = [
            json!({"filter":{"status":{"_eq":"a"}}}),
            json!({"filter":{"status":{"_null":true}}}),
            json!({"filter":{"n":{"x":{"_eq":1}}}}),
            json!({"filter":{"tags":{"_some":{"name":{"_eq":"t1"}}}}}),
            json!({"filter":{"tags":{"_none":{"name":{"_eq":"t2"}}}}}),
            json!({"filter":{"_or":[{"status":{"_eq":"b"}},{"we\"ird":{"_gt":1}}]}}),
            json!({"filter":{"status":{"_nnull":true}},"search":"x"}),
            json!({"search":"marks"}),
            json!({}),
        ];
        for query in &queries {
            let s = spec(query.clone());
            for item in &items {
                let json = serde_json::to_string(item).unwrap();
                let probe = match s.reads() {
                    Some(fields) => crate::state::parse_fields(&json, &fields),
                    None => item.clone(),
                };
                assert_eq!(s.matches(&probe), s.matches(item), "{query} on {item}");
            }
        }
        assert_eq!(spec(json!({"search":"x"})).reads(), None);
        assert_eq!(
            spec(json!({"filter":{"n":{"x":{"_eq":1}},"status":{"_eq":"a"}}})).reads(),
            Some(vec!["n", "status"])
        );
    }

    /// Random creates, partial updates and deletes on two states, one with indexes: every
    /// view (filters on indexed and unindexed fields, `_in`, arrays, meta) is the same.
    #[test]
    fn an_index_never_changes_a_view() {
        let plain = state(&[]);
        let indexed = state(&["status", "tags", "n.x"]);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let statuses = [json!("a"), json!("b"), json!(5), json!("5"), Value::Null];
        let queries = [
            json!({"filter":{"status":{"_eq":"a"}}}),
            json!({"filter":{"status":{"_eq":5}},"meta":"*"}),
            json!({"filter":{"status":{"_in":["a","b"]}},"sort":"-id","limit":7}),
            json!({"filter":{"_and":[{"tags":{"_eq":"t1"}},{"status":{"_eq":"b"}}]},"meta":"filter_count"}),
            json!({"filter":{"tags":{"_in":["t0","t2"]}},"limit":-1}),
            json!({"filter":{"n.x":{"_eq":1}},"fields":"id"}),
            json!({"filter":{"status":{"_null":true}}}),
            json!({"filter":{"_or":[{"status":{"_eq":"a"}},{"tags":{"_eq":"t1"}}]}}),
            json!({"filter":{"status":{"_eq":"a"}},"search":"x"}),
        ];
        for round in 0..40 {
            for _ in 0..25 {
                let id = next(40);
                let kind = match next(4) {
                    0 => EventKind::Create,
                    1 | 2 => EventKind::Update,
                    _ => EventKind::Delete,
                };
                let mut item = Map::new();
                item.insert("id".into(), json!(id));
                if next(3) > 0 {
                    item.insert("status".into(), statuses[next(5) as usize].clone());
                }
                if next(2) == 0 {
                    let tags: Vec<Value> = (0..next(3))
                        .map(|_| json!(format!("t{}", next(3))))
                        .collect();
                    item.insert("tags".into(), json!(tags));
                }
                if next(3) == 0 {
                    item.insert("n".into(), json!({"x": next(2)}));
                }
                if next(4) == 0 {
                    item.insert("text".into(), json!("x marks"));
                }
                let e = event(kind, Value::Object(item));
                plain.fold(&e);
                indexed.fold(&e);
            }
            for query in &queries {
                let s = spec(query.clone());
                assert_eq!(
                    plain.view(&s, None, Purpose::Read).unwrap(),
                    indexed.view(&s, None, Purpose::Read).unwrap(),
                    "round {round}, {query}"
                );
            }
        }
    }
}
