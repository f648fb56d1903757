//! Who may do what: subscriber credentials (static access tokens here, JWTs in [`jwt`], keys
//! fetched from an identity provider in [`jwks`]), the permission shape they carry, and
//! publisher API keys.
//!
//! Permissions have one shape wherever they come from (tokens file, `--token`, public mode, a
//! JWT's `tidings` claim): a map from collection name, or `"*"` for any other collection, to
//! `{"events": [...]?, "filter": {...}?, "fields": [...]?}`; an absent key is unrestricted.
//! Turning a permission into predicates happens in [`crate::registry`] at subscribe time.
//!
//! Secrets (static tokens, publish keys) are kept as SHA-256 digests and compared digest to
//! digest in constant time: neither the content nor the length of a guess shows in the timing.

pub mod jwks;
pub mod jwt;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::event::EventKind;
pub use jwt::{JwtError, JwtSettings, JwtVerifier};

/// A secret's SHA-256 digest: what is stored and compared instead of the secret.
type SecretDigest = [u8; 32];

fn digest(secret: &str) -> SecretDigest {
    Sha256::digest(secret.as_bytes()).into()
}

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
    /// The verified claims of the subscriber's JWT, for `$CLAIMS.<name>` in filters; `None`
    /// for static tokens and anonymous connections.
    pub claims: Option<Arc<Map<String, Value>>>,
}

impl Principal {
    /// A principal without claims (static token or code).
    pub fn new(sub: Option<String>, permissions: Permissions) -> Self {
        Principal {
            sub,
            permissions,
            claims: None,
        }
    }

    /// The anonymous principal of public mode.
    pub fn anonymous(permissions: Permissions) -> Self {
        Principal::new(None, permissions)
    }
}

/// Who presented a credential, and until when it holds.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The subscriber and its permissions.
    pub principal: Arc<Principal>,
    /// When the credential stops being valid (a JWT's `exp` plus the allowed clock skew);
    /// `None` for static tokens, which never expire.
    pub expires_at: Option<SystemTime>,
}

/// Why a subscriber credential was refused. Clients only ever see `AUTH_FAILED` / HTTP 401,
/// whatever the variant: telling an unknown token from a badly signed or expired one would
/// help an attacker, so the detail goes to the debug log only.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Neither a static token nor something shaped like a JWT.
    #[error("unknown token")]
    UnknownToken,
    /// Shaped like a JWT, but no JWT verification is configured.
    #[error("a JWT was presented but no JWT key is configured")]
    JwtNotConfigured,
    /// A JWT that failed verification.
    #[error("JWT rejected: {0}")]
    Jwt(#[from] JwtError),
}

/// Authenticates a subscriber's access token: a configured static token first, then, if it
/// is shaped like a JWT (three dot-separated base64url parts), JWT verification.
pub fn authenticate(
    tokens: &TokenStore,
    jwt: Option<&JwtVerifier>,
    token: &str,
) -> Result<Identity, AuthError> {
    if let Some(principal) = tokens.get(token) {
        return Ok(Identity {
            principal,
            expires_at: None,
        });
    }
    if !jwt::looks_like_jwt(token) {
        return Err(AuthError::UnknownToken);
    }
    let verifier = jwt.ok_or(AuthError::JwtNotConfigured)?;
    Ok(verifier.verify(token)?)
}

/// Everything that turns a subscriber's credential into an [`Identity`]: the static tokens,
/// the JWT verifier, and the principals of connections without a (valid) credential. The
/// WebSocket edge holds one; nothing else needs to know where tokens come from.
#[derive(Debug)]
pub struct Authenticator {
    tokens: TokenStore,
    jwt: Option<Arc<JwtVerifier>>,
    /// Refreshes the `--jwks-url` keys for a token with an unknown `kid`.
    jwks: Option<Arc<jwks::JwksFetcher>>,
    /// The public permissions (public mode), shared by every anonymous connection.
    anonymous: Arc<Principal>,
    /// No rights at all: a handshake/strict connection whose token expired, until it
    /// authenticates again.
    nobody: Arc<Principal>,
}

impl Authenticator {
    /// An authenticator over static `tokens`, an optional JWT verifier, and the permissions of
    /// anonymous connections.
    pub fn new(
        tokens: TokenStore,
        jwt: Option<Arc<JwtVerifier>>,
        public_permissions: Permissions,
    ) -> Self {
        Authenticator {
            tokens,
            jwt,
            jwks: None,
            anonymous: Arc::new(Principal::anonymous(public_permissions)),
            nobody: Arc::new(Principal::anonymous(Permissions::default())),
        }
    }

    /// Lets a JWT whose `kid` the `--jwks-url` set lacks trigger a (rate-limited) refresh.
    pub fn with_jwks(mut self, fetcher: Arc<jwks::JwksFetcher>) -> Self {
        self.jwks = Some(fetcher);
        self
    }

    /// Authenticates an access token (see [`authenticate`]). A JWT naming a `kid` the
    /// `--jwks-url` set does not have waits for one refresh of the set (at most
    /// [`jwks::FETCH_TIMEOUT`], and only if the last fetch is older than
    /// `--jwks-min-interval`), then is verified again.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let first = authenticate(&self.tokens, self.jwt.as_deref(), token);
        let retry = matches!(
            first,
            Err(AuthError::Jwt(
                JwtError::NoKey { .. } | JwtError::BadSignature
            ))
        );
        let (Some(verifier), Some(fetcher), true) = (&self.jwt, &self.jwks, retry) else {
            return first;
        };
        match verifier.unknown_remote_kid(token) {
            Some(kid) if fetcher.refresh_for_kid(&kid).await => Ok(verifier.verify(token)?),
            _ => first,
        }
    }

    /// The principal of an unauthenticated connection in public mode.
    pub fn anonymous(&self) -> &Arc<Principal> {
        &self.anonymous
    }

    /// A principal that may read nothing.
    pub fn nobody(&self) -> &Arc<Principal> {
        &self.nobody
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    #[serde(default)]
    sub: Option<String>,
    collections: Permissions,
}

/// Static access tokens, kept as digests and looked up in constant time.
#[derive(Debug, Clone, Default)]
pub struct TokenStore {
    tokens: Vec<(SecretDigest, Arc<Principal>)>,
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
            store.insert(token, Principal::new(entry.sub, entry.collections));
        }
        Ok(store)
    }

    /// Adds or replaces a token.
    pub fn insert(&mut self, token: String, principal: Principal) {
        let digest = digest(&token);
        self.tokens.retain(|(d, _)| *d != digest);
        self.tokens.push((digest, Arc::new(principal)));
    }

    /// True when no token is configured.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The principal of `token`. The guess is hashed and every configured digest compared
    /// in constant time, so the timing reveals neither how much of a guess was right nor how
    /// long the real tokens are.
    pub fn get(&self, token: &str) -> Option<Arc<Principal>> {
        let presented = digest(token);
        let mut found = None;
        for (candidate, principal) in &self.tokens {
            if bool::from(candidate.ct_eq(&presented)) {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// The operator's key for the console and `GET /v1/admin/stats` (`--admin-key`), kept as a
/// digest. It grants the node's figures only: item data always needs a subscriber credential.
#[derive(Debug, Clone)]
pub struct AdminKey(SecretDigest);

/// Shortest accepted `--admin-key`, in bytes.
pub const MIN_ADMIN_KEY: usize = 16;

impl AdminKey {
    /// The key, if it is at least [`MIN_ADMIN_KEY`] bytes long (trimmed).
    pub fn new(key: &str) -> Result<AdminKey, PublishKeyError> {
        let key = key.trim();
        if key.len() < MIN_ADMIN_KEY {
            return Err(PublishKeyError(format!(
                "the admin key must be at least {MIN_ADMIN_KEY} bytes long"
            )));
        }
        Ok(AdminKey(digest(key)))
    }

    /// Whether `presented` is the key (digests compared in constant time).
    pub fn accepts(&self, presented: &str) -> bool {
        bool::from(self.0.ct_eq(&digest(presented)))
    }
}

/// Publisher API keys (`Authorization: Bearer <key>`), each with a name for metrics and
/// logs, kept as digests.
#[derive(Debug, Clone, Default)]
pub struct PublishKeys {
    keys: Vec<(Arc<str>, SecretDigest)>,
}

/// Error in the publish key configuration.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PublishKeyError(String);

/// Longest publish key name (it becomes a metric label value).
pub const MAX_KEY_NAME: usize = 64;

/// A key name: 1–64 letters, digits, `_`, `-` or `.`, not starting with `_` (reserved for the
/// labels Tidings uses itself, such as `_loopback`).
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_KEY_NAME
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl PublishKeys {
    /// Adds a named key. Names and keys must be unique and non-empty.
    pub fn add(&mut self, name: &str, key: &str) -> Result<(), PublishKeyError> {
        if !valid_key_name(name) {
            return Err(PublishKeyError(format!(
                "`{name}` is not a valid key name (1 to {MAX_KEY_NAME} letters, digits, `_`, `-` or `.`, not starting with `_`)"
            )));
        }
        if key.trim().is_empty() {
            return Err(PublishKeyError(format!("key `{name}` is empty")));
        }
        if self.keys.iter().any(|(n, _)| &**n == name) {
            return Err(PublishKeyError(format!(
                "the key name `{name}` is used twice"
            )));
        }
        let digest = digest(key);
        if self.keys.iter().any(|(_, d)| *d == digest) {
            return Err(PublishKeyError(format!(
                "key `{name}` is the same as another key"
            )));
        }
        self.keys.push((Arc::from(name), digest));
        Ok(())
    }

    /// Adds the keys of `--publish-key` values: `NAME=KEY`, or a bare `KEY`, named `default`
    /// if it is the first value and `key<N>` (its 1-based position) otherwise. A value is
    /// read as `NAME=KEY` only when the part before the first `=` is a valid name and the
    /// rest is not empty and not only `=` (so base64 keys with padding stay whole).
    pub fn add_flags<S: AsRef<str>>(&mut self, values: &[S]) -> Result<(), PublishKeyError> {
        for (i, value) in values.iter().enumerate() {
            let value = value.as_ref().trim();
            let named = value.split_once('=').filter(|(name, key)| {
                valid_key_name(name) && !key.is_empty() && !key.bytes().all(|b| b == b'=')
            });
            match named {
                Some((name, key)) => self.add(name, key)?,
                None if i == 0 => self.add("default", value)?,
                None => self.add(&format!("key{}", i + 1), value)?,
            }
        }
        Ok(())
    }

    /// Adds the keys of a `--publish-keys-file`: a JSON object `{"<name>": "<key>"}`.
    pub fn add_json(&mut self, text: &str) -> Result<(), PublishKeyError> {
        let map: serde_json::Map<String, Value> = serde_json::from_str(text)
            .map_err(|e| PublishKeyError(format!("not a JSON object of names to keys: {e}")))?;
        for (name, key) in map {
            let Value::String(key) = key else {
                return Err(PublishKeyError(format!("key `{name}` is not a string")));
            };
            self.add(&name, &key)?;
        }
        Ok(())
    }

    /// True when publishing needs a key.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The name of the configured key equal to `presented`, if any. The presented key is
    /// hashed and compared with every digest in constant time (no early exit), so neither
    /// the position of a match nor the length of the keys shows in the timing.
    pub fn accepts(&self, presented: &str) -> Option<Arc<str>> {
        let presented = digest(presented);
        let mut found = None;
        for (name, key) in &self.keys {
            if bool::from(key.ct_eq(&presented)) {
                found = Some(name.clone());
            }
        }
        found
    }

    /// The configured key names, in configuration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(n, _)| &**n)
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
    fn publish_keys_compare_and_name() {
        let mut keys = PublishKeys::default();
        keys.add_flags(&["k1", "ci=k2", "YWJjZA==", "x=="]).unwrap();
        assert!(keys.required());
        assert_eq!(keys.accepts("k1").as_deref(), Some("default"));
        assert_eq!(keys.accepts("k2").as_deref(), Some("ci"));
        assert_eq!(keys.accepts("YWJjZA==").as_deref(), Some("key3"));
        assert_eq!(keys.accepts("x==").as_deref(), Some("key4"));
        assert!(keys.accepts("k3").is_none());
        assert!(keys.accepts("ci=k2").is_none());
        assert!(keys.accepts("").is_none());
        assert!(!PublishKeys::default().required());
    }

    #[test]
    fn publish_key_errors() {
        let mut keys = PublishKeys::default();
        assert!(keys.add_flags(&["a=k", "a=j"]).is_err());
        let mut keys = PublishKeys::default();
        assert!(keys.add_flags(&["a=k", "b=k"]).is_err());
        let mut keys = PublishKeys::default();
        assert!(keys.add("_loopback", "k").is_err());
        assert!(keys.add("ok", " ").is_err());
        let mut keys = PublishKeys::default();
        keys.add_json(r#"{"app":"s1","cron":"s2"}"#).unwrap();
        assert_eq!(keys.names().collect::<Vec<_>>(), ["app", "cron"]);
        assert!(keys.add_json(r#"{"n":1}"#).is_err());
        assert!(keys.add_json("[]").is_err());
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
