//! The canonical forms of the events this process appended, kept for the
//! audit chain's sealer until it links them.
//!
//! The chain hashes each event's canonical record, and the writer already
//! builds that record (all of it but `position`) for the event's MAC. Kept
//! here, the sealer reads back only each settled event's place in the log
//! and its id, not the whole row (the payload's JSON out of PostgreSQL,
//! parsed and written canonically again): that was ~9% of the machine's CPU per
//! transfer under a bulk load (BENCHMARKS.md, "The chain sealed from the
//! writer's forms").
//!
//! What the chain then covers is what the ledger appended, taken from the
//! writer's memory rather than read back; a row altered between its commit
//! and its sealing no longer gets sealed as altered, it shows up as the
//! first link that does not recompute. Rows this process did not append
//! (another instance's, or written out of band) are read back whole, as
//! before. Forms are kept only while a sealer of this process leads, and at
//! most `CAPACITY` of them: a form not taken (its transaction rolled back,
//! or the sealer behind) is dropped oldest first, and the sealer reads that
//! row back.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use uuid::Uuid;

/// At most this many forms are kept (~0.7 kB each): a few seconds of a bulk
/// load's events, where the sealer takes them within a batch or two.
pub const CAPACITY: usize = 20_000;

/// An event's canonical record without `position` (what its MAC covers),
/// and where `position` goes in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalForm {
    bytes: Vec<u8>,
    position_at: usize,
}

impl CanonicalForm {
    /// `bytes` is a canonical record written without `position`, and
    /// `position_at` the offset where its field belongs: after `payload`,
    /// before `recorded_at` (keys are sorted).
    pub(crate) fn new(bytes: Vec<u8>, position_at: usize) -> CanonicalForm {
        debug_assert!(position_at <= bytes.len());
        CanonicalForm { bytes, position_at }
    }

    /// What the MAC covers.
    pub fn without_position(&self) -> &[u8] {
        &self.bytes
    }

    /// The audit chain's record of the event at `position`: byte for byte
    /// what `store::write_canonical(e, true, out)` writes for the row.
    pub fn with_position(&self, position: i64, out: &mut Vec<u8>) {
        let (before, after) = self.bytes.split_at(self.position_at.min(self.bytes.len()));
        out.extend_from_slice(before);
        out.extend_from_slice(b",\"position\":");
        ledger_domain::canonical::write_scalar(&position, out);
        out.extend_from_slice(after);
    }
}

/// The forms of events appended here and not sealed yet, by event id.
#[derive(Default)]
pub struct UnsealedForms {
    /// Whether a sealer of this process leads; only then are forms kept.
    keeping: AtomicBool,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    by_event: HashMap<Uuid, CanonicalForm>,
    /// Event ids in the order kept, to drop the oldest past `CAPACITY`.
    /// Ids already taken stay until they reach the front.
    order: VecDeque<Uuid>,
}

impl UnsealedForms {
    /// Whether forms are wanted now: an appender skips collecting them else.
    pub fn keeping(&self) -> bool {
        self.keeping.load(Ordering::Acquire)
    }

    /// A sealer of this process leads: keep the forms of what is appended
    /// from now on.
    pub fn start_keeping(&self) {
        self.keeping.store(true, Ordering::Release);
    }

    /// No sealer of this process leads: drop what is kept and keep nothing.
    pub fn stop_keeping(&self) {
        self.keeping.store(false, Ordering::Release);
        let mut kept = self.lock();
        kept.by_event.clear();
        kept.order.clear();
    }

    /// Keeps the forms of events just appended (their transaction may still
    /// roll back: a form is used only for an event the log holds).
    pub fn keep(&self, forms: Vec<(Uuid, CanonicalForm)>) {
        if forms.is_empty() || !self.keeping() {
            return;
        }
        let mut kept = self.lock();
        // Checked again under the lock: a sealer that stopped leading since
        // has cleared the forms and wants none.
        if !self.keeping() {
            return;
        }
        for (event_id, form) in forms {
            kept.by_event.insert(event_id, form);
            kept.order.push_back(event_id);
        }
        while kept.order.len() > CAPACITY {
            if let Some(oldest) = kept.order.pop_front() {
                kept.by_event.remove(&oldest);
            }
        }
    }

    /// The forms of these events, each taken out (`None` where none is
    /// kept), in the order given.
    pub fn take(&self, event_ids: &[Uuid]) -> Vec<Option<CanonicalForm>> {
        let mut kept = self.lock();
        if kept.by_event.is_empty() {
            return vec![None; event_ids.len()];
        }
        let taken = event_ids.iter().map(|id| kept.by_event.remove(id)).collect();
        if kept.by_event.is_empty() {
            // Nothing left to drop: the ids of taken forms go too.
            kept.order.clear();
        }
        taken
    }

    /// How many forms are kept now.
    pub fn len(&self) -> usize {
        self.lock().by_event.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        // A panic while holding the lock leaves a map of forms, still
        // consistent enough to use: a missing form is read back.
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(n: u8) -> CanonicalForm {
        CanonicalForm::new(format!("{{\"a\":{n},\"recorded_at\":\"x\"}}").into_bytes(), 6)
    }

    #[test]
    fn nothing_is_kept_unless_a_sealer_leads() {
        let forms = UnsealedForms::default();
        let id = Uuid::now_v7();
        forms.keep(vec![(id, form(1))]);
        assert_eq!(forms.take(&[id]), vec![None]);
        forms.start_keeping();
        forms.keep(vec![(id, form(1))]);
        assert_eq!(forms.take(&[id]), vec![Some(form(1))]);
        assert_eq!(forms.take(&[id]), vec![None], "a form is taken once");
        forms.keep(vec![(id, form(1))]);
        forms.stop_keeping();
        assert!(forms.is_empty(), "a sealer that stops leading drops what was kept");
    }

    #[test]
    fn past_the_capacity_the_oldest_forms_are_dropped() {
        let forms = UnsealedForms::default();
        forms.start_keeping();
        let ids: Vec<Uuid> = (0..CAPACITY + 3).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            forms.keep(vec![(*id, form(1))]);
        }
        assert_eq!(forms.len(), CAPACITY);
        assert_eq!(forms.take(&ids[..4]), vec![None, None, None, Some(form(1))]);
        // Taking everything also empties the order, so it cannot grow without the map.
        let _ = forms.take(&ids);
        assert!(forms.lock().order.is_empty());
    }

    #[test]
    fn the_position_goes_in_its_sorted_place() {
        let mut out = vec![];
        form(7).with_position(42, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "{\"a\":7,\"position\":42,\"recorded_at\":\"x\"}");
    }
}
