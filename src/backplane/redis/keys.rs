//! Names of the cluster's Redis keys, all under `{prefix}:`.
//!
//! Collection names (`A-Z a-z 0-9 _ - .`) and prefixes (letters, digits, `_`, `-`) contain
//! no `:`, so every name below is unambiguous, and a log key maps back to its collection.

/// Every key one cluster uses.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The prefix itself (`--key-prefix`).
    pub prefix: String,
    /// `{prefix}:epoch`: the log's lifetime (12 lowercase alphanumerics).
    pub epoch: String,
    /// `{prefix}:offsets`: hash of collection → last offset taken.
    pub offsets: String,
    /// `{prefix}:collections`: stream announcing each collection when its first event is
    /// written (field `c`), so running nodes start reading its log.
    pub collections: String,
    /// `{prefix}:log:`, followed by a collection name: that collection's stream, whose
    /// entry ids are `<offset>-0` and whose field `e` is the wire form of the event.
    pub log_prefix: String,
    /// `{prefix}:idem:`, followed by `{epoch}:{collection}:{key}`: an idempotency key
    /// remembered for the window, holding its first offset.
    pub idem_prefix: String,
    /// `{prefix}:state:`, followed by a collection name: the retained items of that
    /// collection (hash of item key → entry, see `state::cluster`).
    pub state_prefix: String,
    /// `{prefix}:state-meta:`, followed by a collection name: hash of the items' epoch `e`,
    /// flush offset `s`, and while a base is being written its builder `b` and lease `l`.
    pub state_meta_prefix: String,
}

impl Keys {
    /// The keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
            epoch: format!("{prefix}:epoch"),
            offsets: format!("{prefix}:offsets"),
            collections: format!("{prefix}:collections"),
            log_prefix: format!("{prefix}:log:"),
            idem_prefix: format!("{prefix}:idem:"),
            state_prefix: format!("{prefix}:state:"),
            state_meta_prefix: format!("{prefix}:state-meta:"),
        }
    }

    /// The retained items of `collection`.
    pub fn state(&self, collection: &str) -> String {
        format!("{}{collection}", self.state_prefix)
    }

    /// The flush offset and epoch of `collection`'s retained items.
    pub fn state_meta(&self, collection: &str) -> String {
        format!("{}{collection}", self.state_meta_prefix)
    }

    /// The stream of `collection`.
    pub fn log(&self, collection: &str) -> String {
        format!("{}{collection}", self.log_prefix)
    }

    /// The idempotency key `key` of `collection` within `epoch`. The epoch is part of the
    /// name so a key remembered from an earlier log never answers with one of its offsets.
    pub fn idem(&self, epoch: &str, collection: &str, key: &str) -> String {
        format!("{}{epoch}:{collection}:{key}", self.idem_prefix)
    }

    /// The collection whose stream is `key`, if it is one.
    pub fn collection_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.log_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("t1");
        assert_eq!(k.epoch, "t1:epoch");
        assert_eq!(k.offsets, "t1:offsets");
        assert_eq!(k.collections, "t1:collections");
        assert_eq!(k.log("orders.v2"), "t1:log:orders.v2");
        assert_eq!(k.idem("e", "orders", "a:b"), "t1:idem:e:orders:a:b");
        assert_eq!(k.collection_of("t1:log:orders"), Some("orders"));
        assert_eq!(k.collection_of("t1:collections"), None);
        assert_eq!(k.state("orders"), "t1:state:orders");
        assert_eq!(k.state_meta("orders"), "t1:state-meta:orders");
        assert_eq!(k.collection_of("t1:state:orders"), None);
    }
}
