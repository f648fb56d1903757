//! The TypeScript client in `clients/js`: its unit tests, its integration suite against real
//! `tidings serve` children, and a check that the committed `dist/` is what `tsc` builds from
//! `src/`.
//!
//! The integration suite (`clients/js/test/integration.mjs`, run by `node --test`) starts,
//! restarts and stops brokers through the control API of `tests/support/control.rs`, so that
//! this test owns every process (`tidings serve` children, killed by PID on drop, and a private
//! `redis-server` for the broker-restart test, whose log must outlive the broker).
//!
//! `clients/js/test/conflation.mjs` runs the client on a conflating retained collection
//! through a proxy that stalls it: after the folded frames its list equals the state and it
//! resumes from the checkpoint, missing and repeating nothing.
//!
//! Needs Node.js >= 20 (and npm for the `dist/` check, which installs the pinned `typescript`
//! with `npm ci`): without them the tests fail with `PREREQUISITE MISSING`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::control::{assert_tests_passed, node_test, Control};
use support::services::PrivateRedis;

/// The HS256 secret the brokers of the token test verify (`--jwt-secret`, 32+ bytes).
const JWT_SECRET: &str = "tidings-js-client-test-secret-0123456789";

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join("js")
}

#[test]
fn js_client_unit_tests() {
    node_test(&client_dir(), "test/unit.test.mjs", &[]);
}

/// Every file `tsc` builds from `src/` is in `dist/`, byte for byte, and `dist/` holds nothing
/// else: the committed build is the source's.
#[test]
fn js_client_dist_is_what_tsc_builds() {
    let dir = client_dir();
    support::services::npm_ci(&dir);
    let out = std::env::temp_dir().join(format!(
        "tidings-js-dist-{}",
        support::services::unique_prefix()
    ));
    let built = Command::new(dir.join("node_modules/.bin/tsc"))
        .args(["-p", "tsconfig.json", "--outDir"])
        .arg(&out)
        .current_dir(&dir)
        .output()
        .expect("run tsc");
    assert!(
        built.status.success(),
        "tsc failed:\n{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let list = |d: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let dist = dir.join("dist");
    let names = list(&out);
    assert!(!names.is_empty(), "tsc built nothing");
    assert_eq!(
        list(&dist),
        names,
        "dist/ and the tsc build list different files"
    );
    for name in &names {
        let fresh = std::fs::read(out.join(name)).expect("built file");
        let committed = std::fs::read(dist.join(name)).expect("dist file");
        assert!(
            fresh == committed,
            "dist/{name} is not what tsc builds from src/: run `npm run build` in clients/js"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_integration() {
    support::services::require_node();
    let redis = PrivateRedis::start();
    let control = Control::start(&[]).await;
    let envs = [
        ("TIDINGS_TEST_CONTROL", control.url.clone()),
        ("TIDINGS_TEST_REDIS_URL", redis.url()),
        ("TIDINGS_TEST_JWT_SECRET", JWT_SECRET.to_string()),
    ];
    let stdout =
        tokio::task::block_in_place(|| node_test(&client_dir(), "test/integration.mjs", &envs));
    control.finish();
    assert_tests_passed(
        &stdout,
        &[
            "frames that arrive in one socket read",
            "heartbeat pings are answered",
            "a broker restart loses nothing",
            "an expiring token is renewed",
            "a live view equals the published state",
            "a live view of a retained collection",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_conflation() {
    support::services::require_node();
    let control = Control::start(&[]).await;
    let envs = [("TIDINGS_TEST_CONTROL", control.url.clone())];
    let stdout =
        tokio::task::block_in_place(|| node_test(&client_dir(), "test/conflation.mjs", &envs));
    control.finish();
    // What the stall took and what arrived after it (the suite's `console.log`s).
    for line in stdout
        .lines()
        .filter(|l| l.starts_with("# stalled") || l.starts_with("# after"))
    {
        eprintln!("{line}");
    }
    assert_tests_passed(
        &stdout,
        &["a stalled conflated subscription resumes from its checkpoint"],
    );
}

#[test]
fn without_node_the_js_client_tests_fail_saying_so() {
    for test in [
        "js_client_unit_tests",
        "js_client_dist_is_what_tsc_builds",
        "js_client_integration",
        "js_client_conflation",
    ] {
        support::services::assert_fails_without_prerequisite(test, &[("PATH", "/nonexistent")]);
    }
}
