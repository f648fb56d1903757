//! `tidings publish`: post one event over HTTP and print the broker's answer.

use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::url::endpoints;
use super::{parse_event_kind, CliError};
use crate::event::EventKind;

/// Flags of `tidings publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// Collection.
    pub collection: String,
    /// Event: create, update or delete.
    #[arg(value_parser = parse_event_kind)]
    pub event: EventKind,
    /// The item or array of items as JSON (for delete: an array of keys, or the items).
    pub json: String,
    /// URL of the broker: `http://host:port`, or its WebSocket URL (`ws://host:port/…`), from
    /// which the HTTP base is derived.
    #[arg(
        long,
        env = "TIDINGS_HTTP_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Publish key (sent as `Authorization: Bearer`).
    #[arg(long, env = "TIDINGS_PUBLISH_KEY")]
    pub key: Option<String>,
}

/// Posts to `/v1/collections/{collection}/{event}`; prints the JSON answer.
pub async fn publish(args: PublishArgs) -> Result<(), CliError> {
    let body: serde_json::Value = serde_json::from_str(&args.json)
        .map_err(|e| CliError::Usage(format!("the event data is not JSON: {e}")))?;
    let base = endpoints(&args.url, "/websocket")?.http;
    let uri = format!(
        "{base}/v1/collections/{}/{}",
        args.collection,
        args.event.as_str()
    );
    let mut request = Request::post(&uri).header("content-type", "application/json");
    if let Some(key) = &args.key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| CliError::Usage(format!("invalid URL {uri}: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(request)
        .await
        .map_err(|e| CliError::Connect(format!("cannot reach {uri}: {e}")))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| CliError::Connect(format!("reading the answer: {e}")))?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    if status.is_success() {
        println!("{text}");
        Ok(())
    } else {
        Err(CliError::Refused(format!("{status}: {text}")))
    }
}
