//! Checks the wire contract in `protocol/` against itself, offline.
//!
//! - Every schema in `protocol/schemas/` is a draft 2020-12 resource whose `$id` mirrors its path
//!   and whose `$ref`s stay inside the file (the two aggregates embed the per-message schemas).
//! - Every example in `protocol/examples/` validates against the schema its file name names, and
//!   every example under `protocol/examples/invalid/` fails it:
//!   - `client/<name>.<case>.json` → `schemas/client/<name>.schema.json`, and also
//!     `schemas/client-message.schema.json`;
//!   - `server/<name>.<case>.json` → `schemas/server/<name>.schema.json`, and also
//!     `schemas/server-message.schema.json`;
//!   - `config/<name>.<case>.json` → `schemas/config/<name>.schema.json` (configuration files
//!     such as `--collections-file`), and the broker's own parser gives the same verdict;
//!   - `http/<name>.<case>.json` → the OpenAPI component `#/components/schemas/<Name>` of
//!     `openapi.yaml` (kebab-case → `PascalCase`: `publish-request` → `PublishRequest`).
//!
//!   `<name>` is the file name up to its first dot; `.<case>` is optional.
//! - Every schema file, and every component an operation uses directly, has a valid example;
//!   no file under `protocol/examples/` is left unmapped.
//! - Server examples list their keys in wire order: `type`, `event`/`status`, `data`/`error`, `meta`, `uid`,
//!   then the extensions `position`, `recovered`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{json, Value};

/// Base of every schema `$id`: `<base><path under protocol/schemas>`.
const SCHEMA_BASE: &str = "https://tidings.example/protocol/schemas/";
const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";
/// The two sides of the WebSocket, each with a directory of schemas and an aggregate.
const WS_SIDES: [&str; 2] = ["client", "server"];

fn protocol_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol")
}

/// Files under `dir`, as sorted `/`-separated paths relative to `dir`.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("path under root");
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn read_text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read_text(path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every schema file, keyed by its path under `protocol/schemas/`.
fn schema_files() -> BTreeMap<String, Value> {
    let dir = protocol_dir().join("schemas");
    files_under(&dir)
        .into_iter()
        .map(|rel| (rel.clone(), read_json(&dir.join(&rel))))
        .collect()
}

fn compile(what: &str, schema: &Value) -> jsonschema::Validator {
    jsonschema::validator_for(schema).unwrap_or_else(|e| panic!("{what} does not compile: {e}"))
}

/// Validation errors, one line each, with the instance location.
fn errors_of(validator: &jsonschema::Validator, value: &Value) -> Vec<String> {
    validator
        .iter_errors(value)
        .map(|e| format!("at '{}': {e}", e.instance_path))
        .collect()
}

/// One file under `protocol/examples/`.
struct Example {
    /// Path under `protocol/examples/`, for messages.
    rel: String,
    /// `client`, `server` or `http`.
    side: String,
    /// File name up to its first dot: the schema (or kebab-case component) it is an instance of.
    name: String,
    /// False under `invalid/`: the example must fail its schema.
    valid: bool,
    text: String,
    value: Value,
}

fn examples() -> Vec<Example> {
    let dir = protocol_dir().join("examples");
    let mut out = Vec::new();
    for rel in files_under(&dir) {
        let parts: Vec<&str> = rel.split('/').collect();
        let (valid, side, file) = match parts.as_slice() {
            [side, file] => (true, side.to_string(), *file),
            ["invalid", side, file] => (false, side.to_string(), *file),
            _ => panic!("examples/{rel}: expected <side>/<file> or invalid/<side>/<file>"),
        };
        assert!(
            matches!(side.as_str(), "client" | "server" | "http" | "config"),
            "examples/{rel}: unknown side {side:?} (client, server, http, config)"
        );
        assert!(
            file.ends_with(".json"),
            "examples/{rel}: examples are .json files"
        );
        let name = file.split('.').next().unwrap_or_default().to_owned();
        let text = read_text(&dir.join(&rel));
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("examples/{rel} is not JSON: {e}"));
        out.push(Example {
            rel,
            side,
            name,
            valid,
            text,
            value,
        });
    }
    assert!(!out.is_empty(), "no examples found under {}", dir.display());
    out
}

/// `publish-request` → `PublishRequest`.
fn pascal_case(kebab: &str) -> String {
    kebab
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

fn openapi() -> Value {
    let path = protocol_dir().join("openapi.yaml");
    serde_yaml::from_str(&read_text(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A validator for `#/components/schemas/<name>`: the components sit beside a root `$ref`, so
/// every `#/components/...` reference inside them resolves in the same document.
fn component_validator(openapi: &Value, name: &str) -> jsonschema::Validator {
    let schema = json!({
        "$schema": DRAFT_2020_12,
        "$ref": format!("#/components/schemas/{name}"),
        "components": openapi["components"],
    });
    compile(&format!("openapi component {name}"), &schema)
}

/// Every string value of a `$ref` key anywhere in `value`.
fn refs_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs_in(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs_in(v, out)),
        _ => {}
    }
}

fn fail_with(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn schema_files_are_self_contained_2020_12_resources() {
    let schemas = schema_files();
    let mut failures = Vec::new();
    for (rel, schema) in &schemas {
        if !rel.ends_with(".schema.json") {
            failures.push(format!(
                "schemas/{rel}: schema files are named <name>.schema.json"
            ));
            continue;
        }
        if schema["$schema"] != DRAFT_2020_12 {
            failures.push(format!("schemas/{rel}: $schema must be {DRAFT_2020_12}"));
        }
        if schema["$id"] != format!("{SCHEMA_BASE}{rel}").as_str() {
            failures.push(format!("schemas/{rel}: $id must be {SCHEMA_BASE}{rel}"));
        }
        // Only fragment refs, except that an aggregate refers to the schemas it embeds.
        let embedded: BTreeSet<String> = schema["$defs"]
            .as_object()
            .map(|defs| {
                defs.values()
                    .filter_map(|d| d["$id"].as_str())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let mut refs = Vec::new();
        refs_in(schema, &mut refs);
        for r in refs {
            if !r.starts_with("#/$defs/") && !embedded.contains(&format!("{SCHEMA_BASE}{r}")) {
                failures.push(format!("schemas/{rel}: $ref {r:?} leaves the file"));
            }
        }
        compile(&format!("schemas/{rel}"), schema);
    }
    for side in WS_SIDES {
        assert!(
            schemas.contains_key(&format!("{side}-message.schema.json")),
            "missing {side}-message.schema.json"
        );
    }
    fail_with(&failures);
}

#[test]
fn aggregates_embed_every_message_schema_verbatim() {
    let schemas = schema_files();
    let mut failures = Vec::new();
    for side in WS_SIDES {
        let aggregate = &schemas[&format!("{side}-message.schema.json")];
        let prefix = format!("{side}/");
        let parts: BTreeMap<&str, &Value> = schemas
            .iter()
            .filter_map(|(rel, v)| {
                Some((rel.strip_prefix(&prefix)?.strip_suffix(".schema.json")?, v))
            })
            .collect();
        let defs = aggregate["$defs"].as_object().expect("aggregate $defs");
        let def_names: BTreeSet<&str> = defs.keys().map(String::as_str).collect();
        let part_names: BTreeSet<&str> = parts.keys().copied().collect();
        if def_names != part_names {
            failures.push(format!(
                "{side}-message $defs {def_names:?} != files in schemas/{side}/ {part_names:?}"
            ));
        }
        for (name, part) in &parts {
            if defs.get(*name) != Some(*part) {
                failures.push(format!("{side}-message $defs/{name} is not a verbatim copy of schemas/{side}/{name}.schema.json"));
            }
        }
        let one_of: BTreeSet<&str> = aggregate["oneOf"]
            .as_array()
            .expect("aggregate oneOf")
            .iter()
            .filter_map(|b| b["$ref"].as_str())
            .collect();
        let expected: BTreeSet<String> = part_names
            .iter()
            .map(|n| format!("{side}/{n}.schema.json"))
            .collect();
        if one_of != expected.iter().map(String::as_str).collect() {
            failures.push(format!("{side}-message oneOf {one_of:?} != {expected:?}"));
        }
    }
    fail_with(&failures);
}

#[test]
fn shared_defs_agree_across_schema_files() {
    let mut seen: BTreeMap<String, (String, Value)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (rel, schema) in schema_files() {
        if rel.ends_with("-message.schema.json") {
            continue; // aggregates: checked verbatim above
        }
        for (name, def) in schema["$defs"].as_object().into_iter().flatten() {
            match seen.get(name) {
                Some((first, value)) if value != def => failures.push(format!(
                    "$defs/{name} differs between schemas/{first} and schemas/{rel}"
                )),
                Some(_) => {}
                None => {
                    seen.insert(name.clone(), (rel.clone(), def.clone()));
                }
            }
        }
    }
    fail_with(&failures);
}

/// Configuration files: each example matches its schema (or, under `invalid/`, does not), and
/// the broker's parser accepts exactly the valid ones, so the schema tells the truth.
#[test]
fn config_examples_match_their_schema_and_the_parser() {
    let schemas = schema_files();
    let mut failures = Vec::new();
    let mut checked = 0;
    for ex in examples().iter().filter(|e| e.side == "config") {
        let own = format!("config/{}.schema.json", ex.name);
        let Some(schema) = schemas.get(&own) else {
            failures.push(format!("examples/{}: no schema schemas/{own}", ex.rel));
            continue;
        };
        let errors = errors_of(&compile(&own, schema), &ex.value);
        if ex.valid != errors.is_empty() {
            failures.push(format!(
                "examples/{}: valid={} but schemas/{own} says {errors:?}",
                ex.rel, ex.valid
            ));
        }
        let parsed = match ex.name.as_str() {
            "collections-file" => {
                tidings::collections::CollectionsFile::parse(Path::new(&ex.rel), &ex.text)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            other => {
                failures.push(format!("examples/{}: no parser for {other}", ex.rel));
                continue;
            }
        };
        if ex.valid != parsed.is_ok() {
            failures.push(format!(
                "examples/{}: valid={} but the broker's parser says {parsed:?}",
                ex.rel, ex.valid
            ));
        }
        checked += 1;
    }
    assert!(checked > 0, "no configuration examples");
    fail_with(&failures);
}

#[test]
fn ws_examples_match_their_schema_and_the_aggregate() {
    let schemas = schema_files();
    let mut validators: BTreeMap<String, jsonschema::Validator> = BTreeMap::new();
    for (rel, schema) in &schemas {
        validators.insert(rel.clone(), compile(rel, schema));
    }
    let mut failures = Vec::new();
    let mut checked = 0;
    for ex in examples()
        .iter()
        .filter(|e| WS_SIDES.contains(&e.side.as_str()))
    {
        let own = format!("{}/{}.schema.json", ex.side, ex.name);
        let Some(own_validator) = validators.get(&own) else {
            failures.push(format!("examples/{}: no schema schemas/{own}", ex.rel));
            continue;
        };
        let aggregate = format!("{}-message.schema.json", ex.side);
        for (schema_rel, validator) in
            [(&own, own_validator), (&aggregate, &validators[&aggregate])]
        {
            let errors = errors_of(validator, &ex.value);
            match (ex.valid, errors.is_empty()) {
                (true, false) => failures.push(format!(
                    "examples/{} should match schemas/{schema_rel}:\n    {}",
                    ex.rel,
                    errors.join("\n    ")
                )),
                (false, true) => failures.push(format!(
                    "examples/{} should NOT match schemas/{schema_rel}",
                    ex.rel
                )),
                _ => {}
            }
        }
        checked += 1;
    }
    assert!(checked > 0, "no WebSocket examples");
    fail_with(&failures);
}

/// The top-level keys of a JSON object, in document order (`serde_json::Value` sorts them).
struct TopLevelKeys(Vec<String>);

impl<'de> Deserialize<'de> for TopLevelKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeysVisitor;
        impl<'de> Visitor<'de> for KeysVisitor {
            type Value = TopLevelKeys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevelKeys, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(TopLevelKeys(keys))
            }
        }
        deserializer.deserialize_map(KeysVisitor)
    }
}

#[test]
fn server_examples_use_the_wire_key_order() {
    fn rank(key: &str) -> Option<u8> {
        match key {
            "type" => Some(0),
            "event" | "status" => Some(1),
            "data" | "error" => Some(2),
            "meta" => Some(3),
            "uid" => Some(4),
            "position" => Some(5),
            "recovered" => Some(6),
            _ => None,
        }
    }
    let mut failures = Vec::new();
    for ex in examples().iter().filter(|e| e.side == "server" && e.valid) {
        let TopLevelKeys(keys) =
            serde_json::from_str(&ex.text).unwrap_or_else(|e| panic!("examples/{}: {e}", ex.rel));
        let ranks: Vec<Option<u8>> = keys.iter().map(|k| rank(k)).collect();
        if ranks.iter().any(Option::is_none) || ranks.windows(2).any(|w| w[0] >= w[1]) {
            failures.push(format!("examples/{}: keys {keys:?} are not in wire order type, event|status, data|error, meta, uid, position, recovered", ex.rel));
        }
    }
    fail_with(&failures);
}

#[test]
fn http_examples_match_their_openapi_component() {
    let openapi = openapi();
    let components = openapi["components"]["schemas"]
        .as_object()
        .expect("components.schemas");
    let mut validators: BTreeMap<String, jsonschema::Validator> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for ex in examples().iter().filter(|e| e.side == "http") {
        let component = pascal_case(&ex.name);
        if !components.contains_key(&component) {
            failures.push(format!(
                "examples/{}: no component #/components/schemas/{component}",
                ex.rel
            ));
            continue;
        }
        let validator = validators
            .entry(component.clone())
            .or_insert_with(|| component_validator(&openapi, &component));
        let errors = errors_of(validator, &ex.value);
        match (ex.valid, errors.is_empty()) {
            (true, false) => failures.push(format!(
                "examples/{} should match {component}:\n    {}",
                ex.rel,
                errors.join("\n    ")
            )),
            (false, true) => {
                failures.push(format!("examples/{} should NOT match {component}", ex.rel));
            }
            _ => {}
        }
        checked += 1;
    }
    assert!(checked > 0, "no HTTP examples");
    fail_with(&failures);
}

#[test]
fn every_schema_and_operation_component_has_a_valid_example() {
    let examples = examples();
    let mut failures = Vec::new();

    let used: BTreeSet<String> = examples
        .iter()
        .filter(|e| e.valid && e.side != "http")
        .map(|e| format!("{}/{}.schema.json", e.side, e.name))
        .collect();
    for rel in schema_files().keys() {
        let is_aggregate = WS_SIDES
            .iter()
            .any(|side| rel == &format!("{side}-message.schema.json"));
        // Aggregates are used by every WebSocket example.
        if !is_aggregate && !used.contains(rel) {
            failures.push(format!(
                "schemas/{rel} has no valid example in examples/{}",
                rel.split('/').next().unwrap_or("")
            ));
        }
    }

    // Components that a request body or a response of some operation points at directly.
    let openapi = openapi();
    let mut direct = BTreeSet::new();
    for item in openapi["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("path item").values() {
            let mut bodies = vec![op["requestBody"].clone()];
            for response in op["responses"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, r)| r)
            {
                let resolved = match response["$ref"].as_str() {
                    Some(r) => {
                        let name = r.rsplit('/').next().unwrap_or_default();
                        openapi["components"]["responses"][name].clone()
                    }
                    None => response.clone(),
                };
                bodies.push(resolved);
            }
            for media in bodies
                .iter()
                .filter_map(|b| b["content"].as_object())
                .flat_map(|c| c.values())
            {
                if let Some(r) = media["schema"]["$ref"].as_str() {
                    direct.insert(r.rsplit('/').next().unwrap_or_default().to_owned());
                }
            }
        }
    }
    assert!(
        !direct.is_empty(),
        "no operation refers to a component schema"
    );
    let used_components: BTreeSet<String> = examples
        .iter()
        .filter(|e| e.valid && e.side == "http")
        .map(|e| pascal_case(&e.name))
        .collect();
    for component in direct.difference(&used_components) {
        failures.push(format!(
            "component {component} (used by an operation) has no valid example in examples/http"
        ));
    }
    fail_with(&failures);
}

#[test]
fn openapi_is_3_1_with_resolvable_local_refs() {
    let openapi = openapi();
    assert!(
        openapi["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "openapi.yaml must be OpenAPI 3.1.x"
    );
    assert_eq!(
        openapi["jsonSchemaDialect"], DRAFT_2020_12,
        "jsonSchemaDialect"
    );
    let mut failures = Vec::new();
    let mut refs = Vec::new();
    refs_in(&openapi, &mut refs);
    for r in refs {
        match r.strip_prefix('#') {
            Some(pointer) if openapi.pointer(pointer).is_some() => {}
            _ => failures.push(format!(
                "openapi.yaml: $ref {r:?} does not resolve inside the document"
            )),
        }
    }
    // `externalValue` examples point at files next to the document.
    let mut stack = vec![&openapi];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(file)) = map.get("externalValue") {
                    if !protocol_dir().join(file).is_file() {
                        failures.push(format!(
                            "openapi.yaml: externalValue {file:?} is not a file under protocol/"
                        ));
                    }
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    for name in openapi["components"]["schemas"]
        .as_object()
        .expect("components.schemas")
        .keys()
    {
        component_validator(&openapi, name);
    }
    fail_with(&failures);
}
