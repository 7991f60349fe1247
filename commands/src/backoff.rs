//! The pause before a follower of the log (the relay, a projector, a process)
//! starts again after an error: doubling while it keeps failing, and back to
//! the first after a run that lasted. Without the reset, one blip after hours
//! of health waited the longest pause an earlier outage had reached.

use std::time::Duration;

pub struct Backoff {
    first: Duration,
    max: Duration,
    /// A run at least this long counts as healthy.
    healthy: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration, healthy: Duration) -> Backoff {
        Backoff { first, max, healthy, next: first }
    }

    /// 100 ms doubling to 5 s; a run of 10 s or more starts over.
    pub const fn follower() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5), Duration::from_secs(10))
    }

    /// The pause after a run that lasted `ran` and failed.
    pub fn after(&mut self, ran: Duration) -> Duration {
        if ran >= self.healthy {
            self.next = self.first;
        }
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn failing_runs_double_the_pause_up_to_the_longest() {
        let mut b = Backoff::follower();
        let pauses: Vec<u128> = (0..8).map(|_| b.after(5 * MS).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn a_run_that_lasted_starts_over_from_the_first_pause() {
        let mut b = Backoff::follower();
        for _ in 0..8 {
            b.after(5 * MS);
        }
        assert_eq!(b.after(Duration::from_secs(3600)), 100 * MS, "a blip after an hour's health");
        assert_eq!(b.after(5 * MS), 200 * MS, "and doubles again if it keeps failing");
        assert_eq!(b.after(9_999 * MS), 400 * MS, "a run short of healthy does not reset it");
    }
}
