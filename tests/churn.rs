//! Connection churn beside live publishing, bounded for `cargo test` (the long run is
//! `tidings bench churn`, recorded in BENCHMARKS.md): afterwards connections, subscriptions,
//! groups, outboxes, session tasks and file descriptors are back at their baseline, RSS is
//! within a small margin, and the broker's counters agree with what the clients counted.

mod support;

use std::time::Duration;

use tidings::outbox::Outbox;
use tidings_bench::churn::{run, ChurnPlan};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The sum of every series of `name` in `/metrics`.
async fn metric_sum(server: &support::TestServer, name: &str) -> f64 {
    let (_, text) = server.get("/metrics").await;
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Snapshot {
    connections: f64,
    subscriptions: f64,
    groups_and_members: (usize, usize),
    outboxes: usize,
    sessions: usize,
    fds: usize,
}

async fn snapshot(server: &support::TestServer) -> Snapshot {
    Snapshot {
        connections: metric_sum(server, "tidings_connections").await,
        subscriptions: metric_sum(server, "tidings_subscriptions").await,
        groups_and_members: server.state.registry.counts("churn"),
        outboxes: Outbox::live(),
        sessions: server.state.sessions.len(),
        fds: open_fds(),
    }
}

/// Waits until every connection the run made is gone from the broker.
async fn settle(server: &support::TestServer, baseline_fds: usize) -> Snapshot {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = snapshot(server).await;
        let quiet = s.connections == 0.0
            && s.subscriptions == 0.0
            && s.groups_and_members == (0, 0)
            && s.outboxes == 0
            && s.sessions == 0
            && s.fds <= baseline_fds;
        if quiet || tokio::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn churn_leaves_nothing_behind_and_the_metrics_agree_with_the_clients() {
    let server = support::start_default().await;
    let plan = |seconds: f64| ChurnPlan {
        addr: server.addr,
        ws_url: server.ws_url(),
        publish_uri: format!("http://{}/v1/publish", server.addr),
        publish_key: None,
        collection: "churn".into(),
        workers: 24,
        duration: Duration::from_secs_f64(seconds),
        rate: 200.0,
        silent_for: Duration::from_millis(300),
    };
    // Warm up allocator pools, the HTTP client and the runtime's threads, then measure.
    let warm = run(plan(1.0), |_, _| {}).await;
    assert_eq!(warm.counts.failed, 0, "{:?}", warm.first_error);
    let before = settle(&server, usize::MAX).await;
    assert_eq!(before.connections, 0.0);
    let baseline_fds = before.fds;
    let baseline_rss = rss_kib();
    let opened = metric_sum(&server, "tidings_connections_opened_total").await;
    let closed = metric_sum(&server, "tidings_connections_closed_total").await;
    let published = metric_sum(&server, "tidings_published_events_total").await;

    let report = run(plan(6.0), |_, _| {}).await;
    let c = &report.counts;
    assert_eq!(c.failed, 0, "{:?}", report.first_error);
    assert!(c.cycles >= 200, "only {} cycles in 6 s", c.cycles);
    for (ending, n) in [
        ("close", c.closed),
        ("reset", c.reset),
        ("half_close", c.half_closed),
        ("silent", c.silent),
        ("before_init", c.before_init),
    ] {
        assert!(n > 0, "no {ending} cycles: {c:?}");
    }
    assert!(c.published > 100, "publishing stalled: {c:?}");
    assert_eq!(c.publish_errors, 0);

    let after = settle(&server, baseline_fds).await;
    assert_eq!(after.connections, 0.0, "tidings_connections");
    assert_eq!(after.subscriptions, 0.0, "tidings_subscriptions");
    assert_eq!(after.groups_and_members, (0, 0), "registry groups, members");
    assert_eq!(after.outboxes, 0, "outboxes alive");
    assert_eq!(after.sessions, 0, "session tasks");
    assert!(
        after.fds <= baseline_fds,
        "file descriptors: {} after, {baseline_fds} before",
        after.fds
    );
    let rss = rss_kib();
    // Freed memory is not always returned to the kernel; a leak per connection would show
    // as megabytes over thousands of cycles.
    let margin = (baseline_rss / 4).max(16 * 1024);
    assert!(
        rss <= baseline_rss + margin,
        "RSS {rss} KiB after {} cycles, {baseline_rss} KiB before",
        c.cycles
    );
    let delta = |now: f64, then: f64| (now - then) as u64;
    assert_eq!(
        delta(
            metric_sum(&server, "tidings_connections_opened_total").await,
            opened
        ),
        c.upgraded,
        "connections opened"
    );
    assert_eq!(
        delta(
            metric_sum(&server, "tidings_connections_closed_total").await,
            closed
        ),
        c.upgraded,
        "connections closed"
    );
    assert_eq!(
        delta(
            metric_sum(&server, "tidings_published_events_total").await,
            published
        ),
        c.published,
        "events published"
    );
    assert_eq!(
        c.inits,
        c.upgraded - c.before_init,
        "every other connection got its init"
    );
    eprintln!(
        "churn: {} cycles in {:.1} s ({:.0}/min), RSS {baseline_rss} -> {rss} KiB, fds {baseline_fds} -> {}",
        c.cycles,
        report.elapsed.as_secs_f64(),
        report.cycles_per_minute(),
        after.fds
    );
}
