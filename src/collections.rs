//! Per-collection settings: the collections file (`--collections-file`) and its resolution,
//! with the flags as shorthand, into one [`CollectionSettings`] per collection name.
//!
//! This module owns the file's format (`protocol/schemas/config/collections-file.schema.json`
//! is its schema; a test checks that the two agree on every example) and the precedence rule:
//! a field the file sets for a collection wins; a field it leaves out falls back to the flag
//! (`--key-field`, `--state`, `--state-max-items`, `--transitions`, `--slow-consumer-policy`),
//! then to the default. With
//! `"undeclared": "forbid"`, a collection the file does not declare does not exist: a
//! subscribe to it is `FORBIDDEN` (as Directus answers for an unknown collection) and a
//! publish to it is refused, so a typo'd name fails at once instead of waiting forever.
//!
//! A new per-collection setting is one more `Option` field in [`Declared`], one more field in
//! [`CollectionSettings`], one line in [`Shorthand::resolve`] and one property in the schema.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::config::{SlowConsumerPolicy, Transitions};
use crate::event::valid_collection_name;

/// The key field of a collection nothing configures.
pub const DEFAULT_KEY_FIELD: &str = "id";

/// What the broker does with a collection the file does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Undeclared {
    /// Served with the flags' settings (the default, and the only mode without a file).
    #[default]
    Allow,
    /// Refused: subscribe `FORBIDDEN`, publish 404 `UNKNOWN_COLLECTION`.
    Forbid,
}

/// The settings of one collection, resolved from the file and the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionSettings {
    /// The field whose value is an item's key.
    pub key_field: Arc<str>,
    /// Whether the collection retains its items (retained state).
    pub state: bool,
    /// Most items it may retain.
    pub max_items: usize,
    /// How enter/leave transitions reach its subscribers.
    pub transitions: Transitions,
    /// What happens to its slow subscribers as configured (see [`Shorthand::conflates`] for
    /// whether it applies).
    pub slow_consumer_policy: SlowConsumerPolicy,
}

/// One collection as the file declares it: every field optional (absent: the flag's value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// `key_field`.
    pub key_field: Option<String>,
    /// `state`.
    pub state: Option<bool>,
    /// `max_items`.
    pub max_items: Option<usize>,
    /// `transitions`.
    pub transitions: Option<Transitions>,
    /// `indexes`: fields with an equality index (flag: `--state-index COLLECTION.FIELD`).
    pub indexes: Vec<String>,
    /// `slow_consumer_policy`.
    pub slow_consumer_policy: Option<SlowConsumerPolicy>,
}

/// A parsed, validated collections file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionsFile {
    /// Where it was read from (named in messages).
    pub path: PathBuf,
    /// What happens to collections it does not declare.
    pub undeclared: Undeclared,
    /// The declared collections, by name.
    pub collections: BTreeMap<String, Declared>,
}

/// Why a collections file was refused: where in it (a JSON Pointer), and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{problem}", path.display(), match pointer.as_str() { "" => String::new(), p => format!("at {p}: ") })]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// JSON Pointer to the problem (`""`: the whole file).
    pub pointer: String,
    /// What is wrong.
    pub problem: String,
}

/// The keys a declared collection may have (the schema's `properties`).
const COLLECTION_KEYS: [&str; 6] = [
    "key_field",
    "state",
    "max_items",
    "transitions",
    "indexes",
    "slow_consumer_policy",
];

/// `~` and `/` escaped, as a JSON Pointer token (RFC 6901).
fn token(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

impl CollectionsFile {
    /// Reads and validates the file at `path`.
    pub fn read(path: &Path) -> Result<CollectionsFile, FileError> {
        let text = std::fs::read_to_string(path).map_err(|e| FileError {
            path: path.to_owned(),
            pointer: String::new(),
            problem: format!("cannot read it: {e}"),
        })?;
        CollectionsFile::parse(path, &text)
    }

    /// Validates `text` (the content of `path`).
    pub fn parse(path: &Path, text: &str) -> Result<CollectionsFile, FileError> {
        let fail = |pointer: &str, problem: String| FileError {
            path: path.to_owned(),
            pointer: pointer.to_owned(),
            problem,
        };
        let root: Value =
            serde_json::from_str(text).map_err(|e| fail("", format!("not valid JSON: {e}")))?;
        let Value::Object(root) = root else {
            return Err(fail("", "must be a JSON object".into()));
        };
        let mut undeclared = Undeclared::Allow;
        let mut collections = BTreeMap::new();
        let mut saw_collections = false;
        for (key, value) in &root {
            let at = format!("/{}", token(key));
            match key.as_str() {
                // An editor's schema hint.
                "$schema" if value.is_string() => {}
                "undeclared" => {
                    undeclared = match value.as_str() {
                        Some("allow") => Undeclared::Allow,
                        Some("forbid") => Undeclared::Forbid,
                        _ => return Err(fail(&at, "must be \"allow\" or \"forbid\"".into())),
                    }
                }
                "collections" => {
                    saw_collections = true;
                    let Value::Object(map) = value else {
                        return Err(fail(
                            &at,
                            "must be an object from collection name to its settings".into(),
                        ));
                    };
                    for (name, settings) in map {
                        let at = format!("{at}/{}", token(name));
                        if !valid_collection_name(name) {
                            return Err(fail(&at, format!("`{name}` is not a collection name")));
                        }
                        collections.insert(name.clone(), declared(settings, &at, &fail)?);
                    }
                }
                other => {
                    return Err(fail(
                        &at,
                        format!("unknown key `{other}` (expected undeclared, collections)"),
                    ))
                }
            }
        }
        if undeclared == Undeclared::Forbid && !saw_collections {
            return Err(fail(
                "/undeclared",
                "\"forbid\" needs a `collections` object declaring the collections".into(),
            ));
        }
        Ok(CollectionsFile {
            path: path.to_owned(),
            undeclared,
            collections,
        })
    }
}

fn declared(
    settings: &Value,
    at: &str,
    fail: &dyn Fn(&str, String) -> FileError,
) -> Result<Declared, FileError> {
    let Value::Object(fields) = settings else {
        return Err(fail(at, "must be an object (`{}` for the defaults)".into()));
    };
    let mut out = Declared::default();
    for (key, value) in fields {
        let at = format!("{at}/{}", token(key));
        match key.as_str() {
            "key_field" => match value.as_str().map(str::trim) {
                Some(field) if !field.is_empty() => out.key_field = Some(field.to_owned()),
                _ => return Err(fail(&at, "must be a non-empty field name".into())),
            },
            "state" => match value.as_bool() {
                Some(on) => out.state = Some(on),
                None => return Err(fail(&at, "must be true or false".into())),
            },
            "max_items" => match value.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) if n > 0 => out.max_items = Some(n),
                _ => return Err(fail(&at, "must be an integer greater than 0".into())),
            },
            "indexes" => {
                let fields: Option<Vec<String>> = value.as_array().and_then(|list| {
                    list.iter()
                        .map(|f| {
                            f.as_str()
                                .map(str::trim)
                                .filter(|f| !f.is_empty())
                                .map(String::from)
                        })
                        .collect()
                });
                match fields {
                    Some(fields) => out.indexes = fields,
                    None => {
                        return Err(fail(
                            &at,
                            "must be an array of non-empty field names".into(),
                        ))
                    }
                }
            }
            "transitions" => match value.as_str() {
                Some("view") => out.transitions = Some(Transitions::View),
                Some("directus") => out.transitions = Some(Transitions::Directus),
                _ => return Err(fail(&at, "must be \"view\" or \"directus\"".into())),
            },
            "slow_consumer_policy" => match value.as_str() {
                Some("close") => out.slow_consumer_policy = Some(SlowConsumerPolicy::Close),
                Some("conflate") => out.slow_consumer_policy = Some(SlowConsumerPolicy::Conflate),
                _ => return Err(fail(&at, "must be \"close\" or \"conflate\"".into())),
            },
            other => {
                return Err(fail(
                    &at,
                    format!(
                        "unknown setting `{other}` (expected one of {})",
                        COLLECTION_KEYS.join(", ")
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// The flags that are shorthand for per-collection settings, and the file (if any): what
/// [`Shorthand::resolve`] turns into one collection's [`CollectionSettings`].
#[derive(Debug, Clone, Copy)]
pub struct Shorthand<'a> {
    /// `--collections-file`.
    pub file: Option<&'a CollectionsFile>,
    /// `--key-field COLLECTION=FIELD`.
    pub key_fields: &'a HashMap<String, String>,
    /// `--state` (`*`: every collection).
    pub state: &'a [String],
    /// `--state-max-items`.
    pub max_items: usize,
    /// `--transitions`.
    pub transitions: Transitions,
    /// `--slow-consumer-policy`.
    pub slow_consumer_policy: SlowConsumerPolicy,
}

impl<'a> Shorthand<'a> {
    /// The file's declaration of `collection`, if the file declares it.
    fn declared(&self, collection: &str) -> Option<&'a Declared> {
        self.file.and_then(|f| f.collections.get(collection))
    }

    /// Whether `collection` exists for clients: always, unless the file forbids undeclared
    /// collections and does not declare it.
    pub fn exists(&self, collection: &str) -> bool {
        match self.file {
            Some(file) if file.undeclared == Undeclared::Forbid => {
                file.collections.contains_key(collection)
            }
            _ => true,
        }
    }

    /// The key field of `collection` (the file's, else `--key-field`'s, else `id`).
    pub fn key_field(&self, collection: &str) -> &'a str {
        self.declared(collection)
            .and_then(|d| d.key_field.as_deref())
            .or_else(|| self.key_fields.get(collection).map(String::as_str))
            .unwrap_or(DEFAULT_KEY_FIELD)
    }

    /// Whether `collection` retains its items (the file's `state`, else `--state`).
    pub fn retains(&self, collection: &str) -> bool {
        match self.declared(collection).and_then(|d| d.state) {
            Some(on) => on,
            None => {
                self.exists(collection) && self.state.iter().any(|c| c == "*" || c == collection)
            }
        }
    }

    /// Most items `collection` may retain.
    pub fn max_items(&self, collection: &str) -> usize {
        self.declared(collection)
            .and_then(|d| d.max_items)
            .unwrap_or(self.max_items)
    }

    /// How transitions reach `collection`'s subscribers.
    pub fn transitions(&self, collection: &str) -> Transitions {
        self.declared(collection)
            .and_then(|d| d.transitions)
            .unwrap_or(self.transitions)
    }

    /// The slow-consumer policy configured for `collection` (the file's, else the flag's).
    pub fn slow_consumer_policy(&self, collection: &str) -> SlowConsumerPolicy {
        self.declared(collection)
            .and_then(|d| d.slow_consumer_policy)
            .unwrap_or(self.slow_consumer_policy)
    }

    /// Whether `collection`'s slow subscribers are conflated: its policy is `conflate` and
    /// it retains its items (frames of other collections do not carry whole items, so
    /// their subscribers are closed as with `close`).
    pub fn conflates(&self, collection: &str) -> bool {
        self.slow_consumer_policy(collection) == SlowConsumerPolicy::Conflate
            && self.retains(collection)
    }

    /// Whether any collection may retain state (some `--state`, or a file entry with
    /// `"state": true`).
    pub fn any_state(&self) -> bool {
        !self.state.is_empty()
            || self
                .file
                .is_some_and(|f| f.collections.values().any(|d| d.state == Some(true)))
    }

    /// Every setting of `collection`; `None` when it does not exist (undeclared, forbidden).
    pub fn resolve(&self, collection: &str) -> Option<CollectionSettings> {
        self.exists(collection).then(|| CollectionSettings {
            key_field: Arc::from(self.key_field(collection)),
            state: self.retains(collection),
            max_items: self.max_items(collection),
            transitions: self.transitions(collection),
            slow_consumer_policy: self.slow_consumer_policy(collection),
        })
    }

    /// Checks that the flags name no collection the file forbids: a `--state orders` or a
    /// `--key-field orders=…` that the file does not declare would never take effect.
    /// Returns the flag and the message.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let Some(file) = self.file.filter(|f| f.undeclared == Undeclared::Forbid) else {
            return Ok(());
        };
        let undeclared = |flag: &'static str, name: &str| {
            (
                flag,
                format!(
                    "`{name}` is not declared in the collections file {} (\"undeclared\": \"forbid\"): declare it there",
                    file.path.display()
                ),
            )
        };
        if let Some(name) = self.state.iter().find(|c| *c != "*" && !self.exists(c)) {
            return Err(undeclared("state", name));
        }
        let mut keyed: Vec<&String> = self.key_fields.keys().collect();
        keyed.sort();
        if let Some(name) = keyed.into_iter().find(|c| !self.exists(c)) {
            return Err(undeclared("key-field", name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CollectionsFile, FileError> {
        CollectionsFile::parse(Path::new("c.json"), text)
    }

    fn pointer(text: &str) -> String {
        parse(text).unwrap_err().pointer
    }

    #[test]
    fn errors_point_at_the_problem() {
        assert_eq!(pointer("[]"), "");
        assert_eq!(pointer("{"), "");
        assert_eq!(pointer(r#"{"undeclared":"deny"}"#), "/undeclared");
        assert_eq!(pointer(r#"{"undeclared":"forbid"}"#), "/undeclared");
        assert_eq!(pointer(r#"{"colections":{}}"#), "/colections");
        assert_eq!(pointer(r#"{"collections":[]}"#), "/collections");
        assert_eq!(pointer(r#"{"collections":{"a b":{}}}"#), "/collections/a b");
        assert_eq!(
            pointer(r#"{"collections":{"o":{"max_items":0}}}"#),
            "/collections/o/max_items"
        );
        assert_eq!(
            pointer(r#"{"collections":{"o":{"state":"yes"}}}"#),
            "/collections/o/state"
        );
        assert_eq!(
            pointer(r#"{"collections":{"o":{"key_field":""}}}"#),
            "/collections/o/key_field"
        );
        assert_eq!(
            pointer(r#"{"collections":{"o":{"transitions":"both"}}}"#),
            "/collections/o/transitions"
        );
        assert_eq!(
            pointer(r#"{"collections":{"o":{"slow_consumer_policy":"drop"}}}"#),
            "/collections/o/slow_consumer_policy"
        );
        assert_eq!(
            pointer(r#"{"collections":{"o":{"key":"id"}}}"#),
            "/collections/o/key"
        );
        let e = parse(r#"{"collections":{"o":{"max_items":-1}}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.json: at /collections/o/max_items: must be an integer greater than 0"
        );
    }

    #[test]
    fn the_file_wins_and_flags_fill_in() {
        let file = parse(
            r#"{"$schema":"x","undeclared":"forbid","collections":{
                "orders":{"key_field":"order_id","state":true,"max_items":5,"transitions":"directus","slow_consumer_policy":"conflate"},
                "chat":{},
                "logs":{"state":false}}}"#,
        )
        .unwrap();
        let key_fields = HashMap::from([("chat".to_string(), "msg_id".to_string())]);
        let state = vec!["*".to_string()];
        let flags = Shorthand {
            file: Some(&file),
            key_fields: &key_fields,
            state: &state,
            max_items: 100,
            transitions: Transitions::View,
            slow_consumer_policy: SlowConsumerPolicy::Close,
        };
        assert_eq!(
            flags.resolve("orders"),
            Some(CollectionSettings {
                key_field: Arc::from("order_id"),
                state: true,
                max_items: 5,
                transitions: Transitions::Directus,
                slow_consumer_policy: SlowConsumerPolicy::Conflate,
            })
        );
        assert_eq!(
            flags.resolve("chat"),
            Some(CollectionSettings {
                key_field: Arc::from("msg_id"),
                state: true,
                max_items: 100,
                transitions: Transitions::View,
                slow_consumer_policy: SlowConsumerPolicy::Close,
            })
        );
        assert!(!flags.retains("logs"));
        assert!(flags.conflates("orders"));
        assert!(!flags.conflates("chat"), "the flag's close");
        let conflating = Shorthand {
            slow_consumer_policy: SlowConsumerPolicy::Conflate,
            ..flags
        };
        assert!(conflating.conflates("chat"));
        assert!(
            !conflating.conflates("logs"),
            "no state: closed as with close"
        );
        assert_eq!(flags.resolve("ordres"), None);
        assert!(!flags.retains("ordres"));
        assert!(flags.check().is_ok());
        let state = vec!["ordres".to_string()];
        let typo = Shorthand {
            state: &state,
            ..flags
        };
        assert_eq!(typo.check().unwrap_err().0, "state");
        let allow = CollectionsFile {
            undeclared: Undeclared::Allow,
            ..file.clone()
        };
        let open = Shorthand {
            file: Some(&allow),
            ..flags
        };
        assert_eq!(
            open.resolve("other").map(|s| (s.key_field, s.state)),
            Some((Arc::from("id"), true))
        );
    }
}
