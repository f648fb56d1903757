//! Asserts that WebSocket traffic matches the wire contract in `protocol/schemas/`.
//!
//! Use from an integration test with:
//! ```ignore
//! #[path = "support/schema.rs"]
//! mod schema;
//!
//! schema::assert_server_message(&frame); // every frame the server sent
//! schema::assert_client_message(&msg);   // every message the test sends, unless it is malformed on purpose
//! ```
//! The schemas are read from disk and compiled once per test binary. On a mismatch the panic
//! names the message, the aggregate schema, and the errors against the per-message schema(s)
//! the message looks like (by its `type`, `status` and `event`).
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use jsonschema::Validator;
use serde_json::Value;

/// The compiled contract of one side of the socket.
struct Contract {
    /// `client` or `server`.
    side: &'static str,
    /// `<side>-message.schema.json`: the message must match exactly one of its branches.
    aggregate: Validator,
    /// `<side>/<name>.schema.json` by name, only used to explain a failure.
    parts: Vec<Part>,
}

/// One per-message schema, with its `oneOf` branches compiled separately so that a failure can
/// say why each branch rejected the message (a bare `oneOf` error says only "none matched").
struct Part {
    name: String,
    whole: Validator,
    branches: Vec<(String, Validator)>,
}

fn read(rel: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("protocol/schemas")
        .join(rel);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn compile(what: &str, schema: &Value) -> Validator {
    jsonschema::validator_for(schema).unwrap_or_else(|e| panic!("{what} does not compile: {e}"))
}

fn part(side: &str, name: String) -> Part {
    let rel = format!("{side}/{name}.schema.json");
    let schema = read(&rel);
    // Each `{"$ref":"#/$defs/X"}` branch of a top-level oneOf, as a schema of its own.
    let branches = schema["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|branch| branch["$ref"].as_str())
        .map(|r| {
            let wrapper = serde_json::json!({
                "$schema": schema["$schema"],
                "$ref": r,
                "$defs": schema["$defs"],
            });
            (r.to_owned(), compile(&format!("{rel} {r}"), &wrapper))
        })
        .collect();
    Part {
        whole: compile(&rel, &schema),
        name,
        branches,
    }
}

fn contract(side: &'static str, cell: &'static OnceLock<Contract>) -> &'static Contract {
    cell.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("protocol/schemas")
            .join(side);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                Some(name.strip_suffix(".schema.json")?.to_owned())
            })
            .collect();
        names.sort();
        let parts = names.into_iter().map(|name| part(side, name)).collect();
        let rel = format!("{side}-message.schema.json");
        Contract {
            side,
            aggregate: compile(&rel, &read(&rel)),
            parts,
        }
    })
}

/// Panics unless `message` is a valid server → client message (`protocol/schemas/server-message.schema.json`).
pub fn assert_server_message(message: &Value) {
    static CELL: OnceLock<Contract> = OnceLock::new();
    check(contract("server", &CELL), message);
}

/// Panics unless `message` is a valid client → server message (`protocol/schemas/client-message.schema.json`).
pub fn assert_client_message(message: &Value) {
    static CELL: OnceLock<Contract> = OnceLock::new();
    check(contract("client", &CELL), message);
}

/// The per-message schema(s) a message presumably meant to be, by its discriminating fields.
fn likely_parts(side: &str, message: &Value) -> Vec<String> {
    let s = |key: &str| message.get(key).and_then(Value::as_str);
    let part = match (side, s("type"), s("status"), s("event")) {
        ("server", Some(_), Some("error"), _) => "error",
        ("server", Some("auth"), _, _) => "auth-ok",
        ("server", Some("subscription"), _, Some("init")) => "subscription-init",
        ("server", Some("subscription"), _, Some("unsubscribe")) => "subscription-unsubscribe",
        ("server", Some("subscription"), _, _) => "subscription-event",
        ("server", Some(t @ ("ping" | "pong")), _, _)
        | ("client", Some(t @ ("auth" | "subscribe" | "unsubscribe" | "ping" | "pong")), _, _) => t,
        _ => return Vec::new(), // unknown shape: explain against every part
    };
    vec![part.to_owned()]
}

fn check(contract: &Contract, message: &Value) {
    if contract.aggregate.is_valid(message) {
        return;
    }
    let side = contract.side;
    let mut report = String::new();
    let likely = likely_parts(side, message);
    for part in &contract.parts {
        if !likely.is_empty() && !likely.contains(&part.name) {
            continue;
        }
        let _ = writeln!(report, "  against {side}/{}.schema.json:", part.name);
        for error in part.whole.iter_errors(message) {
            let _ = writeln!(report, "    at '{}': {error}", error.instance_path);
        }
        for (branch, validator) in &part.branches {
            let _ = writeln!(report, "    oneOf branch {branch}:");
            for error in validator.iter_errors(message) {
                let _ = writeln!(report, "      at '{}': {error}", error.instance_path);
            }
        }
    }
    if likely.is_empty() {
        let _ = writeln!(report, "  (no `type` this side sends; aggregate errors:)");
        for error in contract.aggregate.iter_errors(message) {
            let _ = writeln!(report, "    at '{}': {error}", error.instance_path);
        }
    }
    panic!("{side} message does not match protocol/schemas/{side}-message.schema.json\nmessage: {message}\n{report}");
}
