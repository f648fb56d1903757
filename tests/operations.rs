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
    let server = support::start_default().await;
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
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap())
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
                rule["annotations"]["summary"].as_str().is_some_and(|s| !s.is_empty()),
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
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap())
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
    assert!(!text.contains(r#""uid": "prometheus""#), "a hard-coded datasource uid");
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(vars
        .iter()
        .any(|v| v["type"] == "datasource" && v["name"] == "datasource"));
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
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
        assert_eq!(report.matches(" passed for resource ").count(), 3, "{report}");
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
            assert_eq!(c["startupProbe"]["httpGet"]["path"], "/readyz", "{manifest}");
        }
        let delay = env_secs(&c, "TIDINGS_SHUTDOWN_DELAY");
        let timeout = env_secs(&c, "TIDINGS_SHUTDOWN_TIMEOUT");
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(grace > delay + timeout, "{manifest}: grace {grace} s");
        let readiness = &c["readinessProbe"];
        assert_eq!(readiness["httpGet"]["path"], "/readyz", "{manifest}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{manifest}");
        // The 503 during the delay is seen by at least one readiness probe.
        let seen_within = readiness["periodSeconds"].as_u64().unwrap()
            * readiness["failureThreshold"].as_u64().unwrap()
            + readiness["timeoutSeconds"].as_u64().unwrap();
        assert!(seen_within < delay, "{manifest}: readiness notices after {seen_within} s");
    }
}
