//! Subscriber JWT keys from an identity provider's JWKS URL (`--jwks-url`): fetching the set
//! over HTTP or HTTPS, refreshing it when its cache lifetime ends and when a token names a
//! `kid` the set does not have (at most once per `--jwks-min-interval`), and keeping the last
//! good set whenever a fetch fails.
//!
//! The set itself is [`RemoteKeys`], read by the verifier; [`JwksFetcher`] is the only writer.
//! The broker starts whether or not the first fetch succeeds (JWTs with a `--jwks-url` key
//! are refused until one does; static tokens, other keys and publishing work meanwhile), and
//! keeps retrying with a backoff. HTTPS verifies the server against the system's roots
//! (rustls, the same stack as `rediss://`). Redirects are not followed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::{HeaderMap, ACCEPT, CACHE_CONTROL, DATE, EXPIRES, HOST, USER_AGENT};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::jwt::{jwks_keys, RemoteKeys};

/// Shortest refresh period, whatever the cache headers say (`no-cache`, `max-age=0`).
pub const MIN_REFRESH: Duration = Duration::from_secs(60);
/// Longest refresh period, whatever the cache headers say: a rotation is noticed within an
/// hour even without a token naming the new key.
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Refresh period when the response has no cache headers.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Bound on one fetch (connect, TLS, request, body).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document read (64 keys of RSA 4096 fit many times over).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest wait between retries after failed fetches.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Every `outcome` of `tidings_jwks_fetches_total`.
pub const FETCH_OUTCOMES: [&str; 5] = [
    "ok",
    "unreachable",
    "http_status",
    "invalid",
    "rate_limited",
];

/// Why a fetch of the JWKS URL failed (logged with the URL; never shown to clients).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// No connection, a TLS failure, a broken response or the fetch timed out.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server answered, but not 200.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The body is not a usable JWKS (or too large).
    #[error("invalid JWKS: {0}")]
    Invalid(String),
    /// No TLS client could be built (at start).
    #[error("TLS client: {0}")]
    Tls(String),
}

impl JwksError {
    fn outcome(&self) -> &'static str {
        match self {
            JwksError::Unreachable(_) | JwksError::Tls(_) => "unreachable",
            JwksError::Status(_) => "http_status",
            JwksError::Invalid(_) => "invalid",
        }
    }
}

/// Checks a `--jwks-url`: `http://` or `https://`, with a host.
pub(super) fn parse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(format!(
                "`{url}`: only http:// and https:// URLs are supported"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    Ok(uri)
}

/// The metrics of the JWKS fetcher.
#[derive(Debug, Clone)]
pub struct JwksMetrics {
    /// `tidings_jwks_fetches_total{outcome}`.
    pub fetches: IntCounterVec,
    /// `tidings_jwks_keys`: keys in the current set.
    pub keys: IntGauge,
}

/// Fetches `--jwks-url` into its [`RemoteKeys`]: on start, when the cache lifetime ends, and
/// for tokens with an unknown `kid`.
pub struct JwksFetcher {
    keys: Arc<RemoteKeys>,
    tls: TlsConnector,
    metrics: JwksMetrics,
    /// Held for the whole of a fetch, so concurrent unknown-`kid` tokens wait for one fetch
    /// instead of each making one. Taken before `last_fetch` (see ARCHITECTURE §6).
    fetching: tokio::sync::Mutex<()>,
    /// When the last fetch began. A leaf lock.
    last_fetch: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for JwksFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksFetcher")
            .field("url", &self.keys.url().to_string())
            .finish_non_exhaustive()
    }
}

/// The system's root certificates, for `https://` JWKS URLs. Unreadable ones are logged and
/// skipped; with none at all every HTTPS fetch fails (and says so in the log).
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "reading the system's root certificates");
    }
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!("no system root certificate found: https:// JWKS fetches will fail");
    }
    roots
}

impl JwksFetcher {
    /// A fetcher for `keys`; nothing is fetched until [`JwksFetcher::run`] or a token asks.
    /// Fails only if no TLS client can be built.
    pub fn new(keys: Arc<RemoteKeys>, metrics: JwksMetrics) -> Result<Self, JwksError> {
        let roots = if keys.url().scheme_str() == Some("https") {
            system_roots()
        } else {
            RootCertStore::empty()
        };
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| JwksError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        metrics.keys.set(0);
        Ok(JwksFetcher {
            keys,
            tls: TlsConnector::from(Arc::new(config)),
            metrics,
            fetching: tokio::sync::Mutex::new(()),
            last_fetch: Mutex::new(None),
        })
    }

    /// Fetches the set now and then whenever its cache lifetime ends (after a failure: after
    /// `--jwks-min-interval`, doubling up to 5 minutes), until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let next = {
                let _fetching = self.fetching.lock().await;
                match self.fetch_and_store().await {
                    Ok(lifetime) => {
                        failures = 0;
                        lifetime
                    }
                    Err(()) => {
                        failures = failures.saturating_add(1);
                        retry_delay(self.keys.min_interval, failures)
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(next) => {}
            }
        }
    }

    /// A token named `kid`, which the set does not have: fetch the set again unless the last
    /// fetch began less than `--jwks-min-interval` ago. True when the set now has `kid`.
    pub async fn refresh_for_kid(&self, kid: &str) -> bool {
        let _fetching = self.fetching.lock().await;
        // A fetch made while this one waited may have brought the key.
        if self.keys.has_kid(kid) {
            return true;
        }
        let recent = self
            .last_fetch
            .lock()
            .is_some_and(|at| at.elapsed() < self.keys.min_interval);
        if recent {
            self.metrics
                .fetches
                .with_label_values(&["rate_limited"])
                .inc();
            return false;
        }
        tracing::info!(url = %self.keys.url(), %kid, "token with an unknown kid: refreshing the JWKS");
        let _ = self.fetch_and_store().await;
        self.keys.has_kid(kid)
    }

    /// One fetch: on success the set is replaced and its cache lifetime returned; on failure
    /// the last good set stays. Counted and logged either way. Call with `fetching` held.
    async fn fetch_and_store(&self) -> Result<Duration, ()> {
        *self.last_fetch.lock() = Some(Instant::now());
        let url = self.keys.url();
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(JwksError::Unreachable(format!(
                "no answer within {} s",
                FETCH_TIMEOUT.as_secs()
            ))),
        };
        let fetched = result.and_then(|(headers, body)| {
            let text = std::str::from_utf8(&body)
                .map_err(|_| JwksError::Invalid("the body is not UTF-8".into()))?;
            let keys = jwks_keys(text).map_err(JwksError::Invalid)?;
            Ok((keys, cache_lifetime(&headers, SystemTime::now())))
        });
        match fetched {
            Ok((keys, lifetime)) => {
                let n = self.keys.replace(keys);
                self.metrics.fetches.with_label_values(&["ok"]).inc();
                self.metrics.keys.set(i64::try_from(n).unwrap_or(i64::MAX));
                tracing::debug!(%url, keys = n, next_refresh_s = lifetime.as_secs(), "JWKS fetched");
                Ok(lifetime)
            }
            Err(error) => {
                self.metrics
                    .fetches
                    .with_label_values(&[error.outcome()])
                    .inc();
                tracing::warn!(%url, %error, "JWKS fetch failed; keeping the last good key set");
                Err(())
            }
        }
    }

    /// GET the URL over one fresh connection; the headers and body of a 200 answer.
    async fn fetch(&self) -> Result<(HeaderMap, Bytes), JwksError> {
        let url = self.keys.url();
        let unreachable = |e: &dyn std::fmt::Display| JwksError::Unreachable(e.to_string());
        let https = url.scheme_str() == Some("https");
        let host = url.host().unwrap_or_default();
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        // `[::1]` in a URL is `::1` to the resolver and to TLS.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| unreachable(&e))?;
        let io: Box<dyn Io> = if https {
            let name = ServerName::try_from(bare_host.to_string()).map_err(|e| unreachable(&e))?;
            Box::new(
                self.tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(&e))?,
            )
        } else {
            Box::new(tcp)
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unreachable(&e))?;
        let authority = url.authority().map(|a| a.as_str()).unwrap_or(host);
        let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let request = Request::get(path)
            .header(HOST, authority)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("tidings/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| JwksError::Invalid(format!("cannot build the request: {e}")))?;
        let exchange = async move {
            let response = sender.send_request(request).await;
            // One request per connection: without a sender the connection ends once the
            // body is read, which ends `conn` below.
            drop(sender);
            let response = response.map_err(|e| unreachable(&e))?;
            let (parts, body) = response.into_parts();
            if parts.status != hyper::StatusCode::OK {
                return Err(JwksError::Status(parts.status.as_u16()));
            }
            let body = Limited::new(body, MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    JwksError::Invalid(format!(
                        "reading the body (at most {MAX_JWKS_BYTES} bytes): {e}"
                    ))
                })?
                .to_bytes();
            Ok((parts.headers, body))
        };
        let (result, _) = tokio::join!(exchange, conn);
        result
    }
}

/// What a JWKS fetch is carried over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The wait after the `failures`-th failed fetch in a row: `min_interval` (at least a second),
/// doubling, at most [`MAX_RETRY`].
fn retry_delay(min_interval: Duration, failures: u32) -> Duration {
    let base = min_interval.max(Duration::from_secs(1));
    base.saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY)
}

/// How long a fetched set may be used before it is fetched again: `Cache-Control: max-age`,
/// else `Expires` (against the response's `Date`, else `now`), else [`DEFAULT_REFRESH`];
/// `no-cache` / `no-store` mean as soon as allowed. Clamped to [`MIN_REFRESH`]..[`MAX_REFRESH`].
pub fn cache_lifetime(headers: &HeaderMap, now: SystemTime) -> Duration {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let mut lifetime = None;
    if let Some(cc) = header(CACHE_CONTROL) {
        for directive in cc.split(',').map(str::trim) {
            let lower = directive.to_ascii_lowercase();
            if lower == "no-cache" || lower == "no-store" {
                lifetime = Some(Duration::ZERO);
                break;
            }
            if let Some(secs) = lower.strip_prefix("max-age=") {
                if let Ok(secs) = secs.trim_matches('"').parse::<u64>() {
                    lifetime = Some(Duration::from_secs(secs));
                }
            }
        }
    }
    if lifetime.is_none() {
        if let Some(expires) = header(EXPIRES).and_then(http_date) {
            let base = header(DATE).and_then(http_date).unwrap_or(now);
            // An `Expires` in the past (or unparsable, e.g. "0") means "stale now".
            lifetime = Some(expires.duration_since(base).unwrap_or(Duration::ZERO));
        } else if header(EXPIRES).is_some() {
            lifetime = Some(Duration::ZERO);
        }
    }
    lifetime
        .unwrap_or(DEFAULT_REFRESH)
        .clamp(MIN_REFRESH, MAX_REFRESH)
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 IMF-fixdate).
fn http_date(text: &str) -> Option<SystemTime> {
    let ts = jiff::fmt::rfc2822::parse(text).ok()?.timestamp();
    Some(SystemTime::from(ts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(hyper::header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn cache_headers_set_the_refresh_period_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 1994-11-06 08:49:37
        let at = |h: &[(hyper::header::HeaderName, &str)]| cache_lifetime(&headers(h), now);
        assert_eq!(at(&[]), DEFAULT_REFRESH);
        assert_eq!(
            at(&[(CACHE_CONTROL, "public, max-age=600")]),
            Duration::from_secs(600)
        );
        assert_eq!(at(&[(CACHE_CONTROL, "max-age=5")]), MIN_REFRESH);
        assert_eq!(at(&[(CACHE_CONTROL, "max-age=86400")]), MAX_REFRESH);
        assert_eq!(at(&[(CACHE_CONTROL, "no-cache")]), MIN_REFRESH);
        assert_eq!(at(&[(CACHE_CONTROL, "max-age=900, no-store")]), MIN_REFRESH);
        // max-age wins over Expires.
        assert_eq!(
            at(&[
                (CACHE_CONTROL, "max-age=700"),
                (EXPIRES, "Sun, 06 Nov 1994 09:49:37 GMT")
            ]),
            Duration::from_secs(700)
        );
        assert_eq!(
            at(&[(EXPIRES, "Sun, 06 Nov 1994 09:09:37 GMT")]),
            Duration::from_secs(1200)
        );
        // Against the response's own Date, not our clock.
        assert_eq!(
            at(&[
                (EXPIRES, "Sun, 06 Nov 1994 09:09:37 GMT"),
                (DATE, "Sun, 06 Nov 1994 09:00:37 GMT")
            ]),
            Duration::from_secs(540)
        );
        assert_eq!(at(&[(EXPIRES, "0")]), MIN_REFRESH);
        assert_eq!(
            at(&[(EXPIRES, "Sun, 06 Nov 1994 07:00:00 GMT")]),
            MIN_REFRESH
        );
    }

    #[test]
    fn retries_back_off_to_a_bound() {
        let min = Duration::from_secs(30);
        assert_eq!(retry_delay(min, 1), Duration::from_secs(30));
        assert_eq!(retry_delay(min, 2), Duration::from_secs(60));
        assert_eq!(retry_delay(min, 4), Duration::from_secs(240));
        assert_eq!(retry_delay(min, 5), MAX_RETRY);
        assert_eq!(retry_delay(min, u32::MAX), MAX_RETRY);
        assert_eq!(retry_delay(Duration::ZERO, 1), Duration::from_secs(1));
    }

    #[test]
    fn only_http_and_https_urls() {
        assert!(parse_url("https://idp.example/.well-known/jwks.json").is_ok());
        assert!(parse_url("http://127.0.0.1:9000/jwks").is_ok());
        assert!(parse_url("ftp://idp.example/jwks").is_err());
        assert!(parse_url("/jwks.json").is_err());
        assert!(parse_url("not a url").is_err());
    }
}
