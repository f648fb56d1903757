//! The publishing side of `tidings bench`: the items the benchmark sends, how they are batched
//! into `POST /v1/publish` requests, and the pacing of those requests (fixed rate or flat out),
//! with bounded concurrency over a keep-alive HTTP/1 connection pool.
//!
//! Every item is stamped with `seq` (0, 1, 2, … in publish order), `ts` (nanoseconds since the
//! run's [`Clock`] base, read once per request just before its body is built and sent), `id`
//! (= `seq`), `tenant_id` (= `seq % groups`), and padding fields `f1`, `f2`, … so that the item
//! has `--fields` fields and about `--item-bytes` bytes of JSON. `seq` and `ts` come first, so
//! the receivers find them at the start of every item.
//!
//! **Pacing.** Flat out (`--rate 0`), a new request of `--batch` events starts as soon as fewer
//! than `--in-flight` are outstanding. At a fixed rate R, a timer ticks every `1/R` seconds (but
//! not more often than every millisecond) and each tick sends every event that is due by then
//! (`floor(R × elapsed) + 1` in total), in requests of at most `--batch` events: at rates up to
//! 1000/s that is one event per request, above it about `R/1000` per request. When the broker
//! is slower than the rate, requests wait for an `--in-flight` slot and the schedule catches up
//! in bursts; `ts` is stamped after that wait, so latency does not include the generator's own
//! queueing (it understates what a client with a fixed schedule would see).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{BenchError, Clock};

/// The shortest period of the fixed-rate timer.
const MIN_TICK: Duration = Duration::from_millis(1);

/// Field names every item has before its padding.
const FIXED_FIELDS: usize = 4;

/// How the items of a run look.
#[derive(Debug, Clone)]
pub struct ItemShape {
    /// `tenant_id` is `seq % groups`.
    groups: u64,
    /// The padding fields and the closing brace: `,"f1":"aaa",…}`.
    tail: String,
}

impl ItemShape {
    /// Items of `fields` fields (at least [`FIXED_FIELDS`]) and about `item_bytes` bytes.
    pub fn new(fields: usize, item_bytes: usize, groups: u64) -> Result<ItemShape, BenchError> {
        if fields < FIXED_FIELDS {
            return Err(BenchError::Usage(format!(
                "--fields must be at least {FIXED_FIELDS} (seq, ts, id, tenant_id), not {fields}"
            )));
        }
        let padding = fields - FIXED_FIELDS;
        // A typical head: seq and id of 6 digits, ts of 11 (a minute and a half into the run).
        let head = r#"{"seq":100000,"ts":10000000000,"id":100000,"tenant_id":0"#.len() + 1;
        let names: usize = (1..=padding).map(|i| r#","f":"""#.len() + digits(i)).sum();
        let value_len = match padding {
            0 => 0,
            n => (item_bytes.saturating_sub(head + names) / n).max(1),
        };
        let mut tail = String::new();
        for i in 1..=padding {
            let letter = char::from(b'a' + (i % 26) as u8);
            let value: String = std::iter::repeat_n(letter, value_len).collect();
            let _ = write!(tail, r#","f{i}":"{value}""#);
        }
        tail.push('}');
        Ok(ItemShape {
            groups: groups.max(1),
            tail,
        })
    }

    /// Appends the item `seq` stamped with `ts` to `out`.
    pub fn write_item(&self, out: &mut String, seq: u64, ts: u64) {
        let tenant = seq % self.groups;
        let _ = write!(
            out,
            r#"{{"seq":{seq},"ts":{ts},"id":{seq},"tenant_id":{tenant}"#
        );
        out.push_str(&self.tail);
    }
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// What to publish and how fast.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    /// `POST` target, `http://host:port/v1/publish`.
    pub uri: String,
    /// Sent as `Authorization: Bearer` when set.
    pub publish_key: Option<String>,
    /// Collection name as a JSON string (quoted and escaped).
    pub collection_json: String,
    /// The items.
    pub shape: ItemShape,
    /// Stop after this many events.
    pub events: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Events per second; 0 = flat out.
    pub rate: f64,
    /// Most events per request.
    pub batch: usize,
    /// Most requests outstanding at once.
    pub in_flight: usize,
    /// `tenant_id` groups, to count what each filtered subscriber should get.
    pub groups: u64,
}

/// What a publishing run did.
#[derive(Debug, Clone)]
pub struct PublishOutcome {
    /// Events the broker accepted (2xx).
    pub published: u64,
    /// Accepted events per `tenant_id` group (index = `seq % groups`).
    pub per_group: Vec<u64>,
    /// Requests sent.
    pub requests: u64,
    /// Requests that failed: not 2xx, or no answer.
    pub errors: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// When the first request was about to be sent.
    pub started: Instant,
    /// When the last answer arrived.
    pub finished: Instant,
}

#[derive(Debug)]
struct Tally {
    published: u64,
    per_group: Vec<u64>,
    requests: u64,
    errors: u64,
    first_error: Option<String>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Runs the plan to the end (every request answered) and returns what happened.
pub async fn publish(plan: PublishPlan, clock: Clock) -> Result<PublishOutcome, BenchError> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let plan = Arc::new(plan);
    let tally = Arc::new(Mutex::new(Tally {
        published: 0,
        per_group: vec![0; usize::try_from(plan.groups.max(1)).unwrap_or(1)],
        requests: 0,
        errors: 0,
        first_error: None,
    }));
    let slots = Arc::new(Semaphore::new(plan.in_flight.max(1)));
    let mut requests = JoinSet::new();

    let mut sender = Sender {
        plan: &plan,
        client: &client,
        tally: &tally,
        slots: &slots,
        requests: &mut requests,
        clock,
    };
    let started = pace(&plan, async |first, count| sender.send(first, count).await).await?;
    while requests.join_next().await.is_some() {}
    let finished = Instant::now();
    let tally = tally.lock();
    Ok(PublishOutcome {
        published: tally.published,
        per_group: tally.per_group.clone(),
        requests: tally.requests,
        errors: tally.errors,
        first_error: tally.first_error.clone(),
        started,
        finished,
    })
}

/// Calls `send(first, count)` for every batch of the plan, flat out or at `--rate`, until
/// `--events` or `--duration` is reached; returns when the first batch was started. `send`
/// waits for a free `--in-flight` slot itself.
pub async fn pace(
    plan: &PublishPlan,
    mut send: impl AsyncFnMut(u64, u64) -> Result<(), BenchError>,
) -> Result<Instant, BenchError> {
    let started = Instant::now();
    let deadline = plan.duration.map(|d| started + d);
    let limit = plan.events.unwrap_or(u64::MAX);
    let mut next_seq = 0u64;
    if plan.rate > 0.0 {
        let tick = Duration::from_secs_f64(1.0 / plan.rate).max(MIN_TICK);
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while next_seq < limit {
            timer.tick().await;
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break;
            }
            let elapsed = now.duration_since(started).as_secs_f64();
            // +1: the first event is due at once, not one period in.
            let due = ((plan.rate * elapsed).floor() as u64 + 1).min(limit);
            while next_seq < due {
                let count = (due - next_seq).min(plan.batch as u64);
                send(next_seq, count).await?;
                next_seq += count;
            }
        }
    } else {
        while next_seq < limit && deadline.is_none_or(|d| Instant::now() < d) {
            let count = (limit - next_seq).min(plan.batch as u64);
            send(next_seq, count).await?;
            next_seq += count;
        }
    }
    Ok(started)
}

/// Starts requests, each in its own task holding one `--in-flight` slot.
struct Sender<'a> {
    plan: &'a Arc<PublishPlan>,
    client: &'a HttpClient,
    tally: &'a Arc<Mutex<Tally>>,
    slots: &'a Arc<Semaphore>,
    requests: &'a mut JoinSet<()>,
    clock: Clock,
}

impl Sender<'_> {
    /// Waits for a slot, then starts the request for events `first..first + count`.
    async fn send(&mut self, first: u64, count: u64) -> Result<(), BenchError> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BenchError::Internal("the publish slots were closed".into()))?;
        // Reap finished requests so the set does not grow with the run.
        while self.requests.try_join_next().is_some() {}
        let ts = self.clock.now_ns();
        let body = self.body(first, count, ts);
        let request = Request::post(&self.plan.uri).header("content-type", "application/json");
        let request = match &self.plan.publish_key {
            Some(key) => request.header("authorization", format!("Bearer {key}")),
            None => request,
        };
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| BenchError::Usage(format!("invalid URL {}: {e}", self.plan.uri)))?;
        let client = self.client.clone();
        let tally = self.tally.clone();
        let groups = self.plan.groups.max(1);
        self.requests.spawn(async move {
            let result = post(&client, request).await;
            drop(permit);
            let mut tally = tally.lock();
            tally.requests += 1;
            match result {
                Ok(()) => {
                    tally.published += count;
                    for seq in first..first + count {
                        if let Some(n) = usize::try_from(seq % groups)
                            .ok()
                            .and_then(|g| tally.per_group.get_mut(g))
                        {
                            *n += 1;
                        }
                    }
                }
                Err(e) => {
                    tally.errors += 1;
                    if tally.first_error.is_none() {
                        tally.first_error = Some(e);
                    }
                }
            }
        });
        Ok(())
    }

    /// `[{"collection":C,"event":"create","data":ITEM}, …]`, one event per item.
    fn body(&self, first: u64, count: u64, ts: u64) -> String {
        let mut body = String::with_capacity(count as usize * 300 + 2);
        body.push('[');
        for seq in first..first + count {
            if seq != first {
                body.push(',');
            }
            body.push_str(r#"{"collection":"#);
            body.push_str(&self.plan.collection_json);
            body.push_str(r#","event":"create","data":"#);
            self.plan.shape.write_item(&mut body, seq, ts);
            body.push('}');
        }
        body.push(']');
        body
    }
}

/// Sends one request and reads the whole answer (so the connection can be reused).
async fn post(client: &HttpClient, request: Request<Full<Bytes>>) -> Result<(), String> {
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("cannot reach the broker: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_have_the_asked_fields_and_size() {
        let shape = ItemShape::new(20, 200, 4).unwrap();
        let mut item = String::new();
        shape.write_item(&mut item, 123_456, 12_345_678_901);
        let value: serde_json::Value = serde_json::from_str(&item).unwrap();
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 20);
        assert_eq!(object["seq"], 123_456);
        assert_eq!(object["id"], 123_456);
        assert_eq!(object["ts"], 12_345_678_901u64);
        assert_eq!(object["tenant_id"], 0);
        assert!(
            (180..=220).contains(&item.len()),
            "{} bytes: {item}",
            item.len()
        );
        assert!(item.starts_with(r#"{"seq":123456,"ts":12345678901,"#));
    }

    #[test]
    fn minimal_items_have_no_padding() {
        let shape = ItemShape::new(4, 200, 3).unwrap();
        let mut item = String::new();
        shape.write_item(&mut item, 7, 1);
        assert_eq!(item, r#"{"seq":7,"ts":1,"id":7,"tenant_id":1}"#);
        assert!(ItemShape::new(3, 200, 1).is_err());
    }
}
