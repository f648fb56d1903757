//! The broker's two base URLs, derived from whichever one the user gave: `tail`, `publish` and
//! `bench` all take `--url` as `http://host:port` or `ws://host:port/websocket`, since one
//! broker serves both on one port.

use super::CliError;

/// Where the HTTP API and the WebSocket endpoint of one broker are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Base of the HTTP API, without a trailing `/` (`http://host:port`).
    pub http: String,
    /// The WebSocket endpoint (`ws://host:port/websocket`).
    pub ws: String,
}

/// Reads `--url` (`http`, `https`, `ws` or `wss`). From an HTTP URL the WebSocket endpoint is
/// the same host and port with `ws_path` appended to the URL's path (a proxy prefix survives);
/// from a WebSocket URL the HTTP base is its host and port, and its path is the endpoint (the
/// bare `ws://host:port` means `ws_path`).
pub fn endpoints(url: &str, ws_path: &str) -> Result<Endpoints, CliError> {
    let usage = |why: &str| {
        CliError::Usage(format!(
            "--url {url}: {why} (give http://host:port or ws://host:port{ws_path})"
        ))
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| usage("no scheme"))?;
    let scheme = scheme.to_ascii_lowercase();
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(usage("no host"));
    }
    if path.contains(['?', '#']) {
        return Err(usage("a query or fragment has no place here"));
    }
    let path = path.trim_end_matches('/');
    let (http_scheme, ws_scheme) = match scheme.as_str() {
        "http" | "ws" => ("http", "ws"),
        "https" | "wss" => ("https", "wss"),
        other => return Err(usage(&format!("`{other}` is not http, https, ws or wss"))),
    };
    if scheme.starts_with("http") {
        Ok(Endpoints {
            http: format!("{http_scheme}://{authority}{path}"),
            ws: format!("{ws_scheme}://{authority}{path}{ws_path}"),
        })
    } else {
        let ws_path = if path.is_empty() { ws_path } else { path };
        Ok(Endpoints {
            http: format!("{http_scheme}://{authority}"),
            ws: format!("{ws_scheme}://{authority}{ws_path}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(url: &str) -> (String, String) {
        let e = endpoints(url, "/websocket").unwrap();
        (e.http, e.ws)
    }

    #[test]
    fn either_scheme_gives_both_urls() {
        let expected = (
            "http://127.0.0.1:8080".to_string(),
            "ws://127.0.0.1:8080/websocket".to_string(),
        );
        for url in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "ws://127.0.0.1:8080/websocket",
            "ws://127.0.0.1:8080",
            "WS://127.0.0.1:8080/websocket/",
        ] {
            assert_eq!(both(url), expected, "{url}");
        }
        assert_eq!(
            both("wss://example.com/rt"),
            ("https://example.com".into(), "wss://example.com/rt".into())
        );
        assert_eq!(
            both("https://example.com/tidings"),
            (
                "https://example.com/tidings".into(),
                "wss://example.com/tidings/websocket".into()
            )
        );
    }

    #[test]
    fn other_urls_are_usage_errors() {
        for url in ["127.0.0.1:8080", "ftp://x", "http://", "ws://h/p?x=1", ""] {
            let err = endpoints(url, "/websocket").unwrap_err();
            assert!(matches!(err, CliError::Usage(_)), "{url}: {err}");
            assert!(err.to_string().contains("--url"), "{err}");
        }
    }
}
