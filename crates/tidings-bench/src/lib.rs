//! `tidings bench` (also the `tidings-bench` binary): a load generator for a running broker,
//! in the spirit of `nats bench`. It is a crate of its own, importing nothing from the broker,
//! and speaks to it only over HTTP and WebSocket. This crate owns the scenarios, their flags and defaults, and the course of a run: open and
//! subscribe the connections, publish, wait for the deliveries to drain, and report. The
//! pieces live in submodules: `publisher` (items, batching, pacing), `subscriber`
//! (connections and cheap receivers), `nats` (the same run against a NATS server, for
//! comparison), `seen` (exact duplicate detection), `procstat` (CPU
//! and memory from `/proc`) and `report` (the numbers, as a table or JSON).
//!
//! # Scenarios
//!
//! | scenario | subscribers ask for | each subscriber should get | publishing |
//! | --- | --- | --- | --- |
//! | `broadcast` | the whole collection, every field | every event | `--events` (default 10000) flat out |
//! | `filtered` | `{"tenant_id":{"_eq": i % K}}` (K = `--groups`) | the events with `seq % K == i % K` | as broadcast |
//! | `projection` | every item, `fields: ["seq","ts"]` | every event, two fields | as broadcast |
//! | `connections` | the whole collection | nothing: the connections stay idle for `--settle` s | none |
//! | `latency` | the whole collection | every event | `--rate` (default 400/s) for `--duration` (default 10 s) |
//! | `churn` | the whole collection, then leave (close, reset mid-frame, half-close, silent, reset before `init`) | its `init` | `--rate` (default 100/s) for `--duration` (default 10 s), `--subscribers` workers cycling |
//!
//! Comparing `projection` with `broadcast` gives the cost of projecting per delivery;
//! `connections` gives the broker's memory per idle subscribed connection.
//!
//! Subscriber `i` connects from `127.0.0.(1 + i % M)` with `--source-addrs M`, so that more
//! connections than one source address has ephemeral ports can reach a loopback broker. The
//! generator raises its own open-file soft limit to the hard limit at start.
//!
//! Correctness is checked exactly: every item carries `seq`; a subscriber counts an item it has
//! already received as a duplicate, one its filter excludes as unexpected, and `loss` is what
//! it should have received minus what it did. Items arriving after a higher `seq` are counted
//! as `reordered`, not as errors: the broker keeps each connection in its publish (offset)
//! order, but with `--in-flight` above 1 it may sequence concurrent requests in another order
//! than the generator numbered them. Latency is `receive time - ts`, both read from the same
//! monotonic clock, since the publisher and the receivers are the same process.
//!
//! The generator is not free: receiving a small WebSocket frame costs it about as much CPU
//! (mostly syscalls and wakeups) as sending it costs the broker. On a machine the two share,
//! throughput is bounded by both; `broker_cpu_seconds` per delivery is the number to compare
//! across runs, and `generator_cpu_percent` near 100 per generator core means the generator
//! was (also) the limit.
//!
//! # Comparing with NATS
//!
//! `--nats-ws ws://host:port` points the same run at a `nats-server` with a `websocket`
//! listener (`no_tls: true`) instead of Tidings (module `nats`): subscribers speak the NATS
//! protocol over WebSocket and subscribe by subject (`filtered`: one subject per group), the
//! publisher pipelines single `PUB`s over TCP (`--nats-publish`, `--batch` per `PING`,
//! `--in-flight` `PING`s outstanding), and every delivery is checked as for Tidings. Pass the
//! server's PID as `--broker-pid` for its CPU per delivery.
//!
//! # Examples
//!
//! ```text
//! tidings serve &                                   # the broker, on 127.0.0.1:8080
//! tidings bench broadcast --subscribers 1000 --events 20000 --broker-pid $!
//! tidings bench filtered --subscribers 1000 --groups 10 --events 50000 --batch 100
//! tidings bench projection --subscribers 1000 --events 20000
//! tidings bench connections --subscribers 19000 --source-addrs 4 --settle 5 --broker-pid $!
//! tidings bench latency --subscribers 1000 --rate 400 --duration 30 --json
//! tidings bench churn --subscribers 64 --rate 200 --duration 600 --broker-pid $!
//! tidings bench broadcast --subscribers 1000 --batch 1 --in-flight 32 \
//!     --nats-ws ws://127.0.0.1:8222 --nats-publish 127.0.0.1:4222 --broker-pid $NATS_PID
//! ```
//!
//! # Output
//!
//! A table, or with `--json` one JSON object on stdout whose fields are those of
//! [`Report`] (documented there), with these names: `scenario`, `subscribers`,
//! `groups`, `fields`, `item_bytes`, `batch`, `in_flight`, `rate`, `source_addrs`,
//! `connect_seconds`, `connects_per_second`, `events_published`, `publish_requests`,
//! `publish_errors`, `publish_first_error`, `publish_seconds`, `publish_events_per_second`,
//! `expected_deliveries`, `received_deliveries`, `frames`, `loss`, `duplicates`, `reordered`,
//! `unexpected`, `error_frames`, `subscribers_with_loss`, `closed_connections`, `closes`,
//! `elapsed_seconds`, `deliveries_per_second`, `latency_p50_ms`, `latency_p90_ms`,
//! `latency_p99_ms`, `latency_p999_ms`, `latency_max_ms`, `latency_mean_ms`,
//! `measured_seconds`, `generator_cpu_seconds`, `generator_cpu_percent`,
//! `generator_rss_bytes`, `generator_rss_peak_bytes`, `broker_pid`, `broker_cpu_seconds`,
//! `broker_cpu_percent`, `broker_cpu_us_per_delivery`, `broker_rss_start_bytes`, `broker_rss_end_bytes`,
//! `broker_rss_peak_bytes`, `settle_seconds`, `broker_bytes_per_connection`,
//! `generator_bytes_per_connection`. Numbers that do not apply are `null`. Progress goes to
//! stderr. The exit status is 0 whenever the run completed, even with loss or publish errors
//! (they are in the report); it is non-zero when a flag is invalid or a subscriber cannot
//! connect or subscribe.

pub mod churn;
mod nats;
mod procstat;
mod publisher;
mod report;
mod seen;
mod subscriber;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use procstat::{CpuMark, Proc, RssSampler};
use publisher::{ItemShape, PublishOutcome, PublishPlan};
use subscriber::{Expect, Latencies, Progress, Receiver, SubStats, Target, CONNECT_TIMEOUT};

pub use report::Report;

/// Events published when neither `--events` nor `--duration` is given (except `latency`).
const DEFAULT_EVENTS: u64 = 10_000;
/// `latency`: publishing time when neither `--events` nor `--duration` is given.
const DEFAULT_LATENCY_SECONDS: f64 = 10.0;
/// `latency`: events per second when `--rate` is not given.
const DEFAULT_LATENCY_RATE: f64 = 400.0;
/// How often the driver checks whether every delivery has arrived.
const DRAIN_POLL: Duration = Duration::from_millis(2);
/// How often the connect phase prints its progress on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// File descriptors the generator needs besides the subscribers' sockets.
const SPARE_FDS: u64 = 64;

/// What `tidings bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Every subscriber gets every event, whole.
    Broadcast,
    /// Subscribers in `--groups` groups filter on `tenant_id`; each gets its group's events.
    Filtered,
    /// Every subscriber gets every event, projected to `seq` and `ts`.
    Projection,
    /// Idle subscribed connections: the broker's memory per connection.
    Connections,
    /// A fixed publish rate; latency percentiles.
    Latency,
    /// Connections made and dropped (gracefully and abruptly) while publishing continues.
    Churn,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Broadcast => "broadcast",
            Scenario::Filtered => "filtered",
            Scenario::Projection => "projection",
            Scenario::Connections => "connections",
            Scenario::Latency => "latency",
            Scenario::Churn => "churn",
        }
    }
}

/// Flags of `tidings bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// URL of the broker: `http://host:port`, whose WebSocket endpoint is `ws://host:port` +
    /// `--ws-path`; or that endpoint itself (`ws://host:port/websocket`), from which the HTTP
    /// base is derived.
    #[arg(
        long,
        env = "TIDINGS_HTTP_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Publish to this broker instead (`http://host:port` or its ws:// URL): with a cluster, subscribers on one
    /// node (`--url`) and the publisher on another measure the backplane in between.
    #[arg(long, env = "TIDINGS_BENCH_PUBLISH_URL")]
    pub publish_url: Option<String>,
    /// Path of the broker's WebSocket endpoint.
    #[arg(long, env = "TIDINGS_WS_PATH", default_value = "/websocket")]
    pub ws_path: String,
    /// Collection to subscribe and publish to.
    #[arg(long, env = "TIDINGS_BENCH_COLLECTION", default_value = "bench")]
    pub collection: String,
    /// WebSocket connections, one subscription each.
    #[arg(
        short = 's',
        long,
        env = "TIDINGS_BENCH_SUBSCRIBERS",
        default_value_t = 1000
    )]
    pub subscribers: usize,
    /// Events to publish [default: 10000, or no limit when --duration is given].
    #[arg(short = 'n', long, env = "TIDINGS_BENCH_EVENTS")]
    pub events: Option<u64>,
    /// Publish for this many seconds (with --events too: whichever comes first)
    /// [default for `latency`: 10].
    #[arg(short = 'd', long, env = "TIDINGS_BENCH_DURATION")]
    pub duration: Option<f64>,
    /// Events per second; 0 = flat out [default: 0, for `latency`: 400].
    #[arg(short = 'r', long, env = "TIDINGS_BENCH_RATE")]
    pub rate: Option<f64>,
    /// Most events per publish request. Flat out, 50 keeps HTTP overhead small without making
    /// requests slow; at a fixed rate up to 1000/s every request holds one event anyway.
    #[arg(short = 'b', long, env = "TIDINGS_BENCH_BATCH", default_value_t = 50)]
    pub batch: usize,
    /// Most publish requests outstanding at once (each on its own keep-alive connection).
    #[arg(long, env = "TIDINGS_BENCH_IN_FLIGHT", default_value_t = 4)]
    pub in_flight: usize,
    /// `filtered`: number of `tenant_id` groups K; subscriber i wants `tenant_id == i % K`.
    #[arg(short = 'k', long, env = "TIDINGS_BENCH_GROUPS", default_value_t = 10)]
    pub groups: u64,
    /// Fields per item: seq, ts, id, tenant_id and padding fields f1, f2, …
    #[arg(long, env = "TIDINGS_BENCH_FIELDS", default_value_t = 20)]
    pub fields: usize,
    /// Approximate bytes of JSON per item, reached by sizing the padding fields.
    #[arg(long, env = "TIDINGS_BENCH_ITEM_BYTES", default_value_t = 200)]
    pub item_bytes: usize,
    /// Spread the subscribers' sockets over 127.0.0.1 ..= 127.0.0.M (loopback brokers only),
    /// for more connections than one address has ephemeral ports.
    #[arg(long, env = "TIDINGS_BENCH_SOURCE_ADDRS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_addrs: u8,
    /// Connections being opened (connect, upgrade, subscribe) at once.
    #[arg(long, env = "TIDINGS_BENCH_CONNECT_CONCURRENCY", default_value_t = 100)]
    pub connect_concurrency: usize,
    /// The broker's PID, to report its CPU time and resident memory (read from /proc).
    #[arg(long, env = "TIDINGS_BENCH_BROKER_PID")]
    pub broker_pid: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// `connections`: seconds to hold the idle connections before measuring memory.
    #[arg(long, env = "TIDINGS_BENCH_SETTLE", default_value_t = 5.0)]
    pub settle: f64,
    /// Seconds to wait for outstanding deliveries after the last publish was answered.
    #[arg(long, env = "TIDINGS_BENCH_DRAIN_TIMEOUT", default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Access token for the subscribers (sent as ?access_token=).
    #[arg(long, env = "TIDINGS_TOKEN")]
    pub token: Option<String>,
    /// Publish key (sent as `Authorization: Bearer`).
    #[arg(long, env = "TIDINGS_PUBLISH_KEY")]
    pub publish_key: Option<String>,
    /// Measure a NATS server instead of Tidings, for comparison: subscribers connect to its
    /// WebSocket listener at this URL (`ws://host:port`); `--url` is then unused. Only
    /// `broadcast`, `filtered` (by subject) and `latency`. See `--nats-publish`.
    #[arg(long, env = "TIDINGS_BENCH_NATS_WS")]
    pub nats_ws: Option<String>,
    /// With `--nats-ws`: the NATS server's TCP client listener (`host:port`) the publisher
    /// pipelines `PUB`s to, `--batch` per `PING`, at most `--in-flight` `PING`s unanswered.
    #[arg(
        long,
        env = "TIDINGS_BENCH_NATS_PUBLISH",
        default_value = "127.0.0.1:4222"
    )]
    pub nats_publish: String,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag is invalid, or the machine cannot do what the flags ask.
    #[error("{0}")]
    Usage(String),
    /// A subscriber could not connect or subscribe.
    #[error("{0}")]
    Connect(String),
    /// Something that should not fail did.
    #[error("{0}")]
    Internal(String),
}

/// The run's monotonic time base. Publishers stamp items with [`Clock::now_ns`] and receivers
/// subtract it from their own reading; both are in this process, so no clock sync is involved.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            base: Instant::now(),
        }
    }

    /// Nanoseconds since the base.
    pub fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// Nanoseconds from the base to `at` (0 before the base).
    pub fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Runs `tidings bench` and prints the report.
pub async fn bench(args: BenchArgs) -> Result<(), BenchError> {
    if args.scenario == Scenario::Churn {
        return churn::bench(&args).await;
    }
    let run = Run::new(&args).await?;
    let report = run.execute().await?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

/// A validated run: flags resolved against the scenario's defaults.
struct Run {
    scenario: Scenario,
    subscribers: usize,
    groups: u64,
    fields: usize,
    item_bytes: usize,
    connect_concurrency: usize,
    settle: Duration,
    drain_timeout: Duration,
    broker: Option<Proc>,
    target: Arc<Target>,
    publish: PublishPlan,
    /// `--nats-ws`: the NATS server's publish address and the collection as a subject prefix.
    nats: Option<NatsRun>,
}

/// What a run against NATS (`--nats-ws`) needs besides the common plan.
struct NatsRun {
    publish_addr: String,
    collection: String,
}

impl Run {
    async fn new(args: &BenchArgs) -> Result<Run, BenchError> {
        let usage = |msg: String| Err(BenchError::Usage(msg));
        if args.subscribers == 0 {
            return usage("--subscribers must be at least 1".into());
        }
        if args.batch == 0 || args.in_flight == 0 || args.connect_concurrency == 0 {
            return usage(
                "--batch, --in-flight and --connect-concurrency must be at least 1".into(),
            );
        }
        if args.groups == 0 {
            return usage("--groups must be at least 1".into());
        }
        let seconds = |flag: &str, value: f64, zero_ok: bool| {
            if value.is_finite() && (value > 0.0 || (zero_ok && value == 0.0)) {
                Ok(Duration::from_secs_f64(value))
            } else {
                let least = if zero_ok { "0 or more" } else { "more than 0" };
                Err(BenchError::Usage(format!(
                    "--{flag} must be {least} seconds, not {value}"
                )))
            }
        };
        let settle = seconds("settle", args.settle, true)?;
        let drain_timeout = seconds("drain-timeout", args.drain_timeout, true)?;
        let mut duration = args
            .duration
            .map(|d| seconds("duration", d, false))
            .transpose()?;
        let rate = match (args.rate, args.scenario) {
            (Some(r), _) if !r.is_finite() || r < 0.0 => {
                return usage(format!(
                    "--rate must be 0 or more events per second, not {r}"
                ))
            }
            (Some(r), _) => r,
            (None, Scenario::Latency) => DEFAULT_LATENCY_RATE,
            (None, _) => 0.0,
        };
        let mut events = args.events;
        if events.is_none() && duration.is_none() {
            if args.scenario == Scenario::Latency {
                duration = Some(Duration::from_secs_f64(DEFAULT_LATENCY_SECONDS));
            } else {
                events = Some(DEFAULT_EVENTS);
            }
        }
        let groups = if args.scenario == Scenario::Filtered {
            args.groups
        } else {
            1
        };
        let shape = ItemShape::new(args.fields, args.item_bytes, groups)?;

        let nats = match &args.nats_ws {
            None => None,
            Some(_)
                if !matches!(
                    args.scenario,
                    Scenario::Broadcast | Scenario::Filtered | Scenario::Latency
                ) =>
            {
                return usage(format!(
                    "--nats-ws supports broadcast, filtered and latency, not {}",
                    args.scenario.name()
                ))
            }
            Some(_) => Some(NatsRun {
                publish_addr: args.nats_publish.clone(),
                collection: args.collection.clone(),
            }),
        };
        let url = args.nats_ws.as_deref().unwrap_or(&args.url);
        let broker = parse_broker_url(if nats.is_some() { "nats-ws" } else { "url" }, url)?;
        let publish_base = match &args.publish_url {
            Some(url) => parse_broker_url("publish-url", url)?.http,
            None => broker.http.clone(),
        };
        let authority = broker.authority;
        let ws_path = match (&nats, broker.ws_path.as_deref()) {
            (_, Some(path)) => path,
            (Some(_), None) => "/",
            (None, None) => &args.ws_path,
        };
        let addr = resolve(&authority).await?;
        if args.source_addrs > 1 && !(addr.is_ipv4() && addr.ip().is_loopback()) {
            return usage(format!(
                "--source-addrs only works with an IPv4 loopback broker, not {addr}"
            ));
        }
        if !ws_path.starts_with('/') {
            return usage(format!("--ws-path must start with '/': {ws_path}"));
        }
        let ws_url = subscriber_url(&authority, ws_path, args.token.as_deref());
        check_capacity(args.subscribers, args.in_flight, args.source_addrs)?;

        let broker = args.broker_pid.map(Proc::Pid);
        if let Some(pid) = args.broker_pid {
            if Proc::Pid(pid).memory().is_none() {
                return usage(format!(
                    "--broker-pid {pid}: cannot read /proc/{pid}/status (no such process?)"
                ));
            }
        }
        let collection_json = serde_json::to_string(&args.collection)
            .map_err(|e| BenchError::Internal(e.to_string()))?;
        Ok(Run {
            scenario: args.scenario,
            subscribers: args.subscribers,
            groups,
            fields: args.fields,
            item_bytes: {
                // A typical item: seq 10000, stamped a second into the run.
                let mut item = String::new();
                shape.write_item(&mut item, 10_000, 1_000_000_000);
                item.len()
            },
            connect_concurrency: args.connect_concurrency,
            settle,
            drain_timeout,
            broker,
            target: Arc::new(Target {
                addr,
                ws_url,
                source_addrs: args.source_addrs,
            }),
            publish: PublishPlan {
                uri: format!("{publish_base}/v1/publish"),
                publish_key: args.publish_key.clone(),
                collection_json,
                shape,
                events,
                duration,
                rate,
                batch: args.batch,
                in_flight: args.in_flight,
                groups,
            },
            nats,
        })
    }

    /// The subscribe message of subscriber `index`, and what it should receive.
    fn subscription(&self, index: usize) -> (String, Expect) {
        let collection = &self.publish.collection_json;
        match self.scenario {
            Scenario::Filtered => {
                let group = index as u64 % self.groups;
                (
                    format!(
                        r#"{{"type":"subscribe","collection":{collection},"uid":"b","query":{{"filter":{{"tenant_id":{{"_eq":{group}}}}}}}}}"#
                    ),
                    Expect::Group {
                        groups: self.groups,
                        group,
                    },
                )
            }
            Scenario::Projection => (
                format!(
                    r#"{{"type":"subscribe","collection":{collection},"uid":"b","query":{{"fields":["seq","ts"]}}}}"#
                ),
                Expect::All,
            ),
            Scenario::Broadcast | Scenario::Connections | Scenario::Latency | Scenario::Churn => (
                format!(r#"{{"type":"subscribe","collection":{collection},"uid":"b"}}"#),
                Expect::All,
            ),
        }
    }

    async fn execute(self) -> Result<Report, BenchError> {
        let clock = Clock::new();
        let latencies = Arc::new(Latencies::new().map_err(BenchError::Internal)?);
        let stop = CancellationToken::new();
        let broker_rss_start = self.broker.and_then(Proc::memory).map(|m| m.rss);
        let sampler = self.broker.map(RssSampler::start);
        let generator_rss_start = Proc::SelfProc.memory().map(|m| m.rss);
        let connect_marks = (CpuMark::now(Proc::SelfProc), self.broker.map(CpuMark::now));

        let connect_started = Instant::now();
        let subscribers = self.connect_all(clock, &latencies, &stop).await?;
        let connect_seconds = connect_started.elapsed().as_secs_f64();

        let mut report = Report {
            scenario: self.scenario.name().into(),
            subscribers: self.subscribers as u64,
            groups: self.groups,
            fields: self.fields as u64,
            item_bytes: self.item_bytes as u64,
            batch: self.publish.batch as u64,
            in_flight: self.publish.in_flight as u64,
            rate: self.publish.rate,
            source_addrs: u64::from(self.target.source_addrs),
            connect_seconds: report::round3(connect_seconds),
            connects_per_second: per_second(self.subscribers as u64, connect_seconds),
            broker_pid: self.broker.and_then(|p| match p {
                Proc::Pid(pid) => Some(pid),
                Proc::SelfProc => None,
            }),
            broker_rss_start_bytes: broker_rss_start,
            ..Report::default()
        };

        let (marks, expected) = if self.scenario == Scenario::Connections {
            tokio::time::sleep(self.settle).await;
            report.settle_seconds = Some(self.settle.as_secs_f64());
            (connect_marks, vec![0; self.subscribers])
        } else {
            let marks = (CpuMark::now(Proc::SelfProc), self.broker.map(CpuMark::now));
            let outcome = match &self.nats {
                None => publisher::publish(self.publish.clone(), clock).await?,
                Some(n) => {
                    nats::publish(self.publish.clone(), &n.publish_addr, &n.collection, clock)
                        .await?
                }
            };
            let expected = self
                .drain(&subscribers.progress, &outcome, clock, &mut report)
                .await;
            (marks, expected)
        };
        let end_marks = (CpuMark::now(Proc::SelfProc), self.broker.map(CpuMark::now));
        let broker_memory = self.broker.and_then(Proc::memory);
        let generator_memory = Proc::SelfProc.memory();
        stop.cancel();
        let mut stats = Vec::with_capacity(subscribers.tasks.len());
        for task in subscribers.tasks {
            stats.push(task.await.unwrap_or_default());
        }

        report.measured_seconds =
            report::round3(end_marks.0.at().duration_since(marks.0.at()).as_secs_f64());
        if let Some((cpu, percent)) = marks.0.since(end_marks.0) {
            report.generator_cpu_seconds = Some(report::round3(cpu));
            report.generator_cpu_percent = Some(report::round3(percent));
        }
        if let (Some(start), Some(end)) = (marks.1, end_marks.1) {
            if let Some((cpu, percent)) = start.since(end) {
                report.broker_cpu_seconds = Some(report::round3(cpu));
                report.broker_cpu_percent = Some(report::round3(percent));
            }
        }
        report.generator_rss_bytes = generator_memory.map(|m| m.rss);
        report.generator_rss_peak_bytes = generator_memory.and_then(|m| m.hwm);
        report.broker_rss_end_bytes = broker_memory.map(|m| m.rss);
        report.broker_rss_peak_bytes = sampler.and_then(|s| s.finish(broker_memory.map(|m| m.rss)));
        if self.scenario == Scenario::Connections {
            let per = |start: Option<u64>, end: Option<u64>| {
                Some((end? as f64 - start? as f64) / self.subscribers as f64).map(|b| b.round())
            };
            report.broker_bytes_per_connection = per(broker_rss_start, report.broker_rss_end_bytes);
            report.generator_bytes_per_connection =
                per(generator_rss_start, report.generator_rss_bytes);
        }

        self.tally(&stats, &expected, &mut report);
        if let Some(cpu) = report.broker_cpu_seconds {
            if report.received_deliveries > 0 {
                report.broker_cpu_us_per_delivery = Some(report::round3(
                    cpu * 1e6 / report.received_deliveries as f64,
                ));
            }
        }
        if report.expected_deliveries > 0 || report.received_deliveries > 0 {
            let merged = latencies.merged().map_err(BenchError::Internal)?;
            report.set_latencies(&merged);
        }
        Ok(report)
    }

    /// Opens every subscriber, at most `--connect-concurrency` at a time, and starts its
    /// receiver. Fails, stopping the others, as soon as one cannot connect or subscribe.
    async fn connect_all(
        &self,
        clock: Clock,
        latencies: &Arc<Latencies>,
        stop: &CancellationToken,
    ) -> Result<Subscribers, BenchError> {
        let total = self.subscribers;
        let gate = Arc::new(Semaphore::new(self.connect_concurrency));
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
        let mut progress = Vec::with_capacity(total);
        let mut tasks = Vec::with_capacity(total);
        for index in 0..total {
            let (mut subscribe, expect) = self.subscription(index);
            if let Some(n) = &self.nats {
                subscribe = nats::subscriber_subject(&n.collection, self.groups, index);
            }
            let is_nats = self.nats.is_some();
            let shared = Arc::new(Progress::default());
            progress.push(shared.clone());
            let receiver = Receiver {
                index,
                expect,
                progress: shared,
                latencies: latencies.clone(),
                clock,
                nats: is_nats,
            };
            let (gate, target, ready, stop) = (
                gate.clone(),
                self.target.clone(),
                ready_tx.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let connected = match gate.acquire_owned().await {
                    Ok(_permit) => tokio::time::timeout(CONNECT_TIMEOUT, async {
                        if is_nats {
                            nats::connect(&target, index, &subscribe).await
                        } else {
                            subscriber::connect(&target, index, &subscribe).await
                        }
                    })
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("no subscription init within {CONNECT_TIMEOUT:?}"))
                    }),
                    Err(_) => Err("the run was stopped".into()),
                };
                match connected {
                    Ok(ws) => {
                        let _ = ready.send(Ok(()));
                        receiver.run(ws, stop).await
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        SubStats::default()
                    }
                }
            }));
        }
        drop(ready_tx);

        let mut connected = 0usize;
        let mut next_progress = Instant::now() + PROGRESS_EVERY;
        while connected < total {
            let failure = match ready_rx.recv().await {
                Some(Ok(())) => {
                    connected += 1;
                    if Instant::now() >= next_progress {
                        eprintln!("tidings bench: {connected} of {total} subscribers ready");
                        next_progress = Instant::now() + PROGRESS_EVERY;
                    }
                    continue;
                }
                Some(Err(e)) => e,
                None => "a subscriber task ended unexpectedly".into(),
            };
            stop.cancel();
            gate.close();
            for task in &tasks {
                task.abort();
            }
            return Err(BenchError::Connect(format!(
                "subscriber failed ({connected} of {total} were connected and subscribed): {failure}"
            )));
        }
        Ok(Subscribers { progress, tasks })
    }

    /// Waits until every subscriber that is still connected has what it should, or
    /// `--drain-timeout` after the last publish answer; fills the publish and timing fields.
    async fn drain(
        &self,
        progress: &[Arc<Progress>],
        outcome: &PublishOutcome,
        clock: Clock,
        report: &mut Report,
    ) -> Vec<u64> {
        let expected: Vec<u64> = (0..self.subscribers)
            .map(|i| self.expected_for(i, outcome))
            .collect();
        let deadline = outcome.finished + self.drain_timeout;
        loop {
            let done = progress.iter().zip(&expected).all(|(p, &want)| {
                p.closed.load(Ordering::Relaxed) || p.unique.load(Ordering::Relaxed) >= want
            });
            if done || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let drained = Instant::now();

        let publish_seconds = outcome
            .finished
            .duration_since(outcome.started)
            .as_secs_f64();
        report.events_published = outcome.published;
        report.publish_requests = outcome.requests;
        report.publish_errors = outcome.errors;
        report.publish_first_error = outcome.first_error.clone();
        report.publish_seconds = report::round3(publish_seconds);
        report.publish_events_per_second = per_second(outcome.published, publish_seconds);

        let started_ns = clock.ns_at(outcome.started);
        let last_ns = progress
            .iter()
            .map(|p| p.last_ns.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let end_ns = if last_ns > started_ns {
            last_ns
        } else {
            clock.ns_at(drained)
        };
        report.elapsed_seconds = report::round3((end_ns - started_ns.min(end_ns)) as f64 / 1e9);
        expected
    }

    /// What subscriber `index` should have received, given what the broker accepted.
    fn expected_for(&self, index: usize, outcome: &PublishOutcome) -> u64 {
        match self.scenario {
            Scenario::Connections => 0,
            Scenario::Filtered => {
                let group = index % outcome.per_group.len().max(1);
                outcome.per_group.get(group).copied().unwrap_or(0)
            }
            Scenario::Broadcast | Scenario::Projection | Scenario::Latency | Scenario::Churn => {
                outcome.published
            }
        }
    }

    /// Adds up the receivers' counters into the report; `expected[i]` is what subscriber `i`
    /// should have received.
    fn tally(&self, stats: &[SubStats], expected: &[u64], report: &mut Report) {
        for (s, &want) in stats.iter().zip(expected) {
            report.frames += s.frames;
            report.received_deliveries += s.unique;
            report.duplicates += s.duplicates;
            report.reordered += s.reordered;
            report.unexpected += s.unexpected;
            report.error_frames += s.error_frames;
            report.subscribers_with_loss += u64::from(s.unique < want);
        }
        report.expected_deliveries = expected.iter().sum();
        report.closes = subscriber::count_closes(stats);
        report.closed_connections = report.closes.values().sum();
        report.loss = report
            .expected_deliveries
            .saturating_sub(report.received_deliveries);
        report.deliveries_per_second =
            per_second(report.received_deliveries, report.elapsed_seconds);
    }
}

/// Subscribers that are connected and receiving.
struct Subscribers {
    progress: Vec<Arc<Progress>>,
    tasks: Vec<tokio::task::JoinHandle<SubStats>>,
}

fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        (count as f64 / seconds).round()
    } else {
        0.0
    }
}

/// What `--url` (or `--publish-url`) names: `http://host:port`, or the broker's WebSocket URL
/// `ws://host:port/path`, whose path then overrides `--ws-path`. Only plain HTTP and ws://
/// are spoken (no TLS).
#[derive(Debug, PartialEq, Eq)]
struct BrokerUrl {
    /// `host:port`.
    authority: String,
    /// `http://host:port`.
    http: String,
    /// The WebSocket path a ws:// URL gave.
    ws_path: Option<String>,
}

fn parse_broker_url(flag: &str, url: &str) -> Result<BrokerUrl, BenchError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| BenchError::Usage(format!("--{flag} {url} is not a URL: {e}")))?;
    let ws = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => false,
        Some("ws") => true,
        _ => {
            return Err(BenchError::Usage(format!(
                "--{flag} must be http://host:port or ws://host:port/path (the bench speaks plain \
                 HTTP and WebSocket, no TLS), not {url}"
            )))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| BenchError::Usage(format!("--{flag} {url} has no host")))?;
    let authority = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let path = uri.path().trim_end_matches('/');
    Ok(BrokerUrl {
        http: format!("http://{authority}"),
        authority,
        ws_path: (ws && !path.is_empty()).then(|| path.to_string()),
    })
}

/// The WebSocket URL subscribers connect to, with `?access_token=` (percent-encoded) when
/// a token is given.
fn subscriber_url(authority: &str, ws_path: &str, token: Option<&str>) -> String {
    let url = format!("ws://{authority}{ws_path}");
    match token {
        None => url,
        Some(token) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            let token =
                percent_encoding::utf8_percent_encode(token, percent_encoding::NON_ALPHANUMERIC);
            format!("{url}{sep}access_token={token}")
        }
    }
}

async fn resolve(authority: &str) -> Result<SocketAddr, BenchError> {
    tokio::net::lookup_host(authority)
        .await
        .map_err(|e| BenchError::Connect(format!("cannot resolve {authority}: {e}")))?
        .next()
        .ok_or_else(|| BenchError::Connect(format!("{authority} resolves to no address")))
}

/// Raises the open-file limit as far as allowed and checks that the sockets fit, in file
/// descriptors and in ephemeral ports per source address.
fn check_capacity(
    subscribers: usize,
    in_flight: usize,
    source_addrs: u8,
) -> Result<(), BenchError> {
    let need = subscribers as u64 + in_flight as u64 + SPARE_FDS;
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| BenchError::Internal(format!("cannot raise the open-file limit: {e}")))?;
    if need > limit {
        return Err(BenchError::Usage(format!(
            "{subscribers} subscribers need about {need} open files but this process may only \
             have {limit} (the hard limit); raise it (ulimit -Hn, LimitNOFILE) or use fewer"
        )));
    }
    if let Some(ports) = ephemeral_ports() {
        let available = ports * u64::from(source_addrs);
        if subscribers as u64 > available {
            return Err(BenchError::Usage(format!(
                "{subscribers} subscribers need more local ports than the {ports} ephemeral ports \
                 per source address × {source_addrs} source address(es) = {available}; \
                 use --source-addrs {}",
                (subscribers as u64).div_ceil(ports).min(254)
            )));
        }
    }
    Ok(())
}

/// How many ports `net.ipv4.ip_local_port_range` allows, if readable.
fn ephemeral_ports() -> Option<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = range.split_ascii_whitespace().map(str::parse::<u64>);
    let (low, high) = (bounds.next()?.ok()?, bounds.next()?.ok()?);
    Some(high.saturating_sub(low) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let http = |url: &str| parse_broker_url("url", url).unwrap();
        assert_eq!(
            http("http://127.0.0.1:9000/"),
            BrokerUrl {
                authority: "127.0.0.1:9000".into(),
                http: "http://127.0.0.1:9000".into(),
                ws_path: None,
            }
        );
        assert_eq!(http("http://localhost").authority, "localhost:80");
        // A WebSocket URL gives the same HTTP base, and its path is the endpoint.
        let ws = http("ws://127.0.0.1:9000/websocket");
        assert_eq!(ws.http, "http://127.0.0.1:9000");
        assert_eq!(ws.ws_path.as_deref(), Some("/websocket"));
        assert_eq!(http("ws://127.0.0.1:9000").ws_path, None);
        assert_eq!(
            http("ws://127.0.0.1:9000/rt/").ws_path.as_deref(),
            Some("/rt")
        );
        for bad in ["https://x:1", "wss://x:1", "nope"] {
            let err = parse_broker_url("url", bad).unwrap_err();
            assert!(matches!(err, BenchError::Usage(_)), "{bad}");
            assert!(err.to_string().contains("--url"), "{bad}: {err}");
        }
    }
}
