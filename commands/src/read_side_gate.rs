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
//! The gate never stops writes on a stopped read side for long: commands
//! must succeed with NATS down. A wait that sees the read side apply
//! nothing for half the longest wait while events wait marks it stalled at
//! that point, and batches pass freely until it moves again. No batch waits
//! longer than the longest wait (`LEDGER_BULK_MAX_WAIT_MS`, 2 s): the gate
//! paces, it does not queue without end.

use crate::store::ReadSideProgress;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

pub struct ReadSideGate {
    /// This process's projector's progress (`Projector::applied`).
    applied: watch::Receiver<ReadSideProgress>,
    /// Events committed but not applied, plus items admitted but not yet
    /// committed, at which a batch waits.
    max_backlog: i64,
    /// The longest one batch waits.
    max_wait: Duration,
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
    /// batch could lose every race for room until `max_wait`.
    turn: tokio::sync::Mutex<()>,
}

/// A batch's place under the bound, in items; given back as its items
/// commit (`release`) and on drop. Release only after the commit was
/// recorded with `ReadSideGate::appended`, so its events are counted one
/// way or the other throughout.
#[must_use]
pub struct Admission<'a> {
    gate: &'a ReadSideGate,
    items: i64,
}

impl Admission<'_> {
    /// Gives back `items` of the batch's place: a batch of transactions of
    /// its own per item (not atomic) releases each as it commits.
    pub fn release(&mut self, items: i64) {
        let items = items.min(self.items);
        self.items -= items;
        self.gate.in_flight.fetch_sub(items, Ordering::AcqRel);
        self.gate.released.notify_waiters();
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.release(self.items);
    }
}

impl ReadSideGate {
    pub fn new(applied: watch::Receiver<ReadSideProgress>, max_backlog: i64, max_wait: Duration) -> ReadSideGate {
        ReadSideGate {
            applied,
            max_backlog,
            max_wait,
            appended: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            stalled_at: AtomicI64::new(-1),
            released: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// How long a read side that applies nothing while events wait is given
    /// before it counts as stalled (NATS down, projector stopped).
    fn stalled_after(&self) -> Duration {
        self.max_wait / 2
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
    /// stalled, or `max_wait` has passed.
    pub async fn admit(&self, items: usize) -> Admission<'_> {
        let items = i64::try_from(items).unwrap_or(i64::MAX / 4);
        let started = Instant::now();
        let deadline = started + self.max_wait;
        let _turn = tokio::select! {
            turn = self.turn.lock() => Some(turn),
            _ = tokio::time::sleep_until(deadline) => None,
        };
        let mut applied = self.applied.clone();
        let mut last_position = -1;
        let mut progress_seen = Instant::now();
        loop {
            // Created before the check, so a release between the check and
            // the wait is not missed (`notify_waiters` reaches it).
            let released = self.released.notified();
            let position = applied.borrow_and_update().highest_position;
            if position != last_position {
                // Whichever branch woke this wait, the read side moved.
                (last_position, progress_seen) = (position, Instant::now());
            }
            let stalled = self.stalled_at.load(Ordering::Acquire) == position;
            let before = self.in_flight.fetch_add(items, Ordering::AcqRel);
            if stalled || self.behind(position) + before < self.max_backlog || Instant::now() >= deadline {
                return Admission { gate: self, items };
            }
            self.in_flight.fetch_sub(items, Ordering::AcqRel);
            tokio::select! {
                biased;
                changed = applied.changed() => if changed.is_err() {
                    // The projector is gone: nothing to pace by.
                    return self.admit_now(items);
                },
                _ = released => {}
                _ = tokio::time::sleep_until(progress_seen + self.stalled_after()) => {
                    // Only events waiting to be applied make a still read
                    // side stalled; with none, the wait was for batches in
                    // flight.
                    if self.behind(position) > 0 {
                        tracing::info!(
                            applied = position,
                            behind = self.behind(position),
                            "the read side applied nothing for a while; batches no longer wait for it until it moves"
                        );
                        self.stalled_at.store(position, Ordering::Release);
                    } else {
                        progress_seen = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
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

    const MAX_WAIT: Duration = Duration::from_secs(2);
    const STALLED_AFTER: Duration = Duration::from_secs(1);

    fn applied(position: i64) -> ReadSideProgress {
        ReadSideProgress { through: crate::store::LogPoint { transaction_id: 1, position }, highest_position: position }
    }

    fn gate(max_backlog: i64) -> (watch::Sender<ReadSideProgress>, ReadSideGate) {
        let (sender, receiver) = watch::channel(ReadSideProgress::default());
        (sender, ReadSideGate::new(receiver, max_backlog, MAX_WAIT))
    }

    /// Whether `admit` returns within `within` (paused time advances only
    /// when every task waits).
    async fn admitted_within(gate: &ReadSideGate, items: usize, within: Duration) -> bool {
        tokio::time::timeout(within, gate.admit(items)).await.is_ok()
    }

    /// Whether `waiting` is still pending after `for_`.
    async fn still_waiting<F: std::future::Future + Unpin>(waiting: &mut F, for_: Duration) -> bool {
        tokio::time::timeout(for_, waiting).await.is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_at_once_while_the_read_side_keeps_up() {
        let (sender, gate) = gate(1_000);
        gate.appended(5_000);
        sender.send_replace(applied(4_500));
        assert!(admitted_within(&gate, 400, Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_while_the_read_side_is_behind_and_goes_when_it_catches_up() {
        let (sender, gate) = gate(1_000);
        sender.send_replace(applied(10));
        gate.appended(5_000);
        let mut waiting = Box::pin(gate.admit(100));
        // The read side moves, but not enough: still waiting. At exactly
        // the bound (1,000 behind) too.
        for position in [1_000, 2_000, 3_000, 3_999, 4_000] {
            assert!(still_waiting(&mut waiting, Duration::from_millis(100)).await, "went {} behind", 5_000 - position);
            sender.send_replace(applied(position));
        }
        assert!(still_waiting(&mut waiting, Duration::from_millis(100)).await, "went 1,000 behind");
        sender.send_replace(applied(4_001));
        assert!(tokio::time::timeout(Duration::from_millis(1), waiting).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn admitted_batches_count_until_they_end_however_long_they_take() {
        let (_sender, gate) = gate(1_000);
        let first = gate.admit(600).await;
        let _second = gate.admit(600).await; // some room was left: it goes, over the bound
        let mut third = Box::pin(gate.admit(10));
        // Longer than a stall takes to find: with nothing waiting to be
        // applied, a still read side is not stalled.
        assert!(still_waiting(&mut third, STALLED_AFTER + Duration::from_millis(500)).await);
        // The first ends (its events applied at once): room again.
        drop(first);
        assert!(tokio::time::timeout(Duration::from_millis(1), third).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_of_items_committed_one_by_one_gives_back_each_as_it_commits() {
        let (sender, gate) = gate(100);
        let mut each = gate.admit(150).await;
        let mut next = Box::pin(gate.admit(10));
        // Each item commits, is applied at once and gives its place back.
        for committed in 1..=50 {
            assert!(
                still_waiting(&mut next, Duration::from_millis(5)).await,
                "went with {} in flight",
                151 - committed
            );
            gate.appended(committed);
            sender.send_replace(applied(committed));
            each.release(1);
        }
        assert!(still_waiting(&mut next, Duration::from_millis(5)).await, "went with 100 in flight");
        each.release(1);
        // 99 items still to run, every committed one applied: room.
        let admitted = tokio::time::timeout(Duration::from_millis(1), next).await;
        assert!(admitted.is_ok());
        drop(each);
        assert_eq!(gate.in_flight.load(Ordering::Acquire), 10, "only the admitted batch's items are left");
    }

    #[tokio::test(start_paused = true)]
    async fn batches_go_in_the_order_they_came() {
        let (sender, gate) = gate(100);
        gate.appended(1_000);
        let order = std::sync::Mutex::new(vec![]);
        let batch = |n: usize| {
            let (gate, order) = (&gate, &order);
            async move {
                // Arrive 1 ms apart; the first arrival is batch 0.
                tokio::time::sleep(Duration::from_millis(n as u64)).await;
                let admission = gate.admit(10).await;
                order.lock().unwrap().push(n);
                admission
            }
        };
        let catch_up = async {
            for position in (0..=1_000).step_by(50) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                sender.send_replace(applied(position));
            }
        };
        let (_, a, b, c, d) = tokio::join!(catch_up, batch(3), batch(0), batch(2), batch(1));
        drop((a, b, c, d));
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_read_side_stops_pacing_until_it_moves_again() {
        let (sender, gate) = gate(1_000);
        sender.send_replace(applied(100));
        gate.appended(50_000);
        // NATS down: nothing is applied. The first batch waits the stall
        // out; the next ones pass at once.
        let started = Instant::now();
        let _first = gate.admit(10).await;
        assert_eq!(started.elapsed(), STALLED_AFTER);
        assert!(admitted_within(&gate, 10, Duration::from_millis(1)).await);
        // The read side moves again (still far behind): pacing resumes.
        sender.send_replace(applied(200));
        assert!(!admitted_within(&gate, 10, Duration::from_millis(500)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_side_that_moves_while_batches_end_is_not_taken_for_stalled() {
        let (sender, gate) = gate(1_000);
        gate.appended(1_000_000);
        let _long = gate.admit_now(1);
        // Progress every 300 ms, each time with a batch ending at once:
        // the read side is never still for STALLED_AFTER.
        let progress = async {
            for position in (1..=6).map(|i| i * 10) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                sender.send_replace(applied(position));
                drop(gate.admit_now(1));
            }
        };
        let waiting = async { tokio::time::timeout(Duration::from_millis(1_900), gate.admit(10)).await.is_err() };
        let ((), still) = tokio::join!(progress, waiting);
        assert!(still, "admitted as if stalled");
        assert_eq!(gate.stalled_at.load(Ordering::Acquire), -1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_batch_waits_longer_than_the_limit() {
        let (sender, gate) = gate(1_000);
        gate.appended(1_000_000);
        // Progress every 100 ms, never enough: not stalled, still behind.
        let progress = async {
            for position in (1..).map(|i| i * 10) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                sender.send_replace(applied(position));
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
        let mut waiting = Box::pin(gate.admit(10));
        assert!(still_waiting(&mut waiting, Duration::from_millis(100)).await);
        drop(sender);
        assert!(tokio::time::timeout(Duration::from_millis(1), waiting).await.is_ok());
    }
}
