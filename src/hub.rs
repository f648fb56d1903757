//! Fan-out of one event: candidate groups → matching items → one encoding per group → one
//! frame per uid bucket → every member's outbox.
//!
//! The hub never waits: a full outbox refuses the frame (the session then closes that
//! connection as a slow consumer) and the hub moves on. Work per event follows the number of
//! groups that receive it, not the number of subscribers: a group of 10,000 identical
//! subscriptions costs one filter evaluation, one projection and one serialization per uid
//! in use.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;

use crate::backplane::{Backplane, EventSink};
use crate::conflate::{Change, KeyedChange};
use crate::event::Event;
use crate::history::{History, Replay};
use crate::metrics::Metrics;
use crate::outbox::{Conflating, Frame, Live, Outbox, PushError, Pushed};
use crate::protocol::{event_frame, init_frame, WirePosition};
use crate::registry::{Group, Registry, SubHandle};
use crate::state::{State, StateError, View};
use crate::subscription::{keyed_payloads, payloads, Payload, Spec};

/// Delivers events to the subscriptions of this node.
#[derive(Debug)]
pub struct Hub {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    history: Arc<History>,
    /// The retained state (`--state`), folded in the deliver path; `None`: nothing retained.
    state: Option<Arc<State>>,
    /// Woken when the history moves (an event recorded or restored, an epoch reset) while a
    /// resume waits for this node to catch up (see [`Subscriptions::subscribe`]).
    moved: tokio::sync::Notify,
    /// Resumes waiting on `moved`: with none, delivery does not touch the `Notify` at all.
    waiting: AtomicUsize,
}

/// Where a new subscription starts.
#[derive(Debug, Clone)]
pub enum Resume {
    /// Now, with nothing replayed (no `since`).
    Fresh,
    /// After this position: replay what followed it, or say it is lost.
    After(WirePosition),
    /// The client asked to resume but cannot be (`recovered: false`).
    Lost,
}

/// A subscription to register: what it is, where its frames go, and where it resumes.
#[derive(Debug)]
pub struct NewSubscription<'a> {
    /// The compiled subscription.
    pub spec: Spec,
    /// The uid its frames carry (already a string).
    pub uid: Option<Arc<str>>,
    /// Its connection's outbox.
    pub outbox: Arc<Outbox>,
    /// The `data` of its `init` frame, raw JSON (`None`: no data).
    pub init_data: Option<&'a str>,
    /// On a retained collection, `init` carries the retained view instead of `init_data`
    /// (a collection subscription that is not resuming with its history intact: the matching
    /// items; an item subscription: the item, when held and visible).
    pub snapshot: bool,
    /// Where it starts.
    pub resume: Resume,
    /// False while the backplane is not ready (a shared engine restoring its history or
    /// disconnected): the node's history may be incomplete, so `init` gets a provisional
    /// position and `since` is answered as lost rather than trusted.
    pub history_trusted: bool,
}

/// Why a subscription could not be registered yet.
#[derive(Debug)]
pub enum SubscribeError<'a> {
    /// `since` is ahead of what this node has delivered; retry shortly with the subscription
    /// handed back.
    Ahead(Box<NewSubscription<'a>>),
    /// The retained `init` would be over `--max-init-items`: nothing was registered.
    Init(StateError),
}

impl Hub {
    /// A hub over `registry`, recording delivered events in `history`.
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, history: Arc<History>) -> Self {
        Hub::with_state(registry, metrics, history, None)
    }

    /// A hub that also folds every event of a retained collection into `state` before it
    /// records and dispatches it.
    pub fn with_state(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        history: Arc<History>,
        state: Option<Arc<State>>,
    ) -> Self {
        Hub {
            registry,
            metrics,
            history,
            state,
            moved: tokio::sync::Notify::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Wakes the resumes waiting for the history to move. Called after the change, so a
    /// waiter that registered before its last try sees either the change or the wake-up.
    fn history_moved(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.moved.notify_waiters();
        }
    }

    /// The history this hub records into.
    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// The retained state, if any collection keeps one.
    pub fn state(&self) -> Option<&Arc<State>> {
        self.state.as_ref()
    }

    /// Registers a subscription and queues its `init` frame, then the events it missed when
    /// it resumes. Holding the collection's log lock throughout makes the cut exact: every
    /// event up to the `init` position is replayed, in the retained snapshot, or not wanted;
    /// every later one is dispatched live (the deliver path folds and dispatches under the
    /// same lock). Returns the handle and the number of replayed frames. Sessions reach
    /// it only through [`Subscriptions::subscribe`].
    fn subscribe<'a>(
        &self,
        sub: Box<NewSubscription<'a>>,
    ) -> Result<(SubHandle, usize), SubscribeError<'a>> {
        let log = self.history.log(&sub.spec.collection);
        let log = log.lock();
        let (recovered, missed) = match &sub.resume {
            Resume::Fresh => (None, Vec::new()),
            Resume::Lost => (Some(false), Vec::new()),
            Resume::After(_) if !sub.history_trusted => (Some(false), Vec::new()),
            Resume::After(since) => match self.history.replay(&log, since) {
                Replay::Events(events) => (Some(true), events),
                Replay::Lost => (Some(false), Vec::new()),
                Replay::Ahead => {
                    drop(log);
                    return Err(SubscribeError::Ahead(sub));
                }
            },
        };
        if let Some(recovered) = recovered {
            let outcome = if recovered { "recovered" } else { "lost" };
            self.metrics.resumes.with_label_values(&[outcome]).inc();
        }
        let position = match sub.history_trusted {
            true => self.history.position(&log),
            false => self.history.provisional_position(),
        };
        let uid = sub.uid.as_deref();
        // A resume that recovered keeps the client's list: it gets the missed events, not a
        // snapshot (which would repeat them).
        let retained = match &self.state {
            Some(state)
                if sub.snapshot
                    && recovered != Some(true)
                    && state.retains(&sub.spec.collection) =>
            {
                match &sub.spec.item {
                    Some(_) => state
                        .item_snapshot(&sub.spec)
                        .map(|data| View { data, meta: None }),
                    None => match state.snapshot(&sub.spec) {
                        Ok(view) => Some(view),
                        Err(e) => {
                            drop(log);
                            return Err(SubscribeError::Init(e));
                        }
                    },
                }
            }
            _ => None,
        };
        let init_data = retained.as_ref().map(|v| v.data.as_str()).or(sub.init_data);
        let meta = retained.as_ref().and_then(|v| v.meta.as_deref());
        let mut frames = vec![Frame {
            text: init_frame(init_data, meta, uid, &position, recovered).into(),
            live: None,
        }];
        for event in &missed {
            let at = WirePosition {
                epoch: event.epoch.clone(),
                offset: event.offset,
            };
            for p in payloads(&sub.spec, event) {
                frames.push(Frame {
                    text: event_frame(
                        p.kind.as_str(),
                        Some(&p.data),
                        uid,
                        p.cause.map(|c| c.as_str()),
                        Some(&at),
                    )
                    .into(),
                    live: None,
                });
            }
        }
        let replayed = frames.len() - 1;
        if let Err(PushError::Overflow(lost)) = sub.outbox.push_replay(frames) {
            self.metrics.outbox_dropped.inc_by(lost as u64);
        }
        let NewSubscription {
            spec, uid, outbox, ..
        } = *sub;
        let handle = self.registry.insert(spec, uid, outbox);
        drop(log);
        Ok((handle, replayed))
    }

    /// Matches, encodes and queues one event. Events of one collection must be dispatched
    /// one at a time, in offset order (the backplane guarantees it); that is what keeps
    /// per-collection order for every subscriber.
    ///
    /// Does not record the event in the history: engines call [`EventSink::deliver`], which
    /// does both under the collection's log lock. (Benchmarks and tests call this directly.)
    pub fn dispatch(&self, event: &Event) {
        let started = Instant::now();
        let mut frames = 0usize;
        let mut resets = Vec::new();
        if let Some(subs) = self.registry.collection(&event.collection) {
            let subs = subs.read();
            for group in subs.candidates(event) {
                frames += self.deliver_group(group, event, &mut resets);
            }
        }
        // After the registry lock, still under the log lock (the state's store is never
        // locked under the registry's: §6 of ARCHITECTURE).
        for owed in resets {
            self.reset_conflated(owed, event);
        }
        let now = Instant::now();
        self.metrics
            .match_duration
            .observe(now.duration_since(started).as_secs_f64());
        self.metrics
            .ingest_to_outbox
            .observe(now.duration_since(event.received).as_secs_f64());
        self.metrics.fanout_size.observe(frames as f64);
    }

    /// Delivers to one group; returns the number of frames queued.
    fn deliver_group(&self, group: &Group, event: &Event, resets: &mut Vec<OwedReset>) -> usize {
        let spec = &group.spec;
        let payloads = payloads(spec, event);
        if payloads.is_empty() {
            return 0;
        }
        let mut queued = 0;
        let live = Some(Live {
            received: event.received,
            queued: Instant::now(),
        });
        let at = WirePosition {
            epoch: event.epoch.clone(),
            offset: event.offset,
        };
        for p in &payloads {
            if let Some(cause) = p.cause {
                let label = self.metrics.collections.label(&event.collection);
                self.metrics
                    .transitions
                    .with_label_values(&[&*label, cause.as_str()])
                    .inc_by(p.items as u64);
            }
        }
        if spec.delivery.conflate {
            return self.deliver_conflating(group, event, &payloads, live, &at, resets);
        }
        for p in &payloads {
            for (uid, members) in group.buckets() {
                let text = event_frame(
                    p.kind.as_str(),
                    Some(&p.data),
                    uid.as_deref(),
                    p.cause.map(|c| c.as_str()),
                    Some(&at),
                );
                let frame = Frame {
                    text: Utf8Bytes::from(text),
                    live,
                };
                for member in members.values() {
                    match member.outbox.push(frame.clone()) {
                        Ok(()) => queued += 1,
                        Err(PushError::Overflow(lost)) => {
                            self.metrics.outbox_dropped.inc_by(lost as u64)
                        }
                        // `push` never resets: only conflating pushes do.
                        Err(PushError::Closed | PushError::Reset(_)) => {
                            self.metrics.outbox_dropped.inc()
                        }
                    }
                }
            }
        }
        queued
    }

    /// Delivers to a conflating group: each member gets the event's frames as they are, or,
    /// past its outbox bounds, the event split per key and folded (see [`crate::conflate`]);
    /// returns the number of frames queued (a folded event counts as none).
    fn deliver_conflating(
        &self,
        group: &Group,
        event: &Event,
        payloads: &[Payload],
        live: Option<Live>,
        at: &WirePosition,
        resets: &mut Vec<OwedReset>,
    ) -> usize {
        let spec = &group.spec;
        // Rendered once per group, and only when some member is folding.
        let keyed: std::cell::OnceCell<Vec<KeyedChange>> = std::cell::OnceCell::new();
        let changes = || {
            keyed
                .get_or_init(|| {
                    keyed_payloads(spec, event)
                        .into_iter()
                        .map(|(key, p)| KeyedChange {
                            key: Arc::from(key),
                            change: Change {
                                kind: p.kind,
                                cause: p.cause,
                                data: Arc::from(p.data),
                            },
                        })
                        .collect()
                })
                .as_slice()
        };
        let mut queued = 0;
        let mut folded = 0;
        // A `max_rate` group always folds: its plain frames would never be sent.
        let plain = spec.delivery.every.is_none();
        for (uid, members) in group.buckets() {
            let frames: Vec<Frame> = payloads
                .iter()
                .filter(|_| plain)
                .map(|p| Frame {
                    text: Utf8Bytes::from(event_frame(
                        p.kind.as_str(),
                        Some(&p.data),
                        uid.as_deref(),
                        p.cause.map(|c| c.as_str()),
                        Some(at),
                    )),
                    live,
                })
                .collect();
            for (&sub, member) in members {
                let outbox = &member.outbox;
                let to = Conflating {
                    sub,
                    uid,
                    collection: &event.collection,
                    checkpoints: member.checkpoints,
                    every: spec.delivery.every,
                    live,
                };
                match outbox.push_conflating(to, &frames, changes) {
                    Ok(Pushed::Frame) => queued += frames.len(),
                    Ok(Pushed::Keyed { folded: n }) => folded += n,
                    Err(PushError::Reset(dropped)) => {
                        self.metrics.outbox_dropped.inc_by(dropped as u64);
                        resets.push(OwedReset {
                            spec: spec.clone(),
                            sub,
                            uid: uid.clone(),
                            outbox: outbox.clone(),
                        });
                    }
                    Err(PushError::Overflow(lost)) => {
                        self.metrics.outbox_dropped.inc_by(lost as u64)
                    }
                    Err(PushError::Closed) => self.metrics.outbox_dropped.inc(),
                }
            }
        }
        if folded > 0 {
            let label = self.metrics.collections.label(&event.collection);
            self.metrics
                .conflated
                .with_label_values(&[&*label])
                .inc_by(folded as u64);
        }
        queued
    }

    /// Replaces what a conflating subscription had pending (past `--conflation-max-keys`)
    /// with a fresh `init` from the retained state at `event`, the one being dispatched
    /// (already folded into the state, so the snapshot includes it). Called under the
    /// collection's log lock, like every dispatch: no event can fall between the snapshot
    /// and the frames that follow it.
    fn reset_conflated(&self, owed: OwedReset, event: &Event) {
        let OwedReset {
            spec,
            sub,
            uid,
            outbox,
        } = owed;
        let spec = &*spec;
        let at = WirePosition {
            epoch: event.epoch.clone(),
            offset: event.offset,
        };
        let data = match (&self.state, &spec.item) {
            (Some(state), Some(_)) => Ok(state.item_snapshot(spec)),
            // Without `meta`: it is the one member's query's, not the group's.
            (Some(state), None) => state.snapshot(spec).map(|view| Some(view.data)),
            // A conflating spec is on a retained collection; without a state there is
            // nothing to start again from.
            (None, _) => Ok(None),
        };
        let data = match data {
            Ok(data) => data,
            Err(e) => {
                tracing::info!(error = %e, "a conflation reset's init is over the limit: closing");
                outbox.mark_slow_because(crate::outbox::RESETS_REASON);
                return;
            }
        };
        let init = Frame {
            text: init_frame(data.as_deref(), None, uid.as_deref(), &at, Some(false)).into(),
            live: None,
        };
        match outbox.push_reset(sub, init, Instant::now()) {
            Ok(()) => self.metrics.conflation_resets.inc(),
            Err(PushError::Overflow(lost)) => self.metrics.outbox_dropped.inc_by(lost as u64),
            Err(_) => self.metrics.outbox_dropped.inc(),
        }
    }
}

/// A conflating subscription that passed the hard bound during a dispatch, owed a fresh
/// `init` once the registry lock is released.
#[derive(Debug)]
struct OwedReset {
    spec: Arc<Spec>,
    sub: u64,
    uid: Option<Arc<str>>,
    outbox: Arc<Outbox>,
}

impl EventSink for Hub {
    fn deliver(&self, event: Arc<Event>) {
        let log = self.history.log(&event.collection);
        let mut log = log.lock();
        // Folded under the log lock, in offset order: the history, live frames and `init`
        // snapshots all see the same sequence of versions.
        let event = match self.state.as_ref().and_then(|s| s.fold(&event)) {
            Some(folded) => Arc::new(folded),
            None => event,
        };
        self.history.record(&mut log, event.clone());
        self.dispatch(&event);
        drop(log);
        self.history_moved();
    }

    fn restore(&self, event: Arc<Event>) {
        let log = self.history.log(&event.collection);
        let mut log = log.lock();
        match self.state.as_ref().and_then(|s| s.fold(&event)) {
            // A retained collection's history holds folded events (their transitions are
            // replayed), and only after the snapshot it was loaded from: earlier events
            // are in the snapshot, and the ones up to its horizon only partly folded.
            Some(folded) => {
                if folded.offset > log.last() {
                    self.history.record(&mut log, Arc::new(folded));
                }
            }
            None => self.history.record(&mut log, event),
        }
        drop(log);
        self.history_moved();
    }

    fn load_state(
        &self,
        collection: &Arc<str>,
        epoch: &Arc<str>,
        snapshot: crate::state::cluster::Snapshot,
    ) {
        let Some(state) = &self.state else { return };
        // Under the log lock, so no `init` snapshot sees a half-loaded store.
        let log = self.history.log(collection);
        let mut log = log.lock();
        let horizon = state.load(collection, epoch, snapshot);
        self.history.mark(&mut log, horizon);
        drop(log);
        self.history_moved();
    }

    fn reset(&self, epoch: Arc<str>) {
        self.history.reset(epoch);
        self.history_moved();
    }
}

/// The one door of the WebSocket edge into the subscription core: register (with the wait
/// of a resume from a node that is ahead), swap for a recompiled spec, remove. It also knows
/// whether the node's history can be trusted (the backplane is ready).
#[derive(Clone)]
pub struct Subscriptions {
    hub: Arc<Hub>,
    registry: Arc<Registry>,
    backplane: Arc<dyn Backplane>,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("engine", &self.backplane.engine())
            .finish_non_exhaustive()
    }
}

/// Counts a resume waiting on [`Hub::moved`] for as long as it lives.
struct Waiting<'h>(&'h AtomicUsize);

impl<'h> Waiting<'h> {
    fn new(count: &'h AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Subscriptions {
    /// The door over `hub` (and its registry), trusting history while `backplane` is ready.
    pub fn new(hub: Arc<Hub>, registry: Arc<Registry>, backplane: Arc<dyn Backplane>) -> Self {
        Subscriptions {
            hub,
            registry,
            backplane,
        }
    }

    /// The retained state, which `items` reads are answered from (`None`: nothing retained).
    pub fn retained(&self) -> Option<&Arc<State>> {
        self.hub.state()
    }

    /// False while the backplane is not ready: the node's history may be incomplete.
    pub fn history_trusted(&self) -> bool {
        self.backplane.is_ready()
    }

    /// Where a connection whose subscriptions are all on `collections` can resume after its
    /// shutdown close: the collection's current position, read under its log lock, so every
    /// event up to it has already been queued to the connection (and its outbox is written out
    /// before the close). `None` when the subscriptions span several collections (each
    /// subscription's last frame carries its own position), when there are none, or while the
    /// history cannot be trusted (positions handed out then are provisional).
    pub fn resume_position<'a>(
        &self,
        mut collections: impl Iterator<Item = &'a str>,
    ) -> Option<crate::protocol::WirePosition> {
        let first = collections.next()?;
        if collections.any(|c| c != first) || !self.history_trusted() {
            return None;
        }
        let history = self.hub.history();
        let log = history.log(&Arc::from(first));
        let log = log.lock();
        Some(history.position(&log))
    }

    /// The current position of `collection`, read under its log lock: every event up to it
    /// has been queued to every subscriber. `None` while the history cannot be trusted.
    pub fn position(&self, collection: &Arc<str>) -> Option<WirePosition> {
        if !self.history_trusted() {
            return None;
        }
        let history = self.hub.history();
        let log = history.log(collection);
        let log = log.lock();
        Some(history.position(&log))
    }

    /// Registers `sub` (see [`Hub::subscribe`]). A resume from a position this node has not
    /// delivered yet waits, up to `catch_up`, for the history to move (woken by the delivery,
    /// not by polling), then retries; past the wait its position counts as lost. Counts the
    /// replayed frames. Fails, registering nothing, when a retained `init` would be over
    /// `--max-init-items`.
    pub async fn subscribe(
        &self,
        mut sub: Box<NewSubscription<'_>>,
        catch_up: Duration,
    ) -> Result<(SubHandle, usize), StateError> {
        let deadline = tokio::time::Instant::now() + catch_up;
        loop {
            sub = match self.hub.subscribe(sub) {
                Ok(done) => return Ok(self.replayed(done)),
                Err(SubscribeError::Ahead(back)) => back,
                Err(SubscribeError::Init(e)) => return Err(e),
            };
            // Registered before the retry: an event recorded after the retry's look wakes us.
            let moved = self.hub.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let _waiting = Waiting::new(&self.hub.waiting);
            sub = match self.hub.subscribe(sub) {
                Ok(done) => return Ok(self.replayed(done)),
                Err(SubscribeError::Ahead(back)) => back,
                Err(SubscribeError::Init(e)) => return Err(e),
            };
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                sub.resume = Resume::Lost;
            }
        }
    }

    fn replayed(&self, done: (SubHandle, usize)) -> (SubHandle, usize) {
        self.hub.metrics.replayed_frames.inc_by(done.1 as u64);
        done
    }

    /// Swaps a subscription for a recompiled spec (a re-auth changed the permissions) under
    /// one lock, so no event is missed or delivered twice in between.
    pub fn replace(
        &self,
        old: &SubHandle,
        spec: Spec,
        uid: Option<Arc<str>>,
        outbox: Arc<Outbox>,
    ) -> SubHandle {
        self.registry.replace(old, spec, uid, outbox)
    }

    /// Suspends a subscription whose token expired: it keeps its place and uid (so a re-auth
    /// can swap the real spec back in) but receives nothing.
    pub fn suspend(&self, old: &SubHandle, key_field: &str, outbox: Arc<Outbox>) -> SubHandle {
        let spec = Spec::suspended(old.collection(), key_field);
        self.registry.replace(old, spec, old.uid().cloned(), outbox)
    }

    /// Removes a subscription. Removing twice is harmless.
    pub fn remove(&self, handle: &SubHandle) {
        self.registry.remove(handle);
    }
}
