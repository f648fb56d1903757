//! The result of a `tidings bench` run: one [`Report`] with every number, printed as a table
//! for people or as one JSON object (`--json`) for scripts. The JSON field names are stable and
//! documented on the module `bench`; a number that does not apply to the run (no broker PID, no
//! deliveries, not the `connections` scenario) is `null` in JSON and left out of the table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Everything a run measured; the JSON output has exactly these fields, under these names.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// `broadcast`, `filtered`, `projection`, `connections` or `latency`.
    pub scenario: String,
    /// WebSocket connections, one subscription each.
    pub subscribers: u64,
    /// `tenant_id` groups (`--groups` in `filtered`, else 1).
    pub groups: u64,
    /// Fields per published item.
    pub fields: u64,
    /// Bytes of JSON of a typical published item (seq 10000, stamped a second into the run).
    pub item_bytes: u64,
    /// Most events per publish request.
    pub batch: u64,
    /// Most publish requests outstanding at once.
    pub in_flight: u64,
    /// Target events per second; 0 = flat out.
    pub rate: f64,
    /// Loopback source addresses the connections were spread over.
    pub source_addrs: u64,

    /// Time to connect and subscribe every subscriber (until the last `init`).
    pub connect_seconds: f64,
    /// `subscribers / connect_seconds`.
    pub connects_per_second: f64,

    /// Events the broker accepted (2xx answers).
    pub events_published: u64,
    /// Publish requests sent.
    pub publish_requests: u64,
    /// Publish requests that failed (not 2xx, or no answer).
    pub publish_errors: u64,
    /// The first publish failure, if any.
    pub publish_first_error: Option<String>,
    /// From the first publish request to the last answer.
    pub publish_seconds: f64,
    /// `events_published / publish_seconds`.
    pub publish_events_per_second: f64,

    /// Items the subscribers should have received, from what was accepted.
    pub expected_deliveries: u64,
    /// Expected items received once, in order.
    pub received_deliveries: u64,
    /// Event frames received (duplicates included).
    pub frames: u64,
    /// `expected_deliveries - received_deliveries`.
    pub loss: u64,
    /// Items a subscriber received more than once.
    pub duplicates: u64,
    /// Items that arrived after one with a higher `seq` on the same connection (expected with
    /// `--in-flight` above 1: the broker orders by publish offset, not by `seq`).
    pub reordered: u64,
    /// Items a subscriber's filter should have excluded.
    pub unexpected: u64,
    /// Error frames received after subscribing.
    pub error_frames: u64,
    /// Subscribers that received fewer items than expected.
    pub subscribers_with_loss: u64,
    /// Connections that ended before the run did.
    pub closed_connections: u64,
    /// How many connections ended early, by reason (e.g. `4008 slow consumer: outbox full`).
    pub closes: BTreeMap<String, u64>,

    /// From the first publish request to the last delivery.
    pub elapsed_seconds: f64,
    /// `received_deliveries / elapsed_seconds`.
    pub deliveries_per_second: f64,

    /// Publish-to-receive latency, median, in milliseconds.
    pub latency_p50_ms: Option<f64>,
    /// Latency, 90th percentile, ms.
    pub latency_p90_ms: Option<f64>,
    /// Latency, 99th percentile, ms.
    pub latency_p99_ms: Option<f64>,
    /// Latency, 99.9th percentile, ms.
    pub latency_p999_ms: Option<f64>,
    /// Latency, largest, ms.
    pub latency_max_ms: Option<f64>,
    /// Latency, mean, ms.
    pub latency_mean_ms: Option<f64>,

    /// Wall time over which CPU is measured: first publish to end of the drain (`connections`: first connect to end of the settle).
    pub measured_seconds: f64,
    /// User + system CPU of the generator over `measured_seconds`.
    pub generator_cpu_seconds: Option<f64>,
    /// `generator_cpu_seconds` as a percentage of one core.
    pub generator_cpu_percent: Option<f64>,
    /// Generator resident memory at the end.
    pub generator_rss_bytes: Option<u64>,
    /// Generator peak resident memory (`VmHWM`).
    pub generator_rss_peak_bytes: Option<u64>,

    /// `--broker-pid`.
    pub broker_pid: Option<u32>,
    /// User + system CPU of the broker over `measured_seconds`.
    pub broker_cpu_seconds: Option<f64>,
    /// `broker_cpu_seconds` as a percentage of one core.
    pub broker_cpu_percent: Option<f64>,
    /// `broker_cpu_seconds` per received delivery, in microseconds: the cost that stays
    /// comparable across runs on a shared machine (it counts the broker's whole CPU over the
    /// measured span, HTTP and backplane included).
    pub broker_cpu_us_per_delivery: Option<f64>,
    /// Broker resident memory before the first connection.
    pub broker_rss_start_bytes: Option<u64>,
    /// Broker resident memory at the end (`connections`: after the settle).
    pub broker_rss_end_bytes: Option<u64>,
    /// Largest broker resident memory sampled (every 100 ms) during the run.
    pub broker_rss_peak_bytes: Option<u64>,

    /// `connections`: how long the idle connections were held before measuring.
    pub settle_seconds: Option<f64>,
    /// `connections`: `(broker_rss_end_bytes - broker_rss_start_bytes) / subscribers`.
    pub broker_bytes_per_connection: Option<f64>,
    /// `connections`: generator RSS growth over the same span, per connection.
    pub generator_bytes_per_connection: Option<f64>,
}

impl Report {
    /// Fills the latency fields from a histogram of microseconds (left `None` when empty).
    pub fn set_latencies(&mut self, micros: &Histogram<u64>) {
        if micros.is_empty() {
            return;
        }
        let ms = |us: u64| round3(us as f64 / 1_000.0);
        self.latency_p50_ms = Some(ms(micros.value_at_quantile(0.5)));
        self.latency_p90_ms = Some(ms(micros.value_at_quantile(0.9)));
        self.latency_p99_ms = Some(ms(micros.value_at_quantile(0.99)));
        self.latency_p999_ms = Some(ms(micros.value_at_quantile(0.999)));
        self.latency_max_ms = Some(ms(micros.max()));
        self.latency_mean_ms = Some(round3(micros.mean() / 1_000.0));
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#))
    }

    /// The report as a two-column table.
    pub fn to_table(&self) -> String {
        let mut rows: Vec<(&str, String)> = Vec::new();
        let mut row = |label: &'static str, value: String| rows.push((label, value));
        row("scenario", self.scenario.clone());
        let mut shape = format!("{} subscribers", self.subscribers);
        if self.groups > 1 {
            let _ = write!(shape, " in {} groups", self.groups);
        }
        if self.source_addrs > 1 {
            let _ = write!(shape, " from {} source addresses", self.source_addrs);
        }
        row("subscribers", shape);
        row(
            "connect",
            format!(
                "{:.2} s ({:.0} connections/s)",
                self.connect_seconds, self.connects_per_second
            ),
        );
        if let Some(settle) = self.settle_seconds {
            row("settle", format!("{settle:.1} s"));
        } else {
            row(
                "items",
                format!("{} fields, {} bytes", self.fields, self.item_bytes),
            );
            let pace = if self.rate > 0.0 {
                format!("{} events/s", self.rate)
            } else {
                "flat out".into()
            };
            row(
                "publish",
                format!(
                    "{} events in {} requests ({pace}, batch {}, {} in flight) in {:.2} s = {:.0} events/s",
                    self.events_published,
                    self.publish_requests,
                    self.batch,
                    self.in_flight,
                    self.publish_seconds,
                    self.publish_events_per_second
                ),
            );
            if self.publish_errors > 0 {
                row(
                    "publish errors",
                    format!(
                        "{} (first: {})",
                        self.publish_errors,
                        self.publish_first_error.as_deref().unwrap_or("?")
                    ),
                );
            }
            row(
                "deliveries",
                format!(
                    "{} of {} expected ({} frames)",
                    self.received_deliveries, self.expected_deliveries, self.frames
                ),
            );
            row(
                "loss / duplicates",
                format!(
                    "{} / {} ({} subscribers with loss, {} unexpected)",
                    self.loss, self.duplicates, self.subscribers_with_loss, self.unexpected,
                ),
            );
            row("reordered", self.reordered_note());
            row(
                "throughput",
                format!(
                    "{:.0} deliveries/s over {:.3} s (first publish to last delivery)",
                    self.deliveries_per_second, self.elapsed_seconds
                ),
            );
            if let (Some(p50), Some(p90), Some(p99), Some(p999), Some(max)) = (
                self.latency_p50_ms,
                self.latency_p90_ms,
                self.latency_p99_ms,
                self.latency_p999_ms,
                self.latency_max_ms,
            ) {
                row(
                    "latency ms",
                    format!("p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}"),
                );
            }
        }
        if self.closed_connections > 0 || self.error_frames > 0 {
            let reasons: Vec<String> = self
                .closes
                .iter()
                .map(|(reason, n)| format!("{n}× {reason}"))
                .collect();
            row(
                "closed early",
                format!(
                    "{} ({}); {} error frames",
                    self.closed_connections,
                    reasons.join(", "),
                    self.error_frames
                ),
            );
        }
        if let (Some(cpu), Some(percent)) = (self.generator_cpu_seconds, self.generator_cpu_percent)
        {
            row(
                "generator CPU",
                format!(
                    "{cpu:.2} s = {percent:.0}% of one core over {:.2} s",
                    self.measured_seconds
                ),
            );
        }
        if let Some(rss) = self.generator_rss_bytes {
            let peak = self
                .generator_rss_peak_bytes
                .map(|p| format!(" (peak {})", mib(p)))
                .unwrap_or_default();
            row("generator RSS", format!("{}{peak}", mib(rss)));
        }
        if let Some(pid) = self.broker_pid {
            if let (Some(cpu), Some(percent)) = (self.broker_cpu_seconds, self.broker_cpu_percent) {
                row(
                    "broker CPU",
                    format!("{cpu:.2} s = {percent:.0}% of one core (pid {pid})"),
                );
            }
            if let Some(us) = self.broker_cpu_us_per_delivery {
                row("broker CPU per delivery", format!("{us:.3} µs"));
            }
            let fmt = |b: Option<u64>| b.map(mib).unwrap_or_else(|| "?".into());
            row(
                "broker RSS",
                format!(
                    "start {}  end {}  peak {}",
                    fmt(self.broker_rss_start_bytes),
                    fmt(self.broker_rss_end_bytes),
                    fmt(self.broker_rss_peak_bytes)
                ),
            );
        }
        if let Some(per) = self.broker_bytes_per_connection {
            row("broker per connection", format!("{per:.0} bytes"));
        }
        if let Some(per) = self.generator_bytes_per_connection {
            row("generator per connection", format!("{per:.0} bytes"));
        }
        let width = rows
            .iter()
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (label, value) in rows {
            let _ = writeln!(out, "{label:<width$}  {value}");
        }
        out
    }
}

impl Report {
    /// The `reordered` count with what it means for this run.
    pub fn reordered_note(&self) -> String {
        let n = self.reordered;
        if n == 0 {
            return "0 (every connection got the items in seq order)".into();
        }
        if self.in_flight > 1 {
            format!(
                "{n} items arrived after one with a higher seq. Not an error: each connection \
                 gets the broker's publish (offset) order, and with --in-flight {} concurrent \
                 requests may be sequenced in another order than the generator numbered them \
                 (--in-flight 1 gives 0)",
                self.in_flight
            )
        } else {
            format!(
                "{n} items arrived after one with a higher seq although only one request was \
                 in flight: the broker did not keep the publish order on some connection"
            )
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Rounds to three decimals, so JSON carries microsecond-precision milliseconds.
pub fn round3(x: f64) -> f64 {
    (x * 1_000.0).round() / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_come_out_in_ms() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in 1..=1000 {
            h.record(us).unwrap();
        }
        let mut report = Report::default();
        report.set_latencies(&h);
        assert_eq!(report.latency_p50_ms, Some(0.5));
        assert_eq!(report.latency_max_ms, Some(1.0));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["latency_p99_ms"], 0.99);
        assert!(json["broker_rss_peak_bytes"].is_null());
    }

    #[test]
    fn table_leaves_out_what_does_not_apply() {
        let report = Report {
            scenario: "connections".into(),
            subscribers: 10,
            settle_seconds: Some(1.0),
            broker_bytes_per_connection: Some(4096.0),
            ..Report::default()
        };
        let table = report.to_table();
        assert!(
            table.contains("broker per connection  4096 bytes"),
            "{table}"
        );
        assert!(!table.contains("latency"), "{table}");
        assert!(!table.contains("broker RSS"), "{table}");
    }

    #[test]
    fn the_table_explains_the_reordered_count() {
        let mut report = Report {
            scenario: "broadcast".into(),
            subscribers: 10,
            in_flight: 4,
            reordered: 1000,
            ..Report::default()
        };
        let table = report.to_table();
        let line = table
            .lines()
            .find(|l| l.starts_with("reordered"))
            .unwrap_or_else(|| panic!("no reordered row: {table}"));
        assert!(
            line.contains("1000 items arrived after one with a higher seq"),
            "{line}"
        );
        assert!(
            line.contains("Not an error") && line.contains("--in-flight 4"),
            "{line}"
        );
        report.in_flight = 1;
        assert!(report.to_table().contains("did not keep the publish order"));
        report.reordered = 0;
        assert!(report
            .to_table()
            .contains(" 0 (every connection got the items in seq order)"));
    }
}
