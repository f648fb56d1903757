//! `tidings tail`: subscribe and print events as JSON lines (first, on a retained collection,
//! the `init` with the current list when it holds items).

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use super::url::endpoints;
use super::{parse_event_kind, CliError};
use crate::event::EventKind;

/// Flags of `tidings tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Collection to subscribe to.
    pub collection: String,
    /// URL of the broker: its WebSocket endpoint, or `http://host:port`, from which the
    /// endpoint is derived with `--ws-path`.
    #[arg(
        long,
        env = "TIDINGS_URL",
        default_value = "ws://127.0.0.1:8080/websocket"
    )]
    pub url: String,
    /// Path of the WebSocket endpoint, when `--url` is an http:// URL or has no path.
    #[arg(long, env = "TIDINGS_WS_PATH", default_value = "/websocket")]
    pub ws_path: String,
    /// Only this event kind (create, update or delete).
    #[arg(long, value_parser = parse_event_kind)]
    pub event: Option<EventKind>,
    /// Directus filter as JSON, e.g. '{"status":{"_eq":"paid"}}'.
    #[arg(long)]
    pub filter: Option<String>,
    /// Fields to receive, comma-separated (e.g. id,total,customer.name).
    #[arg(long)]
    pub fields: Option<String>,
    /// Only this item key.
    #[arg(long)]
    pub item: Option<String>,
    /// Access token (sent as ?access_token=, which works in every auth mode).
    #[arg(long, env = "TIDINGS_TOKEN")]
    pub token: Option<String>,
    /// Exit after this many events (a retained collection's `init`, printed first when it
    /// holds items, does not count).
    #[arg(long)]
    pub count: Option<u64>,
}

async fn print_line(stdout: &mut tokio::io::Stdout, text: &str) -> Result<(), CliError> {
    let line = format!("{text}\n");
    stdout
        .write_all(line.as_bytes())
        .await
        .map_err(|e| CliError::Connect(e.to_string()))?;
    stdout
        .flush()
        .await
        .map_err(|e| CliError::Connect(e.to_string()))
}

/// Runs `tail` until the connection closes, `--count` events arrived, or Ctrl-C.
pub async fn tail(args: TailArgs) -> Result<(), CliError> {
    let mut query = Map::new();
    if let Some(filter) = &args.filter {
        let filter: Value = serde_json::from_str(filter)
            .map_err(|e| CliError::Usage(format!("--filter is not JSON: {e}")))?;
        query.insert("filter".into(), filter);
    }
    if let Some(fields) = &args.fields {
        query.insert("fields".into(), Value::String(fields.clone()));
    }
    let mut subscribe = json!({"type": "subscribe", "collection": args.collection, "uid": "tail"});
    if let Some(obj) = subscribe.as_object_mut() {
        if let Some(event) = &args.event {
            obj.insert("event".into(), Value::String(event.as_str().into()));
        }
        if let Some(item) = &args.item {
            obj.insert("item".into(), Value::String(item.clone()));
        }
        if !query.is_empty() {
            obj.insert("query".into(), Value::Object(query));
        }
    }
    let endpoint = endpoints(&args.url, &args.ws_path)?.ws;
    let mut url = endpoint.clone();
    if let Some(token) = &args.token {
        let sep = if url.contains('?') { '&' } else { '?' };
        url = format!(
            "{url}{sep}access_token={}",
            percent_encoding::utf8_percent_encode(token, percent_encoding::NON_ALPHANUMERIC)
        );
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| CliError::Connect(format!("cannot connect to {endpoint}: {e}")))?;
    ws.send(Message::text(subscribe.to_string()))
        .await
        .map_err(|e| CliError::Connect(e.to_string()))?;
    let mut stdout = tokio::io::stdout();
    let mut seen = 0u64;
    loop {
        let message = tokio::select! {
            m = ws.next() => m,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let text = match message {
            None => return Err(CliError::Connect("the broker closed the connection".into())),
            Some(Err(e)) => return Err(CliError::Connect(e.to_string())),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(frame))) => {
                return Err(CliError::Connect(format!(
                    "the broker closed the connection{}",
                    frame
                        .map(|f| format!(": {} {}", u16::from(f.code), f.reason))
                        .unwrap_or_default()
                )))
            }
            Some(Ok(_)) => continue,
        };
        let value: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
        match (
            value.get("type").and_then(Value::as_str),
            value.get("event").and_then(Value::as_str),
        ) {
            (Some("ping"), _) => {
                ws.send(Message::text(r#"{"type":"pong"}"#))
                    .await
                    .map_err(|e| CliError::Connect(e.to_string()))?;
            }
            (_, Some("init")) => {
                eprintln!("subscribed to {}", args.collection);
                // On a retained collection the init carries the current list (or item):
                // printed first, so the lines that follow are the changes to it.
                let holds = match value.get("data") {
                    Some(Value::Array(items)) => !items.is_empty(),
                    Some(Value::Object(_)) => true,
                    _ => false,
                };
                if holds {
                    print_line(&mut stdout, text.as_str()).await?;
                }
            }
            (Some("subscription"), Some(_)) => {
                print_line(&mut stdout, text.as_str()).await?;
                seen += 1;
                if args.count.is_some_and(|n| seen >= n) {
                    return Ok(());
                }
            }
            _ if value.get("status").and_then(Value::as_str) == Some("error") => {
                return Err(CliError::Refused(format!(
                    "the broker answered: {}",
                    text.as_str()
                )));
            }
            _ => {}
        }
    }
}
