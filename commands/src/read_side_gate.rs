//! Back-pressure for bulk writes: a batch of transfers waits while the read
//! side is far behind this process's writes.
//!
//! On a saturated machine the read side (relay, NATS, projector) is a few
//! threads among the ~70 runnable ones of a bulk load, and it fell seconds
//! behind and kept falling: `min_position` reads answered 504 and every read
//! model aged. Interactive writes (single transfers, holds, orders) never
//! wait here; a batch, a bulk load's unit, is admitted only while the
//! events this process has committed but the read side has not applied,
//! plus the items of batches already admitted, stay under a bound. So the
//! read side's lag stays bounded and the bulk load runs at the pace the
//! read side keeps.
//!
//! The gate never stops writes on a stopped read side: commands must
//! succeed with NATS down. A wait that sees no progress of the read side
//! for `STALLED_AFTER` marks it stalled at that point, and batches pass
//! freely until it moves again. No wait lasts longer than `MAX_WAIT`: the
//! gate paces, it does not queue.

use crate::store::LogPoint;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// How long a read side that applies nothing while batches wait is given
/// before it counts as stalled (NATS down, projector stopped).
pub const STALLED_AFTER: Duration = Duration::from_secs(1);

/// The longest one batch waits at the gate.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

pub struct ReadSideGate {
    /// This process's projector's progress (`Projector::applied`).
    applied: watch::Receiver<LogPoint>,
    /// Events committed but not applied, plus items admitted but not yet
    /// committed, above which a batch waits.
    max_backlog: i64,
    /// The highest log position this process has committed.
    appended: AtomicI64,
    /// Items of admitted batches not yet committed (or given up).
    in_flight: AtomicI64,
    /// The applied position at which a wait last found the read side
    /// stalled; -1 for none.
    stalled_at: AtomicI64,
    /// Signalled when an admitted batch ends, which may make room.
    released: Notify,
    /// Batches are admitted in arrival order (a fair lock): without it a
    /// batch could lose every race for room until `MAX_WAIT`.
    turn: tokio::sync::Mutex<()>,
}

/// A batch's place under the bound; gives it back on drop (after the
/// batch's commit has been recorded with `appended`).
#[must_use]
pub struct Admission<'a> {
    gate: &'a ReadSideGate,
    items: i64,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(self.items, Ordering::AcqRel);
        self.gate.released.notify_waiters();
    }
}

impl ReadSideGate {
    pub fn new(applied: watch::Receiver<LogPoint>, max_backlog: i64) -> ReadSideGate {
        ReadSideGate {
            applied,
            max_backlog,
            appended: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            stalled_at: AtomicI64::new(-1),
            released: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Records a commit of this process that appended up to `position`.
    pub fn appended(&self, position: i64) {
        self.appended.fetch_max(position, Ordering::AcqRel);
    }

    /// Events committed by this process that the read side has not applied.
    fn behind(&self, applied: i64) -> i64 {
        (self.appended.load(Ordering::Acquire) - applied).max(0)
    }

    /// Waits until a batch of `items` transfers may go: while there is
    /// room under the bound (a batch larger than what is left still goes
    /// when some room is left, so any batch size passes), the read side is
    /// stalled, or `MAX_WAIT` has passed.
    pub async fn admit(&self, items: usize) -> Admission<'_> {
        let items = i64::try_from(items).unwrap_or(i64::MAX / 4);
        let started = Instant::now();
        let _turn = tokio::select! {
            turn = self.turn.lock() => Some(turn),
            _ = tokio::time::sleep_until(started + MAX_WAIT) => None,
        };
        let mut applied = self.applied.clone();
        let mut progress_seen = Instant::now();
        loop {
            // Created before the check, so a release between the check and
            // the wait is not missed (`notify_waiters` reaches it).
            let released = self.released.notified();
            let position = applied.borrow_and_update().position;
            let stalled = self.stalled_at.load(Ordering::Acquire) == position;
            let before = self.in_flight.fetch_add(items, Ordering::AcqRel);
            if stalled || self.behind(position) + before < self.max_backlog || started.elapsed() >= MAX_WAIT {
                return Admission { gate: self, items };
            }
            self.in_flight.fetch_sub(items, Ordering::AcqRel);
            tokio::select! {
                changed = applied.changed() => match changed {
                    Ok(()) => progress_seen = Instant::now(),
                    // The projector is gone: nothing to pace by.
                    Err(_) => return self.admit_now(items),
                },
                _ = released => {}
                _ = tokio::time::sleep_until(progress_seen + STALLED_AFTER) => {
                    // Only events waiting to be applied make a still read
                    // side stalled; with none, the wait was for batches in
                    // flight.
                    if self.behind(position) > 0 {
                        tracing::debug!(applied = position, "the read side applied nothing for a while; batches pass");
                        self.stalled_at.store(position, Ordering::Release);
                    } else {
                        progress_seen = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(started + MAX_WAIT) => {}
            }
        }
    }

    fn admit_now(&self, items: i64) -> Admission<'_> {
        self.in_flight.fetch_add(items, Ordering::AcqRel);
        Admission { gate: self, items }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(position: i64) -> LogPoint {
        LogPoint { transaction_id: 1, position }
    }

    fn gate(max_backlog: i64) -> (watch::Sender<LogPoint>, ReadSideGate) {
        let (sender, receiver) = watch::channel(LogPoint::START);
        (sender, ReadSideGate::new(receiver, max_backlog))
    }

    /// Whether `admit` returns within `within` (paused time advances only
    /// when every task waits).
    async fn admitted_within(gate: &ReadSideGate, items: usize, within: Duration) -> bool {
        tokio::time::timeout(within, gate.admit(items)).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_at_once_while_the_read_side_keeps_up() {
        let (sender, gate) = gate(1_000);
        gate.appended(5_000);
        sender.send_replace(point(4_500));
        assert!(admitted_within(&gate, 400, Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_while_the_read_side_is_behind_and_goes_when_it_catches_up() {
        let (sender, gate) = gate(1_000);
        sender.send_replace(point(10));
        gate.appended(5_000);
        let waiting = gate.admit(100);
        tokio::pin!(waiting);
        // The read side moves, but not enough: still waiting.
        for applied in [1_000, 2_000, 3_000, 3_999] {
            tokio::select! {
                _ = &mut waiting => panic!("admitted {} events behind", 5_000 - applied),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            sender.send_replace(point(applied));
        }
        tokio::select! {
            _ = &mut waiting => panic!("admitted 1,001 events behind"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        sender.send_replace(point(4_100));
        assert!(tokio::time::timeout(Duration::from_millis(1), waiting).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn admitted_batches_count_until_they_end() {
        let (_sender, gate) = gate(1_000);
        let first = gate.admit(600).await;
        let _second = gate.admit(600).await; // some room was left: it goes, over the bound
        let third = gate.admit(10);
        tokio::pin!(third);
        tokio::select! {
            _ = &mut third => panic!("admitted with 1,200 items in flight"),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        // The first ends (its events applied at once): room again.
        drop(first);
        assert!(tokio::time::timeout(Duration::from_millis(1), third).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_read_side_stops_pacing_until_it_moves_again() {
        let (sender, gate) = gate(1_000);
        sender.send_replace(point(100));
        gate.appended(50_000);
        // NATS down: nothing is applied. The first batch waits the stall
        // out; the next ones pass at once.
        let started = Instant::now();
        let _first = gate.admit(10).await;
        assert_eq!(started.elapsed(), STALLED_AFTER);
        assert!(admitted_within(&gate, 10, Duration::from_millis(1)).await);
        // The read side moves again (still far behind): pacing resumes.
        sender.send_replace(point(200));
        assert!(!admitted_within(&gate, 10, Duration::from_millis(500)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn no_batch_waits_longer_than_the_limit() {
        let (sender, gate) = gate(1_000);
        gate.appended(1_000_000);
        // Progress every 100 ms, never enough: not stalled, still behind.
        let progress = async {
            for applied in (1..).map(|i| i * 10) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                sender.send_replace(point(applied));
            }
        };
        let started = Instant::now();
        tokio::select! {
            _ = progress => unreachable!(),
            _ = gate.admit(10) => {}
        }
        assert_eq!(started.elapsed(), MAX_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_gone_projector_stops_pacing() {
        let (sender, gate) = gate(1_000);
        gate.appended(50_000);
        let waiting = gate.admit(10);
        tokio::pin!(waiting);
        tokio::select! {
            _ = &mut waiting => panic!("admitted far behind"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        drop(sender);
        assert!(tokio::time::timeout(Duration::from_millis(1), waiting).await.is_ok());
    }
}
