//! `--state-dir`: the memory engine's retained state on disk. This module owns the snapshot
//! file, its format, and when the epoch survives a restart.
//!
//! One file, `DIR/tidings-state.ndjson`, written whole every `--state-snapshot-interval` and
//! once more at a graceful shutdown (after the drain: no publish can land after it), always
//! to `DIR/tidings-state.ndjson.tmp`, fsynced, renamed over the old one, then the directory
//! fsynced: a crash leaves the previous snapshot or the new one, never half of one. It is read
//! back at start, before the broker serves anything.
//!
//! The format is one JSON value per line:
//! ```text
//! {"format":"tidings-state","version":1,"epoch":"k3v9x2m1q8za","clean":false,"written_at":"2026-12-07T15:00:00Z"}
//! {"collection":"orders","offset":42,"items":2}
//! ["1",0,{"id":1,"status":"open"}]
//! ["2",8,{"id":2,"status":"paid"}]
//! {"end":true,"collections":1,"items":2}
//! ```
//! A block per collection with events: its last offset, then its retained items as
//! `[key, stored version (0: none, else the publisher's version plus one), item]`. The end
//! line makes a truncated file detectable.
//!
//! **The epoch.** Only the snapshot of a clean shutdown (`"clean": true`) is complete: every
//! event the broker accepted is in it. Restoring it, the memory engine continues the same
//! epoch at the next offset of every collection, so clients resume with `recovered: true`.
//! Any other snapshot (a periodic one, after a crash or SIGKILL) may miss the last events
//! accepted before the crash: the broker starts a new epoch with the restored items, so a
//! resuming client gets `recovered: false` and the snapshot, never a reused offset. At start
//! the snapshot is rewritten at once as not clean, so a crash after a clean restart cannot
//! reuse the epoch a second time.
//!
//! A snapshot that exists but cannot be read is refused with the line and the problem: the
//! broker does not start rather than start silently empty.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{State, Stored};
use crate::history::History;
use crate::metrics::Metrics;

/// The snapshot's file name in `--state-dir`.
pub const FILE_NAME: &str = "tidings-state.ndjson";
const FORMAT: &str = "tidings-state";
const VERSION: u64 = 1;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The file system refused.
    #[error("--state-dir: {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The snapshot exists but is not one this broker can read.
    #[error("--state-dir: {}: line {line}: {problem}; the retained state cannot be restored from it: move it away to start with an empty state (its items are then lost)", path.display())]
    Corrupt {
        /// The snapshot.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// What a snapshot read at start gives the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The epoch it was written in.
    pub epoch: Arc<str>,
    /// Written at a clean shutdown: the epoch may continue.
    pub clean: bool,
    /// Each collection's last offset in that epoch.
    pub offsets: Vec<(Arc<str>, u64)>,
    /// Items restored into the state.
    pub items: usize,
    /// Items left out because their collection no longer retains state.
    pub skipped: usize,
}

/// One snapshot written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Collections with a block.
    pub collections: usize,
    /// Items in it.
    pub items: usize,
    /// Its size.
    pub bytes: u64,
}

/// Writes snapshots of `state` and the history's positions into the directory.
#[derive(Debug)]
pub struct Persister {
    dir: PathBuf,
    state: Option<Arc<State>>,
    history: Arc<History>,
    metrics: Arc<Metrics>,
    /// One write at a time (the periodic one and the final one share the temp file).
    writing: Mutex<()>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The snapshot's path in `dir`.
pub fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

impl Persister {
    /// A persister writing into `dir` (created if missing).
    pub fn new(
        dir: PathBuf,
        state: Option<Arc<State>>,
        history: Arc<History>,
        metrics: Arc<Metrics>,
    ) -> Result<Persister, PersistError> {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Persister {
            dir,
            state,
            history,
            metrics,
            writing: Mutex::new(()),
        })
    }

    /// Writes a snapshot now, counting it in the metrics (`clean`: the final one of a
    /// graceful shutdown, taken once nothing can be published any more).
    pub fn write(&self, clean: bool) -> Result<Written, PersistError> {
        let started = Instant::now();
        let result = self.write_file(clean);
        match &result {
            Ok(written) => {
                self.metrics
                    .state_snapshot_duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics
                    .state_snapshot_bytes
                    .set(i64::try_from(written.bytes).unwrap_or(i64::MAX));
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.metrics
                    .state_snapshot_last_success
                    .set(i64::try_from(now).unwrap_or(i64::MAX));
            }
            Err(_) => self.metrics.state_snapshot_failures.inc(),
        }
        result
    }

    fn write_file(&self, clean: bool) -> Result<Written, PersistError> {
        let _one = self.writing.lock();
        let path = snapshot_path(&self.dir);
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut out = BufWriter::new(file);
        let header = json!({
            "format": FORMAT,
            "version": VERSION,
            "epoch": &*self.history.epoch(),
            "clean": clean,
            "written_at": jiff::Timestamp::now().to_string(),
        });
        writeln!(out, "{header}").map_err(io(&tmp))?;
        let mut names = self.history.collections();
        if let Some(state) = &self.state {
            names.extend(state.collections());
        }
        names.sort();
        names.dedup();
        let (mut collections, mut items) = (0, 0);
        for collection in names {
            // Under the collection's log lock, as the fold runs: the items are exactly those
            // of the events up to `offset`. One collection is copied at a time, so a
            // snapshot holds at most one collection's items twice in memory.
            let (offset, held) = {
                let log = self.history.log(&collection);
                let log = log.lock();
                let held = match &self.state {
                    Some(state) if state.retains(&collection) => state.export(&collection),
                    _ => Vec::new(),
                };
                (log.last(), held)
            };
            if offset == 0 && held.is_empty() {
                continue;
            }
            let block = json!({"collection": &*collection, "offset": offset, "items": held.len()});
            writeln!(out, "{block}").map_err(io(&tmp))?;
            for item in &held {
                // Keys are JSON-escaped; the item is the compact JSON the store holds.
                let key = serde_json::to_string(item.key()).unwrap_or_default();
                writeln!(out, "[{key},{},{}]", item.version, item.json()).map_err(io(&tmp))?;
            }
            collections += 1;
            items += held.len();
        }
        let end = json!({"end": true, "collections": collections, "items": items});
        writeln!(out, "{end}").map_err(io(&tmp))?;
        let file = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        file.sync_all().map_err(io(&tmp))?;
        let bytes = file.metadata().map_err(io(&tmp))?.len();
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // The rename itself is durable only once the directory is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(Written {
            collections,
            items,
            bytes,
        })
    }
}

/// A snapshot's lines, counted.
struct Lines {
    lines: std::io::Lines<BufReader<File>>,
    /// Lines read so far.
    at: usize,
}

/// Reads the snapshot in `dir`, if there is one, restoring its items into `state` (items of
/// collections that no longer retain state are counted and left out). `None`: no snapshot
/// (a first start).
pub fn load(dir: &Path, state: Option<&State>) -> Result<Option<Loaded>, PersistError> {
    let path = snapshot_path(dir);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let corrupt = |line: usize, problem: String| PersistError::Corrupt {
        path: path.clone(),
        line,
        problem,
    };
    let mut reader = Lines {
        lines: BufReader::new(file).lines(),
        at: 0,
    };
    // The line number, and the line (`None`: the file ended before it).
    let mut next = || -> Result<(usize, Option<String>), PersistError> {
        reader.at += 1;
        match reader.lines.next() {
            None => Ok((reader.at, None)),
            Some(Ok(text)) => Ok((reader.at, Some(text))),
            Some(Err(e)) => Err(corrupt(reader.at, format!("unreadable: {e}"))),
        }
    };
    let object = |line: usize, text: &str| -> Result<Value, PersistError> {
        match serde_json::from_str::<Value>(text) {
            Ok(value @ Value::Object(_)) => Ok(value),
            Ok(_) => Err(corrupt(line, "not a JSON object".into())),
            Err(e) => Err(corrupt(line, format!("not JSON: {e}"))),
        }
    };
    let (line, text) = next()?;
    let Some(text) = text else {
        return Err(corrupt(line, "the file is empty".into()));
    };
    let header = object(line, &text)?;
    if header["format"] != FORMAT {
        return Err(corrupt(line, format!("not a {FORMAT} snapshot")));
    }
    if header["version"] != VERSION {
        return Err(corrupt(
            line,
            format!(
                "format version {} is not {VERSION}, the one this broker reads",
                header["version"]
            ),
        ));
    }
    let epoch = match header["epoch"].as_str() {
        Some(e) if !e.is_empty() => Arc::<str>::from(e),
        _ => return Err(corrupt(line, "no epoch".into())),
    };
    let Some(clean) = header["clean"].as_bool() else {
        return Err(corrupt(line, "no `clean` flag".into()));
    };
    let mut loaded = Loaded {
        epoch,
        clean,
        offsets: Vec::new(),
        items: 0,
        skipped: 0,
    };
    let mut blocks = 0usize;
    loop {
        let (line, text) = next()?;
        let Some(text) = text else {
            return Err(corrupt(
                line,
                "the file ends before its end line (truncated)".into(),
            ));
        };
        let value = object(line, &text)?;
        if value["end"] == true {
            let (want_blocks, want_items) =
                (value["collections"].as_u64(), value["items"].as_u64());
            if want_blocks != Some(blocks as u64)
                || want_items != Some((loaded.items + loaded.skipped) as u64)
            {
                return Err(corrupt(
                    line,
                    format!(
                        "the end line counts {want_blocks:?} collections and {want_items:?} items, the file holds {blocks} and {}",
                        loaded.items + loaded.skipped
                    ),
                ));
            }
            if let (line, Some(_)) = next()? {
                return Err(corrupt(line, "text after the end line".into()));
            }
            return Ok(Some(loaded));
        }
        let (Some(collection), Some(offset), Some(count)) = (
            value["collection"].as_str(),
            value["offset"].as_u64(),
            value["items"].as_u64(),
        ) else {
            return Err(corrupt(
                line,
                "expected a collection line {\"collection\",\"offset\",\"items\"} or the end line"
                    .into(),
            ));
        };
        if !crate::event::valid_collection_name(collection) {
            return Err(corrupt(
                line,
                format!("`{collection}` is not a collection name"),
            ));
        }
        let collection = Arc::<str>::from(collection);
        let keep = state.filter(|s| s.retains(&collection));
        let mut items = Vec::new();
        for _ in 0..count {
            let (line, text) = next()?;
            let Some(text) = text else {
                return Err(corrupt(
                    line,
                    format!(
                        "the file ends inside the items of collection `{collection}` (truncated)"
                    ),
                ));
            };
            let (key, version, item): (String, u64, Box<RawValue>) = serde_json::from_str(&text)
                .map_err(|e| {
                    corrupt(line, format!("not an item line [key, version, item]: {e}"))
                })?;
            if keep.is_some() {
                // Re-serialized, so the store holds compact text of its own whatever the file
                // has: a scan's text pre-check (`Filter::required_texts`) relies on it.
                let item: Value = serde_json::from_str(item.get())
                    .map_err(|e| corrupt(line, format!("not an item: {e}")))?;
                items.push(Stored::new(&key, &super::compact(&item), version));
            }
        }
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        match keep {
            Some(state) => {
                state.restore(&collection, items);
                loaded.items += count;
            }
            None => {
                if count > 0 {
                    tracing::warn!(%collection, items = count, "the snapshot holds items of a collection that no longer retains state: left out");
                }
                loaded.skipped += count;
            }
        }
        loaded.offsets.push((collection, offset));
        blocks += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};
    use crate::history::HistoryLimits;
    use crate::state::StateSettings;

    fn state(metrics: &Arc<Metrics>) -> Arc<State> {
        Arc::new(State::new(
            StateSettings {
                collections: vec!["orders".into()],
                max_items: 100,
                max_bytes: 1 << 20,
                max_init_items: 100,
                file: None,
                indexes: Vec::new(),
            },
            metrics.clone(),
        ))
    }

    #[test]
    fn a_snapshot_round_trips_items_versions_and_offsets() {
        let dir = std::env::temp_dir().join(format!("tidings-persist-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let metrics = Arc::new(Metrics::new(10).unwrap());
        let history = Arc::new(History::new(
            HistoryLimits {
                max_events: 10,
                max_age: std::time::Duration::from_secs(60),
                max_bytes: 1 << 20,
            },
            Arc::from("epoch1"),
            true,
        ));
        let held = state(&metrics);
        let orders: Arc<str> = Arc::from("orders");
        for (offset, id, version) in [(1, "a\"b", Some(7)), (2, "2", None)] {
            let event = Event {
                version,
                offset,
                epoch: Arc::from("epoch1"),
                ..Event::test(
                    "orders",
                    EventKind::Create,
                    vec![json!({"id": id, "x": [1, {"y": null}]})],
                    vec![json!(id)],
                )
            };
            let log = history.log(&orders);
            let mut log = log.lock();
            let folded = held.fold(&event).unwrap();
            history.record(&mut log, Arc::new(folded));
        }
        let persister =
            Persister::new(dir.clone(), Some(held.clone()), history, metrics.clone()).unwrap();
        let written = persister.write(true).unwrap();
        assert_eq!((written.collections, written.items), (1, 2));

        let restored = state(&metrics);
        let loaded = load(&dir, Some(&restored)).unwrap().unwrap();
        assert_eq!(
            loaded,
            Loaded {
                epoch: Arc::from("epoch1"),
                clean: true,
                offsets: vec![(orders.clone(), 2)],
                items: 2,
                skipped: 0,
            }
        );
        let texts = |s: &State| {
            let mut all: Vec<(String, u64)> = s
                .export(&orders)
                .iter()
                .map(|i| (i.text.to_string(), i.version))
                .collect();
            all.sort();
            all
        };
        assert_eq!(texts(&restored), texts(&held));
        assert_eq!(restored.len(&orders), 2);
        // A file whose item is not compact (spaces, an escaped name) loads as compact text.
        let file = dir.join(FILE_NAME);
        let text = std::fs::read_to_string(&file).unwrap();
        let compact = r#"{"id":"2","x":[1,{"y":null}]}"#;
        assert!(text.contains(compact), "{text}");
        let loose = text.replace(compact, r#"{ "id" : "2", "\u0078": [1, {"y": null}] }"#);
        std::fs::write(&file, loose).unwrap();
        let reloaded = state(&metrics);
        load(&dir, Some(&reloaded)).unwrap().unwrap();
        assert_eq!(texts(&reloaded), texts(&held));
        // Without state for the collection, its items are counted and left out.
        let skipped = load(&dir, None).unwrap().unwrap();
        assert_eq!((skipped.items, skipped.skipped), (0, 2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
