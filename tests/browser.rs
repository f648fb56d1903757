//! Real-browser tests: Debian's Chromium, headless, driven by `puppeteer-core` (npm, pinned in
//! `tests/browser/package-lock.json`; it never downloads a browser) runs
//! `tests/browser/browser.test.mjs` under `node --test`:
//! - a test page using the built client (`clients/js/dist`) against a real broker: a filtered
//!   live view shows exactly the matching items after random events published over HTTP, and
//!   a live view survives a broker restart (redis engine, resumed, nothing lost);
//! - `/console`: the figures move with traffic, the tail shows published events, the publish
//!   form publishes (and publishes nothing when refused).
//!
//! Screenshots of each page go to `target/browser-artifacts/`. The brokers are `tidings serve`
//! children started through the control API of `tests/support/control.rs`, which also serves
//! the test page and the client.
//!
//! Without Chromium the test skips loudly (`PREREQUISITE MISSING: …` on stderr) and fails under
//! `CI=true`; without Node.js or npm it fails.

mod support;

use std::path::{Path, PathBuf};

use support::control::{assert_tests_passed, node_test, Control};
use support::services::PrivateRedis;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn browser_dir() -> PathBuf {
    repo().join("tests").join("browser")
}

/// Where the screenshots go.
fn artifacts() -> PathBuf {
    repo().join("target").join("browser-artifacts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_and_the_console_work_in_chromium() {
    let Some(chromium) = support::services::require_chromium() else {
        return;
    };
    support::services::npm_ci(&browser_dir());
    let redis = PrivateRedis::start();
    let control = Control::start(&[
        ("pages", browser_dir().join("pages")),
        ("client", repo().join("clients").join("js").join("dist")),
    ])
    .await;
    let envs = [
        ("TIDINGS_TEST_CONTROL", control.url.clone()),
        ("TIDINGS_TEST_REDIS_URL", redis.url()),
        (
            "TIDINGS_TEST_CHROMIUM",
            chromium.to_string_lossy().into_owned(),
        ),
        (
            "TIDINGS_TEST_ARTIFACTS",
            artifacts().to_string_lossy().into_owned(),
        ),
        // puppeteer-core downloads nothing; this keeps any other puppeteer from trying.
        ("PUPPETEER_SKIP_DOWNLOAD", "1".to_string()),
    ];
    let stdout =
        tokio::task::block_in_place(|| node_test(&browser_dir(), "browser.test.mjs", &envs));
    control.finish();
    assert_tests_passed(
        &stdout,
        &[
            "a page with a filtered live view shows exactly the matching items",
            "a live view in a page survives a broker restart",
            "the console: figures move with traffic",
        ],
    );
    for shot in ["live-view.png", "live-view-restart.png", "console.png"] {
        let path = artifacts().join(shot);
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        assert!(size > 1000, "no screenshot at {}", path.display());
    }
    // What the browser saw, for the record (the suite prints `SAW: …` lines).
    for line in stdout.lines().filter(|l| l.contains("SAW: ")) {
        eprintln!("{}", line.trim_start_matches("# "));
    }
}

#[test]
fn without_chromium_the_browser_test_skips_loudly_and_fails_under_ci() {
    support::services::assert_fails_without_prerequisite(
        "the_client_and_the_console_work_in_chromium",
        &[("TIDINGS_TEST_CHROMIUM", "/nonexistent"), ("CI", "true")],
    );
    let (passed, text) = support::services::run_test_alone(
        "the_client_and_the_console_work_in_chromium",
        &[("TIDINGS_TEST_CHROMIUM", "/nonexistent")],
        &["CI"],
    );
    assert!(passed, "outside CI it skips:\n{text}");
    assert!(
        text.contains("PREREQUISITE MISSING: ") && text.contains("SKIPPED"),
        "the skip is loud:\n{text}"
    );
}
