//! What an operator runs against the broker, checked with the operator's own tools:
//! `promtool check metrics` on a real scrape, `promtool test rules` on the shipped alerts,
//! every metric the dashboard and the rules name against what `/metrics` exports,
//! `kubernetes-validate` on the manifests, and real HTTP answers against `protocol/openapi.yaml`.
//!
//! A missing tool fails the test with how to install it: a check that did not run is never
//! counted as passed.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use support::TestServer;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The path of `tool`, or a failure naming how to get it.
fn tool(name: &str, install: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{name}` is not installed, so this check cannot run (not skipped): {install}")
    })
}

fn promtool() -> PathBuf {
    tool(
        "promtool",
        "`apt-get install prometheus` (Debian) provides it; .ci/run installs it",
    )
}

/// A broker with every labelled family populated: a subscription, a delivery, a publish.
async fn busy_server() -> (TestServer, String) {
    // `messages` retains its items, so the retained-state series exist too.
    let mut config = tidings::Config::default();
    config.state.collections = vec!["messages".into()];
    let server = support::start(config).await;
    let mut ws = server.ws().await;
    ws.send(r#"{"type":"subscribe","collection":"messages","uid":"s1"}"#)
        .await;
    let init = ws.recv().await;
    assert_eq!(init["event"], "init", "{init}");
    server
        .publish(json!({"collection":"messages","event":"create","data":{"id":1,"text":"hi"}}))
        .await;
    let event = ws.recv().await;
    assert_eq!(event["event"], "create", "{event}");
    let (status, metrics) = server.get("/metrics").await;
    assert_eq!(status, 200);
    (server, metrics)
}

fn families(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn promtool_check_metrics_passes_on_a_real_scrape() {
    let promtool = promtool();
    let (_server, metrics) = busy_server().await;
    for name in [
        "tidings_build_info",
        "tidings_config_limit",
        "tidings_history_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(families(&metrics).contains(name), "no {name} in\n{metrics}");
    }
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );
}

#[test]
fn alert_rules_pass_promtool_unit_tests() {
    let promtool = promtool();
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["test", "rules", "deploy/prometheus/alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(repo(""))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_alert_has_a_summary_and_a_runbook_section() {
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let readme = std::fs::read_to_string(repo("deploy/README.md")).unwrap();
    let tests = std::fs::read_to_string(repo("deploy/prometheus/alerts.test.yml")).unwrap();
    let mut alerts = 0;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(alert) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            assert!(
                rule["annotations"]["summary"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{alert} has no summary"
            );
            let anchor = format!("deploy/README.md#{}", alert.to_lowercase());
            assert_eq!(rule["annotations"]["runbook"], anchor.as_str(), "{alert}");
            assert!(
                readme.contains(&format!("### {alert}\n")),
                "deploy/README.md has no runbook section `### {alert}`"
            );
            assert!(
                tests.contains(&format!("alertname: {alert}\n")),
                "alerts.test.yml does not test {alert}"
            );
        }
    }
    assert!(alerts >= 11, "{alerts} alerts");
}

/// Every metric name in a PromQL expression (`tidings_*`, `process_*`, `up`).
fn metric_names(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\b(tidings_[a-z_]+|process_[a-z_]+|up)\b").unwrap();
    re.find_iter(expr)
        // Recording rule names (`tidings:…`) contain colons and are not matched.
        .map(|m| m.as_str().to_owned())
        .collect()
}

fn dashboard_expressions() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/dashboards/tidings.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    exprs
}

fn rule_expressions() -> Vec<String> {
    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn dashboard_and_rules_name_only_exported_metrics() {
    let (_server, metrics) = busy_server().await;
    let families = families(&metrics);
    let dashboard = dashboard_expressions();
    let rules = rule_expressions();
    assert!(dashboard.len() > 30 && rules.len() >= 14);
    let mut named = BTreeSet::new();
    for expr in dashboard.iter().chain(&rules) {
        for name in metric_names(expr) {
            // `up` is Prometheus' own, for every target.
            if name == "up" {
                continue;
            }
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| families.contains(*b)))
                .unwrap_or(&name)
                .to_owned();
            assert!(
                families.contains(&base),
                "`{expr}` names `{name}`, which /metrics does not export"
            );
            named.insert(base);
        }
    }
    // The multi-node series the dashboard once lacked.
    for name in [
        "tidings_backplane_ready",
        "tidings_backplane_reconnects_total",
        "tidings_backplane_epoch_changes_total",
        "tidings_resumes_total",
        "tidings_replayed_frames_total",
        "tidings_auth_rejections_total",
        "tidings_idempotency_evictions_total",
        "tidings_outbox_to_socket_seconds",
    ] {
        assert!(named.contains(name), "nothing shows {name}");
    }
}

#[test]
fn dashboard_is_portable_between_grafanas() {
    let text = std::fs::read_to_string(repo("deploy/grafana/dashboards/tidings.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    assert!(
        !text.contains(r#""uid": "prometheus""#),
        "a hard-coded datasource uid"
    );
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(vars
        .iter()
        .any(|v| v["type"] == "datasource" && v["name"] == "datasource"));
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        assert!(
            panel["fieldConfig"]["defaults"]["unit"].is_string(),
            "{} has no unit",
            panel["title"]
        );
        // No panel mixes a limit with what it limits on one axis.
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["expr"].as_str())
            .collect();
        assert!(
            !(exprs.iter().any(|e| e.starts_with("process_max_fds"))
                && exprs.iter().any(|e| e.starts_with("process_open_fds"))),
            "{}",
            panel["title"]
        );
    }
    let datasource = std::fs::read_to_string(repo(
        "deploy/grafana/provisioning/datasources/prometheus.yaml",
    ))
    .unwrap();
    let scrape = std::fs::read_to_string(repo("deploy/prometheus.yml")).unwrap();
    assert!(datasource.contains("timeInterval: 5s") && scrape.contains("scrape_interval: 5s"));
}

#[test]
fn kubernetes_manifests_validate_strictly() {
    let validate = tool(
        "kubernetes-validate",
        "`pip install kubernetes-validate` (PyPI); .ci/run installs it",
    );
    for manifest in ["deploy/k8s/sidecar.yaml", "deploy/k8s/sidecar-classic.yaml"] {
        let out = Command::new(&validate)
            .args(["--strict", "--kubernetes-version", "1.29", manifest])
            .current_dir(repo(""))
            .output()
            .expect("run kubernetes-validate");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{manifest}: {report}");
        assert_eq!(
            report.matches(" passed for resource ").count(),
            3,
            "{report}"
        );
    }
}

/// The pod spec's Tidings container, whether it sits in `initContainers` (native sidecar) or
/// `containers` (classic), and the spec.
fn tidings_container(manifest: &str) -> (Value, Value, bool) {
    let text = std::fs::read_to_string(repo(manifest)).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["kind"] != "Deployment" {
            continue;
        }
        let spec = doc["spec"]["template"]["spec"].clone();
        for (list, native) in [("initContainers", true), ("containers", false)] {
            if let Some(c) = spec[list]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == "tidings"))
            {
                return (spec.clone(), c.clone(), native);
            }
        }
    }
    panic!("{manifest}: no tidings container");
}

fn env_secs(container: &Value, name: &str) -> u64 {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{name} not set"))
        .parse()
        .unwrap()
}

#[test]
fn manifests_probes_and_grace_period_fit_the_drain() {
    for (manifest, native) in [
        ("deploy/k8s/sidecar.yaml", true),
        ("deploy/k8s/sidecar-classic.yaml", false),
    ] {
        let (spec, c, is_native) = tidings_container(manifest);
        assert_eq!(is_native, native, "{manifest}");
        if native {
            assert_eq!(c["restartPolicy"], "Always", "{manifest}");
            assert_eq!(
                c["startupProbe"]["httpGet"]["path"], "/readyz",
                "{manifest}"
            );
        }
        let delay = env_secs(&c, "TIDINGS_SHUTDOWN_DELAY");
        let timeout = env_secs(&c, "TIDINGS_SHUTDOWN_TIMEOUT");
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(grace > delay + timeout, "{manifest}: grace {grace} s");
        let readiness = &c["readinessProbe"];
        assert_eq!(readiness["httpGet"]["path"], "/readyz", "{manifest}");
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{manifest}"
        );
        // The 503 during the delay is seen by at least one readiness probe.
        let seen_within = readiness["periodSeconds"].as_u64().unwrap()
            * readiness["failureThreshold"].as_u64().unwrap()
            + readiness["timeoutSeconds"].as_u64().unwrap();
        assert!(
            seen_within < delay,
            "{manifest}: readiness notices after {seen_within} s"
        );
    }
}

#[test]
fn compose_binds_loopback_requires_its_secrets_and_waits_for_a_healthy_broker() {
    let text = std::fs::read_to_string(repo("deploy/compose.yaml")).unwrap();
    let compose: Value = serde_yaml::from_str(&text).unwrap();
    let services = compose["services"].as_object().unwrap();
    for (name, service) in services {
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} on every interface"
            );
        }
        for (key, value) in service["environment"].as_object().into_iter().flatten() {
            let value = value.as_str().unwrap_or_default();
            let secret = ["KEY", "PASSWORD", "TOKEN", "SECRET"]
                .iter()
                .any(|s| key.contains(s));
            if secret {
                // Required (`${VAR:?…}`), or empty and refused at start (Redis' profile).
                let required = value.starts_with("${") && value.contains(":?");
                assert!(
                    required || (value.starts_with("${") && value.ends_with(":-}")),
                    "{name}: {key} has a default: {value}"
                );
            }
        }
    }
    assert_eq!(
        services["tidings"]["healthcheck"]["test"],
        json!(["CMD", "/usr/local/bin/tidings", "healthcheck", "--ready"])
    );
    for dependent in ["app", "prometheus"] {
        assert_eq!(
            services[dependent]["depends_on"]["tidings"]["condition"], "service_healthy",
            "{dependent}"
        );
    }
    let dockerfile = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/tidings", "healthcheck", "--ready"]"#));
}

#[test]
fn dockerignore_files_are_identical_and_complete() {
    let root = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    let twin = std::fs::read_to_string(repo("deploy/Dockerfile.dockerignore")).unwrap();
    assert_eq!(root, twin);
    let entries: BTreeSet<&str> = root
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    for needed in [
        ".git/",
        "target/",
        "**/target/",
        "**/node_modules/",
        "tests/sdk/node_modules/",
        "fuzz/target/",
        "fuzz/corpus/",
        "fuzz/artifacts/",
        ".env",
    ] {
        assert!(entries.contains(needed), "missing {needed}");
    }
}

fn healthcheck(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidings"))
        .arg("healthcheck")
        .args(args)
        .env_remove("TIDINGS_LISTEN")
        .output()
        .expect("run tidings healthcheck")
}

#[tokio::test]
async fn healthcheck_subcommand_answers_for_a_real_broker() {
    let mut server = support::start_default().await;
    let addr = server.addr.to_string();
    // As in the image: TIDINGS_LISTEN=0.0.0.0:<port> is checked on loopback.
    let unspecified = format!("0.0.0.0:{}", server.addr.port());
    let out = tokio::task::spawn_blocking(move || {
        (
            healthcheck(&["--listen", &addr]),
            healthcheck(&["--listen", &unspecified, "--ready"]),
        )
    })
    .await
    .unwrap();
    for o in [&out.0, &out.1] {
        assert!(o.status.success(), "{o:?}");
    }
    assert!(String::from_utf8_lossy(&out.1.stdout).contains(r#""status":"ready""#));

    // Draining: not ready, still alive.
    let addr = server.addr.to_string();
    let stopping = server.begin_shutdown();
    let ready = tokio::task::spawn_blocking(move || healthcheck(&["--listen", &addr, "--ready"]))
        .await
        .unwrap();
    let _ = stopping.await;
    if ready.status.success() {
        // The broker may already have closed its port; either way it must not say ready
        // once shutdown began.
        assert!(
            !String::from_utf8_lossy(&ready.stdout).contains(r#""status":"ready""#),
            "{ready:?}"
        );
    }

    // Nothing listening: exit 1 with a message.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let out = tokio::task::spawn_blocking(move || healthcheck(&["--listen", &closed]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!out.stderr.is_empty());
}

/// The `responses` entry of the operation for `method path`, resolved, or None.
fn spec_response(spec: &Value, method: &str, path: &str, status: u16) -> Option<Value> {
    let paths = spec["paths"].as_object().unwrap();
    let operation = paths.iter().find_map(|(template, item)| {
        let t: Vec<&str> = template.split('/').collect();
        let p: Vec<&str> = path.split('?').next().unwrap().split('/').collect();
        let matches =
            t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| t == p || t.starts_with('{'));
        matches.then(|| {
            let operation = &item[method.to_lowercase()];
            // A method the path does not take: its 405 is documented on the path's operations.
            match (operation.is_null(), status) {
                (true, 405) => item
                    .as_object()
                    .and_then(|ops| ops.values().next())
                    .cloned()
                    .unwrap_or(Value::Null),
                _ => operation.clone(),
            }
        })
    })?;
    let mut response = operation["responses"][status.to_string()].clone();
    if let Some(r) = response["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        response = spec["components"]["responses"][name].clone();
    }
    (!response.is_null()).then_some(response)
}

#[tokio::test]
async fn real_http_answers_match_the_openapi_spec() {
    let spec: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("protocol/openapi.yaml")).unwrap())
            .unwrap();
    let server = support::start_default().await;
    let one = br#"{"collection":"orders","event":"create","data":{"id":1}}"#.to_vec();
    let items = br#"{"id":2}"#.to_vec();
    /// Method, path, content type, body, expected status.
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/publish",
            Some("application/json"),
            one.clone(),
            202,
        ),
        (
            "POST",
            "/v1/publish",
            Some("application/json; charset=utf-8"),
            one.clone(),
            202,
        ),
        // CloudEvents' structured mode: the spec accepts every `application/*+json`.
        (
            "POST",
            "/v1/publish",
            Some("application/cloudevents+json"),
            one.clone(),
            202,
        ),
        ("POST", "/v1/publish", Some("text/plain"), one.clone(), 415),
        (
            "POST",
            "/v1/publish",
            Some("application/xml"),
            one.clone(),
            415,
        ),
        ("POST", "/v1/publish", None, one.clone(), 415),
        (
            "POST",
            "/v1/publish",
            Some("application/json"),
            b"{".to_vec(),
            400,
        ),
        (
            "POST",
            "/v1/publish",
            Some("application/json"),
            b"{}".to_vec(),
            422,
        ),
        (
            "POST",
            "/v1/collections/orders/create",
            Some("application/json"),
            items.clone(),
            202,
        ),
        (
            "POST",
            "/v1/collections/orders/update",
            Some("application/json"),
            items.clone(),
            202,
        ),
        (
            "POST",
            "/v1/collections/orders/delete",
            Some("application/json"),
            b"[2]".to_vec(),
            202,
        ),
        (
            "POST",
            "/v1/collections/orders/create",
            Some("text/csv"),
            items.clone(),
            415,
        ),
        ("GET", "/v1/publish", None, vec![], 405),
        (
            "PUT",
            "/v1/collections/orders/create",
            Some("application/json"),
            items,
            405,
        ),
        (
            "PUT",
            "/v1/collections/orders/items",
            Some("application/json"),
            b"[]".to_vec(),
            422,
        ),
        (
            "PUT",
            "/v1/collections/orders/items",
            Some("text/csv"),
            b"[]".to_vec(),
            415,
        ),
        ("GET", "/v1/admin/stats", None, vec![], 200),
        ("POST", "/v1/admin/stats", None, vec![], 405),
        ("POST", "/healthz", None, vec![], 405),
        ("DELETE", "/metrics", None, vec![], 405),
        ("POST", "/websocket", None, vec![], 405),
        ("GET", "/healthz", None, vec![], 200),
        ("GET", "/readyz", None, vec![], 200),
        ("GET", "/websocket", None, vec![], 400),
    ];
    let client = reqwest_like::Client::new();
    for (method, path, content_type, body, expected) in cases {
        let (status, headers, text) = client
            .send(server.addr, method, path, content_type, body)
            .await;
        let what = format!("{method} {path} ({content_type:?})");
        assert_eq!(status, expected, "{what}: {text}");
        let response = spec_response(&spec, method, path, status)
            .unwrap_or_else(|| panic!("{what}: the spec does not list {status}"));
        let media = response["content"]
            .as_object()
            .unwrap_or_else(|| panic!("{what}: no content in the spec's {status}"));
        let (media_type, content) = media.iter().next().unwrap();
        let got_type = headers.get("content-type").cloned().unwrap_or_default();
        assert!(
            got_type.starts_with(media_type.split(';').next().unwrap()),
            "{what}: content-type {got_type}, spec {media_type}"
        );
        if media_type == "application/json" {
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"));
            let schema =
                json!({"$ref": content["schema"]["$ref"], "components": spec["components"]});
            let validator = jsonschema::validator_for(&schema).expect("compile");
            let errors: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "{what}: {value} against {media_type}: {errors:?}"
            );
        }
        if status == 405 {
            assert!(headers.contains_key("allow"), "{what}: 405 without Allow");
        }
    }
}

/// A minimal HTTP/1.1 client over hyper that returns status, headers and body for any method.
mod reqwest_like {
    use std::collections::HashMap;
    use std::net::SocketAddr;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper::Request;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client as Hyper;
    use hyper_util::rt::TokioExecutor;

    pub struct Client(Hyper<HttpConnector, Full<Bytes>>);

    impl Client {
        pub fn new() -> Self {
            Client(Hyper::builder(TokioExecutor::new()).build_http())
        }

        pub async fn send(
            &self,
            addr: SocketAddr,
            method: &str,
            path: &str,
            content_type: Option<&str>,
            body: Vec<u8>,
        ) -> (u16, HashMap<String, String>, String) {
            let mut req = Request::builder()
                .method(method)
                .uri(format!("http://{addr}{path}"));
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            let req = req.body(Full::new(Bytes::from(body))).expect("request");
            let response = tokio::time::timeout(super::support::WAIT, self.0.request(req))
                .await
                .expect("answer in time")
                .expect("answer");
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            (status, headers, String::from_utf8_lossy(&body).into_owned())
        }
    }
}

#[tokio::test]
async fn a_slow_consumer_that_hangs_up_first_is_still_counted_as_one() {
    use futures_util::SinkExt;
    let server = support::start(tidings::Config {
        outbox_messages: 8,
        outbox_bytes: 64 * 1024 * 1024,
        // Far longer than the test: the client hangs up long before a write times out.
        write_timeout: std::time::Duration::from_secs(120),
        ..tidings::Config::default()
    })
    .await;
    let mut stalled = support::raw_ws_small_buffer(&server).await;
    stalled
        .send(tokio_tungstenite::tungstenite::Message::Text(
            r#"{"type":"subscribe","collection":"feed"}"#.into(),
        ))
        .await
        .unwrap();
    // It never reads again: the socket buffers fill, the session blocks in a write, and the
    // outbox overflows behind it.
    let blob = "z".repeat(500_000);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut id = 0;
    while server
        .metric("tidings_outbox_dropped_total")
        .await
        .unwrap_or(0.0)
        == 0.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox never overflowed"
        );
        id += 1;
        server
            .publish(json!({"collection":"feed","event":"create","data":{"id":id,"blob":blob}}))
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The session is stuck in a write (the socket is full), so it has not closed yet.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        server
            .metric("tidings_connections_closed_total{reason=\"slow_consumer\"}")
            .await,
        Some(0.0),
        "the session was not blocked in a write"
    );
    drop(stalled);
    server
        .wait_for_metric(
            "tidings_connections_closed_total{reason=\"slow_consumer\"}",
            1.0,
        )
        .await;
    assert_eq!(
        server.metric("tidings_slow_consumer_closes_total").await,
        Some(1.0)
    );
    assert_eq!(
        server
            .metric("tidings_connections_closed_total{reason=\"error\"}")
            .await,
        Some(0.0)
    );
}
