//! What the machine did during a measured window, from `/proc/stat` and
//! `/proc/vmstat`: how busy its CPUs were, how much time the hypervisor stole
//! from them, and what the kernel wrote back to disk each second. On a
//! shared virtual machine, stolen time is a tail no code change removes; so
//! are the kernel's bursts of write-back (pages dirtied ~30 s earlier, written
//! out every ~5 s), which stall the commits' WAL flushes behind them. A
//! result is read next to both.

/// The aggregate `cpu` line's counters (clock ticks since boot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub busy: u64,
    pub idle: u64,
    pub steal: u64,
}

impl CpuTicks {
    /// Parses the first line of `/proc/stat`: `cpu user nice system idle
    /// iowait irq softirq steal guest guest_nice` (guest time is already in
    /// user time, so it is not added again).
    pub fn parse(stat: &str) -> Option<CpuTicks> {
        let line = stat.lines().next()?;
        let mut fields = line.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let v: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else { return None };
        Some(CpuTicks { busy: user + nice + system + irq + softirq, idle: idle + iowait, steal })
    }

    /// Now, on Linux; `None` where `/proc/stat` is not there.
    pub fn now() -> Option<CpuTicks> {
        CpuTicks::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }
}

/// The size of the pages `/proc/vmstat` counts (4 KiB on the machines the
/// bench runs on: x86-64 and most arm64 kernels).
const PAGE_BYTES: u64 = 4096;

/// Pages the kernel has written back to disk since boot (`nr_written`).
pub fn written_pages(vmstat: &str) -> Option<u64> {
    vmstat.lines().find_map(|line| line.strip_prefix("nr_written ")?.trim().parse().ok())
}

/// Now, on Linux; `None` where `/proc/vmstat` is not there.
pub fn written_pages_now() -> Option<u64> {
    written_pages(&std::fs::read_to_string("/proc/vmstat").ok()?)
}

/// Megabytes written back in each second, from readings of `written_pages` a
/// second apart (a missing reading leaves its seconds out).
pub fn written_back_mb(readings: &[Option<u64>]) -> Vec<f64> {
    readings
        .windows(2)
        .filter_map(|w| match (w[0], w[1]) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 * PAGE_BYTES as f64 / 1e6),
            _ => None,
        })
        .collect()
}

/// The machine over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineUse {
    /// Cores busy on average (of `cores`).
    pub busy_cores: f64,
    pub cores: usize,
    /// Share of all CPU time the hypervisor gave to others, percent.
    pub steal_percent: f64,
    /// Megabytes the kernel wrote back to disk in each second of the window.
    pub written_back_mb_by_second: Vec<f64>,
}

impl MachineUse {
    pub fn between(before: CpuTicks, after: CpuTicks, cores: usize) -> Option<MachineUse> {
        let busy = after.busy.checked_sub(before.busy)?;
        let idle = after.idle.checked_sub(before.idle)?;
        let steal = after.steal.checked_sub(before.steal)?;
        let total = busy + idle + steal;
        if total == 0 {
            return None;
        }
        Some(MachineUse {
            busy_cores: busy as f64 / total as f64 * cores as f64,
            cores,
            steal_percent: steal as f64 * 100.0 / total as f64,
            written_back_mb_by_second: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_busy_idle_and_steal_from_the_cpu_line() {
        let stat = "cpu  100 5 50 800 20 3 2 40 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(CpuTicks::parse(stat), Some(CpuTicks { busy: 160, idle: 820, steal: 40 }));
        assert_eq!(CpuTicks::parse("cpu0 1 2 3\n"), None);
        assert_eq!(CpuTicks::parse("cpu 1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn reads_the_pages_written_back_and_makes_megabytes_per_second() {
        let vmstat = "nr_dirty 1200\nnr_writeback 3\nnr_written 48213\nnr_written_total 9\n";
        assert_eq!(written_pages(vmstat), Some(48_213));
        assert_eq!(written_pages("nr_dirty 1200\n"), None);
        assert_eq!(written_pages("nr_written x\n"), None);
        let mb = written_back_mb(&[Some(1_000), Some(1_000), Some(26_600), None, Some(30_000), Some(30_244)]);
        assert_eq!(mb.len(), 3, "a missing reading leaves its seconds out: {mb:?}");
        assert_eq!(mb[0], 0.0);
        assert!((mb[1] - 104.8576).abs() < 1e-9, "{mb:?}");
        assert!((mb[2] - 0.999424).abs() < 1e-9, "{mb:?}");
    }

    #[test]
    fn a_window_s_share_of_busy_and_stolen_time() {
        let before = CpuTicks { busy: 1_000, idle: 1_000, steal: 0 };
        let after = CpuTicks { busy: 1_600, idle: 1_300, steal: 100 };
        let used = MachineUse::between(before, after, 2).expect("time passed");
        assert!((used.busy_cores - 1.2).abs() < 1e-9, "{used:?}");
        assert!((used.steal_percent - 10.0).abs() < 1e-9, "{used:?}");
        assert_eq!(MachineUse::between(after, before, 2), None, "counters never go back");
        assert_eq!(MachineUse::between(before, before, 2), None, "no time, no share");
    }
}
