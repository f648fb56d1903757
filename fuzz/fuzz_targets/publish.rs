//! Publish bodies: any JSON through both normalizers (`POST /v1/publish` and
//! `POST /v1/collections/{collection}/{event}`), with the first byte choosing the event kind
//! of the latter.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings::event::{normalize_collection_body, normalize_publish, EventKind};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let key_field = |c: &str| {
        if c == "custom" {
            "uuid".to_string()
        } else {
            "id".to_string()
        }
    };
    if let Err(e) = normalize_publish(value.clone(), &key_field, 1000) {
        assert!(
            e.pointer.is_empty() || e.pointer.starts_with('/'),
            "{}",
            e.pointer
        );
    }
    let kind = EventKind::ALL[usize::from(selector) % 3];
    let _ = normalize_collection_body("orders", kind, value, &key_field);
});
