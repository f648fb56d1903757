//! Who a subscriber is and what it may read: static access tokens and the permission shape
//! they carry.
//!
//! Permissions have one shape wherever they come from (tokens file, `--token`, public mode, and
//! later JWT claims): a map from collection name, or `"*"` for any other collection, to
//! `{"events": [...]?, "filter": {...}?, "fields": [...]?}`; an absent key is unrestricted.
//! Turning a permission into predicates happens in [`crate::registry`] at subscribe time.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::event::EventKind;

/// What one collection's permission allows.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionPermission {
    /// Event kinds the subscriber may receive; `None` = all.
    #[serde(default)]
    pub events: Option<Vec<EventKind>>,
    /// Row rule in the Directus filter language, ANDed with the subscriber's own filter.
    #[serde(default)]
    pub filter: Option<Value>,
    /// Fields the subscriber may read (and filter on); `None` = all.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
}

impl CollectionPermission {
    /// True when the permission restricts which rows are visible.
    pub fn restricts_rows(&self) -> bool {
        self.filter
            .as_ref()
            .is_some_and(|f| f.as_object().is_none_or(|m| !m.is_empty()))
    }
}

/// A map from collection (or `"*"`) to what may be read there.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Permissions(HashMap<String, Arc<CollectionPermission>>);

/// Error reading a permissions or tokens document.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PermissionsError(String);

impl Permissions {
    /// Unrestricted access to every collection.
    pub fn all() -> Self {
        Permissions(HashMap::from([(
            "*".to_string(),
            Arc::new(CollectionPermission::default()),
        )]))
    }

    /// Unrestricted access to the named collections only.
    pub fn collections<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Permissions(
            names
                .into_iter()
                .map(|n| (n.to_string(), Arc::new(CollectionPermission::default())))
                .collect(),
        )
    }

    /// Parses the JSON permission shape.
    pub fn from_json_str(text: &str) -> Result<Self, PermissionsError> {
        serde_json::from_str(text)
            .map_err(|e| PermissionsError(format!("invalid permissions: {e}")))
    }

    /// The permission that applies to `collection`: its own entry, else `"*"`, else none.
    pub fn for_collection(&self, collection: &str) -> Option<&Arc<CollectionPermission>> {
        self.0.get(collection).or_else(|| self.0.get("*"))
    }
}

/// An authenticated (or anonymous) subscriber.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// Subject (`sub`), used by `$CURRENT_USER` in filters; `None` for anonymous.
    pub sub: Option<String>,
    /// What this subscriber may read.
    pub permissions: Permissions,
}

impl Principal {
    /// The anonymous principal of public mode.
    pub fn anonymous(permissions: Permissions) -> Self {
        Principal {
            sub: None,
            permissions,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    #[serde(default)]
    sub: Option<String>,
    collections: Permissions,
}

/// Static access tokens, looked up in constant time per candidate.
#[derive(Debug, Clone, Default)]
pub struct TokenStore {
    tokens: Vec<(String, Arc<Principal>)>,
}

impl TokenStore {
    /// Parses a tokens file: `{"<token>": {"sub": "alice", "collections": {<permissions>}}}`.
    pub fn from_json(text: &str) -> Result<Self, PermissionsError> {
        let map: HashMap<String, TokenEntry> = serde_json::from_str(text)
            .map_err(|e| PermissionsError(format!("invalid tokens file: {e}")))?;
        let mut store = TokenStore::default();
        for (token, entry) in map {
            if token.is_empty() {
                return Err(PermissionsError("invalid tokens file: empty token".into()));
            }
            store.insert(
                token,
                Principal {
                    sub: entry.sub,
                    permissions: entry.collections,
                },
            );
        }
        Ok(store)
    }

    /// Adds or replaces a token.
    pub fn insert(&mut self, token: String, principal: Principal) {
        self.tokens.retain(|(t, _)| *t != token);
        self.tokens.push((token, Arc::new(principal)));
    }

    /// True when no token is configured.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The principal of `token`. Every configured token is compared in constant time, so
    /// the answer's timing does not reveal how much of a guess was right.
    pub fn get(&self, token: &str) -> Option<Arc<Principal>> {
        let mut found = None;
        for (candidate, principal) in &self.tokens {
            if bool::from(candidate.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// Publisher API keys (`Authorization: Bearer <key>`).
#[derive(Debug, Clone, Default)]
pub struct PublishKeys(Vec<String>);

impl PublishKeys {
    /// Wraps the configured keys.
    pub fn new(keys: Vec<String>) -> Self {
        PublishKeys(keys)
    }

    /// True when publishing needs a key.
    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    /// Checks a presented key against every configured key in constant time.
    pub fn accepts(&self, presented: &str) -> bool {
        let mut ok = false;
        for key in &self.0 {
            ok |= bool::from(key.as_bytes().ct_eq(presented.as_bytes()));
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_parses_and_looks_up() {
        let store = TokenStore::from_json(
            r#"{"t-alice":{"sub":"alice","collections":{"orders":{"events":["create"],"fields":["id"]},"*":{}}}}"#,
        )
        .unwrap();
        let p = store.get("t-alice").unwrap();
        assert_eq!(p.sub.as_deref(), Some("alice"));
        let orders = p.permissions.for_collection("orders").unwrap();
        assert_eq!(orders.events.as_deref(), Some(&[EventKind::Create][..]));
        assert!(p.permissions.for_collection("other").is_some());
        assert!(store.get("t-alic").is_none());
        assert!(store.get("").is_none());
    }

    #[test]
    fn tokens_file_rejects_unknown_keys_and_bad_events() {
        assert!(TokenStore::from_json(r#"{"t":{"collections":{},"admin":true}}"#).is_err());
        assert!(
            TokenStore::from_json(r#"{"t":{"collections":{"a":{"events":["read"]}}}}"#).is_err()
        );
        assert!(TokenStore::from_json(r#"{"t":{}}"#).is_err());
    }

    #[test]
    fn publish_keys_compare() {
        let keys = PublishKeys::new(vec!["k1".into(), "k2".into()]);
        assert!(keys.required());
        assert!(keys.accepts("k2"));
        assert!(!keys.accepts("k3"));
        assert!(!PublishKeys::default().required());
    }

    #[test]
    fn row_restriction_detection() {
        let mut p = CollectionPermission::default();
        assert!(!p.restricts_rows());
        p.filter = Some(serde_json::json!({}));
        assert!(!p.restricts_rows());
        p.filter = Some(serde_json::json!({"owner": {"_eq": "$CURRENT_USER"}}));
        assert!(p.restricts_rows());
    }
}
