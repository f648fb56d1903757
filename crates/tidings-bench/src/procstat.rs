//! Process CPU time and memory read from Linux `/proc`, for the generator itself and for the
//! broker under test (`--broker-pid`), plus the background sampler that keeps the broker's peak
//! RSS during a run.
//!
//! CPU times in `/proc/PID/stat` are in clock ticks. The tick rate (`getconf CLK_TCK`) is 100
//! on every Linux architecture this runs on, and reading it properly needs `libc::sysconf`, so
//! [`TICKS_PER_SECOND`] assumes 100.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Clock ticks per second of `/proc/PID/stat` CPU times (assumed, see the module doc).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// How often the sampler reads the broker's RSS.
const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

/// Which process to read: this one or another by PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    /// The generator (`/proc/self`).
    SelfProc,
    /// Another process.
    Pid(u32),
}

impl Proc {
    fn dir(self) -> PathBuf {
        match self {
            Proc::SelfProc => PathBuf::from("/proc/self"),
            Proc::Pid(pid) => PathBuf::from(format!("/proc/{pid}")),
        }
    }

    /// User plus system CPU time so far, in seconds; `None` if the process cannot be read.
    pub fn cpu_seconds(self) -> Option<f64> {
        let stat = std::fs::read_to_string(self.dir().join("stat")).ok()?;
        parse_stat_ticks(&stat).map(|ticks| ticks as f64 / TICKS_PER_SECOND)
    }

    /// Resident set size now and its peak since the process started (`VmRSS`, `VmHWM`), in
    /// bytes; `None` if the process cannot be read.
    pub fn memory(self) -> Option<Memory> {
        let status = std::fs::read_to_string(self.dir().join("status")).ok()?;
        Some(Memory {
            rss: status_kib(&status, "VmRSS:")? * 1024,
            hwm: status_kib(&status, "VmHWM:").map(|k| k * 1024),
        })
    }
}

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now.
    pub rss: u64,
    /// Peak resident set size since the process started, when the kernel reports it.
    pub hwm: Option<u64>,
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line, in ticks.
///
/// The command name (field 2) is in parentheses and may itself contain spaces and `)`, so the
/// fields are counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the command name come field 3 (state) onwards: utime is field 14, the 12th here.
    let mut fields = after_comm.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value in KiB of a `Key:   123 kB` line of `/proc/PID/status`.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_ascii_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// CPU time of a process between two points, as seconds and as a share of one core.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    seconds: Option<f64>,
}

impl CpuMark {
    /// Reads the process's CPU time now.
    pub fn now(proc: Proc) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            seconds: proc.cpu_seconds(),
        }
    }

    /// When the mark was taken.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// CPU seconds used since `self` and the percentage of one core that is over the wall time
    /// between the two marks.
    pub fn since(self, later: CpuMark) -> Option<(f64, f64)> {
        let used = (later.seconds? - self.seconds?).max(0.0);
        let wall = later.at.duration_since(self.at).as_secs_f64();
        let percent = if wall > 0.0 { used / wall * 100.0 } else { 0.0 };
        Some((used, percent))
    }
}

/// Samples a process's RSS every [`SAMPLE_PERIOD`] and keeps the largest value seen.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl RssSampler {
    /// Starts sampling `proc` (the first sample is taken at once).
    pub fn start(proc: Proc) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (task_peak, task_stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SAMPLE_PERIOD);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = task_stop.cancelled() => break,
                    _ = ticks.tick() => {
                        if let Some(memory) = proc.memory() {
                            task_peak.fetch_max(memory.rss, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        RssSampler { peak, stop }
    }

    /// Stops sampling and returns the peak RSS seen, including `last` (a final reading), in
    /// bytes; `None` if the process could never be read.
    pub fn finish(self, last: Option<u64>) -> Option<u64> {
        self.stop.cancel();
        let peak = self.peak.load(Ordering::Relaxed).max(last.unwrap_or(0));
        (peak > 0).then_some(peak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_survive_odd_command_names() {
        let stat = "4242 (tid ings) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    250 17 0 0 20 0 3 0 100 12345678 900 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(267));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_lines_give_kib() {
        let status = "Name:\ttidings\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_is_readable() {
        assert!(Proc::SelfProc.cpu_seconds().is_some());
        let memory = Proc::SelfProc.memory().expect("own /proc/self/status");
        assert!(memory.rss > 0);
        assert!(memory.hwm.is_some_and(|hwm| hwm >= memory.rss));
    }
}
