//! Filters: a JSON document `[filter, item, ...]`; the filter (an object, or a string taken
//! as JSONPath) is compiled under the default limits with a subscriber that has a subject
//! and claims, then evaluated against every following item.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use tidings::filter::{CompileContext, Filter, FilterLimits};

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(mut parts)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if parts.is_empty() {
        return;
    }
    let filter = parts.remove(0);
    let limits = FilterLimits::default();
    let claims = json!({"sub": "u1", "tenant": "t1", "tenants": ["t1", "t2"], "org": {"id": 7}});
    let ctx = CompileContext {
        current_user: Some("u1".into()),
        claims: claims.as_object().cloned().map(Arc::new),
    };
    let compiled = match &filter {
        Value::String(expr) => Filter::compile_jsonpath(expr, &limits),
        other => Filter::compile(other, &limits, &ctx),
    };
    let Ok(compiled) = compiled else {
        return;
    };
    let _ = compiled.canonical();
    let _ = compiled.fields();
    let _ = compiled.equality_terms();
    for item in &parts {
        let _ = compiled.matches(item);
    }
});
