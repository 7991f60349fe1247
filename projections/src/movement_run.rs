//! A projector's batch of movements only (`TransferRecorded`: nearly all of
//! the log under load), applied by every read model in one statement: the
//! balances, the transfers listed, the statement entries, and the
//! checkpoints moved. The general path takes a statement for each, so a
//! batch's transaction costs seven or eight round trips; this one costs four
//! (with the transaction's start, the checkpoints' lock and the commit), or
//! five when the projector's memory lacks an account's last entry. Measured
//! under a paced bulk load it bought ~3% (BENCHMARKS.md, "The projector's
//! movements in one statement"): there each statement's execution, not its
//! round trip, waits for a core. It also spares PostgreSQL three statements'
//! fixed cost per batch.
//!
//! It writes exactly the rows the general path writes: the entries are
//! numbered from the projector's memory of each account's last entry, the
//! accounts it does not know looked up first in one statement
//! (`statements::plan`, as the general path does), and the statement
//! reports how many transfers it listed. If one was listed already, the
//! plan was wrong for it: the caller rolls the whole transaction back and
//! takes the general path, which lists each once.

use crate::checkpoint::Locked;
use crate::statements::{self, EntryColumns, LastEntries, Planned, TransferColumns};
use crate::{Projection, ProjectionError};
use chrono::{DateTime, Utc};
use ledger_commands::store::{LogPoint, RecordedEvent};
use ledger_domain::events::TransferRecorded;
use ledger_domain::Event;
use rust_decimal::Decimal;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgConnection};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// Whether this statement writes everything `projection` would for
/// movements. No wildcard: a new read model must say whether movements
/// concern it, and one that reads them keeps its batches on the general path
/// until this statement writes its rows too.
pub fn writes_all_of(projection: Projection) -> bool {
    match projection {
        Projection::Balances | Projection::Statements => true,
        // Neither reads `TransferRecorded` (`activity::subject`, `orders::apply`).
        Projection::Activity | Projection::Orders => true,
    }
}

/// A projector's batch as one run of movements, if it is one: every read
/// model of the projector (`projections`) applies all of it (none is past
/// any of it: `work` holds each one's events after its checkpoint), each
/// is one this statement writes whole, and the batch holds nothing but
/// movements and no transfer twice. Else `None`: the batch goes per read
/// model.
pub fn qualify<'e>(
    projections: &[Projection],
    work: &[(Projection, &Locked, Vec<&'e RecordedEvent>)],
    source: &'e [RecordedEvent],
    decoded: &'e HashMap<LogPoint, Event>,
) -> Option<Movements<'e>> {
    if work.len() != projections.len()
        || work.iter().any(|(p, _, mine)| mine.len() != source.len() || !writes_all_of(*p))
    {
        return None;
    }
    let movements = source
        .iter()
        .map(|r| match decoded.get(&r.point()) {
            Some(Event::TransferRecorded(t)) => Some((r, t)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    // A transfer twice in the batch is listed once: the plan, which
    // numbers entries for each, would be sent back every time.
    let mut transfers = HashSet::with_capacity(movements.len());
    if !movements.iter().all(|(_, t)| transfers.insert(t.transfer_id)) {
        return None;
    }
    Some(movements)
}

/// The statement entries of a qualified run, if the statements read model
/// is among `work`: numbered from the projector's memory, and from one
/// lookup for the accounts it does not know (`statements::plan`), under
/// the checkpoints' lock `work` was read with.
pub async fn plan(
    conn: &mut PgConnection,
    work: &[(Projection, &Locked, Vec<&RecordedEvent>)],
    movements: &[(&RecordedEvent, &TransferRecorded)],
    memory: &LastEntries,
) -> Result<Option<Planned>, sqlx::Error> {
    match work.iter().find(|(p, _, _)| *p == Projection::Statements) {
        Some((_, from, _)) => Ok(Some(statements::plan(conn, memory, from.at, from.written, movements).await?)),
        None => Ok(None),
    }
}

/// What went wrong in calling it.
#[derive(Debug, thiserror::Error)]
pub enum MisuseError {
    #[error("the statements read model moves only with the entries planned for it")]
    StatementsWithoutPlan,
    #[error("{saved} checkpoints saved of {moved}: a checkpoint row was missing")]
    CheckpointsMissing { saved: usize, moved: usize },
}

/// A batch's movements, in log order.
pub type Movements<'e> = Vec<(&'e RecordedEvent, &'e TransferRecorded)>;

/// What the one statement did.
pub enum Outcome {
    /// Every row written; each checkpoint moved, with when it was saved.
    Applied { saved: Vec<(String, DateTime<Utc>)>, statements: Option<statements::Applied> },
    /// A movement's transfer was listed already: the statement's rows are
    /// wrong and the transaction must be rolled back.
    AlreadyListed,
}

/// Applies `movements` (in log order, every one past every checkpoint in
/// `moved`) for the read models in `moved`: `Balances` and `Statements` write
/// rows, the others have nothing to do with movements. `planned` holds the
/// statement entries when `Statements` is among them.
pub async fn apply(
    conn: &mut PgConnection,
    movements: &[(&RecordedEvent, &TransferRecorded)],
    moved: &[(Projection, LogPoint)],
    planned: Option<Planned>,
) -> Result<Outcome, ProjectionError> {
    let has = |p: Projection| moved.iter().any(|(q, _)| *q == p);
    if has(Projection::Statements) && planned.is_none() {
        return Err(MisuseError::StatementsWithoutPlan.into());
    }
    let mut arguments = PgArguments::default();

    // Balances: each account's summed change, movements counted, and the
    // last position that touched it (the log order's last).
    let mut changes: HashMap<Uuid, (Decimal, i64, i64)> = HashMap::new();
    if has(Projection::Balances) {
        for (recorded, t) in movements {
            for (account, delta) in [(t.from_account, -t.amount), (t.to_account, t.amount)] {
                let change = changes.entry(account).or_insert((Decimal::ZERO, 0, recorded.position));
                change.0 += delta;
                change.1 += 1;
                change.2 = recorded.position;
            }
        }
    }
    let (mut accounts, mut deltas, mut counts, mut lasts) = (vec![], vec![], vec![], vec![]);
    for (account, (delta, count, last)) in changes {
        accounts.push(account);
        deltas.push(delta);
        counts.push(count);
        lasts.push(last);
    }
    arguments.add(accounts).map_err(sqlx::Error::Encode)?;
    arguments.add(deltas).map_err(sqlx::Error::Encode)?;
    arguments.add(counts).map_err(sqlx::Error::Encode)?;
    arguments.add(lasts).map_err(sqlx::Error::Encode)?;

    // Statements: the transfers and their entries, or nothing.
    let (listing, entries, expected_listed) = match (&planned, has(Projection::Statements)) {
        (Some(planned), true) => {
            (TransferColumns::of(movements), EntryColumns::of(&planned.entries), movements.len() as i64)
        }
        _ => (TransferColumns::of(&[]), EntryColumns::of(&[]), 0),
    };
    listing.add_to(&mut arguments)?;
    entries.add_to(&mut arguments)?;

    // The checkpoints.
    arguments.add(moved.iter().map(|(p, _)| p.name()).collect::<Vec<_>>()).map_err(sqlx::Error::Encode)?;
    arguments
        .add(moved.iter().map(|(_, at)| at.transaction_id.to_string()).collect::<Vec<_>>())
        .map_err(sqlx::Error::Encode)?;
    arguments.add(moved.iter().map(|(_, at)| at.position).collect::<Vec<_>>()).map_err(sqlx::Error::Encode)?;

    // Every part is a data-modifying CTE: each runs to completion whether or
    // not it is read. They touch different tables, so none needs to see
    // another's rows.
    let rows: Vec<(i64, String, DateTime<Utc>)> = sqlx::query_as_with(
        "WITH moved AS (
             UPDATE balances SET balance = balance + d.change, available = available + d.change,
                    version = version + d.n, last_position = d.last
             FROM unnest($1::uuid[], $2::numeric[], $3::bigint[], $4::bigint[]) AS d(account_id, change, n, last)
             WHERE balances.account_id = d.account_id),
         listed AS (
             INSERT INTO transfers (transfer_id, from_account, to_account, amount, currency, kind, reference,
                                    recorded_at, position)
             SELECT * FROM unnest($5::uuid[], $6::uuid[], $7::uuid[], $8::numeric[], $9::text[], $10::text[],
                                  $11::text[], $12::timestamptz[], $13::bigint[])
             ON CONFLICT (transfer_id) DO NOTHING RETURNING 1),
         entered AS (
             INSERT INTO statement_entries (account_id, entry_no, position, transfer_id, direction, amount,
                                            balance_after, counterparty_account, kind, reference, recorded_at)
             SELECT * FROM unnest($14::uuid[], $15::bigint[], $16::bigint[], $17::uuid[], $18::text[],
                                  $19::numeric[], $20::numeric[], $21::uuid[], $22::text[], $23::text[],
                                  $24::timestamptz[])),
         saved AS (
             UPDATE projection_checkpoints c
             SET transaction_id = p.t::xid8, position = p.position, updated_at = now()
             FROM unnest($25::text[], $26::text[], $27::bigint[]) AS p(projection, t, position)
             WHERE c.projection = p.projection
             RETURNING c.projection, c.updated_at)
         SELECT (SELECT count(*) FROM listed), s.projection, s.updated_at FROM saved s",
        arguments,
    )
    .fetch_all(&mut *conn)
    .await?;
    if rows.len() != moved.len() {
        // The checkpoint rows are created under their lock before this runs.
        return Err(MisuseError::CheckpointsMissing { saved: rows.len(), moved: moved.len() }.into());
    }
    if rows.first().map_or(0, |r| r.0) != expected_listed {
        return Ok(Outcome::AlreadyListed);
    }
    Ok(Outcome::Applied {
        saved: rows.into_iter().map(|(_, name, at)| (name, at)).collect(),
        statements: planned.filter(|_| has(Projection::Statements)).map(Planned::into_applied),
    })
}
