//! What a subscription is: a `subscribe` request compiled, under the subscriber's
//! permissions, into a [`Spec`], the immutable description of what one subscription receives
//! and in which shape, and the rendering of an event's payloads for that spec
//! ([`render::payloads`]).
//!
//! - [`compile`]: the Directus query grammar (`filter`, `jsonpath`, `fields`, `sort`,
//!   `limit`/`offset`/`page`, `search`) and permission narrowing (event set, field grant, row
//!   rule), in the order Directus reports errors;
//! - [`list`]: [`ListShape`], sort/offset/limit of each message's items;
//! - [`render`]: the `data` of every message a spec gets for an event, per [`Dialect`].
//!
//! Identical specs share one registry group; their identity is [`SpecKey`], built from the
//! canonical forms of every part (never from `Debug` text).
//!
//! Everything that can fail does so here, at subscribe time, with the error the client sees;
//! the publish path only evaluates.

pub mod list;
pub mod render;

pub use list::ListShape;
pub use render::{keyed_payloads, payloads, Cause, Payload};

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::auth::Principal;
use crate::config::{Config, SlowConsumerPolicy, Transitions};
use crate::event::{valid_collection_name, EventSet};
use crate::filter::{CompileContext, Filter, FilterLimits};
use crate::projection::Projection;
use crate::protocol::{ErrorCode, ProtocolError, SubscribeRequest, Uid};

/// The frame shape a subscription is served in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Directus' own shapes (what @directus/sdk expects).
    Flat,
    /// For clients that send fields nested under `data` (fcs_directus): one frame per item,
    /// `data` always an object, delete keys as `{"<key field>": "<key>"}`.
    Nested,
}

/// The identity of a [`Spec`]: equal keys receive the same frames, so their subscriptions
/// share one group. Built from canonical forms (filter and projection canonicals ignore JSON
/// key order, `_and`/`_or` member order and redundant entries). The collection is implicit
/// (groups live per collection). A suspended spec is the only one with an empty event set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpecKey {
    events: u8,
    item: Option<String>,
    /// Empty without a filter, as for a filter whose canonical form is empty (both match all).
    filter: String,
    projection: String,
    list: ListShape,
    search: Option<String>,
    search_fields: Option<Vec<String>>,
    dialect: Dialect,
    key_only_deletes: bool,
    key_field: Arc<str>,
    delivery: Delivery,
}

/// How a subscription's frames are queued, beyond what it receives: members of one group
/// share it (it is part of [`SpecKey`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// Past the outbox bounds, its frames are conflated per item key
    /// (`--slow-consumer-policy conflate` on a retained collection, for a subscription whose
    /// `init` lists the retained items) instead of closing the connection.
    pub conflate: bool,
    /// Its `max_rate` as an interval: at most one frame per item key per interval, folded
    /// from the first change (implies `conflate`).
    pub every: Option<Duration>,
}

/// What one subscription receives, compiled. Identical specs share one group (see
/// [`Spec::key`]), so they are matched and encoded once.
#[derive(Debug)]
pub struct Spec {
    /// Collection.
    pub collection: Arc<str>,
    /// Event kinds delivered (the request's `event` ∩ the permission's `events`).
    pub events: EventSet,
    /// Only this item key (as a string).
    pub item: Option<String>,
    /// Row predicate: the permission's rule ∧ the subscriber's filter ∧ its JSONPath.
    pub filter: Option<Filter>,
    /// Lower-cased `search` term.
    pub search: Option<String>,
    /// The top-level fields `search` looks at when the permission restricts fields (the
    /// search must not reveal fields the subscriber cannot read); `None` = every field.
    pub search_fields: Option<Vec<String>>,
    /// Field projection (already narrowed to the permission's fields).
    pub projection: Projection,
    /// sort/offset/limit applied to each message's items.
    pub list: ListShape,
    /// Frame shape.
    pub dialect: Dialect,
    /// Whether key-only deletes (no item data) are delivered: not to row-restricted readers,
    /// since nothing tells whether the deleted row was visible to them.
    pub key_only_deletes: bool,
    /// The collection's key field (for nested-dialect deletes).
    pub key_field: Arc<str>,
    /// Whether an event carrying the items' previous versions is judged on both (enter and
    /// leave frames, see [`render`]): only without `event` in the request and with every
    /// kind allowed (Directus' semantics otherwise). Implied by `events` being every kind,
    /// so [`SpecKey`] needs no field for it; `--transitions directus` turns it off for every
    /// spec of the process ([`Spec::without_transitions`]).
    pub transitions: bool,
    /// `query.meta`: the counts an `init` or a read answers beside its `data` (`None`: no
    /// `meta`). Not part of [`SpecKey`]: it shapes only the one-off `init` (live events carry
    /// no `meta`), which is built from the subscription's own spec before it joins a group.
    pub meta: Option<Box<MetaQuery>>,
    /// How its frames are queued.
    pub delivery: Delivery,
    /// It asked for `checkpoint` frames (`"checkpoints": true`). Not part of [`SpecKey`]:
    /// the frames are the same with or without it, and a checkpoint is owed per member at
    /// push time (the registry keeps the flag per member), so a JS client that asks shares
    /// the group of a Directus client that does not.
    pub checkpoints: bool,
    /// Canonical identity of everything above but `meta`.
    pub key: Arc<SpecKey>,
}

/// One count `query.meta` asks for, by Directus' name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaCount {
    /// `total_count`: the items of the collection the reader may see (under the row rule,
    /// whatever the query's filter), as Directus counts under permissions.
    Total,
    /// `filter_count`: the items the query's filter and search match (before `limit`).
    Filter,
}

impl MetaCount {
    /// The name in the query and in the reply.
    pub fn as_str(self) -> &'static str {
        match self {
            MetaCount::Total => "total_count",
            MetaCount::Filter => "filter_count",
        }
    }
}

/// `query.meta` compiled: which counts, in the order asked, and what `total_count` counts
/// under.
#[derive(Debug, Clone)]
pub struct MetaQuery {
    /// The counts, in the order asked (`*`: `total_count`, `filter_count`), without repeats.
    pub counts: Vec<MetaCount>,
    /// The permission's row rule alone, which `total_count` counts under; `None`: every item.
    pub rule: Option<Filter>,
}

/// Reads `meta` as Directus sanitizes it: `*` (both counts), a name, a comma-separated string
/// or an array of names; each must be `total_count` or `filter_count`.
fn parse_meta(v: &Value, uid: &Option<Uid>) -> Result<Vec<MetaCount>, ProtocolError> {
    let names = match v {
        Value::String(s) if s.trim() == "*" => {
            vec!["total_count".to_string(), "filter_count".to_string()]
        }
        other => string_list(other, "meta", uid)?,
    };
    let mut counts = Vec::with_capacity(2);
    for (i, name) in names.iter().enumerate() {
        let count = match name.as_str() {
            "total_count" => MetaCount::Total,
            "filter_count" => MetaCount::Filter,
            "*" => {
                for c in [MetaCount::Total, MetaCount::Filter] {
                    if !counts.contains(&c) {
                        counts.push(c);
                    }
                }
                continue;
            }
            _ => {
                return Err(invalid_query(
                    format!("\"meta[{i}]\" must be one of [total_count, filter_count]."),
                    uid.clone(),
                )
                .at("meta"))
            }
        };
        if !counts.contains(&count) {
            counts.push(count);
        }
    }
    Ok(counts)
}

impl Spec {
    /// True when `item` passes the row predicate and the search term.
    pub fn matches(&self, item: &Value) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(item))
            && self
                .search
                .as_deref()
                .is_none_or(|term| search_matches(item, term, self.search_fields.as_deref()))
    }

    /// The top-level fields [`Spec::matches`] reads (sorted, deduplicated), or `None` when it
    /// may read any (a JSONPath filter, or a search over every field).
    pub fn reads(&self) -> Option<Vec<&str>> {
        let mut out = match &self.filter {
            Some(filter) => filter.top_fields()?,
            None => Vec::new(),
        };
        if self.search.is_some() {
            out.extend(self.search_fields.as_ref()?.iter().map(String::as_str));
            out.sort_unstable();
            out.dedup();
        }
        Some(out)
    }

    /// This spec with its frames queued as `delivery` says.
    pub fn with_delivery(mut self, delivery: Delivery) -> Spec {
        self.delivery = delivery;
        Arc::make_mut(&mut self.key).delivery = delivery;
        self
    }

    /// This spec judged on the new version of an item only (`--transitions directus`).
    pub fn without_transitions(mut self) -> Spec {
        self.transitions = false;
        self
    }

    /// A placeholder for a subscription whose connection's token expired: it keeps its place
    /// in the registry (so a re-auth can swap the real spec back in under one lock) but
    /// receives nothing, because it allows no event.
    pub fn suspended(collection: &str, key_field: &str) -> Spec {
        Spec {
            collection: Arc::from(collection),
            events: EventSet(0),
            item: None,
            filter: None,
            search: None,
            search_fields: None,
            projection: Projection::default(),
            list: ListShape::default(),
            dialect: Dialect::Flat,
            key_only_deletes: false,
            key: Arc::new(SpecKey {
                events: 0,
                item: None,
                filter: String::new(),
                projection: String::new(),
                list: ListShape::default(),
                search: None,
                search_fields: None,
                dialect: Dialect::Flat,
                key_only_deletes: false,
                key_field: Arc::from(key_field),
                delivery: Delivery::default(),
            }),
            key_field: Arc::from(key_field),
            transitions: false,
            meta: None,
            delivery: Delivery::default(),
            checkpoints: false,
        }
    }
}

/// Directus' search: a case-insensitive substring of any top-level string field (of `fields`,
/// when given), or equality with a numeric field when the term is a number.
fn search_matches(item: &Value, term: &str, fields: Option<&[String]>) -> bool {
    let number: Option<f64> = term.parse().ok();
    item.as_object().is_some_and(|obj| {
        obj.iter()
            .filter(|(k, _)| fields.is_none_or(|allowed| allowed.iter().any(|a| a == *k)))
            .any(|(_, v)| match v {
                Value::String(s) => s.to_lowercase().contains(term),
                Value::Number(n) => number.is_some_and(|t| n.as_f64() == Some(t)),
                _ => false,
            })
    })
}

/// Context for compiling a subscription.
pub struct SpecContext<'a> {
    /// Who is subscribing.
    pub principal: &'a Principal,
    /// Filter limits.
    pub limits: &'a FilterLimits,
    /// Key field of the collection being subscribed to.
    pub key_field: &'a str,
}

/// Directus' `FORBIDDEN` for a collection that does not exist or may not be read.
pub fn forbidden_collection(collection: &str, uid: Option<Uid>) -> ProtocolError {
    ProtocolError::new(
        "subscribe",
        ErrorCode::Forbidden,
        format!("You don't have permission to access collection \"{collection}\" or it does not exist. Queried in root."),
        uid,
    )
}

fn forbidden_field(field: &str, collection: &str, uid: Option<Uid>) -> ProtocolError {
    ProtocolError::new(
        "subscribe",
        ErrorCode::Forbidden,
        format!(
            "You don't have permission to access field \"{field}\" in collection \"{collection}\" or it does not exist. Queried in root."
        ),
        uid,
    )
}

fn invalid_query(message: impl std::fmt::Display, uid: Option<Uid>) -> ProtocolError {
    ProtocolError::new(
        "subscribe",
        ErrorCode::InvalidQuery,
        format!("Invalid query. {message}"),
        uid,
    )
}

/// Reads a list query parameter: an array of strings or a comma-separated string.
fn string_list(
    v: &Value,
    name: &'static str,
    uid: &Option<Uid>,
) -> Result<Vec<String>, ProtocolError> {
    match v {
        Value::String(s) => Ok(s
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.trim().to_string()),
                _ => Err(invalid_query(
                    format!("\"{name}\" must be an array of strings."),
                    uid.clone(),
                )
                .at(name)),
            })
            .collect(),
        _ => Err(invalid_query(
            format!("\"{name}\" must be an array or a comma-separated string."),
            uid.clone(),
        )
        .at(name)),
    }
}

/// Reads `limit`/`offset`/`page`: a number or a numeric string.
fn integer(v: &Value, name: &'static str, uid: &Option<Uid>) -> Result<i64, ProtocolError> {
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    n.ok_or_else(|| invalid_query(format!("\"{name}\" must be a number."), uid.clone()).at(name))
}

/// Splits `json(meta, a.b)` aware of parentheses so commas inside it survive a CSV split.
fn split_fields(v: &Value, uid: &Option<Uid>) -> Result<Vec<String>, ProtocolError> {
    match v {
        Value::String(s) => {
            let mut out = Vec::new();
            let mut depth = 0usize;
            let mut current = String::new();
            for ch in s.chars() {
                match ch {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    ',' if depth == 0 => {
                        out.push(std::mem::take(&mut current).trim().to_string());
                        continue;
                    }
                    _ => {}
                }
                current.push(ch);
            }
            out.push(current.trim().to_string());
            Ok(out.into_iter().filter(|f| !f.is_empty()).collect())
        }
        other => string_list(other, "fields", uid),
    }
}

/// Compiles `req` for `principal` under `config`: the collection's settings (key field,
/// transitions) from the collections file or the flags; a collection the file does not
/// declare (with `"undeclared": "forbid"`) does not exist, Directus' answer for an unknown
/// collection. Subscribes and `items` reads both compile through here.
pub fn compile_configured(
    config: &Config,
    req: &SubscribeRequest,
    principal: &Principal,
) -> Result<Spec, ProtocolError> {
    let Some(settings) = config.collection(&req.collection) else {
        return Err(forbidden_collection(&req.collection, req.uid.clone()));
    };
    let ctx = SpecContext {
        principal,
        limits: &config.filter_limits,
        key_field: &settings.key_field,
    };
    let spec = compile(req, &ctx)?;
    // Conflation needs whole items and a fresh `init` to reset to: a subscription of a
    // retained collection whose `init` lists its items.
    let conflatable = settings.state && req.event.is_none() && spec.dialect == Dialect::Flat;
    let every = match req.max_rate {
        None => None,
        Some(_) if !settings.state => {
            return Err(max_rate_refused(
                format!("collection \"{}\" keeps no retained state", req.collection),
                req,
            ))
        }
        Some(_) if req.event.is_some() => {
            return Err(max_rate_refused("\"event\" is set".into(), req))
        }
        Some(_) if spec.dialect != Dialect::Flat => {
            return Err(max_rate_refused(
                "the fields are nested under \"data\"".into(),
                req,
            ))
        }
        Some(rate) => Some(Duration::from_secs_f64(1.0 / rate)),
    };
    // A `max_rate` folds whatever the collection's policy: it is conflation on a timer.
    let conflate = conflatable
        && (every.is_some() || settings.slow_consumer_policy == SlowConsumerPolicy::Conflate);
    let spec = spec.with_delivery(Delivery { conflate, every });
    Ok(match settings.transitions {
        Transitions::View => spec,
        Transitions::Directus => spec.without_transitions(),
    })
}

/// `max_rate` on a subscription that cannot conflate (its frames would not carry whole items
/// per key, or there is no retained state to start again from after a reset).
fn max_rate_refused(why: String, req: &SubscribeRequest) -> ProtocolError {
    ProtocolError::new(
        "subscribe",
        ErrorCode::InvalidPayload,
        format!("Validation error: \"max_rate\" needs a subscription that can conflate, and {why}"),
        req.uid.clone(),
    )
}

/// Compiles a subscribe request. `Err` is the frame to send back.
pub fn compile(req: &SubscribeRequest, ctx: &SpecContext<'_>) -> Result<Spec, ProtocolError> {
    let uid = req.uid.clone();
    if !valid_collection_name(&req.collection) {
        return Err(forbidden_collection(&req.collection, uid));
    }
    let permission = ctx
        .principal
        .permissions
        .for_collection(&req.collection)
        .ok_or_else(|| forbidden_collection(&req.collection, uid.clone()))?;

    let allowed_events = permission
        .events
        .as_deref()
        .map_or(EventSet::ALL, EventSet::of);
    let events = match req.event {
        Some(kind) if !allowed_events.contains(kind) => {
            return Err(ProtocolError::new(
                "subscribe",
                ErrorCode::Forbidden,
                format!(
                    "You don't have permission to receive \"{}\" events of collection \"{}\".",
                    kind.as_str(),
                    req.collection
                ),
                uid,
            ))
        }
        Some(kind) => EventSet::only(kind),
        None => allowed_events,
    };
    if events.is_empty() {
        return Err(forbidden_collection(&req.collection, uid));
    }

    let empty = Map::new();
    let query = req.query.as_ref().unwrap_or(&empty);
    let compile_ctx = CompileContext {
        current_user: ctx.principal.sub.clone(),
        claims: ctx.principal.claims.clone(),
    };

    // Filter: an object, or the JSON string @directus/sdk sends.
    let user_filter = match query.get("filter") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let parsed: Value = serde_json::from_str(s).map_err(|_| {
                invalid_query("Invalid JSON for filter object.", uid.clone()).at("filter")
            })?;
            Some(parsed)
        }
        Some(other) => Some(other.clone()),
    };
    let mut filter = match &user_filter {
        Some(f @ Value::Object(_)) => Some(
            Filter::compile(f, ctx.limits, &compile_ctx)
                .map_err(|e| invalid_query(e, uid.clone()).at("filter"))?,
        ),
        Some(_) => return Err(invalid_query("\"filter\" must be an object.", uid).at("filter")),
        None => None,
    };
    if let Some(expr) = query.get("jsonpath") {
        let Value::String(expr) = expr else {
            return Err(invalid_query("\"jsonpath\" must be a string.", uid).at("jsonpath"));
        };
        if permission.fields.is_some() {
            return Err(ProtocolError::new(
                "subscribe",
                ErrorCode::Forbidden,
                format!("JSONPath filters are not allowed where fields of collection \"{}\" are restricted.", req.collection),
                uid,
            ));
        }
        let jp = Filter::compile_jsonpath(expr, ctx.limits)
            .map_err(|e| invalid_query(e, uid.clone()).at("jsonpath"))?;
        filter = Some(match filter {
            Some(f) => f.and(jp),
            None => jp,
        });
    }

    // Fields.
    let requested: Vec<String> = match query.get("fields") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => split_fields(v, &uid)?,
    };
    let projection = match &permission.fields {
        None => Projection::compile(&requested)
            .map_err(|e| invalid_query(e, uid.clone()).at("fields"))?,
        Some(allowed) => {
            let allows = |field: &str| allowed.iter().any(|a| a == "*" || a == field);
            if let Some(f) = &filter {
                for path in f.fields() {
                    let top = path.split('.').next().unwrap_or(&path);
                    if !allows(top) {
                        return Err(forbidden_field(top, &req.collection, uid).at("filter"));
                    }
                }
            }
            let wants_all = requested.is_empty() || requested.iter().all(|f| f == "*");
            if wants_all && !allowed.iter().any(|a| a == "*") {
                Projection::compile(allowed)
                    .map_err(|e| invalid_query(e, uid.clone()).at("fields"))?
            } else {
                let p = Projection::compile(&requested)
                    .map_err(|e| invalid_query(e, uid.clone()).at("fields"))?;
                for path in p.fields() {
                    let top = path.split('.').next().unwrap_or(&path);
                    if top != "*" && !allows(top) {
                        return Err(forbidden_field(top, &req.collection, uid).at("fields"));
                    }
                }
                if requested.iter().any(|f| f == "*") && !allowed.iter().any(|a| a == "*") {
                    // `*` means "every field I may read".
                    let mut narrowed: Vec<String> = allowed.clone();
                    narrowed.extend(requested.iter().filter(|f| *f != "*").cloned());
                    Projection::compile(&narrowed)
                        .map_err(|e| invalid_query(e, uid.clone()).at("fields"))?
                } else {
                    p
                }
            }
        }
    };

    // `meta` (Directus' counts), parsed before the row rule joins the filter: `total_count`
    // counts under the rule alone.
    let meta_counts = match query.get("meta") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => parse_meta(v, &uid)?,
    };
    let mut meta_rule = None;
    // Row rule of the permission, ANDed on the server; no client message can widen it.
    if let Some(rule) = permission
        .filter
        .as_ref()
        .filter(|_| permission.restricts_rows())
    {
        let rule = Filter::compile(rule, ctx.limits, &compile_ctx).map_err(|e| {
            tracing::warn!(collection = %req.collection, error = %e, "permission filter does not compile");
            forbidden_collection(&req.collection, uid.clone())
        })?;
        if meta_counts.contains(&MetaCount::Total) {
            meta_rule = Some(rule.clone());
        }
        filter = Some(match filter {
            Some(f) => rule.and(f),
            None => rule,
        });
    }

    // sort / offset / limit / page / search.
    let mut list = ListShape::default();
    if let Some(sort) = query.get("sort").filter(|v| !v.is_null()) {
        for field in string_list(sort, "sort", &uid)? {
            let (name, desc) = match field.strip_prefix('-') {
                Some(rest) => (rest.to_string(), true),
                None => (field, false),
            };
            if name.is_empty() {
                return Err(invalid_query("\"sort\" has an empty field.", uid).at("sort"));
            }
            // Sorting by a field orders the items by it, and `limit` then reveals that order.
            if let Some(allowed) = &permission.fields {
                let top = name.split('.').next().unwrap_or(&name);
                if !allowed.iter().any(|a| a == "*" || a == top) {
                    return Err(forbidden_field(top, &req.collection, uid).at("sort"));
                }
            }
            list.sort.push((name, desc));
        }
    }
    if let Some(v) = query.get("limit").filter(|v| !v.is_null()) {
        match integer(v, "limit", &uid)? {
            -1 => {
                list.limit = None;
                list.unbounded = true;
            }
            n if n >= 0 => list.limit = usize::try_from(n).ok(),
            _ => {
                return Err(
                    invalid_query("\"limit\" must be -1 or a positive number.", uid).at("limit"),
                )
            }
        }
    }
    if let Some(v) = query.get("offset").filter(|v| !v.is_null()) {
        let n = integer(v, "offset", &uid)?;
        list.offset = usize::try_from(n).map_err(|_| {
            invalid_query("\"offset\" must be a positive number.", uid.clone()).at("offset")
        })?;
    }
    if let Some(v) = query.get("page").filter(|v| !v.is_null()) {
        let page = integer(v, "page", &uid)?;
        if page < 1 {
            return Err(invalid_query("\"page\" must be a positive number.", uid).at("page"));
        }
        if let (Some(limit), Ok(p)) = (list.limit, usize::try_from(page - 1)) {
            list.offset = list.offset.saturating_add(limit.saturating_mul(p));
        }
    }
    let search = match query.get("search") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.to_lowercase()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(invalid_query("\"search\" must be a string.", uid).at("search")),
    };

    // Searching a field the subscriber cannot read would reveal it by probing.
    let search_fields = match &permission.fields {
        Some(allowed) if search.is_some() && !allowed.iter().any(|a| a == "*") => {
            Some(allowed.clone())
        }
        _ => None,
    };

    let dialect = if req.nested {
        Dialect::Nested
    } else {
        Dialect::Flat
    };
    let key_only_deletes = !permission.restricts_rows();
    let key_field: Arc<str> = Arc::from(ctx.key_field);
    let key = Arc::new(SpecKey {
        events: events.0,
        item: req.item.clone(),
        filter: filter.as_ref().map_or("", Filter::canonical).to_string(),
        projection: projection.canonical().to_string(),
        list: list.clone(),
        search: search.clone(),
        search_fields: search_fields.clone(),
        dialect,
        key_only_deletes,
        key_field: key_field.clone(),
        delivery: Delivery::default(),
    });
    Ok(Spec {
        collection: Arc::from(req.collection.as_str()),
        events,
        item: req.item.clone(),
        filter,
        search,
        search_fields,
        projection,
        list,
        dialect,
        key_only_deletes,
        key_field,
        transitions: events == EventSet::ALL,
        meta: (!meta_counts.is_empty()).then(|| {
            Box::new(MetaQuery {
                counts: meta_counts,
                rule: meta_rule,
            })
        }),
        delivery: Delivery::default(),
        checkpoints: req.checkpoints,
        key,
    })
}
