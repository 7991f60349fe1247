//! The `statements` read model: per-account entries with a running balance,
//! and the `transfers` table that shows one movement to either party.

use crate::copy_in::CopyRows;
use chrono::{DateTime, Utc};
use ledger_commands::store::{LogPoint, RecordedEvent};
use ledger_domain::events::TransferRecorded;
use ledger_domain::Event;
use rust_decimal::Decimal;
use sqlx::{PgConnection, PgPool};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

pub const TABLES: &[&str] = &["statement_entries", "transfers"];

/// Applies events in order, in three statements: the new transfers, the
/// accounts' last entries, and every entry, numbered and balanced in memory
/// exactly as per-event application would.
pub async fn apply_all(conn: &mut PgConnection, events: &[(&RecordedEvent, &Event)]) -> Result<(), sqlx::Error> {
    apply_knowing(conn, events, &HashMap::new()).await.map(|_| ())
}

/// The accounts' last (entry number, balance after) as one projector wrote
/// them, with the statements checkpoint its last commit left: its point and
/// when it was saved (`updated_at`, which any other writer of the checkpoint
/// changes, a rebuild's swap that saves the same point included). While the
/// checkpoint is still that, nobody else has written entries since, so a
/// batch need not look up the accounts it knows (the lookup was ~9% of
/// PostgreSQL's time at the bench's peak). Kept for one projector run.
#[derive(Default)]
pub struct LastEntries {
    at: Option<(LogPoint, DateTime<Utc>)>,
    known: HashMap<Uuid, (i64, Decimal)>,
}

/// Beyond this many accounts the memory starts over (~64 bytes each).
const REMEMBERED_ACCOUNTS: usize = 100_000;

/// What a batch leaves for `LastEntries::committed`.
pub struct Applied {
    last: HashMap<Uuid, (i64, Decimal)>,
}

impl LastEntries {
    /// After the batch's transaction committed the checkpoint at `at`,
    /// saved at `written`.
    pub fn committed(&mut self, at: LogPoint, written: DateTime<Utc>, applied: Applied) {
        if self.known.len() + applied.last.len() > REMEMBERED_ACCOUNTS {
            self.known.clear();
        }
        self.known.extend(applied.last);
        self.at = Some((at, written));
    }

    /// After a failure: the next batch looks every account up.
    pub fn forget(&mut self) {
        self.at = None;
        self.known.clear();
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// `apply_all` for a projector that remembers: `from` is the statements
/// checkpoint this batch starts after and `written` when it was saved, both
/// read under its lock. The memory is used only if that is the checkpoint
/// its own last commit left.
pub async fn apply_remembering(
    conn: &mut PgConnection,
    events: &[(&RecordedEvent, &Event)],
    memory: &LastEntries,
    from: LogPoint,
    written: DateTime<Utc>,
) -> Result<Applied, sqlx::Error> {
    let nothing = HashMap::new();
    let known = if memory.at == Some((from, written)) { &memory.known } else { &nothing };
    let last = apply_knowing(conn, events, known).await?;
    Ok(Applied { last })
}

/// Applies events, looking up the last entries of the accounts `known` does
/// not hold; returns the last entries of every account the events name.
async fn apply_knowing(
    conn: &mut PgConnection,
    events: &[(&RecordedEvent, &Event)],
    known: &HashMap<Uuid, (i64, Decimal)>,
) -> Result<HashMap<Uuid, (i64, Decimal)>, sqlx::Error> {
    let movements: Vec<(&RecordedEvent, &TransferRecorded)> = events
        .iter()
        .filter_map(|&(r, e)| match e {
            Event::TransferRecorded(t) => Some((r, t)),
            _ => None,
        })
        .collect();
    if movements.is_empty() {
        return Ok(HashMap::new());
    }
    let column = |f: &dyn Fn(&RecordedEvent, &TransferRecorded) -> String| -> Vec<String> {
        movements.iter().map(|(r, t)| f(r, t)).collect()
    };
    let ids: Vec<Uuid> = movements.iter().map(|(_, t)| t.transfer_id).collect();
    let froms: Vec<Uuid> = movements.iter().map(|(_, t)| t.from_account).collect();
    let tos: Vec<Uuid> = movements.iter().map(|(_, t)| t.to_account).collect();
    let amounts: Vec<Decimal> = movements.iter().map(|(_, t)| t.amount).collect();
    let currencies = column(&|_, t| t.currency.clone());
    let kinds = column(&|_, t| t.kind.as_str().to_owned());
    let references: Vec<Option<String>> = movements.iter().map(|(_, t)| t.reference.clone()).collect();
    let recorded_ats: Vec<DateTime<Utc>> = movements.iter().map(|(r, _)| r.metadata.recorded_at).collect();
    let positions: Vec<i64> = movements.iter().map(|(r, _)| r.position).collect();
    let mut inserted: HashSet<Uuid> = sqlx::query_scalar(
        "INSERT INTO transfers (transfer_id, from_account, to_account, amount, currency, kind, reference,
                                recorded_at, position)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::numeric[], $5::text[], $6::text[],
                              $7::text[], $8::timestamptz[], $9::bigint[])
         ON CONFLICT (transfer_id) DO NOTHING RETURNING transfer_id",
    )
    .bind(&ids)
    .bind(&froms)
    .bind(&tos)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&kinds)
    .bind(&references)
    .bind(&recorded_ats)
    .bind(&positions)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    if inserted.is_empty() {
        return Ok(HashMap::new());
    }
    let mut last: HashMap<Uuid, (i64, Decimal)> = HashMap::with_capacity(movements.len() * 2);
    let mut unknown: Vec<Uuid> = Vec::new();
    for account in froms.iter().chain(tos.iter()) {
        if let std::collections::hash_map::Entry::Vacant(slot) = last.entry(*account) {
            match known.get(account) {
                Some(entry) => {
                    slot.insert(*entry);
                }
                None => unknown.push(*account),
            }
        }
    }
    unknown.sort_unstable();
    unknown.dedup();
    if !unknown.is_empty() {
        last.extend(lookup_last(conn, &unknown).await?);
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(inserted.len() * 2);
    // `remove`: a transfer listed twice in one batch gets its entries once, as across batches.
    for (recorded, t) in movements.iter().filter(|(_, t)| inserted.remove(&t.transfer_id)) {
        entries.extend(next_entries(&mut last, recorded, t));
    }
    sqlx::query(
        "INSERT INTO statement_entries (account_id, entry_no, position, transfer_id, direction, amount,
                                        balance_after, counterparty_account, kind, reference, recorded_at)
         SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::uuid[], $5::text[], $6::numeric[],
                              $7::numeric[], $8::uuid[], $9::text[], $10::text[], $11::timestamptz[])",
    )
    .bind(entries.iter().map(|e| e.account).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.entry_no).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.position).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.transfer_id).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.direction).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.amount).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.balance_after).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.counterparty).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.kind).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.reference.clone()).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.recorded_at).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(last)
}

/// The accounts' last entry numbers and balances; (0, 0) for one with none.
async fn lookup_last(conn: &mut PgConnection, accounts: &[Uuid]) -> Result<HashMap<Uuid, (i64, Decimal)>, sqlx::Error> {
    Ok(sqlx::query_as::<_, (Uuid, Option<i64>, Option<Decimal>)>(
        "SELECT a.account_id, l.entry_no, l.balance_after FROM unnest($1::uuid[]) AS a(account_id)
         LEFT JOIN LATERAL (
             SELECT entry_no, balance_after FROM statement_entries
             WHERE account_id = a.account_id ORDER BY entry_no DESC LIMIT 1
         ) l ON true",
    )
    .bind(accounts)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|(a, n, b)| (a, (n.unwrap_or(0), b.unwrap_or(Decimal::ZERO))))
    .collect())
}

struct Entry {
    account: Uuid,
    entry_no: i64,
    position: i64,
    transfer_id: Uuid,
    direction: &'static str,
    amount: Decimal,
    balance_after: Decimal,
    counterparty: Uuid,
    kind: &'static str,
    reference: Option<String>,
    recorded_at: DateTime<Utc>,
}

/// A movement's two entries, continuing each account's last (entry number,
/// balance) in apply order.
fn next_entries(
    last: &mut HashMap<Uuid, (i64, Decimal)>,
    recorded: &RecordedEvent,
    t: &TransferRecorded,
) -> [Entry; 2] {
    [(t.from_account, t.to_account, "debit", -t.amount), (t.to_account, t.from_account, "credit", t.amount)].map(
        |(account, counterparty, direction, delta)| {
            let (entry_no, balance) = last.entry(account).or_insert((0, Decimal::ZERO));
            *entry_no += 1;
            *balance += delta;
            Entry {
                account,
                entry_no: *entry_no,
                position: recorded.position,
                transfer_id: t.transfer_id,
                direction,
                amount: t.amount,
                balance_after: *balance,
                counterparty,
                kind: t.kind.as_str(),
                reference: t.reference.clone(),
                recorded_at: recorded.metadata.recorded_at,
            }
        },
    )
}

/// Replay's way of building this projection: every account's last entry
/// number and balance, and the transfers already listed, are kept in memory
/// (read back once from the tables when a build resumes), so a page is two
/// `COPY`s into tables that get their indexes after the load. The rows are
/// the ones `apply_all` writes, in the same order.
pub struct Bulk {
    last: HashMap<Uuid, (i64, Decimal)>,
    listed: HashSet<Uuid>,
}

impl Bulk {
    /// Picks up where the tables (on the connection's search path) stand.
    pub async fn resume(conn: &mut PgConnection) -> Result<Bulk, sqlx::Error> {
        let last = sqlx::query_as::<_, (Uuid, i64, Decimal)>(
            "SELECT DISTINCT ON (account_id) account_id, entry_no, balance_after FROM statement_entries
             ORDER BY account_id, entry_no DESC",
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(a, n, b)| (a, (n, b)))
        .collect();
        let listed = sqlx::query_scalar::<_, Uuid>("SELECT transfer_id FROM transfers")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
        Ok(Bulk { last, listed })
    }

    /// The rows events add, in order; the state moves past them. The caller
    /// sends them in the transaction that advances the checkpoint, and drops
    /// this state if that fails (it is then ahead of what was committed).
    pub fn encode(&mut self, events: &[(&RecordedEvent, &Event)]) -> Result<BulkRows, sqlx::Error> {
        let mut transfers = CopyRows::new(9, events.len() * 160);
        let mut entries = CopyRows::new(11, events.len() * 2 * 200);
        for &(recorded, event) in events {
            let Event::TransferRecorded(t) = event else { continue };
            if !self.listed.insert(t.transfer_id) {
                continue;
            }
            transfers
                .value(&t.transfer_id)?
                .value(&t.from_account)?
                .value(&t.to_account)?
                .value(&t.amount)?
                .value(&t.currency)?
                .value(&t.kind.as_str())?
                .value(&t.reference)?
                .value(&recorded.metadata.recorded_at)?
                .value(&recorded.position)?
                .end_row()?;
            for e in next_entries(&mut self.last, recorded, t) {
                entries
                    .value(&e.account)?
                    .value(&e.entry_no)?
                    .value(&e.position)?
                    .value(&e.transfer_id)?
                    .value(&e.direction)?
                    .value(&e.amount)?
                    .value(&e.balance_after)?
                    .value(&e.counterparty)?
                    .value(&e.kind)?
                    .value(&e.reference)?
                    .value(&e.recorded_at)?
                    .end_row()?;
            }
        }
        Ok(BulkRows { transfers, entries })
    }
}

/// One page's rows, encoded by `Bulk::encode`.
pub struct BulkRows {
    transfers: CopyRows,
    entries: CopyRows,
}

impl BulkRows {
    pub async fn send(self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let BulkRows { transfers, entries } = self;
        transfers
            .send(
                conn,
                "COPY transfers (transfer_id, from_account, to_account, amount, currency, kind, reference,
                                 recorded_at, position) FROM STDIN (FORMAT binary)",
            )
            .await?;
        entries
            .send(
                conn,
                "COPY statement_entries (account_id, entry_no, position, transfer_id, direction, amount,
                                         balance_after, counterparty_account, kind, reference, recorded_at)
                 FROM STDIN (FORMAT binary)",
            )
            .await?;
        Ok(())
    }
}

pub async fn apply(conn: &mut PgConnection, recorded: &RecordedEvent, event: &Event) -> Result<(), sqlx::Error> {
    let Event::TransferRecorded(t) = event else {
        return Ok(());
    };
    let inserted = sqlx::query(
        "INSERT INTO transfers (transfer_id, from_account, to_account, amount, currency, kind, reference,
                                recorded_at, position)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (transfer_id) DO NOTHING",
    )
    .bind(t.transfer_id)
    .bind(t.from_account)
    .bind(t.to_account)
    .bind(t.amount)
    .bind(&t.currency)
    .bind(t.kind.as_str())
    .bind(&t.reference)
    .bind(recorded.metadata.recorded_at)
    .bind(recorded.position)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(());
    }
    for (account, counterparty, direction, delta) in
        [(t.from_account, t.to_account, "debit", -t.amount), (t.to_account, t.from_account, "credit", t.amount)]
    {
        // The next entry continues the account's previous one in apply order.
        sqlx::query(
            "INSERT INTO statement_entries (account_id, entry_no, position, transfer_id, direction, amount,
                                            balance_after, counterparty_account, kind, reference, recorded_at)
             SELECT $1, COALESCE(last.entry_no, 0) + 1, $2, $3, $4, $5,
                    COALESCE(last.balance_after, 0) + $6, $7, $8, $9, $10
             FROM (SELECT 1) one
             LEFT JOIN LATERAL (
                 SELECT entry_no, balance_after FROM statement_entries
                 WHERE account_id = $1 ORDER BY entry_no DESC LIMIT 1
             ) last ON true",
        )
        .bind(account)
        .bind(recorded.position)
        .bind(t.transfer_id)
        .bind(direction)
        .bind(t.amount)
        .bind(delta)
        .bind(counterparty)
        .bind(t.kind.as_str())
        .bind(&t.reference)
        .bind(recorded.metadata.recorded_at)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct EntryView {
    pub entry_no: i64,
    pub transfer_id: Uuid,
    pub direction: String,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub counterparty_account: Uuid,
    pub kind: String,
    pub reference: Option<String>,
    pub recorded_at: DateTime<Utc>,
    pub position: i64,
}

/// Entries newest first; `before` is the cursor (an entry number) from the previous page.
pub async fn entries(
    pool: &PgPool,
    account_id: Uuid,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<EntryView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT entry_no, transfer_id, direction, amount, balance_after, counterparty_account, kind,
                reference, recorded_at, position
         FROM statement_entries
         WHERE account_id = $1 AND entry_no < COALESCE($2, 9223372036854775807)
         ORDER BY entry_no DESC LIMIT $3",
    )
    .bind(account_id)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct TransferView {
    pub transfer_id: Uuid,
    pub from_account: Uuid,
    pub to_account: Uuid,
    pub amount: Decimal,
    pub currency: String,
    pub kind: String,
    pub reference: Option<String>,
    pub recorded_at: DateTime<Utc>,
    pub position: i64,
    pub from_owner: Option<Uuid>,
    pub to_owner: Option<Uuid>,
}

pub async fn transfer(pool: &PgPool, transfer_id: Uuid) -> Result<Option<TransferView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT t.transfer_id, t.from_account, t.to_account, t.amount, t.currency, t.kind, t.reference,
                t.recorded_at, t.position, f.owner_id AS from_owner, o.owner_id AS to_owner
         FROM transfers t
         LEFT JOIN balances f ON f.account_id = t.from_account
         LEFT JOIN balances o ON o.account_id = t.to_account
         WHERE t.transfer_id = $1",
    )
    .bind(transfer_id)
    .fetch_optional(pool)
    .await
}
