//! One `items` read, for both edges that answer it: the socket's
//! `{"type":"items","action":"read",…}` and `GET /v1/collections/{collection}/items`.
//!
//! A read is compiled exactly as a `subscribe` is (the same grammar, the same permission
//! narrowing: event set aside, field grant, row rule), so it refuses what a subscribe would
//! refuse with the same error, then cut from the retained state by the list engine of `init`
//! ([`State::view`]). The order of the checks: the query and the permissions first (an
//! unknown or forbidden collection is `FORBIDDEN`, as Directus answers, whether it retains
//! items or not), then whether the collection retains items (`INVALID_COLLECTION`).

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::auth::Principal;
use crate::config::Config;
use crate::protocol::{ErrorCode, ProtocolError, SubscribeRequest, Uid};
use crate::state::{Purpose, State, StateError, View};
use crate::subscription::compile_configured;

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct ReadRequest {
    /// The collection.
    pub collection: String,
    /// The Directus query object (string forms accepted, as in a REST query string).
    pub query: Option<Map<String, Value>>,
    /// One item by key (Directus' `readOne`): the answer's `data` is the item object.
    pub id: Option<String>,
    /// These items by key (Directus' `readMany`).
    pub ids: Option<Vec<String>>,
    /// Echoed in errors.
    pub uid: Option<Uid>,
}

/// A read's answer: `data` (a JSON array, or the item object for an `id` read) and the
/// `meta` counts when the query asked for them.
pub type ReadAnswer = View;

/// Reads from `state` under `principal`'s permissions. Errors are `items` protocol errors,
/// ready for the socket; the HTTP edge maps their codes to statuses.
pub fn read(
    state: Option<&Arc<State>>,
    config: &Config,
    principal: &Principal,
    request: ReadRequest,
) -> Result<ReadAnswer, ProtocolError> {
    let subscribe = SubscribeRequest {
        uid: request.uid.clone(),
        collection: request.collection,
        event: None,
        item: None,
        query: request.query,
        nested: false,
        since: None,
        checkpoints: false,
        max_rate: None,
    };
    let spec = compile_configured(config, &subscribe, principal).map_err(|e| e.of_kind("items"))?;
    let uid = request.uid;
    let Some(state) = state.filter(|s| s.retains(&spec.collection)) else {
        return Err(ProtocolError::new(
            "items",
            ErrorCode::InvalidCollection,
            format!(
                "Collection \"{}\" retains no items in Tidings (start it with --state {}), so it cannot be read.",
                spec.collection, spec.collection
            ),
            uid,
        )
        .at("collection"));
    };
    let too_large = |e: StateError| {
        ProtocolError::new(
            "items",
            ErrorCode::LimitExceeded,
            capitalized(&format!("{e}.")),
            uid.clone(),
        )
        .at("limit")
    };
    match (request.id, request.ids) {
        (Some(id), _) => {
            let view = state
                .view(&spec, Some(std::slice::from_ref(&id)), Purpose::Read)
                .map_err(too_large)?;
            // One key, so the list holds the item or nothing.
            match view
                .data
                .strip_prefix('[')
                .and_then(|d| d.strip_suffix(']'))
            {
                Some(item) if !item.is_empty() => Ok(View {
                    data: item.to_string(),
                    meta: view.meta,
                }),
                _ => Err(ProtocolError::new(
                    "items",
                    ErrorCode::Forbidden,
                    "You don't have permission to access this.",
                    uid,
                )
                .at("id")),
            }
        }
        (None, Some(ids)) => state
            .view(&spec, Some(&ids), Purpose::Read)
            .map_err(too_large),
        (None, None) => state.view(&spec, None, Purpose::Read).map_err(too_large),
    }
}

/// `text` with its first letter upper-cased, as Directus' messages read.
pub fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
