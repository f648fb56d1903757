//! `tidings healthcheck`: ask a broker on this host whether it is alive (or ready), for
//! container healthchecks. The image is distroless, without curl or a shell, so the binary
//! checks itself: exit 0 when the broker answers 200, 1 otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::CliError;

/// Flags of `tidings healthcheck`.
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The broker's listen address, as given to `serve` (the same `TIDINGS_LISTEN`, so a
    /// container's environment needs nothing more); an unspecified address (`0.0.0.0`, `::`)
    /// is checked on loopback.
    #[arg(long, env = "TIDINGS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Check readiness (`/readyz`: 503 while starting, when the backplane is down, or once
    /// shutdown began) instead of liveness (`/healthz`).
    #[arg(long)]
    pub ready: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value = "2")]
    pub timeout: u64,
}

/// The address to check for a listen address.
fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// GETs `/healthz` (or `/readyz`); `Ok` on 200, and prints the answer either way.
pub async fn healthcheck(args: HealthcheckArgs) -> Result<(), CliError> {
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let uri = format!("http://{}{path}", target(args.listen));
    let request = Request::get(&uri)
        .body(Empty::<Bytes>::new())
        .map_err(|e| CliError::Usage(format!("bad URL {uri}: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| CliError::Connect(format!("{uri}: {e}")))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::Connect(format!("{uri}: {e}")))?
            .to_bytes();
        Ok::<_, CliError>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(args.timeout), exchange)
        .await
        .map_err(|_| CliError::Connect(format!("{uri}: no answer within {} s", args.timeout)))??;
    if status.is_success() {
        println!("{body}");
        Ok(())
    } else {
        Err(CliError::Refused(format!("{uri}: {status} {body}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_checked_on_loopback() {
        let t = |s: &str| target(s.parse().unwrap()).to_string();
        assert_eq!(t("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(t("[::]:9000"), "[::1]:9000");
        assert_eq!(t("10.1.2.3:80"), "10.1.2.3:80");
    }
}
