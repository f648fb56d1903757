//! Tidings: a standalone realtime broker for collection events.
//!
//! Applications publish `create`/`update`/`delete` events for a collection with one HTTP POST;
//! frontends hold a WebSocket speaking the Directus realtime protocol and receive only the
//! events that match their subscription's filter, carrying only the fields they asked for.
//!
//! # Layout
//!
//! Data flows in one direction (see `docs/ARCHITECTURE.md`):
//!
//! ```text
//! http (publish) → event (normalize) → backplane (sequence) → hub (state fold) → registry → outbox → ws session
//! ```
//!
//! - [`config`]: every flag, limit and timeout, and their validation.
//! - [`event`]: events, event kinds, item keys; normalization of publish payloads.
//! - [`ingest`]: front-ends to that normalization for standard formats (CloudEvents 1.0,
//!   Debezium change events).
//! - [`protocol`]: wire types of the WebSocket protocol (client and server messages).
//! - [`filter`], [`projection`]: compile a subscriber's filter and field list once; evaluate them.
//! - [`auth`]: subscriber credentials (static tokens, JWTs), the permissions they grant,
//!   publisher keys.
//! - [`subscription`]: what a subscription is: the query grammar, permission narrowing, the
//!   compiled `Spec` and its group key, and the payloads it renders per dialect.
//! - [`registry`]: live subscriptions, grouped by identical spec, and the equality index.
//! - [`hub`]: one event → matching groups → one encoding per group → outboxes.
//! - [`outbox`]: the bounded per-connection queue between the hub and a session.
//! - [`backplane`]: ordering and distribution of events (in-memory engine by default).
//! - [`ws`]: the WebSocket upgrade and the per-connection session loop.
//! - [`http`]: publish API, health endpoints, metrics endpoint.
//! - [`metrics`]: Prometheus metrics over an owned registry.
//! - [`app`]: the composition root, [`app::run`]; the only module that knows every edge.
//! - [`readiness`]: the latch both edges read, closed when shutdown begins.
//! - [`shutdown`]: signal handling.
//! - [`history`]: recent events per collection, so clients resume with `since`.
//! - [`state`]: retained items of the collections that keep them (`--state`): the fold,
//!   capacity, `init` snapshots and the list engine behind them.
//! - [`read`]: one `items` read (socket and HTTP), compiled like a subscribe, cut from the
//!   state.
//! - [`cli`]: the `tidings` command line (serve, tail, publish; bench from `tidings-bench`).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod backplane;
pub mod cli;
pub mod collections;
pub mod config;
pub mod conflate;
pub mod event;
pub mod filter;
pub mod history;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod metrics;
pub mod outbox;
pub mod projection;
pub mod protocol;
pub mod read;
pub mod readiness;
pub mod registry;
pub mod shutdown;
pub mod state;
pub mod subscription;
pub mod ws;

pub use app::{run, App};
pub use config::Config;
