//! Connection limits of the WebSocket edge: open connections in total
//! (`--max-connections`) and per client address (`--max-connections-per-ip`). A connection
//! holds a [`ConnectionSlot`] for its whole life; dropping it gives the place back.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Open connections per client address. Only addresses with an open connection have an
/// entry, so its size is bounded by `--max-connections`.
#[derive(Debug, Default)]
struct PerIpConnections(dashmap::DashMap<IpAddr, usize>);

impl PerIpConnections {
    /// Counts one more connection from `ip` unless it already has `limit`.
    fn try_acquire(&self, ip: IpAddr, limit: usize) -> bool {
        let mut count = self.0.entry(ip).or_insert(0);
        if *count >= limit {
            return false;
        }
        *count += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        if let dashmap::Entry::Occupied(mut entry) = self.0.entry(ip) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }

    fn count(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).map_or(0, |c| *c)
    }
}

/// Why a connection was not given a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The address already has this many connections.
    PerIp(usize),
    /// The broker already has this many connections.
    Total(usize),
}

/// The counters behind both limits.
#[derive(Debug)]
pub struct ConnectionLimits {
    max: usize,
    /// 0: no limit per address.
    max_per_ip: usize,
    open: AtomicUsize,
    per_ip: PerIpConnections,
}

impl ConnectionLimits {
    /// Limits of `max` connections in total and `max_per_ip` per address (0: none).
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            max,
            max_per_ip,
            open: AtomicUsize::new(0),
            per_ip: PerIpConnections::default(),
        }
    }

    /// A slot for one more connection from `ip`, checked per address first, then in total.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        if self.max_per_ip > 0 && !self.per_ip.try_acquire(ip, self.max_per_ip) {
            return Err(Refused::PerIp(self.max_per_ip));
        }
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot {
            limits: self.clone(),
            ip: (self.max_per_ip > 0).then_some(ip),
        };
        if previous >= self.max {
            drop(slot);
            return Err(Refused::Total(self.max));
        }
        Ok(slot)
    }

    /// Connections holding a slot.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections holding a slot from `ip` (counted only with a per-address limit).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.per_ip.count(ip)
    }
}

/// One counted connection; released when dropped (the session owns it for its whole life).
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            self.limits.per_ip.release(ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_then_total_and_released_on_drop() {
        let limits = Arc::new(ConnectionLimits::new(3, 2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = limits.acquire(a).unwrap();
        let _a2 = limits.acquire(a).unwrap();
        assert_eq!(limits.acquire(a).unwrap_err(), Refused::PerIp(2));
        let _b1 = limits.acquire(b).unwrap();
        assert_eq!(limits.acquire(b).unwrap_err(), Refused::Total(3));
        assert_eq!(
            (limits.open(), limits.open_from(a), limits.open_from(b)),
            (3, 2, 1)
        );
        drop(a1);
        assert_eq!((limits.open(), limits.open_from(a)), (2, 1));
        let _b2 = limits.acquire(b).unwrap();
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn without_a_per_address_limit_nothing_is_kept_per_address() {
        let limits = Arc::new(ConnectionLimits::new(1, 0));
        let a: IpAddr = "::1".parse().unwrap();
        let slot = limits.acquire(a).unwrap();
        assert_eq!(limits.open_from(a), 0);
        assert_eq!(limits.acquire(a).unwrap_err(), Refused::Total(1));
        drop(slot);
        assert_eq!(limits.open(), 0);
    }
}
