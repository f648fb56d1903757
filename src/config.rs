//! Every setting of `tidings serve`: flags (each also a `TIDINGS_*` environment variable),
//! limits and timeouts, and their validation into a [`Config`].
//!
//! Parsing is split in two: [`ServeArgs`] is what clap reads, [`Config`] is what the broker
//! runs with. [`ServeArgs::into_config`] is the only way from one to the other, so every
//! value the broker sees has been validated, and every error names the flag to fix.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::auth::jwt::{JwtSettings, JwtVerifier};
use crate::auth::{AdminKey, Permissions, Principal, PublishKeys, TokenStore};
use crate::collections::{CollectionSettings, CollectionsFile, Shorthand};
use crate::event::EventKind;
use crate::filter::FilterLimits;
use crate::history::HistoryLimits;
use crate::ingest::cloudevents::{valid_attribute_name, Mapping};
use crate::ingest::debezium::{self, DecimalMode, TimeMode};
use crate::state::StateSettings;

/// How WebSocket clients authenticate (Directus `WEBSOCKETS_REST_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Anyone may connect and gets the public permissions; `auth` upgrades the connection.
    Public,
    /// The first message must be `auth` within the auth timeout (or a token in the URL).
    Handshake,
    /// A valid `?access_token=` is required at upgrade.
    Strict,
}

/// Which backplane orders and distributes events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// In-process: one node, nothing else to run.
    Memory,
    /// Redis Streams (`--redis-url`): several nodes share one log.
    Redis,
    /// NATS JetStream (`--nats-url`): several nodes share one log.
    Nats,
}

/// Whether `GET /console` and `GET /v1/admin/stats` are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Console {
    /// Served (with `--admin-key` required when the listen address is not loopback).
    On,
    /// Not routed: both answer 404.
    Off,
}

/// How an update on a retained collection reaches subscriptions whose filter it enters or
/// leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transitions {
    /// Enter: a `create` frame with the full item; leave: a `delete` frame with the key;
    /// both with `"cause"`.
    View,
    /// Directus' own behaviour: enter arrives as `update`, leave sends nothing.
    Directus,
}

/// What happens to a subscriber whose outbox passes its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowConsumerPolicy {
    /// Closed with 4008 (a log's right answer: nothing is skipped).
    Close,
    /// On a retained collection, pending frames of the same item key are merged (latest
    /// value, deletes kept); other collections close as with `close`.
    Conflate,
}

impl SlowConsumerPolicy {
    /// The wire (file and flag) name.
    pub fn as_str(self) -> &'static str {
        match self {
            SlowConsumerPolicy::Close => "close",
            SlowConsumerPolicy::Conflate => "conflate",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every default of `tidings serve`, written once: clap's defaults (so `--help`) and
/// [`Config::default`] both read these, and a test checks README's flag table against them.
pub mod defaults {
    use super::{AuthMode, Console, Engine, LogFormat, SlowConsumerPolicy, Transitions};
    use crate::filter::FilterLimits;
    use crate::ingest::debezium::{DecimalMode, TimeMode};

    /// A default number of seconds, as a number and as clap's default text, from one literal.
    #[derive(Debug, Clone, Copy)]
    pub struct Secs {
        /// The number of seconds.
        pub secs: u64,
        /// The same, as `--help` shows it.
        pub text: &'static str,
    }

    impl Secs {
        /// As a duration.
        pub const fn duration(self) -> std::time::Duration {
            std::time::Duration::from_secs(self.secs)
        }
    }

    macro_rules! secs {
        ($n:literal) => {
            Secs {
                secs: $n,
                text: stringify!($n),
            }
        };
    }

    /// `--listen`.
    pub const LISTEN: &str = "127.0.0.1:8080";
    /// `--ws-path`.
    pub const WS_PATH: &str = "/websocket";
    /// `--auth-mode`.
    pub const AUTH_MODE: AuthMode = AuthMode::Public;
    /// `--public-permissions`: every collection.
    pub const PUBLIC_PERMISSIONS: &str = r#"{"*":{}}"#;
    /// `--console`.
    pub const CONSOLE: Console = Console::On;
    /// `--jwt-leeway`.
    pub const JWT_LEEWAY: Secs = secs!(30);
    /// `--jwks-min-interval`.
    pub const JWKS_MIN_INTERVAL: Secs = secs!(30);
    /// `--engine`.
    pub const ENGINE: Engine = Engine::Memory;
    /// `--redis-url`.
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
    /// `--nats-url`.
    pub const NATS_URL: &str = "nats://127.0.0.1:4222";
    /// `--nats-max-bytes`.
    pub const NATS_MAX_BYTES: u64 = 256 * 1024 * 1024;
    /// `--key-prefix`.
    pub const KEY_PREFIX: &str = "tidings";
    /// `--history-size`.
    pub const HISTORY_SIZE: usize = 10_000;
    /// `--history-age`.
    pub const HISTORY_AGE: Secs = secs!(300);
    /// `--history-bytes`.
    pub const HISTORY_BYTES: usize = 64 * 1024 * 1024;
    /// `--idempotency-window`.
    pub const IDEMPOTENCY_WINDOW: Secs = secs!(120);
    /// `--heartbeat-period`.
    pub const HEARTBEAT_PERIOD: Secs = secs!(30);
    /// `--auth-timeout`.
    pub const AUTH_TIMEOUT: Secs = secs!(10);
    /// `--shutdown-delay` (the CLI's; `Config::default()` has none, for embedders).
    pub const SHUTDOWN_DELAY: Secs = secs!(5);
    /// `--shutdown-timeout`.
    pub const SHUTDOWN_TIMEOUT: Secs = secs!(10);
    /// `--write-timeout`.
    pub const WRITE_TIMEOUT: Secs = secs!(10);
    /// `--max-frame-bytes`.
    pub const MAX_FRAME_BYTES: usize = 64 * 1024;
    /// `--max-publish-bytes`.
    pub const MAX_PUBLISH_BYTES: usize = 1024 * 1024;
    /// `--max-publish-events`.
    pub const MAX_PUBLISH_EVENTS: usize = 1000;
    /// `--cloudevents-collection-from`: `subject`, else the `collection` extension.
    pub const CLOUDEVENTS_COLLECTION_FROM: &str = "subject,collection";
    /// `--cloudevents-webhook-origins`: any origin.
    pub const CLOUDEVENTS_WEBHOOK_ORIGINS: &str = "*";
    /// `--debezium-tables`: every table.
    pub const DEBEZIUM_TABLES: &str = "*";
    /// `--debezium-decimal`: exact decimal strings.
    pub const DEBEZIUM_DECIMAL: DecimalMode = DecimalMode::String;
    /// `--debezium-time`: ISO 8601 strings.
    pub const DEBEZIUM_TIME: TimeMode = TimeMode::Iso;
    /// `--max-subscriptions`.
    pub const MAX_SUBSCRIPTIONS: usize = 100;
    /// `--max-connections`.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// `--max-connections-per-ip` (0: no limit).
    pub const MAX_CONNECTIONS_PER_IP: usize = 0;
    /// `--max-messages-per-second`.
    pub const MAX_MESSAGES_PER_SECOND: u32 = 50;
    /// `--outbox-messages`.
    pub const OUTBOX_MESSAGES: usize = 1024;
    /// `--outbox-bytes`.
    pub const OUTBOX_BYTES: usize = 1024 * 1024;
    /// `--coalesce-yields` (0: write at once, always).
    pub const COALESCE_YIELDS: u32 = 4;
    /// `--max-filter-depth` (the filter module's own default).
    pub const MAX_FILTER_DEPTH: usize = FilterLimits::DEFAULT.max_depth;
    /// `--max-filter-nodes`.
    pub const MAX_FILTER_NODES: usize = FilterLimits::DEFAULT.max_nodes;
    /// `--max-filter-list`.
    pub const MAX_FILTER_LIST: usize = FilterLimits::DEFAULT.max_list;
    /// `--max-regex-bytes`.
    pub const MAX_REGEX_BYTES: usize = FilterLimits::DEFAULT.max_regex_bytes;
    /// `--metrics-max-collections`.
    pub const METRICS_MAX_COLLECTIONS: usize = 100;
    /// `--state-max-items` (per collection).
    pub const STATE_MAX_ITEMS: usize = 1_000_000;
    /// `--state-max-bytes` (all collections together).
    pub const STATE_MAX_BYTES: usize = 512 * 1024 * 1024;
    /// `--max-init-items`.
    pub const MAX_INIT_ITEMS: usize = 10_000;
    /// `--transitions`.
    pub const TRANSITIONS: Transitions = Transitions::View;
    /// `--state-snapshot-interval`.
    pub const STATE_SNAPSHOT_INTERVAL: Secs = secs!(30);
    /// `--slow-consumer-policy`.
    pub const SLOW_CONSUMER_POLICY: SlowConsumerPolicy = SlowConsumerPolicy::Close;
    /// `--conflation-max-keys` (per connection).
    pub const CONFLATION_MAX_KEYS: usize = 10_000;
    /// `--log-format`.
    pub const LOG_FORMAT: LogFormat = LogFormat::Text;
}

/// Flags of `tidings serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (HTTP API, WebSocket, health and metrics). Port 0 picks a free port.
    #[arg(long, env = "TIDINGS_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Path of the WebSocket endpoint.
    #[arg(long, env = "TIDINGS_WS_PATH", default_value = defaults::WS_PATH)]
    pub ws_path: String,
    /// WebSocket authentication mode.
    #[arg(long, env = "TIDINGS_AUTH_MODE", value_enum, default_value_t = defaults::AUTH_MODE)]
    pub auth_mode: AuthMode,
    /// JSON file of static access tokens: {"<token>": {"sub": "...", "collections": {<permissions>}}}.
    #[arg(long, env = "TIDINGS_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// A static access token, `TOKEN` (every collection) or `TOKEN=coll1,coll2`. Repeatable.
    #[arg(long = "token", env = "TIDINGS_TOKEN", value_delimiter = ';')]
    pub tokens: Vec<String>,
    /// Permissions of unauthenticated connections in public mode, as JSON (default: everything).
    #[arg(
        long,
        env = "TIDINGS_PUBLIC_PERMISSIONS",
        default_value = defaults::PUBLIC_PERMISSIONS
    )]
    pub public_permissions: String,
    /// An API key publishers must send as `Authorization: Bearer <key>`: `KEY`, or `NAME=KEY`
    /// to name it in metrics. Repeatable. Without any, publishing is open (fine on loopback;
    /// a warning is logged otherwise).
    #[arg(
        long = "publish-key",
        env = "TIDINGS_PUBLISH_KEY",
        value_delimiter = ';'
    )]
    pub publish_keys: Vec<String>,
    /// JSON file of named publish keys: {"<name>": "<key>"}.
    #[arg(long, env = "TIDINGS_PUBLISH_KEYS_FILE")]
    pub publish_keys_file: Option<PathBuf>,
    /// Publishers connecting from a loopback address (127.0.0.0/8, ::1) need no key.
    #[arg(long, env = "TIDINGS_TRUST_LOOPBACK_PUBLISHERS")]
    pub trust_loopback_publishers: bool,
    /// Key for the console and `GET /v1/admin/stats` (`Authorization: Bearer <key>`, at least
    /// 16 bytes). Required when the listen address is not loopback and the console is on.
    #[arg(long, env = "TIDINGS_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Serve the console page (`GET /console`) and its JSON endpoint (`GET /v1/admin/stats`).
    #[arg(long, env = "TIDINGS_CONSOLE", value_enum, default_value_t = defaults::CONSOLE)]
    pub console: Console,
    /// HS256 secret for subscriber JWTs (at least 32 bytes).
    #[arg(long, env = "TIDINGS_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file of an RS256 (RSA) or ES256 (EC P-256) public key for subscriber JWTs. Repeatable.
    #[arg(
        long = "jwt-public-key",
        env = "TIDINGS_JWT_PUBLIC_KEY",
        value_delimiter = ';'
    )]
    pub jwt_public_keys: Vec<PathBuf>,
    /// JWKS file ({"keys":[…]}) of RS256/ES256 public keys for subscriber JWTs, matched by `kid`.
    #[arg(long, env = "TIDINGS_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// URL (http or https) of an identity provider's JWKS, fetched at start, refreshed by its
    /// cache headers (every 60 s to 1 h) and when a token names an unknown `kid`.
    #[arg(long, env = "TIDINGS_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Seconds between two JWKS fetches caused by tokens with an unknown `kid` (at least).
    #[arg(long, env = "TIDINGS_JWKS_MIN_INTERVAL", default_value = defaults::JWKS_MIN_INTERVAL.text, value_parser = parse_secs)]
    pub jwks_min_interval: Duration,
    /// Required `iss` of subscriber JWTs.
    #[arg(long, env = "TIDINGS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of subscriber JWTs.
    #[arg(long, env = "TIDINGS_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Seconds of clock skew allowed on a JWT's `exp` and `nbf` (at most 300).
    #[arg(long, env = "TIDINGS_JWT_LEEWAY", default_value = defaults::JWT_LEEWAY.text, value_parser = parse_secs)]
    pub jwt_leeway: Duration,
    /// Backplane engine: memory (one node), redis or nats (several nodes).
    #[arg(long, env = "TIDINGS_ENGINE", value_enum, default_value_t = defaults::ENGINE)]
    pub engine: Engine,
    /// Redis URL for `--engine redis`.
    #[arg(
        long,
        env = "TIDINGS_REDIS_URL",
        default_value = defaults::REDIS_URL
    )]
    pub redis_url: String,
    /// PEM file of the CA certificate(s) a `rediss://` server must be signed by, instead of
    /// the system's roots (a private or managed Redis's CA).
    #[arg(long, env = "TIDINGS_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// NATS URL for `--engine nats`.
    #[arg(
        long,
        env = "TIDINGS_NATS_URL",
        default_value = defaults::NATS_URL
    )]
    pub nats_url: String,
    /// Bytes the NATS stream may hold (`max_bytes`); the oldest events go first past it.
    /// 0: no byte limit (only the per-collection count and the age bound it).
    #[arg(long, env = "TIDINGS_NATS_MAX_BYTES", default_value_t = defaults::NATS_MAX_BYTES)]
    pub nats_max_bytes: u64,
    /// Prefix of every Redis key and NATS stream/subject this cluster uses; nodes with the
    /// same prefix form one cluster. Letters, digits, `_` and `-`.
    #[arg(long, env = "TIDINGS_KEY_PREFIX", default_value = defaults::KEY_PREFIX)]
    pub key_prefix: String,
    /// Events of history kept per collection for resume (`since`); 0 disables resume.
    #[arg(long, env = "TIDINGS_HISTORY_SIZE", default_value_t = defaults::HISTORY_SIZE)]
    pub history_size: usize,
    /// Seconds an event stays in the history.
    #[arg(long, env = "TIDINGS_HISTORY_AGE", default_value = defaults::HISTORY_AGE.text, value_parser = parse_secs)]
    pub history_age: Duration,
    /// Approximate bytes the history of all collections may hold together (0: no history).
    #[arg(long, env = "TIDINGS_HISTORY_BYTES", default_value_t = defaults::HISTORY_BYTES)]
    pub history_bytes: usize,
    /// Seconds an idempotency key is remembered (0: no deduplication).
    #[arg(long, env = "TIDINGS_IDEMPOTENCY_WINDOW", default_value = defaults::IDEMPOTENCY_WINDOW.text, value_parser = parse_secs)]
    pub idempotency_window: Duration,
    /// Key field of a collection, `COLLECTION=FIELD` (default field: `id`). Repeatable.
    #[arg(long = "key-field", env = "TIDINGS_KEY_FIELD", value_delimiter = ';')]
    pub key_fields: Vec<String>,
    /// Server heartbeat period in seconds (0 = off; also disables pong replies, as Directus).
    #[arg(long, env = "TIDINGS_HEARTBEAT_PERIOD", default_value = defaults::HEARTBEAT_PERIOD.text, value_parser = parse_secs)]
    pub heartbeat_period: Duration,
    /// Seconds a handshake-mode client has to authenticate (and to re-authenticate after expiry).
    #[arg(long, env = "TIDINGS_AUTH_TIMEOUT", default_value = defaults::AUTH_TIMEOUT.text, value_parser = parse_secs)]
    pub auth_timeout: Duration,
    /// Seconds the broker keeps serving after SIGTERM, readiness already off, so load
    /// balancers stop routing to it and the last publishes land (0 = close at once).
    #[arg(long, env = "TIDINGS_SHUTDOWN_DELAY", default_value = defaults::SHUTDOWN_DELAY.text, value_parser = parse_secs)]
    pub shutdown_delay: Duration,
    /// Seconds, after the delay, to flush outboxes, close sessions and finish in-flight
    /// requests before exiting anyway.
    #[arg(long, env = "TIDINGS_SHUTDOWN_TIMEOUT", default_value = defaults::SHUTDOWN_TIMEOUT.text, value_parser = parse_secs)]
    pub shutdown_timeout: Duration,
    /// Seconds a write to a client may take before it is closed as a slow consumer.
    #[arg(long, env = "TIDINGS_WRITE_TIMEOUT", default_value = defaults::WRITE_TIMEOUT.text, value_parser = parse_secs)]
    pub write_timeout: Duration,
    /// Largest inbound WebSocket message, in bytes.
    #[arg(long, env = "TIDINGS_MAX_FRAME_BYTES", default_value_t = defaults::MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Largest publish request body, in bytes.
    #[arg(long, env = "TIDINGS_MAX_PUBLISH_BYTES", default_value_t = defaults::MAX_PUBLISH_BYTES)]
    pub max_publish_bytes: usize,
    /// Most events in one publish request.
    #[arg(long, env = "TIDINGS_MAX_PUBLISH_EVENTS", default_value_t = defaults::MAX_PUBLISH_EVENTS)]
    pub max_publish_events: usize,
    /// CloudEvents attributes that name an event's collection, tried in order (comma-separated).
    #[arg(long, env = "TIDINGS_CLOUDEVENTS_COLLECTION_FROM", default_value = defaults::CLOUDEVENTS_COLLECTION_FROM)]
    pub cloudevents_collection_from: String,
    /// A CloudEvents `type` and the event kind it means, `TYPE=create|update|delete`, looked up
    /// before the `.created`/`.updated`/`.deleted` suffix rule. Repeatable.
    #[arg(
        long = "cloudevents-type-kind",
        env = "TIDINGS_CLOUDEVENTS_TYPE_KIND",
        value_delimiter = ';'
    )]
    pub cloudevents_type_kinds: Vec<String>,
    /// Origins the CloudEvents webhook handshake (`OPTIONS /v1/cloudevents`) allows,
    /// comma-separated; `*` allows any.
    #[arg(long, env = "TIDINGS_CLOUDEVENTS_WEBHOOK_ORIGINS", default_value = defaults::CLOUDEVENTS_WEBHOOK_ORIGINS)]
    pub cloudevents_webhook_origins: String,
    /// A Debezium table and the collection its changes go to, `TABLE=COLLECTION`; TABLE is
    /// `table` or `schema.table` (MySQL: `database.table`). Repeatable.
    #[arg(
        long = "debezium-collection",
        env = "TIDINGS_DEBEZIUM_COLLECTION",
        value_delimiter = ';'
    )]
    pub debezium_collections: Vec<String>,
    /// Debezium tables accepted (`table` or `schema.table`), comma-separated; `*`: every table.
    #[arg(long, env = "TIDINGS_DEBEZIUM_TABLES", default_value = defaults::DEBEZIUM_TABLES)]
    pub debezium_tables: String,
    /// What a Debezium base64 `Decimal` becomes: an exact string, a JSON number, or unchanged.
    #[arg(long, env = "TIDINGS_DEBEZIUM_DECIMAL", value_enum, default_value_t = defaults::DEBEZIUM_DECIMAL)]
    pub debezium_decimal: DecimalMode,
    /// What Debezium's dates and times (`io.debezium.time.*`) become: ISO 8601 strings, or
    /// unchanged epoch numbers.
    #[arg(long, env = "TIDINGS_DEBEZIUM_TIME", value_enum, default_value_t = defaults::DEBEZIUM_TIME)]
    pub debezium_time: TimeMode,
    /// Most subscriptions one connection may hold.
    #[arg(long, env = "TIDINGS_MAX_SUBSCRIPTIONS", default_value_t = defaults::MAX_SUBSCRIPTIONS)]
    pub max_subscriptions: usize,
    /// Most concurrent WebSocket connections.
    #[arg(long, env = "TIDINGS_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most concurrent WebSocket connections from one client address (0: no limit).
    #[arg(long, env = "TIDINGS_MAX_CONNECTIONS_PER_IP", default_value_t = defaults::MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,
    /// Most messages a connection may send per second, with bursts of as many plus
    /// --max-subscriptions (0: no limit).
    #[arg(long, env = "TIDINGS_MAX_MESSAGES_PER_SECOND", default_value_t = defaults::MAX_MESSAGES_PER_SECOND)]
    pub max_messages_per_second: u32,
    /// Most frames waiting in one connection's outbox before it is closed as a slow consumer.
    #[arg(long, env = "TIDINGS_OUTBOX_MESSAGES", default_value_t = defaults::OUTBOX_MESSAGES)]
    pub outbox_messages: usize,
    /// Most bytes waiting in one connection's outbox before it is closed as a slow consumer.
    #[arg(long, env = "TIDINGS_OUTBOX_BYTES", default_value_t = defaults::OUTBOX_BYTES)]
    pub outbox_bytes: usize,
    /// Most times a busy connection's session lets other tasks run before it writes, so that
    /// more frames go out in one write (0: write at once). Only a session whose last write
    /// carried several frames waits, and only while more keep arriving.
    #[arg(long, env = "TIDINGS_COALESCE_YIELDS", default_value_t = defaults::COALESCE_YIELDS)]
    pub coalesce_yields: u32,
    /// Deepest nesting a subscription filter may have.
    #[arg(long, env = "TIDINGS_MAX_FILTER_DEPTH", default_value_t = defaults::MAX_FILTER_DEPTH)]
    pub max_filter_depth: usize,
    /// Most operators a subscription filter may have.
    #[arg(long, env = "TIDINGS_MAX_FILTER_NODES", default_value_t = defaults::MAX_FILTER_NODES)]
    pub max_filter_nodes: usize,
    /// Longest `_in`/`_nin` list in a filter.
    #[arg(long, env = "TIDINGS_MAX_FILTER_LIST", default_value_t = defaults::MAX_FILTER_LIST)]
    pub max_filter_list: usize,
    /// Largest compiled `_regex`, in bytes.
    #[arg(long, env = "TIDINGS_MAX_REGEX_BYTES", default_value_t = defaults::MAX_REGEX_BYTES)]
    pub max_regex_bytes: usize,
    /// Most distinct `collection` label values in metrics; the rest are reported as `_other`.
    #[arg(long, env = "TIDINGS_METRICS_MAX_COLLECTIONS", default_value_t = defaults::METRICS_MAX_COLLECTIONS)]
    pub metrics_max_collections: usize,
    /// A collection that retains the latest version of every item (`*`: every collection):
    /// `init` lists them, updates may be partial, deletes may carry keys only. Repeatable.
    /// Memory engine only for now.
    #[arg(long = "state", env = "TIDINGS_STATE", value_delimiter = ';')]
    pub state: Vec<String>,
    /// An equality index on a field of a retained collection, `COLLECTION.FIELD` (the field
    /// may be dotted): `init` and reads whose filter has a top-level `_eq`/`_in` on it parse
    /// only the matching items. Repeatable.
    #[arg(
        long = "state-index",
        env = "TIDINGS_STATE_INDEX",
        value_delimiter = ';'
    )]
    pub state_index: Vec<String>,
    /// Most items one retained collection may hold; creating more is refused (507).
    #[arg(long, env = "TIDINGS_STATE_MAX_ITEMS", default_value_t = defaults::STATE_MAX_ITEMS)]
    pub state_max_items: usize,
    /// Approximate bytes all retained collections may hold together; creating more is
    /// refused (507).
    #[arg(long, env = "TIDINGS_STATE_MAX_BYTES", default_value_t = defaults::STATE_MAX_BYTES)]
    pub state_max_bytes: usize,
    /// Most items one retained `init` may carry; a subscribe over it gets LIMIT_EXCEEDED.
    #[arg(long, env = "TIDINGS_MAX_INIT_ITEMS", default_value_t = defaults::MAX_INIT_ITEMS)]
    pub max_init_items: usize,
    /// On a retained collection, how an update that enters or leaves a subscription's
    /// filter is sent: `view` (create / key-only delete with "cause") or `directus`
    /// (enter as update, leave not sent).
    #[arg(long, env = "TIDINGS_TRANSITIONS", value_enum, default_value_t = defaults::TRANSITIONS)]
    pub transitions: Transitions,
    /// Directory where the memory engine keeps a snapshot of the retained state, written
    /// every --state-snapshot-interval and at shutdown, and restored at start.
    #[arg(long, env = "TIDINGS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds between two snapshots into --state-dir (0: only at shutdown).
    #[arg(long, env = "TIDINGS_STATE_SNAPSHOT_INTERVAL", default_value = defaults::STATE_SNAPSHOT_INTERVAL.text, value_parser = parse_secs)]
    pub state_snapshot_interval: Duration,
    /// What happens to a subscriber whose outbox passes --outbox-messages/--outbox-bytes:
    /// `close` (4008) or `conflate` (on a retained collection, pending frames of one item
    /// are merged into one with its latest value; other collections close). Per collection
    /// in the collections file.
    #[arg(long, env = "TIDINGS_SLOW_CONSUMER_POLICY", value_enum, default_value_t = defaults::SLOW_CONSUMER_POLICY)]
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Most item keys one connection's conflated frames may hold pending; past it a
    /// conflating subscription gets a fresh init instead (the third within a minute closes
    /// the connection with 4008). Also the most keys its `max_rate` subscriptions remember
    /// as within their interval.
    #[arg(long, env = "TIDINGS_CONFLATION_MAX_KEYS", default_value_t = defaults::CONFLATION_MAX_KEYS)]
    pub conflation_max_keys: usize,
    /// JSON file of per-collection settings (key field, state, max items, transitions) and
    /// whether undeclared collections are allowed; what it sets wins over the flags above.
    #[arg(long, env = "TIDINGS_COLLECTIONS_FILE")]
    pub collections_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "TIDINGS_LOG_FORMAT", value_enum, default_value_t = defaults::LOG_FORMAT)]
    pub log_format: LogFormat,
}

/// A configuration error: which flag, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    /// The flag's long name, without dashes.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}

fn err(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        message: message.into(),
    }
}

/// Parses a non-negative number of seconds, fractions allowed (`0.5`).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
        return Err(format!(
            "`{s}` is not a number of seconds between 0 and one year"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The validated configuration the broker runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// WebSocket endpoint path.
    pub ws_path: String,
    /// WebSocket authentication mode.
    pub auth_mode: AuthMode,
    /// Static access tokens.
    pub tokens: TokenStore,
    /// What an unauthenticated connection may read (public mode only).
    pub public_permissions: Permissions,
    /// Publisher API keys; none means publishing is open.
    pub publish_keys: PublishKeys,
    /// Publishers on a loopback address need no key.
    pub trust_loopback_publishers: bool,
    /// The console's and admin endpoint's key; `None`: they are open (loopback only).
    pub admin_key: Option<AdminKey>,
    /// Whether the console and the admin endpoint are served.
    pub console: bool,
    /// Subscriber JWT verification; `None`: JWTs are refused.
    pub jwt: Option<Arc<JwtVerifier>>,
    /// Backplane engine.
    pub engine: Engine,
    /// Redis URL (redis engine).
    pub redis_url: String,
    /// PEM CA certificates a `rediss://` server must be signed by; `None`: system roots.
    pub redis_ca: Option<Arc<[u8]>>,
    /// NATS URL (nats engine).
    pub nats_url: String,
    /// Byte limit of the NATS stream; 0: none.
    pub nats_max_bytes: u64,
    /// Namespace of the cluster's keys, streams and subjects.
    pub key_prefix: String,
    /// History kept per collection for resume.
    pub history: HistoryLimits,
    /// How long idempotency keys are remembered.
    pub idempotency_window: Duration,
    /// Key field per collection; absent collections use `id`.
    pub key_fields: HashMap<String, String>,
    /// Heartbeat period; `None` disables the heartbeat (and pong replies).
    pub heartbeat_period: Option<Duration>,
    /// Handshake / re-auth window.
    pub auth_timeout: Duration,
    /// How long the broker keeps serving, not ready, before it closes sessions.
    pub shutdown_delay: Duration,
    /// Bound on the shutdown drain after the delay.
    pub shutdown_timeout: Duration,
    /// Bound on one write to a client.
    pub write_timeout: Duration,
    /// Largest inbound WebSocket message.
    pub max_frame_bytes: usize,
    /// Largest publish body.
    pub max_publish_bytes: usize,
    /// Most events per publish request.
    pub max_publish_events: usize,
    /// How `POST /v1/cloudevents` maps an event to a collection and kind.
    pub cloudevents: Mapping,
    /// Origins the CloudEvents webhook handshake allows; `*` allows any.
    pub cloudevents_webhook_origins: Vec<String>,
    /// How `POST /v1/debezium` maps a change to a collection, and converts logical types.
    pub debezium: debezium::Mapping,
    /// Most subscriptions per connection.
    pub max_subscriptions: usize,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Most concurrent connections per client address; 0 = no limit.
    pub max_connections_per_ip: usize,
    /// Inbound message rate per connection; 0 = no limit.
    pub max_messages_per_second: u32,
    /// Outbox bound in frames.
    pub outbox_messages: usize,
    /// Outbox bound in bytes.
    pub outbox_bytes: usize,
    /// Yields a busy session may make before a write, to gather frames; 0 = none.
    pub coalesce_yields: u32,
    /// Limits on subscription filters.
    pub filter_limits: FilterLimits,
    /// Cap on distinct `collection` label values.
    pub metrics_max_collections: usize,
    /// Retained state: which collections, how much.
    pub state: StateSettings,
    /// How enter/leave transitions are sent (per collection, the collections file wins).
    pub transitions: Transitions,
    /// What happens to slow subscribers (per collection, the collections file wins).
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Hard bound of a connection's conflated frames, in item keys.
    pub conflation_max_keys: usize,
    /// `--collections-file`: per-collection settings, and whether undeclared collections
    /// exist.
    pub collections_file: Option<Arc<CollectionsFile>>,
    /// `--state-dir`: where the memory engine's snapshot of the retained state lives.
    pub state_dir: Option<PathBuf>,
    /// Period of the `--state-dir` snapshots; `None`: only at shutdown.
    pub state_snapshot_interval: Option<Duration>,
}

impl Config {
    /// The configured limits as `tidings_config_limit{limit}` gauges show them.
    pub fn limit_gauges(&self) -> Vec<(&'static str, u64)> {
        let n = |v: usize| v as u64;
        vec![
            ("max_connections", n(self.max_connections)),
            ("max_connections_per_ip", n(self.max_connections_per_ip)),
            ("max_subscriptions", n(self.max_subscriptions)),
            (
                "max_messages_per_second",
                u64::from(self.max_messages_per_second),
            ),
            ("max_frame_bytes", n(self.max_frame_bytes)),
            ("max_publish_bytes", n(self.max_publish_bytes)),
            ("max_publish_events", n(self.max_publish_events)),
            ("outbox_messages", n(self.outbox_messages)),
            ("outbox_bytes", n(self.outbox_bytes)),
            ("history_size", n(self.history.max_events)),
            ("history_bytes", n(self.history.max_bytes)),
            ("metrics_max_collections", n(self.metrics_max_collections)),
            ("state_max_items", n(self.state.max_items)),
            ("state_max_bytes", n(self.state.max_bytes)),
            ("max_init_items", n(self.state.max_init_items)),
            ("conflation_max_keys", n(self.conflation_max_keys)),
            ("history_age_seconds", self.history.max_age.as_secs()),
            ("write_timeout_seconds", self.write_timeout.as_secs()),
        ]
    }
}

impl Default for Config {
    /// The embedded defaults ([`defaults`], the same as the CLI's): public mode, memory engine.
    fn default() -> Self {
        Config {
            ws_path: defaults::WS_PATH.into(),
            auth_mode: defaults::AUTH_MODE,
            tokens: TokenStore::default(),
            // `{"*":{}}`, the parsed form of `defaults::PUBLIC_PERMISSIONS` (a test checks).
            public_permissions: Permissions::all(),
            publish_keys: PublishKeys::default(),
            trust_loopback_publishers: false,
            admin_key: None,
            console: defaults::CONSOLE == Console::On,
            jwt: None,
            engine: defaults::ENGINE,
            redis_url: defaults::REDIS_URL.into(),
            redis_ca: None,
            nats_url: defaults::NATS_URL.into(),
            nats_max_bytes: defaults::NATS_MAX_BYTES,
            key_prefix: defaults::KEY_PREFIX.into(),
            history: HistoryLimits {
                max_events: defaults::HISTORY_SIZE,
                max_age: defaults::HISTORY_AGE.duration(),
                max_bytes: defaults::HISTORY_BYTES,
            },
            idempotency_window: defaults::IDEMPOTENCY_WINDOW.duration(),
            key_fields: HashMap::new(),
            heartbeat_period: Some(defaults::HEARTBEAT_PERIOD.duration()),
            auth_timeout: defaults::AUTH_TIMEOUT.duration(),
            // Embedders drive their own lifecycle: no delay unless they ask (the CLI's is
            // defaults::SHUTDOWN_DELAY).
            shutdown_delay: Duration::ZERO,
            shutdown_timeout: defaults::SHUTDOWN_TIMEOUT.duration(),
            write_timeout: defaults::WRITE_TIMEOUT.duration(),
            max_frame_bytes: defaults::MAX_FRAME_BYTES,
            max_publish_bytes: defaults::MAX_PUBLISH_BYTES,
            max_publish_events: defaults::MAX_PUBLISH_EVENTS,
            cloudevents: Mapping::default(),
            cloudevents_webhook_origins: vec![defaults::CLOUDEVENTS_WEBHOOK_ORIGINS.into()],
            debezium: debezium::Mapping::default(),
            max_subscriptions: defaults::MAX_SUBSCRIPTIONS,
            max_connections: defaults::MAX_CONNECTIONS,
            max_connections_per_ip: defaults::MAX_CONNECTIONS_PER_IP,
            max_messages_per_second: defaults::MAX_MESSAGES_PER_SECOND,
            outbox_messages: defaults::OUTBOX_MESSAGES,
            outbox_bytes: defaults::OUTBOX_BYTES,
            coalesce_yields: defaults::COALESCE_YIELDS,
            filter_limits: FilterLimits::DEFAULT,
            metrics_max_collections: defaults::METRICS_MAX_COLLECTIONS,
            state: StateSettings {
                collections: Vec::new(),
                max_items: defaults::STATE_MAX_ITEMS,
                max_bytes: defaults::STATE_MAX_BYTES,
                max_init_items: defaults::MAX_INIT_ITEMS,
                file: None,
                indexes: Vec::new(),
            },
            transitions: defaults::TRANSITIONS,
            slow_consumer_policy: defaults::SLOW_CONSUMER_POLICY,
            conflation_max_keys: defaults::CONFLATION_MAX_KEYS,
            collections_file: None,
            state_dir: None,
            state_snapshot_interval: Some(defaults::STATE_SNAPSHOT_INTERVAL.duration()),
        }
    }
}

impl Config {
    /// The per-collection flags and the collections file, to resolve a collection's
    /// settings from (the file wins; see [`crate::collections`]).
    pub fn shorthand(&self) -> Shorthand<'_> {
        Shorthand {
            file: self.collections_file.as_deref(),
            key_fields: &self.key_fields,
            state: &self.state.collections,
            max_items: self.state.max_items,
            transitions: self.transitions,
            slow_consumer_policy: self.slow_consumer_policy,
        }
    }

    /// Every setting of `collection`; `None` when the collections file forbids it.
    pub fn collection(&self, collection: &str) -> Option<CollectionSettings> {
        self.shorthand().resolve(collection)
    }

    /// The key field of `collection`.
    pub fn key_field(&self, collection: &str) -> &str {
        self.shorthand().key_field(collection)
    }

    /// Whether clients may use `collection` (the collections file may forbid undeclared ones).
    pub fn collection_exists(&self, collection: &str) -> bool {
        self.shorthand().exists(collection)
    }

    /// Checks invariants that hold however the config was built (CLI or code).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.ws_path.starts_with('/') || self.ws_path.len() < 2 {
            return Err(err(
                "ws-path",
                "must start with `/` and name a path, e.g. /websocket",
            ));
        }
        for reserved in ["/v1", "/healthz", "/readyz", "/metrics", "/console"] {
            if self.ws_path == reserved || self.ws_path.starts_with(&format!("{reserved}/")) {
                return Err(err(
                    "ws-path",
                    format!("`{}` collides with {reserved}", self.ws_path),
                ));
            }
        }
        let positive = [
            ("max-frame-bytes", self.max_frame_bytes),
            ("max-publish-bytes", self.max_publish_bytes),
            ("max-publish-events", self.max_publish_events),
            ("max-subscriptions", self.max_subscriptions),
            ("max-connections", self.max_connections),
            ("outbox-messages", self.outbox_messages),
            ("outbox-bytes", self.outbox_bytes),
            ("max-filter-depth", self.filter_limits.max_depth),
            ("max-filter-nodes", self.filter_limits.max_nodes),
            ("max-filter-list", self.filter_limits.max_list),
            ("max-regex-bytes", self.filter_limits.max_regex_bytes),
            ("state-max-items", self.state.max_items),
            ("state-max-bytes", self.state.max_bytes),
            ("max-init-items", self.state.max_init_items),
            ("conflation-max-keys", self.conflation_max_keys),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(err(flag, "must be greater than 0"));
            }
        }
        if self.write_timeout.is_zero() {
            return Err(err("write-timeout", "must be greater than 0"));
        }
        if self.auth_timeout.is_zero() {
            return Err(err("auth-timeout", "must be greater than 0"));
        }
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !prefix_ok {
            return Err(err(
                "key-prefix",
                "must be 1 to 64 letters, digits, `_` or `-`",
            ));
        }
        if self.engine == Engine::Redis {
            crate::backplane::redis::check_url(&self.redis_url)
                .map_err(|message| err("redis-url", message))?;
            if self.redis_ca.is_some() && !crate::backplane::redis::is_tls_url(&self.redis_url) {
                return Err(err("redis-ca-file", "needs a rediss:// --redis-url"));
            }
        }
        if self.engine == Engine::Nats {
            crate::backplane::nats::check_url(&self.nats_url).map_err(|m| err("nats-url", m))?;
            if self.nats_max_bytes > i64::MAX as u64 {
                return Err(err("nats-max-bytes", "is too large"));
            }
        }
        for (collection, field) in &self.state.indexes {
            if !crate::event::valid_collection_name(collection) || field.is_empty() {
                return Err(err(
                    "state-index",
                    format!("`{collection}.{field}` is not COLLECTION.FIELD"),
                ));
            }
            if !self.shorthand().retains(collection) {
                return Err(err(
                    "state-index",
                    format!("`{collection}` retains no items: add --state {collection}"),
                ));
            }
        }
        if let Some(file) = self.collections_file.as_deref() {
            for (collection, declared) in &file.collections {
                if !declared.indexes.is_empty() && !self.shorthand().retains(collection) {
                    return Err(err(
                        "collections-file",
                        format!("`{collection}` declares indexes but retains no items (set \"state\": true)"),
                    ));
                }
            }
        }
        for collection in &self.state.collections {
            if collection != "*" && !crate::event::valid_collection_name(collection) {
                return Err(err(
                    "state",
                    format!("`{collection}` is not a collection name (or `*`)"),
                ));
            }
        }
        self.shorthand()
            .check()
            .map_err(|(flag, message)| err(flag, message))?;
        if self.shorthand().any_state() && self.engine == Engine::Nats {
            return Err(err(
                "state",
                "retained state needs --engine memory or redis for now (state shared through NATS is not built yet)",
            ));
        }
        if self.state_dir.is_some() && self.engine != Engine::Memory {
            return Err(err(
                "state-dir",
                "is for --engine memory (the shared engines keep their state themselves)",
            ));
        }
        if self
            .state_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(err("state-dir", "names no directory"));
        }
        if self.auth_mode == AuthMode::Strict && self.tokens.is_empty() && self.jwt.is_none() {
            return Err(err(
                "auth-mode",
                "strict mode needs at least one token (--token or --tokens-file) or a JWT key",
            ));
        }
        Ok(())
    }
}

/// The console and the admin endpoint are open only to loopback: on any other listen address
/// they need `--admin-key` (or `--console off`).
pub fn check_admin_exposure(
    console: bool,
    has_key: bool,
    listen: SocketAddr,
) -> Result<(), ConfigError> {
    if console && !has_key && !listen.ip().to_canonical().is_loopback() {
        return Err(err(
            "admin-key",
            format!(
                "the console and GET /v1/admin/stats would be open to anyone who can reach \
                 {listen}: set --admin-key (at least 16 bytes), or --console off, or listen on \
                 a loopback address"
            ),
        ));
    }
    Ok(())
}

impl ServeArgs {
    /// Validates the flags into a [`Config`], reading the tokens file if one is given.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut tokens = TokenStore::default();
        if let Some(path) = &self.tokens_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                err(
                    "tokens-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            tokens = TokenStore::from_json(&text)
                .map_err(|e| err("tokens-file", format!("{}: {e}", path.display())))?;
        }
        for spec in &self.tokens {
            let (token, principal) = parse_token_flag(spec).map_err(|m| err("token", m))?;
            tokens.insert(token, principal);
        }
        let public_permissions = Permissions::from_json_str(&self.public_permissions)
            .map_err(|e| err("public-permissions", e.to_string()))?;
        let mut key_fields = HashMap::new();
        for spec in &self.key_fields {
            let (collection, field) = spec
                .split_once('=')
                .filter(|(c, f)| !c.trim().is_empty() && !f.trim().is_empty())
                .ok_or_else(|| err("key-field", format!("`{spec}` is not COLLECTION=FIELD")))?;
            key_fields.insert(collection.trim().to_string(), field.trim().to_string());
        }
        let admin_key = self
            .admin_key
            .as_deref()
            .map(AdminKey::new)
            .transpose()
            .map_err(|e| err("admin-key", e.to_string()))?;
        let console = self.console == Console::On;
        check_admin_exposure(console, admin_key.is_some(), self.listen)?;
        let cloudevents = cloudevents_mapping(
            &self.cloudevents_collection_from,
            &self.cloudevents_type_kinds,
        )?;
        let cloudevents_webhook_origins = list(&self.cloudevents_webhook_origins);
        if cloudevents_webhook_origins.is_empty() {
            return Err(err(
                "cloudevents-webhook-origins",
                "names no origin (`*` allows any)",
            ));
        }
        let debezium = debezium_mapping(
            &self.debezium_collections,
            &self.debezium_tables,
            self.debezium_decimal,
            self.debezium_time,
        )?;
        let mut publish_keys = PublishKeys::default();
        publish_keys
            .add_flags(&self.publish_keys)
            .map_err(|e| err("publish-key", e.to_string()))?;
        if let Some(path) = &self.publish_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                err(
                    "publish-keys-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            publish_keys
                .add_json(&text)
                .map_err(|e| err("publish-keys-file", format!("{}: {e}", path.display())))?;
        }
        let redis_ca = match &self.redis_ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    err(
                        "redis-ca-file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    return Err(err(
                        "redis-ca-file",
                        format!("{} holds no PEM certificate", path.display()),
                    ));
                }
                Some(Arc::from(pem))
            }
        };
        let jwt = JwtSettings {
            secret: self.jwt_secret,
            public_keys: self.jwt_public_keys,
            jwks_file: self.jwks_file,
            jwks_url: self.jwks_url,
            jwks_min_interval: self.jwks_min_interval,
            issuer: self.jwt_issuer,
            audience: self.jwt_audience,
            leeway: self.jwt_leeway,
        }
        .build()
        .map_err(|e| err(e.flag, e.message))?
        .map(Arc::new);
        let collections_file = match &self.collections_file {
            None => None,
            Some(path) => Some(Arc::new(
                CollectionsFile::read(path).map_err(|e| err("collections-file", e.to_string()))?,
            )),
        };
        let config = Config {
            ws_path: self.ws_path,
            auth_mode: self.auth_mode,
            tokens,
            public_permissions,
            publish_keys,
            trust_loopback_publishers: self.trust_loopback_publishers,
            admin_key,
            console,
            jwt,
            engine: self.engine,
            redis_url: self.redis_url,
            redis_ca,
            nats_url: self.nats_url,
            nats_max_bytes: self.nats_max_bytes,
            key_prefix: self.key_prefix,
            history: HistoryLimits {
                max_events: self.history_size,
                max_age: self.history_age,
                max_bytes: self.history_bytes,
            },
            idempotency_window: self.idempotency_window,
            key_fields,
            heartbeat_period: Some(self.heartbeat_period).filter(|d| !d.is_zero()),
            auth_timeout: self.auth_timeout,
            shutdown_delay: self.shutdown_delay,
            shutdown_timeout: self.shutdown_timeout,
            write_timeout: self.write_timeout,
            max_frame_bytes: self.max_frame_bytes,
            max_publish_bytes: self.max_publish_bytes,
            max_publish_events: self.max_publish_events,
            cloudevents,
            cloudevents_webhook_origins,
            debezium,
            max_subscriptions: self.max_subscriptions,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_messages_per_second: self.max_messages_per_second,
            outbox_messages: self.outbox_messages,
            outbox_bytes: self.outbox_bytes,
            coalesce_yields: self.coalesce_yields,
            filter_limits: FilterLimits {
                max_depth: self.max_filter_depth,
                max_nodes: self.max_filter_nodes,
                max_list: self.max_filter_list,
                max_regex_bytes: self.max_regex_bytes,
            },
            metrics_max_collections: self.metrics_max_collections,
            state: StateSettings {
                collections: self
                    .state
                    .iter()
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty())
                    .collect(),
                max_items: self.state_max_items,
                max_bytes: self.state_max_bytes,
                max_init_items: self.max_init_items,
                file: None,
                indexes: self
                    .state_index
                    .iter()
                    .map(|spec| match spec.trim().split_once('.') {
                        Some((c, f)) => (c.to_string(), f.to_string()),
                        None => (spec.trim().to_string(), String::new()),
                    })
                    .collect(),
            },
            transitions: self.transitions,
            slow_consumer_policy: self.slow_consumer_policy,
            conflation_max_keys: self.conflation_max_keys,
            collections_file,
            state_dir: self.state_dir,
            state_snapshot_interval: Some(self.state_snapshot_interval).filter(|d| !d.is_zero()),
        };
        config.validate()?;
        Ok(config)
    }
}

/// The items of a comma-separated flag, trimmed, empty ones dropped.
fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// `--cloudevents-collection-from` and `--cloudevents-type-kind` into the mapping.
fn cloudevents_mapping(
    collection_from: &str,
    type_kinds: &[String],
) -> Result<Mapping, ConfigError> {
    let collection_from = list(collection_from);
    if collection_from.is_empty() {
        return Err(err(
            "cloudevents-collection-from",
            "names no attribute (the default is subject,collection)",
        ));
    }
    for name in &collection_from {
        valid_attribute_name(name).map_err(|m| err("cloudevents-collection-from", m))?;
    }
    let mut mapping = Mapping {
        collection_from,
        type_kinds: HashMap::new(),
    };
    for spec in type_kinds {
        let (ty, kind) = spec
            .rsplit_once('=')
            .map(|(t, k)| (t.trim(), k.trim()))
            .filter(|(t, _)| !t.is_empty())
            .ok_or_else(|| {
                err(
                    "cloudevents-type-kind",
                    format!("`{spec}` is not TYPE=KIND"),
                )
            })?;
        let kind = EventKind::parse(kind).ok_or_else(|| {
            err(
                "cloudevents-type-kind",
                format!("`{kind}` in `{spec}` is not create, update or delete"),
            )
        })?;
        mapping.type_kinds.insert(ty.to_string(), kind);
    }
    Ok(mapping)
}

/// The `--debezium-*` flags into the mapping.
fn debezium_mapping(
    collections: &[String],
    tables: &str,
    decimal: DecimalMode,
    time: TimeMode,
) -> Result<debezium::Mapping, ConfigError> {
    let mut mapping = debezium::Mapping {
        decimal,
        time,
        ..debezium::Mapping::default()
    };
    for spec in collections {
        let (table, collection) = spec
            .split_once('=')
            .map(|(t, c)| (t.trim(), c.trim()))
            .filter(|(t, c)| !t.is_empty() && !c.is_empty())
            .ok_or_else(|| {
                err(
                    "debezium-collection",
                    format!("`{spec}` is not TABLE=COLLECTION"),
                )
            })?;
        if !crate::event::valid_collection_name(collection) {
            return Err(err(
                "debezium-collection",
                format!("`{collection}` in `{spec}` is not a valid collection name"),
            ));
        }
        mapping
            .collections
            .insert(table.to_string(), collection.to_string());
    }
    let tables = list(tables);
    if tables.is_empty() {
        return Err(err(
            "debezium-tables",
            "names no table (`*` accepts every table)",
        ));
    }
    if !tables.iter().any(|t| t == "*") {
        mapping.tables = Some(tables.into_iter().collect());
    }
    Ok(mapping)
}

/// `TOKEN` grants every collection; `TOKEN=a,b` grants collections `a` and `b`.
fn parse_token_flag(spec: &str) -> Result<(String, Principal), String> {
    let (token, collections) = match spec.split_once('=') {
        Some((t, c)) => (t.trim(), Some(c)),
        None => (spec.trim(), None),
    };
    if token.is_empty() {
        return Err(format!("`{spec}` has an empty token"));
    }
    let permissions = match collections {
        None => Permissions::all(),
        Some(list) => {
            let names: Vec<&str> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if names.is_empty() {
                return Err(format!("`{spec}` names no collection after `=`"));
            }
            Permissions::collections(names)
        }
    };
    Ok((token.to_string(), Principal::new(None, permissions)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["tidings"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .expect("clap parse")
            .serve
            .into_config()
    }

    /// `tidings serve`'s clap command.
    fn serve_command() -> clap::Command {
        use clap::Args as _;
        ServeArgs::augment_args(clap::Command::new("tidings"))
    }

    fn parse_defaults() -> Config {
        use clap::FromArgMatches as _;
        // Blind to the environment: a developer's `TIDINGS_*` variables must not count.
        let matches = serve_command()
            .mut_args(|a| a.env(None))
            .try_get_matches_from(["tidings"])
            .expect("no flags parse");
        ServeArgs::from_arg_matches(&matches)
            .expect("defaults")
            .into_config()
            .expect("the defaults are a valid configuration")
    }

    #[test]
    fn defaults_are_valid_and_match_config_default() {
        // Every field: the Debug forms are equal (no field is skipped by hand). The one
        // deliberate difference: embedders get no shutdown delay unless they ask.
        assert_eq!(Config::default().shutdown_delay, Duration::ZERO);
        assert_eq!(
            format!("{:#?}", parse_defaults()),
            format!(
                "{:#?}",
                Config {
                    shutdown_delay: defaults::SHUTDOWN_DELAY.duration(),
                    ..Config::default()
                }
            )
        );
        assert_eq!(
            Permissions::from_json_str(defaults::PUBLIC_PERMISSIONS)
                .map(|p| format!("{p:?}"))
                .ok(),
            Some(format!("{:?}", Permissions::all()))
        );
        Config::default()
            .validate()
            .expect("Config::default is valid");
    }

    /// README's table of `tidings serve` flags lists every flag, with its environment variable
    /// and its default exactly as clap has them, and no flag that does not exist.
    #[test]
    fn readme_flag_table_matches_the_cli() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let table: Vec<Vec<String>> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| flag | env | default | meaning |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                l.split('|')
                    .skip(1)
                    .take(3)
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect();
        assert!(table.len() > 20, "no flag table found in README.md");
        let unquote = |cell: &str| {
            cell.split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| cell.to_string())
        };
        let command = serve_command();
        let mut documented = std::collections::BTreeSet::new();
        for row in &table {
            let flag = unquote(&row[0]);
            let long = flag.trim_start_matches("--");
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .unwrap_or_else(|| panic!("README.md documents {flag}, which does not exist"));
            documented.insert(long.to_string());
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(Some(unquote(&row[1])), env, "README.md: env of {flag}");
            let default: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            match default.as_slice() {
                [] if switch => assert_eq!(row[2], "off", "README.md: {flag} is off"),
                [] => assert_eq!(row[2], "—", "README.md: {flag} has no default"),
                [d] => assert_eq!(&unquote(&row[2]), d, "README.md: default of {flag}"),
                more => panic!("{flag} has several defaults: {more:?}"),
            }
        }
        for arg in command.get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    documented.contains(long),
                    "README.md's flag table misses --{long}"
                );
            }
        }
    }

    #[test]
    fn errors_name_the_flag() {
        assert_eq!(parse(&["--ws-path", "ws"]).unwrap_err().flag, "ws-path");
        assert_eq!(
            parse(&["--ws-path", "/metrics"]).unwrap_err().flag,
            "ws-path"
        );
        assert_eq!(
            parse(&["--key-field", "orders"]).unwrap_err().flag,
            "key-field"
        );
        assert_eq!(parse(&["--token", "=a"]).unwrap_err().flag, "token");
        assert_eq!(
            parse(&["--outbox-bytes", "0"]).unwrap_err().flag,
            "outbox-bytes"
        );
        assert_eq!(
            parse(&["--auth-mode", "strict"]).unwrap_err().flag,
            "auth-mode"
        );
        assert_eq!(
            parse(&["--public-permissions", "[1]"]).unwrap_err().flag,
            "public-permissions"
        );
        assert_eq!(
            parse(&["--tokens-file", "/nonexistent/x.json"])
                .unwrap_err()
                .flag,
            "tokens-file"
        );
    }

    #[test]
    fn heartbeat_zero_is_off_and_fractions_parse() {
        let c = parse(&["--heartbeat-period", "0", "--auth-timeout", "0.25"]).unwrap();
        assert_eq!(c.heartbeat_period, None);
        assert_eq!(c.auth_timeout, Duration::from_millis(250));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("NaN").is_err());
    }

    #[test]
    fn auth_flags() {
        let c = parse(&[
            "--publish-key",
            "k1",
            "--publish-key",
            "ci=k2",
            "--trust-loopback-publishers",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--max-connections-per-ip",
            "3",
            "--max-messages-per-second",
            "0",
            "--auth-mode",
            "strict",
        ])
        .unwrap();
        assert_eq!(c.publish_keys.accepts("k2").as_deref(), Some("ci"));
        assert!(c.trust_loopback_publishers);
        assert!(c.jwt.is_some());
        assert_eq!(c.max_connections_per_ip, 3);
        assert_eq!(c.max_messages_per_second, 0);
        let d = parse(&[]).unwrap();
        assert!(!d.trust_loopback_publishers && d.jwt.is_none());
        assert_eq!(d.max_messages_per_second, 50);
        assert_eq!(
            parse(&["--jwt-secret", "short"]).unwrap_err().flag,
            "jwt-secret"
        );
        assert_eq!(
            parse(&[
                "--jwt-leeway",
                "301",
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef"
            ])
            .unwrap_err()
            .flag,
            "jwt-leeway"
        );
        assert_eq!(
            parse(&["--jwt-public-key", "/nonexistent.pem"])
                .unwrap_err()
                .flag,
            "jwt-public-key"
        );
        assert_eq!(
            parse(&["--jwks-file", "/nonexistent"]).unwrap_err().flag,
            "jwks-file"
        );
        assert_eq!(
            parse(&["--jwt-issuer", "x"]).unwrap_err().flag,
            "jwt-issuer"
        );
        assert_eq!(
            parse(&["--publish-key", "a=k", "--publish-key", "a=j"])
                .unwrap_err()
                .flag,
            "publish-key"
        );
        assert_eq!(
            parse(&["--publish-keys-file", "/nonexistent"])
                .unwrap_err()
                .flag,
            "publish-keys-file"
        );
    }

    #[test]
    fn token_flags_and_key_fields() {
        let c = parse(&[
            "--token",
            "t1",
            "--token",
            "t2=a, b",
            "--key-field",
            "orders=order_id",
        ])
        .unwrap();
        assert!(c
            .tokens
            .get("t1")
            .unwrap()
            .permissions
            .for_collection("zzz")
            .is_some());
        let t2 = c.tokens.get("t2").unwrap();
        assert!(t2.permissions.for_collection("b").is_some());
        assert!(t2.permissions.for_collection("c").is_none());
        assert_eq!(c.key_field("orders"), "order_id");
        assert_eq!(c.key_field("other"), "id");
    }

    #[test]
    fn cloudevents_flags() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.cloudevents, Mapping::default());
        assert_eq!(c.cloudevents_webhook_origins, ["*"]);
        assert_eq!(c.debezium, debezium::Mapping::default());
        let d = parse(&[
            "--debezium-collection",
            "public.customers=people",
            "--debezium-tables",
            "public.customers, orders",
            "--debezium-decimal",
            "number",
            "--debezium-time",
            "epoch",
        ])
        .unwrap()
        .debezium;
        assert_eq!(d.collections["public.customers"], "people");
        assert_eq!(
            d.tables,
            Some(["public.customers".to_string(), "orders".to_string()].into())
        );
        assert_eq!((d.decimal, d.time), (DecimalMode::Number, TimeMode::Epoch));
        let c = parse(&[
            "--cloudevents-collection-from",
            "tenant, subject",
            "--cloudevents-type-kind",
            "com.shop.order.placed=create",
            "--cloudevents-type-kind",
            "a=b=delete",
            "--cloudevents-webhook-origins",
            "eventgrid.azure.net, example.com",
        ])
        .unwrap();
        assert_eq!(c.cloudevents.collection_from, ["tenant", "subject"]);
        assert_eq!(
            c.cloudevents.kind("com.shop.order.placed"),
            Some(EventKind::Create)
        );
        assert_eq!(c.cloudevents.kind("a=b"), Some(EventKind::Delete));
        assert_eq!(
            c.cloudevents_webhook_origins,
            ["eventgrid.azure.net", "example.com"]
        );
        for (args, flag) in [
            (
                ["--cloudevents-collection-from", " , "],
                "cloudevents-collection-from",
            ),
            (
                ["--cloudevents-collection-from", "Subject"],
                "cloudevents-collection-from",
            ),
            (
                ["--cloudevents-type-kind", "x.placed"],
                "cloudevents-type-kind",
            ),
            (
                ["--cloudevents-type-kind", "x.placed=upsert"],
                "cloudevents-type-kind",
            ),
            (
                ["--cloudevents-webhook-origins", ","],
                "cloudevents-webhook-origins",
            ),
        ] {
            let e = parse(&args).unwrap_err();
            assert_eq!(e.flag, flag, "{args:?}");
        }
    }
}
