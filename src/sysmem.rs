//! How much memory this process may still take: the smaller of the kernel's `MemAvailable` and
//! the room left under the process's memory cgroup limit (v2 `memory.max`, v1
//! `memory.limit_in_bytes`). Used to decide defaults and to refuse budgets past that room, never
//! to enforce one; and this process's resident memory, sampled through a run (`RssSampler`).

use std::path::Path;

/// The memory this process may still take, and what sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub bytes: u64,
    pub by: Limit,
}

/// What bounds [`Room`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// The kernel's `MemAvailable`.
    MemAvailable,
    /// The process's memory cgroup: its limit, and what it holds that cannot be reclaimed (usage
    /// less the inactive file cache, the kernel's "working set").
    Cgroup { limit: u64, used: u64 },
}

impl std::fmt::Display for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        match self.by {
            Limit::MemAvailable => write!(f, "{:.2} GiB (the system's MemAvailable)", gib(self.bytes)),
            Limit::Cgroup { limit, used } => write!(
                f,
                "{:.2} GiB (the memory cgroup's limit {:.2} GiB, {:.2} GiB of it in use)",
                gib(self.bytes),
                gib(limit),
                gib(used)
            ),
        }
    }
}

/// Bytes this process can still allocate without pressure, if the system says.
pub fn available() -> Option<u64> {
    room().map(|r| r.bytes)
}

/// The smaller of `MemAvailable` and the cgroup's room, with what sets it.
pub fn room() -> Option<Room> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| mem_available(&s));
    let mem = meminfo.map(|bytes| Room { bytes, by: Limit::MemAvailable });
    match (mem, cgroup_room()) {
        (Some(a), Some(b)) => Some(if b.bytes <= a.bytes { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// One `Key: N kB` field of a /proc text (`status`, `meminfo`), in bytes.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].trim_start_matches(':').split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's resident memory now: (all of it, its anonymous part), in bytes.
pub fn rss() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    Some((kb_field(&s, "VmRSS")?, kb_field(&s, "RssAnon").unwrap_or(0)))
}

/// The most resident memory this process has held since it started (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    kb_field(&s, "VmHWM")
}

/// The largest resident memory seen while it runs: a thread reads this process's RSS every
/// `period` until `finish`.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<RssPeak>>,
}

/// What an [`RssSampler`] saw, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RssPeak {
    pub rss: u64,
    pub anon: u64,
    pub samples: u64,
}

impl RssPeak {
    pub fn max(self, o: RssPeak) -> RssPeak {
        RssPeak { rss: self.rss.max(o.rss), anon: self.anon.max(o.anon), samples: self.samples + o.samples }
    }
}

impl RssSampler {
    pub fn start(period: std::time::Duration) -> RssSampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("moerun-rss".into())
            .spawn(move || {
                let mut peak = RssPeak::default();
                loop {
                    if let Some((rss, anon)) = rss() {
                        peak = peak.max(RssPeak { rss, anon, samples: 1 });
                    }
                    if flag.load(Ordering::Relaxed) {
                        return peak;
                    }
                    std::thread::sleep(period);
                }
            })
            .ok();
        RssSampler { stop, thread }
    }

    /// Stops sampling (after one last sample); the peak seen.
    pub fn finish(mut self) -> RssPeak {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    kb_field(meminfo, "MemAvailable:")
}

/// The value of `key` in a cgroup `memory.stat` text.
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok()).flatten()
    })
}

/// Limit minus working set of this process's memory cgroup, if it has a finite limit.
fn cgroup_room() -> Option<Room> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        // "0::/path" (v2) or "N:memory:/path" (v1).
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        let (dir, limit, usage, inactive) = if controllers.is_empty() {
            (Path::new("/sys/fs/cgroup").join(rel), "memory.max", "memory.current", "inactive_file")
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                Path::new("/sys/fs/cgroup/memory").join(rel),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        } else {
            continue;
        };
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().and_then(|s| s.trim().parse::<u64>().ok());
        // "max" (v2) does not parse, and v1's "no limit" is a huge number: both mean none.
        if let (Some(limit), Some(usage)) = (read(limit), read(usage)) {
            if limit < (1 << 60) {
                // Inactive file cache is reclaimed before the cgroup OOM-kills anyone.
                let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
                let used = usage.saturating_sub(stat_value(&stat, inactive).unwrap_or(0));
                return Some(Room { bytes: limit.saturating_sub(used), by: Limit::Cgroup { limit, used } });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let s = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(s), Some(2048 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = RssSampler::start(std::time::Duration::from_millis(1));
        let mut big = vec![0u8; 64 << 20];
        // Touch every page, so it is resident.
        big.iter_mut().step_by(4096).for_each(|b| *b = 1);
        std::hint::black_box(&big);
        // Long enough for two samples even while the other tests keep both cores busy.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let peak = s.finish();
        assert!(peak.samples >= 2 && peak.rss >= 64 << 20 && peak.anon >= 64 << 20, "{peak:?}");
        // Not `>= peak.rss`: the kernel reads its RSS counters approximately (per-CPU caches), so
        // with other tests allocating in this process a sample can run a little past VmHWM.
        assert!(peak_rss().is_some_and(|h| h >= 64 << 20), "VmHWM covers the 64 MiB touched");
        drop(big);
        assert_eq!(kb_field("VmHWM:\t  2048 kB\n", "VmHWM"), Some(2 << 20));
    }

    #[test]
    fn reads_cgroup_stat_values() {
        let s = "cache 100\nrss 5\ntotal_inactive_file 4096\ninactive_file 7\n";
        assert_eq!(stat_value(s, "total_inactive_file"), Some(4096));
        assert_eq!(stat_value(s, "inactive_file"), Some(7));
        assert_eq!(stat_value(s, "active_file"), None);
    }

    #[test]
    fn this_machine_reports_something() {
        assert!(available().is_some_and(|b| b > 0));
    }
}
