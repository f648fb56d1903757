//! The per-connection limit on inbound messages (`--max-messages-per-second`).

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket over a connection's inbound messages: `rate` tokens per second, holding at
/// most `burst`. The burst is a second's worth plus `--max-subscriptions`, so a client that
/// reconnects and re-sends all its subscriptions at once (as @directus/sdk does) is not cut
/// off. The rate itself is not stored (it is the connection's setting): an idle connection
/// keeps only the bucket.
#[derive(Debug)]
pub(crate) struct RateLimit {
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn new(rate: u32, max_subscriptions: usize) -> Self {
        let burst = f64::from(rate) + max_subscriptions as f64;
        RateLimit {
            tokens: burst,
            burst,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until the next one.
    pub(crate) fn take(&mut self, rate: u32) -> Result<(), Duration> {
        let rate = f64::from(rate);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_at_the_rate() {
        let mut limit = RateLimit::new(10, 5);
        for _ in 0..15 {
            assert!(limit.take(10).is_ok());
        }
        let wait = limit.take(10).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(limit.take(10).is_ok());
        assert!(limit.take(10).is_ok());
        assert!(limit.take(10).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn never_holds_more_than_the_burst() {
        let mut limit = RateLimit::new(2, 1);
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..3 {
            assert!(limit.take(2).is_ok());
        }
        assert!(limit.take(2).is_err());
    }
}
